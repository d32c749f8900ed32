// AVX-512 helpers shared by seriatim's AVX-512 kernels: bfloat16 loads and stores, and torch's packed int4 form
// expanded in registers.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace seriatim {

inline __mmask16 first(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// 16 bfloat16 values (their bits, in a register) as float32 lanes: exact.
inline __m512 widen_bf16(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }

// Up to 16 bfloat16 values at p (the first `count`) as float32 lanes; the other lanes zero.
inline __m512 load_bf16(const at::BFloat16* p, int64_t count = 16) {
  return widen_bf16(_mm256_maskz_loadu_epi16(first(count), p));
}

// v rounded to bfloat16 (to nearest even) and back.
inline __m512 round_bf16(__m512 v) { return widen_bf16(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v))); }

inline __m512 load_f32(const float* p, int64_t count = 16) { return _mm512_maskz_loadu_ps(first(count), p); }

// A 16 x 16 block of 32-bit values transposed in registers: r[i] lane j becomes r[j] lane i. Four rounds
// of interleaving (32-bit, 64-bit, then two of 128-bit lanes), ~64 shuffles against 256 scalar moves.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c] lane 4l + m: element m of rows i..i+3 for column c + 4l
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 128-bit lane l of r[4g + c] holds rows 4g..4g+3 of column c + 4l
    const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i e = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD), f = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_i32x4(a, b, 0x88);
    t[c + 8] = _mm512_shuffle_i32x4(a, b, 0xDD);
    t[c + 4] = _mm512_shuffle_i32x4(e, f, 0x88);
    t[c + 12] = _mm512_shuffle_i32x4(e, f, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Sums of a bfloat16 row [k] over consecutive spans of `width` columns (width a multiple of 16) -> out [k / width].
inline void span_sums(const at::BFloat16* row, int64_t k, int64_t width, float* out) {
  for (int64_t s = 0; s < k / width; ++s) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < width; c += 16) acc = _mm512_add_ps(acc, load_bf16(row + s * width + c));
    out[s] = _mm512_reduce_add_ps(acc);
  }
}

// The first `count` lanes of v to bfloat16 at p, rounded to nearest even.
inline void store_bf16(at::BFloat16* p, __m512 v, int64_t count = 16) {
  _mm256_mask_storeu_epi16(p, first(count), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// The first `count` lanes of v to p in p's type: bfloat16 (rounded) or float32 (as is).
inline void store_row(at::BFloat16* p, __m512 v, int64_t count = 16) { store_bf16(p, v, count); }
inline void store_row(float* p, __m512 v, int64_t count = 16) { _mm512_mask_storeu_ps(p, first(count), v); }

// exp(x) to float32 precision (relative error ~2e-7): 2^(x log2 e) split into 2^n, applied with scalef
// (which saturates to 0 and infinity instead of wrapping), and 2^f, |f| <= 1/2, by its Taylor series.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));  // x log2(e)
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // (t - n) ln 2
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Columns c and c + 1 of a block of torch's packed int4 (64 bytes) -> four vectors of bfloat16 pairs
// (128 + q_c, 128 + q_c+1), exact (bits 0x4300 | q), for outputs 0..15, 16..31, 32..47 and 48..63: the
// operands of a bfloat16 dot product, or four tile rows. Two byte permutes and a few bit ops.
class NibblePairs {
 public:
  NibblePairs() : low_(index(0)), high_(index(16)), mask_(_mm512_set1_epi16(0x0F)), bias_(_mm512_set1_epi16(0x4300)) {}

  void operator()(const uint8_t* columns, __m512i w[4]) const {
    const __m512i z = _mm512_loadu_si512(columns);
    const __m512i a = _mm512_permutexvar_epi8(low_, z), b = _mm512_permutexvar_epi8(high_, z);
    // (v & 0x0F) | bias in one ternary-logic op: truth table 0xEA is (A & B) | C.
    w[0] = _mm512_ternarylogic_epi32(a, mask_, bias_, 0xEA);
    w[1] = _mm512_ternarylogic_epi32(b, mask_, bias_, 0xEA);
    w[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(a, 4), mask_, bias_, 0xEA);
    w[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), mask_, bias_, 0xEA);
  }

 private:
  // 32-bit lane o gets byte first + o of column c and of column c + 1, each in the low half of a 16-bit word.
  static __m512i index(int first) {
    alignas(64) uint8_t idx[64];
    for (int o = 0; o < 16; ++o) {
      idx[4 * o] = idx[4 * o + 1] = static_cast<uint8_t>(first + o);
      idx[4 * o + 2] = idx[4 * o + 3] = static_cast<uint8_t>(32 + first + o);
    }
    return _mm512_load_si512(idx);
  }

  __m512i low_, high_, mask_, bias_;
};

// One group's scale and offset for a block's 64 outputs (vector j: outputs 16j..16j+15), with
// offset = zero - bias * scale: the weight is q * scale + offset for bias 8.
struct GroupScale {
  __m512 scale[4], offset[4];
};

inline GroupScale load_group(const uint16_t* pairs, float bias) {
  GroupScale g;
  for (int j = 0; j < 4; ++j) {
    const __m512i p = _mm512_loadu_si512(pairs + 32 * j);  // the scale is each 32-bit lane's low half
    g.scale[j] = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32(0xFFFF0000)));
    g.offset[j] = _mm512_fnmadd_ps(_mm512_set1_ps(bias), g.scale[j], zero);
  }
  return g;
}

// One input column of a block: byte i has row i in its low nibble and row 32 + i in its high one.
// w[j] gets rows 16j .. 16j+15.
inline void dequant_column(const uint8_t* col, const GroupScale& g, __m512 w[4]) {
  const __m512i lo = _mm512_set1_epi32(15);
  __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col)));
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + 16)));
  w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(a, lo)), g.scale[0], g.offset[0]);
  w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, lo)), g.scale[1], g.offset[1]);
  w[2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4)), g.scale[2], g.offset[2]);
  w[3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), g.scale[3], g.offset[3]);
}

// A vector of 16 bfloat16 pairs from two of 16 values each, as (first_i, second_i): a row of a bfloat16
// B tile (VNNI order), each value rounded to nearest even. `both` is _mm512_cvtne2ps_pbh(second, first).
inline __m512i interleave_pairs(__m512i both) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

}  // namespace seriatim
