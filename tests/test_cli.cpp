// The `dsv4-compressor run` contract: outputs equal the library's, splits change nothing, and
// every error is one line on stderr, a non-zero exit and no output file.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <filesystem>
#include <random>

#include "core/numerics.hpp"
#include "core/random_inputs.hpp"
#include "io/safetensors.hpp"
#include "support/files.hpp"
#include "support/reference.hpp"
#include "support/serving.hpp"

namespace dsv4 {
namespace {

constexpr std::int64_t kHidden = 64;
const char* const kMain = "layers.2.attn.compressor";
const char* const kIndexer = "layers.2.attn.indexer.compressor";
const char* const kHca = "layers.3.attn.compressor";

struct Result {
  int code;
  std::string err;
};

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(std::random_device{}());
    specs_ = {{kMain, spec(CompressorKind::csa_main)}, {kIndexer, spec(CompressorKind::csa_indexer)},
              {kHca, spec(CompressorKind::hca)}};
    std::vector<io::TensorToWrite> tensors;
    for (auto& [prefix, s] : specs_) {
      weights_.emplace(prefix, random_weights(s, rng()));
      const RandomWeights& w = weights_.at(prefix);
      const std::int64_t rows = s.coff() * s.head_dim;
      const std::string p = prefix;
      tensors.push_back({p + ".wkv.weight", DType::bf16, {rows, kHidden}, w.wkv.data()});
      tensors.push_back({p + ".wgate.weight", DType::bf16, {rows, kHidden}, w.wgate.data()});
      tensors.push_back({p + ".ape", DType::f32, {s.ratio, rows}, w.ape.data()});
      // One compressor stores its norm weight in bf16, as some checkpoints do.
      if (p == kHca) {
        norm_bf16_.clear();
        for (float v : w.norm) norm_bf16_.push_back(num::bf16_from_f32(v));
        weights_.at(prefix).norm.clear();
        for (auto v : norm_bf16_) weights_.at(prefix).norm.push_back(num::f32_from_bf16(v));
        tensors.push_back({p + ".norm.weight", DType::bf16, {s.head_dim}, norm_bf16_.data()});
      } else {
        tensors.push_back({p + ".norm.weight", DType::f32, {s.head_dim}, w.norm.data()});
      }
    }
    io::write_safetensors(dir_.file("w.safetensors"), tensors);
    seqs_ = test::random_sequences(3, 1, 300, kHidden, rng);
    seqs_[1].length = 3;  // shorter than any window
    seqs_[1].x.resize(3 * kHidden);
    seqs_[2] = test::random_sequences(1, 257, 300, kHidden, rng)[0];  // at least two HCA windows
    std::vector<io::TensorToWrite> xs;
    for (std::size_t i = 0; i < seqs_.size(); ++i)
      xs.push_back({"x." + std::to_string(i), DType::bf16, {seqs_[i].length, kHidden}, seqs_[i].x.data()});
    io::write_safetensors(dir_.file("x.safetensors"), xs);
  }

  static CompressorSpec spec(CompressorKind kind) {
    auto s = CompressorSpec::preset(Model::flash, kind);
    s.hidden = kHidden;
    return s;
  }

  Result cli(const std::string& args) {
    const std::string err = dir_.file("stderr.txt");
    const std::string cmd = test::cli_path() + " " + args + " >" + dir_.file("stdout.txt") + " 2>" + err;
    const int status = std::system(cmd.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, test::read_bytes(err)};
  }

  std::string run_args(const std::string& prefix, const std::string& out, const std::string& extra = "") {
    return "run --weights " + dir_.file("w.safetensors") + " --prefix " + prefix + " --input " +
           dir_.file("x.safetensors") + " --output " + out + " " + extra;
  }

  void expect_error(const std::string& args, const std::string& fragment) {
    const std::string out = dir_.file("should-not-exist.safetensors");
    const Result r = cli(args);
    EXPECT_NE(r.code, 0) << args;
    EXPECT_NE(r.err.find(fragment), std::string::npos) << "stderr: " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line expected: " << r.err;
    EXPECT_FALSE(std::filesystem::exists(out)) << args;
    EXPECT_FALSE(std::filesystem::exists(out + ".partial")) << args;
  }

  test::TempDir dir_;
  std::map<std::string, CompressorSpec> specs_;
  std::map<std::string, RandomWeights> weights_;
  std::vector<std::uint16_t> norm_bf16_;
  std::vector<test::Sequence> seqs_;
};

TEST_F(Cli, OutputsMatchTheLibraryForEveryCompressor) {
  for (const auto& [prefix, s] : specs_) {
    const std::string out = dir_.file("o.safetensors");
    const Result r = cli(run_args(prefix, out));
    ASSERT_EQ(r.code, 0) << r.err;
    const auto o = io::SafetensorsFile::open(out);
    const Compressor comp(s, weights_.at(prefix).view(s));
    auto buffers = test::host_buffers();
    std::mt19937_64 rng(1);
    const auto lib = test::serve(comp, seqs_, test::whole_schedule(seqs_), *buffers, rng);
    for (std::size_t i = 0; i < seqs_.size(); ++i) {
      const std::int64_t e = seqs_[i].length / s.ratio;
      const auto& kv = o.get("kv." + std::to_string(i), {DType::bf16}, 2);
      EXPECT_EQ(kv.shape, (std::vector<std::int64_t>{e, s.head_dim})) << prefix;
      EXPECT_EQ(o.copy<std::uint16_t>(kv), lib.entries[i]) << prefix << " sequence " << i;
      const std::string cache_name = "cache." + std::to_string(i);
      if (s.rotate) {
        EXPECT_FALSE(o.contains(cache_name)) << prefix;
      } else {
        const auto& cache = o.get(cache_name, {DType::u8}, 2);
        EXPECT_EQ(cache.shape, (std::vector<std::int64_t>{e, 584})) << prefix;
        EXPECT_EQ(test::check_stored_entries(s, lib.entries[i], o.copy<std::uint8_t>(cache), e), "");
      }
    }
    std::filesystem::remove(out);
  }
}

TEST_F(Cli, ChunksAndDtypes) {
  const std::string whole = dir_.file("whole.safetensors"), split = dir_.file("split.safetensors");
  for (const std::string dtypes : {"", "--score-dtype bf16 --state-dtype bf16", "--score-dtype f32 --state-dtype bf16"}) {
    ASSERT_EQ(cli(run_args(kMain, whole, dtypes)).code, 0);
    ASSERT_EQ(cli(run_args(kMain, split, dtypes + " --chunks 5,1,3,2")).code, 0);
    EXPECT_EQ(test::read_bytes(whole), test::read_bytes(split)) << dtypes;
  }
  // bf16 storage changes bits but stays within tolerance of f32 storage.
  ASSERT_EQ(cli(run_args(kMain, whole)).code, 0);
  ASSERT_EQ(cli(run_args(kMain, split, "--score-dtype bf16 --state-dtype bf16 --chunks 7")).code, 0);
  const auto a = io::SafetensorsFile::open(whole), b = io::SafetensorsFile::open(split);
  // Sequence 2 has at least 257 tokens, so it has entries to compare.
  const auto ka = a.copy<std::uint16_t>(a.get("kv.2")), kb = b.copy<std::uint16_t>(b.get("kv.2"));
  ASSERT_FALSE(ka.empty());
  std::vector<double> ref;
  for (auto v : ka) ref.push_back(num::f32_from_bf16(v));
  EXPECT_NE(ka, kb);
  EXPECT_LE(test::relative_l2(kb, ref), 1e-2);
}

TEST_F(Cli, ConfigSetsRope) {
  const std::string base = dir_.file("base.safetensors"), alt = dir_.file("alt.safetensors");
  test::write_bytes(dir_.file("config.json"),
                    R"({"compress_rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 4,
                       "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}})");
  ASSERT_EQ(cli(run_args(kHca, base)).code, 0);
  ASSERT_EQ(cli(run_args(kHca, alt, "--config " + dir_.file("config.json"))).code, 0);
  const auto a = io::SafetensorsFile::open(base), b = io::SafetensorsFile::open(alt);
  const auto ka = a.copy<std::uint16_t>(a.get("kv.2")), kb = b.copy<std::uint16_t>(b.get("kv.2"));
  ASSERT_EQ(ka.size(), kb.size());
  ASSERT_GE(ka.size(), 1024u);  // window 1 exists: position 128 rotates differently
  // Entry 0 sits at position 0 (no rotation); entry 1's no-rope dims agree, its rope dims differ.
  EXPECT_TRUE(std::equal(ka.begin(), ka.begin() + 512, kb.begin()));
  EXPECT_TRUE(std::equal(ka.begin() + 512, ka.begin() + 512 + 448, kb.begin() + 512));
  EXPECT_FALSE(std::equal(ka.begin() + 512 + 448, ka.begin() + 1024, kb.begin() + 512 + 448));
}

TEST_F(Cli, ErrorsAreOneLineAndLeaveNoOutput) {
  const std::string out = dir_.file("should-not-exist.safetensors");
  expect_error(run_args("layers.9.attn.compressor", out), "tensor 'layers.9.attn.compressor.wkv.weight' is missing");
  expect_error(run_args(kMain, out, "--score-dtype fp16"), "--score-dtype: expected f32 or bf16, got 'fp16'");
  expect_error(run_args(kMain, out, "--state-dtype f64"), "--state-dtype: expected f32 or bf16");
  expect_error(run_args(kMain, out, "--chunks 0"), "--chunks: expected positive integers");
  expect_error(run_args(kMain, out, "--chunks 3,x"), "--chunks: expected positive integers");
  expect_error(run_args(kMain, out, "--chunks 3,,4"), "--chunks: expected positive integers");
  expect_error(run_args(kMain, out, "--device tpu"), "--device: expected cpu or cuda, got 'tpu'");
  if (!cuda_available()) expect_error(run_args(kMain, out, "--device cuda"), "cuda:0");
  expect_error("run --prefix x --input a --output " + out, "--weights");
  expect_error(run_args(kMain, out, "--config " + dir_.file("nope.json")), "--config: cannot open");
  test::write_bytes(dir_.file("bad.json"), "{\"compress_rope_theta\": ");
  expect_error(run_args(kMain, out, "--config " + dir_.file("bad.json")), "--config:");
  test::write_bytes(dir_.file("bad2.json"), R"({"compress_rope_theta": "big"})");
  expect_error(run_args(kMain, out, "--config " + dir_.file("bad2.json")), "'compress_rope_theta' must be a number");
  expect_error(run_args(kMain, dir_.file("no/such/dir/o.safetensors")), "cannot write");
  EXPECT_FALSE(std::filesystem::exists(dir_.file("no/such/dir/o.safetensors")));

  // Truncated and malformed inputs.
  const std::string x = test::read_bytes(dir_.file("x.safetensors"));
  test::write_bytes(dir_.file("x.safetensors"), x.substr(0, x.size() - 10));
  expect_error(run_args(kMain, out), "lie outside");
  test::write_bytes(dir_.file("x.safetensors"), x.substr(0, 5));
  expect_error(run_args(kMain, out), "truncated");
  // x of the wrong width, and x of the wrong dtype.
  std::vector<std::uint16_t> narrow(10 * 32);
  io::write_safetensors(dir_.file("x.safetensors"), {{"x.0", DType::bf16, {10, 32}, narrow.data()}});
  expect_error(run_args(kMain, out), "tensor 'x.0': expected shape [L, 64]");
  std::vector<float> wide(10 * kHidden);
  io::write_safetensors(dir_.file("x.safetensors"), {{"x.0", DType::f32, {10, kHidden}, wide.data()}});
  expect_error(run_args(kMain, out), "tensor 'x.0': expected dtype BF16, got F32");
  io::write_safetensors(dir_.file("x.safetensors"), {{"y", DType::f32, {10, kHidden}, wide.data()}});
  expect_error(run_args(kMain, out), "found no 'x.0'");
  std::vector<std::uint16_t> ok(10 * kHidden);
  io::write_safetensors(dir_.file("x.safetensors"), {{"x.0", DType::bf16, {10, kHidden}, ok.data()},
                                                     {"x.2", DType::bf16, {10, kHidden}, ok.data()}});
  expect_error(run_args(kMain, out), "'x.2' does not follow");
  // Weights of the wrong dtype.
  io::write_safetensors(dir_.file("x.safetensors"), {{"x.0", DType::bf16, {10, kHidden}, ok.data()}});
  const auto& s = specs_.at(kMain);
  std::vector<float> f32w(static_cast<std::size_t>(s.coff() * s.head_dim * kHidden));
  const auto& w = weights_.at(kMain);
  io::write_safetensors(dir_.file("w.safetensors"),
                        {{std::string(kMain) + ".wkv.weight", DType::f32, {s.coff() * s.head_dim, kHidden}, f32w.data()},
                         {std::string(kMain) + ".wgate.weight", DType::bf16, {s.coff() * s.head_dim, kHidden}, w.wgate.data()},
                         {std::string(kMain) + ".ape", DType::f32, {s.ratio, s.coff() * s.head_dim}, w.ape.data()},
                         {std::string(kMain) + ".norm.weight", DType::f32, {s.head_dim}, w.norm.data()}});
  expect_error(run_args(kMain, out), "wkv.weight': expected dtype BF16, got F32");
}

}  // namespace
}  // namespace dsv4
