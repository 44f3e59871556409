// The projection GEMM of the CPU backend, written here rather than taken from OpenBLAS.
//
// Why: SPEC section 3 asks for bit-identical entries however a sequence is split into calls,
// so a token's kv_score row must not depend on which tokens share its GEMM. OpenBLAS's sgemm
// kernels compute rows differently by their position inside a register tile: measured on this
// project's CI machine (AMD EPYC, OpenBLAS 0.3.21, Zen kernels), a token placed at rows 6-11,
// 18-23 or 24-31 of a 32-row call differed from the same token alone in 24 to 540 of 2048
// outputs. Here every output element is one fixed sequence of operations: 8 lanes, lane l
// summing k = l, l+8, ... of a 512-wide K chunk, the lanes then added in a fixed tree, chunks
// added in order. Vector extensions pin the lanes, so the arithmetic is the same with SSE or
// AVX2 code (both are built; the CPU picks), and ISO C++ mode keeps the compiler from fusing
// multiply-adds.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/numerics.hpp"
#include "cpu/stages.hpp"

namespace dsv4::cpu {

namespace {

typedef float v8f __attribute__((vector_size(32)));

constexpr std::int64_t kTileTokens = 4;   // tokens per register tile
constexpr std::int64_t kTileRows = 2;     // weight rows per register tile
constexpr std::int64_t kBlockTokens = 64; // tokens whose x stays in cache while weights stream
constexpr std::int64_t kChunk = 512;      // K per partial sum (a multiple of 8)

// Vectors go by reference: the helpers are called from both the AVX2 and the default clone,
// and passing AVX-sized vectors by value would differ in ABI between them.
inline float lane_sum(const v8f& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

inline void load8(v8f& v, const float* p) { std::memcpy(&v, p, sizeof v); }

// out[t][n] += dot(x[t][k0:k1], w[n][k0:k1]) for a 4-token x 2-row tile. Tiles never vary in
// shape: the caller pads tokens with zero rows and the width to an even number of rows.
__attribute__((target_clones("avx2", "default")))
void tile_dot(const float* x, std::int64_t x_stride, const float* w, std::int64_t w_stride,
              std::int64_t len, float* out, std::int64_t out_stride) {
  v8f acc[kTileTokens][kTileRows] = {};
  for (std::int64_t k = 0; k < len; k += 8) {
    v8f w0, w1;
    load8(w0, w + k);
    load8(w1, w + w_stride + k);
    for (std::int64_t t = 0; t < kTileTokens; ++t) {
      v8f xv;
      load8(xv, x + t * x_stride + k);
      acc[t][0] += xv * w0;
      acc[t][1] += xv * w1;
    }
  }
  for (std::int64_t t = 0; t < kTileTokens; ++t)
    for (std::int64_t r = 0; r < kTileRows; ++r) out[t * out_stride + r] += lane_sum(acc[t][r]);
}

}  // namespace

void project(const std::uint16_t* x, std::int64_t tokens, std::int64_t hidden, const float* w,
             std::int64_t width, bool round_bf16, float* kv_score) {
  // K padded to a whole number of 8-lane steps with zeros (zeros add exactly nothing).
  const std::int64_t kpad = (hidden + 7) / 8 * 8;
  const std::int64_t npad = (width + kTileRows - 1) / kTileRows * kTileRows;
  std::vector<float> wp;
  const float* wk = w;
  if (kpad != hidden || npad != width) {
    wp.assign(static_cast<std::size_t>(npad * kpad), 0.0f);
    for (std::int64_t n = 0; n < width; ++n) std::copy(w + n * hidden, w + (n + 1) * hidden, wp.begin() + n * kpad);
    wk = wp.data();
  }
  std::vector<float> xb(static_cast<std::size_t>(kBlockTokens * kpad));
  std::vector<float> cb(static_cast<std::size_t>(kBlockTokens * npad));

  for (std::int64_t t0 = 0; t0 < tokens; t0 += kBlockTokens) {
    const std::int64_t rows = std::min(kBlockTokens, tokens - t0);
    const std::int64_t tiles = (rows + kTileTokens - 1) / kTileTokens;
    const std::int64_t padded = tiles * kTileTokens;
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < padded; ++r) {
      float* dst = xb.data() + r * kpad;
      std::fill(dst, dst + kpad, 0.0f);
      if (r < rows)
        for (std::int64_t k = 0; k < hidden; ++k) dst[k] = num::f32_from_bf16(x[(t0 + r) * hidden + k]);
    }
    std::fill(cb.begin(), cb.begin() + padded * npad, 0.0f);
#pragma omp parallel for schedule(static)
    for (std::int64_t n = 0; n < npad; n += kTileRows)
      for (std::int64_t k0 = 0; k0 < kpad; k0 += kChunk) {
        const std::int64_t len = std::min(kChunk, kpad - k0);
        for (std::int64_t tile = 0; tile < tiles; ++tile)
          tile_dot(xb.data() + tile * kTileTokens * kpad + k0, kpad, wk + n * kpad + k0, kpad, len,
                   cb.data() + tile * kTileTokens * npad + n, npad);
      }
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* src = cb.data() + r * npad;
      float* dst = kv_score + (t0 + r) * width;
      if (round_bf16)
        for (std::int64_t n = 0; n < width; ++n) dst[n] = num::round_to_bf16(src[n]);
      else
        std::copy(src, src + width, dst);
    }
  }
}

}  // namespace dsv4::cpu
