// Bit-exact number formats shared by every backend: bf16, fp8 e4m3 and ue8m0 scales.
// Host and device code include this one header, so both backends round identically.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSV4_HD __host__ __device__ __forceinline__
#else
#define DSV4_HD inline
#endif

namespace dsv4::num {

DSV4_HD std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DSV4_HD float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 -> bf16, round to nearest even; NaN stays NaN (quiet).
DSV4_HD std::uint16_t bf16_from_f32(float f) {
  const std::uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

DSV4_HD float f32_from_bf16(std::uint16_t h) { return float_of(static_cast<std::uint32_t>(h) << 16); }

DSV4_HD float round_to_bf16(float f) { return f32_from_bf16(bf16_from_f32(f)); }

// Largest finite fp8 e4m3 (the "fn" variant: no infinities, 0x7f/0xff are NaN).
constexpr float kE4m3Max = 448.0f;
constexpr float kScaleFloor = 1e-8f;  // amax is clamped to at least this before scaling

// Exponent e of the block scale 2^ceil(log2(amax / 448)), amax clamped to >= 1e-8. Integer
// arithmetic on the bits of amax / 448, so the result never depends on a log2 implementation.
DSV4_HD int fp8_scale_exponent(float amax) {
  const float clamped = amax > kScaleFloor ? amax : kScaleFloor;
  const std::uint32_t u = bits_of(clamped / kE4m3Max);  // a normal number for any finite amax
  const int exponent = static_cast<int>((u >> 23) & 0xffu) - 127;
  return (u & 0x7fffffu) == 0 ? exponent : exponent + 1;
}

// The scale byte as stored: ue8m0, i.e. exponent + 127.
DSV4_HD std::uint8_t ue8m0_from_exponent(int exponent) {
  return static_cast<std::uint8_t>(exponent + 127);
}

// 2^exponent as a float, exact for -126 <= exponent <= 127.
DSV4_HD float exp2_int(int exponent) {
  return float_of(static_cast<std::uint32_t>(exponent + 127) << 23);
}

// fp32 -> fp8 e4m3fn code: round to nearest even, saturate at +-448, NaN -> 0x7f.
DSV4_HD std::uint8_t e4m3_from_f32(float f) {
  std::uint32_t u = bits_of(f);
  const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);
  const float a = float_of(u);
  if (a >= kE4m3Max) return static_cast<std::uint8_t>(sign | 0x7eu);
  if (a < 0.015625f) {  // below 2^-6: subnormal codes k * 2^-9, k = 0..8 (8 is the smallest normal)
    const float k = rintf(a * 512.0f);  // exact scaling; ties to even
    return static_cast<std::uint8_t>(sign | static_cast<std::uint8_t>(k));
  }
  // Normal: keep 3 mantissa bits, round to nearest even on the fp32 bits.
  const std::uint32_t rounded = (u + 0x7ffffu + ((u >> 20) & 1u)) & ~0xfffffu;
  const int exponent = static_cast<int>(rounded >> 23) - 127;  // -6 .. 8
  const std::uint32_t mantissa = (rounded >> 20) & 7u;
  return static_cast<std::uint8_t>(sign | ((exponent + 7) << 3) | mantissa);
}

// fp8 e4m3fn code -> fp32 (exact).
DSV4_HD float f32_from_e4m3(std::uint8_t code) {
  const int e = (code >> 3) & 0xf;
  const int m = code & 7;
  float v;
  if (e == 0xf && m == 7) {
    v = float_of(0x7fc00000u);
  } else if (e == 0) {
    v = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  } else {
    v = (1.0f + static_cast<float>(m) * 0.125f) * exp2_int(e - 7);
  }
  return (code & 0x80) ? -v : v;
}

}  // namespace dsv4::num
