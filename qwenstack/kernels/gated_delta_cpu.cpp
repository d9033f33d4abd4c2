// A Gated DeltaNet decode step (Qwen3-Next's linear attention) on CPU, on the state slots where they lie: the
// two halves of models/linear_attention.py's decode forms, one token per sequence.
//
// conv_decode: the depthwise causal conv1d + SiLU (causal_conv1d at T = 1). For sequence b and channel c,
// with the window w = [conv_state[slots[b], c, :], x[b, c]] (the state zero when fresh[b]):
//   y[b, c] = silu(round(sum_k w[k] weight[c, k]))   (sums in float32, rounded to weight's dtype, as conv1d)
// and the slot then holds the window's last K - 1 inputs.
//
// gated_delta_decode: the gated delta rule's step (recurrent_gated_delta_rule at T = 1), in float32. For each
// sequence b and value head h, with S = state[slots[b], h] ([Dk, Dv], zero when fresh[b]),
//   q, k = l2norm(q), l2norm(k) (k head h / (Hv / Hk)), q /= sqrt(Dk)
//   S = exp(g) S;  delta = beta (v - S^T k);  S = S + k delta^T;  out = S^T q
//
// Why native: the torch forms gather each sequence's state (index_select), pass over it several times and
// scatter it back (index_copy_). At 32 sequences of Qwen3-Next's 32 heads of 128 x 128 that was ~1 GB of
// memory traffic a layer for the recurrence; here each state is read once and written once, and the two
// passes between stay in the core's cache (64 KiB a head). The conv's conv1d call cost ~3 ms a layer at 32
// sequences for 1M multiply-adds.
//
// Layout (gated_delta_decode): q, k [B, Hk, Dk] and v [B, Hv, Dv], last dimension contiguous, any other
// strides (views of the projection); g [B, Hv] float32; beta [B, Hv]; state [S, Hv, Dk, Dv] float32
// contiguous; out [B, Hv, Dv] in q's dtype. (conv_decode): x [B, C], channels contiguous; weight [C, K]
// contiguous; conv_state [S, C, K - 1] contiguous, x's dtype; y [B, C] in x's dtype. Both: slots [B] long,
// distinct, checked inside the pool before anything is written; fresh [B] bool or empty (none fresh).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr float L2NORM_EPS = 1e-6f;  // models/linear_attention.py's, inside the rsqrt
constexpr int64_t CONV_CHANNELS = 1024;  // conv_decode's work item: this many channels of one sequence

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
        const vf s = load_vec(row + j) * d;
        store_exact(s, row + j);
        store_exact(load_vec(pred + j) + s * ki, pred + j);
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
      const vf s = load_vec(row + j) + ki * load_vec(pred + j);
      store_exact(s, row + j);
      store_exact(load_vec(out + j) + s * qi, out + j);
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
  // Sizes and strides read once: each read of one is a call through torch's stable ABI.
  const int64_t Bn = q.size(0), Hk = q.size(1), Dk = q.size(2), Hv = v.size(1), Dv = v.size(2);
  const int64_t group = Hv / Hk;
  const int64_t q_b = q.stride(0), q_h = q.stride(1), k_b = k.stride(0), k_h = k.stride(1);
  const int64_t v_b = v.stride(0), v_h = v.stride(1), g_b = g.stride(0), g_h = g.stride(1);
  const int64_t beta_b = beta.stride(0), beta_h = beta.stride(1);
  const float scale = std::sqrt(float(Dk));
  const B* betap = static_cast<const B*>(beta.const_data_ptr());
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
      load_normalised(qp + b * q_b + hk * q_h, Dk, qn);
      for (int64_t i = 0; i < Dk; ++i) qn[i] /= scale;  // divide, as the reference does
      load_normalised(kp + b * k_b + hk * k_h, Dk, kn);
      const T* vrow = vp + b * v_b + h * v_h;
      for (int64_t j = 0; j < Dv; ++j) vn[j] = to_float(vrow[j]);
      const float decay = std::exp(gp[b * g_b + h * g_h]);
      float* S = sp + (slots[b] * Hv + h) * Dk * Dv;
      step_head(S, Dk, Dv, fresh != nullptr && fresh[b], decay, to_float(betap[b * beta_b + h * beta_h]), qn, kn,
                vn, pred, o);
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

// KT: the kernel size where it is known when compiling (Qwen3-Next's 4: the window then lives in registers),
// 0 for any other.
template <typename T, typename Wt, int64_t KT>
void run_conv(const Tensor& x, const Tensor& weight, Tensor& conv_state, const int64_t* slots, const bool* fresh,
              Tensor& y) {
  // Sizes and strides read once: each read of one is a call through torch's stable ABI.
  const int64_t Bn = x.size(0), C = x.size(1), K = KT ? KT : weight.size(1), keep = K - 1, x_stride = x.stride(0);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const Wt* wp = static_cast<const Wt*>(weight.const_data_ptr());
  T* sp = static_cast<T*>(conv_state.mutable_data_ptr());
  T* yp = static_cast<T*>(y.mutable_data_ptr());
  // Work items of CONV_CHANNELS channels of one sequence: a division per item, not per channel.
  const int64_t blocks = (C + CONV_CHANNELS - 1) / CONV_CHANNELS;
  torch::stable::parallel_for(0, Bn * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> heap_window(KT ? 0 : K), sums(CONV_CHANNELS);
    float fixed_window[KT ? KT : 1];
    float* window = KT ? fixed_window : heap_window.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c_begin = item % blocks * CONV_CHANNELS;
      const int64_t c_end = std::min(C, c_begin + CONV_CHANNELS), n = c_end - c_begin;
      const bool zero = fresh != nullptr && fresh[b];
      T* states = sp + slots[b] * C * keep;
      // The sums channel by channel (the state moves along as it is read), then SiLU on whole vectors.
      for (int64_t c = c_begin; c < c_end; ++c) {
        T* st = states + c * keep;
        for (int64_t i = 0; i < keep; ++i) window[i] = zero ? 0.f : to_float(st[i]);
        window[keep] = to_float(xp[b * x_stride + c]);
        float acc = 0.f;
        for (int64_t i = 0; i < K; ++i) acc += window[i] * to_float(wp[c * K + i]);
        sums[c - c_begin] = acc;
        for (int64_t i = 0; i < keep; ++i) store(window[i + 1], st + i);
      }
      T* y_row = yp + b * C + c_begin;
      int64_t j = 0;
      for (; j + W <= n; j += W) {  // conv1d's output in the weight's dtype, F.silu on it in the same dtype
        const vf v = round_to<Wt>(load_vec(sums.data() + j));
        const vf act = round_to<Wt>(v / (1.f + exp_vec(vf{} - v)));
        if constexpr (std::is_same_v<T, Wt>) {
          store_exact(act, y_row + j);
        } else {
          for (int64_t i = 0; i < W; ++i) store(act[i], y_row + j + i);
        }
      }
      for (; j < n; ++j) {
        Wt conv, act;
        store(sums[j], &conv);
        const float v = to_float(conv);
        store(v / (1.f + std::exp(-v)), &act);
        store(to_float(act), y_row + j);
      }
    }
  });
}

template <typename T>
void run_conv_weight(const Tensor& x, const Tensor& weight, Tensor& conv_state, const int64_t* slots,
                     const bool* fresh, Tensor& y) {
  const bool four = weight.size(1) == 4;
  switch (weight.scalar_type()) {
    case ScalarType::Float:
      (four ? run_conv<T, float, 4> : run_conv<T, float, 0>)(x, weight, conv_state, slots, fresh, y);
      break;
    case ScalarType::BFloat16:
      (four ? run_conv<T, Bf16, 4> : run_conv<T, Bf16, 0>)(x, weight, conv_state, slots, fresh, y);
      break;
    case ScalarType::Half:
      (four ? run_conv<T, Fp16, 4> : run_conv<T, Fp16, 0>)(x, weight, conv_state, slots, fresh, y);
      break;
    default: STD_TORCH_CHECK(false, "conv_decode: weight must be float32, bfloat16 or float16");
  }
}

// slots [B] long inside a pool of `pool` slots, fresh [B] bool or empty: checked, then as pointers.
std::pair<const int64_t*, const bool*> slot_rows(const char* op, const Tensor& slots, const Tensor& fresh,
                                                 int64_t B, int64_t pool) {
  STD_TORCH_CHECK(slots.is_cpu() && fresh.is_cpu(), op, ": CPU tensors only");
  STD_TORCH_CHECK(slots.scalar_type() == ScalarType::Long && slots.dim() == 1 && slots.size(0) == B &&
                      slots.is_contiguous(),
                  op, ": slots must be contiguous int64 [B]");
  STD_TORCH_CHECK(fresh.numel() == 0 || (fresh.scalar_type() == ScalarType::Bool && fresh.dim() == 1 &&
                                         fresh.size(0) == B && fresh.is_contiguous()),
                  op, ": fresh must be bool [B] or empty");
  const int64_t* slot = static_cast<const int64_t*>(slots.const_data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    STD_TORCH_CHECK(slot[b] >= 0 && slot[b] < pool, op, ": slot ", slot[b], " is outside the state's ", pool,
                    " slots");
  }
  return {slot, fresh.numel() ? static_cast<const bool*>(fresh.const_data_ptr()) : nullptr};
}

Tensor conv_decode(Tensor x, Tensor weight, Tensor conv_state, Tensor slots, Tensor fresh) {
  STD_TORCH_CHECK(x.is_cpu() && weight.is_cpu() && conv_state.is_cpu(), "conv_decode: CPU tensors only");
  STD_TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "conv_decode: x must be [B, C], channels contiguous");
  const int64_t Bn = x.size(0), C = x.size(1);
  STD_TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.size(1) >= 1 && weight.is_contiguous(),
                  "conv_decode: weight must be contiguous [C, K]");
  const int64_t K = weight.size(1);
  STD_TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(1) == C && conv_state.size(2) == K - 1 &&
                      conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type(),
                  "conv_decode: conv_state must be contiguous [S, C, K - 1] in x's dtype");
  const auto [slot, fresh_rows] = slot_rows("conv_decode", slots, fresh, Bn, conv_state.size(0));
  Tensor y = torch::stable::empty({Bn, C}, x.scalar_type(), std::nullopt, x.device());
  if (y.numel() == 0) return y;
  switch (x.scalar_type()) {
    case ScalarType::Float: run_conv_weight<float>(x, weight, conv_state, slot, fresh_rows, y); break;
    case ScalarType::BFloat16: run_conv_weight<Bf16>(x, weight, conv_state, slot, fresh_rows, y); break;
    case ScalarType::Half: run_conv_weight<Fp16>(x, weight, conv_state, slot, fresh_rows, y); break;
    default: STD_TORCH_CHECK(false, "conv_decode: x must be float32, bfloat16 or float16");
  }
  return y;
}

Tensor gated_delta_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state, Tensor slots,
                          Tensor fresh) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && g.is_cpu() && beta.is_cpu() && state.is_cpu(),
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
  const auto [slot, fresh_rows] = slot_rows("gated_delta_decode", slots, fresh, Bn, state.size(0));
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
  m.def("conv_decode(Tensor x, Tensor weight, Tensor(a!) conv_state, Tensor slots, Tensor fresh) -> Tensor");
  m.def("gated_delta_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state, Tensor slots, "
        "Tensor fresh) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("conv_decode", TORCH_BOX(&conv_decode));
  m.impl("gated_delta_decode", TORCH_BOX(&gated_delta_decode));
}
