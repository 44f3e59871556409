// dsv4-compressor: run, demo and inspect the DeepSeek-V4 KV compressor.
#include <exception>
#include <iostream>
#include <string>

#include "commands.hpp"
#include "dsv4/types.hpp"

int main(int argc, char** argv) {
  CLI::App app{"dsv4-compressor: the KV compressor of DeepSeek-V4 attention"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dsv4-compressor 0.1.0");
  dsv4::app::add_run_command(app);
  dsv4::app::add_demo_command(app);
  dsv4::app::add_info_command(app);
  std::string command_line = "dsv4-compressor";
  for (int i = 1; i < argc; ++i) command_line += std::string(" ") + argv[i];
  dsv4::app::add_bench_command(app, command_line);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "dsv4-compressor: error: " << e.what() << "\n";
    return e.get_exit_code() != 0 ? e.get_exit_code() : 2;
  } catch (const std::exception& e) {
    std::cerr << "dsv4-compressor: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
