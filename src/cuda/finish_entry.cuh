// The epilogue of one completed window, shared by finish_entries and the fused decode step:
// RMSNorm of the bf16-rounded pooled values, RoPE, Walsh-Hadamard rotation, fp8 packing and the
// store into the caller's cache row (and the bf16 entry, when asked for). Run by a whole block
// of Threads threads: kFinishThreads for finish_entries and the fused step, whose blocks do
// other work too; the running step gives a request's channels a thread each (kRunningThreads).
#pragma once

#include "core/rope.hpp"
#include "cuda/device_utils.cuh"
#include "cuda/kernels.hpp"

namespace dsv4::cuda {

constexpr int kFinishThreads = 128;
constexpr int kFinishMaxHeadDim = 1024;

// Channels a thread holds at most: thread t holds channels t + Threads * k.
template <int Threads>
constexpr int kPerThreadOf = kFinishMaxHeadDim / Threads;
constexpr int kFinishPerThread = kPerThreadOf<kFinishThreads>;

// What an entry's epilogue reads from global memory besides its pooled values: loaded first
// (in the fused step, before waiting for the pooling), so that these loads overlap.
template <int Threads>
struct EntryInputsOf {
  float weight[kPerThreadOf<Threads>];  // norm weights of this thread's channels
  float cos0, sin0;                // RoPE of pair threadIdx.x (its angle needs only the plan)
  std::int64_t location;           // cache row
  std::int64_t w;                  // window
};
using EntryInputs = EntryInputsOf<kFinishThreads>;

template <int Threads = kFinishThreads>
__device__ __forceinline__ EntryInputsOf<Threads> load_entry_inputs(const CompressorConsts& c, const DevicePlan& p,
                                                                    bool cache, std::int64_t e) {
  EntryInputsOf<Threads> in;
#pragma unroll
  for (int k = 0; k < kPerThreadOf<Threads>; ++k) {
    const int d = threadIdx.x + k * Threads;
    in.weight[k] = d < c.head_dim ? c.norm[d] : 0.0f;
  }
  in.location = cache ? p.cache_location[e] : 0;
  const int i = request_of(p, e);
  in.w = window_of(c, p.start[i]) + (e - p.entry_offset[i]);
  // The angle is the window's first position times the pair's frequency: known before the
  // pooled values are, so the fp64 sincos runs off the epilogue's critical path.
  in.cos0 = 1.0f, in.sin0 = 0.0f;
  if (static_cast<int>(threadIdx.x) < c.rope_dim / 2) rope_cos_sin(in.w * c.ratio, c.inv_freq[threadIdx.x], &in.cos0, &in.sin0);
  return in;
}

// An entry's pooled values, channel threadIdx.x + k * Threads in v[k], as load_pooled hands
// them to finish_entry.
template <int Threads>
struct PooledValuesOf {
  float v[kPerThreadOf<Threads>];
};
using PooledValues = PooledValuesOf<kFinishThreads>;

// Reads entry e's pooled values and gives their slots back: each slot holds kPooledPending
// again for the next step that pools into it (pooled_for_store never writes that mark). With
// `wait`, the values come from pool items of the same kernel, and the block reads until no
// slot it needs holds the mark: the values are the hand-off, no counter and no fence lie
// between the stores and this read. Without, they were written by an earlier kernel.
__device__ __forceinline__ PooledValues load_pooled(const CompressorConsts& c, float* pooled, std::int64_t e, bool wait) {
  const int hd = c.head_dim;
  float* row = pooled + e * hd;
  PooledValues p;
#pragma unroll
  for (int k = 0; k < kFinishPerThread; ++k) {
    const int d = threadIdx.x + k * kFinishThreads;
    p.v[k] = d < hd ? load_relaxed(row + d) : 0.0f;
  }
  if (wait) {
    for (;;) {
      bool missing = false;
#pragma unroll
      for (int k = 0; k < kFinishPerThread; ++k) missing |= __float_as_uint(p.v[k]) == kPooledPending;
      if (!__syncthreads_or(missing)) break;
      if (!missing) continue;
      __nanosleep(32);
#pragma unroll
      for (int k = 0; k < kFinishPerThread; ++k) {
        const int d = threadIdx.x + k * kFinishThreads;
        if (__float_as_uint(p.v[k]) == kPooledPending) p.v[k] = load_relaxed(row + d);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kFinishPerThread; ++k) {
    const int d = threadIdx.x + k * kFinishThreads;
    if (d < hd) row[d] = __uint_as_float(kPooledPending);
  }
  return p;
}

// No marks: finish_entries. The fused step's timeline build passes one that stamps the phases.
struct NoEntryMarks {
  __device__ void operator()(int) const {}
};

// `v` is kFinishMaxHeadDim floats and `scratch` 32 floats of shared memory; `pooled` comes
// from load_pooled. `mark(2)` runs once the values are normed, roped and rotated, `mark(3)`
// once the stores are issued.
template <int Threads, class Marks = NoEntryMarks>
__device__ __forceinline__ void finish_entry(const CompressorConsts& c, const EntryInputsOf<Threads>& in,
                                             const PooledValuesOf<Threads>& pooled, std::uint8_t* cache,
                                             std::uint16_t* entries, std::int64_t e, float* v, float* scratch,
                                             const Marks& mark = {}) {
  constexpr int kPerThread = kPerThreadOf<Threads>;
  const int hd = c.head_dim;
  float acc[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) acc[k] = pooled.v[k];
  const float* weight = in.weight;
  const std::int64_t location = in.location, w = in.w;

  // RMSNorm of the bf16-rounded pooled values. The sum of squares runs in one order for every
  // Threads, kFinishThreads's: thread t sums channels t + kFinishThreads k over k, then warps,
  // then the warps' sums in order. So every path that finishes an entry gives the same bits.
  static_assert(Threads % kFinishThreads == 0);
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int d = threadIdx.x + k * Threads;
    if (d < hd) {
      acc[k] = num::round_to_bf16(acc[k]);
      if constexpr (Threads == kFinishThreads) sq = __fmaf_rn(acc[k], acc[k], sq);
    }
  }
  if constexpr (Threads != kFinishThreads) {  // the first kFinishThreads threads sum, from v
    __syncthreads();  // v may still be read by the stores of the block's previous entry
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int d = threadIdx.x + k * Threads;
      if (d < hd) v[d] = acc[k];
    }
    __syncthreads();
    if (threadIdx.x < kFinishThreads)
#pragma unroll
      for (int k = 0; k < kFinishPerThread; ++k) {
        const int d = threadIdx.x + k * kFinishThreads;
        if (d < hd) sq = __fmaf_rn(v[d], v[d], sq);
      }
  }
  // The warps past kFinishThreads add zeros: the same total.
  const float inv_rms = 1.0f / sqrtf(block_sum(sq, scratch) / static_cast<float>(hd) + c.eps);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int d = threadIdx.x + k * Threads;
    if (d < hd) v[d] = num::round_to_bf16(acc[k] * inv_rms * weight[k]);
  }
  __syncthreads();

  // RoPE on the last rope_dim dims, interleaved pairs; the window's first token is its position.
  const int nope = hd - c.rope_dim;
  for (int r = threadIdx.x; r < c.rope_dim / 2; r += Threads) {
    float cs = in.cos0, sn = in.sin0;
    if (r != static_cast<int>(threadIdx.x)) rope_cos_sin(w * c.ratio, c.inv_freq[r], &cs, &sn);
    const float a = v[nope + 2 * r], b = v[nope + 2 * r + 1];
    v[nope + 2 * r] = num::round_to_bf16(a * cs - b * sn);
    v[nope + 2 * r + 1] = num::round_to_bf16(a * sn + b * cs);
  }
  __syncthreads();

  if (c.rotate) {
    // Walsh-Hadamard butterflies: in stage h the pair (j, j + h), bit h of j clear, becomes
    // (a + b, a - b), stages in increasing h: the CPU's pairs in the CPU's order, so the same
    // bits. Thread t holds dims t + Threads k: a partner less than 32 away is in its
    // warp (a shuffle), 32 to Threads / 2 away in another warp (shared memory), Threads or
    // more away in its own registers. A block barrier and an index division every stage made the
    // rotation the longest part of the fused step's last phase (docs/PERF.md).
    float x[kPerThread];
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int d = threadIdx.x + k * Threads;
      x[k] = d < hd ? v[d] : 0.0f;
    }
    for (int h = 1; h < 32 && h < hd; h *= 2)
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const float p = __shfl_xor_sync(0xffffffffu, x[k], h);
        x[k] = (lane & h) ? p - x[k] : x[k] + p;
      }
    for (int h = 32; h < Threads && h < hd; h *= 2) {
      __syncthreads();  // v is read by every thread (the load above, or the last exchange)
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int d = threadIdx.x + k * Threads;
        if (d < hd) v[d] = x[k];
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int d = threadIdx.x + k * Threads;
        if (d < hd) {
          const float p = v[d ^ h];
          x[k] = (threadIdx.x & h) ? p - x[k] : x[k] + p;
        }
      }
    }
#pragma unroll
    for (int m = 1; m < kPerThread; m *= 2) {  // unrolled: x stays in registers
      if (m * Threads >= hd) break;
#pragma unroll
      for (int k = 0; k < kPerThread; ++k)
        if ((k & m) == 0) {
          const float a = x[k], b = x[k | m];
          x[k] = a + b;
          x[k | m] = a - b;
        }
    }
    const float scale = 1.0f / sqrtf(static_cast<float>(hd));
    __syncthreads();  // every thread is done reading v
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int d = threadIdx.x + k * Threads;
      if (d < hd) v[d] = num::round_to_bf16(x[k] * scale);
    }
    __syncthreads();
  }
  mark(2);

  if (entries)
    for (int d = threadIdx.x; d < hd; d += Threads) entries[e * hd + d] = num::bf16_from_f32(v[d]);
  if (!cache) return;
  std::uint8_t* row = cache + location * c.entry_bytes;
  if (!c.fp8) {
    auto* dst = reinterpret_cast<std::uint16_t*>(row);
    for (int d = threadIdx.x; d < hd; d += Threads) dst[d] = num::bf16_from_f32(v[d]);
    for (std::int64_t b = 2 * hd + threadIdx.x; b < c.entry_bytes; b += Threads) row[b] = 0;
    mark(3);
    return;
  }
  // fp8 blocks of 64 dims: one half-warp per block, four dims per lane, so that the 7 blocks
  // of a 512-wide entry take one round of the block's threads (one warp a block took two).
  // The block's amax is the largest |value| that is not NaN (NaN only if all are) in any order.
  const int half = threadIdx.x >> 4, hl = threadIdx.x & 15;
  const unsigned half_mask = 0xffffu << (threadIdx.x & 16);
  const int blocks = nope / 64;
  const std::int64_t scale_offset = nope + 2 * c.rope_dim;
  for (int b = half; b < blocks; b += Threads / 16) {
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = v[b * 64 + hl + 16 * i];
    float amax = fmaxf(fmaxf(fabsf(x[0]), fabsf(x[1])), fmaxf(fabsf(x[2]), fabsf(x[3])));
    for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(half_mask, amax, o));
    const int exponent = num::fp8_scale_exponent(amax);
    const float inv_scale = num::exp2_int(-exponent);
#pragma unroll
    for (int i = 0; i < 4; ++i) row[b * 64 + hl + 16 * i] = num::e4m3_from_f32(x[i] * inv_scale);
    if (hl == 0) row[scale_offset + b] = num::ue8m0_from_exponent(exponent);
  }
  auto* rope_dst = reinterpret_cast<std::uint16_t*>(row + nope);
  for (int d = threadIdx.x; d < c.rope_dim; d += Threads) rope_dst[d] = num::bf16_from_f32(v[nope + d]);
  for (std::int64_t b = scale_offset + blocks + threadIdx.x; b < c.entry_bytes; b += Threads) row[b] = 0;
  mark(3);
}

}  // namespace dsv4::cuda
