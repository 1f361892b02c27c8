// Multi-tensor ops: hundreds of members of mixed dtype pairs, sizes (empty ones included) and offsets
// in one call; each member bit for bit against the reference, launches per dtype pair and per 64
// members, the summed residual against long double sums, deterministic across schedules and
// addresses, and the refusals.
#include <memory>
#include <set>
#include <vector>

#include "harness.h"
#include "types.h"

namespace {

using harness::Guarded;
using revdeq::cuda::MemberPair;

// relax_ at beta = 0.5.
const revdeq::Affine kHalf = revdeq::affine_coefficients(0.5, false);

// One member with its own typed buffers (type-erased so a call can mix pairs).
struct Member {
  virtual ~Member() = default;
  virtual MemberPair pair() = 0;
  virtual void expect_affine(const revdeq::Affine& k) = 0;  // computes the reference result from the current values
  virtual int64_t wrong_elements() const = 0;
  virtual bool guards_intact() const = 0;
  virtual std::pair<long double, long double> sums() const = 0;
  virtual std::string name() const = 0;
  virtual bool accumulates_in_double() const = 0;
};

template <typename S, typename F>
struct TypedMember : Member {
  Guarded<S> state;
  Guarded<F> f;
  std::vector<S> want;
  int s_off, f_off;
  TypedMember(int64_t n, int so, int fo)
      : state(n, static_cast<size_t>(so) * sizeof(S)), f(n, static_cast<size_t>(fo) * sizeof(F)), s_off(so), f_off(fo) {
    for (int64_t i = 0; i < n; ++i) {
      state.set(i, harness::random_value<S>(false));
      f.set(i, harness::random_value<F>(false));
    }
  }
  MemberPair pair() override {
    return {state.data(), f.data(), state.size(), types::dtype_of<S>(), types::dtype_of<F>()};
  }
  void expect_affine(const revdeq::Affine& k) override {
    want.resize(static_cast<size_t>(state.size()));
    for (int64_t i = 0; i < state.size(); ++i) want[i] = ref::affine(state.get(i), f.get(i), k);
  }
  int64_t wrong_elements() const override {
    int64_t wrong = 0;
    for (int64_t i = 0; i < state.size(); ++i) wrong += !ref::same(state.get(i), want[i]);
    return wrong;
  }
  bool guards_intact() const override { return state.guards_intact() && f.guards_intact(); }
  std::pair<long double, long double> sums() const override {
    using A = ref::acc_t<S>;
    long double d2 = 0, f2 = 0;
    for (int64_t i = 0; i < state.size(); ++i) {
      const A fi = static_cast<A>(ref::to_double(f.get(i)));
      const A di = static_cast<A>(ref::to_double(state.get(i))) - fi;
      d2 += static_cast<long double>(di) * di;
      f2 += static_cast<long double>(fi) * fi;
    }
    return {d2, f2};
  }
  std::string name() const override {
    return std::string(ref::type_name<S>()) + "/" + ref::type_name<F>() + " n=" + std::to_string(state.size()) +
           " +" + std::to_string(s_off) + "/+" + std::to_string(f_off);
  }
  bool accumulates_in_double() const override { return std::is_same_v<S, double>; }
};

// count members, the k-th of the pair chosen by pick(k) (0..8, for_each_pair's order), sizes drawn to
// cover empty, tiny, chunk-boundary and multi-chunk members.
std::vector<std::unique_ptr<Member>> make_members(int count, int (*pick)(int), bool aligned = false) {
  std::vector<std::unique_ptr<Member>> members;
  const int64_t chunk_scalars = 256 * 4;  // elements of a 16 KB chunk, in packs, for float; others scale
  const int64_t size_menu[] = {0, 1, 3, 17, 255, 256, 1023, 4096 - 1, 4 * chunk_scalars + 1, 9 * chunk_scalars + 7};
  for (int k = 0; k < count; ++k) {
    const int which = pick(k);
    const int64_t n = size_menu[std::uniform_int_distribution<int>(0, 9)(harness::rng())] +
                      (k % 11 == 0 ? 3 * chunk_scalars : 0);
    int index = 0;
    types::for_each_pair([&](auto p) {
      using P = decltype(p);
      using S = typename P::State;
      using F = typename P::Fn;
      if (index++ != which) return;
      // Drawn whether used or not, so `aligned` changes the addresses and nothing else.
      const int so = std::uniform_int_distribution<int>(0, 16 / sizeof(S) - 1)(harness::rng());
      const int fo = k % 3 == 0 ? so * static_cast<int>(sizeof(S) / sizeof(F)) % (16 / sizeof(F))  // packs align
                                : std::uniform_int_distribution<int>(0, 16 / sizeof(F) - 1)(harness::rng());
      members.push_back(std::make_unique<TypedMember<S, F>>(n, aligned ? 0 : so, aligned ? 0 : fo));
    });
  }
  return members;
}

std::vector<MemberPair> pairs_of(const std::vector<std::unique_ptr<Member>>& members) {
  std::vector<MemberPair> out;
  for (const auto& m : members) out.push_back(m->pair());
  return out;
}

void check_affine(std::vector<std::unique_ptr<Member>>& members, double beta, bool inverse, const char* what) {
  const revdeq::Affine k = revdeq::affine_coefficients(beta, inverse);
  harness::context("multi_affine_update %s, %zu members, beta=%g inverse=%d", what, members.size(), beta, inverse);
  for (auto& m : members) m->expect_affine(k);
  const std::vector<MemberPair> pairs = pairs_of(members);
  const cudaError_t err = revdeq::cuda::multi_affine_update(pairs.data(), static_cast<int>(pairs.size()), k, nullptr);
  CHECK(err == cudaSuccess, "multi_affine_update returned %s", harness::error_name(err));
  for (size_t i = 0; i < members.size(); ++i) {
    const int64_t wrong = members[i]->wrong_elements();
    CHECK(wrong == 0, "member %zu (%s): %lld elements differ from the reference", i, members[i]->name().c_str(),
          static_cast<long long>(wrong));
    CHECK(members[i]->guards_intact(), "member %zu (%s): bytes outside its views were written", i,
          members[i]->name().c_str());
  }
  harness::expect_no_kernel_errors();
}

struct Sums {
  double d2 = NAN, f2 = NAN;
};

Sums run_residual(const std::vector<std::unique_ptr<Member>>& members, bool out_fp64) {
  const std::vector<MemberPair> pairs = pairs_of(members);
  const int count = static_cast<int>(pairs.size());
  size_t bytes = 0;
  CHECK(revdeq::cuda::multi_residual_workspace_bytes(count, &bytes) == cudaSuccess, "workspace size query failed");
  Guarded<unsigned char> ws(static_cast<int64_t>(bytes), 0);  // exactly the size asked for, 64-byte aligned
  std::memset(ws.data(), 0xff, bytes);  // poisoned: a partial read before it is written is NaN
  void* aligned = ws.data();
  Guarded<double> out64(2, 0);
  Guarded<float> out32(2, 0);
  void* out = out_fp64 ? static_cast<void*>(out64.data()) : static_cast<void*>(out32.data());
  const cudaError_t err = revdeq::cuda::multi_residual(pairs.data(), count, out_fp64, out, aligned, bytes, nullptr);
  CHECK(err == cudaSuccess, "multi_residual returned %s", harness::error_name(err));
  CHECK(out64.guards_intact() && out32.guards_intact(), "bytes outside the output were written");
  CHECK(ws.guards_intact(), "multi_residual wrote past its workspace of multi_residual_workspace_bytes() bytes");
  harness::expect_no_kernel_errors();
  return out_fp64 ? Sums{out64.get(0), out64.get(1)} : Sums{out32.get(0), out32.get(1)};
}

void check_residual(const std::vector<std::unique_ptr<Member>>& members, const char* what) {
  long double d2 = 0, f2 = 0;
  bool any_double = false;
  for (const auto& m : members) {
    const auto s = m->sums();
    d2 += s.first;
    f2 += s.second;
    any_double = any_double || m->accumulates_in_double();
  }
  harness::context("multi_residual %s, %zu members", what, members.size());
  const Sums got = run_residual(members, any_double);
  const long double tol = any_double ? 2e-6L : 2e-5L;  // float members accumulate in float within a chunk
  CHECK(std::fabs(got.d2 - d2) <= tol * d2 && std::fabs(got.f2 - f2) <= tol * f2,
        "got (%.17g, %.17g), want (%.17Lg, %.17Lg)", got.d2, got.f2, d2, f2);
}

int mixed(int k) { return (k * 7 + k / 9) % 9; }
int only_float(int) { return 4; }  // float32/float32

}  // namespace

SECTION("multi", "multi-tensor relax/unrelax and residual: hundreds of mixed members, bit for bit and summed") {
  for (int device : {harness::kSmallDevice, harness::kWideDevice}) {
    harness::use_device(device);
    auto members = make_members(quick ? 120 : 300, mixed);
    check_affine(members, 0.8, false, "mixed pairs");
    check_affine(members, 0.8, true, "mixed pairs (unrelax)");
    check_affine(members, 1.3, false, "mixed pairs (beta > 1)");
    check_affine(members, 1.3, true, "mixed pairs (unrelax, beta > 1)");
    check_residual(members, "mixed pairs");
  }
}

SECTION("multi-launches", "one launch per dtype pair and per 64 members; empty members launch nothing") {
  harness::use_device(harness::kSmallDevice);
  auto members = make_members(130, only_float);  // 130 float/float members: 3 launches of 64, 64, 2
  int non_empty = 0;
  for (const auto& m : members) non_empty += m->pair().n > 0;
  const int64_t before = revdeq_emu::launch_count("multi_affine_kernel");
  check_affine(members, 0.5, false, "130 float32 members");
  const int64_t launches = revdeq_emu::launch_count("multi_affine_kernel") - before;
  CHECK(launches == (non_empty + 63) / 64, "%lld launches for %d non-empty members of one pair, want %d",
        static_cast<long long>(launches), non_empty, (non_empty + 63) / 64);
  auto mixed_members = make_members(9, [](int k) { return k; });  // one member of each pair
  int pairs_present = 0;
  for (const auto& m : mixed_members) pairs_present += m->pair().n > 0;
  const int64_t before_mixed = revdeq_emu::launch_count("multi_affine_kernel");
  check_affine(mixed_members, 0.5, false, "one member per pair");
  CHECK(revdeq_emu::launch_count("multi_affine_kernel") - before_mixed == pairs_present,
        "one launch per dtype pair present");
}

SECTION("multi-determinism", "multi_residual: the same bits under every schedule and for the same values at other addresses") {
  harness::use_device(harness::kSmallDevice);
  harness::reseed(99);
  const auto members = make_members(quick ? 40 : 90, mixed);
  harness::reseed(99);
  const auto aligned = make_members(quick ? 40 : 90, mixed, /*aligned=*/true);  // same values, offsets 0
  Sums first;
  bool have = false;
  for (const revdeq_emu::Schedule& s : harness::schedules(quick)) {
    harness::WithSchedule with(s);
    harness::context("multi_residual under %s", harness::describe(s).c_str());
    const Sums got = run_residual(members, true);
    if (!have) {
      first = got;
      have = true;
    }
    CHECK(std::memcmp(&got, &first, sizeof(Sums)) == 0, "(%.17g, %.17g) differs from the first schedule's (%.17g, %.17g)",
          got.d2, got.f2, first.d2, first.f2);
  }
  harness::context("multi_residual, the same values at aligned addresses");
  const Sums moved = run_residual(aligned, true);
  CHECK(std::memcmp(&moved, &first, sizeof(Sums)) == 0, "(%.17g, %.17g) at aligned addresses, (%.17g, %.17g) at offsets",
        moved.d2, moved.f2, first.d2, first.f2);
}

SECTION("multi-errors", "multi-tensor calls refuse a bad member before launching anything") {
  harness::use_device(harness::kSmallDevice);
  auto members = make_members(70, only_float, /*aligned=*/true);
  std::vector<MemberPair> pairs = pairs_of(members);
  std::vector<std::vector<unsigned char>> before;
  for (const auto& p : pairs) {
    const auto* bytes = static_cast<const unsigned char*>(p.state);
    before.emplace_back(bytes, bytes + p.n * 4);
  }
  const int64_t launches = revdeq_emu::launch_count();
  MemberPair& last = pairs.back();
  last.n = last.n > 0 ? last.n : 4;
  const MemberPair saved = last;
  last.state = static_cast<char*>(last.state) + 2;
  harness::context("a misaligned last member");
  CHECK(revdeq::cuda::multi_affine_update(pairs.data(), static_cast<int>(pairs.size()), kHalf, nullptr) ==
            cudaErrorMisalignedAddress, "a member not aligned to its element size must be refused");
  last = saved;
  last.state_dtype = types::DType::kFloat16;
  harness::context("an unsupported pair");
  CHECK(revdeq::cuda::multi_affine_update(pairs.data(), static_cast<int>(pairs.size()), kHalf, nullptr) ==
            cudaErrorInvalidValue, "a half state with a float32 f must be refused");
  last = saved;
  last.n = -1;
  CHECK(revdeq::cuda::multi_affine_update(pairs.data(), static_cast<int>(pairs.size()), kHalf, nullptr) ==
            cudaErrorInvalidValue, "a negative size must be refused");
  CHECK(revdeq::cuda::multi_affine_update(pairs.data(), -1, kHalf, nullptr) == cudaErrorInvalidValue,
        "a negative count must be refused");
  CHECK(revdeq_emu::launch_count() == launches, "a refused call launched kernels");
  bool untouched = true;
  for (size_t i = 0; i + 1 < pairs.size(); ++i) {
    if (!before[i].empty()) untouched = untouched && std::memcmp(pairs[i].state, before[i].data(), before[i].size()) == 0;
  }
  CHECK(untouched, "a refused call wrote a member");
  harness::context("undersized workspace");
  size_t bytes = 0;
  revdeq::cuda::multi_residual_workspace_bytes(static_cast<int>(pairs.size()), &bytes);
  std::vector<unsigned char> ws(bytes + 32);
  void* aligned = ws.data() + (16 - reinterpret_cast<uintptr_t>(ws.data()) % 16) % 16;
  float out[2];
  last = saved;
  CHECK(revdeq::cuda::multi_residual(pairs.data(), static_cast<int>(pairs.size()), false, out, aligned, bytes - 1,
                                     nullptr) == cudaErrorInvalidValue, "an undersized workspace must be refused");
}

SECTION("multi-small", "a multi-tensor call of a dozen small members: sized for the ThreadSanitizer build") {
  harness::use_device(harness::kSmallDevice);
  std::vector<std::unique_ptr<Member>> members;
  for (int k = 0; k < 12; ++k) {
    const int64_t n = 1 + 97 * k;
    if (k % 3 == 0) members.push_back(std::make_unique<TypedMember<float, float>>(n, k % 4, (k + 1) % 4));
    else if (k % 3 == 1) members.push_back(std::make_unique<TypedMember<double, __half>>(n, k % 2, k % 8));
    else members.push_back(std::make_unique<TypedMember<__nv_bfloat16, __nv_bfloat16>>(n, k % 8, k % 8));
  }
  check_affine(members, 0.8, false, "12 small members");
  check_residual(members, "12 small members");
}
