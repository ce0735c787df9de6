// Integer weights times int8 activations on AVX2 CPUs (vpmaddubsw / vpmaddwd): W4A8 / W8A8 linear
// layers, the op avx2_a8_linear. The same arguments and layout as vnni_linear (cpu_vnni.cpp); the
// kernels are described in a8_avx2.h.

#include "a8_avx2.h"

namespace {

bool a8_avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

at::Tensor avx2_a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& zero, int64_t zconst,
                          const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias, int64_t fmt,
                          int64_t group, int64_t n, double divisor, double static_scale,
                          const c10::optional<at::Tensor>& amax) {
  TORCH_CHECK(a8_avx2_supported(), "avx2_a8_linear needs AVX2, FMA and F16C");
  VLayout w = checked_vlayout(packed, scale, zero, zconst, offset, fmt, group, n);
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= w.kp, "x must be [M, K] with K <= ", w.kp);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  TORCH_CHECK(divisor > 0, "divisor must be positive");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), K = xc.size(1);
  const float* amax_p = nullptr;
  at::Tensor amax_c;
  if (amax.has_value()) {
    amax_c = amax->to(at::kFloat).contiguous();
    TORCH_CHECK(amax_c.numel() == rows, "amax must hold one value per row of x");
    amax_p = amax_c.data_ptr<float>();
  }
  const bool wide = fmt == kV8;  // 8-bit codes multiply int16 copies of the activations
  at::Tensor q = at::empty({rows, w.kp}, at::kChar);
  at::Tensor q16 = at::empty({wide ? rows : 0, w.kp}, at::kShort);
  at::Tensor qsum = at::empty({rows, w.ng}, at::kInt);
  at::Tensor sx = at::empty({rows}, at::kFloat);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> xf(static_cast<size_t>(K) + 8);
    for (int64_t r = r0; r < r1; ++r) {
      const float* am = amax_p ? amax_p + r : nullptr;
      int8_t* qr = q.data_ptr<int8_t>() + r * w.kp;
      int16_t* q16r = wide ? q16.data_ptr<int16_t>() + r * w.kp : nullptr;
      int32_t* sr = qsum.data_ptr<int32_t>() + r * w.ng;
      float* sxr = sx.data_ptr<float>() + r;
      const auto ss = static_cast<float>(static_scale);
      if (bf16) {
        a8::quantize_row(reinterpret_cast<const int16_t*>(xc.data_ptr()) + r * K, K, w.kp, group, divisor, ss, am, qr,
                         sr, sxr, q16r, xf.data());
      } else {
        a8::quantize_row(xc.data_ptr<float>() + r * K, K, w.kp, group, divisor, ss, am, qr, sr, sxr, q16r, xf.data());
      }
    }
  });
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, n}, xc.options());
  if (rows == 0) return out;
  const a8::Act a{q.data_ptr<int8_t>(), wide ? q16.data_ptr<int16_t>() : nullptr, qsum.data_ptr<int32_t>(),
                  sx.data_ptr<float>()};
  const Out o{out.data_ptr(), bf16, bias.has_value() ? bias_f.data_ptr<float>() : nullptr};
  at::parallel_for(0, w.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> codes(a8::blocks_scratch_bytes(w.kp));
    a8::blocks_any(w, a, o, rows, b0, b1, codes.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def("avx2_a8_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int zconst, Tensor? offset, "
        "Tensor? bias, int fmt, int group, int n, float divisor, float static_scale, Tensor? amax) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) {
  m.impl("avx2_a8_linear", &avx2_a8_linear);
}
