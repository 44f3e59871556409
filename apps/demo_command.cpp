// `dsv4-compressor demo`: a DeepSeek-V4-shaped layer's compressors serving a mixed batch of
// requests (prefills, chunked prefills, decodes, multi-token decodes) on random weights,
// then the same sequences in one call each. Among steps that take the same path the split
// invariant holds bit for bit (checked with fused decode off, where every step takes the
// unfused path); with the default options, whose decode steps may take the fused path on
// CUDA, entries may differ from the one-shot run by rounding within SPEC section 4.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <random>

#include "commands.hpp"
#include "core/numerics.hpp"
#include "core/random_inputs.hpp"
#include "dsv4/compressor.hpp"
#include "sequence_runner.hpp"

namespace dsv4::app {

namespace {

struct DemoArgs {
  std::string model = "flash";
  std::string device = "cpu";
  int requests = 12;
  std::uint64_t seed = 1;
};

struct Simulated {
  Schedule schedule;
  std::vector<std::int64_t> lengths;
  int prefill_chunks = 0, decodes = 0, multi_token_decodes = 0;
};

// Requests arrive over the first steps with a prompt and a number of tokens to generate; a
// prompt is prefilled in chunks of at most 256 tokens, then the request decodes 1 token a step,
// or 4 (a multi-token decode) for every third request.
Simulated simulate(int requests, std::mt19937_64& rng) {
  Simulated s;
  std::uniform_int_distribution<int> prompt(1, 700), generate(1, 48), arrival(0, 6);
  struct R { int arrive; std::int64_t prompt, generate, done = 0; bool mtp; };
  std::vector<R> rs;
  for (int i = 0; i < requests; ++i) {
    rs.push_back({arrival(rng), prompt(rng), generate(rng), 0, i % 3 == 2});
    s.lengths.push_back(rs.back().prompt + rs.back().generate);
  }
  for (int step = 0;; ++step) {
    Step batch;
    bool pending = false;
    for (std::size_t i = 0; i < rs.size(); ++i) {
      R& r = rs[i];
      const std::int64_t total = r.prompt + r.generate;
      if (r.done >= total) continue;
      pending = true;
      if (r.arrive > step) continue;
      std::int64_t take;
      if (r.done < r.prompt) {
        take = std::min<std::int64_t>(256, r.prompt - r.done);
        s.prefill_chunks++;
      } else {
        take = std::min<std::int64_t>(r.mtp ? 4 : 1, total - r.done);
        (r.mtp ? s.multi_token_decodes : s.decodes)++;
      }
      batch.emplace_back(i, take);
      r.done += take;
    }
    if (!pending) break;
    if (!batch.empty()) s.schedule.push_back(std::move(batch));
  }
  return s;
}

// Relative L2 distance of every sequence's bf16 entries in `a` from those in `b`; infinite
// where they do not line up or `a` holds a value that is not finite.
double relative_l2(const std::vector<SequenceOutput>& a, const std::vector<SequenceOutput>& b) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  double diff2 = 0, ref2 = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (i >= b.size() || a[i].entries.size() != b[i].entries.size()) return kInf;
    for (std::size_t k = 0; k < a[i].entries.size(); ++k) {
      const double x = num::f32_from_bf16(a[i].entries[k]), y = num::f32_from_bf16(b[i].entries[k]);
      if (!std::isfinite(x)) return kInf;
      diff2 += (x - y) * (x - y);
      ref2 += y * y;
    }
  }
  return ref2 > 0 ? std::sqrt(diff2 / ref2) : (diff2 > 0 ? kInf : 0.0);
}

bool same_bits(const std::vector<SequenceOutput>& a, const std::vector<SequenceOutput>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].entries != b[i].entries || a[i].cache != b[i].cache) return false;
  return true;
}

void demo(const DemoArgs& a) {
  if (a.model != "flash" && a.model != "pro") throw Error("--model: expected flash or pro, got '" + a.model + "'");
  if (a.requests < 1 || a.requests > 4096) throw Error("--requests: expected 1..4096, got " + std::to_string(a.requests));
  Device device;
  if (a.device == "cuda") device = Device::cuda(0);
  else if (a.device != "cpu") throw Error("--device: expected cpu or cuda, got '" + a.device + "'");
  const Model model = a.model == "flash" ? Model::flash : Model::pro;
  const std::int64_t hidden = model_shape(model).hidden;

  std::mt19937_64 rng(a.seed);
  const Simulated sim = simulate(a.requests, rng);
  std::vector<std::vector<std::uint16_t>> xs;
  std::vector<Sequence> sequences;
  std::int64_t total_tokens = 0;
  for (std::int64_t len : sim.lengths) {
    xs.push_back(random_x(len, hidden, rng));
    total_tokens += len;
  }
  for (std::size_t i = 0; i < xs.size(); ++i) sequences.push_back({xs[i].data(), sim.lengths[i]});

  std::printf("%s compressors on %s, random weights (seed %llu)\n", std::string(model_name(model)).c_str(),
              device_name(device).c_str(), static_cast<unsigned long long>(a.seed));
  std::printf("%d requests, %lld tokens in %zu batches: %d prefill chunks, %d decodes, %d 4-token decodes\n\n",
              a.requests, static_cast<long long>(total_tokens), sim.schedule.size(), sim.prefill_chunks,
              sim.decodes, sim.multi_token_decodes);
  std::printf("%-12s %-11s %8s %8s %10s %12s %10s  %-15s  %s\n", "compressor", "precision", "batches", "entries",
              "time (ms)", "tokens/s", "one-shot", "split invariant", "default path");

  bool all_ok = true;
  const Precision precisions[] = {{DType::f32, DType::f32}, {DType::bf16, DType::bf16}};
  for (CompressorKind kind : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca}) {
    const CompressorSpec spec = CompressorSpec::preset(model, kind);
    const RandomWeights w = random_weights(spec, a.seed + static_cast<std::uint64_t>(kind) + 100);
    for (const Precision& p : precisions) {
      // What an engine gets by default (timed), and every step on the unfused path.
      const Compressor comp(spec, w.view(spec), {.device = device, .precision = p});
      const Compressor unfused(spec, w.view(spec), {.device = device, .precision = p, .fused_decode = FusedDecode::off});
      RunStats served, whole;
      const auto served_out = run_sequences(comp, sequences, sim.schedule, &served);
      const auto unfused_out = run_sequences(unfused, sequences, sim.schedule);
      const auto one_shot = run_sequences(unfused, sequences, uniform_chunks(sim.lengths, {}), &whole);
      std::int64_t entries = 0;
      for (const auto& out : served_out) entries += static_cast<std::int64_t>(out.entries.size()) / spec.head_dim;
      const bool invariant = same_bits(unfused_out, one_shot);
      const double error = relative_l2(served_out, one_shot);
      const bool within = error <= entry_tolerance(p);
      all_ok = all_ok && invariant && within;
      char default_path[64];
      if (same_bits(served_out, one_shot))
        std::snprintf(default_path, sizeof default_path, "bit-identical");
      else
        std::snprintf(default_path, sizeof default_path, "rel L2 %.1e %s", error, within ? "(within SPEC 4)" : "OUT OF SPEC 4");
      const std::string prec = std::string(dtype_name(p.kv_score)) + "/" + std::string(dtype_name(p.state));
      std::printf("%-12s %-11s %8d %8lld %10.1f %12.0f %10.1f  %-15s  %s\n", std::string(kind_name(kind)).c_str(),
                  prec.c_str(), served.calls, static_cast<long long>(entries), served.seconds * 1e3,
                  static_cast<double>(served.tokens) / served.seconds, whole.seconds * 1e3,
                  invariant ? "bit-identical" : "MISMATCH", default_path);
    }
  }
  std::printf("\nprecision: kv_score/state storage dtype; time: all served batches (default options); one-shot: "
              "every sequence in one call;\nsplit invariant: served against one-shot, every step unfused; default "
              "path: served with the default options against one-shot\n");
  if (!all_ok)
    throw Error("demo: the split invariant or SPEC section 4 failed between the served batches and the one-shot run");
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto args = std::make_shared<DemoArgs>();
  CLI::App* cmd = app.add_subcommand("demo", "Serve a mixed batch on random weights and check the split invariant");
  cmd->add_option("--model", args->model, "flash or pro");
  cmd->add_option("--device", args->device, "cpu or cuda");
  cmd->add_option("--requests", args->requests, "Number of requests");
  cmd->add_option("--seed", args->seed, "Random seed");
  cmd->callback([args] { demo(*args); });
}

void add_info_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("info", "Show the model presets and what this build can run on");
  cmd->callback([] {
    for (Model m : {Model::flash, Model::pro}) {
      const ModelShape shape = model_shape(m);
      std::printf("%s: hidden %lld, %d CSA layers, %d HCA layers\n", std::string(model_name(m)).c_str(),
                  static_cast<long long>(shape.hidden), shape.csa_layers, shape.hca_layers);
      for (CompressorKind k : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca}) {
        const CompressorSpec spec = CompressorSpec::preset(m, k);
        std::printf("  %-12s %s, weights %.1f MiB\n", std::string(kind_name(k)).c_str(), spec.describe().c_str(),
                    static_cast<double>(spec.projection_width() * spec.hidden * 2) / (1 << 20));
      }
    }
#ifdef DSV4_HAVE_CUDA
    std::printf("CUDA backend: built; GPU %s\n", cuda_available() ? "present" : "not present");
#else
    std::printf("CUDA backend: not built\n");
#endif
  });
}

}  // namespace dsv4::app
