// The Python module of lmbatch's CPU kernels (engine/cpu_kernels.py builds it on first use).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
  m.def("small_batch_linear", &small_batch_linear, "x @ w.T + bias for few rows (CPU, float32)");
}
