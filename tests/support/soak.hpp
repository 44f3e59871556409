// The soak shared by the CPU and GPU suites: many small serving steps, checked entry by entry.
#pragma once

#include <random>

#include "core/random_inputs.hpp"
#include "support/serving.hpp"

namespace dsv4::test {

struct SoakResult {
  std::size_t steps = 0, entries = 0;
};

// Requests arrive over time (at most 12 at once, 16 slots, so slots are reused), prefill in
// chunks beside decodes and multi-token decodes. Every entry must equal, bit for bit, one call
// per whole sequence, and sit within SPEC section 4 of the fp64 formula; failures are reported
// through GoogleTest.
SoakResult soak(const Compressor& compressor, const RandomWeights& weights, std::int64_t sequences,
                Buffers& buffers, std::mt19937_64& rng);

}  // namespace dsv4::test
