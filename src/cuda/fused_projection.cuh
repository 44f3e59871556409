// Part of the fused decode step (fused_step.cu, which alone includes it; its names live in
// that file's anonymous namespace): the projection items. One item multiplies 64 weight rows
// x one slice of hidden with the step's x on tensor cores (mma.sync, or wgmma on sm_90a) and
// writes fp32 partial sums; steps of at most 8 tokens stage the weights whole, wider ones
// stream them with x through a ring of shared-memory slots. Also the items' shared-memory layout.
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"
#include "cuda/fused_common.cuh"
#include "cuda/fused_step.hpp"
#include "cuda/wgmma.cuh"

namespace dsv4::cuda {

namespace {

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
    wgmma_atom<kSubs, kSubW>(d, slot, slot + kFusedRowsPerBlock * 64, steps);
  }
  wgmma_drain(d);
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

}  // namespace

}  // namespace dsv4::cuda
