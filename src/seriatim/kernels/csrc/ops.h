// seriatim's ops as C++ functions, so that ops built from them (decode_layer.cpp) call them directly.
#pragma once

#include <ATen/ATen.h>

namespace seriatim {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool scale_in_float32);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& write,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale);
at::Tensor int4_dequantize_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
at::Tensor int4_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
// float_out: float32 products (the logits) instead of bfloat16 ones.
at::Tensor int8_mm_amx(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out = false);
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out = false);

}  // namespace seriatim
