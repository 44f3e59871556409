// One block per completed window: the entry's epilogue in shared memory (RMSNorm of the
// bf16-rounded pooled values, RoPE, Walsh-Hadamard rotation), then fp8 packing and the store
// into the caller's cache row (and the bf16 entry, when asked for).
#include "cuda/finish_entry.cuh"
#include "cuda/kernels.hpp"

namespace dsv4::cuda {

namespace {

__global__ void __launch_bounds__(kFinishThreads) finish_entries_kernel(CompressorConsts c, DevicePlan p,
                                                                        const float* pooled, std::uint8_t* cache,
                                                                        std::uint16_t* entries) {
  __shared__ float v[kFinishMaxHeadDim];
  __shared__ float scratch[32];
  const EntryInputs in = load_entry_inputs(c, p, cache != nullptr, blockIdx.x);
  finish_entry(c, in, pooled, cache, entries, blockIdx.x, v, scratch);
}

}  // namespace

void launch_finish_entries(const CompressorConsts& c, const DevicePlan& p, const float* pooled, std::uint8_t* cache,
                           std::uint16_t* entries, cudaStream_t stream) {
  if (p.num_entries == 0) return;
  finish_entries_kernel<<<p.num_entries, kFinishThreads, 0, stream>>>(c, p, pooled, cache, entries);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
