// The host-side interface of the multi-tensor CUDA kernels (multi.cu): raw pointers, counts, dtypes
// and a stream, no torch, like revdeq_cuda.h. csrc/cuda/multi_cuda.cpp maps tensor lists onto it.
// Every function enqueues work on `stream` and never synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "revdeq_cuda.h"

namespace revdeq::cuda {

// One member of a multi-tensor call: dense arrays of n >= 0 elements (members with n == 0 are
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

// state[i] = a * state[i] + b * f[i] for every element of every member, as affine_update does for
// one pair (same arithmetic and rounding).
cudaError_t multi_affine_update(const MemberPair* members, int count, double a, double b, cudaStream_t stream);

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
