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
  cmd->add_option("--filter", args->filter, "Only rows whose label contains this, e.g. 'flash HCA decode B=64'");
  cmd->callback([args] { bench::run(*args); });
}

}  // namespace dsv4::app
