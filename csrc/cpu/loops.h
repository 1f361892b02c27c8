// The per-range loops of the C++ CPU kernels, shared by the single-tensor ops (pointwise.cpp) and the
// multi-tensor ops (multi.cpp) so that both compute every element and every partial sum the
// same way. Threading is left to the callers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/affine.h"
#include "common/dispatch.h"

namespace revdeq::cpu {

// Elements per parallel task of the pointwise ops.
constexpr int64_t kPointwiseGrain = 1 << 15;
// residual sums fixed chunks of a tensor into partials and adds the partials in order, so the
// result does not depend on the number of threads.
constexpr int64_t kResidualChunk = 1 << 16;

// Inside residual_range, four vector accumulators (independent dependency chains) are flushed into
// double every kFlush elements, which bounds the float32 rounding error.
constexpr int64_t kFlush = 1024;

// bfloat16 <-> float on the bits, as c10::BFloat16 converts (widening: the bits shifted up; rounding: to
// nearest even, NaN -> 0x7FC0) but without c10's branch on NaN, which kept GCC from vectorizing every loop
// that stores bfloat16 (38% of copy bandwidth); the select below vectorizes.
inline float float_from_bf16_bits(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline uint16_t bf16_bits_from_float(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16);
  return (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? uint16_t{0x7FC0} : rounded;
}

// What the loops read from an F and widen to float or double.
template <typename A, typename T>
inline A widen(const T& v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return static_cast<A>(float_from_bf16_bits(v.x));
  } else {
    return static_cast<A>(v);
  }
}

// state[i] = c * (a * state[i] + b * f[i]) for begin <= i < end (common/affine.h), in AccType<S>, the
// result rounded once to S. A plain loop over __restrict__ pointers that the compiler vectorizes at -O3.
template <typename S, typename F>
inline void affine_range(S* __restrict__ state, const F* __restrict__ f, int64_t begin, int64_t end, const Affine& k) {
  using acc_t = typename AccType<S>::type;
  const acc_t a = static_cast<acc_t>(k.a), b = static_cast<acc_t>(k.b), c = static_cast<acc_t>(k.c);
  if constexpr (std::is_same_v<S, at::BFloat16>) {
    uint16_t* __restrict__ bits = reinterpret_cast<uint16_t*>(state);
    for (int64_t i = begin; i < end; ++i) {
      bits[i] = bf16_bits_from_float(c * (a * float_from_bf16_bits(bits[i]) + b * widen<acc_t>(f[i])));
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      state[i] = static_cast<S>(c * (a * static_cast<acc_t>(state[i]) + b * widen<acc_t>(f[i])));
    }
  }
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
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, at::BFloat16>) {
    // Eight bfloat16 widened as one vector: zero-extend the bits and shift them into the high half.
    typedef uint16_t half_bits __attribute__((vector_size(16)));
    typedef uint32_t word_bits __attribute__((vector_size(32)));
    half_bits h;
    std::memcpy(&h, p, sizeof(h));
    const word_bits w = __builtin_convertvector(h, word_bits) << 16;
    std::memcpy(&v, &w, sizeof(v));
  } else {
    for (int k = 0; k < Vec<A>::kWidth; ++k) v[k] = static_cast<A>(p[k]);
  }
  return v;
}

// *diff_sq = sum((z - f)^2), *f_sq = sum(f^2) over begin <= i < end, accumulated in AccType<Z> vectors
// and flushed into double every kFlush elements.
template <typename Z, typename F>
void residual_range(const Z* __restrict__ z, const F* __restrict__ f, int64_t begin, int64_t end, double* diff_sq,
                    double* f_sq) {
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

// The loops above once more for AVX2, chosen at run time. The extension is built for baseline x86-64
// (SSE2, 16-byte vectors), where the bfloat16 loops narrow and widen through emulated shuffles (38% of
// copy bandwidth) and residual_range's 32-byte vectors are split in two; torch's own kernels dispatch on
// the CPU the same way. No FMA: contracting a * s + b * f would round differently from the other backends
// (same bits on every CPU is what the tests check).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define REVDEQ_CPU_AVX2 1

template <typename S, typename F>
__attribute__((target("avx2"))) void affine_range_avx2(S* __restrict__ state, const F* __restrict__ f, int64_t begin,
                                                      int64_t end, const Affine& k) {
  affine_range(state, f, begin, end, k);
}

template <typename Z, typename F>
__attribute__((target("avx2"))) void residual_range_avx2(const Z* __restrict__ z, const F* __restrict__ f,
                                                        int64_t begin, int64_t end, double* diff_sq, double* f_sq) {
  residual_range(z, f, begin, end, diff_sq, f_sq);
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// What the kernels call: the AVX2 build of a loop where the CPU has it, else the baseline one.
template <typename S, typename F>
inline void run_affine(S* state, const F* f, int64_t begin, int64_t end, const Affine& k) {
#ifdef REVDEQ_CPU_AVX2
  if (has_avx2()) return affine_range_avx2(state, f, begin, end, k);
#endif
  affine_range(state, f, begin, end, k);
}

template <typename Z, typename F>
inline void run_residual(const Z* z, const F* f, int64_t begin, int64_t end, double* diff_sq, double* f_sq) {
#ifdef REVDEQ_CPU_AVX2
  if (has_avx2()) return residual_range_avx2(z, f, begin, end, diff_sq, f_sq);
#endif
  residual_range(z, f, begin, end, diff_sq, f_sq);
}

// The two double sums rounded once to the residual's `dtype` (float64 or float32), into `out`, a (2,) CPU
// tensor of that dtype or float64 (then the float32 values widened exactly: the same numbers either way).
inline void write_sums(const double (&sums)[2], at::ScalarType dtype, const at::Tensor& out) {
  for (int k = 0; k < 2; ++k) {
    const double value = dtype == at::kDouble ? sums[k] : static_cast<double>(static_cast<float>(sums[k]));
    if (out.scalar_type() == at::kDouble) {
      out.data_ptr<double>()[k] = value;
    } else {
      out.data_ptr<float>()[k] = static_cast<float>(value);
    }
  }
}

// The residual ops' result: the two double sums as a (2,) tensor of `dtype` with `options`' device.
inline at::Tensor sums_tensor(const double (&sums)[2], const at::TensorOptions& options, at::ScalarType dtype) {
  at::Tensor out = at::empty({2}, options.dtype(dtype));
  write_sums(sums, dtype, out);
  return out;
}

// The out tensor of the residual_out_ ops: contiguous, (2,), on the CPU, float64 or the residual's dtype.
inline void check_sums_out(const char* op, const at::Tensor& out, at::ScalarType dtype) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 1 && out.numel() == 2 && out.is_contiguous() &&
                  (out.scalar_type() == dtype || out.scalar_type() == at::kDouble),
              op, ": out must be a contiguous CPU tensor of shape (2,) and dtype ", dtype,
              " or float64, got shape ", out.sizes(), ", dtype ", out.scalar_type(), " on ", out.device());
}

}  // namespace revdeq::cpu
