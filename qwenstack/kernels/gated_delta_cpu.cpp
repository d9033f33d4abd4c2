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
//
// gated_delta_chunked: the gated delta rule over whole pieces of sequences (prefill), chunk by chunk of C tokens
// from each piece's start, per sequence and value head, on the state in place (models/linear_attention.py's
// chunk_gated_delta_rule_varlen). Within a chunk of L tokens starting from state S (ld = the cumulative sum of
// g from the chunk's start, A[i][j] = beta_i exp(ld_i - ld_j) k_i.k_j for j < i):
//   (I + A) U = beta v - beta exp(ld) k S     (forward substitution: the rows of U one after the other)
//   o_i = exp(ld_i) q_i S + sum_{j <= i} exp(ld_i - ld_j) (q_i.k_j) U_j
//   S = exp(ld_{L-1}) S + sum_j exp(ld_{L-1} - ld_j) k_j U_j^T
// with q, k l2-normalised and q multiplied by Dk^-0.5, all in float32. The same algebra as the torch form, which
// inverts (I + A) against the identity and runs each step over all heads and chunks of the batch as separate
// tensor passes (~30% of a Qwen3-Next prefill); here one head's chunk lives in L2 (~220 KiB at C = 64,
// D = 128) from its inputs to its outputs, and the products are register-blocked loops.
// Layout (gated_delta_chunked): q, k [T, Hk, Dk] and v [T, Hv, Dv], last dimension contiguous; g [T, Hv] float32;
// beta [T, Hv]; starts [B + 1] long (sequence offsets into T, rising from 0 to T); state [B, Hv, Dk, Dv] float32
// contiguous, each sequence's starting state, updated in place to its final state; out [T, Hv, Dv] in q's
// dtype.
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

// src[0..n) as float32 in dst, times `scale` / its L2 norm (eps inside the root).
template <typename T>
void load_normalised(const T* src, int64_t n, float* dst, float scale = 1.f) {
  const int64_t vec_end = n - n % W;
  vf sums{};
  for (int64_t i = 0; i < vec_end; i += W) {
    const vf x = load_vec(src + i);
    store_exact(x, dst + i);
    sums += x * x;
  }
  float sum = 0.f;
  for (int64_t i = 0; i < W; ++i) sum += sums[i];
  for (int64_t i = vec_end; i < n; ++i) {
    dst[i] = to_float(src[i]);
    sum += dst[i] * dst[i];
  }
  const float inv = scale / std::sqrt(sum + L2NORM_EPS);
  for (int64_t i = 0; i < n; ++i) dst[i] *= inv;
}

// n values of src as float32 times `scale` into dst, and the reverse: float32 values rounded to T.
template <typename T>
void load_scaled(const T* src, int64_t n, float scale, float* dst) {
  int64_t i = 0;
  for (; i + W <= n; i += W) store_exact(load_vec(src + i) * scale, dst + i);
  for (; i < n; ++i) dst[i] = to_float(src[i]) * scale;
}

template <typename T>
void store_rounded(const float* src, int64_t n, T* dst) {
  int64_t i = 0;
  for (; i + W <= n; i += W) store_rounded(load_vec(src + i), dst + i);
  for (; i < n; ++i) store(src[i], dst + i);
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

// C[M][N] += A[M][K] B[K][N], float32: A[i][k] at A[i * lda + k * ka] (ka = 1 row-major; lda = 1 reads A's
// transpose as it lies), B's and C's rows at strides ldb, ldc and contiguous. R rows and NV vectors of C a pass,
// so that each vector of B loaded serves R rows and each element of A NV vectors.
struct MatA {
  const float* p;
  int64_t lda, ka = 1;
  float at(int64_t i, int64_t k) const { return p[i * lda + k * ka]; }
};

template <int64_t R, int64_t NV>
inline void gemm_block(int64_t i, int64_t n, int64_t K, const MatA& A, const float* B, int64_t ldb, float* C,
                       int64_t ldc) {
  vf acc[R][NV];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t x = 0; x < NV; ++x) acc[r][x] = load_vec(C + (i + r) * ldc + n + x * W);
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int64_t x = 0; x < NV; ++x) b[x] = load_vec(B + k * ldb + n + x * W);
    for (int64_t r = 0; r < R; ++r) {
      const float a = A.at(i + r, k);
      for (int64_t x = 0; x < NV; ++x) acc[r][x] += a * b[x];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t x = 0; x < NV; ++x) store_exact(acc[r][x], C + (i + r) * ldc + n + x * W);
}

template <int64_t R>
inline void gemm_rows(int64_t i, int64_t N, int64_t K, const MatA& A, const float* B, int64_t ldb, float* C,
                      int64_t ldc) {
  constexpr int64_t NV = 4;
  int64_t n = 0;
  for (; n + NV * W <= N; n += NV * W) gemm_block<R, NV>(i, n, K, A, B, ldb, C, ldc);
  for (; n + W <= N; n += W) gemm_block<R, 1>(i, n, K, A, B, ldb, C, ldc);
  for (; n < N; ++n) {
    for (int64_t r = 0; r < R; ++r) {
      float sum = C[(i + r) * ldc + n];
      for (int64_t k = 0; k < K; ++k) sum += A.at(i + r, k) * B[k * ldb + n];
      C[(i + r) * ldc + n] = sum;
    }
  }
}

void gemm_acc(int64_t M, int64_t N, int64_t K, const MatA& A, const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) gemm_rows<4>(i, N, K, A, B, ldb, C, ldc);
  for (; i < M; ++i) gemm_rows<1>(i, N, K, A, B, ldb, C, ldc);
}

// The forward substitution's blocks: rows solved one by one within a block, earlier blocks as one product.
constexpr int64_t SOLVE_ROWS = 16;

// One head's buffers for a chunk of up to C tokens (rows of Dk or Dv floats, or of C).
struct ChunkScratch {
  int64_t C, Dk, Dv;
  std::vector<float> data;
  float *q, *k, *w, *u, *out, *kt, *a, *p, *ld, *beta, *decay;
  // (ld and decay padded to whole vectors: the decays are taken W at a time)
  ChunkScratch(int64_t C_, int64_t Dk_, int64_t Dv_) : C(C_), Dk(Dk_), Dv(Dv_) {
    const int64_t padded = (C + W - 1) / W * W;
    data.assign(3 * C * Dk + 2 * C * Dv + Dk * C + 2 * C * C + 3 * padded, 0.f);
    float* at = data.data();
    for (float** part : {&q, &k, &w}) *part = at, at += C * Dk;
    for (float** part : {&u, &out}) *part = at, at += C * Dv;
    kt = at, at += Dk * C;
    for (float** part : {&a, &p}) *part = at, at += C * C;
    for (float** part : {&ld, &beta, &decay}) *part = at, at += padded;
  }
};

// Where one head's chunk reads its inputs and writes its outputs: the first token's row of each, and the
// strides from one token to the next.
template <typename T, typename B>
struct ChunkRows {
  const T *q, *k, *v;
  const float* g;
  const B* beta;
  T* out;
  int64_t q_t, k_t, v_t, g_t, beta_t, out_t;
};

// L tokens of one value head on its state S [Dk, Dv].
template <typename T, typename B>
void chunk_head(ChunkScratch& s, int64_t L, const ChunkRows<T, B>& in, float* S) {
  const int64_t C = s.C, Dk = s.Dk, Dv = s.Dv;
  const float q_scale = 1.f / std::sqrt(float(Dk));  // multiplied, as the chunked torch form does
  float log_decay = 0.f;
  for (int64_t i = 0; i < L; ++i) {
    load_normalised(in.q + i * in.q_t, Dk, s.q + i * Dk, q_scale);
    load_normalised(in.k + i * in.k_t, Dk, s.k + i * Dk);
    log_decay += in.g[i * in.g_t];
    s.ld[i] = log_decay;
    s.beta[i] = to_float(in.beta[i * in.beta_t]);
  }
  const float last = s.ld[L - 1];
  for (int64_t d = 0; d < Dk; ++d)  // (written in order, read across rows: the reads are the cheaper side)
    for (int64_t i = 0; i < L; ++i) s.kt[d * C + i] = s.k[i * Dk + d];
  // a = k k^T and p = q k^T (rows of C), then their decays: a strictly below the diagonal, negated and times
  // beta_i (the substitution subtracts), p on and below it.
  std::fill(s.a, s.a + L * C, 0.f);
  std::fill(s.p, s.p + L * C, 0.f);
  gemm_acc(L, L, Dk, {s.k, Dk}, s.kt, C, s.a, C);
  gemm_acc(L, L, Dk, {s.q, Dk}, s.kt, C, s.p, C);
  // (the decays of row i as vectors: exp_vec over W pairs at a time)
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j <= i; j += W) store_exact(exp_vec(s.ld[i] - load_vec(s.ld + j)), s.decay + j);
    for (int64_t j = 0; j < L; ++j) {
      const float decay = j <= i ? s.decay[j] : 0.f;
      s.a[i * C + j] = j < i ? -s.beta[i] * decay * s.a[i * C + j] : 0.f;
      s.p[i * C + j] *= decay;
    }
  }
  // Right-hand sides: u = beta v, w = -beta exp(ld) k; then u_i += a_i u, w_i += a_i w over the rows before i:
  // SOLVE_ROWS rows at a time, the rows of earlier blocks as one product, then row by row within the block.
  for (int64_t i = 0; i < L; ++i) {
    const float b = s.beta[i], wk = -b * std::exp(s.ld[i]);
    load_scaled(in.v + i * in.v_t, Dv, b, s.u + i * Dv);
    for (int64_t d = 0; d < Dk; ++d) s.w[i * Dk + d] = wk * s.k[i * Dk + d];
  }
  for (int64_t i0 = 0; i0 < L; i0 += SOLVE_ROWS) {
    const int64_t rows = std::min(SOLVE_ROWS, L - i0);
    gemm_acc(rows, Dv, i0, {s.a + i0 * C, C}, s.u, Dv, s.u + i0 * Dv, Dv);
    gemm_acc(rows, Dk, i0, {s.a + i0 * C, C}, s.w, Dk, s.w + i0 * Dk, Dk);
    for (int64_t i = i0 + 1; i < i0 + rows; ++i) {
      gemm_acc(1, Dv, i - i0, {s.a + i * C + i0, C}, s.u + i0 * Dv, Dv, s.u + i * Dv, Dv);
      gemm_acc(1, Dk, i - i0, {s.a + i * C + i0, C}, s.w + i0 * Dk, Dk, s.w + i * Dk, Dk);
    }
  }
  gemm_acc(L, Dv, Dk, {s.w, Dk}, S, Dv, s.u, Dv);  // u = u_local - w_local S
  // out = exp(ld) q S + p u: q's rows decayed in place (q is not needed after).
  for (int64_t i = 0; i < L; ++i) {
    const float decay = std::exp(s.ld[i]);
    for (int64_t d = 0; d < Dk; ++d) s.q[i * Dk + d] *= decay;
  }
  std::fill(s.out, s.out + L * Dv, 0.f);
  gemm_acc(L, Dv, Dk, {s.q, Dk}, S, Dv, s.out, Dv);
  gemm_acc(L, Dv, L, {s.p, C}, s.u, Dv, s.out, Dv);
  for (int64_t i = 0; i < L; ++i) store_rounded(s.out + i * Dv, Dv, in.out + i * in.out_t);
  // S = exp(ld_last) S + kd^T u, kd_j = exp(ld_last - ld_j) k_j (into w, free now), read as its transpose.
  for (int64_t j = 0; j < L; ++j) {
    const float write = std::exp(last - s.ld[j]);
    for (int64_t d = 0; d < Dk; ++d) s.w[j * Dk + d] = write * s.k[j * Dk + d];
  }
  const float chunk_decay = std::exp(last);
  for (int64_t x = 0; x < Dk * Dv; ++x) S[x] *= chunk_decay;
  gemm_acc(Dk, Dv, L, {s.w, 1, Dk}, s.u, Dv, S, Dv);
}

template <typename T, typename B>
void run_chunked(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                 const std::vector<int64_t>& starts, int64_t C, Tensor& state, Tensor& out) {
  const int64_t Hk = q.size(1), Dk = q.size(2), Hv = v.size(1), Dv = v.size(2), group = Hv / Hk;
  const int64_t Bn = int64_t(starts.size()) - 1;
  // Sizes and strides read once: each read of one is a call through torch's stable ABI.
  const int64_t q_t = q.stride(0), q_h = q.stride(1), k_t = k.stride(0), k_h = k.stride(1);
  const int64_t v_t = v.stride(0), v_h = v.stride(1), g_t = g.stride(0), g_h = g.stride(1);
  const int64_t beta_t = beta.stride(0), beta_h = beta.stride(1);
  const T* qp = static_cast<const T*>(q.const_data_ptr());
  const T* kp = static_cast<const T*>(k.const_data_ptr());
  const T* vp = static_cast<const T*>(v.const_data_ptr());
  const float* gp = static_cast<const float*>(g.const_data_ptr());
  const B* bp = static_cast<const B*>(beta.const_data_ptr());
  float* sp = static_cast<float*>(state.mutable_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  torch::stable::parallel_for(0, Bn * Hv, 1, [&](int64_t begin, int64_t end) {
    ChunkScratch scratch(C, Dk, Dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hv, h = item % Hv, hk = h / group;
      float* S = sp + (b * Hv + h) * Dk * Dv;
      for (int64_t t = starts[b]; t < starts[b + 1]; t += C) {
        const ChunkRows<T, B> rows{qp + t * q_t + hk * q_h, kp + t * k_t + hk * k_h, vp + t * v_t + h * v_h,
                                   gp + t * g_t + h * g_h, bp + t * beta_t + h * beta_h, op + (t * Hv + h) * Dv,
                                   q_t, k_t, v_t, g_t, beta_t, Hv * Dv};
        chunk_head(scratch, std::min(C, starts[b + 1] - t), rows, S);
      }
    }
  });
}

template <typename T>
void run_chunked_beta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                      const std::vector<int64_t>& starts, int64_t C, Tensor& state, Tensor& out) {
  switch (beta.scalar_type()) {
    case ScalarType::Float: run_chunked<T, float>(q, k, v, g, beta, starts, C, state, out); break;
    case ScalarType::BFloat16: run_chunked<T, Bf16>(q, k, v, g, beta, starts, C, state, out); break;
    case ScalarType::Half: run_chunked<T, Fp16>(q, k, v, g, beta, starts, C, state, out); break;
    default: STD_TORCH_CHECK(false, "gated_delta_chunked: beta must be float32, bfloat16 or float16");
  }
}

Tensor gated_delta_chunked(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor starts_in, Tensor state,
                           int64_t chunk_size) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && g.is_cpu() && beta.is_cpu() && state.is_cpu() &&
                      starts_in.is_cpu(), "gated_delta_chunked: CPU tensors only");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "gated_delta_chunked: q, k, v must be 3-D");
  const int64_t T_ = q.size(0), Hk = q.size(1), Dk = q.size(2), Hv = v.size(1), Dv = v.size(2);
  STD_TORCH_CHECK(k.size(0) == T_ && k.size(1) == Hk && k.size(2) == Dk && v.size(0) == T_,
                  "gated_delta_chunked: q and k must be [T, Hk, Dk] and v [T, Hv, Dv]");
  STD_TORCH_CHECK(Hk > 0 && Hv % Hk == 0, "gated_delta_chunked: Hv must be a multiple of Hk");
  STD_TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                  "gated_delta_chunked: q, k, v must be contiguous along their last dimension");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "gated_delta_chunked: q, k, v must share a dtype");
  STD_TORCH_CHECK(g.scalar_type() == ScalarType::Float && g.dim() == 2 && g.size(0) == T_ && g.size(1) == Hv,
                  "gated_delta_chunked: g must be float32 [T, Hv]");
  STD_TORCH_CHECK(beta.dim() == 2 && beta.size(0) == T_ && beta.size(1) == Hv,
                  "gated_delta_chunked: beta must be [T, Hv]");
  STD_TORCH_CHECK(chunk_size > 0, "gated_delta_chunked: chunk_size must be positive");
  STD_TORCH_CHECK(starts_in.scalar_type() == ScalarType::Long && starts_in.dim() == 1 && starts_in.size(0) >= 2 &&
                      starts_in.is_contiguous(), "gated_delta_chunked: starts must be contiguous int64 [B + 1]");
  const int64_t* sp = static_cast<const int64_t*>(starts_in.const_data_ptr());
  std::vector<int64_t> starts(sp, sp + starts_in.size(0));
  STD_TORCH_CHECK(starts.front() == 0 && starts.back() == T_ && std::is_sorted(starts.begin(), starts.end()),
                  "gated_delta_chunked: starts must rise from 0 to T = ", T_);
  const int64_t Bn = int64_t(starts.size()) - 1;
  STD_TORCH_CHECK(state.scalar_type() == ScalarType::Float && state.dim() == 4 && state.size(0) == Bn &&
                      state.size(1) == Hv && state.size(2) == Dk && state.size(3) == Dv && state.is_contiguous(),
                  "gated_delta_chunked: state must be contiguous float32 [B, Hv, Dk, Dv]");
  Tensor out = torch::stable::empty({T_, Hv, Dv}, q.scalar_type(), std::nullopt, q.device());
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case ScalarType::Float: run_chunked_beta<float>(q, k, v, g, beta, starts, chunk_size, state, out); break;
    case ScalarType::BFloat16: run_chunked_beta<Bf16>(q, k, v, g, beta, starts, chunk_size, state, out); break;
    case ScalarType::Half: run_chunked_beta<Fp16>(q, k, v, g, beta, starts, chunk_size, state, out); break;
    default: STD_TORCH_CHECK(false, "gated_delta_chunked: q must be float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("conv_decode(Tensor x, Tensor weight, Tensor(a!) conv_state, Tensor slots, Tensor fresh) -> Tensor");
  m.def("gated_delta_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor(a!) state, Tensor slots, "
        "Tensor fresh) -> Tensor");
  m.def("gated_delta_chunked(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor starts, Tensor(a!) state, "
        "int chunk_size) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("conv_decode", TORCH_BOX(&conv_decode));
  m.impl("gated_delta_decode", TORCH_BOX(&gated_delta_decode));
  m.impl("gated_delta_chunked", TORCH_BOX(&gated_delta_chunked));
}
