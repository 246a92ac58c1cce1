// Hit rate and NDCG of a top-N list against one held-out target per user.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace rec {

struct ranking_metrics {
  double hr1 = 0, hr5 = 0, hr10 = 0, ndcg5 = 0, ndcg10 = 0;
  int64_t users = 0;
};

// ranked[u]: distinct items, best first (at least 10 where possible); targets[u]: the item.
// HR@k = share of users whose target is among the first k; NDCG@k with one relevant item =
// 1 / log2(rank + 2) for a 0-based rank < k, else 0; both averaged over users.
ranking_metrics evaluate_rankings(const std::vector<std::vector<int32_t>>& ranked,
                                  const std::vector<int32_t>& targets);

}  // namespace rec
