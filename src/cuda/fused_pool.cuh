// Part of the fused decode step (fused_step.cu, which alone includes it; its names live in
// that file's anonymous namespace): the pool items. One item takes a row block's channels for
// a group of requests: it stages the group's plan values before the wait, then sums the
// slices into kv_score, pools the completed windows and updates the state.
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"
#include "cuda/finish_entry.cuh"
#include "cuda/fused_common.cuh"
#include "cuda/fused_step.hpp"

namespace dsv4::cuda {

namespace {

__device__ __forceinline__ void store_state(const StateView& st, char* slot, std::int64_t index, float v) {
  if (st.dtype == DType::f32) reinterpret_cast<float*>(slot)[index] = v;
  else reinterpret_cast<std::uint16_t*>(slot)[index] = num::bf16_from_f32(v);
}

// What the pooling of one entry derives from the plan alone, worked out by stage_plan (before
// the wait for the previous kernel in the fused step) so that after the wait only the loads and
// the merges remain. The pooling of a decode step runs on one warp, where this index chain (the
// entry's request, start and window, then each slot's source and offsets, in 64-bit
// arithmetic) took about 1 us of the step's critical path (docs/PERF.md, fourteenth pass).
// Ratio 4: slots [first, from_vals) read the stored rows (slot j is from_vals - j positions
// before the request's start), slots [max(first, from_vals), 8) this step's kv_score in vals.
// Ratio 128: slots before `first` are already in the state (running accumulators), slots
// [first, 128) are this step's.
struct alignas(16) PoolEntry {
  int first;      // ratio 4: 4 for window 0 (it has no previous window), else 0
  int from_vals;  // ratio 4: 0..7
  int vals_col;   // the vals column of slot 0's token (slot j: vals_col + j)
  int request;    // counted from the group's first
  int ring_row;   // ratio 4: slot 0's row in the request's state ring (slot j: (ring_row + j) & mask)
  int unused[3];
};

// A pool item's request group: requests [first, first + requests) of its member, their
// per-request values staged in shared memory once (so no dependent global load sits inside the
// per-request loops), and the rows of x whose kv_score the item holds in `vals`.
struct Group {
  std::int64_t* start;  // [requests]
  std::int64_t* slot;   // [requests]
  int* token_offset;    // [requests + 1]: rows of x
  int* entry_offset;    // [requests + 1]: entries
  int* entry_request;   // [the group's entries]: request, counted from the group's first
  const PoolEntry* entry = nullptr;  // [the group's entries]
  int first = 0, requests = 0;
  int base = 0;    // first row of x held in vals: the group's first token, rounded down to 4
  int stride = 0;  // floats between the rows of two columns in vals; odd, so that consecutive
                   // columns fall in different banks
  // In the kStash kernel instance: the state values and ape the pooling reads, gathered into
  // shared memory by stash_pool_inputs (the other instances read them from global memory).
  const char* stash = nullptr;
  const float* ape4 = nullptr;  // ratio 4: ape of the item's channels, [8 slots][16]
};

// Shared memory of a pool item: vals [64][stride <= vals_rows + 1] (FusedStep::vals_rows),
// then the group's staged plan (GroupLayout), at most pool_group_bytes(group_requests,
// tokens_cap) bytes: a group completes at most as many entries as it has tokens.
__device__ __forceinline__ float* smem_vals(char* smem) { return reinterpret_cast<float*>(smem); }
__host__ __device__ constexpr std::size_t pool_vals_bytes(int vals_rows) {
  return static_cast<std::size_t>(kFusedRowsPerBlock) * (vals_rows + 1) * 4;
}
__host__ __device__ constexpr std::size_t pool_entries_offset(int group_requests, int entries_cap) {
  return (static_cast<std::size_t>(group_requests) * 16 + static_cast<std::size_t>(group_requests + 1) * 8 +
          static_cast<std::size_t>(entries_cap) * 4 + 15) / 16 * 16;
}
__host__ __device__ constexpr std::size_t pool_group_bytes(int group_requests, int entries_cap) {
  return pool_entries_offset(group_requests, entries_cap) + static_cast<std::size_t>(entries_cap) * sizeof(PoolEntry);
}
// A group's staged plan, the same bytes on the host (fused_stage_groups writes them) and in a
// pool item's shared memory (stage_plan copies them there): start and slot [group_requests],
// token_offset and entry_offset [group_requests + 1] (the plan's, not rebased), entry_request
// [entries_cap], then (16-aligned) PoolEntry [entries_cap].
struct GroupLayout {
  std::int64_t* start;
  std::int64_t* slot;
  int* token_offset;
  int* entry_offset;
  int* entry_request;
  PoolEntry* entry;
};
__host__ __device__ inline GroupLayout group_layout(void* at, int group_requests, int entries_cap) {
  auto* bytes = static_cast<char*>(at);
  GroupLayout l;
  l.start = reinterpret_cast<std::int64_t*>(bytes);
  l.slot = l.start + group_requests;
  l.token_offset = reinterpret_cast<int*>(l.slot + group_requests);
  l.entry_offset = l.token_offset + group_requests + 1;
  l.entry_request = l.entry_offset + group_requests + 1;
  l.entry = reinterpret_cast<PoolEntry*>(bytes + pool_entries_offset(group_requests, entries_cap));
  return l;
}
// The stash of a step of at most 8 tokens (8 requests at most: a request has a token at
// least, Compressor::plan checks it), after the group's values:
// ratio 4: per request the state rows of the 7 positions before its start that its windows
// may read, [7][4 sections][16 channels] raw state values; running state: per request its
// accumulators [3][32 channels] fp32; then ape4.
constexpr int kStashBacks = 7;
__host__ __device__ constexpr std::size_t pool_stash_offset(const FusedStep& f, int group_requests) {
  return (pool_vals_bytes(f.vals_rows) + pool_group_bytes(group_requests, f.tokens_cap) + 15) / 16 * 16;
}
constexpr std::size_t kStashRequestBytes = kStashBacks * 4 * 16 * 4;  // >= 3 x 32 x 4
// The stash's copies took about 11 us for groups of 8 requests (Flash CSA layer decode B=8,
// timeline on the H100), against about 1 us for groups of 1 and 2: larger groups pool from
// global memory (after an L2 prefetch) instead.
constexpr int kStashMostRequests = 2;
constexpr std::size_t kStashBytes = 8 * kStashRequestBytes + 8 * 16 * 4;

// Ratio 4 (every CSA preset): the pooled value of channel d (dl within the item) of the
// group's entry `el`, from its PoolEntry (slot j < 4 is the previous window's token j on
// channel half 0, slot j >= 4 the current window's token j - 4 on half 1, as window_slot says).
// The pooling runs on few warps, so it is bound by the latency of its instructions: the index
// math matters (stage_plan did it), and so does the order of the loads. Every load is issued
// first, into registers of the raw type (float or bf16 bits), and only then are the values
// converted and pooled: a value used inside the branch that loaded it makes the warp wait right
// there, and the slots' loads would run one after another. pool_ratio4_slots pools them as
// pool_windows does, so both paths give identical bits for identical kv_score values.
template <class StateT, bool kStash>
__device__ float pool_ratio4(const FusedMember& mb, const float* vals, const Group& g, int el, int dl, int d) {
  constexpr int ch = channels_per_block(true);
  const CompressorConsts& c = mb.c;
  const StateView& st = mb.st;
  const PoolEntry e = g.entry[el];
  const int hd = c.head_dim, half_rows = ch * g.stride;
  // Zero-initialized: a raw value left unset where its slot reads vals would otherwise carry
  // over from the previous pair of the thread's loop, and ptxas kept those in local memory.
  float ape[8];
  StateT state_logit[8] = {}, state_value[8] = {};
  if constexpr (kStash) {  // gathered into shared memory while the projection ran
    const StateT* rows = reinterpret_cast<const StateT*>(g.stash + e.request * kStashRequestBytes) + dl;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int h = j >> 2, back = max(e.from_vals - j, 1);  // in the stash, whether read or not
      ape[j] = g.ape4[j * ch + dl];
      state_logit[j] = rows[((back - 1) * 4 + 2 + h) * ch];
      state_value[j] = rows[((back - 1) * 4 + h) * ch];
    }
  } else {
    const auto* ring = reinterpret_cast<const StateT*>(static_cast<const char*>(st.data) + g.slot[e.request] * st.slot_bytes);
    const int mask = static_cast<int>(st.ring_rows) - 1, width = static_cast<int>(st.width);
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // every global load first
      const int h = j >> 2;
      ape[j] = c.ape[(j & 3) * 2 * hd + h * hd + d];
      if (j >= e.first && j < e.from_vals) {
        const StateT* row = ring + ((e.ring_row + j) & mask) * width + d;
        state_logit[j] = __ldcg(row + (2 + h) * hd);
        state_value[j] = __ldcg(row + h * hd);
      }
    }
  }
  // Slot j's value at v[h * half_rows + j], its logit two channel halves further; a slot that
  // reads the state reads column 0 instead (in vals, ignored).
  const float* v = vals + dl * g.stride;
  float logit[8], value[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int h = j >> 2, col = max(e.vals_col + j, 0);
    const bool from_state = j < e.from_vals;
    logit[j] = (from_state ? to_float(state_logit[j]) : v[(2 + h) * half_rows + col]) + ape[j];
    value[j] = from_state ? to_float(state_value[j]) : v[h * half_rows + col];
  }
  return pool_ratio4_slots(logit, value, e.first == 0);
}

// Ratio 128: the pooled value of channel d of the group's entry `el`, slot by slot, with the
// same operations in the same order as pool_windows, so both paths pool identical kv_score
// values to identical bits. With running state every slot is this step's, in shared memory;
// with stored rows a window reads up to 127 rows one after another, which is why the automatic
// choice leaves that case unfused.
template <class StateT, bool kStash>
__device__ float pool_ratio128(const FusedMember& mb, const float* vals, const Group& g, int rb, int el, int d) {
  const CompressorConsts& c = mb.c;
  // Running state: request r's accumulators of channel d (the stash holds the item's channels).
  auto state_accumulators = [&](int r) -> Softmax {
    if constexpr (kStash) {
      constexpr int ch = channels_per_block(false);
      const float* acc = reinterpret_cast<const float*>(g.stash + r * kStashRequestBytes);
      const int dl = d - rb * ch;
      return Softmax{acc[dl], acc[ch + dl], acc[2 * ch + dl]};
    } else {
      const float* acc = reinterpret_cast<const float*>(static_cast<const char*>(mb.st.data) + g.slot[r] * mb.st.slot_bytes);
      return Softmax{__ldcg(acc + d), __ldcg(acc + c.head_dim + d), __ldcg(acc + 2 * c.head_dim + d)};
    }
  };
  if (mb.st.running && g.entry[el].first >= c.ratio - 8) {
    // A decode step's window: the state holds all but its last 1..8 slots, so each of the 8
    // groups below holds one slot at most. Straight-line, from the PoolEntry, the ape loads
    // first; the same operations in the same order as the loop below (group 0 adds its slot
    // to the state's accumulators, each later group's one-slot softmax is merged in turn).
    const PoolEntry e = g.entry[el];
    const int hd = c.head_dim, n = c.ratio - e.first;
    float ape[8] = {};
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k < n) ape[k] = c.ape[(e.first + k) * hd + d];
    Softmax total = state_accumulators(e.request);
    const float* logits = vals + block_row(c, rb, hd + d) * g.stride + e.vals_col + e.first;
    const float* values = vals + block_row(c, rb, d) * g.stride + e.vals_col + e.first;
    total.add(logits[0] + ape[0], values[0]);
#pragma unroll
    for (int k = 1; k < 8; ++k) {
      if (k >= n) break;
      Softmax one;
      one.add(logits[k] + ape[k], values[k]);
      total.merge(one);
    }
    return total.a / total.s;
  }
  const int r = g.entry_request[el];
  const std::int64_t start = g.start[r];
  const std::int64_t w = window_of(c, start) + (el - (g.entry_offset[r] - g.entry_offset[0]));
  const int hd = c.head_dim, tok0 = g.token_offset[r] - g.base;
  const char* slot = static_cast<const char*>(mb.st.data) + g.slot[r] * mb.st.slot_bytes;
  const auto* ring = reinterpret_cast<const StateT*>(slot);
  auto at = [&](std::int64_t position, int col) -> float {
    if (position >= start) return vals[block_row(c, rb, col) * g.stride + tok0 + static_cast<int>(position - start)];
    return to_float(__ldcg(ring + (position & (mb.st.ring_rows - 1)) * mb.st.width + col));
  };
  auto slot_at = [&](int j, float& logit, float& value) {
    const WindowSlot s = window_slot(c, w, j);
    const int vc = static_cast<int>(s.channel0) + d;
    logit = at(s.position, hd + vc) + c.ape[s.ape_row * hd + vc];
    value = at(s.position, vc);
  };
  const int slots = c.ratio;
  int first = 0;
  // pool_windows' 8 groups: group k takes slots first+k, first+k+8, ...; then merged in order.
  Softmax from_state;
  if (mb.st.running) {
    const std::int64_t w0 = w * c.ratio;
    if (w0 < start) {
      first = static_cast<int>(start - w0);
      from_state = state_accumulators(r);
    }
  }
  Softmax total;
  for (int k = 0; k < 8; ++k) {
    Softmax part = k == 0 ? from_state : Softmax{};
    for (int j = first + k; j < slots; j += 8) {
      float logit, value;
      slot_at(j, logit, value);
      part.add(logit, value);
    }
    if (k == 0) total = part;
    else total.merge(part);
  }
  return total.a / total.s;
}

// Copies the group's staged plan into shared memory: one round of 16-byte loads (432 bytes
// for a group of 7 one-token requests). Its values and each entry's PoolEntry were worked out on
// the host when the plan was made (fused_stage_groups), where a pool item staged the plan's
// values first and then derived the entries' indices from them in 64-bit arithmetic: two
// dependent phases after the compress step's wait (0.9 us, docs/PERF.md thirtieth pass). The
// plan is written once, when it is made, and never by a kernel, so this may run before the
// wait for the previous kernel.
__device__ Group stage_plan(const FusedStep& f, const FusedMember& mb, int group, char* smem) {
  Group g;
  g.first = group * mb.group_requests;
  g.requests = min(mb.group_requests, mb.p.num_requests - g.first);
  char* at = smem + pool_vals_bytes(f.vals_rows);
  const auto* src = reinterpret_cast<const uint4*>(mb.staged_groups + static_cast<std::int64_t>(group) * mb.staged_group_bytes);
  for (int k = threadIdx.x; k < mb.staged_group_bytes / 16; k += kFusedThreads) reinterpret_cast<uint4*>(at)[k] = __ldg(src + k);
  const GroupLayout l = group_layout(at, mb.group_requests, mb.group_entries_cap);
  g.start = l.start, g.slot = l.slot, g.token_offset = l.token_offset, g.entry_offset = l.entry_offset;
  g.entry_request = l.entry_request, g.entry = l.entry;
  __syncthreads();
  const int t0 = g.token_offset[0], t1 = g.token_offset[g.requests];
  g.base = t0 & ~3;
  g.stride = (((t1 + 3) & ~3) - g.base) | 1;
  return g;
}

// Asks L2 for the state the pool item will read (ratio 4: the stored rows of the windows that
// complete; running state: the accumulators), so that after the wait those reads hit L2
// instead of queueing in DRAM behind the next step's weight stream. A prefetch changes no
// value (L2 is where every SM's reads and writes meet), so it may run before the wait. Only
// there is it worth its cost: the compress step running it right after its wait lost 1.8 to
// 5.8 us a CSA layer step (docs/PERF.md, thirtieth pass).
__device__ __noinline__ void prefetch_pool_state(const FusedMember& mb, const Group& g, int rb) {
  const CompressorConsts& c = mb.c;
  const StateView& st = mb.st;
  const int ch = channels_per_block(c.overlap), hd = c.head_dim, elem = st.dtype == DType::f32 ? 4 : 2;
  const auto bytes = static_cast<unsigned>(ch * elem);
  if (st.running) {  // [m | s | a] x head_dim floats per slot: three lines per request
    for (int idx = threadIdx.x; idx < 3 * g.requests; idx += kFusedThreads) {
      const int r = idx / 3, part = idx % 3;
      const char* slot = static_cast<const char*>(st.data) + g.slot[r] * st.slot_bytes;
      prefetch_l2(slot + static_cast<std::int64_t>(part * hd + rb * ch) * 4, static_cast<unsigned>(ch * 4));
    }
    return;
  }
  if (!(c.overlap && c.ratio == 4)) return;
  // A window completing at w reads positions 4(w - 1) .. 4w + 3; those before start are the
  // 7 positions before start at most; each row holds the item's channels in 4 sections.
  for (int idx = threadIdx.x; idx < 28 * g.requests; idx += kFusedThreads) {
    const int r = idx / 28, j = idx % 28, back = 1 + j / 4, section = j % 4;
    if (g.entry_offset[r + 1] == g.entry_offset[r] || g.start[r] < back) continue;
    const std::int64_t position = g.start[r] - back;
    const char* row = static_cast<const char*>(st.data) + g.slot[r] * st.slot_bytes +
                      (position & (st.ring_rows - 1)) * st.width * elem;
    prefetch_l2(row + static_cast<std::int64_t>(section * hd + rb * ch) * elem, bytes);
  }
}

// Ratio 4, kStash instance: the item's ape4 (a weight), copied before the wait for the previous
// kernel. Asynchronously, like the stash: an item taken after the wait then pays one round
// trip for both, and stash_pool_inputs' wait covers these copies too.
__device__ void stage_pool_ape(const FusedMember& mb, int rb, float* ape4) {
  const CompressorConsts& c = mb.c;
  if (!(c.overlap && c.ratio == 4)) return;
  constexpr int ch = channels_per_block(true);
  const int hd = c.head_dim;
  for (int idx = threadIdx.x; idx < 8 * ch; idx += kFusedThreads) {
    const int j = idx / ch, d = rb * ch + idx % ch, h = j >> 2;
    cp_async_4(ape4 + idx, c.ape + (j & 3) * 2 * hd + h * hd + d);  // waited for with the stash
  }
}
// Gathers into shared memory at `stash` what the group's pooling will read of the state (the
// rows or accumulators listed at pool_stash_offset), right after the wait for the previous
// kernel: the copies then run while the projection does, and pooling after the slice sums
// reads no global memory but ape at ratio 128. Ratio 4 copies all 4 sections of each of the 7
// rows, about twice what the windows read, which keeps the index math out of the copy loop.
// A ratio-128 window over stored rows (FusedDecode::always only) reads its rows from global
// memory as in the other instances.
__device__ __noinline__ void stash_pool_inputs(const FusedMember& mb, const Group& g, int rb, char* stash) {
  const CompressorConsts& c = mb.c;
  const StateView& st = mb.st;
  const int hd = c.head_dim;
  if (!st.running && !(c.overlap && c.ratio == 4)) return;
  if (st.running) {  // [m | s | a] of the item's 32 channels, per request
    constexpr int ch = channels_per_block(false);
    for (int idx = threadIdx.x; idx < 3 * ch * g.requests; idx += kFusedThreads) {
      const int r = idx / (3 * ch), part = idx / ch % 3, dl = idx % ch;
      const char* slot = static_cast<const char*>(st.data) + g.slot[r] * st.slot_bytes;
      cp_async_4(stash + r * kStashRequestBytes + (part * ch + dl) * 4,
                 slot + (static_cast<std::int64_t>(part) * hd + rb * ch + dl) * 4);
    }
  } else {  // ratio 4: 4-byte pieces (one f32 channel or two bf16 ones) of 7 rows x 4 sections
    constexpr int ch = channels_per_block(true);
    const int elem = st.dtype == DType::f32 ? 4 : 2, pieces = ch * elem / 4;
    for (int idx = threadIdx.x; idx < kStashBacks * 4 * pieces * g.requests; idx += kFusedThreads) {
      const int r = idx / (kStashBacks * 4 * pieces), k = idx % (kStashBacks * 4 * pieces);
      const int back = 1 + k / (4 * pieces), section = k / pieces % 4, piece = k % pieces;
      if (g.entry_offset[r + 1] == g.entry_offset[r] || g.start[r] < back) continue;
      const std::int64_t position = g.start[r] - back;
      const char* row = static_cast<const char*>(st.data) + g.slot[r] * st.slot_bytes +
                        (position & (st.ring_rows - 1)) * st.width * elem;
      cp_async_4(stash + r * kStashRequestBytes + ((back - 1) * 4 + section) * ch * elem + piece * 4,
                 row + static_cast<std::int64_t>(section * hd + rb * ch) * elem + piece * 4);
    }
  }
  cp_async_wait_all();  // the copies of this thread; the slice sums' barrier publishes them
}

// Waits (thread 0) until every slice of the row block is written, then sums the slices of the
// group's tokens in slice order into vals (rounded as the storage dtype would round kv_score).
__device__ void sum_slices(const FusedStep& f, const FusedMember& mb, int rb_global, const Group& g, char* smem) {
  const int cap = f.tokens_cap;
  if (threadIdx.x == 0)
    while (load_acquire(&f.counters[kCounterRowBlocks + rb_global]) < static_cast<unsigned>(kFusedSlices * f.token_groups))
      __nanosleep(32);
  __syncthreads();
  const int span = g.stride - 1;  // within [0, tokens_cap): every partial there is written
  const float* partial = f.partials + static_cast<std::int64_t>(rb_global) * kFusedSlices * kFusedRowsPerBlock * cap;
  const std::int64_t slice_stride = static_cast<std::int64_t>(kFusedRowsPerBlock) * cap;
  const int quads = span / 4, work = kFusedRowsPerBlock * quads;
  const bool round = mb.c.round_bf16;
  auto sum4 = [&](int idx) {
    const int row = idx / quads, q = idx % quads;
    const float4* src = reinterpret_cast<const float4*>(partial + static_cast<std::int64_t>(row) * cap + g.base) + q;
    float4 v = __ldcg(src);
#pragma unroll
    for (int s = 1; s < kFusedSlices; ++s) {
      const float4 u = __ldcg(src + s * slice_stride / 4);
      v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
    }
    if (round) v = make_float4(num::round_to_bf16(v.x), num::round_to_bf16(v.y), num::round_to_bf16(v.z), num::round_to_bf16(v.w));
    float* dst = smem_vals(smem) + row * g.stride + 4 * q;
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  };
  for (int idx = threadIdx.x; idx < work; idx += 2 * kFusedThreads) {  // 16 loads in flight a thread
    sum4(idx);
    if (idx + kFusedThreads < work) sum4(idx + kFusedThreads);
  }
  __syncthreads();
}

// The compress step's counterpart of sum_slices: the group's tokens' kv_score columns of row
// block `rb`, from the rows the projection wrote, into vals, rounded as pool_windows rounds
// them. A token's columns of the row block are runs of channels_per_block adjacent ones
// (block_column), so a thread loads 16 bytes of a run at once, 8 bf16 or 4 fp32 columns: the
// rows are the library's own projection output, 16-byte aligned with a pitch of a multiple of
// 64 columns (run_fused_plan checks it). The pooling's chain is bound by the latency of its
// instructions (a warp issues about every 10 cycles, docs/PERF.md thirty-third pass): one
// element a load took a thread 4 to 8 loads, each with its own index arithmetic, before its
// last was issued. All loads of a round go out before any is stored: at decode sizes one
// round, one round trip.
constexpr int kRowLoadsInFlight = 4;  // a round: 64 tokens of bf16, 32 of fp32
template <class ScoreT>
__device__ void load_projected_rows(const FusedStep& f, const FusedMember& mb, int rb, const Group& g, char* smem) {
  constexpr int kPerLoad = 16 / static_cast<int>(sizeof(ScoreT));
  constexpr int kChunks = kFusedRowsPerBlock / kPerLoad;  // a token's 16-byte pieces
  const auto* rows = static_cast<const ScoreT*>(mb.kv.data);
  const int tokens = min(g.base + g.stride - 1, f.tokens) - g.base;  // the span's rows that exist
  const int work = kChunks * tokens;
  const int ch_shift = mb.c.overlap ? 4 : 5;  // log2(channels_per_block)
  const bool round = mb.c.round_bf16;
  float* vals = smem_vals(smem);
  for (int idx0 = threadIdx.x; idx0 < work; idx0 += kRowLoadsInFlight * kFusedThreads) {
    uint4 raw[kRowLoadsInFlight];
#pragma unroll
    for (int k = 0; k < kRowLoadsInFlight; ++k) {
      const int idx = idx0 + k * kFusedThreads;
      if (idx < work) {
        const int tok = idx / kChunks, row0 = idx % kChunks * kPerLoad;
        const int column = (row0 >> ch_shift) * mb.c.head_dim + (rb << ch_shift) + (row0 & ((1 << ch_shift) - 1));
        raw[k] = __ldcg(reinterpret_cast<const uint4*>(rows + static_cast<std::int64_t>(g.base + tok) * mb.kv.ld + column));
      }
    }
#pragma unroll
    for (int k = 0; k < kRowLoadsInFlight; ++k) {
      const int idx = idx0 + k * kFusedThreads;
      if (idx >= work) continue;
      const int tok = idx / kChunks, row0 = idx % kChunks * kPerLoad;
      const ScoreT* v = reinterpret_cast<const ScoreT*>(&raw[k]);
#pragma unroll
      for (int e = 0; e < kPerLoad; ++e) {
        const float x = to_float(v[e]);
        vals[(row0 + e) * g.stride + tok] = round ? num::round_to_bf16(x) : x;
      }
    }
  }
  __syncthreads();
}

// A pool item: the channels of row block `rb` for the requests of one group. Pools those
// channels of every completed window of the group into the pooled slots the entries read,
// then updates those channels' state.
// `g` comes from stage_plan.
template <bool kStash, bool kProject>
__device__ void pool_item(const FusedStep& f, int member, int rb_global, int rb, const Group& g, char* smem) {
  const FusedMember& mb = f.m[member];
  if constexpr (kProject) sum_slices(f, mb, rb_global, g, smem);
  else if (mb.kv.dtype == DType::f32) load_projected_rows<float>(f, mb, rb, g, smem);
  else load_projected_rows<std::uint16_t>(f, mb, rb, g, smem);
  DSV4_STAMP(f, mark1);
  const float* vals = smem_vals(smem);
  const CompressorConsts& c = mb.c;
  const int ch = channels_per_block(c.overlap), hd = c.head_dim;
  const int e0 = g.entry_offset[0], entries = g.entry_offset[g.requests] - e0;
  // A thread per (entry, channel): its slots' loads are issued together (pool_ratio4).
  auto pool_entries = [&](auto channels, auto pool) {
    constexpr int ch = decltype(channels)::value;
    for (int idx = threadIdx.x; idx < entries * ch; idx += kFusedThreads) {
      const int el = idx / ch, dl = idx % ch, d = rb * ch + dl;
      // The store is the hand-off: the entry reads until its slots no longer hold the pending
      // mark (load_pooled).
      mb.pooled[static_cast<std::int64_t>(e0 + el) * hd + d] = pooled_for_store(pool(el, dl, d));
    }
  };
  const bool f32 = mb.st.dtype == DType::f32;
  if (c.overlap)
    pool_entries(std::integral_constant<int, channels_per_block(true)>{}, [&](int el, int dl, int d) {
      return f32 ? pool_ratio4<float, kStash>(mb, vals, g, el, dl, d) : pool_ratio4<std::uint16_t, kStash>(mb, vals, g, el, dl, d);
    });
  else
    pool_entries(std::integral_constant<int, channels_per_block(false)>{}, [&](int el, int, int d) {
      return f32 ? pool_ratio128<float, kStash>(mb, vals, g, rb, el, d)
                 : pool_ratio128<std::uint16_t, kStash>(mb, vals, g, rb, el, d);
    });
  // Pooling has read the state these channels are about to overwrite. The state update is for
  // the next step only (it becomes visible when this kernel completes), so it stays off the
  // entries' path.
  __syncthreads();
  DSV4_STAMP(f, mark2);

  if (mb.st.running) {  // update_running_kernel, for these channels, four pairs at once
    constexpr int kPairs = 4;
    const int pairs = g.requests * ch;
    for (int base = threadIdx.x; base < pairs; base += kPairs * kFusedThreads) {
      Softmax sm[kPairs];
      float* acc[kPairs] = {};
      bool carried[kPairs] = {};
#pragma unroll
      for (int k = 0; k < kPairs; ++k) {  // the accumulators' loads first, for all four pairs
        const int idx = base + k * kFusedThreads;
        if (idx >= pairs) continue;
        const int r = idx / ch, d = rb * ch + idx % ch;
        const std::int64_t start = g.start[r], end = start + (g.token_offset[r + 1] - g.token_offset[r]);
        if (window_start_of(c, end) == end) continue;
        float* a = reinterpret_cast<float*>(static_cast<char*>(mb.st.data) + g.slot[r] * mb.st.slot_bytes);
        acc[k] = a + d;
        carried[k] = window_start_of(c, end) < start;
        if (carried[k]) sm[k] = Softmax{__ldcg(a + d), __ldcg(a + hd + d), __ldcg(a + 2 * hd + d)};
      }
#pragma unroll
      for (int k = 0; k < kPairs; ++k) {
        if (!acc[k]) continue;
        const int idx = base + k * kFusedThreads;
        const int r = idx / ch, d = rb * ch + idx % ch;
        const std::int64_t start = g.start[r], end = start + (g.token_offset[r + 1] - g.token_offset[r]);
        const std::int64_t w0 = window_start_of(c, end);
        const int tok0 = g.token_offset[r] - g.base;
        for (std::int64_t q = max(w0, start); q < end; ++q) {
          const float score = vals[block_row(c, rb, hd + d) * g.stride + tok0 + static_cast<int>(q - start)];
          const float value = vals[block_row(c, rb, d) * g.stride + tok0 + static_cast<int>(q - start)];
          sm[k].add(score + c.ape[(q - w0) * hd + d], value);
        }
        acc[k][0] = sm[k].m, acc[k][hd] = sm[k].s, acc[k][2 * hd] = sm[k].a;
      }
    }
  } else {  // update_state_kernel, for these columns: a warp per request, a lane per column
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int r = warp; r < g.requests; r += kWarps) {
      const std::int64_t start = g.start[r], end = start + (g.token_offset[r + 1] - g.token_offset[r]);
      const int tok0 = g.token_offset[r] - g.base;
      const std::int64_t last_window_start = window_start_of(c, end);
      const std::int64_t keep_from = c.overlap ? max(std::int64_t{0}, last_window_start - c.ratio) : last_window_start;
      char* slot = static_cast<char*>(mb.st.data) + g.slot[r] * mb.st.slot_bytes;
      for (std::int64_t q = max(start, keep_from); q < end; ++q)
        for (int row = lane; row < kFusedRowsPerBlock; row += 32)
          store_state(mb.st, slot, (q & (mb.st.ring_rows - 1)) * mb.st.width + block_column(c, rb, row),
                      vals[row * g.stride + tok0 + (q - start)]);
    }
  }
  DSV4_STAMP(f, mark3);
}

}  // namespace

}  // namespace dsv4::cuda
