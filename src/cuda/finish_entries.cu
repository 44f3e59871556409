// One block per completed window: the entry's epilogue in shared memory (RMSNorm of the
// bf16-rounded pooled values, RoPE, Walsh-Hadamard rotation), then fp8 packing and the store
// into the caller's cache row (and the bf16 entry, when asked for).
#include "cuda/finish_entry.cuh"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"

namespace dsv4::cuda {

namespace {

__global__ void __launch_bounds__(kFinishThreads) finish_entries_kernel(CompressorConsts c, DevicePlan p,
                                                                        float* pooled, std::uint8_t* cache,
                                                                        std::uint16_t* entries) {
  __shared__ float v[kFinishMaxHeadDim];
  __shared__ float scratch[32];
  const EntryInputs in = load_entry_inputs(c, p, cache != nullptr, blockIdx.x);  // plan and weights
  wait_for_previous_kernel();
  allow_next_kernel();
  finish_entry(c, in, load_pooled(c, pooled, blockIdx.x, false), cache, entries, blockIdx.x, v, scratch);
}

}  // namespace

void launch_finish_entries(const CompressorConsts& c, const DevicePlan& p, float* pooled, std::uint8_t* cache,
                           std::uint16_t* entries, cudaStream_t stream, bool pdl) {
  if (p.num_entries == 0) return;
  launch_kernel(finish_entries_kernel, dim3(static_cast<unsigned>(p.num_entries)), dim3(kFinishThreads), 0, stream, pdl,
                c, p, pooled, cache, entries);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
