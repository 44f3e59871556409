// The one place for device-side helpers: error checks, typed loads and stores of the
// storage dtypes, warp and block reductions. Vendor-specific intrinsics stay in this header so
// that the kernels themselves can later build with hipcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include "core/numerics.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/kernels.hpp"

namespace dsv4::cuda {

// Storage dtypes are float (f32) or std::uint16_t (bf16 bits).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(std::uint16_t v) { return num::f32_from_bf16(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ std::uint16_t from_float<std::uint16_t>(float v) { return num::bf16_from_f32(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* 32 floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from an earlier call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread
  return total;
}

// Window arithmetic. A ratio is a power of two (4 or 128, CompressorSpec checks it) and a
// position is never negative, so a position's window is a shift and the window's first
// position a mask. A 64-bit division by a runtime divisor is a subroutine of dependent
// multiplies on the GPU, and the pooling of a one-token step runs on one warp, so it sat on
// the step's critical path. Measured on the H100 (docs/PERF.md): Flash HCA decode B=1 8.9 ->
// 8.65 us, Pro CSA layer B=1 20.45 -> 20.1, the unfused variants 0.5-1.1 us faster.
__host__ __device__ __forceinline__ std::int64_t window_of(const CompressorConsts& c, std::int64_t position) {
  return position >> c.ratio_shift;
}
__host__ __device__ __forceinline__ std::int64_t window_start_of(const CompressorConsts& c, std::int64_t position) {
  return position & ~static_cast<std::int64_t>(c.ratio - 1);
}

// The request an entry belongs to (the plan lists it, so no search sits on the latency path).
__device__ __forceinline__ int request_of(const DevicePlan& p, std::int64_t e) { return static_cast<int>(p.entry_request[e]); }

// Where slot j of window w reads (SPEC section 2): the token's position, the first kv_score
// column of its channel half, and its row of ape. Ratio 128: the window's tokens. Ratio 4:
// slots 0..3 the previous window's tokens on half 0, slots 4..7 the current window's on half 1.
struct WindowSlot {
  std::int64_t position, channel0;
  int ape_row;
};
__device__ __forceinline__ WindowSlot window_slot(const CompressorConsts& c, std::int64_t w, int j) {
  if (!c.overlap) return {w * c.ratio + j, 0, j};
  if (j < c.ratio) return {(w - 1) * c.ratio + j, 0, j};
  return {w * c.ratio + (j - c.ratio), c.head_dim, j - c.ratio};
}

// Online softmax over one channel's tokens: running max, sum and weighted sum. merge() folds
// in another partial; both give the same result as one pass up to rounding.
// The multiply-adds are spelled out (fmaf, __fmul_rn): left to contraction, `a * x + b * y`
// may become fma(a, x, b * y) in one kernel and fma(b, y, a * x) in another, and kernels that
// must agree bit for bit (the fused kernel's pool items and pool_windows, update_state) would
// not.
struct Softmax {
  float m = -INFINITY, s = 0.0f, a = 0.0f;
  __device__ void add(float logit, float value) {
    const float m2 = fmaxf(m, logit);
    const float old = expf(m - m2), p = expf(logit - m2);
    s = fmaf(s, old, p);
    a = fmaf(p, value, __fmul_rn(a, old));
    m = m2;
  }
  __device__ void merge(const Softmax& o) {
    if (o.m == -INFINITY) return;
    const float m2 = fmaxf(m, o.m);
    const float x = expf(m - m2), y = expf(o.m - m2);
    s = fmaf(o.s, y, __fmul_rn(s, x));
    a = fmaf(o.a, y, __fmul_rn(a, x));
    m = m2;
  }
};

// A ratio-4 window's 8 slots in closed form: the maximum logit, the exponentials side by side,
// then the sums in slot order. Slots 0..3 (the previous window) count only with has_previous
// (window 0 has none); their values are then ignored, whatever they hold. Merging slot after
// slot (Softmax::merge) chained 16 exponentials one after another, and the pooling of a decode
// step runs on one warp, so that chain sat on the step's critical path. Selects, not branches:
// a branch per slot serialized the slots' instructions. Every kernel that pools a ratio-4
// window calls this, so all of them give the same bits.
__device__ __forceinline__ float pool_ratio4_slots(const float (&logit)[8], const float (&value)[8], bool has_previous) {
  const float current = fmaxf(fmaxf(logit[4], logit[5]), fmaxf(logit[6], logit[7]));
  const float previous = fmaxf(fmaxf(logit[0], logit[1]), fmaxf(logit[2], logit[3]));
  const float m = has_previous ? fmaxf(previous, current) : current;
  float p[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) p[j] = expf(logit[j] - m);
  float s = 0.0f, a = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s = __fadd_rn(s, p[j]);
    a = fmaf(p[j], value[j], a);
  }
  if (!has_previous) s = 0.0f, a = 0.0f;
#pragma unroll
  for (int j = 4; j < 8; ++j) {
    s = __fadd_rn(s, p[j]);
    a = fmaf(p[j], value[j], a);
  }
  return a / s;
}

// D += A * B on tensor cores: A 16x16 bf16 (4 registers of 2), B 16x8 bf16 (2 registers), D
// 16x8 fp32, the fragment layouts of PTX mma.m16n8k16 (row.col). Each D element depends only on
// its row of A, its column of B and its own accumulator, never on the other rows or columns.
__device__ __forceinline__ void mma_bf16_16x8x16(float (&d)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                                 std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Where chunk c (16 bytes, k 8c..8c+7) of row r of a fused-step projection item lies in its
// staged weights (fused_projection.cuh; bench-multiply times the same layout): rows of
// 4 * staged chunks, so that a mma fragment's 8 lanes of a shared-load phase (rows g and g+1,
// chunks t = 0..3 of one k block) hit distinct banks. With an odd number of staged k blocks a
// row is already 64 bytes past a multiple of 128; with an even one, odd rows swap the two
// halves of each 128 bytes.
__device__ __forceinline__ int staged_chunk(int staged, int r, int c) {
  return r * 4 * staged + (c ^ ((staged % 2 == 0 && (r & 1)) ? 4 : 0));
}

// An L2 cache policy (sm_80) for the loads below that take one: evict_first, for data read
// once per launch (weights streamed through L2), so that it does not push out what a launch
// reads again soon (its own code, state, hand-offs between blocks).
__device__ __forceinline__ std::uint64_t l2_policy_evict_first() {
  std::uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}

// 16 bytes of data that no kernel writes while this one runs (weights), read once.
__device__ __forceinline__ uint4 load_once(const void* p, std::uint64_t l2_policy) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(l2_policy));
  return v;
}

// Asynchronous 16-byte copy global -> shared (sm_80 and later), past L1; many can be in
// flight per thread. cp_async_wait_all() waits for this thread's copies.
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
  const auto dst = static_cast<std::uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, std::uint64_t l2_policy) {
  const auto dst = static_cast<std::uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "l"(l2_policy)
               : "memory");
}
// 4 bytes (4-byte aligned), through L1: for gathering scattered values into shared memory.
__device__ __forceinline__ void cp_async_4(void* shared_dst, const void* global_src) {
  const auto dst = static_cast<std::uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait_pending() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Asks for `bytes` (a multiple of 16, 16-byte aligned) at p to be brought into L2 without
// waiting for them (a bulk prefetch, sm_90); a no-op before sm_90.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes, std::uint64_t l2_policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;\n" ::"l"(p), "r"(bytes), "l"(l2_policy)
               : "memory");
#endif
}

// Programmatic dependent launch (sm_90): wait until the previous kernel in the stream has
// finished and its writes are visible; let the next kernel start launching. No-ops before sm_90.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Publishes what this block wrote before (a __syncthreads orders the other threads' writes
// before the calling thread's): an add with release semantics at GPU scope, which a reader's
// load_acquire of the counter pairs with.
__device__ __forceinline__ void add_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// A counter other blocks of this kernel increment: read with acquire semantics at GPU scope.
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Pooled values pass from the pool items to the entries without a counter: a slot of the
// pooled buffer holds kPooledPending (a NaN no arithmetic here produces: pooled_for_store
// writes NaN as 0x7fffffff) until its value is stored, and the entry that reads it stores the
// mark back. The buffer starts as the mark (CudaBackend::prepare).
constexpr unsigned kPooledPending = 0xffffffffu;
__device__ __forceinline__ float pooled_for_store(float v) { return isnan(v) ? __uint_as_float(0x7fffffffu) : v; }

// A value another block of this kernel may be storing: read at GPU scope each time it is called.
__device__ __forceinline__ float load_relaxed(const float* p) {
  float v;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
  return v;
}

inline unsigned ceil_div(std::int64_t a, std::int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Calls f(ScoreT{}, StateT{}) with the element types that store a kv_score dtype and a state
// dtype (f32: float, bf16: std::uint16_t), so that a launcher picks its kernel instance in one
// place: launch_with_types(kv.dtype, st.dtype, [&](auto s, auto t) { launch<decltype(s),
// decltype(t)>(...); }).
template <class F>
void launch_with_types(DType score, DType state, F&& f) {
  const bool score_f32 = score == DType::f32, state_f32 = state == DType::f32;
  if (score_f32 && state_f32) f(float{}, float{});
  else if (score_f32) f(float{}, std::uint16_t{});
  else if (state_f32) f(std::uint16_t{}, float{});
  else f(std::uint16_t{}, std::uint16_t{});
}

}  // namespace dsv4::cuda
