// libFuzzer target: the safetensors reader on arbitrary bytes. Every input must either parse
// (and then every tensor lies inside the data and matches its dtype and shape) or be refused
// with dsv4::Error; nothing else may happen.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = dsv4::io::SafetensorsFile::from_memory("fuzz", std::vector<std::uint8_t>(data, data + size));
    for (const std::string& name : f.names()) {
      const auto& t = f.get(name);
      // Touch every byte the reader vouches for: out-of-bounds views show under ASan.
      volatile std::uint8_t sink = 0;
      for (std::size_t i = 0; i < t.nbytes; ++i) sink = sink ^ t.data[i];
      if (t.dtype) {
        std::uint64_t numel = 1;
        for (std::int64_t d : t.shape) numel *= static_cast<std::uint64_t>(d);
        if (numel * dsv4::dtype_size(*t.dtype) != t.nbytes) std::abort();
      }
    }
  } catch (const dsv4::Error&) {
  }
  return 0;
}
