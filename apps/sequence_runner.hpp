// Feeds whole sequences through a compressor in calls of a given chunk schedule, the way a
// serving engine would, and collects each sequence's entries.
#pragma once

#include <cstdint>
#include <vector>

#include "dsv4/compressor.hpp"

namespace dsv4::app {

struct Sequence {
  const std::uint16_t* x;  // bf16 [length, hidden]
  std::int64_t length;
};

struct SequenceOutput {
  std::vector<std::uint16_t> entries;  // bf16 [length / ratio, head_dim]
  std::vector<std::uint8_t> cache;     // [length / ratio, entry_bytes], the stored entries
};

struct RunStats {
  int calls = 0;
  std::int64_t tokens = 0;
  std::int64_t entries = 0;
  double seconds = 0.0;  // inside Compressor::run only
};

// One call's requests: (sequence index, tokens to append). Sequence i uses state slot i.
using Step = std::vector<std::pair<std::size_t, std::int64_t>>;
using Schedule = std::vector<Step>;

// Call k appends up to chunks[k] tokens of every unfinished sequence, the last value
// repeating; no chunks means one call with everything.
Schedule uniform_chunks(const std::vector<std::int64_t>& lengths,
                        const std::vector<std::int64_t>& chunks);

// Runs the schedule, which must consume every sequence exactly.
std::vector<SequenceOutput> run_sequences(const Compressor& compressor,
                                          const std::vector<Sequence>& sequences,
                                          const Schedule& schedule, RunStats* stats = nullptr);

}  // namespace dsv4::app
