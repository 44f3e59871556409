// Ratio 128 with running accumulators, after the projection of a decode-shaped step: one
// block per request folds the request's tokens into its window, and pools, norms, ropes,
// quantizes and stores every window the call completes, all within the block. The per-stage
// kernels (pool_windows, update_state, finish_entries) and the fused kernel's compress step
// pass each pooled value from the blocks that pool it to the block that finishes the entry;
// skipping that hand-off saved about 1 us of the 4.5 an entry cost them on the H100
// (docs/PERF.md, twenty-first pass). The operations and their order are those of pool_windows,
// update_running_kernel and finish_entry, so this path gives their bits.
#include "cuda/cuda_check.hpp"
#include "cuda/device_utils.cuh"
#include "cuda/finish_entry.cuh"
#include "cuda/fused_step.hpp"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"
#include "cuda/step_timeline.cuh"

#include <string>

namespace dsv4::cuda {

namespace {

// Channel d's logit and value of the request's token at `position` (>= start), as pool_windows
// and update_running_kernel read them.
template <class ScoreT>
struct CallRows {
  const ScoreT* rows;  // the request's first kv_score row
  std::int64_t ld, start;
  int head_dim;
  bool round_bf16;

  __device__ static CallRows of(const CompressorConsts& c, const DevicePlan& p, const KvScoreView& kv, int i) {
    return {static_cast<const ScoreT*>(kv.data) + p.token_offset[i] * kv.ld, kv.ld, p.start[i], c.head_dim,
            c.round_bf16};
  }
  __device__ void at(std::int64_t position, int d, float& score, float& value) const {
    const ScoreT* row = rows + (position - start) * ld;
    score = to_float(row[head_dim + d]);
    value = to_float(row[d]);
    if (round_bf16) score = num::round_to_bf16(score), value = num::round_to_bf16(value);
  }
};

// The sliced projection's rows (KvScoreView::slices): a value is its fp32 partial sums added
// in slice order, then rounded as a bf16 kv_score would be, which is what the fused step's
// pool items do with their partial sums (sum_slices), so the two paths give the same bits.
struct SliceSums {};
template <>
struct CallRows<SliceSums> {
  const float* rows;
  std::int64_t ld, start, slice_stride;
  int head_dim;
  bool round_bf16;

  __device__ static CallRows of(const CompressorConsts& c, const DevicePlan& p, const KvScoreView& kv, int i) {
    return {static_cast<const float*>(kv.data) + p.token_offset[i] * kv.ld, kv.ld, p.start[i], kv.slice_stride,
            c.head_dim, c.round_bf16};
  }
  // Every slice's two loads are issued before the first add: a runtime slice count made the
  // loads of slice s wait for the add of slice s - 1, one round trip to memory per slice.
  __device__ void at(std::int64_t position, int d, float& score, float& value) const {
    const float* row = rows + (position - start) * ld;
    float sc[kFusedSlices], va[kFusedSlices];
#pragma unroll
    for (int s = 0; s < kFusedSlices; ++s) sc[s] = row[s * slice_stride + head_dim + d], va[s] = row[s * slice_stride + d];
    score = sc[0];
    value = va[0];
#pragma unroll
    for (int s = 1; s < kFusedSlices; ++s) score += sc[s], value += va[s];
    if (round_bf16) score = num::round_to_bf16(score), value = num::round_to_bf16(value);
  }
};

// Window w's pooled value of channel d: pool_windows' 8 groups (group k takes slots first + k,
// first + k + 8, ...; group 0 starts from the accumulators when the window began before the
// call), merged in order.
template <class ScoreT>
__device__ float pool_window(const CompressorConsts& c, const CallRows<ScoreT>& call, const float* acc, std::int64_t w,
                             int d) {
  const int hd = c.head_dim;
  const std::int64_t w0 = w * c.ratio;
  int first = 0;
  Softmax total;
  if (w0 < call.start) {
    first = static_cast<int>(call.start - w0);
    total = Softmax{acc[d], acc[hd + d], acc[2 * hd + d]};
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    Softmax part = k == 0 ? total : Softmax{};
    for (int j = first + k; j < c.ratio; j += 8) {
      float score, value;
      call.at(w0 + j, d, score, value);
      part.add(score + c.ape[j * hd + d], value);
    }
    if (k == 0) total = part;
    else total.merge(part);
  }
  return pooled_for_store(total.a / total.s);
}

// A thread per channel of a 512-wide entry (HCA's): with 128 threads, four channels a thread
// and the entry's chain over four warps, Flash HCA at 64 requests took 14.6 us with an entry
// each and 12.0 with none; with 512, 13.1 and 10.8 (H100; docs/PERF.md, twenty-second pass).
// Two blocks an SM (64 registers) keep 256 requests in one wave.
constexpr int kRunningThreads = 512;
constexpr int kRunningPerThread = kPerThreadOf<kRunningThreads>;

#ifdef DSV4_FUSED_TIMELINE
// mark1: a one-token call's loads are issued; mark2: the first entry's pooled values are
// computed (before finish_entry; in a one-token call that completes none, the state stored).
__device__ StepStamps g_running_step_stamps[kStepTimelineBlocks];
#endif

template <class ScoreT>
__global__ void __launch_bounds__(kRunningThreads, 2) running_step_kernel(CompressorConsts c, DevicePlan p, KvScoreView kv,
                                                                          StateView st, std::uint8_t* cache,
                                                                          std::uint16_t* entries, bool next_early) {
  DSV4_STEP_RECORDER(g_running_step_stamps);
  __shared__ float v[kFinishMaxHeadDim];
  __shared__ float scratch[32];
  __shared__ float own[kFinishMaxHeadDim];  // pooled values, each read by the thread that wrote it
  const int i = blockIdx.x, hd = c.head_dim;
  const std::int64_t start = p.start[i], end = start + p.num_tokens[i];
  const std::int64_t e0 = p.entry_offset[i], e1 = p.entry_offset[i + 1];
  const auto call = CallRows<ScoreT>::of(c, p, kv, i);
  float* acc = reinterpret_cast<float*>(static_cast<char*>(st.data) + p.slot[i] * st.slot_bytes);
  // The first entry's norm weights, cache row and RoPE angle come from the plan and weights.
  EntryInputsOf<kRunningThreads> in{};
  if (e1 > e0) in = load_entry_inputs<kRunningThreads>(c, p, cache != nullptr, e0);
  // With `next_early` the next kernel may launch before this one's wait (where:
  // CudaBackend::next_launch_early). Its own wait still orders it after this grid, which
  // completes only after the kernel before it.
  if (next_early) allow_next_kernel();
  // kv_score and the accumulators below (every block waits: see update_state_kernel).
  wait_for_previous_kernel();
  DSV4_STEP_STAMP(waited);
  if (!next_early) allow_next_kernel();

  if (end - start == 1) {  // one token (decode): every load first, then the arithmetic
    const std::int64_t w0 = window_start_of(c, start);
    const bool has_acc = w0 < start;
    const float* ape = c.ape + (start - w0) * hd;
    float m[kRunningPerThread], s[kRunningPerThread], a[kRunningPerThread], score[kRunningPerThread],
        value[kRunningPerThread], bias[kRunningPerThread];
#pragma unroll
    for (int k = 0; k < kRunningPerThread; ++k) {
      const int d = threadIdx.x + k * kRunningThreads;
      m[k] = -INFINITY, s[k] = a[k] = score[k] = value[k] = bias[k] = 0.0f;
      if (d >= hd) continue;
      if (has_acc) m[k] = acc[d], s[k] = acc[hd + d], a[k] = acc[2 * hd + d];
      bias[k] = ape[d];
      call.at(start, d, score[k], value[k]);
    }
    DSV4_STEP_STAMP(mark1);
    PooledValuesOf<kRunningThreads> pooled;
#pragma unroll
    for (int k = 0; k < kRunningPerThread; ++k) {
      const int d = threadIdx.x + k * kRunningThreads;
      Softmax sm{m[k], s[k], a[k]};  // -inf, 0, 0 without accumulators: Softmax{}
      sm.add(score[k] + bias[k], value[k]);
      pooled.v[k] = d < hd ? pooled_for_store(sm.a / sm.s) : 0.0f;
      if (e1 == e0 && d < hd) acc[d] = sm.m, acc[hd + d] = sm.s, acc[2 * hd + d] = sm.a;
    }
    // A window that completes here leaves none open: the next starts at `end`.
    DSV4_STEP_STAMP(mark2);
    if (e1 > e0) finish_entry(c, in, pooled, cache, entries, e0, v, scratch);
    return;
  }

  for (std::int64_t e = e0; e < e1; ++e) {  // the same count in every thread of the block
    const std::int64_t w = window_of(c, start) + (e - e0);
    if (e > e0) in = load_entry_inputs<kRunningThreads>(c, p, cache != nullptr, e);
    // Each thread's channels one after another, through shared memory it alone reads back:
    // unrolled over the channels a thread may hold, the pooling spilled registers.
#pragma unroll 1
    for (int d = threadIdx.x; d < hd; d += kRunningThreads) own[d] = pool_window(c, call, acc, w, d);
    PooledValuesOf<kRunningThreads> pooled;
#pragma unroll
    for (int k = 0; k < kRunningPerThread; ++k) {
      const int d = threadIdx.x + k * kRunningThreads;
      pooled.v[k] = d < hd ? own[d] : 0.0f;
    }
    if (e == e0) DSV4_STEP_STAMP(mark2);
    finish_entry(c, in, pooled, cache, entries, e, v, scratch);
  }

  // The window still open after the call, as update_running_kernel folds it.
  const std::int64_t w0 = window_start_of(c, end);
  if (w0 == end) return;
#pragma unroll 1
  for (int d = threadIdx.x; d < hd; d += kRunningThreads) {
    Softmax sm;
    if (w0 < start) sm = Softmax{acc[d], acc[hd + d], acc[2 * hd + d]};
    for (std::int64_t q = max(w0, start); q < end; ++q) {
      float score, value;
      call.at(q, d, score, value);
      sm.add(score + c.ape[(q - w0) * hd + d], value);
    }
    acc[d] = sm.m;
    acc[hd + d] = sm.s;
    acc[2 * hd + d] = sm.a;
  }
}

}  // namespace

bool running_step_supported(int head_dim) { return head_dim > 0 && head_dim <= kFinishMaxHeadDim; }

void launch_running_step(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st,
                         std::uint8_t* cache, std::uint16_t* entries, cudaStream_t stream, bool pdl, bool next_early) {
  if (p.num_requests == 0) return;
  const dim3 grid(static_cast<unsigned>(p.num_requests)), block(kRunningThreads);
#ifdef DSV4_FUSED_TIMELINE
  static const bool timeline = register_step_stamps("running_step", g_running_step_stamps);
  (void)timeline;
#endif
  if (kv.slices > 0 && kv.slices != kFusedSlices)
    throw DeviceError("running step: kv_score in " + std::to_string(kv.slices) + " slices, expected " +
                      std::to_string(kFusedSlices));
  if (kv.slices > 0)
    launch_kernel(running_step_kernel<SliceSums>, grid, block, 0, stream, pdl, c, p, kv, st, cache, entries,
                  next_early);
  else if (kv.dtype == DType::f32)
    launch_kernel(running_step_kernel<float>, grid, block, 0, stream, pdl, c, p, kv, st, cache, entries,
                  next_early);
  else
    launch_kernel(running_step_kernel<std::uint16_t>, grid, block, 0, stream, pdl, c, p, kv, st, cache, entries,
                  next_early);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
