// WindowState::running (ratio 128): the incomplete window kept as running softmax
// accumulators. Within SPEC section 4 of the fp64 formula, splits change entries by rounding
// only, and the slot is 3 x head_dim floats.
#include <gtest/gtest.h>

#include <random>

#include "core/numerics.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"

namespace dsv4 {
namespace {

std::vector<double> as_double(const std::vector<std::vector<std::uint16_t>>& entries) {
  std::vector<double> out;
  for (const auto& e : entries)
    for (auto v : e) out.push_back(num::f32_from_bf16(v));
  return out;
}

std::vector<std::uint16_t> flat(const std::vector<std::vector<std::uint16_t>>& entries) {
  std::vector<std::uint16_t> out;
  for (const auto& e : entries) out.insert(out.end(), e.begin(), e.end());
  return out;
}

TEST(RunningAccumulators, WithinToleranceOfFp64AndOfRowsAcrossSplits) {
  for (DType score : {DType::f32, DType::bf16})
    for (DType state : {DType::f32, DType::bf16}) {
      const CompressorSpec spec = CompressorSpec::preset(Model::flash, CompressorKind::hca);
      std::mt19937_64 rng(std::random_device{}());
      const RandomWeights w = random_weights(spec, rng());
      const Precision p{score, state};
      const Compressor running(spec, w.view(spec), {.precision = p, .window_state = WindowState::running});
      const Compressor rows(spec, w.view(spec), {.precision = p});
      const auto seqs = test::random_sequences(3, 128, 400, spec.hidden, rng);
      auto buffers = test::host_buffers();
      const auto split = test::serve(running, seqs, test::random_schedule(seqs, rng), *buffers, rng);
      const auto whole = test::serve(running, seqs, test::whole_schedule(seqs), *buffers, rng);
      const auto exact = test::serve(rows, seqs, test::whole_schedule(seqs), *buffers, rng);
      ASSERT_EQ(split.problems, "");
      std::vector<double> ref;
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        const auto r = test::reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
        ref.insert(ref.end(), r.begin(), r.end());
        EXPECT_EQ(test::check_stored_entries(spec, split.entries[i], split.cache[i], seqs[i].length / spec.ratio), "");
      }
      const double vs_ref = test::relative_l2(flat(split.entries), ref);
      const double vs_whole = test::relative_l2(flat(split.entries), as_double(whole.entries));
      const double vs_rows = test::relative_l2(flat(split.entries), as_double(exact.entries));
      std::printf("    running, kv_score %s state %s: vs fp64 %.3g, split vs whole %.3g, vs rows %.3g\n",
                  std::string(dtype_name(score)).c_str(), std::string(dtype_name(state)).c_str(), vs_ref, vs_whole, vs_rows);
      EXPECT_LE(vs_ref, test::tolerance(p));
      // Splits and the accumulator form move entries by bf16 rounding flips only.
      EXPECT_LE(vs_whole, 2e-3);
      EXPECT_LE(vs_rows, 2e-3);
    }
}

TEST(RunningAccumulators, SlotSizeAndValidation) {
  auto spec = CompressorSpec::preset(Model::flash, CompressorKind::hca);
  spec.hidden = 64;
  const RandomWeights w = random_weights(spec, 1);
  const Options running{.window_state = WindowState::running};
  EXPECT_EQ(StatePool::bytes_required(spec, running, 10), 10u * 3 * 512 * 4);
  EXPECT_EQ(StatePool::bytes_required(spec, Options{}, 10), 10u * 128 * 1024 * 4);
  const Compressor a(spec, w.view(spec), running), b(spec, w.view(spec));
  StatePool pool_b(b, 2);
  Batch batch;
  batch.add(0, 0, 5);
  try {
    a.plan(batch, pool_b);
    ADD_FAILURE() << "a rows pool accepted by a running compressor";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("window state"), std::string::npos) << e.what();
  }
  auto csa = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  csa.hidden = 64;
  const RandomWeights wc = random_weights(csa, 2);
  try {
    Compressor(csa, wc.view(csa), running);
    ADD_FAILURE() << "running accumulators accepted for ratio 4";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("options.window_state: running accumulators need ratio 128"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace dsv4
