// The CUDA kernels of the torch.ops.sapo.* operators: the functions of sapo::libtorch::impl
// (every check, conversion and output allocation the CPU ops have) with a backend that
// runs the raw-pointer kernels of adapters/cuda on the current stream of the inputs'
// device, with scratch memory from PyTorch's caching allocator. register_ops.cpp calls
// register_cuda_kernels from TORCH_LIBRARY_IMPL(sapo, CUDA, m) when this file is built
// (SAPO_WITH_CUDA against a libtorch with CUDA).
#include <sapo/cuda.cuh>
#include <sapo/torch.hpp>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace sapo {
namespace libtorch {
namespace {

struct cuda_backend {
  /// Every tensor of a call on the device of its first tensor (made current by guard()).
  static void check_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, like the call's first tensor, got device ", t.device(),
                " (sapo does not copy tensors between devices)");
    const int current = c10::cuda::current_device();
    TORCH_CHECK(t.get_device() == current, name, " must be on cuda:", current,
                " (the device of the call's first tensor), got ", t.device());
  }

  /// Makes the first tensor's device current for the call (a CPU first tensor fails its
  /// device check right after).
  static c10::cuda::OptionalCUDAGuard guard(const at::Tensor& lead) {
    return c10::cuda::OptionalCUDAGuard(lead.defined() && lead.is_cuda() ? c10::optional<c10::Device>(lead.device())
                                                                          : c10::nullopt);
  }

  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

  /// Scratch memory for one call from the caching allocator (stream-ordered like the
  /// kernels, so it is reused at once by later work on the same stream). Blocks are aligned
  /// to at least 512 bytes, more than workspace_alignment.
  struct scratch {
    at::Tensor buffer;
    ::sapo::cuda::workspace ws;
    explicit scratch(size_t bytes) {
      if (bytes == 0) return;
      buffer = at::empty({static_cast<int64_t>(bytes)},
                         at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
      ws.data = buffer.data_ptr();
      ws.bytes = bytes;
    }
  };

  template <class Id, class M>
  static segment_stats segment_steps(mat_view<Id> tokens, mat_view<M> mask, const segment_options& o,
                                     const segment_outputs& out) {
    scratch s(::sapo::cuda::segment_workspace_bytes());
    return ::sapo::cuda::segment_steps(tokens, mask, o, out, stream(), s.ws);
  }

  template <class C, class F, class Y, class R>
  static void step_rewards(mat_view<C> codes, vec_view<F> malformed, mat_view<Y> targets, const reward_options& o,
                           mat_view<R> rewards) {
    scratch s(::sapo::cuda::step_rewards_workspace_bytes());
    ::sapo::cuda::step_rewards(codes, malformed, targets, o, rewards, stream(), s.ws);
  }

  template <class R, class A>
  static advantage_stats group_advantages(mat_view<R> rewards, const group_layout& g, const advantage_options& o,
                                          mat_view<A> adv) {
    scratch s(::sapo::cuda::group_advantages_workspace_bytes(rewards.rows, rewards.cols, g));
    return ::sapo::cuda::group_advantages(rewards, g, o, adv, stream(), s.ws);
  }

  template <class R, class A>
  static advantage_stats outcome_advantages(vec_view<R> rewards, const group_layout& g, const advantage_options& o,
                                            vec_view<A> adv) {
    scratch s(::sapo::cuda::group_advantages_workspace_bytes(rewards.size, 1, g));
    return ::sapo::cuda::outcome_advantages(rewards, g, o, adv, stream(), s.ws);
  }

  template <class A, class S, class M, class O>
  static void broadcast_step_advantages(mat_view<A> adv, mat_view<S> step, mat_view<M> mask, mat_view<O> out) {
    scratch s(::sapo::cuda::broadcast_workspace_bytes());
    ::sapo::cuda::broadcast_step_advantages(adv, step, mask, out, stream(), s.ws);
  }

  template <class A, class M, class O>
  static void broadcast_outcome_advantages(vec_view<A> adv, mat_view<M> mask, mat_view<O> out) {
    scratch s(::sapo::cuda::broadcast_workspace_bytes());
    ::sapo::cuda::broadcast_outcome_advantages(adv, mask, out, stream(), s.ws);
  }

  template <class T, class M, class G>
  static loss_result policy_loss(const policy_inputs<T, M>& in, const loss_options& o, mat_view<G> grad) {
    scratch s(::sapo::cuda::policy_loss_workspace_bytes(in, o));
    return ::sapo::cuda::policy_loss(in, o, grad, stream(), s.ws);
  }
};

/// Mixing is B x K multiply-adds (no kernel of its own): the CPU kernel on host copies,
/// so the formula stays in one place; the result goes back to the inputs' device.
at::Tensor mix_advantages_cuda(const at::Tensor& outcome_adv, const at::Tensor& step_adv, double outcome_weight,
                               double step_weight) {
  const auto device_guard = cuda_backend::guard(step_adv);
  detail::check_matrix<cuda_backend>(step_adv, "step_adv", "(B, K)");
  detail::check_tensor<cuda_backend>(outcome_adv, "outcome_adv");
  return impl::mix_advantages<cpu_backend>(outcome_adv.cpu(), step_adv.cpu(), outcome_weight, step_weight)
      .to(step_adv.device());
}

// The distributed phases read and write O(n_groups * K) arrays and make one pass over the
// (B, K) rewards: like mixing, the CPU kernels run on host copies (one place for SPEC §3),
// after the device checks of a CUDA kernel; the results come back to the call's device, where
// an NCCL all-reduce wants them.
namespace phase {
using opt_tensor = c10::optional<at::Tensor>;

at::Tensor host(const at::Tensor& t) { return t.cpu(); }
opt_tensor host(const opt_tensor& t) { return t.has_value() && t->defined() ? opt_tensor(t->cpu()) : t; }

/// Every tensor argument on the leading tensor's (current) device, as in the other CUDA ops.
void check_devices(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (const auto& t : tensors)
    if (t.first->defined()) cuda_backend::check_device(*t.first, t.second);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_partials_cuda(const at::Tensor& rewards,
                                                                               int64_t group_size,
                                                                               const opt_tensor& group_ids,
                                                                               int64_t n_groups, int64_t first_row) {
  const auto device_guard = cuda_backend::guard(rewards);
  detail::check_matrix<cuda_backend>(rewards, "rewards", "(B, K)");
  if (group_ids.has_value()) check_devices({{&*group_ids, "group_ids"}});
  auto out = impl::group_partials<cpu_backend>(host(rewards), group_size, host(group_ids), n_groups, first_row);
  const at::Device d = rewards.device();
  return {std::get<0>(out).to(d), std::get<1>(out).to(d), std::get<2>(out).to(d), std::get<3>(out).to(d)};
}

at::Tensor group_deviations_cuda(const at::Tensor& rewards, int64_t group_size, const opt_tensor& group_ids,
                                 int64_t n_groups, const at::Tensor& count, const at::Tensor& sum, int64_t first_row) {
  const auto device_guard = cuda_backend::guard(rewards);
  detail::check_matrix<cuda_backend>(rewards, "rewards", "(B, K)");
  if (group_ids.has_value()) check_devices({{&*group_ids, "group_ids"}});
  check_devices({{&count, "count"}, {&sum, "sum"}});
  return impl::group_deviations<cpu_backend>(host(rewards), group_size, host(group_ids), n_groups, host(count),
                                             host(sum), first_row)
      .to(rewards.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_group_advantages_cuda(
    const at::Tensor& rewards, int64_t group_size, const opt_tensor& group_ids, int64_t n_groups,
    const at::Tensor& count, const at::Tensor& sum, const at::Tensor& min, const at::Tensor& max,
    const at::Tensor& sq_dev, int64_t first_row, c10::string_view norm, bool unbiased_std, double eps,
    c10::string_view singleton) {
  const auto device_guard = cuda_backend::guard(rewards);
  detail::check_matrix<cuda_backend>(rewards, "rewards", "(B, K)");
  if (group_ids.has_value()) check_devices({{&*group_ids, "group_ids"}});
  check_devices({{&count, "count"}, {&sum, "sum"}, {&min, "min"}, {&max, "max"}, {&sq_dev, "sq_dev"}});
  auto out = impl::finalize_group_advantages<cpu_backend>(host(rewards), group_size, host(group_ids), n_groups,
                                                          host(count), host(sum), host(min), host(max), host(sq_dev),
                                                          first_row, norm, unbiased_std, eps, singleton);
  const at::Device d = rewards.device();
  return {std::get<0>(out).to(d), std::get<1>(out).to(d), std::get<2>(out).to(d)};
}

at::Tensor finish_advantage_std_cuda(const at::Tensor& stats, const at::Tensor& advantage_sums) {
  const auto device_guard = cuda_backend::guard(stats);
  detail::check_matrix<cuda_backend>(stats, "stats", "(6, K)");
  check_devices({{&advantage_sums, "advantage_sums"}});
  return impl::finish_advantage_std<cpu_backend>(host(stats), host(advantage_sums)).to(stats.device());
}

at::Tensor loss_counts_cuda(const at::Tensor& mask, const opt_tensor& step) {
  const auto device_guard = cuda_backend::guard(mask);
  detail::check_matrix<cuda_backend>(mask, "mask", "(B, T)");
  if (step.has_value()) check_devices({{&*step, "step"}});
  return impl::loss_counts<cpu_backend>(host(mask), host(step)).to(mask.device());
}
}  // namespace phase

}  // namespace

void register_cuda_kernels(torch::Library& m) {
  m.impl("segment_steps", TORCH_FN(impl::segment_steps<cuda_backend>));
  m.impl("step_rewards", TORCH_FN(impl::step_rewards<cuda_backend>));
  m.impl("group_advantages", TORCH_FN(impl::group_advantages<cuda_backend>));
  m.impl("outcome_advantages", TORCH_FN(impl::outcome_advantages<cuda_backend>));
  m.impl("mix_advantages", TORCH_FN(mix_advantages_cuda));
  m.impl("broadcast_step_advantages", TORCH_FN(impl::broadcast_step_advantages<cuda_backend>));
  m.impl("broadcast_outcome_advantages", TORCH_FN(impl::broadcast_outcome_advantages<cuda_backend>));
  m.impl("policy_loss_fwd", TORCH_FN(impl::policy_loss_fwd<cuda_backend>));
  m.impl("group_partials", TORCH_FN(phase::group_partials_cuda));
  m.impl("group_deviations", TORCH_FN(phase::group_deviations_cuda));
  m.impl("finalize_group_advantages", TORCH_FN(phase::finalize_group_advantages_cuda));
  m.impl("finish_advantage_std", TORCH_FN(phase::finish_advantage_std_cuda));
  m.impl("loss_counts", TORCH_FN(phase::loss_counts_cuda));
}

}  // namespace libtorch
}  // namespace sapo
