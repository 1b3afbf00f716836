// Paged attention for one query token per sequence (decode), on the CPU, over a float32 or bfloat16
// pool (bf16 rows are widened to float32 as they are read; the arithmetic is float32 either way).
//
// Reads each sequence's K/V straight out of the paged pool through its block table: no gathered
// copy of the context, no padding. The pool is [blocks, kv_heads, block_size, head_dim], so one
// (block, KV head) is a contiguous run of block_size rows. One work item is a (sequence, KV head)
// pair, so the G query heads of a GQA group share every K/V row they read. Each pass over the
// context (one per group of heads that fits in registers, see passes()) runs twice: scores, then
// softmax-weighted values; the scores live in a per-thread buffer of heads * context floats.
//
// The common head sizes and head counts per pass are compile-time constants (attend<D, G>): the
// loops over head_dim unroll, the accumulators stay in registers and one K/V row load serves all
// heads of the pass, which made the kernel 1.7x faster than the same code with run-time sizes.
// Other head sizes take the run-time instantiation attend<0, 0>. Built with -ffast-math so that exp and the reductions
// vectorize; results differ from SDPA by float rounding only.
//
// Attention variants (see attention_variants.py), each a run-time parameter: a sliding window starts
// the walk at the first block the window reaches (the skipped keys cost nothing); a soft-cap maps
// each score to c * tanh(score / c); sinks add one logit per query head to the softmax's denominator.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "dot.h"
#include "kernels.h"

namespace {

constexpr int64_t kMaxPassHeads = 8;  // query heads attended in one pass over a context

template <typename T>  // float, or uint16_t holding bfloat16 bits
struct Pool {
  const T* k;
  const T* v;
  int64_t kv_heads, block_size;
};

inline float dot_row(const float* __restrict q, const float* __restrict k, int64_t n) { return dot(q, k, n); }
inline float dot_row(const float* __restrict q, const uint16_t* __restrict k, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += q[i] * widen(k[i]);
  return acc;
}

struct Variant {
  int64_t window;       // 0: none
  float softcap;        // 0: none
  const float* sinks;   // [H] or nullptr
};

// One (sequence, KV head): q is [G, D] (this KV head's query heads), out is [G, D].
template <typename T, int64_t kD, int64_t kG>  // 0: known only at run time
void attend(const Pool<T>& pool, const int64_t* table, int64_t ctx, int64_t kvh, const float* q,
            float* out, int64_t rt_d, int64_t rt_g, float scale, const Variant& var, const float* sinks,
            std::vector<float>& scores, std::vector<float>& heap_acc) {
  constexpr bool fixed = kD > 0 && kG > 0;
  const int64_t D = fixed ? kD : rt_d, G = fixed ? kG : rt_g, bs = pool.block_size;
  // The query is token ctx - 1: a window of W sees tokens ctx - W .. ctx - 1.
  const int64_t begin = var.window > 0 ? std::max<int64_t>(0, ctx - var.window) : 0, len = ctx - begin;
  // The contiguous rows of (block holding token t0, this KV head) in a pool.
  auto run_of = [&](const T* base, int64_t t0) {
    return base + ((table[t0 / bs] * pool.kv_heads + kvh) * bs) * D;
  };
  // The next block's run is elsewhere in the pool: ask for it while this one is being used,
  // since the hardware prefetcher restarts at every jump.
  auto prefetch_next = [&](const T* base, int64_t t0) {
    if (t0 + bs >= ctx) return;
    const char* p = reinterpret_cast<const char*>(run_of(base, t0 + bs));
    for (int64_t off = 0; off < bs * D * int64_t(sizeof(T)); off += 64) __builtin_prefetch(p + off);
  };
  // Calls row(t, pointer to token t's row) for every visible token (t counted from begin), block by block.
  auto for_each_row = [&](const T* base, auto&& row) {
    for (int64_t t0 = begin - begin % bs; t0 < ctx; t0 += bs) {
      const int64_t from = std::max(begin, t0), n = std::min(bs, ctx - t0);
      const T* run = run_of(base, t0);
      prefetch_next(base, t0);
      for (int64_t i = from - t0; i < n; ++i) row(t0 + i - begin, run + i * D);
    }
  };
  scores.resize(G * len);
  float* __restrict sc = scores.data();

  for_each_row(pool.k, [&](int64_t t, const T* __restrict k) {
    for (int64_t g = 0; g < G; ++g) sc[g * len + t] = dot_row(q + g * D, k, D) * scale;
  });
  float inv_sum[fixed ? kG : kMaxPassHeads];
  for (int64_t g = 0; g < G; ++g) {
    float* row = sc + g * len;
    if (var.softcap > 0.f)
      for (int64_t t = 0; t < len; ++t) row[t] = var.softcap * std::tanh(row[t] / var.softcap);
    float m = row[0];  // built with -ffast-math: no infinities anywhere
    for (int64_t t = 1; t < len; ++t) m = std::max(m, row[t]);
    if (sinks) m = std::max(m, sinks[g]);
    float sum = sinks ? std::exp(sinks[g] - m) : 0.f;
    for (int64_t t = 0; t < len; ++t) {
      row[t] = std::exp(row[t] - m);
      sum += row[t];
    }
    inv_sum[g] = 1.f / sum;
  }

  float local_acc[fixed ? kG * kD : 1];
  float* __restrict acc = fixed ? local_acc : heap_acc.data();
  std::fill(acc, acc + G * D, 0.f);
  for_each_row(pool.v, [&](int64_t t, const T* __restrict v) {
    for (int64_t g = 0; g < G; ++g) {
      const float p = sc[g * len + t];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * widen(v[d]);
    }
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv_sum[g];
}

template <typename T>
using AttendFn = decltype(&attend<T, 0, 0>);

// Query heads per pass over a KV head's context: their accumulators (heads x head_dim floats) stay
// in registers up to half the vector register file (16 AVX-512 or AVX2 registers). A larger GQA
// group takes several passes; the context re-read of the later passes comes from L2.
#ifdef __AVX512F__
constexpr int64_t kRegisterFloats = 256;
#else
constexpr int64_t kRegisterFloats = 128;
#endif

template <typename T, int64_t kD>
AttendFn<T> for_heads(int64_t heads) {
  switch (heads) {
    case 1: return &attend<T, kD, 1>;
    case 2: return &attend<T, kD, 2>;
    case 4: return &attend<T, kD, 4>;
    case 8: return &attend<T, kD, 8>;
    default: return &attend<T, 0, 0>;
  }
}

template <typename T>
AttendFn<T> pick(int64_t D, int64_t heads) {
  switch (D) {
    case 32: return for_heads<T, 32>(heads);
    case 64: return for_heads<T, 64>(heads);
    case 128: return for_heads<T, 128>(heads);
    case 256: return for_heads<T, 256>(heads);
    default: return &attend<T, 0, 0>;
  }
}

template <typename T>
struct Pass {
  int64_t first_head, heads;
  AttendFn<T> attend;
};

// The passes over one KV head's context: heads in powers of two that fit in registers, at most
// kMaxPassHeads (the run-time instantiation's inv_sum is sized by it).
template <typename T>
std::vector<Pass<T>> passes(int64_t D, int64_t G) {
  const int64_t most = std::max<int64_t>(1, std::min(kMaxPassHeads, kRegisterFloats / D));
  std::vector<Pass<T>> out;
  for (int64_t g0 = 0; g0 < G;) {
    int64_t n = 1;
    while (n * 2 <= std::min(most, G - g0)) n *= 2;
    out.push_back({g0, n, pick<T>(D, n)});
    g0 += n;
  }
  return out;
}

// The kernel reads through the tables without bounds checks: every context must have a token,
// fit its table, and every block id must be in the pool. Plain loops: a few hundred integers.
void check_tables(const at::Tensor& tables, const at::Tensor& lens, int64_t num_blocks, int64_t block_size) {
  const int64_t* t = tables.data_ptr<int64_t>();
  const int64_t* l = lens.data_ptr<int64_t>();
  const int64_t capacity = tables.size(1) * block_size;
  for (int64_t i = 0; i < lens.numel(); ++i)
    TORCH_CHECK(l[i] >= 1 && l[i] <= capacity, "paged_decode_attention: context length ", l[i],
                " outside [1, ", capacity, "]");
  for (int64_t i = 0; i < tables.numel(); ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < num_blocks, "paged_decode_attention: block id ", t[i], " not in the pool");
}

template <typename T>
void run(const Pool<T>& pool, const float* qp, float* op, const int64_t* tables, const int64_t* lens, int64_t S,
         int64_t H, int64_t D, int64_t max_blocks, float scale, const Variant& var) {
  const int64_t KVH = pool.kv_heads, G = H / KVH;
  const auto plan = passes<T>(D, G);
  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, heap_acc(kMaxPassHeads * D);  // heap_acc: run-time head sizes only
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / KVH, kvh = item % KVH;
      for (const Pass<T>& pass : plan) {
        const int64_t first_head = kvh * G + pass.first_head;  // this pass's query heads
        const int64_t head0 = (s * H + first_head) * D;
        pass.attend(pool, tables + s * max_blocks, lens[s], kvh, qp + head0, op + head0, D, pass.heads, scale,
                    var, var.sinks ? var.sinks + first_head : nullptr, scores, heap_acc);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q,             // [S, H, D]
                                     at::Tensor k_cache,       // [blocks, KVH, block_size, D]
                                     at::Tensor v_cache,       // [blocks, KVH, block_size, D]
                                     at::Tensor block_tables,  // [S, max_blocks] int64
                                     at::Tensor context_lens,  // [S] int64
                                     double scale, int64_t window, double softcap,
                                     const c10::optional<at::Tensor>& sinks) {  // [H] float32
  const auto kv = k_cache.scalar_type();
  TORCH_CHECK((kv == at::kFloat || kv == at::kBFloat16) && v_cache.scalar_type() == kv &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == kv),
              "paged_decode_attention: a float32 or bfloat16 pool, q float32 or of the pool's dtype");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV pool must be contiguous");
  const auto out_dtype = q.scalar_type();
  q = q.to(at::kFloat).contiguous();   // a few thousand floats; the pool is what is large
  block_tables = block_tables.to(at::kLong).contiguous();
  context_lens = context_lens.to(at::kLong).contiguous();
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == D && H % KVH == 0,
              "paged_decode_attention: shape mismatch");
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(block_tables.size(0) == S && context_lens.numel() == S, "paged_decode_attention: one table per query");
  check_tables(block_tables, context_lens, k_cache.size(0), k_cache.size(2));
  auto out = at::empty_like(q);
  at::Tensor sink_values;
  if (sinks.has_value() && sinks->defined()) {
    sink_values = sinks->to(at::kFloat).contiguous();
    TORCH_CHECK(sink_values.numel() == H, "paged_decode_attention: one sink per query head");
  }
  const Variant var{window, static_cast<float>(softcap), sink_values.defined() ? sink_values.data_ptr<float>() : nullptr};
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  if (kv == at::kFloat) {
    const Pool<float> pool{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), KVH, k_cache.size(2)};
    run(pool, qp, op, tables, lens, S, H, D, max_blocks, fscale, var);
  } else {
    const Pool<uint16_t> pool{reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                              reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>()), KVH,
                              k_cache.size(2)};
    run(pool, qp, op, tables, lens, S, H, D, max_blocks, fscale, var);
  }
  return out.to(out_dtype);
}
