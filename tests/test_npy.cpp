// The .npy reader and writer: round trips, and malformed arrays refused with a clear message.
#include <gtest/gtest.h>

#include <cstring>

#include "io/npy.hpp"
#include "support/files.hpp"

namespace dsv4 {
namespace {

std::string npy(const std::string& dict, const std::string& data, int version = 1) {
  std::string h = dict;
  h.resize((h.size() + 11 + 63) / 64 * 64 - 11, ' ');
  h += '\n';
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(version) + '\0';
  if (version == 1) out += std::string{static_cast<char>(h.size() & 0xff), static_cast<char>(h.size() >> 8)};
  else out += std::string{static_cast<char>(h.size() & 0xff), static_cast<char>(h.size() >> 8), '\0', '\0'};
  return out + h + data;
}

void expect_bad(const std::string& bytes, const std::string& fragment) {
  try {
    io::parse_npy("x.npy", reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    ADD_FAILURE() << "accepted; expected " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("x.npy"), std::string::npos) << e.what();
  }
}

TEST(Npy, RoundTrip) {
  test::TempDir dir;
  std::vector<float> f = {1, 2, 3, 4, 5, 6};
  io::write_npy(dir.file("a.npy"), TensorView(f.data(), DType::f32, {2, 3}));
  const auto a = io::read_npy(dir.file("a.npy"));
  EXPECT_EQ(a.dtype, DType::f32);
  EXPECT_EQ(a.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(std::memcmp(a.data.data(), f.data(), 24), 0);
  std::vector<std::uint16_t> b = {0x3f80, 0xc000, 0x4040};
  io::write_npy(dir.file("b.npy"), TensorView(b.data(), DType::bf16, {3}));
  const auto bb = io::read_npy(dir.file("b.npy"));
  EXPECT_EQ(bb.dtype, DType::bf16);
  EXPECT_EQ(bb.shape, (std::vector<std::int64_t>{3}));
  io::write_npy(dir.file("c.npy"), TensorView(nullptr, DType::u8, {0, 5}));
  EXPECT_EQ(io::read_npy(dir.file("c.npy")).shape, (std::vector<std::int64_t>{0, 5}));
  const std::string v2 = npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", std::string(16, '\1'), 2);
  EXPECT_EQ(io::parse_npy("v2", reinterpret_cast<const std::uint8_t*>(v2.data()), v2.size()).dtype, DType::i64);
}

TEST(Npy, MalformedArraysAreRefused) {
  expect_bad("hello", "not an .npy file");
  expect_bad(std::string("\x93NUMPY\x09\x00\x00\x00", 10), "version 9");
  expect_bad(std::string("\x93NUMPY\x01\x00\xff\x7f", 10) + "{}", "exceeds the file");
  expect_bad(npy("{'fortran_order': False, 'shape': (2,), }", "12345678"), "no 'descr'");
  expect_bad(npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", "12345678"), "dtype '>f4'");
  expect_bad(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", "12345678"), "Fortran order");
  expect_bad(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", "12345678"), "needs 12");
  expect_bad(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", "12345678"), "non-negative integers");
  expect_bad(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, }", "12345678"), "unbalanced");
  expect_bad(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999,), }", ""), "over 10^12");
  expect_bad(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (999999999999, 999999999999, 99999999), }", ""), "overflows");
}

}  // namespace
}  // namespace dsv4
