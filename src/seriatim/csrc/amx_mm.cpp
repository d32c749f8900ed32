// Packed int4 weights (quant.Int4Linear) times a few dozen activation rows on AMX tiles (batched decode).
//
// torch's _weight_int4pack_mm_for_cpu is a matrix-vector product per activation row: a decode step of
// sixteen sequences costs about sixteen of one. Here each 32-column step of a 64-output block becomes
// four B tiles, and one AMX product per tile serves 16 activation rows: a step of sixteen sequences costs
// ~3.5x one (from memory) instead of ~6x.
//
// The nibbles go to the tiles undequantized, as the bfloat16 number 128 + q (bits 0x4300 | q, exact):
// a step gives S = sum x (128 + q) per row and output, and with the group's scale s and zero z (torch's
// form: w = (q - 8) s + z), sum x w = s S + (z - 136 s) sum x, applied in float32. The weights are used
// exactly, and making tile rows takes a few integer ops per 128 weights. The caller checks that the CPU
// has AMX and that Linux granted its state (torch._C._cpu._init_amx).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kTile = 16;       // rows of a tile, and activation rows per pass
constexpr int kStep = 32;       // bfloat16 values in a tile row (64 bytes): columns per step
constexpr int64_t kBlock = 64;  // outputs per block of the packed layout: four C tiles
constexpr int kTileElems = kTile * kStep;
constexpr uint16_t kBias = 0x4300;  // bfloat16 128.0; 0x4300 | q is 128 + q for q < 16

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

// Columns c and c + 1 of a block (32 bytes each; byte i holds output i in its low nibble and output
// 32 + i in its high one) -> row r of the four B tiles: (128 + q_c, 128 + q_c+1) for 16 outputs each.
inline void nibble_pairs(const uint8_t* col, uint16_t* row) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + 32));
  const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);  // within 128-bit lanes
  const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x20));  // bytes 0..15 of both
  const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x31));  // bytes 16..31
  const __m512i mask = _mm512_set1_epi16(0x0F), bias = _mm512_set1_epi16(kBias);
  // (w & 0x0F) | bias in one ternary-logic op: truth table 0xEA is (A & B) | C.
  _mm512_storeu_si512(row, _mm512_ternarylogic_epi32(w0, mask, bias, 0xEA));                    // outputs 0..15
  _mm512_storeu_si512(row + kTileElems, _mm512_ternarylogic_epi32(w1, mask, bias, 0xEA));       // 16..31
  _mm512_storeu_si512(row + 2 * kTileElems, _mm512_or_si512(_mm512_srli_epi16(w0, 4), bias));   // 32..47
  _mm512_storeu_si512(row + 3 * kTileElems, _mm512_or_si512(_mm512_srli_epi16(w1, 4), bias));   // 48..63
}

// The four B tiles of step s of a block.
inline void step_tiles(const uint8_t* block, int64_t s, uint16_t* tiles) {
  for (int r = 0; r < kTile; ++r) nibble_pairs(block + (s * kStep + 2 * r) * (kBlock / 2), tiles + r * kStep);
}

// Scale and offset (z - 136 s) of the block's 64 outputs for one group: bfloat16 (scale, zero) pairs.
inline void load_group(const uint16_t* pairs, __m512 scale[4], __m512 offset[4]) {
  for (int j = 0; j < 4; ++j) {
    const __m512i p = _mm512_loadu_si512(pairs + 32 * j);
    scale[j] = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32(0xFFFF0000)));
    offset[j] = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), scale[j], zero);
  }
}

// x [M, K] bfloat16 as [Mp, K], Mp a multiple of 16 (padding rows zero), and each row's sum per step.
struct Activations {
  std::vector<uint16_t> rows;
  std::vector<float> sums;  // [M][K / 32]
};

Activations activations(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), mp = (m + kTile - 1) / kTile * kTile;
  Activations a{std::vector<uint16_t>(mp * k, 0), std::vector<float>(m * (k / kStep), 0.f)};
  const at::Tensor xc = x.contiguous();
  std::memcpy(a.rows.data(), xc.data_ptr<at::BFloat16>(), m * k * sizeof(uint16_t));
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; ++c) a.sums[r * (k / kStep) + c / kStep] += static_cast<float>(xp[r * k + c]);
  return a;
}

// One block of 64 outputs for activation rows [r, r + rows): acc[row][64] in float32.
void int4_block(const uint8_t* block, const uint16_t* pairs, int64_t pair_stride, int64_t group,
                const Activations& x, int64_t k, int64_t r, int64_t rows, float* acc) {
  // Double-buffered: the next step's tiles are made while the AMX unit works on this step's. (Made
  // again for each 16 rows: keeping a block's tiles for reuse measured slower, from L2 instead of L1.)
  alignas(64) uint16_t tiles[2][4 * kTileElems];
  alignas(64) float c[4][kTile * kTile];
  const int64_t steps = k / kStep;
  std::fill(acc, acc + kTile * kBlock, 0.f);
  step_tiles(block, 0, tiles[0]);
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* cur = tiles[s & 1];
    if (s + 1 < steps) step_tiles(block, s + 1, tiles[(s + 1) & 1]);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, x.rows.data() + r * k + s * kStep, k * 2);
    _tile_loadd(5, cur, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, cur + kTileElems, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, cur + 2 * kTileElems, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, cur + 3 * kTileElems, 64);
    _tile_dpbf16ps(3, 4, 6);
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    __m512 scale[4], offset[4];
    load_group(pairs + (s * kStep / group) * pair_stride, scale, offset);
    for (int64_t i = 0; i < rows; ++i) {
      const __m512 sum = _mm512_set1_ps(x.sums[(r + i) * steps + s]);
      for (int j = 0; j < 4; ++j) {
        float* a = acc + i * kBlock + 16 * j;
        const __m512 part = _mm512_fmadd_ps(scale[j], _mm512_load_ps(c[j] + i * kTile), _mm512_mul_ps(offset[j], sum));
        _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), part));
      }
    }
  }
}

// x [M, K] bfloat16 times the packed int4 weight [N, K/2] with scales_zeros [K/group, N, 2] -> [M, N].
at::Tensor int4_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == k,
              "packed int4 weight must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(n % kBlock == 0 && group % kStep == 0 && k % group == 0,
              "N must be a multiple of 64, and K of the group, itself a multiple of 32");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                  scales_zeros.numel() == (k / group) * n * 2,
              "scales_zeros must be contiguous bfloat16 [K/group, N, 2]");
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
          for (int64_t o = 0; o < kBlock; ++o) yp[(r + i) * n + b * kBlock + o] = at::BFloat16(acc[i * kBlock + o]);
      }
    }
  });
  return y;
}

// ---- int8 [N, K], one scale per output row: computed transposed, C^T[n, m], weight rows as A tiles ------
//
// q + 128 (in [1, 255]) is split into nibbles h and l, each going to a tile as 128 + nibble (exact, as
// above): sum x q = 16 sum x (128 + h) + sum x (128 + l) - 2304 sum x. No per-group scale, so the tiles
// accumulate over the whole row and the row scale is applied once at the end.

constexpr int kGroups = 2;  // groups of 16 outputs per pass: two (h, l) pairs of C tiles

// The A tiles of one step for 32 outputs: tiles[g][part][o][32] = 128 + (h or l) of q[16 g + o][32 s + kk].
inline void int8_step_tiles(const int8_t* rows, int64_t k, int64_t s, uint16_t* tiles) {
  const __m512i mask = _mm512_set1_epi16(0x0F), bias = _mm512_set1_epi16(kBias);
  for (int o = 0; o < kGroups * kTile; ++o) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + o * k + s * kStep));
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_xor_si256(q, _mm256_set1_epi8(-128)));  // q + 128
    uint16_t* dst = tiles + (o / kTile) * 2 * kTileElems + (o % kTile) * kStep;
    _mm512_storeu_si512(dst, _mm512_or_si512(_mm512_srli_epi16(w, 4), bias));                 // 128 + h
    _mm512_storeu_si512(dst + kTileElems, _mm512_ternarylogic_epi32(w, mask, bias, 0xEA));    // 128 + l
  }
}

// x [M, K] as B tiles: pairs[(r / 16) block][k / 2][2 * (r % 16) + k % 2].
std::vector<uint16_t> activation_pairs(const Activations& x, int64_t k) {
  const int64_t mp = static_cast<int64_t>(x.rows.size()) / k;
  std::vector<uint16_t> out(mp * k);
  for (int64_t r = 0; r < mp; ++r)
    for (int64_t c = 0; c < k; ++c)
      out[(r / kTile) * k * kTile + (c / 2) * 2 * kTile + 2 * (r % kTile) + c % 2] = x.rows[r * k + c];
  return out;
}

// x [M, K] bfloat16 times int8 weight [N, K] with one scale per output row -> [M, N] bfloat16.
at::Tensor int8_mm_amx(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), width = kGroups * kTile;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.size(1) == k,
              "weight must be contiguous int8 [N, K]");
  TORCH_CHECK(n % width == 0 && k % kStep == 0, "N and K must be multiples of 32");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n, "scale must be [N]");
  const Activations xa = activations(x);
  const std::vector<uint16_t> xv = activation_pairs(xa, k);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sc = sf.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t steps = k / kStep;
  at::parallel_for(0, n / width, 8, [&](int64_t b0, int64_t b1) {
    Tiles tiles;
    alignas(64) uint16_t a[2][kGroups * 2 * kTileElems];  // double-buffered, as for int4
    alignas(64) float c[kGroups * 2][kTile * kTile];
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* rows = wp + b * width * k;
      for (int64_t r = 0; r < m; r += kTile) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        int8_step_tiles(rows, k, 0, a[0]);
        for (int64_t s = 0; s < steps; ++s) {
          const uint16_t* cur = a[s & 1];
          if (s + 1 < steps) int8_step_tiles(rows, k, s + 1, a[(s + 1) & 1]);
          _tile_loadd(6, xv.data() + (r / kTile) * k * kTile + s * kStep * kTile, 64);
          _tile_loadd(4, cur, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, cur + kTileElems, 64);
          _tile_dpbf16ps(1, 5, 6);
          _tile_loadd(4, cur + 2 * kTileElems, 64);
          _tile_dpbf16ps(2, 4, 6);
          _tile_loadd(5, cur + 3 * kTileElems, 64);
          _tile_dpbf16ps(3, 5, 6);
        }
        _tile_stored(0, c[0], 64);  // c[2 g + part][o][row]
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        const int64_t rows_here = std::min<int64_t>(kTile, m - r);
        for (int64_t i = 0; i < rows_here; ++i) {
          float total = 0.f;
          for (int64_t s = 0; s < steps; ++s) total += xa.sums[(r + i) * steps + s];
          for (int64_t o = 0; o < width; ++o) {
            const float* ch = c[2 * (o / kTile)] + (o % kTile) * kTile + i;
            const float dot = 16.f * ch[0] + ch[kTile * kTile] - 2304.f * total;
            yp[(r + i) * n + b * width + o] = at::BFloat16(dot * sc[b * width + o]);
          }
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("int4_mm_amx(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor");
  lib.def("int8_mm_amx(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("int4_mm_amx", &int4_mm_amx);
  lib.impl("int8_mm_amx", &int8_mm_amx);
}
