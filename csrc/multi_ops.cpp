// Schemas of the multi-tensor (tuple state) ops, added to the revdeq namespace that ops.cpp defines.
// Kernels: csrc/cpu/multi_cpu.cpp, csrc/cuda/multi_cuda.cpp; fakes: revdeq_kernels/backends/extension.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(revdeq, m) {
  // states[i] = (1 - beta) * states[i] + beta * f_vals[i] for every i, in place, in one op call.
  m.def("multi_relax_(Tensor(a!)[] states, Tensor[] f_vals, float beta) -> ()");
  // states[i] = (states[i] - beta * f_vals[i]) / (1 - beta) for every i: the inverse of multi_relax_.
  m.def("multi_unrelax_(Tensor(a!)[] states, Tensor[] f_vals, float beta) -> ()");
  // [sum_i sum((zs[i] - fzs[i])^2), sum_i sum(fzs[i]^2)]; float64 when any z is float64, else float32.
  m.def("multi_residual(Tensor[] zs, Tensor[] fzs) -> Tensor");
}
