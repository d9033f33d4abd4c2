// What the AMX loops share (linear_cpu.cpp, linear_tiled_cpu.cpp): the tile configuration. Every loop uses
// all eight tiles at their full 16 rows x 64 bytes (operands are padded with zero rows to multiples of 16),
// so one configuration serves every block; each file gives the tiles their roles. Included once per file,
// inside nothing, only where the build has AMX (-mamx-tile).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace {

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration into this thread's tile unit (each worker thread of a parallel loop calls it once).
inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Step `step` of `steps` of fetching the `bytes` at `next` into L2: the share of its cache lines that falls to
// this step. The tile loops call it once per k block of every pass over the rows, so the next weights stream in
// evenly while the tile unit works on these. Fetched all in the first of several passes, they kept that pass
// waiting on memory and left the others' time unused: spread, 28 Qwen3-0.6B layers' bfloat16 products ran
// 1.08-1.18x as fast at 48-128 rows and the 152K-row lm_head 1.13-1.18x at 64-128 (in-process A/B over 7-9
// rounds, AMX Xeon, 2 cores); at 32 rows and under (one pass) nothing changes.
inline void prefetch_share(const void* next, int64_t bytes, int64_t step, int64_t steps) {
  const char* base = static_cast<const char*>(next);
  const int64_t lines = bytes / 64;
  for (int64_t line = lines * step / steps; line < lines * (step + 1) / steps; ++line)
    _mm_prefetch(base + line * 64, _MM_HINT_T1);
}

}  // namespace
