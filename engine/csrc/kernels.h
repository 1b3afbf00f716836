// The entry points of lmbatch's CPU kernels, shared by their sources and bindings.cpp.
#pragma once

#include <ATen/ATen.h>

// Decode attention over the paged KV pool: q [S, H, D], pools [blocks, KVH, block_size, D]; window 0 and
// softcap 0 mean none, sinks is [H] or None.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                                  at::Tensor context_lens, double scale, int64_t window, double softcap,
                                  const c10::optional<at::Tensor>& sinks);

// Structured outputs: logits[rows[r], t] = -inf where bit t of bitmask row r is 0 (in place).
void apply_token_bitmask(at::Tensor logits, at::Tensor rows, at::Tensor bitmask);

// x @ w.T + bias for a few rows of x: x [M, K], w [N, K].
at::Tensor small_batch_linear(at::Tensor x, at::Tensor w, const c10::optional<at::Tensor>& bias);

// The same in bfloat16 (float32 accumulation) with AVX512-BF16: x [M, K] (K even), the weight packed as
// [ceil(N/16), K/2, 16, 2] (small_batch_linear.py's pack_bf16), bias any float dtype; y [M, out_features].
at::Tensor small_batch_linear_bf16(at::Tensor x, at::Tensor packed, const c10::optional<at::Tensor>& bias,
                                   int64_t out_features);

// Whether the machine that built the kernels had AVX512-BF16 (else small_batch_linear_bf16 raises).
bool bf16_dot_available();
