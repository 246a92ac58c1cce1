// The advantage pipeline, side by side:
//   segment_steps (interleaved layout, per-level SID ranges) -> step_rewards(prefix)
//   -> group_advantages(contiguous G, std) [-> token broadcast]
// on int32 and int64 token ids. Kernels: advantages_i32, advantages_i64 (outputs: step
// ids (B, T) and A (B, K)) and advantages_bcast_i32, advantages_bcast_i64 (also the token
// advantages (B, T), what a libtorch loss would consume).
//   sapo       the four sapo calls
//   libtorch   the vectorized formulation (torch_impls.cpp)
//   reference  tests/reference, small shapes only
//   roofline   read tokens + mask once, write step ids once (and the token advantages once)
#include <cstdio>
#include <memory>

#include "bench_common.hpp"
#include "dispatched.hpp"
#include "impls.hpp"
#include "torch_impls.hpp"

using namespace sapo_bench;

namespace {

struct AdvCase {
  std::unique_ptr<Batch> b;
  std::unique_ptr<AdvOutputs> out;
  std::unique_ptr<RefAdvInputs> ref;
  RefAdvInputs& reference() {
    if (!ref) ref = std::make_unique<RefAdvInputs>(make_ref_adv_inputs(*b));
    return *ref;
  }
};

ShapeCache<AdvCase> g_cache([](const Shape& s) {
  auto c = std::make_unique<AdvCase>();
  c->b = std::make_unique<Batch>(make_batch(s));
  c->out = std::make_unique<AdvOutputs>(s);
  return c;
});

std::string kernel_name(int id_bytes, bool bcast) {
  return std::string(bcast ? "advantages_bcast_i" : "advantages_i") + (id_bytes == 8 ? "64" : "32");
}

template <class Id>
int64_t run_sapo(AdvCase& c, bool bcast, int threads) {
  SapoAdvantages<Id> run{*c.b, *c.out, bcast};
  return run.run(threads);
}

bool self_check() {
  bool ok = true;
  for (const Shape s : {Shape{64, 512, 3, 8}, Shape{32, 256, 4, 16}})
    for (int id_bytes : {4, 8}) {
      const Batch b = make_batch(s, 4242);
      AdvOutputs out(s);
      const size_t n = static_cast<size_t>(s.tokens()), nk = static_cast<size_t>(s.B * s.K);
      if (id_bytes == 8)
        SapoAdvantages<int64_t>{b, out, true}.run(1);
      else
        SapoAdvantages<int32_t>{b, out, true}.run(1);
      const RefAdvResult r = reference_advantages(make_ref_adv_inputs(b), true);
      std::vector<int64_t> ref_step;
      std::vector<double> ref_adv, ref_tok;
      std::vector<uint8_t> ref_bad;
      for (const auto& row : r.seg.step) ref_step.insert(ref_step.end(), row.begin(), row.end());
      for (const auto& row : r.adv) ref_adv.insert(ref_adv.end(), row.begin(), row.end());
      for (const auto& row : r.token_adv) ref_tok.insert(ref_tok.end(), row.begin(), row.end());
      for (bool v : r.seg.malformed) ref_bad.push_back(v ? 1 : 0);
      torch_set_threads(1);
      TorchAdvantages t(b, id_bytes == 8, true);
      t.run();
      const std::string k = kernel_name(id_bytes, true) + " " + s.str();
      ok &= all_close((k + ": generated step ids vs reference").c_str(), b.step.data(), ref_step.data(), n, 0, 0);
      ok &= all_close((k + ": sapo step ids vs reference").c_str(), out.step.data(), ref_step.data(), n, 0, 0);
      ok &= all_close((k + ": sapo malformed vs reference").c_str(), out.malformed.data(), ref_bad.data(),
                      size_t(s.B), 0, 0);
      ok &= all_close((k + ": sapo A vs reference").c_str(), out.adv.data(), ref_adv.data(), nk, 1e-6, 1e-6);
      ok &= all_close((k + ": sapo token adv vs reference").c_str(), out.token_adv.data(), ref_tok.data(), n, 1e-6,
                      1e-6);
      for (const sapo::dispatch::isa i : dispatch_variants()) {
        AdvOutputs o(s);
        dispatched_advantages(i, b, o, true, id_bytes == 8, 1);
        const std::string name = k + ": " + dispatch_impl_name(i);
        ok &= all_close((name + " step ids vs reference").c_str(), o.step.data(), ref_step.data(), n, 0, 0);
        ok &= all_close((name + " token adv vs reference").c_str(), o.token_adv.data(), ref_tok.data(), n, 1e-6, 1e-6);
      }
      ok &= all_close((k + ": libtorch step ids vs reference").c_str(), t.step(), ref_step.data(), n, 0, 0);
      ok &= all_close((k + ": libtorch malformed vs reference").c_str(), t.malformed(), ref_bad.data(), size_t(s.B),
                      0, 0);
      ok &= all_close((k + ": libtorch A vs reference").c_str(), t.adv(), ref_adv.data(), nk, 1e-5, 1e-5);
      ok &= all_close((k + ": libtorch token adv vs reference").c_str(), t.token_adv(), ref_tok.data(), n, 1e-5, 1e-5);
      int64_t bad = 0;
      for (uint8_t v : ref_bad) bad += v;
      int64_t nonzero = 0;
      for (double v : ref_adv) nonzero += v != 0;
      if (id_bytes == 4)
        std::fprintf(stderr, "  %s: %lld malformed rows of %lld, %lld of %zu step advantages nonzero\n",
                     s.str().c_str(), static_cast<long long>(bad), static_cast<long long>(s.B),
                     static_cast<long long>(nonzero), nk);
    }
  std::fprintf(stderr, "bench_advantages self-check (sapo, libtorch, reference agree): %s\n", ok ? "ok" : "FAILED");
  return ok;
}

void register_all(const Flags& f) {
  for (const Shape s : bench_shapes(f.quick))
    for (bool bcast : {false, true})
      for (int id_bytes : {4, 8}) {
        const std::string kernel = kernel_name(id_bytes, bcast);
        const double bytes = adv_bytes(s, id_bytes, bcast);
        const bool i64 = id_bytes == 8;
        auto reg = [&](const std::string& impl, int threads, std::function<void(benchmark::State&, bool)> fn) {
          register_timed(kernel, impl, s, threads, std::move(fn));
        };
        for (int th : f.threads)
          reg("sapo", th, [=](benchmark::State& st, bool warm_up) {
            AdvCase& c = g_cache.get(s);
            auto once = [&] { return i64 ? run_sapo<int64_t>(c, bcast, th) : run_sapo<int32_t>(c, bcast, th); };
            if (warm_up) benchmark::DoNotOptimize(once());
            for (auto _ : st) {
              int64_t v = once();
              benchmark::DoNotOptimize(v);
              benchmark::ClobberMemory();
            }
            finish_state(st, s, bytes, th);
          });
        // Runtime dispatch (the compiled artefacts' path), one row per instruction set.
        for (const sapo::dispatch::isa i : dispatch_variants())
          for (int th : f.threads)
            reg(dispatch_impl_name(i), th, [=](benchmark::State& st, bool warm_up) {
              AdvCase& c = g_cache.get(s);
              if (warm_up) benchmark::DoNotOptimize(dispatched_advantages(i, *c.b, *c.out, bcast, i64, th));
              for (auto _ : st) {
                int64_t v = dispatched_advantages(i, *c.b, *c.out, bcast, i64, th);
                benchmark::DoNotOptimize(v);
                benchmark::ClobberMemory();
              }
              finish_state(st, s, bytes, th);
            });
        for (int th : f.threads)
          reg("libtorch", th, [=](benchmark::State& st, bool warm_up) {
            torch_set_threads(th);
            TorchAdvantages run(*g_cache.get(s).b, i64, bcast);
            if (warm_up) run.run();
            for (auto _ : st) {
              run.run();
              benchmark::ClobberMemory();
            }
            finish_state(st, s, bytes, th);
          });
        if (s.tokens() <= f.reference_max_tokens)
          reg("reference", 1, [=](benchmark::State& st, bool /*warm_up: the reference is not warmed up*/) {
            const RefAdvInputs& ri = g_cache.get(s).reference();
            for (auto _ : st) {
              RefAdvResult r = reference_advantages(ri, bcast);
              benchmark::DoNotOptimize(r.adv.data());
              benchmark::ClobberMemory();
            }
            finish_state(st, s, bytes, 1);
          });
        for (int th : f.threads)
          reg("roofline", th, [=](benchmark::State& st, bool warm_up) {
            AdvCase& c = g_cache.get(s);
            auto once = [&] {
              if (i64)
                AdvRoofline<int64_t>{*c.b, *c.out, bcast}.run(th);
              else
                AdvRoofline<int32_t>{*c.b, *c.out, bcast}.run(th);
            };
            if (warm_up) once();
            for (auto _ : st) {
              once();
              benchmark::ClobberMemory();
            }
            finish_state(st, s, bytes, th);
          });
      }
}

}  // namespace

int main(int argc, char** argv) {
  const Flags flags = parse_flags(argc, argv);
  if (!self_check()) return 1;
  if (flags.check_only) return 0;
  register_all(flags);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
