// `dsv4-compressor bench-multiply` (see bench.hpp): the multiply of one fused-step projection
// item alone, 64 weight rows x one 512-wide slice of hidden x N tokens, both operands already
// in shared memory, timed with the SM's cycle counter around the loop. It answers what the
// item's arithmetic costs apart from everything the step does around it (loads, hand-offs),
// for the instruction sequences a projection item could use:
//  - mma.sync, one 32-wide k block at a time: the fused step's loop (fused_projection.cuh), the
//    weights in its staged layout, x in rows padded by 64 bytes;
//  - the same with the shared loads of 4 k blocks (one 8-token tile) or 2 (more tiles)
//    issued before their mma;
//  - wgmma (sm_90a): the item as one warpgroup tile, A = the 64 weight rows and B = the tokens
//    read by the tensor cores from shared memory, in the no-swizzle layout of 8-row x 16-byte
//    core matrices (chunk-major: 16 bytes of k for every row, then the next 16);
//  - mma.sync in wgmma's arithmetic: k in its natural order, 16 a step, into one accumulator
//    per tile (fragments read 4 bytes at a time), to learn whether it computes wgmma's bits.
// Every result is checked against an fp64 product of the same bf16 inputs, and a token's
// results must keep their bits whatever the number of tokens beside it (SPEC section 3); every
// mma.sync result is also compared bit for bit with wgmma's on the same grid.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench.hpp"
#include "bench/gpu_common.hpp"
#include "core/numerics.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/device_utils.cuh"
#include "cuda/wgmma.cuh"

namespace dsv4::bench {

namespace {

constexpr int kRows = 64, kSlice = 512, kKBlocks = kSlice / 32, kThreads = 128;
constexpr int kXStride = kSlice + 32;  // the fused step's padded x row (elements)

enum class Seq { one_block, grouped, natural, wgmma };
const char* seq_label(Seq s) {
  switch (s) {
    case Seq::one_block: return "mma.sync, one k block at a time (fused step)";
    case Seq::grouped: return "mma.sync, loads of 4 or 2 k blocks first";
    case Seq::natural: return "mma.sync, k in order, one accumulator";
    case Seq::wgmma: return "wgmma, one warpgroup tile";
  }
  return "?";
}

// The fused step's staged weight layout with every k block staged.
__device__ __forceinline__ int staged_chunk(int r, int c) { return dsv4::cuda::staged_chunk(kKBlocks, r, c); }

// One item per block: w [64][512] and x [N][512] bf16 (global) into the sequence's layout in
// shared memory, then the multiply, timed; out [block][64][N] fp32, cycles [block] (-1 where
// the build has no wgmma for this device).
template <int N, Seq kSeq>
__global__ void __launch_bounds__(kThreads) multiply_item_kernel(const std::uint16_t* w, const std::uint16_t* x,
                                                                float* out, long long* cycles) {
  extern __shared__ uint4 smem[];
  constexpr int kTiles = N / 8;
  auto* a = reinterpret_cast<std::uint16_t*>(smem);  // 64 KiB of weights, then x
  std::uint16_t* b = a + kRows * kSlice;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int i = threadIdx.x; i < kRows * kSlice / 8; i += kThreads) {  // 16-byte chunks
    const int r = i / (kSlice / 8), c = i % (kSlice / 8);
    const int at = kSeq == Seq::wgmma ? c * kRows + r : staged_chunk(r, c);
    reinterpret_cast<uint4*>(a)[at] = reinterpret_cast<const uint4*>(w)[i];
  }
  for (int i = threadIdx.x; i < N * kSlice / 8; i += kThreads) {
    const int n = i / (kSlice / 8), c = i % (kSlice / 8);
    if constexpr (kSeq == Seq::wgmma) reinterpret_cast<uint4*>(b)[c * N + n] = reinterpret_cast<const uint4*>(x)[i];
    else *reinterpret_cast<uint4*>(b + n * kXStride + 8 * c) = reinterpret_cast<const uint4*>(x)[i];
  }
  // Stores by threads reach the tensor cores' reads of shared memory (the async proxy) only
  // through this fence.
#if defined(DSV4_HAVE_WGMMA)
  if constexpr (kSeq == Seq::wgmma) dsv4::cuda::fence_shared_for_wgmma();
#endif
  __syncthreads();
  const long long t0 = clock64();
  float res[kTiles][4];
  bool ran = true;
  if constexpr (kSeq == Seq::wgmma) {
#if defined(DSV4_HAVE_WGMMA)
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
    dsv4::cuda::wgmma_fence();
#pragma unroll
    for (int s = 0; s < kSlice / 16; ++s)  // k step s: core-matrix columns 2s and 2s + 1
      dsv4::cuda::wgmma_ss<N>(d, dsv4::cuda::smem_descriptor(a + s * 2 * kRows * 8, kRows * 16, 128),
                    dsv4::cuda::smem_descriptor(b + s * 2 * N * 8, N * 16, 128));
    dsv4::cuda::wgmma_commit();
    dsv4::cuda::wgmma_wait<0>();
    dsv4::cuda::wgmma_hold(d);
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int i = 0; i < 4; ++i) res[tile][i] = d[4 * tile + i];
#else
    ran = false;
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int i = 0; i < 4; ++i) res[tile][i] = 0.0f;
#endif
  } else if constexpr (kSeq == Seq::natural) {
    // The fragments of PTX mma.m16n8k16 as written: k step s takes k 16s..16s+15, lane (g, t)
    // k 16s + 2t, +1, +8, +9 of weight rows g and g+8 and of token g of each tile.
    float acc[kTiles][4] = {};
    const int r0 = 16 * warp + g, r1 = r0 + 8;
    auto pair = [](const std::uint16_t* p) { return *reinterpret_cast<const std::uint32_t*>(p); };
    auto w_at = [&](int r, int k) { return a + 8 * staged_chunk(r, k / 8) + k % 8; };
#pragma unroll 1
    for (int s = 0; s < kSlice / 16; ++s) {
      const int k = 16 * s + 2 * t;
      const std::uint32_t a0 = pair(w_at(r0, k)), a1 = pair(w_at(r1, k)), a2 = pair(w_at(r0, k + 8)),
                          a3 = pair(w_at(r1, k + 8));
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        const std::uint16_t* xr = b + (tile * 8 + g) * kXStride;
        dsv4::cuda::mma_bf16_16x8x16(acc[tile], a0, a1, a2, a3, pair(xr + k), pair(xr + k + 8));
      }
    }
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int i = 0; i < 4; ++i) res[tile][i] = acc[tile][i];
  } else {
    // As in the fused step: lane (g, t) holds k 8t..8t+7 of weight rows g and g+8 and of token
    // g of each tile; two accumulators (first and second mma of each k block), added at the end.
    float acc[kTiles][2][4] = {};
    auto multiply = [&](const uint4& lo, const uint4& hi, const uint4 (&xf)[kTiles]) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        dsv4::cuda::mma_bf16_16x8x16(acc[tile][0], lo.x, hi.x, lo.y, hi.y, xf[tile].x, xf[tile].y);
        dsv4::cuda::mma_bf16_16x8x16(acc[tile][1], lo.z, hi.z, lo.w, hi.w, xf[tile].z, xf[tile].w);
      }
    };
    constexpr int kGroup = kSeq == Seq::one_block ? 1 : (kTiles == 1 ? 4 : 2);
#pragma unroll 1
    for (int kb0 = 0; kb0 < kKBlocks; kb0 += kGroup) {
      uint4 lo[kGroup], hi[kGroup], xf[kGroup][kTiles];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int kb = kb0 + u;
        lo[u] = *reinterpret_cast<const uint4*>(a + 8 * staged_chunk(16 * warp + g, 4 * kb + t));
        hi[u] = *reinterpret_cast<const uint4*>(a + 8 * staged_chunk(16 * warp + g + 8, 4 * kb + t));
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile)
          xf[u][tile] = *reinterpret_cast<const uint4*>(b + (tile * 8 + g) * kXStride + kb * 32 + 8 * t);
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) multiply(lo[u], hi[u], xf[u]);
    }
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int i = 0; i < 4; ++i) res[tile][i] = acc[tile][0][i] + acc[tile][1][i];
  }
  __syncthreads();
  const long long t1 = clock64();
  // Both sequences leave row 16 warp + g (+ 8 for i >= 2), token 8 tile + 2t (+ 1 for odd i).
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * warp + g + (i >= 2 ? 8 : 0), n = 8 * tile + 2 * t + (i & 1);
      out[(static_cast<std::size_t>(blockIdx.x) * kRows + row) * N + n] = res[tile][i];
    }
  if (threadIdx.x == 0) cycles[blockIdx.x] = ran ? t1 - t0 : -1;
}

struct Inputs {
  std::vector<std::uint16_t> w, x;  // host copies for the fp64 check
  Buffer dw, dx;
};

template <int N, Seq kSeq>
MultiplyRow run_one(const Inputs& in, int sms, int blocks_per_sm, std::vector<float>* first_block) {
  const int blocks = sms * blocks_per_sm;
  const std::size_t shared = static_cast<std::size_t>(kRows) * kSlice * 2 + static_cast<std::size_t>(N) * kXStride * 2;
  auto kernel = multiply_item_kernel<N, kSeq>;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  Buffer out(Device::cuda(), static_cast<std::size_t>(blocks) * kRows * N * 4);
  Buffer cycles(Device::cuda(), static_cast<std::size_t>(blocks) * 8);
  for (int rep = 0; rep < 3; ++rep)  // the last launch is the one read: code and data warm
    kernel<<<blocks, kThreads, shared>>>(static_cast<const std::uint16_t*>(in.dw.data()),
                                         static_cast<const std::uint16_t*>(in.dx.data()),
                                         static_cast<float*>(out.data()), static_cast<long long*>(cycles.data()));
  DSV4_CUDA_CHECK(cudaGetLastError());
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<long long> c(static_cast<std::size_t>(blocks));
  DSV4_CUDA_CHECK(cudaMemcpy(c.data(), cycles.data(), c.size() * 8, cudaMemcpyDeviceToHost));
  std::vector<float> o(static_cast<std::size_t>(kRows) * N);
  DSV4_CUDA_CHECK(cudaMemcpy(o.data(), out.data(), o.size() * 4, cudaMemcpyDeviceToHost));
  MultiplyRow row;
  row.sequence = seq_label(kSeq);
  row.tokens = N;
  row.blocks_per_sm = blocks_per_sm;
  if (c[0] < 0) return row;  // no wgmma in this build for this device: nothing ran
  std::sort(c.begin(), c.end());
  row.cycles_median = static_cast<double>(c[c.size() / 2]);
  row.cycles_max = static_cast<double>(c.back());
  row.worst_error = 0.0;  // |result - fp64| / sum |products| over block 0's outputs
  for (int r = 0; r < kRows; ++r)
    for (int n = 0; n < N; ++n) {
      double exact = 0.0, size = 0.0;
      for (int k = 0; k < kSlice; ++k) {
        const double p = static_cast<double>(num::f32_from_bf16(in.w[static_cast<std::size_t>(r) * kSlice + k])) *
                         num::f32_from_bf16(in.x[static_cast<std::size_t>(n) * kSlice + k]);
        exact += p;
        size += std::fabs(p);
      }
      const double got = o[static_cast<std::size_t>(r) * N + n];
      row.worst_error = std::isfinite(got) ? std::max(row.worst_error, std::fabs(got - exact) / size) : INFINITY;
    }
  if (first_block) *first_block = o;
  return row;
}

// Whether tokens 0..7 of `o` (N tokens a row) have the bits they have at 8 tokens.
bool same_first_tokens(const std::vector<float>& eight, const std::vector<float>& o, int n) {
  for (int r = 0; r < kRows; ++r)
    if (std::memcmp(&eight[static_cast<std::size_t>(r) * 8], &o[static_cast<std::size_t>(r) * n], 8 * 4) != 0) return false;
  return true;
}

// Block 0's results of every row of the report, in the report's order.
using RowResults = std::vector<std::vector<float>>;

template <Seq kSeq>
void run_sequence(const Inputs& in, int sms, MultiplyReport& report, RowResults& results) {
  for (int per_sm : {1, 2}) {
    std::vector<float> eight, other;
    MultiplyRow r8 = run_one<8, kSeq>(in, sms, per_sm, &eight);
    r8.same_bits_as_8_tokens = true;
    report.rows.push_back(r8);
    results.push_back(eight);
    MultiplyRow r32 = run_one<32, kSeq>(in, sms, per_sm, &other);
    r32.same_bits_as_8_tokens = std::isfinite(r32.cycles_median) && same_first_tokens(eight, other, 32);
    report.rows.push_back(r32);
    results.push_back(other);
    MultiplyRow r64 = run_one<64, kSeq>(in, sms, per_sm, &other);
    r64.same_bits_as_8_tokens = std::isfinite(r64.cycles_median) && same_first_tokens(eight, other, 64);
    report.rows.push_back(r64);
    results.push_back(other);
  }
}

// Each mma.sync row against the wgmma row of the same tokens and grid, where both ran.
void compare_with_wgmma(MultiplyReport& report, const RowResults& results) {
  const std::string wgmma = seq_label(Seq::wgmma);
  for (std::size_t i = 0; i < report.rows.size(); ++i) {
    MultiplyRow& r = report.rows[i];
    if (r.sequence == wgmma || !std::isfinite(r.cycles_median)) continue;
    for (std::size_t j = 0; j < report.rows.size(); ++j) {
      const MultiplyRow& w = report.rows[j];
      if (w.sequence == wgmma && w.tokens == r.tokens && w.blocks_per_sm == r.blocks_per_sm && std::isfinite(w.cycles_median))
        r.same_bits_as_wgmma = results[i] == results[j] ? 1 : 0;
    }
  }
}

}  // namespace

MultiplyReport run_multiply_probe(const MultiplyOptions& o) {
  MultiplyReport report;
  static_cast<RunInfo&>(report) = gpu_run_info("bench-multiply", o.command);
  int sms = 0, clock_khz = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  report.sm_clock_mhz = clock_khz / 1000.0;
  Inputs in{std::vector<std::uint16_t>(static_cast<std::size_t>(kRows) * kSlice),
            std::vector<std::uint16_t>(static_cast<std::size_t>(64) * kSlice),
            Buffer(Device::cuda(), static_cast<std::size_t>(kRows) * kSlice * 2),
            Buffer(Device::cuda(), static_cast<std::size_t>(64) * kSlice * 2)};
  random_fill(in.dw.data(), static_cast<std::int64_t>(in.w.size()), 11);
  random_fill(in.dx.data(), static_cast<std::int64_t>(in.x.size()), 12);
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  DSV4_CUDA_CHECK(cudaMemcpy(in.w.data(), in.dw.data(), in.w.size() * 2, cudaMemcpyDeviceToHost));
  DSV4_CUDA_CHECK(cudaMemcpy(in.x.data(), in.dx.data(), in.x.size() * 2, cudaMemcpyDeviceToHost));
  RowResults results;
  run_sequence<Seq::one_block>(in, sms, report, results);
  run_sequence<Seq::grouped>(in, sms, report, results);
  run_sequence<Seq::natural>(in, sms, report, results);
  run_sequence<Seq::wgmma>(in, sms, report, results);
  compare_with_wgmma(report, results);

  std::printf("dsv4-compressor bench-multiply on %s, commit %s, %s\n", report.device.c_str(), report.commit.c_str(),
              report.date.c_str());
  std::printf("one projection item's multiply: 64 weight rows x 512 of hidden x N tokens, operands in shared memory;\n"
              "cycles per block (median / max over the grid), error against fp64 over sum |products|\n\n");
  std::printf("%-46s %6s %9s %17s %11s %-20s %s\n", "sequence", "tokens", "blocks/SM", "cycles", "worst err",
              "tokens 0-7 as at N=8", "as wgmma");
  for (const MultiplyRow& r : report.rows) {
    if (!std::isfinite(r.cycles_median)) {
      std::printf("%-46s %6d %9d %17s\n", r.sequence.c_str(), r.tokens, r.blocks_per_sm, "not in this build");
      continue;
    }
    char cyc[32];
    std::snprintf(cyc, sizeof cyc, "%.0f / %.0f", r.cycles_median, r.cycles_max);
    std::printf("%-46s %6d %9d %17s %11.2e %-20s %s\n", r.sequence.c_str(), r.tokens, r.blocks_per_sm, cyc, r.worst_error,
                r.same_bits_as_8_tokens ? "same bits" : "DIFFERENT",
                r.same_bits_as_wgmma < 0 ? "-" : r.same_bits_as_wgmma ? "same bits" : "different");
  }
  if (!o.json.empty()) write_multiply_json(report, o.json);
  return report;
}

}  // namespace dsv4::bench
