// SPEC §3: group-relative advantages, outcome and mixed modes, token broadcast, against
// the reference on random batches (odd sizes, strided views, unequal explicit groups,
// singleton groups, all-equal rewards, absent steps) and by hand.
#include "support.hpp"

using namespace sapo_test;

namespace {

sapo_ref::Norm ref_norm(sapo::normalization n) {
  switch (n) {
    case sapo::normalization::std: return sapo_ref::Norm::std_eps;
    case sapo::normalization::std_floor: return sapo_ref::Norm::std_floor;
    case sapo::normalization::none: return sapo_ref::Norm::none;
    case sapo::normalization::loo: return sapo_ref::Norm::loo;
    case sapo::normalization::batch_std: return sapo_ref::Norm::batch_std;
  }
  return sapo_ref::Norm::none;
}

sapo_ref::AdvantageConfig ref_config(const sapo::advantage_options& o) {
  sapo_ref::AdvantageConfig c;
  c.norm = ref_norm(o.norm);
  c.unbiased = o.unbiased_std;
  c.eps = o.eps;
  c.singleton_raw = o.singleton == sapo::singleton_policy::raw;
  return c;
}

/// Rewards with many ties (values from {0, 0.5, 1}), some absent steps, and groups where
/// every reward is equal.
sapo_ref::Matrix random_rewards(std::mt19937_64& rng, int64_t B, int64_t K, double absent_rate) {
  std::uniform_int_distribution<int> level(0, 2);
  std::bernoulli_distribution absent(absent_rate), flat(0.15);
  sapo_ref::Matrix r(static_cast<size_t>(B), std::vector<double>(static_cast<size_t>(K)));
  for (auto& row : r)
    for (auto& x : row) x = absent(rng) ? std::nan("") : 0.5 * level(rng);
  if (B > 2 && flat(rng))
    for (auto& row : r) row[0] = 0.1;  // one step all-equal (and 0.1 is not exact in binary)
  return r;
}

void require_stats(const sapo::advantage_stats& got, const sapo_ref::AdvantageStats& want) {
  const size_t K = want.mean_reward.size();
  REQUIRE(got.mean_reward.size() == K);
  for (size_t k = 0; k < K; ++k) {
    INFO("step " << k);
    require_close(got.mean_reward[k], want.mean_reward[k], 1e-12, 1e-15);
    require_close(got.zero_variance_fraction[k], want.zero_variance_fraction[k], 1e-12, 0);
    require_close(got.advantage_std[k], want.advantage_std[k], 1e-9, 1e-12);
    REQUIRE(got.n_present[k] == want.n_present[k]);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("group_advantages matches the reference", "[advantages]", float, double) {
  const auto norm = GENERATE(sapo::normalization::std, sapo::normalization::std_floor, sapo::normalization::none,
                             sapo::normalization::loo, sapo::normalization::batch_std);
  const bool unbiased = GENERATE(true, false);
  const auto singleton = GENERATE(sapo::singleton_policy::zero, sapo::singleton_policy::raw);
  const bool explicit_groups = GENERATE(false, true);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided, Layout::column_major);
  const int64_t G = GENERATE(1, 3, 8);
  const int64_t K = GENERATE(1, 4);
  const int64_t n_groups = 5;
  const int64_t B = n_groups * G + (explicit_groups ? 2 : 0);
  CAPTURE(static_cast<int>(norm), unbiased, static_cast<int>(singleton), explicit_groups, name(layout), G, K);

  std::mt19937_64 rng(99 + static_cast<uint64_t>(G * 31 + K));
  const sapo_ref::Matrix rewards = random_rewards(rng, B, K, 0.15);
  std::vector<int64_t> gid(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i)
    gid[size_t(i)] = explicit_groups ? std::uniform_int_distribution<int64_t>(0, n_groups)(rng) : i / G;
  const int64_t ng = explicit_groups ? n_groups + 1 : n_groups;  // explicit: one group may stay empty

  sapo::advantage_options opt;
  opt.norm = norm;
  opt.unbiased_std = unbiased;
  opt.singleton = singleton;
  opt.eps = 1e-3;  // large enough that std and std_floor differ
  const auto groups = explicit_groups ? sapo::group_layout::explicit_ids({gid.data(), B}, ng)
                                      : sapo::group_layout::contiguous(G);
  // Rewards stored as TestType, so the reference sees the same (rounded) values.
  const Buf<TestType> r = from_ref<TestType>(rewards, K, layout);
  Buf<TestType> A(B, K, layout, TestType(99));
  const sapo::advantage_stats stats = sapo::group_advantages(r.cview(), groups, opt, A.view());

  sapo_ref::AdvantageStats want_stats;
  const auto want = sapo_ref::advantages(to_ref(r), gid, ng, ref_config(opt), &want_stats);
  const bool f = std::is_same<TestType, float>::value;
  require_close(to_ref(A), rounded_to(want, f), f ? 1e-6 : 1e-13, f ? 1e-6 : 1e-13);
  require_stats(stats, want_stats);
}

TEST_CASE("outcome mode is the K = 1 computation", "[advantages]") {
  std::mt19937_64 rng(5);
  const int64_t B = 19 * 3;
  const sapo_ref::Matrix rewards = random_rewards(rng, B, 1, 0.1);
  Buf<double> r = from_ref<double>(rewards, 1, Layout::strided);
  Buf<double> A(B, 1, Layout::strided, 99);
  sapo::outcome_advantages(r.cvec(), sapo::group_layout::contiguous(3), {}, A.vec());
  std::vector<int64_t> gid(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) gid[size_t(i)] = i / 3;
  require_close(to_ref(A), sapo_ref::advantages(rewards, gid, B / 3, {}), 1e-13, 1e-13);
}

TEST_CASE("group_advantages by hand", "[advantages]") {
  // One group of 4, rewards {1, 0, 0, 0}: mu = 1/4, sigma (unbiased) = 1/2.
  const double r[] = {1, 0, 0, 0};
  double A[4];
  sapo::advantage_options opt;
  opt.eps = 1e-12;
  auto run = [&](sapo::normalization n) {
    opt.norm = n;
    sapo::group_advantages(sapo::mat_view<const double>(r, 4, 1), sapo::group_layout::contiguous(4), opt,
                           sapo::mat_view<double>(A, 4, 1));
  };
  run(sapo::normalization::std);
  REQUIRE(A[0] == Approx(1.5).epsilon(1e-10));
  REQUIRE(A[1] == Approx(-0.5).epsilon(1e-10));
  run(sapo::normalization::none);
  REQUIRE(A[0] == Approx(0.75));
  run(sapo::normalization::loo);  // 1 - 0 and 0 - 1/3
  REQUIRE(A[0] == Approx(1.0));
  REQUIRE(A[1] == Approx(-1.0 / 3));
  SECTION("zero variance and singletons give 0, and are counted") {
    const double flat[] = {0.1, 0.1, 0.1, 7.0};
    const int64_t ids[] = {0, 0, 0, 1};  // group 1 is a singleton
    double out[4];
    const auto s = sapo::group_advantages(sapo::mat_view<const double>(flat, 4, 1),
                                          sapo::group_layout::explicit_ids({ids, 4}, 2), {},
                                          sapo::mat_view<double>(out, 4, 1));
    REQUIRE(out[0] == 0.0);
    REQUIRE(out[3] == 0.0);
    REQUIRE(s.zero_variance_fraction[0] == 1.0);
    sapo::advantage_options raw;
    raw.singleton = sapo::singleton_policy::raw;
    sapo::group_advantages(sapo::mat_view<const double>(flat, 4, 1), sapo::group_layout::explicit_ids({ids, 4}, 2),
                           raw, sapo::mat_view<double>(out, 4, 1));
    REQUIRE(out[3] == 7.0);
  }
  SECTION("absent steps are left out and get 0") {
    const double with_absent[] = {1, 0, std::nan(""), 0};  // mu over {1, 0, 0} = 1/3
    double out[4];
    opt.norm = sapo::normalization::none;
    sapo::group_advantages(sapo::mat_view<const double>(with_absent, 4, 1), sapo::group_layout::contiguous(4), opt,
                           sapo::mat_view<double>(out, 4, 1));
    REQUIRE(out[0] == Approx(2.0 / 3));
    REQUIRE(out[2] == 0.0);
  }
}

TEMPLATE_TEST_CASE("broadcast and mix match the reference", "[advantages]", float, double) {
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided, Layout::column_major);
  const int64_t B = GENERATE(1, 3, 19);
  std::mt19937_64 rng(11 + static_cast<uint64_t>(B));
  Vocab v;
  const TokenBatch batch = random_tokens(rng, v, B, 29, false, true, 0.3);
  const auto seg = sapo_ref::segment(batch.tokens, batch.mask, v.ref_config(v.options(false, true)));
  const sapo_ref::Matrix A = random_logp(rng, B, v.K, -2, 2);
  const Buf<TestType> a = from_ref<TestType>(A, v.K, layout);
  const Buf<int32_t> step = from_ref_int<int32_t>(seg.step, 29, layout);
  const Buf<uint8_t> mask = from_ref_int<uint8_t>(batch.mask, 29, layout);
  Buf<TestType> out(B, 29, layout, TestType(99));
  sapo::broadcast_step_advantages(a.cview(), step.cview(), mask.cview(), out.view());
  require_close(to_ref(out), sapo_ref::broadcast(to_ref(a), seg.step, batch.mask), 0, 0);

  // Mixed mode: w_out * A_out + w_step * A_step, then the outcome broadcast.
  const sapo_ref::Matrix A_out = random_logp(rng, B, 1, -2, 2);
  const Buf<TestType> a_out = from_ref<TestType>(A_out, 1, layout);
  Buf<double> mixed(B, v.K, layout, 99);
  sapo::mix_advantages(a_out.cvec(), a.cview(), {0.3, 0.7}, mixed.view());
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < v.K; ++k)
      REQUIRE(mixed.at(i, k) == 0.3 * double(a_out.at(i, 0)) + 0.7 * double(a.at(i, k)));
  Buf<TestType> outcome_tokens(B, 29, layout, TestType(99));
  sapo::broadcast_outcome_advantages(a_out.cvec(), mask.cview(), outcome_tokens.view());
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = 0; t < 29; ++t)
      REQUIRE(outcome_tokens.at(i, t) == (mask.at(i, t) ? a_out.at(i, 0) : TestType(0)));
}
