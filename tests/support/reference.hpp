// An fp64 evaluation of SPEC section 2 over one whole sequence, written independently of the
// library's backends, and the comparisons the tests make against it.
#pragma once

#include <cstdint>
#include <vector>

#include "core/random_inputs.hpp"
#include "dsv4/compressor.hpp"

namespace dsv4::test {

// Round to the nearest bf16 value, ties to even, straight from fp64 (no detour via fp32).
double round_bf16(double v);

// Entries [L / ratio, head_dim] of one sequence x (bf16 [L, hidden]) in fp64, with the bf16
// roundings SPEC section 2 prescribes after pooling, norm, RoPE and rotation.
std::vector<double> reference_entries(const CompressorSpec& spec, const RandomWeights& w,
                                      const std::uint16_t* x, std::int64_t length);

// ||a - b|| / ||b|| over bf16 entries a and fp64 entries b; +inf if any value is not finite.
double relative_l2(const std::vector<std::uint16_t>& a, const std::vector<double>& b);

// The SPEC section 4 tolerance for a precision.
double tolerance(Precision p);

// Nearest fp8 e4m3fn code to x by search over every finite value, ties to the even code,
// saturating at +-448: an implementation independent of the library's bit arithmetic.
std::uint8_t quantize_e4m3(double x);

// Checks that stored entries (the cache bytes) are exactly the quantization of the backend's
// own bf16 entries, with an independent quantizer. Returns an empty string or what differs.
std::string check_stored_entries(const CompressorSpec& spec, const std::vector<std::uint16_t>& entries,
                                 const std::vector<std::uint8_t>& cache, std::int64_t count);

}  // namespace dsv4::test
