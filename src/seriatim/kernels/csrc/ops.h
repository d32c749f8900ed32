// seriatim's ops as C++ functions, so that ops built from them (decode_layer.cpp) call them directly.
#pragma once

#include <ATen/ATen.h>

// The namespace the ops register in: each ISA tier's library has its own (library.py passes
// -DSERIATIM_OPS=...), so that libraries of two tiers can be loaded side by side in one process.
#ifndef SERIATIM_OPS
#define SERIATIM_OPS seriatim
#endif

namespace seriatim {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool scale_in_float32);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& write,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale);
at::Tensor int4_dequantize_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
// The AMX products exist in the AVX-512 library only (decode_layer.cpp asks for them there alone).
at::Tensor int4_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
// float_out: float32 products (the logits) instead of bfloat16 ones.
at::Tensor int8_mm_amx(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out = false);
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, bool float_out = false);

}  // namespace seriatim
