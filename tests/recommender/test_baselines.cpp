// The baselines on hand-made datasets and splits (no CSV, no data.cpp): most-popular's
// ranking against a hand count, and SASRec on a pattern it can only get right by learning
// order: item i is always followed by item (i + 1) mod 10.
// baselines.hpp pulls in LibTorch, whose c10 logging defines a one-argument CHECK macro;
// Catch2 comes after it so that CHECK is Catch's (non-fatal, counted) assertion.
#include "baselines.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

namespace {

// Leave-last-two written out for the tests (the project's own version lives in data.cpp,
// which these tests do not depend on): per user with n >= 3 interactions, train targets at
// positions 1 .. n-3, valid = n-2, test = n-1, histories = up to max_history previous items.
rec::split split_by_hand(const rec::dataset& d, int max_history) {
  rec::split sp;
  for (size_t u = 0; u < d.sequences.size(); ++u) {
    const auto& s = d.sequences[u];
    const int n = int(s.size());
    if (n < 3) continue;
    auto make = [&](int pos) {
      rec::example e;
      e.user = int32_t(u);
      e.history.assign(s.begin() + std::max(0, pos - max_history), s.begin() + pos);
      e.target = s[size_t(pos)];
      return e;
    };
    for (int pos = 1; pos <= n - 3; ++pos) sp.train.push_back(make(pos));
    sp.valid.push_back(make(n - 2));
    sp.test.push_back(make(n - 1));
  }
  return sp;
}

rec::dataset with_items(int n_items, std::vector<std::vector<int32_t>> sequences) {
  rec::dataset d;
  d.items.resize(size_t(n_items));
  d.user_ids.resize(sequences.size());
  d.sequences = std::move(sequences);
  return d;
}

// Users walking the cycle 0 -> 1 -> ... -> 9 -> 0 from random starts, 12 to 30 steps long.
rec::dataset cycle_data(int users, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<std::vector<int32_t>> seqs;
  for (int u = 0; u < users; ++u) {
    const int start = int(g() % 10), len = 12 + int(g() % 19);
    std::vector<int32_t> s;
    for (int i = 0; i < len; ++i) s.push_back(int32_t((start + i) % 10));
    seqs.push_back(s);
  }
  return with_items(10, seqs);
}

rec::sasrec_options small_options() {
  rec::sasrec_options o;
  o.d_model = 32;
  o.layers = 2;
  o.heads = 2;
  o.max_history = 8;
  o.dropout = 0.1;
  o.epochs = 30;
  o.batch_size = 16;
  o.lr = 5e-3;
  o.seed = 3;
  o.progress = false;
  return o;
}

std::vector<std::vector<int32_t>> histories(const std::vector<rec::example>& ex) {
  std::vector<std::vector<int32_t>> h;
  for (const auto& e : ex) h.push_back(e.history);
  return h;
}

double hit_rate_at_1(const std::vector<std::vector<int32_t>>& ranked, const std::vector<rec::example>& ex) {
  int hits = 0;
  for (size_t i = 0; i < ex.size(); ++i) hits += (!ranked[i].empty() && ranked[i][0] == ex[i].target);
  return double(hits) / double(ex.size());
}

}  // namespace

TEST_CASE("most_popular counts training interactions only, ties by lower index", "[baselines]") {
  // u0: train prefix 2 0 1 | valid 3, test 4      u1: prefix 1 2 | valid 5, test 0
  // u2: 4 4 (too short: the split has nothing of it)   u3: prefix 3 | valid 5, test 5
  // Counts: item 0: 1, 1: 2, 2: 2, 3: 1, 4: 0, 5: 0. Counting valid/test targets would put 5
  // (2 held-out + 0) and 4 (u0's test + u2) ahead of 0 and 3.
  const rec::dataset d = with_items(6, {{2, 0, 1, 3, 4}, {1, 2, 5, 0}, {4, 4}, {3, 5, 5}});
  const rec::split sp = split_by_hand(d, 20);
  REQUIRE(sp.train.size() == 3);

  CHECK(rec::most_popular(d, sp, 4) == (std::vector<int32_t>{1, 2, 0, 3}));
  // Never-trained items fill up the list by index; the list stops at the number of items.
  CHECK(rec::most_popular(d, sp, 10) == (std::vector<int32_t>{1, 2, 0, 3, 4, 5}));
  CHECK(rec::most_popular(d, sp, 0).empty());
}

TEST_CASE("baselines reject a split that does not fit the dataset", "[baselines]") {
  const rec::dataset d = with_items(6, {{2, 0, 1, 3, 4}, {1, 2, 5, 0}});
  rec::split sp = split_by_hand(d, 20);
  rec::split missing = sp;
  missing.train.pop_back();  // u1 would have a training target nobody accounts for
  CHECK_THROWS_AS(rec::most_popular(d, missing, 3), std::invalid_argument);
  rec::split stray = sp;
  stray.test.push_back(sp.test[0]);
  stray.test.back().user = 7;  // no such user
  CHECK_THROWS_AS(rec::most_popular(d, stray, 3), std::invalid_argument);
  rec::sasrec model(d, small_options(), torch::kCPU);
  CHECK_THROWS_AS(model.train(missing), std::invalid_argument);
}

TEST_CASE("SASRec learns a deterministic successor pattern", "[baselines][sasrec]") {
  const rec::dataset d = cycle_data(40, 11);
  const auto o = small_options();
  const rec::split sp = split_by_hand(d, int(o.max_history));
  rec::sasrec model(d, o, torch::kCPU);

  // Untrained, the top item hardly depends on the history and the targets are spread over
  // all 10 items, so about 1 in 10 hits.
  const double before = hit_rate_at_1(model.recommend(histories(sp.test), 1), sp.test);
  const double loss = model.train(sp);
  const double after_test = hit_rate_at_1(model.recommend(histories(sp.test), 1), sp.test);
  const double after_valid = hit_rate_at_1(model.recommend(histories(sp.valid), 1), sp.valid);
  INFO("HR@1 untrained " << before << ", trained test " << after_test << ", valid " << after_valid << ", loss " << loss);
  CHECK(before <= 0.4);
  CHECK(after_test >= 0.9);
  CHECK(after_valid >= 0.9);
  // log(10) = 2.30 nats is a uniform guess; a learned successor is far below it.
  CHECK(loss < 0.5);

  // Histories longer than max_history: only the newest items count, so a 25-step walk ending
  // in item 6 still predicts 7, whatever came 20 steps earlier.
  std::vector<std::vector<int32_t>> longs;
  std::vector<rec::example> ex;
  for (int start = 0; start < 10; ++start) {
    std::vector<int32_t> h;
    for (int i = 0; i < 25; ++i) h.push_back(int32_t((start + i) % 10));
    rec::example e;
    e.history = h;
    e.target = int32_t((start + 25) % 10);
    ex.push_back(e);
    longs.push_back(h);
  }
  CHECK(hit_rate_at_1(model.recommend(longs, 1), ex) >= 0.9);
}

TEST_CASE("SASRec recommend returns top_n distinct items", "[baselines][sasrec]") {
  const rec::dataset d = cycle_data(12, 5);
  auto o = small_options();
  o.epochs = 2;
  const rec::split sp = split_by_hand(d, int(o.max_history));
  rec::sasrec model(d, o, torch::kCPU);
  model.train(sp);

  std::vector<std::vector<int32_t>> hs = histories(sp.test);
  hs.push_back({});   // nothing to go on: still a full list
  hs.push_back({9});  // shorter than max_history: left-padded
  for (int n : {1, 4, 10, 25}) {
    const auto rec_lists = model.recommend(hs, n);
    REQUIRE(rec_lists.size() == hs.size());
    for (const auto& r : rec_lists) {
      CHECK(int(r.size()) == std::min(n, 10));
      CHECK(std::set<int32_t>(r.begin(), r.end()).size() == r.size());
      for (int32_t it : r) CHECK((it >= 0 && it < 10));
    }
  }
  for (const auto& r : model.recommend(hs, 0)) CHECK(r.empty());
  CHECK(model.recommend({}, 5).empty());
  CHECK_THROWS_AS(model.recommend({{3, 10}}, 5), std::out_of_range);
  CHECK_THROWS_AS(model.recommend({{-1}}, 5), std::out_of_range);
}

TEST_CASE("SASRec is deterministic for a seed", "[baselines][sasrec]") {
  const rec::dataset d = cycle_data(20, 9);
  auto o = small_options();
  o.epochs = 3;
  const rec::split sp = split_by_hand(d, int(o.max_history));
  const auto hs = histories(sp.valid);

  rec::sasrec a(d, o, torch::kCPU);
  rec::sasrec b(d, o, torch::kCPU);  // built before a trains: train() must not depend on that
  const double la = a.train(sp);
  torch::manual_seed(12345);  // something else drawing from the global generator in between
  const double lb = b.train(sp);
  CHECK(la == lb);
  CHECK(a.recommend(hs, 10) == b.recommend(hs, 10));

  o.seed = 4;
  rec::sasrec c(d, o, torch::kCPU);
  CHECK(c.train(sp) != la);
}
