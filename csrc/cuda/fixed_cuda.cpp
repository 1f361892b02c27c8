// The thin launcher of the exact-mode CUDA kernels (csrc/cuda/fixed.cu): checks arguments with the
// CPU launcher's checks, lays the tensors out row-major, selects the device and the current stream,
// and registers relax_fixed_ and unrelax_fixed_ for the CUDA dispatch key.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "fixed_checks.h"
#include "launch_checks.h"
#include "revdeq_cuda.h"

namespace revdeq {
namespace {

void fixed_update_cuda(const char* op, const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                       const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits, bool inverse) {
  check_fixed(op, state, f_val, remainder, status, p, m, frac_bits, c10::DeviceType::CUDA);
  if (state.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(state.device());
  check_no_earlier_error(op);
  // Remainder bits belong to row-major element indices, so the kernels walk row-major (contiguous)
  // versions of state and f_val; a state laid out otherwise is updated in a copy and copied back.
  at::Tensor s = state.contiguous();
  const at::Tensor f = f_val.contiguous();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"state", s}, {"f_val", f},
                                {"remainder", remainder}, {"status", status}}) {
    check_element_aligned(t, op, name);
  }
  auto* words = reinterpret_cast<uint32_t*>(remainder.data_ptr<int32_t>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err =
      inverse ? cuda::unrelax_fixed(s.data_ptr<int64_t>(), f.data_ptr(), kernel_dtype(f, op, "f_val"), words,
                                    status.data_ptr<int32_t>(), s.numel(), p, static_cast<int>(m),
                                    static_cast<int>(frac_bits), stream)
              : cuda::relax_fixed(s.data_ptr<int64_t>(), f.data_ptr(), kernel_dtype(f, op, "f_val"), words,
                                  status.data_ptr<int32_t>(), s.numel(), p, static_cast<int>(m),
                                  static_cast<int>(frac_bits), stream);
  check_cuda(err, op);
  if (!s.is_same(state)) state.copy_(s);
}

void relax_fixed_cuda(const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                      const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits) {
  fixed_update_cuda("relax_fixed_", state, f_val, remainder, status, p, m, frac_bits, /*inverse=*/false);
}

void unrelax_fixed_cuda(const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                        const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits) {
  fixed_update_cuda("unrelax_fixed_", state, f_val, remainder, status, p, m, frac_bits, /*inverse=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CUDA, m) {
  m.impl("relax_fixed_", &relax_fixed_cuda);
  m.impl("unrelax_fixed_", &unrelax_fixed_cuda);
}

}  // namespace revdeq
