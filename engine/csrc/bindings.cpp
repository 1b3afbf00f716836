// The Python module of lmbatch's CPU kernels (engine/cpu_kernels.py builds it on first use).
#include <torch/extension.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                                  at::Tensor context_lens, double scale);
at::Tensor small_batch_linear(at::Tensor x, at::Tensor w, const c10::optional<at::Tensor>& bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
  m.def("small_batch_linear", &small_batch_linear, "x @ w.T + bias for few rows (CPU, float32)");
}
