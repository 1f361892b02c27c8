// Argument checks for relax_fixed_ / unrelax_fixed_, shared by the CPU and CUDA launchers. They guard
// memory safety for callers of torch.ops.revdeq.* directly; the Python API checks the same first.
#pragma once

#include <ATen/ATen.h>

namespace revdeq {

// state int64 (updated in place), f_val floating of the same shape, remainder int32 (m, ceil(n/32))
// contiguous, status int32 with one element; all on one device of type device_type; beta = p / 2^m.
void check_fixed(const char* op, const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                 const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits, c10::DeviceType device_type);

}  // namespace revdeq
