// The (token, slot) pairs of one MoE call grouped by expert: the routing step shared by the fused
// bf16 call (cpu_moe.cpp) and the fused int8 call (cpu_moe_vnni.cpp).
//
// A counting sort in token order (what a stable argsort of the ids would give), so each expert's
// rows are contiguous and every later step can walk them without a host sync or a per-pair buffer.
// Ids are checked before any work: an id outside [0, experts) other than -1 is an error; -1 marks a
// slot whose expert another rank holds (expert parallelism), which takes no row.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

struct PairsByExpert {
  std::vector<int64_t> start;      // [experts + 1]: expert e's rows are start[e] .. start[e + 1)
  std::vector<int64_t> pos;        // [pairs]: the row of pair p = t * k + j, -1 for a slot held elsewhere
  std::vector<int64_t> token_of;   // [pairs]: the token of each row (the first `held` entries are used)
  std::vector<int64_t> active;     // the experts with at least one row, in id order
  std::vector<int64_t> expert_of;  // [held] when asked for: the expert of each row; else empty
  int64_t held = 0;                // rows this call computes
};

inline PairsByExpert group_pairs_by_expert(const at::Tensor& ids, int64_t experts, bool with_expert_of) {
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  const int64_t k = ids.size(1), pairs = ids.numel();
  PairsByExpert g;
  g.start.assign(experts + 1, 0);
  g.pos.assign(pairs, -1);
  g.token_of.resize(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK((id[p] >= 0 && id[p] < experts) || id[p] == -1, "expert id ", id[p], " outside [0, ", experts,
                ") (-1: held elsewhere)");
    if (id[p] >= 0) ++g.start[id[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) g.start[e + 1] += g.start[e];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    if (id[p] < 0) continue;
    g.pos[p] = fill[id[p]]++;
    g.token_of[g.pos[p]] = p / k;
  }
  g.held = g.start[experts];
  if (with_expert_of) g.expert_of.resize(g.held);
  for (int64_t e = 0; e < experts; ++e) {
    if (g.start[e + 1] > g.start[e]) g.active.push_back(e);
    if (with_expert_of) std::fill(g.expert_of.begin() + g.start[e], g.expert_of.begin() + g.start[e + 1], e);
  }
  return g;
}
