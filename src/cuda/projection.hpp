// The projection GEMM on the GPU through cuBLASLt: bf16 x and weights, fp32 accumulation,
// kv_score written straight in fp32 or bf16 (no cast kernel after it).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dsv4/types.hpp"

namespace dsv4::cuda {

class Projection {
 public:
  // Picks one algorithm for every token count: SPEC section 3 wants a token's row to have
  // the same bits whatever else shares the call, so the choice may not depend on the count,
  // and algorithms that split the K dimension (whose sums depend on the split) are excluded.
  Projection(int device, std::int64_t width, std::int64_t hidden, DType out_dtype);
  ~Projection();
  Projection(const Projection&) = delete;
  Projection& operator=(const Projection&) = delete;

  // out[t, 0:width] (rows ld_out elements apart) = x[t, :] @ w^T, w bf16 [width, hidden].
  void run(const void* x, std::int64_t tokens, const void* w, void* out, std::int64_t ld_out,
           cudaStream_t stream) const;

 private:
  std::int64_t width_, hidden_;
  DType out_dtype_;
  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
};

}  // namespace dsv4::cuda
