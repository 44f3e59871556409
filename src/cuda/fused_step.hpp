// The fused decode step: one launch that projects x through the weights of one or two
// compressors (a CSA layer's main and indexer share x), forms kv_score on chip, pools every
// completed window, updates the state, and finishes and stores the entries.
//
// The same kernel also runs as the compress step of the unfused path (FusedStep::projected):
// no projection items, and the pool items read the kv_score rows the cuBLASLt projection
// wrote. One launch then replaces three kernels per member, with the same bits: its pooling,
// state update and epilogue are those of pool_windows, update_state and finish_entries.
//
// The projection's arithmetic is fixed whatever the batch: hidden is cut into kFusedSlices
// equal slices; in each slice the tensor cores take the k blocks in k order from zero (on
// mma.sync two accumulators, the first and the second half of every 32-wide k block, added at
// the end; on wgmma one, k in its natural order), whatever the step's shape (at most 8 tokens,
// or the ring); the slices' partial sums are added in slice order. So a token's kv_score bits
// never depend on the other tokens of the step, and the split invariance of SPEC section 3
// holds among steps that take this path on one device and build.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/kernels.hpp"

namespace dsv4::cuda {

constexpr int kFusedSlices = 8;       // slices of hidden, summed in order
constexpr int kFusedMaxMembers = 2;
constexpr int kFusedMaxTokens = 256;  // larger steps take the unfused path
constexpr int kFusedRowsPerBlock = 64;  // weight rows a work item streams (4 warps x 16)
constexpr int kFusedThreads = 128;

struct FusedMember {
  const std::uint16_t* w = nullptr;  // bf16 [2*coff*head_dim, hidden], kv rows first
  CompressorConsts c;
  DevicePlan p;
  StateView st;
  KvScoreView kv;                    // compress step: this member's projected rows
  float* pooled = nullptr;           // [entries, head_dim]
  std::uint8_t* cache = nullptr;     // may be null
  std::uint16_t* entries = nullptr;  // may be null
  int row_blocks = 0;                // head_dim / channels per block
  int first_row_block = 0;           // among all members' row blocks
  int first_entry = 0;               // among all members' entries
  int group_requests = 0;            // requests a pool item covers (fused_prepare_launch)
  int groups = 0;                    // request groups: pool items = row_blocks * groups
  int first_pool_item = 0;           // among all members' pool items
  // Each request group's plan values and entries' pooling indices, laid out on the host as a
  // pool item holds them in shared memory (fused_stage_groups): [groups][staged_group_bytes].
  const std::uint8_t* staged_groups = nullptr;
  int staged_group_bytes = 0;  // a multiple of 16
  int group_entries_cap = 0;   // the most entries any group of the member completes (>= 1)
};

// A member's plan on the host (PlanData's arrays), from which fused_stage_groups lays out its
// request groups.
struct HostPlan {
  std::vector<std::int64_t> start, slot;                    // [requests]
  const std::vector<std::int64_t>* token_offset = nullptr;  // [requests + 1]
  const std::vector<std::int64_t>* entry_offset = nullptr;  // [requests + 1]
  std::int64_t ring_rows = 0;                               // the state's rows a slot
};

struct FusedStep {
  const std::uint16_t* x = nullptr;  // bf16 [tokens, hidden]
  int tokens = 0;
  int hidden = 0;
  int tokens_per_pass = 0;  // tokens whose x slice is staged in shared memory at once
  int token_groups = 1;     // projection items per row block and slice (steps of more than 8
                            // tokens): each projects group_tokens of the step's tokens
  int group_tokens = 0;     // a multiple of 8
  int staged_kblocks = 0;   // 32-wide k blocks of a projection item's weights held in shared
                            // memory for all passes, copied there before the wait
  int members = 0;
  FusedMember m[kFusedMaxMembers];
  int row_blocks = 0;  // all members
  int entries = 0;     // all members
  int pool_items = 0;  // all members
  float* partials = nullptr;      // [row_blocks][kFusedSlices][kFusedRowsPerBlock][tokens_cap]
  unsigned* counters = nullptr;   // see fused_counter_count; zero between launches
  int tokens_cap = 0;             // tokens rounded up to 8
  int vals_rows = 0;              // rows of x a pool item holds at most (fused_prepare_launch)
  bool stash = false;             // pool items stash their state inputs (fused_prepare_launch)
  bool fixed_order = false;       // a block's later items are blockIdx.x + k * gridDim.x, not
                                  // tickets (fused_prepare_launch)
  bool wgmma = false;             // projection items multiply on wgmma (sm_90a builds; where the
                                  // hidden size lets a step of 8 tokens stage every k block)
  bool projected = false;         // the compress step: kv_score comes from the members' kv rows
  void* timeline = nullptr;       // per-block phase stamps, only in DSV4_FUSED_TIMELINE builds
};

// Whether a compressor of this shape can take the fused path.
bool fused_shape_supported(int head_dim, std::int64_t hidden);
// Whether fused steps at this hidden size multiply on wgmma on `device`: an sm_90 device
// running sm_90a code, where a step of 8 tokens keeps every k block of its items in shared
// memory (Flash's hidden). Either way, steps of more than 8 tokens stream their weights once
// through a ring of shared memory, in passes of up to 128 tokens on wgmma, 64 on mma.sync.
bool fused_multiplies_on_wgmma(int device, std::int64_t hidden);
std::size_t fused_counter_count(const FusedStep& f);
std::size_t fused_partial_floats(const FusedStep& f);
// Fills tokens_per_pass, staged_kblocks and the request groups, and returns the blocks to
// launch (the kernel is persistent: it never launches more blocks than can be resident at
// once). Set `projected` before.
int fused_prepare_launch(FusedStep& f, int device);
// After fused_prepare_launch: every member's request groups as stage_plan copies them into
// shared memory, one member after another (member k's from member_offsets[k], in bytes; each
// a multiple of 16), and each member's staged_group_bytes and group_entries_cap. The caller
// copies the bytes to the device and sets staged_groups.
std::vector<std::uint8_t> fused_stage_groups(FusedStep& f, const std::vector<HostPlan>& plans,
                                             std::vector<std::size_t>& member_offsets);
// Launches with programmatic dependent launch, so that the weight loads of this step may
// start while the previous kernel in the stream finishes.
void launch_fused_step(const FusedStep& f, int blocks, bool pdl, cudaStream_t stream);

}  // namespace dsv4::cuda
