// Paged attention on CPU for the new tokens of each sequence over its cached keys and values, read in
// place from the paged pool through the block table (no gather copy). Two ops:
// - paged_decode_attention: one new token per sequence (a decode step);
// - paged_prefix_attention: query_lens[b] new tokens for sequence b, each seeing the keys up to its own
//   position (causal), for short chunks after a cached prefix; every key row loaded serves all of them.
//
// Layout (same as qwenstack/models/attention.py):
//   q            [T, q_heads, head_dim] (T = B, or the sum of query_lens)  float32 / bfloat16 / float16
//   kv_cache     [2, num_blocks, block_size, kv_heads, head_dim]  float32 / bfloat16 / float16, head_dim contiguous
//   block_tables [B, max_blocks] int32 / int64, context_lens [B] (new tokens included), query_lens [B]
//   out          [T, q_heads, head_dim] in q's dtype
// Query head h reads kv head h / (q_heads / kv_heads) (grouped-query attention): the group of query heads
// of one kv head shares every key and value row loaded. Scores and sums are float32, with an online
// softmax rescaled once per block.
//
// Work items are (sequence, range of kv heads). With many sequences an item is a whole sequence, so its
// blocks stream from memory front to back; with few, the kv heads are split to give every thread work.
// Threads come from torch's parallel_for (torch.set_num_threads applies) and take items longest-first from
// a shared counter, so sequences of different lengths balance.
//
// SIMD: the generic vectors of cpu_vec.h, so the code has no per-ISA intrinsics except the float16
// conversion. head_dim must be a multiple of 16.
//
// Written against torch's stable C++ API (torch/csrc/stable, torch >= 2.10): its headers are a fraction
// of ATen's, which keeps the one-time build short, and its parallel_for is at::parallel_for.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

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

// Per-thread state of attend_many: running max, sum and weighted sum per query row (tokens x heads of one
// item), the transposed keys and converted values of one block, and one row's block of scores.
constexpr int64_t MAX_C = 32;  // head_dim up to 512 with AVX-512 (W = 16), 128 with SSE/NEON (W = 4)
constexpr int64_t MAX_PV = 4;  // blocks up to 64 tokens with AVX-512, 16 with SSE/NEON (the engine uses 16)
struct ManyScratch {
  std::vector<vf> acc, scores;
  std::vector<float> m, l, kt, vals;
  ManyScratch(const Geometry& g, int64_t rows)
      : acc(rows * (g.head_dim / W)), scores(g.padded_block / W), m(rows), l(rows),
        kt(g.head_dim * g.padded_block), vals(g.block_size * g.head_dim) {}
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

// Attention of query heads [kv_begin * group, kv_end * group) of the n_q > 1 new tokens of one sequence
// over its `len` cached tokens; token j sees keys [0, len - n_q + 1 + j) (causal). q is [n_q, q_heads,
// head_dim] float32, already scaled, in memory order. Per block and kv head, the keys are transposed once
// into KT [head_dim][padded_block] and the values converted once; then each query row computes its block
// of scores as head_dim broadcast multiply-adds over KT (no horizontal sums) and its weighted sum of values
// in registers. Every key and value row is read once for all the item's tokens.
template <typename T>
void attend_many(const float* q, int64_t n_q, const T* k, const T* v, const int64_t* table, int64_t len,
                 int64_t kv_begin, int64_t kv_end, const Geometry& g, int64_t q_heads, float* out,
                 ManyScratch& s) {
  const int64_t G = g.group, D = g.head_dim, C = D / W, BS = g.block_size, P = g.padded_block, PV = P / W;
  const int64_t first_limit = len - n_q + 1;
  const int64_t rows = n_q * (kv_end - kv_begin) * G;
  auto row_of = [&](int64_t j, int64_t h) { return j * (kv_end - kv_begin) * G + (h - kv_begin * G); };
  std::fill(s.m.begin(), s.m.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.l.begin(), s.l.begin() + rows, 0.f);
  std::fill(s.acc.begin(), s.acc.begin() + rows * C, vf{});
  float* kt = s.kt.data();     // [D][P]
  float* vals = s.vals.data();  // [BS][D]
  vf* sc = s.scores.data();     // [PV]
  for (int64_t start = 0; start < len; start += BS) {
    const int64_t n = std::min(BS, len - start);
    const int64_t base = table[start / BS] * g.block_stride;
    const int64_t j0 = std::max<int64_t>(0, start - first_limit + 1);  // earlier tokens see none of the block
    if (j0 >= n_q) break;
    for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
      std::fill(kt, kt + D * P, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const T* krow = k + base + t * g.token_stride + kvh * g.head_stride;
        const T* vrow = v + base + t * g.token_stride + kvh * g.head_stride;
        for (int64_t d = 0; d < D; ++d) kt[d * P + t] = to_float(krow[d]);
        for (int64_t c = 0; c < C; ++c) {
          const vf x = load_vec(vrow + c * W);
          std::memcpy(vals + t * D + c * W, &x, sizeof x);
        }
      }
      for (int64_t j = j0; j < n_q; ++j) {
        const int64_t valid = std::min(n, first_limit + j - start);
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          const float* qv = q + (j * q_heads + h) * D;
          // Four independent chains over d (head_dim is a multiple of 16): a single one waits on the
          // latency of every multiply-add. Locals, not scratch memory, so they stay in registers.
          vf c0[MAX_PV], c1[MAX_PV], c2[MAX_PV], c3[MAX_PV];
          for (int64_t p = 0; p < PV; ++p) c0[p] = c1[p] = c2[p] = c3[p] = vf{};
          for (int64_t d = 0; d < D; d += 4) {
            const float* kd = kt + d * P;
            for (int64_t p = 0; p < PV; ++p) {
              c0[p] += qv[d] * load_vec(kd + p * W);
              c1[p] += qv[d + 1] * load_vec(kd + P + p * W);
              c2[p] += qv[d + 2] * load_vec(kd + 2 * P + p * W);
              c3[p] += qv[d + 3] * load_vec(kd + 3 * P + p * W);
            }
          }
          for (int64_t p = 0; p < PV; ++p) sc[p] = (c0[p] + c1[p]) + (c2[p] + c3[p]);
          float* scf = reinterpret_cast<float*>(sc);
          const int64_t r = row_of(j, h);
          const float new_m = std::max(s.m[r], *std::max_element(scf, scf + valid));
          const float alpha = std::exp(s.m[r] - new_m);  // 0 on the first block, where m = -inf
          for (int64_t p = 0; p < PV; ++p) sc[p] = exp_nonpositive(sc[p] - new_m);
          std::fill(scf + valid, scf + P, 0.f);
          float sum = 0.f;
          for (int64_t t = 0; t < valid; ++t) sum += scf[t];
          s.l[r] = s.l[r] * alpha + sum;
          s.m[r] = new_m;
          vf acc[MAX_C];
          for (int64_t c = 0; c < C; ++c) acc[c] = s.acc[r * C + c] * alpha;
          for (int64_t t = 0; t < valid; ++t) {
            const float pt = scf[t];
            for (int64_t c = 0; c < C; ++c) acc[c] += pt * load_vec(vals + t * D + c * W);
          }
          for (int64_t c = 0; c < C; ++c) s.acc[r * C + c] = acc[c];
        }
      }
    }
  }
  for (int64_t j = 0; j < n_q; ++j) {
    for (int64_t h = kv_begin * G; h < kv_end * G; ++h) {
      const int64_t r = row_of(j, h);
      const float inv = s.l[r] > 0.f ? 1.f / s.l[r] : 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const vf o = s.acc[r * C + c] * inv;
        std::memcpy(out + (j * q_heads + h) * D + c * W, &o, sizeof o);
      }
    }
  }
}

// q [T, Hq, D] float32: the new tokens of sequence b are rows starts[b] .. starts[b + 1].
template <typename T>
void run(const Tensor& q, const Tensor& kv_cache, const int64_t* tables, int64_t table_width, const int64_t* lens,
         const int64_t* starts, int64_t B, double scale, Tensor& out) {
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = kv_cache.size(3);
  const int64_t block_size = kv_cache.size(2);
  const Geometry g{Hq / Hkv, D, block_size, (block_size + W - 1) / W * W,
                   kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)};
  const T* k_pool = static_cast<const T*>(kv_cache.const_data_ptr());
  const T* v_pool = k_pool + kv_cache.stride(0);
  const float* q_ptr = static_cast<const float*>(q.const_data_ptr());
  float* out_ptr = static_cast<float*>(out.mutable_data_ptr());
  const int64_t threads = torch::stable::get_num_threads();
  int64_t max_q = 1;
  for (int64_t b = 0; b < B; ++b) max_q = std::max(max_q, starts[b + 1] - starts[b]);
  // Split each sequence's kv heads into `parts` ranges when there are too few sequences for the threads.
  int64_t parts = 1;
  while (parts < Hkv && B * parts < 4 * threads) parts *= 2;
  while (Hkv % parts != 0) --parts;
  const int64_t per_part = Hkv / parts, items = B * parts;
  auto work = [&](int64_t b) { return lens[b] * (starts[b + 1] - starts[b]); };
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a / parts) > work(b / parts); });
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch s(g, per_part);
    ManyScratch many(g, max_q * per_part * g.group);
    std::vector<vf> scaled_q(Hq * (D / W));
    std::vector<float> scaled_many(max_q * Hq * D);
    int64_t loaded = -1;
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      const int64_t b = order[i] / parts, kv_begin = (order[i] % parts) * per_part;
      const int64_t n_q = starts[b + 1] - starts[b];
      const float* qb = q_ptr + starts[b] * Hq * D;
      float* ob = out_ptr + starts[b] * Hq * D;
      if (n_q == 1) {
        if (b != loaded) {
          for (int64_t h = 0; h < Hq; ++h) query_row<T>(qb + h * D, (float)scale, &scaled_q[h * (D / W)], D / W);
          loaded = b;
        }
        attend<T>(scaled_q.data(), k_pool, v_pool, tables + b * table_width, lens[b], kv_begin, kv_begin + per_part,
                  g, ob, s);
      } else {
        if (b != loaded) {
          for (int64_t e = 0; e < n_q * Hq * D; ++e) scaled_many[e] = qb[e] * (float)scale;
          loaded = b;
        }
        attend_many<T>(scaled_many.data(), n_q, k_pool, v_pool, tables + b * table_width, lens[b], kv_begin,
                       kv_begin + per_part, g, Hq, ob, many);
      }
    }
  });
}

// The checks and conversions shared by both ops; query_lens_in empty means one token per sequence.
Tensor paged_attention_impl(Tensor q_in, Tensor kv_cache, Tensor tables_in, Tensor lens_in, Tensor query_lens_in,
                            double scale) {
  STD_TORCH_CHECK(q_in.is_cpu() && kv_cache.is_cpu() && tables_in.is_cpu() && lens_in.is_cpu(),
                  "paged attention: CPU tensors only");
  STD_TORCH_CHECK(q_in.dim() == 3, "q must be [tokens, q_heads, head_dim]");
  STD_TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
                  "kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim]");
  STD_TORCH_CHECK(kv_cache.stride(4) == 1, "kv_cache must be contiguous along head_dim");
  const int64_t T = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2), B = lens_in.numel();
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), Hkv = kv_cache.size(3);
  STD_TORCH_CHECK(kv_cache.size(4) == D, "q and kv_cache have different head_dim");
  STD_TORCH_CHECK(D % 16 == 0 && D / W <= MAX_C, "head_dim must be a multiple of 16, at most ", MAX_C * W);
  STD_TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q_heads must be a multiple of kv_heads");
  STD_TORCH_CHECK(tables_in.dim() == 2 && tables_in.size(0) == B, "block_tables must be [batch, max_blocks]");
  STD_TORCH_CHECK(lens_in.dim() == 1, "context_lens must be [batch]");
  const ScalarType q_dtype = q_in.scalar_type();
  STD_TORCH_CHECK(q_dtype == ScalarType::Float || q_dtype == ScalarType::BFloat16 || q_dtype == ScalarType::Half,
                  "q must be float32, bfloat16 or float16");
  Tensor q = torch::stable::contiguous(torch::stable::to(q_in, ScalarType::Float));
  Tensor tables = torch::stable::contiguous(torch::stable::to(tables_in, ScalarType::Long));
  Tensor lens = torch::stable::contiguous(torch::stable::to(lens_in, ScalarType::Long));
  const int64_t* t = static_cast<const int64_t*>(tables.const_data_ptr());
  const int64_t* l = static_cast<const int64_t*>(lens.const_data_ptr());
  std::vector<int64_t> starts(B + 1, 0);
  if (query_lens_in.numel() == 0) {
    STD_TORCH_CHECK(T == B, "q must have one row per sequence");
    for (int64_t b = 0; b < B; ++b) starts[b + 1] = b + 1;
  } else {
    STD_TORCH_CHECK(query_lens_in.dim() == 1 && query_lens_in.numel() == B, "query_lens must be [batch]");
    Tensor qlens = torch::stable::contiguous(torch::stable::to(query_lens_in, ScalarType::Long));
    const int64_t* ql = static_cast<const int64_t*>(qlens.const_data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      STD_TORCH_CHECK(ql[b] >= 1 && ql[b] <= l[b], "query_lens[", b, "] = ", ql[b], " must be in [1, context_lens[",
                      b, "] = ", l[b], "]");
      starts[b + 1] = starts[b] + ql[b];
    }
    STD_TORCH_CHECK(starts[B] == T, "q has ", T, " rows but query_lens add up to ", starts[B]);
  }
  // Every block a sequence reads must be in the pool: a bad table would read outside it.
  const int64_t width = tables.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = (l[b] + block_size - 1) / block_size;
    STD_TORCH_CHECK(l[b] >= 0 && used <= width, "context_lens[", b, "] = ", l[b], " does not fit its block table");
    for (int64_t i = 0; i < used; ++i) {
      STD_TORCH_CHECK(t[b * width + i] >= 0 && t[b * width + i] < num_blocks, "block_tables[", b, ", ", i,
                      "] = ", t[b * width + i], " is not a block of the pool");
    }
  }
  Tensor out = torch::stable::empty({T, Hq, D}, ScalarType::Float, std::nullopt, q.device());
  switch (kv_cache.scalar_type()) {
    case ScalarType::Float: run<float>(q, kv_cache, t, width, l, starts.data(), B, scale, out); break;
    case ScalarType::BFloat16: run<Bf16>(q, kv_cache, t, width, l, starts.data(), B, scale, out); break;
    case ScalarType::Half: run<Fp16>(q, kv_cache, t, width, l, starts.data(), B, scale, out); break;
    default: STD_TORCH_CHECK(false, "kv_cache must be float32, bfloat16 or float16");
  }
  return q_dtype == ScalarType::Float ? out : torch::stable::to(out, q_dtype);
}

Tensor paged_decode_attention(Tensor q, Tensor kv_cache, Tensor tables, Tensor lens, double scale) {
  STD_TORCH_CHECK(lens.dim() == 1 && lens.numel() == q.size(0), "context_lens must be [batch]");
  return paged_attention_impl(q, kv_cache, tables, lens, torch::stable::empty({0}, ScalarType::Long, std::nullopt,
                              q.device()), scale);
}

Tensor paged_prefix_attention(Tensor q, Tensor kv_cache, Tensor tables, Tensor lens, Tensor query_lens, double scale) {
  STD_TORCH_CHECK(kv_cache.dim() == 5 && (kv_cache.size(2) + W - 1) / W <= MAX_PV, "paged_prefix_attention: blocks of ",
                  kv_cache.dim() == 5 ? kv_cache.size(2) : 0, " tokens are more than ", MAX_PV * W, " (use the SDPA path)");
  return paged_attention_impl(q, kv_cache, tables, lens, query_lens, scale);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, float scale)"
        " -> Tensor");
  m.def("paged_prefix_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor query_lens, float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention));
  m.impl("paged_prefix_attention", TORCH_BOX(&paged_prefix_attention));
}
