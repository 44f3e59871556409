// Device memory primitives behind dsv4::Buffer, and the GPU probe.
#include <cuda_runtime.h>

#include "core/internal.hpp"
#include "cuda/cuda_check.hpp"

namespace dsv4 {

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

void* cuda_malloc(int device, std::size_t bytes) {
  if (!cuda_available()) throw Error("device: cuda:" + std::to_string(device) + " requested but no usable GPU is present");
  cuda::DeviceGuard guard(device);
  void* p = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
  return p;
}

void cuda_free(int device, void* p) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaFree(p);
  cudaSetDevice(previous);
}

// Complete on return, whatever the memory: from pageable host memory cudaMemcpy may return
// before its last DMA lands, and work the caller then queues on a non-blocking stream is not
// ordered after it (a graph replay read part of a state restored so, before the sync).
void cuda_copy(int device, void* dst, const void* src, std::size_t bytes) {
  cuda::DeviceGuard guard(device);
  DSV4_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
}

void cuda_fill(int device, void* p, std::uint8_t byte, std::size_t bytes) {
  cuda::DeviceGuard guard(device);
  DSV4_CUDA_CHECK(cudaMemset(p, byte, bytes));
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace dsv4
