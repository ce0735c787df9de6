// Paged decode attention on AVX-512: one query row per sequence, every sequence of a step in one
// call, the keys and values read in place from the paged cache through the block tables.
//
// Cache layout (engine/kv_cache.py): key_cache [Hkv, slots, Dk], value_cache [Hkv, slots, Dv],
// slot = page_id * page_size + offset; bf16 or fp32. Queries q [B, H, Dk] (bf16 or fp32); the
// H / Hkv query heads of one KV head (GQA, or MLA's absorbed decode: one latent "KV head" with
// key width Dk = latent + rope and value width Dv = latent) all use each key / value row while
// it is in L1, so K/V are read once per (sequence, KV head) and never repeated or gathered.
//
// Work items are (sequence, KV head, key chunk). A chunk runs blocks of keys with an online
// softmax in fp32 (running max m, running sum l, the accumulator rescaled by exp(m_old - m_new)):
// - bf16 queries on a bf16 cache (attention_bf16.h): vdpbf16ps on the cache's rows as they are,
//   keys transposed so that the scores come out one key per lane, values taken in pairs of keys;
// - everything else (attention_fp32.h): rows converted to fp32, fp32 FMAs throughout.
// When there are fewer (sequence, KV head) items than threads can use (batch 1 with 2 KV heads,
// MLA's single latent head) the keys are split into chunks whose partial results (m, l,
// accumulator) are merged with their log-sum-exp weights at the end (merge_chunks below).
//
// A sliding window keeps the last `window` keys of each sequence (0: all of them).
//
// The file is compiled without -mavx512 flags: only functions marked AQ_ATTN_TARGET / AQ_ATTN_BF16
// contain AVX-512 code, so the library loads on any x86-64 CPU; the op refuses to run where the CPU
// lacks the instructions (and takes the fp32 path without AVX512_BF16), and the Python side picks
// the pure-torch path there (layers/decode_kernel.py).

#include "attention.h"
#include "attention_bf16.h"
#include "attention_fp32.h"

namespace {

// out[b, h] = the chunks' accumulators weighted by exp(m_s - M) / sum_s l_s exp(m_s - M).
template <typename O>
void merge_chunks(const Problem& p, O* out) {
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(p.dv);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / p.heads, h = r % p.heads, kh = h / p.group, g = h % p.group;
      const int64_t item0 = (b * p.kv_heads + kh) * p.splits;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < p.splits; ++s) m = std::max(m, p.ml[((item0 + s) * p.group + g) * 2]);
      std::fill(row.begin(), row.end(), 0.f);
      float l = 0.f;
      if (m != -std::numeric_limits<float>::infinity()) {
        for (int64_t s = 0; s < p.splits; ++s) {
          const float* ml = p.ml + ((item0 + s) * p.group + g) * 2;
          if (ml[1] == 0.f) continue;
          const float w = std::exp(ml[0] - m);
          l += ml[1] * w;
          const float* a = p.acc + ((item0 + s) * p.group + g) * p.dv;
          for (int64_t c = 0; c < p.dv; ++c) row[c] += w * a[c];
        }
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;  // an empty context attends to nothing: zeros
      O* dst = out + r * p.dv;
      for (int64_t c = 0; c < p.dv; ++c) dst[c] = static_cast<O>(row[c] * inv);
    }
  });
}

int64_t auto_splits(int64_t items, int64_t longest) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || items >= 2 * threads) return 1;
  // enough items to keep every thread busy twice over, each chunk worth its merge
  const int64_t want = (2 * threads + items - 1) / items;
  return std::max<int64_t>(1, std::min(want, longest / kMinChunk));
}

// q [B, H, Dk]; key_cache [Hkv, slots, Dk]; value_cache [Hkv, slots, Dv]; block_tables [B, P]
// int64 page ids; context_lens [B] int64 -> [B, H, Dv] in q's dtype. window 0: no window;
// splits 0: chosen from the thread count (tests force a number to exercise the merge);
// force_fp32: bf16 inputs take the fp32 path too (tests, and a check of the bf16 path's rounding).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t page_size,
                                  double scale, int64_t window, int64_t splits, bool force_fp32) {
  TORCH_CHECK(attention_supported(), "paged_decode_attention needs AVX-512 (F/BW/VL/DQ)");
  TORCH_CHECK(q.dim() == 3, "q must be [batch, heads, key width], got ", q.sizes());
  TORCH_CHECK(key_cache.dim() == 3 && value_cache.dim() == 3,
              "key_cache / value_cache must be [kv_heads, slots, width], got ", key_cache.sizes(), " / ",
              value_cache.sizes());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "q must be bfloat16 or float32, got ",
              q.scalar_type());
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type() &&
                  (key_cache.scalar_type() == at::kBFloat16 || key_cache.scalar_type() == at::kFloat),
              "key and value caches must both be bfloat16 or both float32, got ", key_cache.scalar_type(), " / ",
              value_cache.scalar_type());
  TORCH_CHECK(key_cache.stride(2) == 1 && value_cache.stride(2) == 1, "cache rows must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), dk = q.size(2);
  const int64_t hkv = key_cache.size(0), slots = key_cache.size(1), dv = value_cache.size(2);
  TORCH_CHECK(key_cache.size(2) == dk, "key width ", key_cache.size(2), " != query width ", dk);
  TORCH_CHECK(value_cache.size(0) == hkv && value_cache.size(1) == slots, "value cache ", value_cache.sizes(),
              " does not match key cache ", key_cache.sizes());
  TORCH_CHECK(hkv > 0 && H % hkv == 0, "query heads ", H, " not a multiple of KV heads ", hkv);
  TORCH_CHECK(dk % 16 == 0 && dv % 16 == 0 && dk > 0 && dv > 0, "key / value widths must be multiples of 16, got ", dk,
              " / ", dv);
  TORCH_CHECK(page_size > 0 && slots % page_size == 0, "page_size ", page_size, " must divide the ", slots, " slots");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong,
              "block_tables must be int64 [", B, ", pages], got ", block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B && context_lens.scalar_type() == at::kLong,
              "context_lens must be int64 [", B, "]");
  TORCH_CHECK(window >= 0 && splits >= 0, "window and splits must be >= 0");
  // the kernels take a block's max before scaling its scores
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "scale must be a positive finite number, got ", scale);

  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor contexts = context_lens.contiguous();
  const int64_t width = tables.size(1), pages = slots / page_size;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = contexts.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ctx = cp[b];
    TORCH_CHECK(ctx >= 0 && ctx <= width * page_size, "sequence ", b, ": context of ", ctx, " keys but ", width,
                " pages of ", page_size, " in its block table");
    const int64_t first = window > 0 ? std::max<int64_t>(ctx - window, 0) : 0;
    longest = std::max(longest, ctx - first);
    for (int64_t i = first / page_size; i < (ctx + page_size - 1) / page_size; ++i) {
      TORCH_CHECK(tp[b * width + i] >= 0 && tp[b * width + i] < pages, "sequence ", b, ": page id ", tp[b * width + i],
                  " outside the cache's ", pages, " pages");
    }
  }

  Problem p;
  p.batch = B;
  p.heads = H;
  p.kv_heads = hkv;
  p.group = H / hkv;
  p.dk = dk;
  p.dv = dv;
  p.page = page_size;
  p.table_width = width;
  p.window = window;
  p.splits = splits > 0 ? splits : auto_splits(B * hkv, longest);
  p.tables = tp;
  p.contexts = cp;
  p.kc = key_cache.data_ptr();
  p.vc = value_cache.data_ptr();
  p.k_head = key_cache.stride(0);
  p.k_slot = key_cache.stride(1);
  p.v_head = value_cache.stride(0);
  p.v_slot = value_cache.stride(1);
  // bf16 queries on a bf16 cache take the vdpbf16ps path where the CPU has it; the rest compute
  // in fp32 from converted rows.
  const bool bf16 = key_cache.scalar_type() == at::kBFloat16;
  const bool dp = bf16 && q.scalar_type() == at::kBFloat16 && bf16_supported() && !force_fp32;
  const at::Tensor qc = q.contiguous();
  at::Tensor qf;
  if (!dp) {
    qf = (q.to(at::kFloat) * scale).contiguous();
    p.q = qf.data_ptr<float>();
  }
  p.qraw = qc.data_ptr();
  p.scale = static_cast<float>(scale);
  const int64_t items = B * hkv * p.splits;
  at::Tensor acc = at::empty({items, p.group, dv}, q.options().dtype(at::kFloat));
  at::Tensor ml = at::empty({items, p.group, 2}, q.options().dtype(at::kFloat));
  p.acc = acc.data_ptr<float>();
  p.ml = ml.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch;
    for (int64_t i = i0; i < i1; ++i) {
      if (dp) {
        attend_item_bf16(p, i, scratch);
      } else if (bf16) {
        attend_item<c10::BFloat16>(p, i, scratch);
      } else {
        attend_item<float>(p, i, scratch);
      }
    }
  });
  at::Tensor out = at::empty({B, H, dv}, q.options());
  if (q.scalar_type() == at::kBFloat16) {
    merge_chunks(p, out.data_ptr<c10::BFloat16>());
  } else {
    merge_chunks(p, out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, int page_size, float scale, int window=0, int splits=0, bool force_fp32=False) -> Tensor");
  m.def("attention_supported() -> bool", &attention_supported);
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
