// What the CUDA launchers (pointwise.cpp, exact.cpp, multi.cpp here) check around every call into the
// kernels: the kernels' dtype of a tensor, element alignment, and CUDA errors, kept apart from
// errors that earlier work left pending.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cuda/kernels/revdeq_cuda.h"

namespace revdeq {

inline cuda::DType kernel_dtype(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Tensors from torch's allocator always are; one built with from_blob on an odd address is not, and
// the kernels' element accesses would fault on it.
inline void check_element_aligned(const at::Tensor& t, const char* op, const char* arg) {
  const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
  TORCH_CHECK_VALUE(address % t.element_size() == 0, op, ": ", arg, " has data pointer ", t.data_ptr(),
                    ", which is not aligned to its element size of ", t.element_size(), " bytes");
}

// Before calling into the kernels: an error already pending on this thread is earlier work's (an
// unchecked launch, a faulting kernel), reported as such and cleared, so that the error the kernels
// return afterwards is theirs.
inline void check_no_earlier_error(const char* op) {
  const cudaError_t earlier = cuda::take_earlier_error();
  TORCH_CHECK(earlier == cudaSuccess, op, ": a CUDA error from earlier work on this device was pending when ", op,
              " was called: ", cudaGetErrorName(earlier), " (", cudaGetErrorString(earlier), "). It is not from ", op,
              ", which launched nothing; run with CUDA_LAUNCH_BLOCKING=1 to find the call that raised it");
}

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
              ")");
}

}  // namespace revdeq
