// The argument checks of the fused ops and of decode attention, shared by every tier's versions of them:
// ISA-neutral C++, so that each tier accepts exactly the same arguments.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace seriatim {

// Work items of this many values of a row in silu_mul, so that a batch of decodes (16 rows x 1536 for
// SmolLM2, ~15 us on one core) splits across threads while a lone decode's row stays on one.
constexpr int64_t kSiluSpan = 256;

// The rows an RMSNorm runs over: `count` rows `stride` apart, each `parts` weight rows of `dim` values (a
// per-head norm has one weight row per head).
struct NormRows {
  int64_t count, parts, dim, stride;
};

// rms_norm's arguments: x [..., D] bfloat16 with contiguous rows (possibly a strided view of a wider
// tensor); weight [..., D] covering x's trailing dimensions, float32 with scale_in_float32, else bfloat16.
inline NormRows check_rms_norm(const at::Tensor& x, const at::Tensor& weight, bool scale_in_float32) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "x must be a bfloat16 CPU tensor");
  const int64_t d = x.size(-1), parts = weight.numel() / d;
  TORCH_CHECK(weight.is_contiguous() && weight.numel() % d == 0 && (x.numel() / d) % parts == 0 &&
                  weight.dim() <= x.dim(),
              "weight must be contiguous and cover the trailing dimensions of x");
  TORCH_CHECK(weight.scalar_type() == (scale_in_float32 ? at::kFloat : at::kBFloat16),
              "weight must be float32 with scale_in_float32, else bfloat16");
  for (int64_t i = 1; i <= weight.dim(); ++i) TORCH_CHECK(weight.size(-i) == x.size(-i), "weight shape mismatch");
  TORCH_CHECK(x.dim() >= 2 && x.stride(-1) == 1, "rows must be contiguous in their last dimension");
  const at::Tensor flat = x.view({-1, d * parts});  // fails loudly where the leading dims do not flatten
  return {flat.size(0), parts, d, flat.stride(0)};
}

// rotary's arguments: x [T, heads, Dh] bfloat16 with each row's heads contiguous, cos and sin [T, 1, Dh].
inline void check_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.device().is_cpu(),
              "x must be a bfloat16 CPU tensor [T, heads, Dh]");
  TORCH_CHECK(x.size(2) % 2 == 0 && x.stride(2) == 1 && x.stride(1) == x.size(2), "each row's heads must be contiguous");
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->scalar_type() == at::kBFloat16 && c->is_contiguous() && c->numel() == x.size(0) * x.size(2),
                "cos and sin must be contiguous bfloat16 [T, 1, Dh]");
}

inline void check_silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 &&
                  gate_up.is_contiguous() && gate_up.device().is_cpu(),
              "gate_up must be a contiguous bfloat16 CPU tensor [T, 2I]");
}

// A [T, heads, Dh] bfloat16 tensor whose heads are contiguous (rows may be a strided view).
inline void check_head_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be bfloat16 [T, heads, Dh] with each row's heads contiguous");
}

// decode_attention's arguments (see decode_attention.cpp), with every row, slot and length in range.
inline void check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rows,
                                   const at::Tensor& write, const at::Tensor& slots, const at::Tensor& lengths,
                                   int64_t max_dim) {
  check_head_rows(q, "q");
  check_head_rows(k, "k");
  check_head_rows(v, "v");
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.dim() == 3,
              "the caches must be contiguous bfloat16 [Hkv, S, Dh]");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(0), dim = q.size(2), capacity = k_cache.size(1);
  TORCH_CHECK(k.size(1) == kv_heads && v.size(1) == kv_heads && k.size(2) == dim && k_cache.size(2) == dim &&
                  dim % 16 == 0 && dim <= max_dim && heads % kv_heads == 0,
              "head dimension must be a multiple of 16 up to 256, and query heads a multiple of key/value heads");
  const int64_t batch = rows.numel(), width = slots.size(1);
  for (const at::Tensor* t : {&rows, &write, &lengths})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == batch,
                "rows, write and lengths must be int64 [B]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.is_contiguous() && slots.size(0) == batch,
              "slots must be contiguous int64 [B, width]");
  const int64_t *rp = rows.data_ptr<int64_t>(), *wp = write.data_ptr<int64_t>();
  const int64_t *sp = slots.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < q.size(0) && wp[b] >= 0 && wp[b] < capacity, "row or slot out of range");
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width, "lengths must lie in [1, width]");
    for (int64_t j = 0; j < lp[b]; ++j)
      TORCH_CHECK(sp[b * width + j] >= 0 && sp[b * width + j] < capacity, "slot out of range");
  }
}

// Every new key and value (row rows[b] of k and v [T, Hkv, Dh]) stored at slot write[b] of the caches
// [Hkv, S, Dh], before any query attends: several rows may be new tokens of one sequence (a chunk), each
// seeing the ones before it.
inline void store_new_keys(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& rows, const at::Tensor& write) {
  const int64_t kv_heads = k_cache.size(0), dim = k_cache.size(2), head_stride = k_cache.size(1) * dim;
  const int64_t *rp = rows.data_ptr<int64_t>(), *wp = write.data_ptr<int64_t>();
  const at::BFloat16 *kp = k.data_ptr<at::BFloat16>(), *vp = v.data_ptr<at::BFloat16>();
  at::BFloat16 *kc = k_cache.data_ptr<at::BFloat16>(), *vc = v_cache.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < rows.numel(); ++b)
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::copy_n(kp + rp[b] * k.stride(0) + h * dim, dim, kc + h * head_stride + wp[b] * dim);
      std::copy_n(vp + rp[b] * v.stride(0) + h * dim, dim, vc + h * head_stride + wp[b] * dim);
    }
}

}  // namespace seriatim
