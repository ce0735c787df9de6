// A whole MoE layer's routed experts in one call on int8 activations, on AVX2 CPUs (no AVX-512,
// no VNNI): the schedule of moe_int8_schedule.h (inputs, numerics, routing, work split; read it
// first) over a8_avx2.h's block kernels, the ones the per-expert cpu_avx2_a8 layers run, so the
// int32 dot products and the scales are the same operations: vpmaddubsw on 4-bit codes (few rows
// unpacked in registers, more rows once per block into 8-bit chunks), vpmaddwd on 8-bit codes
// against int16 copies of the rows (made once per gathered expert and per quantized h row).
// The same arguments as moe_experts_vnni.

#include "a8_avx2.h"
#include "moe_int8_schedule.h"

namespace {

struct A8Core {
  bool widens(const VLayout& w) const { return w.fmt == kV8; }
  void widen(const int8_t* q, int64_t n, int16_t* q16) const { a8::widen_codes(q, n, q16); }
  size_t scratch_bytes(int64_t kp) const { return a8::blocks_scratch_bytes(kp); }

  template <typename T>
  void quantize_row(const T* x, int64_t K, int64_t kp, int64_t group, double divisor, float static_scale, int8_t* q,
                    int32_t* sum, float* sx) const {
    std::vector<float> xf(static_cast<size_t>(K) + 8);
    a8::quantize_row(x, K, kp, group, divisor, static_scale, nullptr, q, sum, sx, nullptr, xf.data());
  }

  void blocks(const VLayout& w, const Int8Rows& rows_in, const Out& o, int64_t rows, int64_t b0, int64_t b1,
              uint8_t* scratch) const {
    const a8::Act a{rows_in.q, rows_in.q16, rows_in.sum, rows_in.sx};
    a8::blocks_any(w, a, o, rows, b0, b1, scratch);
  }
};

bool a8_moe_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

at::Tensor moe_experts_avx2_a8(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                               const at::Tensor& w13, const at::Tensor& s13, const c10::optional<at::Tensor>& z13,
                               const c10::optional<at::Tensor>& o13, const at::Tensor& w2, const at::Tensor& s2,
                               const c10::optional<at::Tensor>& z2, const c10::optional<at::Tensor>& o2, int64_t fmt,
                               int64_t zconst, int64_t group13, int64_t group2, int64_t inter, int64_t hidden,
                               const c10::optional<at::Tensor>& perm13, const c10::optional<at::Tensor>& pos2,
                               double divisor, double x_static_scale,
                               const c10::optional<at::Tensor>& h_static_scale) {
  TORCH_CHECK(a8_moe_supported(), "moe_experts_avx2_a8 needs AVX2, FMA and F16C");
  return moe_experts_int8_impl(A8Core{}, "moe_experts_avx2_a8", x, ids, weights, w13, s13, z13, o13, w2, s2, z2, o2,
                               fmt, zconst, group13, group2, inter, hidden, perm13, pos2, divisor, x_static_scale,
                               h_static_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "moe_experts_avx2_a8(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor s13, Tensor? z13, Tensor? o13, "
      "Tensor w2, Tensor s2, Tensor? z2, Tensor? o2, int fmt, int zconst, int group13, int group2, int inter, "
      "int hidden, Tensor? perm13=None, Tensor? pos2=None, float divisor=127., float x_static_scale=0., "
      "Tensor? h_static_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) { m.impl("moe_experts_avx2_a8", &moe_experts_avx2_a8); }
