// Launchers of the CUDA backend's kernels and the views they take. Host code includes this;
// each kernel lives in its own .cu file with its launcher beside it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dsv4/types.hpp"

namespace dsv4::cuda {

// A plan as kernels read it: per-request arrays and per-entry cache rows, in device memory.
// Kernels derive every window from these rather than from host values. The arrays are written
// once, synchronously, when the plan is made, and never by a kernel: kernels launched as
// programmatic dependents read them before waiting for the kernel before them.
struct DevicePlan {
  const std::int64_t* slot = nullptr;
  const std::int64_t* start = nullptr;
  const std::int64_t* num_tokens = nullptr;
  const std::int64_t* token_offset = nullptr;  // [requests + 1]: rows of x / kv_score
  const std::int64_t* entry_offset = nullptr;  // [requests + 1]: entries completed before
  const std::int64_t* cache_location = nullptr;  // [entries]
  const std::int64_t* entry_request = nullptr;   // [entries]: the request each entry belongs to
  int num_requests = 0;
  int num_entries = 0;
  int max_request_tokens = 0;  // the most tokens any one request appends
};

// This call's kv_score rows: kv columns [0, coff*hd), score columns [coff*hd, 2*coff*hd).
// With `slices` > 0 the rows are the sliced projection's fp32 partial sums (kFusedSlices slices
// of hidden, `slice_stride` elements apart), which a reader adds in slice order.
struct KvScoreView {
  const void* data = nullptr;
  DType dtype = DType::f32;
  std::int64_t ld = 0;  // elements between consecutive rows
  int slices = 0;
  std::int64_t slice_stride = 0;
};

// The state pool: per slot a ring of ring_rows rows of `width` elements.
// With `running`, a slot holds fp32 accumulators m, s, a [head_dim] instead of rows.
struct StateView {
  void* data = nullptr;
  DType dtype = DType::f32;
  std::size_t slot_bytes = 0;
  std::int64_t ring_rows = 0;
  std::int64_t width = 0;
  bool running = false;
};

struct CompressorConsts {
  int ratio = 0;
  int ratio_shift = 0;  // log2(ratio): ratios are powers of two (window_of)
  int head_dim = 0;
  int rope_dim = 0;
  bool overlap = false;
  bool rotate = false;
  bool fp8 = false;           // fp8_ds entries, else bf16 entries
  bool round_bf16 = false;    // round every kv/score value to bf16 before pooling
  float eps = 0.0f;
  std::int64_t entry_bytes = 0;
  const float* ape = nullptr;       // [ratio, coff*head_dim]
  const float* norm = nullptr;      // [head_dim]
  const float* inv_freq = nullptr;  // [rope_dim / 2]
};

// The three kernels of the unfused path, in this order after the projection. With `pdl`
// (sm_90 and later) each is a programmatic dependent launch (launch.cuh): it reads its plan
// and weights while the kernel before it finishes.

// Pools every completed window: pooled[entry, head_dim] fp32 (before the norm).
void launch_pool_windows(const CompressorConsts& c, const DevicePlan& plan, KvScoreView kv, StateView state,
                         float* pooled, cudaStream_t stream, bool pdl);

// Per entry: RMSNorm, RoPE, rotation, then quantization and store. `cache` and `entries` may
// each be null. Puts the pending mark back into the pooled slots it reads (kPooledPending).
void launch_finish_entries(const CompressorConsts& c, const DevicePlan& plan, float* pooled,
                           std::uint8_t* cache, std::uint16_t* entries, cudaStream_t stream, bool pdl);

// Copies into each request's ring the rows later calls still need (or, with running state,
// folds the call's tokens into its accumulators). Runs after launch_pool_windows, which may
// still read what this overwrites.
void launch_update_state(const CompressorConsts& c, const DevicePlan& plan, KvScoreView kv,
                         StateView state, cudaStream_t stream, bool pdl);

// One compressor's part of launch_update_state_group.
struct StateUpdateMember {
  CompressorConsts c;
  DevicePlan plan;
  KvScoreView kv;
  StateView state;
};
// launch_update_state for the two members of a CSA layer's group in one launch (a step that
// completes no entry: the state update is everything after the projection), so the group pays
// one kernel boundary instead of two. Stored rows only (not running state), both members'
// kv_score of one dtype and their states of one dtype; the same copies as launch_update_state.
bool update_state_group_supported(const StateUpdateMember& a, const StateUpdateMember& b);
void launch_update_state_group(const StateUpdateMember& a, const StateUpdateMember& b, cudaStream_t stream, bool pdl);

// Whether the code loaded for `device` was built for sm_90a (wgmma); asked once per device.
bool wgmma_code_loaded(int device);

// The sliced projection (slice_projection.cu): x [tokens, hidden] @ w [width, hidden]^T as
// fp32 partial sums partials[kFusedSlices][tokens][width], with the fused step's arithmetic,
// for the running step to add (KvScoreView::slices). sm_90a, hidden a multiple of 512, width
// of 64, at most 128 tokens, where shared memory holds a slice's weights.
bool slice_projection_supported(int device, std::int64_t hidden, std::int64_t width, std::int64_t tokens);
void launch_slice_projection(int device, const void* x, std::int64_t tokens, std::int64_t hidden, const void* w,
                             std::int64_t width, float* partials, cudaStream_t stream, bool pdl);

// Ratio 128 with running state, a decode-shaped step: one block per request folds its tokens
// into the accumulators and finishes every entry it completes (pooling, RMSNorm, RoPE,
// quantization, store) itself, the bits of the three kernels above. `cache` and `entries` may
// each be null. With `next_early` (and `pdl`) the next kernel in the stream may launch before
// this one's wait instead of after it: a next step's sliced projection then streams its
// weights while this step's projection runs.
bool running_step_supported(int head_dim);
void launch_running_step(const CompressorConsts& c, const DevicePlan& plan, KvScoreView kv, StateView state,
                         std::uint8_t* cache, std::uint16_t* entries, cudaStream_t stream, bool pdl,
                         bool next_early);

}  // namespace dsv4::cuda
