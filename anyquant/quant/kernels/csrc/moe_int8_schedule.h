// A whole MoE layer's routed experts in one call on int8 activations, whatever the instruction
// set: the int8-activation twin of moe_schedule.h, over the layout of vnni.h. The dot products
// come from a `Core` (vpdpbusd in cpu_moe_vnni.cpp, vpmaddubsw / vpmaddwd in cpu_moe_avx2_a8.cpp),
// so both ops share this one schedule, their inputs and their numerics.
//
// Inputs: x [T, hidden] (bf16 or fp32, the layer's input before quantization), the router's ids
// [T, k] int64 (-1: an expert this call does not hold, expert parallelism) and weights [T, k] fp32,
// and every expert's weights in vnni.h's layout, stacked along a leading expert dimension at load:
//   w13 [E, 2 * nb13, chunks, 64]: the gate projection's nb13 = ceil(inter / 16) blocks of 16 rows,
//        then the up projection's; scales s13 [E, 2 * nb13, ng13, 16] fp32, zero points z13 (int32,
//        same shape; else the constant zconst) and float offsets o13 (fp32, same shape) optional;
//   w2 [E, nb2, chunks, 64]: the down projection over kp2 >= inter inputs; s2 / z2 / o2 likewise.
// out [T, hidden] fp32 = sum over a token's k slots of weight * down(silu(gate(x)) * up(x)).
// Activations are quantized as the reference's fake_quantize_activations does (the core's
// quantize_row): x once per token for every expert (scale amax / divisor, or the static
// x_static_scale shared by every gate and up), h once per (token, expert) row (amax / divisor, or
// the expert's static h_static_scale[e]). The int32 dot products are exact; each projection's
// output is an fp32 scale times them, and h stays fp32 from silu * up to its quantization.
// Optional act-order (GPTQ g_idx): perm13 [E, 2, hidden] int64, packed column c of the gate (up)
// reads input perm13[e, 0 (1), c], so the token's int8 row is gathered in that order (quantizing
// per row does not depend on the order); pos2 [E, inter]: intermediate feature i sits at the down
// projection's packed column pos2[e, i].
//
// Steps (each one parallel region over the intra-op threads), the work split of moe_schedule.h:
//   0. quantize x per token -> qx [T, kp13] int8, sx [T];
//   1. group the (token, slot) pairs by expert with a counting sort (token order within an expert);
//   2. gate and up: work items (expert, block j of 16 intermediate rows), a thread's consecutive
//      items of one expert as one run; the thread gathers the expert's rows of qx (and their group
//      sums) when it reaches the expert; silu(gate) * up -> hf [pairs, kp2] fp32;
//   3. quantize each row of hf -> q2 [pairs, kp2] int8 with its group sums and scale;
//   4. down: each thread owns a range of output blocks and adds weight * down(h) of every pair of
//      every expert (in id order) into out: no per-pair result buffer, no write conflicts.
// Every element of out sees the same operations in the same order at any thread count.
//
// The Core (one object per call):
//   bool widens(const VLayout&): whether its dot products also read an int16 copy of the rows
//   void widen(const int8_t* q, int64_t n, int16_t* q16): that copy of n codes
//   size_t scratch_bytes(int64_t kp): per-thread scratch for `blocks`
//   template <class T> void quantize_row(const T* x, int64_t K, int64_t kp, int64_t group,
//        double divisor, float static_scale, int8_t* q, int32_t* sum, float* sx): one row of x
//        (bf16 words as int16, or fp32) quantized as the reference does (vnni.h's contract)
//   void blocks(const VLayout&, const Int8Rows&, const Out&, int64_t rows, int64_t b0, int64_t b1,
//               uint8_t* scratch): rows [0, rows) against blocks b0..b1 into the Out window
#pragma once

#include "moe_routing.h"
#include "vnni.h"

namespace {

// Rows of int8 activations as the cores read them.
struct Int8Rows {
  const int8_t* q;     // [rows, kp], zero padded
  const int16_t* q16;  // [rows, kp] the core's int16 copy (widen), or nullptr where it needs none
  const int32_t* sum;  // [rows, ng] sum of q per group
  const float* sx;     // [rows] activation scale per row
};

// One stacked weight: expert e's layout is the base layout shifted by e strides.
struct StackedV {
  VLayout base;
  int64_t packed_stride = 0;  // bytes per expert
  int64_t scale_stride = 0;   // elements per expert (scales, zero points, offsets)

  VLayout expert(int64_t e) const {
    VLayout w = base;
    w.packed += e * packed_stride;
    w.scale += e * scale_stride;
    if (w.zero != nullptr) w.zero += e * scale_stride;
    if (w.offset != nullptr) w.offset += e * scale_stride;
    return w;
  }
};

inline StackedV stack_layout(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                             const c10::optional<at::Tensor>& offset, int64_t fmt, int64_t zconst, int64_t group,
                             int64_t n, int64_t experts, const char* what) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == experts && packed.size(3) == 64 && packed.is_contiguous() &&
                  packed.scalar_type() == at::kByte,
              what, ": packed weights must be contiguous uint8 [", experts, " experts, blocks, chunks, 64]");
  TORCH_CHECK(scale.dim() == 4 && scale.size(0) == experts && scale.size(3) == 16 && scale.is_contiguous() &&
                  scale.scalar_type() == at::kFloat,
              what, ": scales must be contiguous float32 [", experts, " experts, blocks, groups, 16]");
  TORCH_CHECK(group > 0 && group % 8 == 0 && group <= 65536, what, ": group must be a multiple of 8 up to 65536");
  StackedV s;
  s.base = vlayout_shape(fmt, scale.size(1), scale.size(2), group, n);
  VLayout& w = s.base;
  TORCH_CHECK(packed.size(1) == w.blocks && packed.size(2) * 64 == w.block_bytes(), what,
              ": packed weights do not match ", w.blocks, " blocks of ", w.kp, " inputs");
  TORCH_CHECK(n > 0 && n <= w.blocks * 16, what, ": ", n, " rows do not fit ", w.blocks, " blocks");
  w.packed = packed.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<float>();
  w.zero = nullptr;
  w.offset = nullptr;
  w.zconst = static_cast<int32_t>(zconst);
  if (zero.has_value()) {
    TORCH_CHECK(zero->sizes() == scale.sizes() && zero->is_contiguous() && zero->scalar_type() == at::kInt, what,
                ": zero points must be contiguous int32 shaped like the scales");
    w.zero = zero->data_ptr<int32_t>();
  }
  if (offset.has_value()) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->is_contiguous() && offset->scalar_type() == at::kFloat,
                what, ": offsets must be contiguous float32 shaped like the scales");
    w.offset = offset->data_ptr<float>();
  }
  s.packed_stride = packed[0].numel();
  s.scale_stride = scale[0].numel();
  return s;
}

// Group sums of `rows` int8 rows of width ng * group.
inline void qsums(const int8_t* q, int64_t rows, int64_t ng, int64_t group, int32_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const int8_t* p = q + (r * ng + g) * group;
      int32_t s = 0;
      for (int64_t i = 0; i < group; ++i) s += p[i];
      dst[r * ng + g] = s;
    }
}

inline void check_int8_table(const c10::optional<at::Tensor>& t, at::IntArrayRef shape, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == at::kLong && t->is_contiguous(), what,
              " must be contiguous int64 ", shape);
}

template <class Core>
at::Tensor moe_experts_int8_impl(const Core& core, const char* op, const at::Tensor& x, const at::Tensor& ids,
                                 const at::Tensor& weights, const at::Tensor& w13, const at::Tensor& s13,
                                 const c10::optional<at::Tensor>& z13, const c10::optional<at::Tensor>& o13,
                                 const at::Tensor& w2, const at::Tensor& s2, const c10::optional<at::Tensor>& z2,
                                 const c10::optional<at::Tensor>& o2, int64_t fmt, int64_t zconst, int64_t group13,
                                 int64_t group2, int64_t inter, int64_t hidden,
                                 const c10::optional<at::Tensor>& perm13, const c10::optional<at::Tensor>& pos2,
                                 double divisor, double x_static_scale,
                                 const c10::optional<at::Tensor>& h_static_scale) {
  TORCH_CHECK(fmt == kV4 || fmt == kV8, op, ": unknown weight format ", fmt);
  TORCH_CHECK(inter > 0 && hidden > 0, op, ": inter and hidden must be positive");
  TORCH_CHECK(divisor > 0, op, ": divisor must be positive");
  const int64_t experts = w13.size(0);
  const int64_t nb13 = (inter + 15) / 16;
  const StackedV gu = stack_layout(w13, s13, z13, o13, fmt, zconst, group13, 2 * nb13 * 16, experts, "gate/up");
  TORCH_CHECK(gu.base.blocks == 2 * nb13, "gate/up: expected ", 2 * nb13, " blocks of 16 rows, got ", gu.base.blocks);
  const StackedV dn = stack_layout(w2, s2, z2, o2, fmt, zconst, group2, hidden, experts, "down");
  const int64_t kp13 = gu.base.kp, kp2 = dn.base.kp, ng13 = gu.base.ng, ng2 = dn.base.ng;
  TORCH_CHECK(kp13 >= hidden, "gate/up: ", kp13, " inputs cannot hold ", hidden, " hidden features");
  TORCH_CHECK(kp2 >= inter, "down: ", kp2, " inputs cannot hold ", inter, " intermediate features");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden, op, ": x must be [T, ", hidden, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
              ": x must be bfloat16 or float32");
  const int64_t tokens = x.size(0);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == tokens && ids.scalar_type() == at::kLong, op,
              ": ids must be int64 [T, k]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat, op,
              ": weights must be float32 like ids");
  check_int8_table(perm13, {experts, 2, hidden}, "perm13");
  check_int8_table(pos2, {experts, inter}, "pos2");
  if (h_static_scale.has_value())
    TORCH_CHECK(h_static_scale->dim() == 1 && h_static_scale->size(0) == experts &&
                    h_static_scale->scalar_type() == at::kFloat && h_static_scale->is_contiguous(),
                "h_static_scale must be contiguous float32 [", experts, "]");
  const int64_t* perm = perm13.has_value() ? perm13->data_ptr<int64_t>() : nullptr;
  const int64_t* hpos = pos2.has_value() ? pos2->data_ptr<int64_t>() : nullptr;
  const float* hstatic = h_static_scale.has_value() ? h_static_scale->data_ptr<float>() : nullptr;
  const int64_t k = ids.size(1), pairs = tokens * k;
  at::Tensor out = at::zeros({tokens, hidden}, x.options().dtype(at::kFloat));
  if (pairs == 0) return out;

  // 1. Counting sort of the pairs by expert (checked before any work).
  const at::Tensor wc = weights.contiguous();
  const PairsByExpert groups = group_pairs_by_expert(ids, experts, /*with_expert_of=*/hstatic != nullptr);
  const std::vector<int64_t>&start = groups.start, &pos = groups.pos, &token_of = groups.token_of;
  const std::vector<int64_t>&active = groups.active, &expert_of = groups.expert_of;
  const int64_t held = groups.held;  // pairs this call computes
  if (held == 0) return out;
  const int64_t n_active = static_cast<int64_t>(active.size());
  const bool wide13 = core.widens(gu.base), wide2 = core.widens(dn.base);

  // 0. x quantized once per token (every expert's gate and up read the same codes).
  const at::Tensor xc = x.contiguous();
  std::vector<int8_t> qx(static_cast<size_t>(tokens * kp13));
  std::vector<int32_t> unused(static_cast<size_t>(tokens));  // quantize_row's sums at group kp13
  std::vector<float> sx(static_cast<size_t>(tokens));
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int8_t* q = qx.data() + t * kp13;
      if (bf16) {
        core.quantize_row(reinterpret_cast<const int16_t*>(xc.data_ptr()) + t * hidden, hidden, kp13, kp13, divisor,
                          static_cast<float>(x_static_scale), q, &unused[t], &sx[t]);
      } else {
        core.quantize_row(xc.data_ptr<float>() + t * hidden, hidden, kp13, kp13, divisor,
                          static_cast<float>(x_static_scale), q, &unused[t], &sx[t]);
      }
    }
  });

  // 2. gate and up -> hf = silu(gate) * up in fp32 (columns past the intermediate size stay 0).
  std::vector<float> hf(static_cast<size_t>(held * kp2), 0.f);
  at::parallel_for(0, n_active * nb13, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> scratch(core.scratch_bytes(kp13));
    std::vector<float> tmp;
    int64_t held_expert = -1;  // the expert whose rows (gate's order, up's order) the thread holds
    std::vector<int8_t> xe, xeu;
    std::vector<int16_t> xe16, xeu16;
    std::vector<int32_t> se, seu;
    std::vector<float> sxe;
    auto gather = [&](int64_t e, int which, std::vector<int8_t>& dst, std::vector<int32_t>& sums,
                      std::vector<int16_t>& wide) {
      const int64_t rows = start[e + 1] - start[e];
      dst.resize(static_cast<size_t>(rows * kp13));
      sums.resize(static_cast<size_t>(rows * ng13));
      const int64_t* order = perm != nullptr ? perm + (e * 2 + which) * hidden : nullptr;
      for (int64_t q = start[e]; q < start[e + 1]; ++q) {
        const int8_t* src = qx.data() + token_of[q] * kp13;
        int8_t* row = dst.data() + (q - start[e]) * kp13;
        if (order == nullptr) {
          std::memcpy(row, src, static_cast<size_t>(kp13));
        } else {
          for (int64_t c = 0; c < kp13; ++c) row[c] = c < hidden ? src[order[c]] : 0;
        }
      }
      qsums(dst.data(), rows, ng13, group13, sums.data());
      if (wide13) {
        wide.resize(dst.size());
        core.widen(dst.data(), rows * kp13, wide.data());
      }
    };
    for (int64_t i = i0; i < i1;) {
      const int64_t e = active[i / nb13], j0 = i % nb13, j1 = std::min(nb13, j0 + (i1 - i));
      i += j1 - j0;
      const int64_t r0 = start[e], rows = start[e + 1] - r0, width = (j1 - j0) * 16, tw = 2 * width;
      if (e != held_expert) {
        held_expert = e;
        gather(e, 0, xe, se, xe16);
        if (perm != nullptr) gather(e, 1, xeu, seu, xeu16);
        sxe.resize(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) sxe[r] = sx[token_of[r0 + r]];
      }
      tmp.resize(static_cast<size_t>(rows * tw));
      const VLayout w = gu.expert(e);
      const Int8Rows gate_in{xe.data(), wide13 ? xe16.data() : nullptr, se.data(), sxe.data()};
      const Int8Rows up_in =
          perm != nullptr ? Int8Rows{xeu.data(), wide13 ? xeu16.data() : nullptr, seu.data(), sxe.data()} : gate_in;
      // Gate block j -> columns (j - j0) * 16 of tmp, up block nb13 + j -> width + (j - j0) * 16.
      core.blocks(w, gate_in, Out{tmp.data(), false, nullptr, tw, j0 * 16}, rows, j0, j1, scratch.data());
      core.blocks(w, up_in, Out{tmp.data(), false, nullptr, tw, (nb13 + j0) * 16 - width}, rows, nb13 + j0,
                  nb13 + j1, scratch.data());
      const int64_t live = std::min<int64_t>(width, inter - j0 * 16);
      for (int64_t r = 0; r < rows; ++r) {
        float* hrow = hf.data() + (r0 + r) * kp2;
        for (int64_t c = 0; c < live; ++c) {
          const float g = tmp[r * tw + c], u = tmp[r * tw + width + c];
          const int64_t f = j0 * 16 + c;
          hrow[hpos != nullptr ? hpos[e * inter + f] : f] = g / (1.f + std::exp(-g)) * u;
        }
      }
    }
  });

  // 3. h quantized per (token, expert) row.
  std::vector<int8_t> q2(static_cast<size_t>(held * kp2));
  std::vector<int16_t> q2w(static_cast<size_t>(wide2 ? held * kp2 : 0));
  std::vector<int32_t> sum2(static_cast<size_t>(held * ng2));
  std::vector<float> sx2(static_cast<size_t>(held));
  at::parallel_for(0, held, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const float scale = hstatic != nullptr ? hstatic[expert_of[q]] : 0.f;
      core.quantize_row(hf.data() + q * kp2, kp2, kp2, group2, divisor, scale, q2.data() + q * kp2,
                        sum2.data() + q * ng2, &sx2[q]);
      if (wide2) core.widen(q2.data() + q * kp2, kp2, q2w.data() + q * kp2);
    }
  });

  // 4. down, summed straight into out by the thread that owns the output columns, kDownRows pair
  //    rows at a time (bounded scratch whatever the routing).
  const float* wp = wc.data_ptr<float>();
  std::vector<float> wsorted(held);
  for (int64_t p = 0; p < pairs; ++p)
    if (pos[p] >= 0) wsorted[pos[p]] = wp[p];
  float* op_out = out.data_ptr<float>();
  int64_t most = 0;
  for (int64_t e : active) most = std::max(most, start[e + 1] - start[e]);
  constexpr int64_t kDownRows = 64;
  at::parallel_for(0, dn.base.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> scratch(core.scratch_bytes(kp2));
    const int64_t col0 = b0 * 16, width = std::min(hidden, b1 * 16) - col0, wstride = (b1 - b0) * 16;
    std::vector<float> tmp(static_cast<size_t>(std::min(kDownRows, most) * wstride));
    for (const int64_t e : active) {
      const VLayout w = dn.expert(e);
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kDownRows) {
        const int64_t rows = std::min(kDownRows, start[e + 1] - r0);
        const Int8Rows a{q2.data() + r0 * kp2, wide2 ? q2w.data() + r0 * kp2 : nullptr, sum2.data() + r0 * ng2,
                         sx2.data() + r0};
        core.blocks(w, a, Out{tmp.data(), false, nullptr, wstride, col0}, rows, b0, b1, scratch.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* o = op_out + token_of[r0 + r] * hidden + col0;
          const float* tr = tmp.data() + r * wstride;
          const float wt = wsorted[r0 + r];
          for (int64_t c = 0; c < width; ++c) o[c] += wt * tr[c];
        }
      }
    }
  });
  return out;
}

}  // namespace
