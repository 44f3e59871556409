// The fused decode step (see fused_step.hpp). A persistent kernel works through items in
// order: projection items, then pool items, then one item per completed entry.
//  - A projection item reads 64 weight rows x one slice of hidden once, multiplies them with
//    the step's x (staged in shared memory) on tensor cores and writes fp32 partial sums. In a
//    step of more than 8 tokens a narrow projection's items each take one group of the tokens
//    (FusedStep::token_groups), so that its few row blocks still fill the grid.
//  - A pool item takes a row block's channels for one group of requests: it waits until every
//    slice (and token group) of the row block is written, adds the group's tokens' 8 partials
//    in slice order (kv_score, on chip), pools those channels of the group's completed
//    windows, counts itself done, then updates those channels of the group's state. A row
//    block holds, for its channels, every column the pooling needs (ratio 4: kv and score of
//    both channel halves; else kv, score). Cutting the batch into groups keeps each item
//    short, so the pooling of a large batch spreads over the whole grid instead of queueing
//    behind one block per row block.
//  - An entry item reads its pooled values as the pool items store them (a slot holds a
//    pending mark until then, see kPooledPending), then runs the epilogue (norm, RoPE,
//    rotation, fp8, store) shared with finish_entries.
// Before the wait for the previous kernel (programmatic dependent launch) a block does what
// reads only weights and the plan: a projection item copies its weights into shared memory
// (paced) and prefetches the rest into L2, a pool item stages its plan values and prefetches
// its state rows into L2 (the fused step only), an entry item loads its inputs.
// A block's first item is its blockIdx.x, its later ones tickets taken in order (or, in some
// ring steps, blockIdx.x + k gridDim.x: FusedStep::fixed_order); a block takes its items in
// increasing order and an item waits only for items before it (pool items for projection
// items, entries for pool items), so the owner of an item waited for is running it or an
// item before it: no deadlock, in whatever order the blocks start, provided that all of them
// are resident at once, which fused_prepare_launch's grid assumes (no more blocks than fit the
// SMs the device reports: a process confined to fewer SMs must not run this kernel).
// The counters return to zero at the end of every launch (the last block out resets them),
// so a captured graph can replay the step.
// As the unfused path's compress step (f.projected) there are no projection items: a pool
// item reads its columns of the rows the cuBLASLt projection wrote instead of summing slices.
#include <algorithm>
#include <map>
#include <mutex>
#ifdef DSV4_FUSED_TIMELINE
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>
#endif

#include "cuda/device_utils.cuh"
#include "cuda/finish_entry.cuh"
#include "cuda/fused_step.hpp"
#include "cuda/launch.cuh"
#include "cuda/wgmma.cuh"

namespace dsv4::cuda {

namespace {

#ifdef DSV4_FUSED_TIMELINE
// Diagnostics (CMake option DSV4_FUSED_TIMELINE): thread 0 of every block stamps the global
// timer at the block's phases into its plan's record; at exit the process writes the last
// launch of every plan to the CSV file named by $DSV4_FUSED_TIMELINE_CSV, which
// scripts/fused-timeline.py summarizes. Shows where a step's time goes between blocks, which
// no profiler that serializes kernels can show with programmatic dependent launch.
// mark1 and mark2 depend on the block's first item: projection: x and the staged weights are in
// shared memory / the products are summed (before the stores); pool: the slices are summed
// into shared memory (after the row-block wait) / the pooled values are written (before the
// state update); entry: its pooled values are in hand / normed, roped and rotated. mark3: pool
// items: the state is updated; entry: its stores are issued.
struct BlockStamps {
  unsigned long long start, waited, mark1, mark2, mark3, first_end, exit;
  int first_item, sm;
};
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// The block's stamps live in shared memory until it exits (a global read for "first stamp
// wins" would add a memory round trip to every phase). The first stamp of a field wins, so
// marks describe the block's first item.
__shared__ BlockStamps s_stamps;
#define DSV4_STAMP(f, field)                                      \
  do {                                                            \
    if (threadIdx.x == 0 && s_stamps.field == 0) s_stamps.field = global_ns(); \
  } while (0)
#else
#define DSV4_STAMP(f, field) \
  do {                       \
  } while (0)
#endif

constexpr int kWarps = kFusedThreads / 32;
constexpr int kStagePace = 2;  // k blocks of staged weights per group of copies before the wait
constexpr int kLoadBatch = 4;  // 32-wide k blocks per register buffer: 4 KB per warp, two buffers
// Padding of a staged x row: 64 bytes, so that a row is 64 bytes past a multiple of 128 and
// the 8 lanes of each phase of a 16-byte shared load (2 tokens x 4 k offsets) hit distinct banks.
constexpr int kXPad = 32;
// Steps of more than 8 tokens stream each projection item's weights and x through a ring of
// kRingSlots slots in shared memory, one 64-wide k atom a slot: the atom's 64 weight rows
// (8 KiB), then its x for the pass's tokens (128 bytes a token). On wgmma (f.wgmma) both are in
// the 128-byte swizzle layout and a pass takes up to kRingMaxTokens tokens; on mma.sync in
// staged_chunk's layout of two k blocks, up to kMmaRingMaxTokens (two accumulators per 8-token
// tile in registers). So the weights of a step of up to 128 (64) tokens are read once; staging
// them whole for every pass, as steps of at most 8 tokens do, leaves no room for x.
constexpr int kRingSlots = 4;
constexpr int kRingMaxTokens = 128;
constexpr int kMmaRingMaxTokens = 64;
// Tokens of a projection item's token group at most (fused_prepare_launch).
constexpr int kGroupMostTokens = 64;
constexpr int kGroupMostTokensMmaSync = 32;
// A ring pass's width: its tokens rounded up to 8 up to 32, else to 64 or 128 (one or two
// wgmma instructions of 64 tokens side by side; the padded tokens are zero).
__host__ __device__ constexpr int ring_width(int n) { return n <= 32 ? (n + 7) / 8 * 8 : n <= 64 ? 64 : 128; }
// Elements of one slot, for passes of up to `width` tokens (a multiple of 1024 bytes).
__host__ __device__ constexpr int ring_slot_elems(int width) { return (kFusedRowsPerBlock + width) * 64; }
// Where chunk c (16 bytes, k 8c..8c+7) of row r of the staged weights lies, in 16-byte units
// from ws. On wgmma (f.wgmma, sm_90a): the 128-byte swizzle layout (wgmma.cuh), one 8 KiB atom
// per 64 k (2 k blocks); on mma.sync its fragment layout (staged_chunk).
template <bool kWgmma>
__device__ __forceinline__ int staged_weight_unit(const FusedStep& f, int r, int c) {
#if defined(DSV4_HAVE_WGMMA)
  if constexpr (kWgmma) return (c / 8) * (kFusedRowsPerBlock * 8) + sw128_unit(r, c % 8);
#endif
  return staged_chunk(f.staged_kblocks, r, c);
}
constexpr int kCounterTicket = 0, kCounterExits = 1, kCounterRowBlocks = 2;

// Channels per row block: 4 quarters of 16 (kv and score of both halves) with overlap, else
// 2 halves of 32 (kv, score).
__host__ __device__ constexpr int channels_per_block(bool overlap) { return overlap ? 16 : 32; }

// The kv_score column held by row r (0..63) of row block rb. Rows 16w..16w+15 (warp w) are
// consecutive columns.
__device__ __forceinline__ int block_column(const CompressorConsts& c, int rb, int r) {
  const int ch = channels_per_block(c.overlap);
  return (r / ch) * c.head_dim + rb * ch + r % ch;
}

// Row of the block's on-chip values that holds kv_score column `col`.
__device__ __forceinline__ int block_row(const CompressorConsts& c, int rb, int col) {
  const int ch = channels_per_block(c.overlap);
  return (col / c.head_dim) * ch + col % c.head_dim - rb * ch;
}

__device__ __forceinline__ void store_state(const StateView& st, char* slot, std::int64_t index, float v) {
  if (st.dtype == DType::f32) reinterpret_cast<float*>(slot)[index] = v;
  else reinterpret_cast<std::uint16_t*>(slot)[index] = num::bf16_from_f32(v);
}

// x[tokens [pass0, pass0 + n), slice] into shared rows of `stride` elements; tokens up to the
// next multiple of 8 are zero.
__device__ void stage_x(const FusedStep& f, int pass0, int n, int slice, std::uint16_t* xs, int stride) {
  const int ks = f.hidden / kFusedSlices, chunks = ks / 8, rows = (n + 7) / 8 * 8;
  const std::uint16_t* src = f.x + static_cast<std::int64_t>(pass0) * f.hidden + slice * ks;
  for (int idx = threadIdx.x; idx < rows * chunks; idx += kFusedThreads) {
    const int tok = idx / chunks, c8 = idx % chunks;
    // x is 16-byte aligned (Compressor::run checks it) and hidden is a multiple of 256. The
    // copies are asynchronous so that all of them are in flight at once.
    if (tok < n) cp_async_16(xs + tok * stride + c8 * 8, src + static_cast<std::int64_t>(tok) * f.hidden + c8 * 8);
    else *reinterpret_cast<uint4*>(xs + tok * stride + c8 * 8) = make_uint4(0, 0, 0, 0);
  }
  cp_async_wait_all();
}

// A projection item's wait for the previous kernel (weights never change; x, state and
// counters may come from it). Right after it, the item lets the next kernel launch: that
// kernel's blocks then take SM slots as this step's blocks leave them, where without the
// signal the launch began only when the last projection block had exited (an exit counts
// as the signal) and its blocks started 2 us after that. The next kernel still waits for
// this one to end before it reads anything this one writes.
__device__ __forceinline__ void projection_wait(const FusedStep& f, bool& waited) {
  if (waited) return;
  wait_for_previous_kernel();
  allow_next_kernel();
  waited = true;
  DSV4_STAMP(f, waited);
}

// The mma.sync arithmetic of every projection item: a 32-wide k block in which lane (g, t)
// holds k 8t..8t+7 of weight rows g (lo) and g + 8 (hi) and of token g (x). The first mma takes
// k 8t..8t+3 into one accumulator, the second 8t+4..8t+7 into the other (half as long a chain
// of dependent mma as one accumulator: a one-token item is nothing else). A and B use the same
// k order, so this is the plain dot product in an order fixed by the k block alone.
__device__ __forceinline__ void mma_k_block(float (&acc)[2][4], const uint4& lo, const uint4& hi, const uint4& x) {
  mma_bf16_16x8x16(acc[0], lo.x, hi.x, lo.y, hi.y, x.x, x.y);
  mma_bf16_16x8x16(acc[1], lo.z, hi.z, lo.w, hi.w, x.z, x.w);
}
// A warp's sums of one 8-token tile after its last k block (rows 16 warp + g and + 8, tokens
// col + 2t and the next): the two accumulators added, into out[64][tokens_cap].
__device__ __forceinline__ void store_tile_sums(const FusedStep& f, float* out, int col, const float (&acc)[2][4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* o = out + static_cast<std::int64_t>(16 * warp + g) * f.tokens_cap + col + 2 * t;
  *reinterpret_cast<float2*>(o) = make_float2(acc[0][0] + acc[1][0], acc[0][1] + acc[1][1]);
  *reinterpret_cast<float2*>(o + 8 * f.tokens_cap) = make_float2(acc[0][2] + acc[1][2], acc[0][3] + acc[1][3]);
}

// A projection item's multiply on mma.sync in a step of at most 8 tokens (devices without
// wgmma, and Pro's hidden): each warp its 16 rows x one 8-token tile, x staged by stage_x,
// the staged k blocks from shared memory, the others from the register buffers a and b
// (refilled by `load`), all in k order (mma_k_block).
template <class Load>
__device__ __forceinline__ void mma_sync_pass(const FusedStep& f, float* out, const std::uint16_t* xs,
                                              const std::uint16_t* ws, uint4 (&a)[kLoadBatch][2],
                                              uint4 (&b)[kLoadBatch][2], const Load& load) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ks = f.hidden / kFusedSlices, nblocks = ks / 32, stride = ks + kXPad, staged = f.staged_kblocks;
  float acc[2][4] = {};
  auto multiply_block = [&](const uint4& lo, const uint4& hi, int kb) {
    mma_k_block(acc, lo, hi, *reinterpret_cast<const uint4*>(xs + g * stride + kb * 32 + 8 * t));
  };
  auto multiply = [&](const uint4 (&r)[kLoadBatch][2], int kb0) {
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      if (kb0 + j < nblocks) multiply_block(r[j][0], r[j][1], kb0 + j);
  };
#pragma unroll 4
  for (int kb = 0; kb < staged; ++kb) {
    const uint4 lo = *reinterpret_cast<const uint4*>(ws + 8 * staged_chunk(staged, 16 * warp + g, 4 * kb + t));
    const uint4 hi = *reinterpret_cast<const uint4*>(ws + 8 * staged_chunk(staged, 16 * warp + g + 8, 4 * kb + t));
    multiply_block(lo, hi, kb);
  }
  for (int kb0 = staged; kb0 < nblocks; kb0 += 2 * kLoadBatch) {
    multiply(a, kb0);
    if (kb0 + 2 * kLoadBatch < nblocks) load(a, kb0 + 2 * kLoadBatch);
    multiply(b, kb0 + kLoadBatch);
    if (kb0 + 3 * kLoadBatch < nblocks) load(b, kb0 + 3 * kLoadBatch);
  }
  DSV4_STAMP(f, mark2);
  store_tile_sums(f, out, 0, acc);
}

#if defined(DSV4_HAVE_WGMMA)
// sm_90a: x[tokens [pass0, pass0 + n), slice] as wgmma's B operand, `width` tokens (n rounded up
// to 8; the rest zero), k in its natural order, in the 128-byte swizzle layout: one atom of
// width x 128 bytes per 64 k. Eight threads copy a token's 128 bytes of an atom.
__device__ void stage_x_wgmma(const FusedStep& f, int pass0, int n, int width, int slice, std::uint16_t* xs) {
  const int ks = f.hidden / kFusedSlices, chunks = ks / 8, atoms = (chunks + 7) / 8;
  const std::uint16_t* src = f.x + static_cast<std::int64_t>(pass0) * f.hidden + slice * ks;
  for (int idx = threadIdx.x; idx < width * atoms * 8; idx += kFusedThreads) {
    const int rest = idx / 8, tok = rest % width, atom = rest / width, c = 8 * atom + idx % 8;
    if (c >= chunks) continue;  // ks a multiple of 32 but not of 64: half an atom
    std::uint16_t* dst = xs + 8 * (atom * width * 8 + sw128_unit(tok, c % 8));
    if (tok < n) cp_async_16(dst, src + static_cast<std::int64_t>(tok) * f.hidden + 8 * c);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  cp_async_wait_all();       // x, and this thread's staged weights
  fence_shared_for_wgmma();  // the barrier after this publishes them to the tensor cores
}

// One pass of a projection item on wgmma (sm_90a): the item's 64 rows x N tokens as one
// warpgroup tile, D in registers, k in its natural order throughout. The staged k blocks are
// read by the tensor cores from shared memory (staged_weight_unit's layout), the others come
// from the register buffers a and b (refilled by `load`) after quad_transpose. The k steps
// are issued in k order into one accumulator whatever the number of staged k blocks, and a
// token's sums do not depend on N, so the partial sums are the same for every step shape on
// this device.
template <int N, class Load>
__device__ __forceinline__ void wgmma_pass(const FusedStep& f, float* out, int pass0, const std::uint16_t* xs,
                                           const std::uint16_t* ws, uint4 (&a)[kLoadBatch][2],
                                           uint4 (&b)[kLoadBatch][2], const Load& load) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nblocks = f.hidden / kFusedSlices / 32, staged = f.staged_kblocks;
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
  // k step s (k 16s..16s+15): atom s / 4 of the weights and of x, 32 (s % 4) bytes into the row.
  auto x_step = [&](int s) { return sw128_descriptor(xs + (s / 4) * N * 64 + (s % 4) * 16); };
  // The zeros go into the accumulators before the fence: where the compiler left them, after
  // it, they were register writes inside the pipeline stage, and ptxas then serialized every
  // wgmma of the stage (its warning C7515). Measured on the H100: Flash CSA layer decode B=1
  // 12.5 -> 12.0 us, HCA B=1 9.7 -> 9.0 (docs/PERF.md).
  wgmma_hold(d);
  wgmma_fence();
  for (int s = 0; s < 2 * staged; ++s)
    wgmma_ss<N>(d, sw128_descriptor(ws + (s / 4) * kFusedRowsPerBlock * 64 + (s % 4) * 16), x_step(s));
  wgmma_commit();
  // A register buffer's k blocks [kb0, end) as one group, waited for before the buffer is
  // loaded again.
  auto issue = [&](uint4 (&r)[kLoadBatch][2], int kb0, int end) {
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      if (kb0 + j < end) quad_transpose(r[j][0]), quad_transpose(r[j][1]);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      if (kb0 + j >= end) continue;
      const int s = 2 * (kb0 + j);
      wgmma_rs<N>(d, r[j][0].x, r[j][1].x, r[j][0].y, r[j][1].y, x_step(s));
      wgmma_rs<N>(d, r[j][0].z, r[j][1].z, r[j][0].w, r[j][1].w, x_step(s + 1));
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(d);
  };
  for (int kb0 = staged; kb0 < nblocks; kb0 += 2 * kLoadBatch) {
    issue(a, kb0, nblocks);
    if (kb0 + 2 * kLoadBatch < nblocks) load(a, kb0 + 2 * kLoadBatch);
    issue(b, kb0 + kLoadBatch, nblocks);
    if (kb0 + 3 * kLoadBatch < nblocks) load(b, kb0 + 3 * kLoadBatch);
  }
  wgmma_wait<0>();
  wgmma_hold(d);
  DSV4_STAMP(f, mark2);
#pragma unroll
  for (int tile = 0; tile < N / 8; ++tile) {
    float* o = out + static_cast<std::int64_t>(16 * warp + g) * f.tokens_cap + pass0 + tile * 8 + 2 * t;
    *reinterpret_cast<float2*>(o) = make_float2(d[4 * tile], d[4 * tile + 1]);
    *reinterpret_cast<float2*>(o + 8 * f.tokens_cap) = make_float2(d[4 * tile + 2], d[4 * tile + 3]);
  }
}

// One pass of a ring item (project_item_ring): tokens [pass0, pass0 + n) as W = ring_width(n)
// columns, the item's k atoms taken from the ring in order. Per k step the same wgmma as
// wgmma_pass, in the same k order into one accumulator from zero, so a token's partial sums
// are those a step of at most 8 tokens gives it. `refill(a)` runs once every warp is done with
// atom a - 2 and commits one group of copies (empty when nothing is left to copy): in flight
// while atom a multiplies are the copies of atoms a + 1 and a + 2.
template <int W, class Refill>
__device__ __forceinline__ void ring_pass(const FusedStep& f, float* out, int pass0, int n, int atoms, int last_steps,
                                          const std::uint16_t* ring, int slot_elems, const Refill& refill) {
  constexpr int kSubs = W > 64 ? W / 64 : 1, kSubW = W > 64 ? 64 : W;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float d[kSubs][kSubW / 2];
#pragma unroll
  for (int u = 0; u < kSubs; ++u)
#pragma unroll
    for (int i = 0; i < kSubW / 2; ++i) d[u][i] = 0.0f;
  for (int a = 0; a < atoms; ++a) {
    // Groups committed after atom a's: the first atoms' x copies went out one group an atom
    // after their weights' groups, and one group follows per atom (refill).
    if (a < kRingSlots) cp_async_wait_pending<kRingSlots - 1>();
    else cp_async_wait_pending<kRingSlots - 3>();
    fence_shared_for_wgmma();
    __syncthreads();  // atom a is in shared memory; every warp has waited for atom a - 2's multiply
    DSV4_STAMP(f, mark1);  // the first atom's weights and x are in shared memory
    refill(a);
    const std::uint16_t* slot = ring + (a % kRingSlots) * slot_elems;
    const int steps = a == atoms - 1 ? last_steps : 4;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      if (s >= steps) break;
      const std::uint64_t w = sw128_descriptor(slot + 16 * s);
#pragma unroll
      for (int u = 0; u < kSubs; ++u)
        wgmma_ss<kSubW>(d[u], w, sw128_descriptor(slot + kFusedRowsPerBlock * 64 + u * 64 * 64 + 16 * s));
    }
    wgmma_commit();
    wgmma_wait<1>();
#pragma unroll
    for (int u = 0; u < kSubs; ++u) wgmma_hold(d[u]);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int u = 0; u < kSubs; ++u) wgmma_hold(d[u]);
  DSV4_STAMP(f, mark2);
#pragma unroll
  for (int u = 0; u < kSubs; ++u) {
#pragma unroll
    for (int tile = 0; tile < kSubW / 8; ++tile) {
      const int col = u * 64 + tile * 8;
      if (col >= n) break;
      float* o = out + static_cast<std::int64_t>(16 * warp + g) * f.tokens_cap + pass0 + col + 2 * t;
      *reinterpret_cast<float2*>(o) = make_float2(d[u][4 * tile], d[u][4 * tile + 1]);
      *reinterpret_cast<float2*>(o + 8 * f.tokens_cap) = make_float2(d[u][4 * tile + 2], d[u][4 * tile + 3]);
    }
  }
}

#endif  // DSV4_HAVE_WGMMA

// One pass of a ring item on mma.sync (project_item_ring on devices without wgmma, and Pro's
// hidden): tokens [pass0, pass0 + n) in tiles of 8, each warp its 16 rows, the item's k atoms
// taken from the ring in order, two k blocks an atom. The same mma_k_block sequence from zero
// as mma_sync_pass, so a token's partial sums are those a step of at most 8 tokens gives it.
// `refill` as in ring_pass (the same ring, the same groups of copies).
template <int kTiles, class Refill>
__device__ __forceinline__ void ring_pass_mma_sync(const FusedStep& f, float* out, int pass0, int n, int atoms,
                                                   int last_steps, const std::uint16_t* ring, int slot_elems,
                                                   const Refill& refill) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tiles = (n + 7) / 8;
  float acc[kTiles][2][4] = {};
  for (int a = 0; a < atoms; ++a) {
    if (a < kRingSlots) cp_async_wait_pending<kRingSlots - 1>();
    else cp_async_wait_pending<kRingSlots - 3>();
    __syncthreads();  // atom a is in shared memory; every warp is done with atom a - 1
    DSV4_STAMP(f, mark1);
    refill(a);
    const std::uint16_t* w = ring + (a % kRingSlots) * slot_elems;
    const std::uint16_t* x = w + kFusedRowsPerBlock * 64;
    const int kblocks = a == atoms - 1 ? last_steps / 2 : 2;
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
      if (kb >= kblocks) break;
      const uint4 lo = *reinterpret_cast<const uint4*>(w + 8 * staged_chunk(2, 16 * warp + g, 4 * kb + t));
      const uint4 hi = *reinterpret_cast<const uint4*>(w + 8 * staged_chunk(2, 16 * warp + g + 8, 4 * kb + t));
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile)
        if (tile < tiles)
          mma_k_block(acc[tile], lo, hi, *reinterpret_cast<const uint4*>(x + 8 * staged_chunk(2, 8 * tile + g, 4 * kb + t)));
    }
  }
  DSV4_STAMP(f, mark2);
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
    if (tile < tiles) store_tile_sums(f, out, pass0 + 8 * tile, acc[tile]);
}

// Where chunk c (16 bytes) of row r (a weight row, or a token after the slot's weight rows) of
// one atom of the ring lies, in 16-byte units: wgmma's 128-byte swizzle, else the layout of
// two staged k blocks, whose 8 lanes of a shared-load phase hit distinct banks.
template <bool kWgmma>
__device__ __forceinline__ int ring_unit(int r, int c) {
#if defined(DSV4_HAVE_WGMMA)
  if constexpr (kWgmma) return sw128_unit(r, c);
#endif
  return staged_chunk(2, r, c);
}

// A projection item of a step of more than 8 tokens: rows of row block `rb` of member `mb`,
// hidden slice `slice`, tokens [tok0, tok1) (its token group), in passes of up to
// kRingMaxTokens (wgmma) or kMmaRingMaxTokens (mma.sync); fp32 partial sums to
// out[64][tokens_cap], as project_item. The weights stream through the ring (see kRingSlots)
// atom by atom with x: the first kRingSlots atoms' weights are copied before the wait for the
// previous kernel (paced as project_item paces its staged weights), the rest of the item's
// weights prefetched into L2.
template <bool kWgmma>
__device__ void project_item_ring(const FusedStep& f, const FusedMember& mb, int rb, int slice, int tok0, int tok1,
                                  float* out, std::uint16_t* ring, bool& waited) {
  const int ks = f.hidden / kFusedSlices, atoms = (ks + 63) / 64, last_steps = (ks - 64 * (atoms - 1)) / 16;
  const int slot_elems = ring_slot_elems(ring_width(f.tokens_per_pass));
  const std::uint16_t* item_w = mb.w + slice * ks;
  const std::uint64_t policy = l2_policy_evict_first();
  // This thread copies 16-byte chunk c of weight rows r0 + 16j (and of tokens r0 + 16j): eight
  // threads a row's 128 bytes of an atom.
  const int c = threadIdx.x % 8, r0 = threadIdx.x / 8;
  const std::uint16_t* w_row[kFusedRowsPerBlock / 16];
#pragma unroll
  for (int j = 0; j < kFusedRowsPerBlock / 16; ++j)
    w_row[j] = item_w + static_cast<std::int64_t>(block_column(mb.c, rb, r0 + 16 * j)) * f.hidden + 8 * c;
  auto copy_weights = [&](int a) {
    if (8 * c >= ks - 64 * a) return;  // ks a multiple of 32 but not of 64: half an atom
    std::uint16_t* dst = ring + (a % kRingSlots) * slot_elems;
#pragma unroll
    for (int j = 0; j < kFusedRowsPerBlock / 16; ++j) cp_async_16(dst + 8 * ring_unit<kWgmma>(r0 + 16 * j, c), w_row[j] + 64 * a, policy);
  };
  auto copy_x = [&](int a, int pass0, int n) {
    if (8 * c >= ks - 64 * a) return;
    std::uint16_t* dst = ring + (a % kRingSlots) * slot_elems + kFusedRowsPerBlock * 64;
    const std::uint16_t* src = f.x + static_cast<std::int64_t>(pass0) * f.hidden + slice * ks + 64 * a + 8 * c;
    for (int tok = r0; tok < n; tok += 16) cp_async_16(dst + 8 * ring_unit<kWgmma>(tok, c), src + static_cast<std::int64_t>(tok) * f.hidden);
  };
  // One group per slot whatever the number of atoms, so that ring_pass's counts hold.
  auto copy_first_weights = [&](bool paced) {
    for (int a = 0; a < kRingSlots; ++a) {
      if (a < atoms) copy_weights(a);
      cp_async_commit();
      if (paced) cp_async_wait_pending<1>();
    }
  };
  copy_first_weights(!waited);
  if (atoms > kRingSlots && threadIdx.x < kFusedRowsPerBlock)
    prefetch_l2(item_w + static_cast<std::int64_t>(block_column(mb.c, rb, threadIdx.x)) * f.hidden + 64 * kRingSlots,
                static_cast<unsigned>(ks - 64 * kRingSlots) * 2u, policy);
  // On mma.sync at most kMmaRingMaxTokens a pass (the host plans no more; a wgmma plan runs
  // only where the loaded code has wgmma, fused_multiplies_on_wgmma, but would be right here).
#if defined(DSV4_HAVE_WGMMA)
  const int pass_tokens = kWgmma ? f.tokens_per_pass : min(f.tokens_per_pass, kMmaRingMaxTokens);
#else
  const int pass_tokens = min(f.tokens_per_pass, kMmaRingMaxTokens);
#endif
  for (int pass0 = tok0; pass0 < tok1; pass0 += pass_tokens) {
    const int n = min(pass_tokens, tok1 - pass0), width = ring_width(n);
    if (pass0 > tok0) {
      __syncthreads();  // every warp is done with the ring (the last pass waited for its multiply)
      copy_first_weights(false);
    }
    projection_wait(f, waited);
    // The pass's padded tokens are zero in every slot (the multiply reads the whole width).
    const int pad = (width - n) * 8;
    for (int idx = threadIdx.x; idx < kRingSlots * pad; idx += kFusedThreads) {
      const int s = idx / pad, tok = n + idx % pad / 8;
      *reinterpret_cast<uint4*>(ring + s * slot_elems + kFusedRowsPerBlock * 64 + 8 * ring_unit<kWgmma>(tok, idx % 8)) =
          make_uint4(0, 0, 0, 0);
    }
    for (int a = 0; a < kRingSlots; ++a) {
      if (a < atoms) copy_x(a, pass0, n);
      cp_async_commit();
    }
    auto refill = [&](int a) {
      const int next = a - 2 + kRingSlots;  // into the slot of atom a - 2
      if (a >= 2 && next < atoms) copy_weights(next), copy_x(next, pass0, n);
      cp_async_commit();
    };
#if defined(DSV4_HAVE_WGMMA)
    if constexpr (kWgmma) {
      switch (width) {
        case 8: ring_pass<8>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill); break;
        case 16: ring_pass<16>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill); break;
        case 24: ring_pass<24>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill); break;
        case 32: ring_pass<32>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill); break;
        case 64: ring_pass<64>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill); break;
        default: ring_pass<128>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill); break;
      }
      continue;
    }
#endif
    if (width <= 32) ring_pass_mma_sync<4>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill);
    else ring_pass_mma_sync<8>(f, out, pass0, n, atoms, last_steps, ring, slot_elems, refill);
  }
}

// A projection item of a step of at most 8 tokens: rows of row block `rb` of member `mb`,
// hidden slice `slice`, every token; fp32 partial sums to out[64][tokens_cap] (on mma.sync in
// mma_k_block's order, on wgmma in k's natural order).
//
// The first f.staged_kblocks k blocks of the item's weights are copied to shared memory `ws`
// before the wait for the previous kernel; the rest stream through two register buffers (the
// first two loaded before the wait, the others prefetched into L2 before it). The k blocks are
// multiplied in k order either way, so the sums do not depend on how many k blocks were staged.
template <bool kWgmma>
__device__ void project_item(const FusedStep& f, const FusedMember& mb, int rb, int slice, float* out,
                             std::uint16_t* xs, std::uint16_t* ws, bool& waited) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ks = f.hidden / kFusedSlices, nblocks = ks / 32;
  const int staged = f.staged_kblocks;
  const std::uint16_t* item_w = mb.w + slice * ks;
  // The weights are read once a step: marked evict_first in L2, they stream through it
  // without pushing out what the step's tail reads there (its state, hand-offs and code).
  const std::uint64_t policy = l2_policy_evict_first();
  {  // the staged k blocks, then an L2 prefetch of what the register buffers load after the wait
    // Before the wait, the copies go out kStagePace k blocks at a time, two groups in flight
    // (16 KB a block): the previous kernel's tail is a chain of dependent memory round trips,
    // and a flood of every step's weights at once would queue each of them behind it.
    const bool paced = !waited;
    for (int kb0 = 0; kb0 < staged; kb0 += paced ? kStagePace : staged) {
      const int chunks = 4 * (min(staged, kb0 + (paced ? kStagePace : staged)) - kb0);
      for (int idx = threadIdx.x; idx < kFusedRowsPerBlock * chunks; idx += kFusedThreads) {
        const int r = idx / chunks, c = 4 * kb0 + idx % chunks;
        cp_async_16(ws + 8 * staged_weight_unit<kWgmma>(f, r, c),
                    item_w + static_cast<std::int64_t>(block_column(mb.c, rb, r)) * f.hidden + 8 * c, policy);
      }
      cp_async_commit();
      if (paced) cp_async_wait_pending<1>();
    }
    const int later = staged + 2 * kLoadBatch;
    if (later < nblocks && threadIdx.x < kFusedRowsPerBlock)
      prefetch_l2(item_w + static_cast<std::int64_t>(block_column(mb.c, rb, threadIdx.x)) * f.hidden + 32 * later,
                  static_cast<unsigned>(nblocks - later) * 64u, policy);
  }
  const std::int64_t row = block_column(mb.c, rb, 16 * warp) + g;
  const std::uint16_t* w0 = item_w + row * f.hidden + 8 * t;
  const std::uint16_t* w8 = w0 + 8 * static_cast<std::int64_t>(f.hidden);
  // Two register buffers of kLoadBatch k blocks: one is loading while the other is used.
  uint4 a[kLoadBatch][2], b[kLoadBatch][2];
  auto load = [&](uint4 (&r)[kLoadBatch][2], int kb0) {
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      if (kb0 + j < nblocks) r[j][0] = load_once(w0 + (kb0 + j) * 32, policy), r[j][1] = load_once(w8 + (kb0 + j) * 32, policy);
  };
  // Both buffers load before the wait for the previous kernel (programmatic dependent
  // launch), as do the staged k blocks: the weights stream during that kernel's tail.
  load(a, staged);
  load(b, staged + kLoadBatch);
  projection_wait(f, waited);
  __syncthreads();  // the previous item is done with xs
#if defined(DSV4_HAVE_WGMMA)
  if constexpr (kWgmma) {
    stage_x_wgmma(f, 0, f.tokens, 8, slice, xs);
    __syncthreads();
    DSV4_STAMP(f, mark1);
    wgmma_pass<8>(f, out, 0, xs, ws, a, b, load);
    return;
  }
#endif
  stage_x(f, 0, f.tokens, slice, xs, ks + kXPad);  // also waits for this thread's staged weights
  __syncthreads();
  DSV4_STAMP(f, mark1);
  mma_sync_pass(f, out, xs, ws, a, b, load);
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
// then the group's values, then (16-aligned) its PoolEntry values.
__device__ __forceinline__ float* smem_vals(char* smem) { return reinterpret_cast<float*>(smem); }
__host__ __device__ constexpr std::size_t pool_vals_bytes(int vals_rows) {
  return static_cast<std::size_t>(kFusedRowsPerBlock) * (vals_rows + 1) * 4;
}
__host__ __device__ constexpr std::size_t pool_entries_offset(int group_requests, int tokens_cap) {
  return (static_cast<std::size_t>(group_requests) * 16 + static_cast<std::size_t>(group_requests + 1) * 8 +
          static_cast<std::size_t>(tokens_cap) * 4 + 15) / 16 * 16;
}
__host__ __device__ constexpr std::size_t pool_group_bytes(int group_requests, int tokens_cap) {
  return pool_entries_offset(group_requests, tokens_cap) + static_cast<std::size_t>(tokens_cap) * sizeof(PoolEntry);
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

// Stages the group's per-request values in shared memory, and from them each entry's
// PoolEntry. The plan's arrays are written once, when the plan is made, and never by a
// kernel, so this may run before the wait for the previous kernel.
__device__ Group stage_plan(const FusedStep& f, const FusedMember& mb, int group, char* smem) {
  const DevicePlan& p = mb.p;
  Group g;
  g.first = group * mb.group_requests;
  g.requests = min(mb.group_requests, p.num_requests - g.first);
  char* at = smem + pool_vals_bytes(f.vals_rows);
  g.start = reinterpret_cast<std::int64_t*>(at);
  g.slot = g.start + mb.group_requests;
  g.token_offset = reinterpret_cast<int*>(g.slot + mb.group_requests);
  g.entry_offset = g.token_offset + mb.group_requests + 1;
  g.entry_request = g.entry_offset + mb.group_requests + 1;
  for (int k = threadIdx.x; k <= g.requests; k += kFusedThreads) {
    g.token_offset[k] = static_cast<int>(p.token_offset[g.first + k]);
    g.entry_offset[k] = static_cast<int>(p.entry_offset[g.first + k]);
    if (k < g.requests) g.start[k] = p.start[g.first + k], g.slot[k] = p.slot[g.first + k];
  }
  __syncthreads();
  const int t0 = g.token_offset[0], t1 = g.token_offset[g.requests];
  g.base = t0 & ~3;
  g.stride = (((t1 + 3) & ~3) - g.base) | 1;
  auto* entries = reinterpret_cast<PoolEntry*>(at + pool_entries_offset(mb.group_requests, f.tokens_cap));
  g.entry = entries;
  const CompressorConsts& c = mb.c;
  for (int k = threadIdx.x; k < g.requests; k += kFusedThreads) {
    const std::int64_t start = g.start[k];
    const int tok0 = g.token_offset[k] - g.base;
    for (int e = g.entry_offset[k]; e < g.entry_offset[k + 1]; ++e) {
      const int el = e - g.entry_offset[0];
      g.entry_request[el] = k;
      const std::int64_t w = window_of(c, start) + (e - g.entry_offset[k]);
      PoolEntry entry{};
      entry.request = k;
      if (c.overlap) {
        // Window w completes in this step, so its last position 4w + 3 is at or after start:
        // from_vals = start - 4(w - 1) is at most 7.
        const std::int64_t p0 = (w - 1) * 4;
        entry.first = w == 0 ? 4 : 0;
        entry.from_vals = static_cast<int>(max(start - p0, std::int64_t{0}));
        entry.vals_col = tok0 + static_cast<int>(p0 - start);
        entry.ring_row = static_cast<int>(p0 & (mb.st.ring_rows - 1));
      } else {
        const std::int64_t w0 = w * c.ratio;
        entry.first = static_cast<int>(max(start - w0, std::int64_t{0}));
        entry.vals_col = tok0 + static_cast<int>(w0 - start);
      }
      entries[el] = entry;
    }
  }
  __syncthreads();
  return g;
}

// Asks L2 for the state the pool item will read (ratio 4: the stored rows of the windows that
// complete; running state: the accumulators), so that after the wait those reads hit L2
// instead of queueing in DRAM behind the next step's weight stream. A prefetch changes no
// value (L2 is where every SM's reads and writes meet), so it may run before the wait.
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
// them. Loads go out kInFlight a thread before any is stored: at decode sizes this is one
// memory round trip, not one per value.
template <class ScoreT>
__device__ void load_projected_rows(const FusedStep& f, const FusedMember& mb, int rb, const Group& g, char* smem) {
  constexpr int kInFlight = 8;
  const auto* rows = static_cast<const ScoreT*>(mb.kv.data);
  const int tokens = min(g.base + g.stride - 1, f.tokens) - g.base;  // the span's rows that exist
  const int work = kFusedRowsPerBlock * tokens;
  const bool round = mb.c.round_bf16;
  float* vals = smem_vals(smem);
  // Consecutive threads take consecutive rows of one token: runs of 16 or 32 adjacent columns.
  for (int idx0 = threadIdx.x; idx0 < work; idx0 += kInFlight * kFusedThreads) {
    float v[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int idx = idx0 + k * kFusedThreads;
      if (idx < work) {
        const int tok = idx / kFusedRowsPerBlock, row = idx % kFusedRowsPerBlock;
        v[k] = to_float(__ldcg(rows + static_cast<std::int64_t>(g.base + tok) * mb.kv.ld + block_column(mb.c, rb, row)));
      }
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int idx = idx0 + k * kFusedThreads;
      if (idx < work)
        vals[(idx % kFusedRowsPerBlock) * g.stride + idx / kFusedRowsPerBlock] = round ? num::round_to_bf16(v[k]) : v[k];
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

// Shared memory of a projection item. Steps of at most 8 tokens: x, then the staged weights;
// on mma.sync x rows of 8 tokens padded by kXPad, the weights 128-aligned after them, 4 KiB a
// k block; on wgmma (f.wgmma) from the first 1024-aligned byte (up to 1008 bytes in), x in a
// 128-byte swizzle atom of 8 rows per 64 k, then the weights in atoms of 8 KiB per 2 k blocks.
// With f.wgmma the host sizes for the larger of the two: a build without sm_90a code runs
// mma.sync on the same plan. Wider steps: the ring (kRingSlots), 1024-aligned on wgmma.
__host__ __device__ constexpr std::size_t staged_weights_offset(const FusedStep& f) {
  if (f.projected) return 0;  // the compress step stages neither x nor weights
  const std::size_t x_bytes = static_cast<std::size_t>(8) * (f.hidden / kFusedSlices + kXPad) * 2;
  return (x_bytes + 127) / 128 * 128;
}
__host__ __device__ constexpr std::size_t wgmma_x_bytes(const FusedStep& f) {
  return static_cast<std::size_t>((f.hidden / kFusedSlices + 63) / 64) * f.tokens_per_pass * 128;
}
__host__ __device__ constexpr bool uses_ring(const FusedStep& f) { return !f.projected && f.tokens_cap > 8; }
__host__ __device__ constexpr std::size_t projection_bytes(const FusedStep& f, int staged) {
  if (f.projected) return 0;
  if (uses_ring(f)) {
    const std::size_t ring = static_cast<std::size_t>(kRingSlots) * ring_slot_elems(ring_width(f.tokens_per_pass)) * 2;
    return f.wgmma ? 1024 + ring : ring;
  }
  const std::size_t mma_sync = staged_weights_offset(f) + static_cast<std::size_t>(staged) * 4096;
  const std::size_t wgmma = 1024 + wgmma_x_bytes(f) + static_cast<std::size_t>((staged + 1) / 2) * 8192;
  return f.wgmma && wgmma > mma_sync ? wgmma : mma_sync;
}
// Where a projection item's x (xs) and staged weights (ws) lie in the dynamic shared memory.
template <bool kWgmma>
__device__ __forceinline__ void projection_smem(const FusedStep& f, uint4* smem, std::uint16_t*& xs, std::uint16_t*& ws) {
#if defined(DSV4_HAVE_WGMMA)
  if constexpr (kWgmma) {
    const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    xs = reinterpret_cast<std::uint16_t*>(reinterpret_cast<char*>(smem) + ((1024 - at % 1024) % 1024));
    ws = xs + wgmma_x_bytes(f) / 2;
    return;
  }
#endif
  xs = reinterpret_cast<std::uint16_t*>(smem);
  ws = xs + staged_weights_offset(f) / 2;
}

constexpr int kBlocksPerSm = 3;  // the kernel's registers allow three blocks per SM
// The compress step's instance (no projection code) is built for more blocks per SM: its pool
// items and entries are chains of dependent memory round trips, and more of them in flight is
// what makes a large batch fast. Four is the most without spills (128 registers); measured on
// the H100 against eight (64 registers, 272 bytes of spills): Flash CSA layer decode B=64 30.1
// against 33.5 us, B=256 43.6 against 50.8, HCA B=256 26.3 against 29.0.
constexpr int kCompressBlocksPerSm = 4;

// The exit count (thread 0): a block done with the counters adds one; the last block to do so
// (its add returned gridDim.x - 1) returns them to zero for the next launch.
__device__ void reset_counters(const FusedStep& f) {
  unsigned* counters = f.counters;
  counters[kCounterTicket] = 0;
  counters[kCounterExits] = 0;
  for (int rb = 0; rb < f.row_blocks; ++rb) counters[kCounterRowBlocks + rb] = 0;
  __threadfence();
}
__device__ void leave_counters(const FusedStep& f) {
  __threadfence();  // this block's release adds are performed before it counts itself out
  if (atomicAdd(&f.counters[kCounterExits], 1u) == gridDim.x - 1) reset_counters(f);
}

// kRing: steps of more than 8 tokens, whose projection items stream through the ring
// (project_item_ring); else one 8-token tile (project_item: fewer registers and a shorter
// instruction stream on the decode path that matters most).
// kStash (steps of at most 8 tokens): pool items gather their state into shared memory right after the
// wait (stash_pool_inputs), for steps whose items all have a block from the start, so that
// the copies overlap the projection. Measured on the H100 (docs/PERF.md): Flash CSA layer
// decode B=1 15.4 -> 14.6 us; in steps with more items than blocks (B=8: pool items taken
// after the projection) it cost 1.5-2.7 us instead.
// kProject: false for the compress step (f.projected): no projection items, pool items read
// the members' kv rows.
// kWgmma (f.wgmma): projection items multiply on wgmma where the build has sm_90a code (else
// the instance runs mma.sync on the same plan). An instance of its own rather than a branch:
// both paths in one kernel spilled and slowed every step by 1-4 us (H100).
template <bool kRing, bool kStash, bool kProject, bool kWgmma>
__global__ void __launch_bounds__(kFusedThreads, kProject ? kBlocksPerSm : kCompressBlocksPerSm)
    fused_step_kernel(const __grid_constant__ FusedStep f) {
  extern __shared__ uint4 smem[];
  __shared__ int s_ticket;
  std::uint16_t *xs = nullptr, *ws = nullptr;
  projection_smem<kWgmma>(f, smem, xs, ws);
  auto* raw = reinterpret_cast<char*>(smem);
  unsigned* counters = f.counters;
  const int projection_items = kProject ? f.row_blocks * kFusedSlices * f.token_groups : 0;
  const int pool_end = projection_items + f.pool_items;
  const int items = pool_end + f.entries;
  const bool one_wave = static_cast<int>(gridDim.x) >= items;  // a block for every item: no tickets
  bool waited = false, released = false, left = false;
  int t = static_cast<int>(blockIdx.x);
#ifdef DSV4_FUSED_TIMELINE
  if (threadIdx.x == 0) {
    s_stamps = BlockStamps{};
    s_stamps.first_item = t < projection_items ? 0 : t < pool_end ? 1 : t < items ? 2 : 3;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s_stamps.sm));
  }
  DSV4_STAMP(f, start);
#endif
  while (t < items) {
    if (t < projection_items) {
      if constexpr (kProject) {
        const int per_row_block = kFusedSlices * f.token_groups, rb_global = t / per_row_block;
        const int slice = t % kFusedSlices, tok0 = t % per_row_block / kFusedSlices * f.group_tokens;
        const int m = (f.members > 1 && rb_global >= f.m[1].first_row_block) ? 1 : 0;
        const FusedMember& mb = f.m[m];
        const int rb = rb_global - mb.first_row_block;
        float* out = f.partials + (static_cast<std::int64_t>(rb_global) * kFusedSlices + slice) * kFusedRowsPerBlock * f.tokens_cap;
        if constexpr (kRing) project_item_ring<kWgmma>(f, mb, rb, slice, tok0, min(f.tokens, tok0 + f.group_tokens), out, xs, waited);
        else project_item<kWgmma>(f, mb, rb, slice, out, xs, ws, waited);
        __syncthreads();  // every thread's partial sums are written; one release publishes them
        if (threadIdx.x == 0) add_release(&counters[kCounterRowBlocks + rb_global], 1u);
      }
    } else {
      auto wait_once = [&] {
        if (!waited) {
          wait_for_previous_kernel();
          waited = true;
          DSV4_STAMP(f, waited);
        }
        if (!released) {  // every weight has an owner now: the next kernel may start loading its own
          allow_next_kernel();
          released = true;
        }
      };
      if (t < pool_end) {
        const int u = t - projection_items;
        const int m = (f.members > 1 && u >= f.m[1].first_pool_item) ? 1 : 0;
        const FusedMember& mb = f.m[m];
        const int local = u - mb.first_pool_item, rb = local / mb.groups;
        // The fused step stages the plan's values and prefetches the state into L2 before the
        // wait, while its projection items run. The compress step waits first: before the
        // wait its blocks share the memory system with the cuBLASLt GEMM's weight stream,
        // which made those loads late (a timeline put the waits' return up to 4 us after the
        // GEMM's end) and slowed the GEMM. Measured on the H100 (docs/PERF.md): Flash CSA
        // layer decode B=64 26.2 -> 22.8 us, B=256 44.1 -> 37.6, Pro B=64 33.2 -> 28.8.
        if constexpr (!kProject) wait_once();
        Group g = stage_plan(f, mb, local % mb.groups, raw);
        if constexpr (kProject) prefetch_pool_state(mb, g, rb);
        // The kStash instance (steps of at most 8 tokens whose items all have a block) pools
        // from a stash gathered while the projection runs (stash_pool_inputs).
        char* stash = raw + pool_stash_offset(f, mb.group_requests);
        if (kStash) stage_pool_ape(mb, rb, reinterpret_cast<float*>(stash + 8 * kStashRequestBytes));
        wait_once();
        if (kStash) {
          stash_pool_inputs(mb, g, rb, stash);
          g.stash = stash;
          g.ape4 = reinterpret_cast<const float*>(stash + 8 * kStashRequestBytes);
        }
        pool_item<kStash, kProject>(f, m, mb.first_row_block + rb, rb, g, raw);
      } else {
        const int u = t - pool_end;
        const int m = (f.members > 1 && u >= f.m[1].first_entry) ? 1 : 0;
        const FusedMember& mb = f.m[m];
        const int e = u - mb.first_entry;
        // Plan values and weights only (never written by a kernel): before the wait.
        const EntryInputs in = load_entry_inputs(mb.c, mb.p, mb.cache != nullptr, e);
        wait_once();
        // With a block for every item no ticket follows, and an entry reads no counter, so
        // this block is done with the counters: it counts itself out now, and the add's round
        // trip overlaps the wait for the pooled values and the epilogue (its result is looked
        // at after them). It cannot be the last out while a pool item runs.
        unsigned exit_count = 0;
        if (one_wave && threadIdx.x == 0) exit_count = atomicAdd(&counters[kCounterExits], 1u);
        left = one_wave;
        const PooledValues pooled = load_pooled(mb.c, mb.pooled, e, true);
        DSV4_STAMP(f, mark1);
        float* v = smem_vals(raw);
        finish_entry(mb.c, in, pooled, mb.cache, mb.entries, e, v, v + kFinishMaxHeadDim, [&](int phase) {
          if (phase == 2) DSV4_STAMP(f, mark2);
          else DSV4_STAMP(f, mark3);
        });
        if (one_wave && threadIdx.x == 0 && exit_count == gridDim.x - 1) reset_counters(f);
      }
    }
    __syncthreads();
    DSV4_STAMP(f, first_end);
    if (one_wave) break;  // no ticket to take
    if (f.fixed_order) {
      t += static_cast<int>(gridDim.x);
      continue;
    }
    if (threadIdx.x == 0) s_ticket = static_cast<int>(gridDim.x + atomicAdd(&counters[kCounterTicket], 1u));
    __syncthreads();
    t = s_ticket;
  }
  if (!waited) wait_for_previous_kernel();
  __syncthreads();
  DSV4_STAMP(f, exit);
#ifdef DSV4_FUSED_TIMELINE
  if (threadIdx.x == 0) static_cast<BlockStamps*>(f.timeline)[blockIdx.x] = s_stamps;
#endif
  if (threadIdx.x == 0 && !left) leave_counters(f);
}

// The kernel instance for a step: the compress step's; else the ring for steps of more than 8
// tokens, one 8-token tile for the others, each on wgmma or mma.sync as f.wgmma says.
using FusedKernel = void (*)(FusedStep);
FusedKernel kernel_for(const FusedStep& f) {
  if (f.projected) return fused_step_kernel<false, false, false, false>;
  if (f.wgmma) {
    if (uses_ring(f)) return fused_step_kernel<true, false, true, true>;
    return f.stash ? fused_step_kernel<false, true, true, true> : fused_step_kernel<false, false, true, true>;
  }
  if (uses_ring(f)) return fused_step_kernel<true, false, true, false>;
  return f.stash ? fused_step_kernel<false, true, true, false> : fused_step_kernel<false, false, true, false>;
}

std::size_t shared_bytes(const FusedStep& f) {
  int group_requests = 0;
  for (int m = 0; m < f.members; ++m) group_requests = std::max(group_requests, f.m[m].group_requests);
  const std::size_t pool_bytes = f.stash ? pool_stash_offset(f, group_requests) + kStashBytes
                                        : pool_vals_bytes(f.vals_rows) + pool_group_bytes(group_requests, f.tokens_cap);
  const std::size_t finish_bytes = (kFinishMaxHeadDim + 32) * 4;
  return std::max({projection_bytes(f, f.staged_kblocks), pool_bytes, finish_bytes});
}

#ifdef DSV4_FUSED_TIMELINE
struct TimelineRegistry {
  std::mutex mutex;
  std::vector<std::pair<BlockStamps*, int>> records;  // one per plan, in creation order
  std::vector<int> staged;                            // each plan's staged_kblocks
};
TimelineRegistry& timeline_registry() {
  static TimelineRegistry* r = new TimelineRegistry;  // outlives the atexit handler
  return *r;
}
void write_timeline() {
  const char* path = std::getenv("DSV4_FUSED_TIMELINE_CSV");
  if (!path) return;
  FILE* out = std::fopen(path, "w");
  if (!out) return;
  std::fprintf(out, "plan,staged_kblocks,block,sm,first_item,start,waited,mark1,mark2,mark3,first_end,exit\n");
  auto& r = timeline_registry();
  for (std::size_t p = 0; p < r.records.size(); ++p) {
    std::vector<BlockStamps> host(static_cast<std::size_t>(r.records[p].second));
    if (cudaMemcpy(host.data(), r.records[p].first, host.size() * sizeof(BlockStamps), cudaMemcpyDeviceToHost) != cudaSuccess) break;
    for (std::size_t b = 0; b < host.size(); ++b)
      std::fprintf(out, "%zu,%d,%zu,%d,%d,%llu,%llu,%llu,%llu,%llu,%llu,%llu\n", p, r.staged[p], b, host[b].sm,
                   host[b].first_item, host[b].start, host[b].waited, host[b].mark1, host[b].mark2, host[b].mark3,
                   host[b].first_end, host[b].exit);
  }
  std::fclose(out);
}
void attach_timeline(FusedStep& f, int blocks) {
  auto& r = timeline_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.records.empty()) std::atexit(write_timeline);
  void* p = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&p, static_cast<std::size_t>(blocks) * sizeof(BlockStamps)));
  DSV4_CUDA_CHECK(cudaMemset(p, 0, static_cast<std::size_t>(blocks) * sizeof(BlockStamps)));
  r.records.emplace_back(static_cast<BlockStamps*>(p), blocks);
  r.staged.push_back(f.staged_kblocks);
  f.timeline = p;
}
#endif

// Whether the code loaded for the current device was built for sm_90a (wgmma); a build for
// sm_90 without its features runs the mma.sync path of every projection item.
__global__ void report_wgmma_code(int* has) {
#if defined(DSV4_HAVE_WGMMA)
  *has = 1;
#else
  *has = 0;
#endif
}

// report_wgmma_code's answer per device, asked once (a launch and a copy back): plans and the
// automatic choice read it afterwards without touching the device.
bool wgmma_code_loaded(int device) {
  static std::mutex lock;
  static std::map<int, bool> known;
  const std::lock_guard<std::mutex> hold(lock);
  if (const auto it = known.find(device); it != known.end()) return it->second;
  const DeviceGuard guard(device);
  int* flag = nullptr;
  int has = 0;
  DSV4_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
  report_wgmma_code<<<1, 1>>>(flag);
  const cudaError_t launched = cudaGetLastError();
  const cudaError_t copied = cudaMemcpy(&has, flag, sizeof has, cudaMemcpyDeviceToHost);
  cudaFree(flag);
  DSV4_CUDA_CHECK(launched);
  DSV4_CUDA_CHECK(copied);
  return known[device] = has == 1;
}

// The dynamic shared memory a block may take with kBlocksPerSm blocks an SM: static shared
// memory is the same in every instance of the kernel.
std::int64_t block_shared_budget(int device) {
  int sm_bytes = 0, reserved = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  cudaFuncAttributes attributes{};
  DSV4_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fused_step_kernel<false, false, true, false>));
  return sm_bytes / kBlocksPerSm - reserved - static_cast<std::int64_t>(attributes.sharedSizeBytes);
}

}  // namespace

bool fused_multiplies_on_wgmma(int device, std::int64_t hidden) {
  // wgmma (sm_90a) where a step of 8 tokens keeps every k block of its items in shared memory
  // (Flash), mma.sync elsewhere: measured on the H100 (docs/PERF.md), wgmma with part of the
  // weights fed from registers (Pro) was slower, since an async multiply holds its registers
  // until it is done and the next loads wait for it.
  int major = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9 || hidden % (kFusedSlices * 32) != 0 || !wgmma_code_loaded(device)) return false;
  FusedStep one;
  one.hidden = static_cast<int>(hidden);
  one.tokens_per_pass = 8;
  one.wgmma = true;
  const int ks = one.hidden / kFusedSlices;
  return static_cast<std::int64_t>(projection_bytes(one, ks / 32)) <= block_shared_budget(device);
}

bool fused_shape_supported(int head_dim, std::int64_t hidden) {
  return hidden % (kFusedSlices * 32) == 0 && head_dim % 32 == 0 && head_dim <= kFinishMaxHeadDim;
}

std::size_t fused_counter_count(const FusedStep& f) { return kCounterRowBlocks + static_cast<std::size_t>(f.row_blocks); }

std::size_t fused_partial_floats(const FusedStep& f) {
  if (f.projected) return 0;
  return static_cast<std::size_t>(f.row_blocks) * kFusedSlices * kFusedRowsPerBlock * static_cast<std::size_t>(f.tokens_cap);
}

int fused_prepare_launch(FusedStep& f, int device) {
  // Pool items: a row block's channels for a group of requests. Pooling is bound by the
  // latency of its instructions, so the batch is cut into as many groups as the grid has
  // blocks for (at most 32 or 16 requests a group, at least one), and no more: a pool item
  // left for a second wave delays every entry of its member by a whole item. In a step of
  // one projection pass (at most 8 tokens) those are the blocks beside the projection
  // items: a pool item taken after one starts only when it ends (Flash CSA layer decode
  // B=8 19.0 -> 15.5 us on the H100). With several passes the projection items end late
  // anyway, and groups sized to the whole grid (its blocks taken again after the
  // projection) measured faster (forced fused step, B=32 27.9 against 32.7 us). Where the
  // entries are fewer than half those blocks, the groups leave them a block each too.
  int sms = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Token groups (steps of more than 8 tokens): a narrow projection (the CSA indexer's 8 row
  // blocks, HCA's 16) has fewer items than the grid has blocks, and each item's multiply grows
  // with its tokens; cutting the tokens into groups, one item each, brings idle blocks in, and
  // the items of one (row block, slice) read its weights side by side, the later readers from
  // L2. Groups of at most kGroupMostTokens (wgmma) or kGroupMostTokensMmaSync tokens, no more
  // items than the grid has blocks. A token's sums do not depend on its group. Measured on the
  // H100 against one group (fused step forced, docs/PERF.md): Flash CSA indexer decode B=128
  // 17.2 -> 14.4 us, B=256 29.7 -> 19.7; Pro indexer B=256 83.7 -> 34.9; Pro HCA B=64 29.9 ->
  // 25.5, B=256 90.2 -> 58.2; more items than that put pool items out of the first wave
  // (Flash indexer B=64, four groups: 11.9 -> 15.7); three groups of 86 tokens padded to 128
  // lost to two of 128 (Flash HCA B=256 30.6 against 28.4).
  // The multiply's instructions depend on the shape, the device and the build only, so a
  // token's bits are the same in every fused step of a compressor.
  f.wgmma = !f.projected && fused_multiplies_on_wgmma(device, f.hidden);
  f.token_groups = 1;
  f.group_tokens = f.tokens_cap;
  if (!f.projected && f.tokens_cap > 8) {
    const int tiles = f.tokens_cap / 8, base_items = f.row_blocks * kFusedSlices;
    const int most = f.wgmma ? kGroupMostTokens : kGroupMostTokensMmaSync;
    const int groups = std::min((f.tokens_cap + most - 1) / most, std::max(1, kBlocksPerSm * sms / base_items));
    // On wgmma a pass multiplies ring_width(n) tokens: a group fills its width.
    int group_tiles = (tiles + groups - 1) / groups;
    if (f.wgmma) group_tiles = ring_width(8 * group_tiles) / 8;
    f.group_tokens = 8 * group_tiles;
    f.token_groups = (tiles + group_tiles - 1) / group_tiles;
  }
  const int projection_items = f.projected ? 0 : f.row_blocks * kFusedSlices * f.token_groups;
  const int beside_projection = f.tokens_cap <= 8 ? projection_items : 0;
  const int target_items = std::max(1, (f.projected ? kCompressBlocksPerSm : kBlocksPerSm) * sms - beside_projection);
  const int pool_target = f.entries < target_items / 2 ? target_items - f.entries : target_items;
  const int most_groups = std::max(1, pool_target / std::max(1, f.row_blocks));
  // Wider fused steps: groups whose (entry, channel) pairs fit one round of the block's
  // threads, where those groups' pool items still fit the grid. Pooling is a chain of
  // dependent loads a pair, and a second round doubled it: Flash CSA layer decode B=64, groups
  // of 11 requests (176 pairs on 128 threads) 26.7 us, of 8 (128 pairs) 24.1; with 512 pool
  // items for 396 blocks (HCA and CSA main at B=128) 4 and 2.7 us slower (H100, docs/PERF.md).
  auto group_size = [&](const FusedMember& mb, bool one_round) {
    const int most = 512 / channels_per_block(mb.c.overlap), n = mb.p.num_requests;
    int size = std::max(1, std::min(most, (n + most_groups - 1) / most_groups));
    if (one_round && mb.p.num_entries > 0) {
      const std::int64_t per_round = std::max(1, kFusedThreads / channels_per_block(mb.c.overlap));
      size = static_cast<int>(std::min<std::int64_t>(size, std::max<std::int64_t>(1, per_round * n / mb.p.num_entries)));
    }
    return size;
  };
  int one_round_items = 0;
  for (int k = 0; k < f.members; ++k) {
    const int size = group_size(f.m[k], true);
    one_round_items += f.m[k].row_blocks * ((f.m[k].p.num_requests + size - 1) / size);
  }
  const bool one_round = !f.projected && f.tokens_cap > 8 && one_round_items <= target_items;
  f.pool_items = 0;
  f.vals_rows = 0;
  for (int k = 0; k < f.members; ++k) {
    FusedMember& mb = f.m[k];
    const int n = mb.p.num_requests;
    mb.group_requests = group_size(mb, one_round);
    mb.groups = std::max(1, (n + mb.group_requests - 1) / mb.group_requests);
    mb.first_pool_item = f.pool_items;
    f.pool_items += mb.row_blocks * mb.groups;
    // A group's rows of x, from its first token rounded down to 4 to its last rounded up.
    const std::int64_t span = static_cast<std::int64_t>(mb.group_requests) * mb.p.max_request_tokens + 6;
    f.vals_rows = std::max(f.vals_rows, static_cast<int>(std::min<std::int64_t>(f.tokens_cap, span)));
  }
  int optin = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};  // static shared memory: the same in every instance
  DSV4_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fused_step_kernel<false, false, true, false>));
  const std::int64_t budget = block_shared_budget(device);
  const int ks = f.hidden / kFusedSlices;
  // Tokens per pass. The compress step projects nothing: the one-tile instance, with nothing
  // staged. Steps of at most 8 tokens: one tile. Wider steps stream their weights with x
  // through the ring, up to kRingMaxTokens a pass on wgmma, kMmaRingMaxTokens on mma.sync,
  // and no more than a token group.
  if (f.projected || f.tokens_cap <= 8) f.tokens_per_pass = 8;
  else f.tokens_per_pass = std::min(f.wgmma ? kRingMaxTokens : kMmaRingMaxTokens, f.group_tokens);
  // Pool items gather their state ahead of the slices where every item has a block from the
  // start (fused_step_kernel's kStash) and a group holds at most kStashMostRequests requests.
  // Judged against three blocks per SM, which the staged-weights budget below keeps; were
  // the grid smaller, the stash stays correct and only its timing advantage is lost.
  const int items = projection_items + f.pool_items + f.entries;
  int largest_group = 0;
  for (int k = 0; k < f.members; ++k) largest_group = std::max(largest_group, f.m[k].group_requests);
  f.stash = !f.projected && f.tokens_cap <= 8 && items <= kBlocksPerSm * sms && largest_group <= kStashMostRequests;
  // As many k blocks of each projection item's weights in shared memory as leave room for
  // three blocks per SM: all of them for Flash steps of up to 8 tokens, 15 of 28 for Pro. The
  // ring stages none across passes (a ring of 128-token passes leaves room for two blocks).
  const FusedKernel kernel = kernel_for(f);
  f.staged_kblocks = f.projected || uses_ring(f) ? 0 : ks / 32;
  while (f.staged_kblocks > 0 && static_cast<std::int64_t>(projection_bytes(f, f.staged_kblocks)) > budget)
    f.staged_kblocks -= f.wgmma ? 2 - f.staged_kblocks % 2 : 1;  // wgmma: 2 k blocks an atom
  // Plans of different shapes may be launched in any order: allow the most any plan may ask.
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       optin - static_cast<int>(attributes.sharedSizeBytes)));
  // The kernel barely uses L1 (weights and partials bypass it): give shared memory the most.
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       cudaSharedmemCarveoutMaxShared));
  int per_sm = 0;
  for (;;) {
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFusedThreads, shared_bytes(f)));
    if (per_sm >= kBlocksPerSm || f.staged_kblocks == 0) break;
    --f.staged_kblocks;
  }
  const int blocks = std::max(1, std::min(items, std::max(1, per_sm) * sms));
  // Ring steps on wgmma whose every projection item is a block's first, at three blocks an SM
  // (passes of at most 64 tokens), take their later items in a fixed order: block b's are
  // b + k gridDim.x. Measured on the H100 against tickets (fused step forced, docs/PERF.md):
  // Flash CSA layer decode B=32 19.2 -> 18.0 us, B=64 22.0 -> 21.0, no window B=32 15.2 ->
  // 14.4, HCA B=64 14.6 -> 14.0. Not the tickets' round trip: tickets asked for as an item
  // starts measured as tickets do. With two blocks an SM (passes of 128 tokens) the fixed order
  // lost (Flash CSA layer B=256 70.3 -> 72.8), and on mma.sync (Pro) it lost in the wide steps
  // (CSA layer B=256 123 -> 130.5, CSA main B=64 37.7 -> 39.9): those keep tickets.
  f.fixed_order = uses_ring(f) && f.wgmma && projection_items <= blocks && per_sm >= kBlocksPerSm;
#ifdef DSV4_FUSED_TIMELINE
  attach_timeline(f, blocks);
#endif
  return blocks;
}

void launch_fused_step(const FusedStep& f, int blocks, bool pdl, cudaStream_t stream) {
  launch_kernel(kernel_for(f), dim3(static_cast<unsigned>(blocks)), dim3(kFusedThreads), shared_bytes(f), stream, pdl, f);
}

}  // namespace dsv4::cuda
