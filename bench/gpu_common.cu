// Helpers shared by the GPU benchmarks (see gpu_common.hpp).
#include "bench/gpu_common.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "bench/bench.hpp"
#include "core/internal.hpp"
#include "cuda/cuda_check.hpp"
#include "dsv4/types.hpp"

namespace dsv4::bench {

namespace {

// Random (never zero) bf16 values in [-1, 1) from a hash of the index.
__global__ void fill_random_bf16(std::uint16_t* p, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += std::int64_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (static_cast<float>(h & 0xffffff) / 16777216.0f) * 2.0f - 1.0f;
    p[i] = static_cast<std::uint16_t>(__float_as_uint(v) >> 16);
  }
}

}  // namespace

void lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw DeviceError(std::string("cuBLASLt ") + what + ": status " + std::to_string(int(s)));
}

RunInfo gpu_run_info(const char* tool, const std::string& command) {
  if (!cuda_available()) throw Error(std::string(tool) + ": no usable GPU is present");
  cudaDeviceProp prop{};
  DSV4_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return RunInfo{prop.name, commit_id(), now_utc(), command};
}

void random_fill(void* p, std::int64_t n, std::uint32_t seed) {
  fill_random_bf16<<<1024, 256>>>(static_cast<std::uint16_t*>(p), n, seed);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

double time_steps(cudaStream_t stream, int copies, int reps, const std::function<void(int)>& step) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int k = 0; k < copies; ++k) step(k);
  DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  DSV4_CUDA_CHECK(cudaEventCreate(&a));
  DSV4_CUDA_CHECK(cudaEventCreate(&b));
  // Warm up, then size the replay count to about 2 ms a measurement.
  for (int i = 0; i < 3; ++i) DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  DSV4_CUDA_CHECK(cudaEventRecord(a, stream));
  DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  DSV4_CUDA_CHECK(cudaEventRecord(b, stream));
  DSV4_CUDA_CHECK(cudaEventSynchronize(b));
  float one_ms = 0;
  DSV4_CUDA_CHECK(cudaEventElapsedTime(&one_ms, a, b));
  const int launches = std::clamp(static_cast<int>(2.0f / std::max(one_ms, 1e-3f)), 2, 400);
  std::vector<double> per_step;
  for (int r = 0; r < reps; ++r) {
    DSV4_CUDA_CHECK(cudaEventRecord(a, stream));
    for (int i = 0; i < launches; ++i) DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    DSV4_CUDA_CHECK(cudaEventRecord(b, stream));
    DSV4_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DSV4_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    per_step.push_back(1000.0 * ms / (launches * copies));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  std::sort(per_step.begin(), per_step.end());
  return per_step[per_step.size() / 2];
}

}  // namespace dsv4::bench
