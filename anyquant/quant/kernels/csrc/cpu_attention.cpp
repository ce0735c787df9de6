// Paged decode attention on AVX-512: one query row per sequence, every sequence of a step in one
// call, the keys and values read in place from the paged cache through the block tables.
//
// Cache layout (engine/kv_cache.py): key_cache [Hkv, slots, Dk], value_cache [Hkv, slots, Dv],
// slot = page_id * page_size + offset; bf16 or fp32. Queries q [B, H, Dk] (bf16 or fp32); the
// H / Hkv query heads of one KV head (GQA, or MLA's absorbed decode: one latent "KV head" with
// key width Dk = latent + rope and value width Dv = latent) all use each key / value row while
// it is in L1, so K/V are read once per (sequence, KV head) and never repeated or gathered.
//
// Work items are (sequence, KV head, key chunk). A chunk runs blocks of 16 keys: the 16 rows
// are converted to fp32 once (bf16 -> fp32 is exact), every query head of the KV head takes 16
// dot products (one accumulator per key, reduced together by a transpose-add), then an online
// softmax in fp32 (running max m, running sum l, the accumulator rescaled by exp(m_old - m_new))
// and the weighted values added to the head's fp32 accumulator. When there are fewer (sequence,
// KV head) items than threads can use (batch 1 with 2 KV heads, MLA's single latent head) the
// keys are split into chunks whose partial results (m, l, accumulator) are merged with their
// log-sum-exp weights at the end. All arithmetic after the loads is fp32.
//
// A sliding window keeps the last `window` keys of each sequence (0: all of them).
//
// The file is compiled without -mavx512 flags: only functions marked AQ_ATTN_TARGET contain
// AVX-512 code, so the library loads on any x86-64 CPU; the op refuses to run where the CPU lacks
// the instructions, and the Python side picks the pure-torch path there (layers/attention.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#define AQ_ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))
#define AQ_ATTN_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")))

namespace {

constexpr int kBlock = 16;          // keys per block (fp32 path): one vector of scores per query head
constexpr int kKeys = 32;           // keys per block (bf16 path): two vectors of scores per query head
constexpr int64_t kMinChunk = 256;  // fewest keys worth a chunk of its own (merge cost, cache reuse)

bool bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

bool attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

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

// e^x for x <= 0 (fp32, relative error ~1e-7): 2^n * e^r with r = x - n ln2, |r| <= ln2 / 2,
// e^r by its degree-7 Taylor polynomial, 2^n by vscalefps (underflows to 0 for very negative x).
AQ_ATTN_TARGET inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high bits (exact product)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);   // ln2, the rest
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

struct Problem {
  int64_t batch, heads, kv_heads, group, dk, dv, page, table_width, window, splits;
  const int64_t* tables;    // [B, table_width] page ids
  const int64_t* contexts;  // [B] keys per sequence (this step's included)
  const void* kc;           // key cache, element strides below
  const void* vc;
  int64_t k_head, k_slot, v_head, v_slot;
  const float* q;     // [B, H, Dk] fp32, times the softmax scale (fp32 path)
  const void* qraw;   // [B, H, Dk] as given (bf16 path: scaled after the dot products)
  float scale;
  float* acc;      // [items, G, Dv]: unnormalised outputs per work item
  float* ml;       // [items, G, 2]: running max and sum per work item and head
};

// The key range [lo, hi) of sequence b that chunk s of `splits` covers.
inline void chunk_range(const Problem& p, int64_t b, int64_t s, int64_t& lo, int64_t& hi) {
  const int64_t ctx = p.contexts[b];
  const int64_t first = p.window > 0 ? std::max<int64_t>(ctx - p.window, 0) : 0;
  const int64_t n = ctx - first;
  int64_t chunk = (n + p.splits - 1) / p.splits;
  chunk = (chunk + kBlock - 1) / kBlock * kBlock;
  lo = std::min(first + s * chunk, ctx);
  hi = std::min(lo + chunk, ctx);
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

// The cache slots of consecutive keys from `pos` on: one division per block, not per key.
struct Slots {
  const int64_t* table;
  int64_t page, index, offset;
  Slots(const Problem& p, const int64_t* t, int64_t pos)
      : table(t), page(p.page), index(pos / p.page), offset(pos % p.page) {}
  int64_t next() {
    const int64_t slot = table[index] * page + offset;
    if (++offset == page) {
      offset = 0;
      ++index;
    }
    return slot;
  }
};

// prefetcht1 (into L2) as an asm statement: GCC dropped the _mm_prefetch intrinsic from the
// inlined loop below (none were left in the object code). Into L2 rather than L1: measured ~25 %
// faster over a 24-layer cache that does not fit in the caches (a burst of 128 L1 prefetches per
// block competes with the block's own loads).
inline void prefetch_line(const char* p) { asm volatile("prefetcht1 %0" : : "m"(*p)); }

// Ask for the rows of the block starting at key j (if any) while this one is computed: pages are
// scattered, so the hardware prefetcher loses the stream at every page boundary.
template <typename T>
AQ_ATTN_TARGET inline void prefetch_block(const Problem& p, const int64_t* table, const T* kbase, const T* vbase,
                                          int64_t j, int64_t count, int64_t hi) {
  const int64_t end = std::min<int64_t>(j + count, hi);
  const int64_t kbytes = p.dk * static_cast<int64_t>(sizeof(T)), vbytes = p.dv * static_cast<int64_t>(sizeof(T));
  if (j >= end) return;
  Slots slots(p, table, j);
  for (int64_t pos = j; pos < end; ++pos) {
    const int64_t slot = slots.next();
    const char* k = reinterpret_cast<const char*>(kbase + slot * p.k_slot);
    const char* v = reinterpret_cast<const char*>(vbase + slot * p.v_slot);
    for (int64_t o = 0; o < kbytes; o += 64) prefetch_line(k + o);
    for (int64_t o = 0; o < vbytes; o += 64) prefetch_line(v + o);
  }
}

// One work item: sequence b, KV head kh, key chunk s -> acc / ml of the item.
template <typename T>
AQ_ATTN_TARGET void attend_item(const Problem& p, int64_t item, std::vector<float>& scratch) {
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

// The same item with bf16 queries and a bf16 cache, on vdpbf16ps (AVX512_BF16): the dot products
// take the cache's rows as they are (32 products per instruction, fp32 sums: no conversion pass),
// and the values go in as pairs of keys (row 2t and 2t+1 interleaved word by word, so that lane i
// of a product sums p[2t] v[2t][i] + p[2t+1] v[2t+1][i]), with the probabilities rounded to bf16
// as the pure-torch path does before its bf16 matmul. Max, sums, rescaling and accumulators: fp32.
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

// out[b, h] = the chunks' accumulators weighted by exp(m_s - M) / sum_s l_s exp(m_s - M).
template <typename O>
void merge_chunks(const Problem& p, O* out) {
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(p.dv);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / p.heads, h = r % p.heads, kh = h / p.group, g = h % p.group;
      const int64_t item0 = (b * p.kv_heads + kh) * p.splits;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < p.splits; ++s) m = std::max(m, p.ml[((item0 + s) * p.group + g) * 2]);
      std::fill(row.begin(), row.end(), 0.f);
      float l = 0.f;
      if (m != -std::numeric_limits<float>::infinity()) {
        for (int64_t s = 0; s < p.splits; ++s) {
          const float* ml = p.ml + ((item0 + s) * p.group + g) * 2;
          if (ml[1] == 0.f) continue;
          const float w = std::exp(ml[0] - m);
          l += ml[1] * w;
          const float* a = p.acc + ((item0 + s) * p.group + g) * p.dv;
          for (int64_t c = 0; c < p.dv; ++c) row[c] += w * a[c];
        }
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;  // an empty context attends to nothing: zeros
      O* dst = out + r * p.dv;
      for (int64_t c = 0; c < p.dv; ++c) dst[c] = static_cast<O>(row[c] * inv);
    }
  });
}

int64_t auto_splits(int64_t items, int64_t longest) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || items >= 2 * threads) return 1;
  // enough items to keep every thread busy twice over, each chunk worth its merge
  const int64_t want = (2 * threads + items - 1) / items;
  return std::max<int64_t>(1, std::min(want, longest / kMinChunk));
}

// q [B, H, Dk]; key_cache [Hkv, slots, Dk]; value_cache [Hkv, slots, Dv]; block_tables [B, P]
// int64 page ids; context_lens [B] int64 -> [B, H, Dv] in q's dtype. window 0: no window;
// splits 0: chosen from the thread count (tests force a number to exercise the merge);
// force_fp32: bf16 inputs take the fp32 path too (tests, and a check of the bf16 path's rounding).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t page_size,
                                  double scale, int64_t window, int64_t splits, bool force_fp32) {
  TORCH_CHECK(attention_supported(), "paged_decode_attention needs AVX-512 (F/BW/VL/DQ)");
  TORCH_CHECK(q.dim() == 3, "q must be [batch, heads, key width], got ", q.sizes());
  TORCH_CHECK(key_cache.dim() == 3 && value_cache.dim() == 3,
              "key_cache / value_cache must be [kv_heads, slots, width], got ", key_cache.sizes(), " / ",
              value_cache.sizes());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "q must be bfloat16 or float32, got ",
              q.scalar_type());
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type() &&
                  (key_cache.scalar_type() == at::kBFloat16 || key_cache.scalar_type() == at::kFloat),
              "key and value caches must both be bfloat16 or both float32, got ", key_cache.scalar_type(), " / ",
              value_cache.scalar_type());
  TORCH_CHECK(key_cache.stride(2) == 1 && value_cache.stride(2) == 1, "cache rows must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), dk = q.size(2);
  const int64_t hkv = key_cache.size(0), slots = key_cache.size(1), dv = value_cache.size(2);
  TORCH_CHECK(key_cache.size(2) == dk, "key width ", key_cache.size(2), " != query width ", dk);
  TORCH_CHECK(value_cache.size(0) == hkv && value_cache.size(1) == slots, "value cache ", value_cache.sizes(),
              " does not match key cache ", key_cache.sizes());
  TORCH_CHECK(hkv > 0 && H % hkv == 0, "query heads ", H, " not a multiple of KV heads ", hkv);
  TORCH_CHECK(dk % 16 == 0 && dv % 16 == 0 && dk > 0 && dv > 0, "key / value widths must be multiples of 16, got ", dk,
              " / ", dv);
  TORCH_CHECK(page_size > 0 && slots % page_size == 0, "page_size ", page_size, " must divide the ", slots, " slots");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong,
              "block_tables must be int64 [", B, ", pages], got ", block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B && context_lens.scalar_type() == at::kLong,
              "context_lens must be int64 [", B, "]");
  TORCH_CHECK(window >= 0 && splits >= 0, "window and splits must be >= 0");

  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor contexts = context_lens.contiguous();
  const int64_t width = tables.size(1), pages = slots / page_size;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = contexts.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ctx = cp[b];
    TORCH_CHECK(ctx >= 0 && ctx <= width * page_size, "sequence ", b, ": context of ", ctx, " keys but ", width,
                " pages of ", page_size, " in its block table");
    const int64_t first = window > 0 ? std::max<int64_t>(ctx - window, 0) : 0;
    longest = std::max(longest, ctx - first);
    for (int64_t i = first / page_size; i < (ctx + page_size - 1) / page_size; ++i) {
      TORCH_CHECK(tp[b * width + i] >= 0 && tp[b * width + i] < pages, "sequence ", b, ": page id ", tp[b * width + i],
                  " outside the cache's ", pages, " pages");
    }
  }

  Problem p;
  p.batch = B;
  p.heads = H;
  p.kv_heads = hkv;
  p.group = H / hkv;
  p.dk = dk;
  p.dv = dv;
  p.page = page_size;
  p.table_width = width;
  p.window = window;
  p.splits = splits > 0 ? splits : auto_splits(B * hkv, longest);
  p.tables = tp;
  p.contexts = cp;
  p.kc = key_cache.data_ptr();
  p.vc = value_cache.data_ptr();
  p.k_head = key_cache.stride(0);
  p.k_slot = key_cache.stride(1);
  p.v_head = value_cache.stride(0);
  p.v_slot = value_cache.stride(1);
  // bf16 queries on a bf16 cache take the vdpbf16ps path where the CPU has it; the rest compute
  // in fp32 from converted rows.
  const bool bf16 = key_cache.scalar_type() == at::kBFloat16;
  const bool dp = bf16 && q.scalar_type() == at::kBFloat16 && bf16_supported() && !force_fp32;
  const at::Tensor qc = q.contiguous();
  at::Tensor qf;
  if (!dp) {
    qf = (q.to(at::kFloat) * scale).contiguous();
    p.q = qf.data_ptr<float>();
  }
  p.qraw = qc.data_ptr();
  p.scale = static_cast<float>(scale);
  const int64_t items = B * hkv * p.splits;
  at::Tensor acc = at::empty({items, p.group, dv}, q.options().dtype(at::kFloat));
  at::Tensor ml = at::empty({items, p.group, 2}, q.options().dtype(at::kFloat));
  p.acc = acc.data_ptr<float>();
  p.ml = ml.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch;
    for (int64_t i = i0; i < i1; ++i) {
      if (dp) {
        attend_item_bf16(p, i, scratch);
      } else if (bf16) {
        attend_item<c10::BFloat16>(p, i, scratch);
      } else {
        attend_item<float>(p, i, scratch);
      }
    }
  });
  at::Tensor out = at::empty({B, H, dv}, q.options());
  if (q.scalar_type() == at::kBFloat16) {
    merge_chunks(p, out.data_ptr<c10::BFloat16>());
  } else {
    merge_chunks(p, out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, int page_size, float scale, int window=0, int splits=0, bool force_fp32=False) -> Tensor");
  m.def("attention_supported() -> bool", &attention_supported);
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
