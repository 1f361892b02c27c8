// Exact mode: the per-element fixed-point arithmetic of relax_fixed_ / unrelax_fixed_.
// Plain C++ with no torch headers, so the CPU kernels and the CUDA kernels (compiled by nvcc alone)
// share one definition. The format and the reasons behind it are documented in
// revdeq_kernels/exact; the reference backend is the oracle these functions must match.
//
// Every integer operation that could exceed int64 as an intermediate is done in uint64, where
// wrapping is defined; the range rule (|state|, |q| <= 2^53, m <= 8) guarantees the true values of
// t and of the results fit in int64, so the wrapped results are the exact ones.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define REVDEQ_HD __host__ __device__ __forceinline__
#else
#define REVDEQ_HD inline
#endif

namespace revdeq {
namespace fixed {

constexpr int64_t kLimit = int64_t{1} << 53;  // |state| and |q| never exceed this
constexpr double kLimitF = 9007199254740992.0;  // 2^53
constexpr int kMaxBetaBits = 8;
constexpr int kMaxFracBits = 52;
constexpr int kWordBits = 32;

// Bits ORed into the status tensor (FixedStatus in revdeq_kernels/exact).
enum Status : int32_t {
  kFNotFinite = 1,
  kFOutOfRange = 2,
  kStateOutOfRange = 4,
  kInverseMismatch = 8,
};

// The x with a * x == 1 modulo 2^64, for odd a. Newton's iteration doubles the number of correct
// low bits per step; a * a == 1 (mod 8) gives 3 to start with, so five steps give 96 >= 64.
REVDEQ_HD int64_t inverse_mod_2_64(int64_t a) {
  const uint64_t ua = static_cast<uint64_t>(a);
  uint64_t x = ua;
  for (int i = 0; i < 5; ++i) x *= uint64_t{2} - ua * x;
  return static_cast<int64_t>(x);
}

// Round half to even without relying on the libm rounding mode calls: below 2^52, adding 2^52 leaves
// no fraction bits, so the addition itself rounds (to nearest, ties to even since 2^52 is even);
// from 2^52 up every double is already an integer. Needs IEEE arithmetic (no -ffast-math).
REVDEQ_HD double round_half_even(double x) {
  const double a = fabs(x);
  const double r = a < 4503599627370496.0 ? (a + 4503599627370496.0) - 4503599627370496.0 : a;
  return copysign(r, x);
}

struct Coefficients {
  int64_t p;        // beta = p / 2^m
  int m;
  int64_t keep;     // 2^m - p: the state's coefficient (negative for beta > 1)
  int64_t inverse;  // keep^-1 modulo 2^64
  uint64_t mask;    // 2^m - 1
  double scale;     // 2^frac_bits
};

inline Coefficients make_coefficients(int64_t p, int m, int frac_bits) {
  Coefficients c;
  c.p = p;
  c.m = m;
  c.keep = (int64_t{1} << m) - p;
  c.inverse = inverse_mod_2_64(c.keep);
  c.mask = (uint64_t{1} << m) - 1;
  c.scale = std::ldexp(1.0, frac_bits);
  return c;
}

REVDEQ_HD bool in_range(int64_t v) { return v >= -kLimit && v <= kLimit; }

// The element functions below are branch-free (selects, not jumps): the CPU loop over 32 lanes stays
// straight-line code, and a GPU warp never diverges on them.

// q = round(f * 2^F), and the flags that say why f cannot enter the state (0 when it can).
REVDEQ_HD int64_t quantize(double f, double scale, int32_t* why) {
  const double x = f * scale;  // exact: a power of two (a huge float64 f may overflow to inf)
  const bool representable = fabs(x) <= kLimitF;  // false for NaN and Inf too
  const bool finite = fabs(f) <= 1.7976931348623157e308;
  *why = representable ? 0 : (finite ? kFOutOfRange : kFNotFinite);
  return static_cast<int64_t>(round_half_even(representable ? x : 0.0));
}

// Forward half-step of one element: *y <- (keep * y + p * q) >> m. Returns the m dropped bits. An
// element that cannot be represented keeps its *y, returns 0 and ORs the reason into *flags.
REVDEQ_HD uint32_t relax_element(int64_t* y, double f, const Coefficients& c, int32_t* flags) {
  int32_t why;
  const int64_t q = quantize(f, c.scale, &why);
  const int64_t y0 = *y;
  const bool ok = why == 0 && in_range(y0);
  // Out-of-range inputs are zeroed first, so even rejected elements compute nothing that overflows.
  const uint64_t t = static_cast<uint64_t>(c.keep) * static_cast<uint64_t>(ok ? y0 : 0) +
                     static_cast<uint64_t>(c.p) * static_cast<uint64_t>(ok ? q : 0);
  const int64_t y1 = static_cast<int64_t>(t) >> c.m;  // arithmetic shift: floor(t / 2^m)
  const bool done = ok && in_range(y1);  // y1 can leave the range only for beta > 1
  *y = done ? y1 : y0;
  *flags |= why | (why == 0 && !done ? kStateOutOfRange : 0);
  return done ? static_cast<uint32_t>(t & c.mask) : 0u;
}

// Inverse half-step of one element, given the m bits relax_element returned: *y <- ((y << m) + r -
// p * q) / keep, the exact division done as a multiplication by keep^-1 modulo 2^64. A result outside
// the range, which the forward never produces, means f is not what the forward saw: flagged, not
// written.
REVDEQ_HD void unrelax_element(int64_t* y, double f, uint32_t r, const Coefficients& c, int32_t* flags) {
  int32_t why;
  const int64_t q = quantize(f, c.scale, &why);
  const int64_t y1 = *y;
  const bool y_ok = in_range(y1);
  const uint64_t t = (static_cast<uint64_t>(y1) << c.m) + r;
  const uint64_t scaled = t - static_cast<uint64_t>(c.p) * static_cast<uint64_t>(q);
  const int64_t y0 = static_cast<int64_t>(scaled * static_cast<uint64_t>(c.inverse));
  const bool ok = why == 0 && y_ok;
  const bool done = ok && in_range(y0);
  *y = done ? y0 : y1;
  *flags |= why | (why == 0 && !y_ok ? kStateOutOfRange : 0) | (ok && !done ? kInverseMismatch : 0);
}

}  // namespace fixed
}  // namespace revdeq
