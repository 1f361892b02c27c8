#include "fixed_checks.h"

#include <ATen/MemoryOverlap.h>

#include "checks.h"
#include "fixed_point.h"

namespace revdeq {
namespace {

bool floating(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

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
  TORCH_CHECK_TYPE(floating(f_val.scalar_type()), op, ": f_val must be float64, float32, float16 or bfloat16, got ",
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
  TORCH_CHECK_VALUE(at::has_internal_overlap(state) != at::MemOverlap::Yes, op,
                    ": state has internal overlap (e.g. an expanded view); an in-place update "
                    "would write some elements more than once");
  check_disjoint(op, "state", state, "f_val", f_val);
  check_disjoint(op, "state", state, "remainder", remainder);
  check_disjoint(op, "f_val", f_val, "remainder", remainder);
  check_disjoint(op, "state", state, "status", status);
  check_disjoint(op, "f_val", f_val, "status", status);
  check_disjoint(op, "remainder", remainder, "status", status);
}

}  // namespace revdeq
