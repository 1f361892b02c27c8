// Op schemas of the revdeq namespace and the Python module that loads them.
// Kernels register per dispatch key in csrc/cpu/ and csrc/cuda/; fake (meta) kernels for
// torch.compile live in revdeq_kernels/backends/extension.py.
#include <torch/extension.h>

TORCH_LIBRARY(revdeq, m) {
  // state = (1 - beta) * state + beta * f_val, in place.
  m.def("relax_(Tensor(a!) state, Tensor f_val, float beta) -> ()");
  // state = (state - beta * f_val) / (1 - beta), in place: the inverse of relax_.
  m.def("unrelax_(Tensor(a!) state, Tensor f_val, float beta) -> ()");
  // [sum((z - fz)^2), sum(fz^2)] in one pass; float64 for float64 z, float32 otherwise.
  m.def("residual(Tensor z, Tensor fz) -> Tensor");
  // Exact mode (revdeq_kernels/fixed_point.py): int64 fixed-point state with frac_bits fractional
  // bits, beta = p / 2^m. The forward stores the m bits it drops in remainder (bit planes, shape
  // (m, ceil(numel / 32)), int32); elements it cannot represent are left unchanged and flagged in
  // status (int32, one element) without a host sync.
  m.def("relax_fixed_(Tensor(a!) state, Tensor f_val, Tensor(b!) remainder, Tensor(c!) status, int p, int m, "
        "int frac_bits) -> ()");
  // The exact inverse of relax_fixed_, given the same f_val and the remainder it wrote.
  m.def("unrelax_fixed_(Tensor(a!) state, Tensor f_val, Tensor remainder, Tensor(c!) status, int p, int m, "
        "int frac_bits) -> ()");
}

namespace {

bool built_with_cuda() {
#ifdef REVDEQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "revdeq_kernels compiled ops; importing this module registers torch.ops.revdeq.*";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
}
