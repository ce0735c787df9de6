#pragma once

// Integer weights times int8 activations on AVX2 CPUs (no AVX-512, no VNNI): W4A8 / W8A8 linear
// layers over the layout vnni.h describes (the same bytes, packed once by avx512_vnni.py), with
// the activations quantized per call exactly as vnni.h's quantize_row (and the reference) does.
// Included by cpu_a8_avx2.cpp (linear layers) and cpu_moe_avx2_a8.cpp (fused MoE experts on int8
// activations), so both run the same kernels on the same layout.
//
// AVX2 has no vpdpbusd; its integer dot products are vpmaddubsw (u8 x s8 -> pairs summed into
// *saturating* int16) and vpmaddwd (s16 x s16 -> pairs summed into int32, exact). A 64-byte chunk
// of a 16-row block is two 256-bit halves, rows 0..7 and rows 8..15, and 32-bit lane i of a half
// holds 4 consecutive inputs of row i, so every product lands in the lane of its row:
//   4-bit codes (c <= 15): `v & 0x0F` and `(v >> 4) & 0x0F` are the u8 codes of inputs k..k+3 and
//     k+4..k+7 (vnni.h's nibble layout); vpmaddubsw against the broadcast 4 int8 activations
//     gives pair sums |c0 q0 + c1 q1| <= 15 * 128 * 2 = 3840, never saturating, and four steps
//     (32 inputs, two vpmaddubsw each) sum to at most 30720 < 32767 in int16 before they widen
//     into the int32 group sums. Every sum is exact.
//   8-bit codes (c <= 255, int8 stored as code + 128): vpmaddubsw could saturate (255 * 127 * 2 >
//     32767), so the codes widen to int16 in registers: `v & 0x00FF` per 16-bit word holds inputs
//     k and k+2 of the lane's row, `v >> 8` inputs k+1 and k+3, and vpmaddwd multiplies them by
//     the activations as int16 pairs stored (k, k+2, k+1, k+3) per 4 inputs (`q16`). Exact, at
//     half the products per instruction of the 4-bit path.
// Zero points, offsets and scales then apply per group exactly as in vnni.h:
//   y = s_x * sum_g scale_g * (dot_g - zero_g * qsum_g) [+ offset_g * qsum_g] + bias.
//
// Rows of x go kA8Rows at a time against one block (their accumulators in registers: 2 per row
// for the int16 or int32 sums), blocks split among threads. Few rows (<= kA8Rows) stream each
// block from memory once, 4-bit codes unpacked in registers; more rows take each block through
// every tile of rows of a panel of kA8Panel rows, whose int8 x stays in L2 while the blocks go
// by: 8-bit blocks as they are, 4-bit ones unpacked once per panel into 8-bit chunks (kp * 16
// bytes, L1/L2) that tiles of kA8UnpackedRows rows read.
//
// Only functions marked AQ_A8 contain AVX2 code, so the library still loads on any x86-64 CPU;
// the Python side (avx2_a8.py) refuses where the CPU lacks the instructions.

#include "gemv_avx2.h"
#include "vnni.h"

#define AQ_A8 __attribute__((target("avx2,fma,f16c")))

namespace {
namespace a8 {

constexpr int kA8Rows = 4;        // rows of x per register tile (2 accumulators each + 4 weights)
constexpr int kA8UnpackedRows = 5;  // the same over unpacked 4-bit blocks (2 weights; see tile4u)
constexpr int64_t kA8Panel = 64;  // rows whose int8 x stays in L2 while a thread's blocks stream
constexpr int64_t kSpan4 = 32;    // 4-bit inputs summed in int16 before widening (see above)

struct Act {
  const int8_t* q;     // [rows, kp] int8, zero padded
  const int16_t* q16;  // [rows, kp] the same as int16, each 4 inputs ordered (0, 2, 1, 3); 8-bit only
  const int32_t* sum;  // [rows, ng] sum of q per group
  const float* sx;     // [rows] activation scale per row
};

AQ_A8 inline __m256i bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The two int16 halves of each 32-bit lane summed as int32: what vpmaddwd with ones gives, on the
// ALU ports (vpmaddwd and vpmaddubsw share the multiply port that bounds the loops below).
AQ_A8 inline __m256i widen_pairs(__m256i v) {
  return _mm256_add_epi32(_mm256_srai_epi32(v, 16), _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16));
}

// The end of a span of at most kSpan4 4-bit inputs (tile4, tile4u): its exact int16 sums acc
// widened into the group's int32 sums dot, before they could saturate.
template <int R>
AQ_A8 inline void add_span(const __m256i (&acc)[R][2], __m256i (&dot)[R][2]) {
  for (int m = 0; m < R; ++m)
    for (int h = 0; h < 2; ++h) dot[m][h] = _mm256_add_epi32(dot[m][h], widen_pairs(acc[m][h]));
}

// Group g's exact dot products dot[m][h] (rows m0 + m, outputs 8h..8h+7 of block b) with its zero
// point, offset and scale applied into out[m][h].
template <int R>
AQ_A8 inline void group_epilogue(const VLayout& w, const Act& a, int64_t b, int64_t g, int64_t m0,
                                 const __m256i (&dot)[R][2], __m256 (&out)[R][2]) {
  const int64_t at = (b * w.ng + g) * 16;
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_loadu_ps(w.scale + at + 8 * h);
    const __m256i z = w.zero ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.zero + at + 8 * h))
                             : _mm256_set1_epi32(w.zconst);
    for (int m = 0; m < R; ++m) {
      const int32_t qsum = a.sum[(m0 + m) * w.ng + g];
      const __m256i d = _mm256_sub_epi32(dot[m][h], _mm256_mullo_epi32(z, _mm256_set1_epi32(qsum)));
      out[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, out[m][h]);
      if (w.offset)
        out[m][h] = _mm256_fmadd_ps(_mm256_loadu_ps(w.offset + at + 8 * h), _mm256_set1_ps(float(qsum)), out[m][h]);
    }
  }
}

// y = out * s_x + bias for rows m0..m0+R of block b, rounded to the output's dtype.
template <int R>
AQ_A8 inline void store_block(const VLayout& w, const Act& a, const Out& o, int64_t b, int64_t m0,
                              const __m256 (&out)[R][2]) {
  const int64_t ld = o.ld > 0 ? o.ld : w.n;
  for (int h = 0; h < 2; ++h) {
    const int64_t col = b * 16 + 8 * h;
    const int64_t valid = std::min<int64_t>(8, w.n - col);
    if (valid <= 0) continue;
    const __m256 bias = o.bias ? avx2::load_partial(o.bias + col, valid) : _mm256_setzero_ps();
    for (int m = 0; m < R; ++m) {
      const __m256 y = _mm256_fmadd_ps(out[m][h], _mm256_set1_ps(a.sx[m0 + m]), bias);
      const int64_t dst = (m0 + m) * ld + col - o.col_shift;
      if (o.bf16) {
        avx2::store_bf16(static_cast<int16_t*>(o.ptr) + dst, y, valid);
      } else {
        avx2::store_f32(static_cast<float*>(o.ptr) + dst, y, valid);
      }
    }
  }
}

// Rows m0..m0+R against 4-bit block b.
template <int R>
AQ_A8 void tile4(const VLayout& w, const Act& a, const Out& o, int64_t m0, int64_t b) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const uint8_t* pb = w.packed + b * w.block_bytes();
  const int8_t* x = a.q + m0 * w.kp;
  __m256 out[R][2];
  for (int m = 0; m < R; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.ng; ++g) {
    __m256i dot[R][2];
    for (int m = 0; m < R; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
    const int64_t g1 = (g + 1) * w.group;
    for (int64_t k0 = g * w.group; k0 < g1; k0 += kSpan4) {
      const int64_t k1 = std::min(g1, k0 + kSpan4);
      __m256i acc[R][2];
      for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k1; k += 8) {
        const uint8_t* p = pb + k * 8;  // 64 bytes per 8 inputs
        _mm_prefetch(reinterpret_cast<const char*>(p) + avx2::kPrefetchBytes, _MM_HINT_T0);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        const __m256i lo0 = _mm256_and_si256(v0, nib), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib);
        const __m256i lo1 = _mm256_and_si256(v1, nib), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib);
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m) {
          const __m256i xa = bcast4(x + m * w.kp + k), xb = bcast4(x + m * w.kp + k + 4);
          acc[m][0] = _mm256_add_epi16(
              acc[m][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa), _mm256_maddubs_epi16(hi0, xb)));
          acc[m][1] = _mm256_add_epi16(
              acc[m][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa), _mm256_maddubs_epi16(hi1, xb)));
        }
      }
      add_span<R>(acc, dot);
    }
    group_epilogue<R>(w, a, b, g, m0, dot, out);
  }
  store_block<R>(w, a, o, b, m0, out);
}

// Rows m0..m0+R against 8-bit block b.
template <int R>
AQ_A8 void tile8(const VLayout& w, const Act& a, const Out& o, int64_t m0, int64_t b) {
  const __m256i low = _mm256_set1_epi16(0x00FF);
  const uint8_t* pb = w.packed + b * w.block_bytes();
  const int16_t* x = a.q16 + m0 * w.kp;
  __m256 out[R][2];
  for (int m = 0; m < R; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.ng; ++g) {
    __m256i dot[R][2];
    for (int m = 0; m < R; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
    for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 4) {
      const uint8_t* p = pb + k * 16;  // 64 bytes per 4 inputs
      _mm_prefetch(reinterpret_cast<const char*>(p) + avx2::kPrefetchBytes, _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      const __m256i e0 = _mm256_and_si256(v0, low), o0 = _mm256_srli_epi16(v0, 8);
      const __m256i e1 = _mm256_and_si256(v1, low), o1 = _mm256_srli_epi16(v1, 8);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) {
        const __m256i xe = bcast4(x + m * w.kp + k), xo = bcast4(x + m * w.kp + k + 2);
        dot[m][0] = _mm256_add_epi32(dot[m][0], _mm256_add_epi32(_mm256_madd_epi16(e0, xe), _mm256_madd_epi16(o0, xo)));
        dot[m][1] = _mm256_add_epi32(dot[m][1], _mm256_add_epi32(_mm256_madd_epi16(e1, xe), _mm256_madd_epi16(o1, xo)));
      }
    }
    group_epilogue<R>(w, a, b, g, m0, dot, out);
  }
  store_block<R>(w, a, o, b, m0, out);
}

// The 4-bit block b as 8-bit code chunks (kp / 4 chunks of 64 bytes: vnni.h's 8-bit layout).
AQ_A8 void unpack_block4(const VLayout& w, int64_t b, uint8_t* dst) {
  const uint8_t* p = w.packed + b * w.block_bytes();
  const __m256i nib = _mm256_set1_epi8(0x0F);
  for (int64_t k = 0; k < w.kp; k += 8, p += 64, dst += 128) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * h), _mm256_and_si256(v, nib));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 + 32 * h),
                          _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
    }
  }
}

// Rows m0..m0+R against block b unpacked by unpack_block4 (`codes`): no unpacking in the loop, so
// 2R int16 accumulators + 2 weights + 1 activation fit in registers for R up to 5 (the in-register
// unpacking of tile4 holds 4 weights and a mask more and spills beyond 3 rows).
template <int R>
AQ_A8 void tile4u(const VLayout& w, const uint8_t* codes, const Act& a, const Out& o, int64_t m0, int64_t b) {
  const int8_t* x = a.q + m0 * w.kp;
  __m256 out[R][2];
  for (int m = 0; m < R; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.ng; ++g) {
    __m256i dot[R][2];
    for (int m = 0; m < R; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
    const int64_t g1 = (g + 1) * w.group;
    for (int64_t k0 = g * w.group; k0 < g1; k0 += kSpan4) {
      const int64_t k1 = std::min(g1, k0 + kSpan4);
      __m256i acc[R][2];
      for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k1; k += 4) {  // 8 steps of one vpmaddubsw per accumulator (<= 3840 each)
        const uint8_t* p = codes + k * 16;
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
#pragma GCC unroll 5
        for (int m = 0; m < R; ++m) {
          const __m256i xb = bcast4(x + m * w.kp + k);
          acc[m][0] = _mm256_add_epi16(acc[m][0], _mm256_maddubs_epi16(w0, xb));
          acc[m][1] = _mm256_add_epi16(acc[m][1], _mm256_maddubs_epi16(w1, xb));
        }
      }
      add_span<R>(acc, dot);
    }
    group_epilogue<R>(w, a, b, g, m0, dot, out);
  }
  store_block<R>(w, a, o, b, m0, out);
}

inline void tile4u_any(const VLayout& w, const uint8_t* codes, const Act& a, const Out& o, int64_t m0, int64_t rows,
                       int64_t b) {
  static_assert(kA8UnpackedRows == 5, "the switch below covers 1..5 rows");
  switch (rows) {
    case 1: return tile4u<1>(w, codes, a, o, m0, b);
    case 2: return tile4u<2>(w, codes, a, o, m0, b);
    case 3: return tile4u<3>(w, codes, a, o, m0, b);
    case 4: return tile4u<4>(w, codes, a, o, m0, b);
    default: return tile4u<5>(w, codes, a, o, m0, b);
  }
}

template <int64_t FMT, int R>
void tile(const VLayout& w, const Act& a, const Out& o, int64_t m0, int64_t b) {
  if constexpr (FMT == kV4) {
    tile4<R>(w, a, o, m0, b);
  } else {
    tile8<R>(w, a, o, m0, b);
  }
}

// Rows m0..m0 + rows (at most kA8Rows) against block b.
template <int64_t FMT>
void tile_any(const VLayout& w, const Act& a, const Out& o, int64_t m0, int64_t rows, int64_t b) {
  static_assert(kA8Rows == 4, "the switch below covers 1..4 rows");
  switch (rows) {
    case 1: return tile<FMT, 1>(w, a, o, m0, b);
    case 2: return tile<FMT, 2>(w, a, o, m0, b);
    case 3: return tile<FMT, 3>(w, a, o, m0, b);
    default: return tile<FMT, 4>(w, a, o, m0, b);
  }
}

// Bytes of the scratch `blocks` needs per thread: one 4-bit block unpacked (unpack_block4).
inline size_t blocks_scratch_bytes(int64_t kp) { return static_cast<size_t>(kp * 16); }

// All rows of x against blocks b0..b1 (one thread's share); `codes`: blocks_scratch_bytes(kp).
template <int64_t FMT>
void blocks(const VLayout& w, const Act& a, const Out& o, int64_t rows, int64_t b0, int64_t b1, uint8_t* codes) {
  if (FMT == kV4 && rows > kA8Rows) {
    for (int64_t p0 = 0; p0 < rows; p0 += kA8Panel) {
      const int64_t p1 = std::min(rows, p0 + kA8Panel);
      for (int64_t b = b0; b < b1; ++b) {
        unpack_block4(w, b, codes);
        for (int64_t m = p0; m < p1; m += kA8UnpackedRows)
          tile4u_any(w, codes, a, o, m, std::min<int64_t>(kA8UnpackedRows, p1 - m), b);
      }
    }
    return;
  }
  for (int64_t p0 = 0; p0 < rows; p0 += kA8Panel) {
    const int64_t p1 = std::min(rows, p0 + kA8Panel);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m = p0; m < p1; m += kA8Rows) tile_any<FMT>(w, a, o, m, std::min<int64_t>(kA8Rows, p1 - m), b);
  }
}

// All rows of x against blocks b0..b1 in w's format.
inline void blocks_any(const VLayout& w, const Act& a, const Out& o, int64_t rows, int64_t b0, int64_t b1,
                       uint8_t* codes) {
  if (w.fmt == kV4) return blocks<kV4>(w, a, o, rows, b0, b1, codes);
  return blocks<kV8>(w, a, o, rows, b0, b1, codes);
}

// The int16 copy of n int8 codes (n a multiple of 4) that tile8 multiplies: each 4 inputs
// ordered (0, 2, 1, 3), so that one 16-bit word's low and high bytes of the 8-bit codes meet
// inputs k, k + 2 and k + 1, k + 3 (see the top of this file).
inline void widen_codes(const int8_t* q, int64_t n, int16_t* q16) {
  for (int64_t i = 0; i < n; i += 4) {
    q16[i] = q[i];
    q16[i + 1] = q[i + 2];
    q16[i + 2] = q[i + 1];
    q16[i + 3] = q[i + 3];
  }
}

// Row x (K valid inputs of kp) quantized to int8 as the reference's fake_quantize_activations
// does (vnni.h's quantize_row: the same fp32 division, round half to even, clamp to [-128, 127]);
// fills q, the group sums, the row's scale and, when q16 is given, the int16 copy for 8-bit codes.
template <typename T>
AQ_A8 void quantize_row(const T* x, int64_t K, int64_t kp, int64_t group, double divisor, float static_scale,
                        const float* amax, int8_t* q, int32_t* sum, float* sx, int16_t* q16, float* xf) {
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (sizeof(T) == 2) {
      uint32_t bits = static_cast<uint32_t>(static_cast<uint16_t>(x[k])) << 16;
      std::memcpy(&xf[k], &bits, 4);
    } else {
      xf[k] = x[k];
    }
  }
  float mx = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::fabs(xf[k]);
    finite = finite && v <= 3.4e38f;  // false for inf and NaN
    mx = std::max(mx, v);
  }
  float scale;
  if (static_scale > 0) {
    scale = static_scale;
  } else {
    if (amax) mx = *amax;
    scale = std::max(mx, 1e-10f) / static_cast<float>(divisor);
  }
  // A non-finite input makes the whole output row NaN, as in vnni.h.
  *sx = finite ? scale : std::numeric_limits<float>::quiet_NaN();
  const __m256 vs = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    // Clamping before rounding gives the reference's clamp(round(x / s)): the bounds are integers.
    const __m256 r = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(xf + k), vs), lo), hi);
    const __m256i i = _mm256_cvtps_epi32(r);  // half to even (the MXCSR default), as torch.round
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w16, w16));
  }
  for (; k < K; ++k) {
    const float r = std::nearbyint(xf[k] / scale);
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, r)));
  }
  std::memset(q + K, 0, static_cast<size_t>(kp - K));
  for (int64_t g = 0; g < kp / group; ++g) {
    int32_t s = 0;
    for (int64_t i = g * group; i < (g + 1) * group; ++i) s += q[i];
    sum[g] = s;
  }
  if (q16) widen_codes(q, kp, q16);
}

}  // namespace a8
}  // namespace
