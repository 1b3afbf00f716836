// The Python module of lmbatch's CPU kernels (engine/cpu_kernels.py builds it on first use).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32 or bfloat16 pool)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("sinks") = py::none());
  m.def("paged_prefill_attention", &paged_prefill_attention, "causal prefill attention over a bf16 pool (AVX512-BF16)");
  m.def("paged_prefill_attention_available", &paged_prefill_attention_available,
        "whether paged_prefill_attention was built here");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows, as transformers' Llama-family RMSNorm");
  m.def("small_batch_linear", &small_batch_linear, "x @ w.T + bias for few rows (CPU, float32)");
  m.def("packed_linear", &packed_linear, "x @ w.T + bias on a weight packed at load (CPU, AVX-512)");
  m.def("packed_linear_dtypes", &packed_linear_dtypes, "the dtypes packed_linear was built for here");
  m.def("apply_token_bitmask", &apply_token_bitmask, "-inf where a packed token bitmask forbids (CPU, float32)");
}
