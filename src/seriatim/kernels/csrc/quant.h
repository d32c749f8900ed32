// The compact weight forms (model/quant.py) as every tier's kernels read them: ISA-neutral C++.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace seriatim {

// Packed int4 (torch's CPU layout): per block of 64 outputs and per input column, 32 bytes, output i in the
// low nibble of byte i and output 32 + i in its high nibble. scales_zeros [K/group, N, 2] holds bfloat16
// (scale, zero) pairs, and a weight is (q - 8) * scale + zero.
constexpr int64_t kInt4Block = 64;

inline void check_int4(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t k, int64_t group) {
  const int64_t n = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == k,
              "packed int4 weight must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(n % kInt4Block == 0 && group > 0 && k % group == 0, "N must be a multiple of 64 and K of the group");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                  scales_zeros.dim() == 3 && scales_zeros.size(0) == k / group && scales_zeros.size(1) == n &&
                  scales_zeros.size(2) == 2,
              "scales_zeros must be contiguous bfloat16 [K/group, N, 2]");
}

// ---- int8 weights [N, K] with one scale per output row, times activations quantized to 16 bits ---------
//
// The integer kernels (amx_mm.cpp, gemv.cpp) quantize each activation row to int16 with one scale per row
// (its largest magnitude at kActivationMax): finer than the bfloat16 values themselves for all but the row's
// smallest values, and the same integers for every kernel. One scale per row lets a product sum in
// integers over the whole row, with no rescaling between steps of K: exactly, so that the vector kernel
// and the integer matrix products (gemv.cpp) give the same totals.
constexpr int64_t kQuantStep = 64;  // the kernels' step along K
// The largest int16 activation: 127 * 257, so that q = 256 hi + lo splits into hi and lo in [-128, 127]
// (gemv.cpp's int8_matrix) as well as into a signed high and unsigned low byte (amx_mm.cpp).
constexpr float kActivationMax = 32639.f;

inline void check_int8(const at::Tensor& weight, const at::Tensor& scale, int64_t k) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == k,
              "weight must be contiguous int8 [N, K]");
  TORCH_CHECK(k % kQuantStep == 0, "K must be a multiple of 64");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == weight.size(0), "scale must be [N]");
}

struct QuantizedActivations {
  std::vector<int16_t> values;  // [M, K]
  std::vector<float> scale;     // [M]: value * scale is the activation
};

inline QuantizedActivations quantize_activations(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  QuantizedActivations q{std::vector<int16_t>(m * k), std::vector<float>(m)};
  for (int64_t r = 0; r < m; ++r) {
    const float* v = xp + r * k;
    float top = 0.f;
    for (int64_t c = 0; c < k; ++c) top = std::max(top, std::abs(v[c]));
    const float row_scale = top > 0.f ? top / kActivationMax : 1.f, inv = 1.f / row_scale;
    q.scale[r] = row_scale;
    for (int64_t c = 0; c < k; ++c) q.values[r * k + c] = static_cast<int16_t>(std::nearbyint(v[c] * inv));
  }
  return q;
}

// An output from its exact total: rounded once to float32, times the activation row's scale, then the
// weight row's. Every int8 kernel ends this way.
template <typename Out>
inline Out int8_output(int64_t total, float row_scale, float weight_scale) {
  return Out(static_cast<float>(total) * row_scale * weight_scale);
}

constexpr int64_t kInt8Rows = 4;  // activation rows per pass over an int8 weight row

template <typename Dots, int R, typename Out>
void int8_rows(const int8_t* wp, const QuantizedActivations& xq, int64_t r, int64_t k, const float* scale,
               int64_t n, int64_t o, Out* y) {
  int64_t total[R];
  Dots::template run<R>(wp + o * k, xq.values.data() + r * k, k, total);
  for (int i = 0; i < R; ++i) y[(r + i) * n + o] = int8_output<Out>(total[i], xq.scale[r + i], scale[o]);
}

// Every output o of every row of xq (m rows, a few) into y [m, n] of bfloat16 or float32: each weight row
// read once for all of them, kInt8Rows rows at a time. `Dots::run<R>(w, xq, k, total)` is a tier's exact
// integer dot products of one weight row with R activation rows.
template <typename Dots, typename Out>
void int8_outputs(const int8_t* wp, const QuantizedActivations& xq, int64_t m, int64_t k, const float* sc, int64_t n,
                  Out* y) {
  at::parallel_for(0, n, 256, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = 0; r < m; r += kInt8Rows) {
        switch (std::min<int64_t>(kInt8Rows, m - r)) {
          case 1: int8_rows<Dots, 1>(wp, xq, r, k, sc, n, o, y); break;
          case 2: int8_rows<Dots, 2>(wp, xq, r, k, sc, n, o, y); break;
          case 3: int8_rows<Dots, 3>(wp, xq, r, k, sc, n, o, y); break;
          default: int8_rows<Dots, 4>(wp, xq, r, k, sc, n, o, y); break;
        }
      }
  });
}

}  // namespace seriatim
