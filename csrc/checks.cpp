#include "checks.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>

namespace revdeq {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_pair(const char* op, const char* state_name, const at::Tensor& state, const char* f_name,
                const at::Tensor& f, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(state.defined() && f.defined(), op, ": ", state_name, " and ", f_name,
                    " must be defined tensors");
  TORCH_CHECK_VALUE(state.device().type() == device_type, op, ": ", state_name, " is on ", state.device(),
                    " but this kernel serves ", c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK_VALUE(f.device() == state.device(), op, ": ", f_name, " is on ", f.device(), " but ",
                    state_name, " is on ", state.device());
  TORCH_CHECK_TYPE(supported_dtype(state.scalar_type()), op, ": ", state_name,
                   " must be float64, float32, float16 or bfloat16, got ", state.scalar_type());
  TORCH_CHECK_TYPE(supported_dtype(f.scalar_type()), op, ": ", f_name,
                   " must be float64, float32, float16 or bfloat16, got ", f.scalar_type());
  TORCH_CHECK_TYPE(c10::promoteTypes(state.scalar_type(), f.scalar_type()) == state.scalar_type(), op, ": ",
                   f_name, " has dtype ", f.scalar_type(), ", which ", state_name, " (", state.scalar_type(),
                   ") cannot hold without losing precision");
  TORCH_CHECK_VALUE(f.sizes() == state.sizes(), op, ": ", f_name, " has shape ", f.sizes(), " but ",
                    state_name, " has shape ", state.sizes());
}

void check_pointwise(const char* op, const at::Tensor& state, const at::Tensor& f_val, double beta,
                     c10::DeviceType device_type) {
  check_pair(op, "state", state, "f_val", f_val, device_type);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0.0 && beta < 2.0 && beta != 1.0, op,
                    ": beta must be a finite number in (0, 2) other than 1, got ", beta);
  TORCH_CHECK_VALUE(at::has_internal_overlap(state) != at::MemOverlap::Yes, op,
                    ": state has internal overlap (e.g. an expanded view); an in-place update "
                    "would write some elements more than once");
  check_disjoint(op, "state", state, "f_val", f_val,
                 "; the in-place update would read values it has already overwritten (pass f_val.clone())");
}

ByteSpan byte_span(const at::Tensor& t) {
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>(span) * t.element_size()};
}

bool spans_overlap(const ByteSpan& a, const ByteSpan& b) { return a.begin < b.end && b.begin < a.end; }

void check_disjoint(const char* op, const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b,
                    const char* hint) {
  if (a.numel() == 0 || b.numel() == 0 || a.is_meta() || b.is_meta()) return;
  TORCH_CHECK_VALUE(!spans_overlap(byte_span(a), byte_span(b)), op, ": ", b_name, " shares memory with ", a_name,
                    hint);
}

void check_residual(const at::Tensor& z, const at::Tensor& fz, c10::DeviceType device_type) {
  check_pair("residual", "z", z, "fz", fz, device_type);
}

std::pair<double, double> update_coefficients(double beta, bool inverse) {
  if (!inverse) return {1.0 - beta, beta};
  const double inv = 1.0 / (1.0 - beta);
  return {inv, -beta * inv};
}

at::ScalarType residual_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace revdeq
