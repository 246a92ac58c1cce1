// Traces on a hand-made catalogue: prompt layout, response layout (read back with sapo's own
// segmentation), and the thought rules of traces.hpp worked out by hand.
#include <catch2/catch.hpp>
#include <sapo/sapo.hpp>

#include <string>
#include <vector>

#include "traces.hpp"

namespace {

// Six items, five genres (sorted by name), K = 3 levels of 4 codes.
//   item  year  genres                   SID
//   0     1995  Action Comedy            0 0 0
//   1     1999  Action Horror            0 0 1
//   2     1987  Action Comedy Drama      0 1 0
//   3     -     (none)                   1 0 0
//   4     2001  Drama Horror             1 0 1
//   5     1994  Comedy Drama War         0 1 1
// Users (time order): u0 = 0 1 2 4 5, u1 = 1 0 5 3, u2 = 0 5 2 1; leave-last-two holds out
// the last two of each, so training interactions are u0: 0 1 2, u1: 1 0, u2: 0 5.
struct fixture {
  rec::dataset data;
  rec::split sp;
  rec::sid_table sids;

  fixture() {
    data.genre_names = {"Action", "Comedy", "Drama", "Horror", "War"};
    const int years[6] = {1995, 1999, 1987, 0, 2001, 1994};
    const std::vector<std::vector<int>> genres = {{0, 1}, {0, 3}, {0, 1, 2}, {}, {2, 3}, {1, 2, 4}};
    for (int i = 0; i < 6; ++i) {
      rec::item it;
      it.movie_id = 10 * (i + 1);
      it.year = years[i];
      it.genres = genres[size_t(i)];
      data.items.push_back(it);
    }
    data.user_ids = {1, 2, 3};
    data.sequences = {{0, 1, 2, 4, 5}, {1, 0, 5, 3}, {0, 5, 2, 1}};
    sp.train = {{0, {0}, 1}, {0, {0, 1}, 2}, {1, {1}, 0}, {2, {0}, 5}};
    sp.valid = {{0, {0, 1, 2}, 4}, {1, {1, 0}, 5}, {2, {0, 5}, 2}};
    sp.test = {{0, {0, 1, 2, 4}, 5}, {1, {1, 0, 5}, 3}, {2, {0, 5, 2}, 1}};
    sids.levels = 3;
    sids.codes = 4;
    sids.code = {0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 1};
  }
};

// Token ids: specials 0..5, SID level l code c = 6 + 4 l + c, thoughts from 18 in the order
// genres (5), genre:none, decades 1980s 1990s 2000s, decade:unknown, pop head torso tail.
enum : int32_t {
  Action = 18, Comedy, Drama, Horror, War, NoGenre, D1980, D1990, D2000, DUnknown, Head, Torso, Tail
};
constexpr int32_t sid(int level, int code) { return 6 + 4 * level + code; }

rec::trace_options opts(int max_history = 3, int max_thoughts = 3, bool thinking = true) {
  rec::trace_options o;
  o.max_history = max_history;
  o.max_thoughts = max_thoughts;
  o.thinking = thinking;
  return o;
}

}  // namespace

TEST_CASE("traces: vocabulary layout and names", "[recommender][traces]") {
  fixture f;
  rec::trace_builder tb(f.data, f.sp, f.sids, opts());
  const rec::vocabulary& v = tb.vocab();
  CHECK(v.first_thought() == 18);
  CHECK(v.size() == 31);
  const std::vector<std::string> expected = {"genre:Action", "genre:Comedy", "genre:Drama", "genre:Horror",
                                             "genre:War", "genre:none", "decade:1980s", "decade:1990s",
                                             "decade:2000s", "decade:unknown", "pop:head", "pop:torso", "pop:tail"};
  CHECK(v.thought_names == expected);
  CHECK(v.thought("pop:tail") == Tail);
  CHECK(v.thought("genre:Western") == -1);
  CHECK(v.name(rec::vocabulary::bos) == "<bos>");
  CHECK(v.name(rec::vocabulary::end_think) == "</think>");
  CHECK(v.name(sid(2, 3)) == "<s2_3>");
  CHECK(v.name(D1990) == "decade:1990s");
  CHECK(v.sid_level(sid(1, 2)) == 1);
  CHECK(v.sid_code(sid(1, 2)) == 2);
}

TEST_CASE("traces: prompts are left-padded to a fixed length", "[recommender][traces]") {
  fixture f;
  rec::trace_builder tb(f.data, f.sp, f.sids, opts(3));
  CHECK(tb.prompt_length() == 11);
  // Two items: one item's worth (3 tokens) of <pad> after <bos>.
  CHECK(tb.prompt({0, 5}) ==
        std::vector<int32_t>{1, 0, 0, 0, sid(0, 0), sid(1, 0), sid(2, 0), sid(0, 0), sid(1, 1), sid(2, 1), 3});
  // Five items: only the three most recent (2, 4, 5) are kept.
  CHECK(tb.prompt({0, 1, 2, 4, 5}) == std::vector<int32_t>{1, sid(0, 0), sid(1, 1), sid(2, 0), sid(0, 1), sid(1, 0),
                                                           sid(2, 1), sid(0, 0), sid(1, 1), sid(2, 1), 3});
  CHECK(tb.prompt({}) == std::vector<int32_t>{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3});
  CHECK_THROWS_AS(tb.prompt({6}), std::invalid_argument);
}

TEST_CASE("traces: thoughts follow the documented rules", "[recommender][traces]") {
  fixture f;
  rec::trace_builder tb(f.data, f.sp, f.sids, opts());
  using V = std::vector<int32_t>;
  // Step 0, the two genres most items of the level-0 cluster carry:
  //   cluster 0 = {0,1,2,5}: Action 3, Comedy 3, Drama 2, Horror 1, War 1 -> Action Comedy
  //   cluster 1 = {3,4}: Drama 1, Horror 1 (tie: lower index first)       -> Drama Horror
  // Step 1, the most frequent genre not yet named, then the dominant decade:
  //   {0,1}: Action 2, Comedy 1, Horror 1; Action and Comedy named -> Horror; 1990s
  //   {2,5}: Comedy 2, Drama 2, Action 1, War 1; -> Drama; 1980s/1990s tie -> 1980s
  //   {3,4}: Drama, Horror both named -> the most frequent, Drama; unknown/2000s tie -> 2000s
  // Step 2, the item's rarest genre not yet named (catalogue counts: Action 3, Comedy 3,
  // Drama 3, Horror 2, War 1), its decade and its popularity tier. Training counts
  // 0:3 1:2 2:1 5:1 3:0 4:0 (total 7): item 0 starts at 0 < 7/3 -> head, item 1 at 3 < 14/3
  // -> torso, the rest tail.
  CHECK(tb.thoughts(0, 0) == V{Action, Comedy});
  CHECK(tb.thoughts(0, 1) == V{Horror, D1990});
  CHECK(tb.thoughts(0, 2) == V{Action, D1990, Head});    // all its genres named: the rarest (tie: Action)
  CHECK(tb.thoughts(1, 0) == V{Action, Comedy});
  CHECK(tb.thoughts(1, 1) == V{Horror, D1990});
  CHECK(tb.thoughts(1, 2) == V{Horror, D1990, Torso});   // Horror (2) is rarer than Action (3)
  CHECK(tb.thoughts(2, 1) == V{Drama, D1980});
  CHECK(tb.thoughts(2, 2) == V{Action, D1980, Tail});
  CHECK(tb.thoughts(3, 0) == V{Drama, Horror});
  CHECK(tb.thoughts(3, 1) == V{Drama, D2000});
  CHECK(tb.thoughts(3, 2) == V{NoGenre, DUnknown, Tail});
  CHECK(tb.thoughts(4, 2) == V{Horror, D2000, Tail});
  CHECK(tb.thoughts(5, 0) == V{Action, Comedy});
  CHECK(tb.thoughts(5, 1) == V{Drama, D1980});
  CHECK(tb.thoughts(5, 2) == V{War, D1990, Tail});       // War: rarest and not yet named

  // Deterministic: a second builder gives the same thoughts.
  rec::trace_builder again(f.data, f.sp, f.sids, opts());
  for (int32_t i = 0; i < 6; ++i)
    for (int k = 0; k < 3; ++k) CHECK(again.thoughts(i, k) == tb.thoughts(i, k));

  // max_thoughts = 1 keeps each step's first token, and "named" means written in this
  // response: step 0 now names only Action (cluster 0) or Drama (cluster 1), so
  //   {0,1} and {2,5} -> Comedy (Action named), {3,4} -> Horror (Drama named);
  //   items: 0 {Action, Comedy} both named -> the rarer (tie: Action); 1 -> Horror (rarest,
  //   unnamed); 2 -> Drama (the only unnamed one); 3 -> none; 4 {Drama, Horror} both named ->
  //   the rarer, Horror; 5 -> War.
  rec::trace_builder one(f.data, f.sp, f.sids, opts(3, 1));
  const std::vector<std::vector<V>> expected = {
      {{Action}, {Comedy}, {Action}}, {{Action}, {Comedy}, {Horror}}, {{Action}, {Comedy}, {Drama}},
      {{Drama}, {Horror}, {NoGenre}}, {{Drama}, {Horror}, {Horror}},  {{Action}, {Comedy}, {War}}};
  for (int32_t i = 0; i < 6; ++i)
    for (int k = 0; k < 3; ++k) CHECK(one.thoughts(i, k) == expected[size_t(i)][size_t(k)]);
}

TEST_CASE("traces: popularity counts training interactions only", "[recommender][traces]") {
  fixture f;
  // Counting every interaction (valid and test targets too) would give 0:3 1:3 5:3 2:2 3:1
  // 4:1, total 13: item 1 would start at 3 < 13/3 (head) and item 5 at 6 < 26/3 (torso).
  // Training interactions only give item 1 torso and item 5 tail.
  rec::trace_builder tb(f.data, f.sp, f.sids, opts());
  CHECK(tb.thoughts(1, 2).back() == Torso);
  CHECK(tb.thoughts(5, 2).back() == Tail);
  // A split whose held-out targets are not the last items of the sequences is rejected.
  rec::split bad = f.sp;
  bad.test[0].target = 4;
  CHECK_THROWS_AS(rec::trace_builder(f.data, bad, f.sids, opts()), std::invalid_argument);
}

TEST_CASE("traces: responses follow the interleaved layout and segment back into the SID",
          "[recommender][traces]") {
  fixture f;
  rec::trace_builder tb(f.data, f.sp, f.sids, opts());
  CHECK(tb.max_response_length() == 19);
  // Item 4 = SID 1 0 1.
  CHECK(tb.response(4) == std::vector<int32_t>{4, Drama, Horror, 5, sid(0, 1), 4, Drama, D2000, 5, sid(1, 0), 4,
                                               Horror, D2000, Tail, 5, sid(2, 1), 2});
  rec::trace_builder plain(f.data, f.sp, f.sids, opts(3, 3, false));
  CHECK(plain.max_response_length() == 4);
  CHECK(plain.response(4) == std::vector<int32_t>{sid(0, 1), sid(1, 0), sid(2, 1), 2});

  // sapo's segmentation finds K = 3 steps per response and reads the target's SID back,
  // with and without thinking blocks. Rows are padded to a common length (mask 0).
  for (const rec::trace_builder* b : {&tb, &plain}) {
    const int64_t B = 6, T = b->max_response_length();
    std::vector<int32_t> tokens(size_t(B * T), 0), step(size_t(B * T), 7), n_steps(size_t(B), 0);
    std::vector<uint8_t> mask(size_t(B * T), 0), malformed(size_t(B), 9);
    std::vector<int64_t> codes(size_t(B * 3), -2);
    std::vector<std::vector<int32_t>> responses;
    for (int32_t i = 0; i < B; ++i) {
      responses.push_back(b->response(i));
      for (size_t t = 0; t < responses.back().size(); ++t) {
        tokens[size_t(i * T) + t] = responses.back()[t];
        mask[size_t(i * T) + t] = 1;
      }
    }
    sapo::segment_options seg;
    seg.num_steps = 3;
    seg.sid_ranges = {{6, 10}, {10, 14}, {14, 18}};
    seg.codes_per_level = {4, 4, 4};
    const sapo::segment_stats st = sapo::segment_steps(
        sapo::mat_view<const int32_t>(tokens.data(), B, T), sapo::mat_view<const uint8_t>(mask.data(), B, T), seg,
        {sapo::mat_view<int32_t>(step.data(), B, T), sapo::vec_view<int32_t>(n_steps.data(), B),
         sapo::mat_view<int64_t>(codes.data(), B, 3), sapo::vec_view<uint8_t>(malformed.data(), B)});
    CHECK(st.n_malformed == 0);
    for (int32_t i = 0; i < B; ++i) {
      CHECK(n_steps[size_t(i)] == 3);
      CHECK(malformed[size_t(i)] == 0);
      for (int k = 0; k < 3; ++k) CHECK(codes[size_t(i * 3 + k)] == f.sids.at(i, k));
      // Each step ends at its SID token; <eos> is past the last step.
      const auto& r = responses[size_t(i)];
      int expect = 0;
      for (size_t t = 0; t < r.size(); ++t) {
        CHECK(step[size_t(i * T) + t] == (r[t] == 2 ? -1 : expect));
        if (r[t] >= 6 && r[t] < 18) ++expect;
      }
    }
  }
}
