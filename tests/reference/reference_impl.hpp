// Definitions of the functions declared in reference.hpp.
// Written straight from ../shared/SPEC.md §1-6 and docs/decisions.md, independently
// of include/sapo/. Double precision, nested std::vector, one obvious loop per
// formula. No input validation: the tests only feed well-formed inputs here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "reference.hpp"

namespace sapo_ref {

namespace detail {

// decisions.md "SID tokens": which range does token `id` lie in?
// Returns the index of the range (0 for the shared range), or -1 if `id` is no SID token.
// With K per-level ranges the range of the current level `level` wins when `id` lies in it
// (overlapping ranges); otherwise the first range that holds `id`.
inline int sid_range_of(int64_t id, int level, const SegmentConfig& cfg) {
  const auto& r = cfg.sid_ranges;
  if (r.size() == 1) return (id >= r[0].first && id < r[0].second) ? 0 : -1;
  if (level >= 0 && level < static_cast<int>(r.size()) && id >= r[level].first && id < r[level].second)
    return level;
  for (size_t j = 0; j < r.size(); ++j)
    if (id >= r[j].first && id < r[j].second) return static_cast<int>(j);
  return -1;
}

// True when the SID token found in range `range` cannot be a_level:
// wrong level (K per-level ranges, range != level) or code outside the catalogue.
inline bool sid_is_bad(int range, int level, int64_t code, const SegmentConfig& cfg) {
  bool bad = false;
  if (cfg.sid_ranges.size() != 1 && range != level) bad = true;  // SID token at the wrong level
  if (!cfg.codes_per_level.empty() && code >= cfg.codes_per_level[level]) bad = true;  // outside catalogue
  return bad;
}

// Two-pass mean (decisions.md §3): mean first, in the given order.
inline double mean_of(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}
// Two-pass std: sum of squared deviations from the mean; divide by n-1 (unbiased) or n.
inline double std_of(const std::vector<double>& v, bool unbiased) {
  const double mu = mean_of(v);
  double ss = 0.0;
  for (double x : v) ss += (x - mu) * (x - mu);
  const double n = static_cast<double>(v.size());
  return std::sqrt(ss / (unbiased ? n - 1.0 : n));
}

}  // namespace detail

// ============================================================ §1 step segmentation
inline SegmentResult segment(const IntMatrix& tokens, const IntMatrix& mask, const SegmentConfig& cfg) {
  const int K = cfg.K;
  const size_t B = tokens.size();
  SegmentResult res;
  res.step.assign(B, {});
  res.n_steps.assign(B, 0);
  res.codes.assign(B, std::vector<int64_t>(static_cast<size_t>(K), -1));  // -1 where not found
  res.malformed.assign(B, false);
  const int64_t tail_id = cfg.tail_last_step ? K - 1 : -1;  // decisions.md "Tail tokens"

  for (size_t i = 0; i < B; ++i) {
    const size_t T = tokens[i].size();
    res.step[i].assign(T, -1);  // masked-out tokens: -1, never read
    bool bad = false;
    int k = 0;  // number of closed steps = the current step id while k < K

    if (!cfg.think_then_sid) {
      // ---- interleaved: think_1 a_1 ... think_K a_K [eos]; every SID token closes step k.
      for (size_t t = 0; t < T; ++t) {
        if (mask[i][t] != 1) continue;
        const int64_t id = tokens[i][t];
        const int range = detail::sid_range_of(id, k < K ? k : -1, cfg);
        if (k < K) {
          res.step[i][t] = k;  // thinking token of step k, or its closing SID token
          if (range >= 0) {
            const int64_t code = id - cfg.sid_ranges[static_cast<size_t>(range)].first;
            res.codes[i][static_cast<size_t>(k)] = code;
            if (detail::sid_is_bad(range, k, code, cfg)) bad = true;
            ++k;
          }
        } else {
          res.step[i][t] = tail_id;  // tail token
          if (range >= 0) bad = true;  // extra boundary
        }
      }
      if (k < K) bad = true;  // unfinished step: its tokens already carry id k = n_steps
      res.n_steps[i] = k;
    } else {
      // ---- think_then_sid: <think>..</think> x K, then a_1 .. a_K.
      int j = 0;  // SID tokens seen after the K-th think_end
      for (size_t t = 0; t < T; ++t) {
        if (mask[i][t] != 1) continue;
        const int64_t id = tokens[i][t];
        if (k < K) {
          res.step[i][t] = k;  // every token of the thinking phase carries the step it sits in
          if (id == cfg.think_end_id) {
            ++k;  // closes step k
          } else if (detail::sid_range_of(id, k, cfg) >= 0) {
            bad = true;  // SID token in the wrong place (before the K-th think_end)
          }
        } else {
          if (id == cfg.think_end_id) {
            res.step[i][t] = tail_id;  // extra boundary: malformed tail token
            bad = true;
            continue;
          }
          const int range = detail::sid_range_of(id, j < K ? j : -1, cfg);
          if (range >= 0 && j < K) {
            // a_j: step j (sid_token_in_step) or -1 (prototype), whatever the tail policy
            res.step[i][t] = cfg.sid_token_in_step ? j : -1;
            const int64_t code = id - cfg.sid_ranges[static_cast<size_t>(range)].first;
            res.codes[i][static_cast<size_t>(j)] = code;
            if (detail::sid_is_bad(range, j, code, cfg)) bad = true;
            ++j;
          } else if (range >= 0) {
            res.step[i][t] = tail_id;  // (K+1)-th SID token: malformed tail token
            bad = true;
          } else {
            res.step[i][t] = tail_id;  // other token after the K-th think_end: tail token
          }
        }
      }
      if (k < K) bad = true;            // unfinished step
      if (k == K && j < K) bad = true;  // fewer than K SID tokens after the thinking blocks
      res.n_steps[i] = k;
    }
    res.malformed[i] = bad;
  }
  return res;
}

// ============================================================ §2 step rewards
inline Matrix step_rewards(const IntMatrix& codes, const std::vector<bool>& malformed, const IntMatrix& targets,
                           RewardKind kind, const std::vector<double>& weights, double malformed_reward) {
  const size_t B = codes.size();
  Matrix r(B);
  for (size_t i = 0; i < B; ++i) {
    const size_t K = codes[i].size();
    r[i].assign(K, 0.0);
    if (malformed[i]) {  // malformed: malformed_reward at every step, every kind
      for (size_t k = 0; k < K; ++k) r[i][k] = malformed_reward;
      continue;
    }
    bool all_match = true;  // for exact: 1[a = y]
    for (size_t k = 0; k < K; ++k)
      if (codes[i][k] != targets[i][k]) all_match = false;
    double prefix = 1.0;  // prod_{j<=k} 1[a_j = y_j]
    for (size_t k = 0; k < K; ++k) {
      const double match = (codes[i][k] == targets[i][k]) ? 1.0 : 0.0;
      prefix *= match;
      switch (kind) {
        case RewardKind::per_level: r[i][k] = match; break;
        case RewardKind::prefix: r[i][k] = prefix; break;
        case RewardKind::weighted_prefix: r[i][k] = weights[k] * prefix; break;
        case RewardKind::exact: r[i][k] = all_match ? 1.0 : 0.0; break;
      }
    }
  }
  return r;
}

// ============================================================ §3 group-relative advantages
inline Matrix advantages(const Matrix& rewards, const std::vector<int64_t>& group_of, int64_t n_groups,
                         const AdvantageConfig& cfg, AdvantageStats* stats) {
  const size_t B = rewards.size();
  const size_t K = B > 0 ? rewards[0].size() : 0;
  Matrix A(B, std::vector<double>(K, 0.0));  // absent steps keep A = 0
  std::vector<int64_t> zero_var_pairs(K, 0), nonempty_pairs(K, 0);

  for (size_t k = 0; k < K; ++k) {
    // batch_std: sigma over every present response at step k of the whole batch
    std::vector<double> batch;
    for (size_t i = 0; i < B; ++i)
      if (!std::isnan(rewards[i][k])) batch.push_back(rewards[i][k]);
    const double sigma_batch = batch.size() >= 2 ? detail::std_of(batch, cfg.unbiased) : 0.0;

    for (int64_t g = 0; g < n_groups; ++g) {
      // members of g whose step k is present, in member order
      std::vector<size_t> idx;
      std::vector<double> r;
      for (size_t i = 0; i < B; ++i)
        if (group_of[i] == g && !std::isnan(rewards[i][k])) {
          idx.push_back(i);
          r.push_back(rewards[i][k]);
        }
      const size_t n = r.size();
      if (n == 0) continue;  // every member absent: A = 0, pair left out of the statistics
      ++nonempty_pairs[k];

      if (n == 1) {  // singleton policy; counts as zero variance
        ++zero_var_pairs[k];
        A[idx[0]][k] = cfg.singleton_raw ? r[0] : 0.0;
        continue;
      }
      const double rmax = *std::max_element(r.begin(), r.end());
      const double rmin = *std::min_element(r.begin(), r.end());
      if (rmax == rmin) {  // zero variance, compared exactly: A = 0 under every mode
        ++zero_var_pairs[k];
        continue;
      }
      const double mu = detail::mean_of(r);
      const double sigma = detail::std_of(r, cfg.unbiased);
      double sum = 0.0;
      for (double x : r) sum += x;
      for (size_t m = 0; m < n; ++m) {
        const double x = r[m];
        double a = 0.0;
        switch (cfg.norm) {
          case Norm::std_eps: a = (x - mu) / (sigma + cfg.eps); break;                // (r-mu)/(sigma+eps)
          case Norm::std_floor: a = (x - mu) / std::max(sigma, cfg.eps); break;       // (r-mu)/max(sigma,eps)
          case Norm::none: a = x - mu; break;                                         // Dr. GRPO
          case Norm::loo: a = x - (sum - x) / static_cast<double>(n - 1); break;      // RLOO
          case Norm::batch_std: a = (x - mu) / (sigma_batch + cfg.eps); break;       // REINFORCE++-baseline
        }
        A[idx[m]][k] = a;
      }
    }
  }

  if (stats) {
    stats->mean_reward.assign(K, 0.0);
    stats->zero_variance_fraction.assign(K, 0.0);
    stats->advantage_std.assign(K, 0.0);
    stats->n_present.assign(K, 0);
    for (size_t k = 0; k < K; ++k) {
      std::vector<double> r, a;  // present rewards and their advantages
      for (size_t i = 0; i < B; ++i)
        if (!std::isnan(rewards[i][k])) {
          r.push_back(rewards[i][k]);
          a.push_back(A[i][k]);
        }
      stats->n_present[k] = static_cast<int64_t>(r.size());
      if (r.empty()) continue;  // no present reward: stats stay 0
      stats->mean_reward[k] = detail::mean_of(r);
      stats->zero_variance_fraction[k] =
          nonempty_pairs[k] > 0 ? static_cast<double>(zero_var_pairs[k]) / static_cast<double>(nonempty_pairs[k]) : 0.0;
      stats->advantage_std[k] = detail::std_of(a, /*unbiased=*/false);  // population std
    }
  }
  return A;
}

// §3 token broadcast: adv[i,t] = A[i, step[i,t]] where mask = 1 and step >= 0, else 0.
inline Matrix broadcast(const Matrix& A, const IntMatrix& step, const IntMatrix& mask) {
  const size_t B = step.size();
  Matrix adv(B);
  for (size_t i = 0; i < B; ++i) {
    const size_t T = step[i].size();
    adv[i].assign(T, 0.0);
    for (size_t t = 0; t < T; ++t)
      if (mask[i][t] == 1 && step[i][t] >= 0) adv[i][t] = A[i][static_cast<size_t>(step[i][t])];
  }
  return adv;
}

// ============================================================ §4-6 policy loss
inline LossResult policy_loss(const Matrix& logp, const Matrix& old_logp, const Matrix& ref_logp, const Matrix& token_adv,
                              const IntMatrix& step, const IntMatrix& mask, const LossConfig& cfg,
                              const Matrix* frozen_logp) {
  const size_t B = logp.size();
  const size_t T = B > 0 ? logp[0].size() : 0;
  const bool has_ref = !ref_logp.empty();
  const bool has_step = !step.empty();
  const Matrix& F = frozen_logp ? *frozen_logp : logp;  // stop-gradient point of step/sequence ratios
  LossResult res;
  res.grad.assign(B, std::vector<double>(T, 0.0));

  // ---- effective mask (decisions.md "Non-finite inputs": policy mask drops the token everywhere)
  IntMatrix m(B, std::vector<int64_t>(T, 0));
  for (size_t i = 0; i < B; ++i)
    for (size_t t = 0; t < T; ++t) {
      if (mask[i][t] != 1) continue;
      if (cfg.mask_nonfinite) {
        bool finite = std::isfinite(logp[i][t]) && std::isfinite(old_logp[i][t]) && std::isfinite(token_adv[i][t]);
        if (has_ref && !std::isfinite(ref_logp[i][t])) finite = false;
        if (!finite) {
          ++res.n_nonfinite_masked;
          continue;
        }
      }
      m[i][t] = 1;
    }

  // ---- local counts: masked tokens per row n_i, per (row, step) n_{i,k}
  std::vector<int64_t> n_row(B, 0);
  std::vector<std::map<int64_t, int64_t>> n_row_step(B);
  int64_t n_tok = 0, n_seq = 0, n_steps = 0;
  for (size_t i = 0; i < B; ++i) {
    for (size_t t = 0; t < T; ++t) {
      if (m[i][t] != 1) continue;
      ++n_row[i];
      ++n_tok;
      if (has_step && step[i][t] >= 0) ++n_row_step[i][step[i][t]];
    }
    if (n_row[i] > 0) ++n_seq;
    n_steps += static_cast<int64_t>(n_row_step[i].size());  // present steps (i,k)
  }
  res.n_tokens = n_tok;
  res.n_sequences = n_seq;
  res.n_steps = n_steps;

  // ---- §4 delta and ratio. delta = clamp(logp - old, -20, 20)
  auto clamp20 = [](double x) { return std::min(20.0, std::max(-20.0, x)); };
  // mean of clamped (F - old) over the masked tokens of each step (step ratio) or row (sequence ratio)
  std::vector<std::map<int64_t, double>> sbar_step(B);
  std::vector<double> sbar_seq(B, 0.0);
  for (size_t i = 0; i < B; ++i) {
    std::map<int64_t, double> sum_step;
    double sum_seq = 0.0;
    for (size_t t = 0; t < T; ++t) {
      if (m[i][t] != 1) continue;
      const double d = clamp20(F[i][t] - old_logp[i][t]);
      sum_seq += d;
      if (has_step && step[i][t] >= 0) sum_step[step[i][t]] += d;
    }
    if (n_row[i] > 0) sbar_seq[i] = sum_seq / static_cast<double>(n_row[i]);
    for (const auto& kv : sum_step)
      sbar_step[i][kv.first] = kv.second / static_cast<double>(n_row_step[i][kv.first]);
  }

  // ---- §5 aggregation normalizers (caller value > 0 replaces the local count)
  const double N_tok = cfg.num_tokens > 0 ? cfg.num_tokens : static_cast<double>(n_tok);
  const double N_seq = cfg.num_sequences > 0 ? cfg.num_sequences : static_cast<double>(n_seq);
  const double N_steps = cfg.num_steps > 0 ? cfg.num_steps : static_cast<double>(n_steps);
  const double L = cfg.max_response_length > 0 ? cfg.max_response_length : static_cast<double>(T);
  // Dr. GRPO's B is the number of rows; data-parallel callers give the global one.
  const double BL = (cfg.num_sequences > 0 ? cfg.num_sequences : static_cast<double>(B)) * L;

  double loss = 0.0;
  double sum_ratio = 0.0, max_ratio = 0.0, sum_kl_old = 0.0, sum_kl_old_k3 = 0.0, sum_kl_ref = 0.0;
  int64_t n_low = 0, n_high = 0, n_dual = 0;
  bool first = true;

  for (size_t i = 0; i < B; ++i)
    for (size_t t = 0; t < T; ++t) {
      if (m[i][t] != 1) continue;
      const double raw = logp[i][t] - old_logp[i][t];
      const double delta = clamp20(raw);

      // ratio rho and d rho / d logp
      double rho = 0.0, drho = 0.0;
      const bool tok_ratio = cfg.ratio == Ratio::token || (cfg.ratio == Ratio::step && step[i][t] < 0);
      if (tok_ratio) {
        rho = std::exp(delta);
        drho = (raw >= -20.0 && raw <= 20.0) ? rho : 0.0;  // clamp passes the gradient inclusively
      } else {
        const double s = cfg.ratio == Ratio::step ? sbar_step[i].at(step[i][t]) : sbar_seq[i];
        rho = std::exp(s) * std::exp(logp[i][t] - F[i][t]);  // sg(exp(s)) * exp(logp - sg(logp))
        drho = rho;
      }

      // clipped surrogate l = max(-a rho, -a clip(rho)); ties -> unclipped branch
      const double a = token_adv[i][t];
      const double rho_c = std::min(1.0 + cfg.clip_high, std::max(1.0 - cfg.clip_low, rho));
      const double unclipped = -a * rho;
      const double clipped = -a * rho_c;
      double l = 0.0, dl = 0.0;
      if (unclipped >= clipped) {
        l = unclipped;
        dl = -a * drho;
      } else {
        l = clipped;  // clipped branch strictly wins: gradient 0
        dl = 0.0;
        if (rho < 1.0 - cfg.clip_low) ++n_low;
        if (rho > 1.0 + cfg.clip_high) ++n_high;
      }
      // dual clip for a < 0: l = min(l, -a c), dual branch only when -a c < l strictly
      if (cfg.dual_clip && a < 0 && -a * cfg.dual_clip_c < l) {
        l = -a * cfg.dual_clip_c;
        dl = 0.0;
        ++n_dual;
      }

      // KL to the reference, Delta = ref - logp
      if (has_ref) {
        const double D = ref_logp[i][t] - logp[i][t];
        double k = 0.0, dk = 0.0;
        switch (cfg.kl) {
          case KL::k1: k = -D; dk = 1.0; break;
          case KL::k2: k = 0.5 * D * D; dk = -D; break;
          case KL::k3: {
            const double Dc = clamp20(D);
            const double k_raw = std::exp(Dc) - Dc - 1.0;
            k = std::min(10.0, std::max(-10.0, k_raw));
            dk = (std::fabs(D) > 20.0 || k_raw > 10.0) ? 0.0 : 1.0 - std::exp(Dc);
            break;
          }
        }
        l += cfg.kl_coef * k;
        dl += cfg.kl_coef * dk;
        sum_kl_ref += k;
      }

      // aggregation weight w[i,t]
      double w = 0.0;
      switch (cfg.agg) {
        case Agg::token_mean: w = N_tok > 0 ? 1.0 / N_tok : 0.0; break;
        case Agg::seq_mean_token_mean:
          w = N_seq > 0 ? 1.0 / (N_seq * static_cast<double>(n_row[i])) : 0.0;
          break;
        case Agg::seq_mean_token_sum: w = N_seq > 0 ? 1.0 / N_seq : 0.0; break;
        case Agg::seq_mean_token_sum_norm: w = BL > 0 ? 1.0 / BL : 0.0; break;
        case Agg::step_mean:
          if (step[i][t] >= 0 && N_steps > 0)
            w = 1.0 / (N_steps * static_cast<double>(n_row_step[i].at(step[i][t])));
          break;
      }
      loss += w * l;
      res.grad[i][t] = w * dl;

      // §6 diagnostics (unweighted, over masked tokens)
      sum_ratio += rho;
      if (first || rho > max_ratio) max_ratio = rho;
      first = false;
      sum_kl_old += -delta;
      sum_kl_old_k3 += std::exp(-delta) + delta - 1.0;
    }

  res.loss = loss;
  if (n_tok > 0) {
    const double n = static_cast<double>(n_tok);
    res.clip_frac_low = static_cast<double>(n_low) / n;
    res.clip_frac_high = static_cast<double>(n_high) / n;
    res.clip_frac_dual = static_cast<double>(n_dual) / n;
    res.ratio_mean = sum_ratio / n;
    res.ratio_max = max_ratio;
    res.approx_kl_old = sum_kl_old / n;
    res.approx_kl_old_k3 = sum_kl_old_k3 / n;
    res.kl_ref = has_ref ? sum_kl_ref / n : 0.0;
  }
  return res;
}

}  // namespace sapo_ref
