// relax_ and unrelax_ on CUDA: one kernel, state = c * (a * state + b * f), in place (common/affine.h).
//
// Memory-bound: each thread moves 16-byte packs of the state (and the matching 16, 8 or 4 bytes of
// f) over a grid-stride loop sized to the resident blocks, kUnroll packs loaded before any is
// stored so enough bytes are in flight. A scalar head aligns both pointers; if no head can, every
// element goes through the scalar loop, which never touches memory outside [0, n).
#include "common.cuh"

namespace revdeq::cuda {
namespace {

template <typename S, typename F>
__global__ void __launch_bounds__(kThreads)
    affine_update_kernel(S* __restrict__ state, const F* __restrict__ f, Span span, Coefficients<acc_t<S>> k) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t p = tid; p < span.packs; p += kUnroll * stride) {
    affine_packs<kUnroll>(state, f, span, p, stride, span.packs, k);
  }
  // The scalar elements, G per thread and step (all of them when no pack is aligned): loads first,
  // so a misaligned view still has G independent loads per array in flight per thread.
  constexpr int G = kScalarGroup<S>;
  const int64_t scalars = scalar_count<kPackElems<S>>(span);
  for (int64_t j = tid; j < scalars; j += G * stride) affine_scalars(state, f, span, j, stride, scalars, k);
}

}  // namespace

cudaError_t affine_update(void* state, DType state_dtype, const void* f, DType f_dtype, int64_t n, Affine k,
                          cudaStream_t stream) {
  if (n <= 0) return n == 0 ? cudaSuccess : cudaErrorInvalidValue;
  return dispatch_pair(state_dtype, f_dtype, [&](auto s_tag, auto f_tag) {
    using S = typename decltype(s_tag)::type;
    using F = typename decltype(f_tag)::type;
    using A = acc_t<S>;
    auto* s_ptr = static_cast<S*>(state);
    const auto* f_ptr = static_cast<const F*>(f);
    if (!element_aligned(s_ptr, f_ptr)) return cudaErrorMisalignedAddress;
    int max_blocks = 0;
    const cudaError_t err = resident_blocks<affine_update_kernel<S, F>>(&max_blocks);
    if (err != cudaSuccess) return err;
    const Span span = plan_span(s_ptr, f_ptr, n);
    const int grid = grid_for<S>(span, max_blocks);
    affine_update_kernel<S, F><<<grid, kThreads, 0, stream>>>(s_ptr, f_ptr, span, coefficients_in<A>(k));
    return cudaGetLastError();
  });
}

}  // namespace revdeq::cuda
