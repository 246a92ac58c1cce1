// parallel.hpp and the determinism promise of SPEC §7: the loss, every diagnostic and the
// gradient are bit-identical for any thread count and any memory layout.
#include <fstream>
#include <string>
#include <thread>

#include "loss_problem.hpp"

using namespace sapo_test;

TEST_CASE("row chunks cover every row once, independently of threads", "[parallel]") {
  const int64_t B = GENERATE(1, 7, 300);
  const int64_t T = GENERATE(1, 100, 5000, 40000);
  const sapo::detail::row_chunks chunks(B, T);
  int64_t next = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    REQUIRE(chunks.begin(c) == next);
    REQUIRE(chunks.end(c) > chunks.begin(c));
    next = chunks.end(c);
  }
  REQUIRE(next == B);
}

TEST_CASE("parallel_for_chunks runs every chunk once and rethrows the lowest chunk's error", "[parallel]") {
  const int threads = GENERATE(1, 2, 5);
  std::vector<std::atomic<int>> hits(40);
  sapo::detail::parallel_for_chunks(40, threads, [&](int64_t c) { ++hits[size_t(c)]; }, 1);
  for (auto& h : hits) REQUIRE(h == 1);
  try {
    sapo::detail::parallel_for_chunks(
        40, threads,
        [&](int64_t c) {
          if (c == 13 || c == 31) throw std::runtime_error("chunk " + std::to_string(c));
        },
        1);
    FAIL("no exception");
  } catch (const std::runtime_error& e) {
    REQUIRE(std::string(e.what()) == "chunk 13");
  }
}

namespace {
/// The process's thread count, from /proc (independent of the code under test).
int process_threads() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  return -1;
}
}  // namespace

TEST_CASE("loss calls start no thread: the pool is made once and reused", "[parallel][pool]") {
  REQUIRE(sapo::get_executor() == nullptr);  // sapo's own pool in these test programs
  std::mt19937_64 rng(8);
  const LossProblem p = random_problem(rng, 200, 600, 0.3);  // 8 chunks: the pool runs them
  LossBuffers<float> buf(p, Layout::contiguous);
  sapo::loss_options opt;
  opt.num_threads = 2;
  const double first = sapo::policy_loss(buf.inputs(false, true), opt, buf.grad.view()).loss;
  const int threads_after_first = process_threads();
  REQUIRE(threads_after_first >= 1);
  for (int call = 0; call < 200; ++call) {
    const double again = sapo::policy_loss(buf.inputs(false, true), opt, buf.grad.view()).loss;
    REQUIRE(again == first);
  }
  CHECK(process_threads() == threads_after_first);
  CHECK(sapo::detail::thread_pool::instance().workers() ==
        std::max(0, static_cast<int>(std::thread::hardware_concurrency()) - 1));
}

TEST_CASE("a chunk that calls sapo again runs it on its own thread, with the same result", "[parallel][pool]") {
  std::mt19937_64 rng(9);
  const LossProblem p = random_problem(rng, 200, 600, 0.3);  // 8 chunks: it would use the pool
  LossBuffers<double> outer(p, Layout::contiguous);
  sapo::loss_options opt;
  opt.num_threads = 2;
  const double want = sapo::policy_loss(outer.inputs(true, true), opt, outer.grad.view()).loss;
  std::vector<double> got(8, 0.0);
  sapo::detail::parallel_for_chunks(
      8, 2,
      [&](int64_t c) {
        LossBuffers<double> inner(p, Layout::contiguous);
        got[size_t(c)] = sapo::policy_loss(inner.inputs(true, true), opt, inner.grad.view()).loss;
      },
      1);
  for (double g : got) REQUIRE(g == want);
}

TEST_CASE("an executor of the caller's runs the chunks, and the results do not change", "[parallel][pool]") {
  static std::atomic<int> calls{0};
  auto serial_executor = [](int64_t n, int, void* context, void (*task)(void*, int64_t)) {
    ++calls;
    for (int64_t c = n - 1; c >= 0; --c) task(context, c);  // any order
  };
  const sapo::executor_fn saved = sapo::get_executor();
  std::mt19937_64 rng(10);
  const LossProblem p = random_problem(rng, 200, 600, 0.3);
  LossBuffers<float> a(p, Layout::contiguous), b(p, Layout::contiguous);
  sapo::loss_options opt;
  opt.num_threads = 2;
  opt.ratio = sapo::ratio_level::step;
  const sapo::loss_result ra = sapo::policy_loss(a.inputs(true, true), opt, a.grad.view());
  sapo::set_executor(serial_executor);
  calls = 0;
  const sapo::loss_result rb = sapo::policy_loss(b.inputs(true, true), opt, b.grad.view());
  sapo::set_executor(saved);
  CHECK(calls == 2);  // scan and compute
  REQUIRE(ra.loss == rb.loss);
  REQUIRE(a.grad.store == b.grad.store);
}

TEMPLATE_TEST_CASE("policy_loss is bit-identical for 1, 2, 3 and 8 threads and any layout", "[parallel][loss]",
                   float, double) {
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence);
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                            sapo::aggregation::step_mean);
  CAPTURE(static_cast<int>(ratio), static_cast<int>(agg));
  std::mt19937_64 rng(555);
  // 150 rows of 600 tokens: several row chunks, so the threads really share the work.
  const LossProblem p = random_problem(rng, 150, 600, 0.3);
  sapo::loss_options opt;
  opt.ratio = ratio;
  opt.agg = agg;
  opt.kl_coef = 0.02;
  opt.dual_clip = true;
  LossBuffers<TestType> base(p, Layout::contiguous);
  opt.num_threads = 1;
  const sapo::loss_result r1 = sapo::policy_loss(base.inputs(true, true), opt, base.grad.view());
  for (int threads : {2, 3, 8}) {
    for (Layout layout : {Layout::contiguous, Layout::strided, Layout::column_major}) {
      CAPTURE(threads, name(layout));
      LossBuffers<TestType> buf(p, layout);
      opt.num_threads = threads;
      const sapo::loss_result r = sapo::policy_loss(buf.inputs(true, true), opt, buf.grad.view());
      REQUIRE(r.loss == r1.loss);
      REQUIRE(r.ratio_mean == r1.ratio_mean);
      REQUIRE(r.ratio_max == r1.ratio_max);
      REQUIRE(r.clip_frac_low == r1.clip_frac_low);
      REQUIRE(r.clip_frac_high == r1.clip_frac_high);
      REQUIRE(r.clip_frac_dual == r1.clip_frac_dual);
      REQUIRE(r.approx_kl_old == r1.approx_kl_old);
      REQUIRE(r.approx_kl_old_k3 == r1.approx_kl_old_k3);
      REQUIRE(r.kl_ref == r1.kl_ref);
      int64_t differing = 0;
      for (int64_t i = 0; i < p.B; ++i)
        for (int64_t t = 0; t < p.T; ++t) differing += buf.grad.at(i, t) != base.grad.at(i, t);
      REQUIRE(differing == 0);
    }
  }
}

TEST_CASE("segmentation and token broadcast give the same output for any thread count", "[parallel][segment]") {
  std::mt19937_64 rng(777);
  Vocab v;
  const int64_t B = 400, T = 300;  // several row chunks
  const TokenBatch batch = random_tokens(rng, v, B, T, false, true, 0.3);
  const Buf<int64_t> tokens = from_ref_int<int64_t>(batch.tokens, T, Layout::strided);
  const Buf<uint8_t> mask = from_ref_int<uint8_t>(batch.mask, T, Layout::strided);
  const sapo_ref::Matrix A = random_logp(rng, B, v.K, -1, 1);
  const Buf<double> adv = from_ref<double>(A, v.K, Layout::contiguous);
  auto run = [&](int threads) {
    Buf<int32_t> step(B, T, Layout::contiguous), n(B, 1, Layout::contiguous);
    Buf<int64_t> codes(B, v.K, Layout::contiguous);
    Buf<uint8_t> bad(B, 1, Layout::contiguous);
    auto opt = v.options(false, true);
    opt.num_threads = threads;
    const auto stats =
        sapo::segment_steps(tokens.cview(), mask.cview(), opt, {step.view(), n.vec(), codes.view(), bad.vec()});
    Buf<double> token_adv(B, T, Layout::contiguous);
    sapo::broadcast_step_advantages(adv.cview(), step.cview(), mask.cview(), token_adv.view(), threads);
    return std::make_tuple(step.store, codes.store, bad.store, token_adv.store, stats.n_malformed);
  };
  const auto one = run(1);
  REQUIRE(std::get<4>(one) > 0);
  for (int threads : {2, 5}) REQUIRE(run(threads) == one);
}
