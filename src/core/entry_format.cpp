#include "core/entry_format.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/numerics.hpp"

namespace dsv4 {

EntryLayout EntryLayout::of(const CompressorSpec& spec) {
  EntryLayout layout;
  if (spec.entry_format == EntryFormat::fp8_ds) {
    layout.fp8_count = spec.nope_dim();
    layout.rope_offset = layout.fp8_count;
    layout.rope_count = spec.rope.dim;
    layout.scale_offset = layout.rope_offset + 2 * layout.rope_count;
    layout.scale_count = spec.nope_dim() / kFp8Block;
    layout.bytes = layout.scale_offset + layout.scale_count;
  } else {
    layout.rope_count = spec.head_dim;
    layout.scale_offset = 2 * spec.head_dim;
    layout.bytes = layout.scale_offset;
  }
  layout.bytes = (layout.bytes + 7) / 8 * 8;
  return layout;
}

void pack_entry(const CompressorSpec& spec, const std::uint16_t* entry_bf16, std::uint8_t* dst) {
  const EntryLayout layout = EntryLayout::of(spec);
  std::memset(dst, 0, static_cast<std::size_t>(layout.bytes));
  if (spec.entry_format == EntryFormat::bf16) {
    std::memcpy(dst, entry_bf16, static_cast<std::size_t>(2 * spec.head_dim));
    return;
  }
  for (std::int64_t block = 0; block < layout.scale_count; ++block) {
    const std::uint16_t* src = entry_bf16 + block * kFp8Block;
    float amax = 0.0f;
    for (std::int64_t i = 0; i < kFp8Block; ++i)
      amax = std::max(amax, std::fabs(num::f32_from_bf16(src[i])));
    const int exponent = num::fp8_scale_exponent(amax);
    const float inv_scale = num::exp2_int(-exponent);
    for (std::int64_t i = 0; i < kFp8Block; ++i)
      dst[layout.fp8_offset + block * kFp8Block + i] =
          num::e4m3_from_f32(num::f32_from_bf16(src[i]) * inv_scale);
    dst[layout.scale_offset + block] = num::ue8m0_from_exponent(exponent);
  }
  std::memcpy(dst + layout.rope_offset, entry_bf16 + spec.nope_dim(),
              static_cast<std::size_t>(2 * spec.rope.dim));
}

}  // namespace dsv4
