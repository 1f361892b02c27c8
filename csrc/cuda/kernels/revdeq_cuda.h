// The CUDA kernels' host-side interface: raw pointers, element counts, a dtype enum and a stream.
// No torch here, so nvcc alone compiles the kernels (tools/cuda_check.py) and the host compiler can
// run them on a CPU (tests/cuda_emulation); csrc/cuda/bindings/ maps tensors onto these calls. Every
// function enqueues work on `stream` and never synchronizes. Implemented by pointwise.cu, residual.cu,
// exact.cu and multi.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/affine.h"

namespace revdeq::cuda {

enum class DType : int { kFloat64, kFloat32, kFloat16, kBFloat16 };

// Errors. CUDA keeps the most recent error of any launch or runtime call on a host thread until
// cudaGetLastError reads it (and clears it, unless it is sticky). Every function below reads it right
// after its launches and returns it, so an error that earlier, unrelated work left pending would come
// back as that function's own: a caller takes it first with take_earlier_error() and reports it as
// earlier work's (the launchers in csrc/cuda/*.cpp do, before every call).
inline cudaError_t take_earlier_error() { return cudaGetLastError(); }

// Supported (state, f) pairs: equal dtypes, float64 state with any f, float32 state with a half f.
// Other pairs return cudaErrorInvalidValue.

// state[i] = k.c * (k.a * state[i] + k.b * f[i]) for 0 <= i < n, as k.c * fma(k.a, state, k.b * f) in
// double for float64 states and in float otherwise, rounded once to the state dtype. state and f are
// dense arrays of n elements, each aligned to its element size (16-byte vector accesses are used where
// both pointers allow them). relax_ and unrelax_ take k = affine_coefficients(beta, inverse)
// (common/affine.h), with which no intermediate overflows unless the result does.
cudaError_t affine_update(void* state, DType state_dtype, const void* f, DType f_dtype, int64_t n, Affine k,
                          cudaStream_t stream);

// Bytes of scratch memory `residual` needs on the current device (per-block partial sums and a
// ticket counter); the same for every n.
cudaError_t residual_workspace_bytes(size_t* bytes);

// out[0] = sum((z - f)^2), out[1] = sum(f^2) over n elements, in one kernel launch. Its bits are a
// function of the values, n and the device (its SM count and occupancy, which size the grid): the
// same on every run and for the same values at any addresses, since element i joins the same lane,
// thread and block partial in the same order whatever the alignment. out points to 2 doubles for
// float64 z and to 2 floats otherwise; the accumulation is double for float64 z and float (per
// block) then double (across blocks) otherwise. workspace must hold residual_workspace_bytes() bytes on the same device and
// must not be used by another call until this one has finished on `stream`.
cudaError_t residual(const void* z, DType z_dtype, const void* f, DType f_dtype, int64_t n, void* out,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Exact mode (revdeq_kernels/exact; element arithmetic in csrc/common/fixed_point.h). state holds n
// int64 fixed-point values with frac_bits fractional bits, f n values of f_dtype, both dense in
// row-major element order; beta = p / 2^m (m in [1, 8], p odd in (0, 2^(m+1))), frac_bits in [0, 52].
// remainder is the bit-plane buffer of (m, ceil(n / 32)) 32-bit words: bit b of element i's dropped
// bits is bit i % 32 of word [b, i / 32], and bits past n are zero. Elements that cannot be
// represented are left unchanged (remainder bits 0) and their FixedStatus flags ORed into *status, a
// device int32; nothing else touches *status, so one status can collect several calls. Results are
// the same on every run. cudaErrorInvalidValue for bad p, m, frac_bits or n < 0;
// cudaErrorMisalignedAddress for a pointer not aligned to its element size.

// Forward half-step: state = ((2^m - p) * state + p * round(f * 2^frac_bits)) >> m; remainder written.
cudaError_t relax_fixed(int64_t* state, const void* f, DType f_dtype, uint32_t* remainder, int32_t* status,
                        int64_t n, int64_t p, int m, int frac_bits, cudaStream_t stream);

// Its exact inverse, given the same f and the remainder the forward wrote (read only).
cudaError_t unrelax_fixed(int64_t* state, const void* f, DType f_dtype, const uint32_t* remainder, int32_t* status,
                          int64_t n, int64_t p, int m, int frac_bits, cudaStream_t stream);

// Multi-tensor (tuple state) ops (multi.cu). One member of a call: dense arrays of n >= 0 elements (members with n == 0 are
// skipped), each pointer aligned to its element size. For multi_residual, state is z (only read).
// (state_dtype, f_dtype) is one of the pairs revdeq_cuda.h lists; members may differ in it.
struct MemberPair {
  void* state;
  const void* f;
  int64_t n;
  DType state_dtype;
  DType f_dtype;
};

// Members one kernel launch takes (their pointers, sizes and plans travel in the kernel's parameter
// struct). The kernels are templated on the dtype pair, so a call launches once per dtype pair among
// its members and per kMultiMaxMembers members of one pair: once, when all members share a pair and
// there are at most kMultiMaxMembers of them.
constexpr int kMultiMaxMembers = 64;

// state[i] = k.c * (k.a * state[i] + k.b * f[i]) for every element of every member, as affine_update does
// for one pair (same arithmetic and rounding).
cudaError_t multi_affine_update(const MemberPair* members, int count, Affine k, cudaStream_t stream);

// Bytes of scratch memory multi_residual needs for `count` members on the current device.
cudaError_t multi_residual_workspace_bytes(int count, size_t* bytes);

// out[0] = sum of (z - f)^2 and out[1] = sum of f^2 over every element of every member: 2 doubles
// when out_fp64, else 2 floats. Each member is accumulated in double (float64 z) or float (others)
// within a chunk of a few thousand elements, everything above that in double. Launches as
// multi_affine_update; the last block to finish, over all of them, adds all block partials in a
// fixed order; as for residual, its bits are a function of the values, sizes and device, not of the addresses. workspace: multi_residual_workspace_bytes
// bytes on the same device, not used by another call until this one has finished on `stream`.
cudaError_t multi_residual(const MemberPair* members, int count, bool out_fp64, void* out, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream);

}  // namespace revdeq::cuda
