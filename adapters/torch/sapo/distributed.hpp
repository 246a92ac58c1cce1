/// \file distributed.hpp
/// \brief LibTorch adapter, data-parallel part: group advantages when the responses of one
/// group sit on different ranks, and the policy loss with global normalizers, through a
/// c10d process group (gloo: CPU tensors). The protocol and what is all-reduced:
/// docs/distributed.md; the core phases: sapo/advantages.hpp.
///
/// \code
///   #include <sapo/distributed.hpp>
///   c10::intrusive_ptr<c10d::ProcessGroup> pg = ...;    // e.g. a c10d::ProcessGroupGloo
///   auto adv = sapo::libtorch::distributed_group_advantages(rewards, group_ids, n_groups, {}, pg);
///   sapo::libtorch::loss_inputs in;  // logp, old_logp, mask, step, step_advantages = adv.adv
///   auto out = sapo::libtorch::distributed_policy_loss(in, {}, pg);
///   out.loss.backward();  // this rank's rows of the gradient of the whole batch's loss
/// \endcode
///
/// Every rank must call these functions in the same order with the same n_groups, K and
/// options (collectives). An input rejected on one rank (Inf reward, unknown group id, bad
/// mask) is reported on every rank: the error travels in the first all-reduce, so no rank is
/// left waiting for the others.
///
/// The process group: c10d::ProcessGroup (libtorch 1.13 and 2.x), or anything with the
/// c10d allreduce(std::vector<at::Tensor>&, const c10d::AllreduceOptions&) call through
/// all_reduce_over (e.g. a 2.x c10d::Backend such as ProcessGroupGloo), or any all_reduce_fn.
/// The tensors reduced are small CPU tensors (float64 / int64), O(n_groups * K).
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <sapo/torch.hpp>

namespace sapo {
namespace libtorch {

enum class reduce_op { sum, min, max };

/// Reduces a contiguous CPU tensor in place over every rank.
using all_reduce_fn = std::function<void(at::Tensor& t, reduce_op op)>;

/// An all_reduce_fn over a c10d process group (blocking: waits for the work).
template <class Group>
all_reduce_fn all_reduce_over(const c10::intrusive_ptr<Group>& group) {
  TORCH_CHECK(group, "sapo: the process group is null");
  return [group](at::Tensor& t, reduce_op op) {
    std::vector<at::Tensor> tensors{t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == reduce_op::sum ? c10d::ReduceOp::SUM : op == reduce_op::min ? c10d::ReduceOp::MIN
                                                                                  : c10d::ReduceOp::MAX;
    group->allreduce(tensors, o)->wait();
  };
}

namespace detail_dist {

inline at::Tensor cpu_f64(int64_t n) { return at::zeros({n}, detail::cpu(at::kDouble)); }

/// Runs `local` (this rank's validation and partial sums); its error, if any, goes to every
/// rank through `flag` (a slot of the next SUM all-reduce) instead of leaving the others
/// waiting. Returns the local error message ("" if none).
template <class F>
std::string capture(F&& local) {
  try {
    local();
  } catch (const std::exception& e) {
    return e.what()[0] ? e.what() : "error";
  }
  return {};
}

/// After the all-reduce that carried the flags: throws on every rank if any rank failed.
inline void raise_if_failed(double failed_ranks, const std::string& mine, const char* stage) {
  if (!mine.empty()) TORCH_CHECK(false, "sapo ", stage, ": this rank's input was rejected: ", mine);
  TORCH_CHECK(failed_ranks == 0, "sapo ", stage, ": ", failed_ranks,
              " other rank(s) rejected their input (see their error)");
}

/// The three phases of sapo/advantages.hpp with their all-reduces, in compute type T.
/// Four all-reduces: [count, sum, error] SUM and [min, -max] MIN (round 1, packed so that
/// round 1 costs two), sq_dev SUM (round 2), [sum A, sum A^2] SUM (advantage_std).
template <class T>
advantage_stats run_advantages(const at::Tensor& r, const group_slice& slice, const advantage_options& o,
                               at::Tensor& adv, const all_reduce_fn& reduce) {
  const int64_t K = r.size(1), n_groups = slice.n_groups;
  const auto view = detail::mat<const T>(r);
  const int64_t n = (n_groups + 1) * K;
  group_partials p;
  const std::string err = capture([&] { p = local_group_partials(view, slice); });

  at::Tensor sums = cpu_f64(2 * n + 1), extremes = cpu_f64(2 * n);
  double* s = sums.data_ptr<double>();
  double* e = extremes.data_ptr<double>();
  if (err.empty()) {
    for (int64_t j = 0; j < n; ++j) {
      // Counts travel as doubles: exact below 2^53, and one all-reduce instead of two.
      s[j] = static_cast<double>(p.count[size_t(j)]);
      s[n + j] = p.sum[size_t(j)];
      e[j] = p.min[size_t(j)];
      e[n + j] = -p.max[size_t(j)];  // max = -min(-x): MIN reduces both halves
    }
  } else {
    s[2 * n] = 1;
    extremes.fill_(std::numeric_limits<double>::infinity());
  }
  reduce(sums, reduce_op::sum);
  reduce(extremes, reduce_op::min);
  s = sums.data_ptr<double>();  // an all_reduce_fn may hand back new storage
  e = extremes.data_ptr<double>();
  raise_if_failed(s[2 * n], err, "distributed_group_advantages");

  for (int64_t j = 0; j < n; ++j) {
    p.count[size_t(j)] = static_cast<int64_t>(s[j]);
    p.sum[size_t(j)] = s[n + j];
    p.min[size_t(j)] = e[j];
    p.max[size_t(j)] = -e[n + j];
  }
  detail::call_kernel([&] { local_group_deviations(view, slice, p); });
  at::Tensor sq = at::from_blob(p.sq_dev.data(), {n}, detail::cpu(at::kDouble)).clone();
  reduce(sq, reduce_op::sum);
  std::copy(sq.data_ptr<double>(), sq.data_ptr<double>() + n, p.sq_dev.begin());

  advantage_sums local;
  advantage_stats stats = detail::call_kernel(
      [&] { return finalize_group_advantages(view, slice, p, o, detail::mat<T>(adv), local); });
  at::Tensor a = cpu_f64(2 * K);
  std::copy(local.sum.begin(), local.sum.end(), a.data_ptr<double>());
  std::copy(local.sum_sq.begin(), local.sum_sq.end(), a.data_ptr<double>() + K);
  reduce(a, reduce_op::sum);
  advantage_sums total;
  total.sum.assign(a.data_ptr<double>(), a.data_ptr<double>() + K);
  total.sum_sq.assign(a.data_ptr<double>() + K, a.data_ptr<double>() + 2 * K);
  finish_advantage_std(stats, total);
  return stats;
}

/// rewards (B, K) on any device -> advantages in its dtype and device; the work runs on CPU.
inline advantage_result advantages(const at::Tensor& rewards, const group_slice& slice, const advantage_options& o,
                                   const all_reduce_fn& reduce) {
  detail::check_matrix(rewards, "rewards", "(B, K)");
  detail::check_float(rewards, "rewards");
  const int64_t B = rewards.size(0), K = rewards.size(1);
  TORCH_CHECK(K >= 1 && K <= max_steps, "rewards must have K in [1, ", max_steps, "] columns, got shape ",
              detail::shape_str(rewards.sizes()));
  TORCH_CHECK(slice.n_groups > 0, "n_groups must be > 0 (the number of groups over every rank), got ",
              slice.n_groups);
  // Option errors are the same on every rank: raise them before any collective.
  detail::call_kernel([&] { sapo::detail::check_advantage_options(o); });
  const at::ScalarType ct = detail::compute_type(rewards.scalar_type());
  const at::Tensor r = detail::as_dtype(rewards.to(at::kCPU), ct);
  at::Tensor adv = at::empty({B, K}, detail::cpu(ct));
  const advantage_stats s = ct == at::kDouble ? run_advantages<double>(r, slice, o, adv, reduce)
                                              : run_advantages<float>(r, slice, o, adv, reduce);
  return {adv.to(rewards.device(), rewards.scalar_type()), detail::advantage_stats_tensor(s, K)};
}

inline at::Tensor int64_ids(const at::Tensor& group_ids, int64_t B) {
  detail::check_shape(group_ids, "group_ids", "(B)", B);
  detail::check_int(group_ids, "group_ids");
  return group_ids.to(at::kCPU, at::kLong).contiguous();
}

}  // namespace detail_dist

// ---------------------------------------------------------------------------------------
// Group advantages over ranks (SPEC §3 on the whole batch; each rank gets its rows).
// ---------------------------------------------------------------------------------------

/// \brief Step advantages of this rank's rows. rewards (B_local, K) (NaN = absent step),
/// group_ids (B_local) global ids in [0, n_groups) (n_groups: over every rank). Returns
/// adv (B_local, K) in the rewards' dtype and device, and the (6, K) statistics of the
/// whole batch (the same on every rank, advantage_std included).
inline advantage_result distributed_group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids,
                                                     int64_t n_groups, const advantage_options& options,
                                                     const all_reduce_fn& reduce) {
  const at::Tensor ids = detail_dist::int64_ids(group_ids, rewards.dim() >= 1 ? rewards.size(0) : 0);
  const group_slice slice = group_slice::explicit_ids(detail::vec<const int64_t>(ids), n_groups);
  return detail_dist::advantages(rewards, slice, options, reduce);
}
inline advantage_result distributed_group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids,
                                                     int64_t n_groups, const advantage_options& options,
                                                     const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return distributed_group_advantages(rewards, group_ids, n_groups, options, all_reduce_over(pg));
}

/// \brief Contiguous groups of group_size over the global batch; this rank holds global rows
/// [first_row, first_row + B_local) (groups may straddle ranks); n_groups over every rank.
inline advantage_result distributed_group_advantages(const at::Tensor& rewards, int64_t group_size,
                                                     int64_t first_row, int64_t n_groups,
                                                     const advantage_options& options, const all_reduce_fn& reduce) {
  return detail_dist::advantages(rewards, group_slice::contiguous(group_size, first_row, n_groups),
                                 options, reduce);
}
inline advantage_result distributed_group_advantages(const at::Tensor& rewards, int64_t group_size,
                                                     int64_t first_row, int64_t n_groups,
                                                     const advantage_options& options,
                                                     const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return distributed_group_advantages(rewards, group_size, first_row, n_groups, options, all_reduce_over(pg));
}

/// \brief Outcome mode (K = 1): rewards (B_local) -> adv (B_local), stats (6, 1).
inline advantage_result distributed_outcome_advantages(const at::Tensor& rewards, const at::Tensor& group_ids,
                                                       int64_t n_groups, const advantage_options& options,
                                                       const all_reduce_fn& reduce) {
  detail::check_vector(rewards, "rewards", "(B)");
  advantage_result r = distributed_group_advantages(rewards.unsqueeze(1), group_ids, n_groups, options, reduce);
  r.adv = r.adv.squeeze(1);
  return r;
}
inline advantage_result distributed_outcome_advantages(const at::Tensor& rewards, const at::Tensor& group_ids,
                                                       int64_t n_groups, const advantage_options& options,
                                                       const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return distributed_outcome_advantages(rewards, group_ids, n_groups, options, all_reduce_over(pg));
}

// ---------------------------------------------------------------------------------------
// The policy loss with global normalizers.
// ---------------------------------------------------------------------------------------

/// \brief The loss_counts of every rank added up (one all-reduce). The local counts come
/// from the mask and step ids; under nonfinite_policy::mask from a local forward pass of the
/// loss (what it drops is known only then).
inline loss_counts distributed_loss_counts(const loss_inputs& in, const loss_options& options,
                                           const all_reduce_fn& reduce) {
  loss_counts c;
  const std::string err = detail_dist::capture([&] {
    detail::check_matrix(in.mask, "mask", "(B, T)");
    detail::check_mask_dtype(in.mask, "mask");
    const int64_t B = in.mask.size(0), T = in.mask.size(1);
    if (options.nonfinite == nonfinite_policy::mask) {
      loss_inputs plain = in;  // the counts only: no autograd
      plain.logp = in.logp.detach();
      c = loss_counts_of(policy_loss_forward(plain, options).result(), B);
      return;
    }
    const at::Tensor m = detail::mask_for_kernel(in.mask.to(at::kCPU));
    at::Tensor s;
    if (in.step.defined()) {
      detail::check_shape(in.step, "step", "(B, T)", B, T);
      detail::check_int(in.step, "step");
      s = detail::step_for_kernel(in.step.to(at::kCPU));
    }
    detail::visit_mask(m, [&](auto mv) {
      c = detail::call_kernel([&] {
        return s.defined() ? count_loss_normalizers(mv, detail::mat<const int32_t>(s)) : count_loss_normalizers(mv);
      });
    });
  });
  at::Tensor t = at::zeros({5}, detail::cpu(at::kLong));
  int64_t* v = t.data_ptr<int64_t>();
  if (err.empty()) {
    v[0] = c.tokens;
    v[1] = c.sequences;
    v[2] = c.steps;
    v[3] = c.rows;
  } else {
    v[4] = 1;
  }
  reduce(t, reduce_op::sum);
  v = t.data_ptr<int64_t>();
  detail_dist::raise_if_failed(static_cast<double>(v[4]), err, "distributed_loss_counts");
  loss_counts global;
  global.tokens = v[0];
  global.sequences = v[1];
  global.steps = v[2];
  global.rows = v[3];
  return global;
}
inline loss_counts distributed_loss_counts(const loss_inputs& in, const loss_options& options,
                                           const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return distributed_loss_counts(in, options, all_reduce_over(pg));
}

/// \brief `options` with global_tokens / global_sequences / global_steps set from the
/// all-reduced counts (any global_* given in `options` is replaced).
inline loss_options distributed_loss_normalizers(const loss_inputs& in, const loss_options& options,
                                                 const all_reduce_fn& reduce) {
  loss_options o = options;
  set_global_normalizers(o, distributed_loss_counts(in, options, reduce));
  return o;
}
inline loss_options distributed_loss_normalizers(const loss_inputs& in, const loss_options& options,
                                                 const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return distributed_loss_normalizers(in, options, all_reduce_over(pg));
}

/// \brief policy_loss of this rank's rows with the global normalizers: the rank losses add
/// up to the loss of the whole batch, and loss.backward() gives this rank's rows of its
/// gradient. The diagnostics are this rank's (local means). Note that DDP averages
/// gradients over the W ranks: multiply this loss by W there to get the whole-batch gradient.
inline policy_loss_output distributed_policy_loss(const loss_inputs& in, const loss_options& options,
                                                  const all_reduce_fn& reduce) {
  return policy_loss(in, distributed_loss_normalizers(in, options, reduce));
}
inline policy_loss_output distributed_policy_loss(const loss_inputs& in, const loss_options& options,
                                                  const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return distributed_policy_loss(in, options, all_reduce_over(pg));
}

}  // namespace libtorch
}  // namespace sapo
