// A whole MoE layer's routed experts in one call on AVX2 + FMA CPUs (no AVX-512): the schedule of
// moe_schedule.h (inputs, routing, work split; read it first) over the fp32 FMA cores of
// gemv_avx2.h, on the same stacked repacked weights as the AVX-512 call (`moe_experts`).
//
// Numerics: x and h are fp32 rows (bf16 x widened exactly); h = silu(gate) * up is kept in fp32
// between the projections, never rounded to the compute dtype, so the result is at least as close
// to float64 as the per-expert path (which rounds every projection's output).
//   bf16 compute, few rows of one expert (decode): int4 and 8-bit at 2..kFewRowsMax rows the
//     few-rows kernel (few_rows_dispatch; int4 against a prescaled copy of the rows in the
//     thread's scratch), one row and fp8 up to kGemvMaxRows rows the vector cores (gemv_dispatch):
//     the codes decoded in registers and multiplied in fp32, scale and zero point applied once per
//     span of at most 128 inputs; more rows (prefill): the rows kernel (rows_dispatch), as the
//     per-expert cpu_avx2 path chooses;
//   fp32 compute: the rows kernel at every row count: each block dequantized chunk by chunk to the
//     reference's fp32 weights and multiplied in input order; the vector cores' code offsets
//     would cancel against sums of large activations.
// Weights: int4, 8-bit and both fp8 types (gemv_avx2.h's decoders; fp8 named by the AVX2 codes).
// fp8 activations as in the AVX-512 call: x quantized by the caller (the reference's function), h
// by the schedule (moe_schedule.h); int8 activations (codes with x_scale) are AVX-512 only here:
// integer experts on int8 activations run on cpu_avx2_a8 and its own call (cpu_moe_avx2_a8.cpp).

#include "gemv_avx2.h"
#include "moe_schedule.h"

namespace {

struct Avx2Core {
  using X = float;
  static constexpr at::ScalarType kXType = at::kFloat;
  int parts = 1;
  bool exact;   // fp32 compute: the rows kernel at every row count
  int64_t fmt;  // the call's format: the schedule's layouts say kFp8 for either fp8 (avx2_layout)
  bool x16_row;  // one row of int4 on 16-bit fixed-point x (gemv_one_row_x16; off: the A/B switch)

  void put(float v, X* dst, int64_t /*stride*/) const { *dst = v; }

  // The vector cores subtract (zero point + code shift) * scale * sum once per span; the tile
  // path needs the sums only for float offsets.
  bool wants_sums(const Layout& w, bool offsets) const {
    return offsets || (!exact && (w.zz != nullptr || avx2_code_shift(w.fmt) != 0.f));
  }

  void sums(const X* rows, int64_t n, int64_t kp, int64_t span, float* out) const {
    avx2::span_sums(rows, n, kp, span, out);
  }

  // The few-rows kernel's prescaled int4 rows or one row's 16-bit fixed-point x (the rows
  // kernel's scratch is on its stack).
  size_t scratch_bytes(int64_t kp) const {
    if (!few_rows(fmt) || fmt != kInt4) return 0;
    return std::max(sizeof(float) * static_cast<size_t>(avx2::kFewRowsMax * kp), avx2::x16_row_bytes(kp));
  }

  bool few_rows(int64_t f) const { return !exact && (f == kInt4 || f == kInt8); }

  void blocks(const Layout& w, const X* x, const float* xsum, int64_t rows, int64_t b0, int64_t b1, float* out,
              int64_t out_stride, int64_t col_shift, uint8_t* scratch) const {
    Layout named = w;
    named.fmt = fmt;
    avx2::Args a{named, x, xsum, nullptr, out, false, out_stride};
    a.col_shift = col_shift;
    if (few_rows(fmt) && rows >= 2 && rows <= avx2::kFewRowsMax) {
      if (fmt == kInt4) {  // the sums (xsum) stay those of x; only the copy is scaled
        auto* xs = reinterpret_cast<float*>(scratch);
        std::memcpy(xs, x, sizeof(float) * static_cast<size_t>(rows * w.kp));
        avx2::few_rows_prescale(xs, rows * w.kp);
        a.x = xs;
      }
      avx2::few_rows_dispatch(a, rows, b0, b1);
    } else if (exact || rows > avx2::kGemvMaxRows) {
      avx2::rows_dispatch(a, rows, b0, b1);
    } else {
      if (rows == 1 && fmt == kInt4 && x16_row) {  // the schedule's sums stay those of x (offsets)
        avx2::use_x16_row(a, x, scratch);
      }
      avx2::gemv_dispatch(a, rows, b0, b1);
    }
  }

  static float avx2_code_shift(int64_t fmt) {
    return fmt == kInt4 ? avx2::code_shift<kInt4>() : fmt == kInt8 ? avx2::code_shift<kInt8>() : 0.f;
  }
};

at::Tensor moe_experts_avx2(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                            const at::Tensor& w13, const at::Tensor& s13, const c10::optional<at::Tensor>& z13,
                            const at::Tensor& w2, const at::Tensor& s2, const c10::optional<at::Tensor>& z2,
                            const at::Tensor& lut, int64_t fmt, int64_t group13, int64_t group2, int64_t inter,
                            int64_t hidden, const c10::optional<at::Tensor>& perm13,
                            const c10::optional<at::Tensor>& pos2, const c10::optional<at::Tensor>& off13,
                            const c10::optional<at::Tensor>& off2, int64_t act2, double act_qmax, double act_top,
                            int64_t act_group, const c10::optional<at::Tensor>& act_scale2,
                            const c10::optional<at::Tensor>& x_scale) {
  TORCH_CHECK(fmt == kInt4 || fmt == kInt8 || is_fp8(fmt),
              "the AVX2 MoE call runs int4, 8-bit and fp8 codes (fmt 0, 1, 4, 5 or 6), got ", fmt);
  TORCH_CHECK(act2 != 3 && !x_scale.has_value(),
              "the AVX2 MoE call takes weight-only or fp8-activation experts (act2 0, 1 or 2, no x_scale)");
  const bool exact = x.scalar_type() == at::kFloat;
  const Avx2Core core{1, exact, fmt, !exact && fmt == kInt4 && avx2::x16_row_enabled()};
  return moe_experts_impl(core, x, ids, weights, w13, s13, z13, w2, s2, z2, lut, is_fp8(fmt) ? kFp8 : fmt, group13,
                          group2, inter, hidden, perm13, pos2, off13, off2, act2, act_qmax, act_top, act_group,
                          act_scale2, x_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "moe_experts_avx2(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor s13, Tensor? z13, Tensor w2, "
      "Tensor s2, Tensor? z2, Tensor lut, int fmt, int group13, int group2, int inter, int hidden, "
      "Tensor? perm13=None, Tensor? pos2=None, Tensor? off13=None, Tensor? off2=None, int act2=0, "
      "float act_qmax=0., float act_top=0., int act_group=0, Tensor? act_scale2=None, "
      "Tensor? x_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) { m.impl("moe_experts_avx2", &moe_experts_avx2); }
