// decode_attention around a tier's attention of one query row's heads (csrc/decode_attention.cpp and
// csrc/avx2/decode_attention.cpp): the checks, the new keys' stores, and one task per (query row, key/value
// head), the same at every tier. ISA-neutral C++.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"

#include <cstdint>
#include <vector>

namespace seriatim {

// The key (or value) rows of one sequence and key/value head, where they lie in the cache: row j at slot
// slots[j] of the head's [S, Dh] part.
struct CacheRows {
  const at::BFloat16* head;
  const int64_t* slots;
  int64_t dim;
  const at::BFloat16* operator()(int64_t j) const { return head + slots[j] * dim; }
};

// A tier's attention of the `group` query heads sharing one key/value head (q: [group, Dh]) over `length`
// keys and values -> out [group, Dh]; `scores` holds [group, width] of scratch.
using AttendGroup = void (*)(const at::BFloat16* q, int64_t group, int64_t length, float scale, CacheRows key,
                             CacheRows value, std::vector<float>& scores, at::BFloat16* out);

// Each new token b (row rows[b] of the flat batch q [T, H, Dh], k/v [T, Hkv, Dh]: a decoding sequence's, or
// one of a short chunk's): its key and value are stored at slot write[b] of the cache [Hkv, S, Dh], then
// its query attends over the slots slots[b, :lengths[b]] -> [B, H, Dh], by attend_for(Dh). One op for the
// stores and the attention: a decode's gathers, cache writes and attention took six per layer.
inline at::Tensor decode_attention_by(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& rows,
                                      const at::Tensor& write, const at::Tensor& slots, const at::Tensor& lengths,
                                      double scale, int64_t max_dim, AttendGroup (*attend_for)(int64_t dim)) {
  check_decode_attention(q, k, v, k_cache, v_cache, rows, write, slots, lengths, max_dim);
  const int64_t heads = q.size(1), kv_heads = k_cache.size(0), dim = q.size(2), capacity = k_cache.size(1);
  const int64_t batch = rows.numel(), width = slots.size(1), group = heads / kv_heads;
  const int64_t *rp = rows.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  const at::BFloat16 *kc = k_cache.data_ptr<at::BFloat16>(), *vc = v_cache.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const AttendGroup attend = attend_for(dim);
  store_new_keys(k, v, k_cache, v_cache, rows, write);
  const int64_t tasks = batch * kv_heads;
  at::parallel_for(0, tasks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores(group * width);
    for (int64_t u = u0; u < u1; ++u) {
      // Tasks taken from both ends in turn: the threads' contiguous shares of u then mix short and long
      // rows (a prompt chunk's rows see 1, 2, ... keys; in order, the last thread got most of the work).
      const int64_t t = u % 2 == 0 ? u / 2 : tasks - 1 - u / 2;
      const int64_t b = t / kv_heads, kvh = t % kv_heads;
      const int64_t* seq = sp + b * width;
      const CacheRows key{kc + kvh * capacity * dim, seq, dim}, value{vc + kvh * capacity * dim, seq, dim};
      attend(qp + rp[b] * q.stride(0) + kvh * group * dim, group, lp[b], static_cast<float>(scale), key, value,
             scores, op + (b * heads + kvh * group) * dim);
    }
  });
  return out;
}

}  // namespace seriatim
