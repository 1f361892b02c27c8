// C++ CPU kernels of the multi-tensor ops, registered for the CPU dispatch key. One op call walks
// every tensor of the call in one at::parallel_for over their combined index space: a task gets a
// range of that space and runs the per-range loop of loops.h on each tensor piece inside it, so
// many small tensors cost one parallel region, not one each. Dtype pairs are resolved per tensor
// before the loop (a table of function pointers), so members of different dtypes mix in one call.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "cpu/loops.h"

namespace revdeq {
namespace {

using AffineFn = void (*)(void* state, const void* f, int64_t begin, int64_t end, const Affine& k);
using ResidualFn = void (*)(const void* z, const void* f, int64_t begin, int64_t end, double* diff_sq,
                            double* f_sq);

template <typename S, typename F>
void affine_erased(void* state, const void* f, int64_t begin, int64_t end, const Affine& k) {
  cpu::run_affine(static_cast<S*>(state), static_cast<const F*>(f), begin, end, k);
}

template <typename Z, typename F>
void residual_erased(const void* z, const void* f, int64_t begin, int64_t end, double* diff_sq, double* f_sq) {
  cpu::run_residual(static_cast<const Z*>(z), static_cast<const F*>(f), begin, end, diff_sq, f_sq);
}

// Position of `index` in a list of pieces laid end to end: the piece k with offsets[k] <= index <
// offsets[k + 1] (offsets[0] = 0, one entry more than there are pieces).
size_t piece_of(const std::vector<int64_t>& offsets, int64_t index) {
  return static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), index) - offsets.begin()) - 1;
}

// multi_relax_ (kInverse false) and multi_unrelax_ (true).
template <bool kInverse>
void multi_affine_cpu(at::TensorList states, at::TensorList f_vals, double beta) {
  const char* op = kInverse ? "multi_unrelax_" : "multi_relax_";
  check_multi_pointwise(op, states, f_vals, beta, c10::DeviceType::CPU);
  const FlatPairs flat = flatten_pairs(states, f_vals);
  const size_t count = flat.primary.size();
  if (count == 0) return;
  const Affine coefficients = affine_coefficients(beta, kInverse);
  std::vector<AffineFn> fns(count);
  std::vector<void*> s_ptrs(count);
  std::vector<const void*> f_ptrs(count);
  std::vector<int64_t> offsets(count + 1, 0);
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor& s = flat.primary[k];
    const at::Tensor& f = flat.secondary[k];
    dispatch_pair(s.scalar_type(), f.scalar_type(), op, [&](auto s_tag, auto f_tag) {
      fns[k] = &affine_erased<typename decltype(s_tag)::type, typename decltype(f_tag)::type>;
    });
    s_ptrs[k] = s.data_ptr();
    f_ptrs[k] = f.data_ptr();
    offsets[k + 1] = offsets[k] + s.numel();
  }
  at::parallel_for(0, offsets[count], cpu::kPointwiseGrain, [&](int64_t begin, int64_t end) {
    for (size_t k = piece_of(offsets, begin); k < count && offsets[k] < end; ++k) {
      const int64_t lo = std::max(begin, offsets[k]) - offsets[k];
      const int64_t hi = std::min(end, offsets[k + 1]) - offsets[k];
      fns[k](s_ptrs[k], f_ptrs[k], lo, hi, coefficients);
    }
  });
  flat.write_back();
}

// Each tensor is cut into the same fixed chunks as the single-tensor residual and its chunk sums are
// added in order, then the tensors' sums are added in order: the result depends on the inputs only
// (not on the thread count), and each tensor's share is bitwise what residual computes for it.
void multi_residual_sums(at::TensorList zs, at::TensorList fzs, double (&sums)[2]) {
  check_multi_residual(zs, fzs, c10::DeviceType::CPU);
  const FlatPairs flat = flatten_pairs(zs, fzs);
  const size_t count = flat.primary.size();
  std::vector<ResidualFn> fns(count);
  std::vector<int64_t> chunk_offsets(count + 1, 0);
  int64_t elements = 0;
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor& z = flat.primary[k];
    dispatch_pair(z.scalar_type(), flat.secondary[k].scalar_type(), "multi_residual", [&](auto z_tag, auto f_tag) {
      fns[k] = &residual_erased<typename decltype(z_tag)::type, typename decltype(f_tag)::type>;
    });
    chunk_offsets[k + 1] = chunk_offsets[k] + (z.numel() + cpu::kResidualChunk - 1) / cpu::kResidualChunk;
    elements += z.numel();
  }
  const int64_t chunks = chunk_offsets[count];
  std::vector<double> partial(2 * chunks, 0.0);
  // Below one chunk's worth of elements in all (many tiny tensors), a single task does everything.
  const int64_t grain = elements <= cpu::kResidualChunk ? std::max<int64_t>(chunks, 1) : 1;
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const size_t k = piece_of(chunk_offsets, c);
      const int64_t n = flat.primary[k].numel();
      const int64_t begin = (c - chunk_offsets[k]) * cpu::kResidualChunk;
      fns[k](flat.primary[k].data_ptr(), flat.secondary[k].data_ptr(), begin, std::min(n, begin + cpu::kResidualChunk),
             &partial[2 * c], &partial[2 * c + 1]);
    }
  });
  sums[0] = sums[1] = 0.0;
  for (size_t k = 0; k < count; ++k) {
    double tensor_sums[2] = {0.0, 0.0};
    for (int64_t c = chunk_offsets[k]; c < chunk_offsets[k + 1]; ++c) {
      tensor_sums[0] += partial[2 * c];
      tensor_sums[1] += partial[2 * c + 1];
    }
    sums[0] += tensor_sums[0];
    sums[1] += tensor_sums[1];
  }
}

at::Tensor multi_residual_cpu(at::TensorList zs, at::TensorList fzs) {
  double sums[2] = {0.0, 0.0};
  multi_residual_sums(zs, fzs, sums);
  return cpu::sums_tensor(sums, zs[0].options(), multi_residual_dtype(zs));
}

void multi_residual_out_cpu(at::TensorList zs, at::TensorList fzs, const at::Tensor& out) {
  double sums[2] = {0.0, 0.0};
  multi_residual_sums(zs, fzs, sums);
  cpu::check_sums_out("multi_residual_out_", out, multi_residual_dtype(zs));
  cpu::write_sums(sums, multi_residual_dtype(zs), out);
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CPU, m) {
  m.impl("multi_relax_", &multi_affine_cpu<false>);
  m.impl("multi_unrelax_", &multi_affine_cpu<true>);
  m.impl("multi_residual", &multi_residual_cpu);
  m.impl("multi_residual_out_", &multi_residual_out_cpu);
}

}  // namespace revdeq
