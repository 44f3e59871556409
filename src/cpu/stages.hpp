// The CPU backend's stages, one per file, each multi-threaded with OpenMP.
#pragma once

#include <cstdint>
#include <vector>

#include "core/internal.hpp"

namespace dsv4::cpu {

// kv_score[T, N] = x[T, K] @ w[N, K]^T, x bf16 and w already upcast to fp32, fp32 accumulation.
// Values are rounded to bf16 (kept in fp32 storage) when `round_bf16`. Rows go through the
// GEMM in fixed blocks, so a token's row never depends on which tokens share its call.
void project(const std::uint16_t* x, std::int64_t tokens, std::int64_t hidden, const float* w,
             std::int64_t width, bool round_bf16, float* kv_score);

// Pools every window the plan completes: pooled[E, head_dim] (fp32, before the norm).
void pool_windows(const detail::PlanData& plan, const float* kv_score,
                  const detail::StateData& state, const float* ape, float* pooled);

// Stores into each request's slot the rows that later calls will still need.
void update_state(const detail::PlanData& plan, const float* kv_score, detail::StateData& state);

// The same two steps with running accumulators in the slots (WindowState::running, ratio 128).
void pool_windows_running(const detail::PlanData& plan, const float* kv_score, const detail::StateData& state,
                          const float* ape, float* pooled);
void update_state_running(const detail::PlanData& plan, const float* kv_score, detail::StateData& state,
                          const float* ape);

// Norm, RoPE and (for the indexer) rotation of one pooled entry; entry_bf16[head_dim].
void finish_entry(const CompressorSpec& spec, const float* norm_weight, const float* inv_freq,
                  const float* pooled, std::int64_t position, std::uint16_t* entry_bf16);

// In-place Walsh-Hadamard transform of v[n], n a power of two (unscaled).
void hadamard_transform(float* v, std::int64_t n);

}  // namespace dsv4::cpu
