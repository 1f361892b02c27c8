// The kernels' element types as the drivers sweep them: the DType of each, and the (state, f) pairs
// revdeq_cuda.h supports, as a type list to iterate at compile time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernels/revdeq_cuda.h"

namespace types {

using revdeq::cuda::DType;

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, double>) return DType::kFloat64;
  else if constexpr (std::is_same_v<T, float>) return DType::kFloat32;
  else if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  else return DType::kBFloat16;
}

template <typename S, typename F>
struct Pair {
  using State = S;
  using Fn = F;
};

// fn(Pair<S, F>{}) for the nine supported pairs: equal dtypes, float64 state with any f, float32
// state with a half f.
template <typename Fn>
void for_each_pair(Fn&& fn) {
  fn(Pair<double, double>{});
  fn(Pair<double, float>{});
  fn(Pair<double, __half>{});
  fn(Pair<double, __nv_bfloat16>{});
  fn(Pair<float, float>{});
  fn(Pair<float, __half>{});
  fn(Pair<float, __nv_bfloat16>{});
  fn(Pair<__half, __half>{});
  fn(Pair<__nv_bfloat16, __nv_bfloat16>{});
}

template <typename Fn>
void for_each_float(Fn&& fn) {
  fn(double{});
  fn(float{});
  fn(__half{});
  fn(__nv_bfloat16{});
}

// Elements of S in a 16-byte pack: the vector width of the kernels (common.cuh kPackElems).
template <typename S>
constexpr int pack_elems() {
  return 16 / static_cast<int>(sizeof(S));
}

}  // namespace types
