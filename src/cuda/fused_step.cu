// The fused decode step (see fused_step.hpp). A persistent kernel works through items in
// order: projection items, then pool items, then one item per completed entry.
//  - A projection item reads 64 weight rows x one slice of hidden once, multiplies them with
//    the step's x (staged in shared memory) on tensor cores and writes fp32 partial sums. In a
//    step of more than 8 tokens a narrow projection's items each take one group of the tokens
//    (FusedStep::token_groups), so that its few row blocks still fill the grid.
//  - A pool item takes a row block's channels for one group of requests: it waits until every
//    slice (and token group) of the row block is written, adds the group's tokens' 8 partials
//    in slice order (kv_score, on chip), pools those channels of the group's completed
//    windows, counts itself done, then updates those channels of the group's state. A row
//    block holds, for its channels, every column the pooling needs (ratio 4: kv and score of
//    both channel halves; else kv, score). Cutting the batch into groups keeps each item
//    short, so the pooling of a large batch spreads over the whole grid instead of queueing
//    behind one block per row block.
//  - An entry item reads its pooled values as the pool items store them (a slot holds a
//    pending mark until then, see kPooledPending), then runs the epilogue (norm, RoPE,
//    rotation, fp8, store) shared with finish_entries.
// Before the wait for the previous kernel (programmatic dependent launch) a block does what
// reads only weights and the plan: a projection item copies its weights into shared memory
// (paced) and prefetches the rest into L2, a pool item stages its plan values and prefetches
// its state rows into L2 (the fused step only), an entry item loads its inputs.
// A block's first item is its blockIdx.x, its later ones tickets taken in order (or, in some
// ring steps, blockIdx.x + k gridDim.x: FusedStep::fixed_order); a block takes its items in
// increasing order and an item waits only for items before it (pool items for projection
// items, entries for pool items), so the owner of an item waited for is running it or an
// item before it: no deadlock, in whatever order the blocks start, provided that all of them
// are resident at once, which fused_prepare_launch's grid assumes (no more blocks than fit the
// SMs the device reports: a process confined to fewer SMs must not run this kernel).
// The counters return to zero at the end of every launch (the last block out resets them),
// so a captured graph can replay the step.
// As the unfused path's compress step (f.projected) there are no projection items: a pool
// item reads its columns of the rows the cuBLASLt projection wrote instead of summing slices.
#include <algorithm>
#include <map>
#include <mutex>
#ifdef DSV4_FUSED_TIMELINE
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>
#endif

#include "cuda/device_utils.cuh"
#include "cuda/finish_entry.cuh"
#include "cuda/fused_common.cuh"
#include "cuda/fused_pool.cuh"
#include "cuda/fused_projection.cuh"
#include "cuda/fused_step.hpp"
#include "cuda/launch.cuh"
#include "cuda/wgmma.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kBlocksPerSm = 3;  // the kernel's registers allow three blocks per SM
// The compress step's instance (no projection code) is built for more blocks per SM: its pool
// items and entries are chains of dependent memory round trips, and more of them in flight is
// what makes a large batch fast. Four is the most without spills (128 registers); measured on
// the H100 against eight (64 registers, 272 bytes of spills): Flash CSA layer decode B=64 30.1
// against 33.5 us, B=256 43.6 against 50.8, HCA B=256 26.3 against 29.0.
constexpr int kCompressBlocksPerSm = 4;

// The exit count (thread 0): a block done with the counters adds one; the last block to do so
// (its add returned gridDim.x - 1) returns them to zero for the next launch.
__device__ void reset_counters(const FusedStep& f) {
  unsigned* counters = f.counters;
  counters[kCounterTicket] = 0;
  counters[kCounterExits] = 0;
  for (int rb = 0; rb < f.row_blocks; ++rb) counters[kCounterRowBlocks + rb] = 0;
  __threadfence();
}
__device__ void leave_counters(const FusedStep& f) {
  __threadfence();  // this block's release adds are performed before it counts itself out
  if (atomicAdd(&f.counters[kCounterExits], 1u) == gridDim.x - 1) reset_counters(f);
}

// kRing: steps of more than 8 tokens, whose projection items stream through the ring
// (project_item_ring); else one 8-token tile (project_item: fewer registers and a shorter
// instruction stream on the decode path that matters most).
// kStash (steps of at most 8 tokens): pool items gather their state into shared memory right after the
// wait (stash_pool_inputs), for steps whose items all have a block from the start, so that
// the copies overlap the projection. Measured on the H100 (docs/PERF.md): Flash CSA layer
// decode B=1 15.4 -> 14.6 us; in steps with more items than blocks (B=8: pool items taken
// after the projection) it cost 1.5-2.7 us instead.
// kProject: false for the compress step (f.projected): no projection items, pool items read
// the members' kv rows.
// kWgmma (f.wgmma): projection items multiply on wgmma where the build has sm_90a code (else
// the instance runs mma.sync on the same plan). An instance of its own rather than a branch:
// both paths in one kernel spilled and slowed every step by 1-4 us (H100).
template <bool kRing, bool kStash, bool kProject, bool kWgmma>
__global__ void __launch_bounds__(kFusedThreads, kProject ? kBlocksPerSm : kCompressBlocksPerSm)
    fused_step_kernel(const __grid_constant__ FusedStep f) {
  extern __shared__ uint4 smem[];
  __shared__ int s_ticket;
  std::uint16_t *xs = nullptr, *ws = nullptr;
  projection_smem<kWgmma>(f, smem, xs, ws);
  auto* raw = reinterpret_cast<char*>(smem);
  unsigned* counters = f.counters;
  const int projection_items = kProject ? f.row_blocks * kFusedSlices * f.token_groups : 0;
  const int pool_end = projection_items + f.pool_items;
  const int items = pool_end + f.entries;
  const bool one_wave = static_cast<int>(gridDim.x) >= items;  // a block for every item: no tickets
  // The compress step in one wave touches no counter (no projection items release row blocks,
  // no tickets are taken), so there is nothing for the last block out to reset: no block
  // counts itself out, and no block pays the exit's fence and add.
  const bool counters_untouched = !kProject && one_wave;
  bool waited = false, released = false, left = counters_untouched;
  int t = static_cast<int>(blockIdx.x);
#ifdef DSV4_FUSED_TIMELINE
  if (threadIdx.x == 0) {
    s_stamps = BlockStamps{};
    s_stamps.first_item = t < projection_items ? 0 : t < pool_end ? 1 : t < items ? 2 : 3;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s_stamps.sm));
  }
  DSV4_STAMP(f, start);
#endif
  while (t < items) {
    if (t < projection_items) {
      if constexpr (kProject) {
        const int per_row_block = kFusedSlices * f.token_groups, rb_global = t / per_row_block;
        const int slice = t % kFusedSlices, tok0 = t % per_row_block / kFusedSlices * f.group_tokens;
        const int m = (f.members > 1 && rb_global >= f.m[1].first_row_block) ? 1 : 0;
        const FusedMember& mb = f.m[m];
        const int rb = rb_global - mb.first_row_block;
        float* out = f.partials + (static_cast<std::int64_t>(rb_global) * kFusedSlices + slice) * kFusedRowsPerBlock * f.tokens_cap;
        if constexpr (kRing) project_item_ring<kWgmma>(f, mb, rb, slice, tok0, min(f.tokens, tok0 + f.group_tokens), out, xs, waited);
        else project_item<kWgmma>(f, mb, rb, slice, out, xs, ws, waited);
        __syncthreads();  // every thread's partial sums are written; one release publishes them
        if (threadIdx.x == 0) add_release(&counters[kCounterRowBlocks + rb_global], 1u);
      }
    } else {
      auto wait_once = [&] {
        if (!waited) {
          wait_for_previous_kernel();
          waited = true;
          DSV4_STAMP(f, waited);
        }
        if (!released) {  // every weight has an owner now: the next kernel may start loading its own
          allow_next_kernel();
          released = true;
        }
      };
      if (t < pool_end) {
        const int u = t - projection_items;
        const int m = (f.members > 1 && u >= f.m[1].first_pool_item) ? 1 : 0;
        const FusedMember& mb = f.m[m];
        const int local = u - mb.first_pool_item, rb = local / mb.groups;
        // The fused step stages the plan's values and prefetches the state into L2 before the
        // wait, while its projection items run. The compress step waits first: before the
        // wait its blocks share the memory system with the cuBLASLt GEMM's weight stream,
        // which made those loads late (a timeline put the waits' return up to 4 us after the
        // GEMM's end) and slowed the GEMM. Measured on the H100 (docs/PERF.md): Flash CSA
        // layer decode B=64 26.2 -> 22.8 us, B=256 44.1 -> 37.6, Pro B=64 33.2 -> 28.8.
        // Staging alone before the wait (no prefetch) measured even (thirtieth pass): the
        // blocks start only about 0.3 us before the wait returns.
        if constexpr (!kProject) wait_once();
        Group g = stage_plan(f, mb, local % mb.groups, raw);
        DSV4_STAMP(f, staged);
        if constexpr (kProject) prefetch_pool_state(mb, g, rb);
        // The kStash instance (steps of at most 8 tokens whose items all have a block) pools
        // from a stash gathered while the projection runs (stash_pool_inputs).
        char* stash = raw + pool_stash_offset(f, mb.group_requests);
        if (kStash) stage_pool_ape(mb, rb, reinterpret_cast<float*>(stash + 8 * kStashRequestBytes));
        wait_once();
        if (kStash) {
          stash_pool_inputs(mb, g, rb, stash);
          g.stash = stash;
          g.ape4 = reinterpret_cast<const float*>(stash + 8 * kStashRequestBytes);
        }
        pool_item<kStash, kProject>(f, m, mb.first_row_block + rb, rb, g, raw);
      } else {
        const int u = t - pool_end;
        const int m = (f.members > 1 && u >= f.m[1].first_entry) ? 1 : 0;
        const FusedMember& mb = f.m[m];
        const int e = u - mb.first_entry;
        // Plan values and weights only (never written by a kernel): before the wait.
        const EntryInputs in = load_entry_inputs(mb.c, mb.p, mb.cache != nullptr, e);
        wait_once();
        // With a block for every item no ticket follows, and an entry reads no counter, so
        // this block is done with the counters: it counts itself out now, and the add's round
        // trip overlaps the wait for the pooled values and the epilogue (its result is looked
        // at after them). It cannot be the last out while a pool item runs.
        unsigned exit_count = 0;
        if (one_wave && !counters_untouched && threadIdx.x == 0) exit_count = atomicAdd(&counters[kCounterExits], 1u);
        left = one_wave;
        const PooledValues pooled = load_pooled(mb.c, mb.pooled, e, true);
        DSV4_STAMP(f, mark1);
        float* v = smem_vals(raw);
        finish_entry(mb.c, in, pooled, mb.cache, mb.entries, e, v, v + kFinishMaxHeadDim, [&](int phase) {
          if (phase == 2) DSV4_STAMP(f, mark2);
          else DSV4_STAMP(f, mark3);
        });
        if (one_wave && !counters_untouched && threadIdx.x == 0 && exit_count == gridDim.x - 1) reset_counters(f);
      }
    }
    __syncthreads();
    DSV4_STAMP(f, first_end);
    if (one_wave) break;  // no ticket to take
    if (f.fixed_order) {
      t += static_cast<int>(gridDim.x);
      continue;
    }
    if (threadIdx.x == 0) s_ticket = static_cast<int>(gridDim.x + atomicAdd(&counters[kCounterTicket], 1u));
    __syncthreads();
    t = s_ticket;
  }
  if (!waited) wait_for_previous_kernel();
  __syncthreads();
  DSV4_STAMP(f, exit);
#ifdef DSV4_FUSED_TIMELINE
  if (threadIdx.x == 0) static_cast<BlockStamps*>(f.timeline)[blockIdx.x] = s_stamps;
#endif
  if (threadIdx.x == 0 && !left) leave_counters(f);
}

// The kernel instance for a step: the compress step's; else the ring for steps of more than 8
// tokens, one 8-token tile for the others, each on wgmma or mma.sync as f.wgmma says.
using FusedKernel = void (*)(FusedStep);
FusedKernel kernel_for(const FusedStep& f) {
  if (f.projected) return fused_step_kernel<false, false, false, false>;
  if (f.wgmma) {
    if (uses_ring(f)) return fused_step_kernel<true, false, true, true>;
    return f.stash ? fused_step_kernel<false, true, true, true> : fused_step_kernel<false, false, true, true>;
  }
  if (uses_ring(f)) return fused_step_kernel<true, false, true, false>;
  return f.stash ? fused_step_kernel<false, true, true, false> : fused_step_kernel<false, false, true, false>;
}

std::size_t shared_bytes(const FusedStep& f) {
  int group_requests = 0;
  for (int m = 0; m < f.members; ++m) group_requests = std::max(group_requests, f.m[m].group_requests);
  const std::size_t pool_bytes = f.stash ? pool_stash_offset(f, group_requests) + kStashBytes
                                        : pool_vals_bytes(f.vals_rows) + pool_group_bytes(group_requests, f.tokens_cap);
  const std::size_t finish_bytes = (kFinishMaxHeadDim + 32) * 4;
  return std::max({projection_bytes(f, f.staged_kblocks), pool_bytes, finish_bytes});
}

#ifdef DSV4_FUSED_TIMELINE
struct TimelineRegistry {
  std::mutex mutex;
  std::vector<std::pair<BlockStamps*, int>> records;  // one per plan, in creation order
  std::vector<int> staged;                            // each plan's staged_kblocks
};
TimelineRegistry& timeline_registry() {
  static TimelineRegistry* r = new TimelineRegistry;  // outlives the atexit handler
  return *r;
}
void write_timeline() {
  const char* path = std::getenv("DSV4_FUSED_TIMELINE_CSV");
  if (!path) return;
  FILE* out = std::fopen(path, "w");
  if (!out) return;
  std::fprintf(out, "plan,staged_kblocks,block,sm,first_item,start,waited,staged,mark1,mark2,mark3,first_end,exit\n");
  auto& r = timeline_registry();
  for (std::size_t p = 0; p < r.records.size(); ++p) {
    std::vector<BlockStamps> host(static_cast<std::size_t>(r.records[p].second));
    if (cudaMemcpy(host.data(), r.records[p].first, host.size() * sizeof(BlockStamps), cudaMemcpyDeviceToHost) != cudaSuccess) break;
    for (std::size_t b = 0; b < host.size(); ++b)
      std::fprintf(out, "%zu,%d,%zu,%d,%d,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu\n", p, r.staged[p], b,
                   host[b].sm, host[b].first_item, host[b].start, host[b].waited, host[b].staged, host[b].mark1,
                   host[b].mark2, host[b].mark3, host[b].first_end, host[b].exit);
  }
  std::fclose(out);
}
void attach_timeline(FusedStep& f, int blocks) {
  auto& r = timeline_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.records.empty()) std::atexit(write_timeline);
  void* p = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&p, static_cast<std::size_t>(blocks) * sizeof(BlockStamps)));
  DSV4_CUDA_CHECK(cudaMemset(p, 0, static_cast<std::size_t>(blocks) * sizeof(BlockStamps)));
  r.records.emplace_back(static_cast<BlockStamps*>(p), blocks);
  r.staged.push_back(f.staged_kblocks);
  f.timeline = p;
}
#endif

// Whether the code loaded for the current device was built for sm_90a (wgmma); a build for
// sm_90 without its features runs the mma.sync path of every projection item.
__global__ void report_wgmma_code(int* has) {
#if defined(DSV4_HAVE_WGMMA)
  *has = 1;
#else
  *has = 0;
#endif
}

// The dynamic shared memory a block may take with kBlocksPerSm blocks an SM: static shared
// memory is the same in every instance of the kernel.
std::int64_t block_shared_budget(int device) {
  int sm_bytes = 0, reserved = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  cudaFuncAttributes attributes{};
  DSV4_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fused_step_kernel<false, false, true, false>));
  return sm_bytes / kBlocksPerSm - reserved - static_cast<std::int64_t>(attributes.sharedSizeBytes);
}

}  // namespace

// report_wgmma_code's answer per device, asked once (a launch and a copy back): plans and the
// automatic choice read it afterwards without touching the device.
bool wgmma_code_loaded(int device) {
  return once_per_device(device, [] {
    int* flag = nullptr;
    int has = 0;
    DSV4_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
    report_wgmma_code<<<1, 1>>>(flag);
    const cudaError_t launched = cudaGetLastError();
    const cudaError_t copied = cudaMemcpy(&has, flag, sizeof has, cudaMemcpyDeviceToHost);
    cudaFree(flag);
    DSV4_CUDA_CHECK(launched);
    DSV4_CUDA_CHECK(copied);
    return has == 1;
  });
}

bool fused_multiplies_on_wgmma(int device, std::int64_t hidden) {
  // wgmma (sm_90a) where a step of 8 tokens keeps every k block of its items in shared memory
  // (Flash), mma.sync elsewhere: measured on the H100 (docs/PERF.md), wgmma with part of the
  // weights fed from registers (Pro) was slower, since an async multiply holds its registers
  // until it is done and the next loads wait for it.
  int major = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9 || hidden % (kFusedSlices * 32) != 0 || !wgmma_code_loaded(device)) return false;
  FusedStep one;
  one.hidden = static_cast<int>(hidden);
  one.tokens_per_pass = 8;
  one.wgmma = true;
  const int ks = one.hidden / kFusedSlices;
  return static_cast<std::int64_t>(projection_bytes(one, ks / 32)) <= block_shared_budget(device);
}

bool fused_shape_supported(int head_dim, std::int64_t hidden) {
  return hidden % (kFusedSlices * 32) == 0 && head_dim % 32 == 0 && head_dim <= kFinishMaxHeadDim;
}

std::size_t fused_counter_count(const FusedStep& f) { return kCounterRowBlocks + static_cast<std::size_t>(f.row_blocks); }

std::size_t fused_partial_floats(const FusedStep& f) {
  if (f.projected) return 0;
  return static_cast<std::size_t>(f.row_blocks) * kFusedSlices * kFusedRowsPerBlock * static_cast<std::size_t>(f.tokens_cap);
}

int fused_prepare_launch(FusedStep& f, int device) {
  // Pool items: a row block's channels for a group of requests. Pooling is bound by the
  // latency of its instructions, so the batch is cut into as many groups as the grid has
  // blocks for (at most 32 or 16 requests a group, at least one), and no more: a pool item
  // left for a second wave delays every entry of its member by a whole item. In a step of
  // one projection pass (at most 8 tokens) those are the blocks beside the projection
  // items: a pool item taken after one starts only when it ends (Flash CSA layer decode
  // B=8 19.0 -> 15.5 us on the H100). With several passes the projection items end late
  // anyway, and groups sized to the whole grid (its blocks taken again after the
  // projection) measured faster (forced fused step, B=32 27.9 against 32.7 us). Where the
  // entries are fewer than half those blocks, the groups leave them a block each too.
  int sms = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Token groups (steps of more than 8 tokens): a narrow projection (the CSA indexer's 8 row
  // blocks, HCA's 16) has fewer items than the grid has blocks, and each item's multiply grows
  // with its tokens; cutting the tokens into groups, one item each, brings idle blocks in, and
  // the items of one (row block, slice) read its weights side by side, the later readers from
  // L2. Groups of at most kGroupMostTokens (wgmma) or kGroupMostTokensMmaSync tokens, no more
  // items than the grid has blocks. A token's sums do not depend on its group. Measured on the
  // H100 against one group (fused step forced, docs/PERF.md): Flash CSA indexer decode B=128
  // 17.2 -> 14.4 us, B=256 29.7 -> 19.7; Pro indexer B=256 83.7 -> 34.9; Pro HCA B=64 29.9 ->
  // 25.5, B=256 90.2 -> 58.2; more items than that put pool items out of the first wave
  // (Flash indexer B=64, four groups: 11.9 -> 15.7); three groups of 86 tokens padded to 128
  // lost to two of 128 (Flash HCA B=256 30.6 against 28.4).
  // The multiply's instructions depend on the shape, the device and the build only, so a
  // token's bits are the same in every fused step of a compressor.
  f.wgmma = !f.projected && fused_multiplies_on_wgmma(device, f.hidden);
  f.token_groups = 1;
  f.group_tokens = f.tokens_cap;
  if (!f.projected && f.tokens_cap > 8) {
    const int tiles = f.tokens_cap / 8, base_items = f.row_blocks * kFusedSlices;
    const int most = f.wgmma ? kGroupMostTokens : kGroupMostTokensMmaSync;
    const int groups = std::min((f.tokens_cap + most - 1) / most, std::max(1, kBlocksPerSm * sms / base_items));
    // On wgmma a pass multiplies ring_width(n) tokens: a group fills its width.
    int group_tiles = (tiles + groups - 1) / groups;
    if (f.wgmma) group_tiles = ring_width(8 * group_tiles) / 8;
    f.group_tokens = 8 * group_tiles;
    f.token_groups = (tiles + group_tiles - 1) / group_tiles;
  }
  const int projection_items = f.projected ? 0 : f.row_blocks * kFusedSlices * f.token_groups;
  const int beside_projection = f.tokens_cap <= 8 ? projection_items : 0;
  const int target_items = std::max(1, (f.projected ? kCompressBlocksPerSm : kBlocksPerSm) * sms - beside_projection);
  const int pool_target = f.entries < target_items / 2 ? target_items - f.entries : target_items;
  const int most_groups = std::max(1, pool_target / std::max(1, f.row_blocks));
  // Wider fused steps: groups whose (entry, channel) pairs fit one round of the block's
  // threads, where those groups' pool items still fit the grid. Pooling is a chain of
  // dependent loads a pair, and a second round doubled it: Flash CSA layer decode B=64, groups
  // of 11 requests (176 pairs on 128 threads) 26.7 us, of 8 (128 pairs) 24.1; with 512 pool
  // items for 396 blocks (HCA and CSA main at B=128) 4 and 2.7 us slower (H100, docs/PERF.md).
  auto group_size = [&](const FusedMember& mb, bool one_round) {
    const int most = 512 / channels_per_block(mb.c.overlap), n = mb.p.num_requests;
    int size = std::max(1, std::min(most, (n + most_groups - 1) / most_groups));
    if (one_round && mb.p.num_entries > 0) {
      const std::int64_t per_round = std::max(1, kFusedThreads / channels_per_block(mb.c.overlap));
      size = static_cast<int>(std::min<std::int64_t>(size, std::max<std::int64_t>(1, per_round * n / mb.p.num_entries)));
    }
    return size;
  };
  int one_round_items = 0;
  for (int k = 0; k < f.members; ++k) {
    const int size = group_size(f.m[k], true);
    one_round_items += f.m[k].row_blocks * ((f.m[k].p.num_requests + size - 1) / size);
  }
  const bool one_round = !f.projected && f.tokens_cap > 8 && one_round_items <= target_items;
  f.pool_items = 0;
  f.vals_rows = 0;
  for (int k = 0; k < f.members; ++k) {
    FusedMember& mb = f.m[k];
    const int n = mb.p.num_requests;
    mb.group_requests = group_size(mb, one_round);
    mb.groups = std::max(1, (n + mb.group_requests - 1) / mb.group_requests);
    mb.first_pool_item = f.pool_items;
    f.pool_items += mb.row_blocks * mb.groups;
    // A group's rows of x, from its first token rounded down to 4 to its last rounded up.
    const std::int64_t span = static_cast<std::int64_t>(mb.group_requests) * mb.p.max_request_tokens + 6;
    f.vals_rows = std::max(f.vals_rows, static_cast<int>(std::min<std::int64_t>(f.tokens_cap, span)));
  }
  int optin = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};  // static shared memory: the same in every instance
  DSV4_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fused_step_kernel<false, false, true, false>));
  const std::int64_t budget = block_shared_budget(device);
  const int ks = f.hidden / kFusedSlices;
  // Tokens per pass. The compress step projects nothing: the one-tile instance, with nothing
  // staged. Steps of at most 8 tokens: one tile. Wider steps stream their weights with x
  // through the ring, up to kRingMaxTokens a pass on wgmma, kMmaRingMaxTokens on mma.sync,
  // and no more than a token group.
  if (f.projected || f.tokens_cap <= 8) f.tokens_per_pass = 8;
  else f.tokens_per_pass = std::min(f.wgmma ? kRingMaxTokens : kMmaRingMaxTokens, f.group_tokens);
  // Pool items gather their state ahead of the slices where every item has a block from the
  // start (fused_step_kernel's kStash) and a group holds at most kStashMostRequests requests.
  // Judged against three blocks per SM, which the staged-weights budget below keeps; were
  // the grid smaller, the stash stays correct and only its timing advantage is lost.
  const int items = projection_items + f.pool_items + f.entries;
  int largest_group = 0;
  for (int k = 0; k < f.members; ++k) largest_group = std::max(largest_group, f.m[k].group_requests);
  f.stash = !f.projected && f.tokens_cap <= 8 && items <= kBlocksPerSm * sms && largest_group <= kStashMostRequests;
  // As many k blocks of each projection item's weights in shared memory as leave room for
  // three blocks per SM: all of them for Flash steps of up to 8 tokens, 15 of 28 for Pro. The
  // ring stages none across passes (a ring of 128-token passes leaves room for two blocks).
  const FusedKernel kernel = kernel_for(f);
  f.staged_kblocks = f.projected || uses_ring(f) ? 0 : ks / 32;
  while (f.staged_kblocks > 0 && static_cast<std::int64_t>(projection_bytes(f, f.staged_kblocks)) > budget)
    f.staged_kblocks -= f.wgmma ? 2 - f.staged_kblocks % 2 : 1;  // wgmma: 2 k blocks an atom
  // Plans of different shapes may be launched in any order: allow the most any plan may ask.
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       optin - static_cast<int>(attributes.sharedSizeBytes)));
  // The kernel barely uses L1 (weights and partials bypass it): give shared memory the most.
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       cudaSharedmemCarveoutMaxShared));
  int per_sm = 0;
  for (;;) {
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFusedThreads, shared_bytes(f)));
    if (per_sm >= kBlocksPerSm || f.staged_kblocks == 0) break;
    --f.staged_kblocks;
  }
  const int blocks = std::max(1, std::min(items, std::max(1, per_sm) * sms));
  // Ring steps on wgmma whose every projection item is a block's first, at three blocks an SM
  // (passes of at most 64 tokens), take their later items in a fixed order: block b's are
  // b + k gridDim.x. Measured on the H100 against tickets (fused step forced, docs/PERF.md):
  // Flash CSA layer decode B=32 19.2 -> 18.0 us, B=64 22.0 -> 21.0, no window B=32 15.2 ->
  // 14.4, HCA B=64 14.6 -> 14.0. Not the tickets' round trip: tickets asked for as an item
  // starts measured as tickets do. With two blocks an SM (passes of 128 tokens) the fixed order
  // lost (Flash CSA layer B=256 70.3 -> 72.8), and on mma.sync (Pro) it lost in the wide steps
  // (CSA layer B=256 123 -> 130.5, CSA main B=64 37.7 -> 39.9): those keep tickets.
  f.fixed_order = uses_ring(f) && f.wgmma && projection_items <= blocks && per_sm >= kBlocksPerSm;
#ifdef DSV4_FUSED_TIMELINE
  attach_timeline(f, blocks);
#endif
  return blocks;
}

std::vector<std::uint8_t> fused_stage_groups(FusedStep& f, const std::vector<HostPlan>& plans,
                                             std::vector<std::size_t>& member_offsets) {
  std::vector<std::uint8_t> bytes;
  member_offsets.clear();
  for (int k = 0; k < f.members; ++k) {
    FusedMember& mb = f.m[k];
    const HostPlan& hp = plans[static_cast<std::size_t>(k)];
    const std::vector<std::int64_t>& token_offset = *hp.token_offset;
    const std::vector<std::int64_t>& entry_offset = *hp.entry_offset;
    const CompressorConsts& c = mb.c;
    const int n = mb.p.num_requests, size = mb.group_requests;
    auto group_end = [&](int g) { return std::min(n, (g + 1) * size); };
    int cap = 1;
    for (int g = 0; g < mb.groups; ++g)
      cap = std::max(cap, static_cast<int>(entry_offset[static_cast<std::size_t>(group_end(g))] -
                                           entry_offset[static_cast<std::size_t>(g * size)]));
    // Shared memory holds pool_group_bytes(group_requests, tokens_cap) (shared_bytes).
    if (cap > f.tokens_cap) throw Error("internal: a request group completes more entries than the step has tokens");
    mb.group_entries_cap = cap;
    mb.staged_group_bytes = static_cast<int>(pool_group_bytes(size, cap));
    member_offsets.push_back(bytes.size());
    bytes.resize(bytes.size() + static_cast<std::size_t>(mb.groups) * static_cast<std::size_t>(mb.staged_group_bytes));
    for (int g = 0; g < mb.groups; ++g) {
      const int first = g * size, requests = group_end(g) - first;
      const GroupLayout l = group_layout(bytes.data() + member_offsets.back() + static_cast<std::size_t>(g) * mb.staged_group_bytes, size, cap);
      auto at = [](const std::vector<std::int64_t>& v, int i) { return v[static_cast<std::size_t>(i)]; };
      for (int r = 0; r <= requests; ++r) {
        l.token_offset[r] = static_cast<int>(at(token_offset, first + r));
        l.entry_offset[r] = static_cast<int>(at(entry_offset, first + r));
      }
      const int base = l.token_offset[0] & ~3;
      for (int r = 0; r < requests; ++r) {
        const std::int64_t start = at(hp.start, first + r);
        l.start[r] = start;
        l.slot[r] = at(hp.slot, first + r);
        const int tok0 = l.token_offset[r] - base;
        for (int e = l.entry_offset[r]; e < l.entry_offset[r + 1]; ++e) {
          const int el = e - l.entry_offset[0];
          const std::int64_t w = window_of(c, start) + (e - l.entry_offset[r]);
          PoolEntry entry{};
          entry.request = r;
          if (c.overlap) {
            // Window w completes in this step, so its last position 4w + 3 is at or after start:
            // from_vals = start - 4(w - 1) is at most 7.
            const std::int64_t p0 = (w - 1) * 4;
            entry.first = w == 0 ? 4 : 0;
            entry.from_vals = static_cast<int>(std::max<std::int64_t>(start - p0, 0));
            entry.vals_col = tok0 + static_cast<int>(p0 - start);
            entry.ring_row = static_cast<int>(p0 & (hp.ring_rows - 1));
          } else {
            const std::int64_t w0 = w * c.ratio;
            entry.first = static_cast<int>(std::max<std::int64_t>(start - w0, 0));
            entry.vals_col = tok0 + static_cast<int>(w0 - start);
          }
          l.entry_request[el] = r;
          l.entry[el] = entry;
        }
      }
    }
  }
  return bytes;
}

void launch_fused_step(const FusedStep& f, int blocks, bool pdl, cudaStream_t stream) {
  launch_kernel(kernel_for(f), dim3(static_cast<unsigned>(blocks)), dim3(kFusedThreads), shared_bytes(f), stream, pdl, f);
}

}  // namespace dsv4::cuda
