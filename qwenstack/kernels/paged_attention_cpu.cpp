// Paged attention on CPU for the new tokens of each sequence over its cached keys and values, read in
// place from the paged pool through the block table (no gather copy). Two ops:
// - paged_decode_attention: one new token per sequence (a decode step);
// - paged_prefix_attention: query_lens[b] new tokens for sequence b, each seeing the keys up to its own
//   position (causal), for short chunks after a cached prefix; every key row loaded serves all of them.
//
// Layout (same as qwenstack/models/attention.py):
//   q            [T, q_heads, head_dim] (T = B, or the sum of query_lens)  float32 / bfloat16 / float16
//   kv_cache     [2, num_blocks, block_size, kv_heads, head_dim]  float32 / bfloat16 / float16 / float8_e5m2,
//                head_dim contiguous (float8_e5m2: --kv-cache-dtype fp8, half the bytes of a 16-bit cache; its rows
//                are converted as they are read: to bfloat16 for decode's dot-product scores, else to float32)
//   block_tables [B, max_blocks] int32 / int64, context_lens [B] (new tokens included), query_lens [B]
//   out          [T, q_heads, head_dim] in q's dtype
// Query head h reads kv head h / (q_heads / kv_heads) (grouped-query attention): the group of query heads
// of one kv head shares every key and value row loaded. Scores and sums are float32.
//
// Decode (one new token per sequence): work items are chunks of a sequence's context (CHUNK_TOKENS,
// whole blocks), each over all kv heads (or, with fewer chunks than threads, over a share of them), so
// every item streams whole blocks front to back: the keys, one softmax over the chunk, then the values. A
// sequence of several chunks gets each chunk's softmax state (max, sum, weighted sum of values) and merges
// them after (flash-decoding): one long sequence
// keeps every thread busy. The chunks depend on the length alone, and heads never share sums, so
// a sequence's result is the same whatever the batch and the thread count. Per block and kv head, each
// key row is dotted with the group's query heads as vertical multiply-adds and the block's W partial
// vectors per head are folded into one vector of W scores (no horizontal sum per token); the weighted sum
// of values runs with the head's accumulators in registers for the whole block.
// Several new tokens per sequence: work items are (sequence, range of kv heads); with few sequences the kv
// heads are split to give every thread work. Their softmax is online, rescaled once per block.
// Threads come from torch's parallel_for (torch.set_num_threads applies) and take items longest-first from
// a shared counter, so sequences of different lengths balance.
//
// SIMD: the generic vectors of cpu_vec.h, so the code has no per-ISA intrinsics except the float16
// conversion and, where the CPU has AVX512-BF16, the products of bfloat16 queries over a bfloat16 cache
// (score_block_pairs for decode's scores, attend_many_pairs for several new tokens). head_dim must be a
// multiple of 16.
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
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

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

inline void load_pair(const Fp8e5m2* p, vf& a, vf& b) {
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

// Lane i of the result = the sum of the lanes of p[i], for W vectors p (overwritten): log2(W) rounds,
// each adding the two halves of every block of lanes of two vectors side by side (two shuffles and an
// add per pair), in place of W horizontal sums.
constexpr int fold_index(int k, int half, bool upper) {
  const int base = k / (2 * half) * (2 * half), i = k % (2 * half);
  return (i < half ? base + i : int(W) + base + i - half) + (upper ? half : 0);
}

template <int Half, int... K>
inline vf fold_pair(vf a, vf b, std::integer_sequence<int, K...>) {
  return __builtin_shufflevector(a, b, fold_index(K, Half, false)...) +
         __builtin_shufflevector(a, b, fold_index(K, Half, true)...);
}

template <int Half>
inline void fold_round(vf* p, int n) {
  for (int i = 0; i < n / 2; ++i) p[i] = fold_pair<Half>(p[i], p[i + n / 2], std::make_integer_sequence<int, int(W)>{});
  if constexpr (Half > 1) fold_round<Half / 2>(p, n / 2);
}

inline vf sums_of_lanes(vf* p) {
  fold_round<int(W) / 2>(p, int(W));
  return p[0];
}

constexpr int64_t MAX_C = 32;  // head_dim up to 512 with AVX-512 (W = 16), 128 with SSE/NEON (W = 4)
constexpr int64_t MAX_PV = 4;  // blocks up to 64 tokens with AVX-512, 16 with SSE/NEON (the engine uses 16)

struct Geometry {
  int64_t group, head_dim, block_size, padded_block;  // padded_block: block_size rounded up to W
  int64_t block_stride, token_stride, head_stride;    // kv_cache strides of dims 1, 2, 3 (elements)
};

// Decode items cover this many tokens of context (whole blocks): short enough that one sequence splits
// over the threads evenly, long enough that the merge (one weighted sum per chunk and head) stays small.
constexpr int64_t CHUNK_TOKENS = 128;

// Below this much context in all, decode items keep every kv head: a second thread cost more than it saved.
// Qwen3-0.6B's shape (16 query heads, 8 kv heads of 128), one sequence, 2 Zen 4 threads: 16 tokens 8.0-8.5 us
// split against 7.7 on one thread, 32 tokens even (10.0), 64 tokens 11.1-12.7 against 14.6, 128 tokens 16.5-17.1
// against 25.4.
constexpr int64_t SPLIT_HEADS_MIN_TOKENS = 48;

inline int64_t chunk_tokens(int64_t block_size) {
  return std::max<int64_t>(1, CHUNK_TOKENS / block_size) * block_size;
}

// The decode items of a sequence of `len` tokens of context, in chunks of `chunk` tokens (one when empty).
inline int64_t decode_chunks(int64_t len, int64_t chunk) { return std::max<int64_t>(1, (len + chunk - 1) / chunk); }

// How many ranges of kv heads `items` work items are cut into so that there are at least `wanted`: doubling
// while that is short, then down to a divisor of Hkv (every range the same size).
inline int64_t head_parts(int64_t Hkv, int64_t items, int64_t wanted) {
  int64_t parts = 1;
  while (parts < Hkv && items * parts < wanted) parts *= 2;
  while (Hkv % parts != 0) --parts;
  return parts;
}

// Per-thread state of a decode item: the max, sum and weighted sum of values of every query head (in
// load_pair's lane order); the current block's partial dot vectors of each head (one per token); the whole
// chunk's scores of each head, then its weights.
struct DecodeScratch {
  std::vector<vf> acc, partial;     // [q_heads * C], [q_heads * padded_block]
  std::vector<float> m, l, scores;  // [q_heads], [q_heads], [q_heads * chunk_stride]
  int64_t chunk_stride;             // a head's scores: the chunk's blocks, each padded to W
  DecodeScratch(const Geometry& g, int64_t q_heads, int64_t chunk)
      : acc(q_heads * (g.head_dim / W)), partial(q_heads * g.padded_block), m(q_heads), l(q_heads),
        chunk_stride((chunk + g.block_size - 1) / g.block_size * g.padded_block) {
    scores.resize(q_heads * chunk_stride);
  }
};

// An offset into the pool that names no block (offsets relative to an item's kv heads may be negative).
constexpr int64_t NO_BLOCK = std::numeric_limits<int64_t>::min();

// Into L2, not L1 (locality 2: prefetcht1): a block's rows for all kv heads are as large as L1 (32 KB for
// Qwen3-0.6B's 8 heads of 128), so fetching the next block into L1 evicted the one being read. Measured on
// 64 sequences of 150 tokens over 28 layers' caches (Zen 4, 2 cores): 14 -> 19.6 GB/s.
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * int64_t(sizeof(T)); o += 64) __builtin_prefetch(bytes + o, 0, 2);
}

// acc[r][c0 .. c0 + CC) of RT query heads plus the block's n value rows times the heads' weights
// probs[r * P + t]: the RT x CC accumulators stay in registers over the block, and each
// value row's slice is loaded and converted once for the RT heads.
template <int RT, int CC, typename T>
inline void add_weighted_values(const T* rows, int64_t token_stride, int64_t n, const float* probs, int64_t P,
                                vf* acc, int64_t C, int64_t c0) {
  vf a[RT][CC];
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < CC; ++c) a[r][c] = acc[r * C + c0 + c];
  }
  for (int64_t t = 0; t < n; ++t) {
    vf x[CC];
    load_row(rows + t * token_stride + c0 * W, x, CC);
    for (int r = 0; r < RT; ++r) {
      const float p = probs[r * P + t];
      for (int c = 0; c < CC; ++c) a[r][c] += p * x[c];
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < CC; ++c) acc[r * C + c0 + c] = a[r][c];
  }
}

// The same for any head_dim (row length known at run time): one head at a time.
template <typename T>
inline void add_weighted_values_any(const T* rows, int64_t token_stride, int64_t n, const float* probs,
                                    int64_t P, vf* acc, int64_t C, int64_t G) {
  vf x[MAX_C];
  for (int64_t t = 0; t < n; ++t) {
    load_row(rows + t * token_stride, x, C);
    for (int64_t r = 0; r < G; ++r) {
      const float p = probs[r * P + t];
      for (int64_t c = 0; c < C; ++c) acc[r * C + c] += p * x[c];
    }
  }
}

// The cache types whose decode scores may run on bfloat16 dot products (below) when the queries are bfloat16.
template <typename T>
constexpr bool has_dot_pairs = std::is_same_v<T, Bf16> || std::is_same_v<T, Fp8e5m2>;

// Float8 key rows take the dot products from this many query heads a kv head. In-process A/B against the float32
// loop (bench_attention.py --base --fp8, 12 layers' caches, 1-128 sequences of 136-1,024 tokens, Zen 4): 8 heads
// 1.10-1.14x, 4 heads 1.07-1.09x, 2 heads 0.96-1.02x.
constexpr int64_t FP8_DOT_PAIRS_MIN_GROUP = 4;

#if defined(__AVX512BF16__)
// Scores on bfloat16 dot products (AVX512-BF16's vdpbf16ps multiplies pairs of bfloat16 and adds both
// products to a float32 lane), for a bfloat16 (or float8_e5m2) cache and bfloat16 queries: the products are
// exact in float32, as in the float32 loop below; only the order of the sums differs.
// Without it, the score loop converts each key row to float32 and runs two multiply-adds per element.
constexpr bool kDotPairs = true;

// Elements [32c, 32c + 32) of a key row as 32 bfloat16 in memory order: loaded as they are from a bfloat16 cache;
// from a float8_e5m2 one converted, exactly (e5m2's values are all bfloat16 values, its subnormals normal there).
// Over float8 rows the float32 loop below spends two multiply-adds per element and query head on the converted
// row: with FP8_DOT_PAIRS_MIN_GROUP or more query heads a kv head the conversion to bfloat16 pays for itself.
inline __m512bh key_pair(const Bf16* row, int c) { return (__m512bh)_mm512_loadu_si512(row + c * 32); }
inline __m512bh key_pair(const Fp8e5m2* row, int c) {
  vf lo = load_vec(row + c * 32), hi = load_vec(row + c * 32 + 16);
  __m512 a, b;
  std::memcpy(&a, &lo, sizeof a);
  std::memcpy(&b, &hi, sizeof b);
  return _mm512_cvtne2ps_pbh(b, a);  // b into the upper half
}

// The block's scores: for key row t, one vector per query head r of kv head kvh's group whose lanes add up
// to q_r . k_t (q unscaled, in memory order; the caller scales the sums).
template <int CT, typename T>
inline void score_block_pairs(const Bf16* qb, const T* k, const T* ahead, int64_t next, int64_t base, int64_t n,
                              int64_t kv_heads, const Geometry& g, vf* partial) {
  const int64_t G = g.group, P = g.padded_block, D = g.head_dim;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      const int64_t offset = t * g.token_stride + kvh * g.head_stride;
      if (next != NO_BLOCK) prefetch_row(ahead + next + offset, D);
      __m512bh key[CT / 2];
      for (int c = 0; c < CT / 2; ++c) key[c] = key_pair(k + base + offset, c);
      for (int64_t r = kvh * G; r < (kvh + 1) * G; ++r) {
        const Bf16* qr = qb + r * D;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();  // two chains
        int c = 0;
        for (; c + 1 < CT / 2; c += 2) {
          a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qr + c * 32), key[c]);
          b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(qr + c * 32 + 32), key[c + 1]);
        }
        if (c < CT / 2) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qr + c * 32), key[c]);
        partial[r * P + t] = (vf)_mm512_add_ps(a, b);
      }
    }
  }
}

#else
constexpr bool kDotPairs = false;
#endif

// Attention of every query head of one sequence over its tokens [begin, end) (begin on a block boundary, at
// most one chunk), leaving the unnormalised state in s.acc, s.m, s.l; k and v point at block 0 of the pool.
// CT: head_dim / W when known at compile time (the loops over a row unroll, and a key row and the accumulators
// stay in registers), 0 otherwise. q: the sequence's queries in load_pair's lane order, already scaled; qb: the
// same queries as bfloat16 in memory order, unscaled, or null (qb set: the scores are bfloat16 dot products,
// times score_scale).
// Two passes over the chunk, not an online softmax per block: every block's scores first (the keys streamed
// block after block), one softmax per head over the chunk, then the weighted sum of values (the values
// streamed block after block). Per block, the online form rescaled the sums and took a scalar exp per head
// between the blocks' reads. 28 layers of 64 sequences of 136 tokens (AMX Xeon, 2 threads, interleaved): with
// keys and values in cache 30.2 -> 22.5 ms; read from the pool 1.02-1.08x as fast at 1-128 sequences of 64 to
// 1,024 tokens (bench_attention.py --base). What is left is the keys' pass: it reads at ~15 GB/s where the
// values' pass reads at ~26.
// While a block is read, the same rows of the next block to read are prefetched (blocks are scattered over the
// pool, so the hardware prefetcher alone stalls at every block boundary): the last key block fetches the first
// value block, and the last value block the rows at `after` (relative to k and v; NO_BLOCK for none), the
// first block of the item the thread takes next.
template <int CT, typename T>
void attend_chunk(const vf* q, const Bf16* qb, float score_scale, const T* k, const T* v, const int64_t* table,
                  int64_t begin, int64_t end, int64_t kv_heads, const Geometry& g, DecodeScratch& s, int64_t after) {
  const int64_t G = g.group, C = CT ? CT : g.head_dim / W, BS = g.block_size, P = g.padded_block, D = g.head_dim;
  const int64_t rows = kv_heads * G, SP = s.chunk_stride;
  constexpr bool dot_pairs = kDotPairs && has_dot_pairs<T> && CT != 0 && CT % 2 == 0;
  const bool pairs_path = dot_pairs && qb != nullptr && (std::is_same_v<T, Bf16> || G >= FP8_DOT_PAIRS_MIN_GROUP);
  const float sums_scale = pairs_path ? score_scale : 1.f;  // q is already scaled on the float32 path
  std::fill(s.m.begin(), s.m.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.l.begin(), s.l.begin() + rows, 0.f);
  std::fill(s.acc.begin(), s.acc.begin() + rows * C, vf{});
  if (end <= begin) return;
  vf* partial = s.partial.data();
  float* scores = s.scores.data();
  vi lane;
  for (int64_t i = 0; i < W; ++i) lane[i] = int32_t(i);
  const vf neg_inf = vf{} - std::numeric_limits<float>::infinity();
  const int64_t first = table[begin / BS] * g.block_stride;
  // Pass 1: the scores of every head for every block, into scores[row * SP + block * P + t].
  for (int64_t start = begin; start < end; start += BS) {
    const int64_t n = std::min(BS, end - start), padded = (n + W - 1) / W * W, at = (start - begin) / BS * P;
    const int64_t base = table[start / BS] * g.block_stride;
    const bool last = start + BS >= end;
    const T* ahead = last ? v : k;
    const int64_t next = last ? first : table[start / BS + 1] * g.block_stride;
    // Key rows in address order (token, then kv head): the hardware prefetcher streams the block.
#if defined(__AVX512BF16__)
    if constexpr (dot_pairs) {
      if (pairs_path) score_block_pairs<CT, T>(qb, k, ahead, next, base, n, kv_heads, g, partial);
    }
#endif
    for (int64_t t = 0; !pairs_path && t < n; ++t) {
      for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
        const int64_t offset = t * g.token_stride + kvh * g.head_stride;
        prefetch_row(ahead + next + offset, D);
        vf key[CT ? CT : MAX_C];
        load_row(k + base + offset, key, C);
        for (int64_t r = kvh * G; r < (kvh + 1) * G; ++r) {
          const vf* qv = q + r * C;
          vf a{}, b{};  // two chains: half the multiply-add latency
          int64_t c = 0;
          for (; c + 1 < C; c += 2) {
            a += qv[c] * key[c];
            b += qv[c + 1] * key[c + 1];
          }
          if (c < C) a += qv[c] * key[c];
          partial[r * P + t] = a + b;
        }
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t t = n; t < padded; ++t) partial[row * P + t] = vf{};
      for (int64_t j = 0; j < padded; j += W) {
        vf sc = sums_of_lanes(partial + row * P + j) * sums_scale;
        if (n - j < W) sc = lane < int32_t(n - j) ? sc : neg_inf;  // lanes past the block's last token
        std::memcpy(scores + row * SP + at + j, &sc, sizeof sc);
      }
    }
  }
  // The softmax of each head over the chunk (unnormalised: the caller divides by l, or merges chunks).
  const int64_t filled = ((end - begin + BS - 1) / BS - 1) * P + ((end - begin - 1) % BS + 1 + W - 1) / W * W;
  for (int64_t row = 0; row < rows; ++row) {
    float* sr = scores + row * SP;
    vf vmax = neg_inf;
    for (int64_t j = 0; j < filled; j += W) vmax = vmax > load_vec(sr + j) ? vmax : load_vec(sr + j);
    const float m = hmax(vmax);
    vf vsum{};
    for (int64_t j = 0; j < filled; j += W) {
      const vf e = exp_vec(load_vec(sr + j) - m);  // the -inf padding lanes give 0
      std::memcpy(sr + j, &e, sizeof e);
      vsum += e;
    }
    s.m[row] = m;
    s.l[row] = hsum(vsum);
  }
  // Pass 2: the weighted sums of values, block by block.
  for (int64_t start = begin; start < end; start += BS) {
    const int64_t n = std::min(BS, end - start), at = (start - begin) / BS * P;
    const int64_t base = table[start / BS] * g.block_stride;
    const bool last = start + BS >= end;
    const T* ahead = last ? k : v;
    const int64_t next = last ? after : table[start / BS + 1] * g.block_stride;
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      const int64_t head_offset = kvh * g.head_stride;
      const T* vrows = v + base + head_offset;
      vf* acc = s.acc.data() + kvh * G * C;
      const float* probs = scores + kvh * G * SP + at;
      if (next != NO_BLOCK) {
        for (int64_t t = 0; t < n; ++t) prefetch_row(ahead + next + t * g.token_stride + head_offset, D);
      }
      if constexpr (CT != 0) {
        // Tiles of 4 or 2 heads by CC4 or CC2 vectors, then single heads by CC1 (at most 16 accumulators).
        constexpr int CC4 = std::min(CT, 4), CC2 = std::min(CT, 8), CC1 = std::min(CT, 16);
        int64_t r = 0;
        for (; G % 4 == 0 && r + 4 <= G; r += 4) {
          for (int64_t c0 = 0; c0 < C; c0 += CC4) {
            add_weighted_values<4, CC4>(vrows, g.token_stride, n, probs + r * SP, SP, acc + r * C, C, c0);
          }
        }
        for (; r + 2 <= G; r += 2) {
          for (int64_t c0 = 0; c0 < C; c0 += CC2) {
            add_weighted_values<2, CC2>(vrows, g.token_stride, n, probs + r * SP, SP, acc + r * C, C, c0);
          }
        }
        for (; r < G; ++r) {
          for (int64_t c0 = 0; c0 < C; c0 += CC1) {
            add_weighted_values<1, CC1>(vrows, g.token_stride, n, probs + r * SP, SP, acc + r * C, C, c0);
          }
        }
      } else {
        add_weighted_values_any(vrows, g.token_stride, n, probs, SP, acc, C, G);
      }
    }
  }
}

// Per-thread state of attend_many: running max, sum and weighted sum per query row (tokens x heads of one
// item), the transposed keys and converted values of one block, and one row's block of scores.
struct ManyScratch {
  std::vector<vf> acc, scores;
  std::vector<float> m, l, kt, vals;
  std::vector<uint32_t> key_pairs, value_pairs;  // attend_many_pairs: [D / 2][P], [P / 2][D]
  ManyScratch(const Geometry& g, int64_t rows)
      : acc(rows * (g.head_dim / W)), scores(g.padded_block / W), m(rows), l(rows),
        kt(g.head_dim * g.padded_block), vals(g.block_size * g.head_dim),
        key_pairs(g.head_dim / 2 * g.padded_block), value_pairs(g.padded_block / 2 * g.head_dim) {}
  void reset(int64_t rows, int64_t C) {
    std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.begin() + rows, 0.f);
    std::fill(acc.begin(), acc.begin() + rows * C, vf{});
  }
};

// The finished rows of an attend_many item, normalised: query heads [h_begin, h_end) of n_q tokens, row
// (j, h) at j * (h_end - h_begin) + h - h_begin of the scratch, into out [n_q, q_heads, C * W] float32.
inline void write_rows(const ManyScratch& s, int64_t n_q, int64_t h_begin, int64_t h_end, int64_t q_heads, int64_t C,
                       float* out) {
  for (int64_t j = 0; j < n_q; ++j) {
    for (int64_t h = h_begin; h < h_end; ++h) {
      const int64_t r = j * (h_end - h_begin) + h - h_begin;
      const float inv = s.l[r] > 0.f ? 1.f / s.l[r] : 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const vf o = s.acc[r * C + c] * inv;
        std::memcpy(out + (j * q_heads + h) * C * W + c * W, &o, sizeof o);
      }
    }
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
  s.reset(rows, C);
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
          for (int64_t p = 0; p < PV; ++p) sc[p] = exp_vec(sc[p] - new_m);
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
  write_rows(s, n_q, kv_begin * G, kv_end * G, q_heads, C, out);
}

#if defined(__AVX512BF16__)
inline uint32_t bf16_pair(const Bf16* lo, const Bf16* hi) { return uint32_t(lo->bits) | uint32_t(hi->bits) << 16; }

// attend_many on bfloat16 dot products, for bfloat16 queries over a bfloat16 cache (the same arguments, but
// q is the sequence's bfloat16 queries as given, unscaled). Per block and kv head the keys are packed once as
// [D / 2][P] pairs of dims (one vector = 16 keys' pair d), the values as [P / 2][D] pairs of keys; then each
// query row's 16 scores of the block are D / 2 vdpbf16ps over a broadcast pair of the query (four chains),
// and its weighted sum of values D / 16 chains of P / 2 vdpbf16ps over broadcast pairs of the weights,
// which are rounded to bfloat16 for it (as torch's own bfloat16 attention and segment_attention do). On
// Qwen3-0.6B's heads, 30 new tokens over 2,000 cached: 3.6 ms against the float32 form's 8.3 (its keys are
// transposed element by element, and every product is a float32 multiply-add of converted values).
template <int C>
void attend_many_pairs(const Bf16* q, float scale, int64_t n_q, const Bf16* k, const Bf16* v, const int64_t* table,
                       int64_t len, int64_t kv_begin, int64_t kv_end, const Geometry& g, int64_t q_heads, float* out,
                       ManyScratch& s) {
  constexpr int64_t D = C * W;  // head_dim, known at compile time so that a row's sums stay in registers
  const int64_t G = g.group, BS = g.block_size, P = g.padded_block, PV = P / W;
  const int64_t first_limit = len - n_q + 1;
  const int64_t rows = n_q * (kv_end - kv_begin) * G;
  auto row_of = [&](int64_t j, int64_t h) { return j * (kv_end - kv_begin) * G + (h - kv_begin * G); };
  s.reset(rows, C);
  uint32_t* kp = s.key_pairs.data();    // [D / 2][P]
  uint32_t* vp = s.value_pairs.data();  // [P / 2][D]
  vi lane;
  for (int64_t i = 0; i < W; ++i) lane[i] = int32_t(i);
  const vf neg_inf = vf{} - std::numeric_limits<float>::infinity();
  const Bf16 zero{0};
  alignas(64) float scores[MAX_PV * W];
  alignas(64) uint16_t weights[MAX_PV * W];
  for (int64_t start = 0; start < len; start += BS) {
    const int64_t n = std::min(BS, len - start);
    const int64_t base = table[start / BS] * g.block_stride;
    const int64_t j0 = std::max<int64_t>(0, start - first_limit + 1);  // earlier tokens see none of the block
    if (j0 >= n_q) break;
    for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
      const Bf16* krows = k + base + kvh * g.head_stride;
      const Bf16* vrows = v + base + kvh * g.head_stride;
      for (int64_t t = 0; t < P; ++t) {
        const Bf16* krow = krows + t * g.token_stride;
        for (int64_t d2 = 0; d2 < D / 2; ++d2) kp[d2 * P + t] = t < n ? bf16_pair(krow + 2 * d2, krow + 2 * d2 + 1) : 0;
      }
      for (int64_t t2 = 0; t2 < P / 2; ++t2) {
        const int64_t t = 2 * t2;
        for (int64_t d = 0; d < D; ++d) {
          const Bf16* a = t < n ? vrows + t * g.token_stride + d : &zero;
          const Bf16* b = t + 1 < n ? vrows + (t + 1) * g.token_stride + d : &zero;
          vp[t2 * D + d] = bf16_pair(a, b);
        }
      }
      for (int64_t j = j0; j < n_q; ++j) {
        const int64_t valid = std::min(n, first_limit + j - start);
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          const uint32_t* qp = reinterpret_cast<const uint32_t*>(q + (j * q_heads + h) * D);
          // Scores, for each 16 keys of the block.
          for (int64_t pv = 0; pv < PV; ++pv) {
            __m512 c[4];  // four independent sums over the dim pairs: one would wait on each product's latency
            for (int i = 0; i < 4; ++i) c[i] = _mm512_setzero_ps();
            for (int64_t d2 = 0; d2 < D / 2; d2 += 4) {
              for (int i = 0; i < 4; ++i) {
                const __m512bh keys = (__m512bh)_mm512_loadu_si512(kp + (d2 + i) * P + pv * W);
                c[i] = _mm512_dpbf16_ps(c[i], keys, (__m512bh)_mm512_set1_epi32(int32_t(qp[d2 + i])));
              }
            }
            vf sc = (vf)_mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3])) * scale;
            if (valid - pv * W < W) sc = lane < int32_t(valid - pv * W) ? sc : neg_inf;  // past the causal limit
            std::memcpy(scores + pv * W, &sc, sizeof sc);
          }
          const int64_t r = row_of(j, h);
          vf vmax = neg_inf;
          for (int64_t pv = 0; pv < PV; ++pv) {
            const vf x = load_vec(scores + pv * W);
            vmax = vmax > x ? vmax : x;
          }
          const float new_m = std::max(s.m[r], hmax(vmax));
          const float alpha = std::exp(s.m[r] - new_m);  // 0 on the first block, where m = -inf
          vf vsum{};
          for (int64_t pv = 0; pv < PV; ++pv) {
            vf e = exp_vec(load_vec(scores + pv * W) - new_m);
            if (valid - pv * W < W) e = lane < int32_t(valid - pv * W) ? e : vf{};
            vsum += e;
            const __m256bh eb = _mm512_cvtneps_pbh((__m512)e);
            std::memcpy(weights + pv * W, &eb, sizeof eb);
          }
          s.l[r] = s.l[r] * alpha + hsum(vsum);
          s.m[r] = new_m;
          const uint32_t* wp = reinterpret_cast<const uint32_t*>(weights);
          __m512 acc[C];
          for (int64_t c = 0; c < C; ++c) acc[c] = (__m512)(s.acc[r * C + c] * alpha);
          for (int64_t t2 = 0; t2 < (valid + 1) / 2; ++t2) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32(int32_t(wp[t2]));
            const uint32_t* vrow = vp + t2 * D;
            for (int64_t c = 0; c < C; ++c) {
              acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512(vrow + c * W), w);
            }
          }
          for (int64_t c = 0; c < C; ++c) s.acc[r * C + c] = (vf)acc[c];
        }
      }
    }
  }
  write_rows(s, n_q, kv_begin * G, kv_end * G, q_heads, C, out);
}
#endif

// One work item: chunk `chunk` of a decoding sequence (all kv heads), or kv heads [kv_begin, kv_end) of a
// sequence with several new tokens (its whole context).
struct Item {
  int64_t b, chunk, kv_begin, kv_end, work;
};

// count float32 values as the output's dtype (float32, bfloat16 or float16).
inline void write_floats(ScalarType dtype, const float* src, int64_t count, void* dst) {
  switch (dtype) {
    case ScalarType::Float: std::memcpy(dst, src, count * sizeof(float)); break;
    case ScalarType::BFloat16: for (int64_t i = 0; i < count; ++i) store(src[i], static_cast<Bf16*>(dst) + i); break;
    default: for (int64_t i = 0; i < count; ++i) store(src[i], static_cast<Fp16*>(dst) + i); break;
  }
}

// The merged state of a sequence's chunks (flash-decoding's final step) for query head h:
// sum_i acc_i e^(m_i - M) / sum_i l_i e^(m_i - M), M the largest m_i; returns that sum of l.
inline float merge_chunks(const vf* acc, const float* m, const float* l, int64_t chunks, int64_t q_heads,
                          int64_t C, int64_t h, vf* sum) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < chunks; ++i) top = std::max(top, m[i * q_heads + h]);
  for (int64_t c = 0; c < C; ++c) sum[c] = vf{};
  float total = 0.f;
  for (int64_t i = 0; i < chunks; ++i) {
    const float mi = m[i * q_heads + h];
    const float w = mi == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(mi - top);
    total += l[i * q_heads + h] * w;
    for (int64_t c = 0; c < C; ++c) sum[c] += w * acc[(i * q_heads + h) * C + c];
  }
  return total;
}

// The decode item's chunk of sequence b over all kv heads, dispatched on the row length.
template <typename T>
void attend_any(const vf* q, const Bf16* qb, float score_scale, const T* k, const T* v, const int64_t* table,
                int64_t begin, int64_t end, int64_t kv_heads, const Geometry& g, DecodeScratch& s, int64_t after) {
  switch (g.head_dim % W == 0 ? g.head_dim / W : 0) {  // the row lengths the unrolled loops are built for
    case 4: attend_chunk<4, T>(q, qb, score_scale, k, v, table, begin, end, kv_heads, g, s, after); break;
    case 8: attend_chunk<8, T>(q, qb, score_scale, k, v, table, begin, end, kv_heads, g, s, after); break;
    case 16: attend_chunk<16, T>(q, qb, score_scale, k, v, table, begin, end, kv_heads, g, s, after); break;
    default: attend_chunk<0, T>(q, nullptr, 1.f, k, v, table, begin, end, kv_heads, g, s, after);
  }
}

// The new tokens of sequence b are rows starts[b] .. starts[b + 1] of q and out ([T, Hq, D], contiguous,
// dtype q_dtype).
template <typename T>
void run(const void* q_ptr, void* out_ptr, ScalarType q_dtype, int64_t Hq, const Tensor& kv_cache,
         const int64_t* tables, int64_t table_width, const int64_t* lens, const int64_t* starts, int64_t B,
         double scale) {
  const int64_t D = kv_cache.size(4), Hkv = kv_cache.size(3), C = D / W;
  const int64_t block_size = kv_cache.size(2);
  const Geometry g{Hq / Hkv, D, block_size, (block_size + W - 1) / W * W,
                   kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)};
  const T* k_pool = static_cast<const T*>(kv_cache.const_data_ptr());
  const T* v_pool = k_pool + kv_cache.stride(0);
  const int64_t q_size = q_dtype == ScalarType::Float ? 4 : 2;
  auto q_row = [&](int64_t row) { return static_cast<const char*>(q_ptr) + row * Hq * D * q_size; };
  auto out_row = [&](int64_t row) { return static_cast<char*>(out_ptr) + row * Hq * D * q_size; };
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t chunk = chunk_tokens(block_size);
  int64_t max_q = 1;
  for (int64_t b = 0; b < B; ++b) max_q = std::max(max_q, starts[b + 1] - starts[b]);
  // Sequences with several new tokens split their kv heads into `parts` ranges when there are too few
  // sequences for the threads.
  const int64_t parts = head_parts(Hkv, B, 4 * threads), per_part = Hkv / parts;
  // One-token sequences with fewer chunks in all than the threads (a single stream's short context) split
  // each chunk's kv heads over them as well: heads are independent, so the sums are the same whatever the split.
  int64_t decode_items = 0, decode_tokens = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (starts[b + 1] - starts[b] != 1) continue;
    decode_items += decode_chunks(lens[b], chunk);
    decode_tokens += lens[b];
  }
  const int64_t decode_parts = decode_tokens >= SPLIT_HEADS_MIN_TOKENS ? head_parts(Hkv, decode_items, threads) : 1;
  const int64_t per_decode_part = Hkv / decode_parts;
  // Decoding sequences of several chunks keep each chunk's state in slots first[b] .. first[b] + chunks.
  std::vector<Item> items;
  std::vector<int64_t> first(B, -1), chunks(B, 1);
  int64_t slots = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n_q = starts[b + 1] - starts[b];
    if (n_q == 1) {
      chunks[b] = decode_chunks(lens[b], chunk);
      if (chunks[b] > 1) first[b] = slots, slots += chunks[b];
      for (int64_t i = 0; i < chunks[b]; ++i) {
        for (int64_t p = 0; p < decode_parts; ++p) {
          items.push_back({b, i, p * per_decode_part, (p + 1) * per_decode_part, std::min(chunk, lens[b] - i * chunk)});
        }
      }
    } else {
      for (int64_t p = 0; p < parts; ++p) items.push_back({b, 0, p * per_part, (p + 1) * per_part, lens[b] * n_q});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.work > b.work; });
  std::vector<vf> slot_acc(slots * Hq * C);
  std::vector<float> slot_m(slots * Hq), slot_l(slots * Hq);
  std::atomic<int64_t> next{0};
  const int64_t count = int64_t(items.size());
  torch::stable::parallel_for(0, std::min(threads, count), 1, [&](int64_t, int64_t) {
    DecodeScratch s(g, Hq, chunk);
    std::vector<float> row(max_q * Hq * D);  // float32 queries of a sequence, then an output row
    std::vector<vf> scaled_q(Hq * C);
    std::unique_ptr<ManyScratch> many;
    std::vector<float> many_q, many_out;
    int64_t loaded = -1;
    // Each thread holds the item it takes next, so that the first block of that one streams in while this
    // one's last block is read: 64 sequences of 136 tokens are 128 items, half of them starting cold. 28
    // layers' decode attention, 16-128 sequences of 64-300 tokens: 1.05-1.11x (in-process A/B, AMX Xeon).
    int64_t following = next.fetch_add(1);
    for (int64_t i = following; i < count; i = following) {
      following = next.fetch_add(1);
      const Item& it = items[i];
      const int64_t b = it.b, n_q = starts[b + 1] - starts[b];
      const int64_t* table = tables + b * table_width;
      if (n_q == 1) {
        if (b != loaded) {
          read_floats(q_dtype, q_row(starts[b]), Hq * D, row.data());
          for (int64_t h = 0; h < Hq; ++h) query_row<T>(&row[h * D], (float)scale, &scaled_q[h * C], C);
          loaded = b;
        }
        const int64_t begin = it.chunk * chunk, end = std::min(lens[b], begin + chunk);
        // Query heads [h0, h0 + heads) of kv heads [kv_begin, kv_end): the pool, the queries and the state
        // offset to the first of them.
        const int64_t h0 = it.kv_begin * g.group, heads = (it.kv_end - it.kv_begin) * g.group;
        const int64_t pool_offset = it.kv_begin * g.head_stride;
        // bfloat16 queries over a bfloat16 cache also go in as they are, for the dot-product scores.
        const bool bf16_q = has_dot_pairs<T> && q_dtype == ScalarType::BFloat16;
        const Bf16* qb = bf16_q ? reinterpret_cast<const Bf16*>(q_row(starts[b])) + h0 * D : nullptr;
        int64_t after = NO_BLOCK;  // the following item's first block, relative to this item's kv heads
        if (following < count && items[following].work > 0 &&
            starts[items[following].b + 1] - starts[items[following].b] == 1) {
          const Item& then = items[following];
          after = tables[then.b * table_width + then.chunk * chunk / block_size] * g.block_stride +
                  (then.kv_begin - it.kv_begin) * g.head_stride;
        }
        attend_any<T>(scaled_q.data() + h0 * C, qb, bf16_q ? float(scale) : 1.f, k_pool + pool_offset,
                      v_pool + pool_offset, table, begin, end, it.kv_end - it.kv_begin, g, s, after);
        if (first[b] < 0) {
          for (int64_t h = 0; h < heads; ++h) {
            output_row<T>(&s.acc[h * C], s.l[h] > 0.f ? 1.f / s.l[h] : 0.f, row.data(), C);  // empty: zeros
            write_floats(q_dtype, row.data(), D, out_row(starts[b]) + (h0 + h) * D * q_size);
          }
        } else {
          const int64_t slot = first[b] + it.chunk;
          std::copy(s.acc.begin(), s.acc.begin() + heads * C, slot_acc.begin() + (slot * Hq + h0) * C);
          std::copy(s.m.begin(), s.m.begin() + heads, slot_m.begin() + slot * Hq + h0);
          std::copy(s.l.begin(), s.l.begin() + heads, slot_l.begin() + slot * Hq + h0);
        }
      } else {
        if (!many) {
          many = std::make_unique<ManyScratch>(g, max_q * per_part * g.group);
          many_q.resize(max_q * Hq * D);
          many_out.resize(max_q * Hq * D);
        }
        bool done = false;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, Bf16>) {
          if (q_dtype == ScalarType::BFloat16) {
            const Bf16* qb = reinterpret_cast<const Bf16*>(q_row(starts[b]));
            done = true;
            switch (C) {  // the head_dims the unrolled loops are built for; others take the float32 form
              case 4: attend_many_pairs<4>(qb, float(scale), n_q, k_pool, v_pool, table, lens[b], it.kv_begin,
                                           it.kv_end, g, Hq, many_out.data(), *many); break;
              case 8: attend_many_pairs<8>(qb, float(scale), n_q, k_pool, v_pool, table, lens[b], it.kv_begin,
                                           it.kv_end, g, Hq, many_out.data(), *many); break;
              case 16: attend_many_pairs<16>(qb, float(scale), n_q, k_pool, v_pool, table, lens[b], it.kv_begin,
                                             it.kv_end, g, Hq, many_out.data(), *many); break;
              default: done = false;
            }
          }
        }
#endif
        if (!done) {
          if (b != loaded) {
            read_floats(q_dtype, q_row(starts[b]), n_q * Hq * D, many_q.data());
            for (int64_t e = 0; e < n_q * Hq * D; ++e) many_q[e] *= (float)scale;
            loaded = b;
          }
          attend_many<T>(many_q.data(), n_q, k_pool, v_pool, table, lens[b], it.kv_begin, it.kv_end, g, Hq,
                         many_out.data(), *many);
        }
        const int64_t h0 = it.kv_begin * g.group, heads = (it.kv_end - it.kv_begin) * g.group;
        for (int64_t j = 0; j < n_q; ++j) {
          write_floats(q_dtype, &many_out[(j * Hq + h0) * D], heads * D, out_row(starts[b] + j) + h0 * D * q_size);
        }
      }
    }
  });
  if (slots == 0) return;
  torch::stable::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
    std::vector<vf> sum(C);
    std::vector<float> row(D);
    for (int64_t b = lo; b < hi; ++b) {
      if (first[b] < 0) continue;
      const int64_t f = first[b];
      for (int64_t h = 0; h < Hq; ++h) {
        const float total = merge_chunks(&slot_acc[f * Hq * C], &slot_m[f * Hq], &slot_l[f * Hq], chunks[b], Hq, C, h,
                                         sum.data());
        output_row<T>(sum.data(), total > 0.f ? 1.f / total : 0.f, row.data(), C);
        write_floats(q_dtype, row.data(), D, out_row(starts[b]) + h * D * q_size);
      }
    }
  });
}

// A 1-D or 2-D int32/int64 tensor's values as int64, row-major.
std::vector<int64_t> read_longs(const Tensor& t) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Long || t.scalar_type() == ScalarType::Int,
                  "block tables and lengths must be int32 or int64");
  const int64_t rows = t.dim() == 2 ? t.size(0) : 1, cols = t.dim() == 2 ? t.size(1) : t.size(0);
  const int64_t row_stride = t.dim() == 2 ? t.stride(0) : 0, col_stride = t.dim() == 2 ? t.stride(1) : t.stride(0);
  std::vector<int64_t> out(rows * cols);
  const bool wide = t.scalar_type() == ScalarType::Long;
  const void* p = t.const_data_ptr();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t at = r * row_stride + c * col_stride;
      out[r * cols + c] = wide ? static_cast<const int64_t*>(p)[at] : static_cast<const int32_t*>(p)[at];
    }
  }
  return out;
}

// The checks and conversions shared by both ops; query_lens_in null means one token per sequence.
Tensor paged_attention_impl(Tensor q_in, Tensor kv_cache, Tensor tables_in, Tensor lens_in, const Tensor* query_lens_in,
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
  const bool q_packed = q_in.stride(2) == 1 && q_in.stride(1) == D && (T <= 1 || q_in.stride(0) == Hq * D);
  Tensor q = q_packed ? q_in : as_contiguous(q_in);
  const std::vector<int64_t> t = read_longs(tables_in), l = read_longs(lens_in);
  std::vector<int64_t> starts(B + 1, 0);
  if (query_lens_in == nullptr) {
    STD_TORCH_CHECK(T == B, "q must have one row per sequence");
    for (int64_t b = 0; b < B; ++b) starts[b + 1] = b + 1;
  } else {
    STD_TORCH_CHECK(query_lens_in->dim() == 1 && query_lens_in->numel() == B, "query_lens must be [batch]");
    const std::vector<int64_t> ql = read_longs(*query_lens_in);
    for (int64_t b = 0; b < B; ++b) {
      STD_TORCH_CHECK(ql[b] >= 1 && ql[b] <= l[b], "query_lens[", b, "] = ", ql[b], " must be in [1, context_lens[",
                      b, "] = ", l[b], "]");
      starts[b + 1] = starts[b] + ql[b];
    }
    STD_TORCH_CHECK(starts[B] == T, "q has ", T, " rows but query_lens add up to ", starts[B]);
  }
  // Every block a sequence reads must be in the pool: a bad table would read outside it.
  const int64_t width = tables_in.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = (l[b] + block_size - 1) / block_size;
    STD_TORCH_CHECK(l[b] >= 0 && used <= width, "context_lens[", b, "] = ", l[b], " does not fit its block table");
    for (int64_t i = 0; i < used; ++i) {
      STD_TORCH_CHECK(t[b * width + i] >= 0 && t[b * width + i] < num_blocks, "block_tables[", b, ", ", i,
                      "] = ", t[b * width + i], " is not a block of the pool");
    }
  }
  Tensor out = torch::stable::empty({T, Hq, D}, q_dtype, std::nullopt, q.device());
  const void* q_ptr = q.const_data_ptr();
  void* out_ptr = out.mutable_data_ptr();
  switch (kv_cache.scalar_type()) {
    case ScalarType::Float:
      run<float>(q_ptr, out_ptr, q_dtype, Hq, kv_cache, t.data(), width, l.data(), starts.data(), B, scale);
      break;
    case ScalarType::BFloat16:
      run<Bf16>(q_ptr, out_ptr, q_dtype, Hq, kv_cache, t.data(), width, l.data(), starts.data(), B, scale);
      break;
    case ScalarType::Half:
      run<Fp16>(q_ptr, out_ptr, q_dtype, Hq, kv_cache, t.data(), width, l.data(), starts.data(), B, scale);
      break;
    case ScalarType::Float8_e5m2:
      run<Fp8e5m2>(q_ptr, out_ptr, q_dtype, Hq, kv_cache, t.data(), width, l.data(), starts.data(), B, scale);
      break;
    default: STD_TORCH_CHECK(false, "kv_cache must be float32, bfloat16, float16 or float8_e5m2");
  }
  return out;
}

Tensor paged_decode_attention(Tensor q, Tensor kv_cache, Tensor tables, Tensor lens, double scale) {
  STD_TORCH_CHECK(lens.dim() == 1 && lens.numel() == q.size(0), "context_lens must be [batch]");
  return paged_attention_impl(q, kv_cache, tables, lens, nullptr, scale);
}

Tensor paged_prefix_attention(Tensor q, Tensor kv_cache, Tensor tables, Tensor lens, Tensor query_lens, double scale) {
  STD_TORCH_CHECK(kv_cache.dim() == 5 && (kv_cache.size(2) + W - 1) / W <= MAX_PV, "paged_prefix_attention: blocks of ",
                  kv_cache.dim() == 5 ? kv_cache.size(2) : 0, " tokens are more than ", MAX_PV * W, " (use the SDPA path)");
  return paged_attention_impl(q, kv_cache, tables, lens, &query_lens, scale);
}

// write_kv's loop for source type S and pool type P (strides in elements).
template <typename S, typename P>
void store_kv_rows(P* pool, const int64_t* pool_strides, const S* const* src, const int64_t* token_strides,
                   const int64_t* head_strides, const std::vector<int64_t>& slots, int64_t block_size, int64_t Hkv,
                   int64_t D) {
  for (int64_t t = 0; t < int64_t(slots.size()); ++t) {
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    for (int64_t kv = 0; kv < 2; ++kv) {
      const S* from = src[kv] + t * token_strides[kv];
      P* to = pool + kv * pool_strides[0] + block * pool_strides[1] + offset * pool_strides[2];
      for (int64_t h = 0; h < Hkv; ++h) store_row(from + h * head_strides[kv], D, to + h * pool_strides[3]);
    }
  }
}

// New keys and values [T, kv_heads, head_dim] stored at their slots (block * block_size + offset) of the
// pool, as models/attention.py's write_kv does with two index_copy_ calls. k and v share the pool's dtype, or the
// pool is float8_e5m2 and they are float32, bfloat16 or float16 (rounded as torch's .to(torch.float8_e5m2)).
void write_kv(Tensor kv_cache, Tensor k, Tensor v, Tensor slots_in) {
  STD_TORCH_CHECK(kv_cache.is_cpu() && k.is_cpu() && v.is_cpu() && slots_in.is_cpu(), "write_kv: CPU tensors only");
  STD_TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
                  "write_kv: kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim]");
  const int64_t T = k.size(0), Hkv = kv_cache.size(3), D = kv_cache.size(4), block_size = kv_cache.size(2);
  STD_TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(1) == Hkv && k.size(2) == D && v.size(0) == T &&
                      v.size(1) == Hkv && v.size(2) == D,
                  "write_kv: k and v must be [T, kv_heads, head_dim] of the pool");
  const ScalarType pool_dtype = kv_cache.scalar_type(), src_dtype = k.scalar_type();
  const bool float_source =
      src_dtype == ScalarType::Float || src_dtype == ScalarType::BFloat16 || src_dtype == ScalarType::Half;
  const bool to_fp8 = pool_dtype == ScalarType::Float8_e5m2 && float_source;
  STD_TORCH_CHECK(v.scalar_type() == src_dtype && (src_dtype == pool_dtype || to_fp8),
                  "write_kv: k and v must share kv_cache's dtype (or be 16/32-bit floats for a float8_e5m2 cache)");
  STD_TORCH_CHECK(kv_cache.stride(4) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                  "write_kv: head_dim must be contiguous");
  STD_TORCH_CHECK(slots_in.dim() == 1 && slots_in.numel() == T, "write_kv: slots must be [T]");
  const std::vector<int64_t> slots = read_longs(slots_in);
  const int64_t pool_slots = kv_cache.size(1) * block_size;
  for (int64_t t = 0; t < T; ++t) {  // every slot checked before any is written: a bad one changes nothing
    STD_TORCH_CHECK(slots[t] >= 0 && slots[t] < pool_slots, "write_kv: slot ", slots[t], " is not in the pool");
  }
  // Strides read once (each is a call through the stable ABI).
  const int64_t pool_strides[4] = {kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)};
  const int64_t token_strides[2] = {k.stride(0), v.stride(0)}, head_strides[2] = {k.stride(1), v.stride(1)};
  const void* src[2] = {k.const_data_ptr(), v.const_data_ptr()};
  void* pool = kv_cache.mutable_data_ptr();
  auto rows = [&](auto* typed_pool, auto* typed_src) {
    using S = std::remove_pointer_t<decltype(typed_src)>;
    const S* sources[2] = {static_cast<const S*>(src[0]), static_cast<const S*>(src[1])};
    store_kv_rows(typed_pool, pool_strides, sources, token_strides, head_strides, slots, block_size, Hkv, D);
  };
  auto from = [&](auto* typed_pool) {
    switch (src_dtype) {
      case ScalarType::Float: rows(typed_pool, static_cast<const float*>(nullptr)); break;
      case ScalarType::BFloat16: rows(typed_pool, static_cast<const Bf16*>(nullptr)); break;
      case ScalarType::Half: rows(typed_pool, static_cast<const Fp16*>(nullptr)); break;
      default: STD_TORCH_CHECK(false, "write_kv: unsupported dtype");
    }
  };
  switch (pool_dtype) {
    case ScalarType::Float: rows(static_cast<float*>(pool), static_cast<const float*>(nullptr)); break;
    case ScalarType::BFloat16: rows(static_cast<Bf16*>(pool), static_cast<const Bf16*>(nullptr)); break;
    case ScalarType::Half: rows(static_cast<Fp16*>(pool), static_cast<const Fp16*>(nullptr)); break;
    case ScalarType::Float8_e5m2:
      if (src_dtype == pool_dtype) rows(static_cast<Fp8e5m2*>(pool), static_cast<const Fp8e5m2*>(nullptr));
      else from(static_cast<Fp8e5m2*>(pool));
      break;
    default: STD_TORCH_CHECK(false, "write_kv: kv_cache must be float32, bfloat16, float16 or float8_e5m2");
  }
}

}  // namespace

#ifndef QWENSTACK_KERNEL_FUNCTIONS_ONLY  // decode_layer_cpu.cpp includes this file for its functions
STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, float scale)"
        " -> Tensor");
  m.def("paged_prefix_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor query_lens, float scale) -> Tensor");
  m.def("write_kv(Tensor(a!) kv_cache, Tensor k, Tensor v, Tensor slots) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention));
  m.impl("paged_prefix_attention", TORCH_BOX(&paged_prefix_attention));
  m.impl("write_kv", TORCH_BOX(&write_kv));
}
#endif
