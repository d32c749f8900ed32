// argmax_rows and apply_bitmask around a tier's per-row function: the arguments each accepts, and rows
// split across threads, the same at every tier. ISA-neutral C++.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace seriatim {

// x [N, V] float32 -> [N] int64: row_argmax(row, V) for each row.
template <typename RowArgmax>
at::Tensor argmax_rows_by(const at::Tensor& x, RowArgmax row_argmax) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 && x.size(1) < (int64_t{1} << 31),
              "x must be float32 [N, V] with contiguous rows");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = row_argmax(xp + r * x.stride(0), x.size(1));
  });
  return out;
}

// A copy of x [N, V] float32 with row rows[i] masked by bits[i] [W] int32 (bit t of word w: token 32 w + t),
// each row by mask_row(row, V, bits, W).
template <typename MaskRow>
at::Tensor apply_bitmask_by(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& rows, MaskRow mask_row) {
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
