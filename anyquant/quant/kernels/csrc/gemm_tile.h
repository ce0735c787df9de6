#pragma once

// The many-rows path (prompts, batches) of the weight-only linear kernel: a register-blocked
// GEMM over the repacked weights of gemv.h, for bf16 x.
//
// Blocking (Zen 4: 32 KiB L1d, 1 MiB L2 per core; vdpbf16ps zmm at one per cycle per core,
// 64 flops: 235 GFLOP/s per core at 3.67 GHz, measured):
//   - work units: a panel of kNB blocks of 16 outputs (64 columns) x a chunk of kMC rows of x;
//     the threads share the units (N split first, rows too when N is small);
//   - per unit and K-block of `kc` inputs, the panel's weights are decoded once with the exact
//     decoders into a bf16 buffer in vdpbf16ps's pair layout, [kc / 2 pairs][kNB blocks][32
//     words] = kc * 128 bytes, so decoding costs 1 / kMC of the multiplications (~1.5 %);
//   - the K-block is cut into segments (gemm_segment: the group, or up to 512 inputs for one
//     scale per row, the last shorter); per segment every row tile of the chunk runs over the same seg * 128 bytes
//     of weights (16 KiB for groups of 128: L1), with the segment's scales loaded once;
//   - the micro-kernel keeps kMR rows x kNB blocks = 24 fp32 accumulators in zmm registers; per
//     pair of inputs it loads kNB weight vectors and broadcasts each row's (x[k], x[k+1]) from x
//     itself (rows read in place: no packing pass; the next tile's rows are prefetched), then
//     runs 24 vdpbf16ps. 4 vector loads + 6 broadcasts per 24 dot products: alone in a loop this
//     runs at the measured peak (the vector path's 8-row core broadcasts one pair per 4 dot
//     products and decodes into a buffer per block of 16 outputs: ~0.9x oneDNN at 512 rows);
//   - at the end of a segment each tile's sums are scaled into the running result, an fp32
//     buffer of the unit ([kMC rows][64], L2): + scale * sum, and at a group's first segment
//     - zz * scale * sum(x over the group), as the vector path does; the last segment adds the bias and stores bf16. Each
//     segment restarts the accumulators and costs 24 loads and stores: the reason segments are
//     as long as the scales allow. The weights are never rounded: exact weight values times bf16
//     x summed in fp32, one rounding of the output (the vector path's numerics).
// fp32 x stays on the vector path and the tile path (three bf16 passes would triple the work).

#include "gemv.h"

namespace {

constexpr int kMR = 6;              // rows of x per micro-tile
constexpr int kNB = 4;              // blocks of 16 outputs per micro-tile
constexpr int64_t kKC = 128;        // least inputs per K-block (whole segments)
constexpr int64_t kMaxSegment = 512;  // longest segment between scalings (one scale per row)
constexpr int64_t kMC = 256;         // rows of x per work unit
constexpr int64_t kPairBytes = 64;  // one block's 32 bf16 words for one pair of inputs

struct GemmArgs {
  Layout w;
  const int16_t* x;    // bf16 [m, kp]
  int64_t m;
  const float* xsum;   // [m, ng] sums of x per group: with zero points only
  const float* bias;   // fp32 [n] or nullptr
  int16_t* out;        // bf16 [m, n]
  int64_t seg;         // inputs summed between scalings (gemm_segment)
  int64_t kc;          // inputs per K-block, a multiple of seg
  bool fold;           // scales and zero points folded into the decoded panel (gemm_folds)
};

// Small groups (AWQ/GPTQ's 32 or 64) over many rows: restarting the 24 accumulators at every
// group costs a quarter of the dot products at groups of 32 (measured 0.83-0.92x oneDNN at
// M = 512, g32, against 0.98-1.05x at g128). With enough rows to pay for it, the panel is
// decoded to bf16((v - zz) * scale) instead, the reference kernel's dequantized weight (fp32
// product, one rounding to bf16), and the K-block runs without scalings. Few rows keep the
// exact weights: per row the flushes are cheap and the extra decoding would not be repaid.
constexpr int64_t kFoldMaxGroup = 64;
constexpr int64_t kFoldMinRows = 64;
inline bool gemm_folds(const Layout& w, int64_t m) {
  return w.ng > 1 && w.group <= kFoldMaxGroup && m >= kFoldMinRows;
}

// The segment: for groups of several per row (AWQ/GPTQ's 32..128) the longest multiple of 8 that
// divides the group, up to 128 inputs (the group itself); for one group per row (per-channel /
// per-tensor scales) kMaxSegment inputs, the row's last segment shorter (the K-block's weights
// then take up to 64 KiB: L2). Measured on Zen 4 (int8 per-channel 896 x 896, M = 512, one
// thread): segments of 448 inputs 1.05x faster than 128.
inline int64_t gemm_segment(const Layout& w, bool fold) {
  if (w.ng == 1 || fold) return std::min(w.kp, kMaxSegment);
  for (int64_t s = std::min<int64_t>(w.group, 128) / 8 * 8; s > 8; s -= 8)
    if (w.group % s == 0) return s;
  return 8;
}

// The K-block: whole segments, at least kKC inputs.
inline int64_t gemm_kc(int64_t seg) { return std::max<int64_t>(1, kKC / seg) * seg; }

// Where one K-block's weights and results are.
struct Tile {
  const uint8_t* b;        // decoded words of pair 0 of this K-block, block 0 of the panel
  int64_t pair_stride;     // bytes from one pair of inputs to the next
  int64_t block_stride;    // bytes from one block to the next
  int64_t blk0;            // the panel's first block
  float* c;                // running result of row r0, [rows][kNB * 16]
  int64_t r0;              // the unit's first row
  int64_t k0, klen;        // the K-block
  bool first, last;        // the first / last K-block of the layer
};

// The segment's per-block constants: scales, zero points times scales, bias, output masks.
template <int NB>
struct SegmentConsts {
  __m512 s[NB], zs[NB], bias[NB];
  __mmask16 mask[NB];
};

// One tile's segment sums into the running result (fp32 buffer) or, for the layer's last
// segment, plus bias into the bf16 output; ZZ (the first segment of a group with zero points):
// minus zz * scale * the group's sum of x. A template per case so that the 24 accumulators stay
// in registers and the loop carries no per-element branches.
template <int MR, int NB, bool ZZ, bool FIRST, bool LAST>
AQ_TARGET __attribute__((always_inline)) inline void flush(const __m512 (&acc)[MR][NB], const SegmentConsts<NB>& k,
                                                           const float* xsum, int64_t ng, float* c, int16_t* out,
                                                           int64_t n) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m512 xs = ZZ ? _mm512_set1_ps(xsum[m * ng]) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      __m512 r;
      if constexpr (FIRST) {
        r = LAST ? _mm512_fmadd_ps(acc[m][j], k.s[j], k.bias[j]) : _mm512_mul_ps(acc[m][j], k.s[j]);
      } else {
        r = _mm512_loadu_ps(c + m * (kNB * 16) + j * 16);
        if constexpr (LAST) r = _mm512_add_ps(r, k.bias[j]);
        r = _mm512_fmadd_ps(acc[m][j], k.s[j], r);
      }
      if constexpr (ZZ) r = _mm512_fnmadd_ps(k.zs[j], xs, r);
      if constexpr (LAST) {
        _mm256_mask_storeu_epi16(out + m * n + j * 16, k.mask[j], reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r)));
      } else {
        _mm512_storeu_ps(c + m * (kNB * 16) + j * 16, r);
      }
    }
  }
}

// Rows m0 .. m0 + tiles * MR against NB blocks over the K-block, one segment at a time: per
// segment every row tile runs over the same 16 KiB of weights (L1), with the segment's scales,
// zero points, bias and masks loaded once.
template <int MR, int NB, bool ZZ>
AQ_TARGET void micro_kernel(const GemmArgs& a, const Tile& t, int64_t m0, int64_t tiles) {
  const Layout& w = a.w;
  const int64_t kp2 = w.kp / 2, end = t.k0 + t.klen;
  const auto* x32 = reinterpret_cast<const int32_t*>(a.x);
  for (int64_t seg = t.k0; seg < end; seg += a.seg) {
    const int64_t g = seg / w.group, len = std::min(a.seg, end - seg);
    const bool first = t.first && seg == t.k0, last = t.last && seg + len == end;
    const bool zz_now = ZZ && seg % w.group == 0;  // segments never straddle groups
    SegmentConsts<NB> k;
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const int64_t b = t.blk0 + j;
      k.s[j] = a.fold ? _mm512_set1_ps(1.0f) : _mm512_loadu_ps(w.scale + (b * w.ng + g) * 16);
      k.zs[j] = ZZ ? _mm512_mul_ps(k.s[j], _mm512_loadu_ps(w.zz + (b * w.ng + g) * 16)) : _mm512_setzero_ps();
      const int64_t valid = std::min<int64_t>(16, w.n - b * 16);
      k.mask[j] = static_cast<__mmask16>((1u << valid) - 1u);
      k.bias[j] = (last && a.bias) ? _mm512_maskz_loadu_ps(k.mask[j], a.bias + b * 16) : _mm512_setzero_ps();
    }
    const uint8_t* b_seg = t.b + (seg - t.k0) / 2 * t.pair_stride;
    const int64_t p0 = seg / 2, p1 = (seg + len) / 2;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t mt = m0 + tile * MR;
      const int32_t* xr[MR];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) xr[m] = x32 + (mt + m) * kp2;
      __m512 acc[MR][NB];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
      const uint8_t* bp = b_seg;
      // The next tile's rows of x are prefetched as this tile runs, one cache line (16 pairs) of
      // each row per 16 pairs: six short runs of x that the hardware prefetcher does not catch
      // in time when x comes from L3 (large K; measured 1.02-1.03x on Llama-3.2-1B's down
      // projection, level elsewhere).
      const bool prefetch = tile + 1 < tiles;
      for (int64_t p = p0; p < p1; ++p, bp += t.pair_stride) {
        if (prefetch && (p & 15) == 0) {
#pragma GCC unroll 8
          for (int m = 0; m < MR; ++m) _mm_prefetch(reinterpret_cast<const char*>(xr[m] + MR * kp2 + p), _MM_HINT_T0);
        }
        __m512i bw[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) bw[j] = _mm512_loadu_si512(bp + j * t.block_stride);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xr[m][p]));
#pragma GCC unroll 4
          for (int j = 0; j < NB; ++j)
            acc[m][j] = _mm512_dpbf16_ps(acc[m][j], reinterpret_cast<__m512bh>(bw[j]), xv);
        }
      }
      // Segment done: scale it into the running result, or (last) into the output.
      const float* xs = ZZ ? a.xsum + mt * w.ng + g : nullptr;
      float* c = t.c + (mt - t.r0) * (kNB * 16);
      int16_t* out = a.out + mt * w.n + t.blk0 * 16;
      const int which = (zz_now ? 4 : 0) | (first ? 2 : 0) | (last ? 1 : 0);
      switch (which) {
        case 0: flush<MR, NB, false, false, false>(acc, k, xs, w.ng, c, out, w.n); break;
        case 1: flush<MR, NB, false, false, true>(acc, k, xs, w.ng, c, out, w.n); break;
        case 2: flush<MR, NB, false, true, false>(acc, k, xs, w.ng, c, out, w.n); break;
        case 3: flush<MR, NB, false, true, true>(acc, k, xs, w.ng, c, out, w.n); break;
        case 4: flush<MR, NB, ZZ, false, false>(acc, k, xs, w.ng, c, out, w.n); break;
        case 5: flush<MR, NB, ZZ, false, true>(acc, k, xs, w.ng, c, out, w.n); break;
        case 6: flush<MR, NB, ZZ, true, false>(acc, k, xs, w.ng, c, out, w.n); break;
        default: flush<MR, NB, ZZ, true, true>(acc, k, xs, w.ng, c, out, w.n); break;
      }
    }
  }
}

template <int MR, int NB>
void micro_zz(const GemmArgs& a, const Tile& t, int64_t m0, int64_t tiles) {
  if (a.w.zz != nullptr && !a.fold) return micro_kernel<MR, NB, true>(a, t, m0, tiles);
  return micro_kernel<MR, NB, false>(a, t, m0, tiles);
}

template <int MR>
void micro_blocks(const GemmArgs& a, const Tile& t, int64_t m0, int64_t tiles, int64_t nb) {
  switch (nb) {
    case 1: return micro_zz<MR, 1>(a, t, m0, tiles);
    case 2: return micro_zz<MR, 2>(a, t, m0, tiles);
    case 3: return micro_zz<MR, 3>(a, t, m0, tiles);
    default: return micro_zz<MR, 4>(a, t, m0, tiles);
  }
}

// Rows r0 .. r1: whole tiles of kMR rows, then one tile of the rest.
inline void micro_rows(const GemmArgs& a, const Tile& t, int64_t r0, int64_t r1, int64_t nb) {
  const int64_t full = (r1 - r0) / kMR, rest = (r1 - r0) % kMR, tail = r0 + full * kMR;
  if (full > 0) micro_blocks<kMR>(a, t, r0, full, nb);
  switch (rest) {
    case 1: return micro_blocks<1>(a, t, tail, 1, nb);
    case 2: return micro_blocks<2>(a, t, tail, 1, nb);
    case 3: return micro_blocks<3>(a, t, tail, 1, nb);
    case 4: return micro_blocks<4>(a, t, tail, 1, nb);
    case 5: return micro_blocks<5>(a, t, tail, 1, nb);
    default: return;
  }
}
static_assert(kMR == 6, "micro_rows handles tails of up to 5 rows");

// One vector of pair words (word 2i + t = row i, input k + t) of exact values v -> bf16((v - zz) *
// scale), with the 16 rows' scale and zz spread over the pairs (lo: rows 0..7, hi: rows 8..15).
struct PairConsts {
  __m512 s_lo, s_hi, z_lo, z_hi;
};

AQ_TARGET inline __m512i fold_pairs(__m512i words, const PairConsts& c) {
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), 16));
  const __m512 hi =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), 16));
  const __m512 flo = _mm512_mul_ps(_mm512_sub_ps(lo, c.z_lo), c.s_lo);
  const __m512 fhi = _mm512_mul_ps(_mm512_sub_ps(hi, c.z_hi), c.s_hi);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(fhi, flo));
}

AQ_TARGET inline PairConsts pair_consts(const Layout& w, int64_t b, int64_t g) {
  const __m512i idx_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i idx_hi = _mm512_add_epi32(idx_lo, _mm512_set1_epi32(8));
  const __m512 s = _mm512_loadu_ps(w.scale + (b * w.ng + g) * 16);
  const __m512 z = w.zz != nullptr ? _mm512_loadu_ps(w.zz + (b * w.ng + g) * 16) : _mm512_setzero_ps();
  return PairConsts{_mm512_permutexvar_ps(idx_lo, s), _mm512_permutexvar_ps(idx_hi, s),
                    _mm512_permutexvar_ps(idx_lo, z), _mm512_permutexvar_ps(idx_hi, z)};
}

// Blocks blk0 .. blk0 + nb, inputs k0 .. k0 + klen (multiples of 8) decoded to bf16 words,
// [klen / 2 pairs][kNB][32 words]: the exact values, or FOLD: bf16((v - zz) * scale).
template <int64_t FMT, bool FOLD>
AQ_TARGET void decode_panel(const Layout& w, int64_t blk0, int64_t nb, int64_t k0, int64_t klen, uint8_t* dst) {
  const Tables tb = load_tables(w.lut);
  constexpr int64_t step = 2 * bytes_per_4k(FMT);  // bytes per 8 inputs of one block
  const int64_t block_bytes = w.kp / 4 * bytes_per_4k(FMT);
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* p = w.packed + (blk0 + j) * block_bytes + k0 / 8 * step;
    uint8_t* d = dst + j * kPairBytes;
    PairConsts c{};
    for (int64_t k = 0; k < klen; k += 8, p += step, d += 4 * kNB * kPairBytes) {
      Words wv = decode8<FMT>(p, tb);
      if constexpr (FOLD) {
        if ((k0 + k) % w.group == 0 || k == 0) c = pair_consts(w, blk0 + j, (k0 + k) / w.group);
        wv.w0 = fold_pairs(wv.w0, c);
        wv.w1 = fold_pairs(wv.w1, c);
        wv.w2 = fold_pairs(wv.w2, c);
        wv.w3 = fold_pairs(wv.w3, c);
      }
      _mm512_storeu_si512(d, wv.w0);
      _mm512_storeu_si512(d + kNB * kPairBytes, wv.w1);
      _mm512_storeu_si512(d + 2 * kNB * kPairBytes, wv.w2);
      _mm512_storeu_si512(d + 3 * kNB * kPairBytes, wv.w3);
    }
  }
}

template <bool FOLD>
void decode_panel_fmt(const Layout& w, int64_t blk0, int64_t nb, int64_t k0, int64_t klen, uint8_t* dst) {
  switch (w.fmt) {
    case kInt4: return decode_panel<kInt4, FOLD>(w, blk0, nb, k0, klen, dst);
    case kInt8: return decode_panel<kInt8, FOLD>(w, blk0, nb, k0, klen, dst);
    default: return decode_panel<kFp8, FOLD>(w, blk0, nb, k0, klen, dst);
  }
}

inline void decode_panel_dispatch(const Layout& w, bool fold, int64_t blk0, int64_t nb, int64_t k0, int64_t klen,
                                  uint8_t* dst) {
  if (fold) return decode_panel_fmt<true>(w, blk0, nb, k0, klen, dst);
  return decode_panel_fmt<false>(w, blk0, nb, k0, klen, dst);
}

// One unit: the panel of blocks blk0 .. blk0 + nb against rows r0 .. r1 of x. `panel` holds
// kc * 128 bytes, `c` kMC * kNB * 16 floats.
inline void gemm_unit(const GemmArgs& a, int64_t blk0, int64_t nb, int64_t r0, int64_t r1, uint8_t* panel, float* c) {
  const Layout& w = a.w;
  for (int64_t k0 = 0; k0 < w.kp; k0 += a.kc) {
    const int64_t klen = std::min(a.kc, w.kp - k0);
    Tile t;
    if (w.fmt == kDecoded) {  // already bf16 words: read the blocks in place
      const int64_t block_bytes = w.kp / 4 * bytes_per_4k(kDecoded);
      t.b = w.packed + blk0 * block_bytes + k0 / 2 * kPairBytes;
      t.pair_stride = kPairBytes;
      t.block_stride = block_bytes;
    } else {
      decode_panel_dispatch(w, a.fold, blk0, nb, k0, klen, panel);
      t.b = panel;
      t.pair_stride = kNB * kPairBytes;
      t.block_stride = kPairBytes;
    }
    t.blk0 = blk0;
    t.c = c;
    t.r0 = r0;
    t.k0 = k0;
    t.klen = klen;
    t.first = k0 == 0;
    t.last = k0 + klen == w.kp;
    micro_rows(a, t, r0, r1, nb);
  }
}

// y [m, n] (bf16) = x [m, kp] (bf16) times the layer, plus bias.
inline void gemm(const GemmArgs& a) {
  const Layout& w = a.w;
  const int64_t panels = (w.blocks + kNB - 1) / kNB;
  const int64_t chunks = (a.m + kMC - 1) / kMC;
  at::parallel_for(0, panels * chunks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<uint8_t> panel(w.fmt == kDecoded ? 0 : static_cast<size_t>(a.kc / 2 * kNB * kPairBytes));
    std::vector<float> c(static_cast<size_t>(std::min(a.m, kMC) * kNB * 16));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u / chunks, r0 = (u % chunks) * kMC;
      const int64_t blk0 = p * kNB;
      gemm_unit(a, blk0, std::min<int64_t>(kNB, w.blocks - blk0), r0, std::min(a.m, r0 + kMC), panel.data(),
                c.data());
    }
  });
}

}  // namespace
