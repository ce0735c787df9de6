#pragma once

// The fp32 path of the paged decode attention (cpu_attention.cpp): fp32 caches, and fp32 queries
// on a bf16 cache. Blocks of 16 keys: the rows are converted to fp32 once (bf16 -> fp32 is exact),
// every query head of the KV head takes 16 dot products (one accumulator per key, reduced together
// by a transpose-add), an online softmax, and the weighted values added with fp32 FMAs.

#include "attention.h"

namespace {

AQ_ATTN_TARGET inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AQ_ATTN_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// r[i] = sum of the 16 lanes of a[i]: three transpose-add stages (45 instructions for 16 sums
// instead of 16 separate horizontal reductions of ~8 each).
AQ_ATTN_TARGET inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k) {
    // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  }
  for (int k = 0; k < 4; ++k) {
    // per 128-bit lane: the lane's partial sums of a[4k], a[4k+1], a[4k+2], a[4k+3]
    const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // add the four 128-bit lanes: 128-bit lane L of the result holds the sums of a[4L..4L+3]
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// o[h][v] (HT heads x VC vectors of 16 values, columns c..) = alpha_h * o + sum_j p[h][j] * v_j.
template <int HT, int VC>
AQ_ATTN_TARGET inline void accumulate_values(float* acc, int64_t dv, int64_t c, const float* const* vrows, int nb,
                                             const float* probs, const float* alpha) {
  __m512 o[HT][VC];
  for (int h = 0; h < HT; ++h) {
    const __m512 a = _mm512_set1_ps(alpha[h]);
    for (int v = 0; v < VC; ++v) o[h][v] = _mm512_mul_ps(a, _mm512_loadu_ps(acc + h * dv + c + 16 * v));
  }
  for (int j = 0; j < nb; ++j) {
    __m512 x[VC];
    for (int v = 0; v < VC; ++v) x[v] = _mm512_loadu_ps(vrows[j] + c + 16 * v);
    for (int h = 0; h < HT; ++h) {
      const __m512 w = _mm512_set1_ps(probs[h * kBlock + j]);
      for (int v = 0; v < VC; ++v) o[h][v] = _mm512_fmadd_ps(w, x[v], o[h][v]);
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int v = 0; v < VC; ++v) _mm512_storeu_ps(acc + h * dv + c + 16 * v, o[h][v]);
}

template <int HT>
AQ_ATTN_TARGET void accumulate_heads(float* acc, int64_t dv, const float* const* vrows, int nb, const float* probs,
                                     const float* alpha) {
  int64_t c = 0;
  for (; c + 64 <= dv; c += 64) accumulate_values<HT, 4>(acc, dv, c, vrows, nb, probs, alpha);
  for (; c < dv; c += 16) accumulate_values<HT, 1>(acc, dv, c, vrows, nb, probs, alpha);
}

// Rows of a block as fp32: the cache's own rows (fp32), or converted into `scratch` (bf16).
template <typename T>
AQ_ATTN_TARGET inline void float_rows(const T* const* src, int nb, int64_t d, float* scratch, const float** dst) {
  if constexpr (std::is_same_v<T, float>) {
    for (int j = 0; j < nb; ++j) dst[j] = src[j];
  } else {
    for (int j = 0; j < nb; ++j) {
      float* row = scratch + j * d;
      for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(row + c, load16(src[j] + c));
      dst[j] = row;
    }
  }
}

// One work item: sequence b, KV head kh, key chunk s -> acc / ml of the item.
template <typename T>
AQ_ATTN_TARGET void attend_item(const Problem& p, int64_t item, std::vector<float>& scratch) {
  const Item it(p, item);
  if (it.empty()) return;
  const int64_t b = it.b, kh = it.kh, lo = it.lo, hi = it.hi;
  const int64_t G = p.group, dk = p.dk, dv = p.dv;
  float* acc = it.acc;
  float* ml = it.ml;

  scratch.resize(kBlock * (dk + dv) + G * (kBlock + 1));
  float* kbuf = scratch.data();
  float* vbuf = kbuf + kBlock * dk;
  float* probs = vbuf + kBlock * dv;  // [G, 16]
  float* alpha = probs + G * kBlock;  // [G]
  const float* q = p.q + (b * p.heads + kh * G) * dk;
  const int64_t* table = p.tables + b * p.table_width;
  const T* kbase = static_cast<const T*>(p.kc) + kh * p.k_head;
  const T* vbase = static_cast<const T*>(p.vc) + kh * p.v_head;

  for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, hi - j0));
    const T* ksrc[kBlock];
    const T* vsrc[kBlock];
    Slots slots(p, table, j0);
    for (int j = 0; j < nb; ++j) {
      const int64_t slot = slots.next();
      ksrc[j] = kbase + slot * p.k_slot;
      vsrc[j] = vbase + slot * p.v_slot;
    }
    prefetch_block(p, table, kbase, vbase, j0 + 2 * kBlock, kBlock, hi);
    const float* krows[kBlock];
    const float* vrows[kBlock];
    float_rows<T>(ksrc, nb, dk, kbuf, krows);
    float_rows<T>(vsrc, nb, dv, vbuf, vrows);
    for (int j = nb; j < kBlock; ++j) krows[j] = krows[0];  // lanes past the block: computed, masked
    const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1);

    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * dk;
      __m512 dots[kBlock];
      for (int j = 0; j < kBlock; ++j) dots[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < dk; c += 16) {
        const __m512 qv = _mm512_loadu_ps(qg + c);
        for (int j = 0; j < kBlock; ++j) dots[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(krows[j] + c), dots[j]);
      }
      const __m512 scores = reduce16(dots);
      const float m_old = ml[2 * g];
      const float block_max =
          _mm512_mask_reduce_max_ps(valid, scores);  // finite: every block has at least one key
      const float m_new = std::max(m_old, block_max);
      // 0 for the first block (m_old = -inf); 1 (no exp) while the running max holds
      const float a = m_new == m_old ? 1.f : std::exp(m_old - m_new);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp_neg(_mm512_sub_ps(scores, _mm512_set1_ps(m_new))));
      _mm512_storeu_ps(probs + g * kBlock, e);
      ml[2 * g] = m_new;
      ml[2 * g + 1] = ml[2 * g + 1] * a + _mm512_reduce_add_ps(e);
      alpha[g] = a;
    }

    int64_t g = 0;
    for (; g + 4 <= G; g += 4) accumulate_heads<4>(acc + g * dv, dv, vrows, nb, probs + g * kBlock, alpha + g);
    switch (G - g) {
      case 3: accumulate_heads<3>(acc + g * dv, dv, vrows, nb, probs + g * kBlock, alpha + g); break;
      case 2: accumulate_heads<2>(acc + g * dv, dv, vrows, nb, probs + g * kBlock, alpha + g); break;
      case 1: accumulate_heads<1>(acc + g * dv, dv, vrows, nb, probs + g * kBlock, alpha + g); break;
      default: break;
    }
  }
}

}  // namespace
