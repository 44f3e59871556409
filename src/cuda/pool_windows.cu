// Gated softmax pooling of every completed window into pooled[entry, channel] (fp32). A block
// covers one entry and a chunk of channels; warps read 32 consecutive channels of one row, so
// every load is coalesced. Ratio 128: 8 groups of threads each run an online softmax over a
// share of the window's slots, merged in a fixed order (an HCA window's 128 slots are read by 8
// blocks x 8 groups at once). Ratio 4: group y reads slot y (with many entries one thread per
// channel reads all 8) and the 8 slots are pooled in closed form.
#include "cuda/device_utils.cuh"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"

namespace dsv4::cuda {

namespace {

// Ratio 128: 64 channels x 8 slot groups. Measured on the H100 (docs/PERF.md), 16 groups made
// an HCA step at B=1 faster (30 -> 25 us) but B=256 slower (197 -> 230 us).
constexpr int kChannels = 64;
constexpr int kGroups = 8;
// Ratio 4 with many entries: 128 channels, one thread each over the 8 slots. One slot per
// thread (8 groups) spends most of its time on per-thread set-up when the GPU is full: ncu
// showed 31 us for a B=256 step reading 4 MB (docs/PERF.md). With few
// entries the 8 groups win: the slots' loads then run side by side instead of one after another
// (B=1: 8 groups 21 us a CSA main step, one thread per channel 25 us).
constexpr int kOverlapChannels = 128;
constexpr int kOneGroupFrom = 128;  // entries

template <class ScoreT, class StateT>
struct RowSource {
  const ScoreT* call_rows;  // this request's first kv_score row
  std::int64_t ld;
  const StateT* ring;       // this request's slot
  std::int64_t ring_mask, width, start;  // ring rows are a power of two
  bool round_bf16;

  // Value at column c of the token at `position`, as the pooling sees it.
  __device__ float at(std::int64_t position, std::int64_t c) const {
    if (position >= start) {
      const float v = to_float(call_rows[(position - start) * ld + c]);
      return round_bf16 ? num::round_to_bf16(v) : v;
    }
    return to_float(ring[(position & ring_mask) * width + c]);
  }
};

template <class ScoreT, class StateT>
__global__ void __launch_bounds__(kChannels * kGroups) pool_windows_kernel(CompressorConsts c, DevicePlan p,
                                                                          KvScoreView kv, StateView st, float* pooled) {
  __shared__ Softmax partial[kChannels * kGroups];
  const std::int64_t e = blockIdx.x;
  const int i = request_of(p, e);
  const std::int64_t start = p.start[i];
  const std::int64_t w = window_of(c, start) + (e - p.entry_offset[i]);
  const int hd = c.head_dim;
  const int d = blockIdx.y * blockDim.x + threadIdx.x;
  const int groups = blockDim.y;
  const std::int64_t half = static_cast<std::int64_t>(c.overlap ? 2 : 1) * hd;
  const RowSource<ScoreT, StateT> src{
      static_cast<const ScoreT*>(kv.data) + p.token_offset[i] * kv.ld, kv.ld,
      reinterpret_cast<const StateT*>(static_cast<const char*>(st.data) + p.slot[i] * st.slot_bytes),
      st.ring_rows - 1, st.width, start, c.round_bf16};
  // The plan's values above; kv_score and the state below may come from the kernels before.
  wait_for_previous_kernel();
  allow_next_kernel();

  // Slot j: ratio 128 has the window's tokens; ratio 4 has the previous window's tokens on
  // channel half 0 (absent for window 0), then the current window's on channel half 1.
  const int slots = c.overlap ? 2 * c.ratio : c.ratio;
  int first = (c.overlap && w == 0) ? c.ratio : 0;
  Softmax sm;
  if (st.running) {
    // Running accumulators: tokens before this call are already folded into the slot's (m, s,
    // a); group 0 starts from them and the groups take the call's tokens.
    const std::int64_t w0 = w * c.ratio;
    if (w0 < start) {
      first = static_cast<int>(start - w0);
      if (threadIdx.y == 0 && d < hd) {
        const float* acc = reinterpret_cast<const float*>(static_cast<const char*>(st.data) + p.slot[i] * st.slot_bytes);
        sm = Softmax{acc[d], acc[hd + d], acc[2 * hd + d]};
      }
    }
  }
  // The value and logit of slot j.
  auto slot_at = [&](int j, float& logit, float& value) {
    const WindowSlot s = window_slot(c, w, j);
    logit = src.at(s.position, half + s.channel0 + d) + c.ape[s.ape_row * half + s.channel0 + d];
    value = src.at(s.position, s.channel0 + d);
  };
  if (c.overlap) {
    // Ratio 4: each slot is gathered (one thread per channel, or group y holding slot y) and
    // the 8 are pooled in closed form (pool_ratio4_slots), so both layouts give the same bits
    // and the layout may depend on the batch without breaking the split invariance (SPEC
    // section 3).
    float logit[8] = {}, value[8] = {};
    if (groups == 1) {
      if (d >= hd) return;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j >= first) slot_at(j, logit[j], value[j]);
      pooled[e * hd + d] = pooled_for_store(pool_ratio4_slots(logit, value, first == 0));
      return;
    }
    const int j = threadIdx.y;
    if (d < hd && j >= first) {
      slot_at(j, logit[0], value[0]);
      partial[j * blockDim.x + threadIdx.x] = Softmax{logit[0], 1.0f, value[0]};
    }
    __syncthreads();
    if (threadIdx.y == 0 && d < hd) {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (k >= first) logit[k] = partial[k * blockDim.x + threadIdx.x].m, value[k] = partial[k * blockDim.x + threadIdx.x].a;
      pooled[e * hd + d] = pooled_for_store(pool_ratio4_slots(logit, value, first == 0));
    }
    return;
  }
  if (d < hd)
    for (int j = first + threadIdx.y; j < slots; j += groups) {
      float logit, value;
      slot_at(j, logit, value);
      sm.add(logit, value);
    }
  partial[threadIdx.y * blockDim.x + threadIdx.x] = sm;
  __syncthreads();
  if (threadIdx.y == 0 && d < hd) {
    Softmax total = partial[threadIdx.x];
    for (int g = 1; g < groups; ++g) total.merge(partial[g * blockDim.x + threadIdx.x]);
    pooled[e * hd + d] = pooled_for_store(total.a / total.s);
  }
}

template <class ScoreT, class StateT>
void launch(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st, float* pooled,
            cudaStream_t stream, bool pdl) {
  const dim3 block = c.overlap && p.num_entries >= kOneGroupFrom ? dim3(kOverlapChannels, 1) : dim3(kChannels, kGroups);
  const dim3 grid(static_cast<unsigned>(p.num_entries), ceil_div(c.head_dim, block.x));
  launch_kernel(pool_windows_kernel<ScoreT, StateT>, grid, block, 0, stream, pdl, c, p, kv, st, pooled);
}

}  // namespace

void launch_pool_windows(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st, float* pooled,
                         cudaStream_t stream, bool pdl) {
  if (p.num_entries == 0) return;
  launch_with_types(kv.dtype, st.dtype, [&](auto score, auto state) {
    launch<decltype(score), decltype(state)>(c, p, kv, st, pooled, stream, pdl);
  });
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
