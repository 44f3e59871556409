// Shared vocabulary of the parameterized and error tests: (kind, precision) cases with
// readable names, and the check that a call is refused with a given message.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "dsv4/compressor.hpp"

namespace dsv4::test {

struct Case {
  CompressorKind kind;
  Precision precision;
};

// Readable parameter names in test listings.
inline void PrintTo(const Case& c, std::ostream* os) {
  *os << kind_name(c.kind) << ", kv_score " << dtype_name(c.precision.kv_score) << ", state "
      << dtype_name(c.precision.state);
}

// Every kind with every kv_score and state dtype.
inline std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (CompressorKind k : {CompressorKind::csa_main, CompressorKind::csa_indexer, CompressorKind::hca})
    for (DType s : {DType::f32, DType::bf16})
      for (DType st : {DType::f32, DType::bf16}) cases.push_back({k, {s, st}});
  return cases;
}

inline std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const char* kinds[] = {"CsaMain", "CsaIndexer", "Hca"};
  return std::string(kinds[static_cast<int>(info.param.kind)]) + "_Score" +
         std::string(dtype_name(info.param.precision.kv_score)) + "_State" +
         std::string(dtype_name(info.param.precision.state));
}

// `call` must throw dsv4::Error whose message contains `fragment`.
inline void expect_refused(const std::function<void()>& call, const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "accepted; expected an error mentioning '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << "message: " << e.what();
  }
}

}  // namespace dsv4::test
