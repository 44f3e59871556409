// CompressorGroup: one projection for compressors that read the same x.
#include <algorithm>

#include "core/internal.hpp"
#include "core/validate.hpp"

namespace dsv4 {

CompressorGroup::CompressorGroup(std::vector<const Compressor*> members) : members_(std::move(members)) {
  if (members_.empty()) reject("members: expected at least one compressor");
  const Compressor& first = *members_[0];
  std::vector<const Backend*> backends;
  std::int64_t offset = 0;
  for (std::size_t i = 0; i < members_.size(); ++i) {
    const Compressor* m = members_[i];
    const std::string name = "members[" + std::to_string(i) + "]";
    if (!m) reject(name + ": expected a compressor, got null");
    if (m->spec().hidden != first.spec().hidden)
      reject(name + ": expected hidden " + std::to_string(first.spec().hidden) + " like members[0], got " +
             std::to_string(m->spec().hidden));
    if (!(m->options().device == first.options().device))
      reject(name + ": expected device " + device_name(first.options().device) + " like members[0], got " +
             device_name(m->options().device));
    if (m->options().precision.kv_score != first.options().precision.kv_score)
      reject(name + ": expected kv_score " + std::string(dtype_name(first.options().precision.kv_score)) +
             " like members[0]");
    for (std::size_t j = 0; j < i; ++j)
      if (members_[j] == m) reject(name + ": the same compressor as members[" + std::to_string(j) + "]");
    backends.push_back(&m->backend());
    column_offsets_.push_back(offset);
    offset += m->spec().projection_width();
  }
  projection_ = first.backend().make_group_projection(backends);
}

CompressorGroup::~CompressorGroup() = default;
CompressorGroup::CompressorGroup(CompressorGroup&&) noexcept = default;
CompressorGroup& CompressorGroup::operator=(CompressorGroup&&) noexcept = default;

GroupPlan CompressorGroup::plan(const std::vector<Batch>& batches, const std::vector<const StatePool*>& states) const {
  if (batches.size() != members_.size())
    reject("batches: expected " + std::to_string(members_.size()) + " (one per member), got " +
           std::to_string(batches.size()));
  if (states.size() != members_.size())
    reject("states: expected " + std::to_string(members_.size()) + " (one per member), got " +
           std::to_string(states.size()));
  // The members read the same rows of x, so the same requests must append the same tokens.
  for (std::size_t m = 1; m < batches.size(); ++m) {
    const auto& a = batches[0].requests;
    const auto& b = batches[m].requests;
    if (a.size() != b.size())
      reject("batches[" + std::to_string(m) + "]: expected " + std::to_string(a.size()) +
             " requests like batches[0], got " + std::to_string(b.size()));
    for (std::size_t i = 0; i < a.size(); ++i)
      if (a[i].start != b[i].start || a[i].num_tokens != b[i].num_tokens)
        reject("batches[" + std::to_string(m) + "].requests[" + std::to_string(i) +
               "]: expected start " + std::to_string(a[i].start) + " and " + std::to_string(a[i].num_tokens) +
               " tokens like batches[0], got start " + std::to_string(b[i].start) + " and " +
               std::to_string(b[i].num_tokens));
  }
  GroupPlan out;
  for (std::size_t m = 0; m < members_.size(); ++m) {
    if (!states[m]) reject("states[" + std::to_string(m) + "]: expected a state pool, got null");
    out.plans_.push_back(members_[m]->make_plan(batches[m], *states[m], /*own_rows=*/false));
  }
  std::vector<const detail::PlanData*> datas;
  for (const Plan& p : out.plans_) datas.push_back(&p.data());
  out.fused_ = projection_->prepare_fused(datas);
  if (!out.fused_) {
    out.rows_ = projection_->allocate_rows(out.num_tokens());
    out.compress_ = projection_->prepare_compress(datas);
    out.compress_step_ = out.compress_ && projection_->compress_runs_step(out.compress_.get());
  }
  out.owner_ = this;
  return out;
}

void CompressorGroup::run(const GroupPlan& plan, const TensorView& x, const std::vector<StatePool*>& states,
                          const std::vector<RunOutputs>& outputs, void* stream) const {
  if (plan.owner_ != this) reject("plan: expected a plan made by this group");
  if (states.size() != members_.size() || outputs.size() != members_.size())
    reject("states, outputs: expected one per member (" + std::to_string(members_.size()) + ")");
  for (std::size_t m = 0; m < members_.size(); ++m) {
    if (!states[m]) reject("states[" + std::to_string(m) + "]: expected a state pool, got null");
    members_[m]->check_run(plan.plans_[m], x, *states[m], outputs[m]);
  }
  std::vector<detail::StateData*> datas;
  for (StatePool* s : states) datas.push_back(&s->data());
  if (plan.fused_) {
    projection_->run_fused(plan.fused_.get(), x, datas, outputs, stream);
    for (std::size_t m = 0; m < members_.size(); ++m) members_[m]->advance(plan.plans_[m], *states[m]);
    return;
  }
  projection_->run(x, plan.rows_.get(), stream);
  const std::size_t elem = dtype_size(projection_->dtype());
  std::vector<KvScoreRows> rows;  // each member's columns of the shared rows
  for (std::size_t m = 0; m < members_.size(); ++m)
    rows.push_back({static_cast<const char*>(plan.rows_.get()) + column_offsets_[m] * static_cast<std::int64_t>(elem),
                    projection_->dtype(), projection_->width()});
  if (plan.compress_)
    projection_->run_compress(plan.compress_.get(), rows, datas, outputs, stream);
  else
    for (std::size_t m = 0; m < members_.size(); ++m)
      members_[m]->backend().compress(plan.plans_[m].data(), rows[m], states[m]->data(), outputs[m], stream);
  for (std::size_t m = 0; m < members_.size(); ++m) members_[m]->advance(plan.plans_[m], *states[m]);
}

}  // namespace dsv4
