// RMSNorm on CPU in one pass per row, with the rounding of the Python reference (models/layers.py):
//   h   = x * rsqrt(mean(x^2) + eps)       in float32
//   out = weight * dtype(h)                rounded to x's dtype   (Qwen3: weight multiplies the rounded h)
//   out = dtype(h * (1 + weight))          with zero_centered     (Qwen3-Next: the weight is an offset)
// Only the order of the float32 sum of squares differs from torch's. A decode step runs four norms per layer
// on single rows, where the eight small torch ops of the reference cost more than the arithmetic.
//
// Layout: x [A, B, D] with D contiguous and any strides on A and B (q and k heads are strided views of the
// fused qkv output), weight [D]; out is a new contiguous [A, B, D] in x's dtype.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

template <typename T>
inline float round_trip(float v) {  // v rounded to T, back in float32
  T t;
  store(v, &t);
  return to_float(t);
}

template <typename T>
void run(const Tensor& x, const float* weight, double eps, bool zero_centered, Tensor& out) {
  const int64_t A = x.size(0), B = x.size(1), D = x.size(2);
  const int64_t sa = x.stride(0), sb = x.stride(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const int64_t rows = A * B;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(D);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + (r / B) * sa + (r % B) * sb;
      T* dst = op + r * D;
      // Eight partial sums let the compiler vectorise the reduction.
      float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        for (int j = 0; j < 8; ++j) {
          const float v = to_float(row[d + j]);
          h[d + j] = v;
          partial[j] += v * v;
        }
      float sum = 0.f;
      for (; d < D; ++d) {
        const float v = to_float(row[d]);
        h[d] = v;
        sum += v * v;
      }
      for (int j = 0; j < 8; ++j) sum += partial[j];
      const float inv = 1.f / std::sqrt(sum / float(D) + float(eps));
      if (zero_centered) {
        for (int64_t i = 0; i < D; ++i) store(h[i] * inv * (1.f + weight[i]), dst + i);
      } else {
        for (int64_t i = 0; i < D; ++i) store(weight[i] * round_trip<T>(h[i] * inv), dst + i);
      }
    }
  });
}

template <typename T>
void weight_to_float(const Tensor& w, std::vector<float>& out) {
  const T* p = static_cast<const T*>(w.const_data_ptr());
  for (size_t i = 0; i < out.size(); ++i) out[i] = to_float(p[i]);
}

Tensor rms_norm(Tensor x, Tensor weight_in, double eps, bool zero_centered) {
  STD_TORCH_CHECK(x.is_cpu() && weight_in.is_cpu(), "rms_norm: CPU tensors only");
  STD_TORCH_CHECK(x.dim() == 3, "rms_norm: x must be [A, B, D]");
  const int64_t D = x.size(2);
  STD_TORCH_CHECK(x.stride(2) == 1 || D <= 1, "rms_norm: x must be contiguous along its last dimension");
  STD_TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == D, "rms_norm: weight must be [D]");
  Tensor weight = torch::stable::contiguous(weight_in);
  std::vector<float> w(D);
  switch (weight.scalar_type()) {
    case ScalarType::Float: weight_to_float<float>(weight, w); break;
    case ScalarType::BFloat16: weight_to_float<Bf16>(weight, w); break;
    case ScalarType::Half: weight_to_float<Fp16>(weight, w); break;
    default: STD_TORCH_CHECK(false, "rms_norm: weight must be float32, bfloat16 or float16");
  }
  Tensor out = torch::stable::empty({x.size(0), x.size(1), D}, x.scalar_type(), std::nullopt, x.device());
  if (x.numel() == 0) return out;
  switch (x.scalar_type()) {
    case ScalarType::Float: run<float>(x, w.data(), eps, zero_centered, out); break;
    case ScalarType::BFloat16: run<Bf16>(x, w.data(), eps, zero_centered, out); break;
    case ScalarType::Half: run<Fp16>(x, w.data(), eps, zero_centered, out); break;
    default: STD_TORCH_CHECK(false, "rms_norm: x must be float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool zero_centered) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) { m.impl("rms_norm", TORCH_BOX(&rms_norm)); }
