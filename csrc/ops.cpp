// The Python module revdeq_kernels._C. Importing it registers the kernels of csrc/cpu/ and
// csrc/cuda/bindings/ per dispatch key (TORCH_LIBRARY_IMPL) for the revdeq ops, whose schemas and fake
// kernels revdeq_kernels/ops/library.py defines (it is imported first).
#include <torch/extension.h>

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
