// Long runs and hostile values: a soak of thousands of serving steps checked entry by entry,
// and NaN/Inf in one request's input kept away from every other request.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <random>

#include "core/internal.hpp"
#include "core/numerics.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"
#include "support/soak.hpp"

namespace dsv4 {
namespace {

// Thousands of small batches: requests arrive while others decode, chunked prefills beside
// decodes and multi-token decodes, finished requests' slots reused by new ones. Every entry
// is checked against the whole-sequence fp64 formula and, bit for bit, against one call per
// whole sequence.
TEST(Soak, ThousandsOfServingStepsMatchTheWholeSequenceFormula) {
  const auto t0 = std::chrono::steady_clock::now();
  std::mt19937_64 rng(std::random_device{}());
  std::size_t steps = 0, entries = 0;
  const Precision precisions[] = {{DType::f32, DType::f32}, {DType::bf16, DType::f32}, {DType::f32, DType::bf16}};
  for (CompressorKind kind : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca}) {
    CompressorSpec spec = CompressorSpec::preset(Model::flash, kind);
    spec.hidden = 32;
    const RandomWeights w = random_weights(spec, rng());
    const Compressor comp(spec, w.view(spec), {.precision = precisions[rng() % 3]});
    auto buffers = test::host_buffers();
    const test::SoakResult r = test::soak(comp, w, spec.ratio == 4 ? 160 : 60, *buffers, rng);
    steps += r.steps;
    entries += r.entries;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("    soak: %zu serving steps, %zu entries checked, %.1f s\n", steps, entries, seconds);
  EXPECT_GE(steps, 1000u);
}

// NaN or Inf in one request's x reaches that request's entries and state slot only: the other
// requests of the batch get the same bits as in a batch without it, and their slots too.
TEST(HostileValues, NanAndInfStayInTheirRequest) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    for (CompressorKind kind : {CompressorKind::csa_main, CompressorKind::hca}) {
      CompressorSpec spec = CompressorSpec::preset(Model::flash, kind);
      spec.hidden = 64;
      std::mt19937_64 rng(std::random_device{}());
      const RandomWeights w = random_weights(spec, rng());
      const Compressor comp(spec, w.view(spec));
      const std::int64_t n = 2 * spec.ratio + 3;  // two windows and a tail
      auto x = random_x(3 * n, spec.hidden, rng);
      auto poisoned = x;
      for (std::int64_t k = 0; k < spec.hidden; k += 7) poisoned[static_cast<std::size_t>((n + 5) * spec.hidden + k)] = num::bf16_from_f32(bad);
      const auto run = [&](const std::vector<std::uint16_t>& input, StatePool& state, std::vector<std::uint16_t>& out) {
        Batch b;
        for (int r = 0; r < 3; ++r) b.add(r, 0, n);
        const std::int64_t e = 3 * (n / spec.ratio);
        for (std::int64_t k = 0; k < e; ++k) b.cache_locations.push_back(k);
        std::vector<std::uint8_t> cache(static_cast<std::size_t>(e * spec.entry_bytes()));
        out.assign(static_cast<std::size_t>(e * spec.head_dim), 0);
        comp.forward(b, TensorView(input.data(), DType::bf16, {3 * n, spec.hidden}), state,
                     {.cache = TensorView(cache.data(), DType::u8, {e, spec.entry_bytes()}),
                      .entries = TensorView(out.data(), DType::bf16, {e, spec.head_dim})});
      };
      StatePool clean_state(comp, 3), bad_state(comp, 3);
      std::vector<std::uint16_t> clean, dirty;
      run(x, clean_state, clean);
      run(poisoned, bad_state, dirty);
      const std::size_t per = static_cast<std::size_t>(n / spec.ratio * spec.head_dim);
      EXPECT_TRUE(std::equal(clean.begin(), clean.begin() + per, dirty.begin())) << "request 0 changed";
      EXPECT_TRUE(std::equal(clean.begin() + 2 * per, clean.end(), dirty.begin() + 2 * per)) << "request 2 changed";
      EXPECT_FALSE(std::equal(clean.begin() + per, clean.begin() + 2 * per, dirty.begin() + per)) << "request 1 unaffected?";
      const auto slot = [&](const StatePool& s, int i) {
        const auto* p = s.memory().as<const std::uint8_t>() + i * s.data().slot_bytes;
        return std::vector<std::uint8_t>(p, p + s.data().slot_bytes);
      };
      EXPECT_EQ(slot(clean_state, 0), slot(bad_state, 0));
      EXPECT_EQ(slot(clean_state, 2), slot(bad_state, 2));
    }
  }
}

}  // namespace
}  // namespace dsv4
