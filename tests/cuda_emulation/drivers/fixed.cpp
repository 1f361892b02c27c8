// Exact mode: relax_fixed / unrelax_fixed against the 128-bit reference, bit for bit: every f dtype,
// every m in 1..8 with p at its edges, frac_bits 0..52, sizes around the warp tile, state and f values
// at and past the range limits, NaN/Inf; remainder words (padding bits included), status flags, the
// exact round trip and the detection of an f that changed.
#include <algorithm>
#include <vector>

#include "harness.h"
#include "types.h"

namespace {

using harness::Guarded;
constexpr int64_t kLimit = int64_t{1} << 53;
constexpr int64_t kTile = 128;  // elements a warp owns per tile (exact_pack.cuh)

int64_t words_for(int64_t n) { return (n + 31) / 32; }

// p values at the edges of the odd numerators for m: 1, 2^m - 1, 2^m + 1, 2^(m+1) - 1 (distinct ones).
std::vector<int64_t> edge_numerators(int m) {
  std::vector<int64_t> p = {1, (int64_t{1} << m) - 1, (int64_t{1} << m) + 1, (int64_t{2} << m) - 1};
  std::sort(p.begin(), p.end());
  p.erase(std::unique(p.begin(), p.end()), p.end());
  return p;
}

// A state value: mostly a fixed-point image of a random value, sometimes at or just past +-2^53.
int64_t random_state(int frac_bits, bool edges) {
  std::uniform_int_distribution<int> pick(0, 99);
  const int k = pick(harness::rng());
  if (edges && k == 0) return kLimit;
  if (edges && k == 1) return -kLimit;
  if (edges && k == 2) return kLimit + 1;  // out of range: must be flagged and left alone
  if (edges && k == 3) return -kLimit - 7;
  std::normal_distribution<double> normal;
  const double x = normal(harness::rng()) * std::ldexp(1.0, std::uniform_int_distribution<int>(-4, 4)(harness::rng()));
  const double scaled = std::ldexp(x, frac_bits);
  return static_cast<int64_t>(std::max(-9.0e15, std::min(9.0e15, scaled)));
}

// An f value: mostly in range, sometimes past the range (|f * 2^F| > 2^53), infinite or NaN.
template <typename F>
F random_f(int frac_bits, bool edges) {
  std::uniform_int_distribution<int> pick(0, 99);
  const int k = pick(harness::rng());
  if (edges && k == 0) return ref::from_double<F>(NAN);
  if (edges && k == 1) return ref::from_double<F>(-INFINITY);
  if (edges && k == 2) return ref::from_double<F>(std::ldexp(1.5, 53 - frac_bits));  // past the limit, if F can hold it
  return harness::random_value<F>(false);
}

template <typename F>
struct Case {
  int64_t n;
  int64_t p;
  int m;
  int frac_bits;
  bool edges;
};

// One forward and one inverse half-step, compared with the reference at every element.
template <typename F>
void check_case(const Case<F>& c) {
  const int64_t n = c.n, words = words_for(n);
  harness::context("fixed f=%s n=%lld beta=%lld/2^%d frac_bits=%d%s", ref::type_name<F>(), static_cast<long long>(n),
                   static_cast<long long>(c.p), c.m, c.frac_bits, c.edges ? " with edge values" : "");
  Guarded<int64_t> state(n, 0);
  Guarded<F> f(n, 0);
  Guarded<uint32_t> remainder(c.m * words, 0);
  Guarded<int32_t> status(1, 0);
  std::vector<int64_t> y0(n);
  std::vector<ref::FixedResult> want(n);
  int32_t want_flags = 0;
  for (int64_t i = 0; i < n; ++i) {
    state.set(i, y0[i] = random_state(c.frac_bits, c.edges));
    f.set(i, random_f<F>(c.frac_bits, c.edges));
    want[i] = ref::relax_fixed(y0[i], ref::to_double(f.get(i)), c.p, c.m, c.frac_bits);
    want_flags |= want[i].flags;
  }
  for (int64_t w = 0; w < c.m * words; ++w) remainder.set(w, 0xffffffffu);  // unwritten words and padding show
  const int32_t preset = 1 << 20;  // status collects flags: bits already set stay set
  status.set(0, preset);

  cudaError_t err = revdeq::cuda::relax_fixed(state.data(), f.data(), types::dtype_of<F>(), remainder.data(),
                                              status.data(), n, c.p, c.m, c.frac_bits, nullptr);
  CHECK(err == cudaSuccess, "relax_fixed returned %s", harness::error_name(err));
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (state.get(i) != want[i].state) {
      ++wrong;
      if (first < 0) first = i;
    }
  }
  CHECK(wrong == 0, "relax_fixed: %lld states differ; first at %lld: got %lld want %lld (from %lld)",
        static_cast<long long>(wrong), static_cast<long long>(first), first >= 0 ? static_cast<long long>(state.get(first)) : 0LL,
        first >= 0 ? static_cast<long long>(want[first].state) : 0LL, first >= 0 ? static_cast<long long>(y0[first]) : 0LL);
  // Bit b of element i in bit i % 32 of word [b, i / 32]; bits past n are zero.
  int64_t bad_words = 0, first_word = -1;
  for (int b = 0; b < c.m; ++b) {
    for (int64_t w = 0; w < words; ++w) {
      uint32_t expect = 0;
      for (int64_t i = w * 32; i < std::min(n, w * 32 + 32); ++i) expect |= ((want[i].remainder >> b) & 1u) << (i % 32);
      if (remainder.get(b * words + w) != expect) {
        ++bad_words;
        if (first_word < 0) first_word = b * words + w;
      }
    }
  }
  CHECK(bad_words == 0, "relax_fixed: %lld remainder words differ; first is word %lld (plane %lld): got %08x",
        static_cast<long long>(bad_words), static_cast<long long>(first_word),
        static_cast<long long>(first_word >= 0 ? first_word / words : 0),
        first_word >= 0 ? remainder.get(first_word) : 0u);
  CHECK(status.get(0) == (preset | want_flags), "relax_fixed: status %#x, want %#x", status.get(0), preset | want_flags);

  // The inverse, from the forward's result, with the same f and remainder.
  std::vector<ref::FixedResult> back(n);
  int32_t back_flags = 0;
  for (int64_t i = 0; i < n; ++i) {
    back[i] = ref::unrelax_fixed(state.get(i), ref::to_double(f.get(i)), want[i].remainder, c.p, c.m, c.frac_bits);
    back_flags |= back[i].flags;
  }
  status.set(0, 0);
  err = revdeq::cuda::unrelax_fixed(state.data(), f.data(), types::dtype_of<F>(), remainder.data(), status.data(), n,
                                    c.p, c.m, c.frac_bits, nullptr);
  CHECK(err == cudaSuccess, "unrelax_fixed returned %s", harness::error_name(err));
  wrong = 0;
  first = -1;
  int64_t not_restored = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (state.get(i) != back[i].state) {
      ++wrong;
      if (first < 0) first = i;
    }
    if (want[i].flags == 0 && state.get(i) != y0[i]) ++not_restored;
  }
  CHECK(wrong == 0, "unrelax_fixed: %lld states differ from the reference; first at %lld", static_cast<long long>(wrong),
        static_cast<long long>(first));
  CHECK(not_restored == 0, "unrelax_fixed: %lld elements did not come back to their start bit for bit",
        static_cast<long long>(not_restored));
  CHECK(status.get(0) == back_flags, "unrelax_fixed: status %#x, want %#x", status.get(0), back_flags);
  CHECK(state.guards_intact() && f.guards_intact() && remainder.guards_intact() && status.guards_intact(),
        "bytes outside the views were written");
  harness::expect_no_kernel_errors();
}

template <typename F>
void sweep_f(bool quick, int& frac_cursor) {
  const std::vector<int64_t> sizes = quick ? std::vector<int64_t>{1, 33, kTile + 1, 4 * 8 * kTile + 77}
                                           : std::vector<int64_t>{1, 31, 32, 33, kTile - 1, kTile, kTile + 1, 255,
                                                                  8 * kTile, 8 * 8 * kTile + 3, 40001};
  for (int m = 1; m <= 8; ++m) {
    for (int64_t p : edge_numerators(m)) {
      for (size_t k = 0; k < sizes.size(); ++k) {
        const int frac_bits = frac_cursor++ % 53;  // every value in 0..52 comes round
        check_case<F>({sizes[k], p, m, frac_bits, /*edges=*/k % 2 == 1});
      }
    }
  }
}

}  // namespace

SECTION("fixed", "relax_fixed/unrelax_fixed bit for bit: f dtypes, m 1..8, p edges, frac_bits 0..52, range edges") {
  int frac_cursor = 0;
  for (int device : {harness::kSmallDevice, harness::kWideDevice}) {
    harness::use_device(device);
    types::for_each_float([&](auto tag) { sweep_f<decltype(tag)>(quick || device == harness::kWideDevice, frac_cursor); });
  }
}

SECTION("fixed-schedules", "exact mode's warp transposes give the same words under every schedule") {
  harness::use_device(harness::kSmallDevice);
  for (const revdeq_emu::Schedule& s : harness::schedules(quick)) {
    harness::WithSchedule with(s);
    check_case<float>({3 * 8 * kTile + 45, 205, 8, 32, true});
    check_case<__half>({2 * kTile + 3, 13, 4, 20, false});
  }
}

SECTION("fixed-mismatch", "unrelax_fixed flags an f that is not what the forward saw, and writes nothing there") {
  const int64_t n = 3 * kTile + 5, words = words_for(n);
  const int m = 4, frac_bits = 32;
  const int64_t p = 13;  // keep = 3: a wrong q leaves the range with probability 1 - 1/3 per bit pattern
  Guarded<int64_t> state(n, 0);
  Guarded<double> f(n, 0);
  Guarded<uint32_t> remainder(m * words, 0);
  Guarded<int32_t> status(1, 0);
  status.set(0, 0);
  for (int64_t i = 0; i < n; ++i) {
    state.set(i, random_state(frac_bits, false));
    f.set(i, harness::random_value<double>(false));
  }
  CHECK(revdeq::cuda::relax_fixed(state.data(), f.data(), types::DType::kFloat64, remainder.data(), status.data(), n, p,
                                  m, frac_bits, nullptr) == cudaSuccess && status.get(0) == 0, "forward failed");
  std::vector<ref::FixedResult> want(n);
  int32_t flags = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t r = 0;
    for (int b = 0; b < m; ++b) r |= ((remainder.get(b * words + i / 32) >> (i % 32)) & 1u) << b;
    if (i % 5 == 0) f.set(i, f.get(i) + 0x1p-20);  // not what the forward saw
    want[i] = ref::unrelax_fixed(state.get(i), f.get(i), r, p, m, frac_bits);
    flags |= want[i].flags;
  }
  CHECK(flags & ref::kInverseMismatch, "the reference should see mismatches here");
  CHECK(revdeq::cuda::unrelax_fixed(state.data(), f.data(), types::DType::kFloat64, remainder.data(), status.data(), n,
                                    p, m, frac_bits, nullptr) == cudaSuccess, "inverse failed");
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) wrong += state.get(i) != want[i].state;
  CHECK(wrong == 0, "%lld elements differ from the reference", static_cast<long long>(wrong));
  CHECK(status.get(0) == flags, "status %#x, want %#x", status.get(0), flags);
}

SECTION("fixed-errors", "exact mode refuses bad beta, frac_bits, sizes and misaligned pointers, launching nothing") {
  Guarded<int64_t> state(64, 0);
  Guarded<float> f(64, 0);
  Guarded<uint32_t> remainder(8 * 2, 0);
  Guarded<int32_t> status(1, 0);
  const int64_t launches = revdeq_emu::launch_count();
  auto call = [&](int64_t* s, int64_t n, int64_t p, int m, int frac_bits) {
    return revdeq::cuda::relax_fixed(s, f.data(), types::DType::kFloat32, remainder.data(), status.data(), n, p, m,
                                     frac_bits, nullptr);
  };
  harness::context("bad arguments");
  CHECK(call(state.data(), 64, 2, 4, 32) == cudaErrorInvalidValue, "an even p must be refused");
  CHECK(call(state.data(), 64, 33, 4, 32) == cudaErrorInvalidValue, "p >= 2^(m+1) must be refused");
  CHECK(call(state.data(), 64, 1, 0, 32) == cudaErrorInvalidValue, "m = 0 must be refused");
  CHECK(call(state.data(), 64, 1, 9, 32) == cudaErrorInvalidValue, "m = 9 must be refused");
  CHECK(call(state.data(), 64, 1, 1, 53) == cudaErrorInvalidValue, "frac_bits 53 must be refused");
  CHECK(call(state.data(), 64, 1, 1, -1) == cudaErrorInvalidValue, "negative frac_bits must be refused");
  CHECK(call(state.data(), -1, 1, 1, 32) == cudaErrorInvalidValue, "n < 0 must be refused");
  CHECK(call(state.data(), 0, 1, 1, 32) == cudaSuccess, "n = 0 is a no-op");
  CHECK(call(reinterpret_cast<int64_t*>(reinterpret_cast<char*>(state.data()) + 4), 8, 1, 1, 32) ==
            cudaErrorMisalignedAddress, "a state not aligned to 8 bytes must be refused");
  CHECK(revdeq_emu::launch_count() == launches, "nothing may be launched for refused or empty calls");
}

SECTION("fixed-small", "exact mode on partial warp tiles (n % 128 != 0): sized for the ThreadSanitizer build") {
  harness::use_device(harness::kSmallDevice);
  check_case<float>({33, 13, 4, 32, true});
  check_case<double>({3 * kTile + 5, 205, 8, 20, false});
}
