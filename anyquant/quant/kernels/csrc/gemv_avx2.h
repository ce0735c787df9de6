#pragma once

// Weight-only quantized linear layers for CPUs with AVX2 + FMA (no AVX-512): the matrix-vector
// core over gemv.h's repacked layout (the same bytes, packed once by avx512.py), the rows core
// (many rows: chunks dequantized to an L1 scratch that every row runs over) and the dequantization
// of tiles to fp32 for at::mm (fp32 compute).
//
// Reading the layout 256 bits at a time: a 64-byte chunk of a 16-row block is two halves, rows
// 0..7 and rows 8..15, and 32-bit lane i of a half holds words 2i and 2i+1, i.e. (row i, k) in
// its low 16 bits and (row i, k+1) in its high 16 bits. So every decoded value lands in the lane
// of its row, with no cross-lane shuffles:
//   int4 (one chunk = inputs k..k+7): input k+j is nibble j/2 of the low (j even) or high (j odd)
//        half-lane: (lane >> (4 * (j / 2) + 16 * (j % 2))) & 0xF;
//   int8 / uint8 (one chunk = inputs k..k+3): bytes 0, 2, 1, 3 of the lane are inputs k, k+1,
//        k+2, k+3 (u = the code + 128 for int8, the code for uint8);
//   kDecoded (bf16 words, one chunk = one pair k, k+1): lane << 16 and lane & 0xFFFF0000 are the
//        fp32 values of (row i, k) and (row i, k+1).
//   fp8 (one chunk = inputs k..k+3): gemv.h's bytes, 32 per pair of inputs, byte 2i+t = (row i,
//        k+t); read 32 bytes at a time as 16 words, word i = (row i, k) | (row i, k+1) << 8. Both
//        fp8 types are decoded by arithmetic, not through gemv.h's table, so the AVX2 calls name
//        which one (kFp8E4M3 / kFp8E5M2, below): the code moved to the top byte of a 16-bit word
//        is e5m2 as an fp16 (e5m2 is the top byte of an fp16) or, shifted right by one with the
//        sign kept, e4m3fn as an fp16 2^8 too small (its 4 exponent bits land in fp16's 5, bias 7
//        against 15, subnormals included), and F16C's vcvtph2ps makes fp32 of 8 of them exactly.
//        e4m3fn's one NaN magnitude (0x7F) would read as 480: its fp16 bit 14 is set with a carry
//        (all 7 magnitude bits set + 1), making the fp16 exponent all ones, a NaN as in torch.
//        That costs 3 of the ~19 vector operations per 32 weights at one row, so a layer without
//        NaN codes (every real checkpoint; avx2.py checks at load) is named kFp8E4M3Finite and
//        skips it.
// The integer codes go to fp32 with vcvtdq2ps, exactly: the decoded value is the code itself,
// `code_shift` more than the table value gemv.h's scales and zero points are stated against
// (int4: code - 8; 8-bit: u - 128). As in gemv.h's offset decoder, that shift comes off once per
// span with the zero point: y += scale * (sum of v * x - (zz + shift) * sum of x). The products are
// exact for bf16 x (a 4- or 8-bit code times an 8-bit mantissa) and the running sums are as
// large as those of the signed values (|code| <= 15 against |code - 8| <= 8), so bf16 compute
// keeps gemv.h's accuracy; fp32 x (24-bit mantissas) needs no split into bf16 parts on this
// path: it is plain fp32 FMA, the products rounded once each.
//
// The x rows are fp32 (bf16 x widened once per call, by the rows kernel a panel at a time),
// broadcast per input from memory
// (vbroadcastss is a load-port operation on AVX2 CPUs).
//
// One row of int4 at bf16 compute (decode: linear layers, the int4 LM head, the fused MoE's
// one-token experts) takes gemv_one_row_x16: x as 16-bit fixed point per span and integer dot
// products (vpmaddwd), 15 vector operations per 64 weights; its error budget is stated there.
// fp32 compute (and the benchmarks' A/B switch) keeps gemv_one_row on fp32 x: all 8
// accumulators in registers, and int4 decoded without shifts: nibble C of a 16-bit half-lane is
// masked in place (code * 16^C, exact in vcvtdq2ps) and summed in accumulator C, scaled by 16^-C
// (exactly) at the span's flush; one shift per 8 inputs brings the high half-lanes down. Per
// 64-byte chunk: 16 AND + 16 vcvtdq2ps + 2 shifts + 16 FMA against gemv_blocks' 14 shifts + 14 AND
// + 16 vcvtdq2ps + 16 FMA. (fp8 in the same register-only loop measured no faster than
// gemv_blocks: its F16C decode bounds it.)
//
// Only functions marked AQ_AVX2 contain AVX2/FMA code, so the library still loads on any x86-64
// CPU; the Python side (avx2.py) refuses where the CPU lacks the instructions.

#include "gemv.h"

#include <cmath>
#include <cstdlib>
#include <limits>

#define AQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

// The AVX2 calls' own codes for gemv.h's fp8 bytes (kFp8, whose table says which fp8 it is):
// the decoders here compute the value from the bits and need to know (kFp8E4M3Finite: e4m3fn
// without NaN codes, see above).
enum Avx2Fp8 : int64_t { kFp8E4M3 = 4, kFp8E5M2 = 5, kFp8E4M3Finite = 6 };

constexpr bool is_fp8(int64_t fmt) { return fmt == kFp8E4M3 || fmt == kFp8E5M2 || fmt == kFp8E4M3Finite; }

// make_layout for the AVX2 calls: fp8 as gemv.h's kFp8 bytes, the layout then names which fp8.
inline Layout avx2_layout(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zz,
                          const at::Tensor& lut, int64_t fmt, int64_t group, int64_t n) {
  TORCH_CHECK(fmt == kInt4 || fmt == kInt8 || fmt == kDecoded || is_fp8(fmt),
              "the AVX2 kernels run int4, 8-bit, fp8 (e4m3fn 4 or 6, e5m2 5) and bf16 words, got format ", fmt);
  Layout w = make_layout(packed, scale, zz, lut, is_fp8(fmt) ? kFp8 : fmt, group, n);
  w.fmt = fmt;
  return w;
}

namespace avx2 {

// What the decoded value exceeds the table value by (see above).
template <int64_t FMT>
constexpr float code_shift() {
  return FMT == kInt4 ? 8.f : FMT == kInt8 ? 128.f : 0.f;
}

// Chunks of 64 bytes per 8 inputs of one block, and inputs per chunk.
template <int64_t FMT>
constexpr int chunks_per_8() {
  return FMT == kInt4 ? 1 : (FMT == kInt8 || is_fp8(FMT)) ? 2 : 4;
}

// What the fp8 decoder's fp32 value is short of the weight's by (a power of two: e4m3fn read as
// fp16 is 2^8 too small). The vector path folds it into the scale, the dequantizers multiply.
template <int64_t FMT>
constexpr float fp8_unit() {
  return (FMT == kFp8E4M3 || FMT == kFp8E4M3Finite) ? 256.f : 1.f;
}

// Input T (0: k, 1: k+1) of the 16 words v (word i = (row i, k) | (row i, k+1) << 8) as fp16 bits.
template <int64_t FMT, int T>
AQ_AVX2 __attribute__((always_inline)) inline __m256i fp8_halfs(__m256i v) {
  const __m256i top = T == 0 ? _mm256_slli_epi16(v, 8) : v;  // the code in the high byte
  if constexpr (FMT == kFp8E5M2) {
    return T == 0 ? top : _mm256_and_si256(top, _mm256_set1_epi16(static_cast<int16_t>(0xFF00)));
  } else {
    // sign at bit 15, magnitude at bits 7..13 (bit 14, the sign's copy, cleared)
    const __m256i h = _mm256_and_si256(_mm256_srai_epi16(top, 1), _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
    if constexpr (FMT == kFp8E4M3Finite) return h;
    // magnitude 0x7F (NaN): + 1 at bit 7 carries into bit 14, the fp16 exponent becomes all ones
    const __m256i nan = _mm256_and_si256(_mm256_add_epi16(h, _mm256_set1_epi16(0x80)), _mm256_set1_epi16(0x4000));
    return _mm256_or_si256(h, nan);
  }
}

// Rows 0..7 (H = 0) or 8..15 (H = 1) of fp16 bits as fp32, exactly.
template <int H>
AQ_AVX2 __attribute__((always_inline)) inline __m256 halfs_to_fp32(__m256i h) {
  return _mm256_cvtph_ps(H == 0 ? _mm256_castsi256_si128(h) : _mm256_extracti128_si256(h, 1));
}

// Input J of one half-chunk `v` (rows 0..7 or 8..15) as fp32, per the table above.
template <int64_t FMT, int J>
AQ_AVX2 __attribute__((always_inline)) inline __m256 decode(__m256i v) {
  if constexpr (FMT == kInt4) {
    constexpr int shift = 4 * (J / 2) + 16 * (J % 2);
    if constexpr (shift == 28) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    const __m256i nib = _mm256_set1_epi32(0xF);
    if constexpr (shift == 0) return _mm256_cvtepi32_ps(_mm256_and_si256(v, nib));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), nib));
  } else if constexpr (FMT == kInt8) {
    constexpr int shift = J == 0 ? 0 : J == 1 ? 16 : J == 2 ? 8 : 24;
    if constexpr (shift == 24) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 24));
    const __m256i byte = _mm256_set1_epi32(0xFF);
    if constexpr (shift == 0) return _mm256_cvtepi32_ps(_mm256_and_si256(v, byte));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, shift), byte));
  } else {  // kDecoded
    if constexpr (J == 0) return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

struct Args {
  Layout w;
  const float* x;     // fp32 [rows, kp]
  const float* xsum;  // [rows, nspans] sums of x per span (needed with zz or a code shift)
  const float* bias;  // fp32 [n] or nullptr
  void* out;          // [rows, out_stride], fp32 or bf16
  bool out_bf16;
  int64_t out_stride;
  int64_t col_shift = 0;  // block b's outputs are stored at columns b * 16 - col_shift
  // x as 16-bit fixed point (fixed16_rows, below): set, one row of int4 takes gemv_one_row_x16.
  // The callers set it for one row of bf16 compute only (fp32 compute keeps the fp32 kernel).
  const int16_t* x16 = nullptr;  // [rows, kp]
  const float* x16_step = nullptr;  // [rows, nspans] each span's step s (a power of two)
  const float* x16_sum = nullptr;   // [rows, nspans] s * the span's sum of x16
};

// Bytes ahead of the current load that the vector path prefetches.
constexpr int64_t kPrefetchBytes = 1024;

// acc[m][H][*] += input k + J (of the chunk's half H) times x[m][k + J], for inputs J..IPC-1.
template <int64_t FMT, int M, int U, int H, int J, int IPC>
AQ_AVX2 __attribute__((always_inline)) inline void fma_inputs(__m256i v, const float* const* xr, int64_t k,
                                                              __m256 (&acc)[M][2][U]) {
  if constexpr (J < IPC) {
    const __m256 d = decode<FMT, J>(v);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
      acc[m][H][J % U] = _mm256_fmadd_ps(d, _mm256_broadcast_ss(xr[m] + k + J), acc[m][H][J % U]);
    fma_inputs<FMT, M, U, H, J + 1, IPC>(v, xr, k, acc);
  }
}

// fp8: acc[m][*][J % U] += input k + J of all 16 rows (fp16 bits h) times x[m][k + J].
template <int64_t FMT, int M, int U, int J>
AQ_AVX2 __attribute__((always_inline)) inline void fma_fp8_input(__m256i h, const float* const* xr, int64_t k,
                                                                 __m256 (&acc)[M][2][U]) {
  const __m256 d0 = halfs_to_fp32<0>(h), d1 = halfs_to_fp32<1>(h);
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    const __m256 xb = _mm256_broadcast_ss(xr[m] + k + J);
    acc[m][0][J % U] = _mm256_fmadd_ps(d0, xb, acc[m][0][J % U]);
    acc[m][1][J % U] = _mm256_fmadd_ps(d1, xb, acc[m][1][J % U]);
  }
}

// Chunks C.. of one 8-input step at p (inputs k..k+7).
template <int64_t FMT, int M, int U, int C>
AQ_AVX2 __attribute__((always_inline)) inline void step_chunks(const uint8_t* p, const float* const* xr, int64_t k,
                                                               __m256 (&acc)[M][2][U]) {
  constexpr int chunks = chunks_per_8<FMT>(), ipc = 8 / chunks;
  if constexpr (C < chunks && is_fp8(FMT)) {
    const uint8_t* q = p + 64 * C;
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
    fma_fp8_input<FMT, M, U, 0>(fp8_halfs<FMT, 0>(v0), xr, k + C * ipc, acc);
    fma_fp8_input<FMT, M, U, 1>(fp8_halfs<FMT, 1>(v0), xr, k + C * ipc, acc);
    fma_fp8_input<FMT, M, U, 2>(fp8_halfs<FMT, 0>(v1), xr, k + C * ipc, acc);
    fma_fp8_input<FMT, M, U, 3>(fp8_halfs<FMT, 1>(v1), xr, k + C * ipc, acc);
    step_chunks<FMT, M, U, C + 1>(p, xr, k, acc);
  } else if constexpr (C < chunks) {
    const uint8_t* q = p + 64 * C;
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
    fma_inputs<FMT, M, U, 0, 0, ipc>(lo, xr, k + C * ipc, acc);
    fma_inputs<FMT, M, U, 1, 0, ipc>(hi, xr, k + C * ipc, acc);
    step_chunks<FMT, M, U, C + 1>(p, xr, k, acc);
  }
}

// Round fp32 to bf16 (nearest even; inputs are finite sums) and store `valid` of the 8 words.
AQ_AVX2 inline void store_bf16(int16_t* dst, __m256 y, int64_t valid) {
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, lsb), _mm256_set1_epi32(0x7FFF)), 16);
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  if (valid >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), words);
  } else if (valid > 0) {
    alignas(16) int16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), words);
    std::memcpy(dst, tmp, static_cast<size_t>(valid) * 2);
  }
}

AQ_AVX2 inline void store_f32(float* dst, __m256 y, int64_t valid) {
  if (valid >= 8) {
    _mm256_storeu_ps(dst, y);
  } else if (valid > 0) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, y);
    std::memcpy(dst, tmp, static_cast<size_t>(valid) * 4);
  }
}

// Up to 8 outputs of the bias at col (0 past n).
AQ_AVX2 inline __m256 load_partial(const float* src, int64_t valid) {
  if (valid >= 8) return _mm256_loadu_ps(src);
  alignas(32) float tmp[8] = {};
  if (valid > 0) std::memcpy(tmp, src, static_cast<size_t>(valid) * 4);
  return _mm256_load_ps(tmp);
}

// One span's scale of rows 0..7 (h = 0) or 8..15 of block b in group g, and what its offsets take
// per unit of the span's sum of x (zs: (zz + code shift) * scale; null without offsets).
struct SpanScale {
  __m256 s, zs;
  bool offsets;
};

template <int64_t FMT>
AQ_AVX2 __attribute__((always_inline)) inline SpanScale span_scale(const Layout& w, int64_t b, int64_t g, int h) {
  constexpr float shift = code_shift<FMT>();
  SpanScale sc{_mm256_loadu_ps(w.scale + (b * w.ng + g) * 16 + 8 * h), _mm256_setzero_ps(),
               shift != 0.f || w.zz != nullptr};
  if (sc.offsets) {
    __m256 zc = w.zz != nullptr ? _mm256_loadu_ps(w.zz + (b * w.ng + g) * 16 + 8 * h) : _mm256_setzero_ps();
    zc = _mm256_add_ps(zc, _mm256_set1_ps(shift));
    sc.zs = _mm256_mul_ps(sc.s, zc);
  }
  if constexpr (fp8_unit<FMT>() != 1.f) sc.s = _mm256_mul_ps(sc.s, _mm256_set1_ps(fp8_unit<FMT>()));
  return sc;
}

// out + the span's sum of v * x scaled, less its offsets (row `row` of x, span q).
AQ_AVX2 __attribute__((always_inline)) inline __m256 flush(const Args& a, const SpanScale& sc, int64_t row,
                                                           int64_t q, __m256 sum, __m256 out) {
  out = _mm256_fmadd_ps(sum, sc.s, out);
  if (sc.offsets) out = _mm256_fnmadd_ps(sc.zs, _mm256_set1_ps(a.xsum[row * a.w.nspans + q]), out);
  return out;
}

// Row `row`'s 16 outputs of block b (rows 0..7: y0, 8..15: y1) plus bias, stored as a.out's type.
AQ_AVX2 inline void store_outputs(const Args& a, int64_t row, int64_t b, __m256 y0, __m256 y1) {
  for (int h = 0; h < 2; ++h) {
    const int64_t col = b * 16 + 8 * h, dst = row * a.out_stride + col - a.col_shift;
    const int64_t valid = std::min<int64_t>(8, a.w.n - col);
    const __m256 bias = a.bias ? load_partial(a.bias + col, valid) : _mm256_setzero_ps();
    const __m256 y = _mm256_add_ps(h == 0 ? y0 : y1, bias);
    if (a.out_bf16) {
      store_bf16(static_cast<int16_t*>(a.out) + dst, y, valid);
    } else {
      store_f32(static_cast<float*>(a.out) + dst, y, valid);
    }
  }
}

// Rows m0..m0+M of x against blocks b0..b1, 8 inputs per step. Accumulators: U per row and half,
// M * 2 * U = 8 chains in flight (FMA latency 4 on two pipes).
template <int64_t FMT, int M>
AQ_AVX2 void gemv_blocks(const Args& a, int64_t m0, int64_t b0, int64_t b1) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
  constexpr int64_t step_bytes = 2 * bytes_per_4k(FMT);
  const Layout& w = a.w;
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  const int64_t span_bytes = w.span / 4 * bytes_per_4k(FMT);
  const float* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = a.x + (m0 + m) * w.kp;
  const int64_t spans_per_group = w.group / w.span;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* pb = w.packed + b * block_bytes;
    __m256 out[M][2];
    for (int m = 0; m < M; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
    for (int64_t q = 0, g = 0, in_group = 0; q < w.nspans; ++q) {
      const uint8_t* p = pb + q * span_bytes;
      __m256 acc[M][2][U];
      for (int m = 0; m < M; ++m)
        for (int h = 0; h < 2; ++h)
          for (int u = 0; u < U; ++u) acc[m][h][u] = _mm256_setzero_ps();
      const int64_t k0 = q * w.span;
      for (int64_t k = 0; k < w.span; k += 8, p += step_bytes) step_chunks<FMT, M, U, 0>(p, xr, k0 + k, acc);
      for (int h = 0; h < 2; ++h) {
        const SpanScale sc = span_scale<FMT>(w, b, g, h);
        for (int m = 0; m < M; ++m) {
          __m256 sum = acc[m][h][0];
          for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][h][u]);
          out[m][h] = flush(a, sc, m0 + m, q, sum, out[m][h]);
        }
      }
      if (++in_group == spans_per_group) {
        in_group = 0;
        ++g;
      }
    }
    for (int m = 0; m < M; ++m) store_outputs(a, m0 + m, b, out[m][0], out[m][1]);
  }
}

// One row of x (decode), int4: the same sums as gemv_blocks<kInt4, 1> with fewer vector
// operations per byte and every accumulator in a register (GCC kept gemv_blocks' acc[1][2][4] in
// part on the stack, a load and a store per FMA for 3 of int4's 8 chains).
// The accumulators, rows 0..7 (lo*) and 8..15 (hi*); named members, not an array, for the same reason.
struct RowAcc {
  __m256 lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3;
};

// int4 nibble C of each 16-bit half of the lanes of v, in place: code * 16^C (no shift: the
// nibble stays where it is, masked, and vcvtdq2ps makes it exactly code * 16^C). The accumulator
// of class C sums code * 16^C * x, each FMA rounding as it would for code * x (a power of two
// apart), and is scaled by 16^-C (exactly) when the span is flushed.
template <int C>
AQ_AVX2 __attribute__((always_inline)) inline __m256 int4_in_place(__m256i v) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * C))));
}

// int4, inputs k..k+7 of one 64-byte chunk q into the class accumulators: input 2C is nibble C of
// the lanes' low halves, input 2C + 1 nibble C of their high halves (lane >> 16). 1 shift per 8
// inputs and an AND + vcvtdq2ps per input (gemv_blocks: a shift + AND + vcvtdq2ps per input).
AQ_AVX2 __attribute__((always_inline)) inline void int4_row_chunk(const uint8_t* q, const float* x, RowAcc& r) {
  _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
  const __m256i lo16 = _mm256_srli_epi32(lo, 16), hi16 = _mm256_srli_epi32(hi, 16);
  __m256 xb = _mm256_broadcast_ss(x);
  r.lo0 = _mm256_fmadd_ps(int4_in_place<0>(lo), xb, r.lo0);
  r.hi0 = _mm256_fmadd_ps(int4_in_place<0>(hi), xb, r.hi0);
  xb = _mm256_broadcast_ss(x + 1);
  r.lo0 = _mm256_fmadd_ps(int4_in_place<0>(lo16), xb, r.lo0);
  r.hi0 = _mm256_fmadd_ps(int4_in_place<0>(hi16), xb, r.hi0);
  xb = _mm256_broadcast_ss(x + 2);
  r.lo1 = _mm256_fmadd_ps(int4_in_place<1>(lo), xb, r.lo1);
  r.hi1 = _mm256_fmadd_ps(int4_in_place<1>(hi), xb, r.hi1);
  xb = _mm256_broadcast_ss(x + 3);
  r.lo1 = _mm256_fmadd_ps(int4_in_place<1>(lo16), xb, r.lo1);
  r.hi1 = _mm256_fmadd_ps(int4_in_place<1>(hi16), xb, r.hi1);
  xb = _mm256_broadcast_ss(x + 4);
  r.lo2 = _mm256_fmadd_ps(int4_in_place<2>(lo), xb, r.lo2);
  r.hi2 = _mm256_fmadd_ps(int4_in_place<2>(hi), xb, r.hi2);
  xb = _mm256_broadcast_ss(x + 5);
  r.lo2 = _mm256_fmadd_ps(int4_in_place<2>(lo16), xb, r.lo2);
  r.hi2 = _mm256_fmadd_ps(int4_in_place<2>(hi16), xb, r.hi2);
  xb = _mm256_broadcast_ss(x + 6);
  r.lo3 = _mm256_fmadd_ps(int4_in_place<3>(lo), xb, r.lo3);
  r.hi3 = _mm256_fmadd_ps(int4_in_place<3>(hi), xb, r.hi3);
  xb = _mm256_broadcast_ss(x + 7);
  r.lo3 = _mm256_fmadd_ps(int4_in_place<3>(lo16), xb, r.lo3);
  r.hi3 = _mm256_fmadd_ps(int4_in_place<3>(hi16), xb, r.hi3);
}

// The span's sums of rows 0..7 (H = 0) or 8..15: the classes scaled by 16^-C and added.
template <int H>
AQ_AVX2 __attribute__((always_inline)) inline __m256 row_sum(const RowAcc& r) {
  const __m256 c0 = H == 0 ? r.lo0 : r.hi0, c1 = H == 0 ? r.lo1 : r.hi1;
  const __m256 c2 = H == 0 ? r.lo2 : r.hi2, c3 = H == 0 ? r.lo3 : r.hi3;
  __m256 sum = _mm256_fmadd_ps(c1, _mm256_set1_ps(1.f / 16), c0);
  sum = _mm256_fmadd_ps(c2, _mm256_set1_ps(1.f / 256), sum);
  return _mm256_fmadd_ps(c3, _mm256_set1_ps(1.f / 4096), sum);
}

AQ_AVX2 void gemv_one_row(const Args& a, int64_t row, int64_t b0, int64_t b1) {
  constexpr int64_t FMT = kInt4;
  constexpr int64_t chunk_inputs = 8 / chunks_per_8<FMT>();
  const Layout& w = a.w;
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  const float* xr = a.x + row * w.kp;
  const int64_t spans_per_group = w.group / w.span;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = w.packed + b * block_bytes;
    __m256 out0 = _mm256_setzero_ps(), out1 = _mm256_setzero_ps();
    for (int64_t q = 0, g = 0, in_group = 0; q < w.nspans; ++q) {
      const __m256 z = _mm256_setzero_ps();
      RowAcc r{z, z, z, z, z, z, z, z};
      const float* x = xr + q * w.span;
      for (int64_t k = 0; k < w.span; k += chunk_inputs, p += 64) {
        int4_row_chunk(p, x + k, r);
      }
      out0 = flush(a, span_scale<FMT>(w, b, g, 0), row, q, row_sum<0>(r), out0);
      out1 = flush(a, span_scale<FMT>(w, b, g, 1), row, q, row_sum<1>(r), out1);
      if (++in_group == spans_per_group) {
        in_group = 0;
        ++g;
      }
    }
    store_outputs(a, row, b, out0, out1);
  }
}

// ---- One row of int4 on 16-bit fixed-point activations (bf16 compute): integer dot products.
//
// gemv_one_row is bound by its vector operations, not by memory (Zen 3, 2 threads: 10-16 GB/s of
// ~21 the machine reads). Here x is converted once per call to int16 fixed point and the codes are
// multiplied by vpmaddwd, which sums the two 16-bit products of a 32-bit lane: lane i of a 32-byte
// half holds (row i, k) in its low and (row i, k + 1) in its high 16 bits, so
// `lane >> 4C & 0x000F000F` is the codes of inputs k + 2C and k + 2C + 1 as two int16 in row i's
// lane, and its vpmaddwd with a 32-bit broadcast of the pair (x16[k + 2C], x16[k + 2C + 1])
// adds code * x16 + code' * x16' to row i's int32 lane. Per 32-byte half (64 weights): 1 AND +
// 3 x (shift + AND) + 4 vpmaddwd + 4 vpaddd = 15 vector operations, against gemv_one_row's 25 (the
// loads and the broadcasts of x16 go to the load ports).
//
// Fixed point (fixed16_rows): per span of inputs (Layout::span, <= 128: the spans the kernel
// flushes per), s = 2^(floor(log2(max |x|)) - 14) and x16 = round(x / s) in [-32767, 32767]
// (max |x| / s < 2^15). bf16 x within 2^7 of the span's largest magnitude is exact in x16 (8
// significant bits); the rest, and fp32 x (the fused MoE's h), is rounded to a step s, at most
// s / 2 <= 2^-15 max |x| per input. The span's code shift and zero points come off against
// s * (the sum of the x16 actually used), so the output is the dot product of the weights with
// the rounded x, x16 * s (up to the flushes' fp32 roundings): its error against x's own is the
// sum over k of (code - zero) * scale * (x16 * s - x), at most 2^-15 * max |x of the span| *
// sum |w| over the span per output (w without GGUF float offsets: those are added against x's
// own sums), next to bf16 compute's output rounding (2^-9 relative). A span whose max |x| is
// below 2^-135 (s under fp32's smallest subnormal) contributes nothing.
// int32: a span sums at most 128 * 15 * 32767 < 2^26 per lane (no overflow); at the flush
// vcvtdq2ps rounds it to fp32 (2^-24 relative, beyond 2^24), times s * the group's scale.
// Non-finite x makes its span's outputs NaN (s = NaN).

// The benchmarks' A/B switch (benchmarks/linear_kernels.py, moe_cpu.py): with this environment
// variable set, one row of int4 at bf16 compute takes gemv_one_row on fp32 x, the kernel before
// gemv_one_row_x16. Read by the ops once per call; nothing else sets it.
constexpr const char* kInt4RowFp32Env = "ANYQUANT_AVX2_INT4_ROW_FP32";
inline bool x16_row_enabled() { return std::getenv(kInt4RowFp32Env) == nullptr; }

// Scratch bytes for one row's fixed16_rows output over kp inputs (any span: at most kp / 8 spans),
// x16 first, then steps and sums from a 32-byte boundary (use_x16_row).
inline size_t x16_steps_at(int64_t kp) { return (static_cast<size_t>(kp) * 2 + 31) / 32 * 32; }
inline size_t x16_row_bytes(int64_t kp) { return x16_steps_at(kp) + 2 * sizeof(float) * static_cast<size_t>(kp / 8 + 1); }

// One row's 16-bit fixed-point activations (see above) of x [rows, kp] per span of `span` inputs:
// x16 [rows, kp], step [rows, kp / span], sum [rows, kp / span] (span % 8 == 0).
AQ_AVX2 inline void fixed16_rows(const float* x, int64_t rows, int64_t kp, int64_t span, int16_t* x16, float* step,
                                 float* sum) {
  const int64_t ns = kp / span;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < ns; ++q) {
      const float* p = x + r * kp + q * span;
      int16_t* dst = x16 + r * kp + q * span;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = 0; k < span; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(p + k), magnitude));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mx);
      float top = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < span; ++k) finite = finite && std::isfinite(p[k]);  // max_ps drops NaN
      for (float v : lanes) top = std::max(top, v);
      if (!finite || top == 0.f) {
        std::memset(dst, 0, sizeof(int16_t) * static_cast<size_t>(span));
        step[r * ns + q] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
        sum[r * ns + q] = 0.f;
        continue;
      }
      const int e = std::ilogb(top);  // 2^e <= top < 2^(e + 1), subnormals included
      // 1 / s = 2^(14 - e) as two factors, each a finite fp32 power of two (14 - e <= 163)
      const int up = std::min(14 - e, 127);
      const __m256 f0 = _mm256_set1_ps(std::ldexp(1.f, up)), f1 = _mm256_set1_ps(std::ldexp(1.f, 14 - e - up));
      const __m128i lowest = _mm_set1_epi16(-32767);
      __m256i total = _mm256_setzero_si256();
      for (int64_t k = 0; k < span; k += 8) {
        // round to nearest even (the default MXCSR mode), saturate to int16, clamp -32768 away
        const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + k), f0), f1));
        const __m128i i16 =
            _mm_max_epi16(_mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1)), lowest);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), i16);
        total = _mm256_add_epi32(total, _mm256_cvtepi16_epi32(i16));
      }
      alignas(32) int32_t parts[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts), total);
      int32_t whole = 0;  // |whole| <= 128 * 32767: exact in fp32
      for (int32_t v : parts) whole += v;
      const float s = std::ldexp(1.f, e - 14);
      step[r * ns + q] = s;
      sum[r * ns + q] = static_cast<float>(whole) * s;
    }
  }
}

// Row x (fp32, a.w.kp inputs) as 16-bit fixed point into `scratch` (x16_row_bytes), for a's one row.
AQ_AVX2 inline void use_x16_row(Args& a, const float* x, uint8_t* scratch) {
  auto* x16 = reinterpret_cast<int16_t*>(scratch);
  auto* spans = reinterpret_cast<float*>(scratch + x16_steps_at(a.w.kp));
  fixed16_rows(x, 1, a.w.kp, a.w.span, x16, spans, spans + a.w.nspans);
  a.x16 = x16;
  a.x16_step = spans;
  a.x16_sum = spans + a.w.nspans;
}

// Rows 0..7 (lo) and 8..15 (hi) of one 64-byte chunk at q (inputs k..k+7) times x16[k..k+7], into
// the span's int32 accumulators.
AQ_AVX2 __attribute__((always_inline)) inline void int4_x16_chunk(const uint8_t* q, const int16_t* x, __m256i& lo_acc,
                                                                  __m256i& hi_acc) {
  _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
  const __m256i nib = _mm256_set1_epi32(0x000F000F);
  int32_t pair[4];  // (x16[k + 2C], x16[k + 2C + 1]) as the 32-bit words the broadcasts read
  std::memcpy(pair, x, sizeof(pair));
  const __m256i x0 = _mm256_set1_epi32(pair[0]), x1 = _mm256_set1_epi32(pair[1]);
  const __m256i x2 = _mm256_set1_epi32(pair[2]), x3 = _mm256_set1_epi32(pair[3]);
  // per half: (C0 + C1) + (C2 + C3) before the accumulator, a short dependency chain
  const __m256i l01 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(lo, nib), x0),
                                       _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(lo, 4), nib), x1));
  const __m256i l23 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(lo, 8), nib), x2),
                                       _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(lo, 12), nib), x3));
  const __m256i h01 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(hi, nib), x0),
                                       _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(hi, 4), nib), x1));
  const __m256i h23 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(hi, 8), nib), x2),
                                       _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(hi, 12), nib), x3));
  lo_acc = _mm256_add_epi32(lo_acc, _mm256_add_epi32(l01, l23));
  hi_acc = _mm256_add_epi32(hi_acc, _mm256_add_epi32(h01, h23));
}

// out + the span's integer sum times s * scale, less (zz + shift) * scale * s * sum of x16.
AQ_AVX2 __attribute__((always_inline)) inline __m256 flush_x16(const SpanScale& sc, float s, float xsum,
                                                               __m256i sum, __m256 out) {
  out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sc.s, _mm256_set1_ps(s)), out);
  if (sc.offsets) out = _mm256_fnmadd_ps(sc.zs, _mm256_set1_ps(xsum), out);
  return out;
}

AQ_AVX2 void gemv_one_row_x16(const Args& a, int64_t row, int64_t b0, int64_t b1) {
  constexpr int64_t FMT = kInt4;
  const Layout& w = a.w;
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  const int16_t* xr = a.x16 + row * w.kp;
  const float* steps = a.x16_step + row * w.nspans;
  const float* sums = a.x16_sum + row * w.nspans;
  const int64_t spans_per_group = w.group / w.span;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = w.packed + b * block_bytes;
    __m256 out0 = _mm256_setzero_ps(), out1 = _mm256_setzero_ps();
    for (int64_t q = 0, g = 0, in_group = 0; q < w.nspans; ++q) {
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      const int16_t* x = xr + q * w.span;
      for (int64_t k = 0; k < w.span; k += 8, p += 64) int4_x16_chunk(p, x + k, lo, hi);
      out0 = flush_x16(span_scale<FMT>(w, b, g, 0), steps[q], sums[q], lo, out0);
      out1 = flush_x16(span_scale<FMT>(w, b, g, 1), steps[q], sums[q], hi, out1);
      if (++in_group == spans_per_group) {
        in_group = 0;
        ++g;
      }
    }
    store_outputs(a, row, b, out0, out1);
  }
}

template <int64_t FMT>
void gemv_rows(const Args& a, int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
  switch (rows) {
    case 1:
      if constexpr (FMT == kInt4) return a.x16 != nullptr ? gemv_one_row_x16(a, m0, b0, b1) : gemv_one_row(a, m0, b0, b1);
      return gemv_blocks<FMT, 1>(a, m0, b0, b1);
    case 2: return gemv_blocks<FMT, 2>(a, m0, b0, b1);
    case 3: return gemv_blocks<FMT, 3>(a, m0, b0, b1);
    default: return gemv_blocks<FMT, 4>(a, m0, b0, b1);
  }
}

inline void gemv_fmt(const Args& a, int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
  switch (a.w.fmt) {
    case kInt4: return gemv_rows<kInt4>(a, m0, rows, b0, b1);
    case kInt8: return gemv_rows<kInt8>(a, m0, rows, b0, b1);
    case kFp8E4M3: return gemv_rows<kFp8E4M3>(a, m0, rows, b0, b1);
    case kFp8E5M2: return gemv_rows<kFp8E5M2>(a, m0, rows, b0, b1);
    case kFp8E4M3Finite: return gemv_rows<kFp8E4M3Finite>(a, m0, rows, b0, b1);
    default: return gemv_rows<kDecoded>(a, m0, rows, b0, b1);
  }
}

// Any number of rows, 4 at a time. Up to 4 rows stream blocks b0..b1 once; more rows take one
// block at a time through every group of 4 rows, so the block is read from memory once and
// from L1/L2 by the other groups (measured on Zen 3: 4 rows run at ~50 GFLOP/s; beyond 8 rows
// the rows core below is faster, see avx2.py).
inline void gemv_dispatch(const Args& a, int64_t rows, int64_t b0, int64_t b1) {
  if (rows <= 4) return gemv_fmt(a, 0, rows, b0, b1);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m0 = 0; m0 < rows; m0 += 4) gemv_fmt(a, m0, std::min<int64_t>(4, rows - m0), b, b + 1);
}

// ---- Few rows (batched decode, 2..kFewRowsMax rows): every weight decoded once per group of up to
// kFewR rows, all accumulators in registers.
//
// int4 decoded in place, as gemv_one_row does, but with the power of two moved from the
// accumulators to x: input J of an 8-input step decodes to code * 2^e(J) (J even: nibble J/2 of
// the half-lanes' low halves masked in place, e = 4 * (J / 2); J odd below 7: of their high halves,
// e = 16 + 4 * (J / 2), at most 15 * 2^24, exact in vcvtdq2ps; J = 7: the top nibble shifted down,
// e = 0), and the op scales x by 2^-e(J) once per call (few_rows_prescale: exact, a power of two,
// for any x above 2^-102 in magnitude; smaller activations lose bits below 2^-126, nothing a bf16
// layer can see). Then code * 2^e * x * 2^-e = code * x exactly, so one accumulator per row and
// half sums every input, and the sums are gemv_blocks' (products exact for bf16 x, fp32 additions
// in another order). Per 8 inputs of 16 outputs: 16 AND/shift + 16 vcvtdq2ps shared by all rows,
// then per row 8 broadcasts and 16 FMAs; the decoded value is read from memory (L1) per input, so no
// register holds the raw chunk: kFewR rows take 2 * kFewR accumulators + 2 decoded + 1 x.
// 8-bit and bf16 words (the LM head) use decode<> on the same loop (x not scaled). fp8 keeps
// gemv_blocks (its layout pairs inputs, not rows, in a 32-byte half).
// Measured on Zen 3 (one thread, int4 g128, the Qwen2.5-0.5B shapes): 1.2-1.6x gemv_blocks at 2..8
// rows; 1.1-1.2x the rows kernel at 12..16 (benchmarks/RESULTS.md). M < 4 rows take U = 2
// accumulators per row and half (8 or 12 FMA chains in flight: FMA latency 4 on two pipes).
constexpr int kFewR = 6;             // rows per group: 12 accumulators + 2 decoded + 1 x + 1 mask
constexpr int64_t kFewRowsMax = 16;  // the most rows the op takes (avx2.py's _FEW_ROWS_MAX)

// The power of two (exponent) that int4 input J of an 8-input step decodes to in place.
constexpr int int4_place(int j) { return j == 7 ? 0 : 4 * (j / 2) + 16 * (j % 2); }

template <int64_t FMT>
constexpr bool few_rows_format() {
  return FMT == kInt4 || FMT == kInt8 || FMT == kDecoded;
}

// Input J of an 8-input step, for the 8 rows whose 32 bytes of the step's first chunk are at `half`.
template <int64_t FMT, int J>
AQ_AVX2 __attribute__((always_inline)) inline __m256 few_rows_decode(const uint8_t* half) {
  constexpr int ipc = 8 / chunks_per_8<FMT>();
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half + 64 * (J / ipc)));
  if constexpr (FMT == kInt4) {
    if constexpr (J == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF << int4_place(J))));
  } else {
    return decode<FMT, J % ipc>(v);
  }
}

// acc[m][h][J % U] += input k + J (of H halves) times row m's x, for inputs J..7.
template <int64_t FMT, int M, int H, int U, int J>
AQ_AVX2 __attribute__((always_inline)) inline void few_rows_inputs(const uint8_t* p, const float* const* xr, int64_t k,
                                                                   __m256 (&acc)[M][H][U]) {
  if constexpr (J < 8) {
    __m256 d[H];
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) d[h] = few_rows_decode<FMT, J>(p + 32 * h);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const __m256 xb = _mm256_broadcast_ss(xr[m] + k + J);
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) acc[m][h][J % U] = _mm256_fmadd_ps(d[h], xb, acc[m][h][J % U]);
    }
    few_rows_inputs<FMT, M, H, U, J + 1>(p, xr, k, acc);
  }
}

// Rows m0..m0+M of x (int4: prescaled) against blocks b0..b1. Per span, H halves of the 16
// outputs per pass (H = 2: both, each broadcast of x shared by two FMAs; H = 1: rows 0..7, then
// 8..15, x re-read from L1), U accumulators per row and half (M * H * U chains in flight).
template <int64_t FMT, int M, int H, int U>
AQ_AVX2 void few_rows_blocks(const Args& a, int64_t m0, int64_t b0, int64_t b1) {
  constexpr int64_t step_bytes = 2 * bytes_per_4k(FMT);
  const Layout& w = a.w;
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  const int64_t span_bytes = w.span / 4 * bytes_per_4k(FMT);
  const float* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = a.x + (m0 + m) * w.kp;
  const int64_t spans_per_group = w.group / w.span;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* pb = w.packed + b * block_bytes;
    alignas(32) float out[M][16] = {};  // touched once per span: memory, not registers
    for (int64_t q = 0, g = 0, in_group = 0; q < w.nspans; ++q) {
      const int64_t k0 = q * w.span;
      for (int h0 = 0; h0 < 2; h0 += H) {
        __m256 acc[M][H][U];
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
          for (int h = 0; h < H; ++h)
#pragma GCC unroll 4
            for (int u = 0; u < U; ++u) acc[m][h][u] = _mm256_setzero_ps();
        const uint8_t* p = pb + q * span_bytes + 32 * h0;
        for (int64_t k = 0; k < w.span; k += 8, p += step_bytes) {
#pragma GCC unroll 4
          for (int c = 0; c < chunks_per_8<FMT>(); ++c)  // every line of the step (as step_chunks)
            _mm_prefetch(reinterpret_cast<const char*>(p) + 64 * c + kPrefetchBytes, _MM_HINT_T0);
          few_rows_inputs<FMT, M, H, U, 0>(p, xr, k0 + k, acc);
        }
        for (int h = 0; h < H; ++h) {
          const SpanScale sc = span_scale<FMT>(w, b, g, h0 + h);
          for (int m = 0; m < M; ++m) {
            __m256 sum = acc[m][h][0];
            for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][h][u]);
            float* o = out[m] + 8 * (h0 + h);
            _mm256_store_ps(o, flush(a, sc, m0 + m, q, sum, _mm256_load_ps(o)));
          }
        }
      }
      if (++in_group == spans_per_group) {
        in_group = 0;
        ++g;
      }
    }
    for (int m = 0; m < M; ++m) store_outputs(a, m0 + m, b, _mm256_load_ps(out[m]), _mm256_load_ps(out[m] + 8));
  }
}

template <int64_t FMT>
void few_rows_group(const Args& a, int64_t m0, int64_t rows, int64_t b0, int64_t b1) {
  switch (rows) {
    case 1: return few_rows_blocks<FMT, 1, 2, 4>(a, m0, b0, b1);
    case 2: return few_rows_blocks<FMT, 2, 2, 2>(a, m0, b0, b1);
    case 3: return few_rows_blocks<FMT, 3, 2, 2>(a, m0, b0, b1);
    case 4: return few_rows_blocks<FMT, 4, 2, 1>(a, m0, b0, b1);
    case 5: return few_rows_blocks<FMT, 5, 2, 1>(a, m0, b0, b1);
    default: return few_rows_blocks<FMT, 6, 2, 1>(a, m0, b0, b1);
  }
}

// Rows split into groups of at most kFewR, as even as they go (8 = 4 + 4, 16 = 6 + 5 + 5). One group
// streams blocks b0..b1; more take one block at a time through every group, so a block is read
// from memory once and from L1 by the other groups.
template <int64_t FMT>
void few_rows_fmt(const Args& a, int64_t rows, int64_t b0, int64_t b1) {
  const int64_t groups = (rows + kFewR - 1) / kFewR;
  if (groups == 1) return few_rows_group<FMT>(a, 0, rows, b0, b1);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t i = 0, m0 = 0; i < groups; ++i) {
      const int64_t n = (rows - m0) / (groups - i);
      few_rows_group<FMT>(a, m0, n, b, b + 1);
      m0 += n;
    }
}

inline void few_rows_dispatch(const Args& a, int64_t rows, int64_t b0, int64_t b1) {
  switch (a.w.fmt) {
    case kInt4: return few_rows_fmt<kInt4>(a, rows, b0, b1);
    case kInt8: return few_rows_fmt<kInt8>(a, rows, b0, b1);
    default: return few_rows_fmt<kDecoded>(a, rows, b0, b1);
  }
}

// int4: x[m][k] *= 2^-e(k % 8) (int4_place) in place, rows * kp values, kp % 8 == 0.
AQ_AVX2 inline void few_rows_prescale(float* x, int64_t count) {
  const __m256 unit = _mm256_setr_ps(1.f, 0x1p-16f, 0x1p-4f, 0x1p-20f, 0x1p-8f, 0x1p-24f, 0x1p-12f, 1.f);
  for (int64_t i = 0; i < count; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), unit));
}

// bf16 words -> fp32, n % 8 == 0.
AQ_AVX2 inline void widen_bf16(const int16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16)));
  }
}

// sums[r * (kp / span) + q] = fp32 sum of row r's inputs q * span .. (q + 1) * span (span % 8 == 0).
AQ_AVX2 inline void span_sums(const float* x, int64_t rows, int64_t kp, int64_t span, float* sums) {
  const int64_t ns = kp / span;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < ns; ++q) {
      const float* p = x + r * kp + q * span;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < span; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(p + k));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      float total = 0.f;
      for (float v : lanes) total += v;
      sums[r * ns + q] = total;
    }
  }
}

// Blocks b0..b1 dequantized, (v - zz - shift) * scale = (table value - zz) * scale in fp32 (the
// subtraction exact, one rounding: the reference's weights), into a [kp, ld] tile of W.T whose
// column 0 is block tile_b0's row 0.
template <int64_t FMT, int H, int J, int IPC>
AQ_AVX2 __attribute__((always_inline)) inline void store_inputs(__m256i v, __m256 s, __m256 z, float* dst,
                                                                int64_t ld) {
  if constexpr (J < IPC) {
    _mm256_storeu_ps(dst + J * ld + 8 * H, _mm256_mul_ps(_mm256_sub_ps(decode<FMT, J>(v), z), s));
    store_inputs<FMT, H, J + 1, IPC>(v, s, z, dst, ld);
  }
}

// fp8: input J of the chunk (16 rows, fp16 bits h), (v - z) * s as above, v exact in fp32.
template <int64_t FMT, int J>
AQ_AVX2 __attribute__((always_inline)) inline void store_fp8_input(__m256i h, __m256 s0, __m256 s1, __m256 z0,
                                                                   __m256 z1, float* dst, int64_t ld) {
  const __m256 unit = _mm256_set1_ps(fp8_unit<FMT>());
  const __m256 v0 = _mm256_mul_ps(halfs_to_fp32<0>(h), unit), v1 = _mm256_mul_ps(halfs_to_fp32<1>(h), unit);
  _mm256_storeu_ps(dst + J * ld, _mm256_mul_ps(_mm256_sub_ps(v0, z0), s0));
  _mm256_storeu_ps(dst + J * ld + 8, _mm256_mul_ps(_mm256_sub_ps(v1, z1), s1));
}

// One 64-byte chunk at p (inputs J = 0..ipc-1 of both halves of the rows) stored as above.
template <int64_t FMT>
AQ_AVX2 __attribute__((always_inline)) inline void store_chunk(const uint8_t* p, __m256 s0, __m256 s1, __m256 z0,
                                                               __m256 z1, float* dst, int64_t ld) {
  constexpr int ipc = 8 / chunks_per_8<FMT>();
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  if constexpr (is_fp8(FMT)) {  // lo: pair (k, k+1), hi: pair (k+2, k+3), 16 rows each
    store_fp8_input<FMT, 0>(fp8_halfs<FMT, 0>(lo), s0, s1, z0, z1, dst, ld);
    store_fp8_input<FMT, 1>(fp8_halfs<FMT, 1>(lo), s0, s1, z0, z1, dst, ld);
    store_fp8_input<FMT, 2>(fp8_halfs<FMT, 0>(hi), s0, s1, z0, z1, dst, ld);
    store_fp8_input<FMT, 3>(fp8_halfs<FMT, 1>(hi), s0, s1, z0, z1, dst, ld);
  } else {  // lo: rows 0..7, hi: rows 8..15
    store_inputs<FMT, 0, 0, ipc>(lo, s0, z0, dst, ld);
    store_inputs<FMT, 1, 0, ipc>(hi, s1, z1, dst, ld);
  }
}

template <int64_t FMT>
AQ_AVX2 void dequant_blocks(const Layout& w, int64_t b0, int64_t b1, int64_t tile_b0, float* tile, int64_t ld) {
  constexpr int chunks = chunks_per_8<FMT>(), ipc = 8 / chunks;
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = w.packed + b * block_bytes;
    float* col = tile + (b - tile_b0) * 16;
    for (int64_t g = 0; g < w.ng; ++g) {
      const float* sg = w.scale + (b * w.ng + g) * 16;
      const __m256 s0 = _mm256_loadu_ps(sg), s1 = _mm256_loadu_ps(sg + 8);
      __m256 z0 = _mm256_set1_ps(code_shift<FMT>()), z1 = z0;
      if (w.zz != nullptr) {
        z0 = _mm256_add_ps(z0, _mm256_loadu_ps(w.zz + (b * w.ng + g) * 16));
        z1 = _mm256_add_ps(z1, _mm256_loadu_ps(w.zz + (b * w.ng + g) * 16 + 8));
      }
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += ipc, p += 64)
        store_chunk<FMT>(p, s0, s1, z0, z1, col + k * ld, ld);
    }
  }
}

inline void dequant_dispatch(const Layout& w, int64_t b0, int64_t b1, int64_t tile_b0, float* tile, int64_t ld) {
  switch (w.fmt) {
    case kInt4: return dequant_blocks<kInt4>(w, b0, b1, tile_b0, tile, ld);
    case kInt8: return dequant_blocks<kInt8>(w, b0, b1, tile_b0, tile, ld);
    case kFp8E4M3: return dequant_blocks<kFp8E4M3>(w, b0, b1, tile_b0, tile, ld);
    case kFp8E5M2: return dequant_blocks<kFp8E5M2>(w, b0, b1, tile_b0, tile, ld);
    case kFp8E4M3Finite: return dequant_blocks<kFp8E4M3Finite>(w, b0, b1, tile_b0, tile, ld);
    default: return dequant_blocks<kDecoded>(w, b0, b1, tile_b0, tile, ld);
  }
}

// The many-rows path without a GEMM call: for each block of 16 outputs, a chunk of at most
// kRowsChunk inputs at a time is dequantized once into an L1-resident [chunk, 16] fp32 scratch
// (dequant_blocks' values: the reference's fp32 weights), then every row of x runs over that
// scratch, kRowsR rows at a time with their 2 * kRowsR accumulators in registers. The decoding is
// paid once per block and chunk for all rows (the vector path pays it once per 4 rows; the tile
// path, which fp32 compute keeps, writes tiles of whole layers to memory at fp32 and reads them
// back through at::mm: 1.04-2.7x slower on one thread at 1-512 rows, 1.1-4.2x on two).
// Rows up to which the vector path beats the rows kernel (measured on Zen 3; the linear kernels
// choose by avx2.py's _GEMV_MAX_ROWS, the same crossover, the fused MoE call by this). int4 and
// 8-bit take the few-rows kernel at 2..kFewRowsMax rows instead; this bound is fp8's.
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kRowsChunk = 256;  // inputs per scratch fill: 16 KB, half of Zen 3's L1D
constexpr int kRowsR = 6;            // rows per register tile: 12 accumulators + 2 weights + 1 x
constexpr int64_t kRowsPanel = 64;   // rows whose x chunks stay in L2 while blocks stream by

// Inputs k0..k1 of block b (k0 % 8 == 0, k1 % 8 == 0) into scratch [k1 - k0, 16].
template <int64_t FMT>
AQ_AVX2 void dequant_chunk(const Layout& w, int64_t b, int64_t k0, int64_t k1, float* scratch) {
  constexpr int chunks = chunks_per_8<FMT>(), ipc = 8 / chunks;
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  const uint8_t* p = w.packed + b * block_bytes + k0 / ipc * 64;
  for (int64_t k = k0; k < k1;) {
    const int64_t g = k / w.group, end = std::min(k1, (g + 1) * w.group);
    const float* sg = w.scale + (b * w.ng + g) * 16;
    const __m256 s0 = _mm256_loadu_ps(sg), s1 = _mm256_loadu_ps(sg + 8);
    __m256 z0 = _mm256_set1_ps(code_shift<FMT>()), z1 = z0;
    if (w.zz != nullptr) {
      z0 = _mm256_add_ps(z0, _mm256_loadu_ps(w.zz + (b * w.ng + g) * 16));
      z1 = _mm256_add_ps(z1, _mm256_loadu_ps(w.zz + (b * w.ng + g) * 16 + 8));
    }
    for (; k < end; k += ipc, p += 64) store_chunk<FMT>(p, s0, s1, z0, z1, scratch + (k - k0) * 16, 16);
  }
}

// acc (rows m0..m0+R, [R][16] fp32) += x[m0.., k0..k0+len] times scratch [len, 16].
template <int R>
AQ_AVX2 void rows_tile(const float* x, int64_t kp, int64_t k0, int64_t len, const float* scratch, float* acc) {
  __m256 a[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    a[r][0] = _mm256_loadu_ps(acc + r * 16);
    a[r][1] = _mm256_loadu_ps(acc + r * 16 + 8);
  }
  const float* xr = x + k0;
  for (int64_t k = 0; k < len; ++k) {
    const __m256 w0 = _mm256_loadu_ps(scratch + k * 16), w1 = _mm256_loadu_ps(scratch + k * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xr + r * kp + k);
      a[r][0] = _mm256_fmadd_ps(w0, xb, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(w1, xb, a[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * 16, a[r][0]);
    _mm256_storeu_ps(acc + r * 16 + 8, a[r][1]);
  }
}

AQ_AVX2 inline void rows_tile_any(int64_t rows, const float* x, int64_t kp, int64_t k0, int64_t len,
                                  const float* scratch, float* acc) {
  switch (rows) {
    case 1: return rows_tile<1>(x, kp, k0, len, scratch, acc);
    case 2: return rows_tile<2>(x, kp, k0, len, scratch, acc);
    case 3: return rows_tile<3>(x, kp, k0, len, scratch, acc);
    case 4: return rows_tile<4>(x, kp, k0, len, scratch, acc);
    case 5: return rows_tile<5>(x, kp, k0, len, scratch, acc);
    default: return rows_tile<6>(x, kp, k0, len, scratch, acc);
  }
}

// Rows 0..rows of x against blocks b0..b1, panels of kRowsPanel rows (a panel's x is re-read
// for every block; the weights once per panel). x is a.x, or with x_bf16 rows of bf16 words
// widened here a panel at a time (a.x unused): widening a whole prompt at once writes
// rows * kp * 4 bytes of fresh memory (40 MB for the 896x4864 down projection at 2048 rows), whose
// page faults alone cost ~9 % of the call on Zen 3, and the panel is then read back from L2.
template <int64_t FMT>
AQ_AVX2 void rows_blocks(const Args& a, int64_t rows, int64_t b0, int64_t b1, const int16_t* x_bf16) {
  const Layout& w = a.w;
  alignas(64) float scratch[kRowsChunk * 16];
  alignas(64) float acc[kRowsPanel * 16];
  std::vector<float> widened(x_bf16 != nullptr ? static_cast<size_t>(std::min(kRowsPanel, rows) * w.kp) : 0);
  for (int64_t p0 = 0; p0 < rows; p0 += kRowsPanel) {
    const int64_t prows = std::min(kRowsPanel, rows - p0);
    const float* xp = a.x + p0 * w.kp;
    if (x_bf16 != nullptr) {
      widen_bf16(x_bf16 + p0 * w.kp, widened.data(), prows * w.kp);
      xp = widened.data();
    }
    for (int64_t b = b0; b < b1; ++b) {
      std::memset(acc, 0, sizeof(float) * static_cast<size_t>(prows * 16));
      for (int64_t k0 = 0; k0 < w.kp; k0 += kRowsChunk) {
        const int64_t len = std::min(kRowsChunk, w.kp - k0);
        dequant_chunk<FMT>(w, b, k0, k0 + len, scratch);
        for (int64_t m = 0; m < prows; m += kRowsR)
          rows_tile_any(std::min<int64_t>(kRowsR, prows - m), xp + m * w.kp, w.kp, k0, len, scratch, acc + m * 16);
      }
      for (int h = 0; h < 2; ++h) {
        const int64_t col = b * 16 + 8 * h;
        const int64_t valid = std::min<int64_t>(8, w.n - col);
        const __m256 bias = a.bias ? load_partial(a.bias + col, valid) : _mm256_setzero_ps();
        for (int64_t m = 0; m < prows; ++m) {
          const __m256 y = _mm256_add_ps(_mm256_loadu_ps(acc + m * 16 + 8 * h), bias);
          const int64_t dst = (p0 + m) * a.out_stride + col - a.col_shift;
          if (a.out_bf16) {
            store_bf16(static_cast<int16_t*>(a.out) + dst, y, valid);
          } else {
            store_f32(static_cast<float*>(a.out) + dst, y, valid);
          }
        }
      }
    }
  }
}

inline void rows_dispatch(const Args& a, int64_t rows, int64_t b0, int64_t b1, const int16_t* x_bf16 = nullptr) {
  switch (a.w.fmt) {
    case kInt4: return rows_blocks<kInt4>(a, rows, b0, b1, x_bf16);
    case kInt8: return rows_blocks<kInt8>(a, rows, b0, b1, x_bf16);
    case kFp8E4M3: return rows_blocks<kFp8E4M3>(a, rows, b0, b1, x_bf16);
    case kFp8E5M2: return rows_blocks<kFp8E5M2>(a, rows, b0, b1, x_bf16);
    case kFp8E4M3Finite: return rows_blocks<kFp8E4M3Finite>(a, rows, b0, b1, x_bf16);
    default: return rows_blocks<kDecoded>(a, rows, b0, b1, x_bf16);
  }
}

}  // namespace avx2
}  // namespace
