// Weight-only quantized linear layers for AVX2 + FMA CPUs (gemv_avx2.h): the matrix-vector path
// (few rows), the rows path (bf16 batched decode and prompts: chunks of the weights dequantized
// once into an L1 scratch for all rows) and the tile path (fp32 compute: fp32 tiles multiplied by
// at::mm, the same sums as a dense fp32 F.linear), over the layout gemv.h describes (fp8 named
// by the AVX2 codes kFp8E4M3 / kFp8E5M2, avx2_layout). Ops:
// avx2_gemv, avx2_few_rows_mm, avx2_rows_mm, avx2_tiled_mm, avx2_dequantize, avx2_supported.

#include "gemv_avx2.h"

namespace {

void check_x(const at::Tensor& x, const Layout& w) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.kp, "x must be [M, ", w.kp, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
}

// Which register path avx2_register_paths runs: the vector kernel (codes decoded in registers,
// rows of x 4 at a time), the few-rows kernel (int4 / 8-bit / bf16 words decoded once per group of
// up to 6 rows, int4 in place against prescaled x) or the rows kernel (chunks dequantized once into
// an fp32 scratch for all rows).
enum class RegisterPath { kVector, kFewRows, kRows };

// x (bf16 or fp32) [M, kp] -> y [M, n] in x's dtype over blocks of 16 outputs split among threads.
template <RegisterPath PATH>
at::Tensor avx2_register_paths(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& zz, const at::Tensor& lut,
                               const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t group, int64_t n) {
  const Layout w = avx2_layout(packed, scale, zz, lut, fmt, group, n);
  check_x(x, w);
  if (PATH == RegisterPath::kFewRows) {
    TORCH_CHECK(fmt == kInt4 || fmt == kInt8 || fmt == kDecoded,
                "avx2_few_rows_mm runs int4, 8-bit and bf16 words (fmt 0, 1 or 3), got ", fmt);
    TORCH_CHECK(x.size(0) <= avx2::kFewRowsMax, "avx2_few_rows_mm takes at most ", avx2::kFewRowsMax,
                " rows of x, got ", x.size(0));
  }
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  // bf16 x: the rows kernel widens it a panel at a time itself (gemv_avx2.h, rows_blocks), the
  // vector and few-rows kernels take it widened whole.
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const int16_t* x_bf16 = bf16 ? reinterpret_cast<const int16_t*>(xc.data_ptr()) : nullptr;
  // fp32 x is copied where the few-rows kernel scales it (int4)
  const bool prescale = PATH == RegisterPath::kFewRows && fmt == kInt4;
  std::vector<float> widened;
  const float* xf = bf16 ? nullptr : xc.data_ptr<float>();
  if (bf16 && PATH != RegisterPath::kRows) {
    widened.resize(static_cast<size_t>(rows * w.kp));
    avx2::widen_bf16(x_bf16, widened.data(), rows * w.kp);
    xf = widened.data();
  } else if (prescale) {
    widened.assign(xc.data_ptr<float>(), xc.data_ptr<float>() + rows * w.kp);
    xf = widened.data();
  }
  // one row of int4 at bf16 compute: x as 16-bit fixed point, integer dot products
  // (gemv_avx2.h, gemv_one_row_x16), which then need neither the fp32 x's sums
  const bool x16 = PATH == RegisterPath::kVector && bf16 && fmt == kInt4 && rows == 1 && avx2::x16_row_enabled();
  std::vector<uint8_t> x16_scratch(x16 ? avx2::x16_row_bytes(w.kp) : 0);
  std::vector<float> xsum;  // the register kernels' per-span sums of x (the rows kernel needs none)
  if (PATH != RegisterPath::kRows && !x16) {
    xsum.resize(static_cast<size_t>(rows * w.nspans));
    avx2::span_sums(xf, rows, w.kp, w.span, xsum.data());
  }
  if (prescale) avx2::few_rows_prescale(widened.data(), rows * w.kp);  // after the sums: those are of x
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  avx2::Args a{w,     xf, xsum.data(), bias.has_value() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(),
               xc.scalar_type() == at::kBFloat16, n};
  if (x16) avx2::use_x16_row(a, xf, x16_scratch.data());
  at::parallel_for(0, w.blocks, 1, [&](int64_t b0, int64_t b1) {
    if (PATH == RegisterPath::kRows) {
      avx2::rows_dispatch(a, rows, b0, b1, x_bf16);
    } else if (PATH == RegisterPath::kFewRows) {
      avx2::few_rows_dispatch(a, rows, b0, b1);
    } else {
      avx2::gemv_dispatch(a, rows, b0, b1);
    }
  });
  return out;
}

at::Tensor avx2_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& zz, const at::Tensor& lut, const c10::optional<at::Tensor>& bias,
                     int64_t fmt, int64_t group, int64_t n) {
  return avx2_register_paths<RegisterPath::kVector>(x, packed, scale, zz, lut, bias, fmt, group, n);
}

at::Tensor avx2_few_rows_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zz, const at::Tensor& lut,
                            const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t group, int64_t n) {
  return avx2_register_paths<RegisterPath::kFewRows>(x, packed, scale, zz, lut, bias, fmt, group, n);
}

at::Tensor avx2_rows_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zz, const at::Tensor& lut,
                        const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t group, int64_t n) {
  return avx2_register_paths<RegisterPath::kRows>(x, packed, scale, zz, lut, bias, fmt, group, n);
}

// fp32 compute: `tile_blocks` blocks of 16 output rows at a time dequantized into a fp32 [kp, cols]
// tile of W.T and multiplied by at::mm in fp32 (oneDNN's AVX2 sgemm; bf16 x is widened once), the
// result rounded to x's dtype.
at::Tensor avx2_tiled_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zz, const at::Tensor& lut,
                         const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t group, int64_t n,
                         int64_t tile_blocks) {
  const Layout w = avx2_layout(packed, scale, zz, lut, fmt, group, n);
  check_x(x, w);
  TORCH_CHECK(tile_blocks > 0, "tile_blocks must be positive");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t per_tile = std::min(tile_blocks, w.blocks);
  at::Tensor tile = at::empty({w.kp, per_tile * 16}, xf.options());
  at::Tensor out = at::empty({x.size(0), n}, xf.options());
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat);
  const int64_t ld = per_tile * 16;
  for (int64_t t0 = 0; t0 < w.blocks; t0 += per_tile) {
    const int64_t t1 = std::min(w.blocks, t0 + per_tile);
    at::parallel_for(t0, t1, 1, [&](int64_t b0, int64_t b1) {
      avx2::dequant_dispatch(w, b0, b1, t0, tile.data_ptr<float>(), ld);
    });
    const int64_t c0 = t0 * 16, cols = std::min(n, t1 * 16) - c0;
    const at::Tensor wt = tile.narrow(1, 0, cols);
    at::Tensor dst = out.narrow(1, c0, cols);
    if (bias.has_value()) {
      at::addmm_out(dst, bias_f.narrow(0, c0, cols), xf, wt);
    } else {
      at::mm_out(dst, xf, wt);
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// The whole layer as a dense [n, kp] matrix in `dtype` (fp32 values rounded once for bf16).
at::Tensor avx2_dequantize(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zz,
                           const at::Tensor& lut, int64_t fmt, int64_t group, int64_t n, at::ScalarType dtype) {
  const Layout w = avx2_layout(packed, scale, zz, lut, fmt, group, n);
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dtype must be bfloat16 or float32");
  at::Tensor tile = at::empty({w.kp, w.blocks * 16}, at::TensorOptions().dtype(at::kFloat));
  const int64_t ld = w.blocks * 16;
  at::parallel_for(0, w.blocks, 1, [&](int64_t b0, int64_t b1) {
    avx2::dequant_dispatch(w, b0, b1, 0, tile.data_ptr<float>(), ld);
  });
  return tile.narrow(1, 0, n).t().to(dtype).contiguous();
}

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def("avx2_gemv(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n) -> Tensor");
  m.def("avx2_few_rows_mm(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n) -> Tensor");
  m.def("avx2_rows_mm(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n) -> Tensor");
  m.def("avx2_tiled_mm(Tensor x, Tensor packed, Tensor scale, Tensor? zz, Tensor lut, Tensor? bias, int fmt, int group, int n, int tile_blocks) -> Tensor");
  m.def("avx2_dequantize(Tensor packed, Tensor scale, Tensor? zz, Tensor lut, int fmt, int group, int n, ScalarType dtype) -> Tensor");
  m.def("avx2_supported() -> bool", &avx2_supported);
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) {
  m.impl("avx2_gemv", &avx2_gemv);
  m.impl("avx2_few_rows_mm", &avx2_few_rows_mm);
  m.impl("avx2_rows_mm", &avx2_rows_mm);
  m.impl("avx2_tiled_mm", &avx2_tiled_mm);
  m.impl("avx2_dequantize", &avx2_dequantize);
}
