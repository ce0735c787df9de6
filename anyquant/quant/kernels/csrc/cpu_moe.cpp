// A whole MoE layer's routed experts in one call on AVX-512 CPUs with AVX512_BF16: the schedule
// of moe_schedule.h (inputs, routing, work split; read it first) over the bf16 dot-product cores
// of gemv.h.
//
// Numerics: x and h enter the dot products as bf16, one part for bf16 compute, or for fp32
// compute three parts (hi + mid + lo, 24 significant bits) each multiplied exactly, as the linear
// kernel does. int8 activations keep the integer codes (exact in bf16) in the dot products and
// scale the results instead, as the per-expert int8 GEMM path rounds. The gate / up / down
// activations stay in fp32 between the projections (h is rounded once, to the bf16 parts the dot
// products take), so the result is at least as close to float64 as the per-expert path, which
// rounds each projection's output to the compute dtype.

#include "moe_schedule.h"

namespace {

// bf16 parts of v: one (rounded) for bf16 compute, three (hi + mid + lo, 24 significant bits) for fp32.
inline void split_parts(float v, int parts, c10::BFloat16* dst, int64_t stride) {
  c10::BFloat16 hi(v);
  dst[0] = hi;
  if (parts == 1) return;
  const float r1 = v - static_cast<float>(hi);
  const c10::BFloat16 mid(r1);
  dst[stride] = mid;
  dst[2 * stride] = c10::BFloat16(r1 - static_cast<float>(mid));
}

// moe_schedule.h's core on gemv.h: rows of bf16 parts, vdpbf16ps.
struct Avx512Core {
  using X = c10::BFloat16;
  static constexpr at::ScalarType kXType = at::kBFloat16;
  int parts;  // 1 (bf16 compute) or 3 (fp32 compute: exact decoders)

  void put(float v, X* dst, int64_t stride) const { split_parts(v, parts, dst, stride); }

  // Zero points and offsets need the sums; so do the offset decoders (bf16 x, few rows), which
  // the vector path uses only when given them.
  bool wants_sums(const Layout& w, bool offsets) const {
    return w.zz != nullptr || offsets || (offset_decoder_rows(w.fmt) > 0 && parts == 1);
  }

  void sums(const X* rows, int64_t n, int64_t kp, int64_t span, float* out) const {
    group_sums_bf16(reinterpret_cast<const int16_t*>(rows), n, kp, span, out);
  }

  size_t scratch_bytes(int64_t kp) const { return static_cast<size_t>(kp / 4 * bytes_per_4k(kDecoded)); }

  void blocks(const Layout& w, const X* x, const float* xsum, int64_t rows, int64_t b0, int64_t b1, float* out,
              int64_t out_stride, int64_t col_shift, uint8_t* scratch) const {
    GemvArgs a{w, reinterpret_cast<const int16_t*>(x), xsum, nullptr, out, false, out_stride, nullptr};
    a.exact = parts > 1;
    a.col_shift = col_shift;
    if (rows <= 4) {
      // Few rows (decode): one kernel call streams the whole range (per-block calls cost ~10 %
      // at one token: each restarts the kernel's loop and its prefetch distance).
      gemv_dispatch(a, 0, rows, b0, b1);
    } else {
      for (int64_t b = b0; b < b1; ++b) block_rows(a, rows, b, scratch);
    }
  }
};

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w13,
                       const at::Tensor& s13, const c10::optional<at::Tensor>& z13, const at::Tensor& w2,
                       const at::Tensor& s2, const c10::optional<at::Tensor>& z2, const at::Tensor& lut, int64_t fmt,
                       int64_t group13, int64_t group2, int64_t inter, int64_t hidden,
                       const c10::optional<at::Tensor>& perm13, const c10::optional<at::Tensor>& pos2,
                       const c10::optional<at::Tensor>& off13, const c10::optional<at::Tensor>& off2,
                       int64_t act2, double act_qmax, double act_top, int64_t act_group,
                       const c10::optional<at::Tensor>& act_scale2, const c10::optional<at::Tensor>& x_scale) {
  const Avx512Core core{x.scalar_type() == at::kFloat ? 3 : 1};
  return moe_experts_impl(core, x, ids, weights, w13, s13, z13, w2, s2, z2, lut, fmt, group13, group2, inter, hidden,
                          perm13, pos2, off13, off2, act2, act_qmax, act_top, act_group, act_scale2, x_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor s13, Tensor? z13, Tensor w2, Tensor s2, "
      "Tensor? z2, Tensor lut, int fmt, int group13, int group2, int inter, int hidden, Tensor? perm13=None, "
      "Tensor? pos2=None, Tensor? off13=None, Tensor? off2=None, int act2=0, float act_qmax=0., float act_top=0., "
      "int act_group=0, Tensor? act_scale2=None, Tensor? x_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) { m.impl("moe_experts", &moe_experts); }
