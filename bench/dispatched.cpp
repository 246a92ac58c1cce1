// Compiled without -march flags and with SAPO_USE_DISPATCH (bench/CMakeLists.txt), as the
// LibTorch library and the Python module are: see dispatched.hpp.
#include "dispatched.hpp"

#include "impls.hpp"

namespace sapo_bench {

double dispatched_loss(sapo::dispatch::isa i, LossProblem& p, bool step_kl, int threads) {
  sapo::dispatch::set_isa(i);
  return SapoLoss{p, step_kl}.run(threads);
}

int64_t dispatched_advantages(sapo::dispatch::isa i, const Batch& b, AdvOutputs& out, bool bcast, bool ids64,
                              int threads) {
  sapo::dispatch::set_isa(i);
  return ids64 ? SapoAdvantages<int64_t>{b, out, bcast}.run(threads)
               : SapoAdvantages<int32_t>{b, out, bcast}.run(threads);
}

}  // namespace sapo_bench
