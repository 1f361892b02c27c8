// Multi-tensor (tuple state) ops: the argument checks and the flat layout shared by the CPU and CUDA
// launchers (csrc/cpu/multi_cpu.cpp, csrc/cuda/multi_cuda.cpp). The schemas are in multi_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace revdeq {

// multi_relax_ / multi_unrelax_: a non-empty list of states and as many f values, each pair as for
// relax_ (messages name "states[i]" and "f_vals[i]"), one device, beta in (0, 2) other than 1, and
// no state overlapping itself, another state or an f value (exact for dense tensors).
void check_multi_pointwise(const char* op, at::TensorList states, at::TensorList f_vals, double beta,
                           c10::DeviceType device_type);

// multi_residual: a non-empty list of z and as many fz, each pair as for residual, one device.
void check_multi_residual(at::TensorList zs, at::TensorList fzs, c10::DeviceType device_type);

// float64 when any z is float64, float32 otherwise.
at::ScalarType multi_residual_dtype(at::TensorList zs);

// The non-empty pairs of a call as flat, element-aligned arrays: element k of primary[i] pairs with
// element k of secondary[i], as with_flat_layout (layout.h) arranges for one pair. Primaries that
// are not dense are replaced by contiguous copies; write_back() copies those results back.
struct FlatPairs {
  std::vector<at::Tensor> primary;
  std::vector<at::Tensor> secondary;
  std::vector<size_t> index;  // each pair's position in the caller's lists
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (caller's tensor, the copy used instead)

  void write_back() const;
};

FlatPairs flatten_pairs(at::TensorList primary, at::TensorList secondary);

}  // namespace revdeq
