// SPEC section 5: every bad input is rejected with an error naming the argument and what was
// expected, and changes nothing: state bytes, positions and cache bytes stay as they were.
#include <gtest/gtest.h>

#include "support/cases.hpp"

#include <functional>
#include <random>

#include "core/random_inputs.hpp"
#include "dsv4/compressor.hpp"

namespace dsv4 {
namespace {

std::uint64_t hash_bytes(const void* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<const std::uint8_t*>(p)[i]) * 1099511628211ull;
  return h;
}

// A compressor with some history: slot 0 at position 6, slot 1 at 9, slots 2.. fresh.
struct World {
  CompressorSpec spec;
  RandomWeights w;
  Compressor comp;
  StatePool state;
  std::vector<std::uint8_t> cache;
  std::mt19937_64 rng{std::random_device{}()};

  World() : spec(make()), w(random_weights(spec, 7)), comp(spec, w.view(spec)), state(comp, 4),
            cache(static_cast<std::size_t>(16 * spec.entry_bytes()), 0x5a) {
    Batch b;
    b.add(0, 0, 6);
    b.add(1, 0, 9);
    b.cache_locations = {0, 1, 2};
    const auto x = random_x(15, spec.hidden, rng);
    comp.forward(b, TensorView(x.data(), DType::bf16, {15, spec.hidden}), state, {.cache = cache_view()});
  }
  static CompressorSpec make() {
    auto s = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
    s.hidden = 128;
    return s;
  }
  TensorView cache_view() { return TensorView(cache.data(), DType::u8, {16, spec.entry_bytes()}); }
  std::uint64_t fingerprint() const {
    const TensorView m = state.memory();
    std::uint64_t h = hash_bytes(m.data, m.nbytes()) ^ (hash_bytes(cache.data(), cache.size()) * 3);
    for (std::int64_t s = 0; s < state.num_slots(); ++s) h = h * 31 + static_cast<std::uint64_t>(state.next_position(s));
    return h;
  }
};

// Runs `call`, expects dsv4::Error containing `fragment`, and no change to state or cache.
void expect_rejected(World& world, const std::function<void()>& call, const std::string& fragment) {
  const std::uint64_t before = world.fingerprint();
  try {
    call();
    ADD_FAILURE() << "accepted; expected an error mentioning '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << "message: " << e.what();
  }
  EXPECT_EQ(world.fingerprint(), before) << "state or cache changed by a rejected call (" << fragment << ")";
}

// A valid decode batch for slot 0 (position 6) and slot 1 (position 9), and its x.
struct Call {
  Batch batch;
  std::vector<std::uint16_t> x;
  std::vector<std::uint16_t> entries;
  Call(World& w) {
    batch.add(0, 6, 2);  // completes window 1
    batch.add(1, 9, 3);  // completes window 2
    batch.cache_locations = {10, 11};
    x = random_x(5, w.spec.hidden, w.rng);
    entries.resize(static_cast<std::size_t>(2 * w.spec.head_dim));
  }
  TensorView xv(const World& w) const { return TensorView(x.data(), DType::bf16, {5, w.spec.hidden}); }
  TensorView ev(const World& w) { return TensorView(entries.data(), DType::bf16, {2, w.spec.head_dim}); }
};

TEST(Validation, ValidCallIsAccepted) {
  World w;
  Call c(w);
  w.comp.forward(c.batch, c.xv(w), w.state, {.cache = w.cache_view(), .entries = c.ev(w)});
  EXPECT_EQ(w.state.next_position(0), 8);
  EXPECT_EQ(w.state.next_position(1), 12);
}

TEST(Validation, BadTensorsAreRejected) {
  World w;
  Call c(w);
  const auto run = [&](TensorView x, std::optional<TensorView> cache, std::optional<TensorView> entries) {
    return [&w, &c, x, cache, entries] { w.comp.forward(c.batch, x, w.state, {.cache = cache, .entries = entries}); };
  };
  std::vector<float> xf(5 * static_cast<std::size_t>(w.spec.hidden));
  expect_rejected(w, run(TensorView(xf.data(), DType::f32, {5, w.spec.hidden}), w.cache_view(), std::nullopt),
                  "x: expected bf16 [5, 128] on cpu, got f32 [5, 128]");
  expect_rejected(w, run(TensorView(c.x.data(), DType::bf16, {4, w.spec.hidden}), w.cache_view(), std::nullopt),
                  "x: expected bf16 [5, 128]");
  expect_rejected(w, run(TensorView(c.x.data(), DType::bf16, {5, 64}), w.cache_view(), std::nullopt), "x: expected");
  expect_rejected(w, run(TensorView(nullptr, DType::bf16, {5, w.spec.hidden}), w.cache_view(), std::nullopt),
                  "x: expected data");
  expect_rejected(w, run(c.xv(w), TensorView(w.cache.data(), DType::u8, {16, 512}), std::nullopt),
                  "outputs.cache: expected u8 [16, 584]");
  expect_rejected(w, run(c.xv(w), TensorView(w.cache.data(), DType::bf16, {16, 584}), std::nullopt),
                  "outputs.cache: expected u8");
  expect_rejected(w, run(c.xv(w), TensorView(w.cache.data(), DType::u8, {11, 584}), std::nullopt),
                  "batch.cache_locations[1]: expected a row below 11");
  expect_rejected(w, run(c.xv(w), w.cache_view(), TensorView(c.entries.data(), DType::bf16, {3, w.spec.head_dim})),
                  "outputs.entries: expected bf16 [2, 512]");
  expect_rejected(w, run(c.xv(w), w.cache_view(), TensorView(c.entries.data(), DType::f32, {2, 256})),
                  "outputs.entries: expected bf16 [2, 512]");
}

TEST(Validation, BadBatchesAreRejected) {
  World w;
  const auto with = [&](const std::function<void(Batch&)>& edit, const std::string& fragment) {
    Call c(w);
    edit(c.batch);
    std::int64_t tokens = 0;
    for (const auto& r : c.batch.requests) tokens += r.num_tokens;
    const auto x = random_x(std::max<std::int64_t>(tokens, 0), w.spec.hidden, w.rng);
    expect_rejected(w, [&] {
      w.comp.forward(c.batch, TensorView(x.data(), DType::bf16, {tokens, w.spec.hidden}), w.state,
                     {.cache = w.cache_view()});
    }, fragment);
  };
  with([](Batch& b) { b.requests[1].slot = 4; }, "batch.requests[1].slot: expected 0..3, got 4");
  with([](Batch& b) { b.requests[1].slot = -1; }, "batch.requests[1].slot: expected 0..3, got -1");
  with([](Batch& b) { b.requests[1].slot = 0; }, "batch.requests[1].slot: slot 0 is already used by batch.requests[0]");
  with([](Batch& b) { b.requests[0].start = 5; }, "batch.requests[0].start: expected 6 (the position slot 0 has reached) or 0");
  with([](Batch& b) { b.requests[1].start = 10; }, "batch.requests[1].start: expected 9");
  with([](Batch& b) { b.requests[0].start = -4; }, "batch.requests[0].start");
  with([](Batch& b) { b.requests[0].num_tokens = 0; }, "batch.requests[0].num_tokens: expected 1..");
  with([](Batch& b) { b.cache_locations = {10}; }, "batch.cache_locations: expected 2 locations");
  with([](Batch& b) { b.cache_locations = {10, 11, 12}; }, "batch.cache_locations: expected 2 locations");
  with([](Batch& b) { b.cache_locations = {10, -1}; }, "batch.cache_locations[1]: expected a row >= 0, got -1");
  with([](Batch& b) { b.cache_locations = {10, 10}; }, "batch.cache_locations[1]: row 10 is also given at batch.cache_locations[0]");
  with([](Batch& b) { b.cache_locations = {10, 16}; }, "batch.cache_locations[1]: expected a row below 16");
}

// A request claiming 2^31 tokens is refused on the cache-location count before the plan builds
// anything per entry (found by fuzzing the planner: it used to allocate for 2^29 entries).
TEST(Validation, HugeRequestsAreRefusedBeforeAllocating) {
  World w;
  Batch b;
  b.add(2, 0, std::int64_t{1} << 31);
  expect_rejected(w, [&] { w.comp.plan(b, w.state); }, "batch.cache_locations: expected 536870912 locations");
  b.requests[0].num_tokens = (std::int64_t{1} << 31) + 1;
  expect_rejected(w, [&] { w.comp.plan(b, w.state); }, "batch.requests[0].num_tokens: expected 1..2147483648");
}

TEST(Validation, StalePlansAndForeignPoolsAreRejected) {
  World w;
  Call c(w);
  const Plan plan = w.comp.plan(c.batch, w.state);
  w.comp.run(plan, c.xv(w), w.state, {.cache = w.cache_view()});
  // Running the same plan again would append the same positions twice.
  expect_rejected(w, [&] { w.comp.run(plan, c.xv(w), w.state, {.cache = w.cache_view()}); },
                  "the state moved since the plan was made");
  expect_rejected(w, [&] { w.comp.run(Plan{}, c.xv(w), w.state, {}); }, "plan: expected a plan made by Compressor::plan");

  const Compressor bf16(w.spec, w.w.view(w.spec), {.precision = {DType::bf16, DType::bf16}});
  StatePool other(bf16, 4);
  Call d(w);
  d.batch.requests[0].start = 0;
  d.batch.requests[1].start = 0;
  d.batch.cache_locations.clear();  // from position 0, 2 and 3 tokens complete no window
  expect_rejected(w, [&] { w.comp.plan(d.batch, other); }, "state: expected a pool made for this compressor");
  const Plan foreign = bf16.plan(d.batch, other);
  expect_rejected(w, [&] { w.comp.run(foreign, d.xv(w), w.state, {.cache = w.cache_view()}); },
                  "plan: expected a plan made by this compressor");
}

TEST(Validation, BadConstructionIsRejected) {
  auto spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  spec.hidden = 64;
  const RandomWeights rw = random_weights(spec, 1);
  const auto expect = test::expect_refused;
  auto bad = spec;
  bad.ratio = 16;
  expect([&] { Compressor(bad, rw.view(spec)); }, "spec.ratio: expected 4 or 128, got 16");
  bad = spec;
  bad.head_dim = 520;  // 456 no-rope dims
  expect([&] { Compressor(bad, rw.view(spec)); }, "spec.head_dim: the fp8_ds entry needs head_dim - rope.dim to be a positive multiple of 64");
  Weights w = rw.view(spec);
  w.wkv.shape = {1024, 63};
  expect([&] { Compressor(spec, w); }, "weights.wkv: expected bf16 [1024, 64] on cpu, got bf16 [1024, 63]");
  w = rw.view(spec);
  w.ape.dtype = DType::bf16;
  expect([&] { Compressor(spec, w); }, "weights.ape: expected f32 [4, 1024]");
  w = rw.view(spec);
  w.norm.shape = {256};
  expect([&] { Compressor(spec, w); }, "weights.norm: expected f32 or bf16 [512]");
  expect([&] { Compressor(spec, rw.view(spec), {.precision = {DType::u8, DType::f32}}); },
         "options.precision.kv_score: expected f32 or bf16, got u8");
  expect([&] { Compressor(spec, rw.view(spec), {.precision = {DType::f32, DType::i32}}); },
         "options.precision.state: expected f32 or bf16, got i32");
  const Compressor ok(spec, rw.view(spec));
  expect([&] { StatePool(ok, 0); }, "num_slots: expected 1..");
  std::vector<std::uint8_t> small(100);
  expect([&] { StatePool(ok, 2, TensorView(small.data(), DType::u8, {100})); }, "memory: expected u8 [");
  const auto bytes = static_cast<std::int64_t>(StatePool::bytes_required(spec, Options{}, 2));
  std::vector<std::uint8_t> room(static_cast<std::size_t>(bytes) + 32);
  auto* misaligned = room.data() + (16 - reinterpret_cast<std::uintptr_t>(room.data()) % 16) + 1;
  expect([&] { StatePool(ok, 2, TensorView(misaligned, DType::u8, {bytes})); }, "memory: expected data aligned to 16 bytes");
  if (!cuda_available())
    expect([&] { Compressor(spec, rw.view(spec), {.device = Device::cuda(0)}); }, "device: cuda:0");
}

}  // namespace
}  // namespace dsv4
