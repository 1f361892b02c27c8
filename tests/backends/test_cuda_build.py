"""Compile-time checks of the CUDA backend that need nvcc but no GPU, so CI runs them on every push.

- tools/cuda_check.py: every kernel compiles for sm_80 and sm_90 without spilling to local memory.
- The launchers csrc/cuda/bindings/*.cpp compile against the torch and CUDA headers
  (g++ -fsyntax-only).
- The host-side split of n elements into a scalar head, 16-byte packs and a scalar tail (kernels/common.cuh)
  covers every element once with aligned packs, for every dtype pair and offset (a host program).
- The exact-mode kernels' bit transpose (kernels/exact_pack.cuh) packs remainders into the bit planes of
  revdeq_kernels/exact and unpacks them again, for every m (a host program emulating a warp).
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers.cuda_cases import HOST_EXPECT, ROOT, load_cuda_check, run_host_program

ARCHS = ("sm_80", "sm_90")
KERNELS = ("affine_update_kernel", "residual_kernel", "multi_affine_kernel", "multi_residual_kernel")
# The (state, f) template arguments every kernel is instantiated for: tests/helpers/op_cases.py DTYPE_PAIRS.
PAIRS = ("double, double", "double, float", "double, __half", "double, __nv_bfloat16", "float, float",
         "float, __half", "float, __nv_bfloat16", "__half, __half", "__nv_bfloat16, __nv_bfloat16")
# Exact mode (fixed.cu): one kernel per f dtype, the state is always int64.
FIXED_KERNELS = ("relax_fixed_kernel", "unrelax_fixed_kernel")
F_TYPES = ("double", "float", "__half", "__nv_bfloat16")
EXPECTED_KERNELS = [f"{kernel}<{pair}>" for kernel in KERNELS for pair in PAIRS] + [
    f"{kernel}<{f}>" for kernel in FIXED_KERNELS for f in F_TYPES]
LAUNCHERS = ("pointwise.cpp", "exact.cpp", "multi.cpp")  # csrc/cuda/bindings/


cuda_check = load_cuda_check()
NVCC = cuda_check.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): "
                                "the CUDA kernels cannot be compiled on this machine")


def _cuda_include_dir():
    """The toolkit's include directory (nvcc on PATH may be a wrapper script outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def _syntax_check_launcher(launcher):
    """g++ -fsyntax-only on csrc/cuda/<launcher> with the flags the extension build gives it."""
    import torch.utils.cpp_extension as cpp_extension

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler"
    if _cuda_include_dir() is None:
        return None, "cuda_runtime.h not found (set CUDA_HOME)"
    # The CPU wheel ships the c10/cuda headers but not their generated cuda_cmake_macros.h, which
    # only sets Windows export macros; C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DREVDEQ_WITH_CUDA",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{os.path.join(ROOT, 'csrc')}"]
    for include in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], _cuda_include_dir()]:
        cmd += ["-isystem", include]
    cmd.append(os.path.join(ROOT, "csrc", "cuda", "bindings", launcher))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"


SPAN_CHECK = r"""
// Host-side check of plan_span / scalar_index / grid_for / dispatch_pair from csrc/cuda/kernels/common.cuh,
// on fake addresses (nothing is dereferenced and no CUDA call is made).
#include <cstdio>
#include <vector>

#include "cuda/kernels/common.cuh"

using namespace revdeq::cuda;
""" + HOST_EXPECT + r"""

template <typename S, typename F>
void check_pair(const char* name) {
  constexpr int P = kPackElems<S>;
  const int64_t sizes[] = {1, 2, 3, P - 1, P, P + 1, 2 * P + 3, 97, 1023, 4096};
  for (int s_off = 0; s_off < 2 * P; ++s_off) {
    for (int f_off = 0; f_off < 2 * P; ++f_off) {
      const S* s = reinterpret_cast<const S*>(uintptr_t(1) << 20) + s_off;
      const F* f = reinterpret_cast<const F*>(uintptr_t(1) << 24) + f_off;
      for (int64_t n : sizes) {
        if (n < 1) continue;
        const Span sp = plan_span(s, f, n);
        EXPECT(sp.n == n && sp.head >= 0 && sp.packs >= 0 && sp.head + sp.packs * P <= n,
               "%s off %d/%d n %lld: bad span head %lld packs %lld", name, s_off, f_off, (long long)n,
               (long long)sp.head, (long long)sp.packs);
        if (sp.packs > 0) {
          EXPECT(reinterpret_cast<uintptr_t>(s + sp.head) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(f + sp.head) % (P * sizeof(F)) == 0,
                 "%s off %d/%d n %lld: packs not aligned", name, s_off, f_off, (long long)n);
        }
        // Equal element offsets (x[1:] for both) can always be aligned by a head: they must vectorize.
        if (s_off == f_off && n >= 2 * P) {
          EXPECT(sp.packs > 0, "%s off %d n %lld: equal offsets did not vectorize", name, s_off, (long long)n);
        }
        std::vector<int> seen(n, 0);
        for (int64_t q = 0; q < sp.packs; ++q)
          for (int k = 0; k < P; ++k) ++seen[sp.head + q * P + k];
        for (int64_t j = 0; j < scalar_count<P>(sp); ++j) {
          const int64_t i = scalar_index<P>(sp, j);
          EXPECT(i >= 0 && i < n, "%s off %d/%d n %lld: scalar index %lld out of range", name, s_off, f_off,
                 (long long)n, (long long)i);
          if (i >= 0 && i < n) ++seen[i];
        }
        for (int64_t i = 0; i < n; ++i)
          EXPECT(seen[i] == 1, "%s off %d/%d n %lld: element %lld visited %d times", name, s_off, f_off,
                 (long long)n, (long long)i, seen[i]);
        const int grid = grid_for<S>(sp, 1056);
        EXPECT(grid >= 1 && grid <= 1056, "%s: grid %d", name, grid);
      }
    }
  }
  // More than 2^31 elements: 64-bit arithmetic throughout, at most 2P - 2 scalar elements.
  for (int64_t n : {(int64_t(1) << 31) + 5, (int64_t(1) << 40) + 3}) {
    const S* s = reinterpret_cast<const S*>(uintptr_t(1) << 20) + 1;
    const F* f = reinterpret_cast<const F*>(uintptr_t(1) << 24) + 1;
    const Span sp = plan_span(s, f, n);
    const int64_t tail = n - sp.head - sp.packs * P;
    EXPECT(tail >= 0 && scalar_count<P>(sp) <= 2 * P - 2 &&
           scalar_index<P>(sp, scalar_count<P>(sp) - 1) == (tail > 0 ? n - 1 : sp.head - 1),
           "%s n %lld: big span head %lld packs %lld", name, (long long)n, (long long)sp.head, (long long)sp.packs);
    EXPECT(grid_for<S>(sp, 1056) == 1056, "%s: big n must use every resident block", name);
  }
}

int main() {
  check_pair<double, double>("double/double");
  check_pair<double, float>("double/float");
  check_pair<double, __half>("double/half");
  check_pair<double, __nv_bfloat16>("double/bf16");
  check_pair<float, float>("float/float");
  check_pair<float, __half>("float/half");
  check_pair<float, __nv_bfloat16>("float/bf16");
  check_pair<__half, __half>("half/half");
  check_pair<__nv_bfloat16, __nv_bfloat16>("bf16/bf16");
  // dispatch_pair: exactly the nine supported pairs, each to the types of its enum values.
  const DType all[] = {DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const int bytes[] = {8, 4, 2, 2};
  int supported = 0;
  for (int si = 0; si < 4; ++si) {
    for (int fi = 0; fi < 4; ++fi) {
      int s_size = 0, f_size = 0;
      const cudaError_t err = dispatch_pair(all[si], all[fi], [&](auto s_tag, auto f_tag) {
        s_size = sizeof(typename decltype(s_tag)::type);
        f_size = sizeof(typename decltype(f_tag)::type);
        return cudaSuccess;
      });
      const bool want = si == fi || si == 0 || (si == 1 && fi >= 2);
      EXPECT((err == cudaSuccess) == want, "dispatch_pair(%d, %d) returned %d", si, fi, int(err));
      if (err == cudaSuccess) {
        ++supported;
        EXPECT(s_size == bytes[si] && f_size == bytes[fi], "dispatch_pair(%d, %d) gave sizes %d, %d", si, fi,
               s_size, f_size);
      }
    }
  }
  EXPECT(supported == 9, "dispatch_pair supports %d pairs, expected 9", supported);
  if (failures == 0) std::printf("span check OK\n");
  return failures == 0 ? 0 : 1;
}
"""


FIXED_PACK_CHECK = r"""
// Host-side check of csrc/cuda/kernels/exact_pack.cuh: a warp emulated lane by lane transposes bit matrices,
// packs a tile's remainders into the words revdeq_kernels/exact defines (bit b of element i
// in bit i % 32 of word [b, i / 32]), and unpacks them again, for every m.
#include <cstdio>
#include <random>

#include "cuda/kernels/exact_pack.cuh"

using namespace revdeq::cuda::exact_pack;
""" + HOST_EXPECT + r"""

// transpose_bits as the warp runs it: every lane takes each step with its partner's row.
static void transpose(uint32_t (&rows)[kLanes]) {
  for (int step = 0; step < 5; ++step) {
    uint32_t next[kLanes];
    for (int lane = 0; lane < kLanes; ++lane)
      next[lane] = transpose_step(rows[lane], rows[lane ^ (kLanes / 2 >> step)], lane, step);
    for (int lane = 0; lane < kLanes; ++lane) rows[lane] = next[lane];
  }
}

int main() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 256; ++trial) {
    uint32_t matrix[kLanes], t[kLanes];
    for (int l = 0; l < kLanes; ++l) t[l] = matrix[l] = rng();
    transpose(t);
    for (int k = 0; k < kLanes; ++k)
      for (int l = 0; l < kLanes; ++l)
        EXPECT(((t[k] >> l) & 1u) == ((matrix[l] >> k) & 1u), "trial %d: bit %d of column %d is wrong", trial, l, k);
    transpose(t);
    for (int l = 0; l < kLanes; ++l) EXPECT(t[l] == matrix[l], "trial %d: transposing twice changed row %d", trial, l);

    // A tile of remainders with m bits each; lane l of group g holds element 32 * g + l of the tile.
    const int m = 1 + trial % kPlanes;
    uint32_t r[kGroups][kLanes], rows[kLanes] = {};
    for (int g = 0; g < kGroups; ++g)
      for (int l = 0; l < kLanes; ++l) {
        r[g][l] = rng() & ((1u << m) - 1);
        rows[l] |= r[g][l] << row_bit(g, 0);
      }
    transpose(rows);
    for (int k = 0; k < kLanes; ++k) {
      const int plane = word_plane(k), group = word_group(k);
      uint32_t want = 0;  // word `group` of the tile in plane `plane`: bit l is bit plane of element 32 * group + l
      for (int l = 0; l < kLanes; ++l) want |= ((r[group][l] >> plane) & 1u) << l;
      EXPECT(rows[k] == want, "m=%d: lane %d holds %08x, want %08x (plane %d, group %d)", m, k, rows[k], want, plane,
             group);
      if (plane >= m) EXPECT(rows[k] == 0, "m=%d: lane %d holds bits of plane %d", m, k, plane);
    }
    transpose(rows);  // the inverse: lanes load their words and transpose back
    for (int g = 0; g < kGroups; ++g)
      for (int l = 0; l < kLanes; ++l)
        EXPECT(((rows[l] >> row_bit(g, 0)) & ((1u << kPlanes) - 1)) == r[g][l], "m=%d: element %d unpacked wrong", m,
               kLanes * g + l);
  }
  if (failures == 0) std::printf("fixed pack check OK\n");
  return failures == 0 ? 0 : 1;
}
"""


def _run_span_check(workdir):
    return run_host_program(NVCC, workdir, "span_check", SPAN_CHECK)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """All the compiles at once: they are independent and each is mostly one process."""
    workdir = str(tmp_path_factory.mktemp("cuda_build"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        report = pool.submit(cuda_check.check, "8.0;9.0", NVCC)
        launchers = {name: pool.submit(_syntax_check_launcher, name) for name in LAUNCHERS}
        span = pool.submit(_run_span_check, workdir)
        pack = pool.submit(run_host_program, NVCC, workdir, "fixed_pack_check", FIXED_PACK_CHECK)
        return {"report": report.result(), "span": span.result(), "pack": pack.result(),
                **{name: future.result() for name, future in launchers.items()}}


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    report = compiled["report"]
    table = cuda_check.format_report(report)
    assert not report.errors, table
    found = {(k.arch, k.name) for k in report.kernels}
    missing = [(arch, name) for arch in ARCHS for name in EXPECTED_KERNELS if (arch, name) not in found]
    assert not missing, f"kernels not found in the ptxas output: {missing}\n{table}"
    assert len(report.kernels) == len(ARCHS) * len(EXPECTED_KERNELS), table
    spilled = [f"{k.arch} {k.name}" for k in report.kernels if k.uses_local_memory]
    assert not spilled, f"kernels using local memory: {spilled}\n{table}"
    assert all(0 < k.registers <= 64 for k in report.kernels), table
    assert report.ok


def test_every_launcher_is_syntax_checked():
    # A new csrc/cuda/bindings/*.cpp must join LAUNCHERS, or CI would never compile it.
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "bindings", "*.cpp")))
    assert found == sorted(LAUNCHERS)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_compiles_against_torch_and_cuda_headers(compiled, launcher):
    rc, output = compiled[launcher]
    if rc is None:
        pytest.skip(f"cannot syntax-check the launcher: {output}")
    assert rc == 0, output


def test_span_plan_covers_every_element_once_with_aligned_packs(compiled):
    rc, output = compiled["span"]
    assert rc == 0 and "span check OK" in output, output


def test_fixed_pack_transposes_remainders_into_bit_planes(compiled):
    rc, output = compiled["pack"]
    assert rc == 0 and "fixed pack check OK" in output, output


def test_cuda_check_fails_on_a_spill(tmp_path):
    # The check must be able to fail: a kernel that needs far more registers than it may use spills.
    source = tmp_path / "spill.cu"
    source.write_text(
        "__global__ void __launch_bounds__(1024, 2) heavy(float* out, const float* in, int n) {\n"
        "  float acc[96];\n"
        "#pragma unroll\n"
        "  for (int k = 0; k < 96; ++k) acc[k] = in[(threadIdx.x * 97 + k) % n];\n"
        "  float s = 0.f;\n"
        "#pragma unroll\n"
        "  for (int r = 0; r < 8; ++r)\n"
        "#pragma unroll\n"
        "    for (int k = 0; k < 96; ++k) s += acc[k] * acc[(k * 7 + r) % 96];\n"
        "  out[threadIdx.x] = s;\n"
        "}\n")
    report = cuda_check.check("9.0", NVCC, [str(source)])
    assert not report.errors, report.errors
    assert [k.name for k in report.kernels] == ["heavy"]
    assert not report.ok and report.kernels[0].uses_local_memory, cuda_check.format_report(report)


def test_cuda_check_cli_exit_status():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_check.py"), "--archs", "banana"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "compute capabilities like '8.0;9.0'" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# csrc/common/fixed_point.h is shared with the CUDA kernels, which nvcc compiles without torch headers.

NVCC_KERNEL = r"""
#include "common/fixed_point.h"
using namespace revdeq::fixed;
// One thread per element; a warp packs each bit plane of its 32 remainders with one ballot.
__global__ void relax_fixed(int64_t* y, const float* f, unsigned* words, long long n, Coefficients c, int* status) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  int32_t flags = 0;
  const uint32_t r = i < n ? relax_element(y + i, f[i], c, &flags) : 0u;
  for (int b = 0; b < c.m; ++b) {
    const unsigned word = __ballot_sync(0xffffffffu, (r >> b) & 1u);
    if ((threadIdx.x & 31) == 0 && i < n) words[b * ((n + 31) / 32) + i / 32] = word;
  }
  if (flags) atomicOr(status, flags);
}
__global__ void unrelax_fixed(int64_t* y, const float* f, const unsigned* words, long long n, Coefficients c,
                              int* status) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t r = 0;
  for (int b = 0; b < c.m; ++b) r |= ((words[b * ((n + 31) / 32) + i / 32] >> (i % 32)) & 1u) << b;
  int32_t flags = 0;
  unrelax_element(y + i, f[i], r, c, &flags);
  if (flags) atomicOr(status, flags);
}
__global__ void inverse(int64_t* out, int64_t a) { *out = inverse_mod_2_64(a); }
"""


def test_fixed_point_header_compiles_with_nvcc_alone(tmp_path):
    source = tmp_path / "fixed_kernels.cu"
    source.write_text(NVCC_KERNEL)
    csrc = os.path.join(ROOT, "csrc")
    out = subprocess.run([NVCC, "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-I", csrc, "-c",
                          str(source), "-o", str(tmp_path / "fixed_kernels.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
