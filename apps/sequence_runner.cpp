#include "sequence_runner.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace dsv4::app {

Schedule uniform_chunks(const std::vector<std::int64_t>& lengths,
                        const std::vector<std::int64_t>& chunks) {
  Schedule schedule;
  std::vector<std::int64_t> consumed(lengths.size(), 0);
  for (std::size_t call = 0;; ++call) {
    const std::int64_t chunk =
        chunks.empty() ? std::int64_t{1} << 40 : chunks[std::min(call, chunks.size() - 1)];
    Step step;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      const std::int64_t take = std::min(chunk, lengths[i] - consumed[i]);
      if (take <= 0) continue;
      step.emplace_back(i, take);
      consumed[i] += take;
    }
    if (step.empty()) return schedule;
    schedule.push_back(std::move(step));
  }
}

std::vector<SequenceOutput> run_sequences(const Compressor& compressor,
                                          const std::vector<Sequence>& sequences,
                                          const Schedule& schedule, RunStats* stats) {
  const CompressorSpec& spec = compressor.spec();
  const std::int64_t hd = spec.head_dim;
  const std::int64_t entry_bytes = spec.entry_bytes();
  StatePool state(compressor, std::max<std::int64_t>(static_cast<std::int64_t>(sequences.size()), 1));

  std::vector<SequenceOutput> out(sequences.size());
  for (std::size_t i = 0; i < sequences.size(); ++i) {
    const std::int64_t e = sequences[i].length / spec.ratio;
    out[i].entries.resize(static_cast<std::size_t>(e * hd));
    out[i].cache.resize(static_cast<std::size_t>(e * entry_bytes));
  }
  std::vector<std::int64_t> consumed(sequences.size(), 0);
  RunStats local;
  for (const Step& step : schedule) {
    Batch batch;
    std::vector<std::uint16_t> x;
    for (const auto& [i, take] : step) {
      batch.add(static_cast<std::int64_t>(i), consumed[i], take);
      const std::uint16_t* src = sequences[i].x + consumed[i] * spec.hidden;
      x.insert(x.end(), src, src + take * spec.hidden);
    }
    // This call's entries go to rows 0.. of a scratch cache, in plan order.
    std::int64_t entries = 0;
    for (const Request& r : batch.requests) entries += windows_completed(r.start, r.num_tokens, spec.ratio);
    for (std::int64_t k = 0; k < entries; ++k) batch.cache_locations.push_back(k);
    std::vector<std::uint16_t> finished(static_cast<std::size_t>(entries * hd));
    std::vector<std::uint8_t> cache(static_cast<std::size_t>(entries * entry_bytes));

    // x, entries and cache live where the compressor runs.
    const Plan plan = compressor.plan(batch, state);
    const Device device = compressor.options().device;
    Buffer x_dev(device, x.size() * 2), finished_dev(device, finished.size() * 2), cache_dev(device, cache.size());
    x_dev.upload(x.data(), x.size() * 2);
    const auto t0 = std::chrono::steady_clock::now();
    compressor.run(plan, x_dev.view(DType::bf16, {plan.num_tokens(), spec.hidden}), state,
                   {.cache = cache_dev.view(DType::u8, {entries, entry_bytes}),
                    .entries = finished_dev.view(DType::bf16, {entries, hd})});
    finished_dev.download(finished.data(), finished.size() * 2);  // waits for the run
    cache_dev.download(cache.data(), cache.size());
    local.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    local.calls += 1;
    local.tokens += plan.num_tokens();
    local.entries += entries;

    for (std::size_t r = 0; r < step.size(); ++r) {
      const std::size_t i = step[r].first;
      const Request& req = batch.requests[r];
      const std::int64_t first = req.start / spec.ratio;
      const std::int64_t count = windows_completed(req.start, req.num_tokens, spec.ratio);
      const std::int64_t k0 = plan.entry_offset(r);
      std::copy_n(finished.begin() + k0 * hd, count * hd, out[i].entries.begin() + first * hd);
      std::copy_n(cache.begin() + k0 * entry_bytes, count * entry_bytes, out[i].cache.begin() + first * entry_bytes);
      consumed[i] += req.num_tokens;
    }
  }
  for (std::size_t i = 0; i < sequences.size(); ++i)
    if (consumed[i] != sequences[i].length)
      throw Error("schedule: sequence " + std::to_string(i) + " has " +
                  std::to_string(sequences[i].length) + " tokens but the schedule appends " +
                  std::to_string(consumed[i]));
  if (stats) *stats = local;
  return out;
}

}  // namespace dsv4::app
