// Compact weights (quant.py) times one or a few activation rows: the matrix-vector products of a decode
// step, which read every weight once and should run at memory speed.
//
// - int4, one row or a few: each pair of input columns of a 64-output block (64 bytes of torch's packed layout)
//   becomes four vectors of bfloat16 pairs (128 + q, exact, as in amx_mm.cpp) with two byte permutes and
//   a few bit ops, and AVX-512's bfloat16 dot product adds x_c w_c + x_c+1 w_c+1 into float32 per output.
//   Each group's scale and zero apply once per group. Weights exact, activations as given; with a
//   prefetch ahead, faster than torch's int4 kernel on SmolLM2's layers. Up to four rows share each
//   expanded column pair, so a block is read from memory once for every row of a short batch.
// - int8 with one scale per output row (the head): the activations are quantized to 16 bits per 64
//   columns (simd.h), as amx_mm.cpp does, so both kernels compute the same integer sums and a sequence's
//   logits barely depend on which one ran. The weight rows are widened to 16 bits and multiplied with
//   AVX-512 VNNI (int32 sums per 64 columns, scaled in float32): ~1.4x torch's _weight_int8pack_mm.
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

// One output row (int8, K columns) times R quantized activation rows -> R sums, scaled by the rows' scales.
template <int R>
void int8_row(const int8_t* w, const int16_t* xq, const float* row_scale, int64_t k, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += kQuantStep) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + kPrefetch), _MM_HINT_T0);
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c + 32)));
    for (int r = 0; r < R; ++r) {
      // int32 sums of a step (4 products per lane) cannot overflow; across steps they are added in float32.
      const int16_t* xs = xq + r * k + c;
      __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xs));
      dot = _mm512_dpwssd_epi32(dot, w1, _mm512_loadu_si512(xs + 32));
      acc[r] = _mm512_add_ps(_mm512_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) * row_scale[r];
}

template <int R, typename Out>
void int8_rows(const int8_t* wp, const QuantizedActivations& xq, int64_t r, int64_t k, const float* scale,
               int64_t n, int64_t o, Out* y) {
  float out[R];
  int8_row<R>(wp + o * k, xq.values.data() + r * k, xq.scale.data() + r, k, out);
  for (int i = 0; i < R; ++i) y[(r + i) * n + o] = Out(out[i] * scale[o]);
}

// Every output o of every row of xq (m rows) into y [m, n] of bfloat16 or float32.
template <typename Out>
void int8_outputs(const int8_t* wp, const QuantizedActivations& xq, int64_t m, int64_t k, const float* sc, int64_t n,
                  Out* y) {
  at::parallel_for(0, n, 256, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = 0; r < m; r += kMaxRows) {
        switch (std::min<int64_t>(kMaxRows, m - r)) {
          case 1: int8_rows<1>(wp, xq, r, k, sc, n, o, y); break;
          case 2: int8_rows<2>(wp, xq, r, k, sc, n, o, y); break;
          case 3: int8_rows<3>(wp, xq, r, k, sc, n, o, y); break;
          default: int8_rows<4>(wp, xq, r, k, sc, n, o, y); break;
        }
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
  if (float_out)
    int8_outputs(wp, xq, m, k, sc, n, y.data_ptr<float>());
  else
    int8_outputs(wp, xq, m, k, sc, n, y.data_ptr<at::BFloat16>());
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
