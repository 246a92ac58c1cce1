// step_advantage_pipeline against the four calls it stands for (bit for bit), and its
// errors: every rejected argument leaves every output untouched.
#include <functional>
#include <string>

#include "support.hpp"

namespace {

using namespace sapo_test;

template <class R>
struct PipelineBuffers {
  Buf<int32_t> step;
  Buf<int32_t> n_steps;
  Buf<int64_t> codes;
  Buf<uint8_t> malformed;
  Buf<R> rewards, adv, token_adv;
  PipelineBuffers(int64_t B, int64_t T, int64_t K, Layout layout)
      : step(B, T, layout, 77),
        n_steps(B, 1, layout, 77),
        codes(B, K, layout, 77),
        malformed(B, 1, layout, 77),
        rewards(B, K, layout, R(77)),
        adv(B, K, layout, R(77)),
        token_adv(B, T, layout, R(77)) {}
  sapo::segment_outputs segment() {
    return {step.view(), n_steps.vec(), codes.view(), malformed.vec()};
  }
  sapo::pipeline_outputs<R> all(bool broadcast) {
    return {segment(), rewards.view(), adv.view(), broadcast ? token_adv.view() : sapo::mat_view<R>()};
  }
  bool untouched() const {
    auto all77 = [](const auto& b) {
      for (auto v : b.store)
        if (v != 77) return false;
      return true;
    };
    return all77(step) && all77(n_steps) && all77(codes) && all77(malformed) && all77(rewards) && all77(adv) &&
           all77(token_adv);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("step_advantage_pipeline writes what the four calls write, bit for bit", "[pipeline]", float,
                   double) {
  const bool think_then_sid = GENERATE(false, true);
  const Layout layout = GENERATE(Layout::contiguous, Layout::strided, Layout::column_major);
  const int threads = GENERATE(1, 3);
  const auto kind = GENERATE(sapo::reward_kind::prefix, sapo::reward_kind::per_level);
  CAPTURE(think_then_sid, name(layout), threads, static_cast<int>(kind));
  Vocab v;
  v.K = 3;
  const int64_t B = 24, T = 40, G = 4;
  std::mt19937_64 rng(31);
  const TokenBatch batch = random_tokens(rng, v, B, T, think_then_sid, true, 0.3);
  const Buf<int64_t> tokens = from_ref_int<int64_t>(batch.tokens, T, layout);
  const Buf<int32_t> mask = from_ref_int<int32_t>(batch.mask, T, layout);
  sapo_ref::IntMatrix target_codes(size_t(B), std::vector<int64_t>(size_t(v.K)));
  std::uniform_int_distribution<int64_t> code(0, 9);
  for (int64_t g = 0; g < B / G; ++g)
    for (int64_t k = 0; k < v.K; ++k) {
      const int64_t y = code(rng);
      for (int64_t j = 0; j < G; ++j) target_codes[size_t(g * G + j)][size_t(k)] = y;
    }
  const Buf<int64_t> targets = from_ref_int<int64_t>(target_codes, v.K, layout);

  sapo::pipeline_options opt;
  opt.segment = v.options(think_then_sid, true);
  opt.segment.num_threads = threads;
  opt.reward.kind = kind;
  const auto groups = sapo::group_layout::contiguous(G);

  PipelineBuffers<TestType> one(B, T, v.K, layout), four(B, T, v.K, layout);
  const sapo::pipeline_result r =
      sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), groups, opt, one.all(true));

  const sapo::segment_stats s4 = sapo::segment_steps(tokens.cview(), mask.cview(), opt.segment, four.segment());
  sapo::step_rewards(four.codes.cview(), four.malformed.cvec(), targets.cview(), opt.reward, four.rewards.view());
  const sapo::advantage_stats a4 =
      sapo::group_advantages(four.rewards.cview(), groups, opt.advantage, four.adv.view());
  sapo::broadcast_step_advantages(four.adv.cview(), four.step.cview(), mask.cview(), four.token_adv.view(), threads);

  CHECK(r.segment.n_malformed == s4.n_malformed);
  CHECK(r.segment.n_malformed > 0);  // the batch has defects: the malformed path is taken
  CHECK(r.advantage.mean_reward == a4.mean_reward);
  CHECK(r.advantage.advantage_std == a4.advantage_std);
  CHECK(r.advantage.n_zero_variance == a4.n_zero_variance);
  // Every element of every output, the padding between strided elements included.
  CHECK(one.step.store == four.step.store);
  CHECK(one.n_steps.store == four.n_steps.store);
  CHECK(one.codes.store == four.codes.store);
  CHECK(one.malformed.store == four.malformed.store);
  CHECK(one.rewards.store == four.rewards.store);
  CHECK(one.adv.store == four.adv.store);
  CHECK(one.token_adv.store == four.token_adv.store);
  bool some_nonzero = false;
  for (auto x : one.token_adv.store) some_nonzero = some_nonzero || (x != 0 && x != 77);
  CHECK(some_nonzero);

  // Without token advantages: the same outputs, token_adv left alone.
  PipelineBuffers<TestType> no_bcast(B, T, v.K, layout);
  sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), groups, opt, no_bcast.all(false));
  CHECK(no_bcast.adv.store == four.adv.store);
  CHECK(no_bcast.step.store == four.step.store);
  for (auto x : no_bcast.token_adv.store) REQUIRE(x == 77);
}

TEST_CASE("step_advantage_pipeline: a rejected argument leaves every output untouched", "[pipeline][errors]") {
  Vocab v;
  v.K = 3;
  const int64_t B = 8, T = 20;
  std::mt19937_64 rng(5);
  const TokenBatch batch = random_tokens(rng, v, B, T, false, true, 0.2);
  const Buf<int64_t> tokens = from_ref_int<int64_t>(batch.tokens, T, Layout::contiguous);
  Buf<float> mask = from_ref_int<float>(batch.mask, T, Layout::contiguous);
  const Buf<int64_t> targets(B, v.K, Layout::contiguous, 1);
  const Buf<int64_t> targets_short(B, v.K - 1, Layout::contiguous, 1);
  auto good = [&] {
    sapo::pipeline_options o;
    o.segment = v.options(false, true);
    return o;
  };
  struct Case {
    const char* what;    // the argument the message must name
    const char* actual;  // and (part of) the actual value it must report
    std::function<void(PipelineBuffers<float>&)> call;
  };
  const auto g4 = sapo::group_layout::contiguous(4);
  const std::vector<Case> cases = {
      {"options.segment.num_steps (K)", "0",
       [&](PipelineBuffers<float>& b) {
         auto o = good();
         o.segment.num_steps = 0;
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, o, b.all(true));
       }},
      {"targets", "(8, 2)",
       [&](PipelineBuffers<float>& b) {
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets_short.cview(), g4, good(), b.all(true));
       }},
      {"out.rewards", "(8, 2)",
       [&](PipelineBuffers<float>& b) {
         auto out = b.all(true);
         out.rewards.cols = 2;
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, good(), out);
       }},
      {"out.advantages", "0",
       [&](PipelineBuffers<float>& b) {
         auto out = b.all(true);
         out.advantages.row_stride = 0;
         out.advantages.col_stride = 0;
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, good(), out);
       }},
      {"out.token_advantages", "(7, 20)",
       [&](PipelineBuffers<float>& b) {
         auto out = b.all(true);
         out.token_advantages.rows = B - 1;
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, good(), out);
       }},
      {"options.level_weights", "0 weights",
       [&](PipelineBuffers<float>& b) {
         auto o = good();
         o.reward.kind = sapo::reward_kind::weighted_prefix;  // and no weights
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, o, b.all(true));
       }},
      {"options.eps", "0",
       [&](PipelineBuffers<float>& b) {
         auto o = good();
         o.advantage.eps = 0;
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, o, b.all(true));
       }},
      {"groups.group_size", "3",
       [&](PipelineBuffers<float>& b) {
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), sapo::group_layout::contiguous(3),
                                       good(), b.all(true));
       }},
      {"options.sid_ranges", "2",
       [&](PipelineBuffers<float>& b) {
         auto o = good();
         o.segment.sid_ranges.pop_back();
         sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, o, b.all(true));
       }},
      {"mask", "0.5",
       [&](PipelineBuffers<float>& b) {
         Buf<float> bad = mask;
         bad.at(B - 1, T - 1) = 0.5f;  // the last value: found before anything is written
         sapo::step_advantage_pipeline(tokens.cview(), bad.cview(), targets.cview(), g4, good(), b.all(true));
       }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    PipelineBuffers<float> b(B, T, v.K, Layout::contiguous);
    require_rejected([&] { c.call(b); }, c.what, c.actual);
    CHECK(b.untouched());
  }
  // And the good call goes through (the cases above differ from it in one argument each).
  PipelineBuffers<float> b(B, T, v.K, Layout::contiguous);
  sapo::step_advantage_pipeline(tokens.cview(), mask.cview(), targets.cview(), g4, good(), b.all(true));
  CHECK_FALSE(b.untouched());
}
