#pragma once

// Shared internals of the C++ CPU kernels: the repacked weight layout, its decoders and the
// matrix-vector core. Included by cpu_linear.cpp (linear layers) and cpu_moe.cpp (fused MoE).
//
// Weight-only quantized linear layers for AVX-512 CPUs with AVX512_BF16.
//
// One repacked layout serves every weight type (int4 nibbles, int8 bytes, fp8 bytes), built by
// anyquant/quant/kernels/avx512.py at load:
//   rows are taken 16 at a time (one 512-bit register of fp32 outputs = 16 output rows); inside
//   a block of 16 rows the weights are ordered by k, and for each pair of inputs (k, k+1) the 32
//   values (row i, k + t) sit at position 2i + t, which is exactly the operand layout of
//   vdpbf16ps (16 fp32 lanes, each += a[2i]*b[2i] + a[2i+1]*b[2i+1]). A broadcast pair of
//   activations (x[k], x[k+1]) is the other operand.
//   int4: 64 bytes hold 8 inputs x 16 rows as 32 16-bit words: word 2i+t holds the codes of
//         (row i, k+t), (row i, k+2+t), (row i, k+4+t), (row i, k+6+t) in its nibbles 0..3, so
//         in-lane shifts by 0/4/8/12 and a mask give the four word vectors of pairs (k, k+1) ..
//         (k+6, k+7) from one 64-byte load (no cross-lane zero-extension). Two decoders:
//         - exact (prompts, fp32 compute, the tile path): a 16-entry table lookup (vpermw) turns
//           codes into bf16 (code - 8);
//         - offset (the few-row bf16 vector path): (word & 0xF) | 0x4300 is exactly the bf16
//           value 128 + code, one vpternlogd per vector; the extra 136 per weight against the
//           table's value comes off once per span of inputs as 136 * scale * (sum of the span's
//           x), as the zero points do (offset_shift).
//   int8 / uint8: 64 bytes hold 4 inputs x 16 rows as 32 words: word 2i+t holds u(row i, k+t) in
//         its low byte and u(row i, k+2+t) in its high byte, u = the code + 128 (int8) or the
//         code (uint8), whose table value is u - 128. Exact decoder: each byte plane through fp32
//         (2^23 + u, in-lane). Offset decoder: the four nibbles of each word decoded as for int4
//         (128 + nibble), the high nibbles' dot products summed apart and multiplied by 16 at the
//         span's end: the value used is (128 + lo) + 16 * (128 + hi) = u + 2176, the table's
//         value + 2304.
//   fp8: 32 bytes hold 2 inputs x 16 rows, byte 2i+t = (row i, k+t), through a 128-entry
//         magnitude table (two vpermt2w) plus the sign bit.
// Scales are per (row, group of G inputs), fp32, [blocks, groups, 16]; optional zero points are
// stored as zz = zero - the table's offset (fp32, same layout), so w = (v - zz) * scale where v is
// the table value. The matrix-vector path sums v * x over a span of the group in fp32 and applies
// the scale and zz * scale * sum(x) once per span; the tile path dequantizes (v - zz) * scale
// exactly like the reference (the subtraction exact, one rounding) and hands the tile to at::mm.
// Error of the offset decoder: the products (128 + c) * x are exact in fp32 like (c - 8) * x, but
// the running sums are larger (terms of 128 + c instead of c - 8, |c - 8| ~ 4.6 on average), and
// fp32 rounds each addition to 2^-24 of the running sum. So the sums are flushed (scaled and the
// offset removed) every `span` <= 128 inputs whatever the group (a per-channel group spans all
// of K): the bound for x all equal is 2^-24 * 136 * 128 / 4.6 ~ 2.3e-4 of the result (8-bit:
// 2^-24 * 2304 * 128 / 74, the same); measured (tests/kernels/test_avx512_gemv.py) the bf16
// outputs equal float64 rounded to bf16 to 4 digits of the L2 error. Not fp32 accuracy, so fp32
// compute (x split into three bf16 parts) keeps the exact decoders.
//
// The file is compiled without -mavx512 flags: only functions marked AQ_TARGET contain AVX-512
// code, so the library loads on any x86-64 CPU and the Python side refuses to call it where the
// CPU lacks the instructions (`cannot_run`).


#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define AQ_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")))

namespace {

// kDecoded: bf16 words in the same pair layout (two 64-byte vectors per 4 inputs): a dense bf16
// weight repacked at load (the LM head), or one block decoded for many rows of x (see gemv).
enum Fmt : int64_t { kInt4 = 0, kInt8 = 1, kFp8 = 2, kDecoded = 3 };

// Bytes of one 16-row block per 4 inputs.
constexpr int64_t bytes_per_4k(int64_t fmt) { return fmt == kInt4 ? 32 : fmt == kDecoded ? 128 : 64; }

struct Layout {
  const uint8_t* packed;  // [blocks, Kp * 16 * bits / 8]
  const float* scale;     // [blocks, ng, 16]
  const float* zz;        // [blocks, ng, 16] or nullptr
  const int16_t* lut;     // 128 bf16 words: int4 code -> code - 8, fp8 magnitude -> value
  int64_t fmt, kp, group, ng, blocks, n;
  int64_t span, nspans;   // the vector path's flush interval (divides group, <= 128) and kp / span
};

// The largest multiple of 8 that divides `group` and is at most 128 (group % 8 == 0).
inline int64_t flush_span(int64_t group) {
  for (int64_t s = std::min<int64_t>(group, 128); s > 8; s -= 8)
    if (group % s == 0) return s;
  return 8;
}

struct Tables {
  __m512i t[4];
};

AQ_TARGET inline Tables load_tables(const int16_t* lut) {
  Tables tb;
  for (int i = 0; i < 4; ++i) tb.t[i] = _mm512_loadu_si512(lut + 32 * i);
  return tb;
}

// What the offset decoder's value exceeds the table's by: int4 (128 + code) - (code - 8); 8-bit
// (u + 2176) - (u - 128).
template <int64_t FMT>
constexpr float offset_shift() {
  return FMT == kInt4 ? 136.f : 2304.f;
}

// Four word vectors of one block: w[j] holds pair (k + 2j, k + 2j + 1) of 8 inputs, or for
// int8's offset decoder the nibbles j of 4 inputs. Named members, not an array: GCC kept an
// array of them in memory (spills measured 1.25x slower at 4 rows).
struct Words {
  __m512i w0, w1, w2, w3;
};

// int4, 8 inputs. OFFSET: bf16 128 + code, else code - 8.
template <bool OFFSET>
AQ_TARGET inline Words decode_int4(const uint8_t* p, const Tables& tb) {
  const __m512i v = _mm512_loadu_si512(p);
  const __m512i nib = _mm512_set1_epi16(15);
  if constexpr (OFFSET) {
    const __m512i exp = _mm512_set1_epi16(0x4300);  // bf16 128.0: mantissa bits 0..3 add the code
    constexpr int kAndOr = 0xEA;                     // vpternlogd: (a & b) | c
    return {_mm512_ternarylogic_epi32(v, nib, exp, kAndOr),
            _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, exp, kAndOr),
            _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), nib, exp, kAndOr),
            _mm512_or_si512(_mm512_srli_epi16(v, 12), exp)};
  } else {
    return {_mm512_permutexvar_epi16(_mm512_and_si512(v, nib), tb.t[0]),
            _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 4), nib), tb.t[0]),
            _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 8), nib), tb.t[0]),
            _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tb.t[0])};
  }
}

// One byte plane of an 8-bit chunk (shift 0: the low bytes, pair (k, k+1); 8: the high bytes,
// pair (k+2, k+3)) as bf16 u - 128: each byte through the fp32 2^23 + u, exact, and the top half
// of the fp32 result is its bf16 value (8 significant bits at most).
AQ_TARGET inline __m512i int8_pair(__m512i v, int shift) {
  const __m512i byte = _mm512_set1_epi32(0xFF), magic = _mm512_set1_epi32(0x4B000000);
  const __m512 bias = _mm512_set1_ps(8388736.f);  // 2^23 + 128
  constexpr int kAndOr = 0xEA;                    // vpternlogd: (a & b) | c
  const __m512i lo = _mm512_srli_epi32(v, shift), hi = _mm512_srli_epi32(v, shift + 16);
  const __m512 f0 = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(lo, byte, magic, kAndOr)), bias);
  const __m512 f1 = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(hi, byte, magic, kAndOr)), bias);
  return _mm512_ternarylogic_epi32(_mm512_castps_si512(f1), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)),
                                   _mm512_srli_epi32(_mm512_castps_si512(f0), 16), kAndOr);
}

AQ_TARGET inline __m512i decode_fp8(const uint8_t* p, const Tables& tb) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i lo = _mm512_permutex2var_epi16(tb.t[0], w, tb.t[1]);  // magnitudes 0..63
  const __m512i hi = _mm512_permutex2var_epi16(tb.t[2], w, tb.t[3]);  // magnitudes 64..127
  const __mmask32 upper = _mm512_test_epi16_mask(w, _mm512_set1_epi16(0x40));
  const __m512i mag = _mm512_mask_blend_epi16(upper, lo, hi);
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8);
  return _mm512_or_si512(mag, sign);
}

// Word vectors for inputs k..k+7 of one block: w_j holds pair (k + 2j, k + 2j + 1). OFFSET
// selects int4's offset decoder (int8's needs two accumulators per pair: step8).
template <int64_t FMT, bool OFFSET = false>
AQ_TARGET inline Words decode8(const uint8_t* p, const Tables& tb) {
  if constexpr (FMT == kInt4) {
    return decode_int4<OFFSET>(p, tb);
  } else if constexpr (FMT == kInt8) {  // exact: the offset decoder runs in step8
    const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 64);
    return {int8_pair(v0, 0), int8_pair(v0, 8), int8_pair(v1, 0), int8_pair(v1, 8)};
  } else if constexpr (FMT == kDecoded) {
    return {_mm512_loadu_si512(p), _mm512_loadu_si512(p + 64), _mm512_loadu_si512(p + 128),
            _mm512_loadu_si512(p + 192)};
  } else {
    return {decode_fp8(p, tb), decode_fp8(p + 32, tb), decode_fp8(p + 64, tb), decode_fp8(p + 96, tb)};
  }
}

// acc += w . (x[k], x[k+1]) broadcast to every lane. Measured on Zen 4: broadcasting the pair
// through a general-purpose register is faster than vbroadcastss from memory (1.3-1.5x) or than
// one 128-bit broadcast of 4 pairs and vpshufd per pair (1.3-1.7x).
AQ_TARGET inline __m512 dot(__m512 acc, __m512i w, const int16_t* xpair) {
  int32_t pair;
  std::memcpy(&pair, xpair, 4);
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
}

struct GemvArgs {
  Layout w;
  const int16_t* x;     // bf16 [rows, kp]
  const float* xsum;    // [rows, nspans] sums of x per span (group_sums_bf16): needed with zz,
                        // and for the offset decoders, which the vector path uses only when given
  const float* bias;    // fp32 [n] or nullptr
  void* out;            // [rows, out_stride], fp32 or bf16
  bool out_bf16;
  int64_t out_stride;
  const uint8_t* decoded;  // kDecoded only: the one block being multiplied, as bf16 words
  int64_t col_shift = 0;   // block b's outputs are stored at columns b * 16 - col_shift
  bool exact = false;      // keep the exact decoders (fp32 compute: x in three bf16 parts)
};

// Bytes ahead of the current load that the vector path prefetches (measured on Zen 4 with
// benchmarks/linear_kernels.py; the hardware prefetcher does most of the work, this covers the
// start of each block's stream).
constexpr int64_t kPrefetchBytes = 1024;

// 8 inputs (k .. k+7) of rows xr[0..M) against one block at p: the dot products go into acc.
template <int64_t FMT, int M, int U, bool OFFSET>
AQ_TARGET inline void step8(const uint8_t* p, const Tables& tb, const int16_t* const* xr, int64_t k,
                            __m512 (&acc)[M][U]) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
  if constexpr (FMT == kInt8 && OFFSET) {
    static_assert(U == 4, "int8's offset decoder keeps the high nibbles in accumulators 1 and 3");
    for (int c = 0; c < 2; ++c) {  // per 64-byte chunk, inputs k + 4c .. k + 4c + 3
      const Words wv = decode_int4<true>(p + 64 * c, tb);
      for (int m = 0; m < M; ++m) {
        const int16_t* xk = xr[m] + k + 4 * c;
        acc[m][0] = dot(acc[m][0], wv.w0, xk);      // low nibbles of pair (k, k+1)
        acc[m][1] = dot(acc[m][1], wv.w1, xk);      // their high nibbles (x 16 at the end)
        acc[m][2] = dot(acc[m][2], wv.w2, xk + 2);  // pair (k+2, k+3)
        acc[m][3] = dot(acc[m][3], wv.w3, xk + 2);
      }
    }
    return;
  }
  const Words wv = decode8<FMT, OFFSET>(p, tb);
  for (int m = 0; m < M; ++m) {
    const int16_t* xk = xr[m] + k;
    acc[m][0] = dot(acc[m][0], wv.w0, xk);
    acc[m][1] = dot(acc[m][1], wv.w1, xk + 2);
    acc[m][2 % U] = dot(acc[m][2 % U], wv.w2, xk + 4);
    acc[m][3 % U] = dot(acc[m][3 % U], wv.w3, xk + 6);
  }
}

// Rows m0..m0+M of x against blocks b0..b1, 8 inputs per step. Up to 4 rows use four
// accumulators per row (so consecutive dot products do not wait on each other); one row
// alternates two sets of four between steps (a step's 4 dot products take less time than one
// vdpbf16ps's latency); 8 rows use two (16 chains in flight), which halves the decoding work per
// row against the 4-row version. OFFSET (int4): the offset decoder; a.xsum must be given.
template <int64_t FMT, int M, bool OFFSET>
AQ_TARGET void gemv_blocks(const GemvArgs& a, int64_t m0, int64_t b0, int64_t b1) {
  constexpr int U = M > 4 ? 2 : 4;
  constexpr int64_t step_bytes = 2 * bytes_per_4k(FMT);
  const Layout& w = a.w;
  const Tables tb = load_tables(w.lut);
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  const int64_t span_bytes = w.span / 4 * bytes_per_4k(FMT);
  const int16_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = a.x + (m0 + m) * w.kp;
  const int64_t spans_per_group = w.group / w.span;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* pb = (FMT == kDecoded && a.decoded) ? a.decoded : w.packed + b * block_bytes;
    __m512 out[M];
    for (int m = 0; m < M; ++m) out[m] = _mm512_setzero_ps();
    // Spans of inputs (the group, or a part of it): the sums are scaled and flushed per span.
    // Span q is in group g (counted, not divided: a 64-bit division per span cost ~20 % of a
    // one-block call, as the fused MoE makes them).
    for (int64_t q = 0, g = 0, in_group = 0; q < w.nspans; ++q) {
      const uint8_t* p = pb + q * span_bytes;
      __m512 acc[M][U], acc2[M][U];
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = acc2[m][u] = _mm512_setzero_ps();
      const int64_t k0 = q * w.span;
      int64_t k = 0;
      if constexpr (M == 1) {
        for (; k + 16 <= w.span; k += 16, p += 2 * step_bytes) {
          step8<FMT, M, U, OFFSET>(p, tb, xr, k0 + k, acc);
          step8<FMT, M, U, OFFSET>(p + step_bytes, tb, xr, k0 + k + 8, acc2);
        }
      }
      for (; k < w.span; k += 8, p += step_bytes) step8<FMT, M, U, OFFSET>(p, tb, xr, k0 + k, acc);
      __m512 sums[M];
      for (int m = 0; m < M; ++m) {
        if constexpr (M == 1)
          for (int u = 0; u < U; ++u) acc[m][u] = _mm512_add_ps(acc[m][u], acc2[m][u]);
        if constexpr (FMT == kInt8 && OFFSET) {
          sums[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m][1], acc[m][3]), _mm512_set1_ps(16.f),
                                    _mm512_add_ps(acc[m][0], acc[m][2]));
          continue;
        }
        sums[m] = _mm512_add_ps(acc[m][0], acc[m][1]);
        if constexpr (U == 4) sums[m] = _mm512_add_ps(sums[m], _mm512_add_ps(acc[m][2], acc[m][3]));
      }
      const __m512 s = _mm512_loadu_ps(w.scale + (b * w.ng + g) * 16);
      for (int m = 0; m < M; ++m) out[m] = _mm512_fmadd_ps(sums[m], s, out[m]);
      if (OFFSET || w.zz != nullptr) {
        // w = (v - zz) * scale with v the table value; the offset decoder's v is offset_shift more.
        __m512 zc = w.zz != nullptr ? _mm512_loadu_ps(w.zz + (b * w.ng + g) * 16) : _mm512_setzero_ps();
        if constexpr (OFFSET) zc = _mm512_add_ps(zc, _mm512_set1_ps(offset_shift<FMT>()));
        const __m512 zs = _mm512_mul_ps(s, zc);
        for (int m = 0; m < M; ++m)
          out[m] = _mm512_fnmadd_ps(zs, _mm512_set1_ps(a.xsum[(m0 + m) * w.nspans + q]), out[m]);
      }
      if (++in_group == spans_per_group) {
        in_group = 0;
        ++g;
      }
    }
    const int64_t col = b * 16;
    const int64_t valid = std::min<int64_t>(16, w.n - col);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      const __m512 y = _mm512_add_ps(out[m], bias);
      if (a.out_bf16) {
        auto* dst = static_cast<int16_t*>(a.out) + (m0 + m) * a.out_stride + col - a.col_shift;
        _mm256_mask_storeu_epi16(dst, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(a.out) + (m0 + m) * a.out_stride + col - a.col_shift, mask, y);
      }
    }
  }
}

template <int64_t FMT, bool OFFSET = false>
void gemv_rows(const GemvArgs& a, int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
  switch (rows) {
    case 1: return gemv_blocks<FMT, 1, OFFSET>(a, m0, b0, b1);
    case 2: return gemv_blocks<FMT, 2, OFFSET>(a, m0, b0, b1);
    case 3: return gemv_blocks<FMT, 3, OFFSET>(a, m0, b0, b1);
    case 4: return gemv_blocks<FMT, 4, OFFSET>(a, m0, b0, b1);
    default: return gemv_blocks<FMT, 8, false>(a, m0, b0, b1);
  }
}

// Block b decoded to bf16 words in kDecoded's layout: [kp / 4][2 vectors of 32 words].
template <int64_t FMT>
AQ_TARGET void decode_block(const Layout& w, int64_t b, uint8_t* dst) {
  const Tables tb = load_tables(w.lut);
  const uint8_t* p = w.packed + b * (w.kp / 4 * bytes_per_4k(FMT));
  for (int64_t k = 0; k < w.kp; k += 8, p += 2 * bytes_per_4k(FMT), dst += 256) {
    const Words wv = decode8<FMT>(p, tb);
    _mm512_storeu_si512(dst, wv.w0);
    _mm512_storeu_si512(dst + 64, wv.w1);
    _mm512_storeu_si512(dst + 128, wv.w2);
    _mm512_storeu_si512(dst + 192, wv.w3);
  }
}

void decode_dispatch(const Layout& w, int64_t b, uint8_t* dst) {
  switch (w.fmt) {
    case kInt4: return decode_block<kInt4>(w, b, dst);
    case kInt8: return decode_block<kInt8>(w, b, dst);
    default: return decode_block<kFp8>(w, b, dst);
  }
}

// Up to how many rows of x the offset decoder runs (0: none). Measured on Zen 4 (one thread, an
// L2-resident layer, both decoders in one build): int4 1.10x / 1.09x faster at 1 / 2 rows, level
// at 3, 1.23x slower at 4 (more live registers: GCC spills); int8 (twice the dot products, half
// the decoding) 1.36x / 1.19x / 1.01x faster at 1 / 2 / 3 rows, 1.07x slower at 4.
inline int64_t offset_decoder_rows(int64_t fmt) { return fmt == kInt4 ? 2 : fmt == kInt8 ? 3 : 0; }

// Few rows of int4 / int8 with group sums and bf16 x take the offset decoder.
void gemv_dispatch(const GemvArgs& a, int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
  if (a.decoded != nullptr) return gemv_rows<kDecoded>(a, m0, rows, b0, b1);
  const bool offset = a.xsum != nullptr && !a.exact && rows <= offset_decoder_rows(a.w.fmt);
  switch (a.w.fmt) {
    case kDecoded: return gemv_rows<kDecoded>(a, m0, rows, b0, b1);
    case kInt4:
      if (offset) return gemv_rows<kInt4, true>(a, m0, rows, b0, b1);
      return gemv_rows<kInt4>(a, m0, rows, b0, b1);
    case kInt8:
      if (offset) return gemv_rows<kInt8, true>(a, m0, rows, b0, b1);
      return gemv_rows<kInt8>(a, m0, rows, b0, b1);
    default: return gemv_rows<kFp8>(a, m0, rows, b0, b1);
  }
}

// sums[r * ng + g] = fp32 sum of bf16 row r's inputs g * group .. (g + 1) * group (group % 8 == 0),
// ng = kp / group. With group = Layout::span: the vector path's xsum.
AQ_TARGET inline void group_sums_bf16(const int16_t* x, int64_t rows, int64_t kp, int64_t group, float* sums) {
  const int64_t ng = kp / group;
  for (int64_t r = 0; r < rows; ++r) {
    const int16_t* xr = x + r * kp;
    for (int64_t g = 0; g < ng; ++g) {
      __m512 acc = _mm512_setzero_ps();
      int64_t k = g * group;
      const int64_t end = k + group;
      for (; k + 16 <= end; k += 16) {
        const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + k));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16)));
      }
      if (k < end) {  // a last 8 inputs
        const __m256i words = _mm256_maskz_loadu_epi16(0xFF, xr + k);
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16)));
      }
      sums[r * ng + g] = _mm512_reduce_add_ps(acc);
    }
  }
}

Layout make_layout(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zz,
                   const at::Tensor& lut, int64_t fmt, int64_t group, int64_t n) {
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte, "packed weights must be contiguous uint8");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.dim() == 3 && scale.size(2) == 16,
              "scales must be contiguous float32 [blocks, groups, 16]");
  TORCH_CHECK(lut.is_contiguous() && lut.scalar_type() == at::kShort && lut.numel() == 128, "lut must be int16 [128]");
  TORCH_CHECK(fmt >= kInt4 && fmt <= kDecoded, "unknown weight format ", fmt);
  TORCH_CHECK(group > 0 && group % 8 == 0, "group must be a positive multiple of 8");
  Layout w;
  w.fmt = fmt;
  w.blocks = scale.size(0);
  w.ng = scale.size(1);
  w.group = group;
  w.kp = w.ng * group;
  w.span = flush_span(group);
  w.nspans = w.kp / w.span;
  w.n = n;
  TORCH_CHECK(n > 0 && n <= w.blocks * 16, "n out of range");
  TORCH_CHECK(packed.numel() == w.blocks * w.kp / 4 * bytes_per_4k(fmt), "packed weights have the wrong size");
  w.packed = packed.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<float>();
  w.zz = nullptr;
  if (zz.has_value()) {
    TORCH_CHECK(zz->is_contiguous() && zz->scalar_type() == at::kFloat && zz->sizes() == scale.sizes(),
                "zero points must be float32 shaped like the scales");
    w.zz = zz->data_ptr<float>();
  }
  w.lut = lut.data_ptr<int16_t>();
  return w;
}


// Rows 0..rows of a.x against block b. Up to 4 rows decode the block in registers; more rows
// decode it once into `scratch` (kp / 4 * 128 bytes) as bf16 words and run 8 rows at a time.
inline void block_rows(const GemvArgs& a, int64_t rows, int64_t b, uint8_t* scratch) {
  if (rows <= 4) return gemv_dispatch(a, 0, rows, b, b + 1);
  const Layout& w = a.w;
  GemvArgs local = a;
  if (w.fmt == kDecoded) {
    local.decoded = w.packed + b * (w.kp / 4 * bytes_per_4k(kDecoded));
  } else {
    decode_dispatch(w, b, scratch);
    local.decoded = scratch;
  }
  for (int64_t r = 0; r < rows;) {
    const int64_t chunk = rows - r >= 8 ? 8 : std::min<int64_t>(4, rows - r);
    gemv_dispatch(local, r, chunk, b, b + 1);
    r += chunk;
  }
}

}  // namespace
