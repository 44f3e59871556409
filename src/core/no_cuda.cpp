// Built instead of src/cuda when the build has no CUDA toolkit.
#include "core/internal.hpp"

namespace dsv4 {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(const CompressorSpec&, const HostWeights&, Precision,
                                           int device_index) {
  throw Error("device: cuda:" + std::to_string(device_index) +
              " requested but this build has no CUDA backend (configure with the CUDA toolkit)");
}

}  // namespace dsv4
