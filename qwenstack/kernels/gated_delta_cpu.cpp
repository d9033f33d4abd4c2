// One decode step of the gated delta rule (Qwen3-Next's linear attention) on CPU, on the state where it lies:
// for each sequence b and value head h, with S = state[slots[b], h] ([Dk, Dv] float32, zero when fresh[b]),
//   q, k = l2norm(q), l2norm(k) (k head h / (Hv / Hk)), q /= sqrt(Dk)
//   S = exp(g) S;  delta = beta (v - S^T k);  S = S + k delta^T;  out = S^T q
// the math of models/linear_attention.py's recurrent_gated_delta_rule at T = 1, in float32.
//
// Why native: the torch form gathers each sequence's state (index_select), runs about eight elementwise
// passes and two reductions over it, and scatters it back (index_copy_). At 32 sequences of Qwen3-Next's
// 32 heads of 128 x 128 that is ~1 GB of memory traffic a layer; here each state is read once and written
// once, and the two passes between stay in the core's cache (64 KiB a head).
//
// Layout: q, k [B, Hk, Dk] and v [B, Hv, Dv], last dimension contiguous, any other strides (views of the
// projection); g [B, Hv] float32; beta [B, Hv]; state [S, Hv, Dk, Dv] float32 contiguous; slots [B] long,
// distinct; fresh [B] bool or empty (no sequence fresh). Returns out [B, Hv, Dv] in q's dtype.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr float L2NORM_EPS = 1e-6f;  // models/linear_attention.py's, inside the rsqrt

template <typename T>
void load_normalised(const T* src, int64_t n, float* dst) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = to_float(src[i]);
    sum += dst[i] * dst[i];
  }
  const float inv = 1.f / std::sqrt(sum + L2NORM_EPS);
  for (int64_t i = 0; i < n; ++i) dst[i] *= inv;
}

template <typename T>
float scalar_at(const Tensor& t, int64_t b, int64_t h) {
  return to_float(static_cast<const T*>(t.const_data_ptr())[b * t.stride(0) + h * t.stride(1)]);
}

// S [Dk, Dv] row-major: two passes, the first decays S and reads S^T k, the second writes k delta^T and
// reads S^T q. Dv is split into whole vectors and a scalar tail.
void step_head(float* S, int64_t Dk, int64_t Dv, bool fresh, float decay, float beta, const float* q,
               const float* k, const float* v, float* pred, float* out) {
  const int64_t vec_end = Dv - Dv % W;
  for (int64_t j = 0; j < Dv; ++j) pred[j] = 0.f;
  if (fresh) {
    for (int64_t i = 0; i < Dk * Dv; ++i) S[i] = 0.f;
  } else {
    const vf d = vf{} + decay;
    for (int64_t i = 0; i < Dk; ++i) {
      float* row = S + i * Dv;
      const vf ki = vf{} + k[i];
      int64_t j = 0;
      for (; j < vec_end; j += W) {
        vf s;
        std::memcpy(&s, row + j, sizeof s);
        s *= d;
        std::memcpy(row + j, &s, sizeof s);
        vf p;
        std::memcpy(&p, pred + j, sizeof p);
        p += s * ki;
        std::memcpy(pred + j, &p, sizeof p);
      }
      for (; j < Dv; ++j) {
        row[j] *= decay;
        pred[j] += row[j] * k[i];
      }
    }
  }
  for (int64_t j = 0; j < Dv; ++j) {
    pred[j] = (v[j] - pred[j]) * beta;  // now delta
    out[j] = 0.f;
  }
  for (int64_t i = 0; i < Dk; ++i) {
    float* row = S + i * Dv;
    const vf ki = vf{} + k[i], qi = vf{} + q[i];
    int64_t j = 0;
    for (; j < vec_end; j += W) {
      vf s, dl, o;
      std::memcpy(&s, row + j, sizeof s);
      std::memcpy(&dl, pred + j, sizeof dl);
      s += ki * dl;
      std::memcpy(row + j, &s, sizeof s);
      std::memcpy(&o, out + j, sizeof o);
      o += s * qi;
      std::memcpy(out + j, &o, sizeof o);
    }
    for (; j < Dv; ++j) {
      row[j] += k[i] * pred[j];
      out[j] += row[j] * q[i];
    }
  }
}

template <typename T, typename B>
void run(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, Tensor& state,
         const int64_t* slots, const bool* fresh, Tensor& out) {
  const int64_t Bn = q.size(0), Hk = q.size(1), Dk = q.size(2), Hv = v.size(1), Dv = v.size(2);
  const int64_t group = Hv / Hk;
  const float scale = std::sqrt(float(Dk));
  const T* qp = static_cast<const T*>(q.const_data_ptr());
  const T* kp = static_cast<const T*>(k.const_data_ptr());
  const T* vp = static_cast<const T*>(v.const_data_ptr());
  const float* gp = static_cast<const float*>(g.const_data_ptr());
  float* sp = static_cast<float*>(state.mutable_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  torch::stable::parallel_for(0, Bn * Hv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * Dk + 3 * Dv);
    float *qn = scratch.data(), *kn = qn + Dk, *vn = kn + Dk, *pred = vn + Dv, *o = pred + Dv;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hv, h = item % Hv, hk = h / group;
      load_normalised(qp + b * q.stride(0) + hk * q.stride(1), Dk, qn);
      for (int64_t i = 0; i < Dk; ++i) qn[i] /= scale;  // divide, as the reference does
      load_normalised(kp + b * k.stride(0) + hk * k.stride(1), Dk, kn);
      const T* vrow = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t j = 0; j < Dv; ++j) vn[j] = to_float(vrow[j]);
      const float decay = std::exp(gp[b * g.stride(0) + h * g.stride(1)]);
      float* S = sp + (slots[b] * Hv + h) * Dk * Dv;
      step_head(S, Dk, Dv, fresh != nullptr && fresh[b], decay, scalar_at<B>(beta, b, h), qn, kn, vn, pred, o);
      T* orow = op + (b * Hv + h) * Dv;
      for (int64_t j = 0; j < Dv; ++j) store(o[j], orow + j);
    }
  });
}

template <typename T>
void run_beta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, Tensor& state,
              const int64_t* slots, const bool* fresh, Tensor& out) {
  switch (beta.scalar_type()) {
    case ScalarType::Float: run<T, float>(q, k, v, g, beta, state, slots, fresh, out); break;
    case ScalarType::BFloat16: run<T, Bf16>(q, k, v, g, beta, state, slots, fresh, out); break;
    case ScalarType::Half: run<T, Fp16>(q, k, v, g, beta, state, slots, fresh, out); break;
    default: STD_TORCH_CHECK(false, "gated_delta_decode: beta must be float32, bfloat16 or float16");
  }
}

Tensor gated_delta_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state, Tensor slots,
                          Tensor fresh) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && g.is_cpu() && beta.is_cpu() && state.is_cpu() &&
                      slots.is_cpu() && fresh.is_cpu(),
                  "gated_delta_decode: CPU tensors only");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "gated_delta_decode: q, k, v must be 3-D");
  const int64_t Bn = q.size(0), Hk = q.size(1), Dk = q.size(2), Hv = v.size(1), Dv = v.size(2);
  STD_TORCH_CHECK(k.size(0) == Bn && k.size(1) == Hk && k.size(2) == Dk && v.size(0) == Bn,
                  "gated_delta_decode: q and k must be [B, Hk, Dk] and v [B, Hv, Dv]");
  STD_TORCH_CHECK(Hk > 0 && Hv % Hk == 0, "gated_delta_decode: Hv must be a multiple of Hk");
  STD_TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                  "gated_delta_decode: q, k, v must be contiguous along their last dimension");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "gated_delta_decode: q, k, v must share a dtype");
  STD_TORCH_CHECK(g.scalar_type() == ScalarType::Float && g.dim() == 2 && g.size(0) == Bn && g.size(1) == Hv,
                  "gated_delta_decode: g must be float32 [B, Hv]");
  STD_TORCH_CHECK(beta.dim() == 2 && beta.size(0) == Bn && beta.size(1) == Hv,
                  "gated_delta_decode: beta must be [B, Hv]");
  STD_TORCH_CHECK(state.scalar_type() == ScalarType::Float && state.dim() == 4 && state.size(1) == Hv &&
                      state.size(2) == Dk && state.size(3) == Dv && state.is_contiguous(),
                  "gated_delta_decode: state must be contiguous float32 [S, Hv, Dk, Dv]");
  STD_TORCH_CHECK(slots.scalar_type() == ScalarType::Long && slots.dim() == 1 && slots.size(0) == Bn &&
                      slots.is_contiguous(),
                  "gated_delta_decode: slots must be contiguous int64 [B]");
  STD_TORCH_CHECK(fresh.numel() == 0 || (fresh.scalar_type() == ScalarType::Bool && fresh.dim() == 1 &&
                                         fresh.size(0) == Bn && fresh.is_contiguous()),
                  "gated_delta_decode: fresh must be bool [B] or empty");
  const int64_t* slot = static_cast<const int64_t*>(slots.const_data_ptr());
  for (int64_t b = 0; b < Bn; ++b) {
    STD_TORCH_CHECK(slot[b] >= 0 && slot[b] < state.size(0), "gated_delta_decode: slot ", slot[b],
                    " is outside the state's ", state.size(0), " slots");
  }
  const bool* fresh_rows = fresh.numel() ? static_cast<const bool*>(fresh.const_data_ptr()) : nullptr;
  Tensor out = torch::stable::empty({Bn, Hv, Dv}, q.scalar_type(), std::nullopt, q.device());
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case ScalarType::Float: run_beta<float>(q, k, v, g, beta, state, slot, fresh_rows, out); break;
    case ScalarType::BFloat16: run_beta<Bf16>(q, k, v, g, beta, state, slot, fresh_rows, out); break;
    case ScalarType::Half: run_beta<Fp16>(q, k, v, g, beta, state, slot, fresh_rows, out); break;
    default: STD_TORCH_CHECK(false, "gated_delta_decode: q must be float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("gated_delta_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state, Tensor slots, "
        "Tensor fresh) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("gated_delta_decode", TORCH_BOX(&gated_delta_decode));
}
