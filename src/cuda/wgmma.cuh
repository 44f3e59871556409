// Hopper's warpgroup matrix multiply (wgmma, sm_90a only): the fused step's projection items
// and bench-multiply use these. A warpgroup (4 warps, 128 threads) multiplies a 64-row A by a
// 16 x N B into a 64 x N fp32 D held in registers (N / 2 a thread, in the layout of mma.sync's
// D fragments: warp w holds rows 16w + g and 16w + g + 8, lane (g, t) columns 8i + 2t and
// 8i + 2t + 1 in registers 4i .. 4i + 3). B is read from shared memory by the tensor cores
// (the async proxy); A from shared memory too, or from registers in the mma.sync A fragment
// order. A token's results do not depend on N: bench-multiply checks it on the device.
//
// DSV4_HAVE_WGMMA is defined only when the device code being compiled is for sm_90a; every use
// keeps an mma.sync path for the other targets (sm_80, and PTX for later devices).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV4_HAVE_WGMMA 1
#endif

namespace dsv4::cuda {

#if defined(DSV4_HAVE_WGMMA)

// A shared-memory matrix descriptor of the no-swizzle layout, whose unit is the core matrix
// (8 rows x 16 bytes, stored as 128 contiguous bytes): `leading` bytes between core matrices
// adjacent in k, `stride` bytes between those adjacent in rows (A) or columns (B).
__device__ __forceinline__ std::uint64_t smem_descriptor(const void* p, unsigned leading, unsigned stride) {
  const auto a = static_cast<std::uint64_t>(static_cast<unsigned>(__cvta_generic_to_shared(p)));
  return ((a >> 4) & 0x3fff) | (static_cast<std::uint64_t>((leading >> 4) & 0x3fff) << 16) |
         (static_cast<std::uint64_t>((stride >> 4) & 0x3fff) << 32);
}

// The 128-byte swizzle layout of a K-major operand, which the fused step uses: each row (a
// weight row or a token) holds 64 bf16 of k in 128 bytes, its 16-byte chunk j (k 8j..8j+7)
// stored at chunk j ^ (row % 8); 8 rows make a 1024-byte atom, atoms of 8 rows follow each other
// (the stride offset), and the tile starts 1024-byte aligned. A row's 128 bytes of global memory
// land in 128 contiguous bytes of shared memory, which is what keeps asynchronous copies into
// it at full speed (the no-swizzle layout scatters them 16 bytes at a time). The k step of 16
// elements at k0 (a multiple of 16 within the 64) starts k0 x 2 bytes into the row.
__host__ __device__ constexpr int sw128_unit(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }
__device__ __forceinline__ std::uint64_t sw128_descriptor(const void* p) {
  const auto a = static_cast<std::uint64_t>(static_cast<unsigned>(__cvta_generic_to_shared(p)));
  return ((a >> 4) & 0x3fff) | (std::uint64_t{1} << 16) | (std::uint64_t{1024 >> 4} << 32) | (std::uint64_t{1} << 62);
}

// Orders this thread's earlier register writes (A fragments, accumulators) before the wgmma
// that follows reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most `pending` committed groups are still running; their registers and shared
// memory may be touched after that.
template <int pending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
}
// Makes this thread's ordinary stores to shared memory visible to the tensor cores' reads of
// it (wgmma's B); a barrier after it covers the other threads' stores.
__device__ __forceinline__ void fence_shared_for_wgmma() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving the accumulators' uses across a wait (their registers are
// written asynchronously). Also used on freshly zeroed accumulators before wgmma_fence: any
// register write to an accumulator between the fence and the wait (the compiler is free to
// put the zeros there) makes ptxas serialize every wgmma of the stage (warning C7515, which
// .ci/run rejects).
template <int R>
__device__ __forceinline__ void wgmma_hold(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D += A * B, A (64 x 16) and B (16 x N) both from shared memory (descriptors). N = 8 (steps
// of at most 8 tokens, and ring passes), 16, 24, 32 (ring passes of up to four 8-token tiles)
// and 64 (wider ring passes, bench-multiply).
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], std::uint64_t a, std::uint64_t b);

// D += A * B, A from registers: a0..a3 as mma.sync.m16n8k16's A fragment of the warp's 16 rows
// (rows g and g + 8, k 2t, 2t + 1 in a0 / a1 and 2t + 8, 2t + 9 in a2 / a3; quad_transpose
// makes it from 16-byte loads); B (16 x N) from shared memory. N = 8 (the fused step's steps of
// at most 8 tokens, for k blocks not staged in shared memory).
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint64_t b);

// The operand lists, spelled out: inline assembly takes no variadic register lists. scale-d is
// a predicate (true: D is added to, never overwritten; accumulators start at zero).
#define DSV4_WGMMA_P "{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"
template <>
__device__ __forceinline__ void wgmma_ss<8>(float (&d)[4], std::uint64_t a, std::uint64_t b) {
  asm volatile(DSV4_WGMMA_P "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, %4, %5, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "l"(a), "l"(b));
}
template <>
__device__ __forceinline__ void wgmma_ss<16>(float (&d)[8], std::uint64_t a, std::uint64_t b) {
  asm volatile(DSV4_WGMMA_P "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, "
               "1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
               : "l"(a), "l"(b));
}
template <>
__device__ __forceinline__ void wgmma_ss<24>(float (&d)[12], std::uint64_t a, std::uint64_t b) {
  asm volatile(DSV4_WGMMA_P "wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 "
               "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11}, %12, %13, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
               : "l"(a), "l"(b));
}
template <>
__device__ __forceinline__ void wgmma_ss<32>(float (&d)[16], std::uint64_t a, std::uint64_t b) {
  asm volatile(
      DSV4_WGMMA_P "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b));
}
template <>
__device__ __forceinline__ void wgmma_ss<64>(float (&d)[32], std::uint64_t a, std::uint64_t b) {
  asm volatile(
      DSV4_WGMMA_P "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"
      "%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b));
}

template <>
__device__ __forceinline__ void wgmma_rs<8>(float (&d)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                            std::uint32_t a3, std::uint64_t b) {
  asm volatile(DSV4_WGMMA_P "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b));
}

// One 64-wide k atom of a 128-byte swizzle layout tile: D[u] += W x X[u] over the atom's first
// `steps` k steps of 16 (4 in a whole atom), k in its natural order, issued as one group; then
// waits for the group before it, so that the atom before this one may be overwritten. `w`:
// the atom's 64 weight rows; `x`: its kSubs sub-tiles of kSubW tokens, each kSubW x 128 bytes
// after the one before. The fused step's ring passes and the sliced projection multiply with
// it, so both take the same k steps in the same order. wgmma_drain waits for the last group.
template <int kSubs, int kSubW>
__device__ __forceinline__ void wgmma_atom(float (&d)[kSubs][kSubW / 2], const std::uint16_t* w,
                                           const std::uint16_t* x, int steps) {
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    if (s >= steps) break;
    const std::uint64_t ws = sw128_descriptor(w + 16 * s);
#pragma unroll
    for (int u = 0; u < kSubs; ++u) wgmma_ss<kSubW>(d[u], ws, sw128_descriptor(x + u * kSubW * 64 + 16 * s));
  }
  wgmma_commit();
  wgmma_wait<1>();
#pragma unroll
  for (int u = 0; u < kSubs; ++u) wgmma_hold(d[u]);
}
template <int kSubs, int kRegs>
__device__ __forceinline__ void wgmma_drain(float (&d)[kSubs][kRegs]) {
  wgmma_wait<0>();
#pragma unroll
  for (int u = 0; u < kSubs; ++u) wgmma_hold(d[u]);
}

// A row's 32-wide k block loaded as 16 bytes a lane (lane t of each quad: 4-byte words
// 4t..4t+3, k 8t..8t+7) into the A fragment order of two k steps (lane t: words t, t + 4,
// t + 8, t + 12; k 2t, 8 + 2t, 16 + 2t, 24 + 2t and the next of each): a 4 x 4 transpose of
// words across the quad, by two exchanges of 2 words (lanes t ^ 2, then t ^ 1). Every lane of
// the warp takes part.
__device__ __forceinline__ void quad_transpose(uint4& v) {
  const int t = threadIdx.x & 3;
  {  // 2 x 2 blocks: lanes 0, 1 trade words 2, 3 for words 0, 1 of lanes 2, 3
    const bool hi = t & 2;
    const unsigned r0 = __shfl_xor_sync(0xffffffffu, hi ? v.x : v.z, 2);
    const unsigned r1 = __shfl_xor_sync(0xffffffffu, hi ? v.y : v.w, 2);
    if (hi) v.x = r0, v.y = r1;
    else v.z = r0, v.w = r1;
  }
  {  // within each block: odd lanes trade words 0, 2 for the even lanes' words 1, 3
    const bool odd = t & 1;
    const unsigned r0 = __shfl_xor_sync(0xffffffffu, odd ? v.x : v.y, 1);
    const unsigned r1 = __shfl_xor_sync(0xffffffffu, odd ? v.z : v.w, 1);
    if (odd) v.x = r0, v.z = r1;
    else v.y = r0, v.w = r1;
  }
}

#endif  // DSV4_HAVE_WGMMA

}  // namespace dsv4::cuda
