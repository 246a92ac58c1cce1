// SPEC §2: built-in step rewards against the reference and by hand.
#include "support.hpp"

using namespace sapo_test;

namespace {

sapo_ref::RewardKind ref_kind(sapo::reward_kind k) {
  switch (k) {
    case sapo::reward_kind::per_level: return sapo_ref::RewardKind::per_level;
    case sapo::reward_kind::prefix: return sapo_ref::RewardKind::prefix;
    case sapo::reward_kind::weighted_prefix: return sapo_ref::RewardKind::weighted_prefix;
    case sapo::reward_kind::exact: return sapo_ref::RewardKind::exact;
  }
  return sapo_ref::RewardKind::exact;
}

}  // namespace

TEMPLATE_TEST_CASE("step_rewards matches the reference", "[rewards]", float, double) {
  const auto kind = GENERATE(sapo::reward_kind::per_level, sapo::reward_kind::prefix,
                             sapo::reward_kind::weighted_prefix, sapo::reward_kind::exact);
  const int64_t B = GENERATE(1, 7, 33);
  const int64_t K = GENERATE(1, 3, 4);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided, Layout::column_major);
  CAPTURE(static_cast<int>(kind), B, K, name(layout));
  std::mt19937_64 rng(77 + static_cast<uint64_t>(B + 10 * K));
  std::uniform_int_distribution<int64_t> code(0, 2);  // few codes: many matches
  std::bernoulli_distribution bad(0.2);
  sapo_ref::IntMatrix codes(static_cast<size_t>(B), std::vector<int64_t>(static_cast<size_t>(K))), targets = codes;
  std::vector<bool> malformed(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    malformed[size_t(i)] = bad(rng);
    for (int64_t k = 0; k < K; ++k) {
      codes[size_t(i)][size_t(k)] = code(rng);
      targets[size_t(i)][size_t(k)] = code(rng);
    }
  }
  sapo::reward_options opt;
  opt.kind = kind;
  opt.malformed_reward = -0.5;
  for (int64_t k = 0; k < K; ++k) opt.level_weights.push_back(0.25 * double(k + 1));

  Buf<int64_t> c = from_ref_int<int64_t>(codes, K, layout);
  Buf<int32_t> y = from_ref_int<int32_t>(targets, K, layout);
  Buf<uint8_t> m(B, 1, layout);
  for (int64_t i = 0; i < B; ++i) m.at(i, 0) = malformed[size_t(i)];
  Buf<TestType> r(B, K, layout, TestType(99));
  sapo::step_rewards(c.cview(), m.cvec(), y.cview(), opt, r.view());
  const auto want = sapo_ref::step_rewards(codes, malformed, targets, ref_kind(kind), opt.level_weights, -0.5);
  require_close(to_ref(r), rounded_to(want, std::is_same<TestType, float>::value), 0, 0);
}

TEST_CASE("step_rewards by hand: target (3, 1, 4)", "[rewards]") {
  // Generated SIDs: all right; first two right; first wrong, rest right.
  const int64_t codes[] = {3, 1, 4, 3, 1, 0, 0, 1, 4};
  const int64_t target[] = {3, 1, 4, 3, 1, 4, 3, 1, 4};
  const uint8_t malformed[] = {0, 0, 0};
  double r[9];
  sapo::reward_options opt;
  auto run = [&](sapo::reward_kind k) {
    opt.kind = k;
    sapo::step_rewards(sapo::mat_view<const int64_t>(codes, 3, 3), sapo::vec_view<const uint8_t>(malformed, 3),
                       sapo::mat_view<const int64_t>(target, 3, 3), opt, sapo::mat_view<double>(r, 3, 3));
    return std::vector<double>(r, r + 9);
  };
  REQUIRE(run(sapo::reward_kind::per_level) == std::vector<double>{1, 1, 1, 1, 1, 0, 0, 1, 1});
  REQUIRE(run(sapo::reward_kind::prefix) == std::vector<double>{1, 1, 1, 1, 1, 0, 0, 0, 0});
  REQUIRE(run(sapo::reward_kind::exact) == std::vector<double>{1, 1, 1, 0, 0, 0, 0, 0, 0});
  opt.level_weights = {0.25, 0.5, 1.0};
  REQUIRE(run(sapo::reward_kind::weighted_prefix) == std::vector<double>{0.25, 0.5, 1, 0.25, 0.5, 0, 0, 0, 0});
}
