/// \file advantages.hpp
/// \brief SPEC §3: group-relative advantages per (response, step), the outcome (GRPO)
/// special case K = 1, mixed outcome + step advantages, and the broadcast to tokens; the same
/// advantages split into phases for groups spread over data-parallel ranks, and the counts
/// behind the loss's global normalizers (docs/distributed.md).
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
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.hpp"
#include "parallel.hpp"
#include "policy_loss.hpp"
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

// ---------------------------------------------------------------------------------------
// Distributed (data-parallel) use: the responses of one group may sit on different ranks.
// group_advantages is split into phases joined by all-reduces (docs/distributed.md):
//   round 1  local_group_partials      count / sum / min / max per (group, step)  -> SUM, SUM, MIN, MAX
//   round 2  local_group_deviations    sum of squared deviations from the global mean -> SUM
//   finish   finalize_group_advantages A of the local rows + statistics; advantage_sums -> SUM,
//            then finish_advantage_std
// Two rounds instead of one (sums of r and r^2) keep the two-pass numerics of the
// single-process code: r^2 sums cancel catastrophically when rewards share a large offset.
// group_advantages runs the same phases on one process with nothing to reduce.
// ---------------------------------------------------------------------------------------

/// The groups of one rank's rows, by global group id (distributed phases).
struct group_slice {
  int64_t n_groups = 0;               ///< groups of the whole (all-rank) batch, > 0
  int64_t group_size = 0;             ///< G > 0: local row i is global row first_row + i, in group (first_row + i) / G
  int64_t first_row = 0;              ///< with G > 0: the global index of this rank's first row
  vec_view<const int64_t> group_ids;  ///< otherwise: (B_local) global ids in [0, n_groups), any order

  /// Contiguous groups of G over the global batch; this rank holds global rows
  /// [first_row, first_row + B_local) (a group may straddle ranks).
  static group_slice contiguous(int64_t G, int64_t first_row, int64_t n_groups) {
    group_slice g;
    g.group_size = G;
    g.first_row = first_row;
    g.n_groups = n_groups;
    return g;
  }
  /// Explicit global ids of the local rows.
  static group_slice explicit_ids(vec_view<const int64_t> ids, int64_t n_groups) {
    // A rank may hold no rows; an empty id array must still mean "explicit ids", and
    // vec_view::empty() is "no array given", so point it at a dummy (never read).
    static const int64_t no_rows = 0;
    group_slice g;
    g.group_ids = ids.data == nullptr && ids.size == 0 ? vec_view<const int64_t>(&no_rows, 0) : ids;
    g.n_groups = n_groups;
    return g;
  }
};

/// Per-(group, step) partial moments. Every array is row-major (n_groups + 1, K): row g < n_groups
/// is group g, row n_groups is the whole batch (batch_std, mean_reward, n_present). Each
/// array is one contiguous buffer to all-reduce with the operation named beside it.
struct group_partials {
  int64_t n_groups = 0, K = 0;
  std::vector<int64_t> count;  ///< round 1, SUM: present (non-NaN) rewards
  std::vector<double> sum;     ///< round 1, SUM: sum of the present rewards
  std::vector<double> min;     ///< round 1, MIN: smallest present reward (+inf if none)
  std::vector<double> max;     ///< round 1, MAX: largest present reward (-inf if none)
  /// round 2, SUM: sum of (r - mean)^2, mean = sum / count of the round-1 reduced arrays;
  /// empty until local_group_deviations fills it.
  std::vector<double> sq_dev;

  size_t at(int64_t g, int64_t k) const { return static_cast<size_t>(g * K + k); }
  size_t size() const { return static_cast<size_t>((n_groups + 1) * K); }
};

/// Sums of the advantages of the present local rows per step, for advantage_std: all-reduce
/// both (SUM), then finish_advantage_std.
struct advantage_sums {
  std::vector<double> sum;     ///< (K) sum of A
  std::vector<double> sum_sq;  ///< (K) sum of A^2
};

/// \brief advantage_std from all-reduced advantage_sums: the population std of A over the
/// stats.n_present[k] present responses, sqrt(sum_sq / n - (sum / n)^2) (0 when n = 0).
inline void finish_advantage_std(advantage_stats& stats, const advantage_sums& reduced) {
  const size_t K = stats.n_present.size();
  SAPO_CHECK(reduced.sum.size() == K && reduced.sum_sq.size() == K, "advantage_sums",
             K << " entries in sum and sum_sq", reduced.sum.size() << " and " << reduced.sum_sq.size());
  stats.advantage_std.assign(K, 0.0);
  for (size_t k = 0; k < K; ++k) {
    if (stats.n_present[k] <= 0) continue;
    const double n = static_cast<double>(stats.n_present[k]);
    const double mean = reduced.sum[k] / n;
    stats.advantage_std[k] = std::sqrt(std::max(0.0, reduced.sum_sq[k] / n - mean * mean));
  }
}

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

namespace detail {

template <class R>
void check_rewards_finite(const mat_view<R>& rewards) {
  for (int64_t i = 0; i < rewards.rows; ++i)
    for (int64_t k = 0; k < rewards.cols; ++k)
      SAPO_CHECK(!std::isinf(static_cast<double>(rewards(i, k))), "rewards",
                 "finite values or NaN (absent step) at (" << i << ", " << k << ")", rewards(i, k));
}

/// Global group of every local row, validated.
inline std::vector<int64_t> resolve_slice(const group_slice& g, int64_t B) {
  if (!g.group_ids.empty()) {
    int64_t n_groups = 0;
    return resolve_groups(group_layout::explicit_ids(g.group_ids, g.n_groups), B, n_groups);
  }
  SAPO_CHECK(g.group_size > 0, "groups.group_size", "> 0 (or explicit group ids)", g.group_size);
  SAPO_CHECK(g.n_groups > 0, "groups.n_groups", "> 0", g.n_groups);
  SAPO_CHECK(g.first_row >= 0, "groups.first_row", ">= 0", g.first_row);
  SAPO_CHECK(B == 0 || (g.first_row + B - 1) / g.group_size < g.n_groups, "groups.first_row",
             "local rows inside the " << g.n_groups << " groups of " << g.group_size << " (global rows < "
                                      << g.n_groups * g.group_size << ")",
             "rows [" << g.first_row << ", " << g.first_row + B << ")");
  std::vector<int64_t> gid(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) gid[static_cast<size_t>(i)] = (g.first_row + i) / g.group_size;
  return gid;
}

template <class R>
void check_phase_rewards(const mat_view<R>& rewards) {
  static_assert(std::is_floating_point<std::remove_const_t<R>>::value, "rewards must be float or double");
  check_num_steps("rewards.cols (K)", rewards.cols);
  check_shape("rewards", rewards, rewards.rows, rewards.cols);
  check_rewards_finite(rewards);
}

/// Round 1 over the local rows: count, sum, min, max per (group, step) and for the batch.
/// Rows are visited in order, so each sum runs in member order as the two-pass code did.
template <class R>
group_partials partial_moments(const mat_view<R>& r, const std::vector<int64_t>& gid, int64_t n_groups) {
  group_partials p;
  p.n_groups = n_groups;
  p.K = r.cols;
  p.count.assign(p.size(), 0);
  p.sum.assign(p.size(), 0.0);
  p.min.assign(p.size(), std::numeric_limits<double>::infinity());
  p.max.assign(p.size(), -std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t g = gid[static_cast<size_t>(i)];
    for (int64_t k = 0; k < r.cols; ++k) {
      const double v = static_cast<double>(r(i, k));
      if (std::isnan(v)) continue;
      for (const size_t j : {p.at(g, k), p.at(n_groups, k)}) {
        ++p.count[j];
        p.sum[j] += v;
        p.min[j] = std::min(p.min[j], v);
        p.max[j] = std::max(p.max[j], v);
      }
    }
  }
  return p;
}

/// Round 2 over the local rows: sum of squared deviations from mean = sum / count of the
/// (reduced) round-1 partials.
template <class R>
void partial_deviations(const mat_view<R>& r, const std::vector<int64_t>& gid, group_partials& p) {
  std::vector<double> mean(p.size(), 0.0);
  for (size_t j = 0; j < p.size(); ++j)
    if (p.count[j] > 0) mean[j] = p.sum[j] / static_cast<double>(p.count[j]);
  p.sq_dev.assign(p.size(), 0.0);
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t g = gid[static_cast<size_t>(i)];
    for (int64_t k = 0; k < r.cols; ++k) {
      const double v = static_cast<double>(r(i, k));
      if (std::isnan(v)) continue;
      for (const size_t j : {p.at(g, k), p.at(p.n_groups, k)}) p.sq_dev[j] += (v - mean[j]) * (v - mean[j]);
    }
  }
}

/// group_moments of entry j of reduced partials (unbiased: divide by n - 1).
inline group_moments moments_of(const group_partials& p, size_t j, bool unbiased) {
  group_moments m;
  m.n = p.count[j];
  if (m.n == 0) return m;
  m.sum = p.sum[j];
  m.all_equal = p.min[j] == p.max[j];
  m.mean = m.sum / static_cast<double>(m.n);
  const int64_t dof = unbiased ? m.n - 1 : m.n;
  m.std = dof > 0 ? std::sqrt(p.sq_dev[j] / static_cast<double>(dof)) : 0.0;
  return m;
}

/// The partials must match the layout they are used with, and both rounds must be done.
inline void check_partials(const group_partials& p, int64_t n_groups, int64_t K, bool need_sq_dev) {
  SAPO_CHECK(p.n_groups == n_groups && p.K == K, "partials", "(n_groups, K) = (" << n_groups << ", " << K << ")",
             "(" << p.n_groups << ", " << p.K << ")");
  const size_t n = p.size();
  SAPO_CHECK(p.count.size() == n && p.sum.size() == n && p.min.size() == n && p.max.size() == n, "partials",
             "count, sum, min and max of (n_groups + 1) * K = " << n << " entries",
             p.count.size() << ", " << p.sum.size() << ", " << p.min.size() << ", " << p.max.size());
  for (size_t j = 0; j < n; ++j)
    SAPO_CHECK(p.count[j] >= 0, "partials.count", "counts >= 0", p.count[j] << " at entry " << j);
  if (need_sq_dev)
    SAPO_CHECK(p.sq_dev.size() == n, "partials.sq_dev",
               n << " entries (round 2: local_group_deviations, then an all-reduce)", p.sq_dev.size());
}

/// Finish: the advantages of the local rows from the reduced partials, and the statistics
/// (global, advantage_std from the local `sums`). The local rows are visited group by group
/// in row order, the order in which the single-process code always summed A.
template <class R, class A>
advantage_stats finalize(const mat_view<R>& r, const std::vector<int64_t>& gid, const group_partials& p,
                         const advantage_options& o, const mat_view<A>& adv, advantage_sums& sums) {
  const int64_t B = r.rows, K = r.cols, n_groups = p.n_groups;
  // Local members of each group, in row order (a stable counting sort).
  std::vector<int64_t> offset(static_cast<size_t>(n_groups + 1), 0), members(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) ++offset[static_cast<size_t>(gid[static_cast<size_t>(i)] + 1)];
  for (int64_t g = 0; g < n_groups; ++g) offset[static_cast<size_t>(g + 1)] += offset[static_cast<size_t>(g)];
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < B; ++i)
      members[static_cast<size_t>(fill[static_cast<size_t>(gid[static_cast<size_t>(i)])]++)] = i;
  }

  advantage_stats stats;
  stats.mean_reward.assign(static_cast<size_t>(K), 0.0);
  stats.zero_variance_fraction.assign(static_cast<size_t>(K), 0.0);
  stats.n_present.assign(static_cast<size_t>(K), 0);
  stats.n_zero_variance.assign(static_cast<size_t>(K), 0);
  stats.n_pairs.assign(static_cast<size_t>(K), 0);
  sums.sum.assign(static_cast<size_t>(K), 0.0);
  sums.sum_sq.assign(static_cast<size_t>(K), 0.0);

  for (int64_t k = 0; k < K; ++k) {
    const auto ks = static_cast<size_t>(k);
    const group_moments batch = moments_of(p, p.at(n_groups, k), o.unbiased_std);
    stats.n_present[ks] = batch.n;
    stats.mean_reward[ks] = batch.mean;
    for (int64_t g = 0; g < n_groups; ++g) {
      const group_moments m = moments_of(p, p.at(g, k), o.unbiased_std);
      if (m.n >= 1) {
        ++stats.n_pairs[ks];
        if (m.n == 1 || m.all_equal) ++stats.n_zero_variance[ks];
      }
      for (int64_t j = offset[static_cast<size_t>(g)]; j < offset[static_cast<size_t>(g + 1)]; ++j) {
        const int64_t i = members[static_cast<size_t>(j)];
        const double v = static_cast<double>(r(i, k));
        const double a = std::isnan(v) ? 0.0 : group_relative_advantage(v, m, batch.std, o);
        adv(i, k) = static_cast<A>(a);
        if (!std::isnan(v)) {
          sums.sum[ks] += a;
          sums.sum_sq[ks] += a * a;
        }
      }
    }
    if (stats.n_pairs[ks] > 0)
      stats.zero_variance_fraction[ks] =
          static_cast<double>(stats.n_zero_variance[ks]) / static_cast<double>(stats.n_pairs[ks]);
  }
  finish_advantage_std(stats, sums);
  return stats;
}

}  // namespace detail

/// \brief Group-relative advantages for every (response, step) (SPEC §3).
/// \param rewards (B, K) step rewards; NaN marks an absent step (left out, A = 0)
/// \param groups  contiguous groups of G or explicit ids
/// \param adv     (B, K) output A[i,k], float or double
/// \return per-step statistics (mean reward, zero-variance fraction, advantage std)
///
/// The distributed phases below with a single rank (nothing to all-reduce).
template <class R, class A>
advantage_stats group_advantages(mat_view<R> rewards, const group_layout& groups, const advantage_options& options,
                                 mat_view<A> adv) {
  detail::check_group_advantage_inputs(rewards, options, adv);
  detail::check_rewards_finite(rewards);
  int64_t n_groups = 0;
  const std::vector<int64_t> gid = detail::resolve_groups(groups, rewards.rows, n_groups);
  group_partials p = detail::partial_moments(rewards, gid, n_groups);
  detail::partial_deviations(rewards, gid, p);
  advantage_sums sums;
  return detail::finalize(rewards, gid, p, options, adv, sums);
}

/// \brief Distributed round 1: this rank's partial count / sum / min / max per (group, step)
/// and for the batch. All-reduce count and sum with SUM, min with MIN, max with MAX.
/// \param rewards (B_local, K); NaN = absent. B_local may be 0 (the rank still takes part in
///                every all-reduce).
/// \param groups  global group ids of the local rows
template <class R>
group_partials local_group_partials(mat_view<R> rewards, const group_slice& groups) {
  detail::check_phase_rewards(rewards);
  const std::vector<int64_t> gid = detail::resolve_slice(groups, rewards.rows);
  return detail::partial_moments(rewards, gid, groups.n_groups);
}

/// \brief Distributed round 2: fills partials.sq_dev with this rank's sums of squared
/// deviations from the global means. `partials` must hold the all-reduced round-1 arrays;
/// all-reduce sq_dev with SUM afterwards.
template <class R>
void local_group_deviations(mat_view<R> rewards, const group_slice& groups, group_partials& partials) {
  detail::check_phase_rewards(rewards);
  const std::vector<int64_t> gid = detail::resolve_slice(groups, rewards.rows);
  detail::check_partials(partials, groups.n_groups, rewards.cols, false);
  detail::partial_deviations(rewards, gid, partials);
}

/// \brief Distributed finish: the advantages of the local rows (B_local, K) from the fully
/// reduced partials, and the statistics.
/// \param reduced    partials after both rounds and their all-reduces
/// \param adv        (B_local, K) output
/// \param local_sums out: this rank's advantage_sums
/// \return statistics of the global batch (every rank gets the same), except advantage_std,
///         which covers the local rows only: all-reduce local_sums (SUM) and call
///         finish_advantage_std(stats, reduced_sums) for the global value.
template <class R, class A>
advantage_stats finalize_group_advantages(mat_view<R> rewards, const group_slice& groups,
                                          const group_partials& reduced, const advantage_options& options,
                                          mat_view<A> adv, advantage_sums& local_sums) {
  detail::check_group_advantage_inputs(rewards, options, adv);
  detail::check_rewards_finite(rewards);
  const std::vector<int64_t> gid = detail::resolve_slice(groups, rewards.rows);
  detail::check_partials(reduced, groups.n_groups, rewards.cols, true);
  return detail::finalize(rewards, gid, reduced, options, adv, local_sums);
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
  // Both loops are branch-free over the row so that contiguous rows vectorize; the search
  // for the culprit runs only on a failing row.
  const detail::row_chunks chunks(B, T);
  detail::parallel_for_chunks(chunks.count, num_threads, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      detail::check_mask_row("mask", mask, i);
      const auto* s = step.data + i * step.row_stride;
      const auto* m = mask.data + i * mask.row_stride;
      auto out_of_range = [&](int64_t t) {
        const auto v = static_cast<int64_t>(s[t * step.col_stride]);
        return (m[t * mask.col_stride] != M(0)) & ((v < -1) | (v >= K));
      };
      int bad = 0;  // an int: GCC does not vectorize a bool |= reduction
      if (step.col_stride == 1 && mask.col_stride == 1)
        for (int64_t t = 0; t < T; ++t) bad |= (m[t] != M(0)) & ((static_cast<int64_t>(s[t]) < -1) |
                                                                 (static_cast<int64_t>(s[t]) >= K));
      else
        for (int64_t t = 0; t < T; ++t) bad |= out_of_range(t);
      if (bad)
        for (int64_t t = 0; t < T; ++t)
          SAPO_CHECK(!out_of_range(t), "step", "ids in [-1, " << K << ") at (" << i << ", " << t << ")",
                     +step(i, t));
    }
  });
  detail::parallel_for_chunks(chunks.count, num_threads, [&](int64_t c) {
    // The row's advantages as a table indexed by step + 1; slot 0 (step -1 or mask 0) is 0.
    O table[max_steps + 1];
    table[0] = O(0);
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      for (int64_t k = 0; k < K; ++k) table[k + 1] = static_cast<O>(adv(i, k));
      const auto* s = step.data + i * step.row_stride;
      const auto* m = mask.data + i * mask.row_stride;
      O* out = token_adv.data + i * token_adv.row_stride;
      if (step.col_stride == 1 && mask.col_stride == 1 && token_adv.col_stride == 1) {
        for (int64_t t = 0; t < T; ++t) out[t] = table[m[t] != M(0) ? static_cast<int64_t>(s[t]) + 1 : 0];
      } else {
        for (int64_t t = 0; t < T; ++t)
          out[t * token_adv.col_stride] =
              table[m[t * mask.col_stride] != M(0) ? static_cast<int64_t>(s[t * step.col_stride]) + 1 : 0];
      }
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

// ---------------------------------------------------------------------------------------
// The loss's global normalizers (docs/decisions.md, "Normalizers") for data-parallel use:
// each rank counts its rows, the counts are all-reduced (SUM), and set_global_normalizers
// puts them into loss_options.global_*. Then each rank's loss is its share of the loss of
// the whole batch (the shares add up to it), and each rank's gradient is the whole-batch
// gradient of its rows.
// ---------------------------------------------------------------------------------------

/// Local counts behind the normalizers; all-reduce every field with SUM.
struct loss_counts {
  int64_t tokens = 0;     ///< masked tokens (token_mean)
  int64_t sequences = 0;  ///< rows with >= 1 masked token (seq_mean_token_mean, seq_mean_token_sum)
  int64_t steps = 0;      ///< (row, k) pairs with >= 1 masked token of step k (step_mean); 0 without step ids
  int64_t rows = 0;       ///< rows, empty or not: the B of seq_mean_token_sum_norm
};

/// \brief This rank's loss_counts from mask (B, T) and step ids (B, T) (an empty step view:
/// no step ids, steps = 0). They equal loss_result's n_tokens, n_sequences, n_steps whenever
/// policy_loss drops no token; under nonfinite_policy::mask with non-finite inputs, count
/// with loss_counts_of on a first policy_loss call instead.
template <class M, class S>
loss_counts count_loss_normalizers(mat_view<M> mask, mat_view<S> step) {
  static_assert(std::is_integral<std::remove_const_t<S>>::value, "step ids must be an integer type");
  const int64_t B = mask.rows, T = mask.cols;
  detail::check_shape("mask", mask, B, T);
  const bool have_step = !step.empty();
  if (have_step) detail::check_shape("step", step, B, T);
  loss_counts c;
  c.rows = B;
  for (int64_t i = 0; i < B; ++i) {
    detail::check_mask_row("mask", mask, i);
    int64_t tokens = 0;
    uint64_t seen = 0;  // bit k: step k has a masked token in this row (K <= 64)
    for (int64_t t = 0; t < T; ++t) {
      if (mask(i, t) == M(0)) continue;
      ++tokens;
      if (!have_step) continue;
      const auto s = static_cast<int64_t>(step(i, t));
      SAPO_CHECK(s >= -1 && s < max_steps, "step", "ids in [-1, " << max_steps << ") at (" << i << ", " << t << ")",
                 s);
      if (s >= 0) seen |= uint64_t(1) << s;
    }
    c.tokens += tokens;
    c.sequences += tokens > 0 ? 1 : 0;
    for (; seen; seen &= seen - 1) ++c.steps;
  }
  return c;
}

/// Without step ids.
template <class M>
loss_counts count_loss_normalizers(mat_view<M> mask) {
  return count_loss_normalizers(mask, mat_view<const int32_t>{});
}

/// The counts a policy_loss call used (its loss_result) for a batch of `rows` rows.
inline loss_counts loss_counts_of(const loss_result& r, int64_t rows) {
  loss_counts c;
  c.tokens = r.n_tokens;
  c.sequences = r.n_sequences;
  c.steps = r.n_steps;
  c.rows = rows;
  return c;
}

/// \brief Puts all-reduced counts into options.global_tokens / global_sequences (the number of
/// rows for seq_mean_token_sum_norm, which also needs the same max_response_length on every
/// rank) / global_steps. A global count of 0 leaves 0 (= local count, which is then 0 too).
inline void set_global_normalizers(loss_options& options, const loss_counts& global) {
  options.global_tokens = static_cast<double>(global.tokens);
  options.global_sequences = static_cast<double>(
      options.agg == aggregation::seq_mean_token_sum_norm ? global.rows : global.sequences);
  options.global_steps = static_cast<double>(global.steps);
}

}  // namespace sapo
