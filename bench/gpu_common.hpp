// Helpers shared by the GPU benchmarks (gpu_bench.cu, projection_sweep.cpp).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>

namespace dsv4::bench {

// Throws DeviceError naming the call unless `s` is success.
void lt(cublasStatus_t s, const char* what);

// Random (never zero) bf16 values in [-1, 1) from a hash of the index (default stream).
void random_fill(void* p, std::int64_t n, std::uint32_t seed);

// The run's header for a GPU benchmark (device 0's name, commit, date); throws naming `tool`
// where no usable GPU is present.
struct RunInfo;
RunInfo gpu_run_info(const char* tool, const std::string& command);

// Median microseconds per step: steps k = 0..copies-1 captured in one graph, replayed.
double time_steps(cudaStream_t stream, int copies, int reps, const std::function<void(int)>& step);

}  // namespace dsv4::bench
