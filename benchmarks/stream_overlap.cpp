// Does the int4 decode arithmetic overlap the weight stream, and what do short pieces cost? 1 GiB of 64-byte
// lines read by 2 threads, each taking pieces of P lines in turn (as the kernels' threads take pieces of a
// product) and reading a piece as 4 streams side by side; per line either only a sum ("sum") or the tiled int4
// loop's work (3 shifts, 4 logic ops, 4 vdpbf16ps: "work"), prefetching 4 lines ahead. GB/s, best of 5.
// Figures in benchmarks/RESULTS.md, "int4 in a tiled layout" (AVX512-BF16 CPUs only).
//
//     g++ -O3 -march=native benchmarks/stream_overlap.cpp -o /tmp/stream_overlap -lpthread
//     /tmp/stream_overlap
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

constexpr int STREAMS = 4, PREFETCH_LINES = 4;

template <bool WORK>
float piece(const uint16_t* base, int64_t lines) {
  const __m512i nibble = _mm512_set1_epi16(0xF), exponent = _mm512_set1_epi16(0x4300);
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  __m512 acc[STREAMS][2];
  for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
  const int64_t per = lines / STREAMS;
  for (int64_t i = 0; i < per; ++i) {
    for (int s = 0; s < STREAMS; ++s) {
      const uint16_t* src = base + (s * per + i) * 32;
      _mm_prefetch(reinterpret_cast<const char*>(src + PREFETCH_LINES * 32), _MM_HINT_T0);
      const __m512i words = _mm512_loadu_si512(src);
      if (WORK) {
        const __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(words, nibble, exponent, 0xEA);
        const __m512bh w1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, exponent, 0xEA);
        const __m512bh w2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), nibble, exponent, 0xEA);
        const __m512bh w3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 12), exponent);
        acc[s][0] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[s][0], w0, x), w2, x);
        acc[s][1] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[s][1], w1, x), w3, x);
      } else {
        acc[s][0] = _mm512_add_ps(acc[s][0], _mm512_castsi512_ps(words));
      }
    }
  }
  float sum = 0.f;
  for (auto& a : acc) sum += _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
  return sum;
}

template <bool WORK>
double gb_s(const uint16_t* buf, int64_t bytes, int64_t piece_lines, int threads = 2) {
  const int64_t lines = bytes / 64;
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<float> sink(threads);
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        for (int64_t p = t; p * piece_lines < lines; p += threads)
          sink[t] += piece<WORK>(buf + p * piece_lines * 32, std::min(piece_lines, lines - p * piece_lines));
      });
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return bytes / best / 1e9;
}

int main() {
  const int64_t bytes = int64_t(1) << 30;
  auto* buf = static_cast<uint16_t*>(std::aligned_alloc(64, bytes));
  for (int64_t i = 0; i < bytes / 2; ++i) buf[i] = uint16_t((i * 2654435761u) >> 7);  // distinct pages
  for (int64_t piece_lines : {16384, 4096, 1024, 256}) {
    std::printf("pieces of %5ld KiB: sum %5.1f GB/s, work %5.1f GB/s\n", piece_lines * 64 / 1024,
                gb_s<false>(buf, bytes, piece_lines), gb_s<true>(buf, bytes, piece_lines));
  }
  std::free(buf);
}
