// C++ CPU kernels for relax_fixed_ and unrelax_fixed_ (exact mode), registered for the CPU key.
// Work is split by remainder word: one task owns 32 consecutive elements and the m words that hold
// their remainder bits, so no two threads ever touch the same word. Per-element arithmetic lives in
// csrc/common/fixed_point.h. Bad elements are left unchanged and reported through the status flags.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/fixed_point.h"
#include "common/layout.h"

namespace revdeq {
namespace {

using fixed::kWordBits;

constexpr int64_t kWordGrain = 1024;  // 32K elements per task

// The packing below views 8 byte-sized lanes as one uint64 with lane i in byte i.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "cpu/exact.cpp assumes a little-endian CPU");

// Bit-plane packing 8 lanes at a time. `lanes` holds eight remainders as bytes (lane i in byte i).
// Masking bit b of every byte and multiplying by 0x0102040810204080 moves byte i's bit to bit 56 + i
// without carries, so the top byte is the 8-bit slice of plane b.
inline uint32_t plane_bits(uint64_t lanes, int b) {
  return static_cast<uint32_t>((((lanes >> b) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56);
}

// The reverse: spread 8 bits of a plane into bit b of eight bytes (replicate the byte, keep bit i in
// byte i, then turn each nonzero byte into 1 by adding 0x7f and keeping the top bit).
inline uint64_t spread_bits(uint32_t bits8, int b) {
  const uint64_t picked = (uint64_t{bits8} * 0x0101010101010101ull) & 0x8040201008040201ull;
  return (((picked + 0x7f7f7f7f7f7f7f7full) & 0x8080808080808080ull) >> 7) << b;
}

// Calls word_fn(w, base, lanes, flags) for every remainder word w of n elements (its elements are
// [base, base + lanes)), in parallel, and returns the flags all of them ORed in.
template <typename WordFn>
int32_t for_each_word(int64_t n, WordFn&& word_fn) {
  const int64_t word_count = (n + kWordBits - 1) / kWordBits;
  std::atomic<int32_t> flags{0};
  at::parallel_for(0, word_count, kWordGrain, [&](int64_t w0, int64_t w1) {
    int32_t local = 0;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t base = w * kWordBits;
      word_fn(w, base, static_cast<int>(std::min<int64_t>(kWordBits, n - base)), local);
    }
    if (local) flags.fetch_or(local);
  });
  return flags.load();
}

template <typename F>
int32_t relax_fixed_kernel(int64_t* __restrict__ state, const F* __restrict__ f, int32_t* __restrict__ words,
                           int64_t n, const fixed::Coefficients& c) {
  const int64_t word_count = (n + kWordBits - 1) / kWordBits;
  return for_each_word(n, [&](int64_t w, int64_t base, int lanes, int32_t& flags) {
    uint8_t r[kWordBits] = {};  // m <= 8 bits per lane
    for (int k = 0; k < lanes; ++k) {
      r[k] = static_cast<uint8_t>(fixed::relax_element(state + base + k, static_cast<double>(f[base + k]), c, &flags));
    }
    uint64_t groups[4];
    std::memcpy(groups, r, sizeof(groups));
    for (int b = 0; b < c.m; ++b) {
      const uint32_t word = plane_bits(groups[0], b) | plane_bits(groups[1], b) << 8 |
                            plane_bits(groups[2], b) << 16 | plane_bits(groups[3], b) << 24;
      words[b * word_count + w] = static_cast<int32_t>(word);
    }
  });
}

template <typename F>
int32_t unrelax_fixed_kernel(int64_t* __restrict__ state, const F* __restrict__ f,
                             const int32_t* __restrict__ words, int64_t n, const fixed::Coefficients& c) {
  const int64_t word_count = (n + kWordBits - 1) / kWordBits;
  return for_each_word(n, [&](int64_t w, int64_t base, int lanes, int32_t& flags) {
    uint64_t groups[4] = {};
    for (int b = 0; b < c.m; ++b) {
      const uint32_t word = static_cast<uint32_t>(words[b * word_count + w]);
      for (int g = 0; g < 4; ++g) groups[g] |= spread_bits((word >> (8 * g)) & 0xffu, b);
    }
    uint8_t r[kWordBits];
    std::memcpy(r, groups, sizeof(r));
    for (int k = 0; k < lanes; ++k) {
      fixed::unrelax_element(state + base + k, static_cast<double>(f[base + k]), r[k], c, &flags);
    }
  });
}

// relax_fixed_ (kInverse false) and unrelax_fixed_ (true). Remainder bits are indexed by the element's
// row-major position, so the kernels walk row-major versions of state and f_val (with_row_major).
template <bool kInverse>
void fixed_update_cpu(const at::Tensor& state, const at::Tensor& f_val, const at::Tensor& remainder,
                      const at::Tensor& status, int64_t p, int64_t m, int64_t frac_bits) {
  const char* op = kInverse ? "unrelax_fixed_" : "relax_fixed_";
  check_fixed(op, state, f_val, remainder, status, p, m, frac_bits, c10::DeviceType::CPU);
  if (state.numel() == 0) return;
  const fixed::Coefficients c = fixed::make_coefficients(p, static_cast<int>(m), static_cast<int>(frac_bits));
  int32_t flags = 0;
  with_row_major(state, f_val, [&](const at::Tensor& s, const at::Tensor& f) {
    dispatch_floating(f.scalar_type(), op, "f_val", [&](auto f_tag) {
      using F = typename decltype(f_tag)::type;
      auto* words = remainder.data_ptr<int32_t>();
      flags = kInverse ? unrelax_fixed_kernel<F>(s.data_ptr<int64_t>(), f.data_ptr<F>(), words, s.numel(), c)
                       : relax_fixed_kernel<F>(s.data_ptr<int64_t>(), f.data_ptr<F>(), words, s.numel(), c);
    });
  });
  if (flags) status.bitwise_or_(flags);
}

}  // namespace

TORCH_LIBRARY_IMPL(revdeq, CPU, m) {
  m.impl("relax_fixed_", &fixed_update_cpu<false>);
  m.impl("unrelax_fixed_", &fixed_update_cpu<true>);
}

}  // namespace revdeq
