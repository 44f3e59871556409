// Kernel launches that may overlap the previous kernel in the stream.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda/cuda_check.hpp"

namespace dsv4::cuda {

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when
// `pdl` (sm_90 and later): the kernel may start while the previous kernel in the stream
// finishes, so it must call wait_for_previous_kernel() before it reads or writes anything
// that kernel (or any kernel before it) touches; what it reads from weights and plans it may
// read before. Every block must wait before it exits, even one with nothing to do: a grid
// whose blocks all skipped the wait could complete before the kernel before it, and the
// kernel after it would then run ahead of that one. Such a kernel calls allow_next_kernel()
// once the next one may start.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, bool pdl,
                   Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace dsv4::cuda
