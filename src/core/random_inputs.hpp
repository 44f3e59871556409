// Random inputs at the scale SPEC section 4 prescribes, for tests, the demo and benchmarks:
// x ~ N(0, 1), wkv/wgate ~ N(0, hidden^-1/2), ape ~ N(0, 0.5), norm weight ~ 1 + N(0, 0.1).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "dsv4/compressor.hpp"

namespace dsv4 {

struct RandomWeights {
  std::vector<std::uint16_t> wkv;    // bf16 [coff*head_dim, hidden]
  std::vector<std::uint16_t> wgate;  // bf16 [coff*head_dim, hidden]
  std::vector<float> ape;            // [ratio, coff*head_dim]
  std::vector<float> norm;           // [head_dim]

  Weights view(const CompressorSpec& spec) const;
};

RandomWeights random_weights(const CompressorSpec& spec, std::uint64_t seed);

// bf16 [tokens, hidden], N(0, 1).
std::vector<std::uint16_t> random_x(std::int64_t tokens, std::int64_t hidden, std::mt19937_64& rng);

}  // namespace dsv4
