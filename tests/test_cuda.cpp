// The CUDA backend against the CPU backend and the fp64 reference, on the device: every kind,
// every dtype combination, Flash and Pro sizes, random splits and batch mixes, graph capture
// and replay. Without a GPU every test skips.
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "core/internal.hpp"
#include "core/numerics.hpp"
#include "cuda/fused_step.hpp"
#include "cuda/projection.hpp"
#include "io/safetensors.hpp"
#include "support/files.hpp"
#include "support/group.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"
#include "support/soak.hpp"

namespace dsv4 {
namespace {

#define REQUIRE_GPU()                             \
  do {                                            \
    if (!cuda_available()) GTEST_SKIP() << "no usable GPU"; \
  } while (0)

// DSV4_TEST_SMALL=1 shrinks the shapes (for compute-sanitizer, which runs kernels slowly).
bool small() { return std::getenv("DSV4_TEST_SMALL") != nullptr; }

// Calls f(model, kv_score dtype, state dtype, label) for Flash and Pro and every kv_score/state
// dtype pair; under compute-sanitizer (small()) Flash with the two pairs of equal dtypes.
template <class F>
void for_models_and_precisions(F&& f) {
  const std::vector<Model> models = small() ? std::vector<Model>{Model::flash} : std::vector<Model>{Model::flash, Model::pro};
  for (Model model : models)
    for (DType score : {DType::f32, DType::bf16})
      for (DType state : {DType::f32, DType::bf16}) {
        if (small() && score != state) continue;
        f(model, score, state,
          std::string(model_name(model)) + ", kv_score " + std::string(dtype_name(score)) + ", state " +
              std::string(dtype_name(state)));
      }
}

struct Case {
  Model model;
  CompressorKind kind;
  Precision precision;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << model_name(c.model) << " " << kind_name(c.kind) << ", kv_score " << dtype_name(c.precision.kv_score)
      << ", state " << dtype_name(c.precision.state);
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const char* kinds[] = {"CsaMain", "CsaIndexer", "Hca"};
  return std::string(info.param.model == Model::flash ? "Flash_" : "Pro_") +
         kinds[static_cast<int>(info.param.kind)] + "_Score" + std::string(dtype_name(info.param.precision.kv_score)) +
         "_State" + std::string(dtype_name(info.param.precision.state));
}

std::vector<Case> cases(std::initializer_list<Model> models) {
  std::vector<Case> out;
  for (Model m : models)
    for (CompressorKind k : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca})
      for (DType s : {DType::f32, DType::bf16})
        for (DType st : {DType::f32, DType::bf16}) out.push_back({m, k, {s, st}});
  return out;
}

CompressorSpec spec_for(const Case& c) {
  CompressorSpec spec = CompressorSpec::preset(c.model, c.kind);
  if (small()) spec.hidden = 256;
  return spec;
}

class CudaVsCpu : public ::testing::TestWithParam<Case> {};

// Same inputs and the same random serving schedule on both backends: CUDA within SPEC section 4
// of the fp64 reference and of the CPU backend, stored entries exactly the quantization of
// CUDA's own bf16 entries, every output written.
TEST_P(CudaVsCpu, WithinTolerance) {
  REQUIRE_GPU();
  const Case c = GetParam();
  const CompressorSpec spec = spec_for(c);
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const std::int64_t n = small() ? 3 : 6;
  const auto seqs = spec.ratio == 4 ? test::random_sequences(n, 1, 160, spec.hidden, rng)
                                    : test::random_sequences(n, 100, 700, spec.hidden, rng);
  const auto schedule = test::random_schedule(seqs, rng);
  const Compressor gpu(spec, w.view(spec), {.device = Device::cuda(0), .precision = c.precision});
  const Compressor cpu(spec, w.view(spec), {.precision = c.precision});
  auto gpu_buffers = test::device_buffers(Device::cuda(0));
  auto cpu_buffers = test::host_buffers();
  std::mt19937_64 rng_a(rng()), rng_b = rng_a;
  const test::Served g = test::serve(gpu, seqs, schedule, *gpu_buffers, rng_a);
  const test::Served h = test::serve(cpu, seqs, schedule, *cpu_buffers, rng_b);
  ASSERT_EQ(g.problems, "");
  ASSERT_EQ(h.problems, "");
  std::vector<std::uint16_t> all_gpu;
  std::vector<double> all_ref, all_cpu;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const std::int64_t e = seqs[i].length / spec.ratio;
    EXPECT_EQ(test::check_stored_entries(spec, g.entries[i], g.cache[i], e), "") << "sequence " << i;
    all_gpu.insert(all_gpu.end(), g.entries[i].begin(), g.entries[i].end());
    for (auto v : h.entries[i]) all_cpu.push_back(num::f32_from_bf16(v));
    const auto ref = test::reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
    all_ref.insert(all_ref.end(), ref.begin(), ref.end());
  }
  ASSERT_FALSE(all_ref.empty());
  const double vs_ref = test::relative_l2(all_gpu, all_ref), vs_cpu = test::relative_l2(all_gpu, all_cpu);
  std::printf("    %s: %zu entries, relative L2 vs fp64 %.3g, vs CPU %.3g (tolerance %.0e)\n", case_name({c, 0}).c_str(),
              all_gpu.size() / static_cast<std::size_t>(spec.head_dim), vs_ref, vs_cpu, test::tolerance(c.precision));
  EXPECT_LE(vs_ref, test::tolerance(c.precision));
  EXPECT_LE(vs_cpu, test::tolerance(c.precision));
}

INSTANTIATE_TEST_SUITE_P(AllModelsKindsPrecisions, CudaVsCpu, ::testing::ValuesIn(cases({Model::flash, Model::pro})),
                         case_name);

class CudaSplitInvariant : public ::testing::TestWithParam<Case> {};

// SPEC section 3 on the GPU: random splits and mixes give the same bits as whole sequences,
// on the unfused path (every token count; CudaFused checks the fused path among its steps).
TEST_P(CudaSplitInvariant, RandomSplitsAndMixesAreBitIdentical) {
  REQUIRE_GPU();
  const Case c = GetParam();
  const CompressorSpec spec = spec_for(c);
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const auto seqs = test::random_sequences(small() ? 4 : 12, 1, spec.ratio == 4 ? 200 : 900, spec.hidden, rng);
  const Compressor gpu(spec, w.view(spec),
                       {.device = Device::cuda(0), .precision = c.precision, .fused_decode = FusedDecode::off});
  auto buffers = test::device_buffers(Device::cuda(0));
  const test::Served whole = test::serve(gpu, seqs, test::whole_schedule(seqs), *buffers, rng);
  ASSERT_EQ(whole.problems, "");
  for (int trial = 0; trial < 3; ++trial) {
    const test::Served split = test::serve(gpu, seqs, test::random_schedule(seqs, rng), *buffers, rng);
    ASSERT_EQ(split.problems, "");
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      ASSERT_EQ(split.entries[i], whole.entries[i]) << "sequence " << i << " (length " << seqs[i].length << "), trial " << trial;
      ASSERT_EQ(split.cache[i], whole.cache[i]) << "sequence " << i << ", trial " << trial;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllKindsPrecisions, CudaSplitInvariant, ::testing::ValuesIn(cases({Model::flash})), case_name);

// The fused step's checks, shared by CudaFused and CudaFusedWide: `fused` (FusedDecode::always)
// serves the sequences over schedules a and b, the unfused path and the CPU over their own.
// Entries and cache rows equal bit for bit across a and b (rows state), stored entries are the
// quantization of the bf16 ones, and entries sit within SPEC section 4 of the CPU, of the
// unfused path and, with `with_fp64`, of the fp64 formula. Prints one line under `label`.
void check_fused_serving(const std::string& label, const CompressorSpec& spec, const RandomWeights& w,
                         const Options& fused, const std::vector<test::Sequence>& seqs, const test::Schedule& a,
                         const test::Schedule& b, bool with_fp64, std::mt19937_64& rng) {
  Options unfused = fused;
  unfused.fused_decode = FusedDecode::off;
  const Compressor gpu(spec, w.view(spec), fused), gpu_unfused(spec, w.view(spec), unfused);
  const Compressor cpu(spec, w.view(spec), {.precision = fused.precision, .window_state = fused.window_state});
  auto gb = test::device_buffers(Device::cuda(0));
  auto hb = test::host_buffers();
  const test::Served ga = test::serve(gpu, seqs, a, *gb, rng);
  const test::Served gb2 = test::serve(gpu, seqs, b, *gb, rng);
  const test::Served un = test::serve(gpu_unfused, seqs, test::random_schedule(seqs, rng), *gb, rng);
  const test::Served h = test::serve(cpu, seqs, a, *hb, rng);
  ASSERT_EQ(ga.problems, "");
  ASSERT_EQ(gb2.problems, "");
  std::vector<std::uint16_t> got;
  std::vector<double> ref, host, other_path;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    if (fused.window_state == WindowState::rows) {
      EXPECT_EQ(ga.entries[i], gb2.entries[i]) << label << " sequence " << i;
      EXPECT_EQ(ga.cache[i], gb2.cache[i]) << label << " sequence " << i;
    }
    EXPECT_EQ(test::check_stored_entries(spec, ga.entries[i], ga.cache[i], seqs[i].length / spec.ratio), "");
    got.insert(got.end(), ga.entries[i].begin(), ga.entries[i].end());
    for (auto v : h.entries[i]) host.push_back(num::f32_from_bf16(v));
    for (auto v : un.entries[i]) other_path.push_back(num::f32_from_bf16(v));
    if (with_fp64) {
      const auto r = test::reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
      ref.insert(ref.end(), r.begin(), r.end());
    }
  }
  ASSERT_FALSE(host.empty());
  const double tol = test::tolerance(fused.precision);
  std::printf("    %s: %zu steps, vs fp64 %s, vs CPU %.3g, vs unfused %.3g\n", label.c_str(), a.size(),
              with_fp64 ? std::to_string(test::relative_l2(got, ref)).c_str() : "-", test::relative_l2(got, host),
              test::relative_l2(got, other_path));
  if (with_fp64) {
    EXPECT_LE(test::relative_l2(got, ref), tol) << label;
  }
  EXPECT_LE(test::relative_l2(got, host), tol) << label;
  EXPECT_LE(test::relative_l2(got, other_path), tol) << label;
}

class CudaFused : public ::testing::TestWithParam<Case> {};

// The fused decode path: steps of at most 256 tokens run as one launch. Two different
// decode-shaped schedules give the same bits (the split invariance among fused steps); the
// entries sit within SPEC section 4 of the fp64 formula, of the CPU backend and of the unfused
// path, and are stored as the quantization of their own bf16 values.
TEST_P(CudaFused, DecodeStepsMatchCpuAndSplitsAreBitIdentical) {
  REQUIRE_GPU();
  const Case c = GetParam();
  const CompressorSpec spec = spec_for(c);
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const std::int64_t n = small() ? 3 : 8;
  const auto seqs = spec.ratio == 4 ? test::random_sequences(n, 1, 120, spec.hidden, rng)
                                    : test::random_sequences(n, 100, 400, spec.hidden, rng);
  for (WindowState ws : {WindowState::rows, WindowState::running}) {
    if (ws == WindowState::running && spec.overlap()) continue;
    const Options fused{.device = Device::cuda(0), .precision = c.precision, .window_state = ws,
                        .fused_decode = FusedDecode::always};
    Options unfused = fused, automatic = fused;
    unfused.fused_decode = FusedDecode::off;
    automatic.fused_decode = FusedDecode::automatic;
    const Compressor gpu(spec, w.view(spec), fused), gpu_unfused(spec, w.view(spec), unfused);
    {  // the path chosen for a decode step
      StatePool pool(gpu, 1);
      Batch one, many;
      one.add(0, 0, 1);
      many.add(0, 0, 200);
      for (std::int64_t k = 0; k < windows_completed(0, 200, spec.ratio); ++k) many.cache_locations.push_back(k);
      EXPECT_TRUE(gpu.plan(one, pool).fused());
      EXPECT_TRUE(gpu.plan(many, pool).fused());
      EXPECT_FALSE(gpu_unfused.plan(one, pool).fused());
      const Compressor chooser(spec, w.view(spec), automatic);
      StatePool pool_a(chooser, 1);
      Batch four;  // completes a window at ratio 4
      four.add(0, 0, 4);
      for (std::int64_t k = 0; k < windows_completed(0, 4, spec.ratio); ++k) four.cache_locations.push_back(k);
      EXPECT_EQ(chooser.plan(four, pool_a).fused(), spec.overlap() || ws == WindowState::running)
          << "the automatic choice fuses a 4-token CSA step that completes a window, and HCA's with running state";
      EXPECT_EQ(chooser.plan(one, pool_a).fused(), spec.overlap() || ws == WindowState::running)
          << "and a step that completes none alike";
      EXPECT_FALSE(chooser.plan(many, pool_a).fused()) << "and leaves 200 tokens to the unfused path";
      // Beyond 8 tokens, where fused steps multiply on wgmma, narrow projections stay fused:
      // the indexer's 512 columns up to 64 tokens, HCA's 1024 (running state) up to 32, except
      // where the running step (a request of at most 16 tokens) and the sliced projection
      // take it.
      const bool narrow_fuses = cuda::fused_multiplies_on_wgmma(0, spec.hidden) && (spec.overlap() || ws == WindowState::running);
      const std::int64_t most = !narrow_fuses ? 8 : c.kind == CompressorKind::csa_indexer ? 64 : c.kind == CompressorKind::hca ? 32 : 8;
      for (std::int64_t tokens : {16, 32, 64}) {
        Batch wide;
        wide.add(0, 0, tokens);
        for (std::int64_t k = 0; k < windows_completed(0, tokens, spec.ratio); ++k) wide.cache_locations.push_back(k);
        const bool sliced = ws == WindowState::running && tokens <= 16 &&
                            cuda::slice_projection_supported(0, spec.hidden, spec.projection_width(), tokens);
        const Plan p = chooser.plan(wide, pool_a);
        EXPECT_EQ(p.fused(), tokens <= most && !sliced) << tokens << " tokens";
        EXPECT_EQ(p.sliced_projection(), sliced) << tokens << " tokens";
      }
    }
    // b decodes one token per sequence per step, at most 8 tokens a step (one 8-token tile, the
    // automatic choice's range), a's steps take up to 256 tokens in several passes of tiles.
    // Same bits either way.
    const auto a = test::small_step_schedule(seqs, rng, 256), b = test::decode_schedule(seqs, 8);
    check_fused_serving(case_name({c, 0}) + (ws == WindowState::running ? " running" : ""), spec, w, fused, seqs, a, b,
                        true, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(AllModelsKindsPrecisions, CudaFused, ::testing::ValuesIn(cases({Model::flash, Model::pro})),
                         case_name);

// Decode steps of many requests: the fused step cuts each row block's pooling into request
// groups sized to fill the GPU, so these steps (about 57 and 32 requests) cross several groups. Bits equal
// across two schedules (rows state); within SPEC section 4 of the CPU and of the unfused path.
TEST(CudaFusedWide, ManyRequestsPerStepMatchCpuAndUnfused) {
  REQUIRE_GPU();
  for (CompressorKind kind : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca})
    for (WindowState ws : {WindowState::rows, WindowState::running}) {
      auto spec = CompressorSpec::preset(Model::flash, kind);
      if (ws == WindowState::running && spec.overlap()) continue;
      if (small()) spec.hidden = 256;
      std::mt19937_64 rng(std::random_device{}());
      const RandomWeights w = random_weights(spec, rng());
      const auto seqs = spec.ratio == 4 ? test::random_sequences(small() ? 40 : 72, 1, 48, spec.hidden, rng)
                                        : test::random_sequences(small() ? 20 : 40, 130, 300, spec.hidden, rng);
      const Options fused{.device = Device::cuda(0), .precision = {DType::bf16, DType::f32}, .window_state = ws,
                          .fused_decode = FusedDecode::always};
      const auto a = test::small_step_schedule(seqs, rng, 256), b = test::small_step_schedule(seqs, rng, 256);
      std::size_t widest = 0;
      for (const auto& step : a) widest = std::max(widest, step.size());
      // A group holds ceil(requests x row blocks / (3 x SMs)) requests, fewer than the step's.
      ASSERT_GE(widest, 16u) << "the schedule must cross several request groups";
      check_fused_serving(std::string(kind_name(kind)) + (ws == WindowState::running ? " running" : "") + ", widest " +
                              std::to_string(widest) + " requests",
                          spec, w, fused, seqs, a, b, false, rng);
    }
}

// A CSA layer's main and indexer in one fused launch give the same bits as each compressor's
// own fused step, for decode-shaped schedules.
TEST(CudaFusedGroup, OneLaunchMatchesMembersAloneBitForBit) {
  REQUIRE_GPU();
  for (Model model : {Model::flash, Model::pro})
    for (DType score : {DType::f32, DType::bf16}) {
      auto main_spec = CompressorSpec::preset(model, CompressorKind::csa_main);
      auto idx_spec = CompressorSpec::preset(model, CompressorKind::csa_indexer);
      if (small()) main_spec.hidden = idx_spec.hidden = 256;
      std::mt19937_64 rng(std::random_device{}());
      const auto wm = random_weights(main_spec, rng()), wi = random_weights(idx_spec, rng());
      const Options opts{.device = Device::cuda(0), .precision = {score, DType::bf16}, .fused_decode = FusedDecode::always};
      const Compressor main(main_spec, wm.view(main_spec), opts), indexer(idx_spec, wi.view(idx_spec), opts);
      const CompressorGroup group({&main, &indexer});
      const auto seqs = test::random_sequences(small() ? 3 : 10, 1, 150, main_spec.hidden, rng);
      const auto schedule = test::small_step_schedule(seqs, rng, 256);
      auto buffers = test::device_buffers(Device::cuda(0));
      {
        StatePool pm(main, 1), pi(indexer, 1);
        Batch b;
        b.add(0, 0, 3);
        EXPECT_TRUE(group.plan({b, b}, {&pm, &pi}).fused());
        // The automatic choice: a CSA layer's step of at most 8 tokens is fused, whether it
        // completes a window or not; where fused steps multiply on wgmma, up to 32 tokens;
        // a larger one not.
        Options automatic = opts;
        automatic.fused_decode = FusedDecode::automatic;
        const Compressor am(main_spec, wm.view(main_spec), automatic), ai(idx_spec, wi.view(idx_spec), automatic);
        const CompressorGroup auto_group({&am, &ai});
        StatePool qm(am, 16), qi(ai, 16);
        // `requests` requests of `tokens` tokens each from position 0: a window each at 4 tokens.
        const auto batch = [](std::int64_t requests, std::int64_t tokens) {
          Batch b;
          for (std::int64_t s = 0; s < requests; ++s) {
            b.add(s, 0, tokens);
            if (tokens == 4) b.cache_locations.push_back(s);
          }
          return b;
        };
        const auto fused_for = [&](const Batch& b) { return auto_group.plan({b, b}, {&qm, &qi}).fused(); };
        const bool on_wgmma = cuda::fused_multiplies_on_wgmma(0, main_spec.hidden);
        EXPECT_TRUE(fused_for(batch(2, 4))) << "8 tokens, 2 windows";
        EXPECT_TRUE(fused_for(batch(4, 2))) << "8 tokens, no window";
        EXPECT_EQ(fused_for(batch(4, 4)), on_wgmma) << "16 tokens, 4 windows";
        EXPECT_EQ(fused_for(batch(8, 4)), on_wgmma) << "32 tokens, 8 windows";
        EXPECT_EQ(fused_for(batch(16, 2)), on_wgmma) << "32 tokens, no window";
        EXPECT_FALSE(fused_for(batch(16, 4))) << "64 tokens";
      }
      const auto together = test::serve_group(group, seqs, schedule, *buffers);
      const auto alone_main = test::serve(main, seqs, schedule, *buffers, rng);
      const auto alone_idx = test::serve(indexer, seqs, schedule, *buffers, rng);
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        EXPECT_EQ(together[0][i], alone_main.entries[i]) << "main, sequence " << i;
        EXPECT_EQ(together[1][i], alone_idx.entries[i]) << "indexer, sequence " << i;
      }
    }
}

// The compress step of the unfused path: pooling, state update and entries of every member in
// one launch after the cuBLASLt projection. The same bits as the per-stage kernels (entries,
// cache rows) over decode-shaped schedules of up to 256 tokens a step, whose requests span
// several pool groups; Flash and Pro, every kind, every dtype combination, alone and as a CSA
// layer's group.
TEST(CudaCompressStep, OneLaunchMatchesPerStageKernelsBitForBit) {
  REQUIRE_GPU();
  for_models_and_precisions([&](Model model, DType score, DType state, const std::string& label) {
    std::mt19937_64 rng(std::random_device{}());
    Options single{.device = Device::cuda(0), .precision = {score, state}, .fused_decode = FusedDecode::off,
                   .compress_launch = CompressLaunch::single};
    Options per_stage = single;
    per_stage.compress_launch = CompressLaunch::per_stage;
    const CompressorKind kinds[] = {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca};
    std::vector<CompressorSpec> specs;
    std::vector<RandomWeights> weights;
    for (CompressorKind kind : kinds) {
      specs.push_back(CompressorSpec::preset(model, kind));
      if (small()) specs.back().hidden = 256;
      weights.push_back(random_weights(specs.back(), rng()));
    }
    auto buffers = test::device_buffers(Device::cuda(0));
    for (std::size_t k = 0; k < specs.size(); ++k) {
      const CompressorSpec& spec = specs[k];
      Options a = single, b = per_stage;
      if (!spec.overlap()) a.window_state = b.window_state = WindowState::running;
      const Compressor one(spec, weights[k].view(spec), a), staged(spec, weights[k].view(spec), b);
      {  // which steps take it
        StatePool pool(one, 1);
        Batch step, prefill;
        step.add(0, 0, 200);
        prefill.add(0, 0, 300);
        for (std::int64_t e = 0; e < windows_completed(0, 200, spec.ratio); ++e) step.cache_locations.push_back(e);
        for (std::int64_t e = 0; e < windows_completed(0, 300, spec.ratio); ++e) prefill.cache_locations.push_back(e);
        EXPECT_TRUE(one.plan(step, pool).compress_step()) << label;
        EXPECT_FALSE(one.plan(prefill, pool).compress_step()) << label << ": more than 256 tokens";
        Batch partial;  // completes no window: update_state alone
        partial.add(0, 0, 2);
        EXPECT_FALSE(one.plan(partial, pool).compress_step()) << label << ": no entry";
        EXPECT_FALSE(staged.plan(step, pool).compress_step()) << label;
        // The automatic choice: alone, only ratio 128 (running state) from 64 tokens.
        Options automatic = a;
        automatic.compress_launch = CompressLaunch::automatic;
        const Compressor chooser(spec, weights[k].view(spec), automatic);
        StatePool chooser_pool(chooser, 2);
        chooser_pool.data().next_position[1] = 96;  // as if 96 tokens were appended
        Batch short_step;  // 32 tokens that complete a window
        short_step.add(1, spec.ratio == 4 ? 0 : 96, 32);
        for (std::int64_t e = 0; e < windows_completed(short_step.requests[0].start, 32, spec.ratio); ++e)
          short_step.cache_locations.push_back(e);
        EXPECT_EQ(chooser.plan(step, chooser_pool).compress_step(), !spec.overlap()) << label;
        EXPECT_FALSE(chooser.plan(short_step, chooser_pool).compress_step()) << label << ": 32 tokens";
        if (!spec.overlap()) {  // ratio 128 with stored rows keeps the per-stage pooling
          Options rows = single;
          const Compressor with_rows(spec, weights[k].view(spec), rows);
          StatePool rows_pool(with_rows, 1);
          EXPECT_FALSE(with_rows.plan(step, rows_pool).compress_step()) << label;
        }
      }
      const auto seqs = spec.ratio == 4 ? test::random_sequences(small() ? 24 : 60, 1, 60, spec.hidden, rng)
                                        : test::random_sequences(small() ? 12 : 40, 100, 300, spec.hidden, rng);
      const auto schedule = test::small_step_schedule(seqs, rng, 256);
      const auto x = test::serve(one, seqs, schedule, *buffers, rng);
      const auto y = test::serve(staged, seqs, schedule, *buffers, rng);
      EXPECT_EQ(x.problems, "") << label;
      EXPECT_EQ(y.problems, "") << label;
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        EXPECT_EQ(x.entries[i], y.entries[i]) << label << ", " << kind_name(kinds[k]) << ", sequence " << i;
        EXPECT_EQ(x.cache[i], y.cache[i]) << label << ", " << kind_name(kinds[k]) << ", sequence " << i;
      }
    }
    // A CSA layer: main and indexer after one shared projection, in one launch.
    const Compressor main_a(specs[0], weights[0].view(specs[0]), single),
        idx_a(specs[1], weights[1].view(specs[1]), single);
    const Compressor main_b(specs[0], weights[0].view(specs[0]), per_stage),
        idx_b(specs[1], weights[1].view(specs[1]), per_stage);
    const CompressorGroup group_a({&main_a, &idx_a}), group_b({&main_b, &idx_b});
    {
      StatePool pm(main_a, 1), pi(idx_a, 1), qm(main_b, 1), qi(idx_b, 1);
      Batch b;
      b.add(0, 0, 100);
      for (std::int64_t e = 0; e < 25; ++e) b.cache_locations.push_back(e);
      EXPECT_TRUE(group_a.plan({b, b}, {&pm, &pi}).compress_step()) << label;
      EXPECT_FALSE(group_b.plan({b, b}, {&qm, &qi}).compress_step()) << label;
      // A step that completes no entry: the members' state updates in one launch, which is not
      // the compress step (the schedule below serves such steps both ways and compares).
      Batch partial;
      partial.add(0, 0, 2);
      EXPECT_FALSE(group_a.plan({partial, partial}, {&pm, &pi}).compress_step()) << label;
      // The automatic choice takes it for a CSA layer's group.
      Options automatic = single;
      automatic.compress_launch = CompressLaunch::automatic;
      const Compressor main_c(specs[0], weights[0].view(specs[0]), automatic),
          idx_c(specs[1], weights[1].view(specs[1]), automatic);
      const CompressorGroup group_c({&main_c, &idx_c});
      StatePool rm(main_c, 1), ri(idx_c, 1);
      EXPECT_TRUE(group_c.plan({b, b}, {&rm, &ri}).compress_step()) << label;
    }
    const auto seqs = test::random_sequences(small() ? 24 : 60, 1, 60, specs[0].hidden, rng);
    const auto schedule = test::small_step_schedule(seqs, rng, 256);
    const auto together = test::serve_group(group_a, seqs, schedule, *buffers);
    const auto staged = test::serve_group(group_b, seqs, schedule, *buffers);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      EXPECT_EQ(together[0][i], staged[0][i]) << label << ", group main, sequence " << i;
      EXPECT_EQ(together[1][i], staged[1][i]) << label << ", group indexer, sequence " << i;
    }
  });
}

// Served entries against the CPU backend's on the same schedule (every sequence) and the fp64
// formula (the first `with_fp64` sequences, its evaluation being slow), both within SPEC
// section 4, and stored entries the quantization of the bf16 ones. Prints one line: `what`,
// the entries, the two distances.
void check_served_entries(const std::string& what, const CompressorSpec& spec, const RandomWeights& w,
                          const std::vector<test::Sequence>& seqs, const test::Served& gpu, const test::Served& cpu,
                          std::size_t with_fp64, Precision precision) {
  std::vector<std::uint16_t> all_gpu, first_gpu;
  std::vector<double> all_cpu, first_ref;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_EQ(test::check_stored_entries(spec, gpu.entries[i], gpu.cache[i], seqs[i].length / spec.ratio), "")
        << what << ", sequence " << i;
    all_gpu.insert(all_gpu.end(), gpu.entries[i].begin(), gpu.entries[i].end());
    for (auto v : cpu.entries[i]) all_cpu.push_back(num::f32_from_bf16(v));
    if (i >= with_fp64) continue;
    first_gpu.insert(first_gpu.end(), gpu.entries[i].begin(), gpu.entries[i].end());
    const auto ref = test::reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
    first_ref.insert(first_ref.end(), ref.begin(), ref.end());
  }
  ASSERT_FALSE(first_ref.empty()) << what;
  ASSERT_FALSE(all_cpu.empty()) << what;
  const double vs_ref = test::relative_l2(first_gpu, first_ref), vs_cpu = test::relative_l2(all_gpu, all_cpu);
  std::printf("    %s: %zu entries, relative L2 vs fp64 %.3g, vs CPU %.3g (tolerance %.0e)\n", what.c_str(),
              all_gpu.size() / static_cast<std::size_t>(spec.head_dim), vs_ref, vs_cpu, test::tolerance(precision));
  EXPECT_LE(vs_ref, test::tolerance(precision)) << what;
  EXPECT_LE(vs_cpu, test::tolerance(precision)) << what;
}

// Ratio 128 with running state on the unfused path: decode-shaped steps whose requests append
// at most 16 tokens each run launch_running_step (one block per request folds its tokens and
// pools and finishes its own entries), whether or not they complete an entry. The same bits as the per-stage kernels (entries, cache rows) over plain decode
// of many requests (the one-token path) and over mixed decode-shaped steps (requests of 2..16
// tokens take the general path, longer ones the other launches); within SPEC section 4 of the
// CPU backend and of fp64. Flash and Pro, every kv_score/state dtype pair.
TEST(CudaRunningStep, OneBlockPerRequestMatchesPerStageKernelsBitForBit) {
  REQUIRE_GPU();
  for_models_and_precisions([&](Model model, DType score, DType state, const std::string& label) {
    std::mt19937_64 rng(std::random_device{}());
    CompressorSpec spec = CompressorSpec::preset(model, CompressorKind::hca);
    if (small()) spec.hidden = 256;
    const RandomWeights w = random_weights(spec, rng());
    const Options automatic{.device = Device::cuda(0), .precision = {score, state},
                            .window_state = WindowState::running, .fused_decode = FusedDecode::off};
    Options per_stage = automatic;
    per_stage.compress_launch = CompressLaunch::per_stage;
    const Compressor one(spec, w.view(spec), automatic), staged(spec, w.view(spec), per_stage);
    {  // which steps take it: one launch after the projection (Plan::compress_step)
      StatePool pool(one, 64);
      // A token at a window's last position completes an entry; one at 0 completes none.
      const std::int64_t last = spec.ratio - 1;
      pool.data().next_position[7] = last;  // as if that many tokens were appended
      pool.data().next_position[8] = last - 15;
      pool.data().next_position[9] = last - 16;
      Batch decode, no_entry, split, longer;
      for (std::int64_t s = 0; s < 48; ++s) decode.add(s, s == 7 ? last : 0, 1);
      decode.cache_locations = {0};
      for (std::int64_t s = 10; s < 58; ++s) no_entry.add(s, 0, 1);
      split.add(8, last - 15, 16);
      split.add(1, 0, 1);
      split.cache_locations = {0};
      longer.add(9, last - 16, 17);
      longer.cache_locations = {0};
      EXPECT_TRUE(one.plan(decode, pool).compress_step()) << label << ": 48 one-token requests, one entry";
      EXPECT_TRUE(one.plan(no_entry, pool).compress_step()) << label << ": 48 one-token requests, no entry";
      EXPECT_TRUE(one.plan(split, pool).compress_step()) << label << ": requests of 16 and 1 tokens";
      EXPECT_FALSE(one.plan(longer, pool).compress_step()) << label << ": a 17-token request";
      EXPECT_FALSE(staged.plan(decode, pool).compress_step()) << label << ": per-stage kernels asked for";
      Options rows = automatic;
      rows.window_state = WindowState::rows;
      const Compressor with_rows(spec, w.view(spec), rows);
      StatePool rows_pool(with_rows, 64);
      rows_pool.data().next_position[7] = last;
      EXPECT_FALSE(with_rows.plan(decode, rows_pool).compress_step()) << label << ": stored rows";
    }
    auto buffers = test::device_buffers(Device::cuda(0));
    const auto seqs = test::random_sequences(small() ? 12 : 40, 130, 300, spec.hidden, rng);
    const test::Schedule schedules[] = {test::decode_schedule(seqs, seqs.size()),
                                        test::small_step_schedule(seqs, rng, 256)};
    test::Served mixed;
    for (const test::Schedule& schedule : schedules) {
      const auto x = test::serve(one, seqs, schedule, *buffers, rng);
      const auto y = test::serve(staged, seqs, schedule, *buffers, rng);
      EXPECT_EQ(x.problems, "") << label;
      EXPECT_EQ(y.problems, "") << label;
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        EXPECT_EQ(x.entries[i], y.entries[i]) << label << ", sequence " << i;
        EXPECT_EQ(x.cache[i], y.cache[i]) << label << ", sequence " << i;
      }
      mixed = x;
    }
    const Compressor cpu(spec, w.view(spec), {.precision = {score, state}, .window_state = WindowState::running});
    auto host = test::host_buffers();
    const auto h = test::serve(cpu, seqs, schedules[1], *host, rng);
    ASSERT_EQ(h.problems, "") << label;
    check_served_entries("running step " + label, spec, w, seqs, mixed, h, 4, {score, state});
  });
}

// Steps of decode shape in which every request appends 1..16 tokens (most 1), at most
// `max_call_tokens` a step: the steps the running step takes.
test::Schedule running_step_schedule(const std::vector<test::Sequence>& seqs, std::mt19937_64& rng,
                                     std::int64_t max_call_tokens) {
  std::vector<std::int64_t> left;
  for (const auto& q : seqs) left.push_back(q.length);
  test::Schedule schedule;
  std::bernoulli_distribution joins(0.8), one(0.6);
  std::uniform_int_distribution<std::int64_t> more(2, 16);
  while (std::any_of(left.begin(), left.end(), [](std::int64_t l) { return l > 0; })) {
    std::vector<std::pair<std::size_t, std::int64_t>> step;
    std::int64_t room = max_call_tokens;
    for (std::size_t i = 0; i < seqs.size() && room > 0; ++i) {
      if (left[i] == 0 || !joins(rng)) continue;
      const std::int64_t take = std::min({one(rng) ? std::int64_t{1} : more(rng), left[i], room});
      step.emplace_back(i, take);
      left[i] -= take;
      room -= take;
    }
    if (!step.empty()) schedule.push_back(std::move(step));
  }
  return schedule;
}

// Serves `schedule` with the sliced projection (`sliced`), FusedDecode::always (`fused`) and
// the CPU backend: every output written and finite, the two GPU runs' entries and cache rows
// equal bit for bit where `same_bits`, and the sliced run within SPEC section 4 of the CPU
// and (its first `with_fp64` sequences) of fp64.
void check_sliced_serving(const std::string& what, const CompressorSpec& spec, const RandomWeights& w,
                          const Compressor& sliced, const Compressor& fused, const Compressor& cpu,
                          const std::vector<test::Sequence>& seqs, const test::Schedule& schedule, bool same_bits,
                          std::size_t with_fp64, Precision precision, std::mt19937_64& rng) {
  auto buffers = test::device_buffers(Device::cuda(0));
  auto host = test::host_buffers();
  const auto x = test::serve(sliced, seqs, schedule, *buffers, rng);
  const auto y = test::serve(fused, seqs, schedule, *buffers, rng);
  const auto h = test::serve(cpu, seqs, schedule, *host, rng);
  ASSERT_EQ(x.problems, "") << what;
  ASSERT_EQ(y.problems, "") << what;
  ASSERT_EQ(h.problems, "") << what;
  if (same_bits)
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      EXPECT_EQ(x.entries[i], y.entries[i]) << what << ", sequence " << i;
      EXPECT_EQ(x.cache[i], y.cache[i]) << what << ", sequence " << i;
    }
  check_served_entries(what, spec, w, seqs, x, h, with_fp64, precision);
}

// HCA with running state in steps of more than 8 tokens that the running step takes (at most
// 16 a request), up to 1 MiB of x: the automatic choice projects them with the
// sliced projection (sm_90a), whose partial sums are the fused step's. Where the fused step
// multiplies on wgmma (Flash) every entry and cache row equals FusedDecode::always's bit for
// bit, over plain decode of many requests and over steps of 1..16 tokens a request up to 128
// tokens; everywhere within SPEC section 4 of the CPU backend and of fp64. Flash and Pro,
// every dtype pair.
TEST(CudaSlicedProjection, RunningStepsMatchFusedStepBitForBit) {
  REQUIRE_GPU();
  for_models_and_precisions([&](Model model, DType score, DType state, const std::string& label) {
    std::mt19937_64 rng(std::random_device{}());
    CompressorSpec spec = CompressorSpec::preset(model, CompressorKind::hca);
    if (small()) spec.hidden = 512;  // the sliced projection takes hidden in slices of 64 k
    const RandomWeights w = random_weights(spec, rng());
    const Options automatic{.device = Device::cuda(0), .precision = {score, state}, .window_state = WindowState::running};
    Options always = automatic, off = automatic;
    always.fused_decode = FusedDecode::always;
    off.fused_decode = FusedDecode::off;
    const Compressor sliced(spec, w.view(spec), automatic), fused(spec, w.view(spec), always),
        library(spec, w.view(spec), off);
    const bool supported = cuda::slice_projection_supported(0, spec.hidden, spec.projection_width(), 48);
    {  // which steps take it
      StatePool pool(sliced, 64);
      pool.data().next_position[7] = spec.ratio - 1;  // its token completes an entry
      Batch decode, few, longer, over;
      for (std::int64_t s = 0; s < 48; ++s) decode.add(s, s == 7 ? spec.ratio - 1 : 0, 1);
      decode.cache_locations = {0};
      for (std::int64_t s = 10; s < 14; ++s) few.add(s, 0, 1);
      longer.add(50, 0, 17);
      for (std::int64_t s = 20; s < 30; ++s) over.add(s, 0, 16);
      const Plan p = sliced.plan(decode, pool);
      EXPECT_EQ(p.sliced_projection(), supported) << label << ": 48 one-token requests";
      EXPECT_TRUE(p.compress_step() && !p.fused()) << label << ": 48 one-token requests take the running step";
      Batch sixteen;  // past the fused step's 8 tokens, where it would run its ring
      for (std::int64_t s = 30; s < 46; ++s) sixteen.add(s, 0, 1);
      const Plan p16 = sliced.plan(sixteen, pool);
      EXPECT_EQ(p16.sliced_projection(), supported) << label << ": 16 one-token requests";
      EXPECT_EQ(p16.fused(), !supported && cuda::fused_multiplies_on_wgmma(0, spec.hidden)) << label << ": 16 tokens";
      EXPECT_TRUE(sliced.plan(few, pool).fused()) << label << ": 4 tokens stay fused";
      EXPECT_FALSE(sliced.plan(few, pool).sliced_projection()) << label << ": 4 tokens";
      EXPECT_FALSE(sliced.plan(longer, pool).sliced_projection()) << label << ": a 17-token request";
      EXPECT_FALSE(sliced.plan(over, pool).sliced_projection()) << label << ": 160 tokens, more than 1 MiB of x";
      EXPECT_FALSE(library.plan(decode, pool).sliced_projection()) << label << ": FusedDecode::off";
    }
    const bool same_bits = supported && cuda::fused_multiplies_on_wgmma(0, spec.hidden);
    std::printf("    %s: sliced projection %s, bits of the fused step expected: %s\n", label.c_str(),
                supported ? "supported" : "not supported here", same_bits ? "yes" : "no");
    // Under compute-sanitizer (small()) 40 short sequences: decode steps of 33..36 requests.
    const auto seqs = test::random_sequences(small() ? 40 : 48, 130, small() ? 140 : 300, spec.hidden, rng);
    const test::Schedule schedules[] = {test::decode_schedule(seqs, small() ? 36 : 48),
                                        running_step_schedule(seqs, rng, 128)};
    const Compressor cpu(spec, w.view(spec), {.precision = {score, state}, .window_state = WindowState::running});
    for (const test::Schedule& schedule : schedules)
      check_sliced_serving("sliced projection " + label + ", " + std::to_string(schedule.size()) + " steps", spec, w,
                           sliced, fused, cpu, seqs, schedule, same_bits, 3, {score, state}, rng);
  });
}

// Both instances of the sliced projection (one sub-tile of 64 tokens, two of 64) in few
// steps, few enough for racecheck (device-check.sh runs this one under it, not the test above):
// 8 requests x 16 tokens (128 tokens) and 4 x 16 (64) in turn until each has completed an
// entry, then 8 tokens of the first group (64: 8 each, one instance) and 2 of the second
// (8 tokens: the fused step). Flash, whose partial sums are the fused step's: every entry and
// cache row equals FusedDecode::always's bit for bit, and is within SPEC section 4 of the CPU
// backend and of fp64.
TEST(CudaSlicedProjection, BothInstancesGiveFusedStepBits) {
  REQUIRE_GPU();
  for_models_and_precisions([&](Model model, DType score, DType state, const std::string& label) {
    if (model != Model::flash) return;
    std::mt19937_64 rng(std::random_device{}());
    // Flash's own hidden even under compute-sanitizer: 8 atoms of 64 k a slice, so that x
    // goes around the kernel's ring of 4 slots (at hidden 512 a slice is one atom).
    const CompressorSpec spec = CompressorSpec::preset(model, CompressorKind::hca);
    if (!cuda::slice_projection_supported(0, spec.hidden, spec.projection_width(), 128) ||
        !cuda::fused_multiplies_on_wgmma(0, spec.hidden)) {
      std::printf("    %s: the sliced projection does not run here (needs sm_90a code on sm_90)\n", label.c_str());
      return;
    }
    const RandomWeights w = random_weights(spec, rng());
    const Options automatic{.device = Device::cuda(0), .precision = {score, state}, .window_state = WindowState::running};
    Options always = automatic;
    always.fused_decode = FusedDecode::always;
    const Compressor sliced(spec, w.view(spec), automatic), fused(spec, w.view(spec), always);
    const Compressor cpu(spec, w.view(spec), {.precision = {score, state}, .window_state = WindowState::running});
    std::vector<test::Sequence> seqs = test::random_sequences(8, 136, 136, spec.hidden, rng);
    for (auto& s : test::random_sequences(4, 130, 130, spec.hidden, rng)) seqs.push_back(std::move(s));
    test::Schedule schedule;
    auto group_step = [&](std::size_t first, std::size_t count, std::int64_t tokens) {
      std::vector<std::pair<std::size_t, std::int64_t>> step;
      for (std::size_t i = first; i < first + count; ++i) step.emplace_back(i, tokens);
      schedule.push_back(std::move(step));
    };
    for (int k = 0; k < 8; ++k) group_step(0, 8, 16), group_step(8, 4, 16);
    group_step(0, 8, 8);
    group_step(8, 4, 2);
    {  // the steps take the paths named above
      StatePool pool(sliced, 16);
      Batch wide, narrow, tail;
      for (std::int64_t s = 0; s < 8; ++s) wide.add(s, 0, 16), tail.add(s, 0, 8);
      for (std::int64_t s = 8; s < 12; ++s) narrow.add(s, 0, 16);
      for (const Batch* b : {&wide, &narrow, &tail}) {
        const Plan p = sliced.plan(*b, pool);
        ASSERT_TRUE(p.sliced_projection() && !p.fused()) << label << ", " << b->requests.size() << " requests";
      }
    }
    check_sliced_serving("both sliced instances " + label, spec, w, sliced, fused, cpu, seqs, schedule, true, 2,
                         {score, state}, rng);
  });
}

// The compress step and the fused step's instances in a few steps each, few enough for
// racecheck (device-check.sh runs these under it, not the long serving tests above). Flash:
//  - a CSA layer's group after its projection (the compress step), 12 requests of 5, 4, 1 and
//    3 tokens (60, 48, 12, 36 tokens; windows complete in all but the third), against the
//    per-stage kernels, and HCA with running state alone (4 requests of 64, 64, 8 tokens: an
//    entry each in the second step), each for kv_score f32 and bf16: the same entries and
//    cache rows;
//  - the fused step (FusedDecode::always) of the same group, in steps of 1 token (8 requests:
//    the one-tile instance with the stash), 5 (40 tokens: the ring on wgmma where the device
//    has it, else mma.sync) and 2 (4 requests): the same entries as each member's own fused
//    step, the bits of CudaFusedGroup.
TEST(CudaCompressStep, FewStepsForRacecheck) {
  REQUIRE_GPU();
  std::mt19937_64 rng(std::random_device{}());
  auto main_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  auto idx_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer);
  auto hca_spec = CompressorSpec::preset(Model::flash, CompressorKind::hca);
  main_spec.hidden = idx_spec.hidden = hca_spec.hidden = 256;  // the compress step projects nothing
  const auto wm = random_weights(main_spec, rng()), wi = random_weights(idx_spec, rng()), wh = random_weights(hca_spec, rng());
  auto buffers = test::device_buffers(Device::cuda(0));
  auto steps = [](std::size_t first, std::size_t count, std::initializer_list<std::int64_t> tokens) {
    test::Schedule schedule;
    for (std::int64_t t : tokens) {
      std::vector<std::pair<std::size_t, std::int64_t>> step;
      for (std::size_t i = first; i < first + count; ++i) step.emplace_back(i, t);
      schedule.push_back(std::move(step));
    }
    return schedule;
  };
  for (DType score : {DType::f32, DType::bf16}) {
    const std::string label = std::string("kv_score ") + std::string(dtype_name(score));
    const Options single{.device = Device::cuda(0), .precision = {score, score}, .fused_decode = FusedDecode::off,
                         .compress_launch = CompressLaunch::single};
    Options per_stage = single;
    per_stage.compress_launch = CompressLaunch::per_stage;
    {  // a CSA layer's group
      const Compressor ma(main_spec, wm.view(main_spec), single), ia(idx_spec, wi.view(idx_spec), single);
      const Compressor mb(main_spec, wm.view(main_spec), per_stage), ib(idx_spec, wi.view(idx_spec), per_stage);
      const CompressorGroup a({&ma, &ia}), b({&mb, &ib});
      {
        StatePool pm(ma, 12), pi(ia, 12);
        Batch wide;
        for (std::int64_t s = 0; s < 12; ++s) wide.add(s, 0, 5), wide.cache_locations.push_back(s);
        ASSERT_TRUE(a.plan({wide, wide}, {&pm, &pi}).compress_step()) << label;
      }
      const auto seqs = test::random_sequences(12, 13, 13, main_spec.hidden, rng);
      const auto schedule = steps(0, 12, {5, 4, 1, 3});
      const auto x = test::serve_group(a, seqs, schedule, *buffers), y = test::serve_group(b, seqs, schedule, *buffers);
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        ASSERT_EQ(x[0][i].size(), 3u * static_cast<std::size_t>(main_spec.head_dim)) << label << ", sequence " << i;
        EXPECT_EQ(x[0][i], y[0][i]) << label << ", group main, sequence " << i;
        EXPECT_EQ(x[1][i], y[1][i]) << label << ", group indexer, sequence " << i;
      }
    }
    {  // HCA with running state alone
      Options a_opts = single, b_opts = per_stage;
      a_opts.window_state = b_opts.window_state = WindowState::running;
      const Compressor a(hca_spec, wh.view(hca_spec), a_opts), b(hca_spec, wh.view(hca_spec), b_opts);
      const auto seqs = test::random_sequences(4, 136, 136, hca_spec.hidden, rng);
      const auto schedule = steps(0, 4, {64, 64, 8});
      {
        StatePool pool(a, 4);
        pool.data().next_position[0] = 64;  // as if 64 tokens were appended: the next 64 complete a window
        Batch second;
        second.add(0, 64, 64);
        second.cache_locations.push_back(0);
        ASSERT_TRUE(a.plan(second, pool).compress_step()) << label;
      }
      const auto x = test::serve(a, seqs, schedule, *buffers, rng), y = test::serve(b, seqs, schedule, *buffers, rng);
      EXPECT_EQ(x.problems, "") << label;
      EXPECT_EQ(y.problems, "") << label;
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        ASSERT_EQ(x.entries[i].size(), static_cast<std::size_t>(hca_spec.head_dim)) << label << ", HCA sequence " << i;
        EXPECT_EQ(x.entries[i], y.entries[i]) << label << ", HCA sequence " << i;
        EXPECT_EQ(x.cache[i], y.cache[i]) << label << ", HCA sequence " << i;
      }
    }
  }
  // The fused step's instances, at Flash's own hidden (8 atoms a slice: the ring goes round).
  const auto fm_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  const auto fi_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer);
  const auto fwm = random_weights(fm_spec, rng()), fwi = random_weights(fi_spec, rng());
  const Options always{.device = Device::cuda(0), .precision = {DType::bf16, DType::f32}, .fused_decode = FusedDecode::always};
  const Compressor fm(fm_spec, fwm.view(fm_spec), always), fi(fi_spec, fwi.view(fi_spec), always);
  const CompressorGroup group({&fm, &fi});
  std::vector<test::Sequence> seqs = test::random_sequences(8, 6, 6, fm_spec.hidden, rng);
  for (auto& q : test::random_sequences(4, 2, 2, fm_spec.hidden, rng)) seqs.push_back(std::move(q));
  test::Schedule schedule = steps(0, 8, {1, 5});
  schedule.push_back(steps(8, 4, {2})[0]);
  const auto together = test::serve_group(group, seqs, schedule, *buffers);
  const auto alone_main = test::serve(fm, seqs, schedule, *buffers, rng);
  const auto alone_idx = test::serve(fi, seqs, schedule, *buffers, rng);
  EXPECT_EQ(alone_main.problems, "");
  for (std::size_t i = 0; i < 8; ++i) {
    ASSERT_EQ(together[0][i].size(), static_cast<std::size_t>(fm_spec.head_dim)) << "fused, sequence " << i;
    EXPECT_EQ(together[0][i], alone_main.entries[i]) << "fused main, sequence " << i;
    EXPECT_EQ(together[1][i], alone_idx.entries[i]) << "fused indexer, sequence " << i;
  }
}

// Fused plans of different sizes (different kernel instances and shared memory) may all be made
// first and run later in any order, and give the bits of plans made just before their run.
TEST(CudaFusedPlans, MadeTogetherRunInAnyOrder) {
  REQUIRE_GPU();
  CompressorSpec spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  if (small()) spec.hidden = 256;
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const Compressor gpu(spec, w.view(spec), {.device = Device::cuda(0), .precision = {DType::bf16, DType::f32},
                                            .fused_decode = FusedDecode::always});
  // Two requests in their own slots: 4 tokens (one tile, every weight staged), 200 tokens.
  std::vector<Batch> steps(2);
  steps[0].add(0, 0, 4);
  steps[1].add(1, 0, 200);
  std::vector<std::vector<std::uint16_t>> xs;
  std::vector<std::unique_ptr<Buffer>> x, out_early, out_late;
  for (Batch& b : steps) {
    const std::int64_t n = b.requests[0].num_tokens, e = windows_completed(0, n, spec.ratio);
    for (std::int64_t k = 0; k < e; ++k) b.cache_locations.push_back(k);
    xs.push_back(random_x(n, spec.hidden, rng));
    x.push_back(std::make_unique<Buffer>(Device::cuda(0), xs.back().size() * 2));
    x.back()->upload(xs.back().data(), xs.back().size() * 2);
    for (auto* outs : {&out_early, &out_late}) {
      outs->push_back(std::make_unique<Buffer>(Device::cuda(0), static_cast<std::size_t>(e * spec.head_dim * 2)));
      outs->back()->fill(0xff);
    }
  }
  auto outputs = [&](std::vector<std::unique_ptr<Buffer>>& outs, std::size_t k) {
    const std::int64_t e = static_cast<std::int64_t>(steps[k].cache_locations.size());
    return RunOutputs{std::nullopt, outs[k]->view(DType::bf16, {e, spec.head_dim})};
  };
  auto x_view = [&](std::size_t k) { return x[k]->view(DType::bf16, {steps[k].requests[0].num_tokens, spec.hidden}); };
  StatePool early(gpu, 2), late(gpu, 2);
  const Plan p0 = gpu.plan(steps[0], early), p1 = gpu.plan(steps[1], early);
  ASSERT_TRUE(p0.fused() && p1.fused());
  gpu.run(p0, x_view(0), early, outputs(out_early, 0));
  gpu.run(p1, x_view(1), early, outputs(out_early, 1));
  for (std::size_t k : {1u, 0u}) gpu.forward(steps[k], x_view(k), late, outputs(out_late, k));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (std::size_t k = 0; k < steps.size(); ++k) {
    std::vector<std::uint16_t> a(out_early[k]->size() / 2), b(a.size());
    out_early[k]->download(a.data(), a.size() * 2);
    out_late[k]->download(b.data(), b.size() * 2);
    for (std::uint16_t v : a) ASSERT_TRUE(std::isfinite(num::f32_from_bf16(v))) << "unwritten entry, step " << k;
    EXPECT_EQ(a, b) << "step " << k;
  }
}

// A whole run captured in a CUDA graph, replayed with new x and a restored state: each replay
// gives the same bits as an eager run on the same inputs, on a non-default stream.
TEST(CudaGraph, CapturedRunReplaysWithNewInputs) {
  REQUIRE_GPU();
  // The fused step; the unfused path with its compress step (HCA with running state, where it
  // applies); the unfused path's per-stage kernels; HCA's running step after the library's
  // projection (FusedDecode::off) and after the sliced projection (automatic, sm_90a: the step's
  // 40 tokens are past what the fused step takes).
  for (CompressLaunch launch : {CompressLaunch::single, CompressLaunch::per_stage, CompressLaunch::automatic})
  for (FusedDecode path : {FusedDecode::always, FusedDecode::off, FusedDecode::automatic})
  for (CompressorKind kind : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca}) {
    if (path == FusedDecode::always && launch != CompressLaunch::single) continue;
    if (path == FusedDecode::automatic && launch != CompressLaunch::automatic) continue;
    if (launch == CompressLaunch::automatic && kind != CompressorKind::hca) continue;
    CompressorSpec spec = CompressorSpec::preset(Model::flash, kind);
    if (small()) spec.hidden = path == FusedDecode::automatic ? 512 : 256;
    std::mt19937_64 rng(std::random_device{}());
    const RandomWeights w = random_weights(spec, rng());
    const bool compress_step = path != FusedDecode::always && launch != CompressLaunch::per_stage;
    const WindowState ws = compress_step && !spec.overlap() ? WindowState::running : WindowState::rows;
    const Compressor gpu(spec, w.view(spec),
                         {.device = Device::cuda(0), .precision = {DType::bf16, DType::f32}, .window_state = ws,
                          .fused_decode = path, .compress_launch = launch});
    const std::int64_t r = spec.ratio;
    // History: 16 requests at varied positions; then a step of 1..4 tokens each (decode and
    // multi-token decode), some completing windows.
    StatePool graph_state(gpu, 16);
    Batch prefix, step;
    std::int64_t prefix_tokens = 0, step_tokens = 0;
    for (int i = 0; i < 16; ++i) {
      const std::int64_t len = r * (1 + i % 3) - 1 - i % 2, n = 1 + i % 4;
      prefix.add(i, 0, len);
      step.add(i, len, n);
      prefix_tokens += len;
      step_tokens += n;
    }
    for (const auto& q : prefix.requests) for (std::int64_t k = 0; k < windows_completed(q.start, q.num_tokens, r); ++k)
      prefix.cache_locations.push_back(static_cast<std::int64_t>(prefix.cache_locations.size()));
    for (const auto& q : step.requests) for (std::int64_t k = 0; k < windows_completed(q.start, q.num_tokens, r); ++k)
      step.cache_locations.push_back(40 + static_cast<std::int64_t>(step.cache_locations.size()));
    Buffer cache(Device::cuda(0), static_cast<std::size_t>(64 * spec.entry_bytes()));
    const TensorView cache_view = cache.view(DType::u8, {64, spec.entry_bytes()});
    const auto x0 = random_x(prefix_tokens, spec.hidden, rng);
    Buffer xp(Device::cuda(0), x0.size() * 2);
    xp.upload(x0.data(), x0.size() * 2);
    gpu.forward(prefix, xp.view(DType::bf16, {prefix_tokens, spec.hidden}), graph_state, {.cache = cache_view});
    const TensorView mem = graph_state.memory();
    std::vector<std::uint8_t> saved(mem.nbytes());
    ASSERT_EQ(cudaMemcpy(saved.data(), mem.data, saved.size(), cudaMemcpyDeviceToHost), cudaSuccess);

    const Plan plan = gpu.plan(step, graph_state);
    const std::int64_t entries = plan.num_entries();
    ASSERT_GT(entries, 0);
    ASSERT_EQ(plan.fused(), path == FusedDecode::always) << "a decode step takes the fused path where allowed";
    ASSERT_EQ(plan.compress_step(), compress_step) << "and the compress step where asked";
    ASSERT_EQ(plan.sliced_projection(),
              path == FusedDecode::automatic && cuda::slice_projection_supported(0, spec.hidden, spec.projection_width(), step_tokens))
        << "and the sliced projection where it applies";
    Buffer x(Device::cuda(0), static_cast<std::size_t>(step_tokens * spec.hidden * 2));
    Buffer out(Device::cuda(0), static_cast<std::size_t>(entries * spec.head_dim * 2));
    cudaStream_t stream;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    gpu.run(plan, x.view(DType::bf16, {step_tokens, spec.hidden}), graph_state,
            {.cache = cache_view, .entries = out.view(DType::bf16, {entries, spec.head_dim})}, stream);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

    for (int trial = 0; trial < 3; ++trial) {
      const auto xs = random_x(step_tokens, spec.hidden, rng);
      x.upload(xs.data(), xs.size() * 2);
      out.fill(0xff);
      ASSERT_EQ(cudaMemcpy(mem.data, saved.data(), saved.size(), cudaMemcpyHostToDevice), cudaSuccess);
      // The copy from pageable memory may return before its last DMA lands, and `stream` is not
      // ordered after it: without this the replay read part of the old state (seen at 16
      // requests, once in three trials).
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      std::vector<std::uint16_t> replayed(static_cast<std::size_t>(entries * spec.head_dim));
      out.download(replayed.data(), replayed.size() * 2);
      std::vector<std::uint8_t> replay_state(saved.size());
      ASSERT_EQ(cudaMemcpy(replay_state.data(), mem.data, saved.size(), cudaMemcpyDeviceToHost), cudaSuccess);

      // The eager reference: the same history and step in a fresh pool, outside any graph.
      StatePool eager_state(gpu, 16);
      gpu.forward(prefix, xp.view(DType::bf16, {prefix_tokens, spec.hidden}), eager_state, {.cache = cache_view});
      Buffer eout(Device::cuda(0), out.size());
      eout.fill(0xff);
      gpu.forward(step, x.view(DType::bf16, {step_tokens, spec.hidden}), eager_state,
                  {.cache = cache_view, .entries = eout.view(DType::bf16, {entries, spec.head_dim})});
      const TensorView emem = eager_state.memory();
      std::vector<std::uint16_t> eager(replayed.size());
      eout.download(eager.data(), eager.size() * 2);
      std::vector<std::uint8_t> eager_mem(saved.size());
      ASSERT_EQ(cudaMemcpy(eager_mem.data(), emem.data, saved.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      for (std::uint16_t v : replayed) ASSERT_TRUE(std::isfinite(num::f32_from_bf16(v))) << "unwritten entry";
      EXPECT_EQ(replayed, eager) << kind_name(kind) << " trial " << trial;
      const auto differ = std::mismatch(replay_state.begin(), replay_state.end(), eager_mem.begin());
      if (differ.first != replay_state.end()) {  // where: slot, row of its ring, byte in the row
        const auto at = static_cast<std::size_t>(differ.first - replay_state.begin());
        const auto& sd = graph_state.data();
        const std::size_t row_bytes = static_cast<std::size_t>(sd.row_elems) * dtype_size(sd.precision.state);
        ADD_FAILURE() << kind_name(kind) << " trial " << trial << ": the replayed state differs from the eager one, first at byte "
                      << at << " (slot " << at / sd.slot_bytes << ", row " << at % sd.slot_bytes / row_bytes << ", byte "
                      << at % sd.slot_bytes % row_bytes << " of " << row_bytes << "), "
                      << std::count_if(replay_state.begin(), replay_state.end(),
                                       [&, i = std::size_t{0}](std::uint8_t v) mutable { return v != eager_mem[i++]; })
                      << " bytes in all";
      }
      EXPECT_NE(replay_state, saved) << "the replay did not update the state";
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

// SPEC section 3 at the projection itself: different token counts take different cuBLASLt
// algorithms (cuda::Projection's ranges), and a token's row must keep its bits at every count.
// Rows of calls from 1 to about 2100 tokens, starting at random tokens, against the same rows
// of one call over every token; Flash and Pro shapes (a CSA layer's shared width), both outputs.
TEST(CudaProjection, RowsKeepTheirBitsAcrossTokenRanges) {
  REQUIRE_GPU();
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Model model : {Model::flash, Model::pro}) {
    const auto main_spec = CompressorSpec::preset(model, CompressorKind::csa_main);
    const auto idx_spec = CompressorSpec::preset(model, CompressorKind::csa_indexer);
    const std::int64_t width = main_spec.projection_width() + idx_spec.projection_width();
    const std::int64_t hidden = small() ? 256 : main_spec.hidden, tokens = small() ? 300 : 2200;
    std::vector<std::uint16_t> w(static_cast<std::size_t>(width * hidden)), x(static_cast<std::size_t>(tokens * hidden));
    const float w_std = 1.0f / std::sqrt(static_cast<float>(hidden));
    for (auto& v : w) v = num::bf16_from_f32(normal(rng) * w_std);
    for (auto& v : x) v = num::bf16_from_f32(normal(rng));
    Buffer dw(Device::cuda(0), w.size() * 2), dx(Device::cuda(0), x.size() * 2);
    ASSERT_EQ(cudaMemcpy(dw.data(), w.data(), w.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dx.data(), x.data(), x.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    for (DType out : {DType::f32, DType::bf16}) {
      const std::size_t row_bytes = static_cast<std::size_t>(width) * dtype_size(out);
      const cuda::Projection projection(0, dw.data(), width, hidden, out);
      Buffer dall(Device::cuda(0), static_cast<std::size_t>(tokens) * row_bytes), dpart(Device::cuda(0), static_cast<std::size_t>(tokens) * row_bytes);
      projection.run(dx.data(), tokens, dw.data(), dall.data(), width, nullptr);
      std::vector<unsigned char> all(static_cast<std::size_t>(tokens) * row_bytes), part;
      ASSERT_EQ(cudaMemcpy(all.data(), dall.data(), all.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      for (std::int64_t n : {1, 3, 8, 9, 16, 17, 40, 64, 65, 130, 256, 257, 600, 1100, 2100}) {
        if (n > tokens) continue;
        const std::int64_t first = std::uniform_int_distribution<std::int64_t>(0, tokens - n)(rng);
        ASSERT_EQ(cudaMemset(dpart.data(), 0xff, static_cast<std::size_t>(n) * row_bytes), cudaSuccess);  // NaN poison
        projection.run(static_cast<const std::uint16_t*>(dx.data()) + first * hidden, n, dw.data(), dpart.data(), width, nullptr);
        part.resize(static_cast<std::size_t>(n) * row_bytes);
        ASSERT_EQ(cudaMemcpy(part.data(), dpart.data(), part.size(), cudaMemcpyDeviceToHost), cudaSuccess);
        EXPECT_EQ(0, std::memcmp(part.data(), all.data() + static_cast<std::size_t>(first) * row_bytes, part.size()))
            << model_name(model) << ", " << dtype_name(out) << " output, " << n << " tokens from token " << first;
      }
      std::printf("    %s %s: %d of %d token ranges with an algorithm of their own\n", std::string(model_name(model)).c_str(),
                  std::string(dtype_name(out)).c_str(), projection.ranges_with_own_algorithm(), projection.ranges());
    }
  }
}

// A CSA layer's main and indexer compressors through one shared projection on the GPU (the
// unfused path): within tolerance of each compressor alone, and bit-identical across splits.
TEST(CudaGroup, SharedProjectionMatchesSoloAndSplits) {
  REQUIRE_GPU();
  for (DType score : {DType::f32, DType::bf16}) {
    auto main_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
    auto idx_spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_indexer);
    if (small()) main_spec.hidden = idx_spec.hidden = 256;
    std::mt19937_64 rng(std::random_device{}());
    const auto wm = random_weights(main_spec, rng()), wi = random_weights(idx_spec, rng());
    const Options opts{.device = Device::cuda(0), .precision = {score, DType::f32}, .fused_decode = FusedDecode::off};
    const Compressor main(main_spec, wm.view(main_spec), opts), indexer(idx_spec, wi.view(idx_spec), opts);
    const CompressorGroup group({&main, &indexer});
    const auto seqs = test::random_sequences(small() ? 3 : 8, 1, 150, main_spec.hidden, rng);
    auto buffers = test::device_buffers(Device::cuda(0));
    const auto whole = test::serve_group(group, seqs, test::whole_schedule(seqs), *buffers);
    const auto split = test::serve_group(group, seqs, test::random_schedule(seqs, rng), *buffers);
    const auto alone_main = test::serve(main, seqs, test::whole_schedule(seqs), *buffers, rng);
    const auto alone_idx = test::serve(indexer, seqs, test::whole_schedule(seqs), *buffers, rng);
    std::vector<std::uint16_t> g_main, g_idx;
    std::vector<double> s_main, s_idx;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      EXPECT_EQ(split[0][i], whole[0][i]) << "main, sequence " << i;
      EXPECT_EQ(split[1][i], whole[1][i]) << "indexer, sequence " << i;
      g_main.insert(g_main.end(), whole[0][i].begin(), whole[0][i].end());
      g_idx.insert(g_idx.end(), whole[1][i].begin(), whole[1][i].end());
      for (auto v : alone_main.entries[i]) s_main.push_back(num::f32_from_bf16(v));
      for (auto v : alone_idx.entries[i]) s_idx.push_back(num::f32_from_bf16(v));
    }
    const double tol = test::tolerance(opts.precision);
    EXPECT_LE(test::relative_l2(g_main, s_main), tol);
    EXPECT_LE(test::relative_l2(g_idx, s_idx), tol);
    std::printf("    group kv_score %s: vs solo main %.3g, indexer %.3g\n", std::string(dtype_name(score)).c_str(),
                test::relative_l2(g_main, s_main), test::relative_l2(g_idx, s_idx));
  }
}

// Running accumulators (HCA) on the GPU: within tolerance of the CPU's running path and of
// fp64, and splits change entries by rounding only.
TEST(CudaRunning, WithinToleranceAcrossSplits) {
  REQUIRE_GPU();
  for (DType score : {DType::f32, DType::bf16})
    for (DType state : {DType::f32, DType::bf16}) {
      CompressorSpec spec = CompressorSpec::preset(Model::flash, CompressorKind::hca);
      if (small()) spec.hidden = 256;
      std::mt19937_64 rng(std::random_device{}());
      const RandomWeights w = random_weights(spec, rng());
      const Precision p{score, state};
      const Compressor gpu(spec, w.view(spec), {.device = Device::cuda(0), .precision = p, .window_state = WindowState::running});
      const Compressor cpu(spec, w.view(spec), {.precision = p, .window_state = WindowState::running});
      const auto seqs = test::random_sequences(small() ? 3 : 8, 100, 900, spec.hidden, rng);
      auto gb = test::device_buffers(Device::cuda(0));
      auto hb = test::host_buffers();
      const auto split = test::serve(gpu, seqs, test::random_schedule(seqs, rng), *gb, rng);
      const auto whole = test::serve(gpu, seqs, test::whole_schedule(seqs), *gb, rng);
      const auto host = test::serve(cpu, seqs, test::whole_schedule(seqs), *hb, rng);
      ASSERT_EQ(split.problems, "");
      std::vector<std::uint16_t> got;
      std::vector<double> ref, w_whole, w_cpu;
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        EXPECT_EQ(test::check_stored_entries(spec, split.entries[i], split.cache[i], seqs[i].length / spec.ratio), "");
        got.insert(got.end(), split.entries[i].begin(), split.entries[i].end());
        for (auto v : whole.entries[i]) w_whole.push_back(num::f32_from_bf16(v));
        for (auto v : host.entries[i]) w_cpu.push_back(num::f32_from_bf16(v));
        const auto r = test::reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
        ref.insert(ref.end(), r.begin(), r.end());
      }
      std::printf("    running kv_score %s state %s: vs fp64 %.3g, vs CPU %.3g, split vs whole %.3g\n",
                  std::string(dtype_name(score)).c_str(), std::string(dtype_name(state)).c_str(),
                  test::relative_l2(got, ref), test::relative_l2(got, w_cpu), test::relative_l2(got, w_whole));
      EXPECT_LE(test::relative_l2(got, ref), test::tolerance(p));
      EXPECT_LE(test::relative_l2(got, w_cpu), test::tolerance(p));
      EXPECT_LE(test::relative_l2(got, w_whole), 2e-3);
    }
}

// The soak on the GPU: thousands of small serving steps (arrivals, chunked prefills, decodes,
// multi-token decodes, slot reuse), every entry bit-identical to one call per whole sequence
// and within tolerance of the fp64 formula.
TEST(CudaSoak, ThousandsOfServingStepsMatchTheWholeSequenceFormula) {
  REQUIRE_GPU();
  std::mt19937_64 rng(std::random_device{}());
  std::size_t steps = 0;
  for (CompressorKind kind : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca}) {
    for (DType score : {DType::f32, DType::bf16}) {
      CompressorSpec spec = CompressorSpec::preset(Model::flash, kind);
      spec.hidden = 64;
      const RandomWeights w = random_weights(spec, rng());
      const Precision p{score, DType::f32};
      const Compressor gpu(spec, w.view(spec), {.device = Device::cuda(0), .precision = p});
      auto buffers = test::device_buffers(Device::cuda(0));
      steps += test::soak(gpu, w, small() ? 20 : (spec.ratio == 4 ? 160 : 60), *buffers, rng).steps;
    }
  }
  std::printf("    GPU soak: %zu serving steps\n", steps);
  EXPECT_GE(steps, small() ? 100u : 2000u);
}

// NaN or Inf in one request's x stays in that request on the GPU too, on the unfused path
// (one call) and the fused one (decode steps, where a NaN pooled value passes from a pool
// item to its entry through the pending-mark hand-off and must not be taken for the mark).
TEST(CudaHostileValues, NanAndInfStayInTheirRequest) {
  REQUIRE_GPU();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (auto [kind, decode] : {std::pair{CompressorKind::csa_main, false}, std::pair{CompressorKind::hca, false},
                                std::pair{CompressorKind::csa_main, true}, std::pair{CompressorKind::hca, true}}) {
      CompressorSpec spec = CompressorSpec::preset(Model::flash, kind);
      spec.hidden = 256;  // the fused step's smallest hidden size
      std::mt19937_64 rng(std::random_device{}());
      const RandomWeights w = random_weights(spec, rng());
      const Compressor gpu(spec, w.view(spec),
                           {.device = Device::cuda(0), .fused_decode = decode ? FusedDecode::always : FusedDecode::off});
      const std::int64_t n = 2 * spec.ratio + 3;
      const auto x = random_x(3 * n, spec.hidden, rng);
      auto poisoned = x;
      for (std::int64_t k = 0; k < spec.hidden; k += 7)
        poisoned[static_cast<std::size_t>((n + 5) * spec.hidden + k)] = num::bf16_from_f32(bad);
      std::vector<test::Sequence> clean(3), dirty(3);
      for (int r = 0; r < 3; ++r) {
        clean[r].length = dirty[r].length = n;
        clean[r].x.assign(x.begin() + r * n * spec.hidden, x.begin() + (r + 1) * n * spec.hidden);
        dirty[r].x.assign(poisoned.begin() + r * n * spec.hidden, poisoned.begin() + (r + 1) * n * spec.hidden);
      }
      auto buffers = test::device_buffers(Device::cuda(0));
      const auto schedule = decode ? test::decode_schedule(clean, 3) : test::whole_schedule(clean);
      const auto a = test::serve(gpu, clean, schedule, *buffers, rng);
      const auto b = test::serve(gpu, dirty, schedule, *buffers, rng);
      EXPECT_EQ(a.problems, "");
      EXPECT_EQ(a.entries[0], b.entries[0]);
      EXPECT_EQ(a.entries[2], b.entries[2]);
      EXPECT_EQ(a.cache[0], b.cache[0]);
      EXPECT_EQ(a.cache[2], b.cache[2]);
      EXPECT_NE(a.entries[1], b.entries[1]);
    }
  }
}

// `run --device cuda` honours the same contract as on the CPU and gives the same numbers
// within SPEC section 4.
TEST(CudaCli, RunMatchesCpu) {
  REQUIRE_GPU();
  test::TempDir dir;
  CompressorSpec spec = CompressorSpec::preset(Model::flash, CompressorKind::csa_main);
  spec.hidden = 256;
  std::mt19937_64 rng(std::random_device{}());
  const RandomWeights w = random_weights(spec, rng());
  const std::string p = "layers.2.attn.compressor";
  io::write_safetensors(dir.file("w.safetensors"),
                        {{p + ".wkv.weight", DType::bf16, {1024, spec.hidden}, w.wkv.data()},
                         {p + ".wgate.weight", DType::bf16, {1024, spec.hidden}, w.wgate.data()},
                         {p + ".ape", DType::f32, {4, 1024}, w.ape.data()},
                         {p + ".norm.weight", DType::f32, {512}, w.norm.data()}});
  const auto seqs = test::random_sequences(3, 1, 300, spec.hidden, rng);
  std::vector<io::TensorToWrite> xs;
  for (std::size_t i = 0; i < seqs.size(); ++i)
    xs.push_back({"x." + std::to_string(i), DType::bf16, {seqs[i].length, spec.hidden}, seqs[i].x.data()});
  io::write_safetensors(dir.file("x.safetensors"), xs);
  const std::string base = test::cli_path() + " run --weights " + dir.file("w.safetensors") + " --prefix " + p +
                           " --input " + dir.file("x.safetensors") + " --chunks 7,1 --output ";
  ASSERT_EQ(std::system((base + dir.file("cpu.safetensors")).c_str()), 0);
  ASSERT_EQ(std::system((base + dir.file("gpu.safetensors") + " --device cuda").c_str()), 0);
  const auto a = io::SafetensorsFile::open(dir.file("cpu.safetensors"));
  const auto b = io::SafetensorsFile::open(dir.file("gpu.safetensors"));
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const auto ka = a.copy<std::uint16_t>(a.get("kv." + std::to_string(i)));
    const auto kb = b.copy<std::uint16_t>(b.get("kv." + std::to_string(i)));
    std::vector<double> ref;
    for (auto v : ka) ref.push_back(num::f32_from_bf16(v));
    EXPECT_EQ(b.get("kv." + std::to_string(i)).shape, a.get("kv." + std::to_string(i)).shape);
    if (!ref.empty()) {
      EXPECT_LE(test::relative_l2(kb, ref), 2e-3);
    }
    const auto& cache = b.get("cache." + std::to_string(i));
    EXPECT_EQ(test::check_stored_entries(spec, kb, b.copy<std::uint8_t>(cache), cache.shape[0]), "");
  }
}

// `demo --device cuda`: the split invariant bit for bit with every step unfused, and the
// default options (decode steps fused where faster) within SPEC section 4 of the one-shot
// run. Flash's CSA decode steps take the fused path, so some row must differ by rounding:
// the comparison is not between equal things.
TEST(CudaCli, DemoServesWithinSpec) {
  REQUIRE_GPU();
  test::TempDir dir;
  for (const std::string model : {"flash", "pro"}) {
    const std::string out = dir.file("demo.txt"), err = dir.file("demo.err");
    const std::string cmd = test::cli_path() + " demo --device cuda --model " + model + " --requests 8 >" + out +
                            " 2>" + err;
    const int status = std::system(cmd.c_str());
    const std::string text = test::read_bytes(out);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text << test::read_bytes(err);
    EXPECT_EQ(text.find("MISMATCH"), std::string::npos) << text;
    EXPECT_EQ(text.find("OUT OF SPEC"), std::string::npos) << text;
    EXPECT_NE(text.find("rel L2"), std::string::npos) << "no row took the fused path: " << text;
  }
}

}  // namespace
}  // namespace dsv4
