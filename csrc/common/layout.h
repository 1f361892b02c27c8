// Lets the kernels see every tensor as one flat array. Tensors that are dense in memory (contiguous
// or any permutation of it) are walked in place; anything else goes through a contiguous copy. For
// exact mode, whose remainder bits follow row-major element order, with_row_major walks contiguous
// versions instead.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

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

// Calls fn(state', f') on row-major (contiguous) versions of the two tensors and copies state' back
// into state when it had to be a copy.
template <typename Fn>
void with_row_major(const at::Tensor& state, const at::Tensor& f, Fn&& fn) {
  at::Tensor s = state.contiguous();
  fn(s, f.contiguous());
  if (!s.is_same(state)) state.copy_(s);
}

// The non-empty pairs of a call as flat, element-aligned arrays: element k of primary[i] pairs with
// element k of secondary[i], as with_flat_layout arranges for one pair. Primaries that
// are not dense are replaced by contiguous copies; write_back() copies those results back.
struct FlatPairs {
  std::vector<at::Tensor> primary;
  std::vector<at::Tensor> secondary;
  std::vector<size_t> index;  // each pair's position in the caller's lists
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (caller's tensor, the copy used instead)

  void write_back() const;
};

FlatPairs flatten_pairs(at::TensorList primary, at::TensorList secondary);

}  // namespace revdeq
