// Part of the fused decode step (fused_step.cu, which alone includes it; its names live in
// that file's anonymous namespace): what its projection, pool and entry items share, the
// diagnostics stamps, the counters and the map from a row block's rows to kv_score columns.
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"
#include "cuda/fused_step.hpp"

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
// items: the state is updated; entry: its stores are issued. staged: pool items only, the
// group's plan values and PoolEntry values are in shared memory (in the compress step this
// splits the time from the wait to the loaded rows into the plan's part and the rows' part).
struct BlockStamps {
  unsigned long long start, waited, staged, mark1, mark2, mark3, first_end, exit;
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

}  // namespace

}  // namespace dsv4::cuda
