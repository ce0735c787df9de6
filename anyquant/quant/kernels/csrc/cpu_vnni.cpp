// Integer weights times int8 activations on AVX512-VNNI (vpdpbusd): W4A8 / W8A8 linear layers.
// The layout and the block kernels are described in vnni.h.

#include "vnni.h"

namespace {

at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero, int64_t zconst, const c10::optional<at::Tensor>& offset,
                       const c10::optional<at::Tensor>& bias, int64_t fmt, int64_t group, int64_t n, double divisor,
                       double static_scale, const c10::optional<at::Tensor>& amax) {
  TORCH_CHECK(vnni_supported(), "vnni_linear needs AVX512-VNNI and AVX512_BF16");
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
  at::Tensor q = at::empty({rows, w.kp}, at::kChar);
  at::Tensor qsum = at::empty({rows, w.ng}, at::kInt);
  at::Tensor sx = at::empty({rows}, at::kFloat);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* am = amax_p ? amax_p + r : nullptr;
      int8_t* qr = q.data_ptr<int8_t>() + r * w.kp;
      int32_t* sr = qsum.data_ptr<int32_t>() + r * w.ng;
      if (bf16) {
        quantize_row(reinterpret_cast<const int16_t*>(xc.data_ptr()) + r * K, K, w.kp, group, divisor,
                     static_cast<float>(static_scale), am, qr, sr, sx.data_ptr<float>() + r);
      } else {
        quantize_row(xc.data_ptr<float>() + r * K, K, w.kp, group, divisor, static_cast<float>(static_scale), am, qr,
                     sr, sx.data_ptr<float>() + r);
      }
    }
  });
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, n}, xc.options());
  const QAct a{q.data_ptr<int8_t>(), qsum.data_ptr<int32_t>(), sx.data_ptr<float>()};
  const Out o{out.data_ptr(), bf16, bias.has_value() ? bias_f.data_ptr<float>() : nullptr};
  constexpr int64_t kRowTile = 64;
  at::parallel_for(0, w.blocks, 1, [&](int64_t b0, int64_t b1) {
    if (rows <= 4) {
      return fmt == kV4 ? gemv_rows<kV4>(w, a, o, rows, b0, b1) : gemv_rows<kV8>(w, a, o, rows, b0, b1);
    }
    std::vector<uint8_t> unpacked(fmt == kV4 ? static_cast<size_t>(w.kp * 16) : 0);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      const int64_t r1 = std::min(rows, r0 + kRowTile);
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* codes = w.packed + b * w.block_bytes();
        if (fmt == kV4) {
          unpack_block(w, b, unpacked.data());
          codes = unpacked.data();
        }
        for (int64_t r = r0; r < r1; r += 8) tile_rows(w, codes, a, o, r, std::min<int64_t>(8, r1 - r), b);
      }
    }
  });
  return out;
}

AQ_VNNI int64_t xor_chunks(const uint8_t* p, int64_t c0, int64_t c1) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* q = p + c * 256;
    s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(q));
    s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(q + 64));
    s2 = _mm512_xor_si512(s2, _mm512_loadu_si512(q + 128));
    s3 = _mm512_xor_si512(s3, _mm512_loadu_si512(q + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(s0, s1), _mm512_xor_si512(s2, s3)));
}

// The same with 32-byte loads, for AVX2 CPUs (the AVX2 kernels' roofline).
__attribute__((target("avx2"))) int64_t xor_chunks_avx2(const uint8_t* p, int64_t c0, int64_t c1) {
  __m256i s[8];
  for (auto& v : s) v = _mm256_setzero_si256();
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* q = p + c * 256;
    for (int i = 0; i < 8; ++i) s[i] = _mm256_xor_si256(s[i], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * i)));
  }
  // Words 0..3 and 4..7 of each 64 bytes apart, summed as xor_chunks sums its 8 lanes: the same checksum.
  for (int i = 2; i < 8; ++i) s[i % 2] = _mm256_xor_si256(s[i % 2], s[i]);
  alignas(32) int64_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s[0]);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4), s[1]);
  int64_t total = 0;
  for (int64_t v : lanes) total += v;
  return total;
}

bool avx2_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

// Reads every byte of `t` with 64-byte loads (AVX-512; else two 32-byte loads with AVX2) on all
// threads and returns a checksum, so a caller can time the machine's read bandwidth in the same
// process as the kernels.
int64_t read_bytes(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kByte && t.numel() % 256 == 0,
              "read_bytes takes contiguous uint8 with a multiple of 256 bytes");
  const bool wide = vnni_supported();
  TORCH_CHECK(wide || avx2_available(), "read_bytes needs AVX-512 or AVX2");
  const uint8_t* p = t.data_ptr<uint8_t>();
  std::vector<int64_t> partial(static_cast<size_t>(at::get_num_threads()) + 1, 0);
  at::parallel_for(0, t.numel() / 256, 1024, [&](int64_t c0, int64_t c1) {
    partial[static_cast<size_t>(at::get_thread_num())] ^= wide ? xor_chunks(p, c0, c1) : xor_chunks_avx2(p, c0, c1);
  });
  int64_t total = 0;
  for (int64_t v : partial) total ^= v;
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def("vnni_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int zconst, Tensor? offset, Tensor? bias, "
        "int fmt, int group, int n, float divisor, float static_scale, Tensor? amax) -> Tensor");
  m.def("read_bytes(Tensor t) -> int", &read_bytes);
  m.def("vnni_supported() -> bool", &vnni_supported);
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) {
  m.impl("vnni_linear", &vnni_linear);
}
