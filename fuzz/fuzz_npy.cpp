// libFuzzer target: the .npy reader on arbitrary bytes. An accepted array's bytes must match
// its dtype and shape exactly; anything else must be refused with dsv4::Error.
#include <cstdint>
#include <cstdlib>

#include "io/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto a = dsv4::io::parse_npy("fuzz", data, size);
    std::uint64_t numel = 1;
    for (std::int64_t d : a.shape) numel *= static_cast<std::uint64_t>(d);
    if (numel * dsv4::dtype_size(a.dtype) != a.data.size()) std::abort();
  } catch (const dsv4::Error&) {
  }
  return 0;
}
