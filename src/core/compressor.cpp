// The front end every backend shares: weight intake, state pools, planning and validation.
// Nothing here touches state or cache memory until every check has passed.
#include "dsv4/compressor.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "core/internal.hpp"
#include "core/numerics.hpp"
#include "core/validate.hpp"

namespace dsv4 {

namespace {

// Positions beyond this are refused: far past any context length, far below int64 overflow.
constexpr std::int64_t kMaxPosition = std::int64_t{1} << 40;
constexpr std::int64_t kMaxTokensPerRequest = std::int64_t{1} << 31;

std::string item(std::string_view array, std::size_t index) {
  return std::string(array) + "[" + std::to_string(index) + "]";
}

void check_precision(Precision p) {
  if (p.kv_score != DType::f32 && p.kv_score != DType::bf16)
    reject("options.precision.kv_score: expected f32 or bf16, got " +
           std::string(dtype_name(p.kv_score)));
  if (p.state != DType::f32 && p.state != DType::bf16)
    reject("options.precision.state: expected f32 or bf16, got " + std::string(dtype_name(p.state)));
}

HostWeights take_weights(const CompressorSpec& spec, const Weights& w) {
  const Device host = Device::cpu();
  const std::int64_t rows = spec.coff() * spec.head_dim;
  expect_tensor(w.wkv, "weights.wkv", {DType::bf16}, {rows, spec.hidden}, host);
  expect_tensor(w.wgate, "weights.wgate", {DType::bf16}, {rows, spec.hidden}, host);
  expect_tensor(w.ape, "weights.ape", {DType::f32}, {spec.ratio, rows}, host);
  expect_tensor(w.norm, "weights.norm", {DType::f32, DType::bf16}, {spec.head_dim}, host);

  HostWeights out;
  const std::size_t half = static_cast<std::size_t>(rows * spec.hidden);
  out.wkv_gate.resize(2 * half);
  std::memcpy(out.wkv_gate.data(), w.wkv.data, half * 2);
  std::memcpy(out.wkv_gate.data() + half, w.wgate.data, half * 2);
  out.ape.assign(w.ape.as<const float>(), w.ape.as<const float>() + w.ape.numel());
  out.norm.resize(static_cast<std::size_t>(spec.head_dim));
  for (std::int64_t i = 0; i < spec.head_dim; ++i)
    out.norm[static_cast<std::size_t>(i)] = w.norm.dtype == DType::f32
                                                ? w.norm.as<const float>()[i]
                                                : num::f32_from_bf16(w.norm.as<const std::uint16_t>()[i]);
  return out;
}

// The checks of a batch against the state that both plan() and run() make.
void check_positions(const std::vector<Request>& requests, const detail::StateData& state,
                     bool at_run) {
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    const std::int64_t reached = state.next_position[static_cast<std::size_t>(r.slot)];
    if (r.start != reached && r.start != 0) {
      reject(at_run ? "plan: " + item("batch.requests", i) + " starts at " +
                          std::to_string(r.start) + " but slot " + std::to_string(r.slot) +
                          " is now at position " + std::to_string(reached) +
                          "; the state moved since the plan was made"
                    : item("batch.requests", i) + ".start: expected " + std::to_string(reached) +
                          " (the position slot " + std::to_string(r.slot) +
                          " has reached) or 0 (a new request), got " + std::to_string(r.start));
    }
  }
}

}  // namespace

std::int64_t windows_completed(std::int64_t start, std::int64_t num_tokens, std::int64_t ratio) {
  return (start + num_tokens) / ratio - start / ratio;
}

Weights Weights::fused(const TensorView& wkv_gate, const TensorView& ape, const TensorView& norm) {
  if (wkv_gate.dtype != DType::bf16 || wkv_gate.shape.size() != 2 || wkv_gate.shape[0] % 2 != 0 ||
      wkv_gate.data == nullptr)
    reject("weights.wkv_gate: expected bf16 [2*coff*head_dim, hidden] with an even first "
           "dimension, got " + std::string(dtype_name(wkv_gate.dtype)) + " " +
           shape_string(wkv_gate.shape));
  const std::int64_t rows = wkv_gate.shape[0] / 2;
  Weights w;
  w.wkv = TensorView(wkv_gate.data, DType::bf16, {rows, wkv_gate.shape[1]}, wkv_gate.device);
  w.wgate = TensorView(static_cast<char*>(wkv_gate.data) + rows * wkv_gate.shape[1] * 2,
                       DType::bf16, {rows, wkv_gate.shape[1]}, wkv_gate.device);
  w.ape = ape;
  w.norm = norm;
  return w;
}

// ---------------------------------------------------------------------------------- StatePool

std::size_t StatePool::bytes_required(const CompressorSpec& spec, const Options& options,
                                      std::int64_t num_slots) {
  if (options.window_state == WindowState::running)
    return static_cast<std::size_t>(num_slots) * static_cast<std::size_t>(3 * spec.head_dim) * sizeof(float);
  return static_cast<std::size_t>(num_slots) *
         static_cast<std::size_t>(detail::state_ring_rows(spec) * spec.projection_width()) *
         dtype_size(options.precision.state);
}

static std::unique_ptr<detail::StateData> make_state(const Compressor& c, std::int64_t num_slots) {
  if (num_slots <= 0 || num_slots > (std::int64_t{1} << 24))
    reject("num_slots: expected 1..16777216, got " + std::to_string(num_slots));
  auto d = std::make_unique<detail::StateData>();
  d->spec = c.spec();
  d->precision = c.options().precision;
  d->device = c.options().device;
  d->running = c.options().window_state == WindowState::running;
  d->num_slots = num_slots;
  d->ring_rows = detail::state_ring_rows(d->spec);
  d->row_elems = d->spec.projection_width();
  d->slot_bytes = StatePool::bytes_required(d->spec, c.options(), 1);
  d->next_position.assign(static_cast<std::size_t>(num_slots), 0);
  return d;
}

StatePool::StatePool(const Compressor& compressor, std::int64_t num_slots)
    : data_(make_state(compressor, num_slots)) {
  data_->owned = compressor.backend().allocate_zeroed(data_->slot_bytes * num_slots);
  data_->memory = data_->owned.get();
}

StatePool::StatePool(const Compressor& compressor, std::int64_t num_slots, const TensorView& memory)
    : data_(make_state(compressor, num_slots)) {
  const auto bytes = static_cast<std::int64_t>(data_->slot_bytes * num_slots);
  expect_tensor(memory, "memory", {DType::u8}, {bytes}, data_->device);
  if (reinterpret_cast<std::uintptr_t>(memory.data) % 16 != 0)
    reject("memory: expected data aligned to 16 bytes (slots hold fp32 rows)");
  data_->memory = memory.data;
}

StatePool::~StatePool() = default;
StatePool::StatePool(StatePool&&) noexcept = default;
StatePool& StatePool::operator=(StatePool&&) noexcept = default;

std::int64_t StatePool::num_slots() const { return data_->num_slots; }

std::int64_t StatePool::next_position(std::int64_t slot) const {
  if (slot < 0 || slot >= data_->num_slots)
    reject("slot: expected 0.." + std::to_string(data_->num_slots - 1) + ", got " +
           std::to_string(slot));
  return data_->next_position[static_cast<std::size_t>(slot)];
}

void StatePool::release(std::int64_t slot) {
  next_position(slot);  // range check
  data_->next_position[static_cast<std::size_t>(slot)] = 0;
}

TensorView StatePool::memory() const {
  return TensorView(data_->memory, DType::u8,
                    {static_cast<std::int64_t>(data_->slot_bytes * data_->num_slots)}, data_->device);
}

// --------------------------------------------------------------------------------------- Plan

Plan::Plan() = default;
Plan::~Plan() = default;
Plan::Plan(const Plan&) = default;
Plan& Plan::operator=(const Plan&) = default;
Plan::Plan(Plan&&) noexcept = default;
Plan& Plan::operator=(Plan&&) noexcept = default;

std::int64_t Plan::num_tokens() const { return data_ ? data_->num_tokens() : 0; }
std::int64_t Plan::num_entries() const { return data_ ? data_->num_entries() : 0; }
const std::vector<Request>& Plan::requests() const {
  static const std::vector<Request> none;
  return data_ ? data_->requests : none;
}
const std::vector<std::int64_t>& Plan::cache_locations() const {
  static const std::vector<std::int64_t> none;
  return data_ ? data_->cache_locations : none;
}
std::int64_t Plan::token_offset(std::size_t request) const {
  return data_->token_offsets.at(request);
}
std::int64_t Plan::entry_offset(std::size_t request) const {
  return data_->entry_offsets.at(request);
}

bool Plan::fused() const { return data_ && data_->fused; }
bool Plan::compress_step() const { return data_ && data_->compress_step; }
bool Plan::sliced_projection() const { return data_ && data_->sliced_projection; }

// --------------------------------------------------------------------------------- Compressor

double entry_tolerance(const Precision& precision) {
  return precision.kv_score == DType::f32 && precision.state == DType::f32 ? 2e-3 : 1e-2;
}

Compressor::Compressor(const CompressorSpec& spec, const Weights& weights, Options options)
    : spec_(spec), options_(options) {
  spec_.validate();
  check_precision(options_.precision);
  if (options_.window_state == WindowState::running && spec_.overlap())
    reject("options.window_state: running accumulators need ratio 128 (windows without overlap), got ratio " +
           std::to_string(spec_.ratio));
  const HostWeights host = take_weights(spec_, weights);
  if (options_.device.type == DeviceType::cpu)
    backend_ = make_cpu_backend(spec_, host, options_.precision);
  else
    backend_ = make_cuda_backend(spec_, host, options_);
}

Compressor::~Compressor() = default;
Compressor::Compressor(Compressor&&) noexcept = default;
Compressor& Compressor::operator=(Compressor&&) noexcept = default;

Plan Compressor::plan(const Batch& batch, const StatePool& state) const {
  return make_plan(batch, state, /*own_rows=*/true);
}

Plan Compressor::make_plan(const Batch& batch, const StatePool& state, bool own_rows) const {
  const detail::StateData& st = state.data();
  if (!(st.spec == spec_) || !(st.precision == options_.precision) || !(st.device == options_.device) ||
      st.running != (options_.window_state == WindowState::running))
    reject("state: expected a pool made for this compressor (same spec, precision, device and window state)");

  auto p = std::make_shared<detail::PlanData>();
  p->owner = backend_.get();
  p->own_rows = own_rows;
  p->spec = spec_;
  p->requests = batch.requests;
  p->token_offsets.reserve(batch.requests.size() + 1);
  p->entry_offsets.reserve(batch.requests.size() + 1);
  p->token_offsets.push_back(0);
  p->entry_offsets.push_back(0);

  std::unordered_map<std::int64_t, std::size_t> slot_owner;
  for (std::size_t i = 0; i < batch.requests.size(); ++i) {
    const Request& r = batch.requests[i];
    const std::string name = item("batch.requests", i);
    if (r.slot < 0 || r.slot >= st.num_slots)
      reject(name + ".slot: expected 0.." + std::to_string(st.num_slots - 1) + ", got " +
             std::to_string(r.slot));
    if (auto [it, fresh] = slot_owner.emplace(r.slot, i); !fresh)
      reject(name + ".slot: slot " + std::to_string(r.slot) + " is already used by " +
             item("batch.requests", it->second) + " in this batch");
    if (r.num_tokens < 1 || r.num_tokens > kMaxTokensPerRequest)
      reject(name + ".num_tokens: expected 1.." + std::to_string(kMaxTokensPerRequest) + ", got " +
             std::to_string(r.num_tokens));
    if (r.start < 0 || r.start > kMaxPosition)
      reject(name + ".start: expected 0.." + std::to_string(kMaxPosition) + ", got " +
             std::to_string(r.start));
    p->token_offsets.push_back(p->token_offsets.back() + r.num_tokens);
    p->entry_offsets.push_back(p->entry_offsets.back() + windows_completed(r.start, r.num_tokens, spec_.ratio));
  }
  check_positions(batch.requests, st, /*at_run=*/false);

  // The count is checked before any per-entry array is built, so that a request claiming
  // billions of tokens is refused without allocating for them.
  const std::int64_t entries = p->entry_offsets.back();
  if (static_cast<std::int64_t>(batch.cache_locations.size()) != entries)
    reject("batch.cache_locations: expected " + std::to_string(entries) +
           " locations (one per window the batch completes), got " +
           std::to_string(batch.cache_locations.size()));
  p->entry_request.reserve(static_cast<std::size_t>(entries));
  p->entry_window.reserve(static_cast<std::size_t>(entries));
  for (std::size_t i = 0; i < batch.requests.size(); ++i)
    for (std::int64_t k = 0; k < p->entry_offsets[i + 1] - p->entry_offsets[i]; ++k) {
      p->entry_request.push_back(static_cast<std::int32_t>(i));
      p->entry_window.push_back(batch.requests[i].start / spec_.ratio + k);
    }
  std::unordered_map<std::int64_t, std::size_t> row_owner;
  for (std::size_t k = 0; k < batch.cache_locations.size(); ++k) {
    const std::int64_t row = batch.cache_locations[k];
    if (row < 0)
      reject(item("batch.cache_locations", k) + ": expected a row >= 0, got " + std::to_string(row));
    if (auto [it, fresh] = row_owner.emplace(row, k); !fresh)
      reject(item("batch.cache_locations", k) + ": row " + std::to_string(row) +
             " is also given at " + item("batch.cache_locations", it->second));
    p->max_cache_location = std::max(p->max_cache_location, row);
  }
  p->cache_locations = batch.cache_locations;
  backend_->prepare(*p, own_rows);

  Plan plan;
  plan.data_ = std::move(p);
  return plan;
}

void Compressor::run(const Plan& plan, const TensorView& x, StatePool& state,
                     const RunOutputs& outputs, void* stream) const {
  check_run(plan, x, state, outputs);
  if (!plan.data_->own_rows) reject("plan: made by a CompressorGroup; run it through the group");
  backend_->run(*plan.data_, x, state.data(), outputs, stream);
  advance(plan, state);
}

void Compressor::advance(const Plan& plan, StatePool& state) const {
  for (const Request& r : plan.data_->requests)
    state.data().next_position[static_cast<std::size_t>(r.slot)] = r.start + r.num_tokens;
}

void Compressor::check_run(const Plan& plan, const TensorView& x, const StatePool& state,
                           const RunOutputs& outputs) const {
  if (!plan.data_) reject("plan: expected a plan made by Compressor::plan, got an empty one");
  const detail::PlanData& p = *plan.data_;
  const detail::StateData& st = state.data();
  if (p.owner != backend_.get()) reject("plan: expected a plan made by this compressor, got another's");
  if (!(st.spec == spec_) || !(st.precision == options_.precision) || !(st.device == options_.device) ||
      st.running != (options_.window_state == WindowState::running))
    reject("state: expected a pool made for this compressor (same spec, precision, device and window state)");
  for (const Request& r : p.requests)
    if (r.slot >= st.num_slots)
      reject("plan: slot " + std::to_string(r.slot) + " is outside this pool of " +
             std::to_string(st.num_slots) + " slots");
  check_positions(p.requests, st, /*at_run=*/true);

  const Device dev = options_.device;
  expect_tensor(x, "x", {DType::bf16}, {p.num_tokens(), spec_.hidden}, dev);
  if (dev.type == DeviceType::cuda && reinterpret_cast<std::uintptr_t>(x.data) % 16 != 0)
    reject("x: expected device data aligned to 16 bytes (the projection reads 16-byte vectors)");
  if (outputs.cache) {
    const TensorView& cache = *outputs.cache;
    const std::int64_t rows = cache.shape.empty() ? 0 : cache.shape[0];
    expect_tensor(cache, "outputs.cache", {DType::u8}, {rows, spec_.entry_bytes()}, dev);
    if (p.max_cache_location >= rows) {
      const auto at = std::find(p.cache_locations.begin(), p.cache_locations.end(), p.max_cache_location);
      reject(item("batch.cache_locations", static_cast<std::size_t>(at - p.cache_locations.begin())) +
             ": expected a row below " + std::to_string(rows) + " (the rows of outputs.cache), got " +
             std::to_string(p.max_cache_location));
    }
  }
  if (outputs.entries)
    expect_tensor(*outputs.entries, "outputs.entries", {DType::bf16},
                  {p.num_entries(), spec_.head_dim}, dev);
  if (dev.type == DeviceType::cuda) {  // the kernels store 2-byte values into entries and rows
    if (outputs.cache && reinterpret_cast<std::uintptr_t>(outputs.cache->data) % 8 != 0)
      reject("outputs.cache: expected device data aligned to 8 bytes");
    if (outputs.entries && reinterpret_cast<std::uintptr_t>(outputs.entries->data) % 2 != 0)
      reject("outputs.entries: expected device data aligned to 2 bytes");
  }
}

void Compressor::forward(const Batch& batch, const TensorView& x, StatePool& state,
                         const RunOutputs& outputs, void* stream) const {
  run(plan(batch, state), x, state, outputs, stream);
}

}  // namespace dsv4
