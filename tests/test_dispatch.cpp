// Runtime instruction-set dispatch (include/sapo/dispatch.hpp, src/): the choice of
// instruction set, its errors, and every instruction set this CPU runs against the double
// reference and against each other -- at the step counts where the table lookups change
// from a one-register permute to a gather (8 slots on AVX2, 16 on AVX-512).
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include <sapo/dispatch.hpp>

#include "loss_problem.hpp"

using namespace sapo_test;
using sapo::dispatch::isa;

namespace {

/// The CPU's feature flags as /proc/cpuinfo lists them (independent of the code under test).
std::set<std::string> cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      std::set<std::string> flags;
      for (std::string w; words >> w;) flags.insert(w);
      return flags;
    }
  return {};
}

/// The instruction sets this CPU runs, from /proc/cpuinfo.
std::vector<isa> runnable() {
  std::vector<isa> out;
  for (isa i : {isa::sse2, isa::avx2, isa::avx512})
    if (sapo::dispatch::isa_supported(i)) out.push_back(i);
  return out;
}

/// Restores the active instruction set when a test that switches it ends.
struct isa_guard {
  isa saved = sapo::dispatch::active_isa();
  ~isa_guard() { sapo::dispatch::set_isa(saved); }
};

}  // namespace

#if defined(__x86_64__)
TEST_CASE("dispatch picks the best instruction set the CPU runs, or the one SAPO_ISA names", "[dispatch]") {
  const std::set<std::string> f = cpu_flags();
  REQUIRE(!f.empty());
  auto has = [&](const char* x) { return f.count(x) > 0; };
  const bool avx2 = has("avx2") && has("fma");
  const bool avx512 =
      avx2 && has("avx512f") && has("avx512bw") && has("avx512dq") && has("avx512vl") && has("avx512cd");
  const isa expected = avx512 ? isa::avx512 : avx2 ? isa::avx2 : isa::sse2;
  CAPTURE(sapo::dispatch::isa_name(expected));
  CHECK(sapo::dispatch::best_isa() == expected);
  CHECK(sapo::dispatch::isa_supported(isa::sse2));
  CHECK(sapo::dispatch::isa_supported(isa::avx2) == avx2);
  CHECK(sapo::dispatch::isa_supported(isa::avx512) == avx512);
  const char* env = std::getenv("SAPO_ISA");
  if (env && *env)
    CHECK(std::string(sapo::dispatch::isa_name(sapo::dispatch::active_isa())) == env);
  else
    CHECK(sapo::dispatch::active_isa() == expected);
}
#endif

TEST_CASE("dispatch: a bad instruction set is a clear error", "[dispatch][errors]") {
  require_rejected([] { sapo::dispatch::parse_isa("avx1024", "SAPO_ISA"); }, "SAPO_ISA", "\"avx1024\"");
  require_rejected([] { sapo::dispatch::parse_isa("", "SAPO_ISA"); }, "SAPO_ISA", "\"\"");
  for (isa i : {isa::sse2, isa::avx2, isa::avx512})
    if (!sapo::dispatch::isa_supported(i)) {
      const isa_guard guard;
      require_rejected([&] { sapo::dispatch::set_isa(i); }, "isa", sapo::dispatch::isa_name(i));
      CHECK(sapo::dispatch::active_isa() == guard.saved);  // unchanged
    }
}

TEST_CASE("every instruction set matches the reference and the others, across lookup boundaries", "[dispatch][loss]") {
  const int64_t K = GENERATE(3, 7, 8, 9, 15, 16, 17);
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step);
  const bool by_step = GENERATE(false, true);
  const bool with_ref = GENERATE(false, true);
  CAPTURE(K, static_cast<int>(ratio), by_step, with_ref);
  std::mt19937_64 rng(static_cast<uint64_t>(77 + K));
  const int64_t B = 24, T = 5 * K + 40;
  const LossProblem problem = random_problem(rng, B, T, 0.4, K);
  sapo::loss_options opt;
  opt.ratio = ratio;
  opt.agg = ratio == sapo::ratio_level::step ? sapo::aggregation::step_mean : sapo::aggregation::token_mean;
  if (with_ref) opt.kl_coef = 0.1;
  const isa_guard guard;
  LossBuffers<float> base(problem, Layout::contiguous);
  const sapo_ref::LossResult want = reference_loss(base.rounded(problem), opt, with_ref);
  std::vector<std::pair<isa, sapo::loss_result>> results;
  std::vector<sapo_ref::Matrix> grads;
  for (isa i : runnable()) {
    CAPTURE(sapo::dispatch::isa_name(i));
    sapo::dispatch::set_isa(i);
    for (int threads : {1, 2}) {
      LossBuffers<float> buf(problem, Layout::contiguous);
      opt.num_threads = threads;
      const sapo::loss_result r = sapo::policy_loss(buf.inputs(with_ref, by_step), opt, buf.grad.view());
      require_close(r.loss, want.loss, 2e-6, 2e-6);
      require_close(to_ref(buf.grad), rounded_to(want.grad, true), 2e-6, 1e-9);
      REQUIRE(r.n_tokens == want.n_tokens);
      REQUIRE(r.n_steps == want.n_steps);
      if (threads == 1) {
        results.emplace_back(i, r);
        grads.push_back(to_ref(buf.grad));
      } else {
        // Bit-identical across thread counts within one instruction set.
        REQUIRE(r.loss == results.back().second.loss);
        REQUIRE(r.ratio_mean == results.back().second.ratio_mean);
        REQUIRE(to_ref(buf.grad) == grads.back());
      }
    }
  }
  // Across instruction sets: the per-token values are float (to a few ulps each), every sum
  // in double, so they agree to float rounding of the per-token terms (docs/math.md §7).
  for (size_t a = 1; a < results.size(); ++a) {
    CAPTURE(sapo::dispatch::isa_name(results[a].first));
    require_close(results[a].second.loss, results[0].second.loss, 1e-6, 1e-7);
    require_close(results[a].second.kl_ref, results[0].second.kl_ref, 1e-6, 1e-7);
    require_close(grads[a], grads[0], 1e-6, 1e-9);
  }
}

TEST_CASE("the pipeline's token broadcast on every instruction set, across lookup boundaries", "[dispatch][pipeline]") {
  const int64_t K = GENERATE(3, 7, 8, 9, 15, 16, 17, 40);
  CAPTURE(K);
  Vocab v;
  v.K = K;
  std::mt19937_64 rng(static_cast<uint64_t>(5 + K));
  const int64_t B = 16, G = 4, T = 5 * K + 37;
  const TokenBatch batch = random_tokens(rng, v, B, T, false, true, 0.3);
  const Buf<int64_t> tokens = from_ref_int<int64_t>(batch.tokens, T, Layout::contiguous);
  const Buf<uint8_t> mask = from_ref_int<uint8_t>(batch.mask, T, Layout::contiguous);
  sapo_ref::IntMatrix target_codes(static_cast<size_t>(B), std::vector<int64_t>(static_cast<size_t>(K)));
  std::uniform_int_distribution<int64_t> code(0, 9);
  for (auto& row : target_codes)
    for (auto& c : row) c = code(rng);
  const Buf<int64_t> targets = from_ref_int<int64_t>(target_codes, K, Layout::contiguous);
  sapo::pipeline_options opt;
  opt.segment = v.options(false, true);
  opt.reward.kind = sapo::reward_kind::per_level;  // prefix rewards of late levels would all be 0
  const auto seg_ref = sapo_ref::segment(batch.tokens, batch.mask, v.ref_config(opt.segment));
  const isa_guard guard;
  for (isa i : runnable()) {
    CAPTURE(sapo::dispatch::isa_name(i));
    sapo::dispatch::set_isa(i);
    Buf<int32_t> step(B, T, Layout::contiguous, 77), n_steps(B, 1, Layout::contiguous);
    Buf<int64_t> codes(B, K, Layout::contiguous);
    Buf<uint8_t> malformed(B, 1, Layout::contiguous);
    Buf<float> rewards(B, K, Layout::contiguous), adv(B, K, Layout::contiguous), token_adv(B, T, Layout::contiguous);
    sapo::step_advantage_pipeline(
        tokens.cview(), mask.cview(), targets.cview(), sapo::group_layout::contiguous(G), opt,
        sapo::pipeline_outputs<float>{{step.view(), n_steps.vec(), codes.view(), malformed.vec()},
                                      rewards.view(),
                                      adv.view(),
                                      token_adv.view()});
    // Segmentation is exact: the same step ids as the reference; the broadcast is a lookup:
    // exactly A[i, step] (0 off steps).
    bool some = false;
    for (int64_t r = 0; r < B; ++r)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = seg_ref.step[size_t(r)][size_t(t)];
        REQUIRE(step.view()(r, t) == s);
        const float want = s >= 0 ? adv.view()(r, s) : 0.0f;
        REQUIRE(token_adv.view()(r, t) == want);
        some = some || (s >= 8 && want != 0);
      }
    if (K > 9) CHECK(some);  // the large-table slots are read
  }
}
