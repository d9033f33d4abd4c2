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
// sixteen lanes, with no horizontal sums. A thread's weights are one contiguous share of the columns.
// - 1-2 rows (or no AMX): the vector loop, two accumulators per row and column (one per k pair parity), over
//   several weight streams side by side (VEC_ACCUMULATORS); without AMX, batches take 4 or 6 rows a pass.
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
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
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
constexpr int64_t VEC_ROWS = 2;  // activation rows per pass of the vector loops over their columns of blocks
// Without AMX, batches go through the vector loop too, with more rows a pass for each weight vector loaded:
// 4 rows x 2 streams from 4 rows, 6 rows x 2 streams from 6. Against 2 rows a pass (in-process A/B, four
// 0.6B matrices, 2 AVX512-BF16 cores): 1.25x at 4 rows, 1.33x at 8, 1.25x at 16 (then with 8 rows x 1 stream).
constexpr int64_t VEC_MID_ROWS = 4, VEC_BATCH_ROWS = 6;
// The batch tier keeps 24 sums in registers (6 rows x 2 streams x 2 chains), not VEC_ACCUMULATORS: each weight
// vector loaded serves 6 rows and each pair of x broadcast serves 2 columns, where 8 rows x 1 stream loaded a
// broadcast for every product. In-process A/B over six Qwen3 matrices (K 1,024 to 6,144), 2 AVX512-BF16 cores:
// 1.05-1.14x at 16-64 rows, 1.03-1.11x at 256-2,048, with the chunks below.
constexpr int64_t VEC_BATCH_ACCUMULATORS = 24;
// The vector loops read several weight streams side by side: each thread's share of the block columns cut
// into contiguous runs, one column of each run at a time. One forward stream per core read Qwen3-0.6B's
// 1.19 GB of packed linears at 16-18 GB/s on two Sapphire Rapids cores, eight streams at ~22: a core keeps
// more reads in flight over several streams than its prefetchers give a single one. As many streams as
// keep VEC_ACCUMULATORS vector sums in registers.
constexpr int64_t VEC_ACCUMULATORS = 16;
// One activation row (single-stream decode) reads its weights in half as many streams where there is no AMX:
// on two Zen 4 cores (AVX512-BF16) the 113 one-row products of a Qwen3-0.6B-shaped decode step read 1.08-1.33x
// (bfloat16, 4 streams a thread against 8) and 1.06-1.16x (int8, 2 against 4) as fast, alternated over 10-14
// rounds, and 2 / 1 streams no faster than 4 / 2 (benchmarks/RESULTS.md). Builds with AMX (Sapphire Rapids,
// where the 8 streams above were measured) keep VEC_ACCUMULATORS.
#if defined(__AMX_TILE__)
constexpr int64_t VEC_ONE_ROW_ACCUMULATORS = VEC_ACCUMULATORS;
#else
constexpr int64_t VEC_ONE_ROW_ACCUMULATORS = VEC_ACCUMULATORS / 2;
#endif
constexpr int64_t PREFETCH_BLOCKS = 2;  // how far ahead the vector loop prefetches its weight stream
// The vector loops hand out each product's block columns in about this many pieces per thread.
constexpr int64_t PIECES_PER_THREAD = 8;
// Batches (prefill chunks, many sequences) go over their rows in chunks whose activations stay in L2 while the
// columns of a piece pass over them, and a piece's columns are few enough to stay in L2 while the chunks pass:
// with every row at once, each 16 outputs re-read the whole activation matrix from L3 (2 MiB at 1,024 rows
// of 1,024 columns), and products of many rows and long rows ran 10-25% under oneDNN's.
constexpr int64_t CHUNK_BYTES = 192 * 1024, PIECE_BYTES = 384 * 1024;
// AMX from this many rows on; rows in chunks of at most AMX_CHUNK_ROWS and AMX_CHUNK_BYTES of activations.
constexpr int64_t AMX_MIN_ROWS = 3;
constexpr int64_t AMX_CHUNK_ROWS = 128, AMX_CHUNK_BYTES = 512 * 1024;

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

// MT rows [m0, m0 + MT) times the 16 outputs of each of the S block columns nb[0..S), read side by side.
template <int64_t S, int64_t MT, typename O>
inline void vec_block(const Rows& a, int64_t m0, const uint16_t* const* packed_cols, const int64_t* nb, O* out,
                      int64_t N) {
  const int64_t K = a.K, kblocks = K / TILE_K;
  __m512 acc[S][MT][2];
  for (int64_t s = 0; s < S; ++s)
    for (int64_t m = 0; m < MT; ++m) acc[s][m][0] = acc[s][m][1] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    // Pairs two at a time, the even one into chain 0 and the odd one into chain 1 by constant indices:
    // indexed as acc[..][p & 1] in a loop the compiler did not unroll, the accumulators lived on the stack,
    // and the batch loops ran at half the speed (a standalone loop at 16 rows, 2 AVX512-BF16 cores: 75 ->
    // 143 GMAC/s). The sums and their order are the same.
    for (int64_t p = 0; p < PAIRS; p += 2) {
      for (int64_t chain = 0; chain < 2; ++chain) {
        const int64_t q = p + chain;
        __m512bh xv[MT];
        for (int64_t m = 0; m < MT; ++m) {
          int32_t pair;
          std::memcpy(&pair, a.bf16.data() + (m0 + m) * K + kb * TILE_K + 2 * q, sizeof pair);
          xv[m] = (__m512bh)_mm512_set1_epi32(pair);
        }
        for (int64_t s = 0; s < S; ++s) {
          const uint16_t* blk = packed_cols[s] + kb * BLOCK;
          // Each 64-byte row PREFETCH_BLOCKS blocks ahead (past the column's end it reads into the next one,
          // which this stream takes next).
          __builtin_prefetch(blk + PREFETCH_BLOCKS * BLOCK + q * 2 * TILE_N);
          const __m512bh w = (__m512bh)_mm512_loadu_si512(blk + q * 2 * TILE_N);
          if (chain == 0) {
            for (int64_t m = 0; m < MT; ++m) acc[s][m][0] = _mm512_dpbf16_ps(acc[s][m][0], w, xv[m]);
          } else {
            for (int64_t m = 0; m < MT; ++m) acc[s][m][1] = _mm512_dpbf16_ps(acc[s][m][1], w, xv[m]);
          }
        }
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t m = 0; m < MT; ++m) {
      alignas(64) float sums[TILE_N];
      _mm512_store_ps(sums, _mm512_add_ps(acc[s][m][0], acc[s][m][1]));
      store16(sums, out + (m0 + m) * N + nb[s] * TILE_N);
    }
  }
}
#else
// The generic loop: per 64-byte row of a block, the even elements (k even) and the odd ones of each of the
// 16 outputs, as float32 vectors of W lanes, times the pair of x.
template <int64_t MT, typename O>
inline void vec_column(const Rows& a, int64_t m0, const uint16_t* col, int64_t nb, O* out, int64_t N) {
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

// Without AVX512-BF16 the columns go one after the other: the generic loop is bound by its conversions,
// not by the weight stream.
template <int64_t S, int64_t MT, typename O>
inline void vec_block(const Rows& a, int64_t m0, const uint16_t* const* packed_cols, const int64_t* nb, O* out,
                      int64_t N) {
  for (int64_t s = 0; s < S; ++s) vec_column<MT>(a, m0, packed_cols[s], nb[s], out, N);
}
#endif

// Pieces [0, count) of work over torch's threads, taken from a shared counter rather than one fixed share
// each: on a shared machine one core is often slower for a while (another tenant, an interrupt), and with
// fixed shares every product waited for it.
//
// parallel_column_streams: block columns [0, cols) over the threads in pieces of S contiguous runs of `run`
// columns, read side by side: columns(std::integral_constant<int64_t, S>{}, nb) takes the S columns nb[0..S).
// The columns left over when cols does not divide into pieces go one by one (as S = 1), as the last pieces.
// Each output column is summed by one thread in one order, so results do not depend on who took what.
template <typename Piece>
void parallel_pieces(int64_t count, const Piece& piece) {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  std::atomic<int64_t> next{0};
  const auto work = [&](int64_t, int64_t) {
    for (int64_t p = next.fetch_add(1); p < count; p = next.fetch_add(1)) piece(p);
  };
  torch::stable::parallel_for(0, std::min(threads, count), 1, work);  // one task runs inline
}

// How a product's rows and block columns are cut: rows [0, M) in chunks of `chunk` rows, pieces of at most
// `max_run` columns a stream.
struct Blocking {
  int64_t M, chunk, max_run;
};

// The blocking for M rows of row_bytes each against block columns of column_bytes each; chunks of whole
// passes of pass_rows rows.
inline Blocking blocking_for(int64_t M, int64_t row_bytes, int64_t column_bytes, int64_t pass_rows) {
  const int64_t chunk = std::max<int64_t>(pass_rows, CHUNK_BYTES / row_bytes / pass_rows * pass_rows);
  return {M, chunk, std::max<int64_t>(1, PIECE_BYTES / column_bytes)};
}

// Block columns [begin, begin + S * run) as S runs of `run` columns, read side by side, one column of each
// run at a time, for each chunk of rows in turn: columns(std::integral_constant<int64_t, S>{}, nb, m_begin,
// m_end) takes the S columns nb[0..S) for rows [m_begin, m_end).
template <int64_t S, typename Columns>
inline void column_streams(int64_t begin, int64_t run, const Blocking& blocking, const Columns& columns) {
  for (int64_t m = 0; m < blocking.M; m += blocking.chunk) {
    const int64_t m_end = std::min(blocking.M, m + blocking.chunk);
    for (int64_t i = 0; i < run; ++i) {
      int64_t nb[S];
      for (int64_t s = 0; s < S; ++s) nb[s] = begin + s * run + i;
      columns(std::integral_constant<int64_t, S>{}, nb, m, m_end);
    }
  }
}

template <int64_t S, typename Columns>
void parallel_column_streams(int64_t cols, const Blocking& blocking, const Columns& columns) {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t run = std::clamp<int64_t>(cols / (S * threads * PIECES_PER_THREAD), 1, blocking.max_run);
  const int64_t pieces = cols / (S * run), tail_begin = pieces * S * run, count = pieces + (cols - tail_begin);
  parallel_pieces(count, [&](int64_t piece) {
    if (piece >= pieces) {
      column_streams<1>(tail_begin + (piece - pieces), 1, blocking, columns);
    } else {
      column_streams<S>(piece * S * run, run, blocking, columns);
    }
  });
}

// Rows [m, M) in passes of MT rows, the rest in passes of 4, 2 and 1 (those under MT):
// pass(std::integral_constant<int64_t, rows>{}, m0) takes rows [m0, m0 + rows).
template <int64_t MT, typename Pass>
inline void row_passes(int64_t m, int64_t M, const Pass& pass) {
  for (; m + MT <= M; m += MT) pass(std::integral_constant<int64_t, MT>{}, m);
  if constexpr (MT > 4) {
    if (m + 4 <= M) pass(std::integral_constant<int64_t, 4>{}, m), m += 4;
  }
  if constexpr (MT > 2) {
    if (m + 2 <= M) pass(std::integral_constant<int64_t, 2>{}, m), m += 2;
  }
  if constexpr (MT > 1) {
    if (m < M) pass(std::integral_constant<int64_t, 1>{}, m);
  }
}

// The vector loops' tier for M rows: the most rows a pass that M allows (1, VEC_ROWS, VEC_MID_ROWS, then
// VEC_BATCH_ROWS where MAX_ROWS reaches it) and as many weight streams as keep VEC_ACCUMULATORS sums
// (VEC_ONE_ROW_ACCUMULATORS for one row, VEC_BATCH_ACCUMULATORS in the batch tier) in registers at SUMS per
// row and column: tier(streams, rows) with both as integral constants.
template <int64_t SUMS, int64_t MAX_ROWS, typename Tier>
void with_row_tier(int64_t M, const Tier& tier) {
  using std::integral_constant;
  if (M == 1) {
    tier(integral_constant<int64_t, VEC_ONE_ROW_ACCUMULATORS / SUMS>{}, integral_constant<int64_t, 1>{});
  } else if (M < VEC_MID_ROWS) {
    tier(integral_constant<int64_t, VEC_ACCUMULATORS / (SUMS * VEC_ROWS)>{},
         integral_constant<int64_t, VEC_ROWS>{});
  } else if (MAX_ROWS < VEC_BATCH_ROWS || M < VEC_BATCH_ROWS) {
    tier(integral_constant<int64_t, VEC_ACCUMULATORS / (SUMS * VEC_MID_ROWS)>{},
         integral_constant<int64_t, VEC_MID_ROWS>{});
  } else if constexpr (MAX_ROWS >= VEC_BATCH_ROWS) {  // (compiled only where the registers allow it)
    tier(integral_constant<int64_t, VEC_BATCH_ACCUMULATORS / (SUMS * VEC_BATCH_ROWS)>{},
         integral_constant<int64_t, VEC_BATCH_ROWS>{});
  }
}

// The vector loops' block columns [0, cols) over the threads at M rows' tier. columns_of(rows) is the
// columns callback of parallel_column_streams for that many rows a pass.
template <int64_t SUMS, int64_t MAX_ROWS, typename ColumnsOf>
void parallel_row_passes(const Blocking& blocking, int64_t cols, const ColumnsOf& columns_of) {
  with_row_tier<SUMS, MAX_ROWS>(blocking.M, [&](auto streams, auto rows) {
    parallel_column_streams<decltype(streams)::value>(cols, blocking, columns_of(rows));
  });
}

// Block columns nb[0..S) for rows [m_begin, m_end), MT rows a pass (row_passes).
template <int64_t S, int64_t MT, typename O>
inline void vec_columns(const Rows& a, const uint16_t* packed, const int64_t* nb, O* out, int64_t N,
                        int64_t m_begin, int64_t m_end) {
  const int64_t col_size = a.K / TILE_K * BLOCK;
  const uint16_t* packed_cols[S];
  for (int64_t s = 0; s < S; ++s) packed_cols[s] = packed + nb[s] * col_size;
  row_passes<MT>(m_begin, m_end, [&](auto rows, int64_t m) {
    vec_block<S, decltype(rows)::value>(a, m, packed_cols, nb, out, N);
  });
}

template <typename O>
void run_vec(const Rows& a, const uint16_t* packed, O* out, int64_t N) {
  // Two float32 sums per row and column (the two k-pair chains).
  const Blocking blocking = blocking_for(a.M, a.K * 2, a.K * TILE_N * 2, VEC_BATCH_ROWS);
  parallel_row_passes<2, VEC_BATCH_ROWS>(blocking, N / TILE_N, [&](auto rows) {
    return [&, rows](auto streams, const int64_t* nb, int64_t m_begin, int64_t m_end) {
      vec_columns<decltype(streams)::value, decltype(rows)::value>(a, packed, nb, out, N, m_begin, m_end);
    };
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

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
  const int64_t passes = (Mp + 31) / 32;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(8, pairs / 8));
  torch::stable::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float c[4][16][16];
    configure_tiles();
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t nb = 2 * pr;
      const bool both = nb + 1 < cols;  // an odd number of block columns leaves one alone at the end
      const uint16_t* w0 = packed + nb * col_size;
      const uint16_t* w1 = w0 + col_size;
      // The next pair's blocks are fetched into L2 while the tile unit works on these, spread over every pass
      // (the tile loads alone left batched decode waiting on memory; prefetch_share says why spread).
      const int64_t next_bytes = pr + 1 < end ? std::min<int64_t>(2, cols - nb - 2) * col_size * 2 : 0;
      // The 32 outputs' weights (2 x K / 32 KiB) stay in L2 while every block of 32 rows passes over them.
      for (int64_t mb = 0; mb < Mp; mb += 32) {
        const bool two = mb + 16 < Mp;
        _tile_zero(0);
        if (both) _tile_zero(1);
        if (two) _tile_zero(2);
        if (two && both) _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          prefetch_share(w0 + 2 * col_size, next_bytes, mb / 32 * kblocks + kb, passes * kblocks);
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

// The float32 copy of a's rows that the generic loop reads (builds without AVX512-BF16).
void fill_floats(Rows& a) {
#if !defined(__AVX512BF16__)
  const int64_t count = a.M * a.K;
  a.f32.resize(count);
  for (int64_t i = 0; i < count; ++i) a.f32[i] = to_float(reinterpret_cast<const Bf16*>(a.bf16.data())[i]);
#else
  (void)a;
#endif
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
  fill_floats(a);
}

// a.M rows of x [?, a.K], row m being x's row index[m].
void gather_rows(const Bf16* x, const int64_t* index, Rows& a) {
  a.bf16.resize(a.M * a.K);
  for (int64_t m = 0; m < a.M; ++m)
    std::memcpy(a.bf16.data() + m * a.K, x + index[m] * a.K, a.K * sizeof(uint16_t));
  fill_floats(a);
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
  Tensor x = as_contiguous(x_in);
  Tensor packed = as_contiguous(packed_in);
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


// ---------------------------------------------------------------------------------------------------------
// int8 weights (weight-only, one scale per output), tile-packed for AMX-INT8 and stored offset by 128:
//   packed[n / 16][k / 64][(k % 64) / 4][n % 16][k % 4] = w[n][k] + 128 (uint8)  (N % 16 == 0, K % 64 == 0)
// Each 16 outputs x 64 columns is one 1 KiB block, exactly a B operand of the tile unit (16 rows of 4
// consecutive k for each of the 16 n), and each 64-byte row of it is a vpdpbusd operand: 16 outputs x 4 k,
// one output per 32-bit lane, against 4 activation bytes broadcast.
// Activations are int16 per row (cpu_vec.h's quantize_rows_int16, at most I8_X_LIMIT in magnitude), split
// into two signed bytes x = 256 * hi + lo, so every product is a byte product with exact int32 sums:
//   sum_k w x = 256 * sum_k (w + 128) hi + sum_k (w + 128) lo - 128 * sum_k x.
// Why the offset: the byte dot-product instructions take one unsigned operand (vpdpbusd: unsigned x signed;
// TDPBSUD: signed x unsigned). Unsigned weights let both activation bytes be signed, and the correction is
// one sum per activation row. Widening the weights to int16 for vpdpwssd instead cost three shuffles per
// 64 bytes and ran at two thirds of this speed with the weights in cache.
// - 1-2 rows (or no AMX): the vector loop, over several weight streams side by side as for bfloat16.
// - 3 or more rows with AMX: hi and lo copied into tile blocks, two tile products per weight block.
// - Builds without AVX512-VNNI: the same arithmetic in scalar loops.
// Layout: x [M, K] float32 / bfloat16 / float16, packed [N / 16, K / 64, 16, 16, 4] uint8, scales [N] float,
// out [M, N] in x's dtype.
constexpr int64_t I8_TILE_K = 64, I8_GROUPS = I8_TILE_K / 4;  // a block: 16 x 64 bytes, 16 groups of 4 k
constexpr int64_t I8_BLOCK_BYTES = TILE_N * I8_TILE_K;
// |hi| <= 127 and |lo| <= 128 for |x| <= 32639 (32640 would need hi = 128).
constexpr float I8_X_LIMIT = 32639.f;
// Sums of hi (or lo) times (w + 128) stay in int32 up to this many columns: 255 * 128 * K < 2^31.
constexpr int64_t I8_MAX_K = 65536;

// Buffers the loops overwrite in full: no zero fill (std::vector's cost a tenth of a 256-row call).
template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t count) { return std::unique_ptr<T[]>(new T[count]); }

struct ByteRows {
  int64_t M = 0, K = 0;
  std::unique_ptr<int8_t[]> hi, lo;  // [M, K]: q = 256 * hi + lo, x[m, k] ~ q[m, k] * scale[m]
  std::vector<float> scale;
  std::vector<int64_t> sum;  // sum_k q[m, k]
};

// Fills a's hi, lo and sum from the int16 rows q [M, K].
inline void split_bytes(const int16_t* q, ByteRows& a) {
  const int64_t M = a.M, K = a.K;
  a.hi = uninitialized<int8_t>(M * K);
  a.lo = uninitialized<int8_t>(M * K);
  a.sum.assign(M, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* row = q + m * K;
    int8_t* hi = a.hi.get() + m * K;
    int8_t* lo = a.lo.get() + m * K;
    int64_t k = 0, sum = 0;
#if defined(__AVX512BW__)
    // The scalar loop below was not vectorized (the compiler could not rule out aliasing) and took most
    // of a call's time from 64 rows on.
    __m512i sums = _mm512_setzero_si512();
    for (; k + 32 <= K; k += 32) {
      const __m512i v = _mm512_loadu_si512(row + k);
      const __m256i low = _mm512_cvtepi16_epi8(v);  // v mod 256
      const __m512i high = _mm512_srai_epi16(_mm512_sub_epi16(v, _mm512_cvtepi8_epi16(low)), 8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), low);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), _mm512_cvtepi16_epi8(high));
      sums = _mm512_add_epi32(sums, _mm512_madd_epi16(v, _mm512_set1_epi16(1)));
    }
    sum = _mm512_reduce_add_epi32(sums);  // |q| <= 32639, K <= 65536: fits in int32
#endif
    for (; k < K; ++k) {
      const int8_t l = int8_t(row[k]);  // v mod 256, as a signed byte
      lo[k] = l;
      hi[k] = int8_t((row[k] - l) >> 8);  // exact: v - l is a multiple of 256
      sum += row[k];
    }
    a.sum[m] = sum;
  }
}

// Outputs n0 .. n0 + 16 of one activation row from the two int32 sums of each output.
template <typename O>
inline void i8_finish(const int32_t* hi, const int32_t* lo, int64_t x_sum, float x_scale, const float* w_scales,
                      O* out) {
  alignas(64) float s[TILE_N];
  for (int64_t i = 0; i < TILE_N; ++i) {  // exact in double (|values| < 2^53), then one rounding
    const double exact = 256.0 * double(hi[i]) + double(lo[i]) - 128.0 * double(x_sum);
    s[i] = float(exact) * x_scale * w_scales[i];
  }
#if defined(__AVX512BF16__)
  store16(s, out);
#else
  for (int64_t i = 0; i < TILE_N; ++i) store(s[i], out + i);
#endif
}

#if defined(__AVX512VNNI__)
// One 64-byte row of a block (16 outputs x 4 k) times MT rows' 4 hi and 4 lo bytes, into chain p.
template <int64_t MT>
inline __attribute__((always_inline)) void i8_group(const uint8_t* row, const ByteRows& a, int64_t m0, int64_t k,
                                                    __m512i (&acc)[MT][2][2], int p) {
  const __m512i w = _mm512_loadu_si512(row);
  for (int64_t m = 0; m < MT; ++m) {
    int32_t hi, lo;
    std::memcpy(&hi, a.hi.get() + (m0 + m) * a.K + k, sizeof hi);
    std::memcpy(&lo, a.lo.get() + (m0 + m) * a.K + k, sizeof lo);
    acc[m][p][0] = _mm512_dpbusd_epi32(acc[m][p][0], w, _mm512_set1_epi32(hi));
    acc[m][p][1] = _mm512_dpbusd_epi32(acc[m][p][1], w, _mm512_set1_epi32(lo));
  }
}

// MT rows [m0, m0 + MT) times the 16 outputs of each of the S block columns nb[0..S), read side by side.
template <int64_t S, int64_t MT, typename O>
inline void i8_vec_block(const ByteRows& a, int64_t m0, const uint8_t* const* packed_cols, const int64_t* nb,
                         const float* scales, O* out, int64_t N) {
  const int64_t kblocks = a.K / I8_TILE_K;
  __m512i acc[S][MT][2][2];  // [column][row][group parity][hi, lo]: two chains per sum keep the adds in flight
  for (int64_t s = 0; s < S; ++s)
    for (int64_t m = 0; m < MT; ++m)
      for (int64_t p = 0; p < 2; ++p) acc[s][m][p][0] = acc[s][m][p][1] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    // Groups in pairs, so each accumulator is named at compile time (an index computed at run time kept
    // them in memory).
    for (int64_t g = 0; g < I8_GROUPS; g += 2) {
      for (int64_t s = 0; s < S; ++s) {
        const uint8_t* blk = packed_cols[s] + kb * I8_BLOCK_BYTES;
        __builtin_prefetch(blk + PREFETCH_BLOCKS * I8_BLOCK_BYTES + g * 64);
        __builtin_prefetch(blk + PREFETCH_BLOCKS * I8_BLOCK_BYTES + g * 64 + 64);
        i8_group<MT>(blk + g * 64, a, m0, kb * I8_TILE_K + 4 * g, acc[s], 0);
        i8_group<MT>(blk + g * 64 + 64, a, m0, kb * I8_TILE_K + 4 * g + 4, acc[s], 1);
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t m = 0; m < MT; ++m) {
      alignas(64) int32_t hi[TILE_N], lo[TILE_N];
      _mm512_store_si512(hi, _mm512_add_epi32(acc[s][m][0][0], acc[s][m][1][0]));
      _mm512_store_si512(lo, _mm512_add_epi32(acc[s][m][0][1], acc[s][m][1][1]));
      i8_finish(hi, lo, a.sum[m0 + m], a.scale[m0 + m], scales + nb[s] * TILE_N,
                out + (m0 + m) * N + nb[s] * TILE_N);
    }
  }
}
#else
template <int64_t MT, typename O>
inline void i8_vec_column(const ByteRows& a, int64_t m0, const uint8_t* col, int64_t nb, const float* scales, O* out,
                          int64_t N) {
  const int64_t K = a.K, kblocks = K / I8_TILE_K;
  int32_t hi[MT][TILE_N] = {}, lo[MT][TILE_N] = {};
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    for (int64_t g = 0; g < I8_GROUPS; ++g) {
      const uint8_t* row = col + kb * I8_BLOCK_BYTES + g * 64;
      const int64_t k = kb * I8_TILE_K + 4 * g;
      for (int64_t m = 0; m < MT; ++m) {
        const int8_t* xh = a.hi.get() + (m0 + m) * K + k;
        const int8_t* xl = a.lo.get() + (m0 + m) * K + k;
        for (int64_t n = 0; n < TILE_N; ++n) {
          for (int64_t j = 0; j < 4; ++j) {
            hi[m][n] += int32_t(row[4 * n + j]) * xh[j];
            lo[m][n] += int32_t(row[4 * n + j]) * xl[j];
          }
        }
      }
    }
  }
  for (int64_t m = 0; m < MT; ++m)
    i8_finish(hi[m], lo[m], a.sum[m0 + m], a.scale[m0 + m], scales + nb * TILE_N, out + (m0 + m) * N + nb * TILE_N);
}

// Without AVX512-VNNI the columns go one after the other: the scalar loop is bound by its arithmetic.
template <int64_t S, int64_t MT, typename O>
inline void i8_vec_block(const ByteRows& a, int64_t m0, const uint8_t* const* packed_cols, const int64_t* nb,
                         const float* scales, O* out, int64_t N) {
  for (int64_t s = 0; s < S; ++s) i8_vec_column<MT>(a, m0, packed_cols[s], nb[s], scales, out, N);
}
#endif

// Block columns nb[0..S) for rows [m_begin, m_end), MT rows a pass (row_passes).
template <int64_t S, int64_t MT, typename O>
inline void i8_vec_columns(const ByteRows& a, const uint8_t* packed, const int64_t* nb, const float* scales, O* out,
                           int64_t N, int64_t m_begin, int64_t m_end) {
  const int64_t col_size = a.K / I8_TILE_K * I8_BLOCK_BYTES;
  const uint8_t* packed_cols[S];
  for (int64_t s = 0; s < S; ++s) packed_cols[s] = packed + nb[s] * col_size;
  row_passes<MT>(m_begin, m_end, [&](auto rows, int64_t m) {
    i8_vec_block<S, decltype(rows)::value>(a, m, packed_cols, nb, scales, out, N);
  });
}

template <typename O>
void i8_run_vec(const ByteRows& a, const uint8_t* packed, const float* scales, O* out, int64_t N) {
  // Four int32 sums per row and column (hi and lo, two group chains each), so batches stop at VEC_MID_ROWS.
  // (Two activation bytes a column: hi and lo.)
  const Blocking blocking = blocking_for(a.M, a.K * 2, a.K * TILE_N, VEC_MID_ROWS);
  parallel_row_passes<4, VEC_MID_ROWS>(blocking, N / TILE_N, [&](auto rows) {
    return [&, rows](auto streams, const int64_t* nb, int64_t m_begin, int64_t m_end) {
      i8_vec_columns<decltype(streams)::value, decltype(rows)::value>(a, packed, nb, scales, out, N, m_begin, m_end);
    };
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
// Tiles 0, 1: hi and lo sums of outputs block 0; 2, 3: of outputs block 1; 4, 5: the hi and lo activation
// tiles; 6, 7: the two weight blocks. Rows [m_begin, m_begin + M) of x and of out.
template <typename O>
void i8_run_amx(const ByteRows& a, int64_t m_begin, int64_t M, const uint8_t* packed, const float* scales,
                O* out_all, int64_t N) {
  const int64_t K = a.K, Mp = (M + 15) / 16 * 16, kblocks = K / I8_TILE_K;
  O* out = out_all + m_begin * N;
  // A operands, tile-contiguous: hi / lo [m / 16][k / 64][m % 16][k % 64], rows past M zero.
  std::unique_ptr<int8_t[]> xhi = uninitialized<int8_t>(Mp * K), xlo = uninitialized<int8_t>(Mp * K);
  for (int64_t m = 0; m < Mp; ++m) {
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t at = ((m / 16 * kblocks + kb) * 16 + m % 16) * I8_TILE_K, from = (m_begin + m) * K + kb * I8_TILE_K;
      if (m < M) {
        std::memcpy(xhi.get() + at, a.hi.get() + from, I8_TILE_K);
        std::memcpy(xlo.get() + at, a.lo.get() + from, I8_TILE_K);
      } else {
        std::memset(xhi.get() + at, 0, I8_TILE_K);
        std::memset(xlo.get() + at, 0, I8_TILE_K);
      }
    }
  }
  const int64_t cols = N / TILE_N, pairs = (cols + 1) / 2, col_size = kblocks * I8_BLOCK_BYTES;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(8, pairs / 8));
  torch::stable::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t c[4][16][16];
    configure_tiles();
    for (int64_t pr = begin; pr < end; ++pr) {
      const int64_t nb = 2 * pr;
      const bool both = nb + 1 < cols;
      const uint8_t* w0 = packed + nb * col_size;
      const uint8_t* w1 = w0 + col_size;
      // The next pair's blocks stream into L2 over every pass, as in run_amx (there was no prefetch here: 28
      // 0.6B layers' int8 products took 1.06-1.12x as long at 16-128 rows, in-process A/B on an AMX Xeon).
      const int64_t next_bytes = pr + 1 < end ? std::min<int64_t>(2, cols - nb - 2) * col_size : 0;
      for (int64_t mb = 0; mb < Mp; mb += 16) {
        _tile_zero(0); _tile_zero(1);
        if (both) { _tile_zero(2); _tile_zero(3); }
        const int64_t a0 = mb / 16 * kblocks * I8_BLOCK_BYTES;
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          prefetch_share(w0 + 2 * col_size, next_bytes, mb / 16 * kblocks + kb, Mp / 16 * kblocks);
          _tile_loadd(4, xhi.get() + a0 + kb * I8_BLOCK_BYTES, 64);
          _tile_loadd(5, xlo.get() + a0 + kb * I8_BLOCK_BYTES, 64);
          _tile_loadd(6, w0 + kb * I8_BLOCK_BYTES, 64);
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 5, 6);
          if (both) {
            _tile_loadd(7, w1 + kb * I8_BLOCK_BYTES, 64);
            _tile_dpbsud(2, 4, 7);
            _tile_dpbsud(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
        if (both) { _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64); }
        const int64_t rows = std::min<int64_t>(16, M - mb);
        for (int64_t j = 0; j < (both ? 2 : 1); ++j) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t m = m_begin + mb + r;
            i8_finish(c[2 * j][r], c[2 * j + 1][r], a.sum[m], a.scale[m], scales + (nb + j) * TILE_N,
                      out + (mb + r) * N + (nb + j) * TILE_N);
          }
        }
      }
    }
    _tile_release();
  });
}
#endif

template <typename O>
void i8_run(const ByteRows& a, const uint8_t* packed, const float* scales, O* out, int64_t N) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
  if (a.M >= AMX_MIN_ROWS) {
    // Row chunks whose two activation copies stay in L2 while every weight block passes over them.
    const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(AMX_CHUNK_ROWS, AMX_CHUNK_BYTES / (2 * a.K)) / 16 * 16);
    for (int64_t m = 0; m < a.M; m += chunk) i8_run_amx(a, m, std::min(chunk, a.M - m), packed, scales, out, N);
    return;
  }
#endif
  i8_run_vec(a, packed, scales, out, N);
}

Tensor linear_tiled_int8(Tensor x_in, Tensor packed_in, Tensor scales_in) {
  STD_TORCH_CHECK(x_in.is_cpu() && packed_in.is_cpu() && scales_in.is_cpu(), "linear_tiled_int8: CPU tensors only");
  STD_TORCH_CHECK(x_in.dim() == 2, "linear_tiled_int8: x must be [M, K]");
  STD_TORCH_CHECK(packed_in.dim() == 5 && packed_in.size(2) == I8_GROUPS && packed_in.size(3) == TILE_N &&
                      packed_in.size(4) == 4, "linear_tiled_int8: packed must be [N / 16, K / 64, 16, 16, 4]");
  STD_TORCH_CHECK(packed_in.scalar_type() == ScalarType::Byte, "linear_tiled_int8: packed weights must be uint8");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed_in.size(0) * TILE_N;
  STD_TORCH_CHECK(packed_in.size(1) * I8_TILE_K == K, "linear_tiled_int8: x has ", K, " columns but the weights ",
                  packed_in.size(1) * I8_TILE_K);
  STD_TORCH_CHECK(K <= I8_MAX_K, "linear_tiled_int8: at most ", I8_MAX_K, " columns");
  STD_TORCH_CHECK(scales_in.dim() == 1 && scales_in.size(0) == N, "linear_tiled_int8: scales must be [N]");
  Tensor x = as_contiguous(x_in);
  Tensor packed = as_contiguous(packed_in);
  Tensor sc = as_contiguous(scales_in);
  std::unique_ptr<float[]> xf = uninitialized<float>(M * K);
  std::vector<float> scales(N);
  STD_TORCH_CHECK(read_floats(x.scalar_type(), x.const_data_ptr(), M * K, xf.get()),
                  "linear_tiled_int8: x must be float32, bfloat16 or float16");
  STD_TORCH_CHECK(read_floats(sc.scalar_type(), sc.const_data_ptr(), N, scales.data()),
                  "linear_tiled_int8: scales must be float32, bfloat16 or float16");
  ByteRows a;
  a.M = M;
  a.K = K;
  std::unique_ptr<int16_t[]> q = uninitialized<int16_t>(M * K);
  a.scale.resize(M);
  quantize_rows_int16(xf.get(), M, K, q.get(), a.scale.data(), I8_X_LIMIT);
  split_bytes(q.get(), a);
  Tensor out = torch::stable::empty({M, N}, x.scalar_type(), std::nullopt, x.device());
  if (M == 0 || N == 0) return out;
  const uint8_t* w = static_cast<const uint8_t*>(packed.const_data_ptr());
  switch (x.scalar_type()) {
    case ScalarType::Float: i8_run(a, w, scales.data(), static_cast<float*>(out.mutable_data_ptr()), N); break;
    case ScalarType::BFloat16: i8_run(a, w, scales.data(), static_cast<Bf16*>(out.mutable_data_ptr()), N); break;
    default: i8_run(a, w, scales.data(), static_cast<Fp16*>(out.mutable_data_ptr()), N); break;
  }
  return out;
}


// ---------------------------------------------------------------------------------------------------------
// int4 weights (weight-only, asymmetric in groups of G input columns: formats.Int4Weight's w = (q - 8) * scale
// + zero, q in 0..15, scale and zero bfloat16), tile-packed for the bfloat16 dot products:
//   packed[n / 16][k / 8][n % 16][e] = sum over t in 0..3 of q[n][k0 + 2t + e] << 4t   (16-bit words; k0 = k / 8 * 8)
// Each 64 bytes are 16 outputs x 8 columns: nibble t of the words is a vdpbf16ps operand, the pair of columns
// (k0 + 2t, k0 + 2t + 1) of each of the 16 outputs, in its lane order. A shift and one ternary logic op turn
// nibble t of every word into the bfloat16 of 128 + q (0x4300 | q: 128 to 143 are bfloat16's integers with
// exponent 7), so per group and output:
//   sum_k x[k] w[k] = scale * sum_k x[k] (128 + q[k]) + (zero - 136 * scale) * sum_k x[k]
// with the first sum in float32 over exact products (a bfloat16 times an integer of 8 bits) and the second
// computed once per row and group. Activations stay bfloat16, as torch's int4 kernel and the reference take
// them: no activation quantization, unlike int8. (Looking the codes up as q - 8 with vpermw read at half the
// rate on Zen 4: the permute, not memory, set the pace.)
// Why: torch's _weight_int4pack_mm_for_cpu is bound by its unpacking, so int4 decoded no faster than int8 while
// reading half the bytes (benchmarks/RESULTS.md, "int4 in a tiled layout").
// - Any row count goes through the vector loop, prefill chunks too (4 rows a pass): on 2 AVX512-BF16 cores it
//   ran at twice the speed of torch's kernel from 16 to 1,024 rows. There is no AMX tile loop for int4: with
//   AMX, bfloat16 tiles on a dequantized copy would likely be faster for long prompts (not measured).
// - Builds without AVX512-BF16: the same sums in scalar loops.
// Layout: x [M, K] float32 / bfloat16 / float16 (rounded to bfloat16), packed [N / 16, K / 8, 16, 2] int16,
// scale_zeros [N / 16, K / G, 16, 2] bfloat16 (layouts.pack_scale_zeros_int4: each block column's groups in one
// run), out [M, N] in x's dtype.
constexpr int64_t I4_COLUMNS = 8;                  // columns a 64-byte line of a block column holds
constexpr int64_t I4_LINE_WORDS = TILE_N * 2;      // 16 outputs x 2 words (4 nibbles each)
constexpr int64_t I4_PREFETCH_WORDS = 512;         // how far ahead the loop prefetches each weight stream (1 KiB)
constexpr float I4_CODE_OFFSET = 128.f + 8.f;      // the bfloat16 codes are 128 + q; w is (q - 8) * scale + zero

// Activation rows for the int4 loops: bfloat16 bits (and float32 for the generic loop), and each row's sum of
// each group of G columns.
struct GroupRows {
  Rows rows;
  int64_t G = 0;
  std::vector<float> sums;  // [M, K / G]
};

inline void group_sums(GroupRows& a) {
  const int64_t M = a.rows.M, K = a.rows.K, groups = K / a.G;
  a.sums.assign(M * groups, 0.f);
  const Bf16* x = reinterpret_cast<const Bf16*>(a.rows.bf16.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
      for (int64_t k = g * a.G; k < (g + 1) * a.G; ++k) sum += to_float(x[m * K + k]);
      a.sums[m * groups + g] = sum;
    }
}

#if defined(__AVX512BF16__)
// MT rows [m0, m0 + MT) times the 16 outputs of each of the S block columns nb[0..S), read side by side.
template <int64_t S, int64_t MT, typename O>
inline void i4_vec_block(const GroupRows& a, int64_t m0, const uint16_t* const* packed_cols, const int64_t* nb,
                         const uint16_t* scale_zeros, O* out, int64_t N) {
  const int64_t K = a.rows.K, G = a.G, groups = K / G;
  const __m512i nibble = _mm512_set1_epi16(0xF), exponent = _mm512_set1_epi16(0x4300);
  const uint16_t* x = a.rows.bf16.data();
  __m512 total[S][MT];
  for (int64_t s = 0; s < S; ++s)
    for (int64_t m = 0; m < MT; ++m) total[s][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[S][MT][2];  // [column][row][even, odd pair of columns]: two chains keep the adds in flight
    for (int64_t s = 0; s < S; ++s)
      for (int64_t m = 0; m < MT; ++m) acc[s][m][0] = acc[s][m][1] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += I4_COLUMNS) {
      __m512bh xv[MT][4];
      for (int64_t m = 0; m < MT; ++m)
        for (int64_t t = 0; t < 4; ++t) {
          int32_t pair;
          std::memcpy(&pair, x + (m0 + m) * K + k + 2 * t, sizeof pair);
          xv[m][t] = (__m512bh)_mm512_set1_epi32(pair);
        }
      for (int64_t s = 0; s < S; ++s) {
        const uint16_t* src = packed_cols[s] + k / I4_COLUMNS * I4_LINE_WORDS;
        __builtin_prefetch(src + I4_PREFETCH_WORDS);
        const __m512i words = _mm512_loadu_si512(src);
        // 0xEA: (a & b) | c, nibble t of each word as the bfloat16 of 128 + q
        const __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(words, nibble, exponent, 0xEA);
        const __m512bh w1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, exponent, 0xEA);
        const __m512bh w2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), nibble, exponent, 0xEA);
        const __m512bh w3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 12), exponent);
        for (int64_t m = 0; m < MT; ++m) {
          acc[s][m][0] = _mm512_dpbf16_ps(acc[s][m][0], w0, xv[m][0]);
          acc[s][m][1] = _mm512_dpbf16_ps(acc[s][m][1], w1, xv[m][1]);
          acc[s][m][0] = _mm512_dpbf16_ps(acc[s][m][0], w2, xv[m][2]);
          acc[s][m][1] = _mm512_dpbf16_ps(acc[s][m][1], w3, xv[m][3]);
        }
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      // The 16 outputs' (scale, zero) pairs of the group are one 64-byte line, next to the column's other groups:
      // the scale in the low half of each 32-bit lane, the zero in the high half, so each widens to float32 in
      // one instruction.
      const __m512i line = _mm512_loadu_si512(scale_zeros + 2 * (nb[s] * groups + g) * TILE_N);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(line, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(line, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
      const __m512 offset_zero = _mm512_fnmadd_ps(_mm512_set1_ps(I4_CODE_OFFSET), scale, zero);
      for (int64_t m = 0; m < MT; ++m) {
        const __m512 sum = _mm512_add_ps(acc[s][m][0], acc[s][m][1]);
        total[s][m] = _mm512_fmadd_ps(scale, sum, total[s][m]);
        total[s][m] = _mm512_fmadd_ps(offset_zero, _mm512_set1_ps(a.sums[(m0 + m) * groups + g]), total[s][m]);
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t m = 0; m < MT; ++m) {
      alignas(64) float sums[TILE_N];
      _mm512_store_ps(sums, total[s][m]);
      store16(sums, out + (m0 + m) * N + nb[s] * TILE_N);
    }
  }
}
#else
template <int64_t MT, typename O>
inline void i4_vec_column(const GroupRows& a, int64_t m0, const uint16_t* col, int64_t nb,
                          const uint16_t* scale_zeros, O* out, int64_t N) {
  const int64_t K = a.rows.K, G = a.G, groups = K / G;
  float total[MT][TILE_N] = {};
  for (int64_t g = 0; g < groups; ++g) {
    float acc[MT][TILE_N] = {};
    for (int64_t k = g * G; k < (g + 1) * G; k += I4_COLUMNS) {
      const uint16_t* src = col + k / I4_COLUMNS * I4_LINE_WORDS;
      for (int64_t m = 0; m < MT; ++m) {
        const float* xr = a.rows.f32.data() + (m0 + m) * K + k;
        for (int64_t n = 0; n < TILE_N; ++n)
          for (int64_t e = 0; e < 2; ++e)
            for (int64_t t = 0; t < 4; ++t) acc[m][n] += xr[2 * t + e] * float((src[2 * n + e] >> (4 * t)) & 0xF);
      }
    }
    for (int64_t n = 0; n < TILE_N; ++n) {
      const uint16_t* sz = scale_zeros + 2 * ((nb * groups + g) * TILE_N + n);
      const float scale = to_float(Bf16{sz[0]}), zero = to_float(Bf16{sz[1]});
      for (int64_t m = 0; m < MT; ++m)
        total[m][n] += scale * acc[m][n] + (zero - 8.f * scale) * a.sums[(m0 + m) * groups + g];
    }
  }
  for (int64_t m = 0; m < MT; ++m)
    for (int64_t n = 0; n < TILE_N; ++n) store(total[m][n], out + (m0 + m) * N + nb * TILE_N + n);
}

// Without AVX512-BF16 the columns go one after the other: the scalar loop is bound by its arithmetic.
template <int64_t S, int64_t MT, typename O>
inline void i4_vec_block(const GroupRows& a, int64_t m0, const uint16_t* const* packed_cols, const int64_t* nb,
                         const uint16_t* scale_zeros, O* out, int64_t N) {
  for (int64_t s = 0; s < S; ++s) i4_vec_column<MT>(a, m0, packed_cols[s], nb[s], scale_zeros, out, N);
}
#endif

// The int4 loop keeps three float32 sums per row and column (the low and high nibbles' chains of the current
// group, and the total): 4 streams at one row, 2 streams of 2 rows, then 1 stream of 4 rows a pass, 12 of the
// 32 vector registers, with the rows' activation pairs and the decoded weights beside them.
template <typename O>
void i4_run(const GroupRows& a, const uint16_t* packed, const uint16_t* scale_zeros, O* out, int64_t N) {
  const int64_t col_size = a.rows.K / I4_COLUMNS * I4_LINE_WORDS, cols = N / TILE_N;
  const Blocking blocking = blocking_for(a.rows.M, a.rows.K * 2, col_size * 2, VEC_MID_ROWS);
  const auto go = [&](auto streams, auto rows) {
    constexpr int64_t S = decltype(streams)::value, MT = decltype(rows)::value;
    parallel_column_streams<S>(cols, blocking, [&](auto width, const int64_t* nb, int64_t m_begin, int64_t m_end) {
      constexpr int64_t W = decltype(width)::value;
      const uint16_t* packed_cols[W];
      for (int64_t s = 0; s < W; ++s) packed_cols[s] = packed + nb[s] * col_size;
      row_passes<MT>(m_begin, m_end, [&](auto pass_rows, int64_t m) {
        i4_vec_block<W, decltype(pass_rows)::value>(a, m, packed_cols, nb, scale_zeros, out, N);
      });
    });
  };
  using std::integral_constant;
  if (a.rows.M == 1) {
    go(integral_constant<int64_t, 4>{}, integral_constant<int64_t, 1>{});
  } else if (a.rows.M < VEC_MID_ROWS) {
    go(integral_constant<int64_t, 2>{}, integral_constant<int64_t, VEC_ROWS>{});
  } else {
    go(integral_constant<int64_t, 1>{}, integral_constant<int64_t, VEC_MID_ROWS>{});
  }
}

Tensor linear_tiled_int4(Tensor x_in, Tensor packed_in, Tensor scale_zeros_in) {
  STD_TORCH_CHECK(x_in.is_cpu() && packed_in.is_cpu() && scale_zeros_in.is_cpu(),
                  "linear_tiled_int4: CPU tensors only");
  STD_TORCH_CHECK(x_in.dim() == 2, "linear_tiled_int4: x must be [M, K]");
  STD_TORCH_CHECK(packed_in.dim() == 4 && packed_in.size(2) == TILE_N && packed_in.size(3) == 2 &&
                      packed_in.scalar_type() == ScalarType::Short,
                  "linear_tiled_int4: packed must be int16 [N / 16, K / 8, 16, 2]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed_in.size(0) * TILE_N;
  STD_TORCH_CHECK(packed_in.size(1) * I4_COLUMNS == K, "linear_tiled_int4: x has ", K, " columns but the weights ",
                  packed_in.size(1) * I4_COLUMNS);
  STD_TORCH_CHECK(scale_zeros_in.dim() == 4 && scale_zeros_in.size(0) * TILE_N == N &&
                      scale_zeros_in.size(2) == TILE_N && scale_zeros_in.size(3) == 2 &&
                      scale_zeros_in.scalar_type() == ScalarType::BFloat16,
                  "linear_tiled_int4: scale_zeros must be bfloat16 [N / 16, K / group, 16, 2]");
  const int64_t groups = scale_zeros_in.size(1);
  STD_TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % I4_COLUMNS == 0,
                  "linear_tiled_int4: ", groups, " groups do not cut ", K, " columns into multiples of 8");
  Tensor x = as_contiguous(x_in);
  Tensor packed = as_contiguous(packed_in);
  Tensor sz = as_contiguous(scale_zeros_in);
  GroupRows a;
  a.rows.M = M;
  a.rows.K = K;
  a.G = K / groups;
  switch (x.scalar_type()) {
    case ScalarType::Float: read_rows<float>(x.const_data_ptr(), a.rows); break;
    case ScalarType::BFloat16: read_rows<Bf16>(x.const_data_ptr(), a.rows); break;
    case ScalarType::Half: read_rows<Fp16>(x.const_data_ptr(), a.rows); break;
    default: STD_TORCH_CHECK(false, "linear_tiled_int4: x must be float32, bfloat16 or float16");
  }
  Tensor out = torch::stable::empty({M, N}, x.scalar_type(), std::nullopt, x.device());
  if (M == 0 || N == 0) return out;
  group_sums(a);
  const uint16_t* w = static_cast<const uint16_t*>(packed.const_data_ptr());
  const uint16_t* s = static_cast<const uint16_t*>(sz.const_data_ptr());
  switch (x.scalar_type()) {
    case ScalarType::Float: i4_run(a, w, s, static_cast<float*>(out.mutable_data_ptr()), N); break;
    case ScalarType::BFloat16: i4_run(a, w, s, static_cast<Bf16*>(out.mutable_data_ptr()), N); break;
    default: i4_run(a, w, s, static_cast<Fp16*>(out.mutable_data_ptr()), N); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// A MoE layer's experts (models/moe.py's Experts) in one call, from the routed tokens to their weighted sum:
//   pairs r = 0..R sorted by expert (o_e, o_e + counts[e]) are expert e's; pair r is token token_of[r] at weight w[r]
//   for each expert e: h = x[token_of[pairs]] W_gate_up[e]^T, a = silu_mul(h) (cpu_vec.h, the rounding of
//     models/layers.py), y = a W_down[e]^T
//   out[t] = the float32 sum over t's pairs, in pair order, of bf16(y[r] * w[r]), rounded to bfloat16 once
// every product rounded to bfloat16 as linear_tiled's are, so out is bit for bit Experts' torch path around the
// loop of linear_tiled and silu_mul: x[token_of], the loop, `*= w` and index_add_ into zeros (which sums a
// bfloat16 tensor's slices in float32 and rounds once).
// Why one call: a decode step of 32 sequences over the top 10 of 128 experts runs ~118 experts a layer at ~2.5
// rows each, 236 products of 2-4 MB, and as separate calls each one woke the threads, split its few columns
// among them and waited for the slower one, with Python's slicing and SiLU between: here the block columns of
// every expert are one queue of pieces for the threads, one queue for the gate/up products and one for the down
// products. Why the gather and the sum inside: a 2,048-token prefill chunk of 8 experts a token has 16,384 pairs,
// and its [R, H] and [R, 2I] intermediates (~300 MB a layer at H = 2,048) were fresh allocations that the C
// allocator maps from the kernel and unmaps on free, page by page: ~300K page faults a chunk, 0.4-0.7 s of a
// ~3 s step. Experts go in groups of at most MOE_GROUP_ROWS pairs through buffers of that size instead.
// Vector loops only (any row count; with AMX the caller sends groups of more than a few rows expert by expert
// through linear_tiled's tile loop).
// Layout: x [T, H] bfloat16; token_of [R] int64; weights [R] bfloat16; counts [E] int64 (sum R); gate_up
// [E, 2I / 16, H / 32, 16, 16, 2] and down [E, H / 16, I / 32, 16, 16, 2] bfloat16 (pack_tiles of each expert);
// out [T, H] bfloat16.
constexpr int64_t MOE_PIECE_COLUMNS = 16;  // block columns a piece (256 outputs): 1 MiB of weights at K = 2048
constexpr int64_t MOE_GROUP_ROWS = 4096;   // pairs a group of experts (one expert may bring more)

// One phase: for every expert with rows, its rows' product with its matrix (packed + e * expert_size), block
// columns in pieces of at most MOE_PIECE_COLUMNS, read in the tier of streams that its row count takes.
void moe_phase(const std::vector<Rows>& rows, const std::vector<int64_t>& experts, const uint16_t* packed,
               int64_t expert_size, int64_t N, Bf16* out, const std::vector<int64_t>& first_row) {
  const int64_t cols = N / TILE_N, per_expert = (cols + MOE_PIECE_COLUMNS - 1) / MOE_PIECE_COLUMNS;
  parallel_pieces(int64_t(experts.size()) * per_expert, [&](int64_t piece) {
    const int64_t i = piece / per_expert, begin = piece % per_expert * MOE_PIECE_COLUMNS;
    const int64_t end = std::min(cols, begin + MOE_PIECE_COLUMNS);
    const Rows& a = rows[i];
    const uint16_t* w = packed + experts[i] * expert_size;
    Bf16* o = out + first_row[i] * N;
    const Blocking blocking = blocking_for(a.M, a.K * 2, a.K * TILE_N * 2, VEC_BATCH_ROWS);
    with_row_tier<2, VEC_BATCH_ROWS>(a.M, [&](auto streams, auto tier_rows) {
      constexpr int64_t S = decltype(streams)::value, MT = decltype(tier_rows)::value;
      const int64_t run = (end - begin) / S;
      const auto columns = [&](auto width, const int64_t* nb, int64_t m_begin, int64_t m_end) {
        vec_columns<decltype(width)::value, MT>(a, w, nb, o, N, m_begin, m_end);
      };
      column_streams<S>(begin, run, blocking, columns);
      for (int64_t nb = begin + S * run; nb < end; ++nb) column_streams<1>(nb, 1, blocking, columns);
    });
  });
}

// Each token's pairs in pair order: pairs_of[first[t], first[t + 1]) (a counting sort of token_of, stable).
struct TokenPairs {
  std::vector<int64_t> first, pairs_of;

  TokenPairs(const int64_t* token_of, int64_t R, int64_t T) : first(T + 1, 0), pairs_of(R) {
    for (int64_t r = 0; r < R; ++r) {
      STD_TORCH_CHECK(token_of[r] >= 0 && token_of[r] < T, "moe_tiled: pair ", r, " names token ", token_of[r],
                      " of ", T);
      ++first[token_of[r] + 1];
    }
    for (int64_t t = 0; t < T; ++t) first[t + 1] += first[t];
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t r = 0; r < R; ++r) pairs_of[next[token_of[r]]++] = r;
  }
};

// sums[t] += bf16(y[r - r0] * w[r]) in float32 for each of t's pairs r in [r0, r1), in pair order; cursor[t] is
// t's next pair. H is a multiple of TILE_K (moe_tiled checks it), so of W.
void add_weighted(const TokenPairs& tp, std::vector<int64_t>& cursor, const Bf16* y, const Bf16* w, int64_t r0,
                  int64_t r1, int64_t H, float* sums) {
  constexpr int64_t TOKENS_A_PIECE = 16;
  const int64_t T = int64_t(cursor.size());
  parallel_pieces((T + TOKENS_A_PIECE - 1) / TOKENS_A_PIECE, [&](int64_t piece) {
    for (int64_t t = piece * TOKENS_A_PIECE; t < std::min(T, (piece + 1) * TOKENS_A_PIECE); ++t) {
      for (int64_t& c = cursor[t]; c < tp.first[t + 1] && tp.pairs_of[c] < r1; ++c) {
        const int64_t r = tp.pairs_of[c];
        const Bf16* src = y + (r - r0) * H;
        float* dst = sums + t * H;
        const float weight = to_float(w[r]);
        for (int64_t j = 0; j < H; j += W)
          store_exact(load_vec(dst + j) + round_to<Bf16>(load_vec(src + j) * weight), dst + j);
      }
    }
  });
}

Tensor moe_tiled(Tensor x_in, Tensor token_of_in, Tensor weights_in, Tensor counts_in, Tensor gate_up_in,
                 Tensor down_in) {
  STD_TORCH_CHECK(x_in.is_cpu() && token_of_in.is_cpu() && weights_in.is_cpu() && counts_in.is_cpu() &&
                      gate_up_in.is_cpu() && down_in.is_cpu(), "moe_tiled: CPU tensors only");
  STD_TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == ScalarType::BFloat16,
                  "moe_tiled: x must be bfloat16 [T, H]");
  STD_TORCH_CHECK(gate_up_in.dim() == 6 && down_in.dim() == 6 && gate_up_in.scalar_type() == ScalarType::BFloat16 &&
                      down_in.scalar_type() == ScalarType::BFloat16,
                  "moe_tiled: gate_up and down must be bfloat16 [E, N / 16, K / 32, 16, 16, 2]");
  const int64_t T = x_in.size(0), H = x_in.size(1), E = gate_up_in.size(0);
  const int64_t I2 = gate_up_in.size(1) * TILE_N, I = I2 / 2;
  STD_TORCH_CHECK(gate_up_in.size(2) * TILE_K == H && down_in.size(0) == E && down_in.size(1) * TILE_N == H &&
                      down_in.size(2) * TILE_K == I && I % TILE_N == 0,
                  "moe_tiled: the stacks do not match x's ", H, " columns or each other");
  STD_TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == E && counts_in.scalar_type() == ScalarType::Long,
                  "moe_tiled: counts must be int64 [E]");
  const int64_t R = token_of_in.dim() == 1 ? token_of_in.size(0) : -1;
  STD_TORCH_CHECK(R >= 0 && token_of_in.scalar_type() == ScalarType::Long, "moe_tiled: token_of must be int64 [R]");
  STD_TORCH_CHECK(weights_in.dim() == 1 && weights_in.size(0) == R && weights_in.scalar_type() == ScalarType::BFloat16,
                  "moe_tiled: weights must be bfloat16 [R], one per pair");
  Tensor x = as_contiguous(x_in);
  Tensor token_of_t = as_contiguous(token_of_in);
  Tensor weights = as_contiguous(weights_in);
  Tensor counts_t = as_contiguous(counts_in);
  Tensor gate_up = as_contiguous(gate_up_in);
  Tensor down = as_contiguous(down_in);
  const int64_t* counts = static_cast<const int64_t*>(counts_t.const_data_ptr());
  std::vector<int64_t> experts, first_row;  // experts with pairs, and the first pair of each
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    STD_TORCH_CHECK(counts[e] >= 0, "moe_tiled: expert ", e, " has ", counts[e], " rows");
    if (counts[e] == 0) continue;
    experts.push_back(e);
    first_row.push_back(total);
    total += counts[e];
  }
  STD_TORCH_CHECK(total == R, "moe_tiled: counts add up to ", total, ", token_of has ", R, " pairs");
  const int64_t* token_of = static_cast<const int64_t*>(token_of_t.const_data_ptr());
  const TokenPairs tp(token_of, R, T);
  Tensor out = torch::stable::empty({T, H}, ScalarType::BFloat16, std::nullopt, x.device());
  Bf16* o = static_cast<Bf16*>(out.mutable_data_ptr());
  std::vector<float> sums(T * H, 0.f);  // each token's weighted sum, rounded once at the end
  const Bf16* xp = static_cast<const Bf16*>(x.const_data_ptr());
  const Bf16* w = static_cast<const Bf16*>(weights.const_data_ptr());
  // Groups of consecutive experts of at most MOE_GROUP_ROWS pairs (or one expert), through buffers sized once.
  const auto pairs_end = [&](size_t i) { return first_row[i] + counts[experts[i]]; };  // past expert i's pairs
  std::vector<size_t> group_end;
  int64_t widest = 0;
  for (size_t i = 0, begin = 0; i < experts.size(); ++i) {
    if (i + 1 == experts.size() || pairs_end(i + 1) - first_row[begin] > MOE_GROUP_ROWS) {
      group_end.push_back(i + 1);
      widest = std::max(widest, pairs_end(i) - first_row[begin]);
      begin = i + 1;
    }
  }
  std::unique_ptr<Bf16[]> h = uninitialized<Bf16>(widest * I2), act = uninitialized<Bf16>(widest * I);
  std::unique_ptr<Bf16[]> y = uninitialized<Bf16>(widest * H);
  std::vector<int64_t> cursor(tp.first.begin(), tp.first.end() - 1);
  std::vector<Rows> rows;
  size_t begin = 0;
  for (const size_t end : group_end) {
    const std::vector<int64_t> group(experts.begin() + begin, experts.begin() + end);
    std::vector<int64_t> first(end - begin);
    const int64_t r0 = first_row[begin], r1 = pairs_end(end - 1);
    rows.resize(group.size());
    for (size_t i = 0; i < group.size(); ++i) {
      first[i] = first_row[begin + i] - r0;
      rows[i].M = counts[group[i]];
      rows[i].K = H;
      gather_rows(xp, token_of + first_row[begin + i], rows[i]);
    }
    moe_phase(rows, group, static_cast<const uint16_t*>(gate_up.const_data_ptr()), I2 * H, I2, h.get(), first);
    // Prefill-sized groups bring a thousand rows: the activation over the threads too.
    parallel_pieces(r1 - r0, [&](int64_t r) { silu_mul_row(h.get() + r * I2, I, act.get() + r * I); });
    for (size_t i = 0; i < group.size(); ++i) {
      rows[i].K = I;
      read_rows<Bf16>(act.get() + first[i] * I, rows[i]);
    }
    moe_phase(rows, group, static_cast<const uint16_t*>(down.const_data_ptr()), H * I, H, y.get(), first);
    add_weighted(tp, cursor, y.get(), w, r0, r1, H, sums.data());
    begin = end;
  }
  parallel_pieces(T, [&](int64_t t) { store_row(sums.data() + t * H, H, o + t * H); });
  return out;
}

}  // namespace

#ifndef QWENSTACK_KERNEL_FUNCTIONS_ONLY  // decode_layer_cpu.cpp includes this file for its functions
STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("linear_tiled(Tensor x, Tensor packed) -> Tensor");
  m.def("linear_tiled_int8(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("linear_tiled_int4(Tensor x, Tensor packed, Tensor scale_zeros) -> Tensor");
  m.def("moe_tiled(Tensor x, Tensor token_of, Tensor weights, Tensor counts, Tensor gate_up, Tensor down) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("linear_tiled", TORCH_BOX(&linear_tiled));
  m.impl("linear_tiled_int8", TORCH_BOX(&linear_tiled_int8));
  m.impl("linear_tiled_int4", TORCH_BOX(&linear_tiled_int4));
  m.impl("moe_tiled", TORCH_BOX(&moe_tiled));
}
#endif
