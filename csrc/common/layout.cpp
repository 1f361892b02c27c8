#include "layout.h"

namespace revdeq {

void FlatPairs::write_back() const {
  for (const auto& [original, copy] : copies) original.copy_(copy);
}

FlatPairs flatten_pairs(at::TensorList primary, at::TensorList secondary) {
  FlatPairs flat;
  flat.primary.reserve(primary.size());
  flat.secondary.reserve(primary.size());
  flat.index.reserve(primary.size());
  for (size_t i = 0; i < primary.size(); ++i) {
    const at::Tensor& p = primary[i];
    const at::Tensor& s = secondary[i];
    if (p.numel() == 0) continue;
    flat.index.push_back(i);
    if (!p.is_non_overlapping_and_dense()) {
      flat.primary.push_back(p.contiguous());
      flat.secondary.push_back(s.contiguous());
      flat.copies.emplace_back(p, flat.primary.back());
    } else if (s.is_non_overlapping_and_dense() && s.strides() == p.strides()) {
      flat.primary.push_back(p);
      flat.secondary.push_back(s);
    } else {
      flat.primary.push_back(p);
      flat.secondary.push_back(at::empty_strided(p.sizes(), p.strides(), s.options()).copy_(s));
    }
  }
  return flat;
}

}  // namespace revdeq
