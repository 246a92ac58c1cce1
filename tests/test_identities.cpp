// Identities of SPEC.md as tests.
#include "loss_problem.hpp"

using namespace sapo_test;

TEST_CASE("SAPO with exact rewards equals GRPO bit for bit", "[identity]") {
  // The referee's point: exact-match rewards give every step of a response the same
  // reward, so per-step group statistics are the outcome statistics.
  const auto norm = GENERATE(sapo::normalization::std, sapo::normalization::std_floor, sapo::normalization::none,
                             sapo::normalization::loo, sapo::normalization::batch_std);
  const int64_t G = GENERATE(2, 5, 16);
  const int64_t K = GENERATE(1, 3, 4);
  CAPTURE(static_cast<int>(norm), G, K);
  std::mt19937_64 rng(100 + static_cast<uint64_t>(G * K));
  Vocab v;
  v.K = K;
  const int64_t B = 6 * G, T = 6 * K + 6;
  const TokenBatch batch = random_tokens(rng, v, B, T, false, true, 0.2);
  const Buf<int64_t> tokens = from_ref_int<int64_t>(batch.tokens, T, Layout::contiguous);
  const Buf<uint8_t> mask = from_ref_int<uint8_t>(batch.mask, T, Layout::contiguous);
  Buf<int32_t> step(B, T, Layout::contiguous), n_steps(B, 1, Layout::contiguous);
  Buf<int64_t> codes(B, K, Layout::contiguous);
  Buf<uint8_t> malformed(B, 1, Layout::contiguous);
  auto seg_opt = v.options(false, true);
  seg_opt.tail = sapo::tail_policy::last_step;  // every masked token has a step, as in GRPO
  sapo::segment_steps(tokens.cview(), mask.cview(), seg_opt,
                      {step.view(), n_steps.vec(), codes.view(), malformed.vec()});
  // Targets: the first response's SID per group, so every group has hits and misses.
  Buf<int64_t> targets(B, K, Layout::contiguous);
  std::uniform_int_distribution<int64_t> c(0, 2);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < K; ++k) targets.at(i, k) = i % G == 0 ? c(rng) : targets.at(i - i % G, k);

  sapo::reward_options exact;
  exact.kind = sapo::reward_kind::exact;
  exact.malformed_reward = -1;
  Buf<double> step_r(B, K, Layout::contiguous), A(B, K, Layout::contiguous);
  sapo::step_rewards(codes.cview(), malformed.cvec(), targets.cview(), exact, step_r.view());
  sapo::advantage_options opt;
  opt.norm = norm;
  sapo::group_advantages(step_r.cview(), sapo::group_layout::contiguous(G), opt, A.view());
  Buf<double> sapo_tokens(B, T, Layout::contiguous);
  sapo::broadcast_step_advantages(A.cview(), step.cview(), mask.cview(), sapo_tokens.view());

  // GRPO: the outcome reward is the exact match (step 0's reward is it), one advantage per
  // response, broadcast to every masked token.
  Buf<double> outcome_r(B, 1, Layout::contiguous), A_out(B, 1, Layout::contiguous);
  for (int64_t i = 0; i < B; ++i) outcome_r.at(i, 0) = step_r.at(i, 0);
  sapo::outcome_advantages(outcome_r.cvec(), sapo::group_layout::contiguous(G), opt, A_out.vec());
  Buf<double> grpo_tokens(B, T, Layout::contiguous);
  sapo::broadcast_outcome_advantages(A_out.cvec(), mask.cview(), grpo_tokens.view());

  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = 0; k < K; ++k) REQUIRE(A.at(i, k) == A_out.at(i, 0));
    for (int64_t t = 0; t < T; ++t) REQUIRE(sapo_tokens.at(i, t) == grpo_tokens.at(i, t));
  }
  // ... while prefix rewards give different advantages somewhere (the point of SAPO).
  if (K > 1) {
    sapo::reward_options prefix;
    Buf<double> pr(B, K, Layout::contiguous), PA(B, K, Layout::contiguous);
    sapo::step_rewards(codes.cview(), malformed.cvec(), targets.cview(), prefix, pr.view());
    sapo::group_advantages(pr.cview(), sapo::group_layout::contiguous(G), opt, PA.view());
    bool differs = false;
    for (int64_t i = 0; i < B; ++i)
      for (int64_t k = 0; k < K; ++k) differs = differs || PA.at(i, k) != A_out.at(i, 0);
    REQUIRE(differs);
  }
}

TEST_CASE("loo = n/(n-1) * none", "[identity]") {
  const int64_t G = GENERATE(2, 3, 7);
  std::mt19937_64 rng(200 + static_cast<uint64_t>(G));
  std::uniform_real_distribution<double> u(-1, 1);
  const int64_t B = 9 * G, K = 3;
  std::vector<double> r(size_t(B * K));
  for (auto& x : r) x = u(rng);
  std::vector<double> loo(r.size()), none(r.size());
  sapo::advantage_options o;
  o.norm = sapo::normalization::loo;
  sapo::group_advantages(sapo::mat_view<const double>(r.data(), B, K), sapo::group_layout::contiguous(G), o,
                         sapo::mat_view<double>(loo.data(), B, K));
  o.norm = sapo::normalization::none;
  sapo::group_advantages(sapo::mat_view<const double>(r.data(), B, K), sapo::group_layout::contiguous(G), o,
                         sapo::mat_view<double>(none.data(), B, K));
  const double scale = double(G) / double(G - 1);
  for (size_t j = 0; j < r.size(); ++j) REQUIRE(loo[j] == Approx(scale * none[j]).epsilon(1e-12).margin(1e-14));
}

TEST_CASE("zero advantages give a zero policy gradient", "[identity]") {
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence);
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::step_mean);
  std::mt19937_64 rng(300);
  LossProblem p = random_problem(rng, 7, 23, 0.5);
  for (auto& row : p.step_adv)
    for (auto& a : row) a = 0;
  sapo::loss_options opt;
  opt.ratio = ratio;
  opt.agg = agg;
  opt.dual_clip = true;
  LossBuffers<float> buf(p, Layout::strided);
  const auto r = sapo::policy_loss(buf.inputs(false, true), opt, buf.grad.view());
  REQUIRE(r.loss == 0.0);
  for (int64_t i = 0; i < p.B; ++i)
    for (int64_t t = 0; t < p.T; ++t) REQUIRE(buf.grad.at(i, t) == 0.0f);
}

TEST_CASE("step ratio with one-token steps equals the token ratio", "[identity]") {
  std::mt19937_64 rng(400);
  LossProblem p = random_problem(rng, 5, 3, 0.5);
  p.K = 3;
  for (int64_t i = 0; i < p.B; ++i)
    for (int64_t t = 0; t < p.T; ++t) {
      p.mask[size_t(i)][size_t(t)] = 1;
      p.step[size_t(i)][size_t(t)] = static_cast<int64_t>(t);  // step t is token t
    }
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::step_mean);
  sapo::loss_options opt;
  opt.agg = agg;
  opt.kl_coef = 0.1;
  LossBuffers<double> a(p, Layout::contiguous), b(p, Layout::contiguous);
  opt.ratio = sapo::ratio_level::token;
  const auto token = sapo::policy_loss(a.inputs(true, true), opt, a.grad.view());
  opt.ratio = sapo::ratio_level::step;
  const auto step = sapo::policy_loss(b.inputs(true, true), opt, b.grad.view());
  REQUIRE(token.loss == step.loss);
  REQUIRE(token.clip_frac_high == step.clip_frac_high);
  for (int64_t i = 0; i < p.B; ++i)
    for (int64_t t = 0; t < p.T; ++t) REQUIRE(a.grad.at(i, t) == b.grad.at(i, t));
}
