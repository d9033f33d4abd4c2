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
// One pass per row: a sorted list of the best k seen so far, and a vector compare of every 16 logits against its
// smallest; the few that beat it are inserted. On a row of V logits in random order about k ln(V / k) of them are
// inserted (~180 for k = 20 of 152K), so the pass is the compares, bound by reading the row. Rows are spread over
// torch's threads.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// NaN above everything, as torch.topk orders it; a key that sorts floats with NaN largest.
inline float order_key(float v) { return std::isnan(v) ? std::numeric_limits<float>::infinity() : v; }

// The best k so far, kept sorted: values descending, ties by ascending id. `floor` is the k-th value once k
// are held (-inf before), the one a candidate must reach: ids arrive in ascending order, so a later id equal
// to the floor loses the tie and is skipped.
struct Best {
  std::vector<float> value;  // order keys (NaN as +inf); the true values are read back by id at the end
  std::vector<int64_t> id;
  int64_t k;
  float floor = -std::numeric_limits<float>::infinity();

  explicit Best(int64_t k_) : k(k_) {
    value.reserve(k + 1);
    id.reserve(k + 1);
  }

  void offer(float key, int64_t i) {
    if (int64_t(value.size()) == k && !(key > floor)) return;
    // After every held value >= key (ties keep the earlier id first).
    const auto at = std::upper_bound(value.begin(), value.end(), key, [](float a, float b) { return a > b; });
    const auto pos = at - value.begin();
    value.insert(at, key);
    id.insert(id.begin() + pos, i);
    if (int64_t(value.size()) > k) {
      value.pop_back();
      id.pop_back();
    }
    if (int64_t(value.size()) == k) floor = value.back();
  }
};

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

// Lanes of x that may enter: above the floor, or NaN (a comparison with NaN is false both ways).
inline vi entering(vf x, float floor) { return (x > floor) | (x != x); }

template <typename T>
void top_k_row(const T* row, int64_t V, int64_t k, float* values, int64_t* ids) {
  Best best(k);
  int64_t i = 0;
  for (; i < std::min(V, k); ++i) best.offer(order_key(to_float(row[i])), i);
  auto offer_vector = [&](vf x, int64_t at) {
    const vi enter = entering(x, best.floor);
    if (!any_lane(enter)) return;
    for (int64_t j = 0; j < W; ++j) {
      if (enter[j]) best.offer(order_key(x[j]), at + j);  // the floor may rise after each: offer checks again
    }
  };
  // Four vectors a check: once the floor has risen, almost none of them holds a candidate.
  for (; i + 4 * W <= V; i += 4 * W) {
    const vf a = load_vec(row + i), b = load_vec(row + i + W), c = load_vec(row + i + 2 * W),
             d = load_vec(row + i + 3 * W);
    const float floor = best.floor;
    if (!any_lane(entering(a, floor) | entering(b, floor) | entering(c, floor) | entering(d, floor))) continue;
    offer_vector(a, i);
    offer_vector(b, i + W);
    offer_vector(c, i + 2 * W);
    offer_vector(d, i + 3 * W);
  }
  for (; i + W <= V; i += W) offer_vector(load_vec(row + i), i);
  for (; i < V; ++i) best.offer(order_key(to_float(row[i])), i);
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = best.id[j];
    values[j] = to_float(row[best.id[j]]);
  }
}

template <typename T>
void run(const Tensor& logits, int64_t k, Tensor& values, Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const T* src = static_cast<const T*>(logits.const_data_ptr());
  float* out_values = static_cast<float*>(values.mutable_data_ptr());
  int64_t* out_ids = static_cast<int64_t*>(ids.mutable_data_ptr());
  torch::stable::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) top_k_row(src + r * stride, V, k, out_values + r * k, out_ids + r * k);
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
