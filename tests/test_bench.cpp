// The `dsv4-compressor bench` contract on the CPU backend (the README's main job): the table,
// the JSON every result in docs/PERF.md is read from, and the SVG, with every variant named;
// variants that need a GPU are null rather than zero. A bad option is one line and no file.
// And `demo` on the CPU backend (CudaCli runs it on the GPU).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "support/files.hpp"

namespace dsv4 {
namespace {

struct Result {
  int code;
  std::string out, err;
};

Result cli(const test::TempDir& dir, const std::string& args) {
  const std::string out = dir.file("stdout.txt"), err = dir.file("stderr.txt");
  const std::string cmd = test::cli_path() + " " + args + " >" + out + " 2>" + err;
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, test::read_bytes(out), test::read_bytes(err)};
}

Result bench(const test::TempDir& dir, const std::string& args) { return cli(dir, "bench " + args); }

TEST(BenchCli, CpuRunWritesEveryVariantTableJsonAndSvg) {
  const test::TempDir dir;
  const std::string json = dir.file("b.json"), svg = dir.file("b.svg");
  const Result r = bench(dir, "--quick --device cpu --filter 'flash CSA main decode B=' --json " + json + " --svg " + svg);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("(g) reach"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("g/floor"), std::string::npos) << r.out;

  const auto j = nlohmann::json::parse(test::read_bytes(json));
  EXPECT_EQ(j.at("backend"), "cpu");
  EXPECT_GT(j.at("ceilings").at("copy_gbps").get<double>(), 0.0);
  EXPECT_FALSE(j.at("ceilings").contains("empty_step_us")) << "the least step is measured on a GPU only";
  const std::vector<std::string> keys = {"a_bf16_gemm_cast_f32_compress", "b_bf16_gemm_direct", "c_f32_gemm", "d_best",
                                         "e_fused_forced", "f_unfused_per_stage", "g_reach"};
  ASSERT_EQ(j.at("variants").size(), keys.size());
  for (const std::string& k : keys) EXPECT_TRUE(j.at("variants").contains(k)) << k;

  const auto& rows = j.at("rows");
  ASSERT_FALSE(rows.empty());
  for (const auto& row : rows) {
    EXPECT_EQ(row.at("model"), "flash");
    EXPECT_EQ(row.at("kind"), "CSA main");
    EXPECT_EQ(row.at("scenario"), "decode");
    const double floor = row.at("floor_us").get<double>(), best = row.at("d_best_us").get<double>();
    EXPECT_TRUE(std::isfinite(floor) && floor > 0) << row.dump();
    EXPECT_TRUE(std::isfinite(best) && best > 0) << row.dump();
    for (const std::string& k : keys) {
      if (k == "d_best") continue;
      EXPECT_TRUE(row.at(k + "_us").is_null()) << k << " measured without a GPU: " << row.dump();
    }
  }

  const std::string picture = test::read_bytes(svg);
  EXPECT_EQ(picture.rfind("<svg", 0), 0u);
  EXPECT_NE(picture.find("(g) reach"), std::string::npos);
}

TEST(BenchCli, BadDeviceIsOneLineAndWritesNothing) {
  const test::TempDir dir;
  const std::string json = dir.file("b.json");
  const Result r = bench(dir, "--device gpu0 --json " + json);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("--device: expected auto, cpu or cuda, got 'gpu0'"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(std::filesystem::exists(json));
}

// --batches replaces the decode batch sizes (sorted, each once); one outside 1..256 is one line
// naming the option, a non-zero exit and no file.
TEST(BenchCli, BatchesSetTheDecodeRows) {
  const test::TempDir dir;
  const std::string json = dir.file("b.json");
  const Result r = bench(dir, "--quick --device cpu --batches 3,2,3 --filter 'flash CSA main decode' --json " + json);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(test::read_bytes(json));
  std::vector<std::pair<std::string, int>> rows;
  for (const auto& row : j.at("rows")) rows.emplace_back(row.at("scenario"), row.at("batch"));
  const std::vector<std::pair<std::string, int>> expected = {
      {"decode", 2}, {"decode", 3}, {"decode-partial", 2}, {"decode-partial", 3}, {"decode-staggered", 2},
      {"decode-staggered", 3}};
  EXPECT_EQ(rows, expected);

  for (const std::string bad : {"0", "257", "8,-1"}) {
    const std::string none = dir.file("none.json");
    const Result e = bench(dir, "--device cpu --batches " + bad + " --json " + none);
    EXPECT_NE(e.code, 0) << bad;
    EXPECT_NE(e.err.find("--batches: expected decode batch sizes from 1 to 256, got "), std::string::npos) << e.err;
    EXPECT_EQ(std::count(e.err.begin(), e.err.end(), '\n'), 1) << e.err;
    EXPECT_FALSE(std::filesystem::exists(none)) << bad;
  }
}

// --filter takes alternatives separated by '|': a row is timed when its label contains one of
// them (an empty alternative selects nothing).
TEST(BenchCli, FilterAlternativesSelectTheUnionOfTheirRows) {
  const test::TempDir dir;
  const std::string json = dir.file("b.json");
  const Result r =
      bench(dir, "--quick --device cpu --batches 2,3 --filter 'CSA main decode B=2|HCA decode-partial B=3|' --json " + json);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(test::read_bytes(json));
  std::vector<std::string> rows;
  for (const auto& row : j.at("rows"))
    rows.push_back(row.at("kind").get<std::string>() + " " + row.at("scenario").get<std::string>() + " " +
                   std::to_string(row.at("batch").get<int>()));
  std::sort(rows.begin(), rows.end());
  const std::vector<std::string> expected = {"CSA main decode 2", "HCA decode-partial 3"};
  EXPECT_EQ(rows, expected);
}

// bench-multiply needs a GPU: without one it is one line and no file; with one (the device
// machine runs this suite too) every sequence that ran agrees with fp64 and keeps a token's
// bits whatever the tokens beside it, and the fused step's own sequence always runs.
TEST(BenchCli, MultiplyProbeChecksItsResultsOrSaysWhyNot) {
  const test::TempDir dir;
  const std::string json = dir.file("m.json");
  const Result r = cli(dir, "bench-multiply --json " + json);
  if (r.code != 0) {
    EXPECT_NE(r.err.find("bench-multiply: "), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(std::filesystem::exists(json));
    return;
  }
  const auto j = nlohmann::json::parse(test::read_bytes(json));
  ASSERT_EQ(j["rows"].size(), 24u);  // 4 sequences x 8, 32, 64 tokens x 1, 2 blocks per SM
  int fused_rows = 0;
  bool wgmma_ran = false;
  for (const auto& row : j["rows"])
    wgmma_ran |= row["sequence"].get<std::string>().find("wgmma") != std::string::npos && !row["cycles_median"].is_null();
  for (const auto& row : j["rows"]) {
    const bool is_wgmma = row["sequence"].get<std::string>().find("wgmma") != std::string::npos;
    if (row["cycles_median"].is_null()) {  // wgmma where the build or device has none
      EXPECT_TRUE(is_wgmma) << row.dump();
      continue;
    }
    // An mma.sync row says whether it has wgmma's bits wherever wgmma ran, and only there.
    EXPECT_EQ(row["same_bits_as_wgmma"].is_boolean(), !is_wgmma && wgmma_ran) << row.dump();
    EXPECT_GT(row["cycles_median"].get<double>(), 0.0) << row.dump();
    EXPECT_LT(row["worst_error"].get<double>(), 1e-5) << row.dump();
    EXPECT_TRUE(row["same_bits_as_8_tokens"].get<bool>()) << row.dump();
    fused_rows += row["sequence"].get<std::string>().find("fused step") != std::string::npos;
  }
  EXPECT_EQ(fused_rows, 6);
}

// `demo` serves a mixed batch and checks its own results: on the CPU backend, which has one
// path, every row is bit-identical for the split invariant and for the default options.
TEST(DemoCli, CpuRowsAreBitIdentical) {
  const test::TempDir dir;
  const Result r = cli(dir, "demo --requests 3 --seed 7");
  ASSERT_EQ(r.code, 0) << r.err;
  std::size_t identical = 0;
  for (auto at = r.out.find("bit-identical"); at != std::string::npos; at = r.out.find("bit-identical", at + 1))
    ++identical;
  EXPECT_EQ(identical, 12u) << r.out;  // 3 kinds x 2 precisions, two checks each
  EXPECT_EQ(r.out.find("MISMATCH"), std::string::npos) << r.out;

  const Result e = cli(dir, "demo --requests 0");
  EXPECT_NE(e.code, 0);
  EXPECT_NE(e.err.find("--requests: expected 1..4096, got 0"), std::string::npos) << e.err;
  EXPECT_EQ(std::count(e.err.begin(), e.err.end(), '\n'), 1) << e.err;
}

}  // namespace
}  // namespace dsv4
