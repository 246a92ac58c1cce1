// SPEC §1: segmentation against the reference on random batches, and hand-checked cases.
#include "support.hpp"

using namespace sapo_test;

namespace {

struct SegmentRun {
  Buf<int32_t> step;
  Buf<int32_t> n_steps;
  Buf<int64_t> codes;
  Buf<uint8_t> malformed;
  sapo::segment_stats stats;
};

template <class Id>
SegmentRun run_segment(const TokenBatch& b, const sapo::segment_options& opt, Layout layout) {
  const int64_t B = static_cast<int64_t>(b.tokens.size());
  const int64_t T = B ? static_cast<int64_t>(b.tokens[0].size()) : 0;
  Buf<Id> tokens = from_ref_int<Id>(b.tokens, T, layout);
  Buf<float> mask = from_ref_int<float>(b.mask, T, layout);
  SegmentRun r{Buf<int32_t>(B, T, layout, 77), Buf<int32_t>(B, 1, layout, 77), Buf<int64_t>(B, opt.num_steps, layout, 77),
               Buf<uint8_t>(B, 1, layout, 77), {}};
  r.stats = sapo::segment_steps(tokens.cview(), mask.cview(), opt,
                                {r.step.view(), r.n_steps.vec(), r.codes.view(), r.malformed.vec()});
  return r;
}

void require_matches_reference(const TokenBatch& b, const sapo::segment_options& opt, const SegmentRun& r,
                               const Vocab& v) {
  const sapo_ref::SegmentResult want = sapo_ref::segment(b.tokens, b.mask, v.ref_config(opt));
  int64_t n_malformed = 0;
  for (size_t i = 0; i < b.tokens.size(); ++i) {
    INFO("response " << i);
    for (size_t t = 0; t < b.tokens[i].size(); ++t) {
      INFO("token " << t);
      REQUIRE(r.step.at(int64_t(i), int64_t(t)) == want.step[i][t]);
    }
    REQUIRE(r.n_steps.at(int64_t(i), 0) == want.n_steps[i]);
    REQUIRE(static_cast<bool>(r.malformed.at(int64_t(i), 0)) == want.malformed[i]);
    for (int64_t k = 0; k < opt.num_steps; ++k) REQUIRE(r.codes.at(int64_t(i), k) == want.codes[i][size_t(k)]);
    n_malformed += want.malformed[i] ? 1 : 0;
  }
  REQUIRE(r.stats.n_malformed == n_malformed);
}

}  // namespace

TEMPLATE_TEST_CASE("segment_steps matches the reference on random batches", "[segment]", int32_t, int64_t) {
  const bool think_then_sid = GENERATE(false, true);
  const bool per_level = GENERATE(false, true);
  const int64_t B = GENERATE(1, 3, 19, 64);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided, Layout::column_major);
  const int64_t K = GENERATE(1, 3, 4);
  CAPTURE(think_then_sid, per_level, B, name(layout), K);
  std::mt19937_64 rng(1234 + static_cast<uint64_t>(B * 7 + K));
  Vocab v;
  v.K = K;
  const int64_t T = 8 * K + 9;
  const TokenBatch batch = random_tokens(rng, v, B, T, think_then_sid, per_level, 0.4);
  sapo::segment_options opt = v.options(think_then_sid, per_level);
  SECTION("defaults") {}
  SECTION("tail joins the last step") { opt.tail = sapo::tail_policy::last_step; }
  SECTION("catalogue of 7 codes per level") { opt.codes_per_level.assign(size_t(K), 7); }
  SECTION("SID tokens outside the steps (prototype)") { opt.sid_token_in_step = false; }
  require_matches_reference(batch, opt, run_segment<TestType>(batch, opt, layout), v);
}

TEMPLATE_TEST_CASE("segment_steps on long rows: the block-wise walk of contiguous rows", "[segment]", int32_t,
                   int64_t) {
  // Contiguous rows go 64 tokens at a time, with a fast path for blocks without a SID
  // candidate: long thinking blocks (0 to 150 tokens) so that steps span blocks, SID tokens
  // on block edges, stray SID tokens (extra or wrong level), masked-out SID ids in the
  // prompt and the padding, rows around and across the block size.
  const int64_t T = GENERATE(63, 64, 65, 129, 1000);
  const bool per_level = GENERATE(false, true);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided);
  CAPTURE(T, per_level, name(layout));
  std::mt19937_64 rng(99 + static_cast<uint64_t>(T) + (per_level ? 7 : 0));
  Vocab v;
  v.K = 4;
  std::uniform_int_distribution<int64_t> thought(0, 49), code(0, 9), think_len(0, 150), level(0, 3);
  std::uniform_real_distribution<double> u(0, 1);
  auto sid = [&](int64_t k) { return per_level ? v.lo(k) + code(rng) : Vocab::sid_base + code(rng); };
  TokenBatch b;
  for (int i = 0; i < 12; ++i) {
    std::vector<int64_t> ids(static_cast<size_t>(T)), m(static_cast<size_t>(T), 0);
    for (auto& id : ids) id = u(rng) < 0.05 ? sid(level(rng)) : thought(rng);  // masked-out ids, SIDs too
    int64_t t = std::uniform_int_distribution<int64_t>(0, 70)(rng);           // prompt
    const int64_t steps = std::uniform_int_distribution<int64_t>(v.K - 1, v.K + 1)(rng);
    for (int64_t k = 0; k < steps && t < T; ++k) {
      for (int64_t j = i % 3 == 0 ? 64 - t % 64 - 1 : think_len(rng); j > 0 && t < T; --j, ++t) {
        ids[size_t(t)] = thought(rng);
        m[size_t(t)] = 1;
      }
      if (t < T) {
        ids[size_t(t)] = sid(u(rng) < 0.1 ? level(rng) : std::min<int64_t>(k, v.K - 1));
        m[size_t(t++)] = 1;
      }
    }
    for (int64_t j = think_len(rng) / 10; j > 0 && t < T; --j, ++t) m[size_t(t)] = 1;  // a tail
    b.tokens.push_back(ids);
    b.mask.push_back(m);
  }
  const sapo::segment_options opt = v.options(false, per_level);
  require_matches_reference(b, opt, run_segment<TestType>(b, opt, layout), v);
}

TEST_CASE("segment_steps with SID ranges beyond the int32 ids", "[segment]") {
  // The block test compares int32 ids against bounds clamped to int32: a range that starts
  // just below INT32_MAX and ends far above it, and one entirely above it.
  const int64_t top = std::numeric_limits<int32_t>::max();
  sapo::segment_options opt;
  opt.num_steps = 1;
  opt.sid_ranges = {{top - 4, top + 1000}};
  TokenBatch b{{{1, top - 1, 5, top}}, {{1, 1, 1, 1}}};
  SegmentRun r = run_segment<int32_t>(b, opt, Layout::contiguous);
  const int32_t want[] = {0, 0, -1, -1};
  for (int64_t t = 0; t < 4; ++t) REQUIRE(r.step.at(0, t) == want[t]);
  REQUIRE(r.codes.at(0, 0) == 3);
  REQUIRE(r.malformed.at(0, 0) == 1);  // top is a SID token too: an extra boundary

  opt.sid_ranges = {{top + 1, top + 1000}};
  TokenBatch c{{{1, top - 1, top}}, {{1, 1, 1}}};
  r = run_segment<int32_t>(c, opt, Layout::contiguous);
  for (int64_t t = 0; t < 3; ++t) REQUIRE(r.step.at(0, t) == 0);
  REQUIRE(r.n_steps.at(0, 0) == 0);
  REQUIRE(r.malformed.at(0, 0) == 1);  // no SID token: unfinished
}

TEST_CASE("segment_steps on hand-written responses", "[segment]") {
  // ids: thoughts < 50, think_end 50, eos 51, SID level k in [100 + 10k, 110 + 10k).
  Vocab v;
  v.K = 3;
  auto one = [&](std::vector<int64_t> ids, std::vector<int64_t> mask, sapo::segment_options opt) {
    TokenBatch b{{ids}, {mask}};
    return run_segment<int64_t>(b, opt, Layout::contiguous);
  };
  SECTION("interleaved, well formed, eos in the tail") {
    auto r = one({9, 1, 2, 103, 4, 111, 5, 6, 129, 51, 0}, {0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0},
                 v.options(false, true));
    const int32_t want[] = {-1, 0, 0, 0, 1, 1, 2, 2, 2, -1, -1};
    for (int64_t t = 0; t < 11; ++t) REQUIRE(r.step.at(0, t) == want[t]);
    REQUIRE(r.n_steps.at(0, 0) == 3);
    REQUIRE(r.malformed.at(0, 0) == 0);
    REQUIRE(r.codes.at(0, 0) == 3);
    REQUIRE(r.codes.at(0, 1) == 1);
    REQUIRE(r.codes.at(0, 2) == 9);
  }
  SECTION("interleaved, tail joins the last step") {
    auto opt = v.options(false, true);
    opt.tail = sapo::tail_policy::last_step;
    auto r = one({103, 111, 129, 51}, {1, 1, 1, 1}, opt);
    REQUIRE(r.step.at(0, 3) == 2);
  }
  SECTION("interleaved, unfinished: the open step's tokens carry its id") {
    auto r = one({1, 103, 2, 3, 4}, {1, 1, 1, 1, 1}, v.options(false, true));
    const int32_t want[] = {0, 0, 1, 1, 1};
    for (int64_t t = 0; t < 5; ++t) REQUIRE(r.step.at(0, t) == want[t]);
    REQUIRE(r.n_steps.at(0, 0) == 1);
    REQUIRE(r.malformed.at(0, 0) == 1);
    REQUIRE(r.codes.at(0, 1) == -1);
  }
  SECTION("interleaved, SID token at the wrong level") {
    auto r = one({103, 123, 111}, {1, 1, 1}, v.options(false, true));
    REQUIRE(r.malformed.at(0, 0) == 1);
    REQUIRE(r.n_steps.at(0, 0) == 3);
  }
  SECTION("interleaved, a fourth SID token is an extra boundary") {
    auto r = one({103, 111, 129, 105}, {1, 1, 1, 1}, v.options(false, true));
    REQUIRE(r.malformed.at(0, 0) == 1);
    REQUIRE(r.step.at(0, 3) == -1);
  }
  SECTION("think_then_sid, well formed, SID tokens in their steps") {
    auto r = one({1, 50, 2, 3, 50, 50, 103, 111, 129, 51}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, v.options(true, true));
    const int32_t want[] = {0, 0, 1, 1, 1, 2, 0, 1, 2, -1};
    for (int64_t t = 0; t < 10; ++t) REQUIRE(r.step.at(0, t) == want[t]);
    REQUIRE(r.malformed.at(0, 0) == 0);
    REQUIRE(r.codes.at(0, 2) == 9);
  }
  SECTION("think_then_sid, prototype: SID tokens get no step") {
    auto opt = v.options(true, true);
    opt.sid_token_in_step = false;
    auto r = one({50, 50, 50, 103, 111, 129}, {1, 1, 1, 1, 1, 1}, opt);
    for (int64_t t = 3; t < 6; ++t) REQUIRE(r.step.at(0, t) == -1);
    REQUIRE(r.malformed.at(0, 0) == 0);
  }
  SECTION("think_then_sid, too few SID tokens") {
    auto r = one({50, 50, 50, 103, 111}, {1, 1, 1, 1, 1}, v.options(true, true));
    REQUIRE(r.malformed.at(0, 0) == 1);
    REQUIRE(r.n_steps.at(0, 0) == 3);
  }
  SECTION("a code outside the catalogue") {
    auto opt = v.options(false, true);
    opt.codes_per_level = {8, 8, 8};
    auto r = one({103, 111, 128}, {1, 1, 1}, opt);  // code 8 at level 2
    REQUIRE(r.malformed.at(0, 0) == 1);
  }
  SECTION("masked tokens are never read") {
    auto r = one({103, 111, 129, 103}, {1, 1, 1, 0}, v.options(false, true));
    REQUIRE(r.malformed.at(0, 0) == 0);
    REQUIRE(r.step.at(0, 3) == -1);
  }
}
