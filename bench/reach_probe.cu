// The reach probe (see reach_probe.hpp).
#include "bench/reach_probe.hpp"

#include <algorithm>

#include "cuda/cuda_check.hpp"
#include "cuda/device_utils.cuh"
#include "cuda/launch.cuh"

namespace dsv4::bench {

namespace {

constexpr int kThreads = 256;
constexpr int kInFlight = 8;     // 16-byte loads a thread has in flight: 32 KB a block
constexpr int kBlocksPerSm = 2;  // 64 KB in flight an SM, more than HBM's latency needs
// The kernel is built for twice that many blocks an SM (64 registers a thread), so that the
// next step's blocks fit beside this step's and stream their weights during its tail. Built
// for two (88 registers), they did not, and the probe measured the least step plus the
// weights' stream instead of their overlap (H100: Flash HCA decode B=1 8.1 us).

struct ProbeParams {
  ReachStep step;
  unsigned* handoff;
  unsigned* barrier;
};

// The block's share of a range, every byte loaded (folded into one word, so that no load is
// dead), kInFlight loads a thread at a time.
template <bool kWeights>
__device__ unsigned read_share(const ByteRange& r, std::uint64_t policy) {
  const auto* p = static_cast<const uint4*>(r.data);
  const std::int64_t n = r.bytes / 16;
  const std::int64_t begin = n * blockIdx.x / gridDim.x, end = n * (blockIdx.x + 1) / gridDim.x;
  uint4 acc = make_uint4(0, 0, 0, 0);
  auto fold = [&](const uint4& v) { acc.x ^= v.x, acc.y ^= v.y, acc.z ^= v.z, acc.w ^= v.w; };
  std::int64_t i = begin + threadIdx.x;
  for (; i + (kInFlight - 1) * kThreads < end; i += kInFlight * kThreads) {
    uint4 v[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) v[k] = kWeights ? cuda::load_once(p + i + k * kThreads, policy) : __ldcg(p + i + k * kThreads);
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) fold(v[k]);
  }
  for (; i < end; i += kThreads) fold(kWeights ? cuda::load_once(p + i, policy) : __ldcg(p + i));
  return acc.x ^ acc.y ^ acc.z ^ acc.w;
}

__global__ void __launch_bounds__(kThreads, 2 * kBlocksPerSm) reach_step_kernel(const __grid_constant__ ProbeParams pp) {
  const ReachStep& s = pp.step;
  // Nothing this kernel writes is read before the next one waits: it may start now and
  // stream its own weights during this one's tail.
  cuda::allow_next_kernel();
  // The weights, read once a step (evict_first, as the library reads them).
  const std::uint64_t policy = cuda::l2_policy_evict_first();
  unsigned acc = read_share<true>(s.weights[0], policy) ^ read_share<true>(s.weights[1], policy);
  cuda::wait_for_previous_kernel();
  for (const ByteRange& r : s.inputs) acc ^= read_share<false>(r, policy);
  // The exchange: every block hands over its word, the last to arrive releases all of them
  // (the grid is one wave, so every block is resident), and each reads another block's word.
  pp.handoff[blockIdx.x * kThreads + threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned generation = cuda::load_acquire(&pp.barrier[1]);
    __threadfence();
    if (atomicAdd(&pp.barrier[0], 1u) == gridDim.x - 1) {
      pp.barrier[0] = 0;  // the next launch arrives only after this one completes
      cuda::add_release(&pp.barrier[1], 1u);
    } else {
      while (cuda::load_acquire(&pp.barrier[1]) == generation) {
      }
    }
  }
  __syncthreads();
  acc ^= __ldcg(&pp.handoff[((blockIdx.x + 1) % gridDim.x) * kThreads + threadIdx.x]);
  // The stores, each depending on the exchange.
  auto* out = static_cast<uint4*>(s.outputs);
  const std::int64_t n = s.output_bytes / 16;
  const std::int64_t begin = n * blockIdx.x / gridDim.x, end = n * (blockIdx.x + 1) / gridDim.x;
  for (std::int64_t i = begin + threadIdx.x; i < end; i += kThreads)
    out[i] = make_uint4(acc, static_cast<unsigned>(i), acc, acc);
}

// One wave on the current device: the exchange needs every block resident.
int one_wave_blocks() {
  int device = 0, sms = 0, per_sm = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reach_step_kernel, kThreads, 0));
  return sms * std::clamp(per_sm, 1, kBlocksPerSm);
}

Device current_device() {
  int device = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  return Device::cuda(device);
}

}  // namespace

ReachProbe::ReachProbe()
    : blocks_(one_wave_blocks()),
      handoff_(current_device(), static_cast<std::size_t>(blocks_) * kThreads * sizeof(unsigned)),
      barrier_(current_device(), 2 * sizeof(unsigned)) {
  barrier_.fill(0);
}

void ReachProbe::run(const ReachStep& step, cudaStream_t stream) const {
  cuda::launch_kernel(reach_step_kernel, dim3(static_cast<unsigned>(blocks_)), dim3(kThreads), 0, stream, true,
                      ProbeParams{step, static_cast<unsigned*>(handoff_.data()), static_cast<unsigned*>(barrier_.data())});
}

}  // namespace dsv4::bench
