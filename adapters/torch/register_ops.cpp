// The sapo operators for the PyTorch dispatcher: schemas (TORCH_LIBRARY, defined here and
// in no other shared object), CPU kernels, the autograd-aware policy_loss, and the CUDA
// hook. Built into libsapo_torch.so (CMake target sapo::torch); from Python:
//   torch.ops.load_library("libsapo_torch.so")
//   loss, diag = torch.ops.sapo.policy_loss(logp, old_logp, mask, step=step, step_advantages=A,
//                                           ratio="step", agg="step_mean")
//   loss.backward()
#include <sapo/torch.hpp>

#include <ATen/Parallel.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

namespace sapo {
namespace libtorch {
namespace detail {

c10::OperatorHandle find_op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

namespace {

// sapo's parallel loops run on libtorch's intra-op pool (at::parallel_for), not on sapo's
// own threads: a trainer's torch.set_num_threads holds for them too, and two pools do not
// fight over the cores. Each of up to `threads` pool tasks takes chunks from a shared
// counter, so uneven chunks balance; which thread runs a chunk never changes a result.
void aten_executor(int64_t n, int threads, void* context, void (*task)(void*, int64_t)) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t c = next.fetch_add(1); c < n; c = next.fetch_add(1)) task(context, c);
  });
}
const bool aten_executor_installed = (sapo::set_executor(&aten_executor), true);

/// The instruction set the CPU kernels run with (runtime dispatch; SAPO_ISA forces one).
std::string dispatch_isa() { return sapo::dispatch::isa_name(sapo::dispatch::active_isa()); }

std::vector<std::string> loss_diagnostic_name_list() {
  return {loss_diagnostic_names.begin(), loss_diagnostic_names.end()};
}
std::vector<std::string> advantage_stat_name_list() {
  return {advantage_stat_names.begin(), advantage_stat_names.end()};
}

#if !defined(SAPO_TORCH_WITH_CUDA)
// Registered for the CUDA key when this library has no CUDA kernels, so that a CUDA
// tensor gets this message (naming the argument) instead of the dispatcher's generic one.
void cuda_unavailable(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  std::string culprit = "an input";
  const size_t n = args.size();
  if (stack->size() >= n)
    for (size_t i = 0; i < n; ++i) {
      const c10::IValue& v = (*stack)[stack->size() - n + i];
      if (v.isTensor() && v.toTensor().is_cuda()) {
        culprit = args[i].name();
        break;
      }
    }
  TORCH_CHECK(false, op.schema().name(), ": ", culprit,
              " is a CUDA tensor, but this build of sapo_torch has no CUDA kernels (configure sapo with "
              "SAPO_WITH_CUDA=ON against a CUDA-enabled libtorch), and sapo does not copy tensors between devices: "
              "move the inputs to the CPU");
}
#endif

}  // namespace
}  // namespace detail
}  // namespace libtorch
}  // namespace sapo

#define SAPO_LOSS_SCHEMA_ARGS                                                                                    \
  "(Tensor logp, Tensor old_logp, Tensor mask, Tensor? token_advantages=None, Tensor? step_advantages=None, "    \
  "Tensor? step=None, Tensor? ref_logp=None, *, str ratio='token', float clip_low=0.2, float clip_high=0.2, "    \
  "bool dual_clip=False, float dual_clip_c=3.0, float kl_coef=0.0, str kl='k3', str agg='token_mean', "          \
  "float max_response_length=0.0, float global_tokens=0.0, float global_sequences=0.0, float global_steps=0.0, " \
  "str nonfinite='error', int num_threads=0)"

#define SAPO_ADVANTAGE_SCHEMA_ARGS                                                                         \
  "(Tensor rewards, int group_size=0, Tensor? group_ids=None, int n_groups=0, *, str norm='std', "        \
  "bool unbiased_std=True, float eps=1e-06, str singleton='zero') -> (Tensor adv, Tensor stats)"

#define SAPO_PHASE_LAYOUT_ARGS "(Tensor rewards, int group_size=0, Tensor? group_ids=None, int n_groups=0"

TORCH_LIBRARY(sapo, m) {
  m.def(
      "segment_steps(Tensor tokens, Tensor mask, int num_steps, int[] sid_ranges, *, str layout='interleaved', "
      "int[] codes_per_level=[], int think_end_id=-1, bool sid_token_in_step=True, str tail='no_step', "
      "int num_threads=0) -> (Tensor step, Tensor n_steps, Tensor codes, Tensor malformed)");
  m.def(
      "step_rewards(Tensor codes, Tensor malformed, Tensor targets, *, str kind='prefix', "
      "float[] level_weights=[], float malformed_reward=0.0, ScalarType? dtype=None) -> Tensor");
  m.def("group_advantages" SAPO_ADVANTAGE_SCHEMA_ARGS);
  m.def("outcome_advantages" SAPO_ADVANTAGE_SCHEMA_ARGS);
  m.def("mix_advantages(Tensor outcome_adv, Tensor step_adv, float outcome_weight=1.0, float step_weight=1.0) -> Tensor");
  m.def("broadcast_step_advantages(Tensor adv, Tensor step, Tensor mask) -> Tensor");
  m.def("broadcast_outcome_advantages(Tensor adv, Tensor mask) -> Tensor");
  // The distributed phases of group_advantages (docs/distributed.md): the group layout as in
  // group_advantages, with global ids (n_groups over every rank, required) and first_row for
  // contiguous groups; the reduced arrays of earlier rounds are keyword-only.
  m.def("group_partials" SAPO_PHASE_LAYOUT_ARGS ", *, int first_row=0) -> "
        "(Tensor count, Tensor sum, Tensor min, Tensor max)");
  m.def("group_deviations" SAPO_PHASE_LAYOUT_ARGS ", *, Tensor count, Tensor sum, int first_row=0) -> Tensor");
  m.def("finalize_group_advantages" SAPO_PHASE_LAYOUT_ARGS
        ", *, Tensor count, Tensor sum, Tensor min, Tensor max, Tensor sq_dev, int first_row=0, str norm='std', "
        "bool unbiased_std=True, float eps=1e-06, str singleton='zero') -> "
        "(Tensor adv, Tensor stats, Tensor advantage_sums)");
  m.def("finish_advantage_std(Tensor stats, Tensor advantage_sums) -> Tensor");
  m.def("loss_counts(Tensor mask, Tensor? step=None) -> Tensor");
  m.def("dispatch_isa() -> str", &sapo::libtorch::detail::dispatch_isa);
  // The fused kernel without autograd: loss, d loss / d logp and the diagnostics.
  m.def("policy_loss_fwd" SAPO_LOSS_SCHEMA_ARGS " -> (Tensor loss, Tensor grad, Tensor diagnostics)");
  // The same with autograd (backward: the saved gradient times the incoming one).
  m.def("policy_loss" SAPO_LOSS_SCHEMA_ARGS " -> (Tensor loss, Tensor diagnostics)");
  // Names of the entries of the diagnostics / statistics tensors.
  m.def("loss_diagnostic_names() -> str[]", TORCH_FN(sapo::libtorch::detail::loss_diagnostic_name_list));
  m.def("advantage_stat_names() -> str[]", TORCH_FN(sapo::libtorch::detail::advantage_stat_name_list));
}

TORCH_LIBRARY_IMPL(sapo, CPU, m) {
  namespace impl = sapo::libtorch::impl;
  using cpu = sapo::libtorch::cpu_backend;
  m.impl("segment_steps", TORCH_FN(impl::segment_steps<cpu>));
  m.impl("step_rewards", TORCH_FN(impl::step_rewards<cpu>));
  m.impl("group_advantages", TORCH_FN(impl::group_advantages<cpu>));
  m.impl("outcome_advantages", TORCH_FN(impl::outcome_advantages<cpu>));
  m.impl("mix_advantages", TORCH_FN(impl::mix_advantages<cpu>));
  m.impl("broadcast_step_advantages", TORCH_FN(impl::broadcast_step_advantages<cpu>));
  m.impl("broadcast_outcome_advantages", TORCH_FN(impl::broadcast_outcome_advantages<cpu>));
  m.impl("policy_loss_fwd", TORCH_FN(impl::policy_loss_fwd<cpu>));
  m.impl("group_partials", TORCH_FN(impl::group_partials<cpu>));
  m.impl("group_deviations", TORCH_FN(impl::group_deviations<cpu>));
  m.impl("finalize_group_advantages", TORCH_FN(impl::finalize_group_advantages<cpu>));
  m.impl("finish_advantage_std", TORCH_FN(impl::finish_advantage_std<cpu>));
  m.impl("loss_counts", TORCH_FN(impl::loss_counts<cpu>));
}

// Every op with tensor arguments except the composite policy_loss.
#define SAPO_PLAIN_OPS                                                                                              \
  {"segment_steps", "step_rewards", "group_advantages", "outcome_advantages", "mix_advantages",                   \
   "broadcast_step_advantages", "broadcast_outcome_advantages", "policy_loss_fwd", "group_partials",              \
   "group_deviations", "finalize_group_advantages", "finish_advantage_std", "loss_counts"}

// Every op but policy_loss is not differentiable: pass the autograd keys through, so that
// inputs that require grad give plain outputs (no "autograd kernel not registered" node).
TORCH_LIBRARY_IMPL(sapo, Autograd, m) {
  for (const char* name : SAPO_PLAIN_OPS)
    m.impl(name, torch::CppFunction::makeFallthrough());
}

// policy_loss = the autograd function around policy_loss_fwd, for every device: the
// function dispatches policy_loss_fwd, so a CUDA kernel of policy_loss_fwd is all CUDA needs.
TORCH_LIBRARY_IMPL(sapo, CompositeImplicitAutograd, m) {
  m.impl("policy_loss", TORCH_FN(sapo::libtorch::cpu::policy_loss));
}

#if defined(SAPO_TORCH_WITH_CUDA)
// CUDA hook. The CUDA backend (adapters/torch/cuda_ops.cu, built only with SAPO_WITH_CUDA
// and a CUDA libtorch; it wraps the raw-pointer kernels of adapters/cuda/) defines this
// function and registers in it a kernel for each op it implements, with the signatures of
// sapo::libtorch::kernels, e.g. m.impl("policy_loss_fwd", TORCH_FN(policy_loss_fwd_cuda)).
namespace sapo {
namespace libtorch {
void register_cuda_kernels(torch::Library& m);
}
}  // namespace sapo
TORCH_LIBRARY_IMPL(sapo, CUDA, m) { sapo::libtorch::register_cuda_kernels(m); }
#else
TORCH_LIBRARY_IMPL(sapo, CUDA, m) {
  for (const char* name : SAPO_PLAIN_OPS)
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&sapo::libtorch::detail::cuda_unavailable>());
}
#endif
