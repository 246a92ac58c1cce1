/// \file policy_loss.hpp
/// \brief SPEC §4-6: the clipped policy loss with KL penalty and aggregation, in one call
/// that returns the scalar loss, d loss / d logp for every token and the diagnostics.
///
/// \code
///   sapo::policy_inputs<float> in;
///   in.logp = logp; in.old_logp = old_logp; in.mask = mask;
///   in.step = step; in.step_advantages = A;          // or in.token_advantages = token_adv
///   sapo::loss_options opt;                          // token ratio, clip 0.2/0.2, token_mean
///   sapo::loss_result r = sapo::policy_loss(in, opt, grad);   // grad (B, T)
/// \endcode
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "checks.hpp"
#include "loss_math.hpp"
#include "view.hpp"

namespace sapo {

enum class aggregation {
  token_mean,               ///< sum l m / N_tok (default)
  seq_mean_token_mean,      ///< mean_i (sum_t l m / sum_t m)
  seq_mean_token_sum,       ///< mean_i sum_t l m
  seq_mean_token_sum_norm,  ///< sum l m / (B L)
  step_mean,                ///< mean over present steps of the step's mean loss
};

enum class nonfinite_policy {
  error,  ///< throw sapo::error (default)
  mask,   ///< drop the token as if mask = 0 and count it
};

struct loss_options {
  ratio_level ratio = ratio_level::token;
  double clip_low = 0.2;   ///< eps_low in (0, 1)
  double clip_high = 0.2;  ///< eps_high in (0, inf)
  bool dual_clip = false;
  double dual_clip_c = 3.0;  ///< c > 1, used when dual_clip
  double kl_coef = 0.0;      ///< beta; 0 = off
  kl_estimator kl = kl_estimator::k3;
  aggregation agg = aggregation::token_mean;
  double max_response_length = 0;  ///< L of seq_mean_token_sum_norm; 0 = T
  /// Global normalizers for data-parallel use; 0 = the local count.
  double global_tokens = 0, global_sequences = 0, global_steps = 0;
  nonfinite_policy nonfinite = nonfinite_policy::error;
  int num_threads = 0;  ///< worker threads; 0 = every hardware thread. Results do not depend on it.
};

/// Inputs; every (B, T) view may have its own strides. Give either token_advantages or
/// step + step_advantages.
template <class T, class M = T>
struct policy_inputs {
  mat_view<const T> logp;              ///< (B, T) current policy
  mat_view<const T> old_logp;          ///< (B, T) sampling policy
  mat_view<const T> ref_logp;          ///< (B, T) reference policy, optional (needed when kl_coef > 0)
  mat_view<const T> token_advantages;  ///< (B, T) per-token advantages, or
  mat_view<const T> step_advantages;   ///< (B, K) per-step advantages A[i,k], used with step
  mat_view<const int32_t> step;        ///< (B, T) step ids -1..K-1; needed for step ratio / step_mean
  mat_view<const M> mask;              ///< (B, T) 0/1
};

/// Scalar loss and diagnostics (SPEC §6); every mean is over the tokens used.
struct loss_result {
  double loss = 0;
  double clip_frac_low = 0, clip_frac_high = 0, clip_frac_dual = 0;
  double ratio_mean = 0, ratio_max = 0;
  double approx_kl_old = 0;     ///< mean of -delta
  double approx_kl_old_k3 = 0;  ///< mean of exp(-delta) + delta - 1
  double kl_ref = 0;            ///< mean of the KL estimator to the reference (without beta)
  int64_t n_tokens = 0;         ///< local masked tokens used
  int64_t n_sequences = 0;      ///< local rows with at least one token
  int64_t n_steps = 0;          ///< local present (row, step) pairs (0 without step ids)
  int64_t n_nonfinite_masked = 0;
};

namespace detail {

inline void check_loss_options(const loss_options& o) {
  check_enum("options.ratio", o.ratio, ratio_level::sequence);
  check_enum("options.kl", o.kl, kl_estimator::k3);
  check_enum("options.agg", o.agg, aggregation::step_mean);
  check_enum("options.nonfinite", o.nonfinite, nonfinite_policy::mask);
  SAPO_CHECK(o.clip_low > 0 && o.clip_low < 1, "options.clip_low", "a value in (0, 1)", o.clip_low);
  SAPO_CHECK(o.clip_high > 0 && std::isfinite(o.clip_high), "options.clip_high", "a value in (0, inf)", o.clip_high);
  if (o.dual_clip)
    SAPO_CHECK(o.dual_clip_c > 1 && std::isfinite(o.dual_clip_c), "options.dual_clip_c", "a value > 1",
               o.dual_clip_c);
  SAPO_CHECK(o.kl_coef >= 0 && std::isfinite(o.kl_coef), "options.kl_coef", "a finite value >= 0", o.kl_coef);
  SAPO_CHECK(o.max_response_length >= 0 && std::isfinite(o.max_response_length), "options.max_response_length",
             "a finite value >= 0 (0 = T)", o.max_response_length);
  SAPO_CHECK(o.global_tokens >= 0 && std::isfinite(o.global_tokens), "options.global_tokens",
             "a finite count >= 0 (0 = local)", o.global_tokens);
  SAPO_CHECK(o.global_sequences >= 0 && std::isfinite(o.global_sequences), "options.global_sequences",
             "a finite count >= 0 (0 = local)", o.global_sequences);
  SAPO_CHECK(o.global_steps >= 0 && std::isfinite(o.global_steps), "options.global_steps",
             "a finite count >= 0 (0 = local)", o.global_steps);
}

/// Per-row partial sums, combined in row order so the result never depends on scheduling.
struct row_sums {
  double loss = 0, ratio = 0, ratio_max = 0, kl_old = 0, kl_old_k3 = 0, kl_ref = 0;
  int64_t clip_low = 0, clip_high = 0, clip_dual = 0;
};

}  // namespace detail

/// \brief Policy loss, its gradient and diagnostics in one call (SPEC §4-6).
/// \param in      logp, old_logp, [ref_logp], advantages, [step], mask; see policy_inputs
/// \param options ratio level, clip, dual clip, KL, aggregation, normalizers
/// \param grad    (B, T) output: d loss / d logp (0 where mask = 0)
template <class T, class M, class G>
loss_result policy_loss(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad) {
  static_assert(std::is_floating_point<T>::value, "log-probabilities must be float or double");
  static_assert(std::is_floating_point<G>::value, "the gradient must be float or double");
  const int64_t B = in.logp.rows, Tn = in.logp.cols;
  detail::check_loss_options(options);
  detail::check_shape("logp", in.logp, B, Tn);
  detail::check_shape("old_logp", in.old_logp, B, Tn);
  detail::check_shape("mask", in.mask, B, Tn);
  detail::check_shape("grad", grad, B, Tn);
  detail::check_output("grad", grad);
  const bool use_ref = !in.ref_logp.empty();
  if (use_ref) detail::check_shape("ref_logp", in.ref_logp, B, Tn);
  SAPO_CHECK(use_ref || options.kl_coef == 0, "ref_logp", "an array when options.kl_coef > 0", "none");
  const bool by_step = !in.step_advantages.empty();
  SAPO_CHECK(by_step != !in.token_advantages.empty(), "token_advantages / step_advantages", "exactly one of them",
             (by_step ? "both" : "neither"));
  int64_t K = max_steps;
  if (by_step) {
    K = in.step_advantages.cols;
    detail::check_num_steps("step_advantages.cols (K)", K);
    detail::check_shape("step_advantages", in.step_advantages, B, K);
  } else {
    detail::check_shape("token_advantages", in.token_advantages, B, Tn);
  }
  const bool need_step = by_step || options.ratio == ratio_level::step || options.agg == aggregation::step_mean;
  SAPO_CHECK(!need_step || !in.step.empty(), "step",
             "step ids (needed by step_advantages, the step ratio and step_mean)", "none");
  if (!in.step.empty()) detail::check_shape("step", in.step, B, Tn);
  const bool have_step = !in.step.empty();
  detail::check_mask("mask", in.mask);

  auto advantage = [&](int64_t i, int64_t t) -> double {
    if (!by_step) return static_cast<double>(in.token_advantages(i, t));
    const int32_t s = in.step(i, t);
    return s >= 0 ? static_cast<double>(in.step_advantages(i, s)) : 0.0;
  };
  auto finite_token = [&](int64_t i, int64_t t) {
    return detail::is_finite(in.logp(i, t)) && detail::is_finite(in.old_logp(i, t)) &&
           (!use_ref || detail::is_finite(in.ref_logp(i, t))) && std::isfinite(advantage(i, t));
  };

  // Pass 1 (reads only): validate every used value and count tokens, rows and steps, so
  // the normalizers are known and nothing is written if an input is rejected.
  loss_result res;
  for (int64_t i = 0; i < B; ++i) {
    uint64_t seen[max_steps / 64] = {};
    int64_t row_tokens = 0;
    for (int64_t t = 0; t < Tn; ++t) {
      if (in.mask(i, t) == M(0)) continue;
      if (have_step)
        SAPO_CHECK(in.step(i, t) >= -1 && in.step(i, t) < K, "step",
                   "ids in [-1, " << K << ") at (" << i << ", " << t << ")", in.step(i, t));
      if (!finite_token(i, t)) {
        SAPO_CHECK(options.nonfinite == nonfinite_policy::mask, "logp / old_logp / ref_logp / advantages",
                   "finite values at masked-in token (" << i << ", " << t << ")",
                   "logp " << in.logp(i, t) << ", old_logp " << in.old_logp(i, t) << ", ref_logp "
                           << (use_ref ? std::to_string(in.ref_logp(i, t)) : std::string("none")) << ", advantage "
                           << advantage(i, t));
        ++res.n_nonfinite_masked;
        continue;
      }
      ++row_tokens;
      if (have_step && in.step(i, t) >= 0) seen[0] |= uint64_t(1) << in.step(i, t);
    }
    res.n_tokens += row_tokens;
    res.n_sequences += row_tokens > 0 ? 1 : 0;
    for (uint64_t bits = seen[0]; bits; bits &= bits - 1) ++res.n_steps;
  }

  double norm = 0;
  switch (options.agg) {
    case aggregation::token_mean:
      norm = options.global_tokens > 0 ? options.global_tokens : static_cast<double>(res.n_tokens);
      break;
    case aggregation::seq_mean_token_mean:
    case aggregation::seq_mean_token_sum:
      norm = options.global_sequences > 0 ? options.global_sequences : static_cast<double>(res.n_sequences);
      break;
    case aggregation::seq_mean_token_sum_norm:
      norm = (options.global_sequences > 0 ? options.global_sequences : static_cast<double>(B)) *
             (options.max_response_length > 0 ? options.max_response_length : static_cast<double>(Tn));
      break;
    case aggregation::step_mean:
      norm = options.global_steps > 0 ? options.global_steps : static_cast<double>(res.n_steps);
      break;
  }
  const double inv_norm = norm > 0 ? 1.0 / norm : 0.0;
  const detail::clip_params clip{options.clip_low, options.clip_high, options.dual_clip, options.dual_clip_c};
  const bool drop_nonfinite = res.n_nonfinite_masked > 0;

  // Pass 2: per row, the step (or sequence) sums of delta and the token counts, then one
  // sweep over the tokens computing l, dl/dlogp and the aggregation weight.
  detail::row_sums total;
  total.ratio_max = -INFINITY;
  for (int64_t i = 0; i < B; ++i) {
    double delta_sum[max_steps + 1] = {};  // slot K_max: the whole response
    int64_t count[max_steps + 1] = {};
    auto used = [&](int64_t t) { return in.mask(i, t) != M(0) && (!drop_nonfinite || finite_token(i, t)); };
    for (int64_t t = 0; t < Tn; ++t) {
      if (!used(t)) continue;
      const double d = detail::clamped_log_ratio(in.logp(i, t), in.old_logp(i, t));
      const int32_t s = have_step ? in.step(i, t) : -1;
      if (s >= 0) {
        delta_sum[s] += d;
        ++count[s];
      }
      delta_sum[max_steps] += d;
      ++count[max_steps];
    }
    detail::row_sums row;
    row.ratio_max = -INFINITY;
    for (int64_t t = 0; t < Tn; ++t) {
      if (!used(t)) {
        grad(i, t) = G(0);
        continue;
      }
      const double lp = in.logp(i, t), old = in.old_logp(i, t);
      const double d = detail::clamped_log_ratio(lp, old);
      const int32_t s = have_step ? in.step(i, t) : -1;
      // rho and d log(rho)/d logp. Step and sequence ratios use the stop-gradient form
      // sg(exp(mean delta)) * exp(logp - sg(logp)): value exp(mean delta), slope 1.
      double rho = std::exp(d), dlogrho = detail::log_ratio_slope(lp, old);
      const int slot = options.ratio == ratio_level::sequence ? max_steps
                       : (options.ratio == ratio_level::step && s >= 0) ? s
                                                                         : -1;
      if (slot >= 0) {
        rho = std::exp(delta_sum[slot] / static_cast<double>(count[slot]));
        dlogrho = 1.0;
      }
      const double a = advantage(i, t);
      const detail::surrogate_value sv = detail::clipped_surrogate(a, rho, dlogrho, clip);
      double l = sv.loss, dl = sv.slope;
      if (use_ref) {
        const detail::kl_value kv = detail::kl_penalty(lp, static_cast<double>(in.ref_logp(i, t)), options.kl);
        row.kl_ref += kv.k;
        l += options.kl_coef * kv.k;
        dl += options.kl_coef * kv.slope;
      }
      // Aggregation weight of this token, before the global 1/norm.
      double w = 1.0;
      if (options.agg == aggregation::seq_mean_token_mean) w = 1.0 / static_cast<double>(count[max_steps]);
      if (options.agg == aggregation::step_mean) w = s >= 0 ? 1.0 / static_cast<double>(count[s]) : 0.0;
      row.loss += w * l;
      grad(i, t) = static_cast<G>(w * inv_norm * dl);

      row.ratio += rho;
      row.ratio_max = std::max(row.ratio_max, rho);
      row.kl_old += -d;
      row.kl_old_k3 += std::exp(-d) + d - 1.0;
      row.clip_low += sv.won == detail::branch::clipped_low;
      row.clip_high += sv.won == detail::branch::clipped_high;
      row.clip_dual += sv.won == detail::branch::dual;
    }
    total.loss += row.loss;
    total.ratio += row.ratio;
    total.ratio_max = std::max(total.ratio_max, row.ratio_max);
    total.kl_old += row.kl_old;
    total.kl_old_k3 += row.kl_old_k3;
    total.kl_ref += row.kl_ref;
    total.clip_low += row.clip_low;
    total.clip_high += row.clip_high;
    total.clip_dual += row.clip_dual;
  }

  res.loss = total.loss * inv_norm;
  if (res.n_tokens > 0) {
    const double n = static_cast<double>(res.n_tokens);
    res.clip_frac_low = static_cast<double>(total.clip_low) / n;
    res.clip_frac_high = static_cast<double>(total.clip_high) / n;
    res.clip_frac_dual = static_cast<double>(total.clip_dual) / n;
    res.ratio_mean = total.ratio / n;
    res.ratio_max = total.ratio_max;
    res.approx_kl_old = total.kl_old / n;
    res.approx_kl_old_k3 = total.kl_old_k3 / n;
    res.kl_ref = total.kl_ref / n;
  }
  return res;
}

}  // namespace sapo
