// One new query per sequence over its cached keys and values (csrc/decode_attention.cpp's op), with AVX2
// and FMA: bfloat16 widened to float32 exactly, scores as float32 dot products (each key widened once for
// all the query heads that share it), softmax, and the weighted sum of values, reading keys and values
// where they lie in the cache. Specialised per head size (a multiple of 16), so a head's value sums stay
// in registers.
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
constexpr int kHeadsPerKey = 4;  // query heads whose scores take each widened key (their sums in registers)

inline void prefetch_row(const BFloat16* p, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 32) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

// Scores of the `group` query heads sharing a key/value head (q: [group, 8 V] bfloat16) against `length`
// keys -> s[g * length + j] = scale * q_g . k_j. Each key is widened to float32 once for all the heads (the
// queries, widened once, are read from memory by the FMAs); each score is a float32 sum over the head's
// lanes in one fixed order.
template <int V, typename Key>
void scores_of(const BFloat16* q, int64_t group, int64_t length, float scale, Key key, float* s) {
  std::vector<float> queries(group * 8 * V);
  for (int64_t i = 0; i < group * V; ++i) _mm256_storeu_ps(queries.data() + 8 * i, load_bf16(q + 8 * i));
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsPerKey) {
    const int64_t heads = std::min<int64_t>(kHeadsPerKey, group - g0);
    const float* qf = queries.data() + g0 * 8 * V;
    for (int64_t j = 0; j < length; ++j) {
      const BFloat16* k = key(j);
      if (j + kAhead < length) prefetch_row(key(j + kAhead), 8 * V);
      __m256 acc[kHeadsPerKey];
      for (int h = 0; h < kHeadsPerKey; ++h) acc[h] = _mm256_setzero_ps();
      for (int d = 0; d < V; ++d) {
        const __m256 kd = load_bf16(k + 8 * d);
        for (int h = 0; h < kHeadsPerKey; ++h)
          if (h < heads) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + h * 8 * V + 8 * d), kd, acc[h]);
      }
      for (int h = 0; h < heads; ++h) s[(g0 + h) * length + j] = scale * sum8(acc[h]);
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
// key(j), value(j) -> out [group, 8 V]; `scores` holds [group, length].
template <int V, typename Key, typename Value>
void attend_group(const BFloat16* q, int64_t group, int64_t length, float scale, Key key, Value value,
                  std::vector<float>& scores, BFloat16* out) {
  scores_of<V>(q, group, length, scale, key, scores.data());
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * length;
    const __m256 inv = _mm256_set1_ps(softmax_numerators(s, length));
    __m256 sum[V];
    for (int d = 0; d < V; ++d) sum[d] = _mm256_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      const BFloat16* v = value(j);
      if (j + kAhead < length) prefetch_row(value(j + kAhead), 8 * V);
      const __m256 p = _mm256_set1_ps(s[j]);
      for (int d = 0; d < V; ++d) sum[d] = _mm256_fmadd_ps(p, load_bf16(v + 8 * d), sum[d]);
    }
    for (int d = 0; d < V; ++d) store_bf16(out + g * 8 * V + 8 * d, _mm256_mul_ps(sum[d], inv));
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
