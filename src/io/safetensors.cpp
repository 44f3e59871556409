#include "io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

namespace dsv4::io {

namespace {

constexpr std::uint64_t kMaxHeaderBytes = 100u << 20;

struct DTypeInfo {
  const char* tag;
  std::size_t size;
  std::optional<DType> dtype;
};

// Every dtype tag of the safetensors format, with its element size.
constexpr DTypeInfo kDTypes[] = {
    {"F64", 8, std::nullopt},  {"F32", 4, DType::f32},     {"F16", 2, std::nullopt},
    {"BF16", 2, DType::bf16},  {"I64", 8, DType::i64},     {"I32", 4, DType::i32},
    {"I16", 2, std::nullopt},  {"I8", 1, std::nullopt},    {"U64", 8, std::nullopt},
    {"U32", 4, std::nullopt},  {"U16", 2, std::nullopt},   {"U8", 1, DType::u8},
    {"BOOL", 1, std::nullopt}, {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt},
};

const DTypeInfo* find_dtype(const std::string& tag) {
  for (const DTypeInfo& d : kDTypes)
    if (tag == d.tag) return &d;
  return nullptr;
}

const char* tag_of(DType dtype) {
  for (const DTypeInfo& d : kDTypes)
    if (d.dtype == dtype) return d.tag;
  return "?";
}

[[noreturn]] void bad_file(const std::string& path, const std::string& what) {
  throw Error(path + ": " + what);
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad_file(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    bad_file(path, "not a regular file");
  }
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    bad_file(path, "truncated: " + std::to_string(size) + " bytes, a safetensors file has at least 8");
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) bad_file(path, std::string("cannot map: ") + std::strerror(errno));
  std::shared_ptr<void> mapping(base, [size](void* p) { ::munmap(p, size); });
  return parse(path, mapping, static_cast<const std::uint8_t*>(base), size);
}

SafetensorsFile SafetensorsFile::from_memory(const std::string& name, std::vector<std::uint8_t> bytes) {
  auto owner = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
  return parse(name, owner, owner->data(), owner->size());
}

SafetensorsFile SafetensorsFile::parse(const std::string& path, std::shared_ptr<void> owner, const std::uint8_t* bytes,
                                       std::uint64_t size) {
  SafetensorsFile f;
  f.path_ = path;
  f.mapping_ = std::move(owner);
  if (size < 8) bad_file(path, "truncated: " + std::to_string(size) + " bytes, a safetensors file has at least 8");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little-endian
  if (header_len > kMaxHeaderBytes || header_len > size - 8)
    bad_file(path, "header length " + std::to_string(header_len) + " does not fit in a file of " +
                       std::to_string(size) + " bytes");
  const std::uint64_t data_size = size - 8 - header_len;
  const std::uint8_t* data = bytes + 8 + header_len;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    bad_file(path, std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) bad_file(path, "header is not a JSON object");

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) bad_file(path, "__metadata__ is not an object");
      for (const auto& [k, v] : entry.items())
        if (v.is_string()) f.metadata_[k] = v.get<std::string>();
      continue;
    }
    const std::string where = "tensor '" + name + "': ";
    if (!entry.is_object()) bad_file(path, where + "entry is not an object");
    const auto dt = entry.find("dtype");
    const auto sh = entry.find("shape");
    const auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) bad_file(path, where + "missing string 'dtype'");
    if (sh == entry.end() || !sh->is_array()) bad_file(path, where + "missing array 'shape'");
    if (off == entry.end() || !off->is_array() || off->size() != 2)
      bad_file(path, where + "missing 'data_offsets' [begin, end]");
    StoredTensor t;
    t.name = name;
    t.dtype_tag = dt->get<std::string>();
    const DTypeInfo* info = find_dtype(t.dtype_tag);
    if (!info) bad_file(path, where + "unknown dtype '" + t.dtype_tag + "'");
    t.dtype = info->dtype;
    std::uint64_t numel = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > (std::uint64_t{1} << 40))
        bad_file(path, where + "shape " + sh->dump() + " has a dimension that is not an integer in 0..2^40");
      const std::uint64_t v = d.get<std::uint64_t>();
      if (v != 0 && numel > std::numeric_limits<std::uint64_t>::max() / 16 / v)
        bad_file(path, where + "shape " + sh->dump() + " overflows");
      numel *= v;
      t.shape.push_back(static_cast<std::int64_t>(v));
    }
    for (const auto& o : *off)
      if (!o.is_number_unsigned()) bad_file(path, where + "data_offsets are not non-negative integers");
    const std::uint64_t begin = (*off)[0].get<std::uint64_t>();
    const std::uint64_t end = (*off)[1].get<std::uint64_t>();
    if (begin > end || end > data_size)
      bad_file(path, where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                         "] lie outside the " + std::to_string(data_size) + " data bytes");
    if (end - begin != numel * info->size)
      bad_file(path, where + "holds " + std::to_string(end - begin) + " bytes but " + t.dtype_tag +
                         " " + shape_string(t.shape) + " needs " + std::to_string(numel * info->size));
    t.data = data + begin;
    t.nbytes = static_cast<std::size_t>(end - begin);
    f.tensors_.emplace(name, std::move(t));
  }
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

const StoredTensor& SafetensorsFile::get(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) bad_file(path_, "tensor '" + name + "' is missing");
  return it->second;
}

const StoredTensor& SafetensorsFile::get(const std::string& name, std::initializer_list<DType> dtypes,
                                         std::size_t rank) const {
  const StoredTensor& t = get(name);
  bool ok = false;
  std::string wanted;
  for (DType d : dtypes) {
    ok = ok || t.dtype == d;
    wanted += (wanted.empty() ? "" : " or ") + std::string(tag_of(d));
  }
  if (!ok) bad_file(path_, "tensor '" + name + "': expected dtype " + wanted + ", got " + t.dtype_tag);
  if (t.shape.size() != rank)
    bad_file(path_, "tensor '" + name + "': expected " + std::to_string(rank) + " dimensions, got shape " +
                        shape_string(t.shape));
  return t;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    std::uint64_t bytes = dtype_size(t.dtype);
    for (std::int64_t d : t.shape) bytes *= static_cast<std::uint64_t>(d);
    header[t.name] = {{"dtype", tag_of(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');  // keep the data 8-byte aligned

  const std::string tmp = path + ".partial";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(path + ": cannot write (" + std::strerror(errno) + ")");
    std::uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(text.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const TensorToWrite& t : tensors) {
      std::size_t bytes = dtype_size(t.dtype);
      for (std::int64_t d : t.shape) bytes *= static_cast<std::size_t>(d);
      if (bytes) out.write(static_cast<const char*>(t.data), static_cast<std::streamsize>(bytes));
    }
    out.flush();
    if (!out) {
      out.close();
      std::remove(tmp.c_str());
      throw Error(path + ": write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw Error(path + ": cannot write (" + why + ")");
  }
}

}  // namespace dsv4::io
