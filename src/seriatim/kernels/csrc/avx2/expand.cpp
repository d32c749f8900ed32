// Packed int4 weights (quant.Int4Linear) expanded to dense bfloat16, transposed (csrc/expand.cpp's op),
// with AVX2, from this tier's "quads" layout (gemv.cpp): for the dense matmul of long chunks where batch
// invariance is off.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "../ops.h"
#include "../quant.h"
#include "vec8.h"

#include <cstdint>

namespace seriatim {

at::Tensor int4_dequantize_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group) {
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  check_int4(packed, scales_zeros, k, group);
  at::Tensor wt = at::empty({k, n}, scales_zeros.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const at::BFloat16* sp = scales_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* dst = wt.data_ptr<at::BFloat16>();
  at::parallel_for(0, k / group, 1, [&](int64_t g0, int64_t g1) {
    alignas(32) float scale[kInt4Block], offset[kInt4Block];
    for (int64_t gi = g0; gi < g1; ++gi)
      for (int64_t b = 0; b < n / kInt4Block; ++b) {
        for (int64_t o = 0; o < kInt4Block; ++o) {  // weight = (q - 8) scale + zero = q scale + offset
          const at::BFloat16* pair = sp + 2 * (gi * n + b * kInt4Block + o);
          scale[o] = static_cast<float>(pair[0]);
          offset[o] = static_cast<float>(pair[1]) - 8.f * scale[o];
        }
        const uint8_t* block = wp + b * kInt4Block * k / 2;
        for (int64_t c = gi * group; c < (gi + 1) * group; ++c)  // the "quads" layout (gemv.cpp)
          for (int64_t o = 0; o < kInt4Block; o += kLanes) {
            const int64_t j = o % (kInt4Block / 2) / kLanes, shift = o < kInt4Block / 2 ? 0 : 4;
            const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + c / 4 * 2 * kInt4Block + 32 * j));
            const __m256i q = _mm256_and_si256(_mm256_srli_epi32(lanes, static_cast<int>(8 * (c % 4) + shift)), _mm256_set1_epi32(15));
            const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_load_ps(scale + o), _mm256_load_ps(offset + o));
            store_bf16(dst + c * n + b * kInt4Block + o, w);
          }
      }
  });
  return wt;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(SERIATIM_OPS, lib) {
  lib.def("int4_dequantize_t(Tensor packed, Tensor scales_zeros, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(SERIATIM_OPS, CPU, lib) {
  lib.impl("int4_dequantize_t", &seriatim::int4_dequantize_t);
}
