// Number formats against independent fp64 implementations: bf16 rounding, fp8 e4m3, the
// ue8m0 block scale, entry packing, the YaRN table and the RoPE angle.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <random>

#include "core/entry_format.hpp"
#include "core/numerics.hpp"
#include "core/rope.hpp"
#include "support/reference.hpp"

namespace dsv4 {
namespace {

std::mt19937_64 fresh_rng() { return std::mt19937_64(std::random_device{}()); }

TEST(Numerics, Bf16RoundingIsNearestEven) {
  auto rng = fresh_rng();
  std::uniform_int_distribution<std::uint32_t> bits;
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    const float f = num::float_of(bits(rng));
    if (!std::isfinite(f) || std::fabs(f) > 3e38f || std::fabs(f) < 1e-37f) continue;
    ASSERT_EQ(static_cast<double>(num::round_to_bf16(f)), test::round_bf16(f)) << f;
    ++checked;
  }
  // Exact ties go to the even mantissa.
  EXPECT_EQ(num::bf16_from_f32(num::float_of(0x3f808000u)), 0x3f80);
  EXPECT_EQ(num::bf16_from_f32(num::float_of(0x3f818000u)), 0x3f82);
  EXPECT_TRUE(std::isnan(num::f32_from_bf16(num::bf16_from_f32(std::nanf("")))));
  EXPECT_GT(checked, 100000);
}

TEST(Numerics, E4m3MatchesSearchQuantizer) {
  auto rng = fresh_rng();
  std::uniform_real_distribution<double> mag(-12.0, 9.5);
  std::vector<float> values;
  for (int i = 0; i < 100000; ++i) values.push_back(static_cast<float>((rng() & 1 ? -1 : 1) * std::exp2(mag(rng))));
  // Every code value and every midpoint between neighbours (exact ties).
  for (int c = 0; c < 127; ++c) {
    const float v = num::f32_from_e4m3(static_cast<std::uint8_t>(c));
    values.push_back(v);
    values.push_back(-v);
    if (c < 126) values.push_back(0.5f * (v + num::f32_from_e4m3(static_cast<std::uint8_t>(c + 1))));
  }
  values.insert(values.end(), {0.0f, 448.0f, 449.0f, 464.0f, 1e6f, -1e6f, 0.0009765625f, 0.00048828125f});
  for (float v : values) {
    const std::uint8_t got = num::e4m3_from_f32(v);
    const std::uint8_t want = test::quantize_e4m3(v);
    ASSERT_EQ(num::f32_from_e4m3(got), num::f32_from_e4m3(want)) << "value " << v;
  }
  EXPECT_EQ(num::e4m3_from_f32(std::nanf("")) & 0x7f, 0x7f);
}

TEST(Numerics, ScaleExponentIsCeilLog2) {
  auto rng = fresh_rng();
  std::uniform_real_distribution<double> mag(-40.0, 60.0);
  for (int i = 0; i < 100000; ++i) {
    const float amax = num::round_to_bf16(static_cast<float>(std::exp2(mag(rng))));
    const double clamped = std::max<double>(amax, 1e-8);
    ASSERT_EQ(num::fp8_scale_exponent(amax), static_cast<int>(std::ceil(std::log2(clamped / 448.0)))) << amax;
  }
  EXPECT_EQ(num::fp8_scale_exponent(448.0f), 0);
  EXPECT_EQ(num::fp8_scale_exponent(448.5f), 1);
  EXPECT_EQ(num::fp8_scale_exponent(224.0f), -1);
  EXPECT_EQ(num::fp8_scale_exponent(0.0f), static_cast<int>(std::ceil(std::log2(1e-8 / 448.0))));
}

TEST(Numerics, PackedEntryRoundTrips) {
  auto rng = fresh_rng();
  for (EntryFormat format : {EntryFormat::fp8_ds, EntryFormat::bf16}) {
    CompressorSpec spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
    spec.entry_format = format;
    const EntryLayout layout = EntryLayout::of(spec);
    if (format == EntryFormat::fp8_ds) {
      EXPECT_EQ(layout.bytes, 584);
      EXPECT_EQ(layout.rope_offset, 448);
      EXPECT_EQ(layout.scale_offset, 576);
      EXPECT_EQ(layout.scale_count, 7);
    } else {
      EXPECT_EQ(layout.bytes, 1024);
    }
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::uniform_real_distribution<float> block_scale(-20.0f, 20.0f);
    const int entries = 64;
    std::vector<std::uint16_t> e(static_cast<std::size_t>(entries * spec.head_dim));
    for (int k = 0; k < entries; ++k)
      for (int b = 0; b < spec.head_dim / 64; ++b) {
        const float s = std::exp2(block_scale(rng));  // blocks of very different magnitudes
        for (int i = 0; i < 64; ++i) e[static_cast<std::size_t>(k * spec.head_dim + b * 64 + i)] = num::bf16_from_f32(dist(rng) * s);
      }
    std::vector<std::uint8_t> packed(static_cast<std::size_t>(entries * layout.bytes), 0xab);
    for (int k = 0; k < entries; ++k) pack_entry(spec, e.data() + k * spec.head_dim, packed.data() + k * layout.bytes);
    EXPECT_EQ(test::check_stored_entries(spec, e, packed, entries), "");
    if (format == EntryFormat::fp8_ds) {
      // Decoded values sit within the fp8 rounding of the originals (3 mantissa bits).
      for (int k = 0; k < entries; ++k)
        for (int d = 0; d < spec.nope_dim(); ++d) {
          const std::uint8_t* row = packed.data() + k * layout.bytes;
          const float scale = num::exp2_int(row[layout.scale_offset + d / 64] - 127);
          const float decoded = num::f32_from_e4m3(row[d]) * scale;
          const float original = num::f32_from_bf16(e[static_cast<std::size_t>(k * spec.head_dim + d)]);
          ASSERT_LE(std::fabs(decoded - original), std::fabs(original) / 16 + scale * 0.001953125f) << k << " " << d;
        }
    }
  }
}

TEST(Numerics, YarnTableMatchesFp64Formula) {
  const RopeConfig rope;  // DeepSeek-V4 compressed-layer defaults
  const std::vector<float> table = yarn_inv_freq(rope);
  ASSERT_EQ(table.size(), 32u);
  const double dim = 64, base = 160000, factor = 16, length = 65536;
  auto corr = [&](double rot) { return dim * std::log(length / (rot * 2 * std::numbers::pi)) / (2 * std::log(base)); };
  const double low = std::max(std::floor(corr(32)), 0.0), high = std::min(std::ceil(corr(1)), dim - 1);
  for (int i = 0; i < 32; ++i) {
    const double freq = 1.0 / std::pow(base, 2.0 * i / dim);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double want = freq / factor * ramp + freq * (1 - ramp);
    EXPECT_NEAR(table[static_cast<std::size_t>(i)], want, want * 2e-6) << i;
  }
  // The fast dims keep the base frequency, the slow ones are divided by the factor.
  EXPECT_FLOAT_EQ(table[0], 1.0f);
  EXPECT_NEAR(table[31], 1.0 / std::pow(base, 62.0 / 64) / factor, 1e-12);
}

TEST(Numerics, RopeAngleStaysAccurateAtLongPositions) {
  const std::vector<float> table = yarn_inv_freq(RopeConfig{});
  for (std::int64_t pos : {std::int64_t{0}, std::int64_t{4}, std::int64_t{65536}, std::int64_t{1} << 20,
                           std::int64_t{999999} * 4}) {
    for (std::size_t i = 0; i < table.size(); ++i) {
      float c, s;
      rope_cos_sin(pos, table[i], &c, &s);
      const long double angle = static_cast<long double>(pos) * table[i];
      EXPECT_NEAR(c, static_cast<double>(std::cos(angle)), 1e-6) << pos << " " << i;
      EXPECT_NEAR(s, static_cast<double>(std::sin(angle)), 1e-6) << pos << " " << i;
    }
  }
}

}  // namespace
}  // namespace dsv4
