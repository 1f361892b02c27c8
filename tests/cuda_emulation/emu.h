// CUDA execution on the CPU, for testing: force-included (g++ -include emu.h) when the project's own
// csrc/cuda/*.cu files are compiled with the host C++ compiler. No nvcc step and no GPU.
//
// The toolkit headers still give the types (dim3, uint3, uint4, __half, __nv_bfloat16) and the host
// half/bfloat16 conversions; this header adds the execution model: every CUDA thread is a fiber of
// runtime.cpp, switched at the points where real threads interact (__syncthreads, warp shuffles,
// atomics, fences, L2 loads), so a kernel's threads interleave the way the schedule option says.
// Launches and __shared__ declarations are rewritten in a copy of the sources by emu_build.py
// (`K<<<grid, block, smem, stream>>>(args)` -> revdeq_emu::launch(...); `__shared__ T x[N];` -> a
// per-block instance), so the kernel sources themselves stay exactly what nvcc compiles.
//
// What the emulation reports as a kernel error instead of hanging or passing: a __syncthreads that not
// every thread of the block reaches (or threads waiting at different ones), a warp shuffle that not
// every lane joins (a lane exits, waits elsewhere, or shuffles at another call site), deadlock,
// masks other than the full warp, and shared memory read before it is written (it starts as 0xff
// bytes: NaN for floats, an invalid bool).
#pragma once

#define REVDEQ_CUDA_EMULATION 1

// Defined before the toolkit's host_defines.h, which keeps a definition it finds.
#define __global__
#define __device__
#define __host__
#define __grid_constant__
#define __launch_bounds__(...)
// emu_build.py rewrites every __shared__ declaration; one it missed must not silently become a local.
#define __shared__ REVDEQ_EMU_SHARED_DECLARATION_NOT_REWRITTEN_BY_BUILD_PY

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace revdeq_emu {

// ------------------------------------------------------------------------------------------------
// Options and results (the drivers set and read these; runtime.cpp implements them).

enum class Order { kForward, kReverse, kShuffle };

struct Schedule {
  Order blocks = Order::kForward;   // the order blocks start in, and their priority while resident
  Order threads = Order::kForward;  // which runnable thread runs next at every switch point
  uint64_t seed = 1;                // for kShuffle
  int live_blocks = 4;              // blocks the emulator runs interleaved at once (not the device's
                                    // resident limit, which only sizes the kernels' grids)
};

// What the device reports to the kernels' launchers (cudaDeviceGetAttribute and occupancy queries).
// Each emulated device index has its own shape, so launchers that cache per device see each one.
struct DeviceShape {
  int sms = 4;
  int max_threads_per_sm = 2048;
  int blocks_per_sm = 2;  // what occupancy queries return for every kernel
};

void set_schedule(const Schedule& schedule);
Schedule schedule();
void set_device_shape(int device, const DeviceShape& shape);
int device_count();

// Kernel errors the emulation found since the last call (each a sentence), and clears them.
std::vector<std::string> take_kernel_errors();
// Launches since the start of the process, and launches of kernels whose name contains `name`.
int64_t launch_count(const char* name = nullptr);
// Makes the next runtime call report `error` as pending, as an earlier failed call would leave it.
void inject_pending_error(cudaError_t error);

// ------------------------------------------------------------------------------------------------
// The device side: what kernels call.

struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

ThreadContext& current();
void sync_block(const char* file, int line);
void exchange(const void* in, void* out, size_t bytes, int kind, int arg, unsigned mask, int width, const char* file,
              int line);
void switch_point();  // other threads may run here (atomics, fences, loads of other blocks' data)
void* shared_memory(const void* key, size_t bytes, size_t align);
void atomic_fence();

enum ShuffleKind { kShuffleDown = 1, kShuffleXor = 2 };

template <typename T>
T shuffle(T value, int kind, int arg, unsigned mask, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move 1 to 8 bytes");
  T out;
  exchange(&value, &out, sizeof(T), kind, arg, mask, width, file, line);
  return out;
}

// The per-block instance of a rewritten `__shared__ T name;` (key: a static of the declaring
// function instance, so every declaration in every template instance has its own).
template <typename T>
T& shared_variable(const void* key) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "__shared__ variables have no constructors");
  return *static_cast<T*>(shared_memory(key, sizeof(T), alignof(T)));
}

// ------------------------------------------------------------------------------------------------
// The host side: launches (emu_build.py rewrites `K<<<cfg>>>(args)` into launch(...)).

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = nullptr)
      : grid(g), block(b), shared_bytes(smem), stream(s) {}
};

// Runs body() once per thread of the grid, the whole grid before returning (streams are in order by
// construction). Launch configuration errors become the pending error, as on a GPU.
void run_grid(const char* kernel, const char* file, int line, const LaunchConfig& config,
              const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(const char* kernel, const char* file, int line, const LaunchConfig& config, void (*fn)(Params...),
            Args&&... args) {
  // Arguments are converted to the parameter types and copied once, as into a kernel's parameter space;
  // each thread's call then gets its own copies.
  auto params = std::make_shared<std::tuple<std::decay_t<Params>...>>(std::forward<Args>(args)...);
  run_grid(kernel, file, line, config, [fn, params] { std::apply(fn, *params); });
}

}  // namespace revdeq_emu

// Built-in variables.
#define threadIdx (::revdeq_emu::current().thread_idx)
#define blockIdx (::revdeq_emu::current().block_idx)
#define blockDim (::revdeq_emu::current().block_dim)
#define gridDim (::revdeq_emu::current().grid_dim)
#define warpSize 32

// Intrinsics. Default arguments capture the caller's file and line for the error messages.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::revdeq_emu::sync_block(file, line);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return ::revdeq_emu::shuffle(value, ::revdeq_emu::kShuffleDown, static_cast<int>(delta), mask, width, file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return ::revdeq_emu::shuffle(value, ::revdeq_emu::kShuffleXor, lane_mask, mask, width, file, line);
}

// Atomics: read-modify-write with the old value returned; a switch point first, so another block's
// thread may run between any two atomics. In the OS-thread (ThreadSanitizer) mode they are real atomics.
template <typename T>
T revdeq_emu_atomic_rmw(T* address, T value, int op) {
  ::revdeq_emu::switch_point();
#if defined(REVDEQ_EMU_OS_THREADS)
  return op == 0 ? __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST) : __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST);
#else
  using U = std::make_unsigned_t<T>;  // wraps like the GPU's integer atomics
  const T old = *address;
  *address = static_cast<T>(op == 0 ? static_cast<U>(static_cast<U>(old) + static_cast<U>(value))
                                    : static_cast<U>(static_cast<U>(old) | static_cast<U>(value)));
  return old;
#endif
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) { return revdeq_emu_atomic_rmw(address, value, 0); }
inline int atomicAdd(int* address, int value) { return revdeq_emu_atomic_rmw(address, value, 0); }
inline unsigned int atomicOr(unsigned int* address, unsigned int value) { return revdeq_emu_atomic_rmw(address, value, 1); }
inline int atomicOr(int* address, int value) { return revdeq_emu_atomic_rmw(address, value, 1); }

inline void __threadfence() {
  ::revdeq_emu::switch_point();
  ::revdeq_emu::atomic_fence();
}

// Loads through L2 / the read-only cache: plain loads after a switch point (they read what other
// blocks wrote).
template <typename T>
T __ldcg(const T* address) {
  ::revdeq_emu::switch_point();
  return *address;
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

// Rounded-once fused multiply-adds, as the GPU instructions compute them.
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
