#include "multi.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "checks.h"

namespace revdeq {
namespace {

std::string item(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

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
// Exact for dense tensors; interleaved strided views count as sharing, as in revdeq_kernels/ops.py.
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
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0.0 && beta < 2.0 && beta != 1.0, op,
                    ": beta must be a finite number in (0, 2) other than 1, got ", beta);
  for (size_t i = 0; i < states.size(); ++i) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(states[i]) != at::MemOverlap::Yes, op, ": states[", i,
                      "] has internal overlap (e.g. an expanded view); an in-place update would write some "
                      "elements more than once");
  }
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

void FlatPairs::write_back() const {
  for (const auto& [original, copy] : copies) original.copy_(copy);
}

FlatPairs flatten_pairs(at::TensorList primary, at::TensorList secondary) {
  FlatPairs flat;
  flat.primary.reserve(primary.size());
  flat.secondary.reserve(primary.size());
  flat.index.reserve(primary.size());
  for (size_t i = 0; i < primary.size(); ++i) {
    const at::Tensor& p = primary[i];
    const at::Tensor& s = secondary[i];
    if (p.numel() == 0) continue;
    flat.index.push_back(i);
    if (!p.is_non_overlapping_and_dense()) {
      flat.primary.push_back(p.contiguous());
      flat.secondary.push_back(s.contiguous());
      flat.copies.emplace_back(p, flat.primary.back());
    } else if (s.is_non_overlapping_and_dense() && s.strides() == p.strides()) {
      flat.primary.push_back(p);
      flat.secondary.push_back(s);
    } else {
      flat.primary.push_back(p);
      flat.secondary.push_back(at::empty_strided(p.sizes(), p.strides(), s.options()).copy_(s));
    }
  }
  return flat;
}

}  // namespace revdeq
