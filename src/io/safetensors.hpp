// Reading (memory-mapped) and writing of .safetensors files. Every malformation of a file is
// reported as a dsv4::Error naming the file and what is wrong; nothing is read out of bounds.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dsv4/types.hpp"

namespace dsv4::io {

struct StoredTensor {
  std::string name;
  std::string dtype_tag;           // as written in the file: "BF16", "F32", ...
  std::optional<DType> dtype;      // when the library has a use for this dtype
  std::vector<std::int64_t> shape;
  const std::uint8_t* data = nullptr;  // inside the mapping, not necessarily aligned
  std::size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  // The same checks on bytes already in memory (`name` stands for the path in messages).
  static SafetensorsFile from_memory(const std::string& name, std::vector<std::uint8_t> bytes);

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor, checked to have one of `dtypes` and `rank` dimensions; throws naming it.
  const StoredTensor& get(const std::string& name) const;
  const StoredTensor& get(const std::string& name, std::initializer_list<DType> dtypes,
                          std::size_t rank) const;

  // An aligned copy of a tensor's bytes.
  template <class T>
  std::vector<T> copy(const StoredTensor& t) const {
    std::vector<T> out(t.nbytes / sizeof(T));
    if (t.nbytes) std::memcpy(out.data(), t.data, t.nbytes);
    return out;
  }

 private:
  static SafetensorsFile parse(const std::string& path, std::shared_ptr<void> owner, const std::uint8_t* bytes,
                               std::uint64_t size);

  std::string path_;
  std::shared_ptr<void> mapping_;
  std::map<std::string, StoredTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  const void* data;
};

// Writes the file through a temporary in the same folder and a rename, so that a failed
// write leaves no file at `path`.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace dsv4::io
