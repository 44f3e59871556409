// The CUDA backend. Every run is stream-ordered on the caller's stream, with no host
// synchronisation or allocation once the plan exists (so a run can be graph-captured).
// A decode-shaped plan (at most 256 tokens) runs as one fused launch (fused_step.cu) where
// that wins (fused_wins). Any other plan runs four steps:
//   1. projection GEMM (cuBLASLt) into the plan's kv_score workspace, fp32 or bf16 (or, for
//      the running step, the sliced projection's fp32 partial sums: sliced_projection_wins);
//   2. pool_windows: the gated softmax of every completed window into fp32 pooled values;
//   3. update_state: the rows later calls need go into each request's ring (after 2 read them);
//   4. finish_entries: RMSNorm + RoPE + rotation + fp8 packing + store, one block per entry.
// In a decode-shaped plan steps 2-4 run as one launch, the fused kernel's compress step
// (compress_step_supported), for every member of a group together.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>
#include <vector>

#include "core/entry_format.hpp"
#include "core/internal.hpp"
#include "core/rope.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/fused_step.hpp"
#include "cuda/kernels.hpp"
#include "cuda/projection.hpp"

namespace dsv4 {

namespace {

// Device memory freed when the last owner lets go.
std::shared_ptr<void> device_alloc(int device, std::size_t bytes) {
  void* p = cuda_malloc(device, bytes);
  return std::shared_ptr<void>(p, [device](void* q) { cuda_free(device, q); });
}

template <class T>
std::shared_ptr<void> device_copy(int device, const std::vector<T>& host) {
  auto p = device_alloc(device, host.size() * sizeof(T));
  cuda_copy(device, p.get(), host.data(), host.size() * sizeof(T));
  return p;
}

// The automatic choice takes the fused step up to this many tokens (fused_wins)...
constexpr std::int64_t kFusedAutoMaxTokens = 8;
// ...and beyond, where the fused step multiplies on wgmma, for steps of at most this many
// projection columns, up to this many columns x tokens.
constexpr std::int64_t kFusedNarrowMaxColumns = 1024;
constexpr std::int64_t kFusedNarrowMaxColumnTokens = 32768;
// ...and, where the fused step multiplies on wgmma, a group of compressors (a CSA layer's
// main and indexer in one launch) of at most this many columns up to this many tokens.
constexpr std::int64_t kFusedGroupMaxColumns = 2560;
constexpr std::int64_t kFusedGroupMaxTokens = 32;

// The automatic choice gives a ratio-128 compressor alone the compress step from this many
// tokens (compress_step_alone).
constexpr std::int64_t kCompressAloneMinTokens = 64;
// ...unless every request appends at most this many tokens: then running_step (one block per
// request, so a request's tokens are folded one after another) takes it (running_step_applies).
constexpr std::int64_t kRunningStepMaxRequestTokens = 16;
// The automatic choice projects a running step's tokens with the sliced projection while their
// x is at most this many bytes: each of its column tiles reads all of x (sliced_projection_wins).
constexpr std::int64_t kSlicedMaxXBytes = 1 << 20;

// A running step that completes entries lets the next kernel launch before its wait where its
// compressor's weights are more than this many bytes (next_launch_early).
constexpr std::int64_t kEarlyLaunchMinWeightBytes = std::int64_t{8} << 20;

// Programmatic dependent launches (launch.cuh) need sm_90 or later.
bool dependent_launch_supported(int device) {
  int major = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

// A plan's fused step or compress step (`projected`): everything but the run's tensors, and
// the workspace (partial sums, then the kernel's counters, zeroed once and reset by every
// launch, then the request groups' staged plans).
struct FusedPlan {
  std::shared_ptr<void> workspace;
  cuda::FusedStep step;
  int blocks = 0;
  bool pdl = false;  // programmatic dependent launch (sm_90 and later)
};

// `plans`: each member's plan on the host, from which its request groups are staged
// (cuda::fused_stage_groups).
std::shared_ptr<FusedPlan> make_fused_plan(int device, const std::vector<cuda::FusedMember>& members,
                                           const std::vector<cuda::HostPlan>& plans, std::int64_t tokens,
                                           std::int64_t hidden, bool projected) {
  auto fp = std::make_shared<FusedPlan>();
  cuda::FusedStep& f = fp->step;
  f.projected = projected;
  f.tokens = static_cast<int>(tokens);
  f.tokens_cap = static_cast<int>((tokens + 7) / 8 * 8);
  f.hidden = static_cast<int>(hidden);
  f.members = static_cast<int>(members.size());
  for (std::size_t k = 0; k < members.size(); ++k) {
    f.m[k] = members[k];
    f.m[k].first_row_block = f.row_blocks;
    f.m[k].first_entry = f.entries;
    f.row_blocks += members[k].row_blocks;
    f.entries += members[k].p.num_entries;
  }
  fp->blocks = cuda::fused_prepare_launch(f, device);
  // One allocation and one copy: the partial sums (written before they are read), then the
  // counters (zero) and the request groups' staged plans, which the copy writes together.
  std::vector<std::size_t> offsets;
  const std::vector<std::uint8_t> staged = cuda::fused_stage_groups(f, plans, offsets);
  const std::size_t partial_bytes = cuda::fused_partial_floats(f) * 4;
  const std::size_t counter_bytes = (cuda::fused_counter_count(f) * 4 + 15) / 16 * 16;  // staged: 16-byte loads
  std::vector<std::uint8_t> host(counter_bytes + staged.size(), 0);
  std::copy(staged.begin(), staged.end(), host.begin() + static_cast<std::ptrdiff_t>(counter_bytes));
  void* p = cuda_malloc(device, partial_bytes + host.size());
  fp->workspace = std::shared_ptr<void>(p, [device](void* q) { cuda_free(device, q); });
  char* after_partials = static_cast<char*>(p) + partial_bytes;
  cuda_copy(device, after_partials, host.data(), host.size());
  f.partials = static_cast<float*>(p);
  f.counters = reinterpret_cast<unsigned*>(after_partials);
  for (int k = 0; k < f.members; ++k)
    f.m[k].staged_groups = reinterpret_cast<const std::uint8_t*>(after_partials + counter_bytes) + offsets[static_cast<std::size_t>(k)];
  fp->pdl = dependent_launch_supported(device);
  return fp;
}

// The run's tensors into a copy of the fused step, then the launch. The fused step reads x;
// the compress step reads each member's kv rows.
void run_fused_plan(int device, const FusedPlan& fp, const void* x, const std::vector<cuda::KvScoreView>& kv,
                    const std::vector<cuda::StateView>& states, const std::vector<RunOutputs>& outputs,
                    cudaStream_t stream) {
  cuda::DeviceGuard guard(device);
  cuda::FusedStep f = fp.step;
  f.x = static_cast<const std::uint16_t*>(x);
  for (int k = 0; k < f.members; ++k) {
    if (f.projected) {
      // The compress step loads 16 bytes of a row at once (load_projected_rows): the rows are
      // the library's projection output (cudaMalloc'd, pitch and member offsets multiples of
      // 64 columns, as fused_shape_supported's head_dim % 32 makes them).
      const cuda::KvScoreView& rows = kv[static_cast<std::size_t>(k)];
      const auto elem = static_cast<std::int64_t>(rows.dtype == DType::f32 ? 4 : 2);
      if (reinterpret_cast<std::uintptr_t>(rows.data) % 16 != 0 || rows.ld * elem % 16 != 0)
        throw Error("internal: the compress step's kv rows are not 16-byte aligned");
      f.m[k].kv = rows;
    }
    f.m[k].st = states[static_cast<std::size_t>(k)];
    const RunOutputs& o = outputs[static_cast<std::size_t>(k)];
    f.m[k].cache = o.cache ? o.cache->as<std::uint8_t>() : nullptr;
    f.m[k].entries = o.entries ? o.entries->as<std::uint16_t>() : nullptr;
  }
  cuda::launch_fused_step(f, fp.blocks, fp.pdl, stream);
}

// What a plan keeps on the device: its arrays, the kv_score workspace and maybe the compress
// step (unfused path) or the fused step.
struct CudaPlan {
  std::shared_ptr<void> arrays;
  std::shared_ptr<void> kv_score;
  std::shared_ptr<void> pooled;  // [entries, head_dim] fp32
  cuda::DevicePlan view;
  std::shared_ptr<FusedPlan> fused;
  std::shared_ptr<FusedPlan> compress_step;
  bool running_step = false;  // the stages after the projection as launch_running_step
  bool sliced_projection = false;  // the projection as launch_slice_projection (kv_score holds
                                   // its partial sums)
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CompressorSpec& spec, const HostWeights& weights, const Options& options)
      : spec_(spec), options_(options), precision_(options.precision), device_(options.device.index),
        wkv_gate_(device_copy(device_, weights.wkv_gate)),
        projection_(device_, wkv_gate_.get(), spec.projection_width(), spec.hidden, precision_.kv_score) {
    cuda::DeviceGuard guard(device_);
    ape_ = device_copy(device_, weights.ape);
    norm_ = device_copy(device_, weights.norm);
    inv_freq_ = device_copy(device_, yarn_inv_freq(spec.rope));
    consts_.ratio = static_cast<int>(spec.ratio);
    consts_.ratio_shift = std::countr_zero(static_cast<unsigned>(spec.ratio));  // 4 or 128 (CompressorSpec)
    consts_.head_dim = static_cast<int>(spec.head_dim);
    consts_.rope_dim = static_cast<int>(spec.rope.dim);
    consts_.overlap = spec.overlap();
    consts_.rotate = spec.rotate;
    consts_.fp8 = spec.entry_format == EntryFormat::fp8_ds;
    consts_.round_bf16 = precision_.kv_score == DType::bf16 || precision_.state == DType::bf16;
    consts_.eps = spec.rms_eps;
    consts_.entry_bytes = spec.entry_bytes();
    consts_.ape = static_cast<const float*>(ape_.get());
    consts_.norm = static_cast<const float*>(norm_.get());
    consts_.inv_freq = static_cast<const float*>(inv_freq_.get());
    pdl_ = dependent_launch_supported(device_);
    wide_steps_on_wgmma_ = cuda::fused_multiplies_on_wgmma(device_, spec.hidden);
  }

  std::shared_ptr<void> allocate_zeroed(std::size_t bytes) const override {
    auto p = device_alloc(device_, bytes);
    cuda_fill(device_, p.get(), 0, bytes);
    return p;
  }

  void prepare(detail::PlanData& plan, bool own_rows) const override {
    cuda::DeviceGuard guard(device_);
    const std::size_t b = plan.requests.size(), e = static_cast<std::size_t>(plan.num_entries());
    // One array: slot, start, num_tokens [b]; token_offset, entry_offset [b + 1]; locations,
    // entry_request [e].
    std::vector<std::int64_t> host(3 * b + 2 * (b + 1) + 2 * e);
    for (std::size_t i = 0; i < b; ++i) {
      host[i] = plan.requests[i].slot;
      host[b + i] = plan.requests[i].start;
      host[2 * b + i] = plan.requests[i].num_tokens;
    }
    std::copy(plan.token_offsets.begin(), plan.token_offsets.end(), host.begin() + static_cast<std::ptrdiff_t>(3 * b));
    std::copy(plan.entry_offsets.begin(), plan.entry_offsets.end(), host.begin() + static_cast<std::ptrdiff_t>(4 * b + 1));
    std::copy(plan.cache_locations.begin(), plan.cache_locations.end(), host.begin() + static_cast<std::ptrdiff_t>(5 * b + 2));
    std::copy(plan.entry_request.begin(), plan.entry_request.end(), host.begin() + static_cast<std::ptrdiff_t>(5 * b + 2 + e));
    auto cp = std::make_shared<CudaPlan>();
    cp->arrays = device_copy(device_, host);
    const auto* base = static_cast<const std::int64_t*>(cp->arrays.get());
    cp->view.slot = base;
    cp->view.start = base + b;
    cp->view.num_tokens = base + 2 * b;
    cp->view.token_offset = base + 3 * b;
    cp->view.entry_offset = base + 4 * b + 1;
    cp->view.cache_location = base + 5 * b + 2;
    cp->view.entry_request = base + 5 * b + 2 + e;
    cp->view.num_requests = static_cast<int>(b);
    cp->view.num_entries = static_cast<int>(e);
    for (const Request& q : plan.requests)
      cp->view.max_request_tokens = std::max(cp->view.max_request_tokens, static_cast<int>(q.num_tokens));
    // Every slot starts as the pending mark (cuda::kPooledPending: all bits set), which each
    // reader of a pooled value stores back.
    const auto pooled_bytes = static_cast<std::size_t>(std::max<std::int64_t>(plan.num_entries(), 1) * spec_.head_dim) * 4;
    cp->pooled = device_alloc(device_, pooled_bytes);
    cuda_fill(device_, cp->pooled.get(), 0xff, pooled_bytes);
    if (own_rows && fused_wins(plan, spec_.projection_width(), false)) {
      cp->fused = make_fused_plan(device_, {fused_member(*cp, wkv_gate_.get())}, {host_plan(plan)}, plan.num_tokens(), spec_.hidden, false);
      plan.fused = true;
    } else {
      cp->running_step = running_step_applies(plan);
      plan.compress_step = cp->running_step;
    }
    if (own_rows && !plan.fused) {
      cp->sliced_projection = cp->running_step && sliced_projection_wins(plan);
      plan.sliced_projection = cp->sliced_projection;
      const std::size_t row_bytes = cp->sliced_projection ? cuda::kFusedSlices * 4 : dtype_size(precision_.kv_score);
      cp->kv_score = device_alloc(device_, static_cast<std::size_t>(plan.num_tokens() * spec_.projection_width()) * row_bytes);
      if (!cp->running_step && compress_step_alone(plan)) {
        cp->compress_step = make_fused_plan(device_, {fused_member(*cp, nullptr)}, {host_plan(plan)}, plan.num_tokens(), spec_.hidden, true);
        plan.compress_step = true;
      }
    }
    plan.backend_data = cp;
  }

  void run(const detail::PlanData& plan, const TensorView& x, detail::StateData& state, const RunOutputs& outputs,
           void* stream) const override {
    cuda::DeviceGuard guard(device_);
    const auto& cp = *static_cast<const CudaPlan*>(plan.backend_data.get());
    if (cp.fused) {
      run_fused_plan(device_, *cp.fused, x.data, {}, {state_view(state)}, {outputs}, static_cast<cudaStream_t>(stream));
      return;
    }
    const std::int64_t width = spec_.projection_width();
    if (cp.sliced_projection) {
      auto* partials = static_cast<float*>(cp.kv_score.get());
      cuda::launch_slice_projection(device_, x.data, plan.num_tokens(), spec_.hidden, wkv_gate_.get(), width, partials,
                                    static_cast<cudaStream_t>(stream), pdl_);
      compress_view(plan, {partials, DType::f32, width, cuda::kFusedSlices, plan.num_tokens() * width}, state, outputs,
                    stream);
      return;
    }
    projection_.run(x.data, plan.num_tokens(), wkv_gate_.get(), cp.kv_score.get(), width,
                    static_cast<cudaStream_t>(stream));
    if (cp.compress_step) {
      run_fused_plan(device_, *cp.compress_step, nullptr, {{cp.kv_score.get(), precision_.kv_score, width}},
                     {state_view(state)}, {outputs}, static_cast<cudaStream_t>(stream));
      return;
    }
    compress_view(plan, {cp.kv_score.get(), precision_.kv_score, width}, state, outputs, stream);
  }

  void compress(const detail::PlanData& plan, const KvScoreRows& rows, detail::StateData& state,
                const RunOutputs& outputs, void* stream) const override {
    cuda::DeviceGuard guard(device_);
    compress_view(plan, {rows.data, rows.dtype, rows.ld}, state, outputs, stream);
  }

  // The stages after the projection, over its rows (or the sliced projection's partial sums).
  void compress_view(const detail::PlanData& plan, const cuda::KvScoreView& kv, detail::StateData& state,
                     const RunOutputs& outputs, void* stream_ptr) const {
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    const auto& cp = *static_cast<const CudaPlan*>(plan.backend_data.get());
    const cuda::StateView st = state_view(state);
    auto* cache = outputs.cache ? outputs.cache->as<std::uint8_t>() : nullptr;
    auto* entries = outputs.entries ? outputs.entries->as<std::uint16_t>() : nullptr;
    if (cp.running_step) {
      cuda::launch_running_step(consts_, cp.view, kv, st, cache, entries, stream, pdl_, next_launch_early(plan));
      return;
    }
    auto* pooled = static_cast<float*>(cp.pooled.get());
    cuda::launch_pool_windows(consts_, cp.view, kv, st, pooled, stream, pdl_);
    cuda::launch_update_state(consts_, cp.view, kv, st, stream, pdl_);
    cuda::launch_finish_entries(consts_, cp.view, pooled, cache, entries, stream, pdl_);
  }

  std::unique_ptr<GroupProjection> make_group_projection(const std::vector<const Backend*>& members) const override;

  const CompressorSpec& spec() const { return spec_; }
  const void* projection_weights() const override { return wkv_gate_.get(); }

  // Whether this plan runs faster as one fused launch (fused_step.hpp), in a fused step of
  // `step_columns` projection columns (this compressor's, or its group's); `in_group`: the
  // step is a group's of several compressors (a CSA layer's main and indexer), not one's alone.
  bool fused_wins(const detail::PlanData& plan, std::int64_t step_columns, bool in_group) const {
    if (options_.fused_decode == FusedDecode::off) return false;
    if (plan.num_tokens() < 1 || plan.num_tokens() > cuda::kFusedMaxTokens) return false;
    // Measured on the H100 against the library's unfused path with the same state (docs/PERF.md,
    // 2026-11-24): up to 8 tokens the fused step wins at ratio 4 (Flash CSA main B=1 13.9
    // against 17.3 us, CSA layer 16.8 against 31) and at ratio 128 with running state, whether
    // a window completes or not (Flash HCA B=1 11.4 against 16.2, no window 9.9 against 10.7;
    // Pro 14.9 against 20.5, no window 14.6 against 15.1); a compressor alone lost from 32
    // tokens on before the ring (below). Steps that complete no window left the fused step for
    // the unfused path (GEMM, then update_state) where the projection is wide (CSA main, a CSA
    // layer's group) until the fused step's projection items let the next kernel launch right
    // after their wait: since then the fused step wins those too (docs/perf/h100-2026-11-24t.json:
    // decode-partial CSA layer Flash B=1 11.4 against 14.1 us, B=8 11.5 against 15.1; Pro B=1
    // 19.0 against 19.9, B=8 19.6 against 20.9; Pro CSA main B=1 15.6 against 17.0). Ratio 128
    // with stored rows stays unfused (below).
    // Since the ring (steps of more than 8 tokens stream their weights once), a narrow
    // projection wins fused beyond 8 tokens where the fused step multiplies on wgmma (Flash on
    // sm_90a; Pro's ring steps run on mma.sync and mostly lose: HCA at 32 tokens 21.7 against
    // 20.2 us, docs/perf/h100-2026-11-25d.json): the cuBLASLt projection of 512 or
    // 1024 columns keeps few blocks busy (docs/perf/h100-2026-11-25b.json, fused against the
    // library's choice: Flash CSA indexer decode B=32 11.0 against 15.3 us, B=64
    // 11.9 against 15.6, no window B=32 9.5 against 10.5, B=64 10.4 against 10.5, but B=128
    // 17.2 against 19.3 with windows and 14.8 against 11.0 without; Flash HCA running decode
    // B=32 13.8 against 16.2, no window 10.7 against 10.9, but B=64 14.5 against 15.7 with
    // windows and 13.5 against 11.1 without). 9-31 tokens lie between measured wins.
    // A CSA layer's group (2560 columns, Flash) wins on the wgmma ring up to 32 tokens and
    // loses at 64, with windows and without (docs/perf/h100-2026-12-05-layer-batches.json,
    // fused against the library's choice: decode B=16 16.1 against 18.2 us, B=24 16.7 against
    // 18.4, B=32 18.1 against 19.0; no window 12.8 against 15.4, 13.5 against 15.5, 14.6
    // against 15.6; docs/perf/h100-2026-11-25f.json: B=64 21.0 against 20.3, no window 16.6
    // against 16.0). Pro's group on the mma.sync ring loses from 16 tokens (28.1 against 24.0).
    // CSA main alone (2048 columns) stays at 8: at 32 tokens 17.3 against 17.8, no window
    // 13.4 against 13.2.
    if (options_.fused_decode == FusedDecode::automatic) {
      if (!spec_.overlap() && options_.window_state != WindowState::running) return false;
      // Ratio 128 with running state past 8 tokens: the sliced projection and the running
      // step, where both apply, beat the fused ring step (Flash HCA decode B=32 10.7 against
      // 13.3 us, no window 8.6 against 10.7; but at 1 and 8 tokens the fused step wins, 7.5
      // against 9.4 and 8.1 against 9.8; docs/PERF.md, twenty-fourth pass).
      if (!spec_.overlap() && plan.num_tokens() > kFusedAutoMaxTokens && running_step_applies(plan) &&
          sliced_projection_wins(plan))
        return false;
      const bool narrow = step_columns <= kFusedNarrowMaxColumns &&
                          step_columns * plan.num_tokens() <= kFusedNarrowMaxColumnTokens && wide_steps_on_wgmma_;
      const bool group = in_group && step_columns <= kFusedGroupMaxColumns &&
                         plan.num_tokens() <= kFusedGroupMaxTokens && wide_steps_on_wgmma_;
      if (plan.num_tokens() > kFusedAutoMaxTokens && !narrow && !group) return false;
    }
    if (!cuda::fused_shape_supported(static_cast<int>(spec_.head_dim), spec_.hidden))
      return false;
    // Ratio 128 with stored rows pools up to 128 rows per entry, which the fused step reads
    // slot by slot; the unfused pooling (8 blocks of 8 groups per entry) reads them side by
    // side. FusedDecode::always fuses it up to 16 entries.
    if (!spec_.overlap() && options_.window_state == WindowState::rows && plan.num_entries() > 16) return false;
    return true;
  }

  // Whether the steps after this plan's projection run as one launch: a decode-shaped plan
  // that completes an entry, whose pooling reads what the fused kernel's pool items read fast
  // (ratio 4's stored rows; running accumulators). Ratio 128 with stored rows keeps
  // pool_windows, which reads a window's 128 rows side by side where a pool item reads them
  // slot by slot. A step that completes no entry runs update_state alone, one kernel per
  // member, which measured faster than the compress step (Flash CSA layer decode-partial B=64
  // 18.8 against 22.0 us; docs/PERF.md).
  bool compress_step_supported(const detail::PlanData& plan) const {
    return options_.compress_launch != CompressLaunch::per_stage && plan.num_entries() > 0 &&
           plan.num_tokens() <= cuda::kFusedMaxTokens &&
           cuda::fused_shape_supported(static_cast<int>(spec_.head_dim), spec_.hidden) &&
           ((spec_.overlap() && spec_.ratio == 4) || options_.window_state == WindowState::running);
  }

  // Whether this compressor alone (not in a group) takes the compress step. Measured on the
  // H100 against the per-stage kernels (docs/PERF.md, 2026-11-24): a CSA compressor alone
  // loses at every batch (Flash CSA main decode B=64 24.8 against 23.9 us, B=256 42.0 against
  // 26.2), where a CSA layer's group wins (below); ratio 128 with running state wins from 64
  // tokens (Flash HCA B=64 19.7 against 20.1, B=256 27.8 against 35.8) and loses at 32 (18.7
  // against 17.3). Re-measured once the compress step waited before staging (docs/PERF.md,
  // seventh pass): HCA at 32 even; CSA main wins at 64-128 tokens and loses at 256, the
  // indexer the other way round; left as it was until a rule by width and batch is measured.
  bool compress_step_alone(const detail::PlanData& plan) const {
    if (!compress_step_supported(plan)) return false;
    if (options_.compress_launch == CompressLaunch::single) return true;
    return !spec_.overlap() && plan.num_tokens() >= kCompressAloneMinTokens;
  }

  // Whether the stages after this plan's projection run as launch_running_step: ratio 128 with
  // running state, under CompressLaunch::automatic, in a decode-shaped step whose requests
  // append at most kRunningStepMaxRequestTokens tokens each. One block per request folds its
  // tokens and pools and finishes its entries, with no hand-off between blocks, where the
  // compress step and the per-stage kernels pass every pooled value from the blocks that pool
  // it to the one that finishes the entry. With a thread per channel it is also the faster
  // launch for steps that complete no entry (H100, Flash B=64: 10.8 against the per-stage
  // kernels' 11.1 us; docs/PERF.md, twenty-second pass).
  bool running_step_applies(const detail::PlanData& plan) const {
    if (options_.compress_launch != CompressLaunch::automatic || options_.window_state != WindowState::running ||
        spec_.overlap() || !cuda::running_step_supported(static_cast<int>(spec_.head_dim)))
      return false;
    if (plan.num_tokens() > cuda::kFusedMaxTokens) return false;
    for (const Request& q : plan.requests)
      if (q.num_tokens > kRunningStepMaxRequestTokens) return false;
    return true;
  }

  // Whether a plan that takes the running step projects with the sliced projection (under
  // FusedDecode::automatic; `off` keeps the library's GEMM): steps of more than 8 tokens (the
  // fused step keeps those up to 8, see fused_wins) up to kSlicedMaxXBytes of x. cuBLASLt's tiles,
  // each over all of hidden, keep about 16 blocks busy at HCA's 1024 columns; the sliced
  // projection streams the weights on 128 blocks with the fused step's arithmetic, but each of
  // its 16 column tiles reads all of x. Measured on the H100 against cuBLASLt, running step
  // after both (docs/PERF.md, twenty-third pass): Flash HCA decode B=64 11.5 against 13.1 us,
  // B=128 12.5 against 13.5, but B=256 (2 MiB of x) 17.8 against 14.5; Pro B=32 14.2 against
  // 16.8, B=64 (0.9 MiB) 15.0 against 17.2, B=128 (1.8 MiB) 17.6 against 17.7, B=256 25.3
  // against 18.9.
  bool sliced_projection_wins(const detail::PlanData& plan) const {
    return options_.fused_decode == FusedDecode::automatic && plan.num_tokens() * spec_.hidden * 2 <= kSlicedMaxXBytes &&
           cuda::slice_projection_supported(device_, spec_.hidden, spec_.projection_width(), plan.num_tokens());
  }

  // Whether a running step lets the next kernel launch before its wait rather than after it.
  // The next step's sliced projection streams its weights before its own wait, so each step is
  // the projection from its wait to its exit, then the longer of the running step's remainder
  // and the next projection's stream (docs/PERF.md, twenty-seventh pass). An early launch
  // starts that stream sooner, and wins where the stream is the longer: steps that complete
  // no entry, and weights of more than Flash's 8 MiB (measured on the H100, twenty-eighth
  // pass: Pro HCA decode B=64 12.42 -> 11.16 us, Flash decode-partial B=32 7.90 -> 6.39);
  // where the running step finishes entries of Flash's HCA the stream shares the SMs with it
  // and the step lost (decode B=64 8.36 -> 8.83).
  bool next_launch_early(const detail::PlanData& plan) const {
    return plan.num_entries() == 0 || spec_.projection_width() * spec_.hidden * 2 > kEarlyLaunchMinWeightBytes;
  }

  // This compressor as a member of a fused step over the weights at `w`.
  cuda::FusedMember fused_member(const CudaPlan& cp, const void* w) const {
    cuda::FusedMember m;
    m.w = static_cast<const std::uint16_t*>(w);
    m.c = consts_;
    m.p = cp.view;
    m.pooled = static_cast<float*>(cp.pooled.get());
    m.row_blocks = static_cast<int>(spec_.head_dim / (spec_.overlap() ? 16 : 32));
    return m;
  }

  cuda::HostPlan host_plan(const detail::PlanData& plan) const {
    cuda::HostPlan h;
    for (const Request& q : plan.requests) h.start.push_back(q.start), h.slot.push_back(q.slot);
    h.token_offset = &plan.token_offsets;
    h.entry_offset = &plan.entry_offsets;
    h.ring_rows = detail::state_ring_rows(spec_);  // every state of this compressor has these rows
    return h;
  }

  cuda::StateView state_view(const detail::StateData& state) const {
    return {state.memory, precision_.state, state.slot_bytes, state.ring_rows, state.row_elems, state.running};
  }

  // Whether everything after this plan's projection is its state update: a decode-shaped step
  // that completes no entry and does not take the running step. A group of two runs both
  // members' updates in one launch then (CudaGroupProjection::prepare_compress).
  bool state_update_alone(const detail::PlanData& plan) const {
    const auto& cp = *static_cast<const CudaPlan*>(plan.backend_data.get());
    return options_.compress_launch != CompressLaunch::per_stage && plan.num_entries() == 0 &&
           plan.num_tokens() <= cuda::kFusedMaxTokens && !cp.running_step;
  }

  bool pdl() const { return pdl_; }

  int device() const { return device_; }

 private:
  CompressorSpec spec_;
  Options options_;
  Precision precision_;
  int device_;
  std::shared_ptr<void> wkv_gate_;  // before projection_, which probes its algorithms with it
  cuda::Projection projection_;
  std::shared_ptr<void> ape_, norm_, inv_freq_;
  cuda::CompressorConsts consts_;
  bool pdl_ = false;  // programmatic dependent launches (sm_90 and later)
  bool wide_steps_on_wgmma_ = false;  // fused steps multiply on wgmma (fused_multiplies_on_wgmma)
};

// x @ [w_1; w_2; ...]^T in one cuBLASLt call over the members' concatenated weights, or, for
// decode-shaped plans, every member in one fused step over the same weights.
class CudaGroupProjection final : public GroupProjection {
 public:
  CudaGroupProjection(int device, std::shared_ptr<void> w, std::int64_t width, std::int64_t hidden, DType dtype,
                      std::vector<const CudaBackend*> members)
      : device_(device), w_(std::move(w)), width_(width), hidden_(hidden), dtype_(dtype),
        projection_(device, w_.get(), width, hidden, dtype), members_(std::move(members)) {}
  std::int64_t width() const override { return width_; }
  DType dtype() const override { return dtype_; }
  std::shared_ptr<void> allocate_rows(std::int64_t tokens) const override {
    return device_alloc(device_, static_cast<std::size_t>(tokens * width_) * dtype_size(dtype_));
  }
  void run(const TensorView& x, void* rows, void* stream) const override {
    cuda::DeviceGuard guard(device_);
    projection_.run(x.data, x.shape[0], w_.get(), rows, width_, static_cast<cudaStream_t>(stream));
  }

  std::shared_ptr<void> prepare_fused(const std::vector<const detail::PlanData*>& plans) const override {
    if (members_.size() > static_cast<std::size_t>(cuda::kFusedMaxMembers)) return nullptr;
    std::vector<cuda::FusedMember> fm;
    std::vector<cuda::HostPlan> hosts;
    std::int64_t row = 0;
    for (std::size_t k = 0; k < members_.size(); ++k) {
      if (!members_[k]->fused_wins(*plans[k], width_, members_.size() > 1)) return nullptr;
      const auto& cp = *static_cast<const CudaPlan*>(plans[k]->backend_data.get());
      fm.push_back(members_[k]->fused_member(cp, static_cast<const char*>(w_.get()) + row * hidden_ * 2));
      hosts.push_back(members_[k]->host_plan(*plans[k]));
      row += members_[k]->spec().projection_width();
    }
    cuda::DeviceGuard guard(device_);
    return make_fused_plan(device_, fm, hosts, plans[0]->num_tokens(), hidden_, false);
  }

  void run_fused(const void* fused, const TensorView& x, const std::vector<detail::StateData*>& states,
                 const std::vector<RunOutputs>& outputs, void* stream) const override {
    run_fused_plan(device_, *static_cast<const FusedPlan*>(fused), x.data, {}, state_views(states), outputs,
                   static_cast<cudaStream_t>(stream));
  }

  // What a group runs after its projection in one launch: the compress step (a step that
  // completes an entry), or, for a group of two whose step completes none, both members' state
  // updates (launch_update_state_group: one kernel boundary instead of two).
  struct GroupCompress {
    std::shared_ptr<FusedPlan> step;
    std::vector<cuda::FusedMember> members;  // state updates: each member's consts and plan
  };

  // A group of two (a CSA layer's main and indexer) takes the compress step wherever it is
  // supported: measured on the H100 against the per-stage kernels (docs/PERF.md, 2026-11-24),
  // Flash CSA layer decode B=32 27.3 against 31.9 us, B=64 29.2 against 35.1, B=128 37.2
  // against 41.8, B=256 43.7 against 44.2; Pro B=64 38.5 against 44.4. A group of one is a
  // compressor alone. Where the step completes no entry, a group of two updates both
  // members' states in one launch: on the H100 (docs/PERF.md, thirty-first pass), CSA layer
  // decode-partial Flash B=64 15.91 -> 14.79 us, Pro B=256 28.18 -> 26.96, against one
  // update_state launch per member.
  std::shared_ptr<void> prepare_compress(const std::vector<const detail::PlanData*>& plans) const override {
    if (members_.size() > static_cast<std::size_t>(cuda::kFusedMaxMembers)) return nullptr;
    if (members_.size() == 1 && !members_[0]->compress_step_alone(*plans[0])) return nullptr;
    auto out = std::make_shared<GroupCompress>();
    bool step = true, state_updates = members_.size() == 2;
    std::vector<cuda::HostPlan> hosts;
    for (std::size_t k = 0; k < members_.size(); ++k) {
      hosts.push_back(members_[k]->host_plan(*plans[k]));
      step = step && members_[k]->compress_step_supported(*plans[k]);
      state_updates = state_updates && members_[k]->state_update_alone(*plans[k]);
      out->members.push_back(members_[k]->fused_member(*static_cast<const CudaPlan*>(plans[k]->backend_data.get()), nullptr));
    }
    if (step) {
      cuda::DeviceGuard guard(device_);
      out->step = make_fused_plan(device_, out->members, hosts, plans[0]->num_tokens(), hidden_, true);
    } else if (!state_updates) {
      return nullptr;
    }
    return out;
  }

  bool compress_runs_step(const void* compress) const override {
    return compress && static_cast<const GroupCompress*>(compress)->step;
  }

  void run_compress(const void* compress, const std::vector<KvScoreRows>& rows,
                    const std::vector<detail::StateData*>& states, const std::vector<RunOutputs>& outputs,
                    void* stream) const override {
    const auto& gc = *static_cast<const GroupCompress*>(compress);
    std::vector<cuda::KvScoreView> kv;
    for (const KvScoreRows& r : rows) kv.push_back({r.data, r.dtype, r.ld});
    const auto s = static_cast<cudaStream_t>(stream);
    if (gc.step) {
      run_fused_plan(device_, *gc.step, nullptr, kv, state_views(states), outputs, s);
      return;
    }
    // Two members' state updates: what each member's compress() would launch, in one kernel
    // where their dtypes allow it.
    const std::vector<cuda::StateView> st = state_views(states);
    const cuda::StateUpdateMember a{gc.members[0].c, gc.members[0].p, kv[0], st[0]};
    const cuda::StateUpdateMember b{gc.members[1].c, gc.members[1].p, kv[1], st[1]};
    cuda::DeviceGuard guard(device_);
    const bool pdl = members_[0]->pdl();
    if (cuda::update_state_group_supported(a, b)) {
      cuda::launch_update_state_group(a, b, s, pdl);
      return;
    }
    for (const cuda::StateUpdateMember* m : {&a, &b}) cuda::launch_update_state(m->c, m->plan, m->kv, m->state, s, pdl);
  }

 private:
  std::vector<cuda::StateView> state_views(const std::vector<detail::StateData*>& states) const {
    std::vector<cuda::StateView> views;
    for (std::size_t k = 0; k < members_.size(); ++k) views.push_back(members_[k]->state_view(*states[k]));
    return views;
  }

  int device_;
  std::shared_ptr<void> w_;
  std::int64_t width_, hidden_;
  DType dtype_;
  cuda::Projection projection_;
  std::vector<const CudaBackend*> members_;
};

std::unique_ptr<GroupProjection> CudaBackend::make_group_projection(const std::vector<const Backend*>& members) const {
  std::int64_t width = 0;
  for (const Backend* m : members) width += static_cast<const CudaBackend&>(*m).spec().projection_width();
  auto w = device_alloc(device_, static_cast<std::size_t>(width * spec_.hidden) * 2);
  std::int64_t row = 0;
  std::vector<const CudaBackend*> cuda_members;
  for (const Backend* m : members) {
    const auto& c = static_cast<const CudaBackend&>(*m);
    cuda_members.push_back(&c);
    const std::size_t bytes = static_cast<std::size_t>(c.spec().projection_width() * spec_.hidden) * 2;
    cuda_copy(device_, static_cast<char*>(w.get()) + row * spec_.hidden * 2, c.projection_weights(), bytes);
    row += c.spec().projection_width();
  }
  return std::make_unique<CudaGroupProjection>(device_, std::move(w), width, spec_.hidden, precision_.kv_score,
                                               std::move(cuda_members));
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const CompressorSpec& spec, const HostWeights& weights, const Options& options) {
  const int device_index = options.device.index;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    throw Error("device: cuda:" + std::to_string(device_index) + " requested but no usable GPU is present");
  if (device_index < 0 || device_index >= count)
    throw Error("device: expected cuda:0..cuda:" + std::to_string(count - 1) + ", got cuda:" + std::to_string(device_index));
  return std::make_unique<CudaBackend>(spec, weights, options);
}

}  // namespace dsv4
