/// \file rewards.hpp
/// \brief SPEC §2: step rewards r[i,k] from the generated SID codes and the target.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.hpp"
#include "view.hpp"

namespace sapo {

enum class reward_kind {
  per_level,        ///< 1[a_k = y_k]
  prefix,           ///< prod_{j<=k} 1[a_j = y_j]  (default: coarse-to-fine)
  weighted_prefix,  ///< w_k * prefix
  exact,            ///< 1[a = y] at every step: SAPO then equals GRPO
};

struct reward_options {
  reward_kind kind = reward_kind::prefix;
  std::vector<double> level_weights;  ///< K weights, weighted_prefix only (e.g. 0.25, 0.5, 1.0)
  double malformed_reward = 0.0;      ///< every step of a malformed response
};

namespace detail {

/// Reward of one well-formed response at every step; `match(k)` tells whether a_k = y_k.
template <class Match, class Out>
SAPO_HOST_DEVICE void row_rewards(reward_kind kind, const double* weights, int64_t K, Match match, Out out) {
  bool all = true;
  if (kind == reward_kind::exact)
    for (int64_t k = 0; k < K; ++k) all = all && match(k);
  bool prefix = true;
  for (int64_t k = 0; k < K; ++k) {
    const bool hit = match(k);
    prefix = prefix && hit;
    switch (kind) {
      case reward_kind::per_level: out(k, hit ? 1.0 : 0.0); break;
      case reward_kind::prefix: out(k, prefix ? 1.0 : 0.0); break;
      case reward_kind::weighted_prefix: out(k, prefix ? weights[k] : 0.0); break;
      case reward_kind::exact: out(k, all ? 1.0 : 0.0); break;
    }
  }
}

}  // namespace detail

namespace detail {

/// The option checks of step_rewards that need no data (the pipeline runs them up front).
inline void check_reward_options(const reward_options& options, int64_t K) {
  check_enum("options.kind", options.kind, reward_kind::exact);
  if (options.kind == reward_kind::weighted_prefix) {
    SAPO_CHECK(static_cast<int64_t>(options.level_weights.size()) == K, "options.level_weights",
               "K = " << K << " weights for weighted_prefix", options.level_weights.size() << " weights");
    for (size_t k = 0; k < options.level_weights.size(); ++k)
      SAPO_CHECK(is_finite(options.level_weights[k]), "options.level_weights", "finite values",
                 options.level_weights[k] << " at level " << k);
  }
  SAPO_CHECK(is_finite(options.malformed_reward), "options.malformed_reward", "a finite value",
             options.malformed_reward);
}

}  // namespace detail

/// \brief Built-in step rewards (SPEC §2).
/// \param codes     (B, K) generated codes from segment_steps
/// \param malformed (B) flags from segment_steps (nonzero = malformed)
/// \param targets   (B, K) target SID codes of each response's prompt
/// \param rewards   (B, K) output, float or double
template <class C, class F, class Y, class R>
void step_rewards(mat_view<C> codes, vec_view<F> malformed, mat_view<Y> targets, const reward_options& options,
                  mat_view<R> rewards) {
  static_assert(std::is_floating_point<R>::value, "rewards must be float or double");
  const int64_t B = codes.rows, K = codes.cols;
  detail::check_num_steps("codes.cols (K)", K);
  detail::check_shape("codes", codes, B, K);
  detail::check_shape("malformed", malformed, B);
  detail::check_shape("targets", targets, B, K);
  detail::check_shape("rewards", rewards, B, K);
  detail::check_output("rewards", rewards);
  detail::check_enum("options.kind", options.kind, reward_kind::exact);
  for (int64_t i = 0; i < B; ++i)
    SAPO_CHECK(malformed(i) == F(0) || malformed(i) == F(1), "malformed", "0 or 1 at response " << i, +malformed(i));
  detail::check_reward_options(options, K);

  for (int64_t i = 0; i < B; ++i) {
    auto write = [&](int64_t k, double r) { rewards(i, k) = static_cast<R>(r); };
    if (malformed(i) != F(0)) {
      for (int64_t k = 0; k < K; ++k) write(k, options.malformed_reward);
      continue;
    }
    auto match = [&](int64_t k) { return static_cast<int64_t>(codes(i, k)) == static_cast<int64_t>(targets(i, k)); };
    detail::row_rewards(options.kind, options.level_weights.data(), K, match, write);
  }
}

}  // namespace sapo
