// RMSNorm of bf16 rows in one pass, as transformers' Llama-family RMSNorm computes it (fused_norms.py
// checks a module's forward is that one before it routes it here):
//   t = bf16(x * rsqrt(mean(x^2) + eps))   in float32, then   y = bf16(weight * t).
// The eager forward is eight tensor ops (a float32 copy, pow, mean, add, rsqrt, mul, a bf16 copy,
// mul) of a few microseconds each at decode sizes, 49 of them per Qwen2-0.5B step. The sum of squares
// runs in another order than torch's, so t may differ from the eager one in its last bf16 bit.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "bf16.h"
#include "kernels.h"

namespace {

void norm_row(const uint16_t* __restrict x, const uint16_t* __restrict w, uint16_t* __restrict y, int64_t n,
              float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += widen(x[i]) * widen(x[i]);
  const float r = 1.f / std::sqrt(sum / float(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = round_bf16(widen(w[i]) * widen(round_bf16(widen(x[i]) * r)));
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "rms_norm: bfloat16 input and weight");
  TORCH_CHECK(x.device().is_cpu() && weight.dim() == 1 && x.size(-1) == weight.numel(), "rms_norm: shape mismatch");
  x = x.contiguous();
  weight = weight.contiguous();
  auto y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const float feps = static_cast<float>(eps);
  // Threads only for prefill-sized inputs: a decode step's few rows cost less than waking them.
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(xp + r * n, wp, yp + r * n, n, feps);
  });
  return y;
}
