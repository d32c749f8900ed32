// The Llama-family decoder layers of a decoding step in C++ (fused_decode.py), bfloat16 on the CPU.
//
// A decode step of a small model is mostly overhead: a layer is ~25 tensor ops and a dozen module calls
// from Python, about as long as its arithmetic. Here a layer calls the same functions the modules reach
// (our fused ops, and the product each module picked in Python for this many rows), in the same order
// with the same arguments, so its output is the modules' bit for bit, without the Python in between; and
// one call runs every layer of the pass (DecodeStack).
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "ops.h"

#include <optional>

namespace {

// Which product a projection takes: quant.Product, decided in Python by the module itself.
enum Product : int64_t { kVector = 0, kWeightOnly = 1, kAmx = 2, kDense = 3 };

// The AMX products where this library has them (the AVX-512 one); Python picks them only where it does.
#ifdef __AMX_TILE__
at::Tensor amx_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group) {
  return seriatim::int4_mm_amx(x, packed, sz, group);
}
at::Tensor amx_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  return seriatim::int8_mm_amx(x, weight, scale);
}
#else
at::Tensor amx_int4(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "this ISA tier's kernels have no AMX products");
}
at::Tensor amx_int8(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "this ISA tier's kernels have no AMX products");
}
#endif

// x [T, K] times a projection given as its tensors: packed int4 and scales_zeros (quant.Int4Linear), int8
// and row scales (quant.Int8Linear), or a dense weight; by `product`, as the module's forward runs it.
at::Tensor product(const at::Tensor& x, at::TensorList w, int64_t group, int64_t product) {
  if (w[0].scalar_type() == at::kByte) {
    switch (product) {
      case kVector: return seriatim::int4_gemv(x, w[0], w[1], group);
      case kAmx: return amx_int4(x, w[0], w[1], group);
      case kDense: return x.matmul(seriatim::int4_dequantize_t(w[0], w[1], group));
      default: return at::_weight_int4pack_mm_for_cpu(x, w[0], group, w[1]);
    }
  }
  if (w[0].scalar_type() == at::kChar) {
    switch (product) {
      case kVector: return seriatim::int8_gemv(x, w[0], w[1]);
      case kAmx: return amx_int8(x, w[0], w[1]);
      case kDense: return at::linear(x, w[0].to(w[1].scalar_type()) * w[1].unsqueeze(1));
      default: return at::_weight_int8pack_mm(x, w[0], w[1]);
    }
  }
  if (w[0].scalar_type() != x.scalar_type()) {  // quant.Float32Linear: a float32 product per row, rounded back
    const at::Tensor rows = x.to(w[0].scalar_type()).unsqueeze(1);  // [T, 1, K]
    return at::bmm(rows, w[0].t().expand({x.size(0), -1, -1})).squeeze(1).to(x.scalar_type());
  }
  return at::linear(x, w[0]);
}

// x [T, D] -> [T, D]: pre-norm attention and SwiGLU, each added to the residual stream. Rows `rows` of
// the batch are the decoding sequences (decode_attention's arguments from `rows` to `scale`); `products`
// gives the product of qkv, o, gate_up and down.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, double eps,
                        at::TensorList qkv, const std::optional<at::Tensor>& qkv_bias, at::TensorList o,
                        at::TensorList gate_up, at::TensorList down, int64_t group, at::IntArrayRef products, const at::Tensor& cos,
                        const at::Tensor& sin, int64_t heads, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& rows, const at::Tensor& write, const at::Tensor& slots,
                        const at::Tensor& lengths, double scale) {
  const int64_t kv_heads = k_cache.size(0), dim = k_cache.size(2);
  at::Tensor h = product(seriatim::rms_norm(x, attn_norm, eps, false), qkv, group, products[0]);  // [T, (H + 2 Hkv) Dh]
  if (qkv_bias) h = h + *qkv_bias;
  const at::Tensor qk = seriatim::rotary(h.narrow(1, 0, (heads + kv_heads) * dim).view({-1, heads + kv_heads, dim}), cos, sin);
  const at::Tensor v = h.narrow(1, (heads + kv_heads) * dim, kv_heads * dim).view({-1, kv_heads, dim});
  const at::Tensor attn = seriatim::decode_attention(qk.narrow(1, 0, heads), qk.narrow(1, heads, kv_heads), v, k_cache,
                                                     v_cache, rows, write, slots, lengths, scale);  // [T, H, Dh]
  const at::Tensor y = x + product(attn.view({-1, heads * dim}), o, group, products[1]);
  const at::Tensor gated = seriatim::silu_mul(product(seriatim::rms_norm(y, ffn_norm, eps, false), gate_up, group, products[2]));
  return y + product(gated, down, group, products[3]);
}

// A decoding pass's layers with their weights gathered once, run by one call per pass: a call of
// decode_layer from Python per layer would pay its argument handling once a layer.
struct DecodeStack : torch::CustomClassHolder {
  struct Layer {
    at::Tensor attn_norm, ffn_norm;
    std::optional<at::Tensor> qkv_bias;
    std::vector<at::Tensor> w[4];  // the tensors of qkv, o, gate_up and down
  };
  std::vector<Layer> layers;
  double eps, scale;
  int64_t group, heads;

  // parts holds, per layer: attn_norm, ffn_norm, the QKV bias if there is one, then the tensors of qkv, o,
  // gate_up and down; layout holds, per layer, whether there is a bias and how many tensors each
  // projection has. Read once here, into `layers`.
  DecodeStack(std::vector<at::Tensor> parts, std::vector<int64_t> layout, double eps, int64_t group, int64_t heads,
              double scale)
      : eps(eps), scale(scale), group(group), heads(heads) {
    TORCH_CHECK(layout.size() % 5 == 0, "layout holds five numbers per layer");
    size_t next = 0;
    auto take = [&](int64_t count) {
      TORCH_CHECK(next + count <= parts.size(), "layout counts more tensors than parts holds");
      next += count;
      return std::vector<at::Tensor>(parts.begin() + (next - count), parts.begin() + next);
    };
    for (size_t i = 0; i < layout.size(); i += 5) {
      Layer layer;
      layer.attn_norm = take(1)[0];
      layer.ffn_norm = take(1)[0];
      if (layout[i]) layer.qkv_bias = take(1)[0];
      for (int j = 0; j < 4; ++j) layer.w[j] = take(layout[i + 1 + j]);
      layers.push_back(std::move(layer));
    }
    TORCH_CHECK(next == parts.size(), "parts holds more tensors than layout counts");
  }

  // x [T, D] through every layer -> [T, D]. Layer i's cache is k_pool[i], v_pool[i] ([layers, Hkv, S, Dh])
  // and its products products[4i .. 4i + 4); the other arguments are decode_layer's, the same for every layer.
  at::Tensor forward(at::Tensor x, std::vector<int64_t> products, at::Tensor cos, at::Tensor sin, at::Tensor k_pool,
                     at::Tensor v_pool, at::Tensor rows, at::Tensor write, at::Tensor slots, at::Tensor lengths) {
    TORCH_CHECK(products.size() == 4 * layers.size(), "products holds four codes per layer");
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& l = layers[i];
      at::Tensor k_cache = k_pool.select(0, i), v_cache = v_pool.select(0, i);
      x = decode_layer(x, l.attn_norm, l.ffn_norm, eps, l.w[0], l.qkv_bias, l.w[1], l.w[2], l.w[3], group, at::IntArrayRef(products).slice(4 * i, 4), cos,
                       sin, heads, k_cache, v_cache, rows, write, slots, lengths, scale);
    }
    return x;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(SERIATIM_OPS, lib) {
  lib.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double, int64_t, int64_t, double>())
      .def("forward", &DecodeStack::forward);
}
