// The bench's variant (g), "reach": what a decode step takes on this GPU as one kernel in a
// stream when it computes nothing. The probe moves the step's bytes (those the floor
// counts) through the data flow that every implementation of the compressor has:
//  - the weights, which no kernel writes, read before the wait for the previous kernel (so
//    they may stream during its tail, as the fused step's do);
//  - after the wait, the inputs that earlier kernels wrote (x, the state);
//  - one exchange between all blocks (an entry's norm needs every channel of its head, and
//    at decode sizes every SM holds a part of the weights behind each channel), then one
//    read of what the other blocks handed over;
//  - the stores (entries, state), which the next kernel may read once this one completes.
// Everything a real step does beyond this makes it slower; a schedule of the bytes other
// than this one might not (docs/PERF.md). Timed like every variant (graph replays, weights
// rotated through L2), so d / g is what a step leaves on the table and g / floor what the
// dependencies cost with this schedule. Moving no bytes, it measures the least step:
// launch, wait, one exchange, completion.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dsv4/compressor.hpp"

namespace dsv4::bench {

// Steps the probe is measured for: the decode-shaped ones (the fused path's limit).
constexpr std::int64_t kReachMaxTokens = 256;

struct ByteRange {
  const void* data = nullptr;  // 16-byte aligned
  std::int64_t bytes = 0;      // a multiple of 16
};

struct ReachStep {
  ByteRange weights[2];  // read before the wait (a CSA layer has two members)
  ByteRange inputs[2];   // read after the wait: x, state
  void* outputs = nullptr;
  std::int64_t output_bytes = 0;  // a multiple of 16
};

class ReachProbe {
 public:
  ReachProbe();  // on the current device: one wave of blocks and the exchange's buffers
  // Launches one step (a programmatic dependent launch, as the library's kernels are).
  void run(const ReachStep& step, cudaStream_t stream) const;

 private:
  int blocks_;
  Buffer handoff_;  // unsigned [blocks][threads]
  Buffer barrier_;  // unsigned arrivals, generation
};

}  // namespace dsv4::bench
