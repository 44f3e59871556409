// Helpers shared by the GPU benchmarks (gpu_bench.cu, projection_sweep.cpp).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

namespace dsv4::bench {

// Throws DeviceError naming the call unless `s` is success.
void lt(cublasStatus_t s, const char* what);

// Random (never zero) bf16 values in [-1, 1) from a hash of the index (default stream).
void random_fill(void* p, std::int64_t n, std::uint32_t seed);

// Median microseconds per step: steps k = 0..copies-1 captured in one graph, replayed.
double time_steps(cudaStream_t stream, int copies, int reps, const std::function<void(int)>& step);

}  // namespace dsv4::bench
