// Compact weights (quant.py) times activation rows with AVX2: csrc/gemv.cpp's ops for CPUs without AVX-512.
//
// - int4: AVX2 has no bfloat16 dot product, and widening every nibble to float32 for an FMA costs more
//   than the memory it saves. So the activations are quantized to int8 with one scale per 32 columns (as
//   llama.cpp's Q8_0), and VPMADDUBSW multiplies 32 unsigned nibbles by 32 signed activations per
//   instruction, adding neighbours into int16. The weights are stored for it (the "quads" layout below:
//   each 32-bit lane one output's weights of four columns), so a load and two masks make the operands;
//   the int16 sums of 32 columns stay below 2^15 (32 x 15 x 127), and are widened, converted and scaled
//   once per 32 columns: sum x w = sx (s I + (z - 8 s) sum q_x) per group, I the integer dot product, sx
//   the activations' scale. Up to kMaxRows rows share each weight load; each row's sums run in the same
//   order whatever their number, so a row's result does not depend on the rows beside it.
// - int8 with one scale per output row: csrc/gemv.cpp's exact integer totals (int16 activations, one
//   scale per row, quant.h), with VPMADDWD in place of VNNI: the same bits as every int8 kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "../ops.h"
#include "../quant.h"
#include "vec8.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace seriatim;

constexpr int64_t kBlock = kInt4Block;
constexpr int64_t kSpan = 32;  // columns per activation scale, and per widening of the int16 sums
constexpr int kMaxRows = 4;  // activation rows per pass over a weight block (2 R int16 sums in registers)
// Bytes ahead of the weights being read (both kernels). An int4 span's 16 cache lines are all prefetched
// this far (eight spans) ahead: the hardware prefetcher alone does not keep up with a lone row's stream, and
// a lone row consumes a span fast enough that two spans ahead is too late. The last spans of the buffer
// prefetch past its end, which costs a few lines and never faults.
constexpr int kPrefetch = 8192;

// ---- int4 ---------------------------------------------------------------------------------------------

struct Int8Activations {
  std::vector<int8_t> values;  // [M, K]
  std::vector<float> scale;    // [M, K / 32]: value * scale is the activation
  std::vector<float> sum;      // [M, K / 32]: scale * the sum of the span's values
};

// 32 bfloat16 values -> 32 int8 at q (their largest magnitude at 127); returns the scale and sets the sum.
inline float quantize_span(const at::BFloat16* x, int8_t* q, float& sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], top = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load_bf16(x + 8 * i);
    top = _mm256_max_ps(top, _mm256_and_ps(v[i], abs_mask));
  }
  const float largest = max8(top), scale = largest / 127.f;
  const __m256 inv = _mm256_set1_ps(largest > 0.f ? 127.f / largest : 0.f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // to nearest even
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  const __m128i quarter = _mm_add_epi32(half, _mm_shuffle_epi32(half, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = scale * static_cast<float>(_mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 1))));
  // The packs interleave 128-bit lanes; one permute puts the 32 values back in order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return scale;
}

Int8Activations quantize_spans(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), spans = k / kSpan;
  Int8Activations a{std::vector<int8_t>(m * k), std::vector<float>(m * spans), std::vector<float>(m * spans)};
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::parallel_for(0, m * spans, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) a.scale[i] = quantize_span(xp + i * kSpan, a.values.data() + i * kSpan, a.sum[i]);
  });
  return a;
}

// The int4 layout of this tier (quant.pack_int4, "quads"): per block of 64 outputs and per four input
// columns c .. c + 3, 128 bytes as four vectors; 32-bit lane l of vector j holds output 8 j + l's weights of
// the four columns (byte i: column c + i) in its low nibbles, and output 32 + 8 j + l's in its high ones.
// One load and two masks give VPMADDUBSW its operands, with no shuffle.
constexpr int64_t kQuadBytes = 2 * kBlock;

// One group's scale and offset (zero - 8 scale: the weight is q scale + offset) for a block's 64 outputs,
// vector j holding outputs 8 j .. 8 j + 7.
struct GroupScale8 {
  __m256 scale[8], offset[8];
};

inline GroupScale8 load_group8(const uint16_t* pairs) {
  GroupScale8 g;
  for (int j = 0; j < 8; ++j) {  // 32-bit lane: (scale, zero) of one output, scale in the low half
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + 16 * j));
    g.scale[j] = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(p, _mm256_set1_epi32(static_cast<int>(0xFFFF0000))));
    g.offset[j] = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), g.scale[j], zero);
  }
  return g;
}

// a += (the span's integer dot products, widened) * sx * scale + offset * sum: eight outputs' share of a span.
inline void accumulate(float* a, __m256i part, __m256 sx, __m256 sum, __m256 scale, __m256 offset, __m256i ones) {
  const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(part, ones)), sx);
  _mm256_store_ps(a, _mm256_fmadd_ps(scale, dot, _mm256_fmadd_ps(offset, sum, _mm256_load_ps(a))));
}

// One 64-output block times R activation rows -> y [R, 64] (rows `n` apart). Per span of 32 columns and per
// vector j of the quads, the R rows' int16 sums stay in registers (2 R of them) while the span's eight
// quads stream past; then each is widened, converted and scaled into the row's float32 totals.
template <int R>
void int4_block(const uint8_t* block, const uint16_t* pairs, int64_t pair_stride, int64_t group, int64_t k,
                const Int8Activations& xa, int64_t r0, at::BFloat16* y, int64_t n) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t spans = k / kSpan;
  alignas(32) float acc[R][kBlock] = {};
  GroupScale8 gs;
  for (int64_t s = 0; s < spans; ++s) {
    if (s * kSpan % group == 0) gs = load_group8(pairs + s * kSpan / group * pair_stride);
    const uint8_t* span = block + s * (kSpan / 4) * kQuadBytes;
    for (int64_t line = 0; line < (kSpan / 4) * kQuadBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(span + kPrefetch + line), _MM_HINT_T0);
    const int32_t* x[R];  // each row's activations of the span, four to a 32-bit word
    for (int r = 0; r < R; ++r) x[r] = reinterpret_cast<const int32_t*>(xa.values.data() + (r0 + r) * k + s * kSpan);
    for (int j = 0; j < 4; ++j) {
      // Broadcasts stay where they are used: otherwise GCC computes the span's 8 R of them once, for
      // every j, and spills them (an empty asm that may change the pointers stops that).
      for (int r = 0; r < R; ++r) asm("" : "+r"(x[r]));
      __m256i low[R], high[R];
      for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_si256();
      const auto quad = [&](int64_t t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(span + t * kQuadBytes + 32 * j));
        const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {  // the row's four activations of these columns, in every lane
          const __m256i xt = _mm256_set1_epi32(x[r][t]);
          low[r] = _mm256_add_epi16(low[r], _mm256_maddubs_epi16(lo, xt));
          high[r] = _mm256_add_epi16(high[r], _mm256_maddubs_epi16(hi, xt));
        }
      };
      // Unrolled, GCC computes a span's products of several rows first and spills them all before adding
      // them up; one quad at a time keeps the sums in registers. A lone row has the registers to unroll.
      if constexpr (R == 1) {
#pragma GCC unroll 8
        for (int64_t t = 0; t < kSpan / 4; ++t) quad(t);
      } else {
#pragma GCC unroll 1
        for (int64_t t = 0; t < kSpan / 4; ++t) quad(t);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t at = (r0 + r) * spans + s;
        const __m256 sx = _mm256_set1_ps(xa.scale[at]), sum = _mm256_set1_ps(xa.sum[at]);
        accumulate(acc[r] + 8 * j, low[r], sx, sum, gs.scale[j], gs.offset[j], ones);
        accumulate(acc[r] + 8 * (j + 4), high[r], sx, sum, gs.scale[j + 4], gs.offset[j + 4], ones);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 8; ++v) store_bf16(y + r * n + 8 * v, _mm256_load_ps(acc[r] + 8 * v));
}

// ---- int8 ---------------------------------------------------------------------------------------------

// Exact integer dot products of one int8 weight row with R int16 activation rows: each int32 lane adds 8
// products of |32639 x 127| per step of 64 columns, so 32 steps stay far below 2^31; then into int64.
constexpr int64_t kExactSteps = 32;

template <int R>
void int8_dots(const int8_t* w, const int16_t* xq, int64_t k, int64_t total[R]) {
  __m256i wide[R];  // int64 partial totals
  for (int r = 0; r < R; ++r) wide[r] = _mm256_setzero_si256();
  for (int64_t c0 = 0; c0 < k; c0 += kExactSteps * kQuantStep) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < std::min(k, c0 + kExactSteps * kQuantStep); c += kQuantStep) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c + kPrefetch), _MM_HINT_T0);
      __m256i wv[4];
      for (int i = 0; i < 4; ++i)
        wv[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 16 * i)));
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + c + 16 * i));
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv[i], x));
        }
    }
    for (int r = 0; r < R; ++r)
      wide[r] = _mm256_add_epi64(wide[r], _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[r])),
                                                           _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[r], 1))));
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), wide[r]);
    total[r] = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  }
}

// int8_dots for quant.h's int8_outputs.
struct Int8Dots {
  template <int R>
  static void run(const int8_t* w, const int16_t* xq, int64_t k, int64_t* total) { int8_dots<R>(w, xq, k, total); }
};

}  // namespace

namespace seriatim {

// x [M, K] bfloat16 times the packed int4 weight [N, K/2] with scales_zeros [K/group, N, 2] -> [M, N].
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int4(packed, scales_zeros, k, group);
  TORCH_CHECK(group % kSpan == 0, "the group must be a multiple of 32");
  const Int8Activations xa = quantize_spans(x.contiguous());
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // Work items: (block, kMaxRows rows), block-major, so each thread's contiguous share reads few blocks. A
  // long chunk then splits evenly, where whole blocks would not (9 of them for 576 outputs).
  const int64_t chunks = (m + kMaxRows - 1) / kMaxRows;
  at::parallel_for(0, n / kBlock * chunks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / chunks, r = u % chunks * kMaxRows;
      const uint8_t* block = wp + b * kBlock * k / 2;
      const uint16_t* pairs = sp + 2 * b * kBlock;
      at::BFloat16* out = yp + r * n + b * kBlock;
      switch (std::min<int64_t>(kMaxRows, m - r)) {
        case 1: int4_block<1>(block, pairs, 2 * n, group, k, xa, r, out, n); break;
        case 2: int4_block<2>(block, pairs, 2 * n, group, k, xa, r, out, n); break;
        case 3: int4_block<3>(block, pairs, 2 * n, group, k, xa, r, out, n); break;
        default: int4_block<4>(block, pairs, 2 * n, group, k, xa, r, out, n); break;
      }
    }
  });
  return y;
}

// x [M, K] bfloat16 times int8 weight [N, K] with one scale per output row -> [M, N] bfloat16 (float32 with
// float_out).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int8(weight, scale, k);
  const QuantizedActivations xq = quantize_activations(x);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  if (float_out)
    int8_outputs<Int8Dots>(weight.data_ptr<int8_t>(), xq, m, k, sf.data_ptr<float>(), n, y.data_ptr<float>());
  else
    int8_outputs<Int8Dots>(weight.data_ptr<int8_t>(), xq, m, k, sf.data_ptr<float>(), n, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(SERIATIM_OPS, lib) {
  lib.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor");
  lib.def("int8_gemv(Tensor x, Tensor weight, Tensor scale, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(SERIATIM_OPS, CPU, lib) {
  lib.impl("int4_gemv", &seriatim::int4_gemv);
  lib.impl("int8_gemv", &seriatim::int8_gemv);
}
