// Semantic IDs and the trie: item features and the collision rule worked out by hand on
// tiny catalogues, uniqueness / exactly-K-levels / determinism / stats on the fixture and
// on a random catalogue built to collide, and a hidden [.real] run on MovieLens itself.
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "data.hpp"
#include "sid.hpp"

namespace {

const std::string kFixture = std::string(SAPO_REC_FIXTURE_DIR) + "/movielens_small.csv";
using ids = std::vector<int32_t>;

std::vector<int32_t> code_of(const rec::sid_table& t, int32_t item) {
  std::vector<int32_t> c;
  for (int l = 0; l < t.levels; ++l) c.push_back(t.at(item, l));
  return c;
}

// What every SID table must satisfy, checked independently of build_sids: exactly
// `levels` codes per item, each in range, no two items alike, and stats that agree with a
// recount over the table.
void check_table(const rec::sid_table& t, int64_t n_items, int levels, int codes) {
  REQUIRE(t.levels == levels);
  REQUIRE(t.codes == codes);
  REQUIRE(t.n_items() == n_items);
  REQUIRE(t.code.size() == size_t(n_items) * size_t(levels));
  std::set<std::vector<int32_t>> seen;
  std::vector<std::set<int32_t>> used(static_cast<size_t>(levels));
  for (int32_t i = 0; i < n_items; ++i) {
    const auto c = code_of(t, i);
    for (int l = 0; l < levels; ++l) {
      REQUIRE(c[size_t(l)] >= 0);
      REQUIRE(c[size_t(l)] < codes);
      used[size_t(l)].insert(c[size_t(l)]);
    }
    seen.insert(c);
  }
  CHECK(int64_t(seen.size()) == n_items);
  REQUIRE(t.stats.codebook_usage.size() == size_t(levels));
  REQUIRE(t.stats.quantization_error.size() == size_t(levels));
  for (int l = 0; l < levels; ++l) CHECK(t.stats.codebook_usage[size_t(l)] == double(used[size_t(l)].size()) / codes);
  CHECK(t.stats.collision_rate == Approx(double(t.stats.reassigned) / double(n_items)));
  CHECK(t.stats.reassigned >= 0);
  CHECK(t.stats.left_prefix >= 0);
  CHECK(t.stats.left_prefix <= t.stats.reassigned);
  CHECK(t.stats.reassigned < n_items);  // every raw code keeps one owner
  for (double e : t.stats.quantization_error) CHECK(std::isfinite(e));
}

// A catalogue made to collide: few genres and years, so many items share a vector, and
// random users for the collaborative block.
rec::dataset random_catalogue(int n_items, int n_users, uint64_t seed) {
  std::mt19937_64 g(seed);
  rec::dataset d;
  d.genre_names = {"A", "B", "C", "D", "E", "F"};
  for (int i = 0; i < n_items; ++i) {
    rec::item it;
    it.movie_id = i + 1;
    it.year = (g() % 7 == 0) ? 0 : 1990 + int(g() % 6);
    for (int gi = 0; gi < 6; ++gi)
      if (g() % 3 == 0) it.genres.push_back(gi);
    d.items.push_back(it);
  }
  for (int u = 0; u < n_users; ++u) {
    d.user_ids.push_back(u + 1);
    std::vector<int32_t> s;
    const int len = 3 + int(g() % 30);
    for (int k = 0; k < len; ++k) s.push_back(int32_t(g() % uint64_t(n_items)));
    d.sequences.push_back(s);
    d.n_ratings += len;
  }
  return d;
}

}  // namespace

TEST_CASE("sid: item features on the fixture, by hand", "[recommender][sid]") {
  const rec::dataset d = rec::load_movielens_csv(kFixture);
  const rec::split sp = rec::leave_last_two(d, 3);
  rec::sid_options opt;  // weights 1 (genres), 0.5 (year), 1 (collaborative)
  const rec::item_features f = rec::make_item_features(d, sp, opt);
  REQUIRE(f.n == 7);
  REQUIRE(f.genre_cols == 9);
  REQUIRE(f.year_cols == 2);
  // Training interactions: user 0 {1, 3}, user 1 {6, 3, 0, 1, 2}, user 2 {1, 0, 2, 5}
  // (user 3 has n = 3, so none): 3 users x 6 items, rank <= 3, and the first singular
  // direction is dropped, leaving 2 collaborative columns.
  REQUIRE(f.cf_cols == 2);
  REQUIRE(f.dim == 13);
  auto v = [&](int i, int c) { return f.v[size_t(i) * size_t(f.dim) + size_t(c)]; };

  // Genres: 6 of 7 items have genres, each such row has length 1 before weighting, so the
  // block's mean squared norm is 6/7 and the weight rescales it by sqrt(7/6).
  const double gs = std::sqrt(7.0 / 6.0);
  for (int c : {1, 2, 3, 4, 7}) CHECK(v(0, c) == Approx(gs / std::sqrt(5.0)));
  for (int c : {0, 5, 6, 8}) CHECK(v(0, c) == 0.0);
  CHECK(v(4, 6) == Approx(gs));
  for (int c = 0; c < 9; ++c) CHECK(v(3, c) == 0.0);  // (no genres listed)

  // Year: known years 1995 1995 1980 2001 1999 -> mean 1994, variance 272/5 = 54.4. The
  // z-scores (5 known) and flags (2 missing) give mean squared norm 7/7 = 1, rescaled to 0.5.
  const double ys = std::sqrt(0.5);
  CHECK(v(0, 9) == Approx(ys * 1.0 / std::sqrt(54.4)));
  CHECK(v(4, 9) == Approx(ys * -14.0 / std::sqrt(54.4)));
  CHECK(v(0, 10) == 0.0);
  CHECK(v(2, 9) == 0.0);  // Heat: year NA -> the mean, and the flag is up
  CHECK(v(2, 10) == Approx(ys));

  // Item 4 (movie 7) is only ever a validation target (and in test histories): no training
  // interaction, so no collaborative signal may leak into its vector.
  CHECK(v(4, 11) == 0.0);
  CHECK(v(4, 12) == 0.0);
  // Every item that has training interactions gets a nonzero collaborative row: a zero row
  // would need the item's column to be parallel to the dropped direction sqrt(deg(u)),
  // which the user degrees 2, 5, 4 rule out for every item here.
  for (int i : {0, 1, 2, 3, 5, 6}) CHECK(v(i, 11) * v(i, 11) + v(i, 12) * v(i, 12) > 0.0);
}

TEST_CASE("sid: the collaborative block splits two communities joined by a bridge", "[recommender][sid]") {
  // Users 0-2 watch items 0-2, users 3-5 items 3-5; user 0 also watches item 3 and user 3
  // item 0. Degrees: users 0 and 3 and items 0 and 3 have 4, the rest 3. Swapping the two
  // communities is a symmetry, so the singular vectors are symmetric or antisymmetric:
  //  * symmetric: the degree direction (singular value 1, dropped) and 1/6;
  //  * antisymmetric, x = (a, b, b, -a, -b, -b): on community A the normalized matrix minus
  //    the mirrored bridge is [[0, r, r], [r, 1/3, 1/3], [r, 1/3, 1/3]] with r = 1/sqrt 12,
  //    whose top eigenvalue solves l^2 - 2/3 l - 1/6 = 0: l = 0.860, a = 2r b / l = 0.67 b.
  // So the kept direction is the antisymmetric one, and with svd_dim = 1 and unit rows items
  // 0-2 get +c and items 3-5 get -c, |c| = 1 (the block's mean squared norm is already 1).
  // Keeping the dropped degree direction instead would give all six items the same sign.
  rec::dataset d;
  for (int i = 0; i < 6; ++i) {
    rec::item it;
    it.movie_id = i + 1;
    d.items.push_back(it);
  }
  d.sequences.resize(6);
  rec::split sp;
  const std::vector<ids> watched = {{0, 1, 2, 3}, {0, 1, 2}, {0, 1, 2}, {3, 4, 5, 0}, {3, 4, 5}, {3, 4, 5}};
  for (int32_t u = 0; u < 6; ++u) {
    rec::example ex;
    ex.user = u;
    ex.history.assign(watched[size_t(u)].begin(), watched[size_t(u)].end() - 1);
    ex.target = watched[size_t(u)].back();
    sp.train.push_back(ex);
  }
  rec::sid_options opt;
  opt.svd_dim = 1;
  const rec::item_features f = rec::make_item_features(d, sp, opt);
  REQUIRE(f.cf_cols == 1);
  REQUIRE(f.dim == 3);  // no genres, year z-score and missing flag, one collaborative column
  const double c = f.v[2];
  CHECK(std::abs(c) == Approx(1.0));
  for (int i = 0; i < 3; ++i) CHECK(f.v[size_t(i) * 3 + 2] == Approx(c));
  for (int i = 3; i < 6; ++i) CHECK(f.v[size_t(i) * 3 + 2] == Approx(-c));
}

TEST_CASE("sid: valid/test targets do not change the codes", "[recommender][sid]") {
  const rec::dataset d = random_catalogue(300, 80, 7);
  const rec::split sp = rec::leave_last_two(d, 20);
  rec::split other = sp;
  for (auto& ex : other.valid) ex.target = (ex.target + 1) % 300;
  other.test.clear();
  rec::sid_options opt;
  opt.codes = 8;
  const rec::sid_table a = rec::build_sids(d, sp, opt);
  const rec::sid_table b = rec::build_sids(d, other, opt);
  CHECK(a.code == b.code);
  // Whereas the training interactions do matter (or the collaborative block did nothing).
  rec::split fewer = sp;
  fewer.train.resize(fewer.train.size() / 2);
  CHECK(rec::build_sids(d, fewer, opt).code != a.code);
}

TEST_CASE("sid: the collision rule, worked out by hand", "[recommender][sid]") {
  // Genres only (no year, no collaborative block) and values chosen so that all the
  // arithmetic is exact: P = e_A (items 0-4), Q = e_B (item 5), R = (e_A + e_C + e_D + e_E)/2
  // (item 6, four genres: 1/sqrt 4 = 0.5). Every row has length 1, so the block weight
  // rescales by exactly 1. |P - Q|^2 = 2, |P - R|^2 = 0.25 + 3 * 0.25 = 1.
  rec::dataset d;
  d.genre_names = {"A", "B", "C", "D", "E"};
  for (int i = 0; i < 7; ++i) {
    rec::item it;
    it.movie_id = i + 1;
    it.year = 2000;
    it.genres = i < 5 ? std::vector<int>{0} : i == 5 ? std::vector<int>{1} : std::vector<int>{0, 2, 3, 4};
    d.items.push_back(it);
  }
  rec::sid_options opt;
  opt.levels = 2;
  opt.codes = 3;
  opt.svd_dim = 0;
  opt.year_weight = 0;
  // Level 0 finds the three points exactly (k-means++ cannot pick a point that already has
  // a centre on it); the residuals are all 0, so level 1 puts every item at code 0. Raw
  // codes: items 0-4 (p,0), item 5 (q,0), item 6 (r,0). Item 0 owns (p,0) (equal errors:
  // lowest index). Items 1 and 2 take (p,1) and (p,2) (all cost 0: lexicographic order).
  // Prefix p is then full; items 3 and 4 look at every free code and take the cheapest:
  // under r the cost is |P - R|^2 = 1, under q it is 2, so (r,1) and (r,2).
  for (uint64_t seed : {1, 2, 3, 99}) {
    INFO("seed " << seed);
    opt.seed = seed;
    const rec::sid_table t = rec::build_sids(d, {}, opt);
    check_table(t, 7, 2, 3);
    const int32_t p = t.at(0, 0), q = t.at(5, 0), r = t.at(6, 0);
    CHECK(std::set<int32_t>{p, q, r}.size() == 3);
    CHECK(code_of(t, 0) == ids{p, 0});
    CHECK(code_of(t, 1) == ids{p, 1});
    CHECK(code_of(t, 2) == ids{p, 2});
    CHECK(code_of(t, 3) == ids{r, 1});
    CHECK(code_of(t, 4) == ids{r, 2});
    CHECK(code_of(t, 5) == ids{q, 0});
    CHECK(code_of(t, 6) == ids{r, 0});
    CHECK(t.stats.reassigned == 4);
    CHECK(t.stats.left_prefix == 2);  // items 3 and 4
    CHECK(t.stats.collision_rate == Approx(4.0 / 7.0));
    CHECK(t.stats.codebook_usage == std::vector<double>{1.0, 1.0});
    // Items 3 and 4 now sit on R's centroid, 1 away each: 2/7 after either level (the
    // level-1 centroids are 0).
    CHECK(t.stats.quantization_error[0] == Approx(2.0 / 7.0));
    CHECK(t.stats.quantization_error[1] == Approx(2.0 / 7.0));
    CHECK(t.stats.input_energy == Approx(1.0));
  }
}

TEST_CASE("sid: distinct points with enough codes need no reassignment", "[recommender][sid]") {
  // Four one-genre items, one level of four codes: each point gets its own cluster.
  rec::dataset d;
  d.genre_names = {"A", "B", "C", "D"};
  for (int i = 0; i < 4; ++i) {
    rec::item it;
    it.movie_id = i + 1;
    it.genres = {i};
    d.items.push_back(it);
  }
  rec::sid_options opt;
  opt.levels = 1;
  opt.codes = 4;
  opt.svd_dim = 0;
  const rec::sid_table t = rec::build_sids(d, {}, opt);
  check_table(t, 4, 1, 4);
  CHECK(t.stats.reassigned == 0);
  CHECK(t.stats.left_prefix == 0);
  CHECK(t.stats.collision_rate == 0.0);
  CHECK(t.stats.codebook_usage == std::vector<double>{1.0});
  CHECK(t.stats.quantization_error[0] == Approx(0.0).margin(1e-12));
}

TEST_CASE("sid: unique K-level codes on the fixture, even with 2 codes per level", "[recommender][sid]") {
  const rec::dataset d = rec::load_movielens_csv(kFixture);
  const rec::split sp = rec::leave_last_two(d, 20);
  for (int codes : {2, 3, 8}) {
    INFO("codes " << codes);
    rec::sid_options opt;
    opt.codes = codes;
    const rec::sid_table t = rec::build_sids(d, sp, opt);
    check_table(t, 7, 3, codes);
    const rec::sid_trie trie(t);
    for (int32_t i = 0; i < 7; ++i) CHECK(trie.item(code_of(t, i)) == i);
  }
  rec::sid_options too_few;
  too_few.levels = 2;
  too_few.codes = 2;  // 4 codes for 7 items
  CHECK_THROWS_AS(rec::build_sids(d, sp, too_few), std::invalid_argument);
  rec::sid_options bad;
  bad.levels = 0;
  CHECK_THROWS_AS(rec::build_sids(d, sp, bad), std::invalid_argument);
}

TEST_CASE("sid: a random catalogue made to collide: unique, deterministic, seed-dependent", "[recommender][sid]") {
  const rec::dataset d = random_catalogue(500, 120, 42);
  const rec::split sp = rec::leave_last_two(d, 20);
  struct cfg {
    int levels, codes;
  };
  // 24^2 = 576 and 8^3 = 512 slots for 500 items: prefixes fill up, so the search has to
  // widen past the item's own prefix; 6^4 = 1296 uses four levels.
  for (cfg c : {cfg{2, 24}, cfg{3, 8}, cfg{4, 6}}) {
    INFO("levels " << c.levels << " codes " << c.codes);
    rec::sid_options opt;
    opt.levels = c.levels;
    opt.codes = c.codes;
    opt.svd_dim = 8;
    const rec::sid_table t = rec::build_sids(d, sp, opt);
    check_table(t, 500, c.levels, c.codes);
    CHECK(t.stats.reassigned > 0);

    const rec::sid_table again = rec::build_sids(d, sp, opt);
    CHECK(again.code == t.code);
    CHECK(again.stats.reassigned == t.stats.reassigned);
    CHECK(again.stats.quantization_error == t.stats.quantization_error);

    opt.seed = 2;
    CHECK(rec::build_sids(d, sp, opt).code != t.code);
  }
}

TEST_CASE("sid: trie on a hand-made table", "[recommender][sid][trie]") {
  // item: code    0: (2,0)  1: (0,1)  2: (0,2)  3: (1,1)
  rec::sid_table t;
  t.levels = 2;
  t.codes = 3;
  t.code = {2, 0, 0, 1, 0, 2, 1, 1};
  const rec::sid_trie trie(t);
  CHECK(trie.levels() == 2);

  CHECK(trie.next({}) == ids{0, 1, 2});
  CHECK(trie.next({0}) == ids{1, 2});
  CHECK(trie.next({1}) == ids{1});
  CHECK(trie.next({2}) == ids{0});
  CHECK(trie.next({3}).empty());      // no such code
  CHECK(trie.next({-1}).empty());
  CHECK(trie.next({0, 1}).empty());   // already a full code
  CHECK(trie.next({0, 1, 0}).empty());

  CHECK(trie.item({0, 2}) == 2);
  CHECK(trie.item({2, 0}) == 0);
  CHECK(trie.item({1, 1}) == 3);
  CHECK(trie.item({0, 0}) == -1);     // valid prefix, no item
  CHECK(trie.item({0}) == -1);        // a prefix is not an item
  CHECK(trie.item({0, 1, 0}) == -1);
  CHECK(trie.item({}) == -1);

  CHECK(trie.items_under({}) == ids{0, 1, 2, 3});
  CHECK(trie.items_under({0}) == ids{1, 2});
  CHECK(trie.items_under({0, 1}) == ids{1});
  CHECK(trie.items_under({2}) == ids{0});
  CHECK(trie.items_under({1, 2}).empty());
  CHECK(trie.items_under({0, 1, 5}).empty());
  CHECK(trie.items_under({7}).empty());
}

TEST_CASE("sid: trie rejects shared and out-of-range codes", "[recommender][sid][trie]") {
  rec::sid_table t;
  t.levels = 2;
  t.codes = 3;
  t.code = {0, 1, 2, 2, 0, 1};  // items 0 and 2 share (0,1)
  CHECK_THROWS_AS(rec::sid_trie(t), std::invalid_argument);
  t.code = {0, 1, 2, 3};  // 3 is not a code when codes = 3
  CHECK_THROWS_AS(rec::sid_trie(t), std::invalid_argument);
  t.code = {0, 1, -1, 0};
  CHECK_THROWS_AS(rec::sid_trie(t), std::invalid_argument);
}

// Hidden by default: needs the real data (scripts/fetch_movielens). Run with
//   sapo_rec_core_tests "[.real]"   (SAPO_MOVIELENS_CSV overrides the path)
TEST_CASE("sid: MovieLens latest-small, dataset and SID statistics", "[.real]") {
  const char* env = std::getenv("SAPO_MOVIELENS_CSV");
  const std::string path = env ? env : std::string(SAPO_REC_FIXTURE_DIR) + "/../../../data/movielens/movielens.csv";
  if (!std::ifstream(path)) FAIL("no " << path << ": run scripts/fetch_movielens first");
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  const rec::dataset d = rec::load_movielens_csv(path);
  const double load_s = std::chrono::duration<double>(clock::now() - t0).count();
  CHECK(d.n_ratings == 100004);
  CHECK(d.user_ids.size() == 671);
  CHECK(d.items.size() == 9066);
  std::printf("load %.2f s: %lld ratings, %zu users, %zu items, %zu genres, %lld (user,timestamp) ties, "
              "%lld missing titles, %lld missing years\n",
              load_s, (long long)d.n_ratings, d.user_ids.size(), d.items.size(), d.genre_names.size(),
              (long long)d.n_timestamp_ties, (long long)d.n_missing_title, (long long)d.n_missing_year);
  const rec::split sp = rec::leave_last_two(d, 20);
  std::printf("split (max_history 20): train %zu, valid %zu, test %zu\n", sp.train.size(), sp.valid.size(),
              sp.test.size());
  for (int codes : {32, 64}) {
    rec::sid_options opt;
    opt.codes = codes;
    t0 = clock::now();
    const rec::sid_table t = rec::build_sids(d, sp, opt);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    check_table(t, int64_t(d.items.size()), 3, codes);
    std::printf("codes %d: %.2f s, collision rate %.4f (%lld reassigned, %lld left their prefix), "
                "input energy %.3f\n", codes, s, t.stats.collision_rate, (long long)t.stats.reassigned,
                (long long)t.stats.left_prefix, t.stats.input_energy);
    for (int l = 0; l < 3; ++l)
      std::printf("  level %d: usage %.3f, quantization error %.4f\n", l, t.stats.codebook_usage[size_t(l)],
                  t.stats.quantization_error[size_t(l)]);
  }
}
