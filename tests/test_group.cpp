// CompressorGroup: a CSA layer's main and indexer compressors fed by one projection give the
// same entries as each compressor alone, and bad group calls are rejected.
#include <gtest/gtest.h>

#include "support/cases.hpp"

#include <random>

#include "core/random_inputs.hpp"
#include "support/group.hpp"
#include "support/serving.hpp"

namespace dsv4 {
namespace {

TEST(CompressorGroup, SharedProjectionEqualsSoloRuns) {
  for (DType state : {DType::f32, DType::bf16}) {
    auto main_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
    auto idx_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer);
    main_spec.hidden = idx_spec.hidden = 512;
    std::mt19937_64 rng(std::random_device{}());
    const auto wm = random_weights(main_spec, rng()), wi = random_weights(idx_spec, rng());
    const Options opts{.precision = {DType::f32, state}};
    const Compressor main(main_spec, wm.view(main_spec), opts), indexer(idx_spec, wi.view(idx_spec), opts);
    const CompressorGroup group({&main, &indexer});
    const auto seqs = test::random_sequences(6, 1, 120, main_spec.hidden, rng);
    auto buffers = test::host_buffers();
    const auto schedule = test::random_schedule(seqs, rng);
    const auto together = test::serve_group(group, seqs, schedule, *buffers);
    const auto alone_main = test::serve(main, seqs, test::whole_schedule(seqs), *buffers, rng);
    const auto alone_idx = test::serve(indexer, seqs, test::whole_schedule(seqs), *buffers, rng);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      EXPECT_EQ(together[0][i], alone_main.entries[i]) << "main, sequence " << i;
      EXPECT_EQ(together[1][i], alone_idx.entries[i]) << "indexer, sequence " << i;
    }
  }
}

TEST(CompressorGroup, BadGroupsAndCallsAreRejected) {
  auto main_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  auto idx_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer);
  main_spec.hidden = 128;
  idx_spec.hidden = 64;
  const auto wm = random_weights(main_spec, 1), wi = random_weights(idx_spec, 2);
  const Compressor main(main_spec, wm.view(main_spec)), narrow(idx_spec, wi.view(idx_spec));
  const auto expect = test::expect_refused;
  expect([&] { CompressorGroup({&main, &narrow}); }, "members[1]: expected hidden 128 like members[0], got 64");
  expect([&] { CompressorGroup({&main, &main}); }, "members[1]: the same compressor as members[0]");
  expect([&] { CompressorGroup({}); }, "members: expected at least one");
  idx_spec.hidden = 128;
  const auto wi2 = random_weights(idx_spec, 3);
  const Compressor bf16(idx_spec, wi2.view(idx_spec), {.precision = {DType::bf16, DType::f32}});
  expect([&] { CompressorGroup({&main, &bf16}); }, "members[1]: expected kv_score f32 like members[0]");

  const Compressor indexer(idx_spec, wi2.view(idx_spec));
  const CompressorGroup group({&main, &indexer});
  StatePool sm(main, 2), si(indexer, 2);
  Batch a, b;
  a.add(0, 0, 5);
  a.cache_locations = {0};
  b.add(1, 0, 6);
  b.cache_locations = {0};
  expect([&] { group.plan({a, b}, {&sm, &si}); }, "batches[1].requests[0]: expected start 0 and 5 tokens like batches[0]");
  expect([&] { group.plan({a}, {&sm, &si}); }, "batches: expected 2 (one per member), got 1");
  b = a;
  b.requests[0].slot = 1;
  const GroupPlan plan = group.plan({a, b}, {&sm, &si});
  std::vector<std::uint16_t> x(5 * 128);
  // A member's plan inside a group plan cannot run on its own.
  expect([&] { main.run(plan.plans()[0], TensorView(x.data(), DType::bf16, {5, 128}), sm, {}); },
         "plan: made by a CompressorGroup");
  expect([&] { group.run(plan, TensorView(x.data(), DType::bf16, {4, 128}), {&sm, &si}, {{}, {}}); },
         "x: expected bf16 [5, 128]");
  EXPECT_EQ(sm.next_position(0), 0);
  EXPECT_EQ(si.next_position(1), 0);
  group.run(plan, TensorView(x.data(), DType::bf16, {5, 128}), {&sm, &si}, {{}, {}});
  EXPECT_EQ(sm.next_position(0), 5);
  EXPECT_EQ(si.next_position(1), 5);
}

}  // namespace
}  // namespace dsv4
