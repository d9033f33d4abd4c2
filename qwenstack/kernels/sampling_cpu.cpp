// The k largest logits of each row, for the sampler's top-k rows (engine/sampler.py sample_drawn_rows):
//   top_k_rows(logits [R, V] float32 / bfloat16 / float16, k) -> (values [R, k] float32, ids [R, k] int64)
// each row's values in descending order, equal values by ascending id (a fixed order, where torch.topk's on ties
// is unspecified). NaN is taken as the largest value (as torch.topk orders it), so a row of NaN logits still
// fails where the sampler checks its weights. k must be 1 to V.
//
// Why: Qwen3's generation_config samples with top_k 20, so every chat request that keeps the model's defaults
// takes this path; torch.topk over 16 rows of 152K float32 logits took 3.5 ms (14 ms of a 64-row decode step,
// whose greedy form takes ~140), after a float32 copy of the logits it does not need here.
//
// Two vector passes per row (top_k_row: a floor from the chunks' maxima, then the logits above it), whatever the
// order of the row; rows are spread over torch's threads.
//
// And the whole-row softmax of the rows without top-k, from the logits as the model gave them (no float32 copy
// of 152K values a row, no temporaries):
//   softmax_draw_rows(logits [R, V], temperatures [R] float32, uniforms [R] float64) -> ids [R] int64
//     each row's token drawn from softmax(logits / t) by inverse transform, draw_rows' rule (engine/sampler.py):
//     the first index whose running sum of the weights exceeds u x the row's total, over blocks of DRAW_BLOCK
//     tokens and then inside the chosen one, sums in float64 across blocks; a zero weight is never taken. -1
//     for a row without a finite maximum or with a NaN (the caller takes the torch path for it).
//   logsumexp_rows(logits [R, V], temperatures [R] float32) -> [R] float32: log sum exp(x / t) (NaN or -inf as
//     torch's logsumexp gives them, for the same rows).
// A weight is exp(x / t - max) by cpu_vec.h's exp_vec (~2 ulp), zero below exp(-87) (torch's float32 exp gives
// denormals or zero there: under 1e-38 of the most likely token's weight). Three passes over a drawn row (the
// maximum, the blocks' sums, the chosen block), two for a log mass. 64 rows of 152K bfloat16 logits at
// temperature 1: see benchmarks/RESULTS.md (s26).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using Candidate = std::pair<float, int64_t>;  // (order key: NaN as +inf, id)

// Higher first; equal values by the smaller id.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// Logits as order keys, W lanes: NaN as +inf.
inline vf keys_of(vf x) { return x == x ? x : vf{} + std::numeric_limits<float>::infinity(); }

// Whether any lane of a comparison's result is set.
inline bool any_lane(vi m) {
#if defined(__AVX512F__)
  __m512i v;
  std::memcpy(&v, &m, sizeof v);
  return _mm512_test_epi32_mask(v, v) != 0;
#else
  bool any = false;
  for (int64_t j = 0; j < W; ++j) any |= m[j] != 0;
  return any;
#endif
}

constexpr int64_t CHUNK = 4 * W;  // logits per chunk maximum (64 with AVX-512)

// Two passes over the row. The maximum of each chunk of CHUNK logits, and the k-th largest of those maxima: k
// distinct logits are at least that large, so it is a floor under the k-th largest logit. Then every logit at or
// above the floor is a candidate, read only from the chunks whose maximum reaches the floor, and the candidates
// are ordered. Whatever the order of the row, the first pass is a vector max and the second reads about k chunks
// (a random row, or one in ascending order); a running list of the best k had cost O(k) for every new best, which
// a row in ascending order makes every logit.
template <typename T>
void top_k_row(const T* row, int64_t V, int64_t k, float* values, int64_t* ids, std::vector<float>& maxima,
               std::vector<float>& ordered, std::vector<Candidate>& candidates) {
  const int64_t chunks = V / CHUNK;
  maxima.resize(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    const T* at = row + c * CHUNK;
    vf m = keys_of(load_vec(at));
    for (int64_t v = 1; v < CHUNK / W; ++v) {
      const vf x = keys_of(load_vec(at + v * W));
      m = m > x ? m : x;
    }
    maxima[c] = hmax(m);
  }
  float floor = -std::numeric_limits<float>::infinity();  // every logit is a candidate when chunks < k
  if (k == 1 && chunks > 0) {  // greedy rows: the largest maximum, no selection among them
    floor = *std::max_element(maxima.begin(), maxima.end());
  } else if (chunks >= k) {
    ordered.assign(maxima.begin(), maxima.end());
    std::nth_element(ordered.begin(), ordered.begin() + (k - 1), ordered.end(), std::greater<float>());
    floor = ordered[k - 1];
  }
  candidates.clear();
  for (int64_t c = 0; c < chunks; ++c) {
    if (maxima[c] < floor) continue;
    for (int64_t i = c * CHUNK; i < (c + 1) * CHUNK; i += W) {
      const vf x = keys_of(load_vec(row + i));
      const vi taken = x >= floor;
      if (!any_lane(taken)) continue;
      for (int64_t j = 0; j < W; ++j) {
        if (taken[j]) candidates.emplace_back(x[j], i + j);
      }
    }
  }
  for (int64_t i = chunks * CHUNK; i < V; ++i) {
    const float x = to_float(row[i]);
    const float key = std::isnan(x) ? std::numeric_limits<float>::infinity() : x;
    if (key >= floor) candidates.emplace_back(key, i);
  }
  std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(), better);
  std::sort(candidates.begin(), candidates.begin() + k, better);
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = candidates[j].second;
    values[j] = to_float(row[ids[j]]);
  }
}

// body(row 0 of x as float, Bf16 or Fp16 by x's dtype, the row stride, begin, end) over ranges of x's rows spread
// over torch's threads (each range's body keeps its own scratch).
template <typename Body>
void over_rows(const Tensor& x, const char* what, Body body) {
  const int64_t R = x.size(0), stride = x.stride(0);
  auto spread = [&](const auto* src) {
    torch::stable::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) { body(src, stride, begin, end); });
  };
  switch (x.scalar_type()) {
    case ScalarType::Float: spread(static_cast<const float*>(x.const_data_ptr())); break;
    case ScalarType::BFloat16: spread(static_cast<const Bf16*>(x.const_data_ptr())); break;
    case ScalarType::Half: spread(static_cast<const Fp16*>(x.const_data_ptr())); break;
    default: STD_TORCH_CHECK(false, what, ": logits must be float32, bfloat16 or float16");
  }
}

std::tuple<Tensor, Tensor> top_k_rows(Tensor logits, int64_t k) {
  STD_TORCH_CHECK(logits.is_cpu(), "top_k_rows: CPU tensors only");
  STD_TORCH_CHECK(logits.dim() == 2, "top_k_rows: logits must be [rows, vocab]");
  STD_TORCH_CHECK(k >= 1 && k <= logits.size(1), "top_k_rows: k must be 1 to the row length ", logits.size(1));
  Tensor x = logits.stride(1) == 1 ? logits : as_contiguous(logits);
  Tensor values = torch::stable::empty({x.size(0), k}, ScalarType::Float, std::nullopt, x.device());
  Tensor ids = torch::stable::empty({x.size(0), k}, ScalarType::Long, std::nullopt, x.device());
  if (x.size(0) == 0) return {values, ids};
  const int64_t V = x.size(1);
  float* out_values = static_cast<float*>(values.mutable_data_ptr());
  int64_t* out_ids = static_cast<int64_t*>(ids.mutable_data_ptr());
  over_rows(x, "top_k_rows", [&](const auto* src, int64_t stride, int64_t begin, int64_t end) {
    std::vector<float> maxima, ordered;
    std::vector<Candidate> candidates;
    for (int64_t r = begin; r < end; ++r) {
      top_k_row(src + r * stride, V, k, out_values + r * k, out_ids + r * k, maxima, ordered, candidates);
    }
  });
  return {values, ids};
}

// ---------------------------------------------------------------------------------------------------------
// Whole-row softmax: draws and log masses.

constexpr int64_t DRAW_BLOCK = 1024;  // engine/sampler.py's DRAW_BLOCK

// The row's largest logit; nan set where one is NaN.
template <typename T>
float row_max(const T* row, int64_t V, bool& nan) {
  vf m = vf{} - std::numeric_limits<float>::infinity();
  vi bad{};
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const vf x = load_vec(row + i);
    bad |= x != x;
    m = m > x ? m : x;
  }
  float best = hmax(m);
  nan = any_lane(bad);
  for (; i < V; ++i) {
    const float x = to_float(row[i]);
    nan |= std::isnan(x);
    best = std::max(best, x);
  }
  return best;
}

// Weights exp(x / t - m) of W logits, zero below exp(-87).
inline vf weights_of(vf x, float t, float m) {
  const vf d = x / t - m;
  const vf e = exp_vec(d);
  return d < -87.0f ? vf{} : e;
}

inline float weight_of(float x, float t, float m) {
  const float d = x / t - m;
  return d < -87.0f ? 0.f : std::exp(d);
}

// The sum of the weights of row[begin, end).
template <typename T>
float weight_sum(const T* row, int64_t begin, int64_t end, float t, float m) {
  vf acc0{}, acc1{};
  int64_t i = begin;
  for (; i + 2 * W <= end; i += 2 * W) {
    acc0 += weights_of(load_vec(row + i), t, m);
    acc1 += weights_of(load_vec(row + i + W), t, m);
  }
  float sum = hsum(acc0 + acc1);
  for (; i < end; ++i) sum += weight_of(to_float(row[i]), t, m);
  return sum;
}

// Each DRAW_BLOCK block's sum of weights into sums (float64), and their total.
template <typename T>
double block_masses(const T* row, int64_t V, float t, float m, std::vector<double>& sums) {
  const int64_t blocks = (V + DRAW_BLOCK - 1) / DRAW_BLOCK;
  sums.resize(blocks);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sums[b] = weight_sum(row, b * DRAW_BLOCK, std::min(V, (b + 1) * DRAW_BLOCK), t, m);
    total += sums[b];
  }
  return total;
}

template <typename T>
int64_t draw_row(const T* row, int64_t V, float t, double u, std::vector<double>& sums) {
  bool nan = false;
  const float top = row_max(row, V, nan);
  if (nan || !std::isfinite(top)) return -1;
  const float m = top / t;  // the largest of the scaled logits: x / t rounds monotonically for t > 0
  const double target = u * block_masses(row, V, t, m, sums);
  const int64_t blocks = int64_t(sums.size());
  double before = 0.0;
  int64_t b = 0;
  for (; b + 1 < blocks && before + sums[b] <= target; ++b) before += sums[b];
  const double left = std::max(target - before, 0.0);
  double running = 0.0;
  int64_t last = -1;  // the block's last token with weight, for a `left` rounding put past the block's sum
  for (int64_t i = b * DRAW_BLOCK; i < std::min(V, (b + 1) * DRAW_BLOCK); ++i) {
    const float w = weight_of(to_float(row[i]), t, m);
    if (w <= 0.f) continue;
    running += w;
    last = i;
    if (running > left) return i;
  }
  return last;
}

template <typename T>
float logsumexp_row(const T* row, int64_t V, float t, std::vector<double>& sums) {
  bool nan = false;
  const float top = row_max(row, V, nan);
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(top)) return top / t;  // -inf for a row of -inf (+inf for one holding +inf), as torch
  const float m = top / t;
  return m + float(std::log(block_masses(row, V, t, m, sums)));
}

Tensor checked_rows(const Tensor& logits, const Tensor& temperatures, const char* what) {
  STD_TORCH_CHECK(logits.is_cpu() && temperatures.is_cpu(), what, ": CPU tensors only");
  STD_TORCH_CHECK(logits.dim() == 2, what, ": logits must be [rows, vocab]");
  STD_TORCH_CHECK(temperatures.dim() == 1 && temperatures.size(0) == logits.size(0) &&
                      temperatures.scalar_type() == ScalarType::Float,
                  what, ": temperatures must be float32 [rows]");
  return logits.stride(1) == 1 ? logits : as_contiguous(logits);
}

Tensor softmax_draw_rows(Tensor logits, Tensor temperatures_in, Tensor uniforms_in) {
  Tensor x = checked_rows(logits, temperatures_in, "softmax_draw_rows");
  STD_TORCH_CHECK(uniforms_in.is_cpu() && uniforms_in.dim() == 1 && uniforms_in.size(0) == x.size(0) &&
                      uniforms_in.scalar_type() == ScalarType::Double,
                  "softmax_draw_rows: uniforms must be float64 [rows]");
  Tensor temperatures = as_contiguous(temperatures_in), uniforms = as_contiguous(uniforms_in);
  Tensor ids = torch::stable::empty({x.size(0)}, ScalarType::Long, std::nullopt, x.device());
  if (x.size(0) == 0) return ids;
  STD_TORCH_CHECK(x.size(1) > 0, "softmax_draw_rows: rows must not be empty");
  const float* t = static_cast<const float*>(temperatures.const_data_ptr());
  const double* u = static_cast<const double*>(uniforms.const_data_ptr());
  int64_t* out = static_cast<int64_t*>(ids.mutable_data_ptr());
  const int64_t V = x.size(1);
  over_rows(x, "softmax_draw_rows", [&](const auto* src, int64_t stride, int64_t begin, int64_t end) {
    std::vector<double> sums;
    for (int64_t r = begin; r < end; ++r) out[r] = draw_row(src + r * stride, V, t[r], u[r], sums);
  });
  return ids;
}

Tensor logsumexp_rows(Tensor logits, Tensor temperatures_in) {
  Tensor x = checked_rows(logits, temperatures_in, "logsumexp_rows");
  Tensor temperatures = as_contiguous(temperatures_in);
  Tensor out = torch::stable::empty({x.size(0)}, ScalarType::Float, std::nullopt, x.device());
  if (x.size(0) == 0) return out;
  const float* t = static_cast<const float*>(temperatures.const_data_ptr());
  float* o = static_cast<float*>(out.mutable_data_ptr());
  const int64_t V = x.size(1);
  over_rows(x, "logsumexp_rows", [&](const auto* src, int64_t stride, int64_t begin, int64_t end) {
    std::vector<double> sums;
    for (int64_t r = begin; r < end; ++r) o[r] = logsumexp_row(src + r * stride, V, t[r], sums);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("top_k_rows(Tensor logits, int k) -> (Tensor, Tensor)");
  m.def("softmax_draw_rows(Tensor logits, Tensor temperatures, Tensor uniforms) -> Tensor");
  m.def("logsumexp_rows(Tensor logits, Tensor temperatures) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("top_k_rows", TORCH_BOX(&top_k_rows));
  m.impl("softmax_draw_rows", TORCH_BOX(&softmax_draw_rows));
  m.impl("logsumexp_rows", TORCH_BOX(&logsumexp_rows));
}
