// The thin launcher of the CUDA relax_, unrelax_ and residual kernels (cuda/kernels/pointwise.cu,
// residual.cu): checks arguments, flattens the tensors, selects the device and the current stream,
// and registers the ops for the CUDA dispatch key. The kernels never see a tensor.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "common/layout.h"
#include "cuda/bindings/launch_checks.h"
#include "cuda/kernels/revdeq_cuda.h"

namespace revdeq {
namespace {

// relax_ (kInverse false) and unrelax_ (true).
template <bool kInverse>
void affine_update_cuda(const at::Tensor& state, const at::Tensor& f_val, double beta) {
  const char* op = kInverse ? "unrelax_" : "relax_";
  check_pointwise(op, state, f_val, beta, c10::DeviceType::CUDA);
  if (state.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(state.device());
  check_no_earlier_error(op);
  const Affine k = affine_coefficients(beta, kInverse);
  with_flat_layout(state, f_val, /*write_back=*/true, [&](const at::Tensor& s, const at::Tensor& f) {
    check_element_aligned(s, op, "state");
    check_element_aligned(f, op, "f_val");
    check_cuda(cuda::affine_update(s.data_ptr(), kernel_dtype(s, op, "state"), f.data_ptr(),
                                   kernel_dtype(f, op, "f_val"), s.numel(), k,
                                   c10::cuda::getCurrentCUDAStream().stream()),
               op);
  });
}

at::Tensor residual_cuda(const at::Tensor& z, const at::Tensor& fz) {
  check_residual(z, fz, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(z.device());
  check_no_earlier_error("residual");
  at::Tensor out = at::empty({2}, z.options().dtype(residual_dtype(z)));
  if (z.numel() == 0) return out.zero_();
  size_t workspace_bytes = 0;
  check_cuda(cuda::residual_workspace_bytes(&workspace_bytes), "residual");
  // From the caching allocator on the current stream: freeing it when this function returns is safe,
  // the allocator hands the memory out again only after the kernel in that stream's order.
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, z.options().dtype(at::kByte));
  with_flat_layout(z, fz, /*write_back=*/false, [&](const at::Tensor& zf, const at::Tensor& ff) {
    check_element_aligned(zf, "residual", "z");
    check_element_aligned(ff, "residual", "fz");
    check_cuda(cuda::residual(zf.data_ptr(), kernel_dtype(zf, "residual", "z"), ff.data_ptr(),
                              kernel_dtype(ff, "residual", "fz"), zf.numel(), out.data_ptr(), workspace.data_ptr(),
                              workspace_bytes, c10::cuda::getCurrentCUDAStream().stream()),
               "residual");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CUDA, m) {
  m.impl("relax_", &affine_update_cuda<false>);
  m.impl("unrelax_", &affine_update_cuda<true>);
  m.impl("residual", &residual_cuda);
}

}  // namespace revdeq
