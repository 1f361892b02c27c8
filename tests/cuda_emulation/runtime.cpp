// The CUDA emulation's engine (see emu.h): runs a grid's threads, implements the synchronisation
// built-ins with the checks that turn misuse into a reported kernel error, and the runtime API calls
// the launchers make.
//
// Two engines, chosen at compile time:
// - fibers (default): every CUDA thread is a fiber (its own stack; switched by a few instructions of
//   assembly on x86-64, by swapcontext elsewhere), all on the calling OS thread. Exactly
//   one runs at a time; at every switch point the schedule picks the next runnable thread, so runs
//   are reproducible and the interleaving is under control (forward, reverse, seeded shuffle).
// - OS threads (REVDEQ_EMU_OS_THREADS, for ThreadSanitizer): every CUDA thread is a std::thread, the
//   built-ins are mutexes, condition variables and real atomics, so TSan sees the kernels' accesses
//   with exactly the ordering CUDA guarantees (barriers, shuffles, atomics) and reports any other.
#include "emu.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <set>

#if defined(REVDEQ_EMU_OS_THREADS)
#include <chrono>
#include <condition_variable>
#include <thread>
#else
#include <pthread.h>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define REVDEQ_EMU_ASAN 1
#endif

namespace revdeq_emu {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned char kSharedPoison = 0xff;

struct Site {
  const char* file = nullptr;
  int line = 0;
};

std::string describe(Site site) {
  if (site.file == nullptr) return "?";
  const char* base = std::strrchr(site.file, '/');
  return std::string(base ? base + 1 : site.file) + ":" + std::to_string(site.line);
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

#if !defined(REVDEQ_EMU_OS_THREADS)
// A fiber's saved execution context, and the switch between two.
#if defined(__x86_64__)
// The callee-saved registers go on the fiber's own stack; the context is its stack pointer. No system
// call and nothing for a sanitizer to intercept (swapcontext saves the signal mask with a system
// call, and AddressSanitizer clears the whole target stack's shadow on every swapcontext).
struct Context {
  void* sp = nullptr;
};
extern "C" void revdeq_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl revdeq_emu_switch
    .type revdeq_emu_switch, @function
revdeq_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size revdeq_emu_switch, .-revdeq_emu_switch
)");

// A context that starts entry() on the given stack: six zero registers, then entry as the return
// address, then a zero return address for entry itself (which never returns). The ABI wants
// rsp + 8 aligned to 16 at a function's first instruction.
void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uintptr_t*>(top) - 8;
  for (int i = 0; i < 6; ++i) sp[i] = 0;
  sp[6] = reinterpret_cast<uintptr_t>(entry);
  sp[7] = 0;
  c.sp = sp;
}

inline void raw_switch(Context& from, Context& to) { revdeq_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void init_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void raw_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif
#endif

// ------------------------------------------------------------------------------------------------
// State shared by both engines.

struct Runtime {
  std::mutex mutex;  // errors, counters and options (the fiber engine never contends for it)
  Schedule schedule;
  std::map<int, DeviceShape> shapes;
  int device = 0;
  cudaError_t pending = cudaSuccess;
  std::vector<std::string> kernel_errors;
  std::vector<std::string> launched;  // kernel names, one per launch
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

// CUDA keeps the most recent error of a runtime call or launch until cudaGetLastError reads it.
void set_pending(cudaError_t error) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  runtime().pending = error;
}

struct Block;

struct Thread {
  ThreadContext ctx;
  Block* block = nullptr;
  int linear = 0;  // x + y * bx + z * bx * by
  enum State { kRunnable, kBarrier, kShuffle, kDone } state = kRunnable;
  Site site;  // where it waits
#if !defined(REVDEQ_EMU_OS_THREADS)
  struct Context context;
  char* stack = nullptr;
  size_t stack_bytes = 0;
  uint64_t key = 0;  // priority in the run queue: lower runs first
#endif
};

// One warp shuffle in progress: lanes deposit their value, the last to arrive computes every lane's
// result, then all continue. A lane cannot overwrite `result` before every lane has read it: it
// would have to complete the next shuffle, which needs all lanes.
struct Warp {
  int first = 0, members = 0;  // linear index of lane 0, lanes in this warp
  int arrived = 0;
  int kind = 0;
  size_t bytes = 0;
  Site site;
  unsigned char deposit[kWarpSize][8];
  unsigned char result[kWarpSize][8];
  int arg[kWarpSize];
};

struct Block {
  uint3 idx;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int at_barrier = 0;
  Site barrier_site;
  int done = 0;
  uint64_t sequence = 0;  // when it became resident
  // __shared__ variables: one zero-padded allocation per declaration key, poisoned on first use.
  std::vector<std::pair<const void*, std::unique_ptr<unsigned char[]>>> shared;
#if defined(REVDEQ_EMU_OS_THREADS)
  std::mutex mutex;
  std::condition_variable released;
  uint64_t barrier_generation = 0;
  std::vector<uint64_t> warp_generation;
#endif
};

struct Launch {
  const char* kernel = "";
  Site site;
  LaunchConfig config{dim3(), dim3()};
  const std::function<void()>* body = nullptr;
  bool failed = false;
};

std::string who(const Launch& launch, const Thread& t) {
  return std::string(launch.kernel) + " (launched at " + describe(launch.site) + "), block " +
         dims(dim3(t.block->idx)) + ", thread " + dims(dim3(t.ctx.thread_idx));
}

unsigned threads_per_block(const LaunchConfig& c) { return c.block.x * c.block.y * c.block.z; }

// CUDA's limits on a launch's shape; anything else becomes the pending launch error.
bool valid_config(const LaunchConfig& c) {
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  return c.grid.x >= 1 && c.grid.x <= 0x7fffffffu && c.grid.y >= 1 && c.grid.y <= 65535 && c.grid.z >= 1 &&
         c.grid.z <= 65535 && threads >= 1 && threads <= 1024 && c.block.z <= 64 && c.shared_bytes <= 48 * 1024;
}

std::vector<uint3> block_order(const LaunchConfig& c, const Schedule& s) {
  std::vector<uint3> order;
  order.reserve(size_t{c.grid.x} * c.grid.y * c.grid.z);
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) order.push_back(make_uint3(x, y, z));
  if (s.blocks == Order::kReverse) std::reverse(order.begin(), order.end());
  if (s.blocks == Order::kShuffle) {
    std::mt19937_64 rng(s.seed * 0x9e3779b97f4a7c15ull + 1);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

void init_block(Block& b, uint3 idx, const LaunchConfig& c) {
  b.idx = idx;
  const unsigned n = threads_per_block(c);
  b.threads.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.block = &b;
    t.linear = static_cast<int>(i);
    t.ctx.thread_idx = make_uint3(i % c.block.x, (i / c.block.x) % c.block.y, i / (c.block.x * c.block.y));
    t.ctx.block_idx = idx;
    t.ctx.block_dim = c.block;
    t.ctx.grid_dim = c.grid;
  }
  b.warps.resize((n + kWarpSize - 1) / kWarpSize);
  for (size_t w = 0; w < b.warps.size(); ++w) {
    b.warps[w].first = static_cast<int>(w) * kWarpSize;
    b.warps[w].members = std::min<int>(kWarpSize, static_cast<int>(n) - b.warps[w].first);
  }
}

void* find_shared(Block& b, const void* key, size_t bytes, size_t align) {
  for (auto& [k, memory] : b.shared) {
    if (k == key) return memory.get();
  }
  // new[] of unsigned char is aligned for any fundamental type; shared variables are at most 16-aligned.
  if (align > alignof(std::max_align_t)) std::abort();
  b.shared.emplace_back(key, std::make_unique<unsigned char[]>(bytes));
  std::memset(b.shared.back().second.get(), kSharedPoison, bytes);
  return b.shared.back().second.get();
}

// The result lane `lane` of a completed shuffle reads: the source lane's deposit, or its own where
// the source is outside the warp (as __shfl_down_sync does past the last lane).
int source_lane(const Warp& w, int lane) {
  const int arg = w.arg[lane];
  const int src = w.kind == kShuffleDown ? lane + arg : lane ^ arg;
  return src >= 0 && src < w.members ? src : lane;
}

void complete_shuffle(Warp& w) {
  for (int lane = 0; lane < w.members; ++lane) std::memcpy(w.result[lane], w.deposit[source_lane(w, lane)], w.bytes);
  w.arrived = 0;
}

// What is wrong with thread t arriving at a shuffle, or an empty string.
std::string shuffle_problem(const Thread& t, const Warp& w, int kind, size_t bytes, unsigned mask, int width,
                            Site site) {
  if (mask != kFullMask) return "a warp shuffle with mask " + std::to_string(mask) + " (the emulation models full-warp shuffles only)";
  if (width != kWarpSize) return "a warp shuffle with width " + std::to_string(width) + " (the emulation models width 32 only)";
  if (w.members != kWarpSize) return "a full-mask warp shuffle in a partial warp of " + std::to_string(w.members) + " threads";
  const Block& b = *t.block;
  for (int lane = 0; lane < w.members; ++lane) {
    if (b.threads[w.first + lane].state == Thread::kDone) {
      return "a warp shuffle at " + describe(site) + " that lane " + std::to_string(lane) +
             " will never join: it has exited";
    }
  }
  if (w.arrived > 0 && (w.kind != kind || w.bytes != bytes || w.site.file != site.file || w.site.line != site.line)) {
    return "a divergent warp shuffle: this lane shuffles at " + describe(site) + " while " + std::to_string(w.arrived) +
           " lanes wait at " + describe(w.site);
  }
  for (int lane = 0; lane < w.members; ++lane) {
    const Thread& other = b.threads[w.first + lane];
    if (other.state == Thread::kBarrier) {
      return "a warp shuffle at " + describe(site) + " while lane " + std::to_string(lane) + " waits at __syncthreads at " +
             describe(other.site);
    }
  }
  return {};
}

// What is wrong with thread t arriving at a __syncthreads, or an empty string. (Other warps may be
// mid-shuffle: they reach the barrier after it. Lanes of t's own warp waiting at a shuffle never will.)
std::string barrier_problem(const Thread& t, Site site) {
  const Block& b = *t.block;
  if (b.done > 0) {
    return "__syncthreads at " + describe(site) + " that " + std::to_string(b.done) +
           " threads of the block will never reach: they have exited";
  }
  if (b.at_barrier > 0 && (b.barrier_site.file != site.file || b.barrier_site.line != site.line)) {
    return "threads of one block wait at different __syncthreads: " + describe(site) + " and " +
           describe(b.barrier_site) + " (" + std::to_string(b.at_barrier) + " threads)";
  }
  const Warp& w = b.warps[t.linear / kWarpSize];
  if (w.arrived > 0) {
    return "__syncthreads at " + describe(site) + " while " + std::to_string(w.arrived) +
           " lanes of this thread's warp wait for it at a shuffle at " + describe(w.site);
  }
  return {};
}

std::string exit_problem(const Thread& t) {
  const Block& b = *t.block;
  if (b.at_barrier > 0) {
    return "a thread exited while " + std::to_string(b.at_barrier) + " threads of its block wait at __syncthreads at " +
           describe(b.barrier_site) + ": they would never be released";
  }
  const Warp& w = b.warps[t.linear / kWarpSize];
  if (w.arrived > 0) {
    return "a lane exited while " + std::to_string(w.arrived) + " lanes of its warp wait at a shuffle at " +
           describe(w.site);
  }
  return {};
}

void report(const Launch& launch, const Thread* t, const std::string& what) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  runtime().kernel_errors.push_back("kernel error in " + (t ? who(launch, *t) : std::string(launch.kernel)) + ": " + what);
}

#if !defined(REVDEQ_EMU_OS_THREADS)
// ------------------------------------------------------------------------------------------------
// The fiber engine.

#if defined(REVDEQ_EMU_ASAN)
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kGuardBytes = 4096;

// Fiber stacks, reused across launches: mmap'd with a guard page below, touched only as deep as used.
std::vector<char*>& stack_pool() {
  static std::vector<char*> pool;
  return pool;
}

char* take_stack() {
  auto& pool = stack_pool();
  if (!pool.empty()) {
    char* s = pool.back();
    pool.pop_back();
    return s;
  }
  void* base = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
  if (base == MAP_FAILED) {
    std::perror("revdeq_emu: mmap of a fiber stack");
    std::abort();
  }
  mprotect(base, kGuardBytes, PROT_NONE);
  return static_cast<char*>(base) + kGuardBytes;
}

// The runnable threads that are not running, by priority: at every switch point the runnable thread
// with the highest priority runs. Forward: blocks in start order, threads in index order; reverse:
// threads in reverse index order; shuffle: a seeded random priority per thread, and at each switch
// point the running thread is demoted to a new random priority with probability 1/4 (the
// randomized-priority scheme of PCT, which exposes ordering bugs with few runs).
class RunQueue {
 public:
  void reset(const Schedule& s) {
    order_ = s.threads;
    queue_.clear();
    rng_.seed(s.seed * 0x2545f4914f6cdd1dull + 7);
  }
  bool empty() const { return queue_.empty(); }
  // A thread entering the run queue for the first time gets its priority.
  void assign(Thread* t) {
    if (order_ == Order::kShuffle) {
      t->key = rng_() >> 1;
    } else {
      const uint64_t index = order_ == Order::kForward ? t->linear : 0xfffff - t->linear;
      t->key = (t->block->sequence << 20) | index;
    }
  }
  void add(Thread* t) { queue_.emplace(t->key, t); }
  // At a switch point: perhaps demote the running thread first.
  void maybe_demote(Thread* t) {
    if (order_ == Order::kShuffle && (rng_() & 3) == 0) t->key = rng_() >> 1;
  }
  Thread* pop() {
    auto it = queue_.begin();
    Thread* t = it->second;
    queue_.erase(it);
    return t;
  }

 private:
  Order order_ = Order::kForward;
  std::set<std::pair<uint64_t, Thread*>> queue_;
  std::mt19937_64 rng_;
};

struct Engine {
  Launch launch;
  std::vector<std::unique_ptr<Block>> live;
  std::vector<uint3> waiting;  // blocks not yet started, next first (back of the vector)
  uint64_t sequence = 0;
  RunQueue queue;
  Thread* running = nullptr;
  Context scheduler;
  bool aborted = false;
#if defined(REVDEQ_EMU_ASAN)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
#endif
};

Engine& engine() {
  static Engine e;
  return e;
}

void fiber_entry();

// Switches from the running context to `to` (the scheduler when null), with the AddressSanitizer fiber
// annotations that keep its view of the stacks right. `dying`: the current fiber never runs again.
// Not instrumented itself: the frame of a fiber's last switch stays on its stack, and must leave no
// poisoned shadow behind for the next fiber that gets the stack.
__attribute__((no_sanitize_address)) void switch_to(Context& from, Thread* to, bool dying = false) {
  Engine& e = engine();
  Context& target = to ? to->context : e.scheduler;
#if defined(REVDEQ_EMU_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake_stack, to ? to->stack : e.scheduler_stack,
                                 to ? to->stack_bytes : e.scheduler_stack_bytes);
  raw_switch(from, target);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)dying;
  raw_switch(from, target);
#endif
}

void start_block(uint3 idx) {
  Engine& e = engine();
  auto block = std::make_unique<Block>();
  init_block(*block, idx, e.launch.config);
  block->sequence = e.sequence++;
  for (Thread& t : block->threads) {
    t.stack = take_stack();
    t.stack_bytes = kStackBytes;
    init_context(t.context, t.stack, kStackBytes, fiber_entry);
    e.queue.assign(&t);
    e.queue.add(&t);
  }
  e.live.push_back(std::move(block));
}

// Records `problem` as a kernel error of the running thread; false (nothing recorded) when empty.
bool found(const std::string& problem) {
  if (problem.empty()) return false;
  report(engine().launch, engine().running, problem);
  return true;
}

// Stops the launch: the running fiber goes back to the scheduler and never resumes. Callers hold no
// object that owns memory when they call it (the fiber's frames are abandoned, not unwound).
[[noreturn]] void abort_launch() {
  Engine& e = engine();
  e.aborted = true;
  Thread* self = e.running;
  e.running = nullptr;
  switch_to(self->context, nullptr, /*dying=*/true);
  std::abort();  // unreachable: an aborted fiber is never resumed
}

// A description of where the threads of the live blocks wait (for a deadlock report).
std::string waiting_sites() {
  for (const auto& b : engine().live) {
    for (const Thread& t : b->threads) {
      if (t.state == Thread::kBarrier || t.state == Thread::kShuffle) {
        return (t.state == Thread::kBarrier ? "__syncthreads at " : "a shuffle at ") + describe(t.site);
      }
    }
  }
  return "?";
}

// The running thread gives up the processor (it stays runnable unless it just blocked) and the
// schedule picks who runs next.
void reschedule(bool still_runnable) {
  Engine& e = engine();
  Thread* self = e.running;
  if (still_runnable) {
    e.queue.maybe_demote(self);
    e.queue.add(self);
  }
  if (e.queue.empty()) {
    found("deadlock: every thread left waits (e.g. at " + waiting_sites() + ")");
    abort_launch();
  }
  Thread* next = e.queue.pop();
  if (next == self) return;
  e.running = next;
  switch_to(self->context, next);
  // Resumed: whoever switched back here set e.running to this thread.
}

// The thread's life up to its exit: the kernel body, then the checks an exit must pass.
void run_thread() {
  Engine& e = engine();
  (*e.launch.body)();
  Thread* self = e.running;
  if (found(exit_problem(*self))) abort_launch();
  self->state = Thread::kDone;
  ++self->block->done;
}

// Not instrumented, like switch_to: its frame is still on the stack when the fiber ends.
__attribute__((no_sanitize_address)) void fiber_entry() {
#if defined(REVDEQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  run_thread();
  Engine& e = engine();
  Thread* self = e.running;
  e.running = nullptr;
  switch_to(self->context, nullptr, /*dying=*/true);
  std::abort();  // unreachable
}

void run_launch() {
  Engine& e = engine();
  const Schedule s = schedule();
  e.queue.reset(s);
  e.aborted = false;
  e.sequence = 0;
  std::vector<uint3> order = block_order(e.launch.config, s);
  e.waiting.assign(order.rbegin(), order.rend());
  const int live_limit = std::max(1, s.live_blocks);
#if defined(REVDEQ_EMU_ASAN)
  pthread_attr_t attr;
  pthread_getattr_np(pthread_self(), &attr);
  void* addr = nullptr;
  size_t size = 0;
  pthread_attr_getstack(&attr, &addr, &size);
  pthread_attr_destroy(&attr);
  e.scheduler_stack = addr;
  e.scheduler_stack_bytes = size;
#endif
  while (!e.aborted) {
    // Retire finished blocks, start waiting ones while there is room.
    for (size_t i = 0; i < e.live.size();) {
      Block& b = *e.live[i];
      if (b.done == static_cast<int>(b.threads.size())) {
        for (Thread& t : b.threads) stack_pool().push_back(t.stack);
        e.live.erase(e.live.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    while (!e.waiting.empty() && static_cast<int>(e.live.size()) < live_limit) {
      start_block(e.waiting.back());
      e.waiting.pop_back();
    }
    if (e.live.empty()) break;
    if (e.queue.empty()) {
      // Only reachable when the last runnable thread exited while others wait.
      report(e.launch, nullptr, "deadlock: threads wait forever (e.g. at " + waiting_sites() + ")");
      e.aborted = true;
      break;
    }
    e.running = e.queue.pop();
    switch_to(e.scheduler, e.running);
  }
  if (e.aborted) {
    // Fibers that never finished leave instrumented frames, and their shadow, on their stacks.
    for (auto& b : e.live) {
      for (Thread& t : b->threads) {
#if defined(REVDEQ_EMU_ASAN)
        __asan_unpoison_memory_region(t.stack, kStackBytes);
#endif
        stack_pool().push_back(t.stack);
      }
    }
    e.live.clear();
    e.waiting.clear();
    e.launch.failed = true;
  }
  e.running = nullptr;
}

Thread& running_thread() {
  Thread* t = engine().running;
  if (t == nullptr) {
    std::fprintf(stderr, "revdeq_emu: a device built-in was used outside a kernel\n");
    std::abort();
  }
  return *t;
}

#else  // REVDEQ_EMU_OS_THREADS
// ------------------------------------------------------------------------------------------------
// The OS-thread engine: for ThreadSanitizer. A waiting thread that is never released (what the fiber
// engine reports as a deadlock or divergence) is reported after kHangSeconds and ends the process.

constexpr int kHangSeconds = 60;

thread_local Thread* tl_running = nullptr;
Launch* g_launch = nullptr;

[[noreturn]] void fatal(const Thread& t, const std::string& what) {
  std::fprintf(stderr, "revdeq_emu: kernel error in %s: %s\n", who(*g_launch, t).c_str(), what.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

template <typename Done>
void wait_released(std::unique_lock<std::mutex>& lock, Block& b, const Thread& t, Done&& done) {
  if (!b.released.wait_for(lock, std::chrono::seconds(kHangSeconds), done)) {
    fatal(t, "a thread waited " + std::to_string(kHangSeconds) + " s at " + describe(t.site) + " (deadlock or divergence)");
  }
}

void run_launch(Launch& launch) {
  g_launch = &launch;
  const Schedule s = schedule();
  const std::vector<uint3> order = block_order(launch.config, s);
  const size_t live_limit = static_cast<size_t>(std::max(1, s.live_blocks));
  for (size_t first = 0; first < order.size(); first += live_limit) {
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::thread> threads;
    for (size_t i = first; i < std::min(order.size(), first + live_limit); ++i) {
      blocks.push_back(std::make_unique<Block>());
      init_block(*blocks.back(), order[i], launch.config);
      blocks.back()->warp_generation.assign(blocks.back()->warps.size(), 0);
    }
    for (auto& b : blocks) {
      for (Thread& t : b->threads) {
        threads.emplace_back([&launch, &t] {
          tl_running = &t;
          (*launch.body)();
          Block& blk = *t.block;
          std::lock_guard<std::mutex> lock(blk.mutex);
          const std::string problem = exit_problem(t);
          if (!problem.empty()) fatal(t, problem);
          t.state = Thread::kDone;
          ++blk.done;
        });
      }
    }
    for (std::thread& th : threads) th.join();
  }
  g_launch = nullptr;
}

Thread& running_thread() {
  if (tl_running == nullptr) {
    std::fprintf(stderr, "revdeq_emu: a device built-in was used outside a kernel\n");
    std::abort();
  }
  return *tl_running;
}
#endif

}  // namespace

// ------------------------------------------------------------------------------------------------
// emu.h's interface.

void set_schedule(const Schedule& s) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  runtime().schedule = s;
}

Schedule schedule() {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  return runtime().schedule;
}

void set_device_shape(int device, const DeviceShape& shape) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  runtime().shapes[device] = shape;
}

int device_count() {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  return runtime().shapes.empty() ? 1 : runtime().shapes.rbegin()->first + 1;
}

std::vector<std::string> take_kernel_errors() {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  std::vector<std::string> errors;
  errors.swap(runtime().kernel_errors);
  return errors;
}

int64_t launch_count(const char* name) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  if (name == nullptr) return static_cast<int64_t>(runtime().launched.size());
  return std::count_if(runtime().launched.begin(), runtime().launched.end(),
                       [name](const std::string& k) { return k.find(name) != std::string::npos; });
}

void inject_pending_error(cudaError_t error) { set_pending(error); }

ThreadContext& current() { return running_thread().ctx; }

void run_grid(const char* kernel, const char* file, int line, const LaunchConfig& config,
              const std::function<void()>& body) {
  {
    std::lock_guard<std::mutex> lock(runtime().mutex);
    runtime().launched.emplace_back(kernel);
  }
  if (!valid_config(config)) {
    set_pending(cudaErrorInvalidConfiguration);
    return;
  }
  Launch launch;
  launch.kernel = kernel;
  launch.site = {file, line};
  launch.config = config;
  launch.body = &body;
#if defined(REVDEQ_EMU_OS_THREADS)
  run_launch(launch);
#else
  Engine& e = engine();
  if (e.running != nullptr) {
    std::fprintf(stderr, "revdeq_emu: a kernel launched another kernel (dynamic parallelism is not emulated)\n");
    std::abort();
  }
  e.launch = launch;
  run_launch();
  if (e.launch.failed) set_pending(cudaErrorLaunchFailure);
#endif
}

#if !defined(REVDEQ_EMU_OS_THREADS)

void sync_block(const char* file, int line) {
  Thread& t = running_thread();
  Block& b = *t.block;
  const Site site{file, line};
  if (found(barrier_problem(t, site))) abort_launch();
  if (b.at_barrier == 0) b.barrier_site = site;
  if (++b.at_barrier < static_cast<int>(b.threads.size())) {
    t.state = Thread::kBarrier;
    t.site = site;
    reschedule(/*still_runnable=*/false);
    return;
  }
  b.at_barrier = 0;  // the last one releases everybody
  for (Thread& other : b.threads) {
    if (other.state == Thread::kBarrier) {
      other.state = Thread::kRunnable;
      engine().queue.add(&other);
    }
  }
  reschedule(/*still_runnable=*/true);
}

void exchange(const void* in, void* out, size_t bytes, int kind, int arg, unsigned mask, int width, const char* file,
              int line) {
  Thread& t = running_thread();
  Block& b = *t.block;
  Warp& w = b.warps[t.linear / kWarpSize];
  const Site site{file, line};
  if (found(shuffle_problem(t, w, kind, bytes, mask, width, site))) abort_launch();
  const int lane = t.linear - w.first;
  if (w.arrived == 0) {
    w.kind = kind;
    w.bytes = bytes;
    w.site = site;
  }
  std::memcpy(w.deposit[lane], in, bytes);
  w.arg[lane] = arg;
  if (++w.arrived < w.members) {
    t.state = Thread::kShuffle;
    t.site = site;
    reschedule(/*still_runnable=*/false);
  } else {
    complete_shuffle(w);
    for (int l = 0; l < w.members; ++l) {
      Thread& other = b.threads[w.first + l];
      if (other.state == Thread::kShuffle) {
        other.state = Thread::kRunnable;
        engine().queue.add(&other);
      }
    }
    reschedule(/*still_runnable=*/true);
  }
  std::memcpy(out, w.result[lane], bytes);
}

void switch_point() { reschedule(/*still_runnable=*/true); }

void atomic_fence() {}

void* shared_memory(const void* key, size_t bytes, size_t align) {
  return find_shared(*running_thread().block, key, bytes, align);
}

#else  // REVDEQ_EMU_OS_THREADS

void sync_block(const char* file, int line) {
  Thread& t = running_thread();
  Block& b = *t.block;
  const Site site{file, line};
  std::unique_lock<std::mutex> lock(b.mutex);
  const std::string problem = barrier_problem(t, site);
  if (!problem.empty()) fatal(t, problem);
  if (b.at_barrier == 0) b.barrier_site = site;
  if (++b.at_barrier < static_cast<int>(b.threads.size())) {
    const uint64_t generation = b.barrier_generation;
    t.state = Thread::kBarrier;
    t.site = site;
    wait_released(lock, b, t, [&] { return b.barrier_generation != generation; });
    return;
  }
  b.at_barrier = 0;
  for (Thread& other : b.threads) {  // runnable now, not when each wakes up: the checks read these states
    if (other.state == Thread::kBarrier) other.state = Thread::kRunnable;
  }
  ++b.barrier_generation;
  b.released.notify_all();
}

void exchange(const void* in, void* out, size_t bytes, int kind, int arg, unsigned mask, int width, const char* file,
              int line) {
  Thread& t = running_thread();
  Block& b = *t.block;
  const size_t wi = static_cast<size_t>(t.linear / kWarpSize);
  Warp& w = b.warps[wi];
  const Site site{file, line};
  std::unique_lock<std::mutex> lock(b.mutex);
  const std::string problem = shuffle_problem(t, w, kind, bytes, mask, width, site);
  if (!problem.empty()) fatal(t, problem);
  const int lane = t.linear - w.first;
  if (w.arrived == 0) {
    w.kind = kind;
    w.bytes = bytes;
    w.site = site;
  }
  std::memcpy(w.deposit[lane], in, bytes);
  w.arg[lane] = arg;
  if (++w.arrived < w.members) {
    const uint64_t generation = b.warp_generation[wi];
    t.state = Thread::kShuffle;
    t.site = site;
    wait_released(lock, b, t, [&] { return b.warp_generation[wi] != generation; });
  } else {
    complete_shuffle(w);
    for (int l = 0; l < w.members; ++l) {
      Thread& other = b.threads[w.first + l];
      if (other.state == Thread::kShuffle) other.state = Thread::kRunnable;
    }
    ++b.warp_generation[wi];
    b.released.notify_all();
  }
  std::memcpy(out, w.result[lane], bytes);
}

void switch_point() { std::this_thread::yield(); }

void atomic_fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

void* shared_memory(const void* key, size_t bytes, size_t align) {
  Block& b = *running_thread().block;
  std::lock_guard<std::mutex> lock(b.mutex);
  return find_shared(b, key, bytes, align);
}

#endif

}  // namespace revdeq_emu

// ------------------------------------------------------------------------------------------------
// The CUDA runtime calls the launchers make, against the emulated devices.

using revdeq_emu::runtime;

namespace {

revdeq_emu::DeviceShape shape_of(int device) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  auto it = runtime().shapes.find(device);
  return it == runtime().shapes.end() ? revdeq_emu::DeviceShape{} : it->second;
}

cudaError_t take_pending() {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  const cudaError_t e = runtime().pending;
  runtime().pending = cudaSuccess;
  return e;
}

}  // namespace

cudaError_t cudaGetDevice(int* device) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  *device = runtime().device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= revdeq_emu::device_count()) {
    revdeq_emu::inject_pending_error(cudaErrorInvalidDevice);
    return cudaErrorInvalidDevice;
  }
  std::lock_guard<std::mutex> lock(runtime().mutex);
  runtime().device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const revdeq_emu::DeviceShape shape = shape_of(device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = shape.sms; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = shape.max_threads_per_sm; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default:
      revdeq_emu::inject_pending_error(cudaErrorInvalidValue);
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* func, int block_size,
                                                                   size_t dynamic_smem, unsigned int) {
  if (func == nullptr || block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  (void)dynamic_smem;
  int device = 0;
  cudaGetDevice(&device);
  const revdeq_emu::DeviceShape shape = shape_of(device);
  *blocks = std::min(shape.blocks_per_sm, shape.max_threads_per_sm / block_size);
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, func, block_size, dynamic_smem, 0);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (ptr == nullptr && count > 0) return cudaErrorInvalidValue;
  if (count > 0) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return take_pending(); }

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(runtime().mutex);
  return runtime().pending;
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    default: return "cudaError (emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }
