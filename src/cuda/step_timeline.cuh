// Diagnostics (CMake option DSV4_FUSED_TIMELINE), device side: the global timer, and the
// phase stamps of the sliced projection and the running step (step_timeline.hpp). Outside
// such builds DSV4_STEP_RECORDER and DSV4_STEP_STAMP compile to nothing, so the kernels'
// machine code is that of a build without them (scripts/same-device-code.sh checks it).
#pragma once

#ifdef DSV4_FUSED_TIMELINE
#include "cuda/step_timeline.hpp"

namespace dsv4::cuda {

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Thread 0 keeps the block's stamps in registers; when the recorder goes out of scope (every
// thread of the block leaves through the same return) a barrier, then the exit stamp and the
// store into the kernel's array.
class StepRecorder {
 public:
  __device__ explicit StepRecorder(StepStamps* all) : all_(all) {
    if (threadIdx.x == 0) s_.start = global_ns();
  }
  __device__ void stamp(unsigned long long StepStamps::*field) {
    if (threadIdx.x == 0) s_.*field = global_ns();
  }
  // Straight to global memory (a store thread 0 does not wait for): a loop's index would put
  // the registers' copy in local memory, inside the loop being timed.
  __device__ void stamp_atom(int a) {
    const unsigned block = blockIdx.x + gridDim.x * blockIdx.y;
    if (threadIdx.x == 0 && block < kStepTimelineBlocks && a < kStepTimelineAtoms) all_[block].atom[a] = global_ns();
  }
  __device__ ~StepRecorder() {
    __syncthreads();
    const unsigned block = blockIdx.x + gridDim.x * blockIdx.y;
    if (threadIdx.x != 0 || block >= kStepTimelineBlocks) return;
    s_.exit = global_ns();
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s_.sm));
    s_.blocks = gridDim.x * gridDim.y;
    StepStamps& out = all_[block];  // every field but atom[], which stamp_atom wrote
    out.start = s_.start;
    out.waited = s_.waited;
    out.mark1 = s_.mark1;
    out.mark2 = s_.mark2;
    out.exit = s_.exit;
    out.sm = s_.sm;
    out.blocks = s_.blocks;
  }

 private:
  StepStamps* all_;
  StepStamps s_{};
};

// Registers a kernel's __device__ array of stamps with the writer (on the device of the
// first call; a diagnostics build measures one device). Call once, from a function-local
// static.
template <class Symbol>
bool register_step_stamps(const char* kernel, const Symbol& stamps) {
  void* p = nullptr;
  if (cudaGetSymbolAddress(&p, stamps) != cudaSuccess) return false;
  register_step_timeline(kernel, p);
  return true;
}

}  // namespace dsv4::cuda

#define DSV4_STEP_RECORDER(stamps) ::dsv4::cuda::StepRecorder dsv4_step_recorder(stamps)
#define DSV4_STEP_STAMP(field) dsv4_step_recorder.stamp(&::dsv4::cuda::StepStamps::field)
#define DSV4_STEP_STAMP_ATOM(a) dsv4_step_recorder.stamp_atom(a)
#else
#define DSV4_STEP_RECORDER(stamps) \
  do {                             \
  } while (0)
#define DSV4_STEP_STAMP(field) \
  do {                         \
  } while (0)
#define DSV4_STEP_STAMP_ATOM(a) \
  do {                          \
  } while (0)
#endif
