// The thin launcher of the exact-mode CUDA kernels (cuda/kernels/exact.cu): checks arguments with the
// CPU launcher's checks, lays the tensors out row-major, selects the device and the current stream,
// and registers relax_fixed_ and unrelax_fixed_ for the CUDA dispatch key.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

#include "common/checks.h"
#include "common/layout.h"
#include "cuda/bindings/launch_checks.h"
#include "cuda/kernels/revdeq_cuda.h"

namespace revdeq {
namespace {

// relax_fixed_ (kInverse false) and unrelax_fixed_ (true). Remainder bits belong to row-major element
// indices, so the kernels walk row-major versions of state and f_val (with_row_major).
template <bool kInverse>
void fixed_update_cuda(const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                       const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits) {
  const char* op = kInverse ? "unrelax_fixed_" : "relax_fixed_";
  check_fixed(op, state, f_val, remainder, status, p, m, frac_bits, c10::DeviceType::CUDA);
  if (state.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(state.device());
  check_no_earlier_error(op);
  with_row_major(state, f_val, [&](const at::Tensor& s, const at::Tensor& f) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"state", s}, {"f_val", f},
                                  {"remainder", remainder}, {"status", status}}) {
      check_element_aligned(t, op, name);
    }
    auto* words = reinterpret_cast<uint32_t*>(remainder.data_ptr<int32_t>());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const cuda::DType f_dtype = kernel_dtype(f, op, "f_val");
    const int mi = static_cast<int>(m), fi = static_cast<int>(frac_bits);
    check_cuda(kInverse ? cuda::unrelax_fixed(s.data_ptr<int64_t>(), f.data_ptr(), f_dtype, words,
                                              status.data_ptr<int32_t>(), s.numel(), p, mi, fi, stream)
                        : cuda::relax_fixed(s.data_ptr<int64_t>(), f.data_ptr(), f_dtype, words,
                                            status.data_ptr<int32_t>(), s.numel(), p, mi, fi, stream),
               op);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CUDA, m) {
  m.impl("relax_fixed_", &fixed_update_cuda<false>);
  m.impl("unrelax_fixed_", &fixed_update_cuda<true>);
}

}  // namespace revdeq
