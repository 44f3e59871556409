// One block per completed window: gated softmax pooling over the window's slots (from this
// call's kv_score rows or the request's state ring), then the entry's epilogue in shared
// memory (RMSNorm, RoPE, Walsh-Hadamard rotation) and the store of the packed entry.
#include "cuda/device_utils.cuh"
#include "cuda/kernels.hpp"
#include "core/rope.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = 1024;
constexpr int kPerThread = kMaxHeadDim / kThreads;

// Locates the request an entry belongs to: the last request whose entry_offset <= e.
__device__ int request_of(const DevicePlan& p, std::int64_t e) {
  int lo = 0, hi = p.num_requests - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.entry_offset[mid] <= e) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <class ScoreT, class StateT>
struct RowSource {
  const ScoreT* call_rows;  // this request's first kv_score row
  std::int64_t ld;
  const StateT* ring;       // this request's slot
  std::int64_t ring_rows, width, start;
  bool round_bf16;

  // Value at column c of the token at `position`, as the pooling sees it.
  __device__ float at(std::int64_t position, std::int64_t c) const {
    if (position >= start) {
      const float v = to_float(call_rows[(position - start) * ld + c]);
      return round_bf16 ? num::round_to_bf16(v) : v;
    }
    return to_float(ring[(position % ring_rows) * width + c]);
  }
};

template <class ScoreT, class StateT>
__global__ void __launch_bounds__(kThreads) compress_entries_kernel(CompressorConsts c, DevicePlan p, KvScoreView kv,
                                                                    StateView st, std::uint8_t* cache,
                                                                    std::uint16_t* entries) {
  __shared__ float v[kMaxHeadDim];
  __shared__ float scratch[32];
  const std::int64_t e = blockIdx.x;
  const int i = request_of(p, e);
  const std::int64_t start = p.start[i];
  const std::int64_t w = start / c.ratio + (e - p.entry_offset[i]);
  const int hd = c.head_dim;
  const std::int64_t half = static_cast<std::int64_t>(c.overlap ? 2 : 1) * hd;

  const RowSource<ScoreT, StateT> src{
      static_cast<const ScoreT*>(kv.data) + p.token_offset[i] * kv.ld, kv.ld,
      reinterpret_cast<const StateT*>(static_cast<const char*>(st.data) + p.slot[i] * st.slot_bytes),
      st.ring_rows, st.width, start, c.round_bf16};

  // Slot j of the window: (position, first channel, ape row). Ratio 4 has 8 slots: the
  // previous window's tokens on channel half 0 (absent for window 0), then the current
  // window's on channel half 1.
  const int slots = c.overlap ? 2 * c.ratio : c.ratio;
  const int first_slot = (c.overlap && w == 0) ? c.ratio : 0;
  auto slot_at = [&](int j, std::int64_t& position, std::int64_t& channel0, int& ape_row) {
    if (!c.overlap) {
      position = w * c.ratio + j, channel0 = 0, ape_row = j;
    } else if (j < c.ratio) {
      position = (w - 1) * c.ratio + j, channel0 = 0, ape_row = j;
    } else {
      position = w * c.ratio + (j - c.ratio), channel0 = hd, ape_row = j - c.ratio;
    }
  };

  float mx[kPerThread], sum[kPerThread], acc[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) mx[k] = -INFINITY, sum[k] = 0.0f, acc[k] = 0.0f;
  for (int j = first_slot; j < slots; ++j) {
    std::int64_t position, channel0;
    int ape_row;
    slot_at(j, position, channel0, ape_row);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int d = threadIdx.x + k * kThreads;
      if (d < hd)
        mx[k] = fmaxf(mx[k], src.at(position, half + channel0 + d) + c.ape[ape_row * half + channel0 + d]);
    }
  }
  for (int j = first_slot; j < slots; ++j) {
    std::int64_t position, channel0;
    int ape_row;
    slot_at(j, position, channel0, ape_row);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int d = threadIdx.x + k * kThreads;
      if (d < hd) {
        const float prob = expf(src.at(position, half + channel0 + d) + c.ape[ape_row * half + channel0 + d] - mx[k]);
        sum[k] += prob;
        acc[k] += prob * src.at(position, channel0 + d);
      }
    }
  }

  // RMSNorm of the bf16-rounded pooled values.
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int d = threadIdx.x + k * kThreads;
    if (d < hd) {
      acc[k] = num::round_to_bf16(acc[k] / sum[k]);
      sq += acc[k] * acc[k];
    }
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(sq, scratch) / static_cast<float>(hd) + c.eps);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int d = threadIdx.x + k * kThreads;
    if (d < hd) v[d] = num::round_to_bf16(acc[k] * inv_rms * c.norm[d]);
  }
  __syncthreads();

  // RoPE on the last rope_dim dims, interleaved pairs; the window's first token is its position.
  const int nope = hd - c.rope_dim;
  for (int r = threadIdx.x; r < c.rope_dim / 2; r += kThreads) {
    float cs, sn;
    rope_cos_sin(w * c.ratio, c.inv_freq[r], &cs, &sn);
    const float a = v[nope + 2 * r], b = v[nope + 2 * r + 1];
    v[nope + 2 * r] = num::round_to_bf16(a * cs - b * sn);
    v[nope + 2 * r + 1] = num::round_to_bf16(a * sn + b * cs);
  }
  __syncthreads();

  if (c.rotate) {  // Walsh-Hadamard butterflies, the same pairs in the same order as the CPU
    for (int h = 1; h < hd; h *= 2) {
      for (int t = threadIdx.x; t < hd / 2; t += kThreads) {
        const int j = (t / h) * 2 * h + (t % h);
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
      __syncthreads();
    }
    const float scale = 1.0f / sqrtf(static_cast<float>(hd));
    for (int d = threadIdx.x; d < hd; d += kThreads) v[d] = num::round_to_bf16(v[d] * scale);
    __syncthreads();
  }

  if (entries)
    for (int d = threadIdx.x; d < hd; d += kThreads) entries[e * hd + d] = num::bf16_from_f32(v[d]);
  if (!cache) return;
  std::uint8_t* row = cache + p.cache_location[e] * c.entry_bytes;
  if (!c.fp8) {
    auto* dst = reinterpret_cast<std::uint16_t*>(row);
    for (int d = threadIdx.x; d < hd; d += kThreads) dst[d] = num::bf16_from_f32(v[d]);
    for (std::int64_t b = 2 * hd + threadIdx.x; b < c.entry_bytes; b += kThreads) row[b] = 0;
    return;
  }
  // fp8 blocks of 64 dims: one warp per block, two dims per lane.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int blocks = nope / 64;
  const std::int64_t scale_offset = nope + 2 * c.rope_dim;
  for (int b = warp; b < blocks; b += kThreads / 32) {
    const float x0 = v[b * 64 + lane], x1 = v[b * 64 + 32 + lane];
    const float amax = warp_max(fmaxf(fabsf(x0), fabsf(x1)));
    const int exponent = num::fp8_scale_exponent(amax);
    const float inv_scale = num::exp2_int(-exponent);
    row[b * 64 + lane] = num::e4m3_from_f32(x0 * inv_scale);
    row[b * 64 + 32 + lane] = num::e4m3_from_f32(x1 * inv_scale);
    if (lane == 0) row[scale_offset + b] = num::ue8m0_from_exponent(exponent);
  }
  auto* rope_dst = reinterpret_cast<std::uint16_t*>(row + nope);
  for (int d = threadIdx.x; d < c.rope_dim; d += kThreads) rope_dst[d] = num::bf16_from_f32(v[nope + d]);
  for (std::int64_t b = scale_offset + blocks + threadIdx.x; b < c.entry_bytes; b += kThreads) row[b] = 0;
}

template <class ScoreT, class StateT>
void launch(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st, std::uint8_t* cache,
            std::uint16_t* entries, cudaStream_t stream) {
  compress_entries_kernel<ScoreT, StateT><<<p.num_entries, kThreads, 0, stream>>>(c, p, kv, st, cache, entries);
}

}  // namespace

void launch_compress_entries(const CompressorConsts& c, const DevicePlan& p, KvScoreView kv, StateView st,
                             std::uint8_t* cache, std::uint16_t* entries, cudaStream_t stream) {
  if (p.num_entries == 0) return;
  const bool score_f32 = kv.dtype == DType::f32, state_f32 = st.dtype == DType::f32;
  if (score_f32 && state_f32) launch<float, float>(c, p, kv, st, cache, entries, stream);
  else if (score_f32) launch<float, std::uint16_t>(c, p, kv, st, cache, entries, stream);
  else if (state_f32) launch<std::uint16_t, float>(c, p, kv, st, cache, entries, stream);
  else launch<std::uint16_t, std::uint16_t>(c, p, kv, st, cache, entries, stream);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
