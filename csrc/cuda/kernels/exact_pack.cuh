// How the exact-mode CUDA kernels (exact.cu) pack remainder bits into bit planes: the tile of
// elements a warp owns, and a 32 x 32 bit transpose across the warp. No torch; the host-callable
// parts are checked without a GPU by tests/backends/test_cuda_build.py.
//
// A warp owns tiles of kGroups * 32 consecutive elements: lane l of group g holds element 32 * g + l
// of the tile, whose remainder bits go to bit l of the tile's word g in every plane. Each lane
// gathers its kGroups remainders in one 32-bit row (bit row_bit(g, b) is bit b of its remainder in
// group g); the warp's 32 rows form a 32 x 32 bit matrix, and after a transpose lane k holds column
// k, which is the word of plane word_plane(k), group word_group(k). The inverse transposes back.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/fixed_point.h"

namespace revdeq::cuda::exact_pack {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kLanes = 32;
constexpr int kPlanes = fixed::kMaxBetaBits;  // rows have room for every plane a beta can need
constexpr int kGroups = kLanes / kPlanes;     // remainder words per plane and tile
constexpr int64_t kTileElems = int64_t{kLanes} * kGroups;
static_assert(fixed::kWordBits == kLanes, "a remainder word holds one bit per lane of a warp");
static_assert(kGroups * kPlanes == kLanes, "a tile's (plane, group) words are the 32 columns of a bit matrix");

__host__ __device__ constexpr int row_bit(int group, int plane) { return kPlanes * group + plane; }
__host__ __device__ constexpr int word_plane(int lane) { return lane % kPlanes; }
__host__ __device__ constexpr int word_group(int lane) { return lane / kPlanes; }

// Step `step` (0 to 4) of the transpose for lane `lane`, given its row and the row of its partner,
// lane ^ j with j = 16 >> step. The pair swaps the off-diagonal j x j blocks of their 2j x 2j block:
// the lane with bit j clear trades its high-j bits for its partner's low-j bits.
__host__ __device__ __forceinline__ uint32_t transpose_step(uint32_t row, uint32_t other, int lane, int step) {
  const int j = kLanes / 2 >> step;
  const uint32_t high = step == 0 ? 0xffff0000u : step == 1 ? 0xff00ff00u : step == 2 ? 0xf0f0f0f0u
                        : step == 3 ? 0xccccccccu : 0xaaaaaaaau;  // bits k with k & j set
  return lane & j ? (row & high) | ((other & high) >> j) : (row & ~high) | ((other & ~high) << j);
}

#if defined(__CUDACC__) || defined(REVDEQ_CUDA_EMULATION)  // device code: nvcc, or tests/cuda_emulation
// Transposes the 32 x 32 bit matrix whose row l is lane l's `row`: lane k gets column k, i.e. bit l of
// the result is bit k of lane l's row. Five shuffles whatever m is (one __ballot_sync per plane and
// group would take 4m votes and as many selects per tile). Every lane of the warp must call it.
__device__ __forceinline__ uint32_t transpose_bits(uint32_t row, int lane) {
#pragma unroll
  for (int step = 0; step < 5; ++step) {
    row = transpose_step(row, __shfl_xor_sync(kFullMask, row, kLanes / 2 >> step), lane, step);
  }
  return row;
}
#endif

}  // namespace revdeq::cuda::exact_pack
