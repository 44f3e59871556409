#include <cstring>

#include "core/internal.hpp"
#include "core/validate.hpp"

namespace dsv4 {

Buffer::Buffer(Device device, std::size_t bytes) : device_(device), size_(bytes) {
  if (device.type == DeviceType::cpu) {
    data_ = ::operator new(bytes == 0 ? 1 : bytes);
  } else {
    data_ = cuda_malloc(device.index, bytes);
  }
}

Buffer::~Buffer() {
  if (!data_) return;
  if (device_.type == DeviceType::cpu) ::operator delete(data_);
  else cuda_free(device_.index, data_);
}

Buffer::Buffer(Buffer&& o) noexcept : device_(o.device_), size_(o.size_), data_(o.data_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    this->~Buffer();
    new (this) Buffer(std::move(o));
  }
  return *this;
}

TensorView Buffer::view(DType dtype, std::vector<std::int64_t> shape) const {
  TensorView t(data_, dtype, std::move(shape), device_);
  if (t.nbytes() > size_)
    reject("Buffer::view: " + std::string(dtype_name(dtype)) + " " + shape_string(t.shape) + " needs " +
           std::to_string(t.nbytes()) + " bytes, the buffer has " + std::to_string(size_));
  return t;
}

void Buffer::upload(const void* host, std::size_t bytes, std::size_t offset) {
  if (offset + bytes > size_) reject("Buffer::upload: " + std::to_string(offset + bytes) + " bytes exceed the buffer");
  if (bytes == 0) return;
  if (device_.type == DeviceType::cpu) std::memcpy(static_cast<char*>(data_) + offset, host, bytes);
  else cuda_copy(device_.index, static_cast<char*>(data_) + offset, host, bytes);
}

void Buffer::download(void* host, std::size_t bytes, std::size_t offset) const {
  if (offset + bytes > size_) reject("Buffer::download: " + std::to_string(offset + bytes) + " bytes exceed the buffer");
  if (bytes == 0) return;
  if (device_.type == DeviceType::cpu) std::memcpy(host, static_cast<const char*>(data_) + offset, bytes);
  else cuda_copy(device_.index, host, static_cast<const char*>(data_) + offset, bytes);
}

void Buffer::fill(std::uint8_t byte) {
  if (device_.type == DeviceType::cpu) std::memset(data_, byte, size_);
  else cuda_fill(device_.index, data_, byte, size_);
}

}  // namespace dsv4
