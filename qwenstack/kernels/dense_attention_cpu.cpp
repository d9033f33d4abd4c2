// Attention over segments of tokens whose keys lie in plain tensors: a vision tower's frames, whose patches all
// see each other, or prompts (causal), fresh or with their cached context gathered. One op:
// - segment_attention(q, k, v, q_starts, kv_starts, causal, scale): q [Nq, q_heads, D], k and v
//   [Nk, kv_heads, D], bfloat16, the last dim contiguous (any token and head strides: q, k and v may be views
//   of one qkv projection). Segment s is query rows [q_starts[s], q_starts[s + 1]) over key rows
//   [kv_starts[s], kv_starts[s + 1]): all of them, or (causal) query i of a segment of q_len queries and
//   kv_len keys sees keys up to kv_len - q_len + i (its last query, the last key). Query head h reads kv head
//   h / (q_heads / kv_heads). Out: [Nq, q_heads, D] bfloat16, contiguous, so [Nq, q_heads * D] is a view.
//
// Why: torch's CPU flash attention read ~158 GFLOPS on this project's 2-core AVX512-BF16 VM, while its
// oneDNN GEMMs read 340-360, and attention was ~45% of Qwen3-VL's cold time to first token for a 1024x1024
// image (4,096 patches a frame). Here both products are vdpbf16ps loops with the sums in registers:
// - keys are packed once per (segment, kv head) into blocks of 16 keys laid out [D/2][16][2], so one vector
//   holds a pair of dims for 16 keys, dotted with a query's pair of dims broadcast: 8 query rows x 32 keys of
//   float32 scores in 16 registers;
// - values are packed [keys/2][D][2], so a pair of probabilities broadcast against one vector adds 2 keys into
//   16 dims of the output: rows x D/16 sums in registers.
// Work items are (segment, query head, block of ROW_BLOCK query rows), taken from a shared counter (those
// that see the most keys first). Each walks its keys in chunks of KEY_CHUNK with an online softmax: the chunk's
// scores in float32 (scaled), the row maximum, the exponentials (as powers of 2), the row sums in float32,
// the probabilities rounded to bfloat16 for the second product (as torch's flash attention does), the output
// rows rescaled when the maximum moves. The result is SDPA's within bfloat16 rounding (tests/kernels).
// Measured (benchmarks/bench_prefill_attention.py): 2.1x SDPA on the vision tower's shape, 2.4-3x on causal
// prompts; by perf, its two products issue about one vdpbf16ps a cycle per core (the peak), and the
// softmax's passes over the scores are most of the rest.
//
// With AMX (and head_dim a multiple of 32) both products run on the tile unit instead (scores_amx, values_amx),
// over the same packed keys and values; the softmax between them is the same code.
//
// Built at every ISA level; the loops need AVX512-BF16, and elsewhere the op refuses and the caller keeps
// SDPA (kernels/ops.py segment_attention checks the level first).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "cpu_amx.h"
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t KEY_BLOCK = 16;   // keys per packed key block (one vector of scores)
constexpr int64_t ROW_BLOCK = 32;   // query rows per work item: each key chunk loaded serves all of them
constexpr int64_t KEY_CHUNK = 256;  // keys per softmax step: 32 rows x 256 float32 scores = 32 KiB
constexpr int64_t SCORE_ROWS = 8;   // query rows per pass of the score loop (x 2 key blocks = 16 sums)
constexpr int64_t MAX_D = 256;
// Each segment's keys are packed padded with zero keys to a multiple of this: two key blocks, what the tile
// loops below take at a time (a zero key's score is masked and its value weighs 0).
constexpr int64_t KEY_PAD = 2 * KEY_BLOCK;

#if defined(__AVX512BF16__)

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 2^t on 16 lanes for t <= 0 (scores minus their row maximum, in the log2 domain): 2^round(t) by vscalefps
// (exact, and 0 far below float32's range) times a degree-6 Taylor polynomial of 2^r on |r| <= 1/2 (relative
// error < 2e-7, well under the bfloat16 rounding the probabilities get). Half the instructions of cpu_vec.h's
// exp_vec, whose clamps and 2^n by integer shifts this range does not need: the exponentials were ~40% of the
// loop's time with it.
inline __m512 exp2_nonpositive(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);                // ln2^6 / 720
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 120
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 24
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 6
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Scores of SCORE_ROWS query rows (q: [rows][D] bfloat16, contiguous) against NB packed key blocks, times
// scale (the softmax scale times log2(e): the exponentials are powers of 2), into s (row stride KEY_CHUNK).
template <int64_t NB>
inline void score_pass(const uint16_t* q, const uint16_t* kblocks, int64_t D, float scale, float* s) {
  __m512 acc[SCORE_ROWS][NB];
#pragma GCC unroll 8
  for (int64_t r = 0; r < SCORE_ROWS; ++r)
#pragma GCC unroll 2
    for (int64_t b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh kv[NB];
#pragma GCC unroll 2
    for (int64_t b = 0; b < NB; ++b) {
      kv[b] = (__m512bh)_mm512_loadu_si512(kblocks + b * KEY_BLOCK * D + p * 2 * KEY_BLOCK);
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < SCORE_ROWS; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(int32_t(pair_at(q + r * D + 2 * p)));
#pragma GCC unroll 2
      for (int64_t b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], kv[b], qv);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int64_t r = 0; r < SCORE_ROWS; ++r)
#pragma GCC unroll 2
    for (int64_t b = 0; b < NB; ++b) _mm512_storeu_ps(s + r * KEY_CHUNK + b * KEY_BLOCK, _mm512_mul_ps(acc[r][b], vs));
}

// o[r][:] += sum over `pairs` key pairs of p[r][2j..2j+1] . v: R rows of C vectors of 16 dims each, sums in
// registers for the chunk. p: bfloat16 rows (stride KEY_CHUNK); v: packed [pairs][D][2]; o: float32 [R][D].
template <int64_t C, int64_t R>
inline void value_pass(const uint16_t* p, const uint16_t* v, int64_t pairs, float* o) {
  constexpr int64_t D = C * 16;
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int64_t c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + c * 16);
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh vv[C];
#pragma GCC unroll 16
    for (int64_t c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(v + (j * D + c * 16) * 2);
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(int32_t(pair_at(p + r * KEY_CHUNK + 2 * j)));
#pragma GCC unroll 16
      for (int64_t c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], vv[c], pv);
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(o + r * D + c * 16, acc[r][c]);
}

// All ROW_BLOCK rows' value pass, R rows at a time (as many as keep 16 sums in registers).
template <int64_t C>
void value_rows(const uint16_t* p, const uint16_t* v, int64_t pairs, float* o) {
  constexpr int64_t R = C >= 16 ? 1 : 16 / C;
  int64_t r = 0;
  for (; r + R <= ROW_BLOCK; r += R) value_pass<C, R>(p + r * KEY_CHUNK, v, pairs, o + r * C * 16);
  for (; r < ROW_BLOCK; ++r) value_pass<C, 1>(p + r * KEY_CHUNK, v, pairs, o + r * C * 16);
}

using ValueRows = void (*)(const uint16_t*, const uint16_t*, int64_t, float*);

template <int64_t... C>
ValueRows value_rows_table(int64_t c, std::integer_sequence<int64_t, C...>) {
  constexpr ValueRows table[] = {value_rows<C + 1>...};
  return c >= 1 && c <= int64_t(sizeof...(C)) ? table[c - 1] : nullptr;
}

// head_dim 16 to MAX_D, a multiple of 16; nullptr otherwise.
ValueRows value_rows_for(int64_t D) {
  if (D % 16 != 0) return nullptr;
  return value_rows_table(D / 16, std::make_integer_sequence<int64_t, MAX_D / 16>{});
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The two products on AMX tiles (head_dim a multiple of 32), with the packed layouts above as they are: a key
// block's 16 dim pairs [16][16 keys][2] are a tile's B operand, and so are 16 value pairs' 16 dims [16][16][2]
// (rows 4 D bytes apart); query rows and probability rows are A operands straight from their buffers. Tiles 0-3
// hold 32 rows x 32 keys (scores) or 32 rows x 32 dims (outputs), 4-5 the two 16-row A tiles, 6-7 two B tiles.
// The vector loops issue one vdpbf16ps a cycle at best (16 x 2 products); a tile product is 16 x 16 x 32.

// Scores of the ROW_BLOCK query rows against `blocks` key blocks (an even count), times scale, into s (row
// stride KEY_CHUNK).
void scores_amx(const uint16_t* qbuf, const uint16_t* kchunk, int64_t blocks, int64_t D, float scale, float* s) {
  for (int64_t b = 0; b < blocks; b += 2) {
    const uint16_t* k0 = kchunk + b * KEY_BLOCK * D;
    const uint16_t* k1 = k0 + KEY_BLOCK * D;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < D / 32; ++c) {  // 32 dims: 16 pairs of each key block, 1 KiB
      _tile_loadd(4, qbuf + c * 32, D * 2);
      _tile_loadd(5, qbuf + 16 * D + c * 32, D * 2);
      _tile_loadd(6, k0 + c * 16 * 2 * KEY_BLOCK, 64);
      _tile_loadd(7, k1 + c * 16 * 2 * KEY_BLOCK, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, s + b * KEY_BLOCK, KEY_CHUNK * 4);
    _tile_stored(1, s + (b + 1) * KEY_BLOCK, KEY_CHUNK * 4);
    _tile_stored(2, s + 16 * KEY_CHUNK + b * KEY_BLOCK, KEY_CHUNK * 4);
    _tile_stored(3, s + 16 * KEY_CHUNK + (b + 1) * KEY_BLOCK, KEY_CHUNK * 4);
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < ROW_BLOCK; ++r) {
    for (int64_t j = 0; j < blocks * KEY_BLOCK; j += 16) {
      float* at = s + r * KEY_CHUNK + j;
      _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), vs));
    }
  }
}

// o [ROW_BLOCK][D] += p [ROW_BLOCK][keys] (bfloat16, row stride KEY_CHUNK) times the values packed [keys/2][D][2],
// keys a multiple of 32, 32 dims of the output at a time.
void values_amx(const uint16_t* p, const uint16_t* v, int64_t keys, int64_t D, float* o) {
  for (int64_t d = 0; d < D; d += 32) {
    _tile_loadd(0, o + d, D * 4);
    _tile_loadd(1, o + d + 16, D * 4);
    _tile_loadd(2, o + 16 * D + d, D * 4);
    _tile_loadd(3, o + 16 * D + d + 16, D * 4);
    for (int64_t t = 0; t < keys; t += 32) {  // 16 key pairs
      _tile_loadd(4, p + t, KEY_CHUNK * 2);
      _tile_loadd(5, p + 16 * KEY_CHUNK + t, KEY_CHUNK * 2);
      _tile_loadd(6, v + t * D + d * 2, D * 4);
      _tile_loadd(7, v + t * D + (d + 16) * 2, D * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, o + d, D * 4);
    _tile_stored(1, o + d + 16, D * 4);
    _tile_stored(2, o + 16 * D + d, D * 4);
    _tile_stored(3, o + 16 * D + d + 16, D * 4);
  }
}
constexpr bool kTiles = true;
#else
constexpr bool kTiles = false;
#endif

// Keys [L, D] (row stride ks) into blocks of 16 keys [D/2][16][2], zeros past L; values into [Lp/2][D][2].
void pack_keys_values(const uint16_t* k, int64_t ks, const uint16_t* v, int64_t vs, int64_t L, int64_t Lp,
                      int64_t D, uint16_t* kp, uint16_t* vp) {
  for (int64_t j = 0; j < Lp; ++j) {
    const uint16_t* krow = j < L ? k + j * ks : nullptr;
    const uint16_t* vrow = j < L ? v + j * vs : nullptr;
    uint16_t* kblock = kp + (j / KEY_BLOCK) * KEY_BLOCK * D + (j % KEY_BLOCK) * 2;
    uint16_t* vpair = vp + (j / 2) * D * 2 + (j % 2);
    for (int64_t d = 0; d < D; ++d) {
      kblock[(d / 2) * 2 * KEY_BLOCK + (d % 2)] = krow ? krow[d] : 0;
      vpair[d * 2] = vrow ? vrow[d] : 0;
    }
  }
}

struct Layout {
  int64_t Hq, Hkv, D;
  int64_t qs0, qs1, ks0, ks1, vs0, vs1;  // token and head strides of q, k, v (elements)
  bool causal;
  float scale;  // the softmax scale times log2(e)
};

// One work item: query rows [row0, row0 + ROW_BLOCK) of a segment of q_len rows from q_start, one query head,
// over that segment's kv_len packed keys.
void attend_rows(const Layout& g, const uint16_t* q, const uint16_t* kp, const uint16_t* vp, int64_t seg_start,
                 int64_t q_len, int64_t kv_len, int64_t head, int64_t row0, ValueRows value_rows_fn, bool tiles,
                 uint16_t* out, uint16_t* qbuf, float* s, uint16_t* p, float* o, float* m, float* l) {
  const int64_t D = g.D, rows = std::min(ROW_BLOCK, q_len - row0);
  std::fill(qbuf, qbuf + ROW_BLOCK * D, uint16_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(qbuf + r * D, q + (seg_start + row0 + r) * g.qs0 + head * g.qs1, D * sizeof(uint16_t));
  }
  std::fill(o, o + ROW_BLOCK * D, 0.f);
  std::fill(m, m + ROW_BLOCK, -std::numeric_limits<float>::infinity());
  std::fill(l, l + ROW_BLOCK, 0.f);
  // Keys each row sees: all of them, or (causal) up to its own position, the last query row at the last key.
  const int64_t offset = kv_len - q_len;
  auto limit = [&](int64_t r) { return g.causal ? offset + row0 + std::min(r, rows - 1) + 1 : kv_len; };
  const int64_t end = limit(ROW_BLOCK - 1);
  for (int64_t c0 = 0; c0 < end; c0 += KEY_CHUNK) {
    const int64_t n = std::min(KEY_CHUNK, end - c0);
    // Key blocks of the chunk: an even count for the tiles (the segment's keys are padded to KEY_PAD).
    const int64_t blocks = tiles ? (n + KEY_PAD - 1) / KEY_PAD * 2 : (n + KEY_BLOCK - 1) / KEY_BLOCK;
    const uint16_t* kchunk = kp + c0 * D;
    if (tiles) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
      scores_amx(qbuf, kchunk, blocks, D, g.scale, s);
#endif
    } else {
      for (int64_t r = 0; r < ROW_BLOCK; r += SCORE_ROWS) {
        int64_t b = 0;
        for (; b + 2 <= blocks; b += 2) {
          score_pass<2>(qbuf + r * D, kchunk + b * KEY_BLOCK * D, D, g.scale, s + r * KEY_CHUNK + b * KEY_BLOCK);
        }
        if (b < blocks) {
          score_pass<1>(qbuf + r * D, kchunk + b * KEY_BLOCK * D, D, g.scale, s + r * KEY_CHUNK + b * KEY_BLOCK);
        }
      }
    }
    const int64_t padded = blocks * KEY_BLOCK;
    for (int64_t r = 0; r < ROW_BLOCK; ++r) {
      float* srow = s + r * KEY_CHUNK;
      uint16_t* prow = p + r * KEY_CHUNK;
      const int64_t valid = std::clamp<int64_t>(limit(r) - c0, 0, n);
      if (valid == 0) {  // a causal row that ends before this chunk: nothing to add
        std::fill(prow, prow + padded, uint16_t(0));
        continue;
      }
      __m512 vmax = _mm512_set1_ps(m[r]);
      int64_t j = 0;
      for (; j + 16 <= valid; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(srow + j));
      float mx = _mm512_reduce_max_ps(vmax);
      for (; j < valid; ++j) mx = std::max(mx, srow[j]);
      const float alpha = std::exp2(m[r] - mx);  // 0 on the first chunk (m = -inf)
      m[r] = mx;
      __m512 sum = _mm512_setzero_ps();
      const __m512 vmx = _mm512_set1_ps(mx);
      for (j = 0; j < valid; j += 16) {  // the last vector masked to the valid keys, the rest of it 0
        const __mmask16 live = valid - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (valid - j)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(live, exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(srow + j), vmx)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh(e));
      }
      std::fill(prow + j, prow + padded, uint16_t(0));
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.f) {  // D is a multiple of 16
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), va));
      }
    }
    if (tiles) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
      values_amx(p, vp + c0 * D, padded, D, o);
#endif
    } else {
      value_rows_fn(p, vp + c0 * D, padded / 2, o);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / l[r];
    uint16_t* dst = out + ((seg_start + row0 + r) * g.Hq + head) * D;
    for (int64_t d = 0; d < D; ++d) {
      Bf16 b;
      store(o[r * D + d] * inv, &b);
      dst[d] = b.bits;
    }
  }
}

struct Item {
  int64_t segment, head, row0, work;
};

void run(const Layout& g, const uint16_t* q, const uint16_t* k, const uint16_t* v, const std::vector<int64_t>& q_starts,
         const std::vector<int64_t>& kv_starts, uint16_t* out) {
  const int64_t S = int64_t(q_starts.size()) - 1, D = g.D, group = g.Hq / g.Hkv;
  std::vector<int64_t> padded_start(S + 1, 0);  // each segment's keys padded to KEY_PAD
  for (int64_t s = 0; s < S; ++s) {
    const int64_t L = kv_starts[s + 1] - kv_starts[s];
    padded_start[s + 1] = padded_start[s] + (L + KEY_PAD - 1) / KEY_PAD * KEY_PAD;
  }
  const int64_t total = padded_start[S];
  std::vector<uint16_t> kp(g.Hkv * total * D), vp(g.Hkv * total * D);
  auto packed = [&](std::vector<uint16_t>& buf, int64_t s, int64_t h) {
    return buf.data() + (h * total + padded_start[s]) * D;
  };
  const int64_t threads = torch::stable::get_num_threads();
  torch::stable::parallel_for(0, S * g.Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = i / g.Hkv, h = i % g.Hkv, L = kv_starts[s + 1] - kv_starts[s];
      pack_keys_values(k + kv_starts[s] * g.ks0 + h * g.ks1, g.ks0, v + kv_starts[s] * g.vs0 + h * g.vs1, g.vs0, L,
                       padded_start[s + 1] - padded_start[s], D, packed(kp, s, h), packed(vp, s, h));
    }
  });
  std::vector<Item> items;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = q_starts[s + 1] - q_starts[s], kv_len = kv_starts[s + 1] - kv_starts[s];
    for (int64_t r = 0; r < q_len; r += ROW_BLOCK) {
      const int64_t keys = g.causal ? kv_len - q_len + std::min(r + ROW_BLOCK, q_len) : kv_len;
      for (int64_t h = 0; h < g.Hq; ++h) items.push_back({s, h, r, keys * std::min(ROW_BLOCK, q_len - r)});
    }
  }
  // The items that see the most keys first, so the threads end together.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.work > b.work; });
  const ValueRows value_rows_fn = value_rows_for(D);
  const bool tiles = kTiles && D % 32 == 0;  // the tile loops take 32 dims at a time
  std::atomic<int64_t> next{0};
  const int64_t count = int64_t(items.size());
  torch::stable::parallel_for(0, std::min(threads, count), 1, [&](int64_t, int64_t) {
    std::vector<uint16_t> qbuf(ROW_BLOCK * D), p(ROW_BLOCK * KEY_CHUNK);
    std::vector<float> s(ROW_BLOCK * KEY_CHUNK), o(ROW_BLOCK * D), m(ROW_BLOCK), l(ROW_BLOCK);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) configure_tiles();
#endif
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      const Item& it = items[i];
      const int64_t h = it.head / group;
      const int64_t seg = it.segment;
      attend_rows(g, q, packed(kp, seg, h), packed(vp, seg, h), q_starts[seg], q_starts[seg + 1] - q_starts[seg],
                  kv_starts[seg + 1] - kv_starts[seg], it.head, it.row0, value_rows_fn, tiles, out, qbuf.data(),
                  s.data(), p.data(), o.data(), m.data(), l.data());
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) _tile_release();
#endif
  });
}

// A 1-D int64 tensor of segment bounds: from 0 to `total`, increasing (no empty segment).
std::vector<int64_t> read_starts(const Tensor& t, int64_t total, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Long && t.dim() == 1 && t.numel() >= 2, name,
                  " must be a 1-D int64 tensor [segments + 1]");
  Tensor c = as_contiguous(t);
  const int64_t* p = static_cast<const int64_t*>(c.const_data_ptr());
  std::vector<int64_t> starts(p, p + c.numel());
  STD_TORCH_CHECK(starts.front() == 0 && starts.back() == total, name, " must run from 0 to the row count ", total);
  for (size_t i = 1; i < starts.size(); ++i) {
    STD_TORCH_CHECK(starts[i] > starts[i - 1], name, " must be increasing (no empty segment)");
  }
  return starts;
}

#endif  // __AVX512BF16__

Tensor segment_attention(Tensor q, Tensor k, Tensor v, Tensor q_starts_in, Tensor kv_starts_in, bool causal,
                         double scale) {
#if defined(__AVX512BF16__)
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && q_starts_in.is_cpu() && kv_starts_in.is_cpu(),
                  "segment_attention: CPU tensors only");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [tokens, heads, head_dim]");
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::BFloat16 && k.scalar_type() == ScalarType::BFloat16 &&
                      v.scalar_type() == ScalarType::BFloat16,
                  "segment_attention: bfloat16 q, k and v only");
  const int64_t Nq = q.size(0), Hq = q.size(1), D = q.size(2), Nk = k.size(0), Hkv = k.size(1);
  STD_TORCH_CHECK(v.size(0) == Nk && v.size(1) == Hkv && k.size(2) == D && v.size(2) == D,
                  "k and v must be [keys, kv_heads, head_dim], head_dim as q's");
  STD_TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q_heads must be a multiple of kv_heads");
  STD_TORCH_CHECK(value_rows_for(D) != nullptr, "head_dim ", D, " must be a multiple of 16, at most ", MAX_D);
  const std::vector<int64_t> q_starts = read_starts(q_starts_in, Nq, "q_starts");
  const std::vector<int64_t> kv_starts = read_starts(kv_starts_in, Nk, "kv_starts");
  STD_TORCH_CHECK(q_starts.size() == kv_starts.size(), "q_starts and kv_starts must have one entry per segment");
  for (size_t s = 0; s + 1 < q_starts.size(); ++s) {
    STD_TORCH_CHECK(!causal || q_starts[s + 1] - q_starts[s] <= kv_starts[s + 1] - kv_starts[s], "segment ", s,
                    " has more queries than keys (causal: the last query sees every key)");
  }
  Tensor qc = q.stride(2) == 1 ? q : as_contiguous(q);
  Tensor kc = k.stride(2) == 1 ? k : as_contiguous(k);
  Tensor vc = v.stride(2) == 1 ? v : as_contiguous(v);
  const Layout g{Hq, Hkv, D, qc.stride(0), qc.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
                 causal, float(scale * M_LOG2E)};
  Tensor out = torch::stable::empty({Nq, Hq, D}, ScalarType::BFloat16, std::nullopt, q.device());
  run(g, static_cast<const uint16_t*>(qc.const_data_ptr()), static_cast<const uint16_t*>(kc.const_data_ptr()),
      static_cast<const uint16_t*>(vc.const_data_ptr()), q_starts, kv_starts,
      static_cast<uint16_t*>(out.mutable_data_ptr()));
  return out;
#else
  (void)q, (void)k, (void)v, (void)q_starts_in, (void)kv_starts_in, (void)causal, (void)scale;
  STD_TORCH_CHECK(false, "segment_attention needs AVX512-BF16 (this build's level has none; use SDPA)");
  return q;
#endif
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("segment_attention(Tensor q, Tensor k, Tensor v, Tensor q_starts, Tensor kv_starts, bool causal, "
        "float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("segment_attention", TORCH_BOX(&segment_attention));
}
