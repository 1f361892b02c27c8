// C++ CPU kernels for relax_, unrelax_ and residual, registered for the CPU dispatch key.
// The per-range loops live in loops.h (the pointwise one vectorized by the compiler, the reduction
// with explicit vector types); here they are parallelized with at::parallel_for. Half types are
// widened to float for the arithmetic.
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

using cpu::kPointwiseGrain;
using cpu::kResidualChunk;

template <typename S, typename F>
void affine_kernel(S* state, const F* f, int64_t n, const Affine& k) {
  at::parallel_for(0, n, kPointwiseGrain, [&](int64_t begin, int64_t end) {
    cpu::run_affine(state, f, begin, end, k);
  });
}

template <typename Z, typename F>
void residual_kernel(const Z* z, const F* f, int64_t n, double* sums) {
  const int64_t chunks = (n + kResidualChunk - 1) / kResidualChunk;
  std::vector<double> partial(2 * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kResidualChunk;
      cpu::run_residual(z, f, begin, std::min(n, begin + kResidualChunk), &partial[2 * c], &partial[2 * c + 1]);
    }
  });
  sums[0] = sums[1] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sums[0] += partial[2 * c];
    sums[1] += partial[2 * c + 1];
  }
}

// relax_ (kInverse false) and unrelax_ (true).
template <bool kInverse>
void affine_update_cpu(const at::Tensor& state, const at::Tensor& f_val, double beta) {
  const char* op = kInverse ? "unrelax_" : "relax_";
  check_pointwise(op, state, f_val, beta, c10::DeviceType::CPU);
  if (state.numel() == 0) return;
  const Affine k = affine_coefficients(beta, kInverse);
  with_flat_layout(state, f_val, /*write_back=*/true, [&](const at::Tensor& s, const at::Tensor& f) {
    dispatch_pair(s.scalar_type(), f.scalar_type(), op, [&](auto s_tag, auto f_tag) {
      using S = typename decltype(s_tag)::type;
      using F = typename decltype(f_tag)::type;
      affine_kernel<S, F>(s.data_ptr<S>(), f.data_ptr<F>(), s.numel(), k);
    });
  });
}

void residual_sums(const at::Tensor& z, const at::Tensor& fz, double (&sums)[2]) {
  check_residual(z, fz, c10::DeviceType::CPU);
  if (z.numel() > 0) {
    with_flat_layout(z, fz, /*write_back=*/false, [&](const at::Tensor& zf, const at::Tensor& ff) {
      dispatch_pair(zf.scalar_type(), ff.scalar_type(), "residual", [&](auto z_tag, auto f_tag) {
        using Z = typename decltype(z_tag)::type;
        using F = typename decltype(f_tag)::type;
        residual_kernel<Z, F>(zf.data_ptr<Z>(), ff.data_ptr<F>(), zf.numel(), sums);
      });
    });
  }
}

at::Tensor residual_cpu(const at::Tensor& z, const at::Tensor& fz) {
  double sums[2] = {0.0, 0.0};
  residual_sums(z, fz, sums);
  return cpu::sums_tensor(sums, z.options(), residual_dtype(z));
}

// residual into a given (2,) tensor: what the solver writes into its per-step rows, with no allocation.
void residual_out_cpu(const at::Tensor& z, const at::Tensor& fz, const at::Tensor& out) {
  double sums[2] = {0.0, 0.0};
  residual_sums(z, fz, sums);
  cpu::check_sums_out("residual_out_", out, residual_dtype(z));
  cpu::write_sums(sums, residual_dtype(z), out);
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CPU, m) {
  m.impl("relax_", &affine_update_cpu<false>);
  m.impl("unrelax_", &affine_update_cpu<true>);
  m.impl("residual", &residual_cpu);
  m.impl("residual_out_", &residual_out_cpu);
}

}  // namespace revdeq
