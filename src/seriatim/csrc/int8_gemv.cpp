// int8 weights with one scale per output row (quant.Int8Linear) times one to a few activation rows: the
// output head of a decode step, a matrix-vector product that should run at memory speed.
//
// The activations are quantized to 16 bits per 64 columns (simd.h), as amx_mm.cpp does, so both kernels
// compute the same integer sums and a sequence's logits barely depend on which one ran. The weight rows
// are read as stored, widened to 16 bits, and multiplied with AVX-512 VNNI (int32 sums per 64 columns,
// scaled in float32). torch's _weight_int8pack_mm converts every weight to float; this is 1.4x faster
// at one row and 1.5x at 16 on SmolLM2's head.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace seriatim;

constexpr int kMaxRows = 4;  // activation rows per pass over a weight row (their sums stay in registers)

// One output row (int8, K columns) times R quantized activation rows -> R float32 sums (unscaled by the row).
template <int R>
void int8_row(const int8_t* w, const int16_t* xq, const float* step_scale, int64_t k, float* out) {
  const int64_t steps = k / kQuantStep;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kQuantStep)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kQuantStep + 32)));
    for (int r = 0; r < R; ++r) {
      const int16_t* xs = xq + r * k + s * kQuantStep;
      __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xs));
      dot = _mm512_dpwssd_epi32(dot, w1, _mm512_loadu_si512(xs + 32));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(step_scale[r * steps + s]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int R>
void int8_rows(const int8_t* wp, const QuantizedActivations& xq, int64_t r, int64_t k, const float* scale,
               int64_t n, int64_t o, at::BFloat16* y) {
  float out[R];
  int8_row<R>(wp + o * k, xq.values.data() + r * k, xq.scale.data() + r * (k / kQuantStep), k, out);
  for (int i = 0; i < R; ++i) y[(r + i) * n + o] = at::BFloat16(out[i] * scale[o]);
}

// x [M, K] bfloat16 (M small) times int8 weight [N, K] with one scale per output row -> [M, N] bfloat16.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bfloat16 [M, K]");
  check_int8(weight, scale, k);
  const QuantizedActivations xq = quantize_activations(x);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sc = sf.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 256, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = 0; r < m; r += kMaxRows) {
        switch (std::min<int64_t>(kMaxRows, m - r)) {
          case 1: int8_rows<1>(wp, xq, r, k, sc, n, o, yp); break;
          case 2: int8_rows<2>(wp, xq, r, k, sc, n, o, yp); break;
          case 3: int8_rows<3>(wp, xq, r, k, sc, n, o, yp); break;
          default: int8_rows<4>(wp, xq, r, k, sc, n, o, yp); break;
        }
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("int8_gemv(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("int8_gemv", &int8_gemv);
}
