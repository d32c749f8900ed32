// RMSNorm, rotary embedding and silu(gate) * up as one op each (csrc/fused.cpp's ops), eight float32 lanes
// at a time with AVX2 and FMA. The argument checks and the arithmetic are those of the AVX-512 version: float32
// with one bfloat16 rounding at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ops.h"
#include "vec8.h"

#include <algorithm>
#include <cmath>

namespace seriatim {

using at::BFloat16;

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool scale_in_float32) {
  const NormRows r = check_rms_norm(x, weight, scale_in_float32);
  const int64_t d = r.dim;
  at::Tensor y = at::empty(x.sizes(), x.options());
  const BFloat16* xp = x.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  const float* w32 = scale_in_float32 ? weight.data_ptr<float>() : nullptr;
  const BFloat16* w16 = scale_in_float32 ? nullptr : weight.data_ptr<BFloat16>();
  at::parallel_for(0, r.count * r.parts, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / r.parts, part = i % r.parts;
      const BFloat16* src = xp + row * r.stride + part * d;
      BFloat16* dst = yp + i * d;
      __m256 squares = _mm256_setzero_ps();
      for (int64_t j = 0; j < d; j += kLanes) {
        const __m256 v = load_bf16(src + j, d - j);
        squares = _mm256_fmadd_ps(v, v, squares);
      }
      const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(sum8(squares) / static_cast<float>(d) + static_cast<float>(eps)));
      for (int64_t j = 0; j < d; j += kLanes) {
        const __m256 h = _mm256_mul_ps(load_bf16(src + j, d - j), inv);
        const __m256 out = w32 ? _mm256_mul_ps(h, load_f32(w32 + part * d + j, d - j))
                               : _mm256_mul_ps(load_bf16(w16 + part * d + j, d - j), round_bf16(h));
        store_bf16(dst + j, out, d - j);
      }
    }
  });
  return y;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rotary(x, cos, sin);
  const int64_t t = x.size(0), heads = x.size(1), dh = x.size(2), half = dh / 2;
  at::Tensor y = at::empty({t, heads, dh}, x.options());
  const BFloat16 *xp = x.data_ptr<BFloat16>(), *cp = cos.data_ptr<BFloat16>(), *sp = sin.data_ptr<BFloat16>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  const int64_t row_stride = x.stride(0);
  at::parallel_for(0, t * heads, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pos = i / heads, head = i % heads;
      const BFloat16* src = xp + pos * row_stride + head * dh;
      const BFloat16 *c = cp + pos * dh, *s = sp + pos * dh;
      BFloat16* dst = yp + i * dh;
      for (int64_t j = 0; j < half; j += kLanes) {
        const int64_t n = half - j;
        const __m256 a = load_bf16(src + j, n), b = load_bf16(src + j + half, n);
        store_bf16(dst + j, _mm256_fmsub_ps(a, load_bf16(c + j, n), _mm256_mul_ps(b, load_bf16(s + j, n))), n);
        store_bf16(dst + j + half,
                   _mm256_fmadd_ps(b, load_bf16(c + j + half, n), _mm256_mul_ps(a, load_bf16(s + j + half, n))), n);
      }
    }
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_silu_mul(gate_up);
  const int64_t t = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor y = at::empty({t, width}, gate_up.options());
  const BFloat16* src = gate_up.data_ptr<BFloat16>();
  BFloat16* dst = y.data_ptr<BFloat16>();
  const int64_t spans = (width + kSiluSpan - 1) / kSiluSpan;
  at::parallel_for(0, t * spans, 16, [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / spans, from = item % spans * kSiluSpan;
      const BFloat16* gate = src + row * 2 * width;
      for (int64_t j = from; j < std::min(width, from + kSiluSpan); j += kLanes) {
        const int64_t n = width - j;
        const __m256 g = load_bf16(gate + j, n);
        // 1 / (1 + e^-g): the 12-bit reciprocal and one Newton step; e^-g capped at e^88 (finite).
        const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.f)));
        const __m256 d = _mm256_add_ps(one, e);
        __m256 r = _mm256_rcp_ps(d);
        r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, one), r);
        store_bf16(dst + row * width + j, _mm256_mul_ps(_mm256_mul_ps(g, r), load_bf16(gate + width + j, n)), n);
      }
    }
  });
  return y;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(SERIATIM_OPS, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps, bool scale_in_float32) -> Tensor");
  lib.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  lib.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(SERIATIM_OPS, CPU, lib) {
  lib.impl("rms_norm", &seriatim::rms_norm);
  lib.impl("rotary", &seriatim::rotary);
  lib.impl("silu_mul", &seriatim::silu_mul);
}
