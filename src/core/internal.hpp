// What the front end hands to a backend: validated weights, a planned batch, the state pool.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "dsv4/compressor.hpp"

namespace dsv4 {

// Weights in the one form every backend starts from (host memory).
struct HostWeights {
  std::vector<std::uint16_t> wkv_gate;  // bf16 [2*coff*head_dim, hidden], kv rows first
  std::vector<float> ape;               // [ratio, coff*head_dim]
  std::vector<float> norm;              // [head_dim]
};

namespace detail {

struct PlanData {
  const void* owner = nullptr;  // the backend of the compressor that made the plan
  bool own_rows = true;         // false: a CompressorGroup projects for it
  CompressorSpec spec;
  std::vector<Request> requests;
  std::vector<std::int64_t> cache_locations;
  std::vector<std::int64_t> token_offsets;  // requests.size() + 1
  std::vector<std::int64_t> entry_offsets;  // requests.size() + 1
  std::vector<std::int32_t> entry_request;  // request of each entry
  std::vector<std::int64_t> entry_window;   // window index of each entry within its request
  std::int64_t max_cache_location = -1;
  bool fused = false;                       // set by a backend that runs the plan as one launch
  bool compress_step = false;               // set by a backend that runs the stages after its
                                            // projection as one launch
  bool sliced_projection = false;           // set by a backend that projects the plan with its
                                            // sliced projection (CUDA, sm_90a)
  std::shared_ptr<void> backend_data;       // what a backend keeps per plan (device copies)

  std::int64_t num_tokens() const { return token_offsets.back(); }
  std::int64_t num_entries() const { return entry_offsets.back(); }
};

// A slot is a ring of ring_rows kv_score rows in the state dtype: token at position q lives in
// row q % ring_rows, valid while q is at or after the start of the previous window (ratio 4)
// or of the current window (ratio 128).
// With WindowState::running a slot instead holds three fp32 arrays [head_dim]: the running
// max, sum and weighted sum of the softmax over the incomplete window's tokens so far.
struct StateData {
  CompressorSpec spec;
  Precision precision;
  Device device;
  bool running = false;
  std::int64_t num_slots = 0;
  std::int64_t ring_rows = 0;
  std::int64_t row_elems = 0;
  std::size_t slot_bytes = 0;
  void* memory = nullptr;
  std::shared_ptr<void> owned;  // set when the library allocated `memory`
  std::vector<std::int64_t> next_position;
};

// A power of two (8 or 128), so kernels find a position's row with a mask.
inline std::int64_t state_ring_rows(const CompressorSpec& spec) {
  return spec.overlap() ? 2 * spec.ratio : spec.ratio;
}

}  // namespace detail

// kv_score rows of one call as a compress step reads them: row t of the plan at data + t * ld,
// kv columns first, then score columns.
struct KvScoreRows {
  const void* data = nullptr;
  DType dtype = DType::f32;
  std::int64_t ld = 0;  // elements between rows
};

// One projection GEMM for several compressors that read the same x (CompressorGroup).
class GroupProjection {
 public:
  virtual ~GroupProjection() = default;
  virtual std::int64_t width() const = 0;  // sum of the members' projection widths
  virtual DType dtype() const = 0;         // storage dtype of the rows it writes
  virtual std::shared_ptr<void> allocate_rows(std::int64_t tokens) const = 0;
  virtual void run(const TensorView& x, void* rows, void* stream) const = 0;
  // Backend data for running every member's plan as one fused step, or null where the
  // members take the unfused path (projection, then each member's compress).
  virtual std::shared_ptr<void> prepare_fused(const std::vector<const detail::PlanData*>& plans) const {
    (void)plans;
    return nullptr;
  }
  virtual void run_fused(const void* fused, const TensorView& x, const std::vector<detail::StateData*>& states,
                         const std::vector<RunOutputs>& outputs, void* stream) const {
    (void)fused, (void)x, (void)states, (void)outputs, (void)stream;
  }
  // Backend data for compressing every member from the projected rows in one launch, or null
  // where each member's compress() runs.
  virtual std::shared_ptr<void> prepare_compress(const std::vector<const detail::PlanData*>& plans) const {
    (void)plans;
    return nullptr;
  }
  // Whether `compress` (from prepare_compress) is the compress step (GroupPlan::compress_step),
  // not another joint launch such as the members' state updates alone.
  virtual bool compress_runs_step(const void* compress) const { return compress != nullptr; }
  virtual void run_compress(const void* compress, const std::vector<KvScoreRows>& rows,
                            const std::vector<detail::StateData*>& states,
                            const std::vector<RunOutputs>& outputs, void* stream) const {
    (void)compress, (void)rows, (void)states, (void)outputs, (void)stream;
  }
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Zeroed memory on the backend's device, freed when the last owner lets go.
  virtual std::shared_ptr<void> allocate_zeroed(std::size_t bytes) const = 0;
  // Backend-specific per-plan data (the plan's arrays on the device; with `own_rows`, the
  // workspace its projection writes).
  virtual void prepare(detail::PlanData& plan, bool own_rows) const {
    (void)plan;
    (void)own_rows;
  }
  // Runs a validated plan: projection, then compress(). May not throw for bad input: every
  // check has been made.
  virtual void run(const detail::PlanData& plan, const TensorView& x, detail::StateData& state,
                   const RunOutputs& outputs, void* stream) const = 0;
  // Pooling, epilogue, store and state update from kv_score rows projected elsewhere.
  virtual void compress(const detail::PlanData& plan, const KvScoreRows& rows, detail::StateData& state,
                        const RunOutputs& outputs, void* stream) const = 0;
  // The projection weights as the backend holds them (CPU: fp32 host [width, hidden]; CUDA:
  // bf16 device [width, hidden]), for benchmarks that drive other GEMMs over the same bytes.
  virtual const void* projection_weights() const = 0;
  // A projection over the concatenated weights of `members` (all of this backend's type).
  virtual std::unique_ptr<GroupProjection> make_group_projection(const std::vector<const Backend*>& members) const = 0;
};

// Device memory primitives behind dsv4::Buffer (src/cuda, or errors without CUDA).
void* cuda_malloc(int device, std::size_t bytes);
void cuda_free(int device, void* p);
void cuda_copy(int device, void* dst, const void* src, std::size_t bytes);  // any direction
void cuda_fill(int device, void* p, std::uint8_t byte, std::size_t bytes);

std::unique_ptr<Backend> make_cpu_backend(const CompressorSpec& spec, const HostWeights& weights,
                                          Precision precision);
// Throws dsv4::Error when this build has no CUDA backend or no usable GPU.
std::unique_ptr<Backend> make_cuda_backend(const CompressorSpec& spec, const HostWeights& weights,
                                           const Options& options);

}  // namespace dsv4
