// One new query per sequence over its cached keys and values (csrc/decode_attention.cpp's op), with AVX2
// and FMA: bfloat16 widened to float32 exactly, scores as float32 dot products, softmax, and the weighted
// sum of values, reading keys and values where they lie in the cache. Keys and values are widened a block
// at a time, once for all the query heads that share them. Specialised per head size (a multiple of 16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "../decode_attention.h"
#include "../ops.h"
#include "vec8.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {

using at::BFloat16;
using namespace seriatim;

constexpr int kMaxDim = 256;
constexpr int64_t kAhead = 16;  // keys and values prefetched this many positions ahead
constexpr int64_t kKeys = 8;  // keys widened together, whose scores one vector holds
constexpr int64_t kValues = 16;  // values widened together for every head of the group

inline void prefetch_row(const BFloat16* p, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 32) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

// Rows j0 .. j0 + count of `rows` (key(j) or value(j)) widened to float32 into f [width, 8 V], rows count ..
// width zeroed (score lanes that scores_of does not keep).
template <int V, typename Rows>
void widen_rows(Rows rows, int64_t j0, int64_t count, int64_t length, int64_t width, float* f) {
  for (int64_t i = 0; i < width; ++i) {
    const int64_t j = j0 + i;
    if (i >= count) {
      for (int d = 0; d < V; ++d) _mm256_store_ps(f + i * 8 * V + 8 * d, _mm256_setzero_ps());
      continue;
    }
    if (j + kAhead < length) prefetch_row(rows(j + kAhead), 8 * V);
    const BFloat16* r = rows(j);
    for (int d = 0; d < V; ++d) _mm256_store_ps(f + i * 8 * V + 8 * d, load_bf16(r + 8 * d));
  }
}

// The lanes of a[0..8) summed per vector -> one vector of eight sums, each added in sum8's order:
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). So a score does not depend on the keys beside it.
inline __m256 sum8_each(const __m256 a[8]) {
  __m256 halves[4];  // [a_2i's lanes l + l+4 | a_2i+1's]
  for (int i = 0; i < 4; ++i)
    halves[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                              _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  __m256 pairs[2];  // per 128-bit half: (lanes 0 + 2, 1 + 3) of two vectors
  for (int i = 0; i < 2; ++i)
    pairs[i] = _mm256_add_ps(_mm256_shuffle_ps(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // sums holds a0 a2 a4 a6 | a1 a3 a5 a7.
  return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Scores of the `group` query heads sharing a key/value head (q: [group, 8 V] bfloat16, widened into
// `queries` [group, 8 V]) against `length` keys -> s[g * length + j] = scale * q_g . k_j: each score a
// float32 sum over the head's lanes in one fixed order. Keys are widened to float32 kKeys at a time, once
// for all the heads, whose eight dot products per block then run side by side.
template <int V, typename Key>
void scores_of(const BFloat16* q, int64_t group, int64_t length, float scale, Key key, float* queries, float* s) {
  for (int64_t i = 0; i < group * V; ++i) _mm256_storeu_ps(queries + 8 * i, load_bf16(q + 8 * i));
  alignas(32) float keys[kKeys * 8 * V];
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t j0 = 0; j0 < length; j0 += kKeys) {
    const int64_t count = std::min(kKeys, length - j0);
    widen_rows<V>(key, j0, count, length, kKeys, keys);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = queries + g * 8 * V;
      __m256 acc[kKeys];
      for (int i = 0; i < kKeys; ++i) acc[i] = _mm256_setzero_ps();
      for (int d = 0; d < V; ++d) {
        const __m256 qd = _mm256_loadu_ps(qg + 8 * d);
        for (int i = 0; i < kKeys; ++i) acc[i] = _mm256_fmadd_ps(qd, _mm256_load_ps(keys + i * 8 * V + 8 * d), acc[i]);
      }
      store_f32(s + g * length + j0, _mm256_mul_ps(sc, sum8_each(acc)), count);
    }
  }
}

// In place: scores -> exp(score - max); returns 1 / their sum.
inline float softmax_numerators(float* s, int64_t length) {
  __m256 top = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
  for (int64_t j = 0; j < length; j += kLanes) {
    const __m256 v = load_f32(s + j, length - j);
    top = _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(lanes_below(length - j))));
  }
  const __m256 m = _mm256_set1_ps(max8(top));
  for (int64_t j = 0; j < length; j += kLanes) {
    const __m256 valid = _mm256_castsi256_ps(lanes_below(length - j));
    const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(load_f32(s + j, length - j), m)), valid);
    store_f32(s + j, p, length - j);
    total = _mm256_add_ps(total, p);
  }
  return 1.f / sum8(total);
}

// The `group` query heads sharing one key/value head (q: [group, 8 V]) over `length` keys and values found by
// key(j), value(j) -> out [group, 8 V]; `scores` holds [group, length]. Each head's value sums add the
// values in position order; values are widened kValues at a time, once for all the heads.
template <int V, typename Key, typename Value>
void attend_group(const BFloat16* q, int64_t group, int64_t length, float scale, Key key, Value value,
                  std::vector<float>& scores, BFloat16* out) {
  // Per head: its query widened to float32, then its float32 sums of values, then 1 / its softmax's sum.
  std::vector<float> work(group * (2 * 8 * V + 1));
  float *sums = work.data() + group * 8 * V, *inv = sums + group * 8 * V;
  scores_of<V>(q, group, length, scale, key, work.data(), scores.data());
  std::fill_n(sums, group * 8 * V, 0.f);
  for (int64_t g = 0; g < group; ++g) inv[g] = softmax_numerators(scores.data() + g * length, length);
  alignas(32) float values[kValues * 8 * V];
  for (int64_t j0 = 0; j0 < length; j0 += kValues) {
    const int64_t count = std::min(kValues, length - j0);
    widen_rows<V>(value, j0, count, length, count, values);
    for (int64_t g = 0; g < group; ++g) {
      const float* p = scores.data() + g * length + j0;
      float* total = sums + g * 8 * V;
      __m256 sum[V];
      for (int d = 0; d < V; ++d) sum[d] = _mm256_loadu_ps(total + 8 * d);
      for (int64_t i = 0; i < count; ++i) {
        const __m256 pi = _mm256_set1_ps(p[i]);
        for (int d = 0; d < V; ++d) sum[d] = _mm256_fmadd_ps(pi, _mm256_load_ps(values + i * 8 * V + 8 * d), sum[d]);
      }
      for (int d = 0; d < V; ++d) _mm256_storeu_ps(total + 8 * d, sum[d]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const __m256 scale_g = _mm256_set1_ps(inv[g]);
    for (int d = 0; d < V; ++d)
      store_bf16(out + g * 8 * V + 8 * d, _mm256_mul_ps(_mm256_loadu_ps(sums + g * 8 * V + 8 * d), scale_g));
  }
}

// attend_group for a head dimension of 16 H (V = 2 H vectors of 8), H in 1..16, chosen at run time.
template <int... H>
AttendGroup group_fn(int64_t halves, std::integer_sequence<int, H...>) {
  constexpr AttendGroup table[] = {&attend_group<2 * (H + 1), CacheRows, CacheRows>...};
  return table[halves - 1];
}

AttendGroup attend_for(int64_t dim) { return group_fn(dim / 16, std::make_integer_sequence<int, kMaxDim / 16>{}); }

}  // namespace

namespace seriatim {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& write,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  return decode_attention_by(q, k, v, k_cache, v_cache, rows, write, slots, lengths, scale, kMaxDim, attend_for);
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(SERIATIM_OPS, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, "
          "Tensor write, Tensor slots, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(SERIATIM_OPS, CPU, lib) {
  lib.impl("decode_attention", &seriatim::decode_attention);
}
