// Attention of one new query per sequence over its cached keys and values, bfloat16 on the CPU.
//
// A decode step attends one query per sequence and layer. torch's CPU SDPA spends ~30 us on that for a
// short context (it is built for long query blocks), and for a batch the keys must first be gathered
// into a padded tensor. Here each (sequence, key/value head) pair is a small loop: scores for its
// group of query heads (bfloat16 dot products, exact products summed in float32, sixteen keys reduced
// at a time), softmax, weighted sum of values, reading keys and values where they lie in the cache (at
// the slots of the sequence's block table), after storing the new ones. The code is specialised per
// head size (multiples of 16), so the value sums of four heads stay in registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {

using at::BFloat16;
using namespace seriatim;

constexpr int kMaxDim = 256;  // head dimensions up to this (16 vectors of 16)
constexpr int kHeadsPerPass = 4;  // query heads whose value sums stay in registers together
constexpr int64_t kAhead = 24;  // keys and values prefetched this many positions ahead

inline void prefetch_row(const BFloat16* p, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 32) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

// Chunk c (32 values) of a bfloat16 row of 16 V values, as dot-product pairs; a last half chunk zero-filled.
template <int V>
inline __m512bh chunk(const BFloat16* row, int c) {
  const __mmask32 mask = 2 * c + 1 < V ? ~__mmask32(0) : __mmask32(0xFFFF);
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, row + 32 * c));
}

// Sixteen vectors -> one vector of their sixteen lane sums (lane t: the sum of a[t]), in 45 shuffles and adds
// instead of sixteen full reductions.
inline __m512 sums_of(__m512 a[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i] partial sums at 0 and 2, a[2i+1] at 1 and 3
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the partial sums of a[4i] .. a[4i+3]
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Add the four 128-bit lanes of each c[i] and place the result in lane group i.
  const __m512 f0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 f1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of one query head (bfloat16, 16 V values) against `length` keys -> s[j] = scale * q . k_j.
// Products of bfloat16 pairs are exact in float32; sixteen keys are reduced together.
template <int V, typename Key>
void scores_of(const BFloat16* q, int64_t length, float scale, Key key, float* s) {
  constexpr int chunks = (V + 1) / 2;
  __m512bh qc[chunks];
  for (int c = 0; c < chunks; ++c) qc[c] = chunk<V>(q, c);
  for (int64_t j0 = 0; j0 < length; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - j0);
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) {
      acc[t] = _mm512_setzero_ps();
      if (t >= n) continue;
      const BFloat16* k = key(j0 + t);
      if (j0 + t + kAhead < length) prefetch_row(key(j0 + t + kAhead), 16 * V);
      for (int c = 0; c < chunks; ++c) acc[t] = _mm512_dpbf16_ps(acc[t], qc[c], chunk<V>(k, c));
    }
    _mm512_mask_storeu_ps(s + j0, first(n), _mm512_mul_ps(sums_of(acc), _mm512_set1_ps(scale)));
  }
}

// In place: scores -> exp(score - max); returns 1 / their sum.
inline float softmax_numerators(float* s, int64_t length) {
  __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
  for (int64_t j = 0; j < length; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first(length - j), s + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  for (int64_t j = 0; j < length; j += 16) {
    const __m512 p = _mm512_maskz_mov_ps(first(length - j), exp16(_mm512_sub_ps(load_f32(s + j, length - j), m)));
    _mm512_mask_storeu_ps(s + j, first(length - j), p);
    total = _mm512_add_ps(total, p);
  }
  return 1.f / _mm512_reduce_add_ps(total);
}

// The `group` query heads sharing one key/value head (q: [group, 16 V], contiguous) over `length` keys and
// values found by key(j), value(j) -> out [group, 16 V]. `scores` holds [group][length]. The value sums
// of up to four heads stay in registers, so each value is read once per four heads.
template <int V, typename Key, typename Value>
void attend_group(const BFloat16* q, int64_t group, int64_t length, float scale, Key key, Value value,
                  std::vector<float>& scores, BFloat16* out) {
  constexpr int64_t dim = 16 * V;
  std::vector<float> inv(group);  // 1 / softmax denominator, per head
  for (int64_t g = 0; g < group; ++g) {
    scores_of<V>(q + g * dim, length, scale, key, scores.data() + g * length);
    inv[g] = softmax_numerators(scores.data() + g * length, length);
  }
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsPerPass) {
    const int64_t heads = std::min<int64_t>(kHeadsPerPass, group - g0);
    __m512 sum[kHeadsPerPass][V];
    for (int h = 0; h < kHeadsPerPass; ++h)
      for (int d = 0; d < V; ++d) sum[h][d] = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      const BFloat16* v = value(j);
      if (j + kAhead < length) prefetch_row(value(j + kAhead), dim);
      __m512 vv[V];
      for (int d = 0; d < V; ++d) vv[d] = load_bf16(v + 16 * d);
      for (int h = 0; h < kHeadsPerPass; ++h) {
        if (h >= heads) break;
        const __m512 p = _mm512_set1_ps(scores[(g0 + h) * length + j]);
        for (int d = 0; d < V; ++d) sum[h][d] = _mm512_fmadd_ps(p, vv[d], sum[h][d]);
      }
    }
    for (int64_t h = 0; h < heads; ++h)
      for (int d = 0; d < V; ++d) store_bf16(out + (g0 + h) * dim + 16 * d, _mm512_mul_ps(sum[h][d], _mm512_set1_ps(inv[g0 + h])));
  }
}

// attend_group for a head dimension of 16 V, V in 1..16, chosen at run time.
template <int... V>
AttendGroup group_fn(int64_t vecs, std::integer_sequence<int, V...>) {
  constexpr AttendGroup table[] = {&attend_group<V + 1, CacheRows, CacheRows>...};
  return table[vecs - 1];
}

AttendGroup attend_for(int64_t dim) { return group_fn(dim / 16, std::make_integer_sequence<int, kMaxDim / 16>{}); }

}  // namespace

namespace seriatim {

// The op (decode_attention.h) with this tier's attention.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& write,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  return decode_attention_by(q, k, v, k_cache, v_cache, rows, write, slots, lengths, scale, kMaxDim, attend_for);
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
          "Tensor write, Tensor slots, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("decode_attention", &seriatim::decode_attention);
}
