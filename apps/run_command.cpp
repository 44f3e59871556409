// `dsv4-compressor run`: compress sequences from a safetensors file with checkpoint weights.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "commands.hpp"
#include "dsv4/compressor.hpp"
#include "io/safetensors.hpp"
#include "sequence_runner.hpp"

namespace dsv4::app {

namespace {

struct RunArgs {
  std::string weights, prefix, input, output, chunks, config;
  std::string score_dtype = "f32", state_dtype = "f32", device = "cpu";
};

std::vector<std::int64_t> parse_chunks(const std::string& text) {
  std::vector<std::int64_t> out;
  if (text.empty()) return out;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < 1 || v > (1ll << 40))
      throw Error("--chunks: expected positive integers separated by commas (C1,C2,...), got '" +
                  text + "'");
    out.push_back(v);
    pos = comma + 1;
  }
  return out;
}

DType parse_dtype(const std::string& flag, const std::string& value) {
  if (value == "f32") return DType::f32;
  if (value == "bf16") return DType::bf16;
  throw Error(flag + ": expected f32 or bf16, got '" + value + "'");
}

// RoPE and norm settings of a DeepSeek-V4 config.json; absent keys keep the defaults.
void apply_config(const std::string& path, CompressorSpec& spec) {
  std::ifstream in(path);
  if (!in) throw Error("--config: cannot open '" + path + "'");
  nlohmann::json cfg;
  try {
    cfg = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error("--config: '" + path + "' is not valid JSON (" + e.what() + ")");
  }
  if (!cfg.is_object()) throw Error("--config: '" + path + "' is not a JSON object");
  auto number = [&](const nlohmann::json& obj, const char* key, double& dst) {
    if (!obj.contains(key) || obj[key].is_null()) return;
    if (!obj[key].is_number()) throw Error(std::string("--config: '") + key + "' must be a number");
    dst = obj[key].get<double>();
  };
  double theta = spec.rope.theta, eps = spec.rms_eps, rope_dim = static_cast<double>(spec.rope.dim);
  number(cfg, "compress_rope_theta", theta);
  number(cfg, "rms_norm_eps", eps);
  number(cfg, "qk_rope_head_dim", rope_dim);
  number(cfg, "rope_head_dim", rope_dim);
  spec.rope.theta = theta;
  spec.rms_eps = static_cast<float>(eps);
  spec.rope.dim = static_cast<std::int64_t>(rope_dim);
  if (cfg.contains("rope_scaling")) {
    const auto& rs = cfg["rope_scaling"];
    if (rs.is_null()) {
      spec.rope.yarn_factor = 1.0;
    } else {
      if (!rs.is_object()) throw Error("--config: 'rope_scaling' must be an object or null");
      for (const char* key : {"type", "rope_type"})
        if (rs.contains(key) && !(rs[key].is_string() && rs[key].get<std::string>() == "yarn"))
          throw Error(std::string("--config: rope_scaling.") + key + " must be \"yarn\"");
      double original = static_cast<double>(spec.rope.original_max_position);
      number(rs, "factor", spec.rope.yarn_factor);
      number(rs, "original_max_position_embeddings", original);
      number(rs, "beta_fast", spec.rope.beta_fast);
      number(rs, "beta_slow", spec.rope.beta_slow);
      spec.rope.original_max_position = static_cast<std::int64_t>(original);
    }
  }
  spec.validate();
}

void run(const RunArgs& a) {
  const Precision precision{parse_dtype("--score-dtype", a.score_dtype),
                            parse_dtype("--state-dtype", a.state_dtype)};
  const std::vector<std::int64_t> chunks = parse_chunks(a.chunks);
  Device device;
  if (a.device == "cuda") device = Device::cuda(0);
  else if (a.device != "cpu") throw Error("--device: expected cpu or cuda, got '" + a.device + "'");

  // Weights: shapes define the compressor; a prefix naming the indexer means rotation.
  const auto W = io::SafetensorsFile::open(a.weights);
  const auto& wkv = W.get(a.prefix + ".wkv.weight", {DType::bf16}, 2);
  const auto& wgate = W.get(a.prefix + ".wgate.weight", {DType::bf16}, 2);
  const auto& ape = W.get(a.prefix + ".ape", {DType::f32}, 2);
  const auto& norm = W.get(a.prefix + ".norm.weight", {DType::bf16, DType::f32}, 1);
  const bool indexer = a.prefix.find("indexer") != std::string::npos;
  CompressorSpec spec = CompressorSpec::from_shapes(wkv.shape, wgate.shape, ape.shape, norm.shape, indexer);
  if (!a.config.empty()) apply_config(a.config, spec);

  const auto wkv_data = W.copy<std::uint16_t>(wkv);
  const auto wgate_data = W.copy<std::uint16_t>(wgate);
  const auto ape_data = W.copy<float>(ape);
  const auto norm_data = W.copy<std::uint8_t>(norm);
  const Weights weights{TensorView(wkv_data.data(), DType::bf16, wkv.shape),
                        TensorView(wgate_data.data(), DType::bf16, wgate.shape),
                        TensorView(ape_data.data(), DType::f32, ape.shape),
                        TensorView(norm_data.data(), *norm.dtype, norm.shape)};

  // Inputs: x.0, x.1, ... with no gaps.
  const auto X = io::SafetensorsFile::open(a.input);
  std::vector<std::vector<std::uint16_t>> xs;
  std::set<std::string> expected;
  for (std::size_t i = 0; X.contains("x." + std::to_string(i)); ++i) {
    const std::string name = "x." + std::to_string(i);
    const auto& t = X.get(name, {DType::bf16}, 2);
    if (t.shape[1] != spec.hidden)
      throw Error(a.input + ": tensor '" + name + "': expected shape [L, " + std::to_string(spec.hidden) +
                  "] (hidden of the weights), got " + shape_string(t.shape));
    xs.push_back(X.copy<std::uint16_t>(t));
    expected.insert(name);
  }
  if (xs.empty()) throw Error(a.input + ": expected tensors x.0, x.1, ..., found no 'x.0'");
  for (const std::string& name : X.names())
    if (name.rfind("x.", 0) == 0 && !expected.count(name))
      throw Error(a.input + ": tensor '" + name + "' does not follow x.0 .. x." +
                  std::to_string(xs.size() - 1) + " without gaps");

  const Compressor compressor(spec, weights, {.device = device, .precision = precision});
  std::vector<Sequence> sequences;
  std::vector<std::int64_t> lengths;
  for (const auto& x : xs) {
    const auto length = static_cast<std::int64_t>(x.size()) / spec.hidden;
    sequences.push_back({x.data(), length});
    lengths.push_back(length);
  }
  RunStats stats;
  const auto outputs = run_sequences(compressor, sequences, uniform_chunks(lengths, chunks), &stats);

  std::vector<io::TensorToWrite> tensors;
  std::vector<std::string> names;  // keeps the names alive
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const std::int64_t e = lengths[i] / spec.ratio;
    tensors.push_back({"kv." + std::to_string(i), DType::bf16, {e, spec.head_dim}, outputs[i].entries.data()});
    if (!spec.rotate)
      tensors.push_back({"cache." + std::to_string(i), DType::u8, {e, spec.entry_bytes()}, outputs[i].cache.data()});
  }
  io::write_safetensors(a.output, tensors, {{"spec", spec.describe()}});
  std::cerr << "dsv4-compressor run: " << spec.describe() << "; " << xs.size() << " sequences, "
            << stats.tokens << " tokens in " << stats.calls << " calls, " << stats.entries
            << " entries -> " << a.output << "\n";
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto args = std::make_shared<RunArgs>();
  CLI::App* cmd = app.add_subcommand("run", "Compress the sequences of a safetensors file");
  cmd->add_option("--weights", args->weights, "Checkpoint .safetensors with PREFIX.{wkv.weight,wgate.weight,ape,norm.weight}")->required();
  cmd->add_option("--prefix", args->prefix, "Tensor name prefix, e.g. layers.2.attn.compressor")->required();
  cmd->add_option("--input", args->input, "Input .safetensors with x.0, x.1, ... bf16 [L_i, hidden]")->required();
  cmd->add_option("--output", args->output, "Output .safetensors: kv.{i} and, unless rotating, cache.{i}")->required();
  cmd->add_option("--chunks", args->chunks, "Tokens per call C1,C2,... (the last repeats); default: one call");
  cmd->add_option("--score-dtype", args->score_dtype, "kv_score storage: f32 or bf16");
  cmd->add_option("--state-dtype", args->state_dtype, "State storage: f32 or bf16");
  cmd->add_option("--device", args->device, "cpu or cuda");
  cmd->add_option("--config", args->config, "DeepSeek-V4 config.json for RoPE settings");
  cmd->callback([args] { run(*args); });
}

}  // namespace dsv4::app
