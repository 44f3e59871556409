#include "support/group.hpp"

#include <algorithm>

namespace dsv4::test {

std::vector<std::vector<std::vector<std::uint16_t>>> serve_group(const CompressorGroup& group,
                                                                  const std::vector<Sequence>& seqs,
                                                                  const Schedule& schedule, Buffers& buffers) {
  const std::size_t members = group.size();
  std::vector<std::unique_ptr<StatePool>> pools;
  std::vector<StatePool*> states;
  std::vector<const StatePool*> const_states;
  for (std::size_t m = 0; m < members; ++m) {
    pools.push_back(std::make_unique<StatePool>(group.member(m), static_cast<std::int64_t>(seqs.size())));
    states.push_back(pools.back().get());
    const_states.push_back(pools.back().get());
  }
  std::vector<std::vector<std::vector<std::uint16_t>>> out(members, std::vector<std::vector<std::uint16_t>>(seqs.size()));
  std::vector<std::int64_t> consumed(seqs.size(), 0);
  const std::int64_t hidden = group.member(0).spec().hidden;
  for (const auto& step : schedule) {
    std::vector<Batch> batches(members);
    std::vector<std::uint16_t> x;
    for (const auto& [i, take] : step) {
      for (std::size_t m = 0; m < members; ++m) {
        const std::int64_t r = group.member(m).spec().ratio;
        batches[m].add(static_cast<std::int64_t>(i), consumed[i], take);
        // Each member writes its entries to its own cache rows 0, 1, ... of this call.
        for (std::int64_t k = 0; k < windows_completed(consumed[i], take, r); ++k)
          batches[m].cache_locations.push_back(static_cast<std::int64_t>(batches[m].cache_locations.size()));
      }
      const std::uint16_t* src = seqs[i].x.data() + consumed[i] * hidden;
      x.insert(x.end(), src, src + take * hidden);
    }
    const GroupPlan plan = group.plan(batches, const_states);
    const TensorView xv = buffers.upload(x.data(), DType::bf16, {plan.num_tokens(), hidden});
    std::vector<RunOutputs> outputs(members);
    std::vector<TensorView> entries;
    for (std::size_t m = 0; m < members; ++m) {
      const CompressorSpec& spec = group.member(m).spec();
      const std::int64_t e = plan.plans()[m].num_entries();
      entries.push_back(buffers.poisoned(DType::bf16, {e, spec.head_dim}, 0xff));
      outputs[m].entries = entries.back();
      outputs[m].cache = buffers.poisoned(DType::u8, {std::max<std::int64_t>(e, 1), spec.entry_bytes()}, 0xff);
    }
    group.run(plan, xv, states, outputs);
    for (std::size_t m = 0; m < members; ++m) {
      const CompressorSpec& spec = group.member(m).spec();
      const Plan& p = plan.plans()[m];
      std::vector<std::uint16_t> got(static_cast<std::size_t>(p.num_entries() * spec.head_dim));
      buffers.download(entries[m], got.data());
      for (std::size_t r = 0; r < step.size(); ++r) {
        const std::int64_t count = windows_completed(p.requests()[r].start, p.requests()[r].num_tokens, spec.ratio);
        auto& dst = out[m][step[r].first];
        dst.insert(dst.end(), got.begin() + p.entry_offset(r) * spec.head_dim,
                   got.begin() + (p.entry_offset(r) + count) * spec.head_dim);
      }
    }
    for (const auto& [i, take] : step) consumed[i] += take;
  }
  return out;
}

}  // namespace dsv4::test
