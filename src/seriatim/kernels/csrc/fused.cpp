// RMSNorm, rotary embedding and SwiGLU's silu(gate) * up as one op each, for bfloat16 activations on the CPU.
//
// A decode step is ~45 small tensor ops per layer, each costing 1-2 us of dispatch however small the
// tensor; RMSNorm alone is eight of them and rotary seven. As single ops they remove most of that, and,
// vectorised, part of a long prefill chunk's time. Arithmetic is float32 with one rounding at the end
// (the eager ops round after each step), so results can differ from the eager path in the last bfloat16
// bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>

namespace seriatim {

using at::BFloat16;

// y = x / rms(x) * weight over the last dimension of x. weight has shape [..., D] covering x's trailing
// dimensions (one weight per head for a per-head norm). Llama rounds the normalised value to bfloat16
// before the weight (bfloat16); Gemma multiplies its float32 weight first (scale_in_float32).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool scale_in_float32) {
  const NormRows r = check_rms_norm(x, weight, scale_in_float32);
  const int64_t d = r.dim, w_rows = r.parts;
  at::Tensor y = at::empty(x.sizes(), x.options());
  const BFloat16* xp = x.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  const float* w32 = scale_in_float32 ? weight.data_ptr<float>() : nullptr;
  const BFloat16* w16 = scale_in_float32 ? nullptr : weight.data_ptr<BFloat16>();
  at::parallel_for(0, r.count * w_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / w_rows, part = i % w_rows;
      const BFloat16* src = xp + row * r.stride + part * d;
      BFloat16* dst = yp + i * d;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t j = 0; j < d; j += 16) {
        const __m512 v = load_bf16(src + j, d - j);
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const float sum = _mm512_reduce_add_ps(squares);
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps)));
      for (int64_t j = 0; j < d; j += 16) {
        const __m512 h = _mm512_mul_ps(load_bf16(src + j, d - j), inv);
        const __m512 out = w32 ? _mm512_mul_ps(h, load_f32(w32 + part * d + j, d - j))
                               : _mm512_mul_ps(load_bf16(w16 + part * d + j, d - j), round_bf16(h));
        store_bf16(dst + j, out, d - j);
      }
    }
  });
  return y;
}

// Rotate-half rotary embedding: x [T, heads, Dh] (rows may be a strided view), cos/sin [T, 1, Dh].
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rotary(x, cos, sin);
  const int64_t t = x.size(0), heads = x.size(1), dh = x.size(2), half = dh / 2;
  at::Tensor y = at::empty({t, heads, dh}, x.options());
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const BFloat16* cp = cos.data_ptr<BFloat16>();
  const BFloat16* sp = sin.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  const int64_t row_stride = x.stride(0);
  at::parallel_for(0, t * heads, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pos = i / heads, head = i % heads;
      const BFloat16* src = xp + pos * row_stride + head * dh;
      const BFloat16 *c = cp + pos * dh, *s = sp + pos * dh;
      BFloat16* dst = yp + i * dh;
      for (int64_t j = 0; j < half; j += 16) {
        const int64_t n = half - j;
        const __m512 a = load_bf16(src + j, n), b = load_bf16(src + j + half, n);
        store_bf16(dst + j, _mm512_fmsub_ps(a, load_bf16(c + j, n), _mm512_mul_ps(b, load_bf16(s + j, n))), n);
        store_bf16(dst + j + half, _mm512_fmadd_ps(b, load_bf16(c + j + half, n), _mm512_mul_ps(a, load_bf16(s + j + half, n))), n);
      }
    }
  });
  return y;
}

// SwiGLU's inner product: gate_up [T, 2I] (gate then up) -> silu(gate) * up [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_silu_mul(gate_up);
  const int64_t t = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor y = at::empty({t, width}, gate_up.options());
  const BFloat16* src = gate_up.data_ptr<BFloat16>();
  BFloat16* dst = y.data_ptr<BFloat16>();
  // Work items of kSpan values (checks.h); at least 16 items (~2.5 us) per thread.
  constexpr int64_t kSpan = kSiluSpan;
  const int64_t spans = (width + kSpan - 1) / kSpan;
  at::parallel_for(0, t * spans, 16, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / spans, from = item % spans * kSpan;
      const BFloat16* gate = src + row * 2 * width;
      for (int64_t j = from; j < std::min(width, from + kSpan); j += 16) {
        const int64_t n = width - j;
        const __m512 g = load_bf16(gate + j, n);
        // 1 / (1 + e^-g): the 14-bit reciprocal and one Newton step (division costs ~4x as much).
        // The exponent is capped where e^x still fits a float (88), so the reciprocal never meets infinity.
        const __m512 e = exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.f)));
        const __m512 d = _mm512_add_ps(one, e);
        __m512 r = _mm512_rcp14_ps(d);
        r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
        const __m512 silu = _mm512_mul_ps(g, r);
        store_bf16(dst + row * width + j, _mm512_mul_ps(silu, load_bf16(gate + width + j, n)), n);
      }
    }
  });
  return y;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps, bool scale_in_float32) -> Tensor");
  lib.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  lib.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("rms_norm", &seriatim::rms_norm);
  lib.impl("rotary", &seriatim::rotary);
  lib.impl("silu_mul", &seriatim::silu_mul);
}
