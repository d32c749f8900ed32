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

constexpr int64_t kAhead = 8;  // keys and values prefetched this many positions ahead

inline void prefetch_row(const BFloat16* p, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 32) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

// The `group` query heads sharing one key/value head (q: [group, dim], contiguous) over `length` keys and
// values found by key(j), value(j) -> out [group, dim]. Each key and value is read once for the group;
// softmax runs 16 scores at a time. `scores` holds [group][length].
template <typename Key, typename Value>
void attend_group(const BFloat16* q, int64_t group, int64_t dim, int64_t length, float scale, Key key, Value value,
                  std::vector<float>& scores, BFloat16* out) {
  const int64_t vecs = dim / 16;
  std::vector<__m512> qv(group * vecs), sum(group * vecs, _mm512_setzero_ps());
  for (int64_t i = 0; i < group * vecs; ++i) qv[i] = _mm512_mul_ps(load_bf16(q + 16 * i), _mm512_set1_ps(scale));
  for (int64_t j = 0; j < length; ++j) {
    const BFloat16* k = key(j);
    if (j + kAhead < length) prefetch_row(key(j + kAhead), dim);
    __m512 kv[kMaxDim / 16];
    for (int64_t d = 0; d < vecs; ++d) kv[d] = load_bf16(k + 16 * d);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < vecs; ++d) acc = _mm512_fmadd_ps(qv[g * vecs + d], kv[d], acc);
      scores[g * length + j] = _mm512_reduce_add_ps(acc);
    }
  }
  std::vector<float> inv(group);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * length;
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first(length - j), s + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    for (int64_t j = 0; j < length; j += 16) {
      const __m512 p = _mm512_maskz_mov_ps(first(length - j), exp16(_mm512_sub_ps(load_f32(s + j, length - j), m)));
      _mm512_mask_storeu_ps(s + j, first(length - j), p);
      total = _mm512_add_ps(total, p);
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(total);
  }
  for (int64_t j = 0; j < length; ++j) {
    const BFloat16* v = value(j);
    if (j + kAhead < length) prefetch_row(value(j + kAhead), dim);
    __m512 vv[kMaxDim / 16];
    for (int64_t d = 0; d < vecs; ++d) vv[d] = load_bf16(v + 16 * d);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * length + j]);
      for (int64_t d = 0; d < vecs; ++d) sum[g * vecs + d] = _mm512_fmadd_ps(p, vv[d], sum[g * vecs + d]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < vecs; ++d) store_bf16(out + g * dim + 16 * d, _mm512_mul_ps(sum[g * vecs + d], _mm512_set1_ps(inv[g])));
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
    std::vector<float> scores((heads / kv_heads) * width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kv_heads, kvh = t % kv_heads, row = rp[b], group = heads / kv_heads;
      BFloat16 *kh = kc + kvh * head_stride, *vh = vc + kvh * head_stride;
      std::copy_n(kp + row * k.stride(0) + kvh * dim, dim, kh + wp[b] * dim);
      std::copy_n(vp + row * v.stride(0) + kvh * dim, dim, vh + wp[b] * dim);
      const int64_t* seq = sp + b * width;
      auto key = [&](int64_t j) { return kh + seq[j] * dim; };
      auto value = [&](int64_t j) { return vh + seq[j] * dim; };
      attend_group(qp + row * q.stride(0) + kvh * group * dim, group, dim, lp[b], static_cast<float>(scale), key, value,
                   scores, op + (b * heads + kvh * group) * dim);
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
