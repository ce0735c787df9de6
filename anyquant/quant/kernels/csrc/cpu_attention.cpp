// Paged decode attention on AVX-512, or AVX2 + FMA where the CPU lacks AVX-512: one query row per sequence, every sequence of a step in one
// call, the keys and values read in place from the paged cache through the block tables.
//
// Cache layout (engine/kv_cache.py): key_cache [Hkv, slots, Dk], value_cache [Hkv, slots, Dv],
// slot = page_id * page_size + offset; bf16, fp32, or int8 rows (layers/kv_quant.py: Dk / Dv codes,
// then the row's fp32 scale, so the caches' last dims are Dk + 4 / Dv + 4; the widths below are
// always the values per row). Queries q [B, H, Dk] (bf16 or fp32); the
// H / Hkv query heads of one KV head (GQA, or MLA's absorbed decode: one latent "KV head" with
// key width Dk = latent + rope and value width Dv = latent) all use each key / value row while
// it is in L1, so K/V are read once per (sequence, KV head) and never repeated or gathered.
//
// Work items are (sequence, KV head, key chunk). A chunk runs blocks of keys with an online
// softmax in fp32 (running max m, running sum l, the accumulator rescaled by exp(m_old - m_new)):
// - bf16 queries on a bf16 cache (attention_bf16.h): vdpbf16ps on the cache's rows as they are,
//   keys transposed so that the scores come out one key per lane, values taken in pairs of keys;
// - everything else (attention_fp32.h): rows converted to fp32, fp32 FMAs throughout;
// - on a CPU without AVX-512 but with AVX2 + FMA (attention_avx2.h): the fp32 path in 8-wide vectors;
// - int8 caches, on every CPU (attention_avx2.h): that AVX2 path on the widened codes, the rows'
//   scales applied once per key (an AVX-512 CPU has AVX2 + FMA + F16C: no AVX-512 int8 path).
// Where (sequence, KV head) items alone would leave threads idle or unevenly loaded (batch 1 with 2
// KV heads, MLA's single latent head, one long context among short ones) the keys are split into
// chunks (plan_work below) whose partial results (m, l, accumulator) are merged with their
// log-sum-exp weights at the end (finish_row); each thread takes consecutive items of about
// equal length (balance), and an unsplit item writes its own output rows, so that a step of equal
// contexts runs one parallel region per layer.
//
// A sliding window keeps the last `window` keys of each sequence (0: all of them).
//
// The file is compiled without -m flags for either ISA: only functions marked AQ_ATTN_TARGET /
// AQ_ATTN_BF16 contain AVX-512 code and only those marked AQ_ATTN_AVX2 AVX2 code, so the library
// loads on any x86-64 CPU; the op picks its item kernel by what the CPU has (attention_isa), takes
// the fp32 path without AVX512_BF16, and refuses to run with neither ISA, where the Python side
// picks the pure-torch path (layers/decode_kernel.py).

#include "attention.h"
#include "attention_avx2.h"
#include "attention_bf16.h"
#include "attention_fp32.h"

#include <optional>
#include <string>

namespace {

// The instruction set the op runs on for a float cache: AVX-512 (F/BW/VL/DQ) where the CPU has it,
// else AVX2 + FMA; for an int8 cache AVX2 + FMA on every CPU (its only item kernel); else "" (the op
// refuses). One place for the choice: `attention_isa(int8_cache)` tells the Python side which
// kernel a decode step runs.
std::string attention_isa(bool int8_cache) {
  if (!int8_cache && attention_supported()) return "avx512";
  if (avx2_attention_supported()) return "avx2";
  return "";
}

// One work item's kernel: (problem, item, per-thread scratch) -> the item's acc / ml.
using ItemKernel = void (*)(const Problem&, int64_t, std::vector<float>&);

// dp: bf16 queries on a bf16 cache with AVX512_BF16 (vdpbf16ps). isa: attention_isa's for `cache`.
ItemKernel item_kernel(const std::string& isa, at::ScalarType cache, bool dp) {
  if (cache == at::kChar) return attend_item_avx2<int8_t>;
  const bool bf16_cache = cache == at::kBFloat16;
  if (isa == "avx512") {
    if (dp) return attend_item_bf16;
    return bf16_cache ? attend_item<c10::BFloat16> : attend_item<float>;
  }
  return bf16_cache ? attend_item_avx2<c10::BFloat16> : attend_item_avx2<float>;
}

// out[b, kh * G + g] for head g of the `parts` items from `first` of one (sequence, KV head): their
// accumulators weighted by exp(m_s - M) / sum_s l_s exp(m_s - M). One part: acc / l.
template <typename O>
void finish_row(const Problem& p, int64_t first, int64_t parts, int64_t g, O* out, float* row) {
  const Work& w = p.work[first];
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < parts; ++s) m = std::max(m, p.ml[((first + s) * p.group + g) * 2]);
  std::fill(row, row + p.dv, 0.f);
  float l = 0.f;
  if (m != -std::numeric_limits<float>::infinity()) {
    for (int64_t s = 0; s < parts; ++s) {
      const float* ml = p.ml + ((first + s) * p.group + g) * 2;
      if (ml[1] == 0.f) continue;
      const float wt = std::exp(ml[0] - m);
      l += ml[1] * wt;
      const float* a = p.acc + ((first + s) * p.group + g) * p.dv;
      for (int64_t c = 0; c < p.dv; ++c) row[c] += wt * a[c];
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;  // an empty context attends to nothing: zeros
  O* dst = out + (w.b * p.heads + w.kh * p.group + g) * p.dv;
  for (int64_t c = 0; c < p.dv; ++c) dst[c] = static_cast<O>(row[c] * inv);
}

// The work items: every (sequence, KV head) in `parts` chunks of its keys (the window's, with a
// window). `splits` > 0 forces that many per sequence (tests of the merge); 0 splits only where
// the threads would otherwise idle: a chunk is at least kMinChunk keys and about 1 / (threads x
// kItemsPerThread) of the step's keys, so a batch of equal long contexts (8 x 4096) keeps one item
// per (sequence, KV head), while batch 1, MLA's one latent head or one long sequence among short
// ones is cut into chunks that the balanced split below spreads over the threads.
std::vector<Work> plan_work(int64_t B, int64_t hkv, const int64_t* contexts, int64_t window, int64_t splits,
                            int64_t threads) {
  std::vector<int64_t> first(B), keys(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    first[b] = window > 0 ? std::max<int64_t>(contexts[b] - window, 0) : 0;
    keys[b] = contexts[b] - first[b];
    total += keys[b] * hkv;
  }
  int64_t chunk = std::numeric_limits<int64_t>::max();
  if (splits == 0 && threads > 1) {
    chunk = std::max<int64_t>(kMinChunk, (total + threads * kItemsPerThread - 1) / (threads * kItemsPerThread));
    chunk = (chunk + kKeys - 1) / kKeys * kKeys;
  }
  std::vector<Work> work;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = keys[b];
    const int64_t parts = splits > 0 ? splits : std::max<int64_t>(1, (n + chunk - 1) / chunk);
    // equal chunks, whole blocks of keys but for the last (forced splits: of 16, to reach odd ends)
    const int64_t align = splits > 0 ? kBlock : kKeys;
    const int64_t len = ((n + parts - 1) / parts + align - 1) / align * align;
    for (int64_t kh = 0; kh < hkv; ++kh) {
      for (int64_t s = 0; s < parts; ++s) {
        const int64_t lo = std::min(first[b] + s * len, contexts[b]);
        work.push_back({b, kh, lo, std::min(lo + len, contexts[b]), s, parts});
      }
    }
  }
  return work;
}

// bounds[t] .. bounds[t + 1]: the items of thread t, consecutive, of about equal cost in keys.
// (at::parallel_for's own split gives each thread as many items, whatever their lengths.)
std::vector<int64_t> balance(const std::vector<Work>& work, int64_t threads) {
  const int64_t n = static_cast<int64_t>(work.size());
  double total = 0;
  for (const Work& w : work) total += static_cast<double>(w.hi - w.lo + kItemCost);
  std::vector<int64_t> bounds(threads + 1, n);
  bounds[0] = 0;
  double before = 0;
  int64_t t = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double cost = static_cast<double>(work[i].hi - work[i].lo + kItemCost);
    const int64_t owner = std::min<int64_t>(threads - 1, static_cast<int64_t>((before + cost / 2) * threads / total));
    while (t < owner) bounds[++t] = i;
    before += cost;
  }
  return bounds;
}

// The items, each thread its share; an item that is all of its (sequence, KV head) writes its
// output rows itself, the chunked ones are merged after all items are done.
template <typename O>
void run_items(const Problem& p, const std::vector<Work>& work, ItemKernel attend, O* out) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work.size()));
  const std::vector<int64_t> bounds = balance(work, threads);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch;
    std::vector<float> row(p.dv);
    for (int64_t i = bounds[t0]; i < bounds[t1]; ++i) {
      attend(p, i, scratch);
      if (work[i].parts == 1) {
        for (int64_t g = 0; g < p.group; ++g) finish_row(p, i, 1, g, out, row.data());
      }
    }
  });
  std::vector<int64_t> merged;  // first items of the chunked (sequence, KV head)s
  int64_t merge_work = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(work.size()); ++i) {
    if (work[i].parts > 1 && work[i].part == 0) {
      merged.push_back(i);
      merge_work += work[i].parts * p.group * p.dv;
    }
  }
  // Rows of (chunked sequence and KV head, query head). A few thousand multiply-adds (batch 1, 2 KV
  // heads) stay on this thread, not worth a parallel region; MLA's 128 heads of 512 are split.
  const int64_t rows = static_cast<int64_t>(merged.size()) * p.group;
  const int64_t grain = merge_work < (1 << 17) ? rows : 1;
  at::parallel_for(0, rows, std::max<int64_t>(grain, 1), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(p.dv);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t first = merged[r / p.group];
      finish_row(p, first, work[first].parts, r % p.group, out, row.data());
    }
  });
}

// The shapes of one call, checked in O(1) (no look at the tensors' values): q [B, H, Dk];
// key_cache [Hkv, slots, Dk]; value_cache [Hkv, slots, Dv] (int8: [Hkv, slots, Dk + 4] /
// [Hkv, slots, Dv + 4]); block_tables [B, P] int64; context_lens [B] int64. dk / dv: values per row.
struct Shapes {
  int64_t batch, heads, dk, kv_heads, slots, dv;
  bool int8;
};

Shapes check_shapes(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t page_size, double scale,
                    int64_t window) {
  TORCH_CHECK(q.dim() == 3, "q must be [batch, heads, key width], got ", q.sizes());
  TORCH_CHECK(key_cache.dim() == 3 && value_cache.dim() == 3,
              "key_cache / value_cache must be [kv_heads, slots, width], got ", key_cache.sizes(), " / ",
              value_cache.sizes());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "q must be bfloat16 or float32, got ",
              q.scalar_type());
  const at::ScalarType cache = key_cache.scalar_type();
  TORCH_CHECK(cache == value_cache.scalar_type() &&
                  (cache == at::kBFloat16 || cache == at::kFloat || cache == at::kChar),
              "key and value caches must both be bfloat16, both float32 or both int8 (codes and a float32 scale "
              "per row), got ",
              cache, " / ", value_cache.scalar_type());
  TORCH_CHECK(key_cache.stride(2) == 1 && value_cache.stride(2) == 1, "cache rows must be contiguous");
  const bool int8 = cache == at::kChar;
  const int64_t scale_bytes = int8 ? kScaleBytes : 0;
  TORCH_CHECK(!int8 || (key_cache.size(2) > kScaleBytes && value_cache.size(2) > kScaleBytes),
              "int8 cache rows are codes then a 4-byte scale: the caches' last dims must exceed 4, got ",
              key_cache.size(2), " / ", value_cache.size(2));
  const Shapes s{q.size(0), q.size(1), q.size(2), key_cache.size(0), key_cache.size(1),
                 value_cache.size(2) - scale_bytes, int8};
  TORCH_CHECK(key_cache.size(2) - scale_bytes == s.dk, "key width ", key_cache.size(2) - scale_bytes,
              int8 ? " (the int8 key cache's last dim less its 4 scale bytes)" : "", " != query width ", s.dk);
  TORCH_CHECK(value_cache.size(0) == s.kv_heads && value_cache.size(1) == s.slots, "value cache ",
              value_cache.sizes(), " does not match key cache ", key_cache.sizes());
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "query heads ", s.heads, " not a multiple of KV heads ",
              s.kv_heads);
  TORCH_CHECK(s.dk % 16 == 0 && s.dv % 16 == 0 && s.dk > 0 && s.dv > 0,
              "key / value widths must be multiples of 16, got ", s.dk, " / ", s.dv);
  TORCH_CHECK(page_size > 0 && s.slots % page_size == 0, "page_size ", page_size, " must divide the ", s.slots,
              " slots");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == s.batch &&
                  block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block_tables must be int64 [", s.batch, ", pages] (contiguous), got ", block_tables.scalar_type(), " ",
              block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == s.batch &&
                  context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(),
              "context_lens must be int64 [", s.batch, "] (contiguous)");
  TORCH_CHECK(window >= 0, "window must be >= 0");
  // the kernels take a block's max before scaling its scores
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "scale must be a positive finite number, got ", scale);
  return s;
}

// The step's metadata by value: every context fits its block table, and every page a sequence's
// keys are read from (its window's, with a window) is a page of the cache. The kernels read the
// cache through these ids unchecked.
void check_tables(const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t page_size, int64_t pages,
                  int64_t window) {
  const int64_t B = block_tables.size(0), width = block_tables.size(1);
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* cp = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ctx = cp[b];
    TORCH_CHECK(ctx >= 0 && ctx <= width * page_size, "sequence ", b, ": context of ", ctx, " keys but ", width,
                " pages of ", page_size, " in its block table");
    const int64_t first = window > 0 ? std::max<int64_t>(ctx - window, 0) : 0;
    for (int64_t i = first / page_size; i < (ctx + page_size - 1) / page_size; ++i) {
      TORCH_CHECK(tp[b * width + i] >= 0 && tp[b * width + i] < pages, "sequence ", b, ": page id ", tp[b * width + i],
                  " outside the cache's ", pages, " pages");
    }
  }
}

// The attention itself, on checked inputs: writes out [B, H, Dv] (q's dtype, contiguous).
void attend(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache, const Shapes& s,
            const at::Tensor& tables, const at::Tensor& contexts, int64_t page_size, double scale, int64_t window,
            int64_t splits, bool force_fp32, const at::Tensor& out) {
  const std::string isa = attention_isa(s.int8);
  TORCH_CHECK(!isa.empty(), s.int8 ? "paged_decode_attention on an int8 cache needs AVX2 + FMA + F16C"
                                   : "paged_decode_attention needs AVX-512 (F/BW/VL/DQ) or AVX2 + FMA + F16C");
  const int64_t* cp = contexts.data_ptr<int64_t>();
  Problem p;
  p.batch = s.batch;
  p.heads = s.heads;
  p.kv_heads = s.kv_heads;
  p.group = s.heads / s.kv_heads;
  p.dk = s.dk;
  p.dv = s.dv;
  p.page = page_size;
  p.table_width = tables.size(1);
  p.window = window;
  const std::vector<Work> work = plan_work(s.batch, s.kv_heads, cp, window, splits, at::get_num_threads());
  p.work = work.data();
  p.tables = tables.data_ptr<int64_t>();
  p.contexts = cp;
  p.kc = key_cache.data_ptr();
  p.vc = value_cache.data_ptr();
  p.k_head = key_cache.stride(0);
  p.k_slot = key_cache.stride(1);
  p.v_head = value_cache.stride(0);
  p.v_slot = value_cache.stride(1);
  // bf16 queries on a bf16 cache take the vdpbf16ps path where the CPU has it; the rest compute
  // in fp32 from converted rows (converted here, not by aten ops: this runs once per layer).
  const bool bf16 = key_cache.scalar_type() == at::kBFloat16;
  const bool dp = isa == "avx512" && bf16 && q.scalar_type() == at::kBFloat16 && bf16_supported() && !force_fp32;
  const at::Tensor qc = q.contiguous();
  std::vector<float> qf;
  if (!dp) {
    const int64_t n = qc.numel();
    qf.resize(n);
    const float sc = static_cast<float>(scale);
    if (qc.scalar_type() == at::kBFloat16) {
      const c10::BFloat16* src = qc.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < n; ++i) qf[i] = static_cast<float>(src[i]) * sc;
    } else {
      const float* src = qc.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) qf[i] = src[i] * sc;
    }
    p.q = qf.data();
  }
  p.qraw = qc.data_ptr();
  p.scale = static_cast<float>(scale);
  const size_t items = work.size();
  std::vector<float> acc(items * p.group * s.dv), ml(items * p.group * 2);
  p.acc = acc.data();
  p.ml = ml.data();
  if (q.scalar_type() == at::kBFloat16) {
    run_items(p, work, item_kernel(isa, key_cache.scalar_type(), dp), out.data_ptr<c10::BFloat16>());
  } else {
    run_items(p, work, item_kernel(isa, key_cache.scalar_type(), dp), out.data_ptr<float>());
  }
}

// q [B, H, Dk]; key_cache [Hkv, slots, Dk]; value_cache [Hkv, slots, Dv] (both int8: last dims
// Dk + 4 / Dv + 4); block_tables [B, P] int64 page ids; context_lens [B] int64 -> [B, H, Dv] in q's
// dtype. window 0: no window; splits 0: chosen from the thread count (tests force a number to
// exercise the merge); force_fp32: bf16 inputs take the fp32 path too (tests, and a check of the
// bf16 path's rounding). A call on its own: checks the tables' values every time (the captured step's op below leaves
// that to `check_decode_step`, once per step).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t page_size,
                                  double scale, int64_t window, int64_t splits, bool force_fp32) {
  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor contexts = context_lens.contiguous();
  const Shapes s = check_shapes(q, key_cache, value_cache, tables, contexts, page_size, scale, window);
  TORCH_CHECK(splits >= 0, "splits must be >= 0");
  check_tables(tables, contexts, page_size, s.slots / page_size, window);
  at::Tensor out = at::empty({s.batch, s.heads, s.dv}, q.options());
  attend(q, key_cache, value_cache, s, tables, contexts, page_size, scale, window, splits, force_fp32, out);
  return out;
}

// src [T, Hkv, W] (rows contiguous) -> cache [Hkv, slots, W] at slots [T]; a slot < 0 (a bucket's
// padding row) stores nothing. The dtype converts on the way (bf16 / fp32 either side).
template <typename S, typename D>
void store_rows(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots) {
  const int64_t T = src.size(0), hkv = src.size(1), w = src.size(2);
  const S* s = src.data_ptr<S>();
  D* c = cache.data_ptr<D>();
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t h = 0; h < hkv; ++h) {
      const S* row = s + t * src.stride(0) + h * src.stride(1);
      D* dst = c + h * cache.stride(0) + slots[t] * cache.stride(1);
      for (int64_t i = 0; i < w; ++i) dst[i] = static_cast<D>(static_cast<float>(row[i]));
    }
  }
}

// src [T, Hkv, W] (rows contiguous) -> the int8 cache [Hkv, slots, W + 4] at slots [T] (< 0: not
// stored), each row quantized as layers/kv_quant.py's `quantize_rows` does, to the same bytes:
// scale = amax / 127 (an fp32 division), code = x / scale (an fp32 division, not a multiplication
// by 1 / scale) rounded half to even (nearbyint in the default rounding mode) and clamped to
// [-127, 127]; an all-zero row: scale 0, codes 0; a row with a non-finite value: a NaN scale, codes 0.
template <typename S>
void quantize_rows(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots) {
  constexpr float code_max = 127.f;
  const int64_t T = src.size(0), hkv = src.size(1), w = src.size(2);
  const S* s = src.data_ptr<S>();
  int8_t* c = cache.data_ptr<int8_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t h = 0; h < hkv; ++h) {
      const S* row = s + t * src.stride(0) + h * src.stride(1);
      int8_t* dst = c + h * cache.stride(0) + slots[t] * cache.stride(1);
      float amax = 0.f;
      bool finite = true;
      for (int64_t i = 0; i < w; ++i) {
        const float x = static_cast<float>(row[i]);
        finite = finite && std::isfinite(x);
        amax = std::max(amax, std::fabs(x));
      }
      float scale = std::numeric_limits<float>::quiet_NaN();
      if (finite) {
        scale = amax / code_max;
        const float divisor = amax > 0.f ? scale : 1.f;
        for (int64_t i = 0; i < w; ++i) {
          const float code = std::nearbyint(static_cast<float>(row[i]) / divisor);
          // NaN only from 0 / 0, where a row of subnormals' scale underflows to 0: code 0, as the
          // torch path's NaN -> int8 gives (x / 0 = +-inf clamps to +-127 in both)
          dst[i] = std::isnan(code) ? int8_t{0} : static_cast<int8_t>(std::min(std::max(code, -code_max), code_max));
        }
      } else {
        std::fill(dst, dst + w, int8_t{0});
      }
      std::memcpy(dst + w, &scale, sizeof scale);
    }
  }
}

void store(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots, const char* name) {
  const bool int8 = cache.scalar_type() == at::kChar;
  const int64_t width = cache.size(2) - (int8 ? kScaleBytes : 0);  // values per row
  TORCH_CHECK(src.dim() == 3 && src.size(1) == cache.size(0) && src.size(2) == width, name, " must be [",
              "tokens, ", cache.size(0), ", ", width, "], got ", src.sizes());
  TORCH_CHECK(src.scalar_type() == at::kBFloat16 || src.scalar_type() == at::kFloat, name,
              " must be bfloat16 or float32, got ", src.scalar_type());
  const at::Tensor rows = src.stride(2) == 1 ? src : src.contiguous();
  const bool from_bf16 = rows.scalar_type() == at::kBFloat16, to_bf16 = cache.scalar_type() == at::kBFloat16;
  if (int8) {
    if (from_bf16) quantize_rows<c10::BFloat16>(rows, cache, slots);
    else quantize_rows<float>(rows, cache, slots);
    return;
  }
  if (from_bf16 && to_bf16) store_rows<c10::BFloat16, c10::BFloat16>(rows, cache, slots);
  if (from_bf16 && !to_bf16) store_rows<c10::BFloat16, float>(rows, cache, slots);
  if (!from_bf16 && to_bf16) store_rows<float, c10::BFloat16>(rows, cache, slots);
  if (!from_bf16 && !to_bf16) store_rows<float, float>(rows, cache, slots);
}

// One layer of a captured decode step: store this step's keys / values k [B, Hkv, Dk], v [B, Hkv,
// Dv] at slot_mapping [B] (a slot < 0: a padding row, not stored), then attend q [B, H, Dk] through
// block_tables [B, P] and context_lens [B] (a padding row's context is 0: its output row is zeros)
// -> [B, H * Dv]. value_cache absent: the value is the key's first Dv values (a latent cache),
// stored with the key (float caches only: an int8 row's scale is its whole key's). int8 caches
// store k / v quantized (quantize_rows). The step's metadata was checked by value once for all layers
// (`check_decode_step`); here only shapes and dtypes are (O(1)).
at::Tensor paged_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& key_cache, const std::optional<at::Tensor>& value_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t page_size, double scale, int64_t window) {
  const bool latent = !value_cache.has_value();
  TORCH_CHECK(v.dim() == 3, "v must be [tokens, kv heads, value width], got ", v.sizes());
  TORCH_CHECK(!latent || key_cache.scalar_type() != at::kChar,
              "an int8 key_cache needs its own value_cache: a value stored inside an int8 key (a latent cache) "
              "is not supported");
  const at::Tensor values = latent ? key_cache.narrow(2, 0, v.size(2)) : *value_cache;
  const Shapes s = check_shapes(q, key_cache, values, block_tables, context_lens, page_size, scale, window);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == s.batch &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be int64 [", s.batch, "] (contiguous)");
  TORCH_CHECK(k.size(0) == s.batch && v.size(0) == s.batch, "k / v must have the ", s.batch, " rows of q");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  store(k, key_cache, slots, "k");
  if (!latent) store(v, values, slots, "v");
  at::Tensor out = at::empty({s.batch, s.heads * s.dv}, q.options());
  attend(q, key_cache, values, s, block_tables, context_lens, page_size, scale, window, 0, false, out);
  return out;
}

// Once per captured step, before its layers: the slots to store at lie in the cache ([0, slots),
// or -1 for a padding row), and the tables and contexts pass `check_tables` (without a window:
// every page of every context, which covers any layer's window).
void check_decode_step(const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                       const at::Tensor& context_lens, int64_t page_size, int64_t slots) {
  const int64_t B = block_tables.dim() == 2 ? block_tables.size(0) : -1;
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block_tables must be int64 [batch, pages] (contiguous), got ", block_tables.scalar_type(), " ",
              block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B && context_lens.scalar_type() == at::kLong &&
                  context_lens.is_contiguous(),
              "context_lens must be int64 [", B, "] (contiguous)");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == B && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "slot_mapping must be int64 [", B, "] (contiguous)");
  TORCH_CHECK(page_size > 0 && slots > 0 && slots % page_size == 0, "page_size ", page_size, " must divide the ",
              slots, " slots");
  const int64_t* sp = slot_mapping.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= -1 && sp[b] < slots, "slot_mapping[", b, "] = ", sp[b], " outside the cache's ", slots,
                " slots");
  }
  check_tables(block_tables, context_lens, page_size, slots / page_size, 0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(anyquant_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, int page_size, float scale, int window=0, int splits=0, bool force_fp32=False) -> Tensor");
  m.def(
      "paged_decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!)? value_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int page_size, float scale, int window=0) "
      "-> Tensor");
  m.def(
      "check_decode_step(Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int page_size, int slots) "
      "-> ()");
  m.def("attention_supported() -> bool", &attention_supported);
  m.def("attention_isa(bool int8_cache=False) -> str", &attention_isa);
}

TORCH_LIBRARY_IMPL(anyquant_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_step", &paged_decode_step);
  m.impl("check_decode_step", &check_decode_step);
}
