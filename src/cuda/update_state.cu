// Copies into each request's state ring the kv_score rows later calls will still need: the
// incomplete window and, with overlap, the last complete one. Block (request, k) copies the
// k-th such row of this call, converting to the state dtype.
#include <algorithm>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"

namespace dsv4::cuda {

namespace {

template <class ScoreT, class StateT>
__global__ void update_state_kernel(CompressorConsts c, DevicePlan p, KvScoreView kv, StateView st) {
  const int i = blockIdx.x;
  const std::int64_t start = p.start[i], end = start + p.num_tokens[i];
  const std::int64_t last_window_start = window_start_of(c, end);
  const std::int64_t keep_from = c.overlap ? max(std::int64_t{0}, last_window_start - c.ratio) : last_window_start;
  const std::int64_t q = max(start, keep_from) + blockIdx.y;
  // The plan's values above; kv_score below, and the state rows pooling may still read. Every
  // block waits, even one with nothing to copy: this grid may complete only after the kernel
  // before it, or the kernel after it could read what that one has not yet written.
  wait_for_previous_kernel();
  allow_next_kernel();
  if (q >= end) return;
  const ScoreT* src = static_cast<const ScoreT*>(kv.data) + (p.token_offset[i] + q - start) * kv.ld;
  StateT* dst = reinterpret_cast<StateT*>(static_cast<char*>(st.data) + p.slot[i] * st.slot_bytes) +
                (q & (st.ring_rows - 1)) * st.width;
#pragma unroll 4
  for (std::int64_t col = threadIdx.x; col < st.width; col += blockDim.x) {
    const float v = to_float(src[col]);
    dst[col] = from_float<StateT>(c.round_bf16 ? num::round_to_bf16(v) : v);
  }
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

template <class ScoreT, class StateT>
void launch(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st, cudaStream_t stream, bool pdl) {
  if (st.running) {
    launch_kernel(update_running_kernel<ScoreT>, dim3(static_cast<unsigned>(p.num_requests), ceil_div(c.head_dim, 128)),
                  dim3(128), 0, stream, pdl, c, p, kv, st);
    return;
  }
  // At most ring_rows rows per request need keeping (ratio 4: under 2 windows; 128: under 1),
  // and no more than the request appends: a decode step needs one block per request.
  const auto rows = static_cast<unsigned>(std::min<std::int64_t>(st.ring_rows, p.max_request_tokens));
  const dim3 grid(static_cast<unsigned>(p.num_requests), std::max(rows, 1u));
  launch_kernel(update_state_kernel<ScoreT, StateT>, grid, dim3(256), 0, stream, pdl, c, p, kv, st);
}

}  // namespace

void launch_update_state(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st,
                         cudaStream_t stream, bool pdl) {
  if (p.num_requests == 0) return;
  const bool score_f32 = kv.dtype == DType::f32, state_f32 = st.dtype == DType::f32;
  if (score_f32 && state_f32) launch<float, float>(c, p, kv, st, stream, pdl);
  else if (score_f32) launch<float, std::uint16_t>(c, p, kv, st, stream, pdl);
  else if (state_f32) launch<std::uint16_t, float>(c, p, kv, st, stream, pdl);
  else launch<std::uint16_t, std::uint16_t>(c, p, kv, st, stream, pdl);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
