#include <cmath>
#include <vector>

#include "core/numerics.hpp"
#include "core/rope.hpp"
#include "cpu/stages.hpp"

namespace dsv4::cpu {

void hadamard_transform(float* v, std::int64_t n) {
  for (std::int64_t h = 1; h < n; h *= 2)
    for (std::int64_t i = 0; i < n; i += 2 * h)
      for (std::int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

void finish_entry(const CompressorSpec& spec, const float* norm_weight, const float* inv_freq,
                  const float* pooled, std::int64_t position, std::uint16_t* entry_bf16) {
  const std::int64_t hd = spec.head_dim;
  thread_local std::vector<float> v;
  v.resize(static_cast<std::size_t>(hd));

  // RMSNorm of the bf16-rounded pooled value, fp32 math, bf16 result.
  float sum_sq = 0.0f;
  for (std::int64_t d = 0; d < hd; ++d) {
    v[d] = num::round_to_bf16(pooled[d]);
    sum_sq += v[d] * v[d];
  }
  const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(hd) + spec.rms_eps);
  for (std::int64_t d = 0; d < hd; ++d) v[d] = num::round_to_bf16(v[d] * inv_rms * norm_weight[d]);

  // RoPE on the last rope.dim dims, interleaved pairs, angle position * inv_freq[i].
  float* rope = v.data() + spec.nope_dim();
  for (std::int64_t i = 0; i < spec.rope.dim / 2; ++i) {
    float c, s;
    rope_cos_sin(position, inv_freq[i], &c, &s);
    const float a = rope[2 * i], b = rope[2 * i + 1];
    rope[2 * i] = num::round_to_bf16(a * c - b * s);
    rope[2 * i + 1] = num::round_to_bf16(a * s + b * c);
  }

  if (spec.rotate) {
    hadamard_transform(v.data(), hd);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (std::int64_t d = 0; d < hd; ++d) v[d] = num::round_to_bf16(v[d] * scale);
  }
  for (std::int64_t d = 0; d < hd; ++d) entry_bf16[d] = num::bf16_from_f32(v[d]);
}

}  // namespace dsv4::cpu
