// Policy loss, forward + backward, side by side:
//   sapo            one sapo::policy_loss call (loss + d loss / d logp, step ids + A (B, K))
//   sapo_autograd   sapo::libtorch::policy_loss + loss.backward() (the LibTorch adapter)
//   libtorch        the same math op by op with autograd (torch_impls.cpp)
//   reference       tests/reference (broadcast + policy_loss, nested double vectors), small shapes only
//   roofline        read the inputs once, write grad once, no math
//   roofline_2pass  a read-only pass over the inputs, then the roofline pass
// Kernels: `loss` (token ratio, clip 0.2, token_mean: the defaults) and `loss_step_kl`
// (step ratio, step_mean, k3 KL to ref_logp with beta 0.01).
#include <cmath>
#include <cstdio>
#include <memory>

#include "bench_common.hpp"
#include "dispatched.hpp"
#include "impls.hpp"
#include "torch_impls.hpp"

using namespace sapo_bench;

namespace {

struct LossCase {
  std::unique_ptr<LossProblem> p;
  std::unique_ptr<RefLossInputs> ref;  // made on first use (small shapes only)
  RefLossInputs& reference() {
    if (!ref) ref = std::make_unique<RefLossInputs>(make_ref_loss_inputs(*p));
    return *ref;
  }
};

ShapeCache<LossCase> g_cache([](const Shape& s) {
  auto c = std::make_unique<LossCase>();
  c->p = make_loss_problem(s);
  return c;
});

// The same batch without padding (mask 1 everywhere; the former padding is tail tokens of
// step -1): sapo skips the inputs of padding tiles, so on the ragged batch it moves fewer
// bytes than the roofline's minimal bytes; here every token is used and the roofline
// comparison is like for like.
ShapeCache<LossCase> g_dense_cache([](const Shape& s) {
  auto c = std::make_unique<LossCase>();
  c->p = make_loss_problem(s);
  std::fill(c->p->mask.data(), c->p->mask.data() + c->p->mask.size(), 1.0f);
  return c;
});

const char* kernel_name(bool step_kl) { return step_kl ? "loss_step_kl" : "loss"; }

/// sapo, libtorch and the reference agree on the loss and the gradient (float32 inputs;
/// the reference accumulates in double, sapo in float blocks then double, libtorch in float).
bool self_check() {
  bool ok = true;
  for (const Shape s : {Shape{64, 512, 3, 8}, Shape{32, 256, 4, 16}})
    for (bool step_kl : {false, true}) {
      auto p = make_loss_problem(s, 99);
      const size_t n = static_cast<size_t>(s.tokens());
      SapoLoss sapo_run{*p, step_kl};
      const double l_sapo = sapo_run.run(1);
      std::vector<float> g_sapo(p->grad.data(), p->grad.data() + n);
      const RefLossInputs ri = make_ref_loss_inputs(*p);
      const sapo_ref::LossResult r = reference_loss(ri, step_kl);
      std::vector<double> g_ref;
      for (const auto& row : r.grad) g_ref.insert(g_ref.end(), row.begin(), row.end());
      double gmax = 0;
      for (double v : g_ref) gmax = std::max(gmax, std::fabs(v));
      torch_set_threads(1);
      TorchLoss torch_run(*p, step_kl);
      const double l_torch = torch_run.run();
      const std::string k = std::string(kernel_name(step_kl)) + " " + s.str();
      ok &= close((k + ": sapo loss vs reference").c_str(), l_sapo, r.loss, 1e-6, 1e-9);
      ok &= close((k + ": libtorch loss vs reference").c_str(), l_torch, r.loss, 1e-4, 1e-6);
      ok &= all_close((k + ": sapo grad vs reference").c_str(), g_sapo.data(), g_ref.data(), n, 1e-5, 1e-6 * gmax);
      ok &= all_close((k + ": libtorch grad vs reference").c_str(), torch_run.grad(), g_ref.data(), n, 1e-4,
                      1e-4 * gmax);
      // The adapter runs the same kernel: the same loss and gradient, bit for bit.
      SapoTorchLoss adapter_run(*p, step_kl, 1);
      const double l_adapter = adapter_run.run();
      std::vector<double> g_sapo_d(g_sapo.begin(), g_sapo.end());
      // (The adapter's loss tensor has logp's dtype: the kernel's double loss rounded to float.)
      ok &= close((k + ": sapo_autograd loss vs sapo").c_str(), l_adapter, static_cast<float>(l_sapo), 0, 0);
      ok &= all_close((k + ": sapo_autograd grad vs sapo").c_str(), adapter_run.grad(), g_sapo_d.data(), n, 0, 0);
      // Every dispatched instruction set against the reference.
      for (const sapo::dispatch::isa i : dispatch_variants()) {
        const double l_isa = dispatched_loss(i, *p, step_kl, 1);
        const std::string name = k + ": " + dispatch_impl_name(i);
        ok &= close((name + " loss vs reference").c_str(), l_isa, r.loss, 1e-6, 1e-9);
        std::vector<float> g_isa(p->grad.data(), p->grad.data() + n);
        ok &= all_close((name + " grad vs reference").c_str(), g_isa.data(), g_ref.data(), n, 1e-5, 1e-6 * gmax);
      }
    }
  std::fprintf(stderr, "bench_loss self-check (sapo, libtorch, reference agree): %s\n", ok ? "ok" : "FAILED");
  return ok;
}

/// Every implementation of one kernel at one shape. `all`: also the LibTorch adapter and
/// the reference (not for loss_dense).
void register_kernel(const Flags& f, const Shape& s, bool step_kl, const std::string& kernel,
                     ShapeCache<LossCase>* cache, bool all) {
  const double bytes = loss_bytes(s, step_kl);
  auto reg = [&](const std::string& impl, int threads, std::function<void(benchmark::State&, bool)> fn) {
    register_timed(kernel, impl, s, threads, std::move(fn));
  };
  for (int th : f.threads)
    reg("sapo", th, [=](benchmark::State& st, bool warm_up) {
      SapoLoss run{*cache->get(s).p, step_kl};
      if (warm_up) benchmark::DoNotOptimize(run.run(th));
      for (auto _ : st) {
        double l = run.run(th);
        benchmark::DoNotOptimize(l);
        benchmark::ClobberMemory();
      }
      finish_state(st, s, bytes, th);
    });
  // The same kernel as the compiled artefacts run it: runtime dispatch, one row per
  // instruction set this CPU runs.
  for (const sapo::dispatch::isa i : dispatch_variants())
    for (int th : f.threads)
      reg(dispatch_impl_name(i), th, [=](benchmark::State& st, bool warm_up) {
        LossProblem& p = *cache->get(s).p;
        if (warm_up) benchmark::DoNotOptimize(dispatched_loss(i, p, step_kl, th));
        for (auto _ : st) {
          double l = dispatched_loss(i, p, step_kl, th);
          benchmark::DoNotOptimize(l);
          benchmark::ClobberMemory();
        }
        finish_state(st, s, bytes, th);
      });
  if (all)
    for (int th : f.threads)
      reg("sapo_autograd", th, [=](benchmark::State& st, bool warm_up) {
        torch_set_threads(th);
        SapoTorchLoss run(*cache->get(s).p, step_kl, th);
        if (warm_up) benchmark::DoNotOptimize(run.run());
        for (auto _ : st) {
          double l = run.run();
          benchmark::DoNotOptimize(l);
          benchmark::ClobberMemory();
        }
        run.release();
        finish_state(st, s, bytes, th);
      });
  for (int th : f.threads)
    reg("libtorch", th, [=](benchmark::State& st, bool warm_up) {
      torch_set_threads(th);
      TorchLoss run(*cache->get(s).p, step_kl);
      if (warm_up) benchmark::DoNotOptimize(run.run());
      for (auto _ : st) {
        double l = run.run();
        benchmark::DoNotOptimize(l);
        benchmark::ClobberMemory();
      }
      finish_state(st, s, bytes, th);
    });
  if (all && s.tokens() <= f.reference_max_tokens)
    reg("reference", 1, [=](benchmark::State& st, bool /*warm_up: the reference is not warmed up*/) {
      const RefLossInputs& ri = cache->get(s).reference();
      for (auto _ : st) {
        sapo_ref::LossResult r = reference_loss(ri, step_kl);
        benchmark::DoNotOptimize(r.loss);
        benchmark::ClobberMemory();
      }
      finish_state(st, s, bytes, 1);
    });
  for (bool two_pass : {false, true})
    for (int th : f.threads)
      reg(two_pass ? "roofline_2pass" : "roofline", th, [=](benchmark::State& st, bool warm_up) {
        LossRoofline run{*cache->get(s).p, step_kl, two_pass};
        if (warm_up) benchmark::DoNotOptimize(run.run(th));
        for (auto _ : st) {
          uint32_t v = run.run(th);
          benchmark::DoNotOptimize(v);
          benchmark::ClobberMemory();
        }
        finish_state(st, s, bytes, th);
      });
}

void register_all(const Flags& f) {
  for (const Shape s : bench_shapes(f.quick))
    for (bool step_kl : {false, true}) register_kernel(f, s, step_kl, kernel_name(step_kl), &g_cache, true);
  // The largest shape once more without padding (the target shape of docs/benchmarks.md).
  register_kernel(f, bench_shapes(f.quick).back(), false, "loss_dense", &g_dense_cache, false);
  // Small batches, where the fixed cost of a call (threads, allocation) shows: an RL
  // trainer calls the loss thousands of times per epoch.
  for (const Shape s : {Shape{16, 256, 3, 8}, Shape{256, 1024, 4, 16}})
    register_kernel(f, s, false, "loss_call", &g_cache, false);
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
