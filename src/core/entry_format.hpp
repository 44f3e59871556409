// Byte layout of one stored entry, and the host implementation of packing it.
#pragma once

#include <cstdint>

#include "dsv4/spec.hpp"

namespace dsv4 {

inline constexpr std::int64_t kFp8Block = 64;  // dims per ue8m0 scale in the fp8_ds format

// Where each part of an entry lies, in bytes from the entry's start.
struct EntryLayout {
  std::int64_t fp8_offset = 0;    // fp8 e4m3 codes of the no-rope dims
  std::int64_t fp8_count = 0;
  std::int64_t rope_offset = 0;   // bf16 rope dims (fp8_ds) or the whole bf16 entry (bf16)
  std::int64_t rope_count = 0;
  std::int64_t scale_offset = 0;  // one ue8m0 byte per fp8 block
  std::int64_t scale_count = 0;
  std::int64_t bytes = 0;         // padded to a multiple of 8

  static EntryLayout of(const CompressorSpec& spec);
};

// Stores one finished bf16 entry [head_dim] in the spec's entry format.
void pack_entry(const CompressorSpec& spec, const std::uint16_t* entry_bf16, std::uint8_t* dst);

}  // namespace dsv4
