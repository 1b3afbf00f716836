// Paged attention for one query token per sequence (decode), on the CPU, in float32.
//
// Reads each sequence's K/V straight out of the paged pool through its block table: no gathered
// copy of the context, no padding. The pool is [blocks, kv_heads, block_size, head_dim], so one
// (block, KV head) is a contiguous run of block_size rows. One work item is a (sequence, KV head)
// pair, so the query heads of a GQA group share every K/V row they read. Two passes per item: scores, then softmax-weighted
// values; the scores live in a per-thread buffer of G * context floats. Built with -ffast-math so
// that exp and the reductions vectorize (about 2x); results differ from SDPA by float rounding only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q,             // [S, H, D]
                                     torch::Tensor k_cache,       // [blocks, KVH, block_size, D]
                                     torch::Tensor v_cache,       // [blocks, KVH, block_size, D]
                                     torch::Tensor block_tables,  // [S, max_blocks] int64
                                     torch::Tensor context_lens,  // [S] int64
                                     double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV pool must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1), block_size = k_cache.size(2), G = H / KVH;
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, "paged_decode_attention: shape mismatch");
  const int64_t max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);

  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    std::vector<float> inv_sum(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / KVH, kvh = item % KVH;
      const int64_t ctx = lens[s];
      const int64_t* table = tables + s * max_blocks;
      const float* qs = qp + (s * H + kvh * G) * D;  // the G query heads of this KV head
      scores.resize(G * ctx);
      // The contiguous run of rows of (block holding token t0, this KV head) in a pool.
      auto run_of = [&](const float* pool, int64_t t0) {
        return pool + ((table[t0 / block_size] * KVH + kvh) * block_size) * D;
      };

      // Walk the context block by block: no division per token, contiguous slots within a block.
      for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
        const int64_t n = std::min(block_size, ctx - t0);
        const float* kb = run_of(kp, t0);
        for (int64_t i = 0; i < n; ++i) {
          const float* k = kb + i * D;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qs + g * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
            scores[g * ctx + t0 + i] = dot * fscale;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* row = scores.data() + g * ctx;
        float m = row[0];  // built with -ffast-math: no infinities anywhere
        for (int64_t t = 1; t < ctx; ++t) m = std::max(m, row[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < ctx; ++t) {
          row[t] = std::exp(row[t] - m);
          sum += row[t];
        }
        inv_sum[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
        const int64_t n = std::min(block_size, ctx - t0);
        const float* vb = run_of(vp, t0);
        for (int64_t i = 0; i < n; ++i) {
          const float* v = vb + i * D;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * ctx + t0 + i];
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (s * H + kvh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv_sum[g];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
}
