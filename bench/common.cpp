// Scenarios, work counts and the driver shared by the GPU and CPU benchmarks.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <unistd.h>

#include "bench/bench.hpp"
#include "core/internal.hpp"

namespace dsv4::bench {

const char* variant_key(Variant v) {
  switch (v) {
    case Variant::cast: return "a_bf16_gemm_cast_f32_compress";
    case Variant::bf16_direct: return "b_bf16_gemm_direct";
    case Variant::f32_gemm: return "c_f32_gemm";
    case Variant::best: return "d_best";
    case Variant::fused: return "e_fused_forced";
    case Variant::per_stage: return "f_unfused_per_stage";
    case Variant::reach: return "g_reach";
  }
  return "?";
}

const char* variant_label(Variant v) {
  switch (v) {
    case Variant::cast: return "(a) bf16 GEMM + cast + compress f32";
    case Variant::bf16_direct: return "(b) bf16 GEMM read directly";
    case Variant::f32_gemm: return "(c) fp32-output GEMM";
    case Variant::best: return "(d) dsv4 (HCA: running state)";
    case Variant::fused: return "(e) dsv4, fused step forced";
    case Variant::per_stage: return "(f) dsv4 unfused, per-stage kernels";
    case Variant::reach: return "(g) reach: the step's bytes and data flow only";
  }
  return "?";
}

const char* kind_label(Kind k) {
  switch (k) {
    case Kind::csa_main: return "CSA main";
    case Kind::csa_indexer: return "CSA indexer";
    case Kind::csa_layer: return "CSA layer";
    case Kind::hca: return "HCA";
  }
  return "?";
}

std::vector<CompressorKind> members(Kind k) {
  switch (k) {
    case Kind::csa_main: return {CompressorKind::csa_main};
    case Kind::csa_indexer: return {CompressorKind::csa_indexer};
    case Kind::csa_layer: return {CompressorKind::csa_main, CompressorKind::csa_indexer};
    case Kind::hca: return {CompressorKind::hca};
  }
  return {};
}

std::vector<Request> step_requests(const Scenario& s, std::int64_t r) {
  std::vector<Request> out;
  auto add = [&](std::int64_t start, std::int64_t n) {
    out.push_back({static_cast<std::int64_t>(out.size()), start, n});
  };
  if (s.name == "decode") {
    for (int i = 0; i < s.batch; ++i) add(2 * r - 1, 1);  // completes window 1 (8 slots at ratio 4)
  } else if (s.name == "decode-partial") {
    for (int i = 0; i < s.batch; ++i) add(r + r / 2, 1);  // completes nothing
  } else if (s.name == "decode-staggered") {
    // Steady decoding: requests spread over a window's positions, so one in `r` completes
    // window 1 (at ratio 128 and B <= 128, one request).
    for (int i = 0; i < s.batch; ++i) add(2 * r - 1 - i % r, 1);
  } else if (s.name == "mtp4") {
    for (int i = 0; i < s.batch; ++i) add(2 * r - 3, 4);  // 4 tokens, one window completes
  } else if (s.name == "prefill") {
    add(0, s.length);
  } else if (s.name == "mixed") {  // a prefill chunk beside decodes and multi-token decodes
    add(0, 1024);
    for (int i = 0; i < 48; ++i) add(2 * r - 1, 1);
    for (int i = 0; i < 15; ++i) add(2 * r - 3, 4);
  }
  return out;
}

void count_work(const Row& row, const CompressorSpec& spec, DType state_dtype, double* bytes, double* flops,
                std::int64_t* tokens, std::int64_t* entries) {
  const std::int64_t r = spec.ratio, width = spec.projection_width();
  double state_bytes = 0;
  std::int64_t t = 0, e = 0;
  for (const Request& q : step_requests(row.scenario, r)) {
    t += q.num_tokens;
    const std::int64_t end = q.start + q.num_tokens, done = windows_completed(q.start, q.num_tokens, r);
    e += done;
    if (spec.overlap()) {
      const std::int64_t row_bytes = width * static_cast<std::int64_t>(dtype_size(state_dtype));
      const std::int64_t read_from = done > 0 ? std::max<std::int64_t>(0, (q.start / r - 1) * r) : q.start;
      const std::int64_t keep_from = std::max<std::int64_t>(0, (end / r) * r - r);
      state_bytes += static_cast<double>((q.start - read_from) + (end - std::max(q.start, keep_from))) * row_bytes;
    } else {
      state_bytes += 2.0 * 3 * spec.head_dim * 4;
    }
  }
  *bytes += static_cast<double>(width * spec.hidden * 2) + static_cast<double>(t * spec.hidden * 2) + state_bytes +
            static_cast<double>(e * spec.entry_bytes());
  *flops += 2.0 * static_cast<double>(t) * static_cast<double>(width) * static_cast<double>(spec.hidden);
  *tokens = t;
  *entries += e;
}

std::string row_label(const std::string& model, Kind kind, const Scenario& s) {
  return model + " " + kind_label(kind) + " " + s.name + (s.name == "prefill" ? " L=" + std::to_string(s.length)
                                                                             : " B=" + std::to_string(s.batch));
}

bool label_selected(const std::string& filter, const std::string& label) {
  if (filter.empty()) return true;
  for (std::size_t begin = 0;;) {
    const std::size_t end = filter.find('|', begin);
    const std::string alternative = filter.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    if (!alternative.empty() && label.find(alternative) != std::string::npos) return true;
    if (end == std::string::npos) return false;
    begin = end + 1;
  }
}

void progress(int done, int total, const std::string& what) {
  if (!isatty(2)) {  // logs get the start and the end only
    if (done == 0 || done == total) std::fprintf(stderr, "[%3d/%3d] %s\n", done, total, what.c_str());
    return;
  }
  std::fprintf(stderr, "\r[%3d/%3d] %-60s", done, total, what.c_str());
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

std::string now_utc() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

std::string commit_id() {
  if (const char* c = std::getenv("DSV4_COMMIT")) return c;
#ifdef DSV4_COMMIT
  return DSV4_COMMIT;
#else
  return "unknown";
#endif
}

Report run(const Options& o) {
  if (o.device != "auto" && o.device != "cpu" && o.device != "cuda")
    throw Error("--device: expected auto, cpu or cuda, got '" + o.device + "'");
  const bool gpu = o.device == "cuda" || (o.device == "auto" && cuda_available());
  if (gpu && !cuda_available()) throw Error("--device cuda: no usable GPU is present");
  std::vector<Scenario> scenarios;
  std::vector<int> batches = o.quick ? std::vector<int>{1, 64, 256} : std::vector<int>{1, 8, 32, 64, 128, 256};
  if (!gpu) batches = o.quick ? std::vector<int>{1, 8} : std::vector<int>{1, 8, 64};
  if (!o.batches.empty()) {
    for (int b : o.batches)
      if (b < 1 || b > kMostDecodeBatch)
        throw Error("--batches: expected decode batch sizes from 1 to " + std::to_string(kMostDecodeBatch) + ", got " +
                    std::to_string(b));
    batches = o.batches;
    std::sort(batches.begin(), batches.end());
    batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
  }
  for (int b : batches) scenarios.push_back({"decode", b, 0});
  for (int b : batches) scenarios.push_back({"decode-partial", b, 0});
  for (int b : batches) scenarios.push_back({"decode-staggered", b, 0});
  scenarios.push_back({"mtp4", gpu ? 64 : 8, 0});
  std::vector<std::int64_t> lengths = o.quick ? std::vector<std::int64_t>{1024} : std::vector<std::int64_t>{1024, 4096, 16384};
  if (!gpu) lengths = o.quick ? std::vector<std::int64_t>{256} : std::vector<std::int64_t>{1024};
  for (std::int64_t l : lengths) scenarios.push_back({"prefill", 1, l});
  if (gpu || !o.quick) scenarios.push_back({"mixed", 64, 0});

  Report r = gpu ? run_gpu(o, o.quick ? std::vector<std::string>{"flash"} : std::vector<std::string>{"flash", "pro"}, scenarios)
                 : run_cpu(o, scenarios);
  r.commit = commit_id();
  r.date = now_utc();
  r.command = o.command;
  print_table(r);
  print_model_level(r);
  if (!o.json.empty()) write_json(r, o.json);
  if (!o.svg.empty()) write_svg(r, o.svg);
  return r;
}

}  // namespace dsv4::bench
