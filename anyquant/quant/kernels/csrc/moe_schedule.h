// A whole MoE layer's routed experts in one call, whatever the instruction set: the inputs, the
// routing, the work split over threads and the combination of the results. The dot products
// themselves come from a `Core` (the AVX-512 bf16 cores of gemv.h in cpu_moe.cpp, the AVX2 fp32
// FMA cores of gemv_avx2.h in cpu_moe_avx2.cpp), so both ops share this one schedule.
//
// Inputs: x [T, kp13] (the compute dtype, bf16 or fp32), the router's choice ids [T, k] int64 and
// weights [T, k] fp32, and every expert's weights stacked along a leading expert dimension,
// repacked once at load (gemv.h's layout):
//   w13: per expert, the gate projection's blocks of 16 rows followed by the up projection's
//        (2 * nb13 blocks, nb13 = ceil(inter / 16)); scales / zero points [E, 2 * nb13, ng, 16];
//   w2:  per expert, the down projection (ceil(hidden / 16) blocks) over kp2 >= inter inputs.
// out [T, hidden] fp32 = sum over a token's k slots of weight * down(silu(gate(x)) * up(x)).
// An id of -1 marks a slot whose expert this call does not hold (expert parallelism: another rank
// holds it); such slots contribute nothing and cost nothing.
// Optional per expert:
//   perm13 [E, 2, hidden] int64: act-order (GPTQ g_idx) gate / up, packed with their inputs sorted
//        by group: packed column c of the gate (up) multiplies x column perm13[e, 0 (1), c]; x is
//        gathered once per order;
//   pos2 [E, inter] int64: act-order down, intermediate feature i sits at packed column pos2[e, i];
//   off13 [E, 2, ng13, inter] (gate, up) / off2 [E, ng2, hidden] fp32: float offsets per (group,
//        row) (GGUF k-quant minimums, value = code * scale + offset), added as offset * (sum of
//        the group's inputs); the layout of each expert's own kernel, so the two share one copy.
// Quantized activations of the down projection (act2 = 1: fp8 e4m3, 2: fp8 e5m2, 3: int8): h is
// quantized as the reference's fake_quantize_activations does (scale = max(amax, 1e-10) /
// act_qmax per pair row, or per group of act_group features; or the expert's static
// act_scale2[e]). The gate / up input is quantized by the caller (one quantization for all
// experts). int8 keeps the integer codes in the dot products and scales the results instead:
// x_scale [T] fp32 multiplies token t's gate and up outputs (x holds the codes), and each pair's
// down output is multiplied by its h scale.
//
// Steps, each one parallel region over the intra-op threads:
//   1. group the (token, slot) pairs by expert with a counting sort (moe_routing.h); each expert's
//      rows of x are gathered by the thread that runs it (step 2);
//   2. gate and up: work items (expert, block j of 16 intermediate rows): gate block j and up
//      block j against all of the expert's rows, then silu(gate) * up in fp32 -> h; a thread's
//      consecutive items of one expert run together (one core call per run at few rows);
//   3. down: each thread owns a range of blocks of 16 output columns and adds, expert by expert,
//      weight * down(h) of every pair into out (no per-pair result buffer, no write conflicts).
// With a few tokens (decode) every chosen expert contributes dozens of items, so all threads
// stream weights; with many (prefill) an item's block is decoded once for all the expert's rows.
// Every element of out sees the same operations in the same order at any thread count.
//
// The Core (one object per call):
//   using X;  static constexpr at::ScalarType kXType;  the rows the dot products read (x, h)
//   int parts;  rows of X per token row (the AVX-512 core splits fp32 into three bf16 parts)
//   void put(float v, X* dst, int64_t stride): v as `parts` rows `stride` elements apart
//   bool wants_sums(const Layout&, bool offsets): whether the core needs per-span sums of the rows
//   void sums(const X* rows, int64_t n, int64_t kp, int64_t span, float* out): fp32 sums per span
//   size_t scratch_bytes(int64_t kp): per-thread scratch for `blocks`
//   void blocks(const Layout&, const X* x, const float* xsum, int64_t rows, int64_t b0, int64_t b1,
//               float* out, int64_t out_stride, int64_t col_shift, uint8_t* scratch):
//        out[r, b * 16 - col_shift + c] = row r of x . row c of block b, fp32, b in [b0, b1)
#pragma once

#include "gemv.h"
#include "moe_routing.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <cmath>
#include <type_traits>

namespace {

// One stacked weight: expert e's layout is the base layout shifted by e strides.
struct Stacked {
  Layout base;
  int64_t packed_stride = 0;  // bytes per expert
  int64_t scale_stride = 0;   // floats per expert (scales and zero points)

  Layout expert(int64_t e) const {
    Layout w = base;
    w.packed += e * packed_stride;
    w.scale += e * scale_stride;
    if (w.zz != nullptr) w.zz += e * scale_stride;
    return w;
  }
};

inline Stacked make_stacked(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zz,
                            const at::Tensor& lut, int64_t fmt, int64_t group, int64_t n, int64_t experts,
                            const char* what) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == experts && packed.is_contiguous(), what,
              ": packed weights must be contiguous [", experts, " experts, bytes]");
  TORCH_CHECK(scale.dim() == 4 && scale.size(0) == experts && scale.is_contiguous(), what,
              ": scales must be contiguous [", experts, " experts, blocks, groups, 16]");
  c10::optional<at::Tensor> zz0;
  if (zz.has_value()) {
    TORCH_CHECK(zz->sizes() == scale.sizes() && zz->is_contiguous(), what, ": zero points must be shaped like the scales");
    zz0 = (*zz)[0];
  }
  Stacked s;
  s.base = make_layout(packed[0], scale[0], zz0, lut, fmt, group, n);
  s.packed_stride = packed.size(1);
  s.scale_stride = scale[0].numel();
  return s;
}

// Float offsets of `cols` output rows (off[g * gstride + c]: group g, row c) times the rows' group
// sums, added to out [rows, out_stride] at columns col0... xs [rows, ng * spg] holds the sums per
// span of the vector path (spg spans per group; one row per part row).
inline void add_offsets(const float* off, int64_t gstride, int64_t ng, const float* xs, int64_t spg, int64_t rows,
                        float* out, int64_t out_stride, int64_t col0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * ng * spg;
    float* o = out + r * out_stride + col0;
    for (int64_t g = 0; g < ng; ++g) {
      float xg = 0.f;
      for (int64_t q = 0; q < spg; ++q) xg += xr[g * spg + q];
      const float* og = off + g * gstride;
      for (int64_t c = 0; c < cols; ++c) o[c] += og[c] * xg;
    }
  }
}

inline void check_expert_table(const c10::optional<at::Tensor>& t, at::IntArrayRef shape, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == at::kLong && t->is_contiguous(), what,
              " must be contiguous int64 ", shape);
}

inline void check_offsets(const c10::optional<at::Tensor>& off, at::IntArrayRef shape, const char* what) {
  if (!off.has_value()) return;
  TORCH_CHECK(off->sizes() == shape && off->scalar_type() == at::kFloat && off->is_contiguous(), what,
              ": offsets must be contiguous float32 ", shape);
}

// Per-span sums of `rows` rows of X [rows, kp] (core.sums over the threads).
template <class Core>
at::Tensor span_sums_of(const Core& core, const at::Tensor& rows, int64_t span) {
  const int64_t n = rows.size(0), kp = rows.size(1);
  at::Tensor sums = at::empty({n, kp / span}, rows.options().dtype(at::kFloat));
  const auto* x = static_cast<const typename Core::X*>(rows.data_ptr());
  float* dst = sums.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) { core.sums(x + r0 * kp, r1 - r0, kp, span, dst + r0 * (kp / span)); });
  return sums;
}

template <class Core>
at::Tensor moe_experts_impl(const Core& core, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                            const at::Tensor& w13, const at::Tensor& s13, const c10::optional<at::Tensor>& z13,
                            const at::Tensor& w2, const at::Tensor& s2, const c10::optional<at::Tensor>& z2,
                            const at::Tensor& lut, int64_t fmt, int64_t group13, int64_t group2, int64_t inter,
                            int64_t hidden, const c10::optional<at::Tensor>& perm13,
                            const c10::optional<at::Tensor>& pos2, const c10::optional<at::Tensor>& off13,
                            const c10::optional<at::Tensor>& off2, int64_t act2, double act_qmax, double act_top,
                            int64_t act_group, const c10::optional<at::Tensor>& act_scale2,
                            const c10::optional<at::Tensor>& x_scale) {
  using X = typename Core::X;
  TORCH_CHECK(inter > 0 && hidden > 0, "inter and hidden must be positive");
  const int64_t experts = w13.size(0);
  const int64_t nb13 = (inter + 15) / 16;
  const Stacked gu = make_stacked(w13, s13, z13, lut, fmt, group13, 2 * nb13 * 16, experts, "gate/up");
  TORCH_CHECK(gu.base.blocks == 2 * nb13, "gate/up: expected ", 2 * nb13, " blocks of 16 rows, got ", gu.base.blocks);
  const Stacked dn = make_stacked(w2, s2, z2, lut, fmt, group2, hidden, experts, "down");
  TORCH_CHECK(dn.base.kp >= inter, "down: ", dn.base.kp, " inputs cannot hold ", inter, " intermediate features");
  const int64_t kp13 = gu.base.kp, kp2 = dn.base.kp;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == kp13, "x must be [T, ", kp13, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  const int64_t tokens = x.size(0);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == tokens && ids.scalar_type() == at::kLong, "ids must be int64 [T, k]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat, "weights must be float32 like ids");
  check_expert_table(perm13, {experts, 2, hidden}, "perm13");
  check_expert_table(pos2, {experts, inter}, "pos2");
  check_offsets(off13, {experts, 2, gu.base.ng, inter}, "gate/up");
  check_offsets(off2, {experts, dn.base.ng, hidden}, "down");
  const int64_t* perm = perm13.has_value() ? perm13->data_ptr<int64_t>() : nullptr;
  const int64_t* hpos = pos2.has_value() ? pos2->data_ptr<int64_t>() : nullptr;
  const float* o13 = off13.has_value() ? off13->data_ptr<float>() : nullptr;
  const float* o2 = off2.has_value() ? off2->data_ptr<float>() : nullptr;
  TORCH_CHECK(act2 >= 0 && act2 <= 3, "act2 must be 0 (none), 1 (fp8_e4m3), 2 (fp8_e5m2) or 3 (int8)");
  TORCH_CHECK(act2 == 0 || act_qmax > 0, "act_qmax must be positive");
  TORCH_CHECK(act_group >= 0, "act_group must be >= 0");
  if (act_scale2.has_value())
    TORCH_CHECK(act_scale2->dim() == 1 && act_scale2->size(0) == experts && act_scale2->scalar_type() == at::kFloat &&
                    act_scale2->is_contiguous(),
                "act_scale2 must be contiguous float32 [", experts, "]");
  const bool quant2 = act2 != 0;
  TORCH_CHECK(act2 != 3 || act_group == 0, "int8 activations take one scale per row");
  if (x_scale.has_value())
    TORCH_CHECK(x_scale->dim() == 1 && x_scale->size(0) == x.size(0) && x_scale->scalar_type() == at::kFloat &&
                    x_scale->is_contiguous(),
                "x_scale must be contiguous float32 [T]");
  const float* xscale = x_scale.has_value() ? x_scale->data_ptr<float>() : nullptr;
  const int64_t k = ids.size(1), pairs = tokens * k;
  const int parts = core.parts;
  at::Tensor out = at::zeros({tokens, hidden}, x.options().dtype(at::kFloat));
  if (pairs == 0) return out;

  // 1. Counting sort of the pairs by expert; pos[p] = where pair p = t * k + j sits.
  const at::Tensor wc = weights.contiguous();
  const PairsByExpert groups = group_pairs_by_expert(ids, experts, /*with_expert_of=*/act_scale2.has_value());
  const std::vector<int64_t>&start = groups.start, &pos = groups.pos, &token_of = groups.token_of;
  const std::vector<int64_t>&active = groups.active, &expert_of = groups.expert_of;
  const int64_t held = groups.held;  // pairs this call computes
  if (held == 0) return out;
  const int64_t n_active = static_cast<int64_t>(active.size());

  // Expert e's rows of x (its pairs' tokens, in pair order) as the core's rows into dst
  // [parts * rows, kp13]; with act-order in the gate's (which = 0) or the up's (1) input order.
  // Gathered per expert by the thread that runs it, not for all pairs at once: at a 2048-token
  // prefill chunk with 8 slots the whole gather was 64 MiB of bf16 rows.
  const at::Tensor xc = x.contiguous();
  const bool x_bf16 = xc.scalar_type() == at::kBFloat16;
  auto gather = [&](int64_t e, int which, X* dst) {
    // Packed column c reads input order[c]; columns past `hidden` are x's zero padding.
    const int64_t* order = perm != nullptr ? perm + (e * 2 + which) * hidden : nullptr;
    for (int64_t q = start[e]; q < start[e + 1]; ++q) {
      X* row = dst + parts * (q - start[e]) * kp13;
      if (order == nullptr && parts == 1 && xc.scalar_type() == Core::kXType) {  // the same words
        std::memcpy(row, static_cast<const X*>(xc.data_ptr()) + token_of[q] * kp13, kp13 * sizeof(X));
        continue;
      }
      const auto* xb = static_cast<const c10::BFloat16*>(xc.data_ptr()) + token_of[q] * kp13;
      const auto* xf = static_cast<const float*>(xc.data_ptr()) + token_of[q] * kp13;
      for (int64_t c = 0; c < kp13; ++c) {
        const int64_t from = order != nullptr && c < hidden ? order[c] : c;
        core.put(x_bf16 ? static_cast<float>(xb[from]) : xf[from], row + c, kp13);
      }
    }
  };
  const bool sums13 = core.wants_sums(gu.base, o13 != nullptr);
  const int64_t span13 = gu.base.span, spg13 = group13 / span13;  // sums per span (gemv.h)

  // 2. gate and up -> h = silu(gate) * up, as the core's rows [parts * pairs, kp2]; columns past
  //    the intermediate size stay zero (padded gate / up rows give exact zeros, the rest is cleared).
  const int64_t hcols = std::min(kp2, nb13 * 16);
  const auto hopt = x.options().dtype(Core::kXType);
  at::Tensor h = kp2 > nb13 * 16 ? at::zeros({parts * held, kp2}, hopt) : at::empty({parts * held, kp2}, hopt);
  auto* hp = static_cast<X*>(h.data_ptr());
  // With quantized activations h stays fp32 until every feature of a row is known (amax per row).
  at::Tensor hf = quant2 ? at::zeros({held, kp2}, x.options().dtype(at::kFloat)) : at::Tensor();
  float* hfp = quant2 ? hf.data_ptr<float>() : nullptr;
  at::parallel_for(0, n_active * nb13, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> scratch(core.scratch_bytes(kp13));
    std::vector<float> tmp;
    const int64_t ng = gu.base.ng;
    const int64_t nspans = gu.base.nspans;
    // The expert whose rows of x (and their span sums) the thread holds: gate's order, up's order.
    int64_t held_expert = -1;
    std::vector<X> xe, xeu;
    std::vector<float> se, seu;
    // The thread's items as runs of consecutive blocks j0..j1 of one expert: gate blocks j0..j1
    // go to columns [0, width) of tmp, up blocks to [width, 2 width).
    for (int64_t i = i0; i < i1;) {
      const int64_t e = active[i / nb13], j0 = i % nb13, j1 = std::min(nb13, j0 + (i1 - i));
      i += j1 - j0;
      const int64_t r0 = start[e], rows = start[e + 1] - r0, width = (j1 - j0) * 16, tw = 2 * width;
      tmp.resize(static_cast<size_t>(parts * rows * tw));
      if (e != held_expert) {
        held_expert = e;
        xe.resize(static_cast<size_t>(parts * rows * kp13));
        gather(e, 0, xe.data());
        if (perm != nullptr) {
          xeu.resize(xe.size());
          gather(e, 1, xeu.data());
        }
        if (sums13) {
          se.resize(static_cast<size_t>(parts * rows * nspans));
          core.sums(xe.data(), parts * rows, kp13, span13, se.data());
          if (perm != nullptr) {
            seu.resize(se.size());
            core.sums(xeu.data(), parts * rows, kp13, span13, seu.data());
          }
        }
      }
      const X* xu = perm != nullptr ? xeu.data() : xe.data();
      const float* xs = sums13 ? se.data() : nullptr;
      const float* xsu = sums13 ? (perm != nullptr ? seu.data() : se.data()) : nullptr;
      const Layout we = gu.expert(e);
      // gate block j -> column (j - j0) * 16; up block nb13 + j -> column width + (j - j0) * 16
      core.blocks(we, xe.data(), xs, parts * rows, j0, j1, tmp.data(), tw, j0 * 16, scratch.data());
      core.blocks(we, xu, xsu, parts * rows, nb13 + j0, nb13 + j1, tmp.data(), tw, (nb13 + j0) * 16 - width,
                  scratch.data());
      if (o13 != nullptr) {  // padded rows past `inter` keep their exact zeros
        const int64_t live = std::min<int64_t>(width, inter - j0 * 16);
        const float* oe = o13 + e * 2 * ng * inter + j0 * 16;
        add_offsets(oe, inter, ng, xs, spg13, parts * rows, tmp.data(), tw, 0, live);
        add_offsets(oe + ng * inter, inter, ng, xsu, spg13, parts * rows, tmp.data(), tw, width, live);
      }
      const int64_t cols = std::min<int64_t>(width, hcols - j0 * 16);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          float g = 0.f, u = 0.f;
          for (int s = 0; s < parts; ++s) {
            g += tmp[(parts * r + s) * tw + c];
            u += tmp[(parts * r + s) * tw + width + c];
          }
          if (xscale != nullptr) {
            g *= xscale[token_of[r0 + r]];
            u *= xscale[token_of[r0 + r]];
          }
          const float v = g / (1.f + std::exp(-g)) * u;
          const int64_t f = j0 * 16 + c;  // intermediate feature; act-order down reads it elsewhere
          const int64_t col = hpos != nullptr && f < inter ? hpos[e * inter + f] : f;
          if (quant2) {
            hfp[(r0 + r) * kp2 + col] = v;
          } else {
            core.put(v, hp + parts * (r0 + r) * kp2 + col, kp2);
          }
        }
      }
    }
  });
  std::vector<float> hscale(act2 == 3 ? held : 0);  // int8: each pair row's h scale
  if (quant2) {
    const int64_t width = act_group > 0 ? act_group : kp2;
    at::parallel_for(0, held, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        float* row = hfp + q * kp2;
        for (int64_t c0 = 0; c0 < kp2; c0 += width) {
          const int64_t c1 = std::min(kp2, c0 + width);
          float scale;
          if (act_scale2.has_value()) {
            scale = act_scale2->data_ptr<float>()[expert_of[q]];
          } else {
            float amax = 0.f;
            for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(row[c]));
            scale = std::max(amax, 1e-10f) / static_cast<float>(act_qmax);
          }
          const float top = static_cast<float>(act_top);
          for (int64_t c = c0; c < c1; ++c) {
            float fq;
            if (act2 == 3) {  // int8: round half to even (torch.round), clamp; the code itself
              fq = std::min(std::max(std::nearbyint(row[c] / scale), -128.f), 127.f);
              hscale[q] = scale;
              core.put(fq, hp + parts * q * kp2 + c, kp2);
              continue;
            }
            const float z = std::min(std::max(row[c] / scale, -top), top);  // fp8: clamp, then cast
            fq = act2 == 1 ? static_cast<float>(c10::Float8_e4m3fn(z)) : static_cast<float>(c10::Float8_e5m2(z));
            core.put(fq * scale, hp + parts * q * kp2 + c, kp2);
          }
        }
      }
    });
  }
  at::Tensor xs2;
  if (core.wants_sums(dn.base, o2 != nullptr)) xs2 = span_sums_of(core, h, dn.base.span);

  // 3. down, summed straight into out: each thread owns a range of output blocks (columns of out),
  //    so no element has two writers and no [pairs, hidden] buffer of per-pair results exists (at a
  //    2048-token prefill chunk with 8 slots that buffer was 128 MiB of fp32, kept resident by the
  //    allocator between steps). Per thread, expert by expert (in id order, as the per-expert path
  //    adds them) and kDownRows pair rows at a time: the rows' h stays in cache across the thread's
  //    blocks, and the thread's scratch is bounded whatever the routing.
  const float* wp = wc.data_ptr<float>();
  std::vector<float> wsorted(held);  // each pair's router weight, in pair (sorted) order
  for (int64_t p = 0; p < pairs; ++p)
    if (pos[p] >= 0) wsorted[pos[p]] = wp[p];
  float* op = out.data_ptr<float>();
  const int64_t nb2 = dn.base.blocks, ng2 = dn.base.ng, nspans2 = dn.base.nspans;
  int64_t most = 0;  // the most pair rows one expert holds
  for (int64_t e : active) most = std::max(most, start[e + 1] - start[e]);
  constexpr int64_t kDownRows = 64;
  at::parallel_for(0, nb2, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> scratch(core.scratch_bytes(kp2));
    const int64_t col0 = b0 * 16, width = std::min(hidden, b1 * 16) - col0, wstride = (b1 - b0) * 16;
    std::vector<float> tmp(static_cast<size_t>(parts * std::min(kDownRows, most) * wstride));
    for (const int64_t e : active) {
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kDownRows) {
        const int64_t rows = std::min(kDownRows, start[e + 1] - r0);
        const float* xs = xs2.defined() ? xs2.data_ptr<float>() + parts * r0 * nspans2 : nullptr;
        // block b -> columns b * 16 - col0 of tmp
        core.blocks(dn.expert(e), hp + parts * r0 * kp2, xs, parts * rows, b0, b1, tmp.data(), wstride, col0,
                    scratch.data());
        if (o2 != nullptr)
          add_offsets(o2 + e * ng2 * hidden + col0, hidden, ng2, xs, nspans2 / ng2, parts * rows, tmp.data(),
                      wstride, 0, width);
        for (int64_t r = 0; r < rows; ++r) {
          float* o = op + token_of[r0 + r] * hidden + col0;
          const float* tr = tmp.data() + parts * r * wstride;
          const float w = wsorted[r0 + r];
          const float sc = act2 == 3 ? hscale[r0 + r] : 1.f;  // int8: the codes' product times h's scale
          for (int64_t c = 0; c < width; ++c) {
            float v = tr[c];
            for (int s = 1; s < parts; ++s) v += tr[s * wstride + c];
            if (act2 == 3) v *= sc;
            o[c] += w * v;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace
