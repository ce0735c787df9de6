// A whole MoE layer's routed experts in one call on int8 activations (AVX512-VNNI, vpdpbusd): the
// schedule of moe_int8_schedule.h (inputs, numerics, routing, work split; read it first) over the
// block kernels of vnni.h. Few rows of an expert (<= 4, decode) stream each weight block once and
// unpack it in registers; more rows unpack a 4-bit block once into 8-bit chunks (L1) for all of
// them, 8 rows at a time.

#include "moe_int8_schedule.h"

namespace {

struct VnniCore {
  bool widens(const VLayout& /*w*/) const { return false; }  // vpdpbusd reads the int8 codes
  void widen(const int8_t* /*q*/, int64_t /*n*/, int16_t* /*q16*/) const {}
  size_t scratch_bytes(int64_t kp) const { return static_cast<size_t>(kp * 16); }  // one unpacked block

  template <typename T>
  void quantize_row(const T* x, int64_t K, int64_t kp, int64_t group, double divisor, float static_scale, int8_t* q,
                    int32_t* sum, float* sx) const {
    ::quantize_row(x, K, kp, group, divisor, static_scale, nullptr, q, sum, sx);
  }

  void blocks(const VLayout& w, const Int8Rows& rows_in, const Out& o, int64_t rows, int64_t b0, int64_t b1,
              uint8_t* scratch) const {
    const QAct a{rows_in.q, rows_in.sum, rows_in.sx};
    if (rows <= 4) {
      if (w.fmt == kV4) return gemv_rows<kV4>(w, a, o, rows, b0, b1);
      return gemv_rows<kV8>(w, a, o, rows, b0, b1);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* codes = w.packed + b * w.block_bytes();
      if (w.fmt == kV4) {
        unpack_block(w, b, scratch);
        codes = scratch;
      }
      for (int64_t r = 0; r < rows; r += 8) tile_rows(w, codes, a, o, r, std::min<int64_t>(8, rows - r), b);
    }
  }
};

at::Tensor moe_experts_vnni(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                            const at::Tensor& w13, const at::Tensor& s13, const c10::optional<at::Tensor>& z13,
                            const c10::optional<at::Tensor>& o13, const at::Tensor& w2, const at::Tensor& s2,
                            const c10::optional<at::Tensor>& z2, const c10::optional<at::Tensor>& o2, int64_t fmt,
                            int64_t zconst, int64_t group13, int64_t group2, int64_t inter, int64_t hidden,
                            const c10::optional<at::Tensor>& perm13, const c10::optional<at::Tensor>& pos2,
                            double divisor, double x_static_scale, const c10::optional<at::Tensor>& h_static_scale) {
  TORCH_CHECK(vnni_supported(), "moe_experts_vnni needs AVX512-VNNI and AVX512_BF16");
  return moe_experts_int8_impl(VnniCore{}, "moe_experts_vnni", x, ids, weights, w13, s13, z13, o13, w2, s2, z2, o2,
                               fmt, zconst, group13, group2, inter, hidden, perm13, pos2, divisor, x_static_scale,
                               h_static_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "moe_experts_vnni(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor s13, Tensor? z13, Tensor? o13, "
      "Tensor w2, Tensor s2, Tensor? z2, Tensor? o2, int fmt, int zconst, int group13, int group2, int inter, "
      "int hidden, Tensor? perm13=None, Tensor? pos2=None, float divisor=127., float x_static_scale=0., "
      "Tensor? h_static_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) { m.impl("moe_experts_vnni", &moe_experts_vnni); }
