#pragma once

// The paged decode attention on CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 1-3, Intel client
// cores): the same work items, online softmax and merge as the AVX-512 paths (cpu_attention.cpp),
// in 8-wide fp32 vectors. bf16 queries are widened (and scaled) once per call, as on the AVX-512
// fp32 path: the results match it to fp32 rounding.
//
// Blocks of 32 keys, so that what a block costs besides its FMAs is paid once per 32 keys: one
// max (a horizontal max only when the running max rises), one rescale of the accumulators (only
// then), and the output accumulators loaded and stored once per block. Per block:
// - scores: 8 keys at a time, in tiles of 2 query heads x 4 keys (1 x 8 for an odd head), 8
//   independent sums in registers; each 16 key values are loaded once per tile, the query values
//   once per 4 keys, and every 4 sums reduced together by horizontal adds;
// - the online softmax in fp32, 4 vectors of 8 scores per head;
// - values: 4 heads x 16 values per pass (1-2 heads: 32 values, enough sums to hide the FMA
//   latency), each value row's 16 values loaded once per pass for its heads.
// bf16 rows are widened in registers as they are loaded, even and odd values apart (a shift and a
// mask, no shuffle: load16); the queries are put in that order once per item and the outputs back
// once at its end. Where more than 8 query heads share the rows (MLA's 128) they are widened once
// per block into scratch instead. The next block's rows are prefetched 8 keys at a time while the
// scores are computed.
//
// int8 caches (layers/kv_quant.py: codes, then the row's fp32 scale) run this kernel on every CPU,
// AVX-512 ones included: the codes are widened into scratch (vpmovsxbd + vcvtdq2ps, exact), the
// dot products and value FMAs run on the codes, and the scales enter once per key: a key's scale
// multiplies its score (scale_k * q.codes_k), a value's scale its softmax weight before the value
// FMAs (the running sum keeps the plain weights).
//
// Only functions marked AQ_ATTN_AVX2 contain AVX2 code; the op calls them only where the CPU has
// the instructions (avx2_attention_supported).

#include "attention.h"

#define AQ_ATTN_AVX2 __attribute__((target("avx2,fma,f16c")))
// The register tiles: inlined always, so that their accumulator arrays live in registers (a copy
// GCC left out of line kept them on the stack, a store per FMA).
#define AQ_ATTN_AVX2_TILE __attribute__((target("avx2,fma,f16c"), always_inline))

namespace {

constexpr int kKeys8 = 32;       // keys per block: 4 vectors of scores per query head
constexpr int kVecs8 = kKeys8 / 8;
constexpr int64_t kWidenHeads = 8;  // more query heads per KV head: bf16 rows widened once per block

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

// The sums of the lanes of a0..a3, in that order: two rounds of horizontal adds leave each 128-bit
// half with the four half sums, one add of the halves finishes (4 sums for 3 hadds + 2).
AQ_ATTN_AVX2_TILE inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// The order in which the kernel holds each group of 16 values of a row: held position i -> the
// value's index in the group. bf16 rows are widened even / odd (load16 below); the other caches
// in their own order. The queries are put in this order once per item and the outputs back once
// at its end: a dot product and a weighted sum do not care about the order of the dimensions.
template <typename T>
constexpr int held_index(int i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return i < 8 ? 2 * i : 2 * (i - 8) + 1;
  return i;
}

// 16 values of a row as two fp32 vectors, in held order. bf16: one 256-bit load, the even values
// (the low words of the dwords) shifted up, the odd ones (the high words) masked: two plain
// integer operations and no shuffle for 16 exact conversions.
AQ_ATTN_AVX2_TILE inline void load16(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}

AQ_ATTN_AVX2_TILE inline void load16(const c10::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Rows of a block widened into `scratch` as fp32 in held order (int8: the codes, each row's scale
// into `scales`). For int8 rows always; for bf16 rows where many query heads share them (MLA), so
// that the widening is done once per block rather than once per pair of heads.
template <typename T>
AQ_ATTN_AVX2 inline void widen_rows(const T* const* src, int nb, int64_t d, float* scratch, const float** dst,
                                    float* scales) {
  for (int j = 0; j < nb; ++j) {
    float* row = scratch + j * d;
    for (int64_t c = 0; c < d; c += 16) {  // d is a multiple of 16: whole loads inside the row
      __m256 lo, hi;
      if constexpr (std::is_same_v<T, int8_t>) {
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[j] + c));
        lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8)));
      } else {
        load16(src[j] + c, lo, hi);
      }
      _mm256_storeu_ps(row + c, lo);
      _mm256_storeu_ps(row + c + 8, hi);
    }
    dst[j] = row;
    if constexpr (std::is_same_v<T, int8_t>) scales[j] = row_scale(src[j], d);
  }
  for (int j = nb; j < kKeys8; ++j) dst[j] = dst[0];  // lanes past the block: computed, masked
}

// scores[h * kKeys8 + j] = q_h . k_j for HT query heads (q: HT rows dk apart, held order) and NK
// keys. Each 16 key values are loaded (and widened) once for the HT heads, the heads' 16 query
// values once for the NK keys: HT + NK loads per 2 HT NK FMAs, HT NK independent sums in flight.
template <int HT, int NK, typename R>
AQ_ATTN_AVX2_TILE inline void score_tile(const float* q, int64_t dk, const R* const* rows, float* scores) {
  static_assert(NK % 4 == 0, "keys are reduced four at a time");
  __m256 acc[HT][NK];
  for (int h = 0; h < HT; ++h)
    for (int j = 0; j < NK; ++j) acc[h][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < dk; c += 16) {
    __m256 ql[HT], qh[HT];
    for (int h = 0; h < HT; ++h) {
      ql[h] = _mm256_loadu_ps(q + h * dk + c);
      qh[h] = _mm256_loadu_ps(q + h * dk + c + 8);
    }
    for (int j = 0; j < NK; ++j) {
      __m256 kl, kh;
      load16(rows[j] + c, kl, kh);
      for (int h = 0; h < HT; ++h) {
        acc[h][j] = _mm256_fmadd_ps(ql[h], kl, acc[h][j]);
        acc[h][j] = _mm256_fmadd_ps(qh[h], kh, acc[h][j]);
      }
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int j = 0; j < NK; j += 4)
      _mm_storeu_ps(scores + h * kKeys8 + j, reduce4(acc[h][j], acc[h][j + 1], acc[h][j + 2], acc[h][j + 3]));
}

// The rows of the next block, asked for 8 keys at a time while this block's scores are computed
// (a trickle of requests overlapped with the arithmetic, not a burst). From the rows' pointers,
// taken once per block, with no division per request. Into L1 where a block's rows fit it
// comfortably (Qwen's 64-wide bf16 rows: 8 KB a block), else into L2 (MLA's 1152-byte latent rows:
// 72 KB a block would evict the block being computed).
template <typename T>
struct Ahead {
  const T* const* krows;  // the next block's rows; count of them
  const T* const* vrows;
  int count;
  int64_t kbytes, vbytes;  // bytes per row (an int8 row's scale included)
  bool to_l1;
  void operator()(int j) const {
    const int end = std::min(j + 8, count);
    for (int i = j; i < end; ++i) {
      fetch(reinterpret_cast<const char*>(krows[i]), kbytes);
      fetch(reinterpret_cast<const char*>(vrows[i]), vbytes);
    }
  }
  void fetch(const char* row, int64_t bytes) const {
    // every line the row touches: the first, then each line start inside the row
    const char* last = row + bytes - 1;
    const char* line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63});
    for (; line <= last; line += 64) {
      if (to_l1)
        asm volatile("prefetcht0 %0" : : "m"(*line));
      else
        prefetch_line(line);
    }
  }
};

// The scores of the keys [0, nb) of a block (rounded up to 8: rows past nb repeat a real one) for
// the G heads: 8 keys at a time, their rows read by every pair of heads while they are in L1,
// and the rows of 8 keys of the next block asked for per 8 keys here.
template <typename R, typename T>
AQ_ATTN_AVX2 void block_scores(const float* q, int64_t G, int64_t dk, const R* const* krows, int nb, float* scores,
                               const Ahead<T>& ahead) {
  for (int j = 0; j < nb; j += 8) {
    ahead(j);
    int64_t g = 0;
    // up to 8 heads: pairs of heads (each key value loaded once per pair); more (MLA's 128, whose
    // queries are read from L2): one head per tile, each query value loaded once per 8 keys
    for (; g + 2 <= G && G <= kWidenHeads; g += 2) {
      score_tile<2, 4>(q + g * dk, dk, krows + j, scores + g * kKeys8 + j);
      score_tile<2, 4>(q + g * dk, dk, krows + j + 4, scores + g * kKeys8 + j + 4);
    }
    for (; g < G; ++g) score_tile<1, 8>(q + g * dk, dk, krows + j, scores + g * kKeys8 + j);
  }
}

// The online softmax of one block for the G heads: the block's max (one horizontal max per head
// and block, and only when a score passes the running max: it rarely does after the first
// blocks), the factor alpha by which the earlier keys' sums shrink (1, no exp, while the max
// holds), the weights e = exp(s - m) into `probs` (int8: times the value rows' scales, the
// running sum keeping the plain weights), and the sums kept lane by lane in `lsum` (reduced once
// per item). Lanes past nb weigh 0; a NaN score (a non-finite key) stays NaN through the
// exponential into the output. Returns whether some head's max rose (the accumulators rescale).
template <bool Quantized>
AQ_ATTN_AVX2 bool block_softmax(int64_t G, int nb, const float* scores, const float* kscale, const float* vscale,
                                float* ml, float* lsum, float* probs, float* alpha) {
  const int nv = (nb + 7) / 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 valid[kVecs8];
  for (int v = 0; v < nv; ++v) valid[v] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nb - 8 * v), lane));
  bool rescale = false;
  for (int64_t g = 0; g < G; ++g) {
    __m256 s[kVecs8];
    __m256 mx = ninf;
    for (int v = 0; v < nv; ++v) {
      s[v] = _mm256_loadu_ps(scores + g * kKeys8 + 8 * v);
      if constexpr (Quantized) s[v] = _mm256_mul_ps(s[v], _mm256_loadu_ps(kscale + 8 * v));  // q . codes_k * scale_k
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, s[v], valid[v]));
    }
    const float m_old = ml[2 * g];
    const bool rises = _mm256_movemask_ps(_mm256_cmp_ps(mx, _mm256_set1_ps(m_old), _CMP_GT_OQ)) != 0;
    const float m_new = rises ? std::max(m_old, hmax8(mx)) : m_old;
    // 0 for the first block (m_old = -inf); 1 (no exp) while the running max holds
    const float a = m_new > m_old ? std::exp(m_old - m_new) : 1.f;
    const __m256 m = _mm256_set1_ps(m_new);
    __m256 l = _mm256_loadu_ps(lsum + 8 * g);
    if (a != 1.f) l = _mm256_mul_ps(l, _mm256_set1_ps(a));
    for (int v = 0; v < nv; ++v) {
      const __m256 e = _mm256_and_ps(valid[v], exp_neg8(_mm256_sub_ps(s[v], m)));
      l = _mm256_add_ps(l, e);
      // int8: the value FMAs take the codes as they are, each key's weight carries its value row's
      // scale (a NaN scale, a non-finite row's, makes the output NaN as code * scale would)
      _mm256_storeu_ps(probs + g * kKeys8 + 8 * v, Quantized ? _mm256_mul_ps(e, _mm256_loadu_ps(vscale + 8 * v)) : e);
    }
    _mm256_storeu_ps(lsum + 8 * g, l);
    ml[2 * g] = m_new;
    alpha[g] = a;
    rescale |= a != 1.f;
  }
  return rescale;
}

// acc[h] (HT heads, VC x 16 values from column c) <- alpha_h acc[h] (when `rescale`) + sum_j
// p[h][j] v_j over the block's nb keys: the accumulators loaded and stored once per block, each
// 16 values of a value row loaded (and widened) once for the HT heads.
template <int HT, int VC, typename R>
AQ_ATTN_AVX2_TILE inline void value_tile(float* acc, int64_t dv, int64_t c, const R* const* vrows, int nb,
                                    const float* probs, const float* alpha, bool rescale) {
  __m256 o[HT][2 * VC];
  for (int h = 0; h < HT; ++h) {
    const __m256 a = _mm256_set1_ps(rescale ? alpha[h] : 1.f);
    for (int v = 0; v < 2 * VC; ++v) o[h][v] = _mm256_mul_ps(a, _mm256_loadu_ps(acc + h * dv + c + 8 * v));
  }
  for (int j = 0; j < nb; ++j) {
    __m256 x[2 * VC];
    for (int u = 0; u < VC; ++u) load16(vrows[j] + c + 16 * u, x[2 * u], x[2 * u + 1]);
    for (int h = 0; h < HT; ++h) {
      const __m256 w = _mm256_broadcast_ss(probs + h * kKeys8 + j);
      for (int v = 0; v < 2 * VC; ++v) o[h][v] = _mm256_fmadd_ps(w, x[v], o[h][v]);
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int v = 0; v < 2 * VC; ++v) _mm256_storeu_ps(acc + h * dv + c + 8 * v, o[h][v]);
}

// The `width` (16 or 32) value columns from c for HT heads. One or two heads take 32 columns per
// pass where there are, so that at least 8 independent sums hide the FMA latency.
template <int HT, typename R>
AQ_ATTN_AVX2_TILE inline void value_columns(float* acc, int64_t dv, int64_t c, int64_t width, const R* const* vrows,
                                       int nb, const float* probs, const float* alpha, bool rescale) {
  if constexpr (HT <= 2) {
    if (width == 32) return value_tile<HT, 2>(acc, dv, c, vrows, nb, probs, alpha, rescale);
  }
  for (int64_t u = 0; u < width; u += 16) value_tile<HT, 1>(acc, dv, c + u, vrows, nb, probs, alpha, rescale);
}

// The weighted values of a block for the G heads, 32 columns at a time (the widths are multiples
// of 16, checked by the op) and the heads inside: a block's 32 columns of its value rows stay in
// L1 for all the heads, where MLA's 128 heads on 32 rows of 512 values (64 KB widened) would
// otherwise read them from L2 once per 4 heads.
template <typename R>
AQ_ATTN_AVX2 void block_values(float* acc, int64_t G, int64_t dv, const R* const* vrows, int nb, const float* probs,
                               const float* alpha, bool rescale) {
  for (int64_t c = 0; c < dv; c += 32) {
    const int64_t width = std::min<int64_t>(32, dv - c);
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
      value_columns<4>(acc + g * dv, dv, c, width, vrows, nb, probs + g * kKeys8, alpha + g, rescale);
    float* a = acc + g * dv;
    const float* pr = probs + g * kKeys8;
    switch (G - g) {
      case 3: value_columns<3>(a, dv, c, width, vrows, nb, pr, alpha + g, rescale); break;
      case 2: value_columns<2>(a, dv, c, width, vrows, nb, pr, alpha + g, rescale); break;
      case 1: value_columns<1>(a, dv, c, width, vrows, nb, pr, alpha + g, rescale); break;
      default: break;
    }
  }
}

// One work item on AVX2: sequence b, KV head kh, key chunk -> acc / ml of the item. T: the cache's
// element (float, c10::BFloat16, or int8_t for int8 rows).
template <typename T>
AQ_ATTN_AVX2 void attend_item_avx2(const Problem& p, int64_t item, std::vector<float>& scratch) {
  constexpr bool quantized = std::is_same_v<T, int8_t>;
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  const Item it(p, item);
  if (it.empty()) return;
  const int64_t b = it.b, kh = it.kh, lo = it.lo, hi = it.hi;
  const int64_t G = p.group, dk = p.dk, dv = p.dv;
  float* acc = it.acc;
  float* ml = it.ml;
  // fp32 rows in scratch: int8 rows always, bf16 rows where more heads than kWidenHeads share them
  const bool widen = quantized || (bf16 && G > kWidenHeads);

  // scratch: widened key / value rows [32, dk] / [32, dv] (when widened), the queries in held
  // order [G, dk] (bf16), scores and weights [G, 32] each, alpha [G], lane sums [G, 8]
  scratch.resize((widen ? kKeys8 * (dk + dv) : 0) + (bf16 ? G * dk : 0) + 2 * G * kKeys8 + G + 8 * G);
  float* kbuf = scratch.data();
  float* vbuf = kbuf + (widen ? kKeys8 * dk : 0);
  float* qheld = vbuf + (widen ? kKeys8 * dv : 0);
  float* scores = qheld + (bf16 ? G * dk : 0);
  float* probs = scores + G * kKeys8;
  float* alpha = probs + G * kKeys8;
  float* lsum = alpha + G;
  std::fill(lsum, lsum + 8 * G, 0.f);

  const float* q = p.q + (b * p.heads + kh * G) * dk;
  if constexpr (bf16) {
    for (int64_t r = 0; r < G * dk; r += 16)
      for (int i = 0; i < 16; ++i) qheld[r + i] = q[r + held_index<T>(i)];
    q = qheld;
  }
  const int64_t* table = p.tables + b * p.table_width;
  const T* kbase = static_cast<const T*>(p.kc) + kh * p.k_head;
  const T* vbase = static_cast<const T*>(p.vc) + kh * p.v_head;
  const int64_t kbytes = row_bytes<T>(dk), vbytes = row_bytes<T>(dv);
  const bool to_l1 = kKeys8 * (kbytes + vbytes) <= 16 * 1024;

  // row pointers of this block and the next (rows past a block's end repeat its first: computed
  // and masked), the next block's taken from a running Slots as the block before computes
  const T* rows[2][2][kKeys8];  // [this / next][key / value][key]
  Slots slots(p, table, lo);
  const auto take = [&](const T** krows, const T** vrows, int64_t j0) {
    const int n = static_cast<int>(std::min<int64_t>(kKeys8, hi - j0));
    for (int j = 0; j < n; ++j) {
      const int64_t slot = slots.next();
      krows[j] = kbase + slot * p.k_slot;
      vrows[j] = vbase + slot * p.v_slot;
    }
    for (int j = n; j < kKeys8; ++j) {
      krows[j] = krows[0];
      vrows[j] = vrows[0];
    }
    return n;
  };
  int cur = 0;
  take(rows[cur][0], rows[cur][1], lo);
  for (int64_t j0 = lo; j0 < hi; j0 += kKeys8) {
    const int nb = static_cast<int>(std::min<int64_t>(kKeys8, hi - j0));
    const T* const* ksrc = rows[cur][0];
    const T* const* vsrc = rows[cur][1];
    const int nn = j0 + kKeys8 < hi ? take(rows[1 - cur][0], rows[1 - cur][1], j0 + kKeys8) : 0;
    const Ahead<T> ahead{rows[1 - cur][0], rows[1 - cur][1], nn, kbytes, vbytes, to_l1};
    float kscale[kKeys8] = {}, vscale[kKeys8] = {};  // int8 rows' scales; 0 past the block
    if (widen) {
      const float* krows[kKeys8];
      const float* vrows[kKeys8];
      widen_rows<T>(ksrc, nb, dk, kbuf, krows, kscale);
      widen_rows<T>(vsrc, nb, dv, vbuf, vrows, vscale);
      block_scores(q, G, dk, krows, nb, scores, ahead);
      const bool rescale = block_softmax<quantized>(G, nb, scores, kscale, vscale, ml, lsum, probs, alpha);
      block_values(acc, G, dv, vrows, nb, probs, alpha, rescale);
    } else if constexpr (!quantized) {
      block_scores(q, G, dk, ksrc, nb, scores, ahead);
      const bool rescale = block_softmax<false>(G, nb, scores, kscale, vscale, ml, lsum, probs, alpha);
      block_values(acc, G, dv, vsrc, nb, probs, alpha, rescale);
    }
    cur = 1 - cur;
  }

  for (int64_t g = 0; g < G; ++g) ml[2 * g + 1] = hsum8(_mm256_loadu_ps(lsum + 8 * g));
  if constexpr (bf16) {  // the outputs back from held order
    float held[16];
    for (int64_t r = 0; r < G * dv; r += 16) {
      std::memcpy(held, acc + r, sizeof held);
      for (int i = 0; i < 16; ++i) acc[r + held_index<T>(i)] = held[i];
    }
  }
}

}  // namespace
