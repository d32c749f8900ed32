// Attention of one new query per sequence over its cached keys and values, bfloat16 on the CPU.
//
// A decode step attends one query per sequence and layer. torch's CPU SDPA spends ~30 us on that for a
// short context (it is built for long query blocks), and for a batch the keys must first be gathered
// into a padded tensor. Here each (sequence, key/value head) pair is a small loop: scores for its
// group of query heads, softmax, weighted sum of values, in float32, reading keys and values where
// they lie in the cache (contiguous, or at the slots of a paged block table).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::BFloat16;
using namespace seriatim;

constexpr int kMaxDim = 256;  // head dimensions up to this (16 vectors of 16)

// One query head q [dim] over `length` keys/values found by key(j), value(j) -> out [dim].
template <typename Key, typename Value>
void attend_one(const BFloat16* q, int64_t dim, int64_t length, float scale, Key key, Value value,
                std::vector<float>& scores, BFloat16* out) {
  const int64_t vecs = dim / 16;
  __m512 qv[kMaxDim / 16];
  for (int64_t d = 0; d < vecs; ++d) qv[d] = _mm512_mul_ps(load_bf16(q + 16 * d), _mm512_set1_ps(scale));
  float top = -INFINITY;
  for (int64_t j = 0; j < length; ++j) {
    const BFloat16* k = key(j);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < vecs; ++d) acc = _mm512_fmadd_ps(qv[d], load_bf16(k + 16 * d), acc);
    scores[j] = _mm512_reduce_add_ps(acc);
    top = std::max(top, scores[j]);
  }
  __m512 sum[kMaxDim / 16];
  for (int64_t d = 0; d < vecs; ++d) sum[d] = _mm512_setzero_ps();
  float total = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    const float p = std::exp(scores[j] - top);
    total += p;
    const BFloat16* v = value(j);
    for (int64_t d = 0; d < vecs; ++d) sum[d] = _mm512_fmadd_ps(_mm512_set1_ps(p), load_bf16(v + 16 * d), sum[d]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int64_t d = 0; d < vecs; ++d)
    store_bf16(out + 16 * d, _mm512_mul_ps(sum[d], inv));
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "q, k and v must be bfloat16");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [B, H, Dh]");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
                  v.stride(1) == v.size(2) && k.stride(0) == v.stride(0),
              "k and v must be [Hkv, positions, Dh] with each position's head contiguous");
  const int64_t heads = q.size(1), kv_heads = k.size(0), dim = q.size(2);
  TORCH_CHECK(k.size(2) == dim && dim % 16 == 0 && dim <= kMaxDim && heads % kv_heads == 0,
              "head dimension must be a multiple of 16 up to 256, and query heads a multiple of key/value heads");
}

// q [B, H, Dh]; k/v the cache [Hkv, S, Dh]; sequence b reads the slots slots[b, :lengths[b]] -> [B, H, Dh].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                            const at::Tensor& lengths, double scale) {
  check(q, k, v);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.is_contiguous() && slots.size(0) == q.size(0),
              "slots must be contiguous int64 [B, width]");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == q.size(0), "lengths must be int64 [B]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(0);
  const int64_t group = heads / kv_heads, width = slots.size(1), head_stride = k.stride(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(lp[b] >= 1 && lp[b] <= width, "lengths must lie in [1, width]");
  at::Tensor out = at::empty_like(q);
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *kp = k.data_ptr<BFloat16>(), *vp = v.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kv_heads, kvh = t % kv_heads;
      const int64_t* row = sp + b * width;
      const BFloat16 *kh = kp + kvh * head_stride, *vh = vp + kvh * head_stride;
      auto key = [&](int64_t j) { return kh + row[j] * dim; };
      auto value = [&](int64_t j) { return vh + row[j] * dim; };
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g;
        attend_one(qp + (b * heads + h) * dim, dim, lp[b], static_cast<float>(scale), key, value, scores,
                   op + (b * heads + h) * dim);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
}
