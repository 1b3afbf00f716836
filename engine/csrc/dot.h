// The dot product both CPU kernels are built on. At most call sites n is a compile-time constant
// (a template parameter), so after inlining the loop unrolls; -ffast-math lets the reduction
// vectorize.
#pragma once

#include <cstdint>

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
