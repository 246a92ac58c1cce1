// One policy-loss call through runtime dispatch (as the compiled artefacts make it), for
// instruction counts with callgrind, which repeat where seconds do not:
//
//   SAPO_ISA=avx2 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//     --toggle-collect='sapo::dispatch::policy_loss_kernel*' build/bench/bench/bench_instructions loss_dense 2048 4096
//   callgrind_annotate /tmp/cg.out | head
//
// Kernels as in bench_loss: loss (ragged batch), loss_dense (every token used), loss_step_kl.
// valgrind 3.19 decodes no AVX-512: under it the CPU looks like AVX2 at most, so the
// instruction counts cover the sse2 and avx2 variants.
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <string>

#include "impls.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s loss|loss_dense|loss_step_kl B T\n", argv[0]);
    return 2;
  }
  const std::string kernel = argv[1];
  const sapo_bench::Shape s{std::atoll(argv[2]), std::atoll(argv[3]), 4, 16};
  auto p = sapo_bench::make_loss_problem(s);
  if (kernel == "loss_dense") std::fill(p->mask.data(), p->mask.data() + p->mask.size(), 1.0f);
  const double loss = sapo_bench::SapoLoss{*p, kernel == "loss_step_kl"}.run(1);
  std::printf("%s %s B=%ld T=%ld: loss %.9g (instruction set %s)\n", argv[0], kernel.c_str(), long(s.B), long(s.T),
              loss, sapo::dispatch::isa_name(sapo::dispatch::active_isa()));
  return 0;
}
