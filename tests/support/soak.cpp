#include "support/soak.hpp"

#include <gtest/gtest.h>

#include "support/reference.hpp"

namespace dsv4::test {

SoakResult soak(const Compressor& comp, const RandomWeights& w, std::int64_t sequences, Buffers& buffers,
                std::mt19937_64& rng) {
  const CompressorSpec& spec = comp.spec();
  const Precision p = comp.options().precision;
  const std::string what = spec.describe();
  const auto seqs = random_sequences(sequences, 1, spec.ratio == 4 ? 300 : 700, spec.hidden, rng);
  const auto schedule = arrival_schedule(seqs, rng, 12);
  const Served served = serve(comp, seqs, schedule, buffers, rng, /*pool_slots=*/16);
  const Served whole = serve(comp, seqs, whole_schedule(seqs), buffers, rng);
  SoakResult out;
  out.steps = schedule.size();
  EXPECT_EQ(served.problems, "") << what;
  std::vector<std::uint16_t> all;
  std::vector<double> ref;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_EQ(served.entries[i], whole.entries[i]) << what << " sequence " << i;
    EXPECT_EQ(served.cache[i], whole.cache[i]) << what << " sequence " << i;
    const auto r = reference_entries(spec, w, seqs[i].x.data(), seqs[i].length);
    for (std::size_t e = 0; e < r.size() / static_cast<std::size_t>(spec.head_dim); ++e) {
      const auto b = static_cast<std::ptrdiff_t>(e * static_cast<std::size_t>(spec.head_dim));
      const std::vector<std::uint16_t> one(served.entries[i].begin() + b, served.entries[i].begin() + b + spec.head_dim);
      const std::vector<double> one_ref(r.begin() + b, r.begin() + b + spec.head_dim);
      EXPECT_LE(relative_l2(one, one_ref), 3 * tolerance(p)) << what << " sequence " << i << " entry " << e;
    }
    ref.insert(ref.end(), r.begin(), r.end());
    all.insert(all.end(), served.entries[i].begin(), served.entries[i].end());
  }
  out.entries = all.size() / static_cast<std::size_t>(spec.head_dim);
  EXPECT_LE(relative_l2(all, ref), tolerance(p)) << what;
  return out;
}

}  // namespace dsv4::test
