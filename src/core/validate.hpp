// Checks of caller-supplied tensors: each failure names the argument and what was expected.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "dsv4/types.hpp"

namespace dsv4 {

[[noreturn]] void reject(const std::string& message);

// Throws unless `t` has one of `dtypes`, exactly `shape`, lives on `device` and, when it has
// elements, points somewhere.
void expect_tensor(const TensorView& t, std::string_view name, std::initializer_list<DType> dtypes,
                   const std::vector<std::int64_t>& shape, Device device);

}  // namespace dsv4
