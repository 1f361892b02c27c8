// The arithmetic of relax_ and unrelax_, shared by the C++ CPU kernels, the CUDA kernels and the CUDA
// emulation's reference. Torch-free (nvcc compiles it into the .cu kernels).
//
//   relax_:   state = (1 - beta) * state + beta * f
//   unrelax_: state = (state - beta * f) / (1 - beta)
//
// Every kernel computes state = c * (a * state + b * f) with |a| <= 1 and |b| <= 1, so no product and
// no sum overflows unless the exact result does: |1 - beta| < 1 for beta in (0, 2), so multiplying by
// c (|c| >= 1 whenever c != 1) only grows what it multiplies. The naive coefficients overflowed: unrelax_
// at beta = 0.5 multiplied a state of 3e38 by 1 / (1 - beta) = 2 in float32 although the result is 3e38.
#pragma once

#ifdef __CUDACC__
#define REVDEQ_HOST_DEVICE __host__ __device__
#else
#define REVDEQ_HOST_DEVICE
#endif

namespace revdeq {

struct Affine {
  double a;  // state's coefficient, |a| <= 1
  double b;  // f's coefficient, |b| <= 1
  double c;  // applied last; exactly 1.0 for relax_ with beta <= 1 (the common case: no extra rounding)
};

// beta in (0, 2), beta != 1 (checked by the callers).
REVDEQ_HOST_DEVICE inline Affine affine_coefficients(double beta, bool inverse) {
  if (!inverse) {
    // beta > 1 extrapolates past f: beta * f alone may overflow, beta * (f + (1 - beta) / beta * state) not.
    if (beta <= 1.0) return {1.0 - beta, beta, 1.0};
    return {(1.0 - beta) / beta, 1.0, beta};
  }
  if (beta <= 1.0) return {1.0, -beta, 1.0 / (1.0 - beta)};
  return {1.0 / beta, -1.0, beta / (1.0 - beta)};  // beta * f alone may overflow for beta > 1
}

}  // namespace revdeq
