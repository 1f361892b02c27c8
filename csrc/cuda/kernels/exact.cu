// relax_fixed_ and unrelax_fixed_ on CUDA (exact mode): int64 fixed-point states, bit-plane remainders.
//
// The per-element arithmetic is csrc/common/fixed_point.h, shared with the CPU kernels; the format is
// documented in revdeq_kernels/exact. What is CUDA-specific is the layout of the work:
//
// - A warp owns tiles of kGroups * 32 consecutive elements and packs their remainder bits with a
//   32 x 32 bit transpose across the warp (exact_pack.cuh): lane k ends up with one (plane, group)
//   word and stores it, so each warp writes m planes of kGroups consecutive words per tile, words no
//   other warp touches: no races and no atomics on data. The inverse loads them and transposes back.
// - Every memory access is one element per lane (8-byte state, 2 to 8-byte f), coalesced across the
//   warp whatever the alignment of the view, and each lane issues all kGroups loads of both arrays
//   before it computes, which keeps enough bytes in flight to stream at memory bandwidth.
// - Problems (NaN/Inf or out-of-range values) are ORed per lane, then per warp, then into *status
//   with one atomicOr per warp that saw one: flags only, results stay deterministic.
// - The grid is one wave of resident blocks; warps stride over the tiles with 64-bit indices.
#include "common.cuh"
#include "common/fixed_point.h"
#include "exact_pack.cuh"

namespace revdeq::cuda {
namespace {

using fixed::Coefficients;

using namespace exact_pack;

// The warp-level view of the launch: which warp this is, how many there are, and the tiles.
struct WarpSpan {
  int64_t first_tile;
  int64_t tile_stride;
  int64_t tiles;
  int64_t words_per_plane;
};

__device__ __forceinline__ WarpSpan warp_span(int64_t n) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kLanes;
  return {warp, static_cast<int64_t>(gridDim.x) * kWarps, (n + kTileElems - 1) / kTileElems,
          (n + kLanes - 1) / kLanes};
}

// ORs a lane's flags across the warp and adds them to *status once (every lane must call it).
__device__ __forceinline__ void report_flags(int32_t flags, int32_t* status) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) flags |= __shfl_xor_sync(kFullMask, flags, offset);
  if (threadIdx.x % kLanes == 0 && flags != 0) atomicOr(status, flags);
}

// Loads the lane's kGroups elements of state and f, all before any is used. A lane past the end loads
// nothing (zeros): a load of element n - 1 instead would race with the store of the lane that owns
// it. The caller discards what such a lane computes (no store, no flags, zero remainder bits).
template <typename F>
__device__ __forceinline__ void load_group(const int64_t* state, const F* f, int64_t base, int64_t n,
                                           int64_t (&y)[kGroups], F (&fv)[kGroups]) {
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    const int64_t i = base + g * kLanes;
    const bool inside = i < n;
    y[g] = inside ? state[i] : 0;
    fv[g] = inside ? f[i] : narrow<F>(0.0f);
  }
}

template <typename F>
__global__ void __launch_bounds__(kThreads)
    relax_fixed_kernel(int64_t* __restrict__ state, const F* __restrict__ f, uint32_t* __restrict__ words,
                       int32_t* __restrict__ status, int64_t n, Coefficients c) {
  const int lane = threadIdx.x % kLanes;
  const WarpSpan span = warp_span(n);
  // The word this lane stores in every tile (column `lane` of the transposed bit matrix).
  const int plane = word_plane(lane), group = word_group(lane);
  int32_t flags = 0;

  for (int64_t tile = span.first_tile; tile < span.tiles; tile += span.tile_stride) {  // warp-uniform
    const int64_t base = tile * kTileElems + lane;
    int64_t y[kGroups];
    F fv[kGroups];
    load_group(state, f, base, n, y, fv);
    uint32_t row = 0u;  // bit row_bit(g, b): bit b of this lane's remainder in group g
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      int32_t why = 0;
      const uint32_t r = fixed::relax_element(&y[g], widen<double>(fv[g]), c, &why);
      const int64_t i = base + g * kLanes;
      if (i < n) {  // lanes past n contribute zero bits: the padding of the last word
        state[i] = y[g];
        flags |= why;
        row |= r << row_bit(g, 0);
      }
    }
    const uint32_t word = transpose_bits(row, lane);
    const int64_t w = tile * kGroups + group;
    if (plane < c.m && w < span.words_per_plane) words[plane * span.words_per_plane + w] = word;
  }
  report_flags(flags, status);
}

template <typename F>
__global__ void __launch_bounds__(kThreads)
    unrelax_fixed_kernel(int64_t* __restrict__ state, const F* __restrict__ f, const uint32_t* __restrict__ words,
                         int32_t* __restrict__ status, int64_t n, Coefficients c) {
  const int lane = threadIdx.x % kLanes;
  const WarpSpan span = warp_span(n);
  const int plane = word_plane(lane), group = word_group(lane);
  int32_t flags = 0;

  for (int64_t tile = span.first_tile; tile < span.tiles; tile += span.tile_stride) {  // warp-uniform
    const int64_t base = tile * kTileElems + lane;
    const int64_t w = tile * kGroups + group;
    // Each lane loads the word of its (plane, group), alongside the state and f; planes past m are 0.
    const uint32_t word = plane < c.m && w < span.words_per_plane ? words[plane * span.words_per_plane + w] : 0u;
    int64_t y[kGroups];
    F fv[kGroups];
    load_group(state, f, base, n, y, fv);
    const uint32_t row = transpose_bits(word, lane);  // bit row_bit(g, b): bit b of the remainder in group g
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      int32_t why = 0;
      const uint32_t r = (row >> row_bit(g, 0)) & ((1u << kPlanes) - 1);
      fixed::unrelax_element(&y[g], widen<double>(fv[g]), r, c, &why);
      const int64_t i = base + g * kLanes;
      if (i < n) {
        state[i] = y[g];
        flags |= why;  // not for lanes past n: their copy of element n - 1 has other remainder bits
      }
    }
  }
  report_flags(flags, status);
}

template <typename Fn>
cudaError_t dispatch_f(DType f_dtype, Fn&& fn) {
  switch (f_dtype) {
    case DType::kFloat64: return fn(Tag<double>{});
    case DType::kFloat32: return fn(Tag<float>{});
    case DType::kFloat16: return fn(Tag<__half>{});
    case DType::kBFloat16: return fn(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

bool valid_beta(int64_t p, int m, int frac_bits) {
  return m >= 1 && m <= fixed::kMaxBetaBits && p > 0 && p < (int64_t{2} << m) && p % 2 == 1 && frac_bits >= 0 &&
         frac_bits <= fixed::kMaxFracBits;
}

template <typename T>
bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

// Launches Kernel over n elements: enough warps for one tile each, capped at one resident wave.
template <auto Kernel, typename F, typename Words>
cudaError_t start(int64_t* state, const F* f, Words* words, int32_t* status, int64_t n, const Coefficients& c,
                  cudaStream_t stream) {
  int max_blocks = 0;
  const cudaError_t err = resident_blocks<Kernel>(&max_blocks);
  if (err != cudaSuccess) return err;
  const int64_t tiles = (n + kTileElems - 1) / kTileElems;
  const int64_t blocks = (tiles + kWarps - 1) / kWarps;
  const int grid = static_cast<int>(blocks < max_blocks ? blocks : max_blocks);
  Kernel<<<grid, kThreads, 0, stream>>>(state, f, words, status, n, c);
  return cudaGetLastError();
}

template <bool kInverse, typename Words>
cudaError_t launch_fixed(int64_t* state, const void* f, DType f_dtype, Words* words, int32_t* status, int64_t n,
                         int64_t p, int m, int frac_bits, cudaStream_t stream) {
  if (n < 0 || !valid_beta(p, m, frac_bits)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!aligned(state) || !aligned(words) || !aligned(status)) return cudaErrorMisalignedAddress;
  const Coefficients c = fixed::make_coefficients(p, m, frac_bits);
  return dispatch_f(f_dtype, [&](auto f_tag) {
    using F = typename decltype(f_tag)::type;
    const auto* f_ptr = static_cast<const F*>(f);
    if (!aligned(f_ptr)) return cudaErrorMisalignedAddress;
    if constexpr (kInverse) {
      return start<unrelax_fixed_kernel<F>>(state, f_ptr, words, status, n, c, stream);
    } else {
      return start<relax_fixed_kernel<F>>(state, f_ptr, words, status, n, c, stream);
    }
  });
}

}  // namespace

cudaError_t relax_fixed(int64_t* state, const void* f, DType f_dtype, uint32_t* remainder, int32_t* status,
                        int64_t n, int64_t p, int m, int frac_bits, cudaStream_t stream) {
  return launch_fixed<false>(state, f, f_dtype, remainder, status, n, p, m, frac_bits, stream);
}

cudaError_t unrelax_fixed(int64_t* state, const void* f, DType f_dtype, const uint32_t* remainder, int32_t* status,
                          int64_t n, int64_t p, int m, int frac_bits, cudaStream_t stream) {
  return launch_fixed<true>(state, f, f_dtype, remainder, status, n, p, m, frac_bits, stream);
}

}  // namespace revdeq::cuda
