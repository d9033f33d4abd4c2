// Paged decode attention on CPU: one query token per sequence attends to its cached keys and values, read
// in place from the paged pool through the block table (no gather copy).
//
// Layout (same as qwenstack/models/attention.py):
//   q            [B, q_heads, head_dim]                           float32 / bfloat16 / float16
//   kv_cache     [2, num_blocks, block_size, kv_heads, head_dim]  float32 / bfloat16 / float16, head_dim contiguous
//   block_tables [B, max_blocks] int32 / int64, context_lens [B] int32 / int64
//   out          [B, q_heads, head_dim] in q's dtype
// Query head h reads kv head h / (q_heads / kv_heads) (grouped-query attention): the group of query heads
// of one kv head shares every key and value row loaded. Scores and sums are float32, with an online
// softmax rescaled once per block.
//
// Work items are (sequence, range of kv heads). With many sequences an item is a whole sequence, so its
// blocks stream from memory front to back; with few, the kv heads are split to give every thread work.
// Threads come from torch's parallel_for (torch.set_num_threads applies) and take items longest-first from
// a shared counter, so sequences of different lengths balance.
//
// SIMD: GCC/Clang generic vectors as wide as the build flags allow (16 floats with AVX-512, 8 with AVX2,
// 4 otherwise: SSE2, NEON; see qwenstack/kernels/__init__.py), so the code has no per-ISA intrinsics except
// the float16 conversion. Wider-than-native vectors are not used: GCC lowers some of their operations
// (a scalar times a vector) through the stack. head_dim must be a multiple of 16.
//
// Written against torch's stable C++ API (torch/csrc/stable, torch >= 2.10): its headers are a fraction
// of ATen's, which keeps the one-time build short, and its parallel_for is at::parallel_for.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

#if defined(__AVX512F__)
constexpr int64_t W = 16;  // floats per vector
#elif defined(__AVX2__)
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));

struct Bf16 { uint16_t bits; };
struct Fp16 { uint16_t bits; };

// W consecutive elements of a row as float32, in memory order.
inline vf load_vec(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 2W consecutive elements of a cache row as two float32 vectors. The lane order may differ from memory
// order (bfloat16 splits even and odd elements: a shift and a mask, no shuffles); queries are loaded with
// query_row<T> and outputs written with output_row<T> in the same order, so dot products and weighted
// sums are unaffected. A head_dim that is an odd multiple of W ends with one load_vec in memory order.
inline void load_pair(const float* p, vf& a, vf& b) {
  a = load_vec(p);
  b = load_vec(p + W);
}

inline void load_pair(const Bf16* p, vf& a, vf& b) {
  vu u;
  std::memcpy(&u, p, sizeof u);
  a = (vf)(u << 16);           // elements 0, 2, 4, ...
  b = (vf)(u & 0xFFFF0000u);  // elements 1, 3, 5, ...
}

inline vf load_vec(const Bf16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

inline vf load_vec(const Fp16* p) {
  vf v;
#if defined(__AVX512F__)
  __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &x, sizeof v);
#elif defined(__AVX2__) && defined(__F16C__)
  __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &x, sizeof v);
#else
  for (int64_t i = 0; i < W; ++i) v[i] = c10::detail::fp16_ieee_to_fp32_value(p[i].bits);
#endif
  return v;
}

inline void load_pair(const Fp16* p, vf& a, vf& b) {
  a = load_vec(p);
  b = load_vec(p + W);
}

// Rows of C vectors (head_dim = W * C) in that lane order: a cache row, a query row (float32, times
// scale) and an output row (float32, times inv).
template <typename T>
inline void load_row(const T* p, vf* out, int64_t C) {
  int64_t c = 0;
  for (; c + 1 < C; c += 2) load_pair(p + c * W, out[c], out[c + 1]);
  if (c < C) out[c] = load_vec(p + c * W);
}

template <typename T>
inline void query_row(const float* p, float scale, vf* out, int64_t C) {
  load_row(p, out, C);
  if constexpr (std::is_same_v<T, Bf16>) {
    for (int64_t c = 0; c + 1 < C; c += 2) {
      for (int64_t i = 0; i < W; ++i) out[c][i] = p[c * W + 2 * i], out[c + 1][i] = p[c * W + 2 * i + 1];
    }
  }
  for (int64_t c = 0; c < C; ++c) out[c] *= scale;
}

template <typename T>
inline void output_row(const vf* acc, float inv, float* p, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const vf o = acc[c] * inv;
    std::memcpy(p + c * W, &o, sizeof o);
  }
  if constexpr (std::is_same_v<T, Bf16>) {
    for (int64_t c = 0; c + 1 < C; c += 2) {
      for (int64_t i = 0; i < W; ++i) p[c * W + 2 * i] = acc[c][i] * inv, p[c * W + 2 * i + 1] = acc[c + 1][i] * inv;
    }
  }
}

inline float hsum(vf v) {
  vf4 s{};
  for (int64_t i = 0; i < W / 4; ++i) {
    vf4 quarter;
    std::memcpy(&quarter, reinterpret_cast<const char*>(&v) + i * sizeof quarter, sizeof quarter);
    s += quarter;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// exp(x) for x <= 0 (scores minus their running max), ~2 ulp: Cephes' expf polynomial on W lanes.
inline vf exp_nonpositive(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;  // below that exp underflows; -87 keeps 2^n a normal float
  const vf t = x * 1.44269504088896341f;
  const vi n = __builtin_convertvector(t - 0.5f, vi);  // round to nearest (t <= 0)
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  return p * (vf)((n + 127) << 23);
}

struct Geometry {
  int64_t group, head_dim, block_size, padded_block;  // padded_block: block_size rounded up to W
  int64_t block_stride, token_stride, head_stride;    // kv_cache strides of dims 1, 2, 3 (elements)
};

// Per-thread state for one item: for each of its query heads, the running max, sum and weighted sum of
// values, and the scores of the current block.
struct Scratch {
  std::vector<vf> acc, key;  // [heads * group * C], [C]
  std::vector<float> scores;  // [heads * group * padded_block]
  std::vector<float> m, l;    // [heads * group]
  Scratch(const Geometry& g, int64_t heads)
      : acc(heads * g.group * (g.head_dim / W)), key(g.head_dim / W), scores(heads * g.group * g.padded_block, 0.f),
        m(heads * g.group), l(heads * g.group) {}
};

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t o = 0; o < n * int64_t(sizeof(T)); o += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + o);
}

// Attention of query heads [kv_begin * group, kv_end * group) of one sequence over its `len` tokens.
// q is the sequence's queries, already scaled; k and v point at block 0 of the pool. Rows are visited in
// address order (token, then kv head) and the same rows of the next block are prefetched meanwhile:
// blocks are scattered over the pool, so the hardware prefetcher alone stalls at every block boundary.
template <typename T>
void attend(const vf* q, const T* k, const T* v, const int64_t* table, int64_t len, int64_t kv_begin,
            int64_t kv_end, const Geometry& g, float* out, Scratch& s) {
  const int64_t G = g.group, C = g.head_dim / W, BS = g.block_size, P = g.padded_block;
  const int64_t rows = (kv_end - kv_begin) * G;  // query heads of this item
  std::fill(s.m.begin(), s.m.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.l.begin(), s.l.begin() + rows, 0.f);
  std::fill(s.acc.begin(), s.acc.begin() + rows * C, vf{});
  vf* key = s.key.data();
  vf* acc = s.acc.data();
  float* scores = s.scores.data();
  const vf* q_item = q + kv_begin * G * C;
  for (int64_t start = 0; start < len; start += BS) {
    const int64_t n = std::min(BS, len - start);
    const int64_t base = table[start / BS] * g.block_stride;
    const int64_t next = start + BS < len ? table[start / BS + 1] * g.block_stride : -1;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
        const int64_t offset = t * g.token_stride + kvh * g.head_stride;
        if (next >= 0) prefetch_row(k + next + offset, g.head_dim);
        load_row(k + base + offset, key, C);
        const int64_t r0 = (kvh - kv_begin) * G;
        for (int64_t r = r0; r < r0 + G; ++r) {
          const vf* qv = q_item + r * C;
          vf a{}, b{};  // two chains: half the FMA latency
          int64_t c = 0;
          for (; c + 1 < C; c += 2) {
            a += qv[c] * key[c];
            b += qv[c + 1] * key[c + 1];
          }
          if (c < C) a += qv[c] * key[c];
          scores[r * P + t] = hsum(a + b);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = scores + r * P;
      const float new_m = std::max(s.m[r], *std::max_element(sr, sr + n));
      const float alpha = std::exp(s.m[r] - new_m);  // 0 on the first block, where m = -inf
      for (int64_t t = 0; t < n; t += W) {
        const vf e = exp_nonpositive(load_vec(sr + t) - new_m);
        std::memcpy(sr + t, &e, sizeof e);  // lanes past n are never read
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) sum += sr[t];
      s.l[r] = s.l[r] * alpha + sum;
      s.m[r] = new_m;
      if (alpha != 1.f) {
        for (int64_t c = 0; c < C; ++c) acc[r * C + c] *= alpha;
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
        const int64_t offset = t * g.token_stride + kvh * g.head_stride;
        if (next >= 0) prefetch_row(v + next + offset, g.head_dim);
        const int64_t r0 = (kvh - kv_begin) * G;
        const T* row = v + base + offset;
        int64_t c = 0;
        for (; c + 1 < C; c += 2) {
          vf va, vb;
          load_pair(row + c * W, va, vb);
          for (int64_t r = r0; r < r0 + G; ++r) {
            const float p = scores[r * P + t];
            acc[r * C + c] += p * va;
            acc[r * C + c + 1] += p * vb;
          }
        }
        if (c < C) {
          const vf va = load_vec(row + c * W);
          for (int64_t r = r0; r < r0 + G; ++r) acc[r * C + c] += scores[r * P + t] * va;
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = s.l[r] > 0.f ? 1.f / s.l[r] : 0.f;  // an empty context gives zeros
    output_row<T>(acc + r * C, inv, out + (kv_begin * G + r) * g.head_dim, C);
  }
}

template <typename T>
void run(const Tensor& q, const Tensor& kv_cache, const int64_t* tables, int64_t table_width, const int64_t* lens,
         double scale, Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kv_cache.size(3);
  const int64_t block_size = kv_cache.size(2);
  const Geometry g{Hq / Hkv, D, block_size, (block_size + W - 1) / W * W,
                   kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)};
  const T* k_pool = static_cast<const T*>(kv_cache.const_data_ptr());
  const T* v_pool = k_pool + kv_cache.stride(0);
  const float* q_ptr = static_cast<const float*>(q.const_data_ptr());
  float* out_ptr = static_cast<float*>(out.mutable_data_ptr());
  const int64_t threads = torch::stable::get_num_threads();
  // Split each sequence's kv heads into `parts` ranges when there are too few sequences for the threads.
  int64_t parts = 1;
  while (parts < Hkv && B * parts < 4 * threads) parts *= 2;
  while (Hkv % parts != 0) --parts;
  const int64_t per_part = Hkv / parts, items = B * parts;
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a / parts] > lens[b / parts]; });
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch s(g, per_part);
    std::vector<vf> scaled_q(Hq * (D / W));
    int64_t loaded = -1;
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      const int64_t b = order[i] / parts, kv_begin = (order[i] % parts) * per_part;
      if (b != loaded) {
        for (int64_t h = 0; h < Hq; ++h) {
          query_row<T>(q_ptr + (b * Hq + h) * D, (float)scale, &scaled_q[h * (D / W)], D / W);
        }
        loaded = b;
      }
      attend<T>(scaled_q.data(), k_pool, v_pool, tables + b * table_width, lens[b], kv_begin, kv_begin + per_part,
                g, out_ptr + b * Hq * D, s);
    }
  });
}

Tensor paged_decode_attention(Tensor q_in, Tensor kv_cache, Tensor tables_in, Tensor lens_in, double scale) {
  STD_TORCH_CHECK(q_in.is_cpu() && kv_cache.is_cpu() && tables_in.is_cpu() && lens_in.is_cpu(),
                  "paged_decode_attention: CPU tensors only");
  STD_TORCH_CHECK(q_in.dim() == 3, "q must be [batch, q_heads, head_dim]");
  STD_TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
                  "kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim]");
  STD_TORCH_CHECK(kv_cache.stride(4) == 1, "kv_cache must be contiguous along head_dim");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), Hkv = kv_cache.size(3);
  STD_TORCH_CHECK(kv_cache.size(4) == D, "q and kv_cache have different head_dim");
  STD_TORCH_CHECK(D % 16 == 0, "head_dim must be a multiple of 16");
  STD_TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q_heads must be a multiple of kv_heads");
  STD_TORCH_CHECK(tables_in.dim() == 2 && tables_in.size(0) == B, "block_tables must be [batch, max_blocks]");
  STD_TORCH_CHECK(lens_in.dim() == 1 && lens_in.size(0) == B, "context_lens must be [batch]");
  const ScalarType q_dtype = q_in.scalar_type();
  STD_TORCH_CHECK(q_dtype == ScalarType::Float || q_dtype == ScalarType::BFloat16 || q_dtype == ScalarType::Half,
                  "q must be float32, bfloat16 or float16");
  Tensor q = torch::stable::contiguous(torch::stable::to(q_in, ScalarType::Float));
  Tensor tables = torch::stable::contiguous(torch::stable::to(tables_in, ScalarType::Long));
  Tensor lens = torch::stable::contiguous(torch::stable::to(lens_in, ScalarType::Long));
  // Every block a sequence reads must be in the pool: a bad table would read outside it.
  const int64_t* t = static_cast<const int64_t*>(tables.const_data_ptr());
  const int64_t* l = static_cast<const int64_t*>(lens.const_data_ptr());
  const int64_t width = tables.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = (l[b] + block_size - 1) / block_size;
    STD_TORCH_CHECK(l[b] >= 0 && used <= width, "context_lens[", b, "] = ", l[b], " does not fit its block table");
    for (int64_t i = 0; i < used; ++i) {
      STD_TORCH_CHECK(t[b * width + i] >= 0 && t[b * width + i] < num_blocks, "block_tables[", b, ", ", i,
                      "] = ", t[b * width + i], " is not a block of the pool");
    }
  }
  Tensor out = torch::stable::empty({B, Hq, D}, ScalarType::Float, std::nullopt, q.device());
  switch (kv_cache.scalar_type()) {
    case ScalarType::Float: run<float>(q, kv_cache, t, width, l, scale, out); break;
    case ScalarType::BFloat16: run<Bf16>(q, kv_cache, t, width, l, scale, out); break;
    case ScalarType::Half: run<Fp16>(q, kv_cache, t, width, l, scale, out); break;
    default: STD_TORCH_CHECK(false, "kv_cache must be float32, bfloat16 or float16");
  }
  return q_dtype == ScalarType::Float ? out : torch::stable::to(out, q_dtype);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, float scale)"
        " -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) { m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention)); }
