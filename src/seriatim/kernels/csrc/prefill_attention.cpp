// Causal attention of a chunk of prompt tokens over their keys and values, on AMX tiles (prefill).
//
// torch's CPU flash attention runs at ~0.4 TFLOP/s on a 512-token prompt with 64-dim heads: a quarter of
// SmolLM2's prefill, and most of a long prompt's (attention grows with the square of the length). Here a
// block of 16 queries of one head goes through its visible keys 32 at a time, transposed so that each
// vector holds one key's value for the 16 queries: the scores K Q^T on tiles, an online softmax whose
// maxima and sums are plain vector operations across keys (no reduction within a vector), and the
// output, kept transposed in float32, grows by V^T P^T on tiles. The probabilities are rounded to
// bfloat16 for that product, as flash kernels do; the rest is float32 (exp to ~1e-5, far below the
// bfloat16 output's rounding). The caller checks that the CPU has AMX and that Linux granted its state.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "amx.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

namespace {

using at::BFloat16;
using namespace seriatim;

constexpr int kKeys = 32;       // keys per step: two score tiles, the depth of one P tile
constexpr int kMaxDim = 256;
constexpr int kResidentDim = 64;  // a head size whose Q^T fits two tiles and output four, kept there across steps
constexpr float kNoMax = -1e30f;  // a row's maximum before it has seen a key (finite: no inf - inf)
constexpr float kLog2e = 1.4426950408889634f;

// 2^x in float32 (relative error ~4e-5): 2^round(x) by scalef (0 for very negative x), 2^f by its series.
inline __m512 exp2(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.0096181291f);  // ln2^4 / 24
  for (const float c : {0.0555041087f, 0.2402265070f, 0.6931471806f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// One (batch, key/value head)'s keys and values, zero-padded to whole steps of 32 keys: keys as they are,
// [L32, Dh] (A tiles of 16 keys x 32 dims), values transposed per step, [L32 / 32][Dh][32] (A tiles of
// 16 dims x 32 keys).
struct PackedKV {
  std::vector<BFloat16> keys, values;
};

// Values of keys [32 b, 32 b + 32) and dims [d0, d0 + 32), transposed: each dim's 32 keys contiguous at
// dst + d * 32. Keys are paired per dim as 32-bit values (2 permutes per pair), then two 16 x 16 transposes.
void transpose_values(const BFloat16* v, int64_t stride, int64_t length, int64_t b, int64_t d0, BFloat16* dst) {
  // (key 2i, key 2i + 1) at dim i, then at dim 16 + i: lane t takes dim t / 2 of key 2i + t % 2.
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  __m512i lo[kTile], hi[kTile];
  for (int i = 0; i < kTile; ++i) {
    const int64_t j = b * kKeys + 2 * i;
    const __m512i k0 = j < length ? _mm512_loadu_si512(v + j * stride + d0) : _mm512_setzero_si512();
    const __m512i k1 = j + 1 < length ? _mm512_loadu_si512(v + (j + 1) * stride + d0) : _mm512_setzero_si512();
    lo[i] = _mm512_permutex2var_epi16(k0, first, k1);
    hi[i] = _mm512_permutex2var_epi16(k0, second, k1);
  }
  transpose16(lo);
  transpose16(hi);
  for (int i = 0; i < kTile; ++i) {
    _mm512_storeu_si512(dst + (d0 + i) * kKeys, lo[i]);
    _mm512_storeu_si512(dst + (d0 + kTile + i) * kKeys, hi[i]);
  }
}

// Keys k and values v: `length` rows of `dim` values, `k_stride` and `v_stride` apart.
PackedKV pack(const BFloat16* k, int64_t k_stride, const BFloat16* v, int64_t v_stride, int64_t length, int64_t dim) {
  const int64_t padded = (length + kKeys - 1) / kKeys * kKeys;
  PackedKV out{std::vector<BFloat16>(padded * dim, BFloat16(0.f)), std::vector<BFloat16>(padded * dim)};
  for (int64_t j = 0; j < length; ++j) std::memcpy(out.keys.data() + j * dim, k + j * k_stride, dim * sizeof(BFloat16));
  for (int64_t b = 0; b < padded / kKeys; ++b)
    for (int64_t d0 = 0; d0 < dim; d0 += kKeys)
      transpose_values(v, v_stride, length, b, d0, out.values.data() + b * kKeys * dim);
  return out;
}

struct Problem {
  int64_t n, heads, kv_heads, length, dim, start, first, window;
  float scale;
  int64_t q_row;  // elements from one query row to the next (q may be a view of a wider projection)
};

// One block of up to 16 queries of one head: rows [q0, q0 + rows) of q [n, H, Dh] (rows q_row apart) for
// head h -> out [n, H, Dh].
// Lane c of every vector below is query row c.
class QueryBlock {
 public:
  explicit QueryBlock(const Problem& pr) : pr_(pr) {}

  void run(const BFloat16* q, const PackedKV& kv, int64_t h, int64_t q0, int64_t rows, BFloat16* out) {
    const int64_t qs = pr_.heads * pr_.dim;
    load_queries(q + q0 * pr_.q_row + h * pr_.dim, rows);
    const auto [first_key, last_key] = bounds(q0, rows);
    max_ = _mm512_set1_ps(kNoMax), sum_ = _mm512_setzero_ps();
    for (int64_t b = first_key / kKeys; b <= last_key / kKeys; ++b) step(kv, b);
    if (pr_.dim == kResidentDim) store_resident();
    write(out + q0 * qs + h * pr_.dim, rows);
  }

 private:
  // Q^T as B tiles (per 32 dims, 16 rows of dim pairs x 16 queries): each 16 pairs of the 16 rows, as 32-bit
  // values, one transposed block; rows past the block's end are zero. The output zeroed.
  void load_queries(const BFloat16* q, int64_t rows) {
    const int64_t dim = pr_.dim;
    for (int64_t p0 = 0; p0 < dim / 2; p0 += kTile) {
      __m512i r[kTile];
      for (int64_t c = 0; c < kTile; ++c)
        r[c] = c < rows ? _mm512_loadu_si512(q + c * pr_.q_row + 2 * p0) : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < kTile; ++i) _mm512_store_si512(queries_ + (p0 + i) * kTile, r[i]);
    }
    if (dim == kResidentDim) {  // Q^T stays in tiles 2-3, the output starts in zeroed tiles 4-7
      _tile_loadd(2, queries_, 64);
      _tile_loadd(3, queries_ + kTile * kTile, 64);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
    } else {
      std::fill(ot_, ot_ + dim * kTile, 0.f);
    }
  }

  // The keys each row sees, [lo, hi] per lane (padding rows: none), and the span any row sees.
  std::pair<int64_t, int64_t> bounds(int64_t q0, int64_t rows) {
    alignas(64) float lo[kTile], hi[kTile];
    int64_t first_key = pr_.length, last_key = -1;
    for (int64_t c = 0; c < kTile; ++c) {
      const int64_t p = pr_.start + q0 + c, l = pr_.window > 0 ? std::max<int64_t>(0, p - pr_.window + 1 - pr_.first) : 0;
      const int64_t u = std::min(p - pr_.first, pr_.length - 1);
      lo[c] = c < rows ? static_cast<float>(l) : 1.f;
      hi[c] = c < rows ? static_cast<float>(u) : 0.f;
      if (c < rows) first_key = std::min(first_key, l), last_key = std::max(last_key, u);
    }
    lo_ = _mm512_load_ps(lo), hi_ = _mm512_load_ps(hi);
    block_lo_ = static_cast<int64_t>(*std::max_element(lo, lo + rows));
    block_hi_ = static_cast<int64_t>(*std::min_element(hi, hi + rows));
    return {first_key, last_key};
  }

  // out[row c][d] = ot[d][c] / sum[c], for the block's real rows: 16 dims at a time, transposed in registers.
  void write(BFloat16* out, int64_t rows) {
    const int64_t dim = pr_.dim, qs = pr_.heads * dim;
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_max_ps(sum_, _mm512_set1_ps(1e-30f)));
    for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
      __m512i r[kTile];
      for (int i = 0; i < kTile; ++i)
        r[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(ot_ + (d0 + i) * kTile), inv));
      transpose16(r);
      for (int64_t c = 0; c < rows; ++c) store_bf16(out + c * qs + d0, _mm512_castsi512_ps(r[c]));
    }
  }

  // Keys [32 b, 32 b + 32): scores, softmax update, and V^T P^T into the output.
  void step(const PackedKV& kv, int64_t b) {
    const int64_t dim = pr_.dim;
    const BFloat16* keys = kv.keys.data() + kKeys * b * dim;
    const BFloat16* vt = kv.values.data() + b * kKeys * dim;
    if (dim == kResidentDim) {  // Q^T stays in tiles 2-3 and the output in tiles 4-7 (stored only to rescale)
      for (int t = 0; t < 2; ++t) {  // scores of keys 32 b + 16 t .. + 15, [key][query]
        _tile_zero(0);
        _tile_loadd(1, keys + kTile * t * dim, dim * 2);
        _tile_dpbf16ps(0, 1, 2);
        _tile_loadd(1, keys + kTile * t * dim + 32, dim * 2);
        _tile_dpbf16ps(0, 1, 3);
        _tile_stored(0, scores_ + kTile * kTile * t, 64);
      }
      if (softmax(b)) rescale_resident();
      _tile_loadd(0, probs_, 64);
      _tile_loadd(1, vt, 64);
      _tile_dpbf16ps(4, 1, 0);
      _tile_loadd(1, vt + 16 * kKeys, 64);
      _tile_dpbf16ps(5, 1, 0);
      _tile_loadd(1, vt + 32 * kKeys, 64);
      _tile_dpbf16ps(6, 1, 0);
      _tile_loadd(1, vt + 48 * kKeys, 64);
      _tile_dpbf16ps(7, 1, 0);
      return;
    }
    for (int t = 0; t < 2; ++t) {
      _tile_zero(0);
      for (int64_t s = 0; s < dim / 32; ++s) {
        _tile_loadd(1, keys + kTile * t * dim + 32 * s, dim * 2);
        _tile_loadd(2, queries_ + s * kTile * kTile, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, scores_ + kTile * kTile * t, 64);
    }
    if (softmax(b)) rescale();
    _tile_loadd(2, probs_, 64);
    for (int64_t c = 0; c < dim / 16; ++c) {
      _tile_loadd(4, ot_ + 16 * c * kTile, 64);
      _tile_loadd(1, vt + 16 * c * kKeys, 64);
      _tile_dpbf16ps(4, 1, 2);
      _tile_stored(4, ot_ + 16 * c * kTile, 64);
    }
  }

  void rescale() {
    for (int64_t d = 0; d < pr_.dim; ++d) _mm512_store_ps(ot_ + d * kTile, _mm512_mul_ps(_mm512_load_ps(ot_ + d * kTile), alpha_));
  }

  void store_resident() {
    _tile_stored(4, ot_, 64);
    _tile_stored(5, ot_ + 16 * kTile, 64);
    _tile_stored(6, ot_ + 32 * kTile, 64);
    _tile_stored(7, ot_ + 48 * kTile, 64);
  }

  void rescale_resident() {
    store_resident();
    rescale();
    _tile_loadd(4, ot_, 64);
    _tile_loadd(5, ot_ + 16 * kTile, 64);
    _tile_loadd(6, ot_ + 32 * kTile, 64);
    _tile_loadd(7, ot_ + 48 * kTile, 64);
  }

  // scores_ [32 keys][16 queries] -> probs_ as a B tile (16 rows of key pairs x 16 queries), with the
  // running maxima and sums; true when a maximum moved (the output must be rescaled by alpha_). Only
  // blocks that cross a row's first or last visible key pay for masks.
  bool softmax(int64_t b) {
    const bool whole = kKeys * b >= block_lo_ && kKeys * b + kKeys - 1 <= block_hi_;
    __mmask16 keep[kKeys];
    __m512 top = _mm512_set1_ps(kNoMax);
    for (int j = 0; j < kKeys; ++j) {
      const __m512 s = _mm512_load_ps(scores_ + j * kTile);
      if (whole) {
        keep[j] = 0xFFFF;
        top = _mm512_max_ps(top, s);
        continue;
      }
      const __m512 key = _mm512_set1_ps(static_cast<float>(kKeys * b + j));
      keep[j] = _mm512_cmp_ps_mask(key, lo_, _CMP_GE_OQ) & _mm512_cmp_ps_mask(key, hi_, _CMP_LE_OQ);
      top = _mm512_mask_max_ps(top, keep[j], top, s);
    }
    // Base-2 exponents: scores times scale log2(e) (positive, so the maximum commutes with it).
    const __m512 scale = _mm512_set1_ps(pr_.scale * kLog2e);
    const __m512 new_max = _mm512_max_ps(max_, _mm512_mul_ps(top, scale)), alpha = exp2(_mm512_sub_ps(max_, new_max));
    max_ = new_max;
    __m512 total = _mm512_setzero_ps();
    for (int j = 0; j < kKeys; j += 2) {
      const __m512 p0 = _mm512_maskz_mov_ps(keep[j], exp2(_mm512_fmsub_ps(_mm512_load_ps(scores_ + j * kTile), scale, new_max)));
      const __m512 p1 = _mm512_maskz_mov_ps(keep[j + 1], exp2(_mm512_fmsub_ps(_mm512_load_ps(scores_ + (j + 1) * kTile), scale, new_max)));
      // Row j / 2 of the B tile: (p_j, p_j+1) per query, interleaved. The sums add the rounded values the
      // product uses, so each row's weights still sum to exactly one.
      const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0));
      _mm512_store_si512(probs_ + (j / 2) * 2 * kTile, interleave_pairs(both));
      total = _mm512_add_ps(total, _mm512_add_ps(widen_bf16(_mm512_castsi512_si256(both)),
                                                 widen_bf16(_mm512_extracti64x4_epi64(both, 1))));
    }
    sum_ = _mm512_fmadd_ps(sum_, alpha, total);
    alpha_ = alpha;
    return _mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_UQ) != 0;
  }

  const Problem& pr_;
  alignas(64) uint32_t queries_[kMaxDim / 2 * kTile];  // Q^T tiles
  alignas(64) float ot_[kMaxDim * kTile];  // the output, transposed: [Dh][16]
  alignas(64) float scores_[kKeys * kTile];
  alignas(64) uint16_t probs_[kKeys * kTile];
  __m512 lo_, hi_, max_, sum_, alpha_;
  int64_t block_lo_, block_hi_;  // keys every row of the block sees: [largest lo, smallest hi]
};

// Query blocks in an order whose halves cost about the same (causal blocks get dearer with position):
// 0, last, 1, last - 1, ... so that at::parallel_for's contiguous chunks balance.
std::vector<int64_t> zigzag(int64_t blocks) {
  std::vector<int64_t> order;
  for (int64_t a = 0, b = blocks - 1; a <= b; ++a, --b) {
    order.push_back(a);
    if (a != b) order.push_back(b);
  }
  return order;
}

}  // namespace

namespace seriatim {

// q [B, n, H, Dh] (query i of batch b at position start + i) over k, v [B, Hkv, L, Dh] (key j at position
// first + j), each query seeing the keys not after it (and, with window > 0, within its last `window`
// positions) -> [B, n, H, Dh] bfloat16. Heads of q share key/value heads in groups of H / Hkv.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start,
                             int64_t first, int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "q, k and v must be bfloat16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q must be [B, n, H, Dh], k and v [B, Hkv, L, Dh]");
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), length = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == dim && heads % kv_heads == 0, "q, k and v shapes disagree");
  TORCH_CHECK(dim % 32 == 0 && dim <= kMaxDim, "head size must be a multiple of 32, at most 256");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v rows must be contiguous");
  TORCH_CHECK(start >= first && start + n - 1 - first < length, "every query must see its own position");
  // Read in place where each row's heads are contiguous (the engine's views of its QKV projection).
  const at::Tensor qc = q.stride(3) == 1 && q.stride(2) == dim ? q : q.contiguous();
  at::Tensor out = at::empty({batch, n, heads, dim}, q.options());
  std::vector<PackedKV> packed(batch * kv_heads);
  const BFloat16 *kp = k.data_ptr<BFloat16>(), *vp = v.data_ptr<BFloat16>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t bi = i / kv_heads, h = i % kv_heads;
      packed[i] = pack(kp + bi * k.stride(0) + h * k.stride(1), k.stride(2), vp + bi * v.stride(0) + h * v.stride(1),
                       v.stride(2), length, dim);
    }
  });
  const Problem pr{n, heads, kv_heads, length, dim, start, first, window, static_cast<float>(scale), qc.stride(1)};
  const std::vector<int64_t> order = zigzag((n + kTile - 1) / kTile);
  const int64_t per_block = batch * heads;
  const BFloat16* qp = qc.data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
  at::parallel_for(0, static_cast<int64_t>(order.size()) * per_block, 1, [&](int64_t a, int64_t b) {
    Tiles tiles;
    auto block = std::make_unique<QueryBlock>(pr);  // ~20 KB of buffers: on the heap, not a worker's stack
    for (int64_t i = a; i < b; ++i) {
      const int64_t q0 = order[i / per_block] * kTile, bh = i % per_block, bi = bh / heads, h = bh % heads;
      block->run(qp + bi * qc.stride(0), packed[bi * kv_heads + h / (heads / kv_heads)], h, q0,
                 std::min<int64_t>(kTile, n - q0), op + bi * n * heads * dim);
    }
  });
  return out;
}

}  // namespace seriatim

TORCH_LIBRARY_FRAGMENT(seriatim, lib) {
  lib.def("prefill_attention(Tensor q, Tensor k, Tensor v, int start, int first, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seriatim, CPU, lib) {
  lib.impl("prefill_attention", &seriatim::prefill_attention);
}
