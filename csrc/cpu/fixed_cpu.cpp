// C++ CPU kernels for relax_fixed_ and unrelax_fixed_ (exact mode), registered for the CPU key.
// Work is split by remainder word: one task owns 32 consecutive elements and the m words that hold
// their remainder bits, so no two threads ever touch the same word. Per-element arithmetic lives in
// csrc/fixed_point.h. Bad elements are left unchanged and reported through the status flags.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "dispatch.h"
#include "fixed_checks.h"
#include "fixed_point.h"

namespace revdeq {
namespace {

using fixed::kWordBits;

constexpr int64_t kWordGrain = 1024;  // 32K elements per task

template <typename F>
int32_t relax_fixed_kernel(int64_t* __restrict__ state, const F* __restrict__ f, int32_t* __restrict__ words,
                           int64_t n, const fixed::Coefficients& c) {
  const int64_t word_count = (n + kWordBits - 1) / kWordBits;
  std::atomic<int32_t> flags{0};
  at::parallel_for(0, word_count, kWordGrain, [&](int64_t w0, int64_t w1) {
    int32_t local = 0;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t base = w * kWordBits;
      const int lanes = static_cast<int>(std::min<int64_t>(kWordBits, n - base));
      uint32_t r[kWordBits] = {};
      for (int k = 0; k < lanes; ++k) {
        r[k] = fixed::relax_element(state + base + k, static_cast<double>(f[base + k]), c, &local);
      }
      for (int b = 0; b < c.m; ++b) {
        uint32_t word = 0;
        for (int k = 0; k < kWordBits; ++k) word |= ((r[k] >> b) & 1u) << k;
        words[b * word_count + w] = static_cast<int32_t>(word);
      }
    }
    if (local) flags.fetch_or(local);
  });
  return flags.load();
}

template <typename F>
int32_t unrelax_fixed_kernel(int64_t* __restrict__ state, const F* __restrict__ f,
                             const int32_t* __restrict__ words, int64_t n, const fixed::Coefficients& c) {
  const int64_t word_count = (n + kWordBits - 1) / kWordBits;
  std::atomic<int32_t> flags{0};
  at::parallel_for(0, word_count, kWordGrain, [&](int64_t w0, int64_t w1) {
    int32_t local = 0;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t base = w * kWordBits;
      const int lanes = static_cast<int>(std::min<int64_t>(kWordBits, n - base));
      uint32_t r[kWordBits] = {};
      for (int b = 0; b < c.m; ++b) {
        const uint32_t word = static_cast<uint32_t>(words[b * word_count + w]);
        for (int k = 0; k < kWordBits; ++k) r[k] |= ((word >> k) & 1u) << b;
      }
      for (int k = 0; k < lanes; ++k) {
        fixed::unrelax_element(state + base + k, static_cast<double>(f[base + k]), r[k], c, &local);
      }
    }
    if (local) flags.fetch_or(local);
  });
  return flags.load();
}

// Remainder bits are indexed by the element's row-major position, so the kernels walk contiguous
// (row-major) copies of state and f_val when the originals are laid out otherwise.
void fixed_update_cpu(const char* op, const at::Tensor& state, const at::Tensor& f_val,
                      const at::Tensor& remainder, const at::Tensor& status, int64_t p, int64_t m,
                      int64_t frac_bits, bool inverse) {
  check_fixed(op, state, f_val, remainder, status, p, m, frac_bits, c10::DeviceType::CPU);
  if (state.numel() == 0) return;
  const fixed::Coefficients c = fixed::make_coefficients(p, static_cast<int>(m), static_cast<int>(frac_bits));
  at::Tensor s = state.contiguous();
  const at::Tensor f = f_val.contiguous();
  int32_t flags = 0;
  dispatch_floating(f.scalar_type(), op, "f_val", [&](auto f_tag) {
    using F = typename decltype(f_tag)::type;
    flags = inverse
                ? unrelax_fixed_kernel<F>(s.data_ptr<int64_t>(), f.data_ptr<F>(), remainder.data_ptr<int32_t>(),
                                          s.numel(), c)
                : relax_fixed_kernel<F>(s.data_ptr<int64_t>(), f.data_ptr<F>(), remainder.data_ptr<int32_t>(),
                                        s.numel(), c);
  });
  if (!s.is_same(state)) state.copy_(s);
  if (flags) status.bitwise_or_(flags);
}

void relax_fixed_cpu(const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                     const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits) {
  fixed_update_cpu("relax_fixed_", state, f_val, remainder, status, p, m, frac_bits, /*inverse=*/false);
}

void unrelax_fixed_cpu(const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                       const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits) {
  fixed_update_cpu("unrelax_fixed_", state, f_val, remainder, status, p, m, frac_bits, /*inverse=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CPU, m) {
  m.impl("relax_fixed_", &relax_fixed_cpu);
  m.impl("unrelax_fixed_", &unrelax_fixed_cpu);
}

}  // namespace revdeq
