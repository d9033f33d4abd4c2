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

}  // namespace
