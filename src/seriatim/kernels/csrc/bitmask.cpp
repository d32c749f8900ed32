// Grammar masks applied to float32 logits: every token whose bit is clear becomes -inf.
//
// llguidance writes one bit per token (32 tokens per int32 word). torch's masked_fill over [16, 49152] after
// unpacking the bits took ~2 ms here, ~6% of a step of sixteen sequences; here each word's two halves are
// AVX-512 store masks, so a fully allowed word costs one compare and a row is one pass over its logits.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include "logits.h"
#include "simd.h"

#include <limits>

namespace {

void mask_row(float* x, int64_t n, const uint32_t* bits, int64_t words) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t w = j / 32;
    const uint32_t word = w < words ? bits[w] : 0;  // tokens the mask does not cover are not allowed
    const __mmask16 allowed = static_cast<__mmask16>(j % 32 ? word >> 16 : word & 0xFFFF);
    const __mmask16 cut = static_cast<__mmask16>(~allowed) & seriatim::first(n - j);
    if (cut) _mm512_mask_storeu_ps(x + j, cut, neg_inf);
  }
}

}  // namespace

namespace seriatim {

// A copy of x [N, V] float32 with row rows[i] masked by bits[i] (logits.h).
at::Tensor apply_bitmask(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& rows) {
  return apply_bitmask_by(x, bits, rows, mask_row);
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("apply_bitmask(Tensor x, Tensor bits, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("apply_bitmask", &seriatim::apply_bitmask);
}
