// How the multi-tensor kernels (multi.cu) split their members into chunks, one block per chunk at
// a time. Host and device functions, so a host program can check the split without a GPU
// (tests/ops/test_multi.py, test_cuda_chunks_cover_every_element_once).
//
// For the pointwise kernels a member's elements are planned as for the single-tensor kernels
// (plan_span: scalar head, 16-byte packs, scalar tail; all scalar when no head aligns both pointers);
// residual's chunks follow the element index instead (indexed_chunk). Chunk c of a member takes packs
// [c * kChunkPacks, (c + 1) * kChunkPacks) and scalar elements [c * kChunkScalars, (c + 1) *
// kChunkScalars) (scalar indices as scalar_index numbers them); a member has as many chunks as the
// longer of the two needs, at least one.
#pragma once

#include "common.cuh"

namespace revdeq::cuda::multi {

// Packs each thread of a block loads before it computes, per chunk: 16 KB of state per chunk.
constexpr int kChunkSteps = 4;
constexpr int64_t kChunkPacks = static_cast<int64_t>(kThreads) * kChunkSteps;
// Scalar elements per chunk: as many elements as a chunk of packs holds.
template <typename S>
constexpr int64_t kChunkScalars = kChunkPacks * kPackElems<S>;

struct Range {
  int64_t begin;
  int64_t end;
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename S>
__host__ __device__ __forceinline__ int64_t chunk_count(const Span& span) {
  const int64_t by_packs = cdiv64(span.packs, kChunkPacks);
  const int64_t by_scalars = cdiv64(scalar_count<kPackElems<S>>(span), kChunkScalars<S>);
  const int64_t chunks = by_packs > by_scalars ? by_packs : by_scalars;
  return chunks > 0 ? chunks : 1;
}

// Packs of chunk c (indices into the span's packs); empty past the last one.
__host__ __device__ __forceinline__ Range chunk_packs(const Span& span, int64_t c) {
  const int64_t begin = min64(c * kChunkPacks, span.packs);
  return {begin, min64(begin + kChunkPacks, span.packs)};
}

// Scalar elements of chunk c (indices j for scalar_index); empty past the last one.
template <typename S>
__host__ __device__ __forceinline__ Range chunk_scalars(const Span& span, int64_t c) {
  const int64_t scalars = scalar_count<kPackElems<S>>(span);
  const int64_t begin = min64(c * kChunkScalars<S>, scalars);
  return {begin, min64(begin + kChunkScalars<S>, scalars)};
}

// residual's chunks, in element index order (common.cuh, load_indexed_pack): chunk c of a member of n
// elements takes virtual packs [c * kChunkPacks, (c + 1) * kChunkPacks), the last one possibly partial.
template <typename Z>
__host__ __device__ __forceinline__ int64_t indexed_chunk_count(int64_t n) {
  const int64_t chunks = cdiv64(cdiv64(n, kPackElems<Z>), kChunkPacks);
  return chunks > 0 ? chunks : 1;
}

template <typename Z>
__host__ __device__ __forceinline__ Range indexed_chunk(int64_t n, int64_t c) {
  const int64_t packs = cdiv64(n, kPackElems<Z>);
  const int64_t begin = min64(c * kChunkPacks, packs);
  return {begin, min64(begin + kChunkPacks, packs)};
}

// The member that owns global chunk c: the first k < count with chunk_end[k] > c, where chunk_end
// holds the running totals of the members' chunk counts (c < chunk_end[count - 1]).
__host__ __device__ __forceinline__ int member_of(const int64_t* chunk_end, int count, int64_t c) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (chunk_end[mid] > c) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

}  // namespace revdeq::cuda::multi
