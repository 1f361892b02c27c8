// affine_update (relax_ and unrelax_) against the reference, bit for bit: every dtype pair, sizes at
// every boundary of the pack, block and grid-stride structure, every element offset of state and f
// modulo 16 bytes, on a small and a wide device, with guard bytes around both views.
#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "harness.h"
#include "types.h"

namespace {

using harness::Guarded;
using revdeq::cuda::affine_update;

// relax_ at beta = 0.5: state = 0.5 * state + 0.5 * f.
const revdeq::Affine kHalf = revdeq::affine_coefficients(0.5, false);

// The coefficients of relax_ and unrelax_ at a few betas (both sides of 1), as the bindings pass them.
struct Coefficients {
  const char* name;
  revdeq::Affine k;
};

std::vector<Coefficients> coefficient_sets() {
  std::vector<Coefficients> out;
  for (double beta : {0.8, 0.5, 1.3}) {
    out.push_back({"relax", revdeq::affine_coefficients(beta, false)});
    out.push_back({"unrelax", revdeq::affine_coefficients(beta, true)});
  }
  return out;
}

// Sizes around the structure of pointwise.cu for state type S: packs of P, a thread's kUnroll (2)
// packs, a block of 256 threads, and a small device's 8-block grid striding over the rest.
template <typename S>
std::vector<int64_t> sizes(bool small_only) {
  const int64_t P = types::pack_elems<S>(), step = 256 * P * 2, grid = 8 * step;
  std::set<int64_t> s = {1, 2, 3, 7, P - 1, P, P + 1, 2 * P - 1, 2 * P + 1, 31, 32, 33, 255, 256, 257};
  if (!small_only) {
    for (int64_t base : {256 * P, step, grid, 3 * grid}) {
      for (int64_t d : {-1, 0, 1}) s.insert(base + d);
    }
    s.insert(70001);
  }
  s.erase(0);
  return {s.begin(), s.end()};
}

template <typename S, typename F>
void check_case(int64_t n, int s_off, int f_off, const Coefficients& c) {
  harness::context("%s %s/%s n=%lld state+%d f+%d a=%g b=%g c=%g", c.name, ref::type_name<S>(), ref::type_name<F>(),
                   static_cast<long long>(n), s_off, f_off, c.k.a, c.k.b, c.k.c);
  Guarded<S> state(n, static_cast<size_t>(s_off) * sizeof(S));
  Guarded<F> f(n, static_cast<size_t>(f_off) * sizeof(F));
  std::vector<S> want(static_cast<size_t>(n));
  std::vector<F> f_copy(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    state.set(i, harness::random_value<S>());
    f.set(i, f_copy[i] = harness::random_value<F>());
    want[i] = ref::affine(state.get(i), f_copy[i], c.k);
  }
  const cudaError_t err = affine_update(state.data(), types::dtype_of<S>(), f.data(), types::dtype_of<F>(), n, c.k,
                                        nullptr);
  CHECK(err == cudaSuccess, "affine_update returned %s", harness::error_name(err));
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (!ref::same(state.get(i), want[i])) {
      if (first < 0) first = i;
      ++wrong;
    }
  }
  CHECK(wrong == 0, "%lld of %lld elements differ from the reference; first at %lld: got %.17g want %.17g",
        static_cast<long long>(wrong), static_cast<long long>(n), static_cast<long long>(first),
        first >= 0 ? ref::to_double(state.get(first)) : 0.0, first >= 0 ? ref::to_double(want[first]) : 0.0);
  bool f_unchanged = true;
  for (int64_t i = 0; i < n; ++i) f_unchanged = f_unchanged && ref::same(f.get(i), f_copy[i]);
  CHECK(f_unchanged, "f was written");
  CHECK(state.guards_intact(), "bytes outside the state view were written");
  CHECK(f.guards_intact(), "bytes outside the f view were written");
  harness::expect_no_kernel_errors();
}

template <typename S, typename F>
void sweep_pair(bool quick) {
  const std::vector<Coefficients> coefficients = coefficient_sets();
  const int s_offsets = 16 / static_cast<int>(sizeof(S)), f_offsets = 16 / static_cast<int>(sizeof(F));
  size_t k = 0;
  // Small sizes: every offset pair, on the small device (a one-block grid either way).
  harness::use_device(harness::kSmallDevice);
  for (int64_t n : sizes<S>(/*small_only=*/true)) {
    for (int so = 0; so < s_offsets; ++so) {
      for (int fo = 0; fo < f_offsets; ++fo) {
        if (quick && (so + fo + n) % 3 != 0) continue;
        check_case<S, F>(n, so, fo, coefficients[k++ % coefficients.size()]);
      }
    }
  }
  // Large sizes: aligned, equal offsets (a head realigns both), and relatively misaligned views (the
  // scalar path for every element), on the small device (many grid-stride rounds) and the wide one.
  const std::vector<std::pair<int, int>> offsets = {{0, 0}, {1, 1}, {0, 1}, {s_offsets - 1, 0}};
  for (int device : {harness::kSmallDevice, harness::kWideDevice}) {
    harness::use_device(device);
    for (int64_t n : sizes<S>(/*small_only=*/false)) {
      if (n <= 257) continue;
      for (auto [so, fo] : offsets) {
        if (quick && (n + so + device) % 2) continue;
        check_case<S, F>(n, so, fo, coefficients[k++ % coefficients.size()]);
      }
    }
  }
}

}  // namespace

SECTION("pointwise", "affine_update (relax_/unrelax_) bit for bit: dtype pairs, sizes, offsets, devices") {
  types::for_each_pair([&](auto pair) {
    using P = decltype(pair);
    sweep_pair<typename P::State, typename P::Fn>(quick);
  });
}

SECTION("pointwise-schedules", "affine_update gives the same bits under every block order and thread schedule") {
  harness::use_device(harness::kSmallDevice);
  for (const revdeq_emu::Schedule& s : harness::schedules(quick)) {
    harness::WithSchedule with(s);
    check_case<float, __nv_bfloat16>(3 * 8 * 256 * 4 * 2 + 5, 1, 1, {"relax", 0.2, 0.8});
    check_case<double, float>(2 * 256 * 2 * 2 + 3, 0, 1, {"unrelax", 5.0, -4.0});
  }
}

SECTION("pointwise-errors", "affine_update refuses misaligned pointers, bad pairs and sizes, and launches nothing for n=0") {
  using revdeq::cuda::DType;
  Guarded<float> state(16, 0), f(16, 0);
  for (int64_t i = 0; i < 16; ++i) {
    state.set(i, 1.0f);
    f.set(i, 2.0f);
  }
  const int64_t launches = revdeq_emu::launch_count();
  auto* odd = reinterpret_cast<float*>(reinterpret_cast<char*>(state.data()) + 1);
  harness::context("misaligned state");
  CHECK(affine_update(odd, DType::kFloat32, f.data(), DType::kFloat32, 8, kHalf, nullptr) ==
            cudaErrorMisalignedAddress, "a state pointer not aligned to 4 bytes must be refused");
  harness::context("unsupported pair");
  CHECK(affine_update(state.data(), DType::kFloat16, f.data(), DType::kFloat32, 8, kHalf, nullptr) ==
            cudaErrorInvalidValue, "a half state with a float32 f is not a supported pair");
  harness::context("negative n");
  CHECK(affine_update(state.data(), DType::kFloat32, f.data(), DType::kFloat32, -1, kHalf, nullptr) ==
            cudaErrorInvalidValue, "n < 0 must be refused");
  harness::context("n = 0");
  CHECK(affine_update(state.data(), DType::kFloat32, f.data(), DType::kFloat32, 0, kHalf, nullptr) == cudaSuccess,
        "n = 0 is a no-op");
  CHECK(revdeq_emu::launch_count() == launches, "nothing may be launched for refused or empty calls");
  bool untouched = true;
  for (int64_t i = 0; i < 16; ++i) untouched = untouched && state.get(i) == 1.0f;
  CHECK(untouched && state.guards_intact(), "a refused call wrote memory");
}

// Near the top of the range a finite exact result must stay finite: with state = f = v every update's
// exact result is v, whatever beta (the naive unrelax_ coefficient 1 / (1 - beta) overflowed 0.9 * max).
template <typename S>
void check_top_of_range() {
  const double top = 0.9 * static_cast<double>(std::numeric_limits<S>::max());
  for (double beta : {0.5, 0.8, 1.3, 1.7}) {
    for (bool inverse : {false, true}) {
      harness::context("top of range: %s %s beta=%g", inverse ? "unrelax" : "relax", ref::type_name<S>(), beta);
      const int64_t n = 100;
      Guarded<S> state(n, 0), f(n, 0);
      for (int64_t i = 0; i < n; ++i) {
        const S v = static_cast<S>(i % 2 ? top : -top);
        state.set(i, v);
        f.set(i, v);
      }
      CHECK(affine_update(state.data(), types::dtype_of<S>(), f.data(), types::dtype_of<S>(), n,
                          revdeq::affine_coefficients(beta, inverse), nullptr) == cudaSuccess, "affine_update failed");
      int64_t off = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double got = static_cast<double>(state.get(i)), want = i % 2 ? top : -top;
        if (!std::isfinite(got) || std::fabs(got - want) > 4 * std::numeric_limits<S>::epsilon() * top) ++off;
      }
      CHECK(off == 0, "%lld of %lld elements overflowed or moved off the exact result %g",
            static_cast<long long>(off), static_cast<long long>(n), top);
    }
  }
}

SECTION("pointwise-range", "affine_update keeps finite exact results finite at the top of the float32/float64 range") {
  harness::use_device(harness::kSmallDevice);
  check_top_of_range<float>();
  check_top_of_range<double>();
}

SECTION("pointwise-small", "a few small affine_update cases: sized for the ThreadSanitizer build") {
  harness::use_device(harness::kSmallDevice);
  check_case<float, __nv_bfloat16>(1000, 1, 1, {"relax", revdeq::affine_coefficients(0.8, false)});
  check_case<double, float>(37, 0, 1, {"unrelax", revdeq::affine_coefficients(0.8, true)});
}

SECTION("earlier-errors", "an error earlier work left pending is taken first and not returned as the kernels' own") {
  using revdeq::cuda::DType;
  harness::use_device(harness::kSmallDevice);
  Guarded<float> state(100, 0), f(100, 0);
  for (int64_t i = 0; i < 100; ++i) {
    state.set(i, 1.0f);
    f.set(i, 3.0f);
  }
  harness::context("an earlier error pending");
  revdeq_emu::inject_pending_error(cudaErrorIllegalAddress);
  CHECK(revdeq::cuda::take_earlier_error() == cudaErrorIllegalAddress, "take_earlier_error must return the pending error");
  const cudaError_t own = affine_update(state.data(), DType::kFloat32, f.data(), DType::kFloat32, 100, kHalf, nullptr);
  CHECK(own == cudaSuccess, "after the earlier error is taken, a good launch must report success, got %s",
        harness::error_name(own));
  bool updated = true;
  for (int64_t i = 0; i < 100; ++i) updated = updated && state.get(i) == 2.0f;
  CHECK(updated, "the update did not run");
  // A launch that fails on its own (a device that reports no SMs: grid 0, a configuration error)
  // returns its own error, not an earlier one.
  harness::context("the kernels' own launch error");
  revdeq_emu::set_device_shape(7, {0, 2048, 2});
  harness::use_device(7);
  CHECK(revdeq::cuda::take_earlier_error() == cudaSuccess, "nothing is pending");
  CHECK(affine_update(state.data(), DType::kFloat32, f.data(), DType::kFloat32, 100, kHalf, nullptr) ==
            cudaErrorInvalidConfiguration, "a launch with an empty grid must return its own configuration error");
  harness::use_device(harness::kSmallDevice);
}
