// The emulator's own checks, on small kernels written here with the defects it must catch: a suite
// whose detectors cannot fire would pass any kernel. Each section states what a real GPU would do.
#include <vector>

#include "harness.h"

namespace {

using revdeq_emu::LaunchConfig;
using revdeq_emu::Order;
using revdeq_emu::Schedule;

#define EMU_LAUNCH(kernel, grid, block, ...) \
  ::revdeq_emu::launch(#kernel, __FILE__, __LINE__, LaunchConfig(grid, block), kernel, __VA_ARGS__)

// Thread i writes shared[i] and reads shared[i + 1] written by its neighbour: correct with the barrier.
void neighbour_kernel(float* out, bool with_barrier) {
  static char key;
  auto& tile = revdeq_emu::shared_variable<float[256]>(&key);
  tile[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 1) % 256];
}

void half_barrier_kernel(int* out) {
  if (threadIdx.x < 128) __syncthreads();  // the other half never arrives
  out[threadIdx.x] = 1;
}

void divergent_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);  // another call site: lanes disagree on which shuffle this is
  }
  out[threadIdx.x] = v;
}

void early_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;  // lane 5 leaves its warp before the shuffle
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

void shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  v += __shfl_down_sync(0xffffffffu, v, 16);
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 3);
}

// The last-block pattern of residual.cu, one thread per block so only the blocks' interleaving matters:
// every block publishes its partial, the one that takes the last ticket sums them. `racy` takes the
// ticket before publishing, so the last block may read a partial that is not there yet.
void ticket_kernel(float* partials, unsigned* ticket, float* out, bool racy) {
  bool last;
  if (racy) {
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    __threadfence();
    partials[blockIdx.x] = 1.0f;
  } else {
    partials[blockIdx.x] = 1.0f;
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  if (last) {
    float sum = 0.0f;
    for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(partials + b);
    *out = sum;
  }
}

Schedule with_threads(Order order, uint64_t seed) { return {Order::kForward, order, seed, 4}; }

}  // namespace

SECTION("emulator-barrier", "the emulator: a missing barrier gives wrong values under some schedule; with it, none") {
  std::vector<float> out(256);
  int wrong_without = 0;
  for (Order order : {Order::kForward, Order::kReverse, Order::kShuffle}) {
    harness::WithSchedule with(with_threads(order, 3));
    for (bool barrier : {true, false}) {
      std::fill(out.begin(), out.end(), -1.0f);
      EMU_LAUNCH(neighbour_kernel, 1, 256, out.data(), barrier);
      int wrong = 0;
      for (int i = 0; i < 256; ++i) wrong += out[i] != static_cast<float>((i + 1) % 256);
      if (barrier) CHECK(wrong == 0, "with the barrier %d threads read a wrong value", wrong);
      else wrong_without += wrong;
    }
  }
  CHECK(wrong_without > 0, "no schedule exposed the missing barrier");
  harness::expect_no_kernel_errors();
}

SECTION("emulator-divergence", "the emulator reports barriers and shuffles that not every thread joins, instead of hanging") {
  std::vector<int> out(256);
  EMU_LAUNCH(half_barrier_kernel, 1, 256, out.data());
  CHECK(harness::kernel_error_contains("__syncthreads"), "a barrier half the block never reaches was not reported");
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure, "a failed kernel must leave cudaErrorLaunchFailure pending");
  EMU_LAUNCH(divergent_shuffle_kernel, 1, 64, out.data());
  CHECK(harness::kernel_error_contains("divergent warp shuffle"), "lanes at two shuffle sites were not reported");
  EMU_LAUNCH(early_exit_kernel, 1, 32, out.data());
  CHECK(harness::kernel_error_contains("exited"), "a lane that exits before a shuffle was not reported");
  EMU_LAUNCH(partial_mask_kernel, 1, 32, out.data());
  CHECK(harness::kernel_error_contains("mask"), "a partial mask was not reported as unsupported");
  while (cudaGetLastError() != cudaSuccess) {
  }
  for (Order order : {Order::kForward, Order::kReverse, Order::kShuffle}) {
    harness::WithSchedule with(with_threads(order, 5));
    EMU_LAUNCH(shuffle_kernel, 2, 64, out.data());
    bool right = true;
    for (int i = 0; i < 64; ++i) {
      const int lane = i % 32, x = lane ^ 3;
      const int want = (i - lane) + x + (x + 16 < 32 ? (i - lane) + x + 16 : (i - lane) + x);
      right = right && out[i] == want;
    }
    CHECK(right, "shuffle results wrong under thread order %d", static_cast<int>(order));
  }
  harness::expect_no_kernel_errors();
}

SECTION("emulator-ticket", "the emulator interleaves blocks at atomics: a racy last-block ticket fails under some seed") {
  const unsigned blocks = 16;
  int racy_wrong = 0;
  for (uint64_t seed = 1; seed <= 16; ++seed) {
    harness::WithSchedule with({Order::kShuffle, Order::kShuffle, seed, static_cast<int>(seed % 2 ? blocks : 5)});
    for (bool racy : {false, true}) {
      std::vector<float> partials(blocks, NAN);
      unsigned ticket = 0;
      float out = -1.0f;
      EMU_LAUNCH(ticket_kernel, blocks, 1, partials.data(), &ticket, &out, racy);
      if (racy) racy_wrong += out != static_cast<float>(blocks);
      else CHECK(out == static_cast<float>(blocks), "the correct ticket pattern summed %g, seed %llu", out,
                 static_cast<unsigned long long>(seed));
    }
  }
  CHECK(racy_wrong > 0, "no seed exposed the ticket taken before the partial was published");
  harness::expect_no_kernel_errors();
}

SECTION("emulator-runtime", "the emulator's runtime: launch limits, pending errors, device shapes") {
  std::vector<int> out(2048, 0);
  const int64_t before = revdeq_emu::launch_count("shuffle_kernel");
  EMU_LAUNCH(shuffle_kernel, 1, 1025, out.data());
  CHECK(cudaPeekAtLastError() == cudaErrorInvalidConfiguration, "1025 threads per block must be a launch error");
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration && cudaGetLastError() == cudaSuccess,
        "cudaGetLastError returns the pending error once");
  CHECK(revdeq_emu::launch_count("shuffle_kernel") == before + 1, "the launch is counted");
  CHECK(out[0] == 0, "a launch with a bad configuration must not run");
  revdeq_emu::inject_pending_error(cudaErrorIllegalAddress);
  CHECK(cudaPeekAtLastError() == cudaErrorIllegalAddress && cudaGetLastError() == cudaErrorIllegalAddress,
        "an injected error is pending until read");
  int sms = 0, per_sm = 0;
  harness::use_device(harness::kWideDevice);
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, harness::kWideDevice) == cudaSuccess && sms == 132,
        "the wide device has 132 SMs, got %d", sms);
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, shuffle_kernel, 256, 0) == cudaSuccess && per_sm == 8,
        "8 blocks of 256 per SM on the wide device, got %d", per_sm);
  harness::use_device(harness::kTinyDevice);
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, shuffle_kernel, 256, 0) == cudaSuccess && per_sm == 1,
        "1 block per SM on the tiny device, got %d", per_sm);
}
