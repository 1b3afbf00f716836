// Structured outputs: set the logits a grammar forbids to -inf, in place, from a packed bitmask.
// Bit j of 32-bit word w of a mask row allows token 32 w + j (llguidance's and xgrammar's layout).
// Rows whose words are all ones (everything allowed) cost one read per word.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "kernels.h"

void apply_token_bitmask(at::Tensor logits, at::Tensor rows, at::Tensor bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous float32 [batch, vocab] tensor");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.is_contiguous(),
              "bitmask must be a contiguous int32 [rows, words] tensor");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.numel() == bitmask.size(0), "one row index per mask row");
  const int64_t vocab = logits.size(1), words = bitmask.size(1), n = rows.numel();
  TORCH_CHECK(words * 32 >= vocab, "the bitmask is narrower than the vocabulary");
  float* out = logits.data_ptr<float>();
  const int32_t* mask = bitmask.data_ptr<int32_t>();
  const int64_t* row_index = rows.data_ptr<int64_t>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    float* row = out + row_index[r] * vocab;
    const int32_t* m = mask + r * words;
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t word = static_cast<uint32_t>(m[w]);
      if (word == 0xFFFFFFFFu) continue;
      const int64_t base = w * 32, end = std::min<int64_t>(32, vocab - base);
      for (int64_t b = 0; b < end; ++b)
        if (!((word >> b) & 1u)) row[base + b] = neg_inf;
    }
  }
}
