// Reading and writing of NumPy .npy arrays (format versions 1.0, 2.0 and 3.0, little-endian,
// C order), for inputs and outputs a Python user has at hand. Every malformation is a
// dsv4::Error naming the source and what is wrong.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dsv4/types.hpp"

namespace dsv4::io {

struct NpyArray {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;  // numel * dtype_size bytes

  TensorView view() const { return TensorView(data.data(), dtype, shape); }
};

// dtypes: '<f4' f32, '<i4' i32, '<i8' i64, '|u1' u8; NumPy has no bfloat16, so bf16 arrays
// are read and written as '<u2' holding the bf16 bits (x.view(np.uint16) in Python).
NpyArray parse_npy(const std::string& name, const std::uint8_t* bytes, std::size_t size);
NpyArray read_npy(const std::string& path);
void write_npy(const std::string& path, const TensorView& t);

}  // namespace dsv4::io
