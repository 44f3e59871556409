// Edge cases of windows and positions: short sequences, exact multiples, the first overlap
// window, slot reuse, empty batches and long positions.
#include <gtest/gtest.h>

#include <random>

#include "core/numerics.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"

namespace dsv4 {
namespace {

struct Small {
  CompressorSpec spec;
  RandomWeights w;
  Compressor comp;
  explicit Small(CompressorKind kind, std::int64_t hidden = 256, std::uint64_t seed = std::random_device{}())
      : spec(make(kind, hidden)), w(random_weights(spec, seed)), comp(spec, w.view(spec)) {}
  static CompressorSpec make(CompressorKind kind, std::int64_t hidden) {
    auto s = CompressorSpec::preset(Model::flash, kind);
    s.hidden = hidden;
    return s;
  }
};

// Appends x[0..n) to `slot` from position `start`; returns the bf16 entries the call completes.
std::vector<std::uint16_t> append(const Compressor& c, StatePool& state, std::int64_t slot, std::int64_t start,
                                  const std::uint16_t* x, std::int64_t n) {
  const CompressorSpec& spec = c.spec();
  const std::int64_t e = windows_completed(start, n, spec.ratio);
  Batch b;
  b.add(slot, start, n);
  for (std::int64_t k = 0; k < e; ++k) b.cache_locations.push_back(k);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(e * spec.head_dim), 0xffff);
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(std::max<std::int64_t>(e, 1) * spec.entry_bytes()));
  c.forward(b, TensorView(x, DType::bf16, {n, spec.hidden}), state,
            {.cache = TensorView(cache.data(), DType::u8, {std::max<std::int64_t>(e, 1), spec.entry_bytes()}),
             .entries = TensorView(out.data(), DType::bf16, {e, spec.head_dim})});
  return out;
}

TEST(EdgeCases, SequenceShorterThanAWindowWaitsInTheState) {
  for (auto kind : {CompressorKind::csa_main, CompressorKind::hca}) {
    Small s(kind);
    std::mt19937_64 rng(std::random_device{}());
    const std::int64_t r = s.spec.ratio;
    const auto x = random_x(r, s.spec.hidden, rng);
    StatePool state(s.comp, 2);
    EXPECT_TRUE(append(s.comp, state, 1, 0, x.data(), r - 1).empty());
    EXPECT_EQ(state.next_position(1), r - 1);
    const auto last = append(s.comp, state, 1, r - 1, x.data() + (r - 1) * s.spec.hidden, 1);
    StatePool fresh(s.comp, 1);
    const auto whole = append(s.comp, fresh, 0, 0, x.data(), r);
    ASSERT_EQ(last.size(), static_cast<std::size_t>(s.spec.head_dim));
    EXPECT_EQ(last, whole);
    EXPECT_LE(test::relative_l2(whole, test::reference_entries(s.spec, s.w, x.data(), r)), 2e-3);
  }
}

TEST(EdgeCases, ExactMultiplesAndFirstOverlapWindow) {
  Small s(CompressorKind::csa_main);
  std::mt19937_64 rng(std::random_device{}());
  for (std::int64_t len : {4, 8, 12, 64}) {
    const auto x = random_x(len, s.spec.hidden, rng);
    StatePool state(s.comp, 1);
    std::vector<std::uint16_t> got;
    for (std::int64_t p = 0; p < len; p += 4) {  // one window per call
      const auto e = append(s.comp, state, 0, p, x.data() + p * s.spec.hidden, 4);
      ASSERT_EQ(e.size(), static_cast<std::size_t>(s.spec.head_dim));
      got.insert(got.end(), e.begin(), e.end());
    }
    // Window 0 has no previous window: its 4 overlap slots must carry no weight.
    EXPECT_LE(test::relative_l2(got, test::reference_entries(s.spec, s.w, x.data(), len)), 2e-3) << len;
  }
}

TEST(EdgeCases, ReusedSlotStartsFresh) {
  Small s(CompressorKind::csa_main);
  std::mt19937_64 rng(std::random_device{}());
  const auto a = random_x(10, s.spec.hidden, rng), b = random_x(9, s.spec.hidden, rng);
  StatePool state(s.comp, 1);
  append(s.comp, state, 0, 0, a.data(), 10);  // leaves tokens 4..9 in the slot
  // A new request in the same slot, starting at 0 without release(): old tokens must not leak.
  const auto reused = append(s.comp, state, 0, 0, b.data(), 9);
  StatePool fresh(s.comp, 1);
  EXPECT_EQ(reused, append(s.comp, fresh, 0, 0, b.data(), 9));
  state.release(0);
  EXPECT_EQ(state.next_position(0), 0);
}

TEST(EdgeCases, EmptyBatchIsANoOp) {
  Small s(CompressorKind::hca);
  StatePool state(s.comp, 3);
  const auto before = state.memory();
  std::vector<std::uint8_t> snapshot(before.as<std::uint8_t>(), before.as<std::uint8_t>() + before.nbytes());
  const Plan plan = s.comp.plan(Batch{}, state);
  EXPECT_EQ(plan.num_tokens(), 0);
  EXPECT_EQ(plan.num_entries(), 0);
  s.comp.run(plan, TensorView(nullptr, DType::bf16, {0, s.spec.hidden}), state, {});
  EXPECT_TRUE(std::equal(snapshot.begin(), snapshot.end(), state.memory().as<std::uint8_t>()));
}

// Positions past YaRN's original length (65536) through the whole pipeline: the RoPE angle
// at large positions is where fp32 shortcuts would show.
TEST(EdgeCases, LongPositionsMatchFp64) {
  for (auto kind : {CompressorKind::hca, CompressorKind::csa_indexer}) {
    Small s(kind, /*hidden=*/16);
    std::mt19937_64 rng(std::random_device{}());
    const std::int64_t len = 70000 + static_cast<std::int64_t>(rng() % 700);
    const auto x = random_x(len, s.spec.hidden, rng);
    StatePool state(s.comp, 1);
    std::vector<std::uint16_t> got;
    for (std::int64_t p = 0; p < len;) {
      const std::int64_t n = std::min<std::int64_t>(len - p, 1 + static_cast<std::int64_t>(rng() % 9000));
      const auto e = append(s.comp, state, 0, p, x.data() + p * s.spec.hidden, n);
      got.insert(got.end(), e.begin(), e.end());
      p += n;
    }
    const auto ref = test::reference_entries(s.spec, s.w, x.data(), len);
    // The last entries on their own: positions beyond 65536.
    const std::size_t tail = static_cast<std::size_t>(16 * s.spec.head_dim);
    const std::vector<std::uint16_t> got_tail(got.end() - static_cast<std::ptrdiff_t>(tail), got.end());
    const std::vector<double> ref_tail(ref.end() - static_cast<std::ptrdiff_t>(tail), ref.end());
    EXPECT_LE(test::relative_l2(got_tail, ref_tail), 2e-3) << kind_name(kind);
    EXPECT_LE(test::relative_l2(got, ref), 2e-3) << kind_name(kind);
  }
}

}  // namespace
}  // namespace dsv4
