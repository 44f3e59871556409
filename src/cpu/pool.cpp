#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/numerics.hpp"
#include "cpu/stages.hpp"

namespace dsv4::cpu {

namespace {

// Reads the kv_score row of one token of a request: from this call's projection when the token
// is new, else from the request's state slot (converted to fp32 into `scratch`).
class RowReader {
 public:
  RowReader(const detail::PlanData& plan, const float* kv_score, const detail::StateData& state)
      : plan_(plan), kv_score_(kv_score), state_(state), width_(state.row_elems) {}

  const float* row(std::size_t request, std::int64_t position, float* scratch) const {
    const Request& r = plan_.requests[request];
    if (position >= r.start)
      return kv_score_ + (plan_.token_offsets[request] + position - r.start) * width_;
    const std::int64_t ring_row = position % state_.ring_rows;
    const char* slot = static_cast<const char*>(state_.memory) +
                       static_cast<std::size_t>(r.slot) * state_.slot_bytes;
    if (state_.precision.state == DType::f32)
      return reinterpret_cast<const float*>(slot) + ring_row * width_;
    const auto* src = reinterpret_cast<const std::uint16_t*>(slot) + ring_row * width_;
    for (std::int64_t c = 0; c < width_; ++c) scratch[c] = num::f32_from_bf16(src[c]);
    return scratch;
  }

 private:
  const detail::PlanData& plan_;
  const float* kv_score_;
  const detail::StateData& state_;
  std::int64_t width_;
};

// One softmax slot of a window: where its value, score and positional bias are.
struct Slot {
  const float* kv;
  const float* score;
  const float* ape;
};

}  // namespace

void pool_windows(const detail::PlanData& plan, const float* kv_score,
                  const detail::StateData& state, const float* ape, float* pooled) {
  const CompressorSpec& spec = plan.spec;
  const std::int64_t r = spec.ratio;
  const std::int64_t hd = spec.head_dim;
  const std::int64_t half = spec.coff() * hd;  // score columns start here; ape row width
  const std::int64_t width = spec.projection_width();
  const std::int64_t num_slots = spec.overlap() ? 2 * r : r;
  const RowReader reader(plan, kv_score, state);
  const auto entries = plan.num_entries();

#pragma omp parallel
  {
    std::vector<float> scratch(static_cast<std::size_t>(num_slots * width));
    std::vector<Slot> slots;
    std::vector<float> mx(static_cast<std::size_t>(hd)), sum(mx.size()), acc(mx.size());
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t e = 0; e < entries; ++e) {
      const auto request = static_cast<std::size_t>(plan.entry_request[static_cast<std::size_t>(e)]);
      const std::int64_t w = plan.entry_window[static_cast<std::size_t>(e)];
      slots.clear();
      for (std::int64_t j = 0; j < num_slots; ++j) {
        std::int64_t position, channel0, ape_row;
        if (!spec.overlap()) {
          position = w * r + j, channel0 = 0, ape_row = j;
        } else if (j < r) {  // previous window, channel half 0; absent for the first window
          if (w == 0) continue;
          position = (w - 1) * r + j, channel0 = 0, ape_row = j;
        } else {  // current window, channel half 1
          position = w * r + (j - r), channel0 = hd, ape_row = j - r;
        }
        const float* row = reader.row(request, position, scratch.data() + j * width);
        slots.push_back({row + channel0, row + half + channel0, ape + ape_row * half + channel0});
      }
      // Stable softmax over the slots, per channel, then the weighted sum of values.
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(sum.begin(), sum.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const Slot& s : slots)
        for (std::int64_t d = 0; d < hd; ++d) mx[d] = std::max(mx[d], s.score[d] + s.ape[d]);
      for (const Slot& s : slots)
        for (std::int64_t d = 0; d < hd; ++d) {
          const float p = std::exp(s.score[d] + s.ape[d] - mx[d]);
          sum[d] += p;
          acc[d] += p * s.kv[d];
        }
      float* out = pooled + e * hd;
      for (std::int64_t d = 0; d < hd; ++d) out[d] = acc[d] / sum[d];
    }
  }
}

void update_state(const detail::PlanData& plan, const float* kv_score, detail::StateData& state) {
  const CompressorSpec& spec = plan.spec;
  const std::int64_t r = spec.ratio;
  const std::int64_t width = state.row_elems;
  const auto requests = static_cast<std::int64_t>(plan.requests.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t i = 0; i < requests; ++i) {
    const Request& req = plan.requests[static_cast<std::size_t>(i)];
    const std::int64_t end = req.start + req.num_tokens;
    const std::int64_t last_window_start = (end / r) * r;
    // Later windows need the incomplete window and, with overlap, the last complete one.
    const std::int64_t keep_from =
        spec.overlap() ? std::max<std::int64_t>(0, last_window_start - r) : last_window_start;
    char* slot = static_cast<char*>(state.memory) + static_cast<std::size_t>(req.slot) * state.slot_bytes;
    for (std::int64_t q = std::max(req.start, keep_from); q < end; ++q) {
      const float* src = kv_score + (plan.token_offsets[static_cast<std::size_t>(i)] + q - req.start) * width;
      const std::int64_t ring_row = q % state.ring_rows;
      if (state.precision.state == DType::f32) {
        std::memcpy(reinterpret_cast<float*>(slot) + ring_row * width, src,
                    static_cast<std::size_t>(width) * sizeof(float));
      } else {
        auto* dst = reinterpret_cast<std::uint16_t*>(slot) + ring_row * width;
        for (std::int64_t c = 0; c < width; ++c) dst[c] = num::bf16_from_f32(src[c]);
      }
    }
  }
}

namespace {

// Online softmax over the tokens of one channel: running max, sum and weighted sum.
struct Running {
  float m = -std::numeric_limits<float>::infinity(), s = 0.0f, a = 0.0f;
  void add(float logit, float value) {
    const float m2 = std::max(m, logit);
    const float old = std::exp(m - m2), p = std::exp(logit - m2);
    s = s * old + p;
    a = a * old + p * value;
    m = m2;
  }
};

// A slot's accumulators: m, s and a, each [head_dim] fp32.
float* accumulators(const detail::StateData& state, std::int64_t slot) {
  return reinterpret_cast<float*>(static_cast<char*>(state.memory) + static_cast<std::size_t>(slot) * state.slot_bytes);
}

// Accumulates the tokens [from, to) of window w (first position w0) of request i into acc,
// starting from the slot's accumulators when the window began before this call.
void accumulate(const detail::PlanData& plan, std::size_t i, std::int64_t w0, std::int64_t to, const float* kv_score,
                const detail::StateData& state, const float* ape, std::vector<Running>& acc) {
  const CompressorSpec& spec = plan.spec;
  const std::int64_t hd = spec.head_dim, width = spec.projection_width();
  const Request& r = plan.requests[i];
  acc.assign(static_cast<std::size_t>(hd), Running{});
  if (w0 < r.start) {
    const float* st = accumulators(state, r.slot);
    for (std::int64_t d = 0; d < hd; ++d) acc[static_cast<std::size_t>(d)] = {st[d], st[hd + d], st[2 * hd + d]};
  }
  for (std::int64_t q = std::max(w0, r.start); q < to; ++q) {
    const float* row = kv_score + (plan.token_offsets[i] + q - r.start) * width;
    const float* bias = ape + (q - w0) * hd;
    for (std::int64_t d = 0; d < hd; ++d) acc[static_cast<std::size_t>(d)].add(row[hd + d] + bias[d], row[d]);
  }
}

}  // namespace

void pool_windows_running(const detail::PlanData& plan, const float* kv_score, const detail::StateData& state,
                          const float* ape, float* pooled) {
  const std::int64_t r = plan.spec.ratio, hd = plan.spec.head_dim;
  const auto entries = plan.num_entries();
#pragma omp parallel
  {
    std::vector<Running> acc;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t e = 0; e < entries; ++e) {
      const auto i = static_cast<std::size_t>(plan.entry_request[static_cast<std::size_t>(e)]);
      const std::int64_t w0 = plan.entry_window[static_cast<std::size_t>(e)] * r;
      accumulate(plan, i, w0, w0 + r, kv_score, state, ape, acc);
      for (std::int64_t d = 0; d < hd; ++d) pooled[e * hd + d] = acc[static_cast<std::size_t>(d)].a / acc[static_cast<std::size_t>(d)].s;
    }
  }
}

void update_state_running(const detail::PlanData& plan, const float* kv_score, detail::StateData& state,
                          const float* ape) {
  const std::int64_t r = plan.spec.ratio, hd = plan.spec.head_dim;
  const auto requests = static_cast<std::int64_t>(plan.requests.size());
#pragma omp parallel
  {
    std::vector<Running> acc;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < requests; ++i) {
      const Request& req = plan.requests[static_cast<std::size_t>(i)];
      const std::int64_t end = req.start + req.num_tokens;
      if (end % r == 0) continue;  // no incomplete window to keep
      accumulate(plan, static_cast<std::size_t>(i), (end / r) * r, end, kv_score, state, ape, acc);
      float* st = accumulators(state, req.slot);
      for (std::int64_t d = 0; d < hd; ++d) {
        st[d] = acc[static_cast<std::size_t>(d)].m;
        st[hd + d] = acc[static_cast<std::size_t>(d)].s;
        st[2 * hd + d] = acc[static_cast<std::size_t>(d)].a;
      }
    }
  }
}

}  // namespace dsv4::cpu
