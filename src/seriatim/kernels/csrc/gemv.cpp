// Compact weights (quant.py) times activation rows: the matrix-vector products of a decode step, which read
// every weight once and should run at memory speed, and the batch-invariant products of longer chunks.
//
// - int4: each pair of input columns of a 64-output block (64 bytes of torch's packed layout) becomes four
//   vectors of bfloat16 pairs (128 + q, exact, as in amx_mm.cpp) with two byte permutes and a few bit ops,
//   and AVX-512's bfloat16 dot product adds x_c w_c + x_c+1 w_c+1 into float32 per output. Each group's
//   scale and zero apply once per group. Weights exact, activations as given; with a prefetch ahead,
//   faster than torch's int4 kernel on SmolLM2's layers. Up to four rows share each expanded column pair,
//   so a block is read from memory once for every row of a short batch; each row is summed in the same
//   order whatever the number of rows, so at 512 rows it still gives every row its lone result, at about
//   the cost of expanding the weight for one dense matmul.
// - int8 with one scale per output row: the activations are quantized to 16 bits with one scale per row
//   (quant.h), and each output is the exact integer total of q w, rounded once to float32 and scaled. A few
//   rows: the weight rows widened to 16 bits and multiplied with AVX-512 VNNI, ~1.4x torch's
//   _weight_int8pack_mm. Many: two int8 matrix products (oneDNN's). Exact totals do not depend on the
//   order of the sums, so both give a row the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace seriatim;

constexpr int kMaxRows = 4;  // activation rows per pass over a weight block or row (their sums stay in registers)
constexpr int64_t kBlock = kInt4Block;
constexpr int64_t kMatrixFrom = 16;  // rows from which int8 products go to integer matrix products
constexpr int kPrefetch = 2048;  // bytes ahead of the weights being read (measured: 1-4 KB alike)

// ---- int4 ---------------------------------------------------------------------------------------------

// One 64-output block of R activation rows (each [K] as bfloat16 pairs, `x_stride` pairs apart) times the
// packed weight -> y [R, 64] (rows `y_stride` apart). The nibbles of each column pair are expanded once for
// the R rows, and each row's sums run in the same order whatever R is, so a row's result does not depend
// on how many rows share the call.
template <int R>
void int4_block(const uint8_t* block, const uint16_t* pairs, int64_t pair_stride, int64_t group, int64_t k,
                const uint32_t* x, int64_t x_stride, const float* sums, at::BFloat16* y, int64_t y_stride) {
  const NibblePairs nibbles;
  const int64_t groups = k / group;
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) part[r][j] = _mm512_setzero_ps();
    for (int64_t c = g * group; c < (g + 1) * group; c += 2) {
      const uint8_t* at = block + c * (kBlock / 2);
      _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetch), _MM_HINT_T0);
      __m512i w[4];
      nibbles(at, w);
      for (int r = 0; r < R; ++r) {
        const __m512bh xc = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x[r * x_stride + c / 2])));
        for (int j = 0; j < 4; ++j) part[r][j] = _mm512_dpbf16_ps(part[r][j], reinterpret_cast<__m512bh>(w[j]), xc);
      }
    }
    // sum x w = s S + (z - 136 s) sum x, where S = sum x (128 + q) (torch's form: w = (q - 8) s + z).
    const GroupScale gs = load_group(pairs + g * pair_stride, 136.f);
    for (int r = 0; r < R; ++r) {
      const __m512 sum = _mm512_set1_ps(sums[r * groups + g]);
      for (int j = 0; j < 4; ++j)
        acc[r][j] = _mm512_fmadd_ps(gs.scale[j], part[r][j], _mm512_fmadd_ps(gs.offset[j], sum, acc[r][j]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) store_bf16(y + r * y_stride + 16 * j, acc[r][j]);
}

// The rows [r, r + count) of x against one block (count <= kMaxRows), by the kernel for that many rows.
void int4_block_rows(int64_t count, const uint8_t* block, const uint16_t* pairs, int64_t pair_stride, int64_t group,
                     int64_t k, const uint32_t* x, const float* sums, at::BFloat16* y, int64_t n) {
  const int64_t xs = k / 2;
  switch (count) {
    case 1: int4_block<1>(block, pairs, pair_stride, group, k, x, xs, sums, y, n); break;
    case 2: int4_block<2>(block, pairs, pair_stride, group, k, x, xs, sums, y, n); break;
    case 3: int4_block<3>(block, pairs, pair_stride, group, k, x, xs, sums, y, n); break;
    default: int4_block<4>(block, pairs, pair_stride, group, k, x, xs, sums, y, n); break;
  }
}

// ---- int8 ---------------------------------------------------------------------------------------------

// Exact integer dot products of one int8 weight row (K columns) with R int16 activation rows: each lane's
// int32 sum runs over up to kExactSteps steps of 64 columns (|sum| < 2^31), then is added into int64.
// Integer sums do not depend on their order, so any kernel computing them (int8_matrix below, for long
// chunks) gives the same totals: the int8 products are batch-invariant by construction.
constexpr int64_t kExactSteps = 128;  // 4 products of |32639 x 127| per lane and step: 128 steps fit int32

template <int R>
void int8_dots(const int8_t* w, const int16_t* xq, int64_t k, int64_t total[R]) {
  __m512i wide[R][2];  // int64 partial totals: lanes 0-7 and 8-15 of each int32 sum
  for (int r = 0; r < R; ++r) wide[r][0] = wide[r][1] = _mm512_setzero_si512();
  for (int64_t c0 = 0; c0 < k; c0 += kExactSteps * kQuantStep) {
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t c = c0; c < std::min(k, c0 + kExactSteps * kQuantStep); c += kQuantStep) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c + kPrefetch), _MM_HINT_T0);
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c + 32)));
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * k + c;
        acc[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc[r], w0, _mm512_loadu_si512(x)), w1, _mm512_loadu_si512(x + 32));
      }
    }
    for (int r = 0; r < R; ++r) {
      wide[r][0] = _mm512_add_epi64(wide[r][0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[r])));
      wide[r][1] = _mm512_add_epi64(wide[r][1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[r], 1)));
    }
  }
  for (int r = 0; r < R; ++r) total[r] = _mm512_reduce_add_epi64(_mm512_add_epi64(wide[r][0], wide[r][1]));
}

// int8_dots for quant.h's int8_outputs.
struct Int8Dots {
  template <int R>
  static void run(const int8_t* w, const int16_t* xq, int64_t k, int64_t* total) { int8_dots<R>(w, xq, k, total); }
};

// The int16 activations split as q = 256 hi + lo with hi and lo in [-128, 127] (|q| <= 32639, quant.h), 32 at a
// time: hi = (q + 128) >> 8, lo = q - 256 hi.
at::Tensor split_halves(const QuantizedActivations& xq, int64_t m, int64_t k, const at::TensorOptions& int8) {
  at::Tensor halves = at::empty({2, m, k}, int8);
  int8_t *hp = halves.data_ptr<int8_t>(), *lp = hp + m * k;
  const int16_t* qp = xq.values.data();
  at::parallel_for(0, m * k / 32, 128, [&](int64_t i0, int64_t i1) {
    for (int64_t i = 32 * i0; i < 32 * i1; i += 32) {
      const __m512i q = _mm512_loadu_si512(qp + i);
      const __m512i hi = _mm512_srai_epi16(_mm512_add_epi16(q, _mm512_set1_epi16(128)), 8);
      const __m512i lo = _mm512_sub_epi16(q, _mm512_slli_epi16(hi, 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hp + i), _mm512_cvtepi16_epi8(hi));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lp + i), _mm512_cvtepi16_epi8(lo));
    }
  });
  return halves;
}

// Sixteen outputs of one row from their halves' int32 sums: 256 hi + lo exactly in int64, then as
// int8_output does it (rounded once to float32, times the row's scale, then the outputs').
inline __m512 int8_outputs16(const int32_t* hi, const int32_t* lo, __mmask16 lanes, float row_scale,
                             const float* weight_scale) {
  const __m512i h = _mm512_maskz_loadu_epi32(lanes, hi), l = _mm512_maskz_loadu_epi32(lanes, lo);
  const __m512i t0 = _mm512_add_epi64(_mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(h)), 8),
                                      _mm512_cvtepi32_epi64(_mm512_castsi512_si256(l)));
  const __m512i t1 = _mm512_add_epi64(_mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(h, 1)), 8),
                                      _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(l, 1)));
  const __m512 total = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(t0)), _mm512_cvtepi64_ps(t1), 1);
  return _mm512_mul_ps(_mm512_mul_ps(total, _mm512_set1_ps(row_scale)), _mm512_maskz_loadu_ps(lanes, weight_scale));
}

inline void store16(float* y, __m512 v, __mmask16 lanes) { _mm512_mask_storeu_ps(y, lanes, v); }
inline void store16(at::BFloat16* y, __m512 v, __mmask16 lanes) {
  _mm256_mask_storeu_epi16(y, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));  // to nearest even
}

// The same totals for many rows, by two int8 matrix products (oneDNN's integer kernels, exact int32 sums,
// about twice as fast as a bfloat16 matmul of the expanded weight): total = 256 (hi . w) + lo . w.
template <typename Out>
void int8_matrix(const at::Tensor& weight, const QuantizedActivations& xq, int64_t m, int64_t k, const float* sc,
                 Out* y) {
  const int64_t n = weight.size(0);
  const at::Tensor halves = split_halves(xq, m, k, weight.options()), wt = weight.t();
  const at::Tensor high = at::_int_mm(halves[0], wt), low = at::_int_mm(halves[1], wt);  // [M, N] int32
  const int32_t *hs = high.data_ptr<int32_t>(), *ls = low.data_ptr<int32_t>();
  at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t o = 0; o < n; o += 16) {
        const __mmask16 lanes = first(n - o);
        const int64_t at = r * n + o;
        store16(y + at, int8_outputs16(hs + at, ls + at, lanes, xq.scale[r], sc + o), lanes);
      }
  });
}

}  // namespace

namespace seriatim {

// x [M, K] bfloat16 times the packed int4 weight [N, K/2] with scales_zeros [K/group, N, 2] -> [M, N]: each
// block of 64 outputs is read from memory once for all M rows (kMaxRows at a time, the block then in cache).
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int4(packed, scales_zeros, k, group);
  TORCH_CHECK(group % 16 == 0, "the group must be a multiple of 16");
  const at::Tensor xc = x.contiguous();
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const int64_t groups = k / group;
  std::vector<float> sums(m * groups);
  for (int64_t r = 0; r < m; ++r) span_sums(xp + r * k, k, group, sums.data() + r * groups);
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(xp);  // x as (x_c, x_c+1) pairs
  at::parallel_for(0, n / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < m; r += kMaxRows)
        int4_block_rows(std::min<int64_t>(kMaxRows, m - r), wp + b * kBlock * k / 2, sp + 2 * b * kBlock, 2 * n,
                        group, k, pairs + r * k / 2, sums.data() + r * groups, yp + r * n + b * kBlock, n);
  });
  return y;
}

// x [M, K] bfloat16 (M small) times int8 weight [N, K] with one scale per output row -> [M, N] bfloat16
// (float32 with float_out).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int8(weight, scale, k);
  const QuantizedActivations xq = quantize_activations(x);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sc = sf.data_ptr<float>();
  if (m >= kMatrixFrom && float_out)
    int8_matrix(weight, xq, m, k, sc, y.data_ptr<float>());
  else if (m >= kMatrixFrom)
    int8_matrix(weight, xq, m, k, sc, y.data_ptr<at::BFloat16>());
  else if (float_out)
    int8_outputs<Int8Dots>(wp, xq, m, k, sc, n, y.data_ptr<float>());
  else
    int8_outputs<Int8Dots>(wp, xq, m, k, sc, n, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor");
  lib.def("int8_gemv(Tensor x, Tensor weight, Tensor scale, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("int4_gemv", &seriatim::int4_gemv);
  lib.impl("int8_gemv", &seriatim::int8_gemv);
}
