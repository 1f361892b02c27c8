// Argument checks for the revdeq ops, shared by the CPU and CUDA launchers. They guard memory safety
// for callers of torch.ops.revdeq.* directly; the Python API checks the same things first.
#pragma once

#include <ATen/ATen.h>

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

// The bytes [begin, end) a non-empty tensor's elements span in memory (strides are never negative).
// Memory is compared by address, not by storage: two tensors over the same memory through separate
// storages (e.g. torch.from_numpy of overlapping numpy slices) overlap too.
struct ByteSpan {
  uintptr_t begin;
  uintptr_t end;
};
ByteSpan byte_span(const at::Tensor& t);
bool spans_overlap(const ByteSpan& a, const ByteSpan& b);

// Raises "<op>: <b_name> shares memory with <a_name>" when the spans of two non-empty tensors
// intersect (exact for dense tensors; interleaved strided views count as sharing). Meta tensors
// have no memory and never overlap.
void check_disjoint(const char* op, const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b,
                    const char* hint = "");

// Coefficients (a, b) with new_state = a * state + b * f for relax_ (inverse=false) or unrelax_.
std::pair<double, double> update_coefficients(double beta, bool inverse);

// float64 for float64 states, float32 otherwise.
at::ScalarType residual_dtype(const at::Tensor& z);

}  // namespace revdeq
