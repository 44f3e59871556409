#include "core/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace dsv4 {

namespace {

// Dimension index at which a frequency completes `rotations` turns over `length` positions.
double correction_dim(double rotations, double dim, double base, double length) {
  return dim * std::log(length / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

}  // namespace

std::vector<float> yarn_inv_freq(const RopeConfig& rope) {
  const std::int64_t half = rope.dim / 2;
  std::vector<float> inv_freq(static_cast<std::size_t>(half));
  const float dim = static_cast<float>(rope.dim);
  const float base = static_cast<float>(rope.theta);
  const double length = static_cast<double>(rope.original_max_position);
  double low = std::floor(correction_dim(rope.beta_fast, static_cast<double>(rope.dim), rope.theta, length));
  double high = std::ceil(correction_dim(rope.beta_slow, static_cast<double>(rope.dim), rope.theta, length));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(rope.dim - 1));
  if (low == high) high += 0.001;
  const float factor = static_cast<float>(rope.yarn_factor);
  for (std::int64_t i = 0; i < half; ++i) {
    const float freq = 1.0f / std::pow(base, static_cast<float>(2 * i) / dim);
    // Linear ramp from the extrapolated (fast) dims to the interpolated (slow) ones.
    float ramp = (static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low);
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float smooth = 1.0f - ramp;
    inv_freq[static_cast<std::size_t>(i)] = freq / factor * (1.0f - smooth) + freq * smooth;
  }
  return inv_freq;
}

}  // namespace dsv4
