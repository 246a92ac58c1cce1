// HR@k and NDCG@k against values worked out by hand.
#include <catch2/catch.hpp>

#include <stdexcept>
#include <vector>

#include "metrics.hpp"

TEST_CASE("metrics: hit rate and NDCG at ranks 0, 3, 7 and absent", "[recommender][metrics]") {
  // Targets 5, 9, 4, 8: found at 0-based ranks 0, 3, 7 and not at all (8 sits at rank 10,
  // past the cut-off).
  const std::vector<std::vector<int32_t>> ranked = {
      {5, 1, 2, 3, 4, 6, 7, 8, 9, 10},
      {1, 2, 3, 9, 4, 5, 6, 7, 8, 10},
      {1, 2, 3, 5, 6, 7, 8, 4, 9, 10},
      {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 8},
  };
  const rec::ranking_metrics m = rec::evaluate_rankings(ranked, {5, 9, 4, 8});
  CHECK(m.users == 4);
  CHECK(m.hr1 == Approx(0.25));
  CHECK(m.hr5 == Approx(0.5));
  CHECK(m.hr10 == Approx(0.75));
  // Gains: rank 0 -> 1, rank 3 -> 1/log2(5) = 0.4306765581, rank 7 -> 1/log2(9) = 0.3154648768.
  CHECK(m.ndcg5 == Approx((1.0 + 0.4306765581) / 4).epsilon(1e-9));
  CHECK(m.ndcg10 == Approx((1.0 + 0.4306765581 + 0.3154648768) / 4).epsilon(1e-9));
}

TEST_CASE("metrics: edge cases", "[recommender][metrics]") {
  SECTION("no users gives zeros") {
    const rec::ranking_metrics m = rec::evaluate_rankings({}, {});
    CHECK(m.users == 0);
    CHECK(m.hr10 == 0);
    CHECK(m.ndcg10 == 0);
  }
  SECTION("a repeated item counts once, at its first place") {
    // Target at ranks 2 and 4: NDCG = 1/log2(4) = 0.5, not 0.5 + 1/log2(6).
    const rec::ranking_metrics m = rec::evaluate_rankings({{1, 2, 7, 3, 7}}, {7});
    CHECK(m.hr1 == 0);
    CHECK(m.hr5 == 1);
    CHECK(m.ndcg5 == Approx(0.5));
    CHECK(m.ndcg10 == Approx(0.5));
  }
  SECTION("short and empty lists") {
    const rec::ranking_metrics m = rec::evaluate_rankings({{3}, {}}, {3, 3});
    CHECK(m.hr1 == Approx(0.5));
    CHECK(m.ndcg10 == Approx(0.5));
  }
  SECTION("mismatched sizes are rejected") {
    CHECK_THROWS_AS(rec::evaluate_rankings({{1}}, {1, 2}), std::invalid_argument);
  }
}
