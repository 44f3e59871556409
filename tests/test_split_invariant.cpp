// SPEC section 3: however sequences are split into calls and mixed into batches, the entries
// are bit-identical to those of one call per whole sequence, for every dtype combination.
#include <gtest/gtest.h>

#include <random>

#include "support/cases.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"

namespace dsv4 {
namespace {

using test::Case;

class SplitInvariant : public ::testing::TestWithParam<Case> {};

TEST_P(SplitInvariant, RandomSplitsAndMixesAreBitIdentical) {
  const Case c = GetParam();
  CompressorSpec spec = CompressorSpec::preset(Model::flash, c.kind);
  spec.hidden = 512;  // the invariant does not depend on the width of x; keep CI quick
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const std::int64_t max_len = spec.ratio == 4 ? 160 : 700;
  const auto seqs = test::random_sequences(9, 1, max_len, spec.hidden, rng);
  const Compressor comp(spec, w.view(spec), {.precision = c.precision});
  auto buffers = test::host_buffers();

  const test::Served whole = test::serve(comp, seqs, test::whole_schedule(seqs), *buffers, rng);
  ASSERT_EQ(whole.problems, "");
  for (int trial = 0; trial < 3; ++trial) {
    const test::Served split = test::serve(comp, seqs, test::random_schedule(seqs, rng), *buffers, rng);
    ASSERT_EQ(split.problems, "");
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      ASSERT_EQ(split.entries[i], whole.entries[i]) << "sequence " << i << " (length " << seqs[i].length
                                                    << "), trial " << trial << ", " << split.calls << " calls";
      ASSERT_EQ(split.cache[i], whole.cache[i]) << "sequence " << i << ", trial " << trial;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllKindsAndPrecisions, SplitInvariant, ::testing::ValuesIn(test::all_cases()),
                         test::case_name);

// A bf16 state rounds every kv/score value, so kv_score f32 + state bf16 must equal kv_score
// bf16 + state bf16 exactly: the rounding may not depend on whether a value passed the state.
TEST(SplitInvariant, Bf16StateRoundsEveryValue) {
  CompressorSpec spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  spec.hidden = 256;
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const auto seqs = test::random_sequences(5, 1, 90, spec.hidden, rng);
  auto buffers = test::host_buffers();
  const Compressor a(spec, w.view(spec), {.precision = {DType::f32, DType::bf16}});
  const Compressor b(spec, w.view(spec), {.precision = {DType::bf16, DType::bf16}});
  const auto ra = test::serve(a, seqs, test::random_schedule(seqs, rng), *buffers, rng);
  const auto rb = test::serve(b, seqs, test::whole_schedule(seqs), *buffers, rng);
  for (std::size_t i = 0; i < seqs.size(); ++i) EXPECT_EQ(ra.entries[i], rb.entries[i]) << i;
}

}  // namespace
}  // namespace dsv4
