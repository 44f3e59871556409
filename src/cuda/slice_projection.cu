// The sliced projection (sm_90a): x @ w^T for a decode-shaped step as fp32 partial sums, one
// per slice of hidden, with the fused step's arithmetic (fused_projection.cuh): each block
// multiplies 64 weight rows by one of kFusedSlices slices of hidden on wgmma, one accumulator
// from zero, k in its natural order, and writes its partial sums. The reader adds the slices
// in slice order (running_step.cu), as the fused step's pool items do, so a token's kv_score
// is the fused step's bits on this device.
//
// Why not cuBLASLt: at HCA's 1024 columns and up to 128 tokens its tiles cover all of hidden
// each, so about 16 blocks stream the 8 MiB of weights and most SMs idle (at least 7.5 of the
// 10.8 us of Flash HCA decode at 64 requests; docs/PERF.md). Cutting hidden into slices gives
// 128 blocks of 64 KiB (Flash) each. A block copies all of its weights into shared memory
// before it waits for the previous kernel (programmatic dependent launch), a few atoms in
// flight at a time, so the weights stream during that kernel's tail without holding it up;
// x, which the previous kernel may write, follows through a ring of slots, one 64-wide k atom
// of every token a slot.
//
// Every block reads all of x: at 256 tokens (2 MiB of Flash x, 32 MiB through L2 for the 16
// column tiles) that lost to cuBLASLt (docs/PERF.md, twenty-third pass), so it takes at most
// kSlicedMaxTokens, in one or two wgmma sub-tiles of 64.
#include "cuda/cuda_check.hpp"
#include "cuda/device_utils.cuh"
#include "cuda/fused_step.hpp"
#include "cuda/kernels.hpp"
#include "cuda/launch.cuh"
#include "cuda/step_timeline.cuh"
#include "cuda/wgmma.cuh"

#include <string>

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 128;        // one warpgroup
constexpr int kRows = 64;            // weight rows (projection columns) a block
constexpr int kSubTokens = 64;       // tokens of one wgmma (m64n64k16)
constexpr int kAtomElems = 64 * 64;  // one 64-row x 64-k atom of the 128-byte swizzle layout
constexpr int kRing = 4;             // x slots
constexpr int kSlicedMaxTokens = 2 * kSubTokens;
// Weight atoms (8 KiB each) a block keeps in flight while it copies its weights before the
// wait. All of them at once (64 KiB Flash, 112 KiB Pro on each SM) queued ahead of the
// previous kernel's loads and stores on the same SMs, so the running step before this launch
// finished late by about the time the whole stream takes (timeline: the wait returned 7.0 us
// after the blocks started, 5.3 with this cap). Measured on the H100 (docs/PERF.md,
// twenty-fifth pass), 3 against all at once: Flash HCA decode B=64 11.5 -> 10.5 us, Pro 14.9
// -> 12.8; 4 in flight, or 2-atom groups, were within about 0.3 us of it, 5 lost up to 1 us.
constexpr int kWeightAtomsInFlight = 3;

#ifdef DSV4_FUSED_TIMELINE
// mark1: every weight and x's first atom are in shared memory; mark2: the products are done
// (before the stores); atom[a]: atom a's x is in shared memory (its multiply is next).
__device__ StepStamps g_slice_projection_stamps[kStepTimelineBlocks];
#endif

// Shared memory of an instance: 1024 bytes to align the tiles, every weight atom of the slice
// (Pro: 14 atoms, 112 KiB), then kRing x-slots of kSubs sub-tiles.
constexpr std::size_t smem_bytes(int atoms, int subs) {
  return 1024 + static_cast<std::size_t>(atoms) * kAtomElems * 2 + static_cast<std::size_t>(kRing) * subs * kAtomElems * 2;
}

// Block (column tile, slice): partials[slice][token][64 * tile + row] for tokens [0, tokens),
// kSubs x 64 tokens at most (the rest of the last sub-tile is zero in shared memory).
template <int kSubs>
__global__ void __launch_bounds__(kThreads, 1) slice_projection_kernel(const std::uint16_t* x, int tokens, int hidden,
                                                                       const std::uint16_t* w, int width,
                                                                       float* partials) {
#if defined(DSV4_HAVE_WGMMA)
  DSV4_STEP_RECORDER(g_slice_projection_stamps);
  extern __shared__ uint4 smem_raw[];
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw));
  auto* ws = reinterpret_cast<std::uint16_t*>(reinterpret_cast<char*>(smem_raw) + (1024 - at % 1024) % 1024);
  const int ks = hidden / kFusedSlices, atoms = ks / 64, slice = blockIdx.y, col0 = blockIdx.x * kRows;
  std::uint16_t* xs = ws + atoms * kAtomElems;
  constexpr int kSlotElems = kSubs * kAtomElems;
  // Thread: 16-byte chunk c of rows (weight rows, tokens) r0, r0 + 16, ...: eight threads a
  // row's 128 bytes of an atom, so a row lands in 128 contiguous bytes of shared memory.
  const int c = threadIdx.x % 8, r0 = threadIdx.x / 8;
  const std::uint64_t policy = l2_policy_evict_first();  // read once a step
  const std::uint16_t* wsrc = w + static_cast<std::int64_t>(col0) * hidden + slice * ks + 8 * c;
  // The weights go in one group a 64-wide atom, at most kWeightAtomsInFlight atoms in flight
  // (see there why).
  for (int a = 0; a < atoms; ++a) {
#pragma unroll
    for (int j = 0; j < kRows / 16; ++j)
      cp_async_16(ws + a * kAtomElems + 8 * sw128_unit(r0 + 16 * j, c),
                  wsrc + static_cast<std::int64_t>(r0 + 16 * j) * hidden + 64 * a, policy);
    cp_async_commit();
    cp_async_wait_pending<kWeightAtomsInFlight - 1>();
  }
  // The padded tokens of the last sub-tile, zero in every slot (their columns of D are never
  // stored; zeros keep them finite and every byte the tensor cores read written).
  for (int idx = threadIdx.x; idx < kRing * (kSubs * kSubTokens - tokens) * 8; idx += kThreads) {
    const int pad = (kSubs * kSubTokens - tokens) * 8, slot = idx / pad, tok = tokens + idx % pad / 8;
    *reinterpret_cast<uint4*>(xs + slot * kSlotElems + 8 * sw128_unit(tok, idx % 8)) = make_uint4(0, 0, 0, 0);
  }

  // x (and the partials' readers) may belong to the previous kernel.
  wait_for_previous_kernel();
  DSV4_STEP_STAMP(waited);
  allow_next_kernel();
  const std::uint16_t* xsrc = x + slice * ks + 8 * c;
  // One group of copies per call, empty past the last atom, so that the counts below hold.
  auto copy_x = [&](int a) {
    if (a < atoms) {
      std::uint16_t* dst = xs + (a % kRing) * kSlotElems;
      for (int tok = r0; tok < tokens; tok += 16)
        cp_async_16(dst + 8 * sw128_unit(tok, c), xsrc + static_cast<std::int64_t>(tok) * hidden + 64 * a);
    }
    cp_async_commit();
  };
  for (int a = 0; a < kRing; ++a) copy_x(a);

  float d[kSubs][kSubTokens / 2];
#pragma unroll
  for (int u = 0; u < kSubs; ++u)
#pragma unroll
    for (int i = 0; i < kSubTokens / 2; ++i) d[u][i] = 0.0f;
#pragma unroll
  for (int u = 0; u < kSubs; ++u) wgmma_hold(d[u]);
  for (int a = 0; a < atoms; ++a) {
    // Groups committed after atom a's x: the kRing - 1 - a first ones and a refills while
    // a < kRing, then the refills of atoms a + 1 .. a + kRing - 3.
    if (a < kRing) cp_async_wait_pending<kRing - 1>();
    else cp_async_wait_pending<kRing - 3>();
    fence_shared_for_wgmma();
    __syncthreads();  // atom a (and every weight) is in shared memory; the multiply of a - 2 is done
    if (a == 0) DSV4_STEP_STAMP(mark1);
    DSV4_STEP_STAMP_ATOM(a);
    // Into the slot of atom a - 2 (the multiply of a - 1 may still read its slot).
    if (a >= 2) copy_x(a - 2 + kRing);
    else cp_async_commit();
    wgmma_atom<kSubs, kSubTokens>(d, ws + a * kAtomElems, xs + (a % kRing) * kSlotElems, 4);
  }
  wgmma_drain(d);
  DSV4_STEP_STAMP(mark2);

  // D's layout (wgmma.cuh): warp w rows 16w + g and + 8, lane (g, t) tokens 8i + 2t and + 1.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* out = partials + static_cast<std::int64_t>(slice) * tokens * width + col0 + 16 * warp + g;
#pragma unroll
  for (int u = 0; u < kSubs; ++u)
#pragma unroll
    for (int i = 0; i < kSubTokens / 8; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int tok = u * kSubTokens + 8 * i + 2 * t + h;
        if (tok >= tokens) continue;
        float* o = out + static_cast<std::int64_t>(tok) * width;
        o[0] = d[u][4 * i + h];
        o[8] = d[u][4 * i + 2 + h];
      }
#else
  // Never launched: slice_projection_supported asks for sm_90a code.
  (void)x, (void)tokens, (void)hidden, (void)w, (void)width, (void)partials;
  wait_for_previous_kernel();
#endif
}

using Kernel = void (*)(const std::uint16_t*, int, int, const std::uint16_t*, int, float*);

// The device's shared memory a block may opt into, asked once per device; the first ask lets
// every instance take it (so that launches, graph-captured ones included, touch no attribute).
int shared_memory_limit(int device) {
  return once_per_device(device, [device] {
    int limit = 0;
    DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    for (Kernel k : {slice_projection_kernel<1>, slice_projection_kernel<2>})
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    return limit;
  });
}

// The instance for `tokens` (sub-tiles of 64) at this hidden size; {nullptr, 0} where it has
// none or shared memory does not hold it.
struct Instance {
  Kernel kernel = nullptr;
  std::size_t smem = 0;
};
Instance instance_for(int device, std::int64_t hidden, std::int64_t tokens) {
  if (tokens < 1 || tokens > kSlicedMaxTokens || hidden % (kFusedSlices * 64) != 0) return {};
  const int atoms = static_cast<int>(hidden / kFusedSlices / 64);
  const Instance in = tokens <= kSubTokens ? Instance{slice_projection_kernel<1>, smem_bytes(atoms, 1)}
                                           : Instance{slice_projection_kernel<2>, smem_bytes(atoms, 2)};
  return in.smem <= static_cast<std::size_t>(shared_memory_limit(device)) ? in : Instance{};
}

}  // namespace

bool slice_projection_supported(int device, std::int64_t hidden, std::int64_t width, std::int64_t tokens) {
  int major = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9 || width % kRows != 0 || !wgmma_code_loaded(device)) return false;
  return instance_for(device, hidden, tokens).kernel != nullptr;
}

void launch_slice_projection(int device, const void* x, std::int64_t tokens, std::int64_t hidden, const void* w,
                             std::int64_t width, float* partials, cudaStream_t stream, bool pdl) {
#ifdef DSV4_FUSED_TIMELINE
  static const bool timeline = register_step_stamps("slice_projection", g_slice_projection_stamps);
  (void)timeline;
#endif
  const Instance in = instance_for(device, hidden, tokens);
  if (in.kernel == nullptr)  // the plan asked slice_projection_supported first
    throw DeviceError("sliced projection: no instance for " + std::to_string(tokens) + " tokens at hidden " +
                      std::to_string(hidden));
  const dim3 grid(static_cast<unsigned>(width / kRows), kFusedSlices), block(kThreads);
  launch_kernel(in.kernel, grid, block, in.smem, stream, pdl, static_cast<const std::uint16_t*>(x),
                static_cast<int>(tokens), static_cast<int>(hidden), static_cast<const std::uint16_t*>(w),
                static_cast<int>(width), partials);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
