// The registry behind step_timeline.hpp; built only with DSV4_FUSED_TIMELINE.
#include "cuda/step_timeline.hpp"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dsv4::cuda {

namespace {

struct Registry {
  std::mutex mutex;
  std::vector<std::pair<std::string, const void*>> kernels;
};
Registry& registry() {
  static auto* r = new Registry;  // outlives the atexit handler
  return *r;
}

// Registered after the CUDA runtime started, so it runs before the runtime's own teardown.
void write_step_timeline() {
  const char* path = std::getenv("DSV4_STEP_TIMELINE_CSV");
  if (!path) return;
  FILE* out = std::fopen(path, "w");
  if (!out) return;
  std::fprintf(out, "kernel,block,blocks,sm,start,waited,mark1,mark2,exit");
  for (int a = 0; a < kStepTimelineAtoms; ++a) std::fprintf(out, ",atom%d", a);
  std::fprintf(out, "\n");
  std::vector<StepStamps> host(kStepTimelineBlocks);
  for (const auto& [kernel, stamps] : registry().kernels) {
    if (cudaMemcpy(host.data(), stamps, host.size() * sizeof(StepStamps), cudaMemcpyDeviceToHost) != cudaSuccess) break;
    for (std::size_t b = 0; b < host.size(); ++b) {
      if (host[b].start == 0) continue;
      std::fprintf(out, "%s,%zu,%u,%u,%llu,%llu,%llu,%llu,%llu", kernel.c_str(), b, host[b].blocks, host[b].sm,
                   host[b].start, host[b].waited, host[b].mark1, host[b].mark2, host[b].exit);
      for (unsigned long long t : host[b].atom) std::fprintf(out, ",%llu", t);
      std::fprintf(out, "\n");
    }
  }
  std::fclose(out);
}

}  // namespace

void register_step_timeline(const char* kernel, const void* stamps) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.kernels.empty()) std::atexit(write_step_timeline);
  r.kernels.emplace_back(kernel, stamps);
}

}  // namespace dsv4::cuda
