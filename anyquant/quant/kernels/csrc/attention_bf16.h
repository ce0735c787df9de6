#pragma once

// The same item with bf16 queries and a bf16 cache, on vdpbf16ps (AVX512_BF16): the dot products
// take the cache's rows as they are (32 products per instruction, fp32 sums: no conversion pass),
// and the values go in as pairs of keys (row 2t and 2t+1 interleaved word by word, so that lane i
// of a product sums p[2t] v[2t][i] + p[2t+1] v[2t+1][i]), with the probabilities rounded to bf16
// as the pure-torch path does before its bf16 matmul. Max, sums, rescaling and accumulators: fp32.
//
// Per block of 32 keys and KV head the work is G x (Dk + Dv) / 16 vdpbf16ps (896 for Qwen2.5's
// 7 heads of 64) plus the key transposes (256 shuffles at Dk 64); what else a block costs is kept
// off that: up to 8 query heads keep their sums in registers and pair the value rows in registers
// in one pass (more heads, as MLA's 128, pair them once into scratch and run in tiles of 4), the
// softmax takes one FMA into the exponential and sums lane by lane, the accumulators are rescaled
// only when the running max rises, and the rows two blocks on are prefetched line by line as
// this block's rows are loaded.

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

// scores16_bf16 for G <= 8 heads with the sums in registers across the key width: no partial
// sums stored and reloaded per 32 dimensions; the G chains of products interleave (G >= 6 keeps
// vdpbf16ps busy through its latency).
template <int G>
AQ_ATTN_BF16 inline void scores16_heads(const c10::BFloat16* q, const c10::BFloat16* const* krows,
                                        const c10::BFloat16* const* next, int64_t dk, float* scores) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t c = 0; c < dk; c += 32) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      r[j] = _mm512_castps_si512(load_words(krows[j] + c, dk - c));
      prefetch_span(next[j] + c);
    }
    transpose16(r);
    const int pairs = dk - c >= 32 ? 16 : static_cast<int>((dk - c) / 2);
    for (int i = 0; i < pairs; ++i) {
      for (int g = 0; g < G; ++g) {
        const int32_t* qp = reinterpret_cast<const int32_t*>(q + g * dk + c);
        acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)r[i], (__m512bh)_mm512_set1_epi32(qp[i]));
      }
    }
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(scores + g * 16, acc[g]);
}

AQ_ATTN_BF16 inline void block_scores(const c10::BFloat16* q, int64_t G, const c10::BFloat16* const* krows,
                                      const c10::BFloat16* const* next, int64_t dk, float* scores) {
  switch (G) {
    case 1: return scores16_heads<1>(q, krows, next, dk, scores);
    case 2: return scores16_heads<2>(q, krows, next, dk, scores);
    case 3: return scores16_heads<3>(q, krows, next, dk, scores);
    case 4: return scores16_heads<4>(q, krows, next, dk, scores);
    case 5: return scores16_heads<5>(q, krows, next, dk, scores);
    case 6: return scores16_heads<6>(q, krows, next, dk, scores);
    case 7: return scores16_heads<7>(q, krows, next, dk, scores);
    case 8: return scores16_heads<8>(q, krows, next, dk, scores);
    default: return scores16_bf16(q, G, krows, dk, scores);
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

// acc[h] (HT heads, VC x 16 dims from c) <- acc[h] (times alpha[h] when `rescale`) + the pairs'
// values weighted by the heads' probability pairs, from value pairs paired beforehand (pair_rows).
template <int HT, int VC>
AQ_ATTN_BF16 inline void accumulate_pairs(float* acc, int64_t dv, int64_t c, const int32_t* vpairs, int pairs,
                                          const int32_t* ppairs, const float* alpha, bool rescale) {
  __m512 o[HT][VC];
  for (int h = 0; h < HT; ++h) {
    const __m512 a = _mm512_set1_ps(rescale ? alpha[h] : 1.f);
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
                                        const int32_t* ppairs, const float* alpha, bool rescale) {
  int64_t c = 0;
  for (; c + 64 <= dv; c += 64) accumulate_pairs<HT, 4>(acc, dv, c, vpairs, pairs, ppairs, alpha, rescale);
  for (; c < dv; c += 16) accumulate_pairs<HT, 1>(acc, dv, c, vpairs, pairs, ppairs, alpha, rescale);
}

// The same for all G <= 8 heads of a KV head in one pass, the value pairs built in registers from
// the rows (two permutes per pair and 32 dims, shared by the G heads' 2G products): no pass
// through memory, and each value row is loaded once per block instead of once per 4 heads.
// Half: the last 16 dims of a width that is an odd multiple of 16.
template <int G, bool Half>
AQ_ATTN_BF16 inline void accumulate_rows(float* acc, int64_t dv, int64_t c, const c10::BFloat16* const* vrows,
                                         const c10::BFloat16* const* next, int nb, const int32_t* ppairs,
                                         const float* alpha, bool rescale) {
  constexpr int VC = Half ? 1 : 2;
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  __m512 o[G][VC];
  for (int h = 0; h < G; ++h) {
    for (int v = 0; v < VC; ++v) {
      o[h][v] = _mm512_loadu_ps(acc + h * dv + c + 16 * v);
      if (rescale) o[h][v] = _mm512_mul_ps(_mm512_set1_ps(alpha[h]), o[h][v]);
    }
  }
  const int64_t left = dv - c;
  for (int t = 0; t < (nb + 1) / 2; ++t) {
    prefetch_span(next[2 * t] + c);
    prefetch_span(next[2 * t + 1] + c);
    const __m512i a = _mm512_castps_si512(load_words(vrows[2 * t] + c, left));
    const __m512i b =
        2 * t + 1 < nb ? _mm512_castps_si512(load_words(vrows[2 * t + 1] + c, left)) : _mm512_setzero_si512();
    __m512bh x[VC];
    x[0] = (__m512bh)_mm512_permutex2var_epi16(a, lo, b);
    if constexpr (!Half) x[1] = (__m512bh)_mm512_permutex2var_epi16(a, hi, b);
    for (int h = 0; h < G; ++h) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(ppairs[h * (kKeys / 2) + t]);
      for (int v = 0; v < VC; ++v) o[h][v] = _mm512_dpbf16_ps(o[h][v], x[v], w);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int v = 0; v < VC; ++v) _mm512_storeu_ps(acc + h * dv + c + 16 * v, o[h][v]);
}

template <int G>
AQ_ATTN_BF16 void accumulate_row_heads(float* acc, int64_t dv, const c10::BFloat16* const* vrows,
                                       const c10::BFloat16* const* next, int nb, const int32_t* ppairs,
                                       const float* alpha, bool rescale) {
  int64_t c = 0;
  for (; c + 32 <= dv; c += 32) accumulate_rows<G, false>(acc, dv, c, vrows, next, nb, ppairs, alpha, rescale);
  if (c < dv) accumulate_rows<G, true>(acc, dv, c, vrows, next, nb, ppairs, alpha, rescale);
}

// The probabilities of one block for the G heads: the block's max (of the raw dot products: the
// scale is positive, so it commutes with the max), the running max and the factor alpha by which
// the earlier blocks' sums shrink (1, with no exp, while the running max holds), e = exp(s * scale -
// m) with one FMA into the exponential, e as bf16 pairs for the values, and the sums of e kept
// lane by lane (reduced once per item, not once per block). Full: all 32 keys are real.
template <bool Full>
AQ_ATTN_BF16 inline bool block_softmax(int64_t G, const float* scores, float scale, int nb, float* ml, float* lsum,
                                       int32_t* ppairs, float* alpha) {
  constexpr int kPairs = kKeys / 2;
  const uint32_t bits = Full ? 0xFFFFFFFFu : (nb == 32 ? 0xFFFFFFFFu : (1u << nb) - 1);
  const __mmask16 valid0 = static_cast<__mmask16>(bits), valid1 = static_cast<__mmask16>(bits >> 16);
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 sc = _mm512_set1_ps(scale), sc2 = _mm512_set1_ps(scale * kLog2e), ninf = _mm512_set1_ps(-INFINITY);
  bool rescale = false;
  for (int64_t g = 0; g < G; ++g) {
    const __m512 s0 = _mm512_loadu_ps(scores + g * 16);
    const __m512 s1 = Full || nb > 16 ? _mm512_loadu_ps(scores + (G + g) * 16) : ninf;
    const __m512 both = Full ? _mm512_max_ps(s0, s1)
                             : _mm512_max_ps(_mm512_mask_mov_ps(ninf, valid0, s0), _mm512_mask_mov_ps(ninf, valid1, s1));
    const float m_old = ml[2 * g];
    // The block's max only when some scaled score passes the running max (a compare, not a
    // horizontal reduction per block): rounding x * scale is monotonic, so max(x) * scale equals
    // max(x * scale) and the running max comes out as with the reduction every block.
    const bool rises = _mm512_cmp_ps_mask(_mm512_mul_ps(both, sc), _mm512_set1_ps(m_old), _CMP_GT_OQ) != 0;
    const float m_new = rises ? _mm512_reduce_max_ps(both) * scale : m_old;
    // 0 for the first block (m_old = -inf); 1 (no exp) while the running max holds
    const float a = m_new > m_old ? std::exp(m_old - m_new) : 1.f;
    // e = exp(s * scale - m) = 2^(s * scale log2(e) - m log2(e)): one FMA into exp2_neg
    const __m512 m = _mm512_set1_ps(m_new * kLog2e);
    __m512 e0 = exp2_neg(_mm512_fmsub_ps(s0, sc2, m));
    __m512 e1 = exp2_neg(_mm512_fmsub_ps(s1, sc2, m));
    if (!Full) {
      e0 = _mm512_maskz_mov_ps(valid0, e0);
      e1 = _mm512_maskz_mov_ps(valid1, e1);
    }
    // bf16 pairs (p[2t], p[2t+1]) in key order
    _mm512_storeu_si512(ppairs + g * kPairs, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    __m512 l = _mm512_loadu_ps(lsum + g * 16);
    if (a != 1.f) l = _mm512_mul_ps(l, _mm512_set1_ps(a));
    _mm512_storeu_ps(lsum + g * 16, _mm512_add_ps(l, _mm512_add_ps(e0, e1)));
    ml[2 * g] = m_new;
    alpha[g] = a;
    rescale |= a != 1.f;
  }
  return rescale;
}

// Row pointers of the keys j0..j0+nb-1 (a division per page, not per key) and the next block's
// rows prefetched.
AQ_ATTN_BF16 inline void block_rows(const Problem& p, const int64_t* table, const c10::BFloat16* kbase,
                                    const c10::BFloat16* vbase, int64_t j0, int nb, const c10::BFloat16** krows,
                                    const c10::BFloat16** vrows) {
  int j = 0;
  int64_t index = j0 / p.page, offset = j0 % p.page;
  while (j < nb) {
    const int64_t slot = table[index] * p.page + offset;
    const int n = static_cast<int>(std::min<int64_t>(p.page - offset, nb - j));
    for (int i = 0; i < n; ++i) {
      krows[j + i] = kbase + (slot + i) * p.k_slot;
      vrows[j + i] = vbase + (slot + i) * p.v_slot;
    }
    j += n;
    ++index;
    offset = 0;
  }
}

AQ_ATTN_BF16 void attend_item_bf16(const Problem& p, int64_t item, std::vector<float>& scratch) {
  const Item it(p, item);
  if (it.empty()) return;
  const int64_t b = it.b, kh = it.kh, lo = it.lo, hi = it.hi;
  const int64_t G = p.group, dk = p.dk, dv = p.dv;
  float* acc = it.acc;
  float* ml = it.ml;

  // scratch: value pairs [16, dv] dwords (more than 8 heads only), probability pairs [G, 16]
  // dwords, alpha [G], scores [2, G, 16], sums [G, 16]
  constexpr int kPairs = kKeys / 2;
  const bool paired = G > 8;
  scratch.resize((paired ? kPairs * dv : 0) + G * kPairs + G + 2 * G * 16 + G * 16);
  int32_t* vpairs = reinterpret_cast<int32_t*>(scratch.data());
  int32_t* ppairs = vpairs + (paired ? kPairs * dv : 0);
  float* alpha = reinterpret_cast<float*>(ppairs + G * kPairs);
  float* scores = alpha + G;
  float* lsum = scores + 2 * G * 16;
  std::fill(lsum, lsum + G * 16, 0.f);
  const auto* q = static_cast<const c10::BFloat16*>(p.qraw) + (b * p.heads + kh * G) * dk;
  const int64_t* table = p.tables + b * p.table_width;
  const auto* kbase = static_cast<const c10::BFloat16*>(p.kc) + kh * p.k_head;
  const auto* vbase = static_cast<const c10::BFloat16*>(p.vc) + kh * p.v_head;

  for (int64_t j0 = lo; j0 < hi; j0 += kKeys) {
    const int nb = static_cast<int>(std::min<int64_t>(kKeys, hi - j0));
    const c10::BFloat16* krows[kKeys];
    const c10::BFloat16* vrows[kKeys];
    block_rows(p, table, kbase, vbase, j0, nb, krows, vrows);
    for (int j = nb; j < kKeys; ++j) krows[j] = vrows[j] = krows[0];  // lanes past the block: computed, masked
    // The rows kAhead blocks on, prefetched line by line as this block's own rows are loaded: a
    // steady trickle of requests overlaps the memory reads with the arithmetic, where a burst of a
    // whole block's 128 lines at once (the fp32 path) measured ~15 % slower from memory.
    const c10::BFloat16* knext[kKeys];
    const c10::BFloat16* vnext[kKeys];
    const int64_t ahead = j0 + kAhead * kKeys;
    const int nn = ahead < hi ? static_cast<int>(std::min<int64_t>(kKeys, hi - ahead)) : 0;
    if (nn > 0) block_rows(p, table, kbase, vbase, ahead, nn, knext, vnext);
    for (int j = nn; j < kKeys; ++j) {
      knext[j] = krows[j];
      vnext[j] = vrows[j];
    }
    if (paired) prefetch_block(p, table, kbase, vbase, ahead, kKeys, hi);  // the G > 8 paths below do not
    if (paired) pair_rows(vrows, nb, dv, vpairs);
    block_scores(q, G, krows, knext, dk, scores);
    if (nb > 16) block_scores(q, G, krows + 16, knext + 16, dk, scores + G * 16);
    const bool rescale = nb == kKeys ? block_softmax<true>(G, scores, p.scale, nb, ml, lsum, ppairs, alpha)
                                     : block_softmax<false>(G, scores, p.scale, nb, ml, lsum, ppairs, alpha);
    switch (G) {
      case 1: accumulate_row_heads<1>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 2: accumulate_row_heads<2>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 3: accumulate_row_heads<3>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 4: accumulate_row_heads<4>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 5: accumulate_row_heads<5>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 6: accumulate_row_heads<6>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 7: accumulate_row_heads<7>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      case 8: accumulate_row_heads<8>(acc, dv, vrows, vnext, nb, ppairs, alpha, rescale); continue;
      default: break;
    }
    const int pairs = (nb + 1) / 2;
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
      accumulate_pair_heads<4>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g, rescale);
    switch (G - g) {
      case 3: accumulate_pair_heads<3>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g, rescale); break;
      case 2: accumulate_pair_heads<2>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g, rescale); break;
      case 1: accumulate_pair_heads<1>(acc + g * dv, dv, vpairs, pairs, ppairs + g * kPairs, alpha + g, rescale); break;
      default: break;
    }
  }
  for (int64_t g = 0; g < G; ++g) ml[2 * g + 1] = _mm512_reduce_add_ps(_mm512_loadu_ps(lsum + g * 16));
}

}  // namespace
