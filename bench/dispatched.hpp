// The compiled artefacts' path (runtime instruction-set dispatch, src/), for the per
// instruction set rows of the benchmarks: dispatched.cpp is compiled like libsapo_torch.so
// (no -march flag, SAPO_USE_DISPATCH) and runs the same runners as the "sapo" rows.
#pragma once

#include <sapo/dispatch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "problems.hpp"

namespace sapo_bench {

struct AdvOutputs;

/// The instruction sets this CPU runs, as "sapo_sse2", "sapo_avx2", "sapo_avx512" rows.
inline std::vector<sapo::dispatch::isa> dispatch_variants() {
  std::vector<sapo::dispatch::isa> out;
  for (auto i : {sapo::dispatch::isa::sse2, sapo::dispatch::isa::avx2, sapo::dispatch::isa::avx512,
                 sapo::dispatch::isa::native})
    if (sapo::dispatch::isa_supported(i)) out.push_back(i);
  return out;
}
inline std::string dispatch_impl_name(sapo::dispatch::isa i) {
  return std::string("sapo_") + sapo::dispatch::isa_name(i);
}

/// sapo::policy_loss through dispatch with instruction set `i` (SapoLoss of impls.hpp).
double dispatched_loss(sapo::dispatch::isa i, LossProblem& p, bool step_kl, int threads);
/// The advantage stages through dispatch (SapoAdvantages of impls.hpp); ids64: int64 ids.
int64_t dispatched_advantages(sapo::dispatch::isa i, const Batch& b, AdvOutputs& out, bool bcast, bool ids64,
                              int threads);

}  // namespace sapo_bench
