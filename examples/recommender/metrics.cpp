#include "metrics.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

namespace rec {

ranking_metrics evaluate_rankings(const std::vector<std::vector<int32_t>>& ranked,
                                  const std::vector<int32_t>& targets) {
  if (ranked.size() != targets.size())
    throw std::invalid_argument("evaluate_rankings: " + std::to_string(ranked.size()) + " ranked lists for " +
                                std::to_string(targets.size()) + " targets");
  ranking_metrics m;
  m.users = int64_t(targets.size());
  if (m.users == 0) return m;
  for (size_t u = 0; u < targets.size(); ++u) {
    const auto& list = ranked[u];
    // Only the first 10 places count; the first occurrence is the rank (lists should be
    // distinct, and a repeat further down must not count twice).
    for (size_t r = 0; r < list.size() && r < 10; ++r) {
      if (list[r] != targets[u]) continue;
      const double gain = 1.0 / std::log2(double(r) + 2.0);
      m.hr10 += 1;
      m.ndcg10 += gain;
      if (r < 5) m.hr5 += 1, m.ndcg5 += gain;
      if (r < 1) m.hr1 += 1;
      break;
    }
  }
  const double n = double(m.users);
  m.hr1 /= n, m.hr5 /= n, m.hr10 /= n, m.ndcg5 /= n, m.ndcg10 /= n;
  return m;
}

}  // namespace rec
