// Building blocks of the revdeq CUDA kernels (no torch): the one dtype dispatch, conversions that
// widen half types to float, 16-byte packs with a runtime alignment plan, block sums, and the
// launch geometry.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "revdeq_cuda.h"

namespace revdeq::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPackBytes = 16;
// Packs each thread loads before it computes: two 16-byte loads per array in flight per thread.
constexpr int kUnroll = 2;

template <typename T>
struct Tag {
  using type = T;
};

// fn(Tag<State>{}, Tag<F>{}) for the supported pairs: equal dtypes, float64 state with any f,
// float32 state with a half f. Other pairs are rejected by the launcher's argument checks first.
template <typename Fn>
cudaError_t dispatch_pair(DType state, DType f, Fn&& fn) {
  switch (state) {
    case DType::kFloat64:
      switch (f) {
        case DType::kFloat64: return fn(Tag<double>{}, Tag<double>{});
        case DType::kFloat32: return fn(Tag<double>{}, Tag<float>{});
        case DType::kFloat16: return fn(Tag<double>{}, Tag<__half>{});
        case DType::kBFloat16: return fn(Tag<double>{}, Tag<__nv_bfloat16>{});
      }
      break;
    case DType::kFloat32:
      switch (f) {
        case DType::kFloat32: return fn(Tag<float>{}, Tag<float>{});
        case DType::kFloat16: return fn(Tag<float>{}, Tag<__half>{});
        case DType::kBFloat16: return fn(Tag<float>{}, Tag<__nv_bfloat16>{});
        default: break;
      }
      break;
    case DType::kFloat16:
      if (f == DType::kFloat16) return fn(Tag<__half>{}, Tag<__half>{});
      break;
    case DType::kBFloat16:
      if (f == DType::kBFloat16) return fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// Arithmetic type of a state dtype: double for double, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__, so nothing is implicit.
template <typename A, typename T>
__device__ __forceinline__ A widen(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(x));
  } else {
    return static_cast<A>(x);
  }
}

template <typename T, typename A>
__device__ __forceinline__ T narrow(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return static_cast<T>(x);
  }
}

// a * x + y rounded once, in A (float or double).
template <typename A>
__device__ __forceinline__ A fused_mul_add(A a, A x, A y) {
  if constexpr (std::is_same_v<A, double>) {
    return __fma_rn(a, x, y);
  } else {
    return __fmaf_rn(a, x, y);
  }
}

// A pack is the kPackBytes of the state dtype one thread moves at once, and the same number of
// elements of f (16, 8 or 4 bytes): both sides get a single aligned vector access per pack.
template <typename S>
constexpr int kPackElems = kPackBytes / static_cast<int>(sizeof(S));

// Scalar elements a thread handles per step of the scalar loop (independent loads in flight): up
// to 4, fewer for wide types, so the scalar loop never needs more registers than the pack loop.
template <typename S>
constexpr int kScalarGroup = kPackElems<S> < 4 ? kPackElems<S> : 4;

template <int Bytes>
struct RawWord;
template <>
struct RawWord<16> {
  using type = uint4;
};
template <>
struct RawWord<8> {
  using type = uint2;
};
template <>
struct RawWord<4> {
  using type = unsigned int;
};

template <typename T, int N>
union Pack {
  typename RawWord<N * static_cast<int>(sizeof(T))>::type raw;
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  Pack<T, N> pk;
  pk.raw = *reinterpret_cast<const decltype(pk.raw)*>(p);
  return pk;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pk) {
  *reinterpret_cast<decltype(pk.raw)*>(p) = pk.raw;
}

// common/affine.h's coefficients in the accumulation type, as the kernels take them.
template <typename A>
struct Coefficients {
  A a, b, c;
};

template <typename A>
inline Coefficients<A> coefficients_in(const Affine& k) {
  return {static_cast<A>(k.a), static_cast<A>(k.b), static_cast<A>(k.c)};
}

// One affine update in A, rounded once to S: c * (a * s + b * f), as c * fma(a, s, b * f); |a|, |b| <= 1,
// so nothing overflows before the result does (common/affine.h).
template <typename S, typename A>
__device__ __forceinline__ S affine(const Coefficients<A>& k, A s, A f) {
  return narrow<S>(k.c * fused_mul_add(k.a, s, k.b * f));
}

// How n elements split into a scalar head, `packs` aligned packs and a scalar tail. When the two
// pointers cannot both be aligned by the same head (e.g. f = x[1:] with an aligned state), every
// element takes the scalar path: head = n, packs = 0.
struct Span {
  int64_t n;
  int64_t head;
  int64_t packs;
};

template <typename S, typename F>
Span plan_span(const S* state, const F* f, int64_t n) {
  constexpr int P = kPackElems<S>;
  const auto s_addr = reinterpret_cast<uintptr_t>(state);
  const auto f_addr = reinterpret_cast<uintptr_t>(f);
  const auto head = static_cast<int64_t>(((kPackBytes - s_addr % kPackBytes) % kPackBytes) / sizeof(S));
  const bool f_aligned = (f_addr + head * sizeof(F)) % (P * sizeof(F)) == 0;
  if (!f_aligned || head >= n) return {n, n, 0};
  return {n, head, (n - head) / P};
}

template <typename S, typename F>
bool element_aligned(const S* state, const F* f) {
  return reinterpret_cast<uintptr_t>(state) % sizeof(S) == 0 && reinterpret_cast<uintptr_t>(f) % sizeof(F) == 0;
}

// Index of the j-th element that is not part of a pack: the head, then the tail after the packs.
template <int P>
__host__ __device__ __forceinline__ int64_t scalar_index(const Span& span, int64_t j) {
  return j < span.head ? j : j + span.packs * P;
}

template <int P>
__host__ __device__ __forceinline__ int64_t scalar_count(const Span& span) {
  return span.n - span.packs * P;
}

// The reductions' order (residual.cu, multi.cu): element i is in "virtual pack" i / P at lane i % P,
// whatever the addresses, and the packs are dealt to threads by their index. The pointers decide only
// how a pack is loaded, so the result's bits never depend on where the data sits in memory.
template <typename Z, typename F>
__host__ __device__ __forceinline__ bool packs_aligned(const Z* z, const F* f) {
  return reinterpret_cast<uintptr_t>(z) % kPackBytes == 0 &&
         reinterpret_cast<uintptr_t>(f) % (kPackElems<Z> * sizeof(F)) == 0;
}

// Virtual pack q of z and f: one 16-byte access (and the matching access of f) when both are
// pack-aligned and the pack is full, else element by element; elements at or past n read as zero,
// which adds nothing to a sum of squares.
template <int P, typename Z, typename F>
__device__ __forceinline__ void load_indexed_pack(const Z* z, const F* f, int64_t n, int64_t q, bool aligned,
                                                  Pack<Z, P>& zv, Pack<F, P>& fv) {
  if (aligned && (q + 1) * P <= n) {
    zv = load_pack<P>(z + q * P);
    fv = load_pack<P>(f + q * P);
    return;
  }
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int64_t i = q * P + k;
    zv.v[k] = i < n ? z[i] : narrow<Z>(0.0f);
    fv.v[k] = i < n ? f[i] : narrow<F>(0.0f);
  }
}

// The per-thread loops of the pointwise kernels (pointwise.cu, and each chunk in multi.cu). A thread
// handles U packs (or U scalar groups) per step: indices first, first + step, ..., first + (U - 1) *
// step, those below end; all of their loads are issued before any is used, which keeps enough bytes
// in flight to stream at memory bandwidth.

// state = c * (a * state + b * f) on packs q of the span (pack q holds elements head + q * P ...).
template <int U, typename S, typename F>
__device__ __forceinline__ void affine_packs(S* __restrict__ state, const F* __restrict__ f, const Span& span,
                                             int64_t first, int64_t step, int64_t end,
                                             const Coefficients<acc_t<S>>& k) {
  using A = acc_t<S>;
  constexpr int P = kPackElems<S>;
  S* const s_packs = state + span.head;
  const F* const f_packs = f + span.head;
  Pack<S, P> s[U];
  Pack<F, P> fv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = first + u * step;
    if (q < end) {
      s[u] = load_pack<P>(s_packs + q * P);
      fv[u] = load_pack<P>(f_packs + q * P);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = first + u * step;
    if (q < end) {
#pragma unroll
      for (int e = 0; e < P; ++e) s[u].v[e] = affine<S>(k, widen<A>(s[u].v[e]), widen<A>(fv[u].v[e]));
      store_pack<P>(s_packs + q * P, s[u]);
    }
  }
}

// The same on scalar elements: the j-th element not in a pack (scalar_index) for j = first + k * step,
// k < kScalarGroup, those below end.
template <typename S, typename F>
__device__ __forceinline__ void affine_scalars(S* __restrict__ state, const F* __restrict__ f, const Span& span,
                                               int64_t first, int64_t step, int64_t end,
                                               const Coefficients<acc_t<S>>& k) {
  using A = acc_t<S>;
  constexpr int P = kPackElems<S>, G = kScalarGroup<S>;
  A s[G], fv[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t jg = first + g * step;
    if (jg < end) {
      const int64_t i = scalar_index<P>(span, jg);
      s[g] = widen<A>(state[i]);
      fv[g] = widen<A>(f[i]);
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t jg = first + g * step;
    if (jg < end) state[scalar_index<P>(span, jg)] = affine<S>(k, s[g], fv[g]);
  }
}

// The reductions' inner loop (residual.cu, multi.cu): adds virtual packs q = first + u * step (u < U,
// q < end) of z and f to L per-lane sums, element k of a pack to lane k % L, in index order.
template <int U, int L, typename Z, typename F>
__device__ __forceinline__ void accumulate_packs(const Z* __restrict__ z, const F* __restrict__ f, int64_t n,
                                                 bool aligned, int64_t first, int64_t step, int64_t end,
                                                 acc_t<Z> (&diff_sq)[L], acc_t<Z> (&f_sq)[L]) {
  using A = acc_t<Z>;
  constexpr int P = kPackElems<Z>;
  Pack<Z, P> zv[U];
  Pack<F, P> fv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t q = first + u * step;
    if (q < end) load_indexed_pack<P>(z, f, n, q, aligned, zv[u], fv[u]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (first + u * step < end) {
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const A fk = widen<A>(fv[u].v[k]);
        const A dk = widen<A>(zv[u].v[k]) - fk;
        diff_sq[k % L] = fused_mul_add(dk, dk, diff_sq[k % L]);
        f_sq[k % L] = fused_mul_add(fk, fk, f_sq[k % L]);
      }
    }
  }
}

// Lane sums folded in a fixed tree into lane 0.
template <int L, typename A>
__device__ __forceinline__ void fold_lanes(A (&diff_sq)[L], A (&f_sq)[L]) {
#pragma unroll
  for (int width = L / 2; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) {
      diff_sq[k] += diff_sq[k + width];
      f_sq[k] += f_sq[k + width];
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over the block in a fixed tree (the same order on every run); the sums are valid
// in thread 0. Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T partial[2][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? partial[0][lane] : T(0));
    b = warp_sum(lane < kWarps ? partial[1][lane] : T(0));
  }
}

// The reductions' workspace starts with the ticket counter, padded so the partials after it stay
// 16-byte aligned.
constexpr size_t kTicketBytes = 16;

// The end of the reductions (residual.cu, multi.cu): thread 0 of every block publishes the block's
// sums as partial `slot` of `total` (diff sums at partials[slot], f sums total further on), then takes
// a ticket; the block that takes the last one reads all partials in slot order, sums them in double
// with a fixed tree, and returns true with the totals valid in its thread 0. Every thread of every
// block must call it; only the last block gets true. The ticket starts at zero.
template <typename P>
__device__ __forceinline__ bool sum_partials_in_last_block(P* __restrict__ partials, unsigned int* __restrict__ ticket,
                                                           unsigned int total, unsigned int slot, P diff_sq, P f_sq,
                                                           double& total_diff_sq, double& total_f_sq) {
  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    partials[slot] = diff_sq;
    partials[total + slot] = f_sq;
    __threadfence();  // the partial is visible device-wide before the ticket says it is there
    last_block = atomicAdd(ticket, 1u) == total - 1;
  }
  __syncthreads();
  if (!last_block) return false;
  __threadfence();
  total_diff_sq = total_f_sq = 0.0;
  for (unsigned int blk = threadIdx.x; blk < total; blk += kThreads) {
    // __ldcg reads L2, where the other blocks' partials are, never a stale L1 line.
    total_diff_sq += static_cast<double>(__ldcg(partials + blk));
    total_f_sq += static_cast<double>(__ldcg(partials + total + blk));
  }
  block_sum2(total_diff_sq, total_f_sq);
  return true;
}

// A positive per-device value, computed by query(device, &value) once per device and cached in
// `cache` (one slot per device index; a race only computes the same value twice).
constexpr int kMaxDevices = 64;

template <typename Query>
cudaError_t cached_per_device(std::atomic<int> (&cache)[kMaxDevices], Query&& query, int* value) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cacheable = device < kMaxDevices;
  if (cacheable && (*value = cache[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  if ((err = query(device, value)) != cudaSuccess) return err;
  if (cacheable) cache[device].store(*value, std::memory_order_relaxed);
  return cudaSuccess;
}

// The most blocks of kThreads the current device holds at once (SMs times threads per SM); a bound
// on every grid below, used to size scratch memory.
inline cudaError_t device_block_limit(int* blocks) {
  static std::atomic<int> cache[kMaxDevices];
  return cached_per_device(cache, [](int device, int* out) {
    int sms = 0, threads_per_sm = 0;
    cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
    }
    *out = sms * (threads_per_sm >= kThreads ? threads_per_sm / kThreads : 1);
    return err;
  }, blocks);
}

// Blocks of Kernel (kThreads each, no dynamic shared memory) resident at once on the current device,
// given the registers ptxas chose: the grid-stride kernels launch at most this many, one full wave.
template <auto Kernel>
cudaError_t resident_blocks(int* blocks) {
  static std::atomic<int> cache[kMaxDevices];
  return cached_per_device(cache, [](int device, int* out) {
    int sms = 0, per_sm = 0;
    cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0);
    *out = sms * (per_sm > 1 ? per_sm : 1);
    return err;
  }, blocks);
}

// Grid for a span of state type S: enough threads for one step over the packs (kUnroll each) or
// the scalar elements (kScalarGroup each), capped at what is resident; the kernels stride over the rest.
template <typename S>
int grid_for(const Span& span, int max_blocks) {
  constexpr int P = kPackElems<S>, G = kScalarGroup<S>;
  const int64_t vector_work = (span.packs + kUnroll - 1) / kUnroll;
  const int64_t scalar_work = (span.n - span.packs * P + G - 1) / G;
  const int64_t work = vector_work > scalar_work ? vector_work : scalar_work;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < max_blocks ? blocks : max_blocks));
}

// Grid for the indexed reductions over n elements of Z: enough threads for kUnroll virtual packs each,
// capped at what is resident. A function of n, never of the alignment.
template <typename Z>
int grid_for_indexed(int64_t n, int max_blocks) {
  constexpr int P = kPackElems<Z>;
  const int64_t work = ((n + P - 1) / P + kUnroll - 1) / kUnroll;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < max_blocks ? blocks : max_blocks));
}

}  // namespace revdeq::cuda
