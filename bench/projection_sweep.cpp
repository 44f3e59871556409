// `dsv4-compressor bench-projection` (see bench.hpp): which cuBLASLt algorithm the projection
// should take. The library runs one algorithm at every token count of a compressor (a token's
// row may not depend on the call's other tokens, SPEC section 3), so what matters is one
// algorithm's times across all counts, and whether its rows keep their bits across them.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench.hpp"
#include "bench/gpu_common.hpp"
#include "core/internal.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/projection.hpp"

namespace dsv4::bench {

namespace {

constexpr std::size_t kSweepWorkspace = 64u << 20;  // the most any candidate may use
constexpr int kHeuristicResults = 16;              // asked of every rule's heuristic call
constexpr int kCheckedRows = 8;                    // rows compared bit for bit across counts

cudaDataType_t cuda_type(DType d) { return d == DType::f32 ? CUDA_R_32F : CUDA_R_16BF; }

// The library's operation (cuda/projection.cpp): out[t, :] = x[t, :] @ w^T, column-major views.
struct Op {
  cublasLtMatmulDesc_t desc = nullptr;
  Op() {
    lt(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    lt(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
    lt(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
  }
  ~Op() { cublasLtMatmulDescDestroy(desc); }
};

struct Layouts {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  Layouts(std::int64_t width, std::int64_t hidden, std::int64_t tokens, DType out) {
    lt(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, hidden, width, hidden), "A");
    lt(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, hidden, tokens, hidden), "B");
    lt(cublasLtMatrixLayoutCreate(&d, cuda_type(out), width, tokens, width), "D");
  }
  ~Layouts() {
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(d);
  }
};

template <typename T>
T config_value(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  std::size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof v, &written);
  return v;
}

std::string describe(const cublasLtMatmulAlgo_t& algo) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "id %d tile %u splitk %u reduction %u stages %u swizzle %u custom %u inner %u cluster %u",
                config_value<int>(algo, CUBLASLT_ALGO_CONFIG_ID), config_value<std::uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                config_value<std::uint32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                config_value<std::uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                config_value<std::uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                config_value<std::uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
                config_value<std::uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
                static_cast<unsigned>(config_value<std::uint16_t>(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID)),
                static_cast<unsigned>(config_value<std::uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)));
  return buf;
}

struct ShapeSpec {
  std::string model, kind;
  std::int64_t width, hidden;
};

struct RuleSpec {
  std::int64_t ref_tokens;
  std::size_t workspace;
  bool split_k;
  std::string label() const {
    return "ref " + std::to_string(ref_tokens) + (workspace ? " ws 32MiB" : " ws 0") + (split_k ? " split-K" : " no split-K");
  }
};

// The library's rule before it chose per range of counts: one algorithm for every count.
constexpr std::int64_t kOneAlgorithmTokens = 256;

SweepShape sweep_shape(cublasLtHandle_t h, cudaStream_t stream, const ShapeSpec& s, DType out,
                       const std::vector<std::int64_t>& counts, int reps, std::size_t l2_bytes, bool library_only) {
  SweepShape r;
  r.label = s.model + " " + s.kind + " " + (out == DType::f32 ? "f32" : "bf16");
  r.width = s.width;
  r.hidden = s.hidden;
  const Op op;
  std::vector<cublasLtMatmulAlgo_t> algos;
  auto index_of = [&](const cublasLtMatmulAlgo_t& a) {
    for (std::size_t i = 0; i < algos.size(); ++i)
      if (std::memcmp(&algos[i], &a, sizeof a) == 0) return static_cast<int>(i);
    algos.push_back(a);
    return static_cast<int>(algos.size() - 1);
  };
  std::vector<RuleSpec> rules;
  for (std::int64_t ref : {8, 32, 64, 128, 256, 4096})
    for (std::size_t ws : {std::size_t{0}, std::size_t{32u << 20}})
      for (bool split : {false, true}) rules.push_back({ref, ws, split});
  if (library_only) rules.clear();
  for (const RuleSpec& rule : rules) {
    const Layouts l(s.width, s.hidden, rule.ref_tokens, out);
    cublasLtMatmulPreference_t pref = nullptr;
    lt(cublasLtMatmulPreferenceCreate(&pref), "preference");
    lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &rule.workspace,
                                            sizeof rule.workspace),
       "workspace");
    cublasLtMatmulHeuristicResult_t results[kHeuristicResults];
    int found = 0;
    lt(cublasLtMatmulAlgoGetHeuristic(h, op.desc, l.a, l.b, l.d, l.d, pref, kHeuristicResults, results, &found), "heuristic");
    cublasLtMatmulPreferenceDestroy(pref);
    SweepRule sr{rule.label(), -1};
    for (int k = 0; k < found; ++k) {
      if (results[k].state != CUBLAS_STATUS_SUCCESS) continue;
      const bool splits = config_value<std::uint32_t>(results[k].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) > 1;
      const int idx = index_of(results[k].algo);
      if (sr.candidate < 0 && (rule.split_k || !splits)) sr.candidate = idx;
    }
    if (rule.ref_tokens == kOneAlgorithmTokens && rule.workspace == 0 && !rule.split_k) sr.label += " (before)";
    r.rules.push_back(sr);
  }

  const std::int64_t max_tokens = counts.back();
  const std::size_t out_bytes = out == DType::f32 ? 4 : 2;
  const std::int64_t weight_bytes = s.width * s.hidden * 2;
  Buffer x(Device::cuda(0), static_cast<std::size_t>(max_tokens * s.hidden * 2));
  random_fill(x.data(), max_tokens * s.hidden, 3);
  const int copies_small = std::clamp(static_cast<int>((3.0 * static_cast<double>(l2_bytes) + weight_bytes - 1) / weight_bytes), 2, 16);
  Buffer w(Device::cuda(0), static_cast<std::size_t>(copies_small * weight_bytes));
  random_fill(w.data(), copies_small * s.width * s.hidden, 11);
  Buffer d(Device::cuda(0), static_cast<std::size_t>(max_tokens * s.width) * out_bytes);
  Buffer ws(Device::cuda(0), kSweepWorkspace);
  const std::size_t row_bytes = static_cast<std::size_t>(s.width) * out_bytes;
  // Times one way of running the projection at every count and checks its first rows.
  // `prepare(t, &workspace_mib)` says whether it can run t tokens; `gemm(k, t)` runs weight copy k.
  auto measure = [&](SweepCandidate& c, const std::function<bool(std::int64_t, double*)>& prepare,
                     const std::function<void(int, std::int64_t)>& gemm) {
    std::vector<unsigned char> row0;
    for (std::int64_t t : counts) {
      double mib = 0;
      const bool runs = prepare(t, &mib);
      c.workspace_mib.push_back(mib);
      if (!runs) {
        c.us.push_back(NAN);
        continue;
      }
      const int copies = t >= 1024 ? 2 : copies_small;
      c.us.push_back(time_steps(stream, copies, reps, [&](int k) { gemm(k, t); }));
      // Rows of copy 0 at this count against the same rows at the other counts.
      gemm(0, t);
      DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::size_t rows = static_cast<std::size_t>(std::min<std::int64_t>(t, kCheckedRows));
      std::vector<unsigned char> got(rows * row_bytes);
      DSV4_CUDA_CHECK(cudaMemcpy(got.data(), d.data(), got.size(), cudaMemcpyDeviceToHost));
      if (row0.empty()) row0.assign(got.begin(), got.begin() + static_cast<std::ptrdiff_t>(row_bytes));
      else if (std::memcmp(row0.data(), got.data(), row_bytes) != 0) c.row_invariant = false;
      if (rows == kCheckedRows) {
        if (c.first_rows.empty()) c.first_rows = got;
        else if (c.first_rows != got) c.row_invariant = false;
      }
    }
    // Which candidate computes the same bits (the same order of operations), the first such.
    c.same_bits_as = static_cast<int>(r.candidates.size());
    for (std::size_t k = 0; k < r.candidates.size(); ++k)
      if (!c.first_rows.empty() && r.candidates[k].first_rows == c.first_rows) {
        c.same_bits_as = static_cast<int>(k);
        break;
      }
  };
  const float one = 1.0f, zero = 0.0f;
  for (const cublasLtMatmulAlgo_t& algo : algos) {
    SweepCandidate c;
    c.config = describe(algo);
    measure(
        c,
        [&](std::int64_t t, double* mib) {
          const Layouts l(s.width, s.hidden, t, out);
          cublasLtMatmulHeuristicResult_t check{};
          const bool ok = cublasLtMatmulAlgoCheck(h, op.desc, l.a, l.b, l.d, l.d, &algo, &check) == CUBLAS_STATUS_SUCCESS;
          *mib = static_cast<double>(check.workspaceSize) / 1048576.0;
          return ok && check.workspaceSize <= kSweepWorkspace;
        },
        [&](int k, std::int64_t t) {
          const Layouts l(s.width, s.hidden, t, out);
          lt(cublasLtMatmul(h, op.desc, &one, static_cast<const char*>(w.data()) + k * weight_bytes, l.a, x.data(), l.b,
                            &zero, d.data(), l.d, d.data(), l.d, &algo, ws.data(), kSweepWorkspace, stream),
             "matmul");
        });
    r.candidates.push_back(std::move(c));
  }
  // The library's own projection, as the compressors run it (its rule, no workspace).
  const cuda::Projection library(0, w.data(), s.width, s.hidden, out);
  SweepCandidate c;
  c.config = "the library's projection: " + std::to_string(library.ranges_with_own_algorithm()) + " of " +
             std::to_string(library.ranges()) + " token ranges with an algorithm of their own";
  measure(
      c, [](std::int64_t, double*) { return true; },
      [&](int k, std::int64_t t) {
        library.run(x.data(), t, static_cast<const char*>(w.data()) + k * weight_bytes, d.data(), s.width, stream);
      });
  r.candidates.push_back(std::move(c));
  r.rules.push_back({"library", static_cast<int>(r.candidates.size()) - 1});
  return r;
}

std::string us_cell(double v) {
  char b[16];
  if (!std::isfinite(v)) return "-";
  std::snprintf(b, sizeof b, v < 100 ? "%.1f" : "%.0f", v);
  return b;
}

void print_shape(const SweepShape& s, const std::vector<std::int64_t>& counts) {
  std::printf("\n%s (width %lld, hidden %lld): us per projection\n", s.label.c_str(), static_cast<long long>(s.width),
              static_cast<long long>(s.hidden));
  std::printf("  %-34s %4s %3s %4s", "rule / candidate", "#", "inv", "bits");
  for (std::int64_t t : counts) std::printf(" %7lld", static_cast<long long>(t));
  std::printf("\n");
  auto line = [&](const std::string& label, int idx) {
    std::printf("  %-34s %4d %3s %4d", label.c_str(), idx,
                idx < 0 ? "-" : s.candidates[static_cast<std::size_t>(idx)].row_invariant ? "yes" : "NO",
                idx < 0 ? -1 : s.candidates[static_cast<std::size_t>(idx)].same_bits_as);
    for (std::size_t k = 0; k < counts.size(); ++k)
      std::printf(" %7s", idx < 0 ? "-" : us_cell(s.candidates[static_cast<std::size_t>(idx)].us[k]).c_str());
    std::printf("\n");
  };
  for (const SweepRule& r : s.rules) line(r.label, r.candidate);
  // The best of every candidate at each count: what a per-count choice would reach.
  std::printf("  %-34s %4s %3s %4s", "best candidate per count", "", "", "");
  for (std::size_t k = 0; k < counts.size(); ++k) {
    double best = NAN;
    for (const SweepCandidate& c : s.candidates)
      if (std::isfinite(c.us[k]) && !(c.us[k] >= best)) best = c.us[k];
    std::printf(" %7s", us_cell(best).c_str());
  }
  std::printf("\n");
  for (std::size_t i = 0; i < s.candidates.size(); ++i)
    std::printf("  #%zu %s, same bits as #%d%s\n", i, s.candidates[i].config.c_str(), s.candidates[i].same_bits_as,
                s.candidates[i].row_invariant ? "" : " (rows change with the count)");
}

}  // namespace

SweepReport run_projection_sweep(const SweepOptions& o) {
  SweepReport report;
  static_cast<RunInfo&>(report) = gpu_run_info("bench-projection", o.command);
  cudaDeviceProp prop{};
  DSV4_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  report.tokens = o.quick ? std::vector<std::int64_t>{1, 8, 64, 256, 4096}
                          : std::vector<std::int64_t>{1, 8, 16, 32, 64, 128, 256, 512, 1024, 1132, 1536, 2500, 4096, 16384};
  cudaStream_t stream;
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasLtHandle_t h;
  lt(cublasLtCreate(&h), "create");
  std::vector<ShapeSpec> shapes;
  for (const char* model : {"flash", "pro"}) {
    if (o.quick && std::string(model) == "pro") continue;
    const Model m = std::string(model) == "pro" ? Model::pro : Model::flash;
    const std::int64_t main_w = CompressorSpec::preset(m, CompressorKind::csa_main).projection_width();
    const std::int64_t index_w = CompressorSpec::preset(m, CompressorKind::csa_indexer).projection_width();
    const std::int64_t hca_w = CompressorSpec::preset(m, CompressorKind::hca).projection_width();
    const std::int64_t hidden = model_shape(m).hidden;
    shapes.push_back({model, "CSA main", main_w, hidden});
    shapes.push_back({model, "CSA indexer", index_w, hidden});
    shapes.push_back({model, "CSA layer", main_w + index_w, hidden});
    shapes.push_back({model, "HCA", hca_w, hidden});
  }
  const int reps = o.quick ? 3 : 5;
  for (const ShapeSpec& s : shapes)
    for (DType out : {DType::bf16, DType::f32}) {
      if (o.quick && out == DType::f32) continue;
      const std::string label = s.model + " " + s.kind + " " + (out == DType::f32 ? "f32" : "bf16");
      if (!label_selected(o.filter, label)) continue;
      report.shapes.push_back(
          sweep_shape(h, stream, s, out, report.tokens, reps, static_cast<std::size_t>(prop.l2CacheSize), o.library_only));
      print_shape(report.shapes.back(), report.tokens);
      std::fflush(stdout);
    }
  cublasLtDestroy(h);
  cudaStreamDestroy(stream);
  if (!o.json.empty()) write_sweep_json(report, o.json);
  return report;
}

}  // namespace dsv4::bench
