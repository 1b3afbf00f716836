// y = x @ w.T (+ bias) on the CPU with AVX-512, on a weight packed once at load (small_batch_linear.py,
// pack()): float32 with FMA, bfloat16 with AVX512-BF16 (Zen 4/5, Cooper Lake, Sapphire Rapids and
// later). Accumulation is float32 either way.
//
// A decode step is bound by reading the weights once. torch's GEMMs pack the weight for a blocked
// GEMM on every call, which a few rows never amortize: oneDNN's bf16 GEMM ran a 16-row Qwen2-0.5B MLP
// projection at ~15 GB/s of weight where the machine streams ~70. Here the weight is packed at load
// into blocks of 16 output features, [N/16, K/P, 16, P], so one 64-byte load holds P consecutive k of
// 16 features: P = 2 in bf16 (the pair VDPBF16PS multiplies, the "VNNI" layout oneDNN and vLLM's CPU
// kernels use), P = 1 in float32. A register tile is MR input rows x NB feature blocks: per step of
// P k, NB weight loads and MR broadcasts of the input feed MR * NB VDPBF16PS or VFMADD, and each
// accumulator holds 16 outputs (no horizontal sums). Threads split the feature blocks.
//
// Rounding: bf16 products are exact in float32; sums run in k order in float32 (not oneDNN's or
// MKL's order); the bias is added in float32 and a bf16 result is rounded once (nearest even).
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LMBATCH_PACKED 1
#endif

#ifdef LMBATCH_PACKED
namespace {

constexpr int kMR = 8;  // input rows per tile
constexpr int kNB = 3;  // 16-feature blocks per tile: 24 accumulators + 3 weights + 1 broadcast of 32 registers

struct Float32 {  // one k per step
  using T = float;
  static constexpr int kPerStep = 1;
  static __m512 weight(const T* w) { return _mm512_loadu_ps(w); }
  static __m512 input(const T* x) { return _mm512_set1_ps(*x); }
  static __m512 madd(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
  static void store(T* y, __mmask16 keep, __m512 v) { _mm512_mask_storeu_ps(y, keep, v); }
};

#ifdef __AVX512BF16__
struct BFloat16 {  // a pair of k per step; bf16 held as its bits
  using T = uint16_t;
  static constexpr int kPerStep = 2;
  static __m512bh weight(const T* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static __m512bh input(const T* x) { return (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x)); }
  static __m512 madd(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
  static void store(T* y, __mmask16 keep, __m512 v) {
    _mm256_mask_storeu_epi16(y, keep, (__m256i)_mm512_cvtneps_pbh(v));
  }
};
#endif

template <typename E>
struct Args {
  const typename E::T* x;       // [M, K]
  const typename E::T* packed;  // [N/16, K/P, 16, P]
  const float* bias;            // [N] or nullptr
  typename E::T* y;             // [M, N]
  int64_t M, K, N;
};

template <typename E, int MR, int NB>
inline void tile(const Args<E>& a, int64_t m0, int64_t block0) {
  constexpr int P = E::kPerStep;
  const int64_t steps = a.K / P, block = steps * 16 * P;
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const auto* w = a.packed + block0 * block;
  const auto* x = a.x + m0 * a.K;
  for (int64_t s = 0; s < steps; ++s) {
    decltype(E::weight(w)) wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = E::weight(w + j * block + s * 16 * P);
    for (int i = 0; i < MR; ++i) {
      const auto xv = E::input(x + i * a.K + s * P);
      for (int j = 0; j < NB; ++j) acc[i][j] = E::madd(acc[i][j], xv, wv[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t n0 = (block0 + j) * 16;
    const __mmask16 keep = a.N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.N - n0)) - 1);
    const __m512 b = a.bias ? _mm512_maskz_loadu_ps(keep, a.bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) E::store(a.y + (m0 + i) * a.N + n0, keep, _mm512_add_ps(acc[i][j], b));
  }
}

template <typename E, int NB>
void blocks_for_rows(const Args<E>& a, int64_t block0) {
  int64_t m = 0;
  for (; m + kMR <= a.M; m += kMR) tile<E, kMR, NB>(a, m, block0);
  switch (a.M - m) {
    case 7: tile<E, 7, NB>(a, m, block0); break;
    case 6: tile<E, 6, NB>(a, m, block0); break;
    case 5: tile<E, 5, NB>(a, m, block0); break;
    case 4: tile<E, 4, NB>(a, m, block0); break;
    case 3: tile<E, 3, NB>(a, m, block0); break;
    case 2: tile<E, 2, NB>(a, m, block0); break;
    case 1: tile<E, 1, NB>(a, m, block0); break;
    default: break;
  }
}

template <typename E>
void run(const Args<E>& a, int64_t blocks) {
  // At least ~64 KB of weight per task (as the unpacked float32 kernel), in whole tiles.
  const int64_t grain = std::max<int64_t>(kNB, (64 * 1024) / (16 * a.K * int64_t(sizeof(typename E::T))));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    int64_t b = begin;
    for (; b + kNB <= end; b += kNB) blocks_for_rows<E, kNB>(a, b);
    if (end - b == 2) blocks_for_rows<E, 2>(a, b);
    if (end - b == 1) blocks_for_rows<E, 1>(a, b);
  });
}

}  // namespace
#endif  // LMBATCH_PACKED

std::vector<std::string> packed_linear_dtypes() {
  std::vector<std::string> out;
#ifdef LMBATCH_PACKED
  out.push_back("float32");
#ifdef __AVX512BF16__
  out.push_back("bfloat16");
#endif
#endif
  return out;
}

at::Tensor packed_linear(at::Tensor x, at::Tensor packed, const c10::optional<at::Tensor>& bias,
                         int64_t out_features) {
  const int64_t P = x.scalar_type() == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == P &&
              packed.size(1) * P == x.size(1) && packed.size(0) * 16 >= out_features && packed.is_contiguous() &&
              packed.scalar_type() == x.scalar_type() && x.device().is_cpu(),
              "packed_linear: x [M, K] (K even in bf16) and a weight of its dtype packed as [N/16, K/P, 16, P]");
  x = x.contiguous();
  auto y = at::empty({x.size(0), out_features}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
#ifdef LMBATCH_PACKED
  if (x.scalar_type() == at::kFloat) {
    run(Args<Float32>{x.data_ptr<float>(), packed.data_ptr<float>(), bp, y.data_ptr<float>(), x.size(0), x.size(1),
                      out_features}, packed.size(0));
    return y;
  }
#ifdef __AVX512BF16__
  if (x.scalar_type() == at::kBFloat16) {
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    run(Args<BFloat16>{bits(x), bits(packed), bp, bits(y), x.size(0), x.size(1), out_features}, packed.size(0));
    return y;
  }
#endif
#endif
  TORCH_CHECK(false, "packed_linear: not built for ", x.scalar_type(), " on this CPU (see packed_linear_dtypes)");
  return y;
}
