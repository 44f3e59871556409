// Built instead of gpu_bench.cu when the build has no CUDA backend.
#include "bench/bench.hpp"

namespace dsv4::bench {

Report run_gpu(const Options&, const std::vector<std::string>&, const std::vector<Scenario>&) {
  throw Error("--device cuda: this build has no CUDA backend");
}

SweepReport run_projection_sweep(const SweepOptions&) {
  throw Error("bench-projection: this build has no CUDA backend");
}

MultiplyReport run_multiply_probe(const MultiplyOptions&) {
  throw Error("bench-multiply: this build has no CUDA backend");
}

}  // namespace dsv4::bench
