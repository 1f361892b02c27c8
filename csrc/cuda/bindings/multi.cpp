// The thin launcher of the multi-tensor CUDA kernels (cuda/kernels/multi.cu): checks the lists, flattens
// every member, selects the device and the current stream, and registers multi_relax_, multi_unrelax_
// and multi_residual for the CUDA dispatch key. The kernels never see a tensor.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "cuda/bindings/launch_checks.h"
#include "cuda/kernels/revdeq_cuda.h"

namespace revdeq {
namespace {

// The kernels' view of the flat members. A tensor from torch's allocator is always aligned to its
// element size; one built with from_blob on an odd address is not, and is refused here.
std::vector<cuda::MemberPair> kernel_members(const char* op, const char* a_name, const char* b_name,
                                             const FlatPairs& flat) {
  std::vector<cuda::MemberPair> members;
  members.reserve(flat.primary.size());
  for (size_t i = 0; i < flat.primary.size(); ++i) {
    const at::Tensor& a = flat.primary[i];
    const at::Tensor& b = flat.secondary[i];
    const std::string a_item = std::string(a_name) + "[" + std::to_string(flat.index[i]) + "]";
    const std::string b_item = std::string(b_name) + "[" + std::to_string(flat.index[i]) + "]";
    check_element_aligned(a, op, a_item.c_str());
    check_element_aligned(b, op, b_item.c_str());
    members.push_back({a.data_ptr(), b.data_ptr(), a.numel(), kernel_dtype(a, op, a_item.c_str()),
                       kernel_dtype(b, op, b_item.c_str())});
  }
  return members;
}

// multi_relax_ (kInverse false) and multi_unrelax_ (true).
template <bool kInverse>
void multi_affine_cuda(at::TensorList states, at::TensorList f_vals, double beta) {
  const char* op = kInverse ? "multi_unrelax_" : "multi_relax_";
  check_multi_pointwise(op, states, f_vals, beta, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(states[0].device());
  check_no_earlier_error(op);
  const FlatPairs flat = flatten_pairs(states, f_vals);
  if (flat.primary.empty()) return;
  const Affine k = affine_coefficients(beta, kInverse);
  const auto members = kernel_members(op, "states", "f_vals", flat);
  check_cuda(cuda::multi_affine_update(members.data(), static_cast<int>(members.size()), k,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             op);
  flat.write_back();
}

at::Tensor multi_residual_cuda(at::TensorList zs, at::TensorList fzs) {
  check_multi_residual(zs, fzs, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(zs[0].device());
  check_no_earlier_error("multi_residual");
  const at::ScalarType out_dtype = multi_residual_dtype(zs);
  at::Tensor out = at::empty({2}, zs[0].options().dtype(out_dtype));
  const FlatPairs flat = flatten_pairs(zs, fzs);
  if (flat.primary.empty()) return out.zero_();
  const auto members = kernel_members("multi_residual", "zs", "fzs", flat);
  const int count = static_cast<int>(members.size());
  size_t workspace_bytes = 0;
  check_cuda(cuda::multi_residual_workspace_bytes(count, &workspace_bytes), "multi_residual");
  // From the caching allocator on the current stream: freeing it on return is safe, the allocator
  // hands the memory out again only after the kernels in that stream's order.
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, zs[0].options().dtype(at::kByte));
  check_cuda(cuda::multi_residual(members.data(), count, out_dtype == at::kDouble, out.data_ptr(),
                                  workspace.data_ptr(), workspace_bytes, c10::cuda::getCurrentCUDAStream().stream()),
             "multi_residual");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CUDA, m) {
  m.impl("multi_relax_", &multi_affine_cuda<false>);
  m.impl("multi_unrelax_", &multi_affine_cuda<true>);
  m.impl("multi_residual", &multi_residual_cuda);
}

}  // namespace revdeq
