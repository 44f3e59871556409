#include "dsv4/spec.hpp"

#include <sstream>

#include "core/entry_format.hpp"

namespace dsv4 {

namespace {

bool is_power_of_two(std::int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

[[noreturn]] void reject(const std::string& what) { throw Error(what); }

}  // namespace

std::string_view entry_format_name(EntryFormat format) {
  return format == EntryFormat::fp8_ds ? "fp8_ds" : "bf16";
}

std::int64_t CompressorSpec::entry_bytes() const { return EntryLayout::of(*this).bytes; }

void CompressorSpec::validate() const {
  if (ratio != 4 && ratio != 128)
    reject("spec.ratio: expected 4 or 128, got " + std::to_string(ratio));
  if (hidden <= 0 || hidden > (1 << 20))
    reject("spec.hidden: expected 1..1048576, got " + std::to_string(hidden));
  if (head_dim <= 0 || head_dim > 8192)
    reject("spec.head_dim: expected 1..8192, got " + std::to_string(head_dim));
  if (rope.dim < 0 || rope.dim % 2 != 0 || rope.dim > head_dim)
    reject("spec.rope.dim: expected an even number in 0..head_dim (" + std::to_string(head_dim) +
           "), got " + std::to_string(rope.dim));
  if (!(rope.theta > 1.0) || !(rope.yarn_factor >= 1.0) || rope.original_max_position <= 0 ||
      !(rope.beta_fast > 0.0) || !(rope.beta_slow > 0.0))
    reject("spec.rope: expected theta > 1, yarn_factor >= 1, original_max_position > 0 and "
           "positive betas");
  if (!(rms_eps > 0.0f)) reject("spec.rms_eps: expected a positive number");
  if (rotate && !is_power_of_two(head_dim))
    reject("spec.head_dim: the Hadamard rotation needs a power of two, got " +
           std::to_string(head_dim));
  if (entry_format == EntryFormat::fp8_ds && (nope_dim() <= 0 || nope_dim() % kFp8Block != 0))
    reject("spec.head_dim: the fp8_ds entry needs head_dim - rope.dim to be a positive multiple "
           "of " + std::to_string(kFp8Block) + ", got " + std::to_string(head_dim) + " - " +
           std::to_string(rope.dim));
}

std::string CompressorSpec::describe() const {
  std::ostringstream s;
  s << "ratio " << ratio << (overlap() ? " (overlapping)" : "") << ", hidden " << hidden
    << ", head_dim " << head_dim << ", rope_dim " << rope.dim << (rotate ? ", rotated" : "")
    << ", entry " << entry_format_name(entry_format) << " (" << entry_bytes() << " bytes)";
  return s.str();
}

ModelShape model_shape(Model model) {
  return model == Model::flash ? ModelShape{4096, 21, 20} : ModelShape{7168, 30, 31};
}

std::string_view model_name(Model model) {
  return model == Model::flash ? "DeepSeek-V4-Flash" : "DeepSeek-V4-Pro";
}

std::string_view kind_name(CompressorKind kind) {
  switch (kind) {
    case CompressorKind::csa_main: return "CSA main";
    case CompressorKind::csa_indexer: return "CSA indexer";
    case CompressorKind::hca: return "HCA";
  }
  return "?";
}

CompressorSpec CompressorSpec::preset(Model model, CompressorKind kind) {
  CompressorSpec spec;
  spec.hidden = model_shape(model).hidden;
  switch (kind) {
    case CompressorKind::csa_main:
      spec.ratio = 4;
      spec.head_dim = 512;
      break;
    case CompressorKind::csa_indexer:
      spec.ratio = 4;
      spec.head_dim = 128;
      spec.rotate = true;
      spec.entry_format = EntryFormat::bf16;
      break;
    case CompressorKind::hca:
      spec.ratio = 128;
      spec.head_dim = 512;
      break;
  }
  return spec;
}

CompressorSpec CompressorSpec::from_shapes(const std::vector<std::int64_t>& wkv,
                                           const std::vector<std::int64_t>& wgate,
                                           const std::vector<std::int64_t>& ape,
                                           const std::vector<std::int64_t>& norm, bool indexer) {
  if (norm.size() != 1 || norm[0] <= 0)
    reject("norm.weight: expected shape [head_dim], got " + shape_string(norm));
  const std::int64_t head_dim = norm[0];
  if (ape.size() != 2) reject("ape: expected shape [ratio, coff*head_dim], got " + shape_string(ape));
  const std::int64_t ratio = ape[0];
  if (ratio != 4 && ratio != 128)
    reject("ape: its first dimension is the ratio, expected 4 or 128, got " + std::to_string(ratio));
  const std::int64_t coff = ratio == 4 ? 2 : 1;
  if (ape[1] != coff * head_dim)
    reject("ape: expected shape [" + std::to_string(ratio) + ", " + std::to_string(coff * head_dim) +
           "] (coff " + std::to_string(coff) + " x head_dim " + std::to_string(head_dim) +
           "), got " + shape_string(ape));
  if (wkv.size() != 2 || wkv[0] != coff * head_dim || wkv[1] <= 0)
    reject("wkv.weight: expected shape [" + std::to_string(coff * head_dim) + ", hidden], got " +
           shape_string(wkv));
  if (wgate != wkv)
    reject("wgate.weight: expected the shape of wkv.weight " + shape_string(wkv) + ", got " +
           shape_string(wgate));
  CompressorSpec spec;
  spec.hidden = wkv[1];
  spec.head_dim = head_dim;
  spec.ratio = ratio;
  spec.rotate = indexer;
  spec.entry_format = indexer ? EntryFormat::bf16 : EntryFormat::fp8_ds;
  spec.validate();
  return spec;
}

}  // namespace dsv4
