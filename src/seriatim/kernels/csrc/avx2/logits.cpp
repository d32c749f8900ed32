// argmax_rows and apply_bitmask (csrc/argmax.cpp, csrc/bitmask.cpp) for the AVX2 tier: plain loops, which
// the compiler vectorises where it can. Same results: the first index of the largest value (of the first
// NaN where a row has one, as torch), and -inf wherever a mask's bit is clear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../logits.h"
#include "../ops.h"

#include <cmath>
#include <limits>

namespace {

int64_t argmax_row(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > x[best]) best = j;
  }
  return best;
}

void mask_row(float* x, int64_t n, const uint32_t* bits, int64_t words) {
  constexpr float kCut = -std::numeric_limits<float>::infinity();
  for (int64_t w = 0; w * 32 < n; ++w) {
    const uint32_t word = w < words ? bits[w] : 0;  // tokens the mask does not cover are not allowed
    if (word == 0xFFFFFFFFu) continue;
    for (int64_t t = 0; t < 32 && w * 32 + t < n; ++t)
      if (!(word >> t & 1u)) x[w * 32 + t] = kCut;
  }
}

}  // namespace

namespace seriatim {

at::Tensor argmax_rows(const at::Tensor& x) { return argmax_rows_by(x, argmax_row); }

at::Tensor apply_bitmask(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& rows) {
  return apply_bitmask_by(x, bits, rows, mask_row);
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(SERIATIM_OPS, lib) {
  lib.def("argmax_rows(Tensor x) -> Tensor");
  lib.def("apply_bitmask(Tensor x, Tensor bits, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(SERIATIM_OPS, CPU, lib) {
  lib.impl("argmax_rows", &seriatim::argmax_rows);
  lib.impl("apply_bitmask", &seriatim::apply_bitmask);
}
