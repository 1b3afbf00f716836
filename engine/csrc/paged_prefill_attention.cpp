// Causal prefill attention over a bfloat16 paged pool on the CPU, with AVX512-BF16 (VDPBF16PS).
//
// torch's CPU flash attention runs ~140 GFLOP/s here in bf16 as in float32 (it widens to float32),
// where VDPBF16PS reaches ~900 on the linears: at Qwen2-0.5B's shape prefill attention was ~20% of a
// mixed batch's time. This kernel also reads every key through the block tables (the chunk's own K/V
// are already in the pool), so a chunk with past context needs no gathered copy and no second call.
//
// One work item is (chunk, KV head, tile of 16 query rows), a row being one (query token, query head
// of the KV head's GQA group) pair, so the group's heads share every K/V load. The tile's queries sit
// in a zmm per pair of head dims, 16 rows across the lanes ("VNNI" layout, packed once per item); each
// key's pair of dims is a 32-bit broadcast straight from the pool. Scores are then [key][row-lanes]:
// the online softmax's max, exp and sums are lane-wise, with no horizontal reductions. The values go
// the same way: probabilities rounded to bf16 and paired over two keys, each value pair broadcast, the
// output accumulated transposed ([dim][row-lanes], float32, in a per-item buffer).
//
// Rounding (what the tests bound): products of bf16 are exact in float32, sums run in float32; the
// probabilities are rounded to bf16 before they weight the values (as FlashAttention does in bf16),
// and the output once. Keys past a row's position never count: their scores are replaced, not added
// to, so whatever a pool slot holds (even NaN bits) cannot leak, and value rows past the last key are
// read as zeros.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "bf16.h"
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LMBATCH_PREFILL_BF16 1
#endif

#ifdef LMBATCH_PREFILL_BF16
namespace {

constexpr int kRows = 16;      // query rows per tile: the lanes of a zmm of float32
constexpr int kKeys = 16;      // keys per step: 16 score accumulators + 1 query register of 32
constexpr float kMasked = -1e30f;   // a finite "minus infinity": built with -ffast-math

struct Chunk {
  int64_t q_start, q_len, start;   // step rows of its queries; tokens of the sequence before it
  const int64_t* table;            // blocks holding positions 0 .. start + q_len - 1
};

struct Pool {
  const uint16_t* k;
  const uint16_t* v;
  int64_t kv_heads, block_size, dim;
  const uint16_t* row(const uint16_t* base, const int64_t* table, int64_t kvh, int64_t pos) const {
    const int64_t block = table[pos / block_size];
    return base + ((block * kv_heads + kvh) * block_size + pos % block_size) * dim;
  }
};

struct Queries {
  const uint16_t* q;         // [T, H, D] with strides
  uint16_t* out;             // [T, H, D] contiguous
  int64_t stride_t, stride_h, heads, group;
};

// 2^x for x <= 0 (scores minus their running max); 0 below float32's normal range.
inline __m512 exp2_nonpositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);   // [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln 2) to degree 6: relative error < 2e-7 on [-0.5, 0.5].
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

// Lane i of the result holds (a[i], b[i]) as a bf16 pair: the probabilities of two keys for one row.
inline __m512bh pair_lanes(__m512 a, __m512 b) {
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(b, a);   // a's 16 values, then b's
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return (__m512bh)_mm512_permutexvar_epi16(interleave, halves);
}

template <int D>
class Tile {
 public:
  Tile(const Pool& pool, const Queries& qs, const Chunk& c, int64_t kvh, int64_t row0)
      : pool_(pool), qs_(qs), c_(c), kvh_(kvh), row0_(row0) {
    rows_ = std::min<int64_t>(kRows, c.q_len * qs.group - row0);
    alignas(64) int32_t limit[kRows];
    for (int r = 0; r < kRows; ++r) {
      // The last key row r sees; a lane past the chunk's rows sees key 0 only and is never written.
      limit[r] = r < rows_ ? int32_t(c.start + (row0 + r) / qs.group) : 0;
      if (r < rows_) last_key_ = std::max<int64_t>(last_key_, limit[r]);
    }
    limit_ = _mm512_load_si512(limit);
    first_masked_ = c.start + row0 / qs.group + 1;   // keys below this: visible to every row of the tile
    pack_queries();
  }

  void run(float scale) {
    const __m512 scale_log2e = _mm512_set1_ps(scale * 1.44269504f);
    __m512 m = _mm512_set1_ps(kMasked), l = _mm512_setzero_ps();
    std::fill(std::begin(out_), std::end(out_), 0.f);
    for (int64_t k0 = 0; k0 <= last_key_; k0 += kKeys) {
      __m512 s[kKeys];
      scores(k0, s);
      __m512 top = m;
      for (int j = 0; j < kKeys; ++j) {
        s[j] = _mm512_mul_ps(s[j], scale_log2e);
        if (k0 + j >= first_masked_) {   // the causal edge (and keys past the chunk) fall in this step
          const __mmask16 seen = _mm512_cmp_epi32_mask(_mm512_set1_epi32(int32_t(k0 + j)), limit_, _MM_CMPINT_LE);
          s[j] = _mm512_mask_mov_ps(_mm512_set1_ps(kMasked), seen, s[j]);
        }
        top = _mm512_max_ps(top, s[j]);
      }
      const __m512 alpha = exp2_nonpositive(_mm512_sub_ps(m, top));
      m = top;
      l = _mm512_mul_ps(l, alpha);
      for (int j = 0; j < kKeys; ++j) {
        s[j] = exp2_nonpositive(_mm512_sub_ps(s[j], m));
        l = _mm512_add_ps(l, s[j]);
      }
      accumulate_values(k0, s, alpha);
    }
    write(l);
  }

 private:
  // Qp[d/2] = the tile's 16 rows' pair of dims (d, d+1), one 32-bit lane each.
  void pack_queries() {
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = row0_ + std::min<int64_t>(r, rows_ - 1);   // lanes past the rows repeat the last
      const int64_t t = c_.q_start + row / qs_.group, h = kvh_ * qs_.group + row % qs_.group;
      const auto* src = reinterpret_cast<const uint32_t*>(qs_.q + t * qs_.stride_t + h * qs_.stride_h);
      for (int p = 0; p < D / 2; ++p) q_[p * kRows + r] = src[p];
    }
  }

  void scores(int64_t k0, __m512 s[kKeys]) const {
    // A step's 16 keys lie in one block (block_size % 16 == 0): consecutive rows of D dims.
    const auto* keys = reinterpret_cast<const int32_t*>(pool_.row(pool_.k, c_.table, kvh_, k0));
    for (int j = 0; j < kKeys; ++j) s[j] = _mm512_setzero_ps();
    for (int p = 0; p < D / 2; ++p) {
      const __m512bh qv = (__m512bh)_mm512_load_si512(q_ + p * kRows);
      for (int j = 0; j < kKeys; ++j)
        s[j] = _mm512_dpbf16_ps(s[j], qv, (__m512bh)_mm512_set1_epi32(keys[j * (D / 2) + p]));
    }
  }

  // out[d] = out[d] * alpha + sum over keys of p[key] * v[key][d], two keys per VDPBF16PS.
  void accumulate_values(int64_t k0, const __m512 p[kKeys], __m512 alpha) {
    pack_values(k0);
    __m512bh pp[kKeys / 2];
    for (int j = 0; j < kKeys / 2; ++j) pp[j] = pair_lanes(p[2 * j], p[2 * j + 1]);
    for (int d = 0; d < D; ++d) {
      __m512 o = _mm512_mul_ps(_mm512_load_ps(out_ + d * kRows), alpha);
      for (int j = 0; j < kKeys / 2; ++j)
        o = _mm512_dpbf16_ps(o, pp[j], (__m512bh)_mm512_set1_epi32(int32_t(v_[j * D + d])));
      _mm512_store_ps(out_ + d * kRows, o);
    }
  }

  // v_[j * D + d] = (v[k0 + 2j][d], v[k0 + 2j + 1][d]); rows past the tile's last key are zeros.
  void pack_values(int64_t k0) {
    const uint16_t* rows = pool_.row(pool_.v, c_.table, kvh_, k0);
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int j = 0; j < kKeys / 2; ++j) {
      const bool a_in = k0 + 2 * j <= last_key_, b_in = k0 + 2 * j + 1 <= last_key_;
      for (int d = 0; d < D; d += 32) {
        const __m512i a = a_in ? _mm512_loadu_si512(rows + (2 * j) * D + d) : _mm512_setzero_si512();
        const __m512i b = b_in ? _mm512_loadu_si512(rows + (2 * j + 1) * D + d) : _mm512_setzero_si512();
        _mm512_store_si512(v_ + j * D + d, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_store_si512(v_ + j * D + d + 16, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  }

  void write(__m512 l) {
    alignas(64) float inv[kRows];
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), l));
    for (int r = 0; r < rows_; ++r) {
      const int64_t row = row0_ + r;
      const int64_t t = c_.q_start + row / qs_.group, h = kvh_ * qs_.group + row % qs_.group;
      uint16_t* dst = qs_.out + (t * qs_.heads + h) * D;
      for (int d = 0; d < D; ++d) dst[d] = round_bf16(out_[d * kRows + r] * inv[r]);
    }
  }

  const Pool& pool_;
  const Queries& qs_;
  const Chunk& c_;
  const int64_t kvh_, row0_;
  int64_t rows_ = 0, last_key_ = 0, first_masked_ = 0;
  __m512i limit_;
  alignas(64) uint32_t q_[D / 2 * kRows];
  alignas(64) uint32_t v_[kKeys / 2 * D];
  alignas(64) float out_[D * kRows];
};

struct Item {
  int64_t chunk, kvh, row0;
};

template <int D>
void run(const Pool& pool, const Queries& qs, const std::vector<Chunk>& chunks, float scale) {
  std::vector<Item> items;
  for (int64_t c = 0; c < int64_t(chunks.size()); ++c)
    for (int64_t kvh = 0; kvh < pool.kv_heads; ++kvh)
      for (int64_t r = 0; r < chunks[c].q_len * qs.group; r += kRows) items.push_back({c, kvh, r});
  // Longest first (a tile's keys grow with its rows): the threads' last items are the short ones.
  std::reverse(items.begin(), items.end());
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    return chunks[a.chunk].start + a.row0 / qs.group > chunks[b.chunk].start + b.row0 / qs.group;
  });
  const int64_t n = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < n; ++i) {
    Tile<D> tile(pool, qs, chunks[items[i].chunk], items[i].kvh, items[i].row0);
    tile.run(scale);
  }
}

}  // namespace
#endif  // LMBATCH_PREFILL_BF16

bool paged_prefill_attention_available() {
#ifdef LMBATCH_PREFILL_BF16
  return true;
#else
  return false;
#endif
}

void paged_prefill_attention(at::Tensor q,             // [T, H, D] bf16 (any strides over T and H)
                             at::Tensor k_cache,       // [blocks, KVH, block_size, D] bf16
                             at::Tensor v_cache,
                             at::Tensor block_tables,  // [C, max_blocks] int64: blocks of 0 .. start + q_len
                             at::Tensor q_starts,      // [C] first step row of each chunk
                             at::Tensor q_lens,        // [C]
                             at::Tensor starts,        // [C] tokens of each sequence before its chunk
                             double scale, at::Tensor out) {  // [T, H, D] bf16 contiguous; chunks' rows written
#ifdef LMBATCH_PREFILL_BF16
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "paged_prefill_attention: bfloat16 queries, pool and output");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous() && q.stride(2) == 1,
              "paged_prefill_attention: contiguous pool and output, head_dim contiguous in q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && q.dim() == 3 && out.sizes() == q.sizes(),
              "paged_prefill_attention: shape mismatch");
  const int64_t H = q.size(1), D = q.size(2), KVH = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0 && bs % kKeys == 0 && (D == 64 || D == 128),
              "paged_prefill_attention: head_dim 64 or 128, block_size a multiple of 16");
  block_tables = block_tables.to(at::kLong).contiguous();
  q_starts = q_starts.to(at::kLong).contiguous();
  q_lens = q_lens.to(at::kLong).contiguous();
  starts = starts.to(at::kLong).contiguous();
  const int64_t C = q_starts.numel(), width = block_tables.size(1), blocks = k_cache.size(0);
  TORCH_CHECK(block_tables.size(0) == C && q_lens.numel() == C && starts.numel() == C,
              "paged_prefill_attention: one table per chunk");
  std::vector<Chunk> chunks(C);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    chunks[c] = {q_starts.data_ptr<int64_t>()[c], q_lens.data_ptr<int64_t>()[c], starts.data_ptr<int64_t>()[c],
                 tables + c * width};
    const Chunk& k = chunks[c];
    const int64_t used = (k.start + k.q_len + bs - 1) / bs;
    TORCH_CHECK(k.q_len > 0 && k.start >= 0 && k.q_start >= 0 && k.q_start + k.q_len <= q.size(0) && used <= width,
                "paged_prefill_attention: chunk ", c, " lies outside the step or its table");
    for (int64_t b = 0; b < used; ++b)
      TORCH_CHECK(k.table[b] >= 0 && k.table[b] < blocks, "paged_prefill_attention: block ", k.table[b],
                  " outside the pool");
  }
  const Pool pool{reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                  reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>()), KVH, bs, D};
  const Queries qs{reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()),
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), q.stride(0), q.stride(1), H, H / KVH};
  if (D == 64) run<64>(pool, qs, chunks, float(scale));
  else run<128>(pool, qs, chunks, float(scale));
#else
  TORCH_CHECK(false, "paged_prefill_attention: built without AVX512-BF16 on this CPU");
#endif
}
