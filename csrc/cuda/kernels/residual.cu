// residual on CUDA: [sum((z - f)^2), sum(f^2)] in one pass and one kernel launch.
//
// Each block sums a grid-stride share of the elements (per-lane accumulators, then a fixed warp and
// block tree) into one partial per block. Blocks then take a ticket; the block that takes the last
// one sums all partials in block order in double and writes the result. Which thread, lane and
// partial an element joins, and in what order, follows from its index alone (common.cuh,
// load_indexed_pack), so the result is the same on every run, for the same values at any address,
// and nothing waits on the host.
#include "common.cuh"

namespace revdeq::cuda {
namespace {

template <typename Z>
using out_t = std::conditional_t<std::is_same_v<Z, double>, double, float>;

template <typename Z, typename F>
__global__ void __launch_bounds__(kThreads)
    residual_kernel(const Z* __restrict__ z, const F* __restrict__ f, int64_t n, bool aligned,
                    acc_t<Z>* __restrict__ partials, unsigned int* __restrict__ ticket, out_t<Z>* __restrict__ out) {
  using A = acc_t<Z>;
  constexpr int P = kPackElems<Z>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t packs = (n + P - 1) / P;  // virtual packs; the last may be partial

  // One accumulator per pack lane: independent dependency chains, and each float sum is P times
  // shorter, which keeps its rounding error down. Thread tid adds packs tid, tid + stride, ... in order.
  A diff_sq[P], f_sq[P];
#pragma unroll
  for (int k = 0; k < P; ++k) diff_sq[k] = f_sq[k] = A(0);
  for (int64_t p = tid; p < packs; p += kUnroll * stride) {
    accumulate_packs<kUnroll, P>(z, f, n, aligned, p, stride, packs, diff_sq, f_sq);
  }
  fold_lanes(diff_sq, f_sq);
  A block_diff_sq = diff_sq[0], block_f_sq = f_sq[0];
  block_sum2(block_diff_sq, block_f_sq);
  double total_diff_sq, total_f_sq;
  if (!sum_partials_in_last_block(partials, ticket, gridDim.x, blockIdx.x, block_diff_sq, block_f_sq, total_diff_sq,
                                  total_f_sq)) {
    return;
  }
  if (threadIdx.x == 0) {
    out[0] = static_cast<out_t<Z>>(total_diff_sq);
    out[1] = static_cast<out_t<Z>>(total_f_sq);
  }
}

}  // namespace

cudaError_t residual_workspace_bytes(size_t* bytes) {
  int max_blocks = 0;
  const cudaError_t err = device_block_limit(&max_blocks);
  if (err != cudaSuccess) return err;
  *bytes = kTicketBytes + 2 * static_cast<size_t>(max_blocks) * sizeof(double);
  return cudaSuccess;
}

cudaError_t residual(const void* z, DType z_dtype, const void* f, DType f_dtype, int64_t n, void* out,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (n < 0 || reinterpret_cast<uintptr_t>(workspace) % kTicketBytes != 0) return cudaErrorInvalidValue;
  size_t needed = 0;
  const cudaError_t err = residual_workspace_bytes(&needed);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < needed) return cudaErrorInvalidValue;
  return dispatch_pair(z_dtype, f_dtype, [&](auto z_tag, auto f_tag) {
    using Z = typename decltype(z_tag)::type;
    using F = typename decltype(f_tag)::type;
    using A = acc_t<Z>;
    const auto* z_ptr = static_cast<const Z*>(z);
    const auto* f_ptr = static_cast<const F*>(f);
    auto* out_ptr = static_cast<out_t<Z>*>(out);
    if (n == 0) return cudaMemsetAsync(out_ptr, 0, 2 * sizeof(out_t<Z>), stream);
    if (!element_aligned(z_ptr, f_ptr)) return cudaErrorMisalignedAddress;
    int max_blocks = 0;
    cudaError_t launch_err = resident_blocks<residual_kernel<Z, F>>(&max_blocks);
    if (launch_err != cudaSuccess) return launch_err;
    const int grid = grid_for_indexed<Z>(n, max_blocks);  // from n alone: the order must not follow the addresses
    auto* ticket = static_cast<unsigned int*>(workspace);
    auto* partials = reinterpret_cast<A*>(static_cast<char*>(workspace) + kTicketBytes);
    // The ticket must start at zero. Resetting it here (4 bytes, stream-ordered) instead of keeping
    // a self-resetting counter in persistent memory stays correct when residual runs concurrently
    // on several streams or inside CUDA graphs replayed on other streams.
    launch_err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
    if (launch_err != cudaSuccess) return launch_err;
    residual_kernel<Z, F><<<grid, kThreads, 0, stream>>>(z_ptr, f_ptr, n, packs_aligned(z_ptr, f_ptr), partials,
                                                            ticket, out_ptr);
    return cudaGetLastError();
  });
}

}  // namespace revdeq::cuda
