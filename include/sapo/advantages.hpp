/// \file advantages.hpp
/// \brief SPEC §3: group-relative advantages per (response, step), the outcome (GRPO)
/// special case K = 1, mixed outcome + step advantages, and the broadcast to tokens.
///
/// \code
///   sapo::advantage_options opt;                                // std, unbiased, eps 1e-6
///   auto stats = sapo::group_advantages(rewards, sapo::group_layout::contiguous(8), opt, A);
///   sapo::broadcast_step_advantages(A, step, mask, token_adv);
/// \endcode
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.hpp"
#include "parallel.hpp"
#include "view.hpp"

namespace sapo {

enum class normalization {
  std,        ///< (r - mu) / (sigma + eps)        verl / TRL (default)
  std_floor,  ///< (r - mu) / max(sigma, eps)      the SAPO prototype
  none,       ///< r - mu                          Dr. GRPO
  loo,        ///< r - mean of the others          RLOO
  batch_std,  ///< (r - mu) / (sigma_batch,k + eps) REINFORCE++-baseline
};

enum class singleton_policy {
  zero,  ///< a group with one present response at a step gets A = 0 (default)
  raw,   ///< it gets A = r (verl)
};

struct advantage_options {
  normalization norm = normalization::std;
  bool unbiased_std = true;  ///< sigma divides by n - 1 (false: by n)
  double eps = 1e-6;
  singleton_policy singleton = singleton_policy::zero;
};

/// Which group each response belongs to: contiguous blocks of G, or explicit ids.
struct group_layout {
  int64_t group_size = 0;             ///< G > 0: response i is in group i / G (B must be a multiple of G)
  vec_view<const int64_t> group_ids;  ///< otherwise: (B) ids in [0, n_groups), any order, unequal sizes
  int64_t n_groups = 0;

  static group_layout contiguous(int64_t G) {
    group_layout g;
    g.group_size = G;
    return g;
  }
  static group_layout explicit_ids(vec_view<const int64_t> ids, int64_t n_groups) {
    group_layout g;
    g.group_ids = ids;
    g.n_groups = n_groups;
    return g;
  }
};

/// Per-step statistics of the advantage stage (index k; one entry in outcome mode).
struct advantage_stats {
  std::vector<double> mean_reward;             ///< over present rewards
  std::vector<double> zero_variance_fraction;  ///< zero-variance (group, step) pairs / pairs with n >= 1
  std::vector<double> advantage_std;           ///< population std of A over present responses
  std::vector<int64_t> n_present;              ///< present (non-NaN) rewards
  std::vector<int64_t> n_zero_variance;        ///< zero-variance pairs (singletons included)
  std::vector<int64_t> n_pairs;                ///< (group, step) pairs with n >= 1
};

namespace detail {

/// Moments of the present rewards of one (group, step) pair, accumulated in double.
struct group_moments {
  int64_t n = 0;
  double sum = 0, mean = 0, std = 0;
  bool all_equal = true;
};

/// SPEC §3 for one reward r of a pair with moments m. Precedence (docs/decisions.md):
/// singleton policy, then zero variance, then the normalization.
SAPO_HOST_DEVICE double group_relative_advantage(double r, const group_moments& m, double batch_std,
                                                 const advantage_options& o) {
  if (m.n == 1) return o.singleton == singleton_policy::raw ? r : 0.0;
  if (m.all_equal) return 0.0;
  const double centered = r - m.mean;
  switch (o.norm) {
    case normalization::std: return centered / (m.std + o.eps);
    case normalization::std_floor: return centered / (m.std > o.eps ? m.std : o.eps);
    case normalization::none: return centered;
    // RLOO baseline: the mean of the n - 1 others, (sum - r) / (n - 1).
    case normalization::loo: return r - (m.sum - r) / static_cast<double>(m.n - 1);
    case normalization::batch_std: return centered / (batch_std + o.eps);
  }
  return 0.0;
}

inline void check_advantage_options(const advantage_options& o) {
  SAPO_CHECK(o.eps > 0 && std::isfinite(o.eps), "options.eps", "a finite value > 0", o.eps);
  check_enum("options.norm", o.norm, normalization::batch_std);
  check_enum("options.singleton", o.singleton, singleton_policy::raw);
}

/// Group of every response, validated; n_groups through the reference.
inline std::vector<int64_t> resolve_groups(const group_layout& g, int64_t B, int64_t& n_groups) {
  std::vector<int64_t> gid(static_cast<size_t>(B));
  if (g.group_ids.empty()) {
    SAPO_CHECK(g.group_size > 0, "groups.group_size", "> 0 (or explicit group ids)", g.group_size);
    SAPO_CHECK(B % g.group_size == 0, "groups.group_size",
               "a divisor of the batch size B = " << B, g.group_size << " (B % G = " << B % g.group_size << ")");
    n_groups = B / g.group_size;
    for (int64_t i = 0; i < B; ++i) gid[static_cast<size_t>(i)] = i / g.group_size;
    return gid;
  }
  check_shape("groups.group_ids", g.group_ids, B);
  SAPO_CHECK(g.n_groups > 0, "groups.n_groups", "> 0", g.n_groups);
  n_groups = g.n_groups;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t id = g.group_ids(i);
    SAPO_CHECK(id >= 0 && id < n_groups, "groups.group_ids",
               "ids in [0, " << n_groups << ")", id << " at response " << i);
    gid[static_cast<size_t>(i)] = id;
  }
  return gid;
}

template <class R>
bool is_absent(R r) {
  return std::isnan(static_cast<double>(r));
}

/// Two-pass moments over the present rewards of `members`, in member order.
template <class R>
group_moments moments(const mat_view<R>& r, const int64_t* members, int64_t count, int64_t k, bool unbiased) {
  group_moments m;
  double lo = 0, hi = 0;
  for (int64_t j = 0; j < count; ++j) {
    const double v = static_cast<double>(r(members[j], k));
    if (std::isnan(v)) continue;
    if (m.n == 0) lo = hi = v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    m.sum += v;
    ++m.n;
  }
  if (m.n == 0) return m;
  m.all_equal = lo == hi;
  m.mean = m.sum / static_cast<double>(m.n);
  double ss = 0;
  for (int64_t j = 0; j < count; ++j) {
    const double v = static_cast<double>(r(members[j], k));
    if (!std::isnan(v)) ss += (v - m.mean) * (v - m.mean);
  }
  const int64_t dof = unbiased ? m.n - 1 : m.n;
  m.std = dof > 0 ? std::sqrt(ss / static_cast<double>(dof)) : 0.0;
  return m;
}

/// The checks of group_advantages that need no data, shared by the CPU and CUDA entry points.
template <class R, class A>
void check_group_advantage_inputs(const mat_view<R>& rewards, const advantage_options& options,
                                  const mat_view<A>& adv) {
  static_assert(std::is_floating_point<std::remove_const_t<R>>::value, "rewards must be float or double");
  static_assert(std::is_floating_point<A>::value, "advantages must be float or double");
  const int64_t B = rewards.rows, K = rewards.cols;
  check_num_steps("rewards.cols (K)", K);
  check_shape("rewards", rewards, B, K);
  check_shape("adv", adv, B, K);
  check_output("adv", adv);
  check_advantage_options(options);
}

}  // namespace detail

/// \brief Group-relative advantages for every (response, step) (SPEC §3).
/// \param rewards (B, K) step rewards; NaN marks an absent step (left out, A = 0)
/// \param groups  contiguous groups of G or explicit ids
/// \param adv     (B, K) output A[i,k], float or double
/// \return per-step statistics (mean reward, zero-variance fraction, advantage std)
template <class R, class A>
advantage_stats group_advantages(mat_view<R> rewards, const group_layout& groups, const advantage_options& options,
                                 mat_view<A> adv) {
  detail::check_group_advantage_inputs(rewards, options, adv);
  const int64_t B = rewards.rows, K = rewards.cols;
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k)
      SAPO_CHECK(!std::isinf(static_cast<double>(rewards(i, k))), "rewards",
                 "finite values or NaN (absent step) at (" << i << ", " << k << ")", rewards(i, k));
  int64_t n_groups = 0;
  const std::vector<int64_t> gid = detail::resolve_groups(groups, B, n_groups);

  // Members of each group, in response order (a stable counting sort).
  std::vector<int64_t> offset(static_cast<size_t>(n_groups + 1), 0), members(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) ++offset[static_cast<size_t>(gid[static_cast<size_t>(i)] + 1)];
  for (int64_t g = 0; g < n_groups; ++g) offset[static_cast<size_t>(g + 1)] += offset[static_cast<size_t>(g)];
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < B; ++i) members[static_cast<size_t>(fill[static_cast<size_t>(gid[static_cast<size_t>(i)])]++)] = i;
  }

  advantage_stats stats;
  stats.mean_reward.assign(static_cast<size_t>(K), 0.0);
  stats.zero_variance_fraction.assign(static_cast<size_t>(K), 0.0);
  stats.advantage_std.assign(static_cast<size_t>(K), 0.0);
  stats.n_present.assign(static_cast<size_t>(K), 0);
  stats.n_zero_variance.assign(static_cast<size_t>(K), 0);
  stats.n_pairs.assign(static_cast<size_t>(K), 0);
  std::vector<double> a_sum(static_cast<size_t>(K), 0.0), a_sq(static_cast<size_t>(K), 0.0);

  std::vector<int64_t> everyone(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) everyone[static_cast<size_t>(i)] = i;

  for (int64_t k = 0; k < K; ++k) {
    const auto ks = static_cast<size_t>(k);
    const detail::group_moments batch = detail::moments(rewards, everyone.data(), B, k, options.unbiased_std);
    stats.n_present[ks] = batch.n;
    stats.mean_reward[ks] = batch.mean;
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t* mem = members.data() + offset[static_cast<size_t>(g)];
      const int64_t count = offset[static_cast<size_t>(g + 1)] - offset[static_cast<size_t>(g)];
      const detail::group_moments m = detail::moments(rewards, mem, count, k, options.unbiased_std);
      if (m.n >= 1) {
        ++stats.n_pairs[ks];
        if (m.n == 1 || m.all_equal) ++stats.n_zero_variance[ks];
      }
      for (int64_t j = 0; j < count; ++j) {
        const double r = static_cast<double>(rewards(mem[j], k));
        const double a = std::isnan(r) ? 0.0 : detail::group_relative_advantage(r, m, batch.std, options);
        adv(mem[j], k) = static_cast<A>(a);
        if (!std::isnan(r)) {
          a_sum[ks] += a;
          a_sq[ks] += a * a;
        }
      }
    }
  }
  for (size_t k = 0; k < static_cast<size_t>(K); ++k) {
    if (stats.n_pairs[k] > 0)
      stats.zero_variance_fraction[k] =
          static_cast<double>(stats.n_zero_variance[k]) / static_cast<double>(stats.n_pairs[k]);
    if (stats.n_present[k] > 0) {
      const double n = static_cast<double>(stats.n_present[k]);
      const double mean = a_sum[k] / n;
      stats.advantage_std[k] = std::sqrt(std::max(0.0, a_sq[k] / n - mean * mean));
    }
  }
  return stats;
}

/// \brief Outcome mode (GRPO family): one reward and one advantage per response. The same
/// computation as group_advantages with K = 1.
/// \param rewards (B) one reward per response (NaN: left out, A = 0)
/// \param adv     (B) output
template <class R, class A>
advantage_stats outcome_advantages(vec_view<R> rewards, const group_layout& groups, const advantage_options& options,
                                   vec_view<A> adv) {
  detail::check_shape("adv", adv, rewards.size);
  detail::check_output("adv", adv);
  return group_advantages(as_column(rewards), groups, options, as_column(adv));
}

/// Weights of mixed mode: A = outcome * A_outcome + step * A_step.
struct mix_weights {
  double outcome = 1.0;
  double step = 1.0;
};

/// \brief Mixed mode (SPEC §3): out[i,k] = w.outcome * outcome_adv[i] + w.step * step_adv[i,k].
/// \param outcome_adv (B)     from outcome_advantages
/// \param step_adv    (B, K)  from group_advantages
/// \param out         (B, K)  may alias step_adv exactly (same view)
template <class O, class S, class A>
void mix_advantages(vec_view<O> outcome_adv, mat_view<S> step_adv, mix_weights weights, mat_view<A> out) {
  static_assert(std::is_floating_point<A>::value, "advantages must be float or double");
  const int64_t B = step_adv.rows, K = step_adv.cols;
  detail::check_num_steps("step_adv.cols (K)", K);
  detail::check_shape("step_adv", step_adv, B, K);
  detail::check_shape("outcome_adv", outcome_adv, B);
  detail::check_shape("out", out, B, K);
  detail::check_output("out", out);
  SAPO_CHECK(std::isfinite(weights.outcome), "weights.outcome", "a finite weight", weights.outcome);
  SAPO_CHECK(std::isfinite(weights.step), "weights.step", "a finite weight", weights.step);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k)
      out(i, k) = static_cast<A>(weights.outcome * static_cast<double>(outcome_adv(i)) +
                                 weights.step * static_cast<double>(step_adv(i, k)));
}

/// \brief Token advantages: token_adv[i,t] = A[i, step[i,t]] where step >= 0 and mask = 1, else 0.
/// \param adv       (B, K)
/// \param step      (B, T) step ids in -1..K-1
/// \param mask      (B, T)
/// \param token_adv (B, T) output
/// \param num_threads worker threads (0 = every hardware thread); the result does not depend on it
template <class A, class S, class M, class O>
void broadcast_step_advantages(mat_view<A> adv, mat_view<S> step, mat_view<M> mask, mat_view<O> token_adv,
                               int num_threads = 0) {
  static_assert(std::is_floating_point<O>::value, "token advantages must be float or double");
  static_assert(std::is_integral<std::remove_const_t<S>>::value, "step ids must be an integer type");
  const int64_t B = step.rows, T = step.cols, K = adv.cols;
  detail::check_num_steps("adv.cols (K)", K);
  detail::check_shape("adv", adv, B, K);
  detail::check_shape("step", step, B, T);
  detail::check_shape("mask", mask, B, T);
  detail::check_shape("token_adv", token_adv, B, T);
  detail::check_output("token_adv", token_adv);
  SAPO_CHECK(num_threads >= 0, "num_threads", ">= 0 (0 = every hardware thread)", num_threads);
  // Check every row (reads only), then write: a rejected input leaves token_adv untouched.
  const detail::row_chunks chunks(B, T);
  detail::parallel_for_chunks(chunks.count, num_threads, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      detail::check_mask_row("mask", mask, i);
      for (int64_t t = 0; t < T; ++t)
        if (mask(i, t) != M(0))
          SAPO_CHECK(step(i, t) >= -1 && step(i, t) < K, "step",
                     "ids in [-1, " << K << ") at (" << i << ", " << t << ")", +step(i, t));
    }
  });
  detail::parallel_for_chunks(chunks.count, num_threads, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i)
      for (int64_t t = 0; t < T; ++t) {
        const bool on = mask(i, t) != M(0) && step(i, t) >= 0;
        token_adv(i, t) = on ? static_cast<O>(adv(i, static_cast<int64_t>(step(i, t)))) : O(0);
      }
  });
}

/// \brief Outcome-mode broadcast: token_adv[i,t] = A[i] on every masked token. It is the step
/// broadcast with K = 1 and every token in step 0.
template <class A, class M, class O>
void broadcast_outcome_advantages(vec_view<A> adv, mat_view<M> mask, mat_view<O> token_adv, int num_threads = 0) {
  static const int32_t step_zero = 0;
  const mat_view<const int32_t> all_step_zero(&step_zero, mask.rows, mask.cols, 0, 0);
  detail::check_shape("adv", adv, mask.rows);
  broadcast_step_advantages(as_column(adv), all_step_zero, mask, token_adv, num_threads);
}

}  // namespace sapo
