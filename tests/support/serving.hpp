// Serving-shaped drivers for tests: random schedules that mix new requests, chunked
// prefills, decodes and multi-token decodes, with slots reused and entries scattered over a
// paged cache, on any backend (through Buffers, which places tensors where it runs).
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "dsv4/compressor.hpp"

namespace dsv4::test {

// Tensors for a run on one device. Views stay valid until the Buffers object dies.
class Buffers {
 public:
  virtual ~Buffers() = default;
  virtual TensorView upload(const void* host, DType dtype, std::vector<std::int64_t> shape) = 0;
  // A new tensor with every byte set to `poison`.
  virtual TensorView poisoned(DType dtype, std::vector<std::int64_t> shape, std::uint8_t poison) = 0;
  virtual void download(const TensorView& t, void* host) = 0;
};
std::unique_ptr<Buffers> host_buffers();
std::unique_ptr<Buffers> device_buffers(Device device);

struct Sequence {
  std::vector<std::uint16_t> x;  // bf16 [length, hidden]
  std::int64_t length = 0;
};

std::vector<Sequence> random_sequences(std::int64_t count, std::int64_t min_len, std::int64_t max_len,
                                       std::int64_t hidden, std::mt19937_64& rng);

// Per call: (sequence, tokens appended). Every sequence is consumed exactly.
using Schedule = std::vector<std::vector<std::pair<std::size_t, std::int64_t>>>;
Schedule whole_schedule(const std::vector<Sequence>& seqs);  // one call with everything
Schedule random_schedule(const std::vector<Sequence>& seqs, std::mt19937_64& rng);
// Requests arrive over time, at most `max_active` at once: a new one starts (chunked prefill)
// when another finishes, so slots are freed and reused throughout. Many small batches.
Schedule arrival_schedule(const std::vector<Sequence>& seqs, std::mt19937_64& rng, std::size_t max_active);

// Decode-shaped calls only: each takes 1 token (most), 2..8 or 9..64 tokens from some of the
// sequences, never more than `max_call_tokens` in all (the fused path's range).
Schedule small_step_schedule(const std::vector<Sequence>& seqs, std::mt19937_64& rng, std::int64_t max_call_tokens);
// Plain decode: every step, the first `batch` unfinished sequences take one token each.
Schedule decode_schedule(const std::vector<Sequence>& seqs, std::size_t batch);

struct Served {
  std::vector<std::vector<std::uint16_t>> entries;  // per sequence, bf16 [L / ratio, head_dim]
  std::vector<std::vector<std::uint8_t>> cache;     // per sequence, its rows of the paged cache
  int calls = 0;
  std::string problems;  // outputs left unwritten or not finite; empty when all is well
};

// Runs the schedule. Slots come from a pool larger than needed, handed out at random and
// reused after a request finishes; each entry goes to a random row of one shared cache. All
// outputs are poisoned before each call and checked to have been written.
// `pool_slots` (default 2n + 3) sizes the state pool.
Served serve(const Compressor& compressor, const std::vector<Sequence>& seqs, const Schedule& schedule,
             Buffers& buffers, std::mt19937_64& rng, std::int64_t pool_slots = 0);

}  // namespace dsv4::test
