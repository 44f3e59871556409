// libFuzzer target: batch planning and validation. The input describes a compressor (kind,
// dtypes), a pool and a series of calls with arbitrary slots, starts, token counts, cache
// locations and cache sizes. Each call must either run or be refused with dsv4::Error, and a
// refused call must leave the state (bytes and positions) and the cache exactly as they were.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/random_inputs.hpp"
#include "dsv4/compressor.hpp"

namespace {

struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t u8() { return n ? (--n, *p++) : 0; }
  std::int64_t i16() { return static_cast<std::int16_t>(u8() | (u8() << 8)); }
};

// Everything a call may change: state bytes, slot positions and cache bytes.
struct Snapshot {
  std::vector<std::uint8_t> state, cache;
  std::vector<std::int64_t> positions;
  Snapshot(const dsv4::StatePool& s, const std::vector<std::uint8_t>& c) : cache(c) {
    const dsv4::TensorView m = s.memory();
    state.assign(m.as<std::uint8_t>(), m.as<std::uint8_t>() + m.nbytes());
    for (std::int64_t i = 0; i < s.num_slots(); ++i) positions.push_back(s.next_position(i));
  }
  bool operator==(const Snapshot&) const = default;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace dsv4;
  Reader in{data, size};
  const auto kind = static_cast<CompressorKind>(in.u8() % 3);
  CompressorSpec spec = CompressorSpec::preset(Model::flash, kind);
  spec.hidden = 8;
  const std::uint8_t dt = in.u8();
  const Precision precision{dt & 1 ? DType::bf16 : DType::f32, dt & 2 ? DType::bf16 : DType::f32};
  static const RandomWeights weights[3] = {
      random_weights([] { auto s = CompressorSpec::preset(Model::flash, CompressorKind::csa_main); s.hidden = 8; return s; }(), 1),
      random_weights([] { auto s = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer); s.hidden = 8; return s; }(), 2),
      random_weights([] { auto s = CompressorSpec::preset(Model::flash, CompressorKind::hca); s.hidden = 8; return s; }(), 3)};
  const Compressor comp(spec, weights[static_cast<int>(kind)].view(spec), {.precision = precision});
  StatePool state(comp, 1 + in.u8() % 6);
  const std::int64_t cache_rows = in.u8() % 24;
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(cache_rows * spec.entry_bytes()), 0x5a);

  for (int call = 0; call < 8 && in.n > 0; ++call) {
    Batch batch;
    const int requests = in.u8() % 5;
    for (int r = 0; r < requests; ++r) {
      const std::int64_t slot = static_cast<std::int8_t>(in.u8());
      // Mostly starts the pool accepts (its position or 0), sometimes anything.
      const std::uint8_t how = in.u8();
      std::int64_t start = in.i16();
      if (how % 4 == 0) start = 0;
      else if (how % 4 == 1 && slot >= 0 && slot < state.num_slots()) start = state.next_position(slot);
      const std::int64_t tokens = (how & 0x80) ? in.i16() : 1 + in.u8() % 140;
      batch.add(slot, start, tokens);
    }
    const int locations = in.u8() % 40;
    for (int k = 0; k < locations; ++k) batch.cache_locations.push_back(in.u8() & 1 ? in.i16() : k);
    std::int64_t x_rows = 0;
    for (const Request& r : batch.requests) x_rows += r.num_tokens > 0 && r.num_tokens < 4096 ? r.num_tokens : 0;
    x_rows += static_cast<std::int8_t>(in.u8()) % 3 == 0 ? 1 : 0;  // sometimes one row too many
    std::vector<std::uint16_t> x(static_cast<std::size_t>(x_rows * spec.hidden), 0x3f80);
    const Snapshot before(state, cache);
    try {
      comp.forward(batch, TensorView(x.data(), DType::bf16, {x_rows, spec.hidden}), state,
                   {.cache = TensorView(cache.data(), DType::u8, {cache_rows, spec.entry_bytes()})});
    } catch (const Error&) {
      if (!(Snapshot(state, cache) == before)) std::abort();  // a refused call changed something
    }
  }
  return 0;
}
