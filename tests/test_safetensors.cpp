// The safetensors reader and writer: round trips, and malformed files reported, never read
// out of bounds.
#include <gtest/gtest.h>

#include <filesystem>

#include "io/safetensors.hpp"
#include "support/files.hpp"

namespace dsv4 {
namespace {

std::string header_file(const std::string& json, std::size_t data_bytes, std::uint64_t declared_len = 0) {
  std::string s(8, '\0');
  const std::uint64_t n = declared_len ? declared_len : json.size();
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s + json + std::string(data_bytes, '\x11');
}

void expect_bad(const std::string& bytes, const std::string& fragment) {
  test::TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  test::write_bytes(path, bytes);
  try {
    io::SafetensorsFile::open(path);
    ADD_FAILURE() << "opened; expected an error mentioning '" << fragment << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(fragment), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  }
}

TEST(Safetensors, RoundTrip) {
  test::TempDir dir;
  const std::string path = dir.file("t.safetensors");
  std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  std::vector<std::uint16_t> b = {0x3f80, 0xc000, 0x4040};
  std::vector<std::uint8_t> c(5 * 3, 9);
  io::write_safetensors(path, {{"a", DType::f32, {2, 3}, a.data()},
                               {"b.weight", DType::bf16, {3}, b.data()},
                               {"empty", DType::bf16, {0, 4}, nullptr},
                               {"c", DType::u8, {5, 3}, c.data()}},
                        {{"k", "v"}});
  EXPECT_FALSE(std::filesystem::exists(path + ".partial"));
  const auto f = io::SafetensorsFile::open(path);
  EXPECT_EQ(f.names().size(), 4u);
  EXPECT_EQ(f.metadata().at("k"), "v");
  const auto& ta = f.get("a", {DType::f32}, 2);
  EXPECT_EQ(ta.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(f.copy<float>(ta), a);
  EXPECT_EQ(f.copy<std::uint16_t>(f.get("b.weight", {DType::bf16}, 1)), b);
  EXPECT_EQ(f.get("empty").nbytes, 0u);
  EXPECT_EQ(f.copy<std::uint8_t>(f.get("c")), c);
  EXPECT_THROW(f.get("missing"), Error);
  try {
    f.get("a", {DType::bf16}, 2);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 'a': expected dtype BF16, got F32"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, MalformedFilesAreReported) {
  expect_bad("", "truncated");
  expect_bad("abc", "truncated");
  expect_bad(header_file("{}", 0, 1ull << 62), "header length");
  expect_bad(header_file("{}", 0, 100), "header length 100 does not fit");
  expect_bad(header_file("{\"a\": [1, 2", 0), "not valid JSON");
  expect_bad(header_file("[1, 2]", 0), "not a JSON object");
  expect_bad(header_file(R"({"a": 5})", 0), "entry is not an object");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [2]}})", 8), "data_offsets");
  expect_bad(header_file(R"({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})", 8), "unknown dtype 'Q7'");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}})", 8), "lie outside");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}})", 8), "lie outside");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8), "needs 12");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8), "not an integer");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", 8), "not an integer");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [1099511627776, 1099511627776, 1099511627776], "data_offsets": [0, 8]}})", 8), "overflows");
  expect_bad(header_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-1, 8]}})", 8), "non-negative");
  expect_bad(header_file(R"({"__metadata__": 3})", 0), "__metadata__");
}

TEST(Safetensors, UnwritablePathLeavesNothing) {
  test::TempDir dir;
  const std::string path = dir.file("no/such/folder/o.safetensors");
  std::vector<float> a(4);
  EXPECT_THROW(io::write_safetensors(path, {{"a", DType::f32, {4}, a.data()}}), Error);
  EXPECT_FALSE(std::filesystem::exists(path));
}

}  // namespace
}  // namespace dsv4
