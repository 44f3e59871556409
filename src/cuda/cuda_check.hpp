// Host-side CUDA error checks and the device guard, usable from .cpp and .cu files alike.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "dsv4/types.hpp"

namespace dsv4::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  throw DeviceError(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                    ") in " + what + " at " + file + ":" + std::to_string(line));
}

#define DSV4_CUDA_CHECK(expr)                                                                        \
  do {                                                                                               \
    const cudaError_t dsv4_err_ = (expr);                                                            \
    if (dsv4_err_ != cudaSuccess) ::dsv4::cuda::throw_cuda_error(dsv4_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// Makes `device` current for the scope, restoring the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    DSV4_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) DSV4_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// ask() with `device` current, once per device and call site (each lambda is a type of its
// own, so it has its own table), under a lock; later calls return the first answer without
// touching the device, so plans and graph-captured launches may read it.
template <class Ask>
auto once_per_device(int device, Ask ask) {
  using Answer = decltype(ask());
  static std::mutex lock;
  static std::map<int, Answer> known;
  const std::lock_guard<std::mutex> hold(lock);
  if (const auto it = known.find(device); it != known.end()) return it->second;
  const DeviceGuard guard(device);
  return known[device] = ask();
}

}  // namespace dsv4::cuda
