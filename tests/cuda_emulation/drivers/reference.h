// The independent reference the drivers compare the emulated kernels with: element arithmetic
// written from the documented rules (csrc/cuda/kernels/revdeq_cuda.h, revdeq_kernels/exact), not
// from the kernels' code. Half and bfloat16 conversions are done on the bits here, so a toolkit
// conversion bug would show too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/affine.h"

namespace ref {

// ---- conversions ---------------------------------------------------------------------------------

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// float -> bfloat16, round to nearest even; NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float x) {
  const uint32_t u = bits_of(x);
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x40);
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}

inline float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// float -> IEEE binary16, round to nearest even, with subnormals and overflow to infinity.
inline uint16_t float_to_half(float x) {
  const uint32_t u = bits_of(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  if (std::isnan(x)) return static_cast<uint16_t>(sign | 0x7e00u);
  const float a = std::fabs(x);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds up past the largest half
  if (a < 0x1p-14f) {
    // Subnormal (or zero): the value in units of 2^-24, rounded to nearest even by the FPU (exact scaling).
    const float units = std::nearbyint(a * 0x1p24f);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(units));
  }
  const int exponent = static_cast<int>((u >> 23) & 0xffu) - 127;  // in [-14, 15]
  const uint32_t mantissa = u & 0x7fffffu;
  uint32_t half = (static_cast<uint32_t>(exponent + 15) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent: fine
  return static_cast<uint16_t>(sign | half);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const int exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  if (exponent == 31) return float_of(sign | 0x7f800000u | (mantissa << 13));
  return float_of(sign | (static_cast<uint32_t>(exponent - 15 + 127) << 23) | (mantissa << 13));
}

// ---- element types -------------------------------------------------------------------------------

template <typename T>
constexpr bool is_half_v = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename T>
uint16_t raw16(T x) {
  uint16_t r;
  std::memcpy(&r, &x, 2);
  return r;
}

template <typename T>
T from_raw16(uint16_t r) {
  T x;
  std::memcpy(&x, &r, 2);
  return x;
}

template <typename T>
float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return half_to_float(raw16(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return bf16_to_float(raw16(x));
  else return static_cast<float>(x);
}

template <typename T>
double to_double(T x) {
  if constexpr (is_half_v<T>) return static_cast<double>(to_float(x));
  else return static_cast<double>(x);
}

// The stored value of x in T: rounded to nearest even once.
template <typename T, typename A>
T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) return from_raw16<T>(float_to_half(static_cast<float>(x)));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return from_raw16<T>(float_to_bf16(static_cast<float>(x)));
  else return static_cast<T>(x);
}

template <typename T>
T from_double(double x) {
  if constexpr (is_half_v<T>) return from_acc<T>(static_cast<float>(x));
  else return static_cast<T>(x);
}

// Same bits (any two NaNs count as equal: their payloads are not specified).
template <typename T>
bool same(T a, T b) {
  if (std::isnan(to_double(a)) && std::isnan(to_double(b))) return true;
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, double>) return "float64";
  else if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, __half>) return "float16";
  else return "bfloat16";
}

// ---- the ops -------------------------------------------------------------------------------------

template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// revdeq_cuda.h's affine_update: c * fma(a, state, b * f) in the accumulation type, rounded once to S.
template <typename S, typename F>
S affine(S state, F f, const revdeq::Affine& k) {
  using A = acc_t<S>;
  const A fa = std::is_same_v<A, double> ? static_cast<A>(to_double(f)) : static_cast<A>(to_float(f));
  const A sa = std::is_same_v<A, double> ? static_cast<A>(to_double(state)) : static_cast<A>(to_float(state));
  return from_acc<S>(static_cast<A>(k.c) * std::fma(static_cast<A>(k.a), sa, static_cast<A>(k.b) * fa));
}

// ---- exact mode (revdeq_kernels/exact), in 128-bit integers ---------------------------

constexpr int64_t kLimit = int64_t{1} << 53;
enum Flags : int32_t { kFNotFinite = 1, kFOutOfRange = 2, kStateOutOfRange = 4, kInverseMismatch = 8 };

inline bool in_range(__int128 v) { return v >= -kLimit && v <= kLimit; }

// q = round_half_even(f * 2^F) and why it cannot enter the state (0 when it can).
inline int64_t quantize(double f, int frac_bits, int32_t* why) {
  if (!std::isfinite(f)) {
    *why = kFNotFinite;
    return 0;
  }
  const double scaled = std::ldexp(f, frac_bits);
  if (!(std::fabs(scaled) <= static_cast<double>(kLimit))) {
    *why = kFOutOfRange;
    return 0;
  }
  *why = 0;
  return static_cast<int64_t>(std::nearbyint(scaled));  // the default rounding mode: to nearest even
}

// floor division by 2^m and its remainder, for any sign.
inline void floor_divmod(__int128 t, int m, __int128* q, __int128* r) {
  const __int128 d = static_cast<__int128>(1) << m;
  *q = t / d;
  *r = t % d;
  if (*r < 0) {
    *r += d;
    *q -= 1;
  }
}

struct FixedResult {
  int64_t state;
  uint32_t remainder;  // m bits
  int32_t flags;
};

inline FixedResult relax_fixed(int64_t y, double f, int64_t p, int m, int frac_bits) {
  int32_t why = 0;
  const int64_t q = quantize(f, frac_bits, &why);
  if (why) return {y, 0, why};
  if (!in_range(y)) return {y, 0, kStateOutOfRange};
  const __int128 t = static_cast<__int128>((int64_t{1} << m) - p) * y + static_cast<__int128>(p) * q;
  __int128 y1, r;
  floor_divmod(t, m, &y1, &r);
  if (!in_range(y1)) return {y, 0, kStateOutOfRange};
  return {static_cast<int64_t>(y1), static_cast<uint32_t>(r), 0};
}

// keep^-1 modulo 2^64 for odd keep, by the extended Euclidean algorithm on 128-bit integers.
inline uint64_t inverse_mod_2_64(int64_t keep) {
  const __int128 modulus = static_cast<__int128>(1) << 64;
  __int128 a = static_cast<uint64_t>(keep), b = modulus, x0 = 1, x1 = 0;
  while (b != 0) {
    const __int128 q = a / b, r = a % b;
    a = b;
    b = r;
    const __int128 x = x0 - q * x1;
    x0 = x1;
    x1 = x;
  }
  return static_cast<uint64_t>(((x0 % modulus) + modulus) % modulus);
}

// The inverse half-step as revdeq_kernels/exact defines it: y0 = ((y1 << m) + r - p * q) * (2^m - p)^-1
// modulo 2^64, written when within the range, else flagged as a mismatch (f is not what the forward saw).
inline FixedResult unrelax_fixed(int64_t y1, double f, uint32_t r, int64_t p, int m, int frac_bits) {
  int32_t why = 0;
  const int64_t q = quantize(f, frac_bits, &why);
  if (why) return {y1, 0, why};
  if (!in_range(y1)) return {y1, 0, kStateOutOfRange};
  const __int128 t = static_cast<__int128>(y1) * (int64_t{1} << m) + r - static_cast<__int128>(p) * q;
  const uint64_t t64 = static_cast<uint64_t>(t);  // t modulo 2^64
  const int64_t y0 = static_cast<int64_t>(t64 * inverse_mod_2_64((int64_t{1} << m) - p));
  if (in_range(y0)) return {y0, 0, 0};
  return {y1, 0, kInverseMismatch};
}

}  // namespace ref
