// Dtype dispatch shared by the C++ launchers: one place that maps a (state, f) dtype pair onto
// template instantiations, so every kernel supports the same pairs.
#pragma once

#include <ATen/ATen.h>

namespace revdeq {

template <typename T>
struct Tag {
  using type = T;
};

// Arithmetic type: float64 states compute in double, everything else in float (never in half).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename Fn>
void dispatch_floating(at::ScalarType dtype, const char* op, const char* arg, Fn&& fn) {
  switch (dtype) {
    case at::kDouble: return fn(Tag<double>{});
    case at::kFloat: return fn(Tag<float>{});
    case at::kHalf: return fn(Tag<at::Half>{});
    case at::kBFloat16: return fn(Tag<at::BFloat16>{});
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float64, float32, float16 or bfloat16, got ", dtype);
  }
}

// fn(Tag<State>, Tag<F>) for every supported pair; the argument checks reject pairs where F is
// more precise than State before we get here.
template <typename Fn>
void dispatch_pair(at::ScalarType state, at::ScalarType f, const char* op, Fn&& fn) {
  dispatch_floating(state, op, "state", [&](auto s_tag) {
    dispatch_floating(f, op, "f_val", [&](auto f_tag) { fn(s_tag, f_tag); });
  });
}

}  // namespace revdeq
