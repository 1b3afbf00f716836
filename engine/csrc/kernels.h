// The entry points of lmbatch's CPU kernels, shared by their sources and bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

// Decode attention over the paged KV pool: q [S, H, D], pools [blocks, KVH, block_size, D]; window 0 and
// softcap 0 mean none, sinks is [H] or None.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                                  at::Tensor context_lens, double scale, int64_t window, double softcap,
                                  const c10::optional<at::Tensor>& sinks);

// Causal prefill attention over a bf16 pool (AVX512-BF16): each chunk's queries (rows q_start .. q_start +
// q_len of q [T, H, D]) attend to its sequence's positions 0 .. start + q_len - 1 through its block table;
// writes those rows of out [T, H, D].
void paged_prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                             at::Tensor q_starts, at::Tensor q_lens, at::Tensor starts, double scale, at::Tensor out);

// Whether this build has paged_prefill_attention (the CPU has AVX512-BF16).
bool paged_prefill_attention_available();

// RMSNorm of bf16 rows as transformers' Llama-family RMSNorm: bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))).
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);

// Structured outputs: logits[rows[r], t] = -inf where bit t of bitmask row r is 0 (in place).
void apply_token_bitmask(at::Tensor logits, at::Tensor rows, at::Tensor bitmask);

// x @ w.T + bias for a few rows of x: x [M, K], w [N, K].
at::Tensor small_batch_linear(at::Tensor x, at::Tensor w, const c10::optional<at::Tensor>& bias);

// x @ w.T + bias on a weight packed at load as [ceil(N/16), K/P, 16, P] (P = 2 in bf16, 1 in float32;
// small_batch_linear.py's pack), x of the weight's dtype; y [M, out_features]. AVX-512 (and AVX512-BF16).
at::Tensor packed_linear(at::Tensor x, at::Tensor packed, const c10::optional<at::Tensor>& bias, int64_t out_features);

// The dtypes packed_linear was built for on this machine ("float32" with AVX-512, "bfloat16" with AVX512-BF16).
std::vector<std::string> packed_linear_dtypes();
