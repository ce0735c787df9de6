#pragma once

// Shared internals of the paged decode attention (cpu_attention.cpp): the problem description,
// the key range of a work item, the exponential, and the prefetch of the next block's rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#define AQ_ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))
#define AQ_ATTN_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")))


namespace {

constexpr int kBlock = 16;          // keys per block (fp32 path): one vector of scores per query head
constexpr int kKeys = 32;           // keys per block (bf16 path): two vectors of scores per query head
constexpr int kAhead = 2;           // blocks between the one computed and the one prefetched (bf16 path)
constexpr int64_t kMinChunk = 256;  // fewest keys worth a chunk of its own (merge cost, cache reuse)
constexpr int64_t kItemsPerThread = 2;  // work items per thread a long context is split into, at most
constexpr int64_t kItemCost = 32;   // a work item's set-up and merge, in keys (for balancing the threads)

// An int8 cache row (layers/kv_quant.py, the format's one home): `width` int8 codes, then the row's
// float32 scale in these bytes (the CPU's byte order); a value is code * scale.
constexpr int64_t kScaleBytes = 4;

// The bytes a row of `width` values of T takes in its cache (an int8 row's scale included).
template <typename T>
constexpr int64_t row_bytes(int64_t width) {
  return width * static_cast<int64_t>(sizeof(T)) + (std::is_same_v<T, int8_t> ? kScaleBytes : 0);
}

// The scale of an int8 row of `width` codes (unaligned: rows are width + 4 bytes apart).
inline float row_scale(const int8_t* row, int64_t width) {
  float scale;
  std::memcpy(&scale, row + width, sizeof scale);
  return scale;
}

bool bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

bool attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
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

// 2^x for x <= 0 (up to a few ulps above 0; fp32, relative error ~2e-7): 2^n * 2^r with n = round(x)
// and r = x - n exact, |r| <= 1/2, 2^r by the degree-6 Taylor polynomial of e^(r ln2). Three
// vector operations fewer than exp_neg: the caller folds log2(e) into its scale.
AQ_ATTN_TARGET inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);    // ln2^6 / 720
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 120
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 24
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 6
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One work item: the keys [lo, hi) of sequence b for KV head kh, chunk `part` of the `parts`
// consecutive items that share (b, kh); their partial results are merged by log-sum-exp weights.
struct Work {
  int64_t b, kh, lo, hi, part, parts;
};

struct Problem {
  int64_t batch, heads, kv_heads, group, dk, dv, page, table_width, window;  // dk / dv: values per row
  const int64_t* tables;    // [B, table_width] page ids
  const int64_t* contexts;  // [B] keys per sequence (this step's included)
  const Work* work;         // the work items, (b, kh, part) in order
  const void* kc;           // key cache, element strides below
  const void* vc;
  int64_t k_head, k_slot, v_head, v_slot;
  const float* q;     // [B, H, Dk] fp32, times the softmax scale (fp32 path)
  const void* qraw;   // [B, H, Dk] as given (bf16 path: scaled after the dot products)
  float scale;
  float* acc;      // [items, G, Dv]: unnormalised outputs per work item
  float* ml;       // [items, G, 2]: running max and sum per work item and head
};

// One work item with its results [G, dv] / (max, sum) [G] cleared to the empty softmax, and its
// key range [lo, hi); empty() when the chunk has no key.
struct Item {
  int64_t b, kh, lo, hi;
  float* acc;
  float* ml;
  Item(const Problem& p, int64_t item)
      : b(p.work[item].b), kh(p.work[item].kh), lo(p.work[item].lo), hi(p.work[item].hi),
        acc(p.acc + item * p.group * p.dv), ml(p.ml + item * p.group * 2) {
    std::fill(acc, acc + p.group * p.dv, 0.f);
    for (int64_t g = 0; g < p.group; ++g) {
      ml[2 * g] = -std::numeric_limits<float>::infinity();
      ml[2 * g + 1] = 0.f;
    }
  }
  bool empty() const { return lo >= hi; }
};

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

// The line of `p` and, when the 64 bytes from `p` straddle two lines, the next one.
inline void prefetch_span(const void* p) {
  const char* c = static_cast<const char*>(p);
  prefetch_line(c);
  if (reinterpret_cast<uintptr_t>(c) & 63) prefetch_line(c + 63);
}

// The lines of `rows` rows of `bytes` each, `stride` bytes apart: one run when the rows are
// contiguous (the engine's cache: a page of one KV head is one block of memory).
inline void prefetch_rows(const char* first, int64_t rows, int64_t bytes, int64_t stride) {
  if (stride == bytes) {
    bytes *= rows;
    rows = 1;
  }
  for (int64_t r = 0; r < rows; ++r, first += stride)
    for (int64_t o = 0; o < bytes; o += 64) prefetch_line(first + o);
}

// Ask for the rows of the keys [j, min(j + count, hi)) while this block is computed, page by page:
// pages are scattered, so the hardware prefetcher loses the stream at every page boundary. No
// target attribute: plain code shared by the AVX-512 and the AVX2 items (inlined into either).
template <typename T>
inline void prefetch_block(const Problem& p, const int64_t* table, const T* kbase, const T* vbase,
                                          int64_t j, int64_t count, int64_t hi) {
  const int64_t end = std::min<int64_t>(j + count, hi);
  constexpr int64_t size = sizeof(T);
  const int64_t kbytes = row_bytes<T>(p.dk), vbytes = row_bytes<T>(p.dv);
  int64_t index = j / p.page, offset = j % p.page;
  for (int64_t pos = j; pos < end; ++index, offset = 0) {
    const int64_t slot = table[index] * p.page + offset;
    const int64_t n = std::min<int64_t>(p.page - offset, end - pos);
    if (kbase) prefetch_rows(reinterpret_cast<const char*>(kbase + slot * p.k_slot), n, kbytes, p.k_slot * size);
    if (vbase) prefetch_rows(reinterpret_cast<const char*>(vbase + slot * p.v_slot), n, vbytes, p.v_slot * size);
    pos += n;
  }
}

}  // namespace
