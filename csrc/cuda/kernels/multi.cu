// Multi-tensor relax_/unrelax_ and residual on CUDA: the members of a tuple state in one launch per
// dtype pair.
//
// The members' pointers, sizes and plans travel in one kernel parameter (a __grid_constant__ struct,
// read in place), together with the running totals of their chunk counts (multi.cuh). Blocks stride
// over the global chunk list; a block finds its chunk's member by binary search and runs the same
// per-element code as the single-tensor kernels: 16-byte packs where the member's pointers allow
// them, kChunkSteps packs loaded per thread before any is used, scalars otherwise.
//
// Kernels are templated on the (state, f) dtype pair, so a call launches once per dtype pair among
// its members (and per kMultiMaxMembers members of a pair): one launch in the usual case of a single
// pair. (A single kernel switching on each member's pair made ptxas add up the registers of all nine
// cases, ~220 per thread against ~60.) residual ends like residual.cu: block partials, a ticket
// shared by all its launches, and the last block to finish adds every partial in a fixed order.
#include "multi.cuh"
#include "revdeq_cuda.h"

namespace revdeq::cuda {
namespace {

using multi::kChunkSteps;
using multi::Range;

// Everything a launch knows about its members. Kernel parameters live in constant memory; 4 KB is
// the limit every CUDA version accepts.
struct MemberTable {
  const void* state[kMultiMaxMembers];
  const void* f[kMultiMaxMembers];
  Span span[kMultiMaxMembers];
  int64_t chunk_end[kMultiMaxMembers];  // running totals of the members' chunk counts
  int count;
};
static_assert(sizeof(MemberTable) + sizeof(Coefficients<double>) <= 4096,
              "multi_affine_kernel's parameters must fit the 4 KB kernel parameter limit");

template <typename S, typename F>
__device__ __forceinline__ void affine_chunk(S* __restrict__ state, const F* __restrict__ f, const Span& span,
                                             int64_t chunk, const Coefficients<acc_t<S>>& k) {
  const Range packs = multi::chunk_packs(span, chunk);
  affine_packs<kChunkSteps>(state, f, span, packs.begin + threadIdx.x, kThreads, packs.end, k);
  // Scalars: G independent loads per thread in flight, as in pointwise.cu.
  constexpr int G = kScalarGroup<S>;
  const Range scalars = multi::chunk_scalars<S>(span, chunk);
  for (int64_t j = scalars.begin + threadIdx.x; j < scalars.end; j += G * kThreads) {
    affine_scalars(state, f, span, j, kThreads, scalars.end, k);
  }
}

template <typename S, typename F>
__global__ void __launch_bounds__(kThreads)
    multi_affine_kernel(const __grid_constant__ MemberTable table, Coefficients<acc_t<S>> coefficients) {
  const int64_t chunks = table.chunk_end[table.count - 1];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int k = multi::member_of(table.chunk_end, table.count, c);
    const int64_t local = c - (k > 0 ? table.chunk_end[k - 1] : 0);
    affine_chunk(static_cast<S*>(const_cast<void*>(table.state[k])), static_cast<const F*>(table.f[k]),
                 table.span[k], local, coefficients);
  }
}

// Accumulator lanes per thread in residual_chunk: independent dependency chains. Four, not a pack's
// eight for half types, which keeps those instantiations within 64 registers (4 blocks per SM).
template <typename Z>
constexpr int kLanes = kPackElems<Z> < 4 ? kPackElems<Z> : 4;

// Adds this thread's share of chunk `chunk` of one member (n elements) to diff_sq and f_sq: per-lane
// sums in the member's accumulation type over the chunk, then into double. The chunk's virtual packs
// (multi::indexed_chunk, in element index order) go to the threads by index, whatever the addresses.
template <typename Z, typename F>
__device__ __forceinline__ void residual_chunk(const Z* __restrict__ z, const F* __restrict__ f, int64_t n,
                                               int64_t chunk, double& diff_sq, double& f_sq) {
  using A = acc_t<Z>;
  constexpr int L = kLanes<Z>;
  A dd[L], ff[L];
#pragma unroll
  for (int k = 0; k < L; ++k) dd[k] = ff[k] = A(0);
  const Range packs = multi::indexed_chunk<Z>(n, chunk);
  accumulate_packs<kChunkSteps, L>(z, f, n, packs_aligned(z, f), packs.begin + threadIdx.x, kThreads, packs.end, dd,
                                   ff);
  fold_lanes(dd, ff);
  diff_sq += static_cast<double>(dd[0]);
  f_sq += static_cast<double>(ff[0]);
}

// Block partials: diff sums at partials[block_offset + blockIdx.x], f sums total_blocks further on,
// where total_blocks counts the blocks of every launch of the call and block_offset the blocks of
// the launches before this one. The ticket (zeroed before the first launch) counts finished blocks
// across all of them; the block that takes the last ticket writes out.
template <typename Z, typename F>
__global__ void __launch_bounds__(kThreads)
    multi_residual_kernel(const __grid_constant__ MemberTable table, double* __restrict__ partials,
                          unsigned int* __restrict__ ticket, unsigned int total_blocks, unsigned int block_offset,
                          void* __restrict__ out, bool out_fp64) {
  double diff_sq = 0.0, f_sq = 0.0;
  const int64_t chunks = table.chunk_end[table.count - 1];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int k = multi::member_of(table.chunk_end, table.count, c);
    const int64_t local = c - (k > 0 ? table.chunk_end[k - 1] : 0);
    residual_chunk(static_cast<const Z*>(table.state[k]), static_cast<const F*>(table.f[k]), table.span[k].n, local,
                   diff_sq, f_sq);
  }
  block_sum2(diff_sq, f_sq);
  double total_diff_sq, total_f_sq;
  if (!sum_partials_in_last_block(partials, ticket, total_blocks, block_offset + blockIdx.x, diff_sq, f_sq,
                                  total_diff_sq, total_f_sq)) {
    return;
  }
  if (threadIdx.x == 0) {
    if (out_fp64) {
      static_cast<double*>(out)[0] = total_diff_sq;
      static_cast<double*>(out)[1] = total_f_sq;
    } else {
      static_cast<float*>(out)[0] = static_cast<float>(total_diff_sq);
      static_cast<float*>(out)[1] = static_cast<float>(total_f_sq);
    }
  }
}

// The launches of a call: members with n > 0 grouped by dtype pair (pairs in DType order, members in
// call order within a pair), at most kMultiMaxMembers per launch. fn(S tag, F tag, table, chunks) is
// called once per launch, in that order, and its first error is returned. Every member is checked
// (size, supported pair, element alignment) before the first call, so a bad member launches nothing.
// kIndexed: chunks in element index order (residual's, multi::indexed_chunk), else by the member's
// span (the pointwise kernels', multi::chunk_packs / chunk_scalars).
template <bool kIndexed, typename Fn>
cudaError_t for_each_launch(const MemberPair* members, int count, Fn&& fn) {
  if (count < 0) return cudaErrorInvalidValue;
  for (int i = 0; i < count; ++i) {
    const MemberPair& m = members[i];
    if (m.n < 0) return cudaErrorInvalidValue;
    if (m.n == 0) continue;
    const cudaError_t err = dispatch_pair(m.state_dtype, m.f_dtype, [&](auto s_tag, auto f_tag) {
      using S = typename decltype(s_tag)::type;
      using F = typename decltype(f_tag)::type;
      const bool aligned = element_aligned(static_cast<const S*>(m.state), static_cast<const F*>(m.f));
      return aligned ? cudaSuccess : cudaErrorMisalignedAddress;
    });
    if (err != cudaSuccess) return err;  // cudaErrorInvalidValue for an unsupported pair
  }
  constexpr DType kDTypes[] = {DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType state_dtype : kDTypes) {
    for (DType f_dtype : kDTypes) {
      int next = 0;  // first member not yet considered for this pair
      while (next < count) {
        MemberTable table;
        table.count = 0;
        int64_t chunks = 0;
        for (; next < count && table.count < kMultiMaxMembers; ++next) {
          const MemberPair& m = members[next];
          if (m.n == 0 || m.state_dtype != state_dtype || m.f_dtype != f_dtype) continue;
          dispatch_pair(state_dtype, f_dtype, [&](auto s_tag, auto f_tag) {
            using S = typename decltype(s_tag)::type;
            using F = typename decltype(f_tag)::type;
            const int k = table.count++;
            table.state[k] = m.state;
            table.f[k] = m.f;
            table.span[k] = plan_span(static_cast<const S*>(m.state), static_cast<const F*>(m.f), m.n);
            chunks += kIndexed ? multi::indexed_chunk_count<S>(m.n) : multi::chunk_count<S>(table.span[k]);
            table.chunk_end[k] = chunks;
            return cudaSuccess;
          });
        }
        if (table.count == 0) break;
        const cudaError_t err = dispatch_pair(state_dtype, f_dtype, [&](auto s_tag, auto f_tag) {
          return fn(s_tag, f_tag, static_cast<const MemberTable&>(table), chunks);
        });
        if (err != cudaSuccess) return err;
      }
    }
  }
  return cudaSuccess;
}

int grid_for_chunks(int64_t chunks, int max_blocks) {
  return static_cast<int>(chunks < max_blocks ? chunks : max_blocks);
}

// The most launches a call of `count` members makes: ceil(count / 64) plus one more per extra dtype pair.
int max_launches(int count) {
  constexpr int kPairs = 9;
  return (count + kMultiMaxMembers - 1) / kMultiMaxMembers + kPairs - 1;
}

// The grid of one multi_residual launch over `chunks` chunks, of the (Z, F) pair the tags name.
template <typename ZTag, typename FTag>
cudaError_t residual_grid(int64_t chunks, int* grid) {
  int max_blocks = 0;
  const cudaError_t err = resident_blocks<multi_residual_kernel<typename ZTag::type, typename FTag::type>>(&max_blocks);
  *grid = grid_for_chunks(chunks, max_blocks);
  return err;
}

}  // namespace

cudaError_t multi_affine_update(const MemberPair* members, int count, Affine k, cudaStream_t stream) {
  return for_each_launch<false>(members, count, [&](auto s_tag, auto f_tag, const MemberTable& table, int64_t chunks) {
    using S = typename decltype(s_tag)::type;
    using F = typename decltype(f_tag)::type;
    int max_blocks = 0;
    const cudaError_t err = resident_blocks<multi_affine_kernel<S, F>>(&max_blocks);
    if (err != cudaSuccess) return err;
    multi_affine_kernel<S, F><<<grid_for_chunks(chunks, max_blocks), kThreads, 0, stream>>>(
        table, coefficients_in<acc_t<S>>(k));
    return cudaGetLastError();
  });
}

cudaError_t multi_residual_workspace_bytes(int count, size_t* bytes) {
  if (count < 0) return cudaErrorInvalidValue;
  int max_blocks = 0;
  const cudaError_t err = device_block_limit(&max_blocks);
  if (err != cudaSuccess) return err;
  *bytes = kTicketBytes + 2 * static_cast<size_t>(max_launches(count)) * max_blocks * sizeof(double);
  return cudaSuccess;
}

cudaError_t multi_residual(const MemberPair* members, int count, bool out_fp64, void* out, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  if (count < 0 || reinterpret_cast<uintptr_t>(workspace) % kTicketBytes != 0) return cudaErrorInvalidValue;
  size_t needed = 0;
  cudaError_t err = multi_residual_workspace_bytes(count, &needed);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < needed) return cudaErrorInvalidValue;

  // First pass: every launch's grid, because each launch must know the blocks of all of them.
  unsigned int total_blocks = 0;
  err = for_each_launch<true>(members, count, [&](auto z_tag, auto f_tag, const MemberTable&, int64_t chunks) {
    int grid = 0;
    const cudaError_t query_err = residual_grid<decltype(z_tag), decltype(f_tag)>(chunks, &grid);
    total_blocks += static_cast<unsigned int>(grid);
    return query_err;
  });
  if (err != cudaSuccess) return err;
  const size_t out_bytes = 2 * (out_fp64 ? sizeof(double) : sizeof(float));
  if (total_blocks == 0) return cudaMemsetAsync(out, 0, out_bytes, stream);

  auto* ticket = static_cast<unsigned int*>(workspace);
  auto* partials = reinterpret_cast<double*>(static_cast<char*>(workspace) + kTicketBytes);
  // Zeroed in stream order rather than self-resetting: stays correct across streams and CUDA graphs.
  if ((err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream)) != cudaSuccess) return err;
  unsigned int block_offset = 0;
  return for_each_launch<true>(members, count, [&](auto z_tag, auto f_tag, const MemberTable& table, int64_t chunks) {
    using Z = typename decltype(z_tag)::type;
    using F = typename decltype(f_tag)::type;
    int grid = 0;
    const cudaError_t query_err = residual_grid<decltype(z_tag), decltype(f_tag)>(chunks, &grid);
    if (query_err != cudaSuccess) return query_err;
    multi_residual_kernel<Z, F><<<grid, kThreads, 0, stream>>>(table, partials, ticket, total_blocks, block_offset,
                                                                out, out_fp64);
    block_offset += static_cast<unsigned int>(grid);
    return cudaGetLastError();
  });
}

}  // namespace revdeq::cuda
