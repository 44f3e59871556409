// The benchmark's outputs: the table on stdout, the model-level lines, JSON and an SVG chart.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench/bench.hpp"

namespace dsv4::bench {

namespace {

std::string scenario_text(const Scenario& s) {
  if (s.name == "prefill")
    return "prefill " + (s.length % 1024 == 0 ? std::to_string(s.length / 1024) + "K" : std::to_string(s.length));
  return s.name + " B=" + std::to_string(s.batch);
}

std::string us_text(double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, v < 100 ? "%.1f" : "%.0f", v);
  return buf;
}

const Row* find(const Report& r, const std::string& model, Kind kind, const std::string& scenario, int batch) {
  for (const Row& row : r.rows)
    if (row.model == model && row.kind == kind && row.scenario.name == scenario && row.scenario.batch == batch)
      return &row;
  return nullptr;
}

std::vector<std::string> models_of(const Report& r) {
  std::vector<std::string> out;
  for (const Row& row : r.rows)
    if (std::find(out.begin(), out.end(), row.model) == out.end()) out.push_back(row.model);
  return out;
}

int layers(const std::string& model, bool csa) {
  const ModelShape s = model_shape(model == "pro" ? Model::pro : Model::flash);
  return csa ? s.csa_layers : s.hca_layers;
}

}  // namespace

void print_table(const Report& r) {
  std::printf("\ndsv4-compressor bench on %s (%s), commit %s, %s\n", r.device.c_str(), r.gpu ? "CUDA graph replays" : "CPU backend",
              r.commit.c_str(), r.date.c_str());
  std::printf("measured ceilings: copy %.0f GB/s (read + write), %s %.1f TFLOP/s\n", r.ceilings.copy_gbps,
              r.gpu ? "bf16 matmul" : "projection kernel", r.ceilings.matmul_tflops);
  if (std::isfinite(r.ceilings.empty_step_us))
    std::printf("least step: %.1f us (the reach probe (g) moving no bytes: launch, wait, one exchange, completion)\n",
                r.ceilings.empty_step_us);
  std::printf("times in us per step (median); floor = max(bytes / copy bandwidth, flops / matmul rate)\n\n");
  std::printf("%-6s %-12s %-20s %7s %9s", "model", "kind", "step", "tokens", "floor");
  const char* heads[] = {"(a) cast", "(b) bf16", "(c) f32", "(d) best", "(e) fused", "(f) stages", "(g) reach"};
  static_assert(std::size(heads) == kVariants);
  for (int v = 0; v < kVariants; ++v) std::printf(" %9s", heads[v]);
  std::printf(" %8s %8s %7s\n", "d/floor", "g/floor", "a/d");
  for (const Row& row : r.rows) {
    std::printf("%-6s %-12s %-20s %7lld %9s", row.model.c_str(), kind_label(row.kind), scenario_text(row.scenario).c_str(),
                static_cast<long long>(row.tokens), us_text(row.floor_us).c_str());
    for (int v = 0; v < kVariants; ++v) std::printf(" %9s", us_text(row.us[v]).c_str());
    const double d = row.us[static_cast<int>(Variant::best)], a = row.us[static_cast<int>(Variant::cast)];
    const double g = row.us[static_cast<int>(Variant::reach)];
    auto ratio = [](double num, double den) { return std::isfinite(num) && std::isfinite(den) ? us_text(num / den) + "x" : "-"; };
    std::printf(" %8s %8s %7s\n", ratio(d, row.floor_us).c_str(), ratio(g, row.floor_us).c_str(), ratio(a, d).c_str());
  }
}

void print_model_level(const Report& r) {
  std::printf("\nmodel level: compressor time of one decode iteration at B=64 (every request completes a window)\n");
  for (const std::string& m : models_of(r)) {
    const Row* csa = find(r, m, Kind::csa_layer, "decode", 64);
    const Row* hca = find(r, m, Kind::hca, "decode", 64);
    if (!csa || !hca) continue;
    const int nc = layers(m, true), nh = layers(m, false);
    std::printf("  %s (%d CSA + %d HCA layers): floor %.0f us\n", m.c_str(), nc, nh, nc * csa->floor_us + nh * hca->floor_us);
    const double a = nc * csa->us[0] + nh * hca->us[0];
    for (int v = 0; v < kVariants; ++v) {
      const double t = nc * csa->us[v] + nh * hca->us[v];
      if (!std::isfinite(t)) continue;
      if (std::isfinite(a))
        std::printf("    %-38s %8.0f us   saves %6.0f us (%.2fx) against (a)\n", variant_label(static_cast<Variant>(v)), t,
                    a - t, a / t);
      else
        std::printf("    %-38s %8.0f us\n", variant_label(static_cast<Variant>(v)), t);
    }
  }
}

namespace {

// The header every benchmark's JSON starts with (bench's own puts its backend after the device).
nlohmann::ordered_json run_info_json(const RunInfo& r) {
  return {{"device", r.device}, {"commit", r.commit}, {"date", r.date}, {"command", r.command}};
}

void write_json_file(const nlohmann::ordered_json& j, const std::string& path) {
  std::ofstream f(path);
  if (!f) throw Error("--json: cannot write '" + path + "'");
  f << j.dump(1) << "\n";
}

}  // namespace

void write_json(const Report& r, const std::string& path) {
  nlohmann::ordered_json j;
  j["device"] = r.device;
  j["backend"] = r.gpu ? "cuda" : "cpu";
  j["commit"] = r.commit;
  j["date"] = r.date;
  j["command"] = r.command;
  j["ceilings"] = {{"copy_gbps", r.ceilings.copy_gbps}, {"matmul_tflops", r.ceilings.matmul_tflops}};
  if (std::isfinite(r.ceilings.empty_step_us)) j["ceilings"]["empty_step_us"] = r.ceilings.empty_step_us;
  j["variants"] = nlohmann::ordered_json::object();
  for (int v = 0; v < kVariants; ++v) j["variants"][variant_key(static_cast<Variant>(v))] = variant_label(static_cast<Variant>(v));
  j["rows"] = nlohmann::ordered_json::array();
  for (const Row& row : r.rows) {
    nlohmann::ordered_json o{{"model", row.model}, {"kind", kind_label(row.kind)}, {"scenario", row.scenario.name},
                             {"batch", row.scenario.batch}, {"prefill_tokens", row.scenario.length},
                             {"tokens", row.tokens}, {"entries", row.entries}, {"bytes", row.bytes},
                             {"flops", row.flops}, {"floor_us", row.floor_us}};
    for (int v = 0; v < kVariants; ++v)
      o[std::string(variant_key(static_cast<Variant>(v))) + "_us"] =
          std::isfinite(row.us[v]) ? nlohmann::ordered_json(row.us[v]) : nlohmann::ordered_json(nullptr);
    j["rows"].push_back(o);
  }
  j["model_level"] = nlohmann::ordered_json::array();
  for (const std::string& m : models_of(r)) {
    const Row* csa = find(r, m, Kind::csa_layer, "decode", 64);
    const Row* hca = find(r, m, Kind::hca, "decode", 64);
    if (!csa || !hca) continue;
    const int nc = layers(m, true), nh = layers(m, false);
    nlohmann::ordered_json o{{"model", m}, {"batch", 64}, {"csa_layers", nc}, {"hca_layers", nh},
                             {"floor_us", nc * csa->floor_us + nh * hca->floor_us}};
    for (int v = 0; v < kVariants; ++v) {
      const double t = nc * csa->us[v] + nh * hca->us[v];
      o[std::string(variant_key(static_cast<Variant>(v))) + "_us"] = std::isfinite(t) ? nlohmann::ordered_json(t) : nlohmann::ordered_json(nullptr);
    }
    j["model_level"].push_back(o);
  }
  std::ofstream out(path);
  if (!out) throw Error("--json: cannot write '" + path + "'");
  out << j.dump(2) << "\n";
}

// Time per step against batch size for the decode steps of the first model, one panel per
// kind, one line per variant and the floor dashed.
void write_svg(const Report& r, const std::string& path) {
  const std::vector<std::string> models = models_of(r);
  if (models.empty()) throw Error("--svg: nothing was measured");
  const std::string model = models[0];
  const Kind kinds[] = {Kind::csa_main, Kind::csa_indexer, Kind::csa_layer, Kind::hca};
  const char* colors[] = {"#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#8c564b", "#7f7f7f"};
  static_assert(std::size(colors) == kVariants);
  const int pw = 300, ph = 240, ml = 50, mt = 50, gap = 40;
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << ml + 4 * (pw + gap) << "' height='" << mt + ph + 90
    << "' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n";
  s << "<text x='" << ml << "' y='20' font-size='14'>dsv4-compressor decode step, " << model << ", " << r.device
    << " (every request completes a window)</text>\n";
  for (int k = 0; k < 4; ++k) {
    std::vector<const Row*> rows;
    for (const Row& row : r.rows)
      if (row.model == model && row.kind == kinds[k] && row.scenario.name == "decode") rows.push_back(&row);
    if (rows.empty()) continue;
    double ymax = 0;
    for (const Row* row : rows)
      for (double v : row->us) if (std::isfinite(v)) ymax = std::max(ymax, v);
    ymax = std::max(ymax, 1.0) * 1.1;
    const int x0 = ml + k * (pw + gap), y0 = mt + ph;
    const double bmax = std::log2(std::max(2, rows.back()->scenario.batch));
    auto X = [&](int b) { return x0 + pw * std::log2(static_cast<double>(b)) / bmax; };
    auto Y = [&](double us) { return y0 - ph * us / ymax; };
    s << "<text x='" << x0 << "' y='" << mt - 8 << "' font-size='12'>" << kind_label(kinds[k]) << "</text>\n";
    s << "<line x1='" << x0 << "' y1='" << y0 << "' x2='" << x0 + pw << "' y2='" << y0 << "' stroke='black'/>\n";
    s << "<line x1='" << x0 << "' y1='" << mt << "' x2='" << x0 << "' y2='" << y0 << "' stroke='black'/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double v = ymax * t / 4;
      s << "<text x='" << x0 - 5 << "' y='" << Y(v) + 4 << "' text-anchor='end'>" << us_text(v) << "</text>\n";
    }
    for (const Row* row : rows)
      s << "<text x='" << X(row->scenario.batch) << "' y='" << y0 + 15 << "' text-anchor='middle'>" << row->scenario.batch << "</text>\n";
    s << "<text x='" << x0 + pw / 2 << "' y='" << y0 + 30 << "' text-anchor='middle'>batch size (us per step)</text>\n";
    for (int v = 0; v < kVariants; ++v) {
      std::ostringstream pts;
      for (const Row* row : rows)
        if (std::isfinite(row->us[v])) pts << X(row->scenario.batch) << "," << Y(row->us[v]) << " ";
      s << "<polyline fill='none' stroke='" << colors[v] << "' stroke-width='2' points='" << pts.str() << "'/>\n";
    }
    std::ostringstream pts;
    for (const Row* row : rows) pts << X(row->scenario.batch) << "," << Y(row->floor_us) << " ";
    s << "<polyline fill='none' stroke='black' stroke-dasharray='5,4' points='" << pts.str() << "'/>\n";
  }
  const int ly = mt + ph + 55;
  for (int v = 0; v < kVariants; ++v) {  // two lines of legend
    const int lx = ml + (v % 4) * 340, lyv = ly + (v / 4) * 16 - 8;
    s << "<rect x='" << lx << "' y='" << lyv - 9 << "' width='14' height='4' fill='" << colors[v] << "'/><text x='"
      << lx + 20 << "' y='" << lyv - 4 << "'>" << variant_label(static_cast<Variant>(v)) << "</text>\n";
  }
  s << "<line x1='" << ml << "' y1='" << ly + 20 << "' x2='" << ml + 14 << "' y2='" << ly + 20
    << "' stroke='black' stroke-dasharray='5,4'/><text x='" << ml + 20 << "' y='" << ly + 24
    << "'>floor: max(bytes / copy bandwidth, flops / matmul rate)</text>\n</svg>\n";
  std::ofstream out(path);
  if (!out) throw Error("--svg: cannot write '" + path + "'");
  out << s.str();
}

void write_sweep_json(const SweepReport& r, const std::string& path) {
  nlohmann::ordered_json j = run_info_json(r);
  j["tokens"] = r.tokens;
  j["shapes"] = nlohmann::ordered_json::array();
  auto number = [](double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); };
  for (const SweepShape& s : r.shapes) {
    nlohmann::ordered_json js = {{"label", s.label}, {"width", s.width}, {"hidden", s.hidden}};
    js["rules"] = nlohmann::ordered_json::array();
    for (const SweepRule& rule : s.rules) js["rules"].push_back({{"rule", rule.label}, {"candidate", rule.candidate}});
    js["candidates"] = nlohmann::ordered_json::array();
    for (const SweepCandidate& c : s.candidates) {
      nlohmann::ordered_json jc = {{"config", c.config}, {"row_invariant", c.row_invariant}, {"same_bits_as", c.same_bits_as}};
      jc["us"] = nlohmann::ordered_json::array();
      for (double v : c.us) jc["us"].push_back(number(v));
      jc["workspace_mib"] = c.workspace_mib;
      js["candidates"].push_back(jc);
    }
    j["shapes"].push_back(js);
  }
  write_json_file(j, path);
}

void write_multiply_json(const MultiplyReport& r, const std::string& path) {
  nlohmann::ordered_json j = run_info_json(r);
  j["sm_clock_mhz"] = r.sm_clock_mhz;
  auto number = [](double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); };
  j["rows"] = nlohmann::ordered_json::array();
  for (const MultiplyRow& row : r.rows)
    j["rows"].push_back({{"sequence", row.sequence},
                         {"tokens", row.tokens},
                         {"blocks_per_sm", row.blocks_per_sm},
                         {"cycles_median", number(row.cycles_median)},
                         {"cycles_max", number(row.cycles_max)},
                         {"worst_error", number(row.worst_error)},
                         {"same_bits_as_8_tokens", row.same_bits_as_8_tokens},
                         {"same_bits_as_wgmma", row.same_bits_as_wgmma < 0 ? nlohmann::ordered_json(nullptr)
                                                                            : nlohmann::ordered_json(row.same_bits_as_wgmma == 1)}});
  write_json_file(j, path);
}

}  // namespace dsv4::bench
