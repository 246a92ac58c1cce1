// SPEC §4-6: loss, gradient and diagnostics against the reference, for every ratio level,
// clip, KL estimator and aggregation, in float and double, over strided layouts.
#include "loss_problem.hpp"

using namespace sapo_test;

namespace {

void require_diagnostics(const sapo::loss_result& got, const sapo_ref::LossResult& want, double tol) {
  require_close(got.clip_frac_low, want.clip_frac_low, 0, 1e-15);
  require_close(got.clip_frac_high, want.clip_frac_high, 0, 1e-15);
  require_close(got.clip_frac_dual, want.clip_frac_dual, 0, 1e-15);
  require_close(got.ratio_mean, want.ratio_mean, tol, tol);
  require_close(got.ratio_max, want.ratio_max, tol, tol);
  require_close(got.approx_kl_old, want.approx_kl_old, tol, tol);
  require_close(got.approx_kl_old_k3, want.approx_kl_old_k3, tol, tol);
  require_close(got.kl_ref, want.kl_ref, tol, tol);
  REQUIRE(got.n_tokens == want.n_tokens);
  REQUIRE(got.n_sequences == want.n_sequences);
  REQUIRE(got.n_steps == want.n_steps);
  REQUIRE(got.n_nonfinite_masked == want.n_nonfinite_masked);
}

}  // namespace

TEMPLATE_TEST_CASE("policy_loss matches the reference", "[loss]", float, double) {
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence);
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                            sapo::aggregation::seq_mean_token_sum, sapo::aggregation::seq_mean_token_sum_norm,
                            sapo::aggregation::step_mean);
  const bool dual = GENERATE(false, true);
  const int kl = GENERATE(-1, 0, 1, 2);  // -1: no reference
  const bool by_step = GENERATE(false, true);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided, Layout::column_major);
  const int64_t B = 13, T = 29;
  CAPTURE(static_cast<int>(ratio), static_cast<int>(agg), dual, kl, by_step, name(layout));
  std::mt19937_64 rng(2024);
  const LossProblem problem = random_problem(rng, B, T, 0.4);

  sapo::loss_options opt;
  opt.ratio = ratio;
  opt.agg = agg;
  opt.clip_low = 0.2;
  opt.clip_high = 0.28;  // asymmetric (DAPO clip-higher)
  opt.dual_clip = dual;
  opt.dual_clip_c = 1.5;  // low enough that it bites on these ratios
  if (kl >= 0) {
    opt.kl_coef = 0.05;
    opt.kl = static_cast<sapo::kl_estimator>(kl);
  }
  LossBuffers<TestType> buf(problem, layout);
  const sapo::loss_result got = sapo::policy_loss(buf.inputs(kl >= 0, by_step), opt, buf.grad.view());
  const sapo_ref::LossResult want = reference_loss(buf.rounded(problem), opt, kl >= 0);
  const bool f = std::is_same<TestType, float>::value;
  const double tol = f ? 2e-6 : 1e-12;
  require_close(got.loss, want.loss, tol, tol);
  require_close(to_ref(buf.grad), rounded_to(want.grad, f), tol, f ? 1e-9 : 1e-15);
  require_diagnostics(got, want, tol);
}

TEST_CASE("policy_loss: caller-given normalizers and response length", "[loss]") {
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                            sapo::aggregation::seq_mean_token_sum, sapo::aggregation::seq_mean_token_sum_norm,
                            sapo::aggregation::step_mean);
  std::mt19937_64 rng(7);
  const LossProblem p = random_problem(rng, 11, 23);
  sapo::loss_options opt;
  opt.agg = agg;
  opt.global_tokens = 1000;
  opt.global_sequences = 97;
  opt.global_steps = 301;
  opt.max_response_length = 64;
  LossBuffers<double> buf(p, Layout::strided);
  const auto got = sapo::policy_loss(buf.inputs(false, true), opt, buf.grad.view());
  const auto want = reference_loss(p, opt, false);
  require_close(got.loss, want.loss, 1e-12, 1e-15);
  require_close(to_ref(buf.grad), want.grad, 1e-12, 1e-15);
}

TEST_CASE("policy_loss: non-finite tokens are masked out and counted on request", "[loss]") {
  std::mt19937_64 rng(8);
  LossProblem p = random_problem(rng, 9, 21);
  int64_t planted = 0;
  for (int64_t i = 0; i < p.B; i += 2)
    for (int64_t t = 0; t < p.T; ++t)
      if (p.mask[size_t(i)][size_t(t)]) {
        (t % 2 ? p.logp : p.old_logp)[size_t(i)][size_t(t)] = t % 3 ? NAN : -INFINITY;
        ++planted;
        break;
      }
  REQUIRE(planted > 0);
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::step_mean,
                            sapo::aggregation::seq_mean_token_mean);
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step);
  sapo::loss_options opt;
  opt.agg = agg;
  opt.ratio = ratio;
  opt.nonfinite = sapo::nonfinite_policy::mask;
  LossBuffers<double> buf(p, Layout::contiguous);
  const auto got = sapo::policy_loss(buf.inputs(false, false), opt, buf.grad.view());
  const auto want = reference_loss(p, opt, false);
  REQUIRE(got.n_nonfinite_masked == planted);
  require_close(got.loss, want.loss, 1e-12, 1e-15);
  require_close(to_ref(buf.grad), want.grad, 1e-12, 1e-15);
}

TEST_CASE("policy_loss by hand: one token per branch", "[loss]") {
  // a = +1 and rho = 1.5 > 1.2: clipped high, l = -1.2, no gradient.
  // a = -1 and rho = 0.5 < 0.8: clipped low,  l = +0.8, no gradient.
  // a = +1 and rho = 1.1: unclipped, l = -1.1, dl/dlogp = -1.1.
  // a = -1 and rho = 4 with dual clip c = 3: l = min(4, 3) = 3, no gradient.
  const double logp[] = {std::log(1.5), std::log(0.5), std::log(1.1), std::log(4.0)};
  const double old[] = {0, 0, 0, 0};
  const double adv[] = {1, -1, 1, -1};
  const double mask[] = {1, 1, 1, 1};
  double grad[4];
  sapo::policy_inputs<double> in;
  in.logp = {logp, 1, 4};
  in.old_logp = {old, 1, 4};
  in.token_advantages = {adv, 1, 4};
  in.mask = {mask, 1, 4};
  sapo::loss_options opt;
  opt.dual_clip = true;
  const auto r = sapo::policy_loss(in, opt, sapo::mat_view<double>(grad, 1, 4));
  REQUIRE(r.loss == Approx((-1.2 + 0.8 - 1.1 + 3.0) / 4));
  REQUIRE(grad[0] == 0.0);
  REQUIRE(grad[1] == 0.0);
  REQUIRE(grad[2] == Approx(-1.1 / 4));
  REQUIRE(grad[3] == 0.0);
  REQUIRE(r.clip_frac_high == 0.25);
  REQUIRE(r.clip_frac_low == 0.25);
  REQUIRE(r.clip_frac_dual == 0.25);
  REQUIRE(r.ratio_max == Approx(4.0));
}

TEMPLATE_TEST_CASE("policy_loss by hand: a log-ratio beyond +-20 is clamped and passes no gradient", "[loss]",
                   float, double) {
  using T = TestType;
  // delta = 25 and -25 are clamped to +-20 (SPEC §4): the unclipped branch wins, but
  // log(rho) no longer moves with logp, so the gradient is 0. At exactly +-20 the clamp is
  // the identity (a closed interval, as torch.clamp) and the gradient is -a rho / N.
  // a = -1, rho = e^20: unclipped e^20 > clipped 1.2; a = +1, rho = e^-20: -e^-20 > -0.8.
  const T logp[] = {25, -25, 20, -20};
  const T old[] = {0, 0, 0, 0};
  const T adv[] = {-1, 1, -1, 1};
  const T mask[] = {1, 1, 1, 1};
  T grad[4] = {7, 7, 7, 7};
  sapo::policy_inputs<T> in;
  in.logp = {logp, 1, 4};
  in.old_logp = {old, 1, 4};
  in.token_advantages = {adv, 1, 4};
  in.mask = {mask, 1, 4};
  const auto r = sapo::policy_loss(in, sapo::loss_options{}, sapo::mat_view<T>(grad, 1, 4));
  const double e20 = std::exp(20.0);
  REQUIRE(r.loss == Approx((2 * e20 - 2 / e20) / 4));
  REQUIRE(grad[0] == T(0));
  REQUIRE(grad[1] == T(0));
  REQUIRE(grad[2] == Approx(e20 / 4));
  REQUIRE(grad[3] == Approx(-1 / e20 / 4));
  REQUIRE(r.clip_frac_low == 0.0);
  REQUIRE(r.clip_frac_high == 0.0);
}

TEMPLATE_TEST_CASE("policy_loss with K = 64 steps (the largest K)", "[loss]", float, double) {
  // One token per step in one row: step_mean over 64 present steps, step 63 included (the
  // float SIMD scan collects steps 32..63 in a lane set of their own).
  const int64_t T = 64;
  LossProblem p;
  p.B = 1;
  p.T = T;
  p.K = 64;
  std::mt19937_64 rng(64);
  p.logp = random_logp(rng, 1, T);
  p.old_logp = perturbed(rng, p.logp, 0.1);
  p.step_adv = random_logp(rng, 1, 64, -1, 1);
  p.step = {std::vector<int64_t>(size_t(T))};
  p.mask = {std::vector<int64_t>(size_t(T), 1)};
  for (int64_t t = 0; t < T; ++t) p.step[0][size_t(t)] = t;
  p.token_adv = sapo_ref::broadcast(p.step_adv, p.step, p.mask);
  p.ref_logp = p.logp;
  sapo::loss_options opt;
  opt.ratio = sapo::ratio_level::step;
  opt.agg = sapo::aggregation::step_mean;
  LossBuffers<TestType> buf(p, Layout::contiguous);
  const LossProblem rounded = buf.rounded(p);
  const auto got = sapo::policy_loss(buf.inputs(false, true), opt, buf.grad.view());
  const auto want = reference_loss(rounded, opt, false);
  const bool f = std::is_same<TestType, float>::value;
  REQUIRE(got.n_steps == 64);
  require_close(got.loss, want.loss, f ? 2e-6 : 1e-12, f ? 1e-9 : 1e-15);
  require_close(to_ref(buf.grad), rounded_to(want.grad, f), f ? 2e-6 : 1e-12, f ? 1e-9 : 1e-15);
}

TEMPLATE_TEST_CASE("policy_loss on long rows: padding tiles, fully used tiles, mixed tiles", "[loss]", float,
                   double) {
  // The kernel works on tiles of 256 tokens and skips tiles the scan found all padding, and
  // drops the masking selects in tiles it found fully used: rows here have whole tiles of
  // each kind (with NaN in the padding, which must never be read into a sum), tiles cut by
  // the end of a response, and a row of padding only. K = 4 takes the SIMD per-step sums of
  // the scan, K = 9 the scalar ones; the last row has whole tiles of one step each (the
  // scan's one-pass sums), of step -1, 0 and K - 1.
  const int64_t K = GENERATE(4, 9);
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence);
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                            sapo::aggregation::step_mean);
  const bool with_ref = GENERATE(false, true);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided);
  CAPTURE(K, static_cast<int>(ratio), static_cast<int>(agg), with_ref, name(layout));
  const int64_t B = 7, T = 1100;  // 4 whole tiles and a ragged one
  // Used range [begin, end) of each row; step ids run in K contiguous runs over it, with
  // step -1 on its first 3 tokens (a prompt) and its last one (a tail).
  const int64_t begin[B] = {0, 0, 300, 0, 0, 17, 0};
  const int64_t end[B] = {1100, 513, 1100, 0, 256, 1024, 1100};
  std::mt19937_64 rng(77 + static_cast<uint64_t>(K));
  LossProblem p;
  p.B = B;
  p.T = T;
  p.K = K;
  p.logp = random_logp(rng, B, T);
  p.old_logp = perturbed(rng, p.logp, 0.4);
  p.ref_logp = perturbed(rng, p.logp, 0.5);
  p.step_adv = random_logp(rng, B, K, -1.5, 1.5);
  p.step.assign(size_t(B), std::vector<int64_t>(size_t(T), -1));
  p.mask.assign(size_t(B), std::vector<int64_t>(size_t(T), 0));
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = end[i] - begin[i];
    for (int64_t t = begin[i]; t < end[i]; ++t) {
      p.mask[size_t(i)][size_t(t)] = 1;
      const int64_t u = t - begin[i];
      if (u >= 3 && u < n - 1) p.step[size_t(i)][size_t(t)] = std::min<int64_t>(K - 1, (u - 3) * K / (n - 4));
      if (i == B - 1) p.step[size_t(i)][size_t(t)] = t < 256 ? -1 : t < 768 ? 0 : t < 1024 ? K - 1 : -1;
    }
  }
  p.token_adv = sapo_ref::broadcast(p.step_adv, p.step, p.mask);
  LossBuffers<TestType> buf(p, layout);
  const LossProblem rounded = buf.rounded(p);  // what the reference sees: no NaN padding
  const TestType nan = std::numeric_limits<TestType>::quiet_NaN();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t < T; ++t)
      if (p.mask[size_t(i)][size_t(t)] == 0) {
        buf.logp.at(i, t) = buf.old_logp.at(i, t) = buf.ref_logp.at(i, t) = buf.token_adv.at(i, t) = nan;
        buf.step.at(i, t) = 1000;  // ids of padding are not checked either
      }
  sapo::loss_options opt;
  opt.ratio = ratio;
  opt.agg = agg;
  if (with_ref) opt.kl_coef = 0.05;
  for (const bool by_step : {true, false}) {
    CAPTURE(by_step);
    const sapo::loss_result got = sapo::policy_loss(buf.inputs(with_ref, by_step), opt, buf.grad.view());
    const sapo_ref::LossResult want = reference_loss(rounded, opt, with_ref);
    const bool f = std::is_same<TestType, float>::value;
    const double tol = f ? 2e-6 : 1e-12;
    REQUIRE(got.n_tokens == 1100 + 513 + 800 + 256 + 1007 + 1100);
    require_close(got.loss, want.loss, tol, tol);
    require_close(to_ref(buf.grad), rounded_to(want.grad, f), tol, f ? 1e-9 : 1e-15);
    require_diagnostics(got, want, tol);
  }
}
