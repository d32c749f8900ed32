// One Llama-family decoder layer of a decoding step as one op (fused_decode.py), bfloat16 on the CPU.
//
// A decode step of a small model is mostly overhead: SmolLM2's layer is ~25 tensor ops and a dozen module
// calls from Python, ~150 us, against ~140 us of arithmetic. Here the layer calls the same functions the
// modules reach (our fused ops, the products each module would pick for this many rows), in the same order
// with the same arguments, so its output is the modules' bit for bit, without the Python in between.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

#include <optional>

namespace {

// Which product a projection takes (quant.product_path, decided per pass by fused_decode.py).
enum Path : int64_t { kVector = 0, kAmx = 1 };

// x [T, K] times a projection given as its tensors: packed int4 and scales_zeros (quant.Int4Linear), int8
// and row scales (quant.Int8Linear), or a dense weight; by the product the module would take for T rows.
at::Tensor product(const at::Tensor& x, at::TensorList w, int64_t group, int64_t path) {
  if (w[0].scalar_type() == at::kByte) {
    if (path == kAmx) return seriatim::int4_mm_amx(x, w[0], w[1], group);
    return x.size(0) == 1 ? seriatim::int4_gemv(x, w[0], w[1], group) : at::_weight_int4pack_mm_for_cpu(x, w[0], group, w[1]);
  }
  if (w[0].scalar_type() == at::kChar) {
    if (path == kAmx) return seriatim::int8_mm_amx(x, w[0], w[1]);
    return w[0].size(1) % 64 == 0 ? seriatim::int8_gemv(x, w[0], w[1]) : at::_weight_int8pack_mm(x, w[0], w[1]);
  }
  return at::linear(x, w[0]);
}

// x [T, D] -> [T, D]: pre-norm attention and SwiGLU, each added to the residual stream. Rows `rows` of
// the batch are the decoding sequences (decode_attention's arguments from `rows` to `scale`); `paths`
// gives the product of qkv, o, gate_up and down.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, double eps,
                        at::TensorList qkv, const std::optional<at::Tensor>& qkv_bias, at::TensorList o,
                        at::TensorList gate_up, at::TensorList down, int64_t group, at::IntArrayRef paths, const at::Tensor& cos,
                        const at::Tensor& sin, int64_t heads, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& rows, const at::Tensor& write, const at::Tensor& slots,
                        const at::Tensor& lengths, double scale) {
  const int64_t kv_heads = k_cache.size(0), dim = k_cache.size(2);
  at::Tensor h = product(seriatim::rms_norm(x, attn_norm, eps, false), qkv, group, paths[0]);  // [T, (H + 2 Hkv) Dh]
  if (qkv_bias) h = h + *qkv_bias;
  const at::Tensor qk = seriatim::rotary(h.narrow(1, 0, (heads + kv_heads) * dim).view({-1, heads + kv_heads, dim}), cos, sin);
  const at::Tensor v = h.narrow(1, (heads + kv_heads) * dim, kv_heads * dim).view({-1, kv_heads, dim});
  const at::Tensor attn = seriatim::decode_attention(qk.narrow(1, 0, heads), qk.narrow(1, heads, kv_heads), v, k_cache,
                                                     v_cache, rows, write, slots, lengths, scale);  // [T, H, Dh]
  const at::Tensor y = x + product(attn.view({-1, heads * dim}), o, group, paths[1]);
  const at::Tensor gated = seriatim::silu_mul(product(seriatim::rms_norm(y, ffn_norm, eps, false), gate_up, group, paths[2]));
  return y + product(gated, down, group, paths[3]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("decode_layer(Tensor x, Tensor attn_norm, Tensor ffn_norm, float eps, Tensor[] qkv, Tensor? qkv_bias, "
          "Tensor[] o, Tensor[] gate_up, Tensor[] down, int group, int[] paths, Tensor cos, Tensor sin, int heads, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, Tensor write, Tensor slots, Tensor lengths, "
          "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("decode_layer", &decode_layer);
}
