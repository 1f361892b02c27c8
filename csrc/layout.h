// Lets the kernels see every tensor as one flat array. Tensors that are dense in memory (contiguous
// or any permutation of it) are walked in place; anything else goes through a contiguous copy.
#pragma once

#include <ATen/ATen.h>

namespace revdeq {

// Calls fn(primary, secondary) on flat, element-aligned versions of the two tensors: element k of
// one flat buffer pairs with element k of the other. When primary needed a copy and write_back is
// set, the result is copied back into primary afterwards.
template <typename Fn>
void with_flat_layout(const at::Tensor& primary, const at::Tensor& secondary, bool write_back, Fn&& fn) {
  if (primary.is_non_overlapping_and_dense()) {
    if (secondary.is_non_overlapping_and_dense() && secondary.strides() == primary.strides()) {
      fn(primary, secondary);
    } else {
      at::Tensor matched = at::empty_strided(primary.sizes(), primary.strides(), secondary.options());
      matched.copy_(secondary);
      fn(primary, matched);
    }
    return;
  }
  at::Tensor primary_c = primary.contiguous();
  at::Tensor secondary_c = secondary.contiguous();
  fn(primary_c, secondary_c);
  if (write_back) primary.copy_(primary_c);
}

}  // namespace revdeq
