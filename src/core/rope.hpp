// RoPE of the compressed entries: the YaRN inverse-frequency table and the rotation angle.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/numerics.hpp"
#include "dsv4/spec.hpp"

namespace dsv4 {

// inv_freq[i], i < rope.dim / 2, built in fp32 the way the DeepSeek release builds its table.
std::vector<float> yarn_inv_freq(const RopeConfig& rope);

// cos and sin of pos * inv_freq. The product is formed in fp64: at long positions an fp32
// product would lose whole hundredths of a radian; cos and sin are then rounded to fp32.
DSV4_HD void rope_cos_sin(std::int64_t pos, float inv_freq, float* c, float* s) {
  const double angle = static_cast<double>(pos) * static_cast<double>(inv_freq);
#if defined(__CUDA_ARCH__)
  double sd, cd;
  sincos(angle, &sd, &cd);
  *c = static_cast<float>(cd);
  *s = static_cast<float>(sd);
#else
  *c = static_cast<float>(std::cos(angle));
  *s = static_cast<float>(std::sin(angle));
#endif
}

}  // namespace dsv4
