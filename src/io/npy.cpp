#include "io/npy.hpp"

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>

namespace dsv4::io {

namespace {

[[noreturn]] void bad(const std::string& name, const std::string& what) { throw Error(name + ": " + what); }

// The value of `key` in the header dict, as the raw text up to the next top-level comma.
std::string dict_value(const std::string& name, const std::string& header, const std::string& key) {
  const std::string quoted[] = {"'" + key + "'", "\"" + key + "\""};
  std::size_t at = std::string::npos;
  for (const auto& q : quoted)
    if ((at = header.find(q)) != std::string::npos) {
      at += q.size();
      break;
    }
  if (at == std::string::npos) bad(name, "npy header has no '" + key + "'");
  at = header.find(':', at);
  if (at == std::string::npos) bad(name, "npy header: no value for '" + key + "'");
  ++at;
  while (at < header.size() && std::isspace(static_cast<unsigned char>(header[at]))) ++at;
  std::size_t end = at;
  int depth = 0;
  for (; end < header.size(); ++end) {
    const char c = header[end];
    if (c == '(' || c == '[') ++depth;
    else if (c == ')' || c == ']') {
      if (--depth < 0) bad(name, "npy header: unbalanced brackets");
    } else if ((c == ',' || c == '}') && depth == 0) break;
  }
  if (depth != 0) bad(name, "npy header: unbalanced brackets");
  return header.substr(at, end - at);
}

}  // namespace

NpyArray parse_npy(const std::string& name, const std::uint8_t* bytes, std::size_t size) {
  static const char magic[] = "\x93NUMPY";
  if (size < 10 || std::memcmp(bytes, magic, 6) != 0) bad(name, "not an .npy file (no \\x93NUMPY magic)");
  const int major = bytes[6];
  std::size_t header_len, offset;
  if (major == 1) {
    header_len = bytes[8] | (std::size_t{bytes[9]} << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) bad(name, "truncated npy header");
    header_len = bytes[8] | (std::size_t{bytes[9]} << 8) | (std::size_t{bytes[10]} << 16) | (std::size_t{bytes[11]} << 24);
    offset = 12;
  } else {
    bad(name, "npy format version " + std::to_string(major) + " is not 1, 2 or 3");
  }
  if (header_len > size - offset) bad(name, "npy header length " + std::to_string(header_len) + " exceeds the file");
  const std::string header(reinterpret_cast<const char*>(bytes + offset), header_len);

  NpyArray a;
  std::string descr = dict_value(name, header, "descr");
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"') || descr.back() != descr.front())
    bad(name, "npy descr " + descr + " is not a quoted string");
  descr = descr.substr(1, descr.size() - 2);
  if (descr == "<f4") a.dtype = DType::f32;
  else if (descr == "<i4") a.dtype = DType::i32;
  else if (descr == "<i8") a.dtype = DType::i64;
  else if (descr == "|u1" || descr == "<u1") a.dtype = DType::u8;
  else if (descr == "<u2") a.dtype = DType::bf16;  // bf16 bits
  else bad(name, "npy dtype '" + descr + "' is not one of <f4, <i4, <i8, |u1, <u2 (bf16 bits)");
  const std::string fortran = dict_value(name, header, "fortran_order");
  if (fortran == "True") bad(name, "npy array in Fortran order; expected C order");
  if (fortran != "False") bad(name, "npy fortran_order " + fortran + " is not True or False");
  const std::string shape = dict_value(name, header, "shape");
  if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') bad(name, "npy shape " + shape + " is not a tuple");
  std::uint64_t numel = 1;
  std::size_t i = 1;
  while (i < shape.size() - 1) {
    while (i < shape.size() - 1 && (shape[i] == ' ' || shape[i] == ',')) ++i;
    if (i >= shape.size() - 1) break;
    std::uint64_t v = 0;
    std::size_t digits = 0;
    while (i < shape.size() - 1 && std::isdigit(static_cast<unsigned char>(shape[i]))) {
      v = v * 10 + static_cast<std::uint64_t>(shape[i++] - '0');
      if (++digits > 12) bad(name, "npy shape " + shape + " has a dimension over 10^12");
    }
    if (digits == 0) bad(name, "npy shape " + shape + " is not a tuple of non-negative integers");
    if (v != 0 && numel > std::numeric_limits<std::uint64_t>::max() / 16 / v) bad(name, "npy shape " + shape + " overflows");
    numel *= v;
    a.shape.push_back(static_cast<std::int64_t>(v));
  }
  const std::uint64_t nbytes = numel * dtype_size(a.dtype);
  const std::size_t data_at = offset + header_len;
  if (nbytes != size - data_at)
    bad(name, "npy data holds " + std::to_string(size - data_at) + " bytes but " + descr + " " + shape_string(a.shape) +
                  " needs " + std::to_string(nbytes));
  a.data.assign(bytes + data_at, bytes + size);
  return a;
}

NpyArray read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bad(path, std::string("cannot open: ") + std::strerror(errno));
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
  return parse_npy(path, bytes.data(), bytes.size());
}

void write_npy(const std::string& path, const TensorView& t) {
  const char* descr = t.dtype == DType::f32 ? "<f4" : t.dtype == DType::i32 ? "<i4" : t.dtype == DType::i64 ? "<i8"
                      : t.dtype == DType::u8 ? "|u1" : "<u2";
  std::string shape = "(";
  for (std::size_t i = 0; i < t.shape.size(); ++i) shape += std::to_string(t.shape[i]) + (t.shape.size() == 1 || i + 1 < t.shape.size() ? "," : "");
  shape += ")";
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.resize((header.size() + 10 + 1 + 63) / 64 * 64 - 10 - 1, ' ');
  header += '\n';
  const std::string tmp = path + ".partial";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(path + ": cannot write (" + std::strerror(errno) + ")");
    out.write("\x93NUMPY\x01\x00", 8);
    const char len[2] = {static_cast<char>(header.size() & 0xff), static_cast<char>(header.size() >> 8)};
    out.write(len, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    if (t.nbytes()) out.write(static_cast<const char*>(t.data), static_cast<std::streamsize>(t.nbytes()));
    if (!out.flush()) {
      std::remove(tmp.c_str());
      throw Error(path + ": write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": cannot write");
  }
}

}  // namespace dsv4::io
