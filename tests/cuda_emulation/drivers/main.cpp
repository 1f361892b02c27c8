// emu_tests: runs the drivers' sections against the emulated kernels.
//
//   emu_tests [--quick] [--small] [--list] [SECTION...]
//
// --quick runs fewer cases per section (what CI runs); --small runs only the sections named *-small,
// a few cases of every kernel sized for the ThreadSanitizer build (one OS thread per CUDA thread).
// Prints one line per section ("section NAME: OK, N checks" or its failures) and exits 1 when any
// check failed, 2 on a usage error.
#include <chrono>
#include <cstdlib>
#include <set>

#include "harness.h"

namespace harness {

std::vector<Section>& sections() {
  static std::vector<Section> all;
  return all;
}

Counts& counts() {
  static Counts c;
  return c;
}

void fail(const char* file, int line, const char* fmt, ...) {
  Counts& c = counts();
  if (++c.failures > 25) return;
  const char* base = std::strrchr(file, '/');
  std::printf("  FAIL %s:%d [%s] ", base ? base + 1 : file, line, c.context.c_str());
  va_list args;
  va_start(args, fmt);
  std::vprintf(fmt, args);
  va_end(args);
  std::printf("\n");
}

void context(const char* fmt, ...) {
  char buffer[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  counts().context = buffer;
}

void expect_no_kernel_errors() {
  for (const std::string& e : revdeq_emu::take_kernel_errors()) CHECK(false, "%s", e.c_str());
  ++counts().checks;
}

bool kernel_error_contains(const char* needle) {
  bool found = false;
  for (const std::string& e : revdeq_emu::take_kernel_errors()) found = found || e.find(needle) != std::string::npos;
  return found;
}

std::mt19937_64& rng() {
  static std::mt19937_64 r(12345);
  return r;
}

void reseed(uint64_t seed) { rng().seed(seed); }

void set_up_devices() {
  revdeq_emu::set_device_shape(kSmallDevice, {4, 512, 2});
  revdeq_emu::set_device_shape(kWideDevice, {132, 2048, 8});
  revdeq_emu::set_device_shape(kTinyDevice, {1, 256, 1});
}

void use_device(int device) {
  if (cudaSetDevice(device) != cudaSuccess) {
    std::printf("emu_tests: cannot select emulated device %d\n", device);
    std::exit(2);
  }
}

std::vector<revdeq_emu::Schedule> schedules(bool quick) {
  using revdeq_emu::Order;
  std::vector<revdeq_emu::Schedule> out;
  out.push_back({Order::kForward, Order::kForward, 1, 4});
  out.push_back({Order::kReverse, Order::kReverse, 1, 4});
  out.push_back({Order::kShuffle, Order::kShuffle, 7, 3});
  if (!quick) {
    out.push_back({Order::kShuffle, Order::kShuffle, 8, 8});
    out.push_back({Order::kReverse, Order::kShuffle, 9, 1});
    out.push_back({Order::kForward, Order::kReverse, 10, 2});
  }
  return out;
}

std::string describe(const revdeq_emu::Schedule& s) {
  auto name = [](revdeq_emu::Order o) {
    return o == revdeq_emu::Order::kForward ? "forward" : o == revdeq_emu::Order::kReverse ? "reverse" : "shuffle";
  };
  return std::string("blocks ") + name(s.blocks) + ", threads " + name(s.threads) + ", seed " + std::to_string(s.seed) +
         ", " + std::to_string(s.live_blocks) + " live blocks";
}

const char* error_name(cudaError_t e) { return cudaGetErrorName(e); }

}  // namespace harness

int main(int argc, char** argv) {
  using namespace harness;
  bool quick = false, list = false, small = false;
  std::set<std::string> wanted;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") quick = true;
    else if (arg == "--list") list = true;
    else if (arg == "--small") small = true;
    else if (!arg.empty() && arg[0] == '-') {
      std::printf("usage: emu_tests [--quick] [--small] [--list] [SECTION...]\n");
      return 2;
    } else wanted.insert(arg);
  }
  if (list) {
    for (const Section& s : sections()) std::printf("%-28s %s\n", s.name, s.summary);
    return 0;
  }
  for (const std::string& w : wanted) {
    bool known = false;
    for (const Section& s : sections()) known = known || w == s.name;
    if (!known) {
      std::printf("emu_tests: unknown section %s (--list shows them)\n", w.c_str());
      return 2;
    }
  }
  set_up_devices();
  int64_t failed_sections = 0;
  for (const Section& s : sections()) {
    if (!wanted.empty() && !wanted.count(s.name)) continue;
    const std::string name = s.name;
    if (small && (name.size() < 6 || name.compare(name.size() - 6, 6, "-small") != 0)) continue;
    counts() = Counts{};
    reseed(std::hash<std::string>{}(s.name));
    revdeq_emu::set_schedule(revdeq_emu::Schedule{});
    use_device(kSmallDevice);
    const auto t0 = std::chrono::steady_clock::now();
    s.run(quick);
    expect_no_kernel_errors();
    while (cudaGetLastError() != cudaSuccess) {
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Counts& c = counts();
    if (c.failures) {
      ++failed_sections;
      std::printf("section %s: FAILED, %lld of %lld checks (%.1f s)\n", s.name, static_cast<long long>(c.failures),
                  static_cast<long long>(c.checks), seconds);
    } else {
      std::printf("section %s: OK, %lld checks (%.1f s)\n", s.name, static_cast<long long>(c.checks), seconds);
    }
    std::fflush(stdout);
  }
  return failed_sections ? 1 : 0;
}
