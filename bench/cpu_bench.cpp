// The CPU benchmark: the CPU backend's step per kind and shape (the GPU-only variants (a)-(c)
// are not measured), wall-clock medians, against a floor from this machine's memcpy bandwidth
// and the projection kernel's own rate.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <thread>

#include "bench/bench.hpp"
#include "core/internal.hpp"
#include "core/random_inputs.hpp"
#include "cpu/stages.hpp"

namespace dsv4::bench {

namespace {

double median_us(int reps, const std::function<void()>& f) {
  std::vector<double> t;
  f();  // warm up
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

Ceilings measure(int reps) {
  Ceilings c;
  const std::size_t bytes = std::size_t{256} << 20;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  const double copy = median_us(reps, [&] { std::memcpy(b.data(), a.data(), bytes); });
  c.copy_gbps = 2.0 * static_cast<double>(bytes) / (copy * 1e3);
  std::mt19937_64 rng(1);
  const std::int64_t t = 256, h = 4096, n = 1024;
  const auto x = random_x(t, h, rng);
  std::vector<float> w(static_cast<std::size_t>(n * h), 0.01f), out(static_cast<std::size_t>(t * n));
  const double mm = median_us(reps, [&] { cpu::project(x.data(), t, h, w.data(), n, false, out.data()); });
  c.matmul_tflops = 2.0 * t * h * n / (mm * 1e6);
  return c;
}

}  // namespace

Report run_cpu(const Options& o, const std::vector<Scenario>& scenarios) {
  Report report;
  report.device = "CPU, " + std::to_string(std::thread::hardware_concurrency()) + " threads";
  const int reps = o.quick ? 2 : 3;
  report.ceilings = measure(reps);
  const Model model = Model::flash;
  std::map<CompressorKind, RandomWeights> weights;
  for (CompressorKind ck : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca})
    weights.emplace(ck, random_weights(CompressorSpec::preset(model, ck), 11 + static_cast<int>(ck)));
  const Kind kinds[] = {Kind::csa_main, Kind::csa_indexer, Kind::csa_layer, Kind::hca};
  const int total = static_cast<int>(scenarios.size() * 4);
  int done = 0;
  std::mt19937_64 rng(5);
  for (const Scenario& sc : scenarios)
    for (Kind kind : kinds) {
      progress(done++, total, row_label("flash", kind, sc));
      if (!label_selected(o.filter, row_label("flash", kind, sc))) continue;
      Row row;
      row.model = "flash";
      row.kind = kind;
      row.scenario = sc;
      row.us.fill(NAN);
      std::vector<std::unique_ptr<Compressor>> comps;
      std::vector<std::unique_ptr<StatePool>> pools;
      std::vector<Batch> steps;
      std::vector<std::vector<std::uint8_t>> caches;
      const std::int64_t hidden = model_shape(model).hidden;
      for (CompressorKind ck : members(kind)) {
        const CompressorSpec spec = CompressorSpec::preset(model, ck);
        count_work(row, spec, DType::f32, &row.bytes, &row.flops, &row.tokens, &row.entries);
        // As on the GPU, the best path keeps an HCA window as running accumulators.
        comps.push_back(std::make_unique<Compressor>(
            spec, weights.at(ck).view(spec),
            dsv4::Options{.window_state = spec.overlap() ? WindowState::rows : WindowState::running}));
        const auto requests = step_requests(sc, spec.ratio);
        pools.push_back(std::make_unique<StatePool>(*comps.back(), static_cast<std::int64_t>(requests.size())));
        Batch prefix, step;
        for (const Request& q : requests) {
          if (q.start > 0) prefix.add(q.slot, 0, q.start);
          step.add(q.slot, q.start, q.num_tokens);
        }
        std::int64_t pt = 0, pe = 0, se = 0;
        for (const Request& q : prefix.requests) pt += q.num_tokens, pe += windows_completed(0, q.num_tokens, spec.ratio);
        for (const Request& q : step.requests) se += windows_completed(q.start, q.num_tokens, spec.ratio);
        for (std::int64_t k = 0; k < pe; ++k) prefix.cache_locations.push_back(k);
        for (std::int64_t k = 0; k < se; ++k) step.cache_locations.push_back(k);
        caches.emplace_back(static_cast<std::size_t>(std::max<std::int64_t>({pe, se, 1}) * spec.entry_bytes()));
        const TensorView cache(caches.back().data(), DType::u8, {std::max<std::int64_t>({pe, se, 1}), spec.entry_bytes()});
        if (!prefix.requests.empty()) {
          const auto px = random_x(pt, hidden, rng);
          comps.back()->forward(prefix, TensorView(px.data(), DType::bf16, {pt, hidden}), *pools.back(), {.cache = cache});
        }
        steps.push_back(step);
      }
      row.floor_us = std::max(row.bytes / (report.ceilings.copy_gbps * 1e3), row.flops / (report.ceilings.matmul_tflops * 1e6));
      const auto x = random_x(row.tokens, hidden, rng);
      const TensorView xv(x.data(), DType::bf16, {row.tokens, hidden});
      std::vector<RunOutputs> outs;
      for (std::size_t m = 0; m < comps.size(); ++m) {
        const CompressorSpec& spec = comps[m]->spec();
        const auto rows = static_cast<std::int64_t>(caches[m].size()) / spec.entry_bytes();
        outs.push_back({TensorView(caches[m].data(), DType::u8, {rows, spec.entry_bytes()}), std::nullopt});
      }
      std::vector<std::vector<std::int64_t>> positions;
      for (auto& p : pools) positions.push_back(p->data().next_position);
      auto restore = [&] {  // every repetition appends at the same positions
        for (std::size_t m = 0; m < pools.size(); ++m) pools[m]->data().next_position = positions[m];
      };
      if (comps.size() == 1) {
        row.us[3] = median_us(reps, [&] {
          restore();
          comps[0]->forward(steps[0], xv, *pools[0], outs[0]);
        });
      } else {
        const CompressorGroup group({comps[0].get(), comps[1].get()});
        row.us[3] = median_us(reps, [&] {
          restore();
          group.run(group.plan({steps[0], steps[1]}, {pools[0].get(), pools[1].get()}), xv, {pools[0].get(), pools[1].get()}, outs);
        });
      }
      report.rows.push_back(row);
    }
  progress(total, total, "done");
  return report;
}

}  // namespace dsv4::bench
