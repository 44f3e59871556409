// Drives a CompressorGroup through a schedule the way tests drive single compressors.
#pragma once

#include "support/serving.hpp"

namespace dsv4::test {

// Runs the schedule through the group; member m's entries per sequence in result[m].
std::vector<std::vector<std::vector<std::uint16_t>>> serve_group(const CompressorGroup& group,
                                                                  const std::vector<Sequence>& seqs,
                                                                  const Schedule& schedule, Buffers& buffers);

}  // namespace dsv4::test
