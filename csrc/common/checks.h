// Every argument check of the C++ and CUDA launchers, in one place: what a direct call of
// torch.ops.revdeq.* must still refuse to stay in bounds (the Python API checks all of it first, with
// the same rules: revdeq_kernels/ops/checks.py). Memory is compared by address range, so two storages
// over the same memory count as sharing it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace revdeq {

// One (state, f) pair: both defined, on device_type, same device and shape, supported dtypes, and f
// no more precise than state. The names are the ones the messages use (e.g. "state[2]").
void check_pair(const char* op, const char* state_name, const at::Tensor& state, const char* f_name,
                const at::Tensor& f, c10::DeviceType device_type);

// relax_ / unrelax_: state is updated in place from f_val, which must not share memory with it.
void check_pointwise(const char* op, const at::Tensor& state, const at::Tensor& f_val, double beta,
                     c10::DeviceType device_type);

// residual: reads z and fz.
void check_residual(const at::Tensor& z, const at::Tensor& fz, c10::DeviceType device_type);

// multi_relax_ / multi_unrelax_: a non-empty list of states and as many f values, each pair as for
// relax_ (messages name "states[i]" and "f_vals[i]"), one device, beta in (0, 2) other than 1, and
// no state overlapping itself, another state or an f value (exact for dense tensors).
void check_multi_pointwise(const char* op, at::TensorList states, at::TensorList f_vals, double beta,
                           c10::DeviceType device_type);

// multi_residual: a non-empty list of z and as many fz, each pair as for residual, one device.
void check_multi_residual(at::TensorList zs, at::TensorList fzs, c10::DeviceType device_type);

// relax_fixed_ / unrelax_fixed_: state int64 (updated in place), f_val floating of the same shape,
// remainder int32 (m, ceil(n/32)) contiguous, status int32 with one element; all on one device of
// type device_type, pairwise disjoint; beta = p / 2^m.
void check_fixed(const char* op, const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                 const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits, c10::DeviceType device_type);

// The bytes [begin, end) a non-empty tensor's elements span in memory (strides are never negative).
struct ByteSpan {
  uintptr_t begin;
  uintptr_t end;
};
ByteSpan byte_span(const at::Tensor& t);

// Raises "<op>: <b_name> shares memory with <a_name><hint>" when the spans of two non-empty tensors
// intersect (exact for dense tensors; interleaved strided views count as sharing). Meta tensors have
// no memory and never overlap.
void check_disjoint(const char* op, const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b,
                    const char* hint = "");

// float64 for float64 states, float32 otherwise; for a list, float64 when any z is float64.
at::ScalarType residual_dtype(const at::Tensor& z);
at::ScalarType multi_residual_dtype(at::TensorList zs);

}  // namespace revdeq
