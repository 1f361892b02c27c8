#include "multi.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <string>

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

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
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
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!overlaps(states[i], states[j]), op, ": states[", i, "] shares memory with states[", j, "]");
    }
    for (size_t j = 0; j < f_vals.size(); ++j) {
      TORCH_CHECK_VALUE(!overlaps(states[i], f_vals[j]), op, ": f_vals[", j, "] shares memory with states[", i, "]");
    }
  }
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
