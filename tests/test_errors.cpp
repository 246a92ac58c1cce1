// SPEC §7: every bad input gets a sapo::error that names the argument, the expected and
// the actual value, and nothing is written to any output.
#include "loss_problem.hpp"

using namespace sapo_test;

namespace {

template <class T>
void require_untouched(const Buf<T>& b, T sentinel) {
  for (const T& x : b.store) REQUIRE(x == sentinel);
}

// ---- a small valid loss problem whose outputs stay at the sentinel 99 ----
struct LossCase {
  LossProblem p;
  LossBuffers<double> buf;
  sapo::loss_options opt;
  explicit LossCase(uint64_t seed = 1) : p(make(seed)), buf(p, Layout::contiguous) {}
  static LossProblem make(uint64_t seed) {
    std::mt19937_64 rng(seed);
    return random_problem(rng, 4, 9);
  }
  sapo::loss_result run(const sapo::policy_inputs<double>& in) { return sapo::policy_loss(in, opt, buf.grad.view()); }
  sapo::policy_inputs<double> inputs() const { return buf.inputs(true, true); }
  void require_untouched_grad() const { require_untouched(buf.grad, 99.0); }
};

}  // namespace

TEST_CASE("error: loss input shape mismatch", "[errors]") {
  LossCase c;
  auto in = c.inputs();
  in.old_logp.cols -= 1;
  require_rejected([&] { c.run(in); }, "old_logp", "(4, 8)");
  c.require_untouched_grad();
}

TEST_CASE("error: output with a zero stride", "[errors]") {
  LossCase c;
  sapo::mat_view<double> aliased(c.buf.grad.store.data(), 4, 9, 0, 1);
  require_rejected([&] { sapo::policy_loss(c.inputs(), c.opt, aliased); }, "grad", "0");
  c.require_untouched_grad();
}

TEST_CASE("error: step advantages with a wrong number of rows", "[errors]") {
  LossCase c;
  auto in = c.inputs();
  in.step_advantages.rows = 3;
  require_rejected([&] { c.run(in); }, "step_advantages", "(3, 3)");
  c.require_untouched_grad();
}

TEST_CASE("error: group size that does not divide B", "[errors]") {
  Buf<double> r(10, 2, Layout::contiguous, 0.5), A(10, 2, Layout::contiguous, 99);
  require_rejected(
      [&] { sapo::group_advantages(r.cview(), sapo::group_layout::contiguous(4), {}, A.view()); },
      "groups.group_size", "4");
  require_untouched(A, 99.0);
}

TEST_CASE("error: unknown group id", "[errors]") {
  Buf<double> r(4, 2, Layout::contiguous, 0.5), A(4, 2, Layout::contiguous, 99);
  const int64_t ids[] = {0, 1, 2, 1};
  require_rejected(
      [&] { sapo::group_advantages(r.cview(), sapo::group_layout::explicit_ids({ids, 4}, 2), {}, A.view()); },
      "groups.group_ids", "2 at response 2");
  require_untouched(A, 99.0);
}

TEST_CASE("error: K out of range", "[errors]") {
  const int64_t K = GENERATE(0, 65);
  Buf<int64_t> tokens(2, 5, Layout::contiguous, 1);
  Buf<uint8_t> mask(2, 5, Layout::contiguous, 1);
  Buf<int32_t> step(2, 5, Layout::contiguous, 99), n(2, 1, Layout::contiguous, 99);
  Buf<int64_t> codes(2, std::max<int64_t>(K, 1), Layout::contiguous, 99);
  Buf<uint8_t> bad(2, 1, Layout::contiguous, 99);
  sapo::segment_options o;
  o.num_steps = K;
  o.sid_ranges = {{100, 110}};
  require_rejected(
      [&] {
        sapo::segment_steps(tokens.cview(), mask.cview(), o, {step.view(), n.vec(), codes.view(), bad.vec()});
      },
      "options.num_steps", std::to_string(K));
  require_untouched(step, int32_t(99));
  require_untouched(codes, int64_t(99));
  // The same for the (B, K) reward arrays.
  Buf<double> r(2, 65, Layout::contiguous, 0.5), A(2, 65, Layout::contiguous, 99);
  require_rejected([&] { sapo::group_advantages(r.cview(), sapo::group_layout::contiguous(2), {}, A.view()); },
                   "rewards.cols (K)", "65");
  require_untouched(A, 99.0);
}

TEST_CASE("error: epsilon <= 0", "[errors]") {
  const double eps = GENERATE(0.0, -1e-6);
  Buf<double> r(4, 1, Layout::contiguous, 0.5), A(4, 1, Layout::contiguous, 99);
  sapo::advantage_options o;
  o.eps = eps;
  require_rejected([&] { sapo::group_advantages(r.cview(), sapo::group_layout::contiguous(2), o, A.view()); },
                   "options.eps", eps == 0 ? "0" : "-1e-06");
  require_untouched(A, 99.0);
}

TEST_CASE("error: clip bounds outside (0, 1) and (0, inf)", "[errors]") {
  LossCase c;
  SECTION("clip_low = 0") {
    c.opt.clip_low = 0;
    require_rejected([&] { c.run(c.inputs()); }, "options.clip_low", "0");
  }
  SECTION("clip_low = 1") {
    c.opt.clip_low = 1;
    require_rejected([&] { c.run(c.inputs()); }, "options.clip_low", "1");
  }
  SECTION("clip_high = -0.1") {
    c.opt.clip_high = -0.1;
    require_rejected([&] { c.run(c.inputs()); }, "options.clip_high", "-0.1");
  }
  SECTION("clip_high = inf") {
    c.opt.clip_high = INFINITY;
    require_rejected([&] { c.run(c.inputs()); }, "options.clip_high", "inf");
  }
  c.require_untouched_grad();
}

TEST_CASE("error: dual clip c <= 1", "[errors]") {
  LossCase c;
  c.opt.dual_clip = true;
  c.opt.dual_clip_c = 1.0;
  require_rejected([&] { c.run(c.inputs()); }, "options.dual_clip_c", "1");
  c.require_untouched_grad();
}

TEST_CASE("error: NaN or Inf in a loss input", "[errors]") {
  LossCase c;
  const int which = GENERATE(0, 1, 2, 3);
  const double bad = GENERATE(NAN, INFINITY);
  // Plant it on the last masked token, so a partial write before the check would show.
  int64_t bi = -1, bt = -1;
  for (int64_t i = 0; i < c.p.B; ++i)
    for (int64_t t = 0; t < c.p.T; ++t)
      if (c.p.mask[size_t(i)][size_t(t)] && c.p.step[size_t(i)][size_t(t)] >= 0) {
        bi = i;
        bt = t;
      }
  REQUIRE(bi >= 0);
  Buf<double>& target = which == 0 ? c.buf.logp : which == 1 ? c.buf.old_logp : which == 2 ? c.buf.ref_logp
                                                                                            : c.buf.step_adv;
  if (which == 3)
    target.at(bi, c.p.step[size_t(bi)][size_t(bt)]) = bad;
  else
    target.at(bi, bt) = bad;
  require_rejected([&] { c.run(c.inputs()); }, "logp / old_logp / ref_logp / advantages",
                   std::isnan(bad) ? "nan" : "inf");
  c.require_untouched_grad();
}

TEST_CASE("error: Inf in rewards (NaN means absent)", "[errors]") {
  Buf<double> r(4, 2, Layout::contiguous, 0.5), A(4, 2, Layout::contiguous, 99);
  r.at(3, 1) = -INFINITY;
  require_rejected([&] { sapo::group_advantages(r.cview(), sapo::group_layout::contiguous(2), {}, A.view()); },
                   "rewards", "-inf");
  require_untouched(A, 99.0);
}

TEST_CASE("error: mask values other than 0 and 1", "[errors]") {
  LossCase c;
  c.buf.mask.at(3, 8) = 0.5;
  require_rejected([&] { c.run(c.inputs()); }, "mask", "0.5");
  c.require_untouched_grad();
}

TEST_CASE("error: step ids out of range", "[errors]") {
  LossCase c;
  int64_t bi = -1, bt = -1;
  for (int64_t i = 0; i < c.p.B; ++i)
    for (int64_t t = 0; t < c.p.T; ++t)
      if (c.p.mask[size_t(i)][size_t(t)]) {
        bi = i;
        bt = t;
      }
  c.buf.step.at(bi, bt) = 3;  // K = 3
  require_rejected([&] { c.run(c.inputs()); }, "step", "3");
  c.require_untouched_grad();
}

TEST_CASE("error: missing or doubled inputs of the loss", "[errors]") {
  LossCase c;
  SECTION("kl_coef > 0 without ref_logp") {
    c.opt.kl_coef = 0.1;
    auto in = c.inputs();
    in.ref_logp = {};
    require_rejected([&] { c.run(in); }, "ref_logp", "none");
  }
  SECTION("both kinds of advantages") {
    auto in = c.inputs();
    in.token_advantages = c.buf.token_adv.cview();
    require_rejected([&] { c.run(in); }, "token_advantages / step_advantages", "both");
  }
  SECTION("step ratio without step ids") {
    c.opt.ratio = sapo::ratio_level::step;
    auto in = c.buf.inputs(false, false, false);
    require_rejected([&] { c.run(in); }, "step", "none");
  }
  c.require_untouched_grad();
}

TEST_CASE("error: bad segmentation options", "[errors]") {
  Buf<int64_t> tokens(2, 5, Layout::contiguous, 1);
  Buf<uint8_t> mask(2, 5, Layout::contiguous, 1);
  Buf<int32_t> step(2, 5, Layout::contiguous, 99), n(2, 1, Layout::contiguous, 99);
  Buf<int64_t> codes(2, 3, Layout::contiguous, 99);
  Buf<uint8_t> bad(2, 1, Layout::contiguous, 99);
  sapo::segment_options o;
  o.num_steps = 3;
  o.sid_ranges = {{100, 110}, {110, 120}};
  auto run = [&] {
    sapo::segment_steps(tokens.cview(), mask.cview(), o, {step.view(), n.vec(), codes.view(), bad.vec()});
  };
  SECTION("two ranges for three levels") { require_rejected(run, "options.sid_ranges", "2 ranges"); }
  SECTION("an empty range") {
    o.sid_ranges = {{100, 100}};
    require_rejected(run, "options.sid_ranges", "[100, 100)");
  }
  SECTION("think_then_sid without think_end") {
    o.sid_ranges = {{100, 130}};
    o.layout = sapo::step_layout::think_then_sid;
    require_rejected(run, "options.think_end_id", "-1");
  }
  SECTION("think_end inside a SID range") {
    o.sid_ranges = {{100, 130}};
    o.layout = sapo::step_layout::think_then_sid;
    o.think_end_id = 105;
    require_rejected(run, "options.think_end_id", "105");
  }
  SECTION("catalogue of the wrong length") {
    o.sid_ranges = {{100, 130}};
    o.codes_per_level = {4, 4};
    require_rejected(run, "options.codes_per_level", "2 entries");
  }
  SECTION("mask shape") {
    o.sid_ranges = {{100, 130}};
    Buf<uint8_t> short_mask(2, 4, Layout::contiguous, 1);
    require_rejected(
        [&] {
          sapo::segment_steps(tokens.cview(), short_mask.cview(), o, {step.view(), n.vec(), codes.view(), bad.vec()});
        },
        "mask", "(2, 4)");
  }
  require_untouched(step, int32_t(99));
  require_untouched(codes, int64_t(99));
  require_untouched(bad, uint8_t(99));
}

TEST_CASE("error: weighted_prefix weights and reward shapes", "[errors]") {
  Buf<int64_t> codes(3, 3, Layout::contiguous, 1), targets(3, 3, Layout::contiguous, 1);
  Buf<uint8_t> malformed(3, 1, Layout::contiguous, 0);
  Buf<double> r(3, 3, Layout::contiguous, 99);
  sapo::reward_options o;
  o.kind = sapo::reward_kind::weighted_prefix;
  o.level_weights = {0.5, 1.0};
  require_rejected([&] { sapo::step_rewards(codes.cview(), malformed.cvec(), targets.cview(), o, r.view()); },
                   "options.level_weights", "2 weights");
  o.level_weights = {0.25, 0.5, 1.0};
  Buf<int64_t> short_targets(3, 2, Layout::contiguous, 1);
  require_rejected(
      [&] { sapo::step_rewards(codes.cview(), malformed.cvec(), short_targets.cview(), o, r.view()); }, "targets",
      "(3, 2)");
  require_untouched(r, 99.0);
}

TEST_CASE("error: enumeration values outside the documented ones", "[errors]") {
  LossCase c;
  SECTION("aggregation") {
    c.opt.agg = static_cast<sapo::aggregation>(9);
    require_rejected([&] { c.run(c.inputs()); }, "options.agg", "9");
  }
  SECTION("ratio level") {
    c.opt.ratio = static_cast<sapo::ratio_level>(-1);
    require_rejected([&] { c.run(c.inputs()); }, "options.ratio", "-1");
  }
  c.require_untouched_grad();
  Buf<double> r(4, 1, Layout::contiguous, 0.5), A(4, 1, Layout::contiguous, 99);
  sapo::advantage_options o;
  o.norm = static_cast<sapo::normalization>(5);
  require_rejected([&] { sapo::group_advantages(r.cview(), sapo::group_layout::contiguous(2), o, A.view()); },
                   "options.norm", "5");
  require_untouched(A, 99.0);
}

TEST_CASE("error: malformed flags other than 0 and 1", "[errors]") {
  Buf<int64_t> codes(3, 2, Layout::contiguous, 1), targets(3, 2, Layout::contiguous, 1);
  Buf<uint8_t> malformed(3, 1, Layout::contiguous, 0);
  malformed.at(2, 0) = 7;
  Buf<double> r(3, 2, Layout::contiguous, 99);
  require_rejected([&] { sapo::step_rewards(codes.cview(), malformed.cvec(), targets.cview(), {}, r.view()); },
                   "malformed", "7");
  require_untouched(r, 99.0);
}

TEST_CASE("error: mixed-mode shapes and weights", "[errors]") {
  Buf<double> out(4, 3, Layout::contiguous, 99), step_adv(4, 3, Layout::contiguous, 0.5);
  Buf<double> outcome(3, 1, Layout::contiguous, 0.5), outcome4(4, 1, Layout::contiguous, 0.5);
  require_rejected([&] { sapo::mix_advantages(outcome.cvec(), step_adv.cview(), {}, out.view()); }, "outcome_adv",
                   "(3)");
  require_rejected([&] { sapo::mix_advantages(outcome4.cvec(), step_adv.cview(), {NAN, 1.0}, out.view()); },
                   "weights.outcome", "nan");
  require_untouched(out, 99.0);
}

TEST_CASE("error: negative thread counts", "[errors]") {
  LossCase c;
  c.opt.num_threads = -2;
  require_rejected([&] { c.run(c.inputs()); }, "options.num_threads", "-2");
  c.require_untouched_grad();
  Buf<double> A(4, 3, Layout::contiguous, 0.5), out(4, 9, Layout::contiguous, 99);
  Buf<int32_t> step(4, 9, Layout::contiguous, 0);
  Buf<uint8_t> mask(4, 9, Layout::contiguous, 1);
  require_rejected(
      [&] { sapo::broadcast_step_advantages(A.cview(), step.cview(), mask.cview(), out.view(), -1); }, "num_threads",
      "-1");
  require_untouched(out, 99.0);
}
