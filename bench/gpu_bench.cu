// The GPU benchmark: every variant of a compressor step captured in a CUDA graph (one step per
// weight copy, copies rotated through more memory than L2 holds), replayed and timed with
// CUDA events; medians of repeated runs.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>

#include "bench/bench.hpp"
#include "bench/gpu_common.hpp"
#include "bench/reach_probe.hpp"
#include "core/internal.hpp"
#include "core/random_inputs.hpp"
#include "cuda/cuda_check.hpp"

namespace dsv4::bench {

namespace {

// What an engine calls without this project: cuBLASLt's best algorithm for the exact shape,
// with a workspace. out[T, width] = x[T, hidden] @ w[width, hidden]^T.
class LibraryGemm {
 public:
  LibraryGemm(cublasLtHandle_t h, std::int64_t width, std::int64_t hidden, std::int64_t tokens, DType out, void* ws,
              std::size_t ws_bytes)
      : h_(h), ws_(ws), ws_bytes_(ws_bytes) {
    lt(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    lt(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
    lt(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
    lt(cublasLtMatrixLayoutCreate(&a_, CUDA_R_16BF, hidden, width, hidden), "A");
    lt(cublasLtMatrixLayoutCreate(&b_, CUDA_R_16BF, hidden, tokens, hidden), "B");
    lt(cublasLtMatrixLayoutCreate(&d_, out == DType::f32 ? CUDA_R_32F : CUDA_R_16BF, width, tokens, width), "D");
    cublasLtMatmulPreference_t pref;
    lt(cublasLtMatmulPreferenceCreate(&pref), "pref");
    lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes), "ws");
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    lt(cublasLtMatmulAlgoGetHeuristic(h_, desc_, a_, b_, d_, d_, pref, 1, &res, &found), "heuristic");
    cublasLtMatmulPreferenceDestroy(pref);
    if (found == 0) throw DeviceError("cuBLASLt found no algorithm");
    algo_ = res.algo;
  }
  ~LibraryGemm() {
    cublasLtMatrixLayoutDestroy(a_);
    cublasLtMatrixLayoutDestroy(b_);
    cublasLtMatrixLayoutDestroy(d_);
    cublasLtMatmulDescDestroy(desc_);
  }
  void run(const void* x, const void* w, void* out, cudaStream_t stream) const {
    const float one = 1.0f, zero = 0.0f;
    lt(cublasLtMatmul(h_, desc_, &one, w, a_, x, b_, &zero, out, d_, out, d_, &algo_, ws_, ws_bytes_, stream), "matmul");
  }

 private:
  cublasLtHandle_t h_;
  void* ws_;
  std::size_t ws_bytes_;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
};

// The kernel variant (a) pays for and the project exists to remove.
__global__ void cast_bf16_to_f32(const std::uint16_t* in, float* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x)
    out[i] = __uint_as_float(static_cast<std::uint32_t>(in[i]) << 16);
}

void cast(const void* in, void* out, std::int64_t n, cudaStream_t s) {
  cast_bf16_to_f32<<<static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 132 * 16)), 256, 0, s>>>(
      static_cast<const std::uint16_t*>(in), static_cast<float*>(out), n);
}

// A plain streaming copy with 16-byte accesses: with cudaMemcpyAsync, one of the two copy
// bandwidths the floor takes the better of.
__global__ void copy_kernel(const int4* in, int4* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x)
    out[i] = in[i];
}

Ceilings measure_ceilings(cudaStream_t stream, cublasLtHandle_t h, void* ws, std::size_t ws_bytes) {
  Ceilings c;
  const std::size_t bytes = std::size_t{1} << 30;
  Buffer src(Device::cuda(0), bytes), dst(Device::cuda(0), bytes);
  random_fill(src.data(), static_cast<std::int64_t>(bytes / 2), 7);
  const double copy_us = time_steps(stream, 1, 5, [&](int) {
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  const double kernel_us = time_steps(stream, 1, 5, [&](int) {
    copy_kernel<<<132 * 8, 512, 0, stream>>>(static_cast<const int4*>(src.data()), static_cast<int4*>(dst.data()),
                                             static_cast<std::int64_t>(bytes / 16));
  });
  c.copy_gbps = 2.0 * static_cast<double>(bytes) / (std::min(copy_us, kernel_us) * 1e3);
  const std::int64_t n = 8192;
  Buffer a(Device::cuda(0), n * n * 2), b(Device::cuda(0), n * n * 2), d(Device::cuda(0), n * n * 2);
  random_fill(a.data(), n * n, 1);
  random_fill(b.data(), n * n, 2);
  const LibraryGemm g(h, n, n, n, DType::bf16, ws, ws_bytes);
  const double mm_us = time_steps(stream, 1, 5, [&](int) { g.run(a.data(), b.data(), d.data(), stream); });
  c.matmul_tflops = 2.0 * static_cast<double>(n) * n * n / (mm_us * 1e6);
  return c;
}

Batch batch_of(const std::vector<Request>& requests, std::int64_t ratio, bool prefix) {
  Batch b;
  for (const Request& q : requests) {
    if (prefix) {
      if (q.start > 0) b.add(q.slot, 0, q.start);
    } else {
      b.add(q.slot, q.start, q.num_tokens);
    }
  }
  std::int64_t e = 0;
  for (const Request& q : b.requests) e += windows_completed(q.start, q.num_tokens, ratio);
  for (std::int64_t k = 0; k < e; ++k) b.cache_locations.push_back(k);
  return b;
}

std::int64_t entries_of(const Batch& b) { return static_cast<std::int64_t>(b.cache_locations.size()); }

// One member compressor of a step with everything the four variants need.
struct Member {
  CompressorSpec spec;
  std::vector<std::unique_ptr<Compressor>> f32, bf16;  // copies: kv_score f32 / bf16 (state f32)
  std::vector<std::unique_ptr<Compressor>> best;       // (d): bf16 kv_score, running state for HCA
  std::vector<std::unique_ptr<Compressor>> fused;      // (e): as (d), FusedDecode::always
  std::vector<std::unique_ptr<Compressor>> per_stage;  // (f): as (d), unfused, per-stage kernels
  std::unique_ptr<StatePool> pool_f, pool_b, pool_best, pool_fused, pool_per_stage;
  std::vector<Plan> plan_f, plan_b, plan_best, plan_fused, plan_per_stage;
  std::unique_ptr<Buffer> cache, rows_b, rows_f;
  std::unique_ptr<LibraryGemm> gemm_b, gemm_f;
  Batch step;
  RunOutputs out;
};

}  // namespace

Report run_gpu(const Options& o, const std::vector<std::string>& models, const std::vector<Scenario>& scenarios) {
  Report report;
  report.gpu = true;
  cudaDeviceProp prop{};
  DSV4_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  report.device = prop.name;
  cudaStream_t stream;
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasLtHandle_t lt_handle;
  lt(cublasLtCreate(&lt_handle), "create");
  const std::size_t ws_bytes = 32u << 20;
  Buffer workspace(Device::cuda(0), ws_bytes);
  report.ceilings = measure_ceilings(stream, lt_handle, workspace.data(), ws_bytes);
  const ReachProbe probe;
  const int reps = o.quick ? 3 : 7;
  report.ceilings.empty_step_us = time_steps(stream, 16, reps, [&](int) { probe.run(ReachStep{}, stream); });

  const Kind kinds[] = {Kind::csa_main, Kind::csa_indexer, Kind::csa_layer, Kind::hca};
  const int total = static_cast<int>(models.size() * scenarios.size() * 4);
  int done = 0;
  for (const std::string& model_name : models) {
    const Model model = model_name == "pro" ? Model::pro : Model::flash;
    std::map<CompressorKind, RandomWeights> weights;
    for (CompressorKind ck : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca})
      weights.emplace(ck, random_weights(CompressorSpec::preset(model, ck), 11 + static_cast<int>(ck)));
    for (const Scenario& sc : scenarios) {
      for (Kind kind : kinds) {
        progress(done++, total, row_label(model_name, kind, sc));
        if (!label_selected(o.filter, row_label(model_name, kind, sc))) continue;
        Row row;
        row.model = model_name;
        row.kind = kind;
        row.scenario = sc;
        std::int64_t weight_bytes = 0, x_bytes = 0, entry_bytes = 0;  // of the floor's bytes
        for (CompressorKind ck : members(kind)) {
          const CompressorSpec spec = CompressorSpec::preset(model, ck);
          const std::int64_t entries_before = row.entries;
          count_work(row, spec, DType::f32, &row.bytes, &row.flops, &row.tokens, &row.entries);
          weight_bytes += spec.projection_width() * spec.hidden * 2;
          x_bytes += row.tokens * spec.hidden * 2;
          entry_bytes += (row.entries - entries_before) * spec.entry_bytes();
        }
        row.floor_us = std::max(row.bytes / (report.ceilings.copy_gbps * 1e3), row.flops / (report.ceilings.matmul_tflops * 1e6));
        const std::int64_t tokens = row.tokens;
        const int copies = tokens >= 1024 ? 2
                                          : std::clamp(static_cast<int>((3.0 * prop.l2CacheSize + weight_bytes - 1) / weight_bytes), 2, 16);
        const std::int64_t hidden = model_shape(model).hidden;
        Buffer x(Device::cuda(0), static_cast<std::size_t>(tokens * hidden * 2 + 16));
        random_fill(x.data(), tokens * hidden, 3);
        const TensorView xv = x.view(DType::bf16, {tokens, hidden});

        std::vector<Member> ms;
        for (CompressorKind ck : members(kind)) {
          Member m;
          m.spec = CompressorSpec::preset(model, ck);
          const Weights w = weights.at(ck).view(m.spec);
          // The best path keeps an HCA window as running accumulators (WindowState::running).
          const WindowState best_state = m.spec.overlap() ? WindowState::rows : WindowState::running;
          for (int k = 0; k < copies; ++k) {
            m.f32.push_back(std::make_unique<Compressor>(m.spec, w, dsv4::Options{Device::cuda(0), {DType::f32, DType::f32}}));
            m.bf16.push_back(std::make_unique<Compressor>(m.spec, w, dsv4::Options{Device::cuda(0), {DType::bf16, DType::f32}}));
            m.best.push_back(std::make_unique<Compressor>(
                m.spec, w, dsv4::Options{Device::cuda(0), {DType::bf16, DType::f32}, best_state}));
            m.fused.push_back(std::make_unique<Compressor>(
                m.spec, w, dsv4::Options{Device::cuda(0), {DType::bf16, DType::f32}, best_state, FusedDecode::always}));
            m.per_stage.push_back(std::make_unique<Compressor>(
                m.spec, w,
                dsv4::Options{Device::cuda(0), {DType::bf16, DType::f32}, best_state, FusedDecode::off, CompressLaunch::per_stage}));
          }
          const auto requests = step_requests(sc, m.spec.ratio);
          m.pool_f = std::make_unique<StatePool>(*m.f32[0], static_cast<std::int64_t>(requests.size()));
          m.pool_b = std::make_unique<StatePool>(*m.bf16[0], static_cast<std::int64_t>(requests.size()));
          m.pool_best = std::make_unique<StatePool>(*m.best[0], static_cast<std::int64_t>(requests.size()));
          m.pool_fused = std::make_unique<StatePool>(*m.fused[0], static_cast<std::int64_t>(requests.size()));
          m.pool_per_stage = std::make_unique<StatePool>(*m.per_stage[0], static_cast<std::int64_t>(requests.size()));
          const Batch prefix = batch_of(requests, m.spec.ratio, true);
          m.step = batch_of(requests, m.spec.ratio, false);
          const std::int64_t e = std::max<std::int64_t>(1, entries_of(m.step));
          std::int64_t prefix_tokens = 0;
          for (const Request& q : prefix.requests) prefix_tokens += q.num_tokens;
          const std::int64_t scratch_rows = std::max<std::int64_t>({e, static_cast<std::int64_t>(prefix.cache_locations.size()), 1});
          m.cache = std::make_unique<Buffer>(Device::cuda(0), static_cast<std::size_t>(scratch_rows * m.spec.entry_bytes()));
          if (!prefix.requests.empty()) {  // bring the pools to the step's positions, with real state
            Buffer px(Device::cuda(0), static_cast<std::size_t>(prefix_tokens * hidden * 2 + 16));
            random_fill(px.data(), prefix_tokens * hidden, 5);
            const RunOutputs pout{m.cache->view(DType::u8, {scratch_rows, m.spec.entry_bytes()}), std::nullopt};
            m.f32[0]->forward(prefix, px.view(DType::bf16, {prefix_tokens, hidden}), *m.pool_f, pout);
            m.bf16[0]->forward(prefix, px.view(DType::bf16, {prefix_tokens, hidden}), *m.pool_b, pout);
            m.best[0]->forward(prefix, px.view(DType::bf16, {prefix_tokens, hidden}), *m.pool_best, pout);
            m.fused[0]->forward(prefix, px.view(DType::bf16, {prefix_tokens, hidden}), *m.pool_fused, pout);
            m.per_stage[0]->forward(prefix, px.view(DType::bf16, {prefix_tokens, hidden}), *m.pool_per_stage, pout);
            DSV4_CUDA_CHECK(cudaDeviceSynchronize());
          }
          m.out.cache = m.cache->view(DType::u8, {scratch_rows, m.spec.entry_bytes()});
          for (int k = 0; k < copies; ++k) {
            m.plan_f.push_back(m.f32[k]->plan(m.step, *m.pool_f));
            m.plan_b.push_back(m.bf16[k]->plan(m.step, *m.pool_b));
            m.plan_best.push_back(m.best[k]->plan(m.step, *m.pool_best));
            m.plan_fused.push_back(m.fused[k]->plan(m.step, *m.pool_fused));
            m.plan_per_stage.push_back(m.per_stage[k]->plan(m.step, *m.pool_per_stage));
          }
          const std::int64_t width = m.spec.projection_width();
          m.rows_b = std::make_unique<Buffer>(Device::cuda(0), static_cast<std::size_t>(tokens * width * 2));
          m.rows_f = std::make_unique<Buffer>(Device::cuda(0), static_cast<std::size_t>(tokens * width * 4));
          m.gemm_b = std::make_unique<LibraryGemm>(lt_handle, width, hidden, tokens, DType::bf16, workspace.data(), ws_bytes);
          m.gemm_f = std::make_unique<LibraryGemm>(lt_handle, width, hidden, tokens, DType::f32, workspace.data(), ws_bytes);
          ms.push_back(std::move(m));
        }

        auto library_step = [&](Variant v, int k) {
          for (Member& m : ms) {
            const std::int64_t width = m.spec.projection_width();
            const auto& c = v == Variant::bf16_direct ? *m.bf16[k] : *m.f32[k];
            const auto& plan = v == Variant::bf16_direct ? m.plan_b[k] : m.plan_f[k];
            auto& pool = v == Variant::bf16_direct ? *m.pool_b : *m.pool_f;
            const void* w = c.backend().projection_weights();
            KvScoreRows rows{m.rows_f->data(), DType::f32, width};
            if (v == Variant::f32_gemm) {
              m.gemm_f->run(x.data(), w, m.rows_f->data(), stream);
            } else {
              m.gemm_b->run(x.data(), w, m.rows_b->data(), stream);
              if (v == Variant::cast) cast(m.rows_b->data(), m.rows_f->data(), tokens * width, stream);
              else rows = {m.rows_b->data(), DType::bf16, width};
            }
            c.backend().compress(plan.data(), rows, pool.data(), m.out, stream);
          }
        };
        for (Variant v : {Variant::cast, Variant::bf16_direct, Variant::f32_gemm})
          row.us[static_cast<int>(v)] = time_steps(stream, copies, reps, [&](int k) { library_step(v, k); });

        // (d) the library's own choice, (e) the fused step forced where it applies, (f) the
        // per-stage kernels where (d) takes one launch for them.
        auto compressors = [](Member& m, Variant v) -> std::vector<std::unique_ptr<Compressor>>& {
          return v == Variant::fused ? m.fused : v == Variant::per_stage ? m.per_stage : m.best;
        };
        auto pool_of = [](Member& m, Variant v) -> StatePool& {
          return v == Variant::fused ? *m.pool_fused : v == Variant::per_stage ? *m.pool_per_stage : *m.pool_best;
        };
        bool best_one_launch = false;  // (d) fuses or runs its compress step
        auto measure_library = [&](Variant v) {
          const bool forced = v == Variant::fused;
          if (v == Variant::per_stage && !best_one_launch) return;
          if (ms.size() == 1) {
            Member& m = ms[0];
            auto& cs = compressors(m, v);
            auto& plans = forced ? m.plan_fused : v == Variant::per_stage ? m.plan_per_stage : m.plan_best;
            auto& pool = pool_of(m, v);
            if (forced && !plans[0].fused()) return;
            if (v == Variant::best) best_one_launch = plans[0].fused() || plans[0].compress_step();
            row.us[static_cast<int>(v)] = time_steps(stream, copies, reps, [&](int k) {
              cs[k]->backend().run(plans[k].data(), xv, pool.data(), m.out, stream);
            });
            return;
          }
          // The CSA layer: one shared projection (or one fused step) per copy (CompressorGroup).
          std::vector<std::unique_ptr<CompressorGroup>> groups;
          std::vector<std::unique_ptr<StatePool>> pools;  // [copy][member]
          std::vector<GroupPlan> plans;
          for (int k = 0; k < copies; ++k) {
            const Compressor* a = compressors(ms[0], v)[k].get();
            const Compressor* b = compressors(ms[1], v)[k].get();
            groups.push_back(std::make_unique<CompressorGroup>(std::vector<const Compressor*>{a, b}));
            std::vector<const StatePool*> states;
            for (std::size_t j = 0; j < ms.size(); ++j) {
              Member& m = ms[j];
              const StatePool& from = pool_of(m, v);
              // Each copy gets its own pools, cloned (memory and positions) from the member's.
              pools.push_back(std::make_unique<StatePool>(j == 0 ? *a : *b, from.num_slots()));
              const TensorView mem = pools.back()->memory();
              DSV4_CUDA_CHECK(cudaMemcpy(mem.data, from.memory().data, mem.nbytes(), cudaMemcpyDeviceToDevice));
              pools.back()->data().next_position = from.data().next_position;
              states.push_back(pools.back().get());
            }
            plans.push_back(groups.back()->plan({ms[0].step, ms[1].step}, states));
          }
          if (forced && !plans[0].fused()) return;
          if (v == Variant::best) best_one_launch = plans[0].fused() || plans[0].compress_step();
          row.us[static_cast<int>(v)] = time_steps(stream, copies, reps, [&](int k) {
            groups[k]->run(plans[k], xv, {pools[2 * k].get(), pools[2 * k + 1].get()}, {ms[0].out, ms[1].out}, stream);
          });
        };
        row.us[static_cast<int>(Variant::fused)] = NAN;
        row.us[static_cast<int>(Variant::per_stage)] = NAN;
        row.us[static_cast<int>(Variant::reach)] = NAN;
        measure_library(Variant::best);
        measure_library(Variant::fused);
        measure_library(Variant::per_stage);

        // (g) the reach probe, over the floor's bytes: the weights of each copy, x and the
        // state (half read after the wait, half written with the entries).
        if (tokens <= kReachMaxTokens) {
          const auto state_bytes = static_cast<std::int64_t>(row.bytes) - weight_bytes - x_bytes - entry_bytes;
          const std::int64_t x_once = tokens * hidden * 2;
          auto round16 = [](std::int64_t b) { return (std::max<std::int64_t>(b, 0) + 15) / 16 * 16; };
          // What the floor counts beyond one read of x (a CSA layer's second member's read of x,
          // the state read) comes from a scratch buffer.
          const std::int64_t more_in = round16(x_bytes - x_once + state_bytes / 2);
          const std::int64_t out_bytes = round16(entry_bytes + state_bytes - state_bytes / 2);
          Buffer probe_in(Device::cuda(0), static_cast<std::size_t>(std::max<std::int64_t>(more_in, 16)));
          Buffer probe_out(Device::cuda(0), static_cast<std::size_t>(std::max<std::int64_t>(out_bytes, 16)));
          DSV4_CUDA_CHECK(cudaMemset(probe_in.data(), 0, probe_in.size()));
          std::vector<ReachStep> steps(static_cast<std::size_t>(copies));
          for (int k = 0; k < copies; ++k) {
            ReachStep& st = steps[static_cast<std::size_t>(k)];
            for (std::size_t j = 0; j < ms.size(); ++j)
              st.weights[j] = {ms[j].best[k]->backend().projection_weights(), ms[j].spec.projection_width() * hidden * 2};
            st.inputs[0] = {x.data(), x_once};
            st.inputs[1] = {probe_in.data(), more_in};
            st.outputs = probe_out.data();
            st.output_bytes = out_bytes;
          }
          row.us[static_cast<int>(Variant::reach)] =
              time_steps(stream, copies, reps, [&](int k) { probe.run(steps[static_cast<std::size_t>(k)], stream); });
        }
        report.rows.push_back(row);
      }
    }
  }
  progress(total, total, "done");
  cublasLtDestroy(lt_handle);
  cudaStreamDestroy(stream);
  return report;
}

}  // namespace dsv4::bench
