// Weight-only quantized linear layers for AVX-512 CPUs with AVX512_BF16: the matrix-vector
// path, the register-blocked GEMM path (many rows of bf16 x), the dequantized-tile path and a
// whole-layer dequantization. The weight layout and the vector core are described and defined in
// gemv.h, the GEMM in gemm_tile.h.

#include "gemm_tile.h"

namespace {

// x (bf16 or fp32) [M, kp] -> y [M, n] in x's dtype. fp32 x is split into three bf16 parts
// (hi + mid + lo carries 24 significant bits), each multiplied exactly against the bf16-exact
// weight values and summed in fp32, so fp32 compute keeps fp32 accuracy.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                const c10::optional<at::Tensor>& zz, const at::Tensor& lut, const c10::optional<at::Tensor>& bias,
                int64_t fmt, int64_t group, int64_t n) {
  const Layout w = make_layout(packed, scale, zz, lut, fmt, group, n);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.kp, "x must be [M, ", w.kp, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  const int64_t m = x.size(0);
  const bool split = x.scalar_type() == at::kFloat;
  at::Tensor xb;
  if (split) {
    const at::Tensor xf = x.contiguous();
    const at::Tensor hi = xf.to(at::kBFloat16);
    const at::Tensor r1 = xf - hi.to(at::kFloat);
    const at::Tensor mid = r1.to(at::kBFloat16);
    const at::Tensor lo = (r1 - mid.to(at::kFloat)).to(at::kBFloat16);
    xb = at::stack({hi, mid, lo}, 1).reshape({3 * m, w.kp});
  } else {
    xb = x.contiguous();
  }
  const int64_t rows = xb.size(0);
  const auto* xw = reinterpret_cast<const int16_t*>(xb.data_ptr());
  // Group sums of x: for the zero points, and for the offset decoders (bf16 x, few rows).
  const bool offset_decoder = !split && rows <= offset_decoder_rows(w.fmt);
  std::vector<float> xsum;
  if (w.zz != nullptr || offset_decoder) {
    xsum.resize(static_cast<size_t>(rows * w.nspans));
    group_sums_bf16(xw, rows, w.kp, w.span, xsum.data());
  }
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor out = split ? at::empty({rows, n}, x.options()) : at::empty({m, n}, x.options());
  GemvArgs a{w, xw, xsum.empty() ? nullptr : xsum.data(),
             (bias.has_value() && !split) ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(), !split, n,
             nullptr};
  a.exact = split;
  // Blocks of 16 output rows are split among threads. Up to 4 rows of x: each block is decoded
  // in registers once per call. More rows: rows of x go in tiles of kRowTile; per tile, each block
  // is decoded once to bf16 words in a per-thread buffer (16 x kp x 2 bytes, L1/L2-resident) and
  // multiplied by the tile's rows 8 (then up to 4) at a time, so decoding costs 1/kRowTile per row.
  constexpr int64_t kRowTile = 64;
  at::parallel_for(0, w.blocks, 1, [&](int64_t b0, int64_t b1) {
    if (rows <= 4) return gemv_dispatch(a, 0, rows, b0, b1);
    std::vector<uint8_t> decoded(w.fmt == kDecoded ? 0 : static_cast<size_t>(w.kp / 4 * bytes_per_4k(kDecoded)));
    GemvArgs local = a;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      const int64_t r1 = std::min(rows, r0 + kRowTile);
      for (int64_t b = b0; b < b1; ++b) {
        // Dense bf16 weights are already words: point at the block instead of copying it.
        local.decoded = w.fmt == kDecoded ? w.packed + b * (w.kp / 4 * bytes_per_4k(kDecoded)) : decoded.data();
        if (w.fmt != kDecoded) decode_dispatch(w, b, decoded.data());
        for (int64_t r = r0; r < r1;) {
          const int64_t chunk = r1 - r >= 8 ? 8 : std::min<int64_t>(4, r1 - r);
          gemv_dispatch(local, r, chunk, b, b + 1);
          r += chunk;
        }
      }
    }
  });
  if (!split) return out;
  at::Tensor y = out.view({m, 3, n}).sum(1);
  if (bias.has_value()) y.add_(bias_f);
  return y;
}

// x (bf16) [M, kp] -> y [M, n] bf16 on the register-blocked GEMM (gemm_tile.h): many rows.
at::Tensor gemm_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& zz, const at::Tensor& lut, const c10::optional<at::Tensor>& bias,
                   int64_t fmt, int64_t group, int64_t n) {
  const Layout w = make_layout(packed, scale, zz, lut, fmt, group, n);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.kp, "x must be [M, ", w.kp, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "the GEMM path takes bfloat16 x");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  const auto* xw = reinterpret_cast<const int16_t*>(xc.data_ptr());
  const bool fold = gemm_folds(w, m);
  const int64_t seg = gemm_segment(w, fold);
  std::vector<float> xsum;
  if (w.zz != nullptr && !fold) {
    xsum.resize(static_cast<size_t>(m * w.ng));
    group_sums_bf16(xw, m, w.kp, w.group, xsum.data());
  }
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  GemmArgs a{w, xw, m, xsum.empty() ? nullptr : xsum.data(), bias.has_value() ? bias_f.data_ptr<float>() : nullptr,
             reinterpret_cast<int16_t*>(out.data_ptr()), seg, gemm_kc(seg), fold};
  gemm(a);
  return out;
}

// Deinterleave a word vector of pairs (row i, k + t) into [k: rows 0..15 | k+1: rows 0..15],
// then write (v - zz) * scale for both inputs into rows k, k+1 of a [kp, ld] tile of W.T.
template <typename T>
AQ_TARGET inline void store_pair(__m512i v, __m512 s, __m512 z, T* dst, int64_t ld) {
  const __m512i idx = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22,
                                       20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i d = _mm512_permutexvar_epi16(idx, v);
  for (int h = 0; h < 2; ++h) {
    const __m256i words = h ? _mm512_extracti64x4_epi64(d, 1) : _mm512_castsi512_si256(d);
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
    const __m512 y = _mm512_mul_ps(_mm512_sub_ps(f, z), s);
    if constexpr (sizeof(T) == 2) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + h * ld), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
    } else {
      _mm512_storeu_ps(reinterpret_cast<float*>(dst + h * ld), y);
    }
  }
}

template <int64_t FMT, typename T>
AQ_TARGET void dequant_blocks(const Layout& w, int64_t b0, int64_t b1, int64_t tile_b0, T* tile, int64_t ld) {
  const Tables tb = load_tables(w.lut);
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = w.packed + b * block_bytes;
    T* col = tile + (b - tile_b0) * 16;
    for (int64_t g = 0; g < w.ng; ++g) {
      const __m512 s = _mm512_loadu_ps(w.scale + (b * w.ng + g) * 16);
      const __m512 z = w.zz ? _mm512_loadu_ps(w.zz + (b * w.ng + g) * 16) : _mm512_setzero_ps();
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 8) {
        const Words wv = decode8<FMT>(p, tb);
        p += 2 * bytes_per_4k(FMT);
        store_pair(wv.w0, s, z, col + k * ld, ld);
        store_pair(wv.w1, s, z, col + (k + 2) * ld, ld);
        store_pair(wv.w2, s, z, col + (k + 4) * ld, ld);
        store_pair(wv.w3, s, z, col + (k + 6) * ld, ld);
      }
    }
  }
}

template <typename T>
void dequant_dispatch(const Layout& w, int64_t b0, int64_t b1, int64_t tile_b0, T* tile, int64_t ld) {
  switch (w.fmt) {
    case kDecoded: return dequant_blocks<kDecoded, T>(w, b0, b1, tile_b0, tile, ld);
    case kInt4: return dequant_blocks<kInt4, T>(w, b0, b1, tile_b0, tile, ld);
    case kInt8: return dequant_blocks<kInt8, T>(w, b0, b1, tile_b0, tile, ld);
    default: return dequant_blocks<kFp8, T>(w, b0, b1, tile_b0, tile, ld);
  }
}

// Many rows: dequantize `tile_blocks` blocks of 16 output rows at a time into a [kp, 16 * tile_blocks]
// tile of W.T in x's dtype (small enough to stay in cache) and multiply it with at::mm.
at::Tensor tiled_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& zz, const at::Tensor& lut, const c10::optional<at::Tensor>& bias,
                    int64_t fmt, int64_t group, int64_t n, int64_t tile_blocks) {
  const Layout w = make_layout(packed, scale, zz, lut, fmt, group, n);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.kp, "x must be [M, ", w.kp, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  TORCH_CHECK(tile_blocks > 0, "tile_blocks must be positive");
  const at::Tensor xc = x.contiguous();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t per_tile = std::min(tile_blocks, w.blocks);
  at::Tensor tile = at::empty({w.kp, per_tile * 16}, x.options());
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  at::Tensor bias_c;
  if (bias.has_value()) bias_c = bias->to(x.scalar_type());
  for (int64_t t0 = 0; t0 < w.blocks; t0 += per_tile) {
    const int64_t t1 = std::min(w.blocks, t0 + per_tile);
    const int64_t ld = per_tile * 16;
    at::parallel_for(t0, t1, 1, [&](int64_t b0, int64_t b1) {
      if (bf16) {
        dequant_dispatch(w, b0, b1, t0, reinterpret_cast<int16_t*>(tile.data_ptr()), ld);
      } else {
        dequant_dispatch(w, b0, b1, t0, tile.data_ptr<float>(), ld);
      }
    });
    const int64_t c0 = t0 * 16, cols = std::min(n, t1 * 16) - c0;
    const at::Tensor wt = tile.narrow(1, 0, cols);
    at::Tensor dst = out.narrow(1, c0, cols);
    if (bias.has_value()) {
      dst.copy_(at::addmm(bias_c.narrow(0, c0, cols), xc, wt));
    } else {
      dst.copy_(at::mm(xc, wt));
    }
  }
  return out;
}

// The whole layer as a dense [n, kp] matrix in `dtype` (tests and debugging).
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zz,
                      const at::Tensor& lut, int64_t fmt, int64_t group, int64_t n, at::ScalarType dtype) {
  const Layout w = make_layout(packed, scale, zz, lut, fmt, group, n);
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dtype must be bfloat16 or float32");
  at::Tensor tile = at::empty({w.kp, w.blocks * 16}, at::TensorOptions().dtype(dtype));
  const int64_t ld = w.blocks * 16;
  at::parallel_for(0, w.blocks, 1, [&](int64_t b0, int64_t b1) {
    if (dtype == at::kBFloat16) {
      dequant_dispatch(w, b0, b1, 0, reinterpret_cast<int16_t*>(tile.data_ptr()), ld);
    } else {
      dequant_dispatch(w, b0, b1, 0, tile.data_ptr<float>(), ld);
    }
  });
  return tile.narrow(1, 0, n).t().contiguous();
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

}  // namespace

TORCH_LIBRARY(anyquant_cpu, m) {
  m.def("gemv(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n) -> Tensor");
  m.def("gemm(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n) -> Tensor");
  m.def("tiled_mm(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n, int tile_blocks) -> Tensor");
  m.def("dequantize(Tensor packed, Tensor scale, Tensor? zz, Tensor lut, int fmt, int group, int n, ScalarType dtype) -> Tensor");
  m.def("cpu_supported() -> bool", &cpu_supported);
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemm", &gemm_op);
  m.impl("tiled_mm", &tiled_mm);
  m.impl("dequantize", &dequantize);
}
