// Grammar masks applied to float32 logits: every token whose bit is clear becomes -inf.
//
// llguidance writes one bit per token (32 tokens per int32 word). torch's masked_fill over [16, 49152] after
// unpacking the bits took ~2 ms here, ~6% of a step of sixteen sequences; here each word's two halves are
// AVX-512 store masks, so a fully allowed word costs one compare and a row is one pass over its logits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

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

// A copy of x [N, V] float32 with row rows[i] masked by bits[i] [W] int32 (bit t of word w: token 32 w + t).
at::Tensor apply_bitmask(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& rows) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [N, V]");
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2 && bits.is_contiguous(), "bits must be int32 [R, W]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == bits.size(0),
              "rows must be int64 [R], one per mask");
  at::Tensor out = x.contiguous().clone();
  const int64_t n = out.size(1), words = bits.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(0 <= rp[i] && rp[i] < out.size(0), "row ", rp[i], " is outside x");
  float* op = out.data_ptr<float>();
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  at::parallel_for(0, rows.size(0), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) mask_row(op + rp[i] * n, n, bp + i * words, words);
  });
  return out;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("apply_bitmask(Tensor x, Tensor bits, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("apply_bitmask", &seriatim::apply_bitmask);
}
