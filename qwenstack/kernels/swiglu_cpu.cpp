// SwiGLU's activation on CPU in one pass, with the rounding of the Python reference (models/layers.py):
//   out = T(T(silu(gate)) * up),   silu(g) = g / (1 + exp(-g)) in float32
// for rows [gate | up] of the fused gate/up projection. The reference's split, silu and product are three
// torch ops and two full-size temporaries per layer; in a decode step they cost more than the arithmetic.
// exp is cpu_vec.h's polynomial (~2 ulp in float32), so a value can differ from torch's by one unit of T
// where the float32 result sits on a rounding boundary of T.
//
// Layout: gate_up [R, 2 * I] with its last dimension contiguous and any row stride; out a new [R, I].
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

template <typename T>
void run(const Tensor& gate_up, int64_t I, Tensor& out) {
  const int64_t R = gate_up.size(0), stride = gate_up.stride(0);
  const T* src = static_cast<const T*>(gate_up.const_data_ptr());
  T* dst = static_cast<T*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1));
  torch::stable::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(src + r * stride, I, dst + r * I);
  });
}

Tensor silu_mul(Tensor gate_up) {
  STD_TORCH_CHECK(gate_up.is_cpu(), "silu_mul: CPU tensors only");
  STD_TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [R, 2 * I]");
  STD_TORCH_CHECK(gate_up.stride(1) == 1 || gate_up.size(1) <= 1,
                  "silu_mul: gate_up must be contiguous along its last dimension");
  const int64_t I = gate_up.size(1) / 2;
  Tensor out = torch::stable::empty({gate_up.size(0), I}, gate_up.scalar_type(), std::nullopt, gate_up.device());
  if (out.numel() == 0) return out;
  switch (gate_up.scalar_type()) {
    case ScalarType::Float: run<float>(gate_up, I, out); break;
    case ScalarType::BFloat16: run<Bf16>(gate_up, I, out); break;
    case ScalarType::Half: run<Fp16>(gate_up, I, out); break;
    default: STD_TORCH_CHECK(false, "silu_mul: gate_up must be float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

#ifndef QWENSTACK_KERNEL_FUNCTIONS_ONLY  // decode_layer_cpu.cpp includes this file for its functions
STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("silu_mul", TORCH_BOX(&silu_mul));
}
#endif
