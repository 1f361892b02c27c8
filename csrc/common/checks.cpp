#include "checks.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fixed_point.h"

namespace revdeq {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_beta(const char* op, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0.0 && beta < 2.0 && beta != 1.0, op,
                    ": beta must be a finite number in (0, 2) other than 1, got ", beta);
}

void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                    " has internal overlap (e.g. an expanded view); an in-place update would write some elements "
                    "more than once");
}

bool spans_overlap(const ByteSpan& a, const ByteSpan& b) { return a.begin < b.end && b.begin < a.end; }

std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

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
  check_beta(op, beta);
  check_no_internal_overlap(op, "state", state);
  check_disjoint(op, "state", state, "f_val", f_val,
                 "; the in-place update would read values it has already overwritten (pass f_val.clone())");
}

ByteSpan byte_span(const at::Tensor& t) {
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>(span) * t.element_size()};
}

void check_disjoint(const char* op, const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b,
                    const char* hint) {
  if (a.numel() == 0 || b.numel() == 0 || a.is_meta() || b.is_meta()) return;
  TORCH_CHECK_VALUE(!spans_overlap(byte_span(a), byte_span(b)), op, ": ", b_name, " shares memory with ", a_name,
                    hint);
}

void check_residual(const at::Tensor& z, const at::Tensor& fz, c10::DeviceType device_type) {
  check_pair("residual", "z", z, "fz", fz, device_type);
}

at::ScalarType residual_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}


namespace {

void check_lists(const char* op, const char* a_name, at::TensorList a, const char* b_name, at::TensorList b,
                 c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(!a.empty(), op, ": ", a_name, " is an empty list; pass at least one tensor");
  TORCH_CHECK_VALUE(b.size() == a.size(), op, ": ", b_name, " has ", b.size(), " tensors but ", a_name, " has ",
                    a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    check_pair(op, item(a_name, i).c_str(), a[i], item(b_name, i).c_str(), b[i], device_type);
    TORCH_CHECK_VALUE(a[i].device() == a[0].device(), op, ": ", a_name, "[", i, "] is on ", a[i].device(), " but ",
                      a_name, "[0] is on ", a[0].device(), "; all tensors of one call must be on one device");
  }
}

// A non-empty tensor's bytes (checks.h, byte_span), and which argument it is: states[index]
// (is_state) or f_vals[index].
struct AddressRange {
  uintptr_t begin;
  uintptr_t end;
  bool is_state;
  size_t index;
};

AddressRange address_range(const at::Tensor& t, bool is_state, size_t index) {
  const ByteSpan span = byte_span(t);
  return {span.begin, span.end, is_state, index};
}

// No state's range meets another state's or an f value's (f values may meet each other): sorted by
// start, a range that begins before the furthest end seen so far intersects the range with that end.
// Exact for dense tensors; interleaved strided views count as sharing, as in revdeq_kernels/ops/checks.py.
void check_no_shared_memory(const char* op, at::TensorList states, at::TensorList f_vals) {
  std::vector<AddressRange> ranges;
  ranges.reserve(states.size() + f_vals.size());
  for (size_t i = 0; i < states.size(); ++i) {
    if (states[i].numel() > 0) ranges.push_back(address_range(states[i], true, i));
  }
  for (size_t i = 0; i < f_vals.size(); ++i) {
    if (f_vals[i].numel() > 0) ranges.push_back(address_range(f_vals[i], false, i));
  }
  std::sort(ranges.begin(), ranges.end(), [](const AddressRange& a, const AddressRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : (a.is_state != b.is_state ? a.is_state : a.index < b.index);
  });
  const AddressRange* furthest = nullptr;        // of any kind
  const AddressRange* furthest_state = nullptr;  // of the states
  for (const AddressRange& r : ranges) {
    const AddressRange* other = r.is_state ? furthest : furthest_state;
    if (other != nullptr && r.begin < other->end) {
      const AddressRange& state = other->is_state ? *other : r;
      const AddressRange& rest = other->is_state ? r : *other;
      TORCH_CHECK_VALUE(false, op, ": ", rest.is_state ? "states[" : "f_vals[", rest.index,
                        "] shares memory with states[", state.index, "]");
    }
    if (furthest == nullptr || r.end > furthest->end) furthest = &r;
    if (r.is_state && (furthest_state == nullptr || r.end > furthest_state->end)) furthest_state = &r;
  }
}

}  // namespace

void check_multi_pointwise(const char* op, at::TensorList states, at::TensorList f_vals, double beta,
                           c10::DeviceType device_type) {
  check_lists(op, "states", states, "f_vals", f_vals, device_type);
  check_beta(op, beta);
  for (size_t i = 0; i < states.size(); ++i) check_no_internal_overlap(op, item("states", i).c_str(), states[i]);
  if (states[0].device().type() != c10::DeviceType::Meta) check_no_shared_memory(op, states, f_vals);
}

void check_multi_residual(at::TensorList zs, at::TensorList fzs, c10::DeviceType device_type) {
  check_lists("multi_residual", "zs", zs, "fzs", fzs, device_type);
}

at::ScalarType multi_residual_dtype(at::TensorList zs) {
  for (const auto& z : zs) {
    if (z.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void check_fixed(const char* op, const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                 const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(state.defined() && f_val.defined() && remainder.defined() && status.defined(), op,
                    ": state, f_val, remainder and status must be defined tensors");
  TORCH_CHECK_VALUE(state.device().type() == device_type, op, ": state is on ", state.device(),
                    " but this kernel serves ", c10::DeviceTypeName(device_type), " tensors");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"f_val", f_val},
                                {"remainder", remainder}, {"status", status}}) {
    TORCH_CHECK_VALUE(t.device() == state.device(), op, ": ", name, " is on ", t.device(), " but state is on ",
                      state.device());
  }
  TORCH_CHECK_TYPE(state.scalar_type() == at::kLong, op, ": state must be int64 (fixed point), got ",
                   state.scalar_type());
  TORCH_CHECK_TYPE(supported_dtype(f_val.scalar_type()), op, ": f_val must be float64, float32, float16 or bfloat16, got ",
                   f_val.scalar_type());
  TORCH_CHECK_VALUE(f_val.sizes() == state.sizes(), op, ": f_val has shape ", f_val.sizes(),
                    " but state has shape ", state.sizes());
  TORCH_CHECK_VALUE(m >= 1 && m <= fixed::kMaxBetaBits, op, ": beta = p / 2^m needs m in [1, ",
                    fixed::kMaxBetaBits, "], got m=", m);
  TORCH_CHECK_VALUE(p > 0 && p < (int64_t{2} << m) && p % 2 == 1, op,
                    ": beta = p / 2^m needs p odd in (0, 2^(m+1)), got p=", p, ", m=", m);
  TORCH_CHECK_VALUE(frac_bits >= 0 && frac_bits <= fixed::kMaxFracBits, op, ": frac_bits must be in [0, ",
                    fixed::kMaxFracBits, "], got ", frac_bits);
  const int64_t words = (state.numel() + fixed::kWordBits - 1) / fixed::kWordBits;
  TORCH_CHECK_TYPE(remainder.scalar_type() == at::kInt, op, ": remainder must be int32, got ",
                   remainder.scalar_type());
  TORCH_CHECK_VALUE(remainder.dim() == 2 && remainder.size(0) == m && remainder.size(1) == words, op,
                    ": remainder must have shape [", m, ", ", words, "] (m, ceil(numel / 32)), got ",
                    remainder.sizes());
  TORCH_CHECK_VALUE(remainder.is_contiguous(), op, ": remainder must be contiguous");
  TORCH_CHECK_TYPE(status.scalar_type() == at::kInt, op, ": status must be int32, got ", status.scalar_type());
  TORCH_CHECK_VALUE(status.numel() == 1, op, ": status must have one element, got shape ", status.sizes());
  check_no_internal_overlap(op, "state", state);
  check_disjoint(op, "state", state, "f_val", f_val);
  check_disjoint(op, "state", state, "remainder", remainder);
  check_disjoint(op, "f_val", f_val, "remainder", remainder);
  check_disjoint(op, "state", state, "status", status);
  check_disjoint(op, "f_val", f_val, "status", status);
  check_disjoint(op, "remainder", remainder, "status", status);
}

}  // namespace revdeq
