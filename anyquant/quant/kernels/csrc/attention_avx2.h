#pragma once

// The paged decode attention on CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 1-3, Intel client
// cores): the same work items, online softmax and merge as the AVX-512 paths (cpu_attention.cpp),
// in 8-wide vectors. Blocks of 8 keys: the rows are taken as fp32 (a bf16 row is widened once into
// scratch, a 16-bit shift, exact), every query head of the KV head takes 8 dot products (one
// accumulator per key, reduced together by horizontal adds), an online softmax in fp32, and the
// weighted values added with fp32 FMAs, 4 heads x 16 values per pass so that each value row is
// loaded once per 4 heads. bf16 queries are widened (and scaled) once per call, as on the AVX-512
// fp32 path: the results match it to fp32 rounding.
//
// int8 caches (layers/kv_quant.py: codes, then the row's fp32 scale) run this kernel on every CPU,
// AVX-512 ones included: the codes are widened into scratch as the bf16 rows are (vpmovsxbd +
// vcvtdq2ps, exact), the dot products and value FMAs run on the codes, and the scales enter once
// per key: a key's scale multiplies its score (scale_k * q.codes_k, one vector of 8 keys), a
// value's scale its softmax weight before the value FMAs (the running sum keeps the plain weights).
//
// Only functions marked AQ_ATTN_AVX2 contain AVX2 code; the op calls them only where the CPU has
// the instructions (avx2_attention_supported).

#include "attention.h"

#define AQ_ATTN_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

constexpr int kBlock8 = 8;  // keys per block: one vector of scores per query head

bool avx2_attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// e^x for x <= 0 (fp32, relative error ~1e-7): 2^n * e^r with r = x - n ln2, |r| <= ln2 / 2, e^r by
// its degree-7 Taylor polynomial (as exp_neg in attention.h), 2^n built in the exponent field (no
// vscalefps on AVX2). x is clamped at -87 so that n >= -126 stays a normal exponent: e^-87 ~ 2e-38
// is 0 for a weight next to the block maximum's e^0 = 1. x is max's second operand, the one it
// returns for a NaN: a NaN score (a non-finite key) stays NaN and shows in the output, as in the
// torch path, instead of weighing e^-87.
AQ_ATTN_AVX2 inline __m256 exp_neg8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2, high bits (exact product)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);   // ln2, the rest
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

AQ_ATTN_AVX2 inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

AQ_ATTN_AVX2 inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// r[i] = sum of the 8 lanes of a[i]: two rounds of horizontal adds pair up the vectors within each
// 128-bit half, one cross-half add finishes (9 instructions for 8 sums).
AQ_ATTN_AVX2 inline __m256 reduce8(const __m256* a) {
  // per 128-bit half h: [sum of a[0]'s half h, a[1]'s, a[2]'s, a[3]'s]
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

AQ_ATTN_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AQ_ATTN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// Rows of a block as fp32: the cache's own rows (fp32), or widened into `scratch` (bf16; int8: the
// codes, each row's scale into `scales`, untouched for the float caches).
template <typename T>
AQ_ATTN_AVX2 inline void float_rows8(const T* const* src, int nb, int64_t d, float* scratch, const float** dst,
                                     float* scales) {
  if constexpr (std::is_same_v<T, float>) {
    for (int j = 0; j < nb; ++j) dst[j] = src[j];
  } else if constexpr (std::is_same_v<T, int8_t>) {
    for (int j = 0; j < nb; ++j) {
      float* row = scratch + j * d;
      for (int64_t c = 0; c < d; c += 16) {  // d is a multiple of 16: whole loads inside the row
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[j] + c));
        _mm256_storeu_ps(row + c, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)));
        _mm256_storeu_ps(row + c + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8))));
      }
      dst[j] = row;
      scales[j] = row_scale(src[j], d);
    }
  } else {
    for (int j = 0; j < nb; ++j) {
      float* row = scratch + j * d;
      for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(row + c, load8(src[j] + c));
      dst[j] = row;
    }
  }
}

// o[h] (HT heads, 16 values from column c) = alpha_h * o[h] + sum_j p[h][j] * v_j: 8 accumulators,
// two value vectors per key shared by the HT heads (16 registers with the broadcast weight).
template <int HT>
AQ_ATTN_AVX2 inline void accumulate_values8(float* acc, int64_t dv, int64_t c, const float* const* vrows, int nb,
                                            const float* probs, const float* alpha) {
  __m256 o[HT][2];
  for (int h = 0; h < HT; ++h) {
    const __m256 a = _mm256_set1_ps(alpha[h]);
    for (int v = 0; v < 2; ++v) o[h][v] = _mm256_mul_ps(a, _mm256_loadu_ps(acc + h * dv + c + 8 * v));
  }
  for (int j = 0; j < nb; ++j) {
    const __m256 x0 = _mm256_loadu_ps(vrows[j] + c), x1 = _mm256_loadu_ps(vrows[j] + c + 8);
    for (int h = 0; h < HT; ++h) {
      const __m256 w = _mm256_set1_ps(probs[h * kBlock8 + j]);
      o[h][0] = _mm256_fmadd_ps(w, x0, o[h][0]);
      o[h][1] = _mm256_fmadd_ps(w, x1, o[h][1]);
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(acc + h * dv + c + 8 * v, o[h][v]);
}

// The widths are multiples of 16 (checked by the op).
template <int HT>
AQ_ATTN_AVX2 void accumulate_heads8(float* acc, int64_t dv, const float* const* vrows, int nb, const float* probs,
                                    const float* alpha) {
  for (int64_t c = 0; c < dv; c += 16) accumulate_values8<HT>(acc, dv, c, vrows, nb, probs, alpha);
}

// One work item on AVX2: sequence b, KV head kh, key chunk -> acc / ml of the item. T: the cache's
// element (float, c10::BFloat16, or int8_t for int8 rows).
template <typename T>
AQ_ATTN_AVX2 void attend_item_avx2(const Problem& p, int64_t item, std::vector<float>& scratch) {
  constexpr bool quantized = std::is_same_v<T, int8_t>;
  const Item it(p, item);
  if (it.empty()) return;
  const int64_t b = it.b, kh = it.kh, lo = it.lo, hi = it.hi;
  const int64_t G = p.group, dk = p.dk, dv = p.dv;
  float* acc = it.acc;
  float* ml = it.ml;

  scratch.resize(kBlock8 * (dk + dv) + G * (kBlock8 + 1));
  float* kbuf = scratch.data();
  float* vbuf = kbuf + kBlock8 * dk;
  float* probs = vbuf + kBlock8 * dv;  // [G, 8]
  float* alpha = probs + G * kBlock8;  // [G]
  const float* q = p.q + (b * p.heads + kh * G) * dk;
  const int64_t* table = p.tables + b * p.table_width;
  const T* kbase = static_cast<const T*>(p.kc) + kh * p.k_head;
  const T* vbase = static_cast<const T*>(p.vc) + kh * p.v_head;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());

  for (int64_t j0 = lo; j0 < hi; j0 += kBlock8) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock8, hi - j0));
    const T* ksrc[kBlock8];
    const T* vsrc[kBlock8];
    Slots slots(p, table, j0);
    for (int j = 0; j < nb; ++j) {
      const int64_t slot = slots.next();
      ksrc[j] = kbase + slot * p.k_slot;
      vsrc[j] = vbase + slot * p.v_slot;
    }
    prefetch_block(p, table, kbase, vbase, j0 + 2 * kBlock8, kBlock8, hi);
    const float* krows[kBlock8];
    const float* vrows[kBlock8];
    float kscale[kBlock8] = {}, vscale[kBlock8] = {};  // int8 rows' scales; 0 past the block
    float_rows8<T>(ksrc, nb, dk, kbuf, krows, kscale);
    float_rows8<T>(vsrc, nb, dv, vbuf, vrows, vscale);
    for (int j = nb; j < kBlock8; ++j) krows[j] = krows[0];  // lanes past the block: computed, masked
    const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nb), lane));
    const __m256 kscales = _mm256_loadu_ps(kscale), vscales = _mm256_loadu_ps(vscale);

    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * dk;
      __m256 dots[kBlock8];
      for (int j = 0; j < kBlock8; ++j) dots[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < dk; c += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + c);
        for (int j = 0; j < kBlock8; ++j) dots[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(krows[j] + c), dots[j]);
      }
      __m256 scores = reduce8(dots);
      if constexpr (quantized) scores = _mm256_mul_ps(scores, kscales);  // q . codes_k * scale_k
      const float m_old = ml[2 * g];
      const float block_max = hmax8(_mm256_blendv_ps(ninf, scores, valid));  // finite: a block has a key
      const float m_new = std::max(m_old, block_max);
      // 0 for the first block (m_old = -inf); 1 (no exp) while the running max holds
      const float a = m_new == m_old ? 1.f : std::exp(m_old - m_new);
      const __m256 e = _mm256_and_ps(valid, exp_neg8(_mm256_sub_ps(scores, _mm256_set1_ps(m_new))));
      if constexpr (quantized) {
        // the value FMAs take the codes as they are: each key's weight carries its value row's scale
        // (a NaN scale, a non-finite row's, makes the output NaN as code * scale would)
        _mm256_storeu_ps(probs + g * kBlock8, _mm256_mul_ps(e, vscales));
      } else {
        _mm256_storeu_ps(probs + g * kBlock8, e);
      }
      ml[2 * g] = m_new;
      ml[2 * g + 1] = ml[2 * g + 1] * a + hsum8(e);
      alpha[g] = a;
    }

    int64_t g = 0;
    for (; g + 4 <= G; g += 4) accumulate_heads8<4>(acc + g * dv, dv, vrows, nb, probs + g * kBlock8, alpha + g);
    switch (G - g) {
      case 3: accumulate_heads8<3>(acc + g * dv, dv, vrows, nb, probs + g * kBlock8, alpha + g); break;
      case 2: accumulate_heads8<2>(acc + g * dv, dv, vrows, nb, probs + g * kBlock8, alpha + g); break;
      case 1: accumulate_heads8<1>(acc + g * dv, dv, vrows, nb, probs + g * kBlock8, alpha + g); break;
      default: break;
    }
  }
}

}  // namespace
