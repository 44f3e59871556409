#include "core/validate.hpp"

namespace dsv4 {

void reject(const std::string& message) { throw Error(message); }

void expect_tensor(const TensorView& t, std::string_view name, std::initializer_list<DType> dtypes,
                   const std::vector<std::int64_t>& shape, Device device) {
  bool dtype_ok = false;
  std::string wanted;
  for (DType d : dtypes) {
    dtype_ok = dtype_ok || d == t.dtype;
    if (!wanted.empty()) wanted += " or ";
    wanted += dtype_name(d);
  }
  if (!dtype_ok || t.shape != shape || !(t.device == device)) {
    reject(std::string(name) + ": expected " + wanted + " " + shape_string(shape) + " on " +
           device_name(device) + ", got " + std::string(dtype_name(t.dtype)) + " " +
           shape_string(t.shape) + " on " + device_name(t.device));
  }
  if (t.data == nullptr && t.numel() > 0)
    reject(std::string(name) + ": expected data for " + std::to_string(t.numel()) +
           " elements, got a null pointer");
}

}  // namespace dsv4
