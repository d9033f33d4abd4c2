// What the CPU kernels share: the element types as they sit in memory, conversions to and from float32, and
// GCC/Clang generic vectors as wide as the build flags allow (16 floats with AVX-512, 8 with AVX2, 4
// otherwise: SSE2, NEON; see qwenstack/kernels/__init__.py). Wider-than-native vectors are not used: GCC
// lowers some of their operations (a scalar times a vector) through the stack. Each kernel file includes
// this once, inside nothing: the definitions live in an unnamed namespace, one copy per file.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Float8_e5m2.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__F16C__) || defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// t itself where it is already contiguous, else a contiguous copy. torch::stable::contiguous goes through the
// dispatcher with boxed arguments even when it returns its input: ~0.25 us a call (one-row calls of
// linear_tiled_int8 3.52 against 4.22 us, qk_norm_rope 9.1 against 10.1), and a Qwen3-0.6B decode step's ops
// made ~300 such calls on tensors that were already contiguous.
inline torch::stable::Tensor as_contiguous(const torch::stable::Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

#if defined(__AVX512F__)
constexpr int64_t W = 16;  // floats per vector
#elif defined(__AVX2__)
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));

struct Bf16 { uint16_t bits; };
struct Fp16 { uint16_t bits; };
// float8 e5m2 (OCP): float16's sign, five exponent bits and its top two mantissa bits, so byte b is the float16
// b << 8, exactly (subnormals, infinities and NaN included). The KV cache's 8-bit form (--kv-cache-dtype fp8).
struct Fp8e5m2 { uint8_t bits; };

inline float to_float(float v) { return v; }
inline float to_float(Bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(Fp16 v) { return c10::detail::fp16_ieee_to_fp32_value(v.bits); }
inline float to_float(Fp8e5m2 v) { return c10::detail::fp16_ieee_to_fp32_value(uint16_t(v.bits << 8)); }

inline void store(float v, float* p) { *p = v; }
inline void store(float v, Bf16* p) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    p->bits = uint16_t((u >> 16) | 0x40);
    return;
  }
  p->bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline void store(float v, Fp16* p) { p->bits = c10::detail::fp16_ieee_from_fp32_value(v); }
inline void store(float v, Fp8e5m2* p) { p->bits = c10::detail::fp8e5m2_from_fp32_value(v); }

// W consecutive elements as float32, in memory order.
inline vf load_vec(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
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

inline vf load_vec(const Fp8e5m2* p) {
  vf v;
#if defined(__AVX512F__)
  const __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 8);
  const __m512 x = _mm512_cvtph_ps(h);
  std::memcpy(&v, &x, sizeof v);
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i h = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 8);
  const __m256 x = _mm256_cvtph_ps(h);
  std::memcpy(&v, &x, sizeof v);
#else
  for (int64_t i = 0; i < W; ++i) v[i] = to_float(p[i]);
#endif
  return v;
}

// W lanes rounded to float8 e5m2 and stored at p: torch's conversion (fp8e5m2_from_fp32_value: round to nearest
// even, 65,536 and above to infinity, NaN to 0x7F) on vectors, its branches as selects.
inline void store_rounded(vf v, Fp8e5m2* p) {
  typedef uint8_t vb __attribute__((vector_size(W)));
  vu f;
  std::memcpy(&f, &v, sizeof f);
  const vu sign = f & 0x80000000u;
  f ^= sign;
  const vu special = f > (255u << 23) ? vu{} + 0x7Fu : vu{} + 0x7Cu;  // NaN, or past the range: infinity
  vf magnitude;
  std::memcpy(&magnitude, &f, sizeof magnitude);
  const vf shifted = magnitude + 128.f;  // 2^7: below e5m2's normals, this addition rounds to a multiple of 2^-16
  vu subnormal;
  std::memcpy(&subnormal, &shifted, sizeof subnormal);
  subnormal -= 134u << 23;
  const vu normal = (f + (uint32_t(15 - 127) << 23) + 0xFFFFFu + ((f >> 21) & 1u)) >> 21;
  vu bits = f >= (143u << 23) ? special : (f < (113u << 23) ? subnormal : normal);
  bits = (bits & 0xFFu) | (sign >> 24);
  const vb bytes = __builtin_convertvector(bits, vb);
  std::memcpy(p, &bytes, sizeof bytes);
}

#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
// v's lanes as bfloat16 in `out` by one vcvtneps2bf16 (round to nearest even, NaN made quiet as round_to does),
// where no lane is a float32 denormal (vfpclassps class 0x20): the instruction reads those as zero, so for
// such a vector it returns false and converts nothing (the caller takes the exact integer path).
inline bool to_bf16_fast(vf v, __m256i& out) {
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  if (_mm512_fpclass_ps_mask(x, 0x20) != 0) return false;
  out = (__m256i)_mm512_cvtneps_pbh(x);
  return true;
}
#endif

// v rounded to T's precision (round to nearest even, NaN stays NaN), still as float32: what storing to T and
// loading back gives, on W lanes.
template <typename T>
inline vf round_to(vf v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, Bf16>) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    // One conversion instruction where it is exact (to_bf16_fast): the integer operations below were a large
    // part of silu_mul's and the norms' time (store_rounded below).
    __m256i h;
    if (to_bf16_fast(v, h)) {
      const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      vf out;
      std::memcpy(&out, &wide, sizeof out);
      return out;
    }
#endif
    vu u;
    std::memcpy(&u, &v, sizeof u);
    const vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    const vu rounded = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
    const vu quiet = ((u >> 16) | 0x40u) << 16;
    const vu bits = (nan & quiet) | (~nan & rounded);
    vf out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  } else {
    for (int64_t i = 0; i < W; ++i) {
      T t;
      store(v[i], &t);
      v[i] = to_float(t);
    }
    return v;
  }
}

// W lanes stored as T at p (each already representable in T, e.g. from round_to<T>: no further rounding).
template <typename T>
inline void store_exact(vf v, T* p) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same_v<T, Bf16>) {
    vu u;
    std::memcpy(&u, &v, sizeof u);
    const vh h = __builtin_convertvector(u >> 16, vh);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int64_t i = 0; i < W; ++i) store(v[i], p + i);
  }
}

// v rounded to T and stored at p, as store_exact(round_to<T>(v), p); for bfloat16 with AVX512-BF16, one
// conversion and a 32-byte store (silu_mul 64 x 3,072: 1.2x as fast as the round trip through float32 lanes).
template <typename T>
inline void store_rounded(vf v, T* p) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  if constexpr (std::is_same_v<T, Bf16>) {
    __m256i h;
    if (to_bf16_fast(v, h)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
      return;
    }
  }
#endif
  store_exact(round_to<T>(v), p);
}

// exp(x) on W lanes, ~2 ulp: Cephes' expf polynomial. Below -87 it answers exp(-87) (float32's smallest
// normal magnitude; callers add it to 1 or weigh values by it), above ~88.72 infinity as expf does. 2^n is
// applied in two halves so that n = 128 (x up to 88.72, just under FLT_MAX) stays finite.
inline vf exp_vec(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;
  x = x > 89.0f ? vf{} + 89.0f : x;
  const vf t = x * 1.44269504088896341f;
  const vi n = __builtin_convertvector(t + (t < 0.0f ? vf{} - 0.5f : vf{} + 0.5f), vi);  // to nearest
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const vi half = n / 2;
  return p * (vf)((half + 127) << 23) * (vf)((n - half + 127) << 23);
}

// One row of n values of type S, rounded to type P at `to` (a plain copy when the types are the same).
template <typename S, typename P>
inline void store_row(const S* from, int64_t n, P* to) {
  if constexpr (std::is_same_v<S, P>) {
    std::memcpy(to, from, n * sizeof(P));
  } else {
    int64_t i = 0;
    for (; i + W <= n; i += W) store_rounded(load_vec(from + i), to + i);
    for (; i < n; ++i) store(to_float(from[i]), to + i);
  }
}

// SwiGLU's activation for one row [gate | up] of I + I values: out = T(T(silu(gate)) * up), silu(g) =
// g / (1 + exp(-g)) in float32, the rounding of the reference (models/layers.py's silu_and_mul). exp is
// exp_vec (~2 ulp), so a value can differ from torch's by one unit of T on a rounding boundary of T.
template <typename T>
inline void silu_mul_row(const T* gate, int64_t I, T* out) {
  const T* up = gate + I;
  int64_t i = 0;
  for (; i + W <= I; i += W) {
    const vf g = load_vec(gate + i);
    const vf s = round_to<T>(g / (1.f + exp_vec(vf{} - g)));
    store_rounded(s * load_vec(up + i), out + i);
  }
  for (; i < I; ++i) {
    const float g = to_float(gate[i]);
    T s;
    store(g / (1.f + std::exp(-g)), &s);
    store(to_float(s) * to_float(up[i]), out + i);
  }
}

// count elements of type T at src as float32 at dst.
template <typename T>
void read_floats(const void* src, int64_t count, float* dst) {
  const T* p = static_cast<const T*>(src);
  for (int64_t i = 0; i < count; ++i) dst[i] = to_float(p[i]);
}

// The same for a buffer of a float32, bfloat16 or float16 tensor; false (nothing read) for other dtypes.
inline bool read_floats(torch::headeronly::ScalarType dtype, const void* src, int64_t count, float* dst) {
  using torch::headeronly::ScalarType;
  switch (dtype) {
    case ScalarType::Float: read_floats<float>(src, count, dst); return true;
    case ScalarType::BFloat16: read_floats<Bf16>(src, count, dst); return true;
    case ScalarType::Half: read_floats<Fp16>(src, count, dst); return true;
    default: return false;
  }
}

// The int16 form of activation rows that the int8 loops multiply (exact int32 sums against int8 weights):
// symmetric per row, the row's largest magnitude at 32767 (or limit), so each element is off by at most 2^-16 of the
// row's largest (bfloat16 itself keeps 8 bits). x [M, K] float32 -> q [M, K], x[m, k] ~ q[m, k] * scale[m];
// limit: the largest magnitude (a loop that splits q into bytes needs less than 32767).
inline void quantize_rows_int16(const float* x, int64_t M, int64_t K, int16_t* q, float* scale,
                                float limit = 32767.f) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    int16_t* out = q + m * K;
    int64_t k = 0;
#if defined(__AVX512F__)
    // The scalar loop (lrintf is a library call) took ~10 ns per element: 20 us for one row of 1,024.
    __m512 vmax = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
    float amax = _mm512_reduce_max_ps(vmax);
#else
    float amax = 0.f;
#endif
    for (; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
    const float s = amax > 0.f ? amax / limit : 1.f, inv = 1.f / s;
    scale[m] = s;
    k = 0;
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16) {  // rounds to nearest even (the default rounding mode), as lrintf
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), vinv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtsepi32_epi16(v));
    }
#endif
    for (; k < K; ++k) out[k] = int16_t(std::lrintf(row[k] * inv));
  }
}

// The sum of the lanes: the quarters added as 4-lane vectors, then a pair of pairs (a serial sum of W lanes is a
// chain of W dependent adds, and the norms take one per head of 128 values).
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hsum(vf v) {
  vf4 s{};
  for (int64_t i = 0; i < W / 4; ++i) {
    vf4 quarter;
    std::memcpy(&quarter, reinterpret_cast<const char*>(&v) + i * sizeof quarter, sizeof quarter);
    s += quarter;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// The largest lane, in log2(W) rotate-and-max steps.
template <int Shift, int... K>
inline vf max_rotated(vf v, std::integer_sequence<int, K...> lanes) {
  const vf rotated = __builtin_shufflevector(v, v, ((K + Shift) % int(W))...);
  v = v > rotated ? v : rotated;
  if constexpr (Shift > 1) return max_rotated<Shift / 2>(v, lanes);
  else return v;
}

inline float hmax(vf v) { return max_rotated<int(W) / 2>(v, std::make_integer_sequence<int, int(W)>{})[0]; }

}  // namespace
