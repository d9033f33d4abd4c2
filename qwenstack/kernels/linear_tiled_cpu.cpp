// Linear layers on bfloat16 weights stored in a tile-packed layout, for any number of activation rows up to a
// decode batch: out[m, n] = sum_k x[m, k] * w[n, k].
//
// Why another layout: the row-major kernel (linear_cpu.cpp) makes AMX load each weight tile from 16 rows a
// matrix row apart, and loses to oneDNN's prepacked weights from about 24 activation rows (batched decode),
// while prepacking for oneDNN as well would keep two copies of every matrix. Here the weights are stored
// once, in the order both loops want:
//   packed[n / 16][k / 32][(k % 32) / 2][n % 16][k % 2]      (N % 16 == 0, K % 32 == 0)
// Each 16 output rows x 32 columns of w is one contiguous 1 KiB block that is exactly AMX's B operand (16
// rows of 32 bfloat16: a pair of consecutive k for each of the 16 n), and each 64-byte row of it is the
// operand of one vdpbf16ps against that pair of x broadcast to every lane: sixteen outputs accumulate in the
// sixteen lanes, with no horizontal sums. A thread's weights are one forward stream.
// - 1-2 rows (or no AMX): the vector loop, four accumulators per row (two per k pair parity) in flight.
// - 3 or more rows with AMX: activations are the A tiles (x copied once per call into the same 1 KiB tile
//   blocks), two weight blocks the B tiles, four accumulators: 32 rows x 32 outputs per pass, in chunks of
//   up to 128 rows. The caller sends long prefill chunks to F.linear on the unpacked matrix.
// - Builds without AVX512-BF16: the same layout through generic float32 vectors.
//
// Layout: x [M, K] float32 / bfloat16 / float16 (rounded to bfloat16 first, as the row-major kernel does),
// packed [N / 16, K / 32, 16, 16, 2] bfloat16, out [M, N] in x's dtype. Sums are float32.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
#include "cpu_amx.h"
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t TILE_N = 16, TILE_K = 32, BLOCK = TILE_N * TILE_K;  // a block: 512 bfloat16, 1 KiB
constexpr int64_t PAIRS = TILE_K / 2;                                  // k pairs per block
constexpr int64_t VEC_ROWS = 4;  // activation rows per pass of the vector loop over one column of blocks
constexpr int64_t PREFETCH_BLOCKS = 2;  // how far ahead the vector loop prefetches its weight stream

// Activation rows as bfloat16 bits (what the loops read) and, for the generic loop, float32.
struct Rows {
  int64_t M = 0, K = 0;
  std::vector<uint16_t> bf16;
  std::vector<float> f32;
};

#if defined(__AVX512BF16__)
// 16 float32 sums to 16 outputs: the accumulator tiles come back as rows of 16, and storing them one
// element at a time with scalar rounding took a fifth of a 64-row product.
inline void store16(const float* src, float* dst) { std::memcpy(dst, src, 16 * sizeof(float)); }
inline void store16(const float* src, Bf16* dst) {
  // vcvtneps2bf16 rounds to nearest even like store(); it also flushes float32 denormals (below 1.2e-38)
  // to zero, far below any sum's rounding.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src)));
}
inline void store16(const float* src, Fp16* dst) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT));
}

// MT rows [m0, m0 + MT) times the 16 outputs of block column nb.
template <int64_t MT, typename O>
inline void vec_block(const Rows& a, int64_t m0, const uint16_t* col, int64_t nb, O* out, int64_t N) {
  const int64_t K = a.K, kblocks = K / TILE_K;
  __m512 acc[MT][2];
  for (int64_t m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* blk = col + kb * BLOCK;
    for (int64_t p = 0; p < PAIRS; ++p) {
      // Each 64-byte row PREFETCH_BLOCKS blocks ahead (past the column's end it reads into the next one,
      // which the thread usually takes next).
      __builtin_prefetch(blk + PREFETCH_BLOCKS * BLOCK + p * 2 * TILE_N);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(blk + p * 2 * TILE_N);
      for (int64_t m = 0; m < MT; ++m) {
        int32_t pair;
        std::memcpy(&pair, a.bf16.data() + (m0 + m) * K + kb * TILE_K + 2 * p, sizeof pair);
        acc[m][p & 1] = _mm512_dpbf16_ps(acc[m][p & 1], w, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
  }
  for (int64_t m = 0; m < MT; ++m) {
    alignas(64) float s[TILE_N];
    _mm512_store_ps(s, _mm512_add_ps(acc[m][0], acc[m][1]));
    store16(s, out + (m0 + m) * N + nb * TILE_N);
  }
}
#else
// The generic loop: per 64-byte row of a block, the even elements (k even) and the odd ones of each of the
// 16 outputs, as float32 vectors of W lanes, times the pair of x.
template <int64_t MT, typename O>
inline void vec_block(const Rows& a, int64_t m0, const uint16_t* col, int64_t nb, O* out, int64_t N) {
  constexpr int64_t V = TILE_N / W;  // vectors per 16 outputs
  const int64_t K = a.K, kblocks = K / TILE_K;
  vf acc[MT][V];
  for (int64_t m = 0; m < MT; ++m)
    for (int64_t j = 0; j < V; ++j) acc[m][j] = vf{};
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* blk = col + kb * BLOCK;
    for (int64_t p = 0; p < PAIRS; ++p) {
      for (int64_t j = 0; j < V; ++j) {
        vu u;
        std::memcpy(&u, blk + p * 2 * TILE_N + j * 2 * W, sizeof u);
        const vf even = (vf)(u << 16), odd = (vf)(u & 0xFFFF0000u);
        for (int64_t m = 0; m < MT; ++m) {
          const float* xr = a.f32.data() + (m0 + m) * K + kb * TILE_K + 2 * p;
          acc[m][j] += even * xr[0] + odd * xr[1];
        }
      }
    }
  }
  for (int64_t m = 0; m < MT; ++m)
    for (int64_t j = 0; j < V; ++j)
      for (int64_t i = 0; i < W; ++i) store(acc[m][j][i], out + (m0 + m) * N + nb * TILE_N + j * W + i);
}
#endif

template <typename O>
void run_vec(const Rows& a, const uint16_t* packed, O* out, int64_t N) {
  const int64_t M = a.M, cols = N / TILE_N, col_size = a.K / TILE_K * BLOCK;
  // Enough block columns per task that a thread streams a long contiguous run of the weights.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, cols / 8));
  torch::stable::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint16_t* col = packed + nb * col_size;
      int64_t m = 0;
      for (; m + VEC_ROWS <= M; m += VEC_ROWS) vec_block<VEC_ROWS>(a, m, col, nb, out, N);
      switch (M - m) {
        case 1: vec_block<1>(a, m, col, nb, out, N); break;
        case 2: vec_block<2>(a, m, col, nb, out, N); break;
        case 3: vec_block<3>(a, m, col, nb, out, N); break;
        default: break;
      }
    }
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int64_t AMX_MIN_ROWS = 3;
constexpr int64_t AMX_CHUNK_ROWS = 128, AMX_CHUNK_BYTES = 512 * 1024;

// Tiles 0-3: accumulators C[i][j] (activation rows block i, outputs block j) = tile 2 * i + j; 4, 5:
// activation rows; 6, 7: weight blocks (configure_tiles of cpu_amx.h).

// Offset of activation tile (16-row block mt, 32-column block kb) in the tile-contiguous copy of x.
inline int64_t a_tile(int64_t mt, int64_t kb, int64_t kblocks) { return (mt * kblocks + kb) * 16 * TILE_K; }

// Rows [m_begin, m_begin + M) of x and of out.
template <typename O>
void run_amx(const Rows& a, int64_t m_begin, int64_t M, const uint16_t* packed, O* out_all, int64_t N) {
  const int64_t K = a.K, Mp = (M + 15) / 16 * 16, kblocks = K / TILE_K;
  O* out = out_all + m_begin * N;
  // A operands, tile-contiguous like the weights: xp[m / 16][k / 32][m % 16][k % 32], rows past M zero. Tiles
  // loaded from x itself take 16 rows a row apart, as slow here as the row-major weights were.
  std::vector<uint16_t> xp(Mp * K, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kb = 0; kb < kblocks; ++kb)
      std::memcpy(xp.data() + a_tile(m / 16, kb, kblocks) + (m % 16) * TILE_K,
                  a.bf16.data() + (m_begin + m) * K + kb * TILE_K, TILE_K * sizeof(uint16_t));
  const int64_t cols = N / TILE_N, pairs = (cols + 1) / 2, col_size = kblocks * BLOCK;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(8, pairs / 8));
  torch::stable::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float c[4][16][16];
    configure_tiles();
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t nb = 2 * pr;
      const bool both = nb + 1 < cols;  // an odd number of block columns leaves one alone at the end
      const uint16_t* w0 = packed + nb * col_size;
      const uint16_t* w1 = w0 + col_size;
      // The 32 outputs' weights (2 x K / 32 KiB) stay in L2 while every block of 32 rows passes over them.
      for (int64_t mb = 0; mb < Mp; mb += 32) {
        const bool two = mb + 16 < Mp;
        _tile_zero(0);
        if (both) _tile_zero(1);
        if (two) _tile_zero(2);
        if (two && both) _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          _tile_loadd(6, w0 + kb * BLOCK, 64);
          _tile_loadd(4, xp.data() + a_tile(mb / 16, kb, kblocks), 64);
          _tile_dpbf16ps(0, 4, 6);
          if (both) {
            _tile_loadd(7, w1 + kb * BLOCK, 64);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (two) {
            _tile_loadd(5, xp.data() + a_tile(mb / 16 + 1, kb, kblocks), 64);
            _tile_dpbf16ps(2, 5, 6);
            if (both) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64);
        if (both) _tile_stored(1, c[1], 64);
        if (two) _tile_stored(2, c[2], 64);
        if (two && both) _tile_stored(3, c[3], 64);
        for (int64_t i = 0; i < (two ? 2 : 1); ++i) {
          const int64_t m0 = mb + 16 * i, rows = std::min<int64_t>(16, M - m0);
          for (int64_t j = 0; j < (both ? 2 : 1); ++j)
            for (int64_t r = 0; r < rows; ++r) store16(c[2 * i + j][r], out + (m0 + r) * N + (nb + j) * TILE_N);
        }
      }
    }
    _tile_release();
  });
}
#endif

template <typename O>
void run(const Rows& a, const uint16_t* packed, O* out, int64_t N) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (a.M >= AMX_MIN_ROWS) {
    // Chunks of rows that stay in L2 while every weight block passes over them (the whole matrix streams
    // once per chunk; at this many rows per block the tile unit, not memory, sets the pace): 2,048 rows in
    // one piece re-read x from L3 for every 32 outputs and ran at half the speed of chunks.
    const int64_t chunk = std::max<int64_t>(32, std::min<int64_t>(AMX_CHUNK_ROWS, AMX_CHUNK_BYTES / (2 * a.K)) / 32 * 32);
    for (int64_t m = 0; m < a.M; m += chunk) run_amx(a, m, std::min(chunk, a.M - m), packed, out, N);
    return;
  }
#endif
  run_vec(a, packed, out, N);
}

template <typename T>
void read_rows(const void* src, Rows& a) {
  const T* p = static_cast<const T*>(src);
  const int64_t count = a.M * a.K;
  a.bf16.resize(count);
  if constexpr (std::is_same_v<T, Bf16>) {
    std::memcpy(a.bf16.data(), p, count * sizeof(uint16_t));  // already what the loops read
  } else {
    for (int64_t i = 0; i < count; ++i) store(to_float(p[i]), reinterpret_cast<Bf16*>(&a.bf16[i]));
  }
#if !defined(__AVX512BF16__)
  a.f32.resize(count);
  for (int64_t i = 0; i < count; ++i) a.f32[i] = to_float(reinterpret_cast<const Bf16*>(a.bf16.data())[i]);
#endif
}

Tensor linear_tiled(Tensor x_in, Tensor packed_in) {
  STD_TORCH_CHECK(x_in.is_cpu() && packed_in.is_cpu(), "linear_tiled: CPU tensors only");
  STD_TORCH_CHECK(x_in.dim() == 2, "linear_tiled: x must be [M, K]");
  STD_TORCH_CHECK(packed_in.dim() == 5 && packed_in.size(2) == PAIRS && packed_in.size(3) == TILE_N &&
                      packed_in.size(4) == 2, "linear_tiled: packed must be [N / 16, K / 32, 16, 16, 2]");
  STD_TORCH_CHECK(packed_in.scalar_type() == ScalarType::BFloat16, "linear_tiled: packed weights must be bfloat16");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed_in.size(0) * TILE_N;
  STD_TORCH_CHECK(packed_in.size(1) * TILE_K == K, "linear_tiled: x has ", K, " columns but the weights ",
                  packed_in.size(1) * TILE_K);
  Tensor x = torch::stable::contiguous(x_in);
  Tensor packed = torch::stable::contiguous(packed_in);
  Rows a;
  a.M = M;
  a.K = K;
  switch (x.scalar_type()) {
    case ScalarType::Float: read_rows<float>(x.const_data_ptr(), a); break;
    case ScalarType::BFloat16: read_rows<Bf16>(x.const_data_ptr(), a); break;
    case ScalarType::Half: read_rows<Fp16>(x.const_data_ptr(), a); break;
    default: STD_TORCH_CHECK(false, "linear_tiled: x must be float32, bfloat16 or float16");
  }
  Tensor out = torch::stable::empty({M, N}, x.scalar_type(), std::nullopt, x.device());
  if (M == 0 || N == 0) return out;
  const uint16_t* w = static_cast<const uint16_t*>(packed.const_data_ptr());
  switch (x.scalar_type()) {
    case ScalarType::Float: run(a, w, static_cast<float*>(out.mutable_data_ptr()), N); break;
    case ScalarType::BFloat16: run(a, w, static_cast<Bf16*>(out.mutable_data_ptr()), N); break;
    default: run(a, w, static_cast<Fp16*>(out.mutable_data_ptr()), N); break;
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) { m.def("linear_tiled(Tensor x, Tensor packed) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) { m.impl("linear_tiled", TORCH_BOX(&linear_tiled)); }
