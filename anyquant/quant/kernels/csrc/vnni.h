// AVX512-VNNI block kernels (vpdpbusd): integer weight blocks times int8 activation rows.
// Included by cpu_vnni.cpp (linear layers) and cpu_moe_vnni.cpp (fused MoE experts on int8
// activations), so both run the same kernels on the same layout.
//
// Layout, built by anyquant/quant/kernels/avx512_vnni.py at load. Weights are unsigned byte codes
// c (int4 nibbles 0..15, uint8 as stored, int8 as code + 128) with w = (c - zero) * scale per
// (row, group of G inputs). Rows go 16 to a block; inside a block the inputs run in chunks of 64
// bytes, which is vpdpbusd's operand for 16 rows x 4 inputs (lane i sums 4 products):
//   8-bit: one chunk per 4 inputs, byte 4i + j = c(row i, k + j);
//   4-bit: one chunk per 8 inputs, byte 4i + j = c(row i, k + j) | c(row i, k + 4 + j) << 4, so
//          `v & 0x0F` is the 8-bit chunk of inputs k..k+3 and `v & 0xF0` 16 times that of k+4..k+7
//          (summed in its own accumulator and divided by 16 exactly at the group's end).
// Scales are fp32 [blocks, groups, 16]; zero points int32 in the same shape, or one constant for
// the layer (int4 sym 8, int8 128, ...); optional float offsets (GGUF k-quants: w = c * scale +
// offset) fp32 in the same shape.
//
// Activations are quantized per call, per row of x: q = round(x / s) clamped to [-128, 127],
// s = amax / divisor (dynamic) or a static per-tensor scale, exactly as the reference's
// fake_quantize_activations does. Per group the int32 dot product sum c * q is exact, the zero
// point comes off in int32 (zero * sum q), and one fp32 fma applies the group's scale:
//   y = s_x * sum_g scale_g * (dot_g - zero_g * qsum_g) [+ offset_g * qsum_g] + bias.
// int32 is exact while a group spans at most 65536 inputs (255 * 128 * 65536 < 2^31).
//
// Few rows (<= 4): each block is streamed from memory once per call and unpacked in registers.
// More rows: each block is unpacked once per 64 rows of x into an 8-bit chunk buffer (L1), and
// rows run 8 at a time: one 64-byte weight load feeds 8 vpdpbusd with broadcast activations.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#define AQ_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,avx2")))

namespace {

enum VFmt : int64_t { kV4 = 0, kV8 = 1 };

struct VLayout {
  const uint8_t* packed;  // [blocks, chunks, 64]
  const float* scale;     // [blocks, ng, 16]
  const int32_t* zero;    // [blocks, ng, 16] or nullptr: then `zconst` for every weight
  const float* offset;    // [blocks, ng, 16] or nullptr
  int32_t zconst;
  int64_t fmt, kp, group, ng, blocks, n;
  int64_t block_bytes() const { return kp * (fmt == kV4 ? 8 : 16); }
};

// The shape part of a layout: `blocks` of 16 rows, `ng` groups of `group` inputs, `n` real rows;
// the caller points it at its tensors.
inline VLayout vlayout_shape(int64_t fmt, int64_t blocks, int64_t ng, int64_t group, int64_t n) {
  VLayout w{};
  w.fmt = fmt;
  w.blocks = blocks;
  w.ng = ng;
  w.group = group;
  w.kp = ng * group;
  w.n = n;
  return w;
}

// A layout over the op's tensors (vnni_linear, avx2_a8_linear), every shape and dtype checked.
inline VLayout checked_vlayout(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                               int64_t zconst, const c10::optional<at::Tensor>& offset, int64_t fmt, int64_t group,
                               int64_t n) {
  TORCH_CHECK(fmt == kV4 || fmt == kV8, "unknown weight format ", fmt);
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte, "packed weights must be contiguous uint8");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.dim() == 3 && scale.size(2) == 16,
              "scales must be contiguous float32 [blocks, groups, 16]");
  TORCH_CHECK(group > 0 && group % 8 == 0 && group <= 65536, "group must be a multiple of 8 up to 65536");
  VLayout w = vlayout_shape(fmt, scale.size(0), scale.size(1), group, n);
  TORCH_CHECK(n > 0 && n <= w.blocks * 16, "n out of range");
  TORCH_CHECK(packed.numel() == w.blocks * w.block_bytes(), "packed weights have the wrong size");
  w.packed = packed.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<float>();
  w.zero = nullptr;
  w.offset = nullptr;
  w.zconst = static_cast<int32_t>(zconst);
  if (zero.has_value()) {
    TORCH_CHECK(zero->is_contiguous() && zero->scalar_type() == at::kInt && zero->sizes() == scale.sizes(),
                "zero points must be int32 shaped like the scales");
    w.zero = zero->data_ptr<int32_t>();
  }
  if (offset.has_value()) {
    TORCH_CHECK(offset->is_contiguous() && offset->scalar_type() == at::kFloat && offset->sizes() == scale.sizes(),
                "offsets must be float32 shaped like the scales");
    w.offset = offset->data_ptr<float>();
  }
  return w;
}

struct QAct {
  const int8_t* q;     // [rows, kp], zero padded
  const int32_t* sum;  // [rows, ng] sum of q per group
  const float* sx;     // [rows] activation scale per row
};

struct Out {
  void* ptr;  // [rows, ld], fp32 or bf16: block b's 16 columns land at b * 16 - col_shift
  bool bf16;
  const float* bias;  // [n] or nullptr
  int64_t ld = 0;         // row stride in elements; 0: n (the layer's own [rows, n] output)
  int64_t col_shift = 0;  // subtracted from every output column (a scratch window of blocks)
};

AQ_VNNI inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Apply group g's zero point, offset and scale to the exact dot products of rows m0..m0+M.
template <int M>
AQ_VNNI inline void group_epilogue(const VLayout& w, const QAct& a, int64_t b, int64_t g, int64_t m0,
                                   const __m512i* dot, __m512* out) {
  const int64_t at = (b * w.ng + g) * 16;
  const __m512 s = _mm512_loadu_ps(w.scale + at);
  const __m512i z = w.zero ? _mm512_loadu_si512(w.zero + at) : _mm512_setzero_si512();
  for (int m = 0; m < M; ++m) {
    const int32_t qsum = a.sum[(m0 + m) * w.ng + g];
    __m512i d;
    if (w.zero) {
      d = _mm512_sub_epi32(dot[m], _mm512_mullo_epi32(z, _mm512_set1_epi32(qsum)));
    } else {
      d = _mm512_sub_epi32(dot[m], _mm512_set1_epi32(w.zconst * qsum));
    }
    out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, out[m]);
    if (w.offset) out[m] = _mm512_fmadd_ps(_mm512_loadu_ps(w.offset + at), _mm512_set1_ps(float(qsum)), out[m]);
  }
}

template <int M>
AQ_VNNI inline void store_rows(const VLayout& w, const QAct& a, const Out& o, int64_t b, int64_t m0, const __m512* out) {
  const int64_t col = b * 16;
  const int64_t valid = std::min<int64_t>(16, w.n - col);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 bias = o.bias ? _mm512_maskz_loadu_ps(mask, o.bias + col) : _mm512_setzero_ps();
  const int64_t ld = o.ld > 0 ? o.ld : w.n;
  for (int m = 0; m < M; ++m) {
    const __m512 y = _mm512_fmadd_ps(out[m], _mm512_set1_ps(a.sx[m0 + m]), bias);
    if (o.bf16) {
      auto* dst = static_cast<int16_t*>(o.ptr) + (m0 + m) * ld + col - o.col_shift;
      _mm256_mask_storeu_epi16(dst, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(o.ptr) + (m0 + m) * ld + col - o.col_shift, mask, y);
    }
  }
}

// One chunk of inputs (8 of them) for rows 0..M: acc[m][2u], acc[m][2u + 1] += its two halves.
template <int64_t FMT, int M, int A>
AQ_VNNI inline void chunk8(const uint8_t* p, const int8_t* x, int64_t ldx, int u, __m512i (&acc)[M][A]) {
  __m512i v0, v1;
  if constexpr (FMT == kV4) {
    const __m512i v = _mm512_loadu_si512(p);
    v0 = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
    v1 = _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(0xF0)));  // 16 x the codes
  } else {
    v0 = _mm512_loadu_si512(p);
    v1 = _mm512_loadu_si512(p + 64);
  }
  for (int m = 0; m < M; ++m) {
    acc[m][2 * u] = _mm512_dpbusd_epi32(acc[m][2 * u], v0, bcast4(x + m * ldx));
    acc[m][2 * u + 1] = _mm512_dpbusd_epi32(acc[m][2 * u + 1], v1, bcast4(x + m * ldx + 4));
  }
}

// Rows m0..m0+M (M <= 4) against blocks b0..b1, weights unpacked in registers. U chunks of 8
// inputs per iteration so that 2 * U * M dot products are in flight (vpdpbusd's latency would
// otherwise bound one row: measured 1.6x on a hot 1152 x 896 layer with U = 4 against U = 1).
template <int64_t FMT, int M>
AQ_VNNI void gemv_vnni(const VLayout& w, const QAct& a, const Out& o, int64_t m0, int64_t b0, int64_t b1) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
  constexpr int64_t kChunk = FMT == kV4 ? 64 : 128;  // bytes per 8 inputs of 16 rows
  const int64_t group_bytes = w.group / 8 * kChunk;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* pb = w.packed + b * w.block_bytes();
    _mm_prefetch(reinterpret_cast<const char*>(pb + w.block_bytes()), _MM_HINT_T0);
    __m512 out[M];
    for (int m = 0; m < M; ++m) out[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w.ng; ++g) {
      const uint8_t* p = pb + g * group_bytes;
      const int8_t* x = a.q + m0 * w.kp + g * w.group;
      __m512i acc[M][2 * U];
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 2 * U; ++i) acc[m][i] = _mm512_setzero_si512();
      int64_t k = 0;
      for (; k + 8 * U <= w.group; k += 8 * U, p += U * kChunk)
        for (int u = 0; u < U; ++u) chunk8<FMT, M, 2 * U>(p + u * kChunk, x + k + 8 * u, w.kp, u, acc);
      for (; k < w.group; k += 8, p += kChunk) chunk8<FMT, M, 2 * U>(p, x + k, w.kp, 0, acc);
      __m512i dot[M];
      for (int m = 0; m < M; ++m) {
        __m512i lo = acc[m][0], hi = acc[m][1];
        for (int u = 1; u < U; ++u) {
          lo = _mm512_add_epi32(lo, acc[m][2 * u]);
          hi = _mm512_add_epi32(hi, acc[m][2 * u + 1]);
        }
        dot[m] = FMT == kV4 ? _mm512_add_epi32(lo, _mm512_srai_epi32(hi, 4)) : _mm512_add_epi32(lo, hi);
      }
      group_epilogue<M>(w, a, b, g, m0, dot, out);
    }
    store_rows<M>(w, a, o, b, m0, out);
  }
}

// Rows m0..m0+M (M <= 8) against one block whose codes are 8-bit chunks at `codes`.
template <int M>
AQ_VNNI void tile_vnni(const VLayout& w, const uint8_t* codes, const QAct& a, const Out& o, int64_t m0, int64_t b) {
  __m512 out[M];
  for (int m = 0; m < M; ++m) out[m] = _mm512_setzero_ps();
  const int8_t* x = a.q + m0 * w.kp;
  for (int64_t g = 0; g < w.ng; ++g) {
    const uint8_t* p = codes + g * w.group * 16;
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    const int64_t k0 = g * w.group;
    for (int64_t k = k0; k < k0 + w.group; k += 4, p += 64) {
      const __m512i v = _mm512_loadu_si512(p);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbusd_epi32(acc[m], v, bcast4(x + m * w.kp + k));
    }
    group_epilogue<M>(w, a, b, g, m0, acc, out);
  }
  store_rows<M>(w, a, o, b, m0, out);
}

inline void tile_rows(const VLayout& w, const uint8_t* codes, const QAct& a, const Out& o, int64_t m0, int64_t rows, int64_t b) {
  switch (rows) {
    case 1: return tile_vnni<1>(w, codes, a, o, m0, b);
    case 2: return tile_vnni<2>(w, codes, a, o, m0, b);
    case 3: return tile_vnni<3>(w, codes, a, o, m0, b);
    case 4: return tile_vnni<4>(w, codes, a, o, m0, b);
    case 5: return tile_vnni<5>(w, codes, a, o, m0, b);
    case 6: return tile_vnni<6>(w, codes, a, o, m0, b);
    case 7: return tile_vnni<7>(w, codes, a, o, m0, b);
    default: return tile_vnni<8>(w, codes, a, o, m0, b);
  }
}

template <int64_t FMT>
void gemv_rows(const VLayout& w, const QAct& a, const Out& o, int64_t rows, int64_t b0, int64_t b1) {
  switch (rows) {
    case 1: return gemv_vnni<FMT, 1>(w, a, o, 0, b0, b1);
    case 2: return gemv_vnni<FMT, 2>(w, a, o, 0, b0, b1);
    case 3: return gemv_vnni<FMT, 3>(w, a, o, 0, b0, b1);
    default: return gemv_vnni<FMT, 4>(w, a, o, 0, b0, b1);
  }
}

// The 4-bit block b unpacked into 8-bit chunks (kp / 4 chunks of 64 bytes).
AQ_VNNI void unpack_block(const VLayout& w, int64_t b, uint8_t* dst) {
  const uint8_t* p = w.packed + b * w.block_bytes();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t k = 0; k < w.kp; k += 8, p += 64, dst += 128) {
    const __m512i v = _mm512_loadu_si512(p);
    _mm512_storeu_si512(dst, _mm512_and_si512(v, mask));
    _mm512_storeu_si512(dst + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
  }
}

// Quantize row m of x (K valid inputs of kp) to int8 as the reference does; fills q, sum, sx.
template <typename T>
AQ_VNNI void quantize_row(const T* x, int64_t K, int64_t kp, int64_t group, double divisor, float static_scale,
                          const float* amax, int8_t* q, int32_t* sum, float* sx) {
  std::vector<float> xf(static_cast<size_t>(K));
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
    const float a = std::fabs(xf[k]);
    finite = finite && a <= 3.4e38f;  // false for inf and NaN
    mx = std::max(mx, a);
  }
  float scale;
  if (static_scale > 0) {
    scale = static_scale;
  } else {
    if (amax) mx = *amax;
    scale = std::max(mx, 1e-10f) / static_cast<float>(divisor);
  }
  // A non-finite input makes the whole output row NaN (the reference's is too, except that with a
  // static scale it clamps inf to the largest code), so the engine's non-finite checks still see
  // an overflow upstream instead of quantized garbage.
  *sx = finite ? scale : std::numeric_limits<float>::quiet_NaN();
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // x / s rounded half to even (the MXCSR default), as torch.round
    const __m512i r = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xf.data() + k), vs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(r));
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
}

inline bool vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
}

}  // namespace
