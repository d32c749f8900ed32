// AVX2 helpers shared by seriatim's AVX2 kernels: eight float32 lanes, bfloat16 loads and stores (the
// rounding AVX-512 BF16 does in one instruction, done here with integer ops), exp, and sums.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace seriatim {

constexpr int64_t kLanes = 8;

// The 32-bit lanes [0, count) of a mask, for maskload and maskstore.
inline __m256i lanes_below(int64_t count) {
  const int n = static_cast<int>(std::min<int64_t>(count, kLanes));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 load_f32(const float* p, int64_t count = kLanes) {
  return count >= kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(count));
}

inline void store_f32(float* p, __m256 v, int64_t count = kLanes) {
  if (count >= kLanes)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, lanes_below(count), v);
}

// Eight bfloat16 values (their bits) as float32 lanes: exact.
inline __m256 widen_bf16(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// Up to eight bfloat16 values at p (the first `count`) as float32 lanes; the other lanes zero.
inline __m256 load_bf16(const at::BFloat16* p, int64_t count = kLanes) {
  if (count >= kLanes) return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t part[kLanes] = {};
  std::memcpy(part, p, 2 * std::max<int64_t>(count, 0));
  return widen_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
}

// Eight float32 lanes as bfloat16 bits, rounded to nearest even as c10::BFloat16 rounds (NaN: 0x7FC0).
inline __m128i narrow_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: its four values, twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));  // 64-bit words 0 and 2
}

// v rounded to bfloat16 (to nearest even) and back.
inline __m256 round_bf16(__m256 v) { return widen_bf16(narrow_bf16(v)); }

// The first `count` lanes of v to bfloat16 at p, rounded to nearest even.
inline void store_bf16(at::BFloat16* p, __m256 v, int64_t count = kLanes) {
  const __m128i h = narrow_bf16(v);
  if (count >= kLanes) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return;
  }
  alignas(16) uint16_t part[kLanes];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), h);
  std::memcpy(p, part, 2 * std::max<int64_t>(count, 0));
}

inline float sum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

inline float max8(__m256 v) {
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
}

// exp(x) to float32 precision (relative error ~2e-7): 2^(x log2 e) split into 2^n, built in the exponent
// bits, and 2^f, |f| <= 1/2, by its Taylor series. Below -87.3 (under float32's normal range) it is 0; x
// must be at most 88 (callers cap it).
inline __m256 exp8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.6931471805599453f));  // (t - n) ln 2
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
  return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ));
}

}  // namespace seriatim
