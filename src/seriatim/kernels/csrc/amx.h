// AMX tile state shared by seriatim's tile kernels (amx_mm.cpp, prefill_attention.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace seriatim {

constexpr int kTile = 16;  // rows of a tile (and activation or query rows per pass)

// Every tile 16 rows of 64 bytes. Tile state belongs to a thread: set up per parallel chunk, then released.
struct Tiles {
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  };
  Tiles() {
    Config cfg;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = kTile;
    _tile_loadconfig(&cfg);
  }
  ~Tiles() { _tile_release(); }
};

// The C tiles 0-3 of a kernel's pass into c[0..3], each 16 rows of 64 bytes.
template <typename T>
inline void store_c_tiles(T (*c)[kTile * kTile]) {
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
}

}  // namespace seriatim
