// CUDA backend entry points. The kernels arrive with the CUDA backend issue; until then this
// file proves that the CUDA part of the build compiles for every target architecture.
#include <cuda_runtime.h>

#include "core/internal.hpp"

namespace dsv4 {

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(const CompressorSpec&, const HostWeights&, Precision,
                                           int device_index) {
  if (!cuda_available())
    throw Error("device: cuda:" + std::to_string(device_index) + " requested but no usable GPU is present");
  throw Error("device: the CUDA backend is not implemented in this build yet");
}

}  // namespace dsv4
