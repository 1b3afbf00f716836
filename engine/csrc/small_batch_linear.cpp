// y = x @ w.T (+ bias) for a few rows of x, on the CPU, in float32: the linears of decode steps and
// of prefill chunks of a few tokens (engine/small_batch_linear.py routes up to MAX_ROWS rows here).
//
// With up to a few dozen rows a linear layer is bound by reading its weight once. MKL's sgemm runs
// these shapes at 3-10 GB/s of weight (a 4-row LM head, 32k x 256, took 3.1 ms); this kernel streams
// each weight row once, in place. One row of input: each weight row is dotted with it as it streams.
// Several rows: register tiles of 4 input rows x 3 weight rows (AVX2 + FMA), so that the FMA units,
// not the loads, set the pace; at the Qwen2-0.5B shapes this is 2.3x the one-row loop at 16 rows
// and 1.56x MKL at 128 (bench/small_linear.py, bench/NOTES.md). Threads split the output features.
// Built with -ffast-math so that the one-row dot products vectorize.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "dot.h"
#include "kernels.h"

namespace {

template <int64_t kK>  // 0: known only at run time
void dot_rows(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t M,
              int64_t rt_k, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t K = kK > 0 ? kK : rt_k;
  int64_t n = n_begin;
  // Four weight rows at a time: each load of an input row feeds four dot products.
  for (; n + 4 <= n_end; n += 4) {
    const float* __restrict w0 = w + n * K;
    const float* __restrict w1 = w0 + K;
    const float* __restrict w2 = w1 + K;
    const float* __restrict w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict xr = x + m * K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        a0 += xr[k] * w0[k];
        a1 += xr[k] * w1[k];
        a2 += xr[k] * w2[k];
        a3 += xr[k] * w3[k];
      }
      float* yr = y + m * N + n;
      yr[0] = a0, yr[1] = a1, yr[2] = a2, yr[3] = a3;
    }
  }
  for (; n < n_end; ++n) {
    const float* __restrict wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(x + m * K, wr, K);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A register tile of MR input rows x NR weight rows: per 8 floats of K, NR weight loads and MR input
// loads feed MR * NR FMAs (12 accumulators at 4 x 3, what AVX2's 16 registers hold). The one-row-of-
// input loop above does 5 loads per 4 FMAs, so it waits on loads; this waits on the FMA units.
template <int MR, int NR>
inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
                 int64_t N) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * K + t] * w[j * K + t];
      y[i * N + j] = s;
    }
}

template <int NR>
inline void tile_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NR>(x + m * K, w, y + m * N, K, N);
  switch (M - m) {
    case 3: tile<3, NR>(x + m * K, w, y + m * N, K, N); break;
    case 2: tile<2, NR>(x + m * K, w, y + m * N, K, N); break;
    case 1: tile<1, NR>(x + m * K, w, y + m * N, K, N); break;
    default: break;
  }
}

// Weight rows n_begin..n_end in tiles of three; each tile is read from memory once and stays in L1
// while every block of four input rows (in L2) passes over it.
void tiled_rows(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t M, int64_t K,
                int64_t N, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 3 <= n_end; n += 3) tile_rows<3>(x, w + n * K, y + n, M, K, N);
  if (n_end - n == 2) tile_rows<2>(x, w + n * K, y + n, M, K, N);
  if (n_end - n == 1) tile_rows<1>(x, w + n * K, y + n, M, K, N);
}
#endif

// LMBATCH_TILED_LINEAR=0: the one-row loop everywhere (for the before/after measurement).
bool tiled_disabled() {
  static const bool off = [] {
    const char* v = std::getenv("LMBATCH_TILED_LINEAR");
    return v != nullptr && v[0] == '0';
  }();
  return off;
}

}  // namespace

at::Tensor small_batch_linear(at::Tensor x,   // [M, K]
                              at::Tensor w,   // [N, K]
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) > 0,
              "small_batch_linear: shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "small_batch_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_batch_linear: CPU tensors only");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto fn = K == 256 ? &dot_rows<256> : K == 512 ? &dot_rows<512> : K == 768 ? &dot_rows<768>
          : K == 1024 ? &dot_rows<1024> : &dot_rows<0>;
  // At least ~64 KB of weight per task: smaller splits cost more in thread wake-ups than they save.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024 / int64_t(sizeof(float))) / K);
#if defined(__AVX2__) && defined(__FMA__)
  if (M > 1 && !tiled_disabled()) {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { tiled_rows(xp, wp, yp, M, K, N, b, e); });
  } else {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { fn(xp, wp, yp, M, K, N, b, e); });
  }
#else
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { fn(xp, wp, yp, M, K, N, b, e); });
#endif
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}
