#include "core/random_inputs.hpp"

#include <cmath>

#include "core/numerics.hpp"

namespace dsv4 {

namespace {

void fill_bf16(std::vector<std::uint16_t>& v, std::size_t n, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, stddev);
  v.resize(n);
  for (auto& e : v) e = num::bf16_from_f32(dist(rng));
}

}  // namespace

Weights RandomWeights::view(const CompressorSpec& spec) const {
  const std::int64_t rows = spec.coff() * spec.head_dim;
  return Weights{TensorView(wkv.data(), DType::bf16, {rows, spec.hidden}),
                 TensorView(wgate.data(), DType::bf16, {rows, spec.hidden}),
                 TensorView(ape.data(), DType::f32, {spec.ratio, rows}),
                 TensorView(norm.data(), DType::f32, {spec.head_dim})};
}

RandomWeights random_weights(const CompressorSpec& spec, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  RandomWeights w;
  const auto rows = static_cast<std::size_t>(spec.coff() * spec.head_dim);
  const float wstd = 1.0f / std::sqrt(static_cast<float>(spec.hidden));
  fill_bf16(w.wkv, rows * static_cast<std::size_t>(spec.hidden), wstd, rng);
  fill_bf16(w.wgate, rows * static_cast<std::size_t>(spec.hidden), wstd, rng);
  std::normal_distribution<float> ape(0.0f, 0.5f), norm(1.0f, 0.1f);
  w.ape.resize(static_cast<std::size_t>(spec.ratio) * rows);
  for (auto& e : w.ape) e = ape(rng);
  w.norm.resize(static_cast<std::size_t>(spec.head_dim));
  for (auto& e : w.norm) e = norm(rng);
  return w;
}

std::vector<std::uint16_t> random_x(std::int64_t tokens, std::int64_t hidden, std::mt19937_64& rng) {
  std::vector<std::uint16_t> x;
  fill_bf16(x, static_cast<std::size_t>(tokens * hidden), 1.0f, rng);
  return x;
}

}  // namespace dsv4
