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

template <typename T>
void run(const Tensor& logits, int64_t k, Tensor& values, Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const T* src = static_cast<const T*>(logits.const_data_ptr());
  float* out_values = static_cast<float*>(values.mutable_data_ptr());
  int64_t* out_ids = static_cast<int64_t*>(ids.mutable_data_ptr());
  torch::stable::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> maxima, ordered;
    std::vector<Candidate> candidates;
    for (int64_t r = begin; r < end; ++r) {
      top_k_row(src + r * stride, V, k, out_values + r * k, out_ids + r * k, maxima, ordered, candidates);
    }
  });
}

std::tuple<Tensor, Tensor> top_k_rows(Tensor logits, int64_t k) {
  STD_TORCH_CHECK(logits.is_cpu(), "top_k_rows: CPU tensors only");
  STD_TORCH_CHECK(logits.dim() == 2, "top_k_rows: logits must be [rows, vocab]");
  STD_TORCH_CHECK(k >= 1 && k <= logits.size(1), "top_k_rows: k must be 1 to the row length ", logits.size(1));
  Tensor x = logits.stride(1) == 1 ? logits : as_contiguous(logits);
  Tensor values = torch::stable::empty({x.size(0), k}, ScalarType::Float, std::nullopt, x.device());
  Tensor ids = torch::stable::empty({x.size(0), k}, ScalarType::Long, std::nullopt, x.device());
  if (x.size(0) == 0) return {values, ids};
  switch (x.scalar_type()) {
    case ScalarType::Float: run<float>(x, k, values, ids); break;
    case ScalarType::BFloat16: run<Bf16>(x, k, values, ids); break;
    case ScalarType::Half: run<Fp16>(x, k, values, ids); break;
    default: STD_TORCH_CHECK(false, "top_k_rows: logits must be float32, bfloat16 or float16");
  }
  return {values, ids};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("top_k_rows(Tensor logits, int k) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("top_k_rows", TORCH_BOX(&top_k_rows));
}
