// How fast this machine reads memory, for the bandwidth bound of the planner and the benchmarks.
//
// torch's sum() reads each thread's share as one forward stream, and one stream is not what a core can
// read: on two Sapphire Rapids cores it read 15-19 GB/s where the same buffer read as eight streams per core
// reached 22-26 (a core keeps more lines in flight over several pages than its prefetchers give one). The
// linear kernels read their weights as several streams (linear_tiled_cpu.cpp), so a bound taken from sum()
// would be one they beat. stream_sum reads a float32 buffer the same way, with nothing but additions per
// load, and its best rate over a few stream counts is the machine's read rate.
//
//   stream_sum(x [n] float32, streams) -> [1] float32: the sum of x (in an order that follows the threads:
//   a probe, not arithmetic to rely on), each thread's contiguous share read as `streams` runs side by side.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu_vec.h"

#include <atomic>
#include <cstdint>
#include <cstring>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t MAX_STREAMS = 16;

// The sum of vectors [begin, end) of x, read as S runs side by side.
template <int64_t S>
float sum_runs(const float* x, int64_t begin, int64_t end) {
  const int64_t run = (end - begin) / S;
  vf acc[S] = {};
  for (int64_t i = 0; i < run; ++i) {
    for (int64_t s = 0; s < S; ++s) {
      vf v;
      std::memcpy(&v, x + (begin + s * run + i) * W, sizeof v);
      acc[s] += v;
    }
  }
  for (int64_t i = begin + S * run; i < end; ++i) {
    vf v;
    std::memcpy(&v, x + i * W, sizeof v);
    acc[0] += v;
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < W; ++j) total += acc[s][j];
  return total;
}

template <int64_t S>
float parallel_sum(const float* x, int64_t vectors) {
  std::atomic<float> total{0.f};
  // One share per thread: each thread's reads stay S long runs.
  torch::stable::parallel_for(0, vectors, 1 << 14, [&](int64_t begin, int64_t end) {
    const float part = sum_runs<S>(x, begin, end);
    float seen = total.load();
    while (!total.compare_exchange_weak(seen, seen + part)) {
    }
  });
  return total.load();
}

Tensor stream_sum(Tensor x_in, int64_t streams) {
  STD_TORCH_CHECK(x_in.is_cpu() && x_in.scalar_type() == ScalarType::Float && x_in.dim() == 1,
                  "stream_sum: x must be a 1-D float32 CPU tensor");
  STD_TORCH_CHECK(streams == 1 || streams == 2 || streams == 4 || streams == 8 || streams == MAX_STREAMS,
                  "stream_sum: streams must be 1, 2, 4, 8 or 16, not ", streams);
  Tensor x = as_contiguous(x_in);
  const float* p = static_cast<const float*>(x.const_data_ptr());
  const int64_t n = x.numel(), vectors = n / W;
  float total = 0.f;
  switch (streams) {
    case 1: total = parallel_sum<1>(p, vectors); break;
    case 2: total = parallel_sum<2>(p, vectors); break;
    case 4: total = parallel_sum<4>(p, vectors); break;
    case 8: total = parallel_sum<8>(p, vectors); break;
    default: total = parallel_sum<MAX_STREAMS>(p, vectors); break;
  }
  for (int64_t i = vectors * W; i < n; ++i) total += p[i];
  Tensor out = torch::stable::empty({1}, ScalarType::Float, std::nullopt, x.device());
  *static_cast<float*>(out.mutable_data_ptr()) = total;
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("stream_sum(Tensor x, int streams) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("stream_sum", TORCH_BOX(&stream_sum));
}
