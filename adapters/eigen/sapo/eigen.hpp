/// \file eigen.hpp
/// \brief Eigen 3.4 adapter: sapo views over Eigen storage (no copies) and thin wrappers
/// that call the sapo kernels with Eigen arguments.
///
/// \code
///   #include <sapo/eigen.hpp>
///   Eigen::MatrixXd rewards(B, K), A(B, K);                  // column-major: fine, no copy
///   auto stats = sapo::eigen::group_advantages(rewards, sapo::group_layout::contiguous(G), {}, A);
///   auto v = sapo::eigen::view(big.block(0, 0, B, K));       // a sapo::mat_view<double> into `big`
/// \endcode
///
/// What can be viewed: every dense Eigen object with direct access to its storage
/// (Eigen::DirectAccessBit): Matrix, Array, Map (with any Stride), Ref, Block, row(),
/// col(), transpose() of those. Storage order does not matter: a column-major matrix
/// becomes a mat_view with row_stride = innerStride() and col_stride = outerStride(),
/// a row-major one the other way round.
///
/// What cannot: expressions that have no storage of their own, such as `a + b`,
/// `m.cast<float>()`, `m.reverse()` or `a.cwiseProduct(b)`. Viewing one is a compile-time
/// error (static_assert). Evaluate it first, `auto x = (a + b).eval();`, and pass `x`.
///
/// Views do not own anything: keep the Eigen object alive while a view is in use. For that
/// reason view(), matrix_view() and vector_view() refuse a temporary Matrix or Array (an
/// rvalue that owns its storage); the kernel wrappers below accept temporaries, because
/// those live until the call returns.
///
/// Outputs of the wrappers must already have the right shape: they are never resized, and
/// the kernel's shape check names the argument if one is wrong.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <type_traits>
#include <utility>

#include <sapo/sapo.hpp>

namespace sapo {
namespace eigen {

namespace detail {

template <class E>
using bare = std::remove_cv_t<std::remove_reference_t<E>>;

// Derived-to-base deduction tells whether E is an Eigen dense object, without
// instantiating Eigen templates on foreign types.
template <class D>
std::true_type dense_test(const Eigen::DenseBase<D>*);
std::false_type dense_test(...);
template <class D>
std::true_type plain_test(const Eigen::PlainObjectBase<D>*);
std::false_type plain_test(...);

template <class E>
constexpr bool is_dense = decltype(dense_test(std::declval<bare<E>*>()))::value;
template <class E>
constexpr bool is_plain = decltype(plain_test(std::declval<bare<E>*>()))::value;

template <class E, bool Dense = is_dense<E>>
struct storage_flags {
  static constexpr bool direct = false;
};
template <class E>
struct storage_flags<E, true> {
  static constexpr bool direct = (bare<E>::Flags & Eigen::DirectAccessBit) != 0;
};

template <class... E>
constexpr bool all_dense = (is_dense<E> && ...);

}  // namespace detail

/// True when `E` is a dense Eigen object whose elements sapo can address directly
/// (false for expressions such as `a + b`: evaluate those with .eval() first).
template <class E>
struct is_viewable : std::integral_constant<bool, detail::storage_flags<E>::direct> {};

namespace detail {

#define SAPO_EIGEN_NO_STORAGE_MESSAGE                                                                    \
  "sapo::eigen: this Eigen expression has no storage of its own (for example a + b, m.cast<float>(), " \
  "m.reverse()), so sapo cannot view it without a copy. Evaluate it first: auto x = (a + b).eval(); "  \
  "then pass x."

template <class E>
using element_t = std::remove_pointer_t<decltype(std::declval<E&>().data())>;

/// (rows, cols) view of any directly accessible dense object, in its own storage order.
template <class E>
auto matrix_of(E&& e) {
  static_assert(is_dense<E>, "sapo::eigen: expected an Eigen dense object (Matrix, Array, Map, Ref, Block)");
  static_assert(!is_dense<E> || storage_flags<E>::direct, SAPO_EIGEN_NO_STORAGE_MESSAGE);
  if constexpr (is_dense<E> && storage_flags<E>::direct) {
    using T = element_t<E>;
    const auto inner = static_cast<int64_t>(e.innerStride());
    const auto outer = static_cast<int64_t>(e.outerStride());
    const auto rows = static_cast<int64_t>(e.rows()), cols = static_cast<int64_t>(e.cols());
    // Column-major: consecutive rows are `inner` apart, consecutive columns `outer`.
    if constexpr (bare<E>::IsRowMajor)
      return mat_view<T>(e.data(), rows, cols, outer, inner);
    else
      return mat_view<T>(e.data(), rows, cols, inner, outer);
  } else {
    return mat_view<const double>();  // not reached: the static_asserts above fired
  }
}

/// 1-D view of an object with one row or one column (checked at run time, named `name`).
template <class E>
auto vector_of(E&& e, const char* name) {
  const auto m = matrix_of(std::forward<E>(e));
  using T = std::remove_pointer_t<decltype(m.data)>;
  SAPO_CHECK(m.rows <= 1 || m.cols <= 1, name, "a vector (one row or one column)",
             "shape (" << m.rows << ", " << m.cols << ")");
  const bool column = m.cols == 1;
  return vec_view<T>(m.data, m.rows * m.cols, column ? m.row_stride : m.col_stride);
}

template <class E>
constexpr void refuse_owning_temporary() {
  static_assert(std::is_lvalue_reference<E>::value || !is_plain<E>,
                "sapo::eigen: this would view a temporary Eigen Matrix/Array that is destroyed at the end of "
                "the statement; store it in a variable first");
}

#define SAPO_EIGEN_READ_ONLY_MESSAGE \
  "sapo::eigen: an output must be writable (not const, not a Map<const ...> or Ref<const ...>)"

/// Writable view for a kernel output; `Out` must not be const or read-only. The const_cast
/// only ever removes a const that the static_assert has already rejected; it keeps the
/// compiler from piling kernel errors on top of the message.
template <class Out>
auto output_matrix(Out&& out) {
  const auto m = matrix_of(std::forward<Out>(out));
  using T = std::remove_pointer_t<decltype(m.data)>;
  static_assert(!std::is_const<T>::value, SAPO_EIGEN_READ_ONLY_MESSAGE);
  using W = std::remove_const_t<T>;
  return mat_view<W>(const_cast<W*>(m.data), m.rows, m.cols, m.row_stride, m.col_stride);
}
template <class Out>
auto output_vector(Out&& out, const char* name) {
  const auto v = vector_of(std::forward<Out>(out), name);
  using T = std::remove_pointer_t<decltype(v.data)>;
  static_assert(!std::is_const<T>::value, SAPO_EIGEN_READ_ONLY_MESSAGE);
  using W = std::remove_const_t<T>;
  return vec_view<W>(const_cast<W*>(v.data), v.size, v.stride);
}
#undef SAPO_EIGEN_READ_ONLY_MESSAGE

}  // namespace detail

// ------------------------------------------------------------------------------ views

/// mat_view over any directly accessible Eigen object (vectors become (n, 1) or (1, n)).
/// The element type is const when the object is const or read-only.
template <class E>
auto matrix_view(E&& e) {
  detail::refuse_owning_temporary<E>();
  return detail::matrix_of(std::forward<E>(e));
}

/// vec_view over an object with one row or one column; throws sapo::error naming `name`
/// when it has more than one of both.
template <class E>
auto vector_view(E&& e, const char* name = "vector") {
  detail::refuse_owning_temporary<E>();
  return detail::vector_of(std::forward<E>(e), name);
}

/// vec_view for Eigen vector types (one dimension fixed to 1 at compile time), mat_view
/// for everything else.
template <class E>
auto view(E&& e) {
  detail::refuse_owning_temporary<E>();
  if constexpr (detail::is_dense<E>) {
    if constexpr (detail::bare<E>::IsVectorAtCompileTime)
      return detail::vector_of(std::forward<E>(e), "vector");
    else
      return detail::matrix_of(std::forward<E>(e));
  } else {
    return detail::matrix_of(std::forward<E>(e));  // fires the "not an Eigen object" assert
  }
}

// -------------------------------------------------------------- kernel wrappers
// Each one builds views and calls the kernel of the same name in namespace sapo; see
// the kernel for the meaning of every argument. Inputs may be any viewable object
// (temporaries included); outputs must be writable and already have the right shape.

/// sapo::segment_steps: tokens (B, T), mask (B, T) -> step (B, T) int32, n_steps (B)
/// int32, codes (B, K) int64, malformed (B) uint8.
template <class Tok, class Mask, class Step, class NSteps, class Codes, class Malformed,
          std::enable_if_t<detail::all_dense<Tok, Mask, Step, NSteps, Codes, Malformed>, int> = 0>
segment_stats segment_steps(const Tok& tokens, const Mask& mask, const segment_options& options, Step&& step,
                            NSteps&& n_steps, Codes&& codes, Malformed&& malformed) {
  static_assert(std::is_same<typename detail::bare<Step>::Scalar, int32_t>::value &&
                    std::is_same<typename detail::bare<NSteps>::Scalar, int32_t>::value &&
                    std::is_same<typename detail::bare<Codes>::Scalar, int64_t>::value &&
                    std::is_same<typename detail::bare<Malformed>::Scalar, uint8_t>::value,
                "sapo::eigen::segment_steps: outputs are step int32, n_steps int32, codes int64, malformed uint8");
  segment_outputs out;
  out.step = detail::output_matrix(std::forward<Step>(step));
  out.n_steps = detail::output_vector(std::forward<NSteps>(n_steps), "out.n_steps");
  out.codes = detail::output_matrix(std::forward<Codes>(codes));
  out.malformed = detail::output_vector(std::forward<Malformed>(malformed), "out.malformed");
  return ::sapo::segment_steps(detail::matrix_of(tokens), detail::matrix_of(mask), options, out);
}

/// sapo::step_rewards: codes (B, K), malformed (B), targets (B, K) -> rewards (B, K).
template <class Codes, class Malformed, class Targets, class Rewards,
          std::enable_if_t<detail::all_dense<Codes, Malformed, Targets, Rewards>, int> = 0>
void step_rewards(const Codes& codes, const Malformed& malformed, const Targets& targets,
                  const reward_options& options, Rewards&& rewards) {
  const auto malformed_v = detail::vector_of(malformed, "malformed");
  ::sapo::step_rewards(detail::matrix_of(codes), malformed_v, detail::matrix_of(targets), options,
                       detail::output_matrix(std::forward<Rewards>(rewards)));
}

/// sapo::group_advantages: rewards (B, K) -> adv (B, K); returns the per-step statistics.
template <class Rewards, class Adv, std::enable_if_t<detail::all_dense<Rewards, Adv>, int> = 0>
advantage_stats group_advantages(const Rewards& rewards, const group_layout& groups,
                                 const advantage_options& options, Adv&& adv) {
  return ::sapo::group_advantages(detail::matrix_of(rewards), groups, options,
                                  detail::output_matrix(std::forward<Adv>(adv)));
}

/// sapo::outcome_advantages (GRPO): rewards (B) -> adv (B).
template <class Rewards, class Adv, std::enable_if_t<detail::all_dense<Rewards, Adv>, int> = 0>
advantage_stats outcome_advantages(const Rewards& rewards, const group_layout& groups,
                                   const advantage_options& options, Adv&& adv) {
  const auto rewards_v = detail::vector_of(rewards, "rewards");
  return ::sapo::outcome_advantages(rewards_v, groups, options, detail::output_vector(std::forward<Adv>(adv), "adv"));
}

/// sapo::mix_advantages: outcome_adv (B), step_adv (B, K) -> out (B, K).
template <class Outcome, class Steps, class Out, std::enable_if_t<detail::all_dense<Outcome, Steps, Out>, int> = 0>
void mix_advantages(const Outcome& outcome_adv, const Steps& step_adv, mix_weights weights, Out&& out) {
  const auto outcome_v = detail::vector_of(outcome_adv, "outcome_adv");
  ::sapo::mix_advantages(outcome_v, detail::matrix_of(step_adv), weights,
                         detail::output_matrix(std::forward<Out>(out)));
}

/// sapo::broadcast_step_advantages: adv (B, K), step (B, T), mask (B, T) -> token_adv (B, T).
template <class Adv, class Step, class Mask, class Out,
          std::enable_if_t<detail::all_dense<Adv, Step, Mask, Out>, int> = 0>
void broadcast_step_advantages(const Adv& adv, const Step& step, const Mask& mask, Out&& token_adv) {
  ::sapo::broadcast_step_advantages(detail::matrix_of(adv), detail::matrix_of(step), detail::matrix_of(mask),
                                    detail::output_matrix(std::forward<Out>(token_adv)));
}

/// sapo::broadcast_outcome_advantages: adv (B), mask (B, T) -> token_adv (B, T).
template <class Adv, class Mask, class Out, std::enable_if_t<detail::all_dense<Adv, Mask, Out>, int> = 0>
void broadcast_outcome_advantages(const Adv& adv, const Mask& mask, Out&& token_adv) {
  const auto adv_v = detail::vector_of(adv, "adv");
  ::sapo::broadcast_outcome_advantages(adv_v, detail::matrix_of(mask),
                                       detail::output_matrix(std::forward<Out>(token_adv)));
}

/// sapo::policy_loss with inputs already gathered as views (for ref_logp and the rest);
/// only the gradient is an Eigen object here.
template <class T, class M, class Grad, std::enable_if_t<detail::is_dense<Grad>, int> = 0>
loss_result policy_loss(const policy_inputs<T, M>& in, const loss_options& options, Grad&& grad) {
  return ::sapo::policy_loss(in, options, detail::output_matrix(std::forward<Grad>(grad)));
}

namespace detail {
template <class LogP, class... Same>
constexpr void check_log_prob_types() {
  using T = typename bare<LogP>::Scalar;
  static_assert(std::is_floating_point<T>::value, "sapo::eigen::policy_loss: logp must hold float or double");
  static_assert((std::is_same<T, typename bare<Same>::Scalar>::value && ...),
                "sapo::eigen::policy_loss: logp, old_logp and the advantages must share one scalar type; "
                "convert with .cast<T>().eval() first");
}
}  // namespace detail

/// sapo::policy_loss with token advantages: logp, old_logp, token_advantages, mask all
/// (B, T); grad (B, T) receives d loss / d logp.
template <class LogP, class OldLogP, class Adv, class Mask, class Grad,
          std::enable_if_t<detail::all_dense<LogP, OldLogP, Adv, Mask, Grad>, int> = 0>
loss_result policy_loss(const LogP& logp, const OldLogP& old_logp, const Adv& token_advantages, const Mask& mask,
                        const loss_options& options, Grad&& grad) {
  detail::check_log_prob_types<LogP, OldLogP, Adv>();
  policy_inputs<typename detail::bare<LogP>::Scalar, typename detail::bare<Mask>::Scalar> in;
  in.logp = detail::matrix_of(logp);
  in.old_logp = detail::matrix_of(old_logp);
  in.token_advantages = detail::matrix_of(token_advantages);
  in.mask = detail::matrix_of(mask);
  return ::sapo::policy_loss(in, options, detail::output_matrix(std::forward<Grad>(grad)));
}

/// sapo::policy_loss with step advantages: step (B, T) int32 step ids and
/// step_advantages (B, K) replace the token advantages.
template <class LogP, class OldLogP, class Step, class StepAdv, class Mask, class Grad,
          std::enable_if_t<detail::all_dense<LogP, OldLogP, Step, StepAdv, Mask, Grad>, int> = 0>
loss_result policy_loss(const LogP& logp, const OldLogP& old_logp, const Step& step, const StepAdv& step_advantages,
                        const Mask& mask, const loss_options& options, Grad&& grad) {
  detail::check_log_prob_types<LogP, OldLogP, StepAdv>();
  static_assert(std::is_same<typename detail::bare<Step>::Scalar, int32_t>::value,
                "sapo::eigen::policy_loss: step ids must be int32 (Eigen::MatrixXi or Matrix<int32_t, ...>)");
  policy_inputs<typename detail::bare<LogP>::Scalar, typename detail::bare<Mask>::Scalar> in;
  in.logp = detail::matrix_of(logp);
  in.old_logp = detail::matrix_of(old_logp);
  in.step = detail::matrix_of(step);
  in.step_advantages = detail::matrix_of(step_advantages);
  in.mask = detail::matrix_of(mask);
  return ::sapo::policy_loss(in, options, detail::output_matrix(std::forward<Grad>(grad)));
}

#undef SAPO_EIGEN_NO_STORAGE_MESSAGE

}  // namespace eigen
}  // namespace sapo
