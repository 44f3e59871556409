// What a compressor is: its shapes, its ratio and the post-processing of its entries.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dsv4/types.hpp"

namespace dsv4 {

enum class Model { flash, pro };
enum class CompressorKind { csa_main, csa_indexer, hca };

// How a finished entry is stored in the compressed-KV cache.
enum class EntryFormat {
  // Canonical DeepSeek-V4 entry: fp8 e4m3 no-rope dims (one ue8m0 scale per 64), bf16 rope
  // dims: fp8[head_dim - rope_dim] | bf16[rope_dim] | ue8m0[(head_dim - rope_dim) / 64] | pad.
  fp8_ds,
  // The bf16 entry as it is (the indexer's usual format): bf16[head_dim].
  bf16,
};

std::string_view entry_format_name(EntryFormat format);

// RoPE of the compressed layers: YaRN-scaled inverse frequencies, interleaved pairs.
struct RopeConfig {
  std::int64_t dim = 64;
  double theta = 160000.0;
  double yarn_factor = 16.0;
  std::int64_t original_max_position = 65536;
  double beta_fast = 32.0;
  double beta_slow = 1.0;

  friend bool operator==(const RopeConfig&, const RopeConfig&) = default;
};

struct CompressorSpec {
  std::int64_t hidden = 0;    // width of x
  std::int64_t head_dim = 0;  // width of one compressed entry
  std::int64_t ratio = 0;     // tokens per window: 4 (overlapping windows) or 128
  bool rotate = false;        // Walsh-Hadamard rotation of the entry (the CSA indexer)
  EntryFormat entry_format = EntryFormat::fp8_ds;
  RopeConfig rope;
  float rms_eps = 1e-6f;

  // Ratio 4 pools each window together with the previous one (8 slots); ratio 128 does not.
  bool overlap() const { return ratio == 4; }
  std::int64_t coff() const { return overlap() ? 2 : 1; }
  // Width of one kv_score row: kv (coff * head_dim) then score (coff * head_dim).
  std::int64_t projection_width() const { return 2 * coff() * head_dim; }
  std::int64_t nope_dim() const { return head_dim - rope.dim; }
  // Bytes of one stored entry in the compressed-KV cache.
  std::int64_t entry_bytes() const;

  // Throws dsv4::Error naming the first field that is out of range.
  void validate() const;
  std::string describe() const;

  static CompressorSpec preset(Model model, CompressorKind kind);
  // From a checkpoint's tensor shapes: wkv and wgate [coff*head_dim, hidden], ape
  // [ratio, coff*head_dim], norm [head_dim]. `indexer` selects rotation and bf16 entries.
  static CompressorSpec from_shapes(const std::vector<std::int64_t>& wkv,
                                    const std::vector<std::int64_t>& wgate,
                                    const std::vector<std::int64_t>& ape,
                                    const std::vector<std::int64_t>& norm, bool indexer);

  friend bool operator==(const CompressorSpec&, const CompressorSpec&) = default;
};

// Hidden size and layer counts of the released models.
struct ModelShape {
  std::int64_t hidden;
  int csa_layers;
  int hca_layers;
};
ModelShape model_shape(Model model);
std::string_view model_name(Model model);
std::string_view kind_name(CompressorKind kind);

}  // namespace dsv4
