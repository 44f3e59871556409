#include "support/serving.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/numerics.hpp"
#include "core/random_inputs.hpp"

namespace dsv4::test {

namespace {

// Tensors in dsv4::Buffer memory on any device.
class DeviceBuffers final : public Buffers {
 public:
  explicit DeviceBuffers(Device device) : device_(device) {}
  TensorView upload(const void* host, DType dtype, std::vector<std::int64_t> shape) override {
    TensorView t = poisoned(dtype, std::move(shape), 0);
    store_.back().upload(host, t.nbytes());
    return t;
  }
  TensorView poisoned(DType dtype, std::vector<std::int64_t> shape, std::uint8_t poison) override {
    std::size_t bytes = dtype_size(dtype);
    for (std::int64_t d : shape) bytes *= static_cast<std::size_t>(d);
    store_.emplace_back(device_, bytes + 16);
    store_.back().fill(poison);
    return store_.back().view(dtype, std::move(shape));
  }
  void download(const TensorView& t, void* host) override {
    for (const Buffer& b : store_)
      if (b.data() == t.data) return b.download(host, t.nbytes());
    throw Error("download: not a tensor of these buffers");
  }

 private:
  Device device_;
  std::vector<Buffer> store_;
};

constexpr std::uint8_t kPoison = 0xff;  // bf16 0xffff is NaN; cache rows of 0xff never occur

}  // namespace

std::unique_ptr<Buffers> host_buffers() { return device_buffers(Device::cpu()); }
std::unique_ptr<Buffers> device_buffers(Device device) { return std::make_unique<DeviceBuffers>(device); }

std::vector<Sequence> random_sequences(std::int64_t count, std::int64_t min_len, std::int64_t max_len,
                                       std::int64_t hidden, std::mt19937_64& rng) {
  std::uniform_int_distribution<std::int64_t> len(min_len, max_len);
  std::vector<Sequence> out(static_cast<std::size_t>(count));
  for (auto& s : out) {
    s.length = len(rng);
    s.x = random_x(s.length, hidden, rng);
  }
  return out;
}

Schedule whole_schedule(const std::vector<Sequence>& seqs) {
  Schedule s(1);
  for (std::size_t i = 0; i < seqs.size(); ++i) s[0].emplace_back(i, seqs[i].length);
  return s;
}

Schedule random_schedule(const std::vector<Sequence>& seqs, std::mt19937_64& rng) {
  std::vector<std::int64_t> left;
  for (const auto& s : seqs) left.push_back(s.length);
  Schedule schedule;
  std::bernoulli_distribution joins(0.7);
  std::uniform_int_distribution<int> kind(0, 9);
  while (std::any_of(left.begin(), left.end(), [](std::int64_t l) { return l > 0; })) {
    std::vector<std::pair<std::size_t, std::int64_t>> step;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      if (left[i] == 0 || !joins(rng)) continue;
      std::int64_t take;
      switch (kind(rng)) {
        case 0: case 1: case 2: take = 1; break;                                // decode
        case 3: case 4: take = std::uniform_int_distribution<std::int64_t>(2, 8)(rng); break;  // multi-token
        case 5: case 6: take = std::uniform_int_distribution<std::int64_t>(9, 200)(rng); break;  // chunk
        case 7: take = 4; break;
        default: take = left[i]; break;                                         // the rest
      }
      take = std::min(take, left[i]);
      step.emplace_back(i, take);
      left[i] -= take;
    }
    if (!step.empty()) schedule.push_back(std::move(step));
  }
  return schedule;
}

Schedule small_step_schedule(const std::vector<Sequence>& seqs, std::mt19937_64& rng, std::int64_t max_call_tokens) {
  std::vector<std::int64_t> left;
  for (const auto& s : seqs) left.push_back(s.length);
  Schedule schedule;
  std::bernoulli_distribution joins(0.8);
  std::uniform_int_distribution<int> kind(0, 9);
  while (std::any_of(left.begin(), left.end(), [](std::int64_t l) { return l > 0; })) {
    std::vector<std::pair<std::size_t, std::int64_t>> step;
    std::int64_t room = max_call_tokens;
    for (std::size_t i = 0; i < seqs.size() && room > 0; ++i) {
      if (left[i] == 0 || !joins(rng)) continue;
      const int k = kind(rng);
      std::int64_t take = k < 5 ? 1 : k < 9 ? std::uniform_int_distribution<std::int64_t>(2, 8)(rng)
                                            : std::uniform_int_distribution<std::int64_t>(9, 64)(rng);
      take = std::min({take, left[i], room});
      step.emplace_back(i, take);
      left[i] -= take;
      room -= take;
    }
    if (!step.empty()) schedule.push_back(std::move(step));
  }
  return schedule;
}

Schedule decode_schedule(const std::vector<Sequence>& seqs, std::size_t batch) {
  std::vector<std::int64_t> left;
  for (const auto& s : seqs) left.push_back(s.length);
  Schedule schedule;
  for (;;) {
    std::vector<std::pair<std::size_t, std::int64_t>> step;
    for (std::size_t i = 0; i < seqs.size() && step.size() < batch; ++i)
      if (left[i] > 0) step.emplace_back(i, 1), --left[i];
    if (step.empty()) return schedule;
    schedule.push_back(std::move(step));
  }
}

Schedule arrival_schedule(const std::vector<Sequence>& seqs, std::mt19937_64& rng, std::size_t max_active) {
  std::vector<std::int64_t> left;
  for (const auto& s : seqs) left.push_back(s.length);
  std::vector<std::size_t> active;
  std::size_t next = 0;
  Schedule schedule;
  std::uniform_int_distribution<int> kind(0, 9);
  std::bernoulli_distribution admit(0.5);
  while (next < seqs.size() || !active.empty()) {
    while (next < seqs.size() && active.size() < max_active && (active.empty() || admit(rng))) active.push_back(next++);
    std::vector<std::pair<std::size_t, std::int64_t>> step;
    for (std::size_t i : active) {
      std::int64_t take;
      const int k = kind(rng);
      if (left[i] == seqs[i].length) take = std::uniform_int_distribution<std::int64_t>(1, 64)(rng);  // prefill chunk
      else if (k < 6) take = 1;                                                                    // decode
      else if (k < 9) take = std::uniform_int_distribution<std::int64_t>(2, 8)(rng);               // multi-token
      else take = std::uniform_int_distribution<std::int64_t>(9, 64)(rng);                          // chunk
      take = std::min(take, left[i]);
      step.emplace_back(i, take);
      left[i] -= take;
    }
    std::erase_if(active, [&](std::size_t i) { return left[i] == 0; });
    schedule.push_back(std::move(step));
  }
  return schedule;
}

Served serve(const Compressor& compressor, const std::vector<Sequence>& seqs, const Schedule& schedule,
             Buffers& buffers, std::mt19937_64& rng, std::int64_t pool_slots) {
  const CompressorSpec& spec = compressor.spec();
  const std::int64_t hd = spec.head_dim, entry_bytes = spec.entry_bytes();
  const auto n = static_cast<std::int64_t>(seqs.size());

  // A pool with spare slots, handed out in random order and reused once a request finishes.
  StatePool state(compressor, pool_slots > 0 ? pool_slots : 2 * n + 3);
  std::vector<std::int64_t> free_slots(static_cast<std::size_t>(state.num_slots()));
  std::iota(free_slots.begin(), free_slots.end(), 0);
  std::shuffle(free_slots.begin(), free_slots.end(), rng);
  std::vector<std::int64_t> slot_of(seqs.size(), -1), consumed(seqs.size(), 0);

  // One paged cache for everything; every entry gets a random row.
  std::int64_t total_entries = 0;
  for (const auto& s : seqs) total_entries += s.length / spec.ratio;
  const std::int64_t cache_rows = total_entries + 7;
  std::vector<std::int64_t> rows(static_cast<std::size_t>(cache_rows));
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), rng);
  std::size_t next_row = 0;
  std::vector<std::vector<std::int64_t>> row_of(seqs.size());
  TensorView cache = buffers.poisoned(DType::u8, {cache_rows, entry_bytes}, kPoison);

  Served out;
  out.entries.resize(seqs.size());
  out.cache.resize(seqs.size());
  for (std::size_t i = 0; i < seqs.size(); ++i)
    out.entries[i].resize(static_cast<std::size_t>(seqs[i].length / spec.ratio * hd));

  for (const auto& step : schedule) {
    Batch batch;
    std::vector<std::uint16_t> x;
    for (const auto& [i, take] : step) {
      if (slot_of[i] < 0) {
        slot_of[i] = free_slots.back();
        free_slots.pop_back();
      }
      batch.add(slot_of[i], consumed[i], take);
      for (std::int64_t w = 0; w < windows_completed(consumed[i], take, spec.ratio); ++w) {
        batch.cache_locations.push_back(rows[next_row]);
        row_of[i].push_back(rows[next_row++]);
      }
      const std::uint16_t* src = seqs[i].x.data() + consumed[i] * spec.hidden;
      x.insert(x.end(), src, src + take * spec.hidden);
    }
    const Plan plan = compressor.plan(batch, state);
    const TensorView xv = buffers.upload(x.data(), DType::bf16, {plan.num_tokens(), spec.hidden});
    const TensorView entries = buffers.poisoned(DType::bf16, {plan.num_entries(), hd}, kPoison);
    compressor.run(plan, xv, state, {.cache = cache, .entries = entries});
    std::vector<std::uint16_t> got(static_cast<std::size_t>(plan.num_entries() * hd));
    buffers.download(entries, got.data());
    for (std::uint16_t v : got)
      if (!std::isfinite(num::f32_from_bf16(v))) {
        out.problems += "call " + std::to_string(out.calls) + ": an entry value is unwritten or not finite\n";
        break;
      }
    for (std::size_t r = 0; r < step.size(); ++r) {
      const std::size_t i = step[r].first;
      const Request& req = plan.requests()[r];
      const std::int64_t count = windows_completed(req.start, req.num_tokens, spec.ratio);
      std::copy(got.begin() + plan.entry_offset(r) * hd, got.begin() + (plan.entry_offset(r) + count) * hd,
                out.entries[i].begin() + req.start / spec.ratio * hd);
      consumed[i] += req.num_tokens;
      if (consumed[i] == seqs[i].length) {
        state.release(slot_of[i]);
        free_slots.insert(free_slots.begin() + static_cast<std::ptrdiff_t>(rng() % (free_slots.size() + 1)), slot_of[i]);
      }
    }
    out.calls++;
  }
  std::vector<std::uint8_t> all(static_cast<std::size_t>(cache_rows * entry_bytes));
  buffers.download(cache, all.data());
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    for (std::int64_t row : row_of[i])
      out.cache[i].insert(out.cache[i].end(), all.begin() + row * entry_bytes, all.begin() + (row + 1) * entry_bytes);
    if (consumed[i] != seqs[i].length) out.problems += "sequence " + std::to_string(i) + " not consumed\n";
  }
  // Rows no entry was planned for must still hold the poison.
  std::vector<bool> used(static_cast<std::size_t>(cache_rows), false);
  for (const auto& r : row_of)
    for (std::int64_t row : r) used[static_cast<std::size_t>(row)] = true;
  for (std::int64_t row = 0; row < cache_rows; ++row)
    if (!used[static_cast<std::size_t>(row)])
      for (std::int64_t b = 0; b < entry_bytes; ++b)
        if (all[static_cast<std::size_t>(row * entry_bytes + b)] != kPoison) {
          out.problems += "cache row " + std::to_string(row) + " was written though no entry went there\n";
          break;
        }
  return out;
}

}  // namespace dsv4::test
