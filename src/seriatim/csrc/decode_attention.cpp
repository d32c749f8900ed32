// Attention of one new query per sequence over its cached keys and values, bfloat16 on the CPU.
//
// A decode step attends one query per sequence and layer. torch's CPU SDPA spends ~30 us on that for a
// short context (it is built for long query blocks), and for a batch the keys must first be gathered
// into a padded tensor. Here each (sequence, key/value head) pair is a small loop: scores for its
// group of query heads, softmax, weighted sum of values, in float32, reading keys and values where
// they lie in the cache (at the slots of the sequence's block table), after storing the new ones.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "ops.h"
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

// A [T, heads, Dh] bfloat16 tensor whose heads are contiguous (rows may be a strided view).
void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be bfloat16 [T, heads, Dh] with each row's heads contiguous");
}

}  // namespace

namespace seriatim {

// The new token of each decoding sequence b (row rows[b] of the flat batch q [T, H, Dh], k/v [T, Hkv, Dh]):
// its key and value are stored at slot write[b] of the cache [Hkv, S, Dh], then its query attends over the
// slots slots[b, :lengths[b]] -> [B, H, Dh]. One op for the store and the attention: the decode's
// gathers, cache writes and attention took six per layer.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& write,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.dim() == 3,
              "the caches must be contiguous bfloat16 [Hkv, S, Dh]");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(0), dim = q.size(2), capacity = k_cache.size(1);
  TORCH_CHECK(k.size(1) == kv_heads && v.size(1) == kv_heads && k.size(2) == dim && k_cache.size(2) == dim &&
                  dim % 16 == 0 && dim <= kMaxDim && heads % kv_heads == 0,
              "head dimension must be a multiple of 16 up to 256, and query heads a multiple of key/value heads");
  const int64_t batch = rows.numel(), width = slots.size(1);
  for (const at::Tensor* t : {&rows, &write, &lengths})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == batch, "rows, write and lengths must be int64 [B]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.is_contiguous() && slots.size(0) == batch,
              "slots must be contiguous int64 [B, width]");
  const int64_t *rp = rows.data_ptr<int64_t>(), *wp = write.data_ptr<int64_t>();
  const int64_t *sp = slots.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < q.size(0) && wp[b] >= 0 && wp[b] < capacity, "row or slot out of range");
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width, "lengths must lie in [1, width]");
    for (int64_t j = 0; j < lp[b]; ++j) TORCH_CHECK(sp[b * width + j] >= 0 && sp[b * width + j] < capacity, "slot out of range");
  }
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *kp = k.data_ptr<BFloat16>(), *vp = v.data_ptr<BFloat16>();
  BFloat16 *kc = k_cache.data_ptr<BFloat16>(), *vc = v_cache.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  const int64_t head_stride = capacity * dim;
  // One task per (sequence, key/value head): it stores that head's new key and value, then attends. No
  // other task reads the slot it writes (a sequence's new slot is in a block of its own).
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kv_heads, kvh = t % kv_heads, row = rp[b];
      BFloat16 *kh = kc + kvh * head_stride, *vh = vc + kvh * head_stride;
      std::copy_n(kp + row * k.stride(0) + kvh * dim, dim, kh + wp[b] * dim);
      std::copy_n(vp + row * v.stride(0) + kvh * dim, dim, vh + wp[b] * dim);
      const int64_t* seq = sp + b * width;
      auto key = [&](int64_t j) { return kh + seq[j] * dim; };
      auto value = [&](int64_t j) { return vh + seq[j] * dim; };
      for (int64_t g = 0; g < heads / kv_heads; ++g) {
        const int64_t h = kvh * (heads / kv_heads) + g;
        attend_one(qp + row * q.stride(0) + h * dim, dim, lp[b], static_cast<float>(scale), key, value, scores,
                   op + (b * heads + h) * dim);
      }
    }
  });
  return out;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
          "Tensor write, Tensor slots, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("decode_attention", &seriatim::decode_attention);
}
