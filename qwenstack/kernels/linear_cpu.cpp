// Linear layers for a few rows of activations on CPU: out[m, n] = scale[n] * sum_k x[m, k] * w[n, k].
//
// Decoding multiplies one activation row per sequence by every weight matrix, so a step is bound by reading
// the weights once. This kernel streams each thread's share of weight rows front to back and multiplies
// every loaded weight by all the activation rows, so the weights are read once whatever the number of
// rows: the vector loop takes four weight rows at a time (four streams and accumulators) against two
// activation rows per pass (more rows loop over the same four weight rows, still in L1); the AMX loops take
// 32 weight rows against 16 or 32 activation rows. Large row counts (prefill) belong to a GEMM library,
// and the caller (models/cpu_linear.py) sends them there.
//
// Layout:
//   x      [M, K] float32 / bfloat16 / float16, contiguous
//   w      [N, K] bfloat16 / float16 / float32 / int8, contiguous along K (any row stride: a slice of a stack
//          of expert matrices works in place)
//   scales [N] float32 or an empty tensor (int8: the per-output-channel scale; others: none)
//   out    [M, N] in x's dtype
// Sums are float32 (int32 for int8, moved to float32 in chunks) in an order that does not depend on the
// thread count.
//
// The inner loops, by weight dtype and build level (qwenstack/kernels/__init__.py picks the level):
// - bfloat16 with AVX512-BF16: vdpbf16ps on bfloat16 activations (exact products, float32 sums): the
//   products are those of any bfloat16 GEMM, only the order of the additions differs. (Activations of
//   another dtype are rounded to bfloat16 first; the runtime only sends bfloat16 ones.)
// - int8 with AVX512-VNNI: vpdpwssd on the weights widened to int16 and the activations quantized to int16
//   per row (symmetric, the row's largest magnitude at 32767: an error of at most 2^-16 of it, far below
//   bfloat16's own rounding). The generic loop (float32 FMAs) did the same work at two-thirds the speed.
// - everything else: weights converted to float32 and multiplied with float32 activations, in the generic
//   vectors of cpu_vec.h, float16 through F16C.
// Weight rows are also prefetched in software: the hardware prefetcher alone left about a fifth of the
// read bandwidth unused here. Threads come from torch's parallel_for.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AMX_TILE__)
#include "cpu_amx.h"
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

typedef int8_t vb __attribute__((vector_size(W * sizeof(int8_t))));

constexpr int64_t ROWS = 4;  // weight rows streamed together
constexpr int64_t M_TILE = 2;  // activation rows multiplied per pass over those weight rows
// Each weight row is prefetched this far ahead of its loads: measured best here between 512 and 2048
// bytes (the hardware prefetcher alone left a fifth of the read bandwidth unused).
constexpr int64_t PREFETCH_BYTES = 1024;
// From this many activation rows on, bfloat16 and int8 go to AMX. Below, the vector loops are as fast or
// faster: for int8 at one row (a single-stream decode), vpdpwssd read the 0.6B shape's 596 MB of weights in
// 49-54 ms where AMX, padding the row to 16, took 62.
constexpr int64_t AMX_MIN_ROWS = 3;

template <typename T>
inline void prefetch_rows(const T* w, int64_t ldw, int64_t R, int64_t k) {
  for (int64_t r = 0; r < R; ++r) __builtin_prefetch(w + r * ldw + k + PREFETCH_BYTES / int64_t(sizeof(T)));
}

inline float to_float(int8_t v) { return float(v); }

inline vf load_vec(const int8_t* p) {
  vf v;
#if defined(__AVX512F__)
  __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &x, sizeof v);
#elif defined(__AVX2__)
  __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &x, sizeof v);
#else
  vb b;
  std::memcpy(&b, p, sizeof b);
  v = __builtin_convertvector(b, vf);
#endif
  return v;
}


// The activation rows in the forms the loops read: float32 always; bfloat16 for the bfloat16 dot-product
// instruction; int16 with one scale per row for the int8 one.
struct Activations {
  int64_t M = 0, K = 0;
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  std::vector<int16_t> i16;
  std::vector<float> i16_scale;  // x[m, k] ~ i16[m, k] * i16_scale[m]
};

// R weight rows (R <= ROWS) times MT activation rows (MT <= M_TILE) starting at row m0: sums[m * R + r]
// relative to m0. The generic loop: weights converted to float32, fused multiply-adds.
template <typename T, int64_t R, int64_t MT>
struct DotBlock {
  static void run(const T* w, int64_t ldw, const Activations& a, int64_t m0, float* sums) {
    const int64_t K = a.K;
    const float* x = a.f32.data() + m0 * K;
    vf acc[R][MT];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t m = 0; m < MT; ++m) acc[r][m] = vf{};
    const int64_t K_vec = K / W * W;
    for (int64_t k = 0; k < K_vec; k += W) {
      vf wv[R];
      for (int64_t r = 0; r < R; ++r) wv[r] = load_vec(w + r * ldw + k);
      prefetch_rows(w, ldw, R, k);
      for (int64_t m = 0; m < MT; ++m) {
        const vf xv = load_vec(x + m * K + k);
        for (int64_t r = 0; r < R; ++r) acc[r][m] += wv[r] * xv;
      }
    }
    for (int64_t m = 0; m < MT; ++m) {
      for (int64_t r = 0; r < R; ++r) {
        float s = hsum(acc[r][m]);
        for (int64_t k = K_vec; k < K; ++k) s += to_float(w[r * ldw + k]) * x[m * K + k];
        sums[m * R + r] = s;
      }
    }
  }
};

#if defined(__AVX512BF16__)
// bfloat16 weights and activations: vdpbf16ps multiplies 32 pairs exactly and adds them in float32.
template <int64_t R, int64_t MT>
struct DotBlock<Bf16, R, MT> {
  static void run(const Bf16* w, int64_t ldw, const Activations& a, int64_t m0, float* sums) {
    const int64_t K = a.K;
    const uint16_t* x = a.bf16.data() + m0 * K;
    __m512 acc[R][MT];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t K_vec = K / 32 * 32;
    for (int64_t k = 0; k < K_vec; k += 32) {
      __m512bh wv[R];
      for (int64_t r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * ldw + k);
      prefetch_rows(w, ldw, R, k);
      for (int64_t m = 0; m < MT; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int64_t r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    const float* xf = a.f32.data() + m0 * K;
    for (int64_t m = 0; m < MT; ++m) {
      for (int64_t r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[r][m]);
        for (int64_t k = K_vec; k < K; ++k) s += to_float(w[r * ldw + k]) * xf[m * K + k];
        sums[m * R + r] = s;
      }
    }
  }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 weights times int16 activations: vpdpwssd multiplies 32 pairs exactly and adds them in int32. The
// int32 sums are moved to float32 every CHUNK columns, before they could overflow
// (CHUNK * 128 * 32767 < 2^31).
template <int64_t R, int64_t MT>
struct DotBlock<int8_t, R, MT> {
  static constexpr int64_t CHUNK = 4096;
  static void run(const int8_t* w, int64_t ldw, const Activations& a, int64_t m0, float* sums) {
    const int64_t K = a.K;
    const int16_t* x = a.i16.data() + m0 * K;
    __m512 total[R][MT];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t m = 0; m < MT; ++m) total[r][m] = _mm512_setzero_ps();
    const int64_t K_vec = K / 32 * 32;
    for (int64_t k0 = 0; k0 < K_vec; k0 += CHUNK) {
      const int64_t k1 = std::min(K_vec, k0 + CHUNK);
      __m512i acc[R][MT];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 32) {
        __m512i wv[R];
        for (int64_t r = 0; r < R; ++r)
          wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + k)));
        prefetch_rows(w, ldw, R, k);
        for (int64_t m = 0; m < MT; ++m) {
          const __m512i xv = _mm512_loadu_si512(x + m * K + k);
          for (int64_t r = 0; r < R; ++r) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], wv[r], xv);
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t m = 0; m < MT; ++m) total[r][m] = _mm512_add_ps(total[r][m], _mm512_cvtepi32_ps(acc[r][m]));
    }
    const float* xf = a.f32.data() + m0 * K;
    for (int64_t m = 0; m < MT; ++m) {
      for (int64_t r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(total[r][m]) * a.i16_scale[m0 + m];
        for (int64_t k = K_vec; k < K; ++k) s += float(w[r * ldw + k]) * xf[m * K + k];
        sums[m * R + r] = s;
      }
    }
  }
};
#endif

template <typename T, int64_t R>
inline void rows_times_all(const T* w, int64_t ldw, const Activations& a, float* sums) {
  int64_t m = 0;
  for (; m + M_TILE <= a.M; m += M_TILE) DotBlock<T, R, M_TILE>::run(w, ldw, a, m, sums + m * R);
  switch (a.M - m) {
    case 1: DotBlock<T, R, 1>::run(w, ldw, a, m, sums + m * R); break;
    case 2: DotBlock<T, R, 2>::run(w, ldw, a, m, sums + m * R); break;
    case 3: DotBlock<T, R, 3>::run(w, ldw, a, m, sums + m * R); break;
    default: break;
  }
}

// Rows [n_begin, n_end) of the output with the vector loops above.
template <typename T, typename O>
void run_rows(const Activations& a, const T* w, int64_t ldw, const float* scales, O* out, int64_t N,
              int64_t n_begin, int64_t n_end) {
  const int64_t M = a.M;
  const int64_t blocks = (n_end - n_begin + ROWS - 1) / ROWS;
  // Enough rows per task that a thread streams a long contiguous run (the hardware prefetcher's best case).
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, blocks / 8));
  torch::stable::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(M * ROWS);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = n_begin + b * ROWS, R = std::min(ROWS, n_end - n0);
      const T* wb = w + n0 * ldw;
      switch (R) {
        case 4: rows_times_all<T, 4>(wb, ldw, a, sums.data()); break;
        case 3: rows_times_all<T, 3>(wb, ldw, a, sums.data()); break;
        case 2: rows_times_all<T, 2>(wb, ldw, a, sums.data()); break;
        default: rows_times_all<T, 1>(wb, ldw, a, sums.data()); break;
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t r = 0; r < R; ++r) {
          const float s = sums[m * R + r];
          store(scales ? s * scales[n0 + r] : s, out + m * N + n0 + r);
        }
      }
    }
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX for bfloat16 weights and more than a couple of activation rows: the tile unit multiplies 16 weight rows
// by 16 activation rows in one instruction (TDPBF16PS), where the vector loop above pays per activation row.
// The product is computed transposed, out^T = W x^T, so the weight tiles load straight from the row-major
// matrix (16 rows of 32 bfloat16 each, at the matrix's row stride) and only the activations are
// rearranged, once per call, into the pair-interleaved layout the instruction wants for its second operand.
// A thread takes 32 weight rows at a time (two A tiles) against 32 activation rows (two B tiles): four
// float32 accumulator tiles, all eight tile registers.
constexpr int64_t AMX_ROWS = 32, AMX_COLS = 32, AMX_K = 32;

// The tile loads read 64 bytes from each of 32 rows per step: 32 streams, more than the hardware
// prefetcher follows. Each step therefore prefetches the same 64 bytes of the next block's 32 rows, one
// block (32 rows x K) ahead, into L2: int8 at 1024 columns went from 9 to 19 GB/s here.
template <typename T>
inline void prefetch_block(const T* next_block, int64_t ldw) {
  for (int64_t r = 0; r < AMX_ROWS; ++r) _mm_prefetch(reinterpret_cast<const char*>(next_block + r * ldw), _MM_HINT_T1);
}

// Tiles 0-3: accumulators C[i][j] (weight rows block i, activation rows block j) = tile 2 * i + j;
// 4, 5: weight rows; 6, 7: activation rows (configure_tiles of cpu_amx.h).

template <typename O>
void run_amx_bf16(const Activations& a, const Bf16* w, int64_t ldw, O* out, int64_t N) {
  const int64_t M = a.M, K = a.K;
  const int64_t Mp = (M + 15) / 16 * 16;
  // xp[k / 2][m][k % 2]: the B operand; rows past M are zero.
  std::vector<uint16_t> xp(K / 2 * Mp * 2, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[(k / 2 * Mp + m) * 2 + k % 2] = a.bf16[m * K + k];
  const int64_t full = N / AMX_ROWS * AMX_ROWS;
  const int64_t blocks = full / AMX_ROWS;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, blocks / 8));
  torch::stable::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float c[4][16][16];
    configure_tiles();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * AMX_ROWS;
      // The 32 weight rows stay in L2 while every block of activation rows passes over them.
      for (int64_t mb = 0; mb < M; mb += AMX_COLS) {
        const bool two = mb + 16 < M;
        _tile_zero(0); _tile_zero(2);
        if (two) { _tile_zero(1); _tile_zero(3); }
        for (int64_t k = 0; k < K; k += AMX_K) {
          if (mb == 0 && b + 1 < end) prefetch_block(w + (n0 + AMX_ROWS) * ldw + k, ldw);
          _tile_loadd(4, w + n0 * ldw + k, ldw * 2);
          _tile_loadd(5, w + (n0 + 16) * ldw + k, ldw * 2);
          _tile_loadd(6, xp.data() + (k / 2 * Mp + mb) * 2, Mp * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, xp.data() + (k / 2 * Mp + mb + 16) * 2, Mp * 4);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64); _tile_stored(2, c[2], 64);
        if (two) { _tile_stored(1, c[1], 64); _tile_stored(3, c[3], 64); }
        for (int64_t j = 0; j < (two ? 2 : 1); ++j) {
          const int64_t m0 = mb + 16 * j, cols = std::min<int64_t>(16, M - m0);
          for (int64_t i = 0; i < 2; ++i)
            for (int64_t r = 0; r < 16; ++r)
              for (int64_t m = 0; m < cols; ++m) store(c[2 * i + j][r][m], out + (m0 + m) * N + n0 + 16 * i + r);
        }
      }
    }
    _tile_release();
  });
  if (full < N) run_rows(a, w, ldw, static_cast<const float*>(nullptr), out, N, full, N);
}
#endif

#if defined(__AMX_INT8__)
// int8 weights on AMX: the same int16 activations as the vector loop, split into a signed high byte and an
// unsigned low byte (x = 256 * hi + lo), so two tile products (TDPBSSD for hi, TDPBSUD for lo) give the
// exact int32 sums the vector loop computes, at a fraction of the vector instructions per weight. The sums
// stay in int32 for K <= AMX_INT8_MAX_K (|w| <= 128, lo <= 255: 32640 * K < 2^31).
constexpr int64_t AMX_INT8_K = 64, AMX_INT8_MAX_K = 65536;

template <typename O>
void run_amx_int8(const Activations& a, const int8_t* w, int64_t ldw, const float* scales, O* out, int64_t N) {
  const int64_t M = a.M, K = a.K;
  const int64_t Mp = (M + 15) / 16 * 16;
  // B operands, [K / 4][Mp][4]: four consecutive k of one activation row per 32-bit group; rows past M are 0.
  std::vector<int8_t> hi(K / 4 * Mp * 4, 0);
  std::vector<uint8_t> lo(K / 4 * Mp * 4, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t v = a.i16[m * K + k];
      const int64_t at = (k / 4 * Mp + m) * 4 + k % 4;
      lo[at] = uint8_t(v & 0xFF);
      hi[at] = int8_t((v - (v & 0xFF)) / 256);
    }
  }
  const int64_t full = N / AMX_ROWS * AMX_ROWS;
  const int64_t blocks = full / AMX_ROWS;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, blocks / 8));
  torch::stable::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t c[4][16][16];  // hi rows 0-15, lo rows 0-15, hi rows 16-31, lo rows 16-31
    configure_tiles();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * AMX_ROWS;
      for (int64_t mb = 0; mb < M; mb += 16) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k = 0; k < K; k += AMX_INT8_K) {
          if (mb == 0 && b + 1 < end) prefetch_block(w + (n0 + AMX_ROWS) * ldw + k, ldw);
          _tile_loadd(4, w + n0 * ldw + k, ldw);
          _tile_loadd(5, w + (n0 + 16) * ldw + k, ldw);
          _tile_loadd(6, hi.data() + (k / 4 * Mp + mb) * 4, Mp * 4);
          _tile_loadd(7, lo.data() + (k / 4 * Mp + mb) * 4, Mp * 4);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
        _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
        const int64_t cols = std::min<int64_t>(16, M - mb);
        for (int64_t i = 0; i < 2; ++i) {
          for (int64_t r = 0; r < 16; ++r) {
            const int64_t n = n0 + 16 * i + r;
            for (int64_t m = 0; m < cols; ++m) {
              const float sum = 256.f * float(c[2 * i][r][m]) + float(c[2 * i + 1][r][m]);
              store(sum * a.i16_scale[mb + m] * scales[n], out + (mb + m) * N + n);
            }
          }
        }
      }
    }
    _tile_release();
  });
  if (full < N) run_rows(a, w, ldw, scales, out, N, full, N);
}
#endif

template <typename T, typename O>
void run(const Activations& a, const T* w, int64_t ldw, const float* scales, O* out, int64_t N) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, Bf16>) {
    if (a.M >= AMX_MIN_ROWS && a.K % AMX_K == 0 && N >= AMX_ROWS) {
      run_amx_bf16(a, w, ldw, out, N);
      return;
    }
  }
#endif
#if defined(__AMX_INT8__)
  if constexpr (std::is_same_v<T, int8_t>) {
    if (a.M >= AMX_MIN_ROWS && scales && a.K % AMX_INT8_K == 0 && a.K <= AMX_INT8_MAX_K && N >= AMX_ROWS) {
      run_amx_int8(a, w, ldw, scales, out, N);
      return;
    }
  }
#endif
  run_rows(a, w, ldw, scales, out, N, 0, N);
}

template <typename T>
void dispatch_out(const Activations& a, const Tensor& w, const float* scales, Tensor& out) {
  const T* wp = static_cast<const T*>(w.const_data_ptr());
  const int64_t ldw = w.stride(0), N = w.size(0);
  switch (out.scalar_type()) {
    case ScalarType::Float: run(a, wp, ldw, scales, static_cast<float*>(out.mutable_data_ptr()), N); break;
    case ScalarType::BFloat16: run(a, wp, ldw, scales, static_cast<Bf16*>(out.mutable_data_ptr()), N); break;
    case ScalarType::Half: run(a, wp, ldw, scales, static_cast<Fp16*>(out.mutable_data_ptr()), N); break;
    default: STD_TORCH_CHECK(false, "linear_rows: x must be float32, bfloat16 or float16");
  }
}

// Fills the forms of the activations that the loop for this weight dtype reads.
void prepare_activations(Activations& a, ScalarType w_dtype, ScalarType x_dtype, const void* x) {
#if defined(__AVX512BF16__)
  if (w_dtype == ScalarType::BFloat16) {
    a.bf16.resize(a.M * a.K);
    if (x_dtype == ScalarType::BFloat16) {
      std::memcpy(a.bf16.data(), x, a.M * a.K * sizeof(uint16_t));
    } else {
      for (int64_t i = 0; i < a.M * a.K; ++i) store(a.f32[i], reinterpret_cast<Bf16*>(&a.bf16[i]));
    }
  }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (w_dtype == ScalarType::Char) {
    a.i16.resize(a.M * a.K);
    a.i16_scale.resize(a.M);
    quantize_rows_int16(a.f32.data(), a.M, a.K, a.i16.data(), a.i16_scale.data());
  }
#endif
  (void)w_dtype; (void)x_dtype; (void)x;
}

Tensor linear_rows(Tensor x_in, Tensor w, Tensor scales_in) {
  STD_TORCH_CHECK(x_in.is_cpu() && w.is_cpu() && scales_in.is_cpu(), "linear_rows: CPU tensors only");
  STD_TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "linear_rows: x must be [M, K] and w [N, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  STD_TORCH_CHECK(w.size(1) == K, "linear_rows: x has ", K, " columns but w has ", w.size(1));
  STD_TORCH_CHECK(w.stride(1) == 1 || K <= 1, "linear_rows: w must be contiguous along K");
  const ScalarType x_dtype = x_in.scalar_type();
  Tensor x = as_contiguous(x_in);
  Activations a;
  a.M = M;
  a.K = K;
  a.f32.resize(M * K);
  STD_TORCH_CHECK(read_floats(x_dtype, x.const_data_ptr(), M * K, a.f32.data()),
                  "linear_rows: x must be float32, bfloat16 or float16");
  prepare_activations(a, w.scalar_type(), x_dtype, x.const_data_ptr());
  // Scales as float32, read in whatever float dtype they are stored (no dispatcher call for a conversion).
  std::vector<float> scale_values;
  if (scales_in.numel() > 0) {
    STD_TORCH_CHECK(scales_in.dim() == 1 && scales_in.size(0) == N, "linear_rows: scales must be [N]");
    Tensor sc = as_contiguous(scales_in);
    scale_values.resize(N);
    STD_TORCH_CHECK(read_floats(sc.scalar_type(), sc.const_data_ptr(), N, scale_values.data()),
                    "linear_rows: scales must be float32, bfloat16 or float16");
  }
  const float* scales = scale_values.empty() ? nullptr : scale_values.data();
  Tensor out = torch::stable::empty({M, N}, x_dtype, std::nullopt, x.device());
  if (M == 0 || N == 0) return out;
  switch (w.scalar_type()) {
    case ScalarType::BFloat16: dispatch_out<Bf16>(a, w, scales, out); break;
    case ScalarType::Half: dispatch_out<Fp16>(a, w, scales, out); break;
    case ScalarType::Float: dispatch_out<float>(a, w, scales, out); break;
    case ScalarType::Char: dispatch_out<int8_t>(a, w, scales, out); break;
    default: STD_TORCH_CHECK(false, "linear_rows: w must be bfloat16, float16, float32 or int8");
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) { m.def("linear_rows(Tensor x, Tensor w, Tensor scales) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) { m.impl("linear_rows", TORCH_BOX(&linear_rows)); }
