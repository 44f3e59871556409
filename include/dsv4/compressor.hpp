// The compressor: weights, per-request state, a batch, its plan, and the run.
//
//   dsv4::Compressor comp(spec, weights, {.device = dsv4::Device::cpu()});
//   dsv4::StatePool state(comp, /*num_slots=*/64);
//   dsv4::Batch batch;
//   batch.add(/*slot=*/3, /*start=*/0, /*num_tokens=*/517);  // a prefill
//   batch.add(/*slot=*/7, /*start=*/90, /*num_tokens=*/1);   // a decode step
//   batch.cache_locations = {...};  // one per window the batch completes, request order
//   dsv4::Plan plan = comp.plan(batch, state);
//   comp.run(plan, x, state, {.cache = cache, .entries = entries});
//
// Prefill, chunked prefill, decode and multi-token decode are one operation: request i appends
// num_tokens tokens from position start. Every window (ratio tokens) that the call completes
// yields one entry, written to the caller's cache row cache_locations[k].
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "dsv4/spec.hpp"
#include "dsv4/types.hpp"

namespace dsv4 {

// Storage dtypes of the projection output and of the per-request state. The math after the
// projection is always fp32. Each is DType::f32 or DType::bf16.
struct Precision {
  DType kv_score = DType::f32;
  DType state = DType::f32;

  friend bool operator==(const Precision&, const Precision&) = default;
};

// The bound SPEC section 4 sets on a precision's bf16 entries, as a relative L2 error against
// an fp64 evaluation: 2e-3 with f32 kv_score and state, 1e-2 with either in bf16.
double entry_tolerance(const Precision& precision);

// Weights as a checkpoint holds them. The compressor copies what it needs at construction.
struct Weights {
  TensorView wkv;    // bf16 [coff*head_dim, hidden]
  TensorView wgate;  // bf16 [coff*head_dim, hidden]
  TensorView ape;    // f32 [ratio, coff*head_dim]
  TensorView norm;   // bf16 or f32 [head_dim]

  // From the fused form engines keep: wkv_gate bf16 [2*coff*head_dim, hidden], kv rows first.
  static Weights fused(const TensorView& wkv_gate, const TensorView& ape, const TensorView& norm);
};

// How a ratio-128 compressor keeps its incomplete window between calls.
enum class WindowState {
  // The window's kv_score rows (128 x 2 x head_dim values a slot): entries are bit-identical
  // however a sequence is split into calls.
  rows,
  // Running softmax accumulators per channel (max, sum, weighted sum: 3 x head_dim fp32 a
  // slot, 1/85 of the rows): a step reads and writes 6 KiB per request instead of up to
  // 512 KiB. Splits may change entries by rounding, within SPEC section 4. Ratio 128 only.
  running,
};

// Whether a CUDA compressor may run a decode-shaped step (at most 256 tokens) as one fused
// launch: projection, pooling, state update and epilogue together, streaming the weights
// once. Its projection sums hidden in a fixed order of its own, so a token's entries may
// differ from the unfused path's by rounding (within SPEC section 4); among steps that take
// the same path, entries stay bit-identical however a sequence is split.
enum class FusedDecode {
  automatic,  // fused where measured faster (docs/PERF.md): steps of at most 8 tokens at ratio 4
              // (CSA; a CSA layer's main and indexer in one launch, CompressorGroup), and at
              // ratio 128 with WindowState::running (HCA); where fused steps multiply on wgmma
              // (sm_90a, Flash's hidden), a CSA layer's group and HCA up to 32 tokens and a CSA
              // indexer alone up to 64; but HCA steps with running state of more than 8
              // tokens that the one-block-per-request launch takes (CompressLaunch), up to
              // 1 MiB of x, are projected by the sliced projection instead (sm_90a;
              // Plan::sliced_projection), which has the fused step's arithmetic
  always,     // fused for every supported step of at most 256 tokens (tests, benchmarks)
  off,        // always the unfused path: cuBLASLt projection, then the compress kernels
};

// How a CUDA compressor runs what follows the cuBLASLt projection in a decode-shaped step (at
// most 256 tokens) that is not fused. The values are the same bits either way.
enum class CompressLaunch {
  // One launch where measured faster (docs/PERF.md): a CSA layer's main and indexer
  // (CompressorGroup) in steps that complete an entry; ratio 128 with WindowState::running
  // alone: where every request appends at most 16 tokens, one block per request folds its
  // tokens and pools and finishes its own entries (with or without an entry), else one
  // launch from 64 tokens in steps that complete an entry. Elsewhere the per-stage kernels.
  automatic,
  // Pooling, state update and entries in one launch, for every member of a CompressorGroup
  // together, in every step that completes an entry where the shape allows it (ratio 4, or
  // ratio 128 with WindowState::running) (tests, benchmarks).
  single,
  // Three kernels per compressor: pooling, state update, entries (tests, benchmarks).
  per_stage,
};

struct Options {
  Device device;  // where weights, state, x, cache and entries live
  Precision precision;
  WindowState window_state = WindowState::rows;
  FusedDecode fused_decode = FusedDecode::automatic;
  CompressLaunch compress_launch = CompressLaunch::automatic;
};

// One request's part of a batch.
struct Request {
  std::int64_t slot = 0;        // state slot the caller assigned to the request
  std::int64_t start = 0;       // position of the first appended token
  std::int64_t num_tokens = 0;  // >= 1
};

// Number of windows of `ratio` tokens that appending [start, start + num_tokens) completes.
std::int64_t windows_completed(std::int64_t start, std::int64_t num_tokens, std::int64_t ratio);

struct Batch {
  std::vector<Request> requests;
  // One cache row per completed window: request order, windows ascending within a request.
  std::vector<std::int64_t> cache_locations;

  void add(std::int64_t slot, std::int64_t start, std::int64_t num_tokens) {
    requests.push_back({slot, start, num_tokens});
  }
};

class Compressor;
namespace detail {
struct PlanData;
struct StateData;
}  // namespace detail

// Per-request state of a compressor, in slots the caller assigns. Each slot holds the
// projected rows of the tokens its request still needs (the previous window and the current
// incomplete one) and, on the host, the position the request has reached.
class StatePool {
 public:
  // Library-owned memory on the compressor's device.
  StatePool(const Compressor& compressor, std::int64_t num_slots);
  // Caller-owned memory: a u8 tensor of bytes_required(...) bytes on the compressor's device.
  StatePool(const Compressor& compressor, std::int64_t num_slots, const TensorView& memory);
  ~StatePool();
  StatePool(StatePool&&) noexcept;
  StatePool& operator=(StatePool&&) noexcept;

  static std::size_t bytes_required(const CompressorSpec& spec, const Options& options,
                                    std::int64_t num_slots);

  std::int64_t num_slots() const;
  // The position the next call for this slot must start at (0 for a fresh slot).
  std::int64_t next_position(std::int64_t slot) const;
  // Forget the slot's request; its next call must start at position 0.
  void release(std::int64_t slot);
  // The whole pool's memory, as a u8 tensor (for hashing, saving, inspection).
  TensorView memory() const;

  const detail::StateData& data() const { return *data_; }
  detail::StateData& data() { return *data_; }

 private:
  std::unique_ptr<detail::StateData> data_;
};

// A validated batch, ready to run. Built once per batch by Compressor::plan.
class Plan {
 public:
  Plan();
  ~Plan();
  Plan(const Plan&);
  Plan& operator=(const Plan&);
  Plan(Plan&&) noexcept;
  Plan& operator=(Plan&&) noexcept;

  std::int64_t num_tokens() const;   // rows of x
  std::int64_t num_entries() const;  // entries the batch completes
  const std::vector<Request>& requests() const;
  const std::vector<std::int64_t>& cache_locations() const;
  // Row of x where request i's tokens begin, and index of its first entry.
  std::int64_t token_offset(std::size_t request) const;
  std::int64_t entry_offset(std::size_t request) const;
  // Whether the step runs as one fused launch (CUDA, Options::fused_decode).
  bool fused() const;
  // Whether the stages after the projection (pooling, state update, entries) run as one launch
  // (CUDA, Options::compress_launch; false where the step is fused).
  bool compress_step() const;
  // Whether the projection runs as the sliced projection: fp32 partial sums over slices of
  // hidden on every SM, added in the fused step's order (CUDA, Options::fused_decode).
  bool sliced_projection() const;

  const detail::PlanData& data() const { return *data_; }

 private:
  friend class Compressor;
  std::shared_ptr<const detail::PlanData> data_;
};

struct RunOutputs {
  // u8 [cache_rows, spec.entry_bytes()]: completed entries go to rows plan.cache_locations().
  std::optional<TensorView> cache;
  // bf16 [plan.num_entries(), head_dim]: the entries before quantization, in plan order.
  std::optional<TensorView> entries;
};

class Backend;
class GroupProjection;
class CompressorGroup;

class Compressor {
 public:
  Compressor(const CompressorSpec& spec, const Weights& weights, Options options = {});
  ~Compressor();
  Compressor(Compressor&&) noexcept;
  Compressor& operator=(Compressor&&) noexcept;

  const CompressorSpec& spec() const { return spec_; }
  const Options& options() const { return options_; }

  // Validates the batch against the spec and the state (slots in range and distinct, each
  // start equal to the slot's next position or 0, one distinct non-negative cache location
  // per completed window). Throws dsv4::Error; changes nothing.
  Plan plan(const Batch& batch, const StatePool& state) const;

  // Appends the planned tokens: x is bf16 [plan.num_tokens(), hidden]. Validates every tensor
  // and that the state has not moved since the plan, then updates the state and writes the
  // outputs. A rejected call throws dsv4::Error and changes nothing. `stream` is the
  // cudaStream_t to order the work on (CUDA only; null means the default stream).
  void run(const Plan& plan, const TensorView& x, StatePool& state, const RunOutputs& outputs,
           void* stream = nullptr) const;

  // plan() then run().
  void forward(const Batch& batch, const TensorView& x, StatePool& state,
               const RunOutputs& outputs, void* stream = nullptr) const;

  Backend& backend() const { return *backend_; }

 private:
  friend class CompressorGroup;
  Plan make_plan(const Batch& batch, const StatePool& state, bool own_rows) const;
  // Every check of run(); throws, touches nothing.
  void check_run(const Plan& plan, const TensorView& x, const StatePool& state, const RunOutputs& outputs) const;
  void advance(const Plan& plan, StatePool& state) const;

  CompressorSpec spec_;
  Options options_;
  std::unique_ptr<Backend> backend_;
};

// A validated batch for every member of a CompressorGroup, and the rows their shared
// projection writes.
class GroupPlan {
 public:
  const std::vector<Plan>& plans() const { return plans_; }
  std::int64_t num_tokens() const { return plans_.empty() ? 0 : plans_[0].num_tokens(); }
  // Whether every member runs in one fused launch.
  bool fused() const { return fused_ != nullptr; }
  // Whether, after the shared projection, every member's pooling, state update and entries run
  // in one launch (Options::compress_launch).
  bool compress_step() const { return compress_step_; }

 private:
  friend class CompressorGroup;
  const void* owner_ = nullptr;
  std::vector<Plan> plans_;
  std::shared_ptr<void> rows_;   // the shared projection's output (unfused path)
  std::shared_ptr<void> fused_;  // the members as one fused step, where the backend chose it
  std::shared_ptr<void> compress_;  // unfused: every member's compress in one launch, where supported
  bool compress_step_ = false;      // compress_ is the compress step (not the members' state updates alone)
};

// Compressors that read the same x, such as a CSA layer's main and indexer compressors: one
// projection GEMM over their concatenated weights serves all of them, then each compresses
// its own columns into its own state and cache.
class CompressorGroup {
 public:
  // Members share hidden, device and kv_score dtype, and must outlive the group.
  explicit CompressorGroup(std::vector<const Compressor*> members);
  ~CompressorGroup();
  CompressorGroup(CompressorGroup&&) noexcept;
  CompressorGroup& operator=(CompressorGroup&&) noexcept;

  std::size_t size() const { return members_.size(); }
  const Compressor& member(std::size_t i) const { return *members_.at(i); }

  // One batch and state pool per member. The batches hold the same requests (starts and token
  // counts, in the same order); slots and cache locations are each member's own.
  GroupPlan plan(const std::vector<Batch>& batches, const std::vector<const StatePool*>& states) const;
  // x is bf16 [plan.num_tokens(), hidden]. Every member's call is checked before any runs.
  void run(const GroupPlan& plan, const TensorView& x, const std::vector<StatePool*>& states,
           const std::vector<RunOutputs>& outputs, void* stream = nullptr) const;

 private:
  std::vector<const Compressor*> members_;
  std::vector<std::int64_t> column_offsets_;
  std::unique_ptr<GroupProjection> projection_;
};

// True when this build has the CUDA backend and a usable GPU is present.
bool cuda_available();

// Plain memory on a device, for callers without an allocator of their own (tools, tests).
// Copies are synchronous.
class Buffer {
 public:
  Buffer(Device device, std::size_t bytes);
  ~Buffer();
  Buffer(Buffer&&) noexcept;
  Buffer& operator=(Buffer&&) noexcept;

  void* data() const { return data_; }
  std::size_t size() const { return size_; }
  Device device() const { return device_; }
  // A view of the whole buffer (or a prefix of it) with the given dtype and shape.
  TensorView view(DType dtype, std::vector<std::int64_t> shape) const;
  void upload(const void* host, std::size_t bytes, std::size_t offset = 0);
  void download(void* host, std::size_t bytes, std::size_t offset = 0) const;
  void fill(std::uint8_t byte);

 private:
  Device device_;
  std::size_t size_ = 0;
  void* data_ = nullptr;
};

}  // namespace dsv4
