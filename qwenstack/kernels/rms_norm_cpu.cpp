// RMSNorm on CPU in one pass per row, with the rounding of the Python reference (models/layers.py):
//   h   = x * rsqrt(mean(x^2) + eps)       in float32
//   out = weight * dtype(h)                rounded to x's dtype   (Qwen3: weight multiplies the rounded h)
//   out = dtype(h * (1 + weight))          with zero_centered     (Qwen3-Next: the weight is an offset)
// Only the order of the float32 sum of squares differs from torch's. A decode step runs four norms per layer
// on single rows, where the eight small torch ops of the reference cost more than the arithmetic.
//
// Layout: x [A, B, D] or [B, D] with D contiguous and any other strides (q and k heads are strided views of
// the fused qkv output), weight [D]; out is a new contiguous tensor of x's shape and dtype.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
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

// One row of D elements: normalised and weighted into dst (D floats, each already rounded to T), with the
// reference's rounding. h is scratch of D floats.
template <typename T>
inline void norm_row(const T* row, const float* weight, int64_t D, double eps, bool zero_centered, float* h,
                     float* dst) {
  // W lanes at a time into two vector sums (the element-wise loop over eight partial sums ran at a third of this
  // speed in qk_norm_rope: the bfloat16 loads were not vectorised).
  vf acc0{}, acc1{};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    const vf a = load_vec(row + d), b = load_vec(row + d + W);
    std::memcpy(h + d, &a, sizeof a);
    std::memcpy(h + d + W, &b, sizeof b);
    acc0 += a * a;
    acc1 += b * b;
  }
  float sum = 0.f;
  for (; d < D; ++d) {
    const float v = to_float(row[d]);
    h[d] = v;
    sum += v * v;
  }
  sum += hsum(acc0 + acc1);
  const float inv = 1.f / std::sqrt(sum / float(D) + float(eps));
  // W lanes at a time with round_to (the same rounding as round_trip's scalar store, lane by lane: the scalar
  // loops, whose NaN branch kept the compiler from vectorising them, ran prefill's norms at ~1.2 G values/s).
  int64_t i = 0;
  if (zero_centered) {
    for (; i + W <= D; i += W)
      store_exact(round_to<T>(load_vec(h + i) * inv * (1.f + load_vec(weight + i))), dst + i);
    for (; i < D; ++i) dst[i] = round_trip<T>(h[i] * inv * (1.f + weight[i]));
  } else {
    for (; i + W <= D; i += W)
      store_exact(round_to<T>(load_vec(weight + i) * round_to<T>(load_vec(h + i) * inv)), dst + i);
    for (; i < D; ++i) dst[i] = round_trip<T>(weight[i] * round_trip<T>(h[i] * inv));
  }
}

// norm_row, stored to dst as T.
template <typename T>
inline void norm_row_to(const T* row, const float* weight, int64_t D, double eps, bool zero_centered, float* h,
                        float* y, T* dst) {
  norm_row(row, weight, D, eps, zero_centered, h, y);
  int64_t i = 0;
  for (; i + W <= D; i += W) store_exact(load_vec(y + i), dst + i);  // already rounded to T
  for (; i < D; ++i) store(y[i], dst + i);
}

template <typename T>
void run(const Tensor& x, const float* weight, double eps, bool zero_centered, Tensor& out) {
  const bool flat = x.dim() == 2;  // [B, D]: one A
  const int64_t A = flat ? 1 : x.size(0), B = x.size(flat ? 0 : 1), D = x.size(flat ? 1 : 2);
  const int64_t sa = flat ? 0 : x.stride(0), sb = x.stride(flat ? 0 : 1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const int64_t rows = A * B;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(D), y(D);
    for (int64_t r = begin; r < end; ++r) {
      norm_row_to(xp + (r / B) * sa + (r % B) * sb, weight, D, eps, zero_centered, h.data(), y.data(), op + r * D);
    }
  });
}

template <typename T>
void weight_to_float(const Tensor& w, std::vector<float>& out) {
  const T* p = static_cast<const T*>(w.const_data_ptr());
  for (size_t i = 0; i < out.size(); ++i) out[i] = to_float(p[i]);
}

std::vector<float> weight_floats(const Tensor& weight_in, int64_t D, const char* what) {
  STD_TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == D, what, " must be [D]");
  Tensor weight = as_contiguous(weight_in);
  std::vector<float> w(D);
  switch (weight.scalar_type()) {
    case ScalarType::Float: weight_to_float<float>(weight, w); break;
    case ScalarType::BFloat16: weight_to_float<Bf16>(weight, w); break;
    case ScalarType::Half: weight_to_float<Fp16>(weight, w); break;
    default: STD_TORCH_CHECK(false, what, " must be float32, bfloat16 or float16");
  }
  return w;
}

Tensor rms_norm(Tensor x, Tensor weight_in, double eps, bool zero_centered) {
  STD_TORCH_CHECK(x.is_cpu() && weight_in.is_cpu(), "rms_norm: CPU tensors only");
  STD_TORCH_CHECK(x.dim() == 3 || x.dim() == 2, "rms_norm: x must be [A, B, D] or [B, D]");
  const int64_t D = x.size(x.dim() - 1);
  STD_TORCH_CHECK(x.stride(x.dim() - 1) == 1 || D <= 1, "rms_norm: x must be contiguous along its last dimension");
  const std::vector<float> w = weight_floats(weight_in, D, "rms_norm: weight");
  Tensor out = x.dim() == 3 ? torch::stable::empty({x.size(0), x.size(1), D}, x.scalar_type(), std::nullopt, x.device())
                            : torch::stable::empty({x.size(0), D}, x.scalar_type(), std::nullopt, x.device());
  if (x.numel() == 0) return out;
  switch (x.scalar_type()) {
    case ScalarType::Float: run<float>(x, w.data(), eps, zero_centered, out); break;
    case ScalarType::BFloat16: run<Bf16>(x, w.data(), eps, zero_centered, out); break;
    case ScalarType::Half: run<Fp16>(x, w.data(), eps, zero_centered, out); break;
    default: STD_TORCH_CHECK(false, "rms_norm: x must be float32, bfloat16 or float16");
  }
  return out;
}

// A decoder layer's residual add and the norm after it in one pass over each row:
//   sum = T(x + delta)   (the reference's `x + delta` in x's dtype)
//   out = rms_norm(sum)  (as above)
// Layout: x and delta [R, D] with D contiguous and any row strides; returns new contiguous [R, D] sum and out.
template <typename T>
void run_add(const Tensor& x, const Tensor& delta, const float* weight, double eps, bool zero_centered,
             Tensor& sum, Tensor& out) {
  const int64_t R = x.size(0), D = x.size(1), sx = x.stride(0), sd = delta.stride(0);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* dp = static_cast<const T*>(delta.const_data_ptr());
  T* sp = static_cast<T*>(sum.mutable_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(D), y(D);
    for (int64_t r = begin; r < end; ++r) {
      const T* a = xp + r * sx;
      const T* b = dp + r * sd;
      T* s = sp + r * D;
      int64_t i = 0;
      for (; i + W <= D; i += W) store_rounded(load_vec(a + i) + load_vec(b + i), s + i);
      for (; i < D; ++i) store(to_float(a[i]) + to_float(b[i]), s + i);
      norm_row_to(s, weight, D, eps, zero_centered, h.data(), y.data(), op + r * D);
    }
  });
}

std::tuple<Tensor, Tensor> add_rms_norm(Tensor x, Tensor delta, Tensor weight_in, double eps, bool zero_centered) {
  STD_TORCH_CHECK(x.is_cpu() && delta.is_cpu() && weight_in.is_cpu(), "add_rms_norm: CPU tensors only");
  STD_TORCH_CHECK(x.dim() == 2 && delta.dim() == 2 && x.size(0) == delta.size(0) && x.size(1) == delta.size(1),
                  "add_rms_norm: x and delta must be [R, D] of one shape");
  STD_TORCH_CHECK(x.scalar_type() == delta.scalar_type(), "add_rms_norm: x and delta must share a dtype");
  const int64_t D = x.size(1);
  STD_TORCH_CHECK((x.stride(1) == 1 && delta.stride(1) == 1) || D <= 1,
                  "add_rms_norm: x and delta must be contiguous along their last dimension");
  const std::vector<float> w = weight_floats(weight_in, D, "add_rms_norm: weight");
  Tensor sum = torch::stable::empty({x.size(0), D}, x.scalar_type(), std::nullopt, x.device());
  Tensor out = torch::stable::empty({x.size(0), D}, x.scalar_type(), std::nullopt, x.device());
  if (x.numel() == 0) return {sum, out};
  switch (x.scalar_type()) {
    case ScalarType::Float: run_add<float>(x, delta, w.data(), eps, zero_centered, sum, out); break;
    case ScalarType::BFloat16: run_add<Bf16>(x, delta, w.data(), eps, zero_centered, sum, out); break;
    case ScalarType::Half: run_add<Fp16>(x, delta, w.data(), eps, zero_centered, sum, out); break;
    default: STD_TORCH_CHECK(false, "add_rms_norm: x must be float32, bfloat16 or float16");
  }
  return {sum, out};
}

// QK-norm then rotary embedding of one attention layer, in one call (models/layers.py Attention): each q
// head is normalised with q_weight and each k head with k_weight (norm_row above), then rotated over its
// first R channels (rotate-half) with the reference's rounding after every operation,
//   y = T(T(n * cos) + T(rotate_half(n) * sin)),
// and channels from R on pass through. A decode step otherwise spends about fourteen small torch ops per
// layer here (two norms, two rotations of six ops each).
// Layout: q [S, H, D] and k [S, KV, D] with D contiguous and any other strides (views of the fused
// projection), cos and sin [S, R] in q's dtype; returns new contiguous [S, H, D] and [S, KV, D].
template <typename T>
void run_qk(const Tensor& q, const Tensor& k, const float* qw, const float* kw, const Tensor& cos,
            const Tensor& sin, double eps, bool zero_centered, Tensor& q_out, Tensor& k_out) {
  const int64_t S = q.size(0), H = q.size(1), KV = k.size(1), D = q.size(2), R = cos.size(1), half = R / 2;
  const T* qp = static_cast<const T*>(q.const_data_ptr());
  const T* kp = static_cast<const T*>(k.const_data_ptr());
  const T* cp = static_cast<const T*>(cos.const_data_ptr());
  const T* sp = static_cast<const T*>(sin.const_data_ptr());
  T* qo = static_cast<T*>(q_out.mutable_data_ptr());
  T* ko = static_cast<T*>(k_out.mutable_data_ptr());
  const int64_t heads = H + KV;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  torch::stable::parallel_for(0, S * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(D), n(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / heads, head = r % heads;
      const T* src = head < H ? qp + t * q.stride(0) + head * q.stride(1) : kp + t * k.stride(0) + (head - H) * k.stride(1);
      norm_row(src, head < H ? qw : kw, D, eps, zero_centered, h.data(), n.data());
      const T* c = cp + t * cos.stride(0);
      const T* s = sp + t * sin.stride(0);
      T* dst = head < H ? qo + (t * H + head) * D : ko + (t * KV + head - H) * D;
      // W lanes of each half at a time where the half is whole vectors (Qwen3: 64 of 128), as the scalar loops
      // round them.
      int64_t i = 0;
      for (; half % W == 0 && i < half; i += W) {
        const vf a = load_vec(n.data() + i), b = load_vec(n.data() + i + half);
        store_rounded(round_to<T>(a * load_vec(c + i)) + round_to<T>(-b * load_vec(s + i)), dst + i);
        store_rounded(round_to<T>(b * load_vec(c + i + half)) + round_to<T>(a * load_vec(s + i + half)),
                      dst + i + half);
      }
      for (; i < half; ++i)
        store(round_trip<T>(n[i] * to_float(c[i])) + round_trip<T>(-n[i + half] * to_float(s[i])), dst + i);
      for (i = half + (half % W == 0 ? half : 0); i < R; ++i)
        store(round_trip<T>(n[i] * to_float(c[i])) + round_trip<T>(n[i - half] * to_float(s[i])), dst + i);
      for (i = R; i < D; ++i) store(n[i], dst + i);
    }
  });
}

std::tuple<Tensor, Tensor> qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos_in,
                                        Tensor sin_in, double eps, bool zero_centered) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && cos_in.is_cpu() && sin_in.is_cpu(), "qk_norm_rope: CPU tensors only");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "qk_norm_rope: q and k must be [S, heads, D]");
  const int64_t S = q.size(0), D = q.size(2);
  STD_TORCH_CHECK(k.size(0) == S && k.size(2) == D, "qk_norm_rope: k must be [S, kv_heads, D] like q");
  STD_TORCH_CHECK((q.stride(2) == 1 || D <= 1) && (k.stride(2) == 1 || D <= 1),
                  "qk_norm_rope: q and k must be contiguous along their last dimension");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && cos_in.scalar_type() == q.scalar_type() &&
                      sin_in.scalar_type() == q.scalar_type(), "qk_norm_rope: q, k, cos and sin must share a dtype");
  Tensor cos = as_contiguous(cos_in), sin = as_contiguous(sin_in);
  STD_TORCH_CHECK(cos.dim() == 2 && cos.size(0) == S && sin.dim() == 2 && sin.size(0) == S &&
                      sin.size(1) == cos.size(1) && cos.size(1) % 2 == 0 && cos.size(1) <= D,
                  "qk_norm_rope: cos and sin must be [S, R] with R even and at most D");
  const std::vector<float> qw = weight_floats(q_weight, D, "qk_norm_rope: q_weight");
  const std::vector<float> kw = weight_floats(k_weight, D, "qk_norm_rope: k_weight");
  Tensor q_out = torch::stable::empty({S, q.size(1), D}, q.scalar_type(), std::nullopt, q.device());
  Tensor k_out = torch::stable::empty({S, k.size(1), D}, q.scalar_type(), std::nullopt, q.device());
  if (S == 0 || D == 0) return {q_out, k_out};
  switch (q.scalar_type()) {
    case ScalarType::Float: run_qk<float>(q, k, qw.data(), kw.data(), cos, sin, eps, zero_centered, q_out, k_out);
      break;
    case ScalarType::BFloat16: run_qk<Bf16>(q, k, qw.data(), kw.data(), cos, sin, eps, zero_centered, q_out, k_out);
      break;
    case ScalarType::Half: run_qk<Fp16>(q, k, qw.data(), kw.data(), cos, sin, eps, zero_centered, q_out, k_out);
      break;
    default: STD_TORCH_CHECK(false, "qk_norm_rope: q must be float32, bfloat16 or float16");
  }
  return {q_out, k_out};
}

}  // namespace

#ifndef QWENSTACK_KERNEL_FUNCTIONS_ONLY  // decode_layer_cpu.cpp includes this file for its functions
STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool zero_centered) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps, bool zero_centered) -> (Tensor, Tensor)");
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps, "
        "bool zero_centered) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("rms_norm", TORCH_BOX(&rms_norm));
  m.impl("add_rms_norm", TORCH_BOX(&add_rms_norm));
  m.impl("qk_norm_rope", TORCH_BOX(&qk_norm_rope));
}
#endif
