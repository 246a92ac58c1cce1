// The gradient sapo returns against central finite differences in double, for every
// ratio level x clip x KL x aggregation combination, away from kinks.
#include "loss_problem.hpp"

using namespace sapo_test;

namespace {

/// Compares `grad` with central differences of `f` at every masked token. A token sitting
/// on a kink (clip edge, clamp edge) shows one-sided slopes that disagree; it is skipped,
/// and the test demands that almost every token was checked.
template <class F>
void require_matches_finite_differences(const LossProblem& p, const sapo_ref::Matrix& grad, F f) {
  const double h = 1e-6;
  int64_t checked = 0, skipped = 0;
  sapo_ref::Matrix x = p.logp;
  const double f0 = f(x);
  for (int64_t i = 0; i < p.B; ++i)
    for (int64_t t = 0; t < p.T; ++t) {
      double& xi = x[size_t(i)][size_t(t)];
      const double saved = xi;
      xi = saved + h;
      const double fp = f(x);
      xi = saved - h;
      const double fm = f(x);
      xi = saved;
      const double right = (fp - f0) / h, left = (f0 - fm) / h;
      if (std::abs(right - left) > 1e-4 * (1 + std::abs(right))) {
        ++skipped;
        continue;
      }
      const double fd = (fp - fm) / (2 * h);
      INFO("token (" << i << ", " << t << ") mask " << p.mask[size_t(i)][size_t(t)]);
      REQUIRE(std::abs(grad[size_t(i)][size_t(t)] - fd) <= 1e-7 + 1e-6 * std::abs(fd));
      ++checked;
    }
  INFO("checked " << checked << ", skipped at kinks " << skipped);
  REQUIRE(skipped * 10 <= checked);
}

sapo::loss_result kernel_loss(const LossProblem& p, const sapo_ref::Matrix& logp, const sapo::loss_options& opt,
                              bool with_ref, bool by_step, sapo_ref::Matrix* grad_out) {
  LossProblem q = p;
  q.logp = logp;
  LossBuffers<double> buf(q, Layout::strided);
  const auto r = sapo::policy_loss(buf.inputs(with_ref, by_step), opt, buf.grad.view());
  if (grad_out) *grad_out = to_ref(buf.grad);
  return r;
}

}  // namespace

TEST_CASE("gradient = finite differences, every ratio x clip x KL x aggregation", "[gradient]") {
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence);
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                            sapo::aggregation::seq_mean_token_sum, sapo::aggregation::seq_mean_token_sum_norm,
                            sapo::aggregation::step_mean);
  const bool dual = GENERATE(false, true);
  const int kl = GENERATE(-1, 0, 1, 2);
  CAPTURE(static_cast<int>(ratio), static_cast<int>(agg), dual, kl);
  std::mt19937_64 rng(31);
  const LossProblem p = random_problem(rng, 5, 17, 0.3);
  sapo::loss_options opt;
  opt.ratio = ratio;
  opt.agg = agg;
  opt.dual_clip = dual;
  opt.dual_clip_c = 1.3;
  if (kl >= 0) {
    opt.kl_coef = 0.1;
    opt.kl = static_cast<sapo::kl_estimator>(kl);
  }
  sapo_ref::Matrix grad;
  kernel_loss(p, p.logp, opt, kl >= 0, true, &grad);
  // The step and sequence ratios are defined with stop-gradients (GSPO-token form): the
  // function to differentiate keeps them at the current logp.
  require_matches_finite_differences(p, grad, [&](const sapo_ref::Matrix& x) {
    LossProblem q = p;
    q.logp = x;
    return reference_loss(q, opt, kl >= 0, true, &p.logp).loss;
  });
  if (ratio == sapo::ratio_level::token) {
    // No stop-gradient: the kernel's own loss is the function.
    require_matches_finite_differences(
        p, grad, [&](const sapo_ref::Matrix& x) { return kernel_loss(p, x, opt, kl >= 0, true, nullptr).loss; });
  }
}

TEST_CASE("step ratio with step_mean is the exact gradient of the step-level objective", "[gradient]") {
  // SPEC §4: with step_mean aggregation and one advantage per step, the stop-gradient form
  // gives the true derivative of mean_steps(-a exp(mean delta)), clipped.
  const bool dual = GENERATE(false, true);
  std::mt19937_64 rng(32);
  const LossProblem p = random_problem(rng, 6, 19, 0.1);
  sapo::loss_options opt;
  opt.ratio = sapo::ratio_level::step;
  opt.agg = sapo::aggregation::step_mean;
  opt.dual_clip = dual;
  sapo_ref::Matrix grad;
  kernel_loss(p, p.logp, opt, false, true, &grad);
  require_matches_finite_differences(
      p, grad, [&](const sapo_ref::Matrix& x) { return kernel_loss(p, x, opt, false, true, nullptr).loss; });
}

TEST_CASE("sequence ratio with one advantage per response is the exact GSPO gradient", "[gradient]") {
  std::mt19937_64 rng(33);
  LossProblem p = random_problem(rng, 6, 19, 0.1);
  // Outcome advantages: the same value on every token of a response.
  for (int64_t i = 0; i < p.B; ++i)
    for (int64_t t = 0; t < p.T; ++t)
      p.token_adv[size_t(i)][size_t(t)] = p.mask[size_t(i)][size_t(t)] ? p.step_adv[size_t(i)][0] : 0.0;
  sapo::loss_options opt;
  opt.ratio = sapo::ratio_level::sequence;
  opt.agg = sapo::aggregation::seq_mean_token_mean;
  sapo_ref::Matrix grad;
  kernel_loss(p, p.logp, opt, false, false, &grad);
  require_matches_finite_differences(
      p, grad, [&](const sapo_ref::Matrix& x) { return kernel_loss(p, x, opt, false, false, nullptr).loss; });
}
