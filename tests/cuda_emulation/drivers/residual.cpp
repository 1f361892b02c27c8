// residual against a long double reference: every dtype pair, sizes and offsets, devices; and its
// determinism: the same bits under every block order and thread schedule, and for the same values
// at any address.
#include <cmath>
#include <set>
#include <vector>

#include "harness.h"
#include "types.h"

namespace {

using harness::Guarded;

template <typename Z>
using out_t = std::conditional_t<std::is_same_v<Z, double>, double, float>;

// Workspace from the caller: exactly the bytes asked for (16-byte aligned), poisoned so a partial the
// kernel reads before writing shows as NaN, with guards that show a write past its end.
struct Workspace {
  Guarded<unsigned char> bytes;
  void* data;
  size_t size;
  explicit Workspace(size_t n) : bytes(static_cast<int64_t>(n), 0), data(bytes.data()), size(n) {
    std::memset(data, 0xff, n);
  }
  bool intact() const { return bytes.guards_intact(); }
};

size_t workspace_bytes() {
  size_t bytes = 0;
  const cudaError_t err = revdeq::cuda::residual_workspace_bytes(&bytes);
  CHECK(err == cudaSuccess && bytes > 0, "residual_workspace_bytes returned %s, %zu", harness::error_name(err), bytes);
  return bytes;
}

template <typename Z, typename F>
struct Values {
  std::vector<Z> z;
  std::vector<F> f;
};

// Finite values (NaN would make every comparison below vacuous; a test of its propagation is separate).
template <typename Z, typename F>
Values<Z, F> random_values(int64_t n) {
  Values<Z, F> v;
  for (int64_t i = 0; i < n; ++i) {
    v.z.push_back(harness::random_value<Z>(false));
    v.f.push_back(harness::random_value<F>(false));
  }
  return v;
}

// The kernel's result for v placed at the given element offsets; NaN pair when the call failed.
template <typename Z, typename F>
std::pair<out_t<Z>, out_t<Z>> run(const Values<Z, F>& v, int z_off, int f_off) {
  const int64_t n = static_cast<int64_t>(v.z.size());
  Guarded<Z> z(n, static_cast<size_t>(z_off) * sizeof(Z));
  Guarded<F> f(n, static_cast<size_t>(f_off) * sizeof(F));
  for (int64_t i = 0; i < n; ++i) {
    z.set(i, v.z[i]);
    f.set(i, v.f[i]);
  }
  Guarded<out_t<Z>> out(2, 0);
  out.set(0, NAN);
  out.set(1, NAN);
  Workspace ws(workspace_bytes());
  const cudaError_t err = revdeq::cuda::residual(z.data(), types::dtype_of<Z>(), f.data(), types::dtype_of<F>(), n,
                                                 out.data(), ws.data, ws.size, nullptr);
  CHECK(err == cudaSuccess, "residual returned %s", harness::error_name(err));
  CHECK(z.guards_intact() && f.guards_intact() && out.guards_intact(), "bytes outside the views were written");
  CHECK(ws.intact(), "residual wrote past the end of its workspace of residual_workspace_bytes() bytes");
  bool inputs_unchanged = true;
  for (int64_t i = 0; i < n; ++i) inputs_unchanged = inputs_unchanged && ref::same(z.get(i), v.z[i]) && ref::same(f.get(i), v.f[i]);
  CHECK(inputs_unchanged, "residual wrote its inputs");
  harness::expect_no_kernel_errors();
  return {out.get(0), out.get(1)};
}

// The sums as revdeq_cuda.h defines them: each difference in the accumulation type, squares summed
// (here in long double: a bound for any order).
template <typename Z, typename F>
std::pair<long double, long double> reference(const Values<Z, F>& v) {
  using A = ref::acc_t<Z>;
  long double d2 = 0, f2 = 0;
  for (size_t i = 0; i < v.z.size(); ++i) {
    const A fi = static_cast<A>(ref::to_double(v.f[i]));
    const A di = static_cast<A>(ref::to_double(v.z[i])) - fi;
    d2 += static_cast<long double>(di) * di;
    f2 += static_cast<long double>(fi) * fi;
  }
  return {d2, f2};
}

template <typename Z>
bool close(out_t<Z> got, long double want) {
  const long double tol = std::is_same_v<ref::acc_t<Z>, double> ? 1e-13L : 2e-5L;
  return std::fabs(static_cast<long double>(got) - want) <= tol * std::fabs(want) + 1e-300L;
}

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename Z, typename F>
void sweep_pair(bool quick) {
  const int64_t P = types::pack_elems<Z>();
  std::set<int64_t> sizes = {1, 2, 7, P - 1, P + 1, 33, 255, 257, 256 * P * 2 - 1, 256 * P * 2 + 1, 8 * 256 * P * 2 + 3};
  if (!quick) sizes.insert({4 * 8 * 256 * P * 2 + 5, 70001});
  const int z_offsets = 16 / static_cast<int>(sizeof(Z)), f_offsets = 16 / static_cast<int>(sizeof(F));
  for (int device : {harness::kSmallDevice, harness::kWideDevice}) {
    harness::use_device(device);
    for (int64_t n : sizes) {
      if (n < 1) continue;
      const Values<Z, F> v = random_values<Z, F>(n);
      const auto [d2, f2] = reference(v);
      harness::context("residual %s/%s n=%lld device %d aligned", ref::type_name<Z>(), ref::type_name<F>(),
                       static_cast<long long>(n), device);
      const auto base = run(v, 0, 0);
      CHECK(close<Z>(base.first, d2) && close<Z>(base.second, f2), "got (%.17g, %.17g), want (%.17Lg, %.17Lg)",
            static_cast<double>(base.first), static_cast<double>(base.second), d2, f2);
      // The same values at any address give the same bits: the reduction order is a function of the
      // element index (and the device), never of the alignment.
      for (int zo = 0; zo < z_offsets; ++zo) {
        for (int fo = 0; fo < f_offsets; ++fo) {
          // Quick: three offset pairs per size (z moved, f moved, both), rotating through all of them.
          const bool pick = (zo == 1 % z_offsets && fo == 0) || (zo == 0 && fo == 1) ||
                            (zo == (n + 1) % z_offsets && fo == (n / 2 + 1) % f_offsets);
          if ((zo == 0 && fo == 0) || (quick && !pick)) continue;
          harness::context("residual %s/%s n=%lld device %d z+%d f+%d", ref::type_name<Z>(), ref::type_name<F>(),
                           static_cast<long long>(n), device, zo, fo);
          const auto moved = run(v, zo, fo);
          CHECK(same_bits(moved.first, base.first) && same_bits(moved.second, base.second),
                "the same values at another address gave (%.9g, %.9g) instead of (%.9g, %.9g)",
                static_cast<double>(moved.first), static_cast<double>(moved.second),
                static_cast<double>(base.first), static_cast<double>(base.second));
        }
      }
    }
  }
}

}  // namespace

SECTION("residual", "residual against long double sums; same bits for the same values at every address") {
  types::for_each_pair([&](auto pair) {
    using P = decltype(pair);
    sweep_pair<typename P::State, typename P::Fn>(quick);
  });
}

SECTION("residual-schedules", "residual gives the same bits under every block order and thread schedule") {
  for (int device : {harness::kSmallDevice, harness::kWideDevice}) {
    harness::use_device(device);
    const auto v32 = random_values<float, __half>(5 * 8 * 256 * 8 + 13);
    const auto v64 = random_values<double, double>(3 * 8 * 256 * 2 * 2 + 1);
    std::pair<float, float> first32{};
    std::pair<double, double> first64{};
    bool have = false;
    for (const revdeq_emu::Schedule& s : harness::schedules(quick)) {
      harness::WithSchedule with(s);
      harness::context("device %d, %s", device, harness::describe(s).c_str());
      const auto r32 = run(v32, 1, 0);
      const auto r64 = run(v64, 0, 0);
      if (!have) {
        first32 = r32;
        first64 = r64;
        have = true;
      }
      CHECK(same_bits(r32.first, first32.first) && same_bits(r32.second, first32.second),
            "float32 result (%.9g, %.9g) differs from the first schedule's (%.9g, %.9g)", r32.first, r32.second,
            first32.first, first32.second);
      CHECK(same_bits(r64.first, first64.first) && same_bits(r64.second, first64.second),
            "float64 result differs from the first schedule's");
    }
  }
}

SECTION("residual-edges", "residual: n = 0 writes zeros, NaN propagates, bad workspaces and pointers are refused") {
  const size_t bytes = workspace_bytes();
  Guarded<float> z(64, 0), f(64, 0);
  for (int64_t i = 0; i < 64; ++i) {
    z.set(i, 1.0f);
    f.set(i, 0.5f);
  }
  Guarded<float> out(2, 0);
  Workspace ws(bytes);
  using revdeq::cuda::DType;
  harness::context("n = 0");
  out.set(0, NAN);
  out.set(1, NAN);
  CHECK(revdeq::cuda::residual(z.data(), DType::kFloat32, f.data(), DType::kFloat32, 0, out.data(), ws.data, ws.size,
                               nullptr) == cudaSuccess && out.get(0) == 0.0f && out.get(1) == 0.0f,
        "n = 0 must give exact zeros");
  harness::context("NaN");
  z.set(40, NAN);
  CHECK(revdeq::cuda::residual(z.data(), DType::kFloat32, f.data(), DType::kFloat32, 64, out.data(), ws.data, ws.size,
                               nullptr) == cudaSuccess && std::isnan(out.get(0)) && out.get(1) == 16.0f,
        "a NaN in z must make the first sum NaN and leave the second (16) alone, got (%g, %g)", out.get(0), out.get(1));
  harness::context("workspace too small");
  CHECK(revdeq::cuda::residual(z.data(), DType::kFloat32, f.data(), DType::kFloat32, 64, out.data(), ws.data,
                               bytes - 1, nullptr) == cudaErrorInvalidValue, "an undersized workspace must be refused");
  harness::context("workspace misaligned");
  CHECK(revdeq::cuda::residual(z.data(), DType::kFloat32, f.data(), DType::kFloat32, 64, out.data(),
                               static_cast<char*>(ws.data) + 4, ws.size - 4, nullptr) == cudaErrorInvalidValue,
        "a workspace not aligned to 16 bytes must be refused");
  harness::context("misaligned z");
  CHECK(revdeq::cuda::residual(reinterpret_cast<char*>(z.data()) + 2, DType::kFloat32, f.data(), DType::kFloat32, 8,
                               out.data(), ws.data, ws.size, nullptr) == cudaErrorMisalignedAddress,
        "a z pointer not aligned to its element size must be refused");
  harness::context("unsupported pair");
  CHECK(revdeq::cuda::residual(z.data(), DType::kBFloat16, f.data(), DType::kFloat32, 8, out.data(), ws.data, ws.size,
                               nullptr) == cudaErrorInvalidValue, "a bfloat16 z with a float32 f is not a supported pair");
}

SECTION("residual-small", "a few small residual cases over several blocks: sized for the ThreadSanitizer build") {
  harness::use_device(harness::kSmallDevice);
  const auto v = random_values<float, __half>(3 * 256 * 8 * 2 + 7);
  const auto [d2, f2] = reference(v);
  harness::context("residual float32/float16, 4 blocks");
  const auto got = run(v, 0, 1);
  CHECK(close<float>(got.first, d2) && close<float>(got.second, f2), "got (%.9g, %.9g), want (%.9Lg, %.9Lg)", got.first,
        got.second, d2, f2);
}
