// bfloat16 held as its 16 bits, and the two conversions every CPU kernel here needs.
#pragma once

#include <cstdint>
#include <cstring>

// A float32 pool's rows as they are, so that a kernel templated on the pool's type reads either.
inline float widen(float x) { return x; }

// bfloat16 -> float32 is exact: the bits move up 16 places.
inline float widen(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> bfloat16, rounded to nearest even (finite inputs: the kernels are built with -ffast-math).
inline uint16_t round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
