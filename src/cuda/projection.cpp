#include "cuda/projection.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/random_inputs.hpp"
#include "dsv4/compressor.hpp"
#include "cuda/cuda_check.hpp"

namespace dsv4::cuda {

namespace {

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw DeviceError(std::string("cuBLASLt: ") + what + " failed with status " + std::to_string(static_cast<int>(s)));
}

// Each range of token counts takes cuBLASLt's choice at its top (the last also serves every
// larger count). Measured on an H100 (docs/PERF.md, `dsv4-compressor bench-projection`): one
// algorithm chosen at 256 tokens for every count made a Flash CSA layer's projection 13.5 us
// at 64 tokens and 189 us at 4096, against 10.4 and 109 for the heuristic's choice at each
// count, and every algorithm that keeps K whole computed the same bits. Ranges that double
// from 64 tokens left counts just past a power of two on a poor fit (Flash CSA layer 1132
// tokens 55.0 us, 2500 tokens 112); steps of 1.5x and 2x in turn took 42.0 and 82.0.
constexpr std::int64_t kRangeTops[] = {8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096};
// The algorithm every other must agree with bit for bit (and the fallback).
constexpr std::int64_t kReferenceTokens = 256;
// Tokens of the probe that checks the agreement: more than a 64-row tile, not a multiple of it.
constexpr std::int64_t kProbeTokens = 72;
// Its x: random, but the same for every projection built (a fixed seed).
constexpr std::uint64_t kProbeSeed = 72;

cudaDataType_t cuda_type(DType d) { return d == DType::f32 ? CUDA_R_32F : CUDA_R_16BF; }

// Column-major views of row-major data: w [width, hidden] is hidden x width, transposed by the
// op; x [tokens, hidden] is hidden x tokens; out [tokens, ld] is width x tokens with ld.
struct Layouts {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  Layouts(std::int64_t width, std::int64_t hidden, std::int64_t tokens, std::int64_t ld, DType out) {
    check(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, static_cast<std::uint64_t>(hidden), static_cast<std::uint64_t>(width), hidden), "layout A");
    check(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, static_cast<std::uint64_t>(hidden), static_cast<std::uint64_t>(tokens), hidden), "layout B");
    check(cublasLtMatrixLayoutCreate(&d, cuda_type(out), static_cast<std::uint64_t>(width), static_cast<std::uint64_t>(tokens), ld), "layout D");
  }
  ~Layouts() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
  }
};

}  // namespace

Projection::Projection(int device, const void* w, std::int64_t width, std::int64_t hidden, DType out_dtype)
    : width_(width), hidden_(hidden), out_dtype_(out_dtype) {
  const DeviceGuard guard(device);
  check(cublasLtCreate(&handle_), "create");
  check(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
  const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof transa), "transa");
  check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof transb), "transb");

  // No workspace: nothing to allocate per call, and no split-K reduction through it.
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "preference");
  const std::uint64_t workspace = 0;
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof workspace), "workspace");
  // The heuristic's first algorithm at `tokens` that keeps K whole (a split changes the sums).
  auto choose = [&](std::int64_t tokens, cublasLtMatmulAlgo_t* algo) {
    const Layouts l(width, hidden, tokens, width, out_dtype);
    cublasLtMatmulHeuristicResult_t results[16];
    int found = 0;
    check(cublasLtMatmulAlgoGetHeuristic(handle_, desc_, l.a, l.b, l.d, l.d, pref, 16, results, &found), "heuristic");
    for (int r = 0; r < found; ++r) {
      if (results[r].state != CUBLAS_STATUS_SUCCESS) continue;
      int split_k = 1;
      std::size_t written = 0;
      cublasLtMatmulAlgoConfigGetAttribute(&results[r].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split_k, sizeof split_k, &written);
      if (split_k > 1) continue;
      *algo = results[r].algo;
      return true;
    }
    return false;
  };
  cublasLtMatmulAlgo_t reference{};
  const bool have_reference = choose(kReferenceTokens, &reference);
  for (std::int64_t top : kRangeTops) {
    cublasLtMatmulAlgo_t a = reference;  // where the heuristic offers none
    choose(top, &a);
    choices_.push_back({top, a});
  }
  choices_.back().up_to_tokens = std::numeric_limits<std::int64_t>::max();
  cublasLtMatmulPreferenceDestroy(pref);
  if (!have_reference)
    throw DeviceError("cuBLASLt: no algorithm without split-K for the projection " + std::to_string(width) + " x " + std::to_string(hidden));

  // The probe: the same x through the reference and through every other algorithm taken.
  std::mt19937_64 rng(kProbeSeed);
  const std::vector<std::uint16_t> host_x = random_x(kProbeTokens, hidden, rng);
  const std::size_t out_bytes = static_cast<std::size_t>(kProbeTokens * width) * (out_dtype == DType::f32 ? 4 : 2);
  Buffer x(Device::cuda(device), host_x.size() * 2), out(Device::cuda(device), out_bytes);
  x.upload(host_x.data(), host_x.size() * 2);
  const Layouts l(width, hidden, kProbeTokens, width, out_dtype);
  auto probe = [&](const cublasLtMatmulAlgo_t& algo, std::vector<unsigned char>& rows) {
    const float alpha = 1.0f, beta = 0.0f;
    if (cublasLtMatmul(handle_, desc_, &alpha, w, l.a, x.data(), l.b, &beta, out.data(), l.d, out.data(), l.d, &algo, nullptr, 0, nullptr) !=
        CUBLAS_STATUS_SUCCESS)
      return false;
    rows.resize(out_bytes);
    out.download(rows.data(), out_bytes);
    return true;
  };
  std::vector<unsigned char> expected, got;
  if (!probe(reference, expected)) throw DeviceError("cuBLASLt: the projection's algorithm failed on its probe");
  for (Choice& c : choices_) {
    if (std::memcmp(&c.algo, &reference, sizeof reference) == 0) continue;
    if (probe(c.algo, got) && got == expected) ++own_;
    else c.algo = reference;
  }
}

Projection::~Projection() {
  if (desc_) cublasLtMatmulDescDestroy(desc_);
  if (handle_) cublasLtDestroy(handle_);
}

const cublasLtMatmulAlgo_t& Projection::algo_for(std::int64_t tokens) const {
  for (const Choice& c : choices_)
    if (tokens <= c.up_to_tokens) return c.algo;
  return choices_.back().algo;
}

void Projection::run(const void* x, std::int64_t tokens, const void* w, void* out, std::int64_t ld_out,
                     cudaStream_t stream) const {
  if (tokens == 0) return;
  const Layouts l(width_, hidden_, tokens, ld_out, out_dtype_);
  const float alpha = 1.0f, beta = 0.0f;
  check(cublasLtMatmul(handle_, desc_, &alpha, w, l.a, x, l.b, &beta, out, l.d, out, l.d, &algo_for(tokens), nullptr, 0,
                       stream),
        "matmul");
}

}  // namespace dsv4::cuda
