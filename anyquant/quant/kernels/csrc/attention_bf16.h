#pragma once

// The same item with bf16 queries and a bf16 cache, on vdpbf16ps (AVX512_BF16): the dot products
// take the cache's rows as they are (32 products per instruction, fp32 sums: no conversion pass),
// and the values go in as pairs of keys (row 2t and 2t+1 interleaved word by word, so that lane i
// of a product sums p[2t] v[2t][i] + p[2t+1] v[2t+1][i]), with the probabilities rounded to bf16
// as the pure-torch path does before its bf16 matmul. Max, sums, rescaling and accumulators: fp32.

#include "attention.h"

namespace {

AQ_ATTN_BF16 inline __m512 load_words(const c10::BFloat16* p, int64_t left) {
  if (left >= 32) return _mm512_castsi512_ps(_mm512_loadu_si512(p));
  return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << left) - 1), p));
}

// r[i] <- dword i of the 16 rows r[0..15] (a 16 x 16 transpose of 32-bit elements): afterwards
// r[i] holds the bf16 pair (k[2i], k[2i+1]) of 16 keys, one key per lane.
AQ_ATTN_BF16 inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);  // a2 b2 a3 b3
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3: u[4g + e] = element e of the four rows, per lane
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // 128-bit lane g of r[4L + e] = lane L of u[4g + e]
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i w0 = _mm512_shuffle_i32x4(u[e], u[4 + e], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], _MM_SHUFFLE(3, 2, 3, 2));
    r[e] = _mm512_shuffle_i32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + e] = _mm512_shuffle_i32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + e] = _mm512_shuffle_i32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + e] = _mm512_shuffle_i32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// scores[g * 16 + j] = q_g . k_j for the G query heads and the 16 rows of a half block (rows past
// the block repeat a real one). Keys are transposed 32 dimensions at a time, so each vdpbf16ps
// multiplies one pair of a query's dimensions (broadcast) with the same pair of 16 keys: the sums
// come out one key per lane, with no horizontal reduction.
AQ_ATTN_BF16 inline void scores16_bf16(const c10::BFloat16* q, int64_t G, const c10::BFloat16* const* krows,
                                       int64_t dk, float* scores) {
  for (int64_t c = 0; c < dk; c += 32) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_castps_si512(load_words(krows[j] + c, dk - c));
    transpose16(r);
    const int pairs = dk - c >= 32 ? 16 : static_cast<int>((dk - c) / 2);
    int64_t g = 0;
    if (pairs == 16) {
      for (; g < G; ++g) {
        const int32_t* qp = reinterpret_cast<const int32_t*>(q + g * dk + c);
        __m512 a0 = c == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(scores + g * 16);
        __m512 a1 = _mm512_setzero_ps();
        for (int i = 0; i < 16; i += 2) {
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)r[i], (__m512bh)_mm512_set1_epi32(qp[i]));
          a1 = _mm512_dpbf16_ps(a1, (__m512bh)r[i + 1], (__m512bh)_mm512_set1_epi32(qp[i + 1]));
        }
        _mm512_storeu_ps(scores + g * 16, _mm512_add_ps(a0, a1));
      }
    }
    for (; g < G; ++g) {
      const int32_t* qp = reinterpret_cast<const int32_t*>(q + g * dk + c);
      __m512 acc = c == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(scores + g * 16);
      for (int i = 0; i < pairs; ++i) acc = _mm512_dpbf16_ps(acc, (__m512bh)r[i], (__m512bh)_mm512_set1_epi32(qp[i]));
      _mm512_storeu_ps(scores + g * 16, acc);
    }
  }
}

// vpairs[t] (dv dwords) = rows 2t and 2t+1 interleaved; a missing odd row is zeros.
AQ_ATTN_BF16 inline void pair_rows(const c10::BFloat16* const* vrows, int nb, int64_t dv, int32_t* vpairs) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int t = 0; t < (nb + 1) / 2; ++t) {
    int32_t* dst = vpairs + t * dv;
    for (int64_t c = 0; c < dv; c += 32) {
      const __m512i a = _mm512_castps_si512(load_words(vrows[2 * t] + c, dv - c));
      const __m512i b = 2 * t + 1 < nb ? _mm512_castps_si512(load_words(vrows[2 * t + 1] + c, dv - c))
                                       : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(a, lo, b));
      if (c + 16 < dv) _mm512_storeu_si512(dst + c + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

template <int HT, int VC>
AQ_ATTN_BF16 inline void accumulate_pairs(float* acc, int64_t dv, int64_t c, const int32_t* vpairs, int pairs,
                                          const int32_t* ppairs, const float* alpha) {
  __m512 o[HT][VC];
  for (int h = 0; h < HT; ++h) {
    const __m512 a = _mm512_set1_ps(alpha[h]);
    for (int v = 0; v < VC; ++v) o[h][v] = _mm512_mul_ps(a, _mm512_loadu_ps(acc + h * dv + c + 16 * v));
  }
  for (int t = 0; t < pairs; ++t) {
    __m512bh x[VC];
    for (int v = 0; v < VC; ++v) x[v] = (__m512bh)_mm512_loadu_si512(vpairs + t * dv + c + 16 * v);
    for (int h = 0; h < HT; ++h) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(ppairs[h * (kKeys / 2) + t]);
      for (int v = 0; v < VC; ++v) o[h][v] = _mm512_dpbf16_ps(o[h][v], x[v], w);
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int v = 0; v < VC; ++v) _mm512_storeu_ps(acc + h * dv + c + 16 * v, o[h][v]);
}

template <int HT>
AQ_ATTN_BF16 void accumulate_pair_heads(float* acc, int64_t dv, const int32_t* vpairs, int pairs,
                                        const int32_t* ppairs, const float* alpha) {
  int64_t c = 0;
  for (; c + 64 <= dv; c += 64) accumulate_pairs<HT, 4>(acc, dv, c, vpairs, pairs, ppairs, alpha);
  for (; c < dv; c += 16) accumulate_pairs<HT, 1>(acc, dv, c, vpairs, pairs, ppairs, alpha);
}

AQ_ATTN_BF16 void attend_item_bf16(const Problem& p, int64_t item, std::vector<float>& scratch) {
  const int64_t s = item % p.splits, kh = (item / p.splits) % p.kv_heads, b = item / (p.splits * p.kv_heads);
  const int64_t G = p.group, dk = p.dk, dv = p.dv;
  float* acc = p.acc + item * G * dv;
  float* ml = p.ml + item * G * 2;
  std::fill(acc, acc + G * dv, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    ml[2 * g] = -std::numeric_limits<float>::infinity();
    ml[2 * g + 1] = 0.f;
  }
  int64_t lo, hi;
  chunk_range(p, b, s, lo, hi);
  if (lo >= hi) return;

  // scratch: value pairs [16, dv] dwords, probability pairs [G, 16] dwords, alpha [G], scores
  // [2, G, 16]
  constexpr int kPairs = kKeys / 2;
  scratch.resize(kPairs * dv + G * kPairs + G + 2 * G * 16);
  int32_t* vpairs = reinterpret_cast<int32_t*>(scratch.data());
  int32_t* ppairs = vpairs + kPairs * dv;
  float* alpha = reinterpret_cast<float*>(ppairs + G * kPairs);
  float* scores = alpha + G;
  const auto* q = static_cast<const c10::BFloat16*>(p.qraw) + (b * p.heads + kh * G) * dk;
  const int64_t* table = p.tables + b * p.table_width;
  const auto* kbase = static_cast<const c10::BFloat16*>(p.kc) + kh * p.k_head;
  const auto* vbase = static_cast<const c10::BFloat16*>(p.vc) + kh * p.v_head;
  const __m512 scale = _mm512_set1_ps(p.scale);

  for (int64_t j0 = lo; j0 < hi; j0 += kKeys) {
    const int nb = static_cast<int>(std::min<int64_t>(kKeys, hi - j0));
    const c10::BFloat16* krows[kKeys];
    const c10::BFloat16* vrows[kKeys];
    Slots slots(p, table, j0);
    for (int j = 0; j < nb; ++j) {
      const int64_t slot = slots.next();
      krows[j] = kbase + slot * p.k_slot;
      vrows[j] = vbase + slot * p.v_slot;
    }
    for (int j = nb; j < kKeys; ++j) krows[j] = krows[0];  // lanes past the block: computed, masked
    prefetch_block(p, table, kbase, vbase, j0 + kKeys, kKeys, hi);
    pair_rows(vrows, nb, dv, vpairs);
    const uint32_t bits = nb == 32 ? 0xFFFFFFFFu : (1u << nb) - 1;
    const __mmask16 valid0 = static_cast<__mmask16>(bits), valid1 = static_cast<__mmask16>(bits >> 16);
    scores16_bf16(q, G, krows, dk, scores);
    if (nb > 16) scores16_bf16(q, G, krows + 16, dk, scores + G * 16);

    for (int64_t g = 0; g < G; ++g) {
      const __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(scores + g * 16), scale);
      const __m512 s1 = nb > 16 ? _mm512_mul_ps(_mm512_loadu_ps(scores + (G + g) * 16), scale) : s0;
      const float m_old = ml[2 * g];
      const __m512 both = _mm512_max_ps(_mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid0, s0),
                                        _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid1, s1));
      const float m_new = std::max(m_old, _mm512_reduce_max_ps(both));
      // 0 for the first block (m_old = -inf); 1 (no exp) while the running max holds
      const float a = m_new == m_old ? 1.f : std::exp(m_old - m_new);
      const __m512 m = _mm512_set1_ps(m_new);
      const __m512 e0 = _mm512_maskz_mov_ps(valid0, exp_neg(_mm512_sub_ps(s0, m)));
      const __m512 e1 = _mm512_maskz_mov_ps(valid1, exp_neg(_mm512_sub_ps(s1, m)));
      // bf16 pairs (p[2t], p[2t+1]) in key order
      _mm512_storeu_si512(ppairs + g * kPairs, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      ml[2 * g] = m_new;
      ml[2 * g + 1] = ml[2 * g + 1] * a + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
      alpha[g] = a;
    }

    const int pairs = (nb + 1) / 2;
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
      accumulate_pair_heads<4>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g);
    switch (G - g) {
      case 3: accumulate_pair_heads<3>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g); break;
      case 2: accumulate_pair_heads<2>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g); break;
      case 1: accumulate_pair_heads<1>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g); break;
      default: break;
    }
  }
}

}  // namespace
