// Temporary files for tests that read and write them, and the tool those tests run.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace dsv4::test {

// A fresh folder under the system's temporary folder, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    const auto base = std::filesystem::temp_directory_path();
    std::mt19937_64 rng(std::random_device{}());
    path_ = base / ("dsv4-test-" + std::to_string(::getpid()) + "-" + std::to_string(rng()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// The dsv4-compressor binary the CLI tests run: $DSV4_CLI where set (test binaries carried to
// another machine, scripts/build-for-device.sh), else the one built beside the tests.
#ifdef DSV4_CLI
inline std::string cli_path() {
  const char* env = std::getenv("DSV4_CLI");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(DSV4_CLI);
}
#endif

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace dsv4::test
