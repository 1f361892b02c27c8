// C++ CPU kernels for relax_, unrelax_ and residual, registered for the CPU dispatch key.
// The pointwise ops are plain loops over __restrict__ pointers that the compiler vectorizes at -O3;
// the reduction uses explicit vector types. Both are parallelized with at::parallel_for; half types
// are widened to float for the arithmetic.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "layout.h"

namespace revdeq {
namespace {

constexpr int64_t kPointwiseGrain = 1 << 15;
// residual sums fixed chunks into partials and adds the partials in order, so the result does not
// depend on the number of threads.
constexpr int64_t kResidualChunk = 1 << 16;
// Inside a chunk, four vector accumulators (independent dependency chains) are flushed into double
// every kFlush elements, which bounds the float32 rounding error.
constexpr int64_t kFlush = 1024;

template <typename S, typename F>
void affine_kernel(S* __restrict__ state, const F* __restrict__ f, int64_t n, double a, double b) {
  using acc_t = typename AccType<S>::type;
  const acc_t ca = static_cast<acc_t>(a);
  const acc_t cb = static_cast<acc_t>(b);
  at::parallel_for(0, n, kPointwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      state[i] = static_cast<S>(ca * static_cast<acc_t>(state[i]) + cb * static_cast<acc_t>(f[i]));
    }
  });
}

// GCC/Clang vector extensions: explicit SIMD without choosing an instruction set at build time.
template <typename T>
struct Vec {
  static constexpr int kWidth = 32 / sizeof(T);
  typedef T type __attribute__((vector_size(32)));
};

template <typename A, typename T>
inline typename Vec<A>::type load_as(const T* p) {
  typename Vec<A>::type v;
  if constexpr (std::is_same_v<A, T>) {
    std::memcpy(&v, p, sizeof(v));  // unaligned load
  } else {
    for (int k = 0; k < Vec<A>::kWidth; ++k) v[k] = static_cast<A>(p[k]);
  }
  return v;
}

template <typename Z, typename F>
void residual_chunk(const Z* __restrict__ z, const F* __restrict__ f, int64_t begin, int64_t end,
                    double* diff_sq, double* f_sq) {
  using acc_t = typename AccType<Z>::type;
  using vec_t = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::kWidth;
  double dd = 0.0, ff = 0.0;
  for (int64_t block = begin; block < end; block += kFlush) {
    const int64_t stop = std::min(end, block + kFlush);
    vec_t d_acc[4] = {};
    vec_t f_acc[4] = {};
    int64_t i = block;
    for (; i + 4 * W <= stop; i += 4 * W) {
      for (int u = 0; u < 4; ++u) {
        const vec_t fv = load_as<acc_t>(f + i + u * W);
        const vec_t d = load_as<acc_t>(z + i + u * W) - fv;
        d_acc[u] += d * d;
        f_acc[u] += fv * fv;
      }
    }
    const vec_t d_sum = (d_acc[0] + d_acc[1]) + (d_acc[2] + d_acc[3]);
    const vec_t f_sum = (f_acc[0] + f_acc[1]) + (f_acc[2] + f_acc[3]);
    for (int k = 0; k < W; ++k) {
      dd += static_cast<double>(d_sum[k]);
      ff += static_cast<double>(f_sum[k]);
    }
    for (; i < stop; ++i) {
      const acc_t fv = static_cast<acc_t>(f[i]);
      const acc_t d = static_cast<acc_t>(z[i]) - fv;
      dd += static_cast<double>(d * d);
      ff += static_cast<double>(fv * fv);
    }
  }
  *diff_sq = dd;
  *f_sq = ff;
}

template <typename Z, typename F>
void residual_kernel(const Z* z, const F* f, int64_t n, double* sums) {
  const int64_t chunks = (n + kResidualChunk - 1) / kResidualChunk;
  std::vector<double> partial(2 * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kResidualChunk;
      residual_chunk(z, f, begin, std::min(n, begin + kResidualChunk), &partial[2 * c], &partial[2 * c + 1]);
    }
  });
  sums[0] = sums[1] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sums[0] += partial[2 * c];
    sums[1] += partial[2 * c + 1];
  }
}

void affine_update_cpu(const char* op, const at::Tensor& state, const at::Tensor& f_val, double beta,
                       bool inverse) {
  check_pointwise(op, state, f_val, beta, c10::DeviceType::CPU);
  if (state.numel() == 0) return;
  const auto [a, b] = update_coefficients(beta, inverse);
  with_flat_layout(state, f_val, /*write_back=*/true, [&](const at::Tensor& s, const at::Tensor& f) {
    dispatch_pair(s.scalar_type(), f.scalar_type(), op, [&](auto s_tag, auto f_tag) {
      using S = typename decltype(s_tag)::type;
      using F = typename decltype(f_tag)::type;
      affine_kernel<S, F>(s.data_ptr<S>(), f.data_ptr<F>(), s.numel(), a, b);
    });
  });
}

void relax_cpu(const at::Tensor& state, const at::Tensor& f_val, double beta) {
  affine_update_cpu("relax_", state, f_val, beta, /*inverse=*/false);
}

void unrelax_cpu(const at::Tensor& state, const at::Tensor& f_val, double beta) {
  affine_update_cpu("unrelax_", state, f_val, beta, /*inverse=*/true);
}

at::Tensor residual_cpu(const at::Tensor& z, const at::Tensor& fz) {
  check_residual(z, fz, c10::DeviceType::CPU);
  double sums[2] = {0.0, 0.0};
  if (z.numel() > 0) {
    with_flat_layout(z, fz, /*write_back=*/false, [&](const at::Tensor& zf, const at::Tensor& ff) {
      dispatch_pair(zf.scalar_type(), ff.scalar_type(), "residual", [&](auto z_tag, auto f_tag) {
        using Z = typename decltype(z_tag)::type;
        using F = typename decltype(f_tag)::type;
        residual_kernel<Z, F>(zf.data_ptr<Z>(), ff.data_ptr<F>(), zf.numel(), sums);
      });
    });
  }
  at::Tensor out = at::empty({2}, z.options().dtype(at::kDouble));
  out.data_ptr<double>()[0] = sums[0];
  out.data_ptr<double>()[1] = sums[1];
  return out.to(residual_dtype(z));
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CPU, m) {
  m.impl("relax_", &relax_cpu);
  m.impl("unrelax_", &unrelax_cpu);
  m.impl("residual", &residual_cpu);
}

}  // namespace revdeq
