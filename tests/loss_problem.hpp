// A random policy-loss problem (segmented responses, log-probabilities, step advantages)
// and the glue that runs it through sapo::policy_loss and through the reference.
#pragma once

#include "support.hpp"

namespace sapo_test {

inline sapo_ref::LossConfig ref_config(const sapo::loss_options& o) {
  sapo_ref::LossConfig c;
  c.ratio = o.ratio == sapo::ratio_level::token  ? sapo_ref::Ratio::token
            : o.ratio == sapo::ratio_level::step ? sapo_ref::Ratio::step
                                                 : sapo_ref::Ratio::sequence;
  c.clip_low = o.clip_low;
  c.clip_high = o.clip_high;
  c.dual_clip = o.dual_clip;
  c.dual_clip_c = o.dual_clip_c;
  c.kl_coef = o.kl_coef;
  c.kl = o.kl == sapo::kl_estimator::k1 ? sapo_ref::KL::k1 : o.kl == sapo::kl_estimator::k2 ? sapo_ref::KL::k2
                                                                                            : sapo_ref::KL::k3;
  switch (o.agg) {
    case sapo::aggregation::token_mean: c.agg = sapo_ref::Agg::token_mean; break;
    case sapo::aggregation::seq_mean_token_mean: c.agg = sapo_ref::Agg::seq_mean_token_mean; break;
    case sapo::aggregation::seq_mean_token_sum: c.agg = sapo_ref::Agg::seq_mean_token_sum; break;
    case sapo::aggregation::seq_mean_token_sum_norm: c.agg = sapo_ref::Agg::seq_mean_token_sum_norm; break;
    case sapo::aggregation::step_mean: c.agg = sapo_ref::Agg::step_mean; break;
  }
  c.max_response_length = o.max_response_length;
  c.num_tokens = o.global_tokens;
  c.num_sequences = o.global_sequences;
  c.num_steps = o.global_steps;
  c.mask_nonfinite = o.nonfinite == sapo::nonfinite_policy::mask;
  return c;
}

struct LossProblem {
  int64_t B = 0, T = 0, K = 3;
  sapo_ref::Matrix logp, old_logp, ref_logp, step_adv, token_adv;
  sapo_ref::IntMatrix step, mask;
};

/// `spread` scales logp - old_logp: 0.3 puts many ratios outside [0.8, 1.2]. K steps per response.
inline LossProblem random_problem(std::mt19937_64& rng, int64_t B, int64_t T, double spread = 0.3, int64_t K = 3) {
  LossProblem p;
  p.B = B;
  p.T = T;
  p.K = K;
  Vocab v;
  v.K = p.K;
  const TokenBatch batch = random_tokens(rng, v, B, T, false, true, 0.3);
  const auto seg = sapo_ref::segment(batch.tokens, batch.mask, v.ref_config(v.options(false, true)));
  p.step = seg.step;
  p.mask = batch.mask;
  p.logp = random_logp(rng, B, T);
  p.old_logp = perturbed(rng, p.logp, spread);
  p.ref_logp = perturbed(rng, p.logp, 0.5);
  p.step_adv = random_logp(rng, B, p.K, -1.5, 1.5);
  p.token_adv = sapo_ref::broadcast(p.step_adv, p.step, p.mask);
  return p;
}

template <class T>
struct LossBuffers {
  Buf<T> logp, old_logp, ref_logp, step_adv, token_adv, grad;
  Buf<int32_t> step;
  Buf<T> mask;
  LossBuffers(const LossProblem& p, Layout layout)
      : logp(from_ref<T>(p.logp, p.T, layout)),
        old_logp(from_ref<T>(p.old_logp, p.T, layout)),
        ref_logp(from_ref<T>(p.ref_logp, p.T, layout)),
        step_adv(from_ref<T>(p.step_adv, p.K, layout)),
        token_adv(from_ref<T>(p.token_adv, p.T, layout)),
        grad(p.B, p.T, layout, T(99)),
        step(from_ref_int<int32_t>(p.step, p.T, layout)),
        mask(from_ref_int<T>(p.mask, p.T, layout)) {}

  sapo::policy_inputs<T> inputs(bool with_ref, bool by_step, bool with_step = true) const {
    sapo::policy_inputs<T> in;
    in.logp = logp.cview();
    in.old_logp = old_logp.cview();
    if (with_ref) in.ref_logp = ref_logp.cview();
    if (by_step)
      in.step_advantages = step_adv.cview();
    else
      in.token_advantages = token_adv.cview();
    if (with_step || by_step) in.step = step.cview();
    in.mask = mask.cview();
    return in;
  }
  /// The problem as the reference sees it: the values after rounding to T.
  LossProblem rounded(const LossProblem& p) const {
    LossProblem r = p;
    r.logp = to_ref(logp);
    r.old_logp = to_ref(old_logp);
    r.ref_logp = to_ref(ref_logp);
    r.step_adv = to_ref(step_adv);
    r.token_adv = sapo_ref::broadcast(r.step_adv, r.step, r.mask);
    return r;
  }
};

inline sapo_ref::LossResult reference_loss(const LossProblem& p, const sapo::loss_options& o, bool with_ref,
                                           bool with_step = true, const sapo_ref::Matrix* frozen = nullptr) {
  static const sapo_ref::Matrix none;
  static const sapo_ref::IntMatrix no_step;
  return sapo_ref::policy_loss(p.logp, p.old_logp, with_ref ? p.ref_logp : none, p.token_adv,
                               with_step ? p.step : no_step, p.mask, ref_config(o), frozen);
}

}  // namespace sapo_test
