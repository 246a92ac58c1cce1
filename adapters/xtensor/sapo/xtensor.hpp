/// \file xtensor.hpp
/// \brief xtensor 0.24 adapter: sapo views over xtensor storage (no copies) and thin
/// wrappers that call the sapo kernels with xtensor arguments.
///
/// \code
///   #include <sapo/xtensor.hpp>
///   xt::xtensor<double, 2> rewards({B, K}), A({B, K});
///   auto stats = sapo::xtensor::group_advantages(rewards, sapo::group_layout::contiguous(G), {}, A);
///   auto v = sapo::xtensor::matrix_view(xt::view(big, xt::range(0, B), xt::range(2, 2 + K)), "rewards");
/// \endcode
///
/// What can be viewed: anything that exposes its storage as `data()` and `strides()` (in
/// elements) with `shape()`, and optionally `data_offset()` (first element at
/// data() + data_offset()): xt::xtensor, xt::xarray, xt::xtensor_fixed, xt::adapt(...),
/// xt::pytensor / xt::pyarray, and the strided views, i.e. xt::strided_view, xt::transpose
/// and xt::view with integer indices, xt::all(), xt::range(...) (with or without a step).
/// Row-major, column-major and any other strides work alike.
///
/// What cannot: expressions without storage (`a + b`, xt::cast, xt::broadcast) and views
/// that are not strided (xt::view with xt::keep / xt::drop). Viewing one is a compile-time
/// error; evaluate it first, `xt::xtensor<double, 2> x = a + b;` (or xt::eval).
///
/// xtensor ranks are checked at run time: a wrong rank throws sapo::error naming the
/// argument, the expected rank and the actual one (with the shape).
///
/// Views do not own anything: keep the container alive while a view is in use. For that
/// reason matrix_view() and vector_view() refuse a temporary xarray/xtensor/xtensor_fixed;
/// the kernel wrappers below accept temporaries, because those live until the call returns.
/// Outputs of the wrappers must already have the right shape: they are never resized.
#pragma once

#include <xtensor/xexpression.hpp>
#include <xtensor/xtensor_forward.hpp>

#include <cstdint>
#include <sstream>
#include <type_traits>
#include <utility>

#include <sapo/sapo.hpp>

namespace sapo {
namespace xtensor {

namespace detail {

template <class E>
using bare = std::remove_cv_t<std::remove_reference_t<E>>;

template <class E, class = void>
struct has_storage : std::false_type {};
template <class E>
struct has_storage<E, std::void_t<decltype(std::declval<E&>().data()), decltype(std::declval<E&>().strides()),
                                  decltype(std::declval<E&>().shape())>>
    : std::is_pointer<decltype(std::declval<E&>().data())> {};

template <class E, class = void>
struct has_data_offset : std::false_type {};
template <class E>
struct has_data_offset<E, std::void_t<decltype(std::declval<E&>().data_offset())>> : std::true_type {};

// Containers that own their elements: a view of a temporary one would dangle.
template <class E>
struct owns_storage : std::false_type {};
template <class EC, xt::layout_type L, class SC, class Tag>
struct owns_storage<xt::xarray_container<EC, L, SC, Tag>> : std::true_type {};
template <class EC, std::size_t N, xt::layout_type L, class Tag>
struct owns_storage<xt::xtensor_container<EC, N, L, Tag>> : std::true_type {};
template <class ET, class S, xt::layout_type L, bool SH, class Tag>
struct owns_storage<xt::xfixed_container<ET, S, L, SH, Tag>> : std::true_type {};

template <class E>
constexpr bool candidate = xt::is_xexpression<bare<E>>::value || has_storage<bare<E>>::value;
template <class... E>
constexpr bool all_candidates = (candidate<E> && ...);

}  // namespace detail

/// True when sapo can address the elements of `E` directly (false for `a + b` and other
/// expressions without storage: evaluate those first).
template <class E>
struct is_viewable : std::integral_constant<bool, detail::has_storage<detail::bare<E>>::value> {};

namespace detail {

template <class E>
using element_t = std::remove_pointer_t<decltype(std::declval<E&>().data())>;

/// Pointer to the first element, shape and strides of a strided expression, rank checked.
template <class E>
auto first_element(E& e, const char* name, std::size_t rank) {
  const auto& shape = e.shape();
  const std::size_t actual = static_cast<std::size_t>(shape.size());
  if (actual != rank) {
    std::ostringstream dims;
    for (std::size_t d = 0; d < actual; ++d) dims << (d ? ", " : "") << shape[d];
    SAPO_CHECK(false, name, "a " << rank << "-D array (rank " << rank << ")",
               "rank " << actual << ", shape (" << dims.str() << ")");
  }
  auto* p = e.data();
  if constexpr (has_data_offset<E>::value) p += e.data_offset();
  return p;
}

#define SAPO_XTENSOR_NO_STORAGE_MESSAGE                                                                        \
  "sapo::xtensor: this expression has no strided storage of its own (for example a + b, xt::cast, a view "   \
  "with xt::keep), so sapo cannot view it without a copy. Evaluate it first: xt::xtensor<double, 2> x = a + b; " \
  "then pass x."

template <class E>
auto matrix_of(E&& e, const char* name) {
  static_assert(has_storage<bare<E>>::value, SAPO_XTENSOR_NO_STORAGE_MESSAGE);
  if constexpr (has_storage<bare<E>>::value) {
    using T = element_t<E>;
    T* p = first_element(e, name, 2);
    const auto& shape = e.shape();
    const auto& strides = e.strides();
    return mat_view<T>(p, static_cast<int64_t>(shape[0]), static_cast<int64_t>(shape[1]),
                       static_cast<int64_t>(strides[0]), static_cast<int64_t>(strides[1]));
  } else {
    return mat_view<const double>();  // not reached: the static_assert above fired
  }
}

template <class E>
auto vector_of(E&& e, const char* name) {
  static_assert(has_storage<bare<E>>::value, SAPO_XTENSOR_NO_STORAGE_MESSAGE);
  if constexpr (has_storage<bare<E>>::value) {
    using T = element_t<E>;
    T* p = first_element(e, name, 1);
    return vec_view<T>(p, static_cast<int64_t>(e.shape()[0]), static_cast<int64_t>(e.strides()[0]));
  } else {
    return vec_view<const double>();  // not reached
  }
}

template <class E>
constexpr void refuse_owning_temporary() {
  static_assert(std::is_lvalue_reference<E>::value || !owns_storage<bare<E>>::value,
                "sapo::xtensor: this would view a temporary xarray/xtensor that is destroyed at the end of the "
                "statement; store it in a variable first");
}

#define SAPO_XTENSOR_READ_ONLY_MESSAGE \
  "sapo::xtensor: an output must be writable (not const, not a view of a const container)"

// The const_cast below only ever removes a const that the static_assert has already
// rejected; it keeps the compiler from piling kernel errors on top of the message.
template <class Out>
auto output_matrix(Out&& out, const char* name) {
  const auto m = matrix_of(std::forward<Out>(out), name);
  using T = std::remove_pointer_t<decltype(m.data)>;
  static_assert(!std::is_const<T>::value, SAPO_XTENSOR_READ_ONLY_MESSAGE);
  using W = std::remove_const_t<T>;
  return mat_view<W>(const_cast<W*>(m.data), m.rows, m.cols, m.row_stride, m.col_stride);
}
template <class Out>
auto output_vector(Out&& out, const char* name) {
  const auto v = vector_of(std::forward<Out>(out), name);
  using T = std::remove_pointer_t<decltype(v.data)>;
  static_assert(!std::is_const<T>::value, SAPO_XTENSOR_READ_ONLY_MESSAGE);
  using W = std::remove_const_t<T>;
  return vec_view<W>(const_cast<W*>(v.data), v.size, v.stride);
}
#undef SAPO_XTENSOR_READ_ONLY_MESSAGE

template <class E>
using value_t = std::remove_const_t<element_t<E>>;

}  // namespace detail

// ------------------------------------------------------------------------------ views

/// mat_view over a rank-2 strided expression; throws sapo::error naming `name` on any
/// other rank. The element type is const when the expression is read-only.
template <class E>
auto matrix_view(E&& e, const char* name = "matrix") {
  detail::refuse_owning_temporary<E>();
  return detail::matrix_of(std::forward<E>(e), name);
}

/// vec_view over a rank-1 strided expression; throws sapo::error naming `name` on any
/// other rank.
template <class E>
auto vector_view(E&& e, const char* name = "vector") {
  detail::refuse_owning_temporary<E>();
  return detail::vector_of(std::forward<E>(e), name);
}

// -------------------------------------------------------------- kernel wrappers
// Each one builds views (rank-checked, named as in the kernel; inputs first, in argument
// order, so the first bad argument is the one reported) and calls the kernel of the same
// name in namespace sapo; see it for the meaning of every argument.

/// sapo::segment_steps: tokens (B, T), mask (B, T) -> step (B, T) int32, n_steps (B)
/// int32, codes (B, K) int64, malformed (B) uint8.
template <class Tok, class Mask, class Step, class NSteps, class Codes, class Malformed,
          std::enable_if_t<detail::all_candidates<Tok, Mask, Step, NSteps, Codes, Malformed>, int> = 0>
segment_stats segment_steps(const Tok& tokens, const Mask& mask, const segment_options& options, Step&& step,
                            NSteps&& n_steps, Codes&& codes, Malformed&& malformed) {
  static_assert(std::is_same<detail::value_t<Step>, int32_t>::value &&
                    std::is_same<detail::value_t<NSteps>, int32_t>::value &&
                    std::is_same<detail::value_t<Codes>, int64_t>::value &&
                    std::is_same<detail::value_t<Malformed>, uint8_t>::value,
                "sapo::xtensor::segment_steps: outputs are step int32, n_steps int32, codes int64, malformed uint8");
  const auto tokens_v = detail::matrix_of(tokens, "tokens");
  const auto mask_v = detail::matrix_of(mask, "mask");
  segment_outputs out;
  out.step = detail::output_matrix(std::forward<Step>(step), "out.step");
  out.n_steps = detail::output_vector(std::forward<NSteps>(n_steps), "out.n_steps");
  out.codes = detail::output_matrix(std::forward<Codes>(codes), "out.codes");
  out.malformed = detail::output_vector(std::forward<Malformed>(malformed), "out.malformed");
  return ::sapo::segment_steps(tokens_v, mask_v, options, out);
}

/// sapo::step_rewards: codes (B, K), malformed (B), targets (B, K) -> rewards (B, K).
template <class Codes, class Malformed, class Targets, class Rewards,
          std::enable_if_t<detail::all_candidates<Codes, Malformed, Targets, Rewards>, int> = 0>
void step_rewards(const Codes& codes, const Malformed& malformed, const Targets& targets,
                  const reward_options& options, Rewards&& rewards) {
  const auto codes_v = detail::matrix_of(codes, "codes");
  const auto malformed_v = detail::vector_of(malformed, "malformed");
  const auto targets_v = detail::matrix_of(targets, "targets");
  ::sapo::step_rewards(codes_v, malformed_v, targets_v, options,
                       detail::output_matrix(std::forward<Rewards>(rewards), "rewards"));
}

/// sapo::group_advantages: rewards (B, K) -> adv (B, K); returns the per-step statistics.
template <class Rewards, class Adv, std::enable_if_t<detail::all_candidates<Rewards, Adv>, int> = 0>
advantage_stats group_advantages(const Rewards& rewards, const group_layout& groups,
                                 const advantage_options& options, Adv&& adv) {
  const auto rewards_v = detail::matrix_of(rewards, "rewards");
  return ::sapo::group_advantages(rewards_v, groups, options, detail::output_matrix(std::forward<Adv>(adv), "adv"));
}

/// sapo::outcome_advantages (GRPO): rewards (B) -> adv (B).
template <class Rewards, class Adv, std::enable_if_t<detail::all_candidates<Rewards, Adv>, int> = 0>
advantage_stats outcome_advantages(const Rewards& rewards, const group_layout& groups,
                                   const advantage_options& options, Adv&& adv) {
  const auto rewards_v = detail::vector_of(rewards, "rewards");
  return ::sapo::outcome_advantages(rewards_v, groups, options, detail::output_vector(std::forward<Adv>(adv), "adv"));
}

/// sapo::mix_advantages: outcome_adv (B), step_adv (B, K) -> out (B, K).
template <class Outcome, class Steps, class Out,
          std::enable_if_t<detail::all_candidates<Outcome, Steps, Out>, int> = 0>
void mix_advantages(const Outcome& outcome_adv, const Steps& step_adv, mix_weights weights, Out&& out) {
  const auto outcome_v = detail::vector_of(outcome_adv, "outcome_adv");
  const auto step_v = detail::matrix_of(step_adv, "step_adv");
  ::sapo::mix_advantages(outcome_v, step_v, weights, detail::output_matrix(std::forward<Out>(out), "out"));
}

/// sapo::broadcast_step_advantages: adv (B, K), step (B, T), mask (B, T) -> token_adv (B, T).
template <class Adv, class Step, class Mask, class Out,
          std::enable_if_t<detail::all_candidates<Adv, Step, Mask, Out>, int> = 0>
void broadcast_step_advantages(const Adv& adv, const Step& step, const Mask& mask, Out&& token_adv) {
  const auto adv_v = detail::matrix_of(adv, "adv");
  const auto step_v = detail::matrix_of(step, "step");
  const auto mask_v = detail::matrix_of(mask, "mask");
  ::sapo::broadcast_step_advantages(adv_v, step_v, mask_v,
                                    detail::output_matrix(std::forward<Out>(token_adv), "token_adv"));
}

/// sapo::broadcast_outcome_advantages: adv (B), mask (B, T) -> token_adv (B, T).
template <class Adv, class Mask, class Out, std::enable_if_t<detail::all_candidates<Adv, Mask, Out>, int> = 0>
void broadcast_outcome_advantages(const Adv& adv, const Mask& mask, Out&& token_adv) {
  const auto adv_v = detail::vector_of(adv, "adv");
  const auto mask_v = detail::matrix_of(mask, "mask");
  ::sapo::broadcast_outcome_advantages(adv_v, mask_v,
                                       detail::output_matrix(std::forward<Out>(token_adv), "token_adv"));
}

/// sapo::policy_loss with inputs already gathered as views (for ref_logp and the rest);
/// only the gradient is an xtensor object here.
template <class T, class M, class Grad, std::enable_if_t<detail::candidate<Grad>, int> = 0>
loss_result policy_loss(const policy_inputs<T, M>& in, const loss_options& options, Grad&& grad) {
  return ::sapo::policy_loss(in, options, detail::output_matrix(std::forward<Grad>(grad), "grad"));
}

namespace detail {
template <class LogP, class... Same>
constexpr void check_log_prob_types() {
  // Expressions without storage are reported by matrix_of; only check the types here.
  if constexpr (has_storage<bare<LogP>>::value && (has_storage<bare<Same>>::value && ...)) {
    using T = value_t<LogP>;
    static_assert(std::is_floating_point<T>::value, "sapo::xtensor::policy_loss: logp must hold float or double");
    static_assert((std::is_same<T, value_t<Same>>::value && ...),
                  "sapo::xtensor::policy_loss: logp, old_logp and the advantages must share one value type; "
                  "convert first, e.g. xt::xtensor<float, 2> x = xt::cast<float>(a);");
  }
}
}  // namespace detail

/// sapo::policy_loss with token advantages: logp, old_logp, token_advantages, mask all
/// (B, T); grad (B, T) receives d loss / d logp.
template <class LogP, class OldLogP, class Adv, class Mask, class Grad,
          std::enable_if_t<detail::all_candidates<LogP, OldLogP, Adv, Mask, Grad>, int> = 0>
loss_result policy_loss(const LogP& logp, const OldLogP& old_logp, const Adv& token_advantages, const Mask& mask,
                        const loss_options& options, Grad&& grad) {
  detail::check_log_prob_types<LogP, OldLogP, Adv>();
  policy_inputs<detail::value_t<LogP>, detail::value_t<Mask>> in;
  in.logp = detail::matrix_of(logp, "logp");
  in.old_logp = detail::matrix_of(old_logp, "old_logp");
  in.token_advantages = detail::matrix_of(token_advantages, "token_advantages");
  in.mask = detail::matrix_of(mask, "mask");
  return ::sapo::policy_loss(in, options, detail::output_matrix(std::forward<Grad>(grad), "grad"));
}

/// sapo::policy_loss with step advantages: step (B, T) int32 step ids and
/// step_advantages (B, K) replace the token advantages.
template <class LogP, class OldLogP, class Step, class StepAdv, class Mask, class Grad,
          std::enable_if_t<detail::all_candidates<LogP, OldLogP, Step, StepAdv, Mask, Grad>, int> = 0>
loss_result policy_loss(const LogP& logp, const OldLogP& old_logp, const Step& step, const StepAdv& step_advantages,
                        const Mask& mask, const loss_options& options, Grad&& grad) {
  detail::check_log_prob_types<LogP, OldLogP, StepAdv>();
  static_assert(std::is_same<detail::value_t<Step>, int32_t>::value,
                "sapo::xtensor::policy_loss: step ids must be int32 (xt::xtensor<int32_t, 2>)");
  policy_inputs<detail::value_t<LogP>, detail::value_t<Mask>> in;
  in.logp = detail::matrix_of(logp, "logp");
  in.old_logp = detail::matrix_of(old_logp, "old_logp");
  in.step = detail::matrix_of(step, "step");
  in.step_advantages = detail::matrix_of(step_advantages, "step_advantages");
  in.mask = detail::matrix_of(mask, "mask");
  return ::sapo::policy_loss(in, options, detail::output_matrix(std::forward<Grad>(grad), "grad"));
}

#undef SAPO_XTENSOR_NO_STORAGE_MESSAGE

}  // namespace xtensor
}  // namespace sapo
