#include "cuda/projection.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cuda/cuda_check.hpp"

namespace dsv4::cuda {

namespace {

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw DeviceError(std::string("cuBLASLt: ") + what + " failed with status " + std::to_string(static_cast<int>(s)));
}

// Measured on an H100 (docs/PERF.md): chosen at 256 tokens, decode steps run as fast as with
// the per-shape heuristic, while choosing at 4096 made them 2-2.5x slower.
constexpr std::int64_t kReferenceTokens = 256;

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

Projection::Projection(int device, std::int64_t width, std::int64_t hidden, DType out_dtype)
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
  // The shape the algorithm is chosen for. DSV4_PROJECTION_REF_TOKENS overrides it (a tuning
  // knob for benchmarks; every process with the same value gets the same algorithm).
  std::int64_t ref_tokens = kReferenceTokens;
  if (const char* env = std::getenv("DSV4_PROJECTION_REF_TOKENS")) ref_tokens = std::max(1ll, std::atoll(env));
  const Layouts l(width, hidden, ref_tokens, width, out_dtype);
  cublasLtMatmulHeuristicResult_t results[16];
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle_, desc_, l.a, l.b, l.d, l.d, pref, 16, results, &found), "heuristic");
  cublasLtMatmulPreferenceDestroy(pref);
  bool chosen = false;
  for (int r = 0; r < found && !chosen; ++r) {
    if (results[r].state != CUBLAS_STATUS_SUCCESS) continue;
    int split_k = 1;
    std::size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&results[r].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split_k, sizeof split_k, &written);
    if (split_k > 1) continue;
    algo_ = results[r].algo;
    chosen = true;
  }
  if (!chosen) throw DeviceError("cuBLASLt: no algorithm without split-K for the projection " + std::to_string(width) + " x " + std::to_string(hidden));
}

Projection::~Projection() {
  if (desc_) cublasLtMatmulDescDestroy(desc_);
  if (handle_) cublasLtDestroy(handle_);
}

void Projection::run(const void* x, std::int64_t tokens, const void* w, void* out, std::int64_t ld_out,
                     cudaStream_t stream) const {
  if (tokens == 0) return;
  const Layouts l(width_, hidden_, tokens, ld_out, out_dtype_);
  const float alpha = 1.0f, beta = 0.0f;
  check(cublasLtMatmul(handle_, desc_, &alpha, w, l.a, x, l.b, &beta, out, l.d, out, l.d, &algo_, nullptr, 0, stream),
        "matmul");
}

}  // namespace dsv4::cuda
