// The subcommands of the dsv4-compressor tool. Each registers its options and its action.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace dsv4::app {

void add_run_command(CLI::App& app);
void add_demo_command(CLI::App& app);
void add_info_command(CLI::App& app);
void add_bench_command(CLI::App& app, std::string command_line);

}  // namespace dsv4::app
