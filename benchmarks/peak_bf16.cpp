// The CPU's bfloat16 dot-product peak: 16 independent vdpbf16ps chains on registers per thread (no memory),
// on 1 and on 2 threads. Each instruction is 16 lanes x 2 products = 64 FLOP. The ceiling that
// bench_prefill_attention.py's kernel and oneDNN's GEMM are measured against (AVX512-BF16 CPUs only).
//
//     g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 benchmarks/peak_bf16.cpp -o /tmp/peak_bf16 -lpthread
//     /tmp/peak_bf16
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

static float chains(long iterations) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x3c003c00);
  for (long n = 0; n < iterations; ++n) {
#pragma GCC unroll 16
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, y);
    __asm__ volatile("" : "+v"(x));  // keeps the loop from being folded
  }
  float sum = 0.f;
  for (auto& a : acc) sum += _mm512_reduce_add_ps(a);
  return sum;
}

int main() {
  const long iterations = 400000000 / 16;
  for (int threads : {1, 2}) {
    double best = 0.0;
    for (int repeat = 0; repeat < 5; ++repeat) {
      std::vector<std::thread> pool;
      std::vector<float> sink(threads);
      const auto start = std::chrono::steady_clock::now();
      for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[t] = chains(iterations); });
      for (auto& t : pool) t.join();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      best = std::max(best, double(threads) * iterations * 16 * 64 / seconds / 1e9);
    }
    std::printf("%d thread(s): %.0f GFLOPS bfloat16 dot products (best of 5)\n", threads, best);
  }
}
