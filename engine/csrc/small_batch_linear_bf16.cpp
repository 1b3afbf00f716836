// y = x @ w.T (+ bias) for a few rows of x, on the CPU, in bfloat16 with float32 accumulation: the
// linears of decode steps of a bf16 model on CPUs with AVX512-BF16 (Zen 4/5, Cooper Lake, Sapphire
// Rapids and later; small_batch_linear.py routes up to MAX_ROWS_BF16 rows here).
//
// A decode step is bound by reading the weights once. torch's bf16 GEMM (oneDNN) runs a 16-row
// Qwen2-0.5B MLP projection at ~15 GB/s of weight where the machine streams ~70 GB/s: it packs the
// weight for a blocked GEMM on every call, which a few rows never amortize. Here the weight is packed
// once, at load (small_batch_linear.py, pack_bf16): [N/16, K/2, 16, 2], so that one 64-byte load holds
// two k of 16 output features, the operand VDPBF16PS wants (the "VNNI" layout oneDNN and vLLM's CPU
// kernels use). A register tile is MR input rows x NB blocks of 16 features: per pair of k, NB weight
// loads and MR broadcasts of an input pair feed MR * NB VDPBF16PS, and each accumulator already holds
// 16 outputs (no horizontal sums). Threads split the feature blocks.
//
// Rounding: products of bf16 pairs are exact in float32 and accumulate in float32 (in another order
// than oneDNN's); the bias is added in float32 and the sum rounded to bf16 once (nearest even).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

constexpr int kMR = 8;  // input rows per tile
constexpr int kNB = 3;  // 16-feature blocks per tile: 24 accumulators + 3 weights + 1 broadcast of 32 registers

struct Args {
  const uint16_t* x;       // [M, K]
  const uint16_t* packed;  // [N/16, K/2, 16, 2]
  const float* bias;       // [N] or nullptr
  uint16_t* y;             // [M, N]
  int64_t M, K, N;
};

template <int MR, int NB>
inline void tile(const Args& a, int64_t m0, int64_t block0) {
  const int64_t pairs = a.K / 2;
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint16_t* w = a.packed + block0 * pairs * 32;
  const auto* x = reinterpret_cast<const int32_t*>(a.x + m0 * a.K);   // a pair of bf16 per int32
  const int64_t row = pairs;                                           // int32s per input row
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + (j * pairs + p) * 32);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[i * row + p]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t n0 = (block0 + j) * 16;
    const __mmask16 keep = a.N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.N - n0)) - 1);
    const __m512 b = a.bias ? _mm512_maskz_loadu_ps(keep, a.bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[i][j], b));
      _mm256_mask_storeu_epi16(a.y + (m0 + i) * a.N + n0, keep, (__m256i)out);
    }
  }
}

template <int NB>
void blocks_for_rows(const Args& a, int64_t block0) {
  int64_t m = 0;
  for (; m + kMR <= a.M; m += kMR) tile<kMR, NB>(a, m, block0);
  switch (a.M - m) {
    case 7: tile<7, NB>(a, m, block0); break;
    case 6: tile<6, NB>(a, m, block0); break;
    case 5: tile<5, NB>(a, m, block0); break;
    case 4: tile<4, NB>(a, m, block0); break;
    case 3: tile<3, NB>(a, m, block0); break;
    case 2: tile<2, NB>(a, m, block0); break;
    case 1: tile<1, NB>(a, m, block0); break;
    default: break;
  }
}

void feature_blocks(const Args& a, int64_t begin, int64_t end) {
  int64_t b = begin;
  for (; b + kNB <= end; b += kNB) blocks_for_rows<kNB>(a, b);
  if (end - b == 2) blocks_for_rows<2>(a, b);
  if (end - b == 1) blocks_for_rows<1>(a, b);
}

}  // namespace

bool bf16_dot_available() { return true; }

at::Tensor small_batch_linear_bf16(at::Tensor x, at::Tensor packed, const c10::optional<at::Tensor>& bias,
                                   int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "small_batch_linear_bf16: bfloat16 x and packed weight");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 &&
              packed.size(1) * 2 == x.size(1) && packed.size(0) * 16 >= out_features && packed.is_contiguous(),
              "small_batch_linear_bf16: x [M, K] with K even and a weight packed as [N/16, K/2, 16, 2]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  auto y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const Args a{reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
               reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
               b.defined() ? b.data_ptr<float>() : nullptr,
               reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), M, K, N};
  // At least ~64 KB of weight per task (as the float32 kernel): blocks of 16 features x K bf16.
  const int64_t grain = std::max<int64_t>(kNB, (64 * 1024) / (16 * K * 2));
  at::parallel_for(0, packed.size(0), grain, [&](int64_t s, int64_t e) { feature_blocks(a, s, e); });
  return y;
}

#else  // no AVX512-BF16 on the machine that built this: small_batch_linear.py keeps bf16 on torch

bool bf16_dot_available() { return false; }

at::Tensor small_batch_linear_bf16(at::Tensor x, at::Tensor, const c10::optional<at::Tensor>&, int64_t) {
  TORCH_CHECK(false, "small_batch_linear_bf16: built without AVX512-BF16");
  return x;
}

#endif
