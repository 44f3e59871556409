// The fused decode step (see fused_step.hpp). A persistent kernel works through tickets in
// order: first the projection items (a row block of 64 weight rows x one slice of hidden),
// then one item per completed entry.
//  - A projection item streams its 64 x hidden/8 weights once, multiplies them with the step's
//    x (staged in shared memory) on tensor cores and writes fp32 partial sums.
//  - The block that finishes the last slice of a row block adds the 8 partials in slice order
//    (kv_score of 16 or 32 channels, on chip), pools those channels of every completed window,
//    then updates those channels of the state. A row block holds, for its channels, every
//    column the pooling needs (ratio 4: kv and score of both channel halves; else kv, score).
//  - An entry item waits until every row block of its compressor is pooled, then runs the
//    epilogue (norm, RoPE, rotation, fp8, store) shared with finish_entries.
// Tickets are taken in order and projection items never wait, so when any block waits for a
// row block, every projection item has a running owner: no deadlock, whatever the residency.
// The counters return to zero at the end of every launch (the last block out resets them),
// so a captured graph can replay the step.
#include <algorithm>

#include "cuda/device_utils.cuh"
#include "cuda/finish_entry.cuh"
#include "cuda/fused_step.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kWarps = kFusedThreads / 32;
constexpr int kMaxTiles = 8;   // 8-token tiles per pass: at most 64 tokens per pass
constexpr int kLoadBatch = 4;  // 32-wide k blocks per register buffer: 4 KB per warp, two buffers
// Padding of a staged x row: 64 bytes, so that a row is 64 bytes past a multiple of 128 and
// the 8 lanes of each phase of a 16-byte shared load (2 tokens x 4 k offsets) hit distinct banks.
constexpr int kXPad = 32;
constexpr int kCounterTicket = 0, kCounterExits = 1, kCounterMemberDone = 2,
              kCounterRowBlocks = 2 + kFusedMaxMembers;

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
__device__ __forceinline__ int block_row(const CompressorConsts& c, int rb, std::int64_t col) {
  const int ch = channels_per_block(c.overlap);
  return static_cast<int>(col / c.head_dim) * ch + static_cast<int>(col % c.head_dim) - rb * ch;
}

__device__ __forceinline__ float state_value(const StateView& st, const char* slot, std::int64_t index) {
  if (st.dtype == DType::f32) return __ldcg(reinterpret_cast<const float*>(slot) + index);
  return num::f32_from_bf16(__ldcg(reinterpret_cast<const unsigned short*>(slot) + index));
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

// One projection item: rows of row block `rb` of member `mb`, hidden slice `slice`, every
// token; fp32 partial sums to out[64][tokens_cap]. In a 32-wide k block, lane (g, t) holds
// k 8t..8t+7 of weight rows g and g+8 and of token g; the two mma instructions take k
// 8t..8t+3 and 8t+4..8t+7. A and B use the same k order, so this is the plain dot product in
// an order fixed by the slice alone.
__device__ void project_item(const FusedStep& f, const FusedMember& mb, int rb, int slice, float* out,
                             std::uint16_t* xs, bool& waited) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ks = f.hidden / kFusedSlices, nblocks = ks / 32, stride = ks + kXPad;
  const std::int64_t row = block_column(mb.c, rb, 16 * warp) + g;
  const std::uint16_t* w0 = mb.w + row * f.hidden + slice * ks + 8 * t;
  const std::uint16_t* w8 = w0 + 8 * static_cast<std::int64_t>(f.hidden);
  for (int pass0 = 0; pass0 < f.tokens; pass0 += f.tokens_per_pass) {
    const int n = min(f.tokens_per_pass, f.tokens - pass0), tiles = (n + 7) / 8;
    // Two register buffers of kLoadBatch k blocks: one is loading while the other is used.
    uint4 a[kLoadBatch][2], b[kLoadBatch][2];
    auto load = [&](uint4 (&r)[kLoadBatch][2], int kb0) {
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j)
        if (kb0 + j < nblocks) r[j][0] = load_once(w0 + (kb0 + j) * 32), r[j][1] = load_once(w8 + (kb0 + j) * 32);
    };
    float acc[kMaxTiles][4] = {};
    auto multiply = [&](const uint4 (&r)[kLoadBatch][2], int kb0) {
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        if (kb0 + j < nblocks) {
          const std::uint16_t* xk = xs + g * stride + (kb0 + j) * 32 + 8 * t;
#pragma unroll
          for (int tile = 0; tile < kMaxTiles; ++tile) {
            if (tile < tiles) {
              const uint4 x = *reinterpret_cast<const uint4*>(xk + tile * 8 * stride);
              mma_bf16_16x8x16(acc[tile], r[j][0].x, r[j][1].x, r[j][0].y, r[j][1].y, x.x, x.y);
              mma_bf16_16x8x16(acc[tile], r[j][0].z, r[j][1].z, r[j][0].w, r[j][1].w, x.z, x.w);
            }
          }
        }
      }
    };
    load(a, 0);
    if (!waited) {  // weights never change; x, state and counters may come from the kernel before
      wait_for_previous_kernel();
      waited = true;
    }
    __syncthreads();  // the previous pass or item is done with xs
    stage_x(f, pass0, n, slice, xs, stride);
    __syncthreads();
    for (int kb0 = 0; kb0 < nblocks; kb0 += 2 * kLoadBatch) {
      if (kb0 + kLoadBatch < nblocks) load(b, kb0 + kLoadBatch);
      multiply(a, kb0);
      if (kb0 + 2 * kLoadBatch < nblocks) load(a, kb0 + 2 * kLoadBatch);
      if (kb0 + kLoadBatch < nblocks) multiply(b, kb0 + kLoadBatch);
    }
#pragma unroll
    for (int tile = 0; tile < kMaxTiles; ++tile) {
      if (tile >= tiles) continue;
      float* o = out + static_cast<std::int64_t>(16 * warp + g) * f.tokens_cap + pass0 + tile * 8 + 2 * t;
      *reinterpret_cast<float2*>(o) = make_float2(acc[tile][0], acc[tile][1]);
      *reinterpret_cast<float2*>(o + 8 * f.tokens_cap) = make_float2(acc[tile][2], acc[tile][3]);
    }
  }
}

// The pooled value of channel d of entry e: the same operations in the same order as
// pool_windows, so both paths pool identical kv_score values to identical bits.
__device__ float pool_channel(const FusedMember& mb, const float* vals, int cap, int rb, std::int64_t e, int d) {
  const CompressorConsts& c = mb.c;
  const DevicePlan& p = mb.p;
  const int i = request_of(p, e);
  const std::int64_t start = p.start[i], tok0 = p.token_offset[i];
  const std::int64_t w = start / c.ratio + (e - p.entry_offset[i]);
  const int hd = c.head_dim;
  const std::int64_t half = static_cast<std::int64_t>(c.overlap ? 2 : 1) * hd;
  const char* slot = static_cast<const char*>(mb.st.data) + p.slot[i] * mb.st.slot_bytes;
  auto at = [&](std::int64_t position, std::int64_t col) -> float {
    if (position >= start) return vals[block_row(c, rb, col) * cap + tok0 + (position - start)];
    return state_value(mb.st, slot, (position & (mb.st.ring_rows - 1)) * mb.st.width + col);
  };
  auto slot_at = [&](int j, float& logit, float& value) {
    const WindowSlot s = window_slot(c, w, j);
    logit = at(s.position, half + s.channel0 + d) + c.ape[s.ape_row * half + s.channel0 + d];
    value = at(s.position, s.channel0 + d);
  };
  const int slots = c.overlap ? 2 * c.ratio : c.ratio;
  int first = (c.overlap && w == 0) ? c.ratio : 0;
  if (c.overlap && slots == 8) {  // ratio 4: the 8 slots' values gathered first, so their loads overlap
    float logit[8], value[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j >= first) slot_at(j, logit[j], value[j]);
    Softmax total;  // pool_windows' one-slot groups, merged in slot order
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j >= first) total.merge(Softmax{logit[j], 1.0f, value[j]});
    return total.a / total.s;
  }
  if (c.overlap) {
    Softmax total;
    for (int j = first; j < slots; ++j) {
      float logit, value;
      slot_at(j, logit, value);
      total.merge(Softmax{logit, 1.0f, value});
    }
    return total.a / total.s;
  }
  // pool_windows' 8 groups: group k takes slots first+k, first+k+8, ...; then merged in order.
  Softmax from_state;
  if (mb.st.running) {
    const std::int64_t w0 = w * c.ratio;
    if (w0 < start) {
      first = static_cast<int>(start - w0);
      const float* acc = reinterpret_cast<const float*>(slot);
      from_state = Softmax{__ldcg(acc + d), __ldcg(acc + hd + d), __ldcg(acc + 2 * hd + d)};
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

// The last block to finish a row block: kv_score of its columns for every token (slices added
// in order, rounded as the storage dtype would), pooling of its channels, then the state.
__device__ void finish_row_block(const FusedStep& f, const FusedMember& mb, int rb_global, int rb, float* vals) {
  const int cap = f.tokens_cap;
  const float* partial = f.partials + static_cast<std::int64_t>(rb_global) * kFusedSlices * kFusedRowsPerBlock * cap;
  const std::int64_t slice_stride = static_cast<std::int64_t>(kFusedRowsPerBlock) * cap;
  // Four tokens a load (tokens_cap is a multiple of 8 and every partial below it is written),
  // two rows a thread at once: 16 loads in flight per thread.
  const int quads = cap / 4, work = kFusedRowsPerBlock * quads;
  const bool round = mb.c.round_bf16;
  auto sum4 = [&](int idx) {
    const float4* q = reinterpret_cast<const float4*>(partial + (idx / quads) * cap) + idx % quads;
    float4 v = __ldcg(q);
#pragma unroll
    for (int s = 1; s < kFusedSlices; ++s) {
      const float4 u = __ldcg(q + s * slice_stride / 4);
      v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
    }
    if (round) v = make_float4(num::round_to_bf16(v.x), num::round_to_bf16(v.y), num::round_to_bf16(v.z), num::round_to_bf16(v.w));
    reinterpret_cast<float4*>(vals + (idx / quads) * cap)[idx % quads] = v;
  };
  for (int idx = threadIdx.x; idx < work; idx += 2 * kFusedThreads) {
    sum4(idx);
    if (idx + kFusedThreads < work) sum4(idx + kFusedThreads);
  }
  __syncthreads();

  const CompressorConsts& c = mb.c;
  const DevicePlan& p = mb.p;
  const int ch = channels_per_block(c.overlap), hd = c.head_dim;
  // Four (entry, channel) pairs a thread at once, stored after all four: no store sits between
  // their loads, so the loads of the four overlap.
  constexpr int kPairs = 4;
  const int pairs = p.num_entries * ch;
  for (int base = threadIdx.x; base < pairs; base += kPairs * kFusedThreads) {
    float out[kPairs];
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int idx = base + k * kFusedThreads;
      if (idx < pairs) out[k] = pool_channel(mb, vals, cap, rb, idx / ch, rb * ch + idx % ch);
    }
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int idx = base + k * kFusedThreads;
      if (idx < pairs) mb.pooled[static_cast<std::int64_t>(idx / ch) * hd + rb * ch + idx % ch] = out[k];
    }
  }
  __syncthreads();  // pooling has read the state this block's channels are about to overwrite

  if (mb.st.running) {  // update_running_kernel, for this block's channels, four pairs at once
    const int pairs = p.num_requests * ch;
    for (int base = threadIdx.x; base < pairs; base += kPairs * kFusedThreads) {
      Softmax sm[kPairs];
      float* acc[kPairs] = {};
#pragma unroll
      for (int k = 0; k < kPairs; ++k) {
        const int idx = base + k * kFusedThreads;
        if (idx >= pairs) continue;
        const int i = idx / ch, d = rb * ch + idx % ch;
        const std::int64_t start = p.start[i], end = start + p.num_tokens[i], tok0 = p.token_offset[i];
        if (end % c.ratio == 0) continue;
        const std::int64_t w0 = (end / c.ratio) * c.ratio;
        float* a = reinterpret_cast<float*>(static_cast<char*>(mb.st.data) + p.slot[i] * mb.st.slot_bytes);
        acc[k] = a + d;
        if (w0 < start) sm[k] = Softmax{__ldcg(a + d), __ldcg(a + hd + d), __ldcg(a + 2 * hd + d)};
        for (std::int64_t q = max(w0, start); q < end; ++q) {
          const float score = vals[block_row(c, rb, hd + d) * cap + tok0 + (q - start)];
          const float value = vals[block_row(c, rb, d) * cap + tok0 + (q - start)];
          sm[k].add(score + c.ape[(q - w0) * hd + d], value);
        }
      }
#pragma unroll
      for (int k = 0; k < kPairs; ++k)
        if (acc[k]) acc[k][0] = sm[k].m, acc[k][hd] = sm[k].s, acc[k][2 * hd] = sm[k].a;
    }
  } else {  // update_state_kernel, for this block's columns
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = warp; i < p.num_requests; i += kWarps) {
      const std::int64_t start = p.start[i], end = start + p.num_tokens[i], tok0 = p.token_offset[i];
      const std::int64_t last_window_start = (end / c.ratio) * c.ratio;
      const std::int64_t keep_from = c.overlap ? max(std::int64_t{0}, last_window_start - c.ratio) : last_window_start;
      char* slot = static_cast<char*>(mb.st.data) + p.slot[i] * mb.st.slot_bytes;
      for (std::int64_t q = max(start, keep_from); q < end; ++q)
        for (int r = lane; r < kFusedRowsPerBlock; r += 32)
          store_state(mb.st, slot, (q & (mb.st.ring_rows - 1)) * mb.st.width + block_column(c, rb, r),
                      vals[r * cap + tok0 + (q - start)]);
    }
  }
}

__global__ void __launch_bounds__(kFusedThreads, 3) fused_step_kernel(const __grid_constant__ FusedStep f) {
  extern __shared__ uint4 smem[];
  __shared__ int s_ticket;
  __shared__ bool s_last;
  auto* xs = reinterpret_cast<std::uint16_t*>(smem);
  auto* vals = reinterpret_cast<float*>(smem);
  unsigned* counters = f.counters;
  const int projection_items = f.row_blocks * kFusedSlices, items = projection_items + f.entries;
  bool waited = false, released = false;
  int t = static_cast<int>(blockIdx.x);
  while (t < items) {
    if (t < projection_items) {
      const int rb_global = t / kFusedSlices, slice = t % kFusedSlices;
      const int m = (f.members > 1 && rb_global >= f.m[1].first_row_block) ? 1 : 0;
      const FusedMember& mb = f.m[m];
      const int rb = rb_global - mb.first_row_block;
      float* out = f.partials + (static_cast<std::int64_t>(rb_global) * kFusedSlices + slice) * kFusedRowsPerBlock * f.tokens_cap;
      project_item(f, mb, rb, slice, out, xs, waited);
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) {
        s_last = atomicAdd(&counters[kCounterRowBlocks + rb_global], 1u) == kFusedSlices - 1;
        if (s_last) counters[kCounterRowBlocks + rb_global] = 0;
      }
      __syncthreads();
      if (s_last) {
        __threadfence();
        finish_row_block(f, mb, rb_global, rb, vals);
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(&counters[kCounterMemberDone + m], 1u);
      }
    } else {
      if (!waited) {
        wait_for_previous_kernel();
        waited = true;
      }
      if (!released) {  // every weight has an owner now: the next kernel may start loading its own
        allow_next_kernel();
        released = true;
      }
      const int u = t - projection_items;
      const int m = (f.members > 1 && u >= f.m[1].first_entry) ? 1 : 0;
      const FusedMember& mb = f.m[m];
      if (threadIdx.x == 0)
        while (load_acquire(&counters[kCounterMemberDone + m]) < static_cast<unsigned>(mb.row_blocks)) __nanosleep(64);
      __syncthreads();
      finish_entry(mb.c, mb.p, mb.pooled, mb.cache, mb.entries, u - mb.first_entry, vals, vals + kFinishMaxHeadDim);
    }
    __syncthreads();
    if (threadIdx.x == 0) s_ticket = static_cast<int>(gridDim.x + atomicAdd(&counters[kCounterTicket], 1u));
    __syncthreads();
    t = s_ticket;
  }
  if (!waited) wait_for_previous_kernel();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&counters[kCounterExits], 1u) == gridDim.x - 1) {  // everyone else is done with the counters
      counters[kCounterTicket] = 0;
      counters[kCounterExits] = 0;
      for (int m = 0; m < kFusedMaxMembers; ++m) counters[kCounterMemberDone + m] = 0;
      __threadfence();
    }
  }
}

std::size_t shared_bytes(const FusedStep& f) {
  const std::size_t ks = static_cast<std::size_t>(f.hidden / kFusedSlices);
  const std::size_t x_bytes = static_cast<std::size_t>(f.tokens_per_pass) * (ks + kXPad) * 2;
  const std::size_t vals_bytes = static_cast<std::size_t>(kFusedRowsPerBlock) * f.tokens_cap * 4;
  const std::size_t finish_bytes = (kFinishMaxHeadDim + 32) * 4;
  return std::max({x_bytes, vals_bytes, finish_bytes});
}

}  // namespace

bool fused_shape_supported(int head_dim, std::int64_t hidden) {
  return hidden % (kFusedSlices * 32) == 0 && head_dim % 32 == 0 && head_dim <= kFinishMaxHeadDim;
}

std::size_t fused_counter_count(const FusedStep& f) { return kCounterRowBlocks + static_cast<std::size_t>(f.row_blocks); }

std::size_t fused_partial_floats(const FusedStep& f) {
  return static_cast<std::size_t>(f.row_blocks) * kFusedSlices * kFusedRowsPerBlock * static_cast<std::size_t>(f.tokens_cap);
}

int fused_prepare_launch(FusedStep& f, int device) {
  // As many tokens per pass as fit 72 KiB of staged x (Flash: 64, Pro: 40), in 8-token tiles.
  const int ks = f.hidden / kFusedSlices;
  const int fit = (72 * 1024 / ((ks + kXPad) * 2)) / 8 * 8;
  f.tokens_per_pass = std::max(8, std::min({kMaxTiles * 8, f.tokens_cap, fit}));
  const std::size_t smem = shared_bytes(f);
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(fused_step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)));
  int per_sm = 0, sms = 0;
  DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_step_kernel, kFusedThreads, smem));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int items = f.row_blocks * kFusedSlices + f.entries;
  return std::max(1, std::min(items, std::max(1, per_sm) * sms));
}

void launch_fused_step(const FusedStep& f, int blocks, bool pdl, cudaStream_t stream) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kFusedThreads);
  cfg.dynamicSmemBytes = shared_bytes(f);
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fused_step_kernel, f));
}

}  // namespace dsv4::cuda
