// `dsv4-compressor bench`: see bench/bench.hpp.
#include <memory>

#include "bench/bench.hpp"
#include "commands.hpp"

namespace dsv4::app {

void add_bench_command(CLI::App& app, std::string command_line) {
  auto args = std::make_shared<bench::Options>();
  args->command = std::move(command_line);
  CLI::App* cmd = app.add_subcommand("bench", "Time the compressor step beside the library paths, against the floor");
  cmd->add_flag("--quick", args->quick, "Fewer shapes and repetitions (seconds on a CPU)");
  cmd->add_option("--json", args->json, "Write every figure to this JSON file");
  cmd->add_option("--svg", args->svg, "Write a chart of decode step time against batch size");
  cmd->add_option("--device", args->device, "auto (the GPU when there is one), cpu or cuda");
  cmd->add_option("--filter", args->filter, "Only rows whose label contains this, or one of several separated by '|', e.g. 'flash HCA decode B=64' or 'HCA decode|CSA layer decode'");
  cmd->add_option("--batches", args->batches,
                  "Decode batch sizes to time, e.g. 16,24 (default 1,8,32,64,128,256 on a GPU; 1,8,64 on a CPU)")
      ->delimiter(',');
  cmd->callback([args] { bench::run(*args); });

  auto sweep = std::make_shared<bench::SweepOptions>();
  sweep->command = args->command;
  CLI::App* proj = app.add_subcommand(
      "bench-projection", "Time every cuBLASLt algorithm the projection could take, at every token count (CUDA)");
  proj->add_flag("--quick", sweep->quick, "Flash shapes with bf16 output only, fewer token counts");
  proj->add_flag("--library-only", sweep->library_only, "Time only the library's own projection");
  proj->add_option("--json", sweep->json, "Write every figure to this JSON file");
  proj->add_option("--filter", sweep->filter, "Only shapes whose label contains this, or one of several separated by '|', e.g. 'flash CSA layer bf16'");
  proj->callback([sweep] { bench::run_projection_sweep(*sweep); });

  auto multiply = std::make_shared<bench::MultiplyOptions>();
  multiply->command = args->command;
  CLI::App* mul = app.add_subcommand(
      "bench-multiply", "Time one fused-step projection item's multiply alone, per instruction sequence (CUDA)");
  mul->add_option("--json", multiply->json, "Write every figure to this JSON file");
  mul->callback([multiply] { bench::run_multiply_probe(*multiply); });
}

}  // namespace dsv4::app
