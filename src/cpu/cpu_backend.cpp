// The CPU backend: the semantic reference of the tree. Stages run one after another over the
// whole batch: projection, pooling, state update, then norm/RoPE/rotation and packing.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "core/entry_format.hpp"
#include "core/numerics.hpp"
#include "core/rope.hpp"
#include "cpu/stages.hpp"

namespace dsv4 {

namespace {

class CpuBackend final : public Backend {
 public:
  CpuBackend(const CompressorSpec& spec, const HostWeights& weights, Precision precision)
      : spec_(spec), precision_(precision), ape_(weights.ape), norm_(weights.norm),
        inv_freq_(yarn_inv_freq(spec.rope)) {
    // OpenBLAS multiplies fp32: upcast the bf16 weights once, here, not on every call.
    w_.resize(weights.wkv_gate.size());
    for (std::size_t i = 0; i < w_.size(); ++i) w_[i] = num::f32_from_bf16(weights.wkv_gate[i]);
  }

  std::shared_ptr<void> allocate_zeroed(std::size_t bytes) const override {
    void* p = ::operator new(bytes == 0 ? 1 : bytes);
    std::memset(p, 0, bytes);
    return std::shared_ptr<void>(p, [](void* q) { ::operator delete(q); });
  }

  void run(const detail::PlanData& plan, const TensorView& x, detail::StateData& state,
           const RunOutputs& outputs, void* stream) const override {
    const std::int64_t width = spec_.projection_width();
    std::vector<float> kv_score(static_cast<std::size_t>(plan.num_tokens() * width));
    cpu::project(x.as<const std::uint16_t>(), plan.num_tokens(), spec_.hidden, w_.data(), width,
                 precision_.kv_score == DType::bf16, kv_score.data());
    compress(plan, {kv_score.data(), DType::f32, width}, state, outputs, stream);
  }

  void compress(const detail::PlanData& plan, const KvScoreRows& rows, detail::StateData& state,
                const RunOutputs& outputs, void* /*stream*/) const override {
    const std::int64_t tokens = plan.num_tokens();
    const std::int64_t entries = plan.num_entries();
    const std::int64_t width = spec_.projection_width();
    const std::int64_t hd = spec_.head_dim;
    // The stages read contiguous fp32 rows. A bf16 state means every kv/score value is rounded
    // to bf16 before pooling, whether or not it passes through the state, so that results
    // never depend on where calls split.
    const bool round = precision_.state == DType::bf16 && precision_.kv_score == DType::f32;
    const float* kv_score = static_cast<const float*>(rows.data);
    std::vector<float> local;
    if (round || rows.ld != width) {
      local.resize(static_cast<std::size_t>(tokens * width));
#pragma omp parallel for schedule(static)
      for (std::int64_t t = 0; t < tokens; ++t)
        for (std::int64_t c = 0; c < width; ++c) {
          const float v = kv_score[t * rows.ld + c];
          local[static_cast<std::size_t>(t * width + c)] = round ? num::round_to_bf16(v) : v;
        }
      kv_score = local.data();
    }

    std::vector<float> pooled(static_cast<std::size_t>(entries * hd));
    if (state.running) {
      cpu::pool_windows_running(plan, kv_score, state, ape_.data(), pooled.data());
      cpu::update_state_running(plan, kv_score, state, ape_.data());
    } else {
      cpu::pool_windows(plan, kv_score, state, ape_.data(), pooled.data());
      cpu::update_state(plan, kv_score, state);
    }

    const std::int64_t entry_bytes = spec_.entry_bytes();
    std::vector<std::uint16_t> scratch;
    std::uint16_t* finished = outputs.entries ? outputs.entries->as<std::uint16_t>() : nullptr;
    if (!finished) {
      scratch.resize(static_cast<std::size_t>(entries * hd));
      finished = scratch.data();
    }
#pragma omp parallel for schedule(dynamic, 4)
    for (std::int64_t e = 0; e < entries; ++e) {
      const std::int64_t position = plan.entry_window[static_cast<std::size_t>(e)] * spec_.ratio;
      std::uint16_t* entry = finished + e * hd;
      cpu::finish_entry(spec_, norm_.data(), inv_freq_.data(), pooled.data() + e * hd, position, entry);
      if (outputs.cache) {
        auto* row = outputs.cache->as<std::uint8_t>() +
                    plan.cache_locations[static_cast<std::size_t>(e)] * entry_bytes;
        pack_entry(spec_, entry, row);
      }
    }
  }

  std::unique_ptr<GroupProjection> make_group_projection(const std::vector<const Backend*>& members) const override;

  const CompressorSpec& spec() const { return spec_; }
  const std::vector<float>& weights_f32() const { return w_; }
  const void* projection_weights() const override { return w_.data(); }
  DType kv_score_dtype() const { return precision_.kv_score; }

 private:
  CompressorSpec spec_;
  Precision precision_;
  std::vector<float> w_;  // [projection_width, hidden]
  std::vector<float> ape_;
  std::vector<float> norm_;
  std::vector<float> inv_freq_;
};

// x @ [w_1; w_2; ...]^T into fp32 rows, with the same kernel as a lone compressor.
class CpuGroupProjection final : public GroupProjection {
 public:
  CpuGroupProjection(std::vector<float> w, std::int64_t width, std::int64_t hidden, DType dtype)
      : w_(std::move(w)), width_(width), hidden_(hidden), dtype_(dtype) {}
  std::int64_t width() const override { return width_; }
  DType dtype() const override { return DType::f32; }  // bf16 kv_score is kept as rounded fp32
  std::shared_ptr<void> allocate_rows(std::int64_t tokens) const override {
    return std::shared_ptr<void>(new float[static_cast<std::size_t>(std::max<std::int64_t>(tokens * width_, 1))],
                                 [](void* p) { delete[] static_cast<float*>(p); });
  }
  void run(const TensorView& x, void* rows, void*) const override {
    cpu::project(x.as<const std::uint16_t>(), x.shape[0], hidden_, w_.data(), width_, dtype_ == DType::bf16,
                 static_cast<float*>(rows));
  }

 private:
  std::vector<float> w_;
  std::int64_t width_, hidden_;
  DType dtype_;
};

std::unique_ptr<GroupProjection> CpuBackend::make_group_projection(const std::vector<const Backend*>& members) const {
  std::vector<float> w;
  std::int64_t width = 0;
  for (const Backend* m : members) {
    const auto& cpu = static_cast<const CpuBackend&>(*m);
    w.insert(w.end(), cpu.weights_f32().begin(), cpu.weights_f32().end());
    width += cpu.spec().projection_width();
  }
  return std::make_unique<CpuGroupProjection>(std::move(w), width, spec_.hidden, precision_.kv_score);
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CompressorSpec& spec, const HostWeights& weights,
                                          Precision precision) {
  return std::make_unique<CpuBackend>(spec, weights, precision);
}

}  // namespace dsv4
