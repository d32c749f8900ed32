// Compact weights (quant.py) times 2 to 223 (int4) or 4 to 511 (int8) activation rows on AMX tiles (batched
// decode, chunks of prompt), where quant.product_path sends them.
//
// torch's weight-only kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) are matrix-vector
// products in a loop over activation rows: a step of sixteen sequences costs about sixteen of one. Here
// each 32- or 64-column step of a block of outputs becomes tiles once, and one AMX instruction serves
// 16 activation rows: sixteen sequences cost ~2x one (weights from memory) instead of ~5x. The weights
// are prefetched ahead of the tile loads, which alone made the products ~1.4x faster. Up to 63 rows both
// kernels use the weights exactly (no rounding to bfloat16); from 64 rows the int4 one expands each block
// once to the dense path's bfloat16 weights instead. Their sections say how. The caller checks that the
// CPU has AMX and that Linux granted its state (torch._C._cpu._init_amx).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "amx.h"
#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace seriatim;

constexpr int kStep = 32;       // bfloat16 values in a tile row (64 bytes): columns per step
constexpr int64_t kBlock = kInt4Block;  // four C tiles
constexpr int kTileElems = kTile * kStep;
constexpr int kPrefetch = 2048;  // bytes ahead of the packed int4 columns being read, as in gemv.cpp

// ---- int4 [N, K] in torch's packed layout: C[m, n] over 64-output blocks, the nibbles as B tiles --------
//
// The nibbles go to the tiles undequantized, as the bfloat16 number 128 + q (bits 0x4300 | q, exact):
// a 32-column step gives S = sum x (128 + q) per row and output, and with the group's scale s and zero z
// (torch's form: w = (q - 8) s + z), sum x w = s S + (z - 136 s) sum x, applied in float32. Making tile
// rows takes a few integer ops per 128 weights.

// The four B tiles of step s of a block.
inline void step_tiles(const NibblePairs& nibbles, const uint8_t* block, int64_t s, uint16_t* tiles) {
  for (int r = 0; r < kTile; ++r) {
    const uint8_t* columns = block + (s * kStep + 2 * r) * (kBlock / 2);
    _mm_prefetch(reinterpret_cast<const char*>(columns + kPrefetch), _MM_HINT_T0);
    __m512i w[4];
    nibbles(columns, w);
    for (int t = 0; t < 4; ++t) _mm512_store_si512(tiles + t * kTileElems + r * kStep, w[t]);
  }
}

// x [M, K] bfloat16 as [Mp, K], Mp a multiple of 16 (padding rows zero), and each row's sum per step.
struct Activations {
  at::Tensor rows;
  std::vector<float> sums;  // [M][K / 32]
};

// x's rows as a contiguous [Mp, K], Mp a multiple of `multiple` (whole A tiles): x itself where it is one
// (a batch of 16 decodes: no copy), else a copy with zero rows added.
at::Tensor padded_rows(const at::Tensor& x, int64_t multiple) {
  const int64_t pad = (multiple - x.size(0) % multiple) % multiple;
  return (pad ? at::constant_pad_nd(x, {0, 0, 0, pad}) : x).contiguous();
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

Activations activations(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  Activations a{padded_rows(x, kTile), std::vector<float>(m * (k / kStep))};
  const at::BFloat16* rows = a.rows.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < m; ++r) span_sums(rows + r * k, k, kStep, a.sums.data() + r * (k / kStep));
  return a;
}

// acc[row][64] += scale * c + offset * (row's activation sum) for the C tiles of one step.
inline void int4_epilogue(const float (*c)[kTile * kTile], const GroupScale& g, const float* sums, int64_t steps,
                          int64_t rows, float* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 sum = _mm512_set1_ps(sums[i * steps]);
    for (int j = 0; j < 4; ++j) {
      float* a = acc + i * kBlock + 16 * j;
      _mm512_store_ps(a, _mm512_fmadd_ps(g.scale[j], _mm512_load_ps(c[j] + i * kTile), _mm512_fmadd_ps(g.offset[j], sum, _mm512_load_ps(a))));
    }
  }
}

// One block of 64 outputs for activation rows [r, r + rows): acc[row][64] in float32.
void int4_block(const uint8_t* block, const uint16_t* pairs, int64_t pair_stride, int64_t group,
                const Activations& x, int64_t k, int64_t r, int64_t rows, float* acc) {
  // Software-pipelined: while the AMX unit multiplies step s, the vector units make step s + 1's tiles
  // and fold step s - 1's sums into acc (its C tiles were stored a step earlier, so no load waits on a
  // tile store). (Below 64 rows tiles are made again for each 16 rows: keeping a block's nibble tiles for
  // reuse measured slower, from L2 instead of L1.)
  alignas(64) uint16_t tiles[2][4 * kTileElems];
  alignas(64) float c[2][4][kTile * kTile];
  const int64_t steps = k / kStep;
  const float* sums = x.sums.data() + r * steps;
  const uint16_t* a = bits(x.rows) + r * k;  // this tile's activation rows
  std::fill(acc, acc + kTile * kBlock, 0.f);
  const NibblePairs nibbles;
  // Step s's sums, stored in c[s & 1], into acc; z - 8 s - 128 s is the offset of the bias 136 in 128 + q.
  auto fold = [&](int64_t s) {
    int4_epilogue(c[s & 1], load_group(pairs + (s * kStep / group) * pair_stride, 136.f), sums + s, steps, rows, acc);
  };
  step_tiles(nibbles, block, 0, tiles[0]);
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* cur = tiles[s & 1];
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, a + s * kStep, k * 2);
    _tile_loadd(5, cur, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, cur + kTileElems, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, cur + 2 * kTileElems, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, cur + 3 * kTileElems, 64);
    _tile_dpbf16ps(3, 4, 6);
    if (s + 1 < steps) step_tiles(nibbles, block, s + 1, tiles[(s + 1) & 1]);
    if (s > 0) fold(s - 1);
    store_c_tiles(c[s & 1]);
  }
  fold(steps - 1);
}

// ---- int4, many rows: a block expanded once to bfloat16 tiles, C tiles kept across K ------------------
//
// From a few dozen rows on, making the nibble tiles again for every 16 rows and folding every step's
// scales in float32 (above) costs more than the products themselves (~1 TFLOP/s at 512 rows). Here a
// block of 64 outputs is expanded once, to the bfloat16 weights int4_dequantize_t gives (the dense path's
// numbers, without writing the whole weight out and reading it back), as B tiles for all of K (K / 32
// steps of 4 KB: 72 KB for K = 576); then each 32 activation rows run through them with four C tiles
// (32 rows x 32 outputs) summing across K: two A and two B tile loads per four products, no vector work
// in between.
constexpr int64_t kPanelRows = 2 * kTile;  // activation rows per pass through a block's tiles
constexpr int64_t kPanelFrom = 64;  // rows from which int4_mm_amx takes this way (measured: SmolLM2, 2 cores)

// A block's weights as B tiles, [K / 32 steps][4 tiles of 16 outputs][16 column pairs][16 outputs x 2].
void expand_block(const uint8_t* block, const uint16_t* pairs, int64_t pair_stride, int64_t group, int64_t k,
                  uint16_t* tiles) {
  for (int64_t s = 0; s < k / kStep; ++s) {
    const GroupScale g = load_group(pairs + (s * kStep / group) * pair_stride, 8.f);
    for (int r = 0; r < kTile; ++r) {
      __m512 first[4], second[4];
      dequant_column(block + (s * kStep + 2 * r) * (kBlock / 2), g, first);
      dequant_column(block + (s * kStep + 2 * r + 1) * (kBlock / 2), g, second);
      for (int t = 0; t < 4; ++t) {
        const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second[t], first[t]));
        _mm512_storeu_si512(tiles + (4 * s + t) * kTileElems + r * kStep, interleave_pairs(both));
      }
    }
  }
}

// Rows [r, r + 32) of the padded x [Mp, K] times a block's tiles -> outputs [col, col + 64) of y's real rows.
void panel(const uint16_t* x, int64_t k, const uint16_t* tiles, int64_t r, int64_t m, int64_t n, int64_t col,
           at::BFloat16* y) {
  alignas(64) float c[4][kTile * kTile];  // C tiles: (rows 0-15, 16-31) x (outputs 0-15, 16-31) of a half
  for (int half = 0; half < 2; ++half) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < k / kStep; ++s) {
      const uint16_t* b = tiles + (4 * s + 2 * half) * kTileElems;
      _tile_loadd(4, x + r * k + s * kStep, k * 2);
      _tile_loadd(5, x + (r + kTile) * k + s * kStep, k * 2);
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    store_c_tiles(c);
    for (int64_t i = 0; i < std::min<int64_t>(kPanelRows, m - r); ++i)
      for (int j = 0; j < 2; ++j)
        store_bf16(y + (r + i) * n + col + 32 * half + 16 * j,
                   _mm512_load_ps(c[2 * (i / kTile) + j] + (i % kTile) * kTile));
  }
}

// int4_mm_amx for many rows. Work items are (block, 32 rows), block-major, so a thread expands each of
// its blocks once and neighbouring threads share at most one.
at::Tensor int4_mm_panels(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                          int64_t group) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0), chunks = (m + kPanelRows - 1) / kPanelRows;
  const at::Tensor xp = padded_rows(x, kPanelRows);
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n / kBlock * chunks, 1, [&](int64_t i0, int64_t i1) {
    Tiles tiles;
    std::vector<uint16_t> expanded(k / kStep * 4 * kTileElems);
    for (int64_t i = i0, expanded_block = -1; i < i1; ++i) {
      const int64_t b = i / chunks;
      if (b != expanded_block) {
        expand_block(wp + b * kBlock * k / 2, sp + 2 * b * kBlock, 2 * n, group, k, expanded.data());
        expanded_block = b;
      }
      panel(bits(xp), k, expanded.data(), i % chunks * kPanelRows, m, n, b * kBlock, yp);
    }
  });
  return y;
}

}  // namespace

namespace seriatim {

// x [M, K] bfloat16 times the packed int4 weight [N, K/2] with scales_zeros [K/group, N, 2] -> [M, N].
at::Tensor int4_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int4(packed, scales_zeros, k, group);
  TORCH_CHECK(group % kStep == 0, "the group must be a multiple of 32");
  if (m >= kPanelFrom) return int4_mm_panels(x, packed, scales_zeros, group);
  const Activations xa = activations(x);
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n / kBlock, 1, [&](int64_t b0, int64_t b1) {
    Tiles tiles;
    alignas(64) float acc[kTile * kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < m; r += kTile) {
        const int64_t rows = std::min<int64_t>(kTile, m - r);
        int4_block(wp + b * kBlock * k / 2, sp + 2 * b * kBlock, 2 * n, group, xa, k, r, rows, acc);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t o = 0; o < kBlock; o += 16) store_bf16(yp + (r + i) * n + b * kBlock + o, _mm512_load_ps(acc + i * kBlock + o));
      }
    }
  });
  return y;
}

}  // namespace seriatim

namespace {

// ---- int8 [N, K], one scale per output row: computed transposed, C^T[n, m], weight rows as A tiles ------
//
// The weight rows go to AMX's integer tiles straight from memory, untouched, so the head costs little
// more than its one read. The activations are quantized to 16 bits with one scale per row (quant.h), and
// the int16 q is split as 256 hi + lo (hi signed, lo unsigned bytes): sum w q = 256 sum w hi + sum w lo,
// two integer products (16 x 64 int8 per instruction) whose int32 sums run over the whole row in the C
// tiles (|sum| <= 255 * 127 K: exact for K up to 66k), stored and scaled once per block of outputs.

constexpr int kStep8 = kQuantStep;  // int8 values along K in one tile row
constexpr int64_t kWidth8 = 2 * kTile;  // outputs per pass: two (hi, lo) pairs of C tiles

// The int16 activations (quant.h) split as 256 hi + lo, in B-tile layout: [(r / 16) block][k / 4][4 * (r % 16) + k % 4].
struct SplitRows {
  std::vector<int8_t> hi;
  std::vector<uint8_t> lo;
  std::vector<float> scale;  // [M]
};

SplitRows split_rows(const at::Tensor& x, int64_t mp) {
  const int64_t m = x.size(0), k = x.size(1);
  QuantizedActivations q = quantize_activations(x);
  SplitRows t{std::vector<int8_t>(mp * k, 0), std::vector<uint8_t>(mp * k, 0), std::move(q.scale)};
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const int32_t value = q.values[r * k + c];
      const int64_t at = (r / kTile) * k * kTile + (c / 4) * 4 * kTile + 4 * (r % kTile) + c % 4;
      t.hi[at] = static_cast<int8_t>(value >> 8);  // arithmetic shift: value = 256 hi + lo
      t.lo[at] = static_cast<uint8_t>(value & 0xFF);
    }
  return t;
}

// The products of int8_mm_amx into y [m, n] of bfloat16 or float32.
template <typename Out>
void int8_blocks(const SplitRows& xq, const int8_t* wp, const float* sc, int64_t m, int64_t k, int64_t n, Out* yp) {
  const int64_t steps = k / kStep8;
  at::parallel_for(0, n / kWidth8, 8, [&](int64_t b0, int64_t b1) {
    Tiles tiles;
    alignas(64) int32_t c[4][kTile * kTile];  // (group 0 hi, lo), (group 1 hi, lo): [o][row]
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* rows = wp + b * kWidth8 * k;
      for (int64_t r = 0; r < m; r += kTile) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          // The next block of weight rows is contiguous: fetch a share of it each step, so it is in cache
          // when its turn comes (the tile loads' 16 strided rows defeat the hardware prefetcher).
          if (r == 0 && b + 1 < b1)
            for (int64_t line = s; line < kWidth8 * k / 64; line += steps)
              _mm_prefetch(reinterpret_cast<const char*>(rows + kWidth8 * k + 64 * line), _MM_HINT_T0);
          const int64_t at = (r / kTile) * k * kTile + s * kStep8 * kTile;
          _tile_loadd(6, xq.hi.data() + at, 64);
          _tile_loadd(7, xq.lo.data() + at, 64);
          _tile_loadd(4, rows + s * kStep8, k);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          _tile_loadd(5, rows + kTile * k + s * kStep8, k);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
        store_c_tiles(c);
        // c holds [o][row]: each output's 16 row sums are one vector, scaled there (by row, then by output,
        // as the vector kernel does), then turned into rows by a transpose (gathers cost ~4x as much).
        const int64_t real = std::min<int64_t>(kTile, m - r);
        const __m512 row_scale = load_f32(xq.scale.data() + r, real);
        for (int g = 0; g < 2; ++g) {
          const int64_t col = b * kWidth8 + g * kTile;
          __m512i t[kTile];
          for (int o = 0; o < kTile; ++o) {
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * g] + o * kTile));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * g + 1] + o * kTile));
            const __m512 v = _mm512_mul_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.f), lo), row_scale);
            t[o] = _mm512_castps_si512(_mm512_mul_ps(v, _mm512_set1_ps(sc[col + o])));
          }
          transpose16(t);
          for (int64_t i = 0; i < real; ++i) store_row(yp + (r + i) * n + col, _mm512_castsi512_ps(t[i]));
        }
      }
    }
  });
}

}  // namespace

namespace seriatim {

// x [M, K] bfloat16 times int8 weight [N, K] with one scale per output row -> [M, N] bfloat16 (float32 with
// float_out).
at::Tensor int8_mm_amx(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int8(weight, scale, k);
  TORCH_CHECK(n % kWidth8 == 0, "N must be a multiple of 32");
  const SplitRows xq = split_rows(x, (m + kTile - 1) / kTile * kTile);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const int8_t* wp = weight.data_ptr<int8_t>();
  if (float_out)
    int8_blocks(xq, wp, sf.data_ptr<float>(), m, k, n, y.data_ptr<float>());
  else
    int8_blocks(xq, wp, sf.data_ptr<float>(), m, k, n, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("int4_mm_amx(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor");
  lib.def("int8_mm_amx(Tensor x, Tensor weight, Tensor scale, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("int4_mm_amx", &seriatim::int4_mm_amx);
  lib.impl("int8_mm_amx", &seriatim::int8_mm_amx);
}
