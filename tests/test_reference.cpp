// The CPU backend against the fp64 evaluation of SPEC section 2, at the released models'
// sizes, on fresh random inputs, through random serving schedules.
#include <gtest/gtest.h>

#include <random>

#include "support/cases.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"

namespace dsv4 {
namespace {

using test::Case;

class CpuVsFp64 : public ::testing::TestWithParam<Case> {};

TEST_P(CpuVsFp64, FlashSizedLayerWithinSpecTolerance) {
  const Case c = GetParam();
  const CompressorSpec spec = CompressorSpec::preset(Model::flash, c.kind);
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  // Enough tokens for several windows of each ratio, with ragged tails.
  const std::int64_t min_len = spec.ratio == 4 ? 1 : 128, max_len = spec.ratio == 4 ? 120 : 600;
  const auto seqs = test::random_sequences(4, min_len, max_len, spec.hidden, rng);

  const Compressor comp(spec, w.view(spec), {.precision = c.precision});
  auto buffers = test::host_buffers();
  const test::Served served = test::serve(comp, seqs, test::random_schedule(seqs, rng), *buffers, rng);
  ASSERT_EQ(served.problems, "");

  std::vector<std::uint16_t> all;
  std::vector<double> ref;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const auto r = test::reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
    ref.insert(ref.end(), r.begin(), r.end());
    all.insert(all.end(), served.entries[i].begin(), served.entries[i].end());
    EXPECT_EQ(test::check_stored_entries(spec, served.entries[i], served.cache[i],
                                         seqs[i].length / spec.ratio), "");
  }
  ASSERT_GT(ref.size(), 0u);
  const double err = test::relative_l2(all, ref);
  RecordProperty("relative_l2", std::to_string(err));
  std::printf("    %s kv_score %s state %s: %zu entries, relative L2 %.3g (tolerance %.0e)\n",
              std::string(kind_name(c.kind)).c_str(), std::string(dtype_name(c.precision.kv_score)).c_str(),
              std::string(dtype_name(c.precision.state)).c_str(), all.size() / static_cast<std::size_t>(spec.head_dim),
              err, test::tolerance(c.precision));
  EXPECT_LE(err, test::tolerance(c.precision));
}

INSTANTIATE_TEST_SUITE_P(AllKindsAndPrecisions, CpuVsFp64, ::testing::ValuesIn(test::all_cases()),
                         test::case_name);

}  // namespace
}  // namespace dsv4
