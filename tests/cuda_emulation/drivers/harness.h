// The drivers' harness: sections, checks that count and print their first failures, buffers with
// guard bytes around a view at any byte offset, random data, and the device shapes and schedules
// the sections sweep.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "emu.h"
#include "reference.h"

namespace harness {

struct Section {
  const char* name;
  const char* summary;
  std::function<void(bool quick)> run;
};

std::vector<Section>& sections();

struct Register {
  Register(const char* name, const char* summary, std::function<void(bool)> run) {
    sections().push_back({name, summary, std::move(run)});
  }
};

#define REVDEQ_EMU_CAT2(a, b) a##b
#define REVDEQ_EMU_CAT(a, b) REVDEQ_EMU_CAT2(a, b)
// SECTION("name", "what it checks") { body; }  (the body sees `bool quick`)
#define SECTION(name, summary)                                                                              \
  static void REVDEQ_EMU_CAT(section_, __LINE__)(bool quick);                                              \
  static ::harness::Register REVDEQ_EMU_CAT(register_, __LINE__)(name, summary, REVDEQ_EMU_CAT(section_, __LINE__)); \
  static void REVDEQ_EMU_CAT(section_, __LINE__)([[maybe_unused]] bool quick)

// Counts of the current section; failures print (the first 25 per section) with the current context.
struct Counts {
  int64_t checks = 0;
  int64_t failures = 0;
  std::string context;
};
Counts& counts();

void fail(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    ++::harness::counts().checks;                                            \
    if (!(cond)) ::harness::fail(__FILE__, __LINE__, __VA_ARGS__);           \
  } while (0)

// Sets the context printed with every failure until the next call (e.g. "relax float32/bfloat16 n=7").
void context(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Every kernel error the emulator reported since the last call counts as a failure here.
void expect_no_kernel_errors();
// At least one kernel error was reported, containing `needle`; clears them.
bool kernel_error_contains(const char* needle);

// ---- memory --------------------------------------------------------------------------------------

constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuardByte = 0xa5;

// n elements of T starting `offset_bytes` past a 64-byte aligned address, with kGuardBytes of guard
// on each side. The view is `data()`.
template <typename T>
class Guarded {
 public:
  Guarded(int64_t n, size_t offset_bytes) : n_(n), offset_(offset_bytes) {
    bytes_.assign(kGuardBytes * 2 + offset_bytes + static_cast<size_t>(n) * sizeof(T) + 64 + kGuardBytes, kGuardByte);
    const auto base = reinterpret_cast<uintptr_t>(bytes_.data());
    start_ = (64 - base % 64) % 64 + kGuardBytes + offset_bytes;
  }
  T* data() { return reinterpret_cast<T*>(bytes_.data() + start_); }
  const T* data() const { return reinterpret_cast<const T*>(bytes_.data() + start_); }
  int64_t size() const { return n_; }
  T get(int64_t i) const {
    T v;
    std::memcpy(&v, bytes_.data() + start_ + static_cast<size_t>(i) * sizeof(T), sizeof(T));
    return v;
  }
  void set(int64_t i, T v) { std::memcpy(bytes_.data() + start_ + static_cast<size_t>(i) * sizeof(T), &v, sizeof(T)); }
  // Every byte outside the view still holds the guard pattern.
  bool guards_intact() const {
    const size_t end = start_ + static_cast<size_t>(n_) * sizeof(T);
    for (size_t i = 0; i < bytes_.size(); ++i) {
      if ((i < start_ || i >= end) && bytes_[i] != kGuardByte) return false;
    }
    return true;
  }

 private:
  int64_t n_;
  size_t offset_;
  size_t start_ = 0;
  std::vector<unsigned char> bytes_;
};

// ---- data ----------------------------------------------------------------------------------------

std::mt19937_64& rng();
void reseed(uint64_t seed);

// A value drawn to exercise the arithmetic: mostly normal(0, 1) times a random power of two, with
// occasional zeros, subnormals of T, huge values and (when allowed) infinities and NaN.
template <typename T>
T random_value(bool specials = true) {
  std::uniform_int_distribution<int> pick(0, 99);
  std::normal_distribution<double> normal;
  const int k = pick(rng());
  double v = normal(rng()) * std::ldexp(1.0, std::uniform_int_distribution<int>(-6, 6)(rng()));
  if (specials) {
    if (k == 0) v = 0.0;
    else if (k == 1) v = -0.0;
    else if (k == 2) v = ref::is_half_v<T> ? 3e-6 : (sizeof(T) == 4 ? 2e-40 : 3e-310);  // subnormal in T
    else if (k == 3) v = ref::is_half_v<T> ? 6e4 : (sizeof(T) == 4 ? 3e38 : 1e307);
    else if (k == 4) v = INFINITY;
    else if (k == 5) v = NAN;
  }
  return ref::from_double<T>(v);
}

// ---- the devices and schedules the sections run on -----------------------------------------------

// Emulated device indices: 0 a small GPU (4 SMs x 2 blocks: grids of at most 8 blocks, so grid-stride
// loops run many rounds; 512 threads per SM, so the workspaces sized for every block the device can
// hold are exactly full), 1 a wide one (132 SMs x 8 blocks, an H100's block limit: grids follow the
// work), 2 a single SM with one block.
constexpr int kSmallDevice = 0, kWideDevice = 1, kTinyDevice = 2;
void set_up_devices();
void use_device(int device);

// The schedules a determinism check compares: forward, reverse and three seeded shuffles of both the
// block order and the thread order.
std::vector<revdeq_emu::Schedule> schedules(bool quick);
std::string describe(const revdeq_emu::Schedule& s);

// RAII: run with schedule s, restore the previous one after.
struct WithSchedule {
  revdeq_emu::Schedule saved;
  explicit WithSchedule(const revdeq_emu::Schedule& s) : saved(revdeq_emu::schedule()) { revdeq_emu::set_schedule(s); }
  ~WithSchedule() { revdeq_emu::set_schedule(saved); }
};

const char* error_name(cudaError_t e);

}  // namespace harness
