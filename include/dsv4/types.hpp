// Basic vocabulary of the public API: errors, element types, devices and tensor views.
// Plain C++20; including it needs no CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

// Every rejected call throws this. The message names the argument and what was expected.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A device runtime failure (out of memory, a failed launch): not the caller's input.
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType : std::uint8_t { f32, bf16, u8, i32, i64 };

std::string_view dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;

  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  friend bool operator==(const Device&, const Device&) = default;
};

std::string device_name(Device device);

// A non-owning view of a dense, row-major tensor (the layout DLPack calls compact).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  Device device;

  TensorView() = default;
  // Views of const data are allowed for inputs; the library never writes through an input.
  TensorView(const void* data_, DType dtype_, std::vector<std::int64_t> shape_,
             Device device_ = {})
      : data(const_cast<void*>(data_)), dtype(dtype_), shape(std::move(shape_)),
        device(device_) {}

  std::int64_t numel() const;
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  template <class T>
  T* as() const { return static_cast<T*>(data); }
};

std::string shape_string(const std::vector<std::int64_t>& shape);

}  // namespace dsv4
