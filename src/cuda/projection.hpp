// The projection GEMM on the GPU through cuBLASLt: bf16 x and weights, fp32 accumulation,
// kv_score written straight in fp32 or bf16 (no cast kernel after it).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "dsv4/types.hpp"

namespace dsv4::cuda {

class Projection {
 public:
  // Picks an algorithm per range of token counts (cuBLASLt's heuristic at the range's top,
  // 8 to 4096 tokens in steps of 2x, then 1.5x and 2x in turn from 64), among algorithms that
  // do not split the K dimension.
  // SPEC section 3 wants a token's row to have the same bits whatever else shares the call,
  // so every algorithm taken must compute the same bits as the one for 256 tokens: checked
  // here on a probe through the weights `w` (bf16 [width, hidden] on `device`); one that
  // differs is replaced by it.
  Projection(int device, const void* w, std::int64_t width, std::int64_t hidden, DType out_dtype);
  ~Projection();
  Projection(const Projection&) = delete;
  Projection& operator=(const Projection&) = delete;

  // out[t, 0:width] (rows ld_out elements apart) = x[t, :] @ w^T, w bf16 [width, hidden].
  void run(const void* x, std::int64_t tokens, const void* w, void* out, std::int64_t ld_out,
           cudaStream_t stream) const;

  // Token-count ranges and how many took an algorithm of their own (the rest took the one
  // for 256 tokens): for benchmarks and tests.
  int ranges() const { return static_cast<int>(choices_.size()); }
  int ranges_with_own_algorithm() const { return own_; }

 private:
  struct Choice {
    std::int64_t up_to_tokens;  // this choice serves counts up to here (the last: every count)
    cublasLtMatmulAlgo_t algo;
  };
  const cublasLtMatmulAlgo_t& algo_for(std::int64_t tokens) const;

  std::int64_t width_, hidden_;
  DType out_dtype_;
  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  std::vector<Choice> choices_;  // ascending up_to_tokens
  int own_ = 0;
};

}  // namespace dsv4::cuda
