// Copies into each request's state ring the kv_score rows later calls will still need: the
// incomplete window and, with overlap, the last complete one. Block (request, k) copies the
// k-th such row of this call, converting to the state dtype.
#include <algorithm>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"

namespace dsv4::cuda {

namespace {

// Request i's row `row` of those it keeps (counted from the first kept row of this call): where
// it comes from in kv_score and where it goes in the request's ring, or nulls where the
// request keeps fewer rows. Reads only the plan's values, so it runs before the wait for the
// previous kernel.
template <class ScoreT, class StateT>
struct KeptRow {
  const ScoreT* src = nullptr;
  StateT* dst = nullptr;
};
template <class ScoreT, class StateT>
__device__ KeptRow<ScoreT, StateT> kept_row(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv,
                                            StateView st, int i, int row) {
  const std::int64_t start = p.start[i], end = start + p.num_tokens[i];
  const std::int64_t last_window_start = window_start_of(c, end);
  const std::int64_t keep_from = c.overlap ? max(std::int64_t{0}, last_window_start - c.ratio) : last_window_start;
  const std::int64_t q = max(start, keep_from) + row;
  if (q >= end) return {};
  return {static_cast<const ScoreT*>(kv.data) + (p.token_offset[i] + q - start) * kv.ld,
          reinterpret_cast<StateT*>(static_cast<char*>(st.data) + p.slot[i] * st.slot_bytes) +
              (q & (st.ring_rows - 1)) * st.width};
}
// The copy, converted to the state's dtype; kv_score and the ring are the previous kernels'.
template <class ScoreT, class StateT>
__device__ void copy_kept_row(const KeptRow<ScoreT, StateT>& r, const CompressorConsts& c, std::int64_t width) {
  if (!r.src) return;
#pragma unroll 4
  for (std::int64_t col = threadIdx.x; col < width; col += blockDim.x) {
    const float v = to_float(r.src[col]);
    r.dst[col] = from_float<StateT>(c.round_bf16 ? num::round_to_bf16(v) : v);
  }
}

template <class ScoreT, class StateT>
__global__ void update_state_kernel(CompressorConsts c, DevicePlan p, KvScoreView kv, StateView st) {
  const auto r = kept_row<ScoreT, StateT>(c, p, kv, st, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y));
  // Every block waits, even one with nothing to copy: this grid may complete only after the
  // kernel before it, or the kernel after it could read what that one has not yet written.
  wait_for_previous_kernel();
  allow_next_kernel();
  copy_kept_row(r, c, st.width);
}

// Block (request, row, member): grid x and y cover the larger member; a block beyond its
// member's requests has nothing to copy (and waits like every block).
template <class ScoreT, class StateT>
__global__ void update_state_group_kernel(StateUpdateMember a, StateUpdateMember b) {
  const StateUpdateMember& m = blockIdx.z == 0 ? a : b;
  KeptRow<ScoreT, StateT> r;
  if (static_cast<int>(blockIdx.x) < m.plan.num_requests)
    r = kept_row<ScoreT, StateT>(m.c, m.plan, m.kv, m.state, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y));
  wait_for_previous_kernel();
  allow_next_kernel();
  copy_kept_row(r, m.c, m.state.width);
}

// Running accumulators: thread (request, channel) folds the call's tokens of the incomplete
// window into the slot's (m, s, a), starting from them when the window began before the call.
template <class ScoreT>
__global__ void update_running_kernel(CompressorConsts c, DevicePlan p, KvScoreView kv, StateView st) {
  const int i = blockIdx.x;
  const int d = blockIdx.y * blockDim.x + threadIdx.x;
  const int hd = c.head_dim;
  const std::int64_t start = p.start[i], end = start + p.num_tokens[i];
  wait_for_previous_kernel();  // the plan's values above; kv_score and the state below (every
  allow_next_kernel();         // block waits: see update_state_kernel)
  if (d >= hd || window_start_of(c, end) == end) return;
  const std::int64_t w0 = window_start_of(c, end);
  float* acc = reinterpret_cast<float*>(static_cast<char*>(st.data) + p.slot[i] * st.slot_bytes);
  Softmax sm;
  if (w0 < start) sm = Softmax{acc[d], acc[hd + d], acc[2 * hd + d]};
  const ScoreT* rows = static_cast<const ScoreT*>(kv.data) + p.token_offset[i] * kv.ld;
  for (std::int64_t q = max(w0, start); q < end; ++q) {
    const ScoreT* row = rows + (q - start) * kv.ld;
    float score = to_float(row[hd + d]), value = to_float(row[d]);
    if (c.round_bf16) score = num::round_to_bf16(score), value = num::round_to_bf16(value);
    sm.add(score + c.ape[(q - w0) * hd + d], value);
  }
  acc[d] = sm.m;
  acc[hd + d] = sm.s;
  acc[2 * hd + d] = sm.a;
}

// At most ring_rows rows per request need keeping (ratio 4: under 2 windows; 128: under 1),
// and no more than the request appends: a decode step needs one block per request.
unsigned kept_rows(const DevicePlan& p, const StateView& st) {
  return std::max(static_cast<unsigned>(std::min<std::int64_t>(st.ring_rows, p.max_request_tokens)), 1u);
}

template <class ScoreT, class StateT>
void launch(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st, cudaStream_t stream, bool pdl) {
  if (st.running) {
    launch_kernel(update_running_kernel<ScoreT>, dim3(static_cast<unsigned>(p.num_requests), ceil_div(c.head_dim, 128)),
                  dim3(128), 0, stream, pdl, c, p, kv, st);
    return;
  }
  const dim3 grid(static_cast<unsigned>(p.num_requests), kept_rows(p, st));
  launch_kernel(update_state_kernel<ScoreT, StateT>, grid, dim3(256), 0, stream, pdl, c, p, kv, st);
}

template <class ScoreT, class StateT>
void launch_group(const StateUpdateMember& a, const StateUpdateMember& b, cudaStream_t stream, bool pdl) {
  const dim3 grid(static_cast<unsigned>(std::max(a.plan.num_requests, b.plan.num_requests)),
                  std::max(kept_rows(a.plan, a.state), kept_rows(b.plan, b.state)), 2);
  launch_kernel(update_state_group_kernel<ScoreT, StateT>, grid, dim3(256), 0, stream, pdl, a, b);
}

}  // namespace

void launch_update_state(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st,
                         cudaStream_t stream, bool pdl) {
  if (p.num_requests == 0) return;
  launch_with_types(kv.dtype, st.dtype, [&](auto score, auto state) {
    launch<decltype(score), decltype(state)>(c, p, kv, st, stream, pdl);
  });
  DSV4_CUDA_CHECK(cudaGetLastError());
}

bool update_state_group_supported(const StateUpdateMember& a, const StateUpdateMember& b) {
  return !a.state.running && !b.state.running && a.kv.slices == 0 && b.kv.slices == 0 && a.kv.dtype == b.kv.dtype &&
         a.state.dtype == b.state.dtype;
}

void launch_update_state_group(const StateUpdateMember& a, const StateUpdateMember& b, cudaStream_t stream,
                               bool pdl) {
  if (!update_state_group_supported(a, b))  // the caller asked first
    throw DeviceError("update_state_group: members need stored rows and one kv_score and one state dtype");
  if (a.plan.num_requests == 0 && b.plan.num_requests == 0) return;
  launch_with_types(a.kv.dtype, a.state.dtype, [&](auto score, auto state) {
    launch_group<decltype(score), decltype(state)>(a, b, stream, pdl);
  });
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
