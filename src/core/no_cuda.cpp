// Built instead of src/cuda when the build has no CUDA toolkit.
#include "core/internal.hpp"

namespace dsv4 {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(const CompressorSpec&, const HostWeights&, const Options& options) {
  throw Error("device: cuda:" + std::to_string(options.device.index) +
              " requested but this build has no CUDA backend (configure with the CUDA toolkit)");
}

namespace {
[[noreturn]] void no_cuda(int device) {
  throw Error("device: cuda:" + std::to_string(device) + " requested but this build has no CUDA backend");
}
}  // namespace

void* cuda_malloc(int device, std::size_t) { no_cuda(device); }
void cuda_free(int, void*) {}
void cuda_copy(int device, void*, const void*, std::size_t) { no_cuda(device); }
void cuda_fill(int device, void*, std::uint8_t, std::size_t) { no_cuda(device); }

}  // namespace dsv4
