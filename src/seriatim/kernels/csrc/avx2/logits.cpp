// argmax_rows and apply_bitmask (csrc/argmax.cpp, csrc/bitmask.cpp) for the AVX2 tier: plain loops, which
// the compiler vectorises where it can. Same results: the first index of the largest value (of the first
// NaN where a row has one, as torch), and -inf wherever a mask's bit is clear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "x must be float32 [N, V] with contiguous rows");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * x.stride(0), x.size(1));
  });
  return out;
}

at::Tensor apply_bitmask(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& rows) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [N, V]");
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2 && bits.is_contiguous(), "bits must be int32 [R, W]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == bits.size(0),
              "rows must be int64 [R], one per mask");
  at::Tensor out = x.contiguous().clone();
  const int64_t n = out.size(1), words = bits.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) TORCH_CHECK(0 <= rp[i] && rp[i] < out.size(0), "row ", rp[i], " is outside x");
  float* op = out.data_ptr<float>();
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  at::parallel_for(0, rows.size(0), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) mask_row(op + rp[i] * n, n, bp + i * words, words);
  });
  return out;
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
