/// \file pipeline.hpp
/// \brief The advantage pipeline in one call: segment_steps -> step_rewards ->
/// group_advantages -> token advantages (SPEC §1-3).
///
/// \code
///   sapo::pipeline_options opt;
///   opt.segment = seg;                               // K, layout, SID ranges, threads
///   sapo::step_advantage_pipeline(tokens, mask, targets, sapo::group_layout::contiguous(G), opt,
///                                 {{step, n_steps, codes, malformed}, rewards, adv, token_adv});
/// \endcode
///
/// It writes what the four calls write, bit for bit. It is faster than them because the last
/// stage trusts the step ids the first one wrote (ids in [-1, K), -1 on every masked-out
/// token): the token broadcast reads only the step ids, where broadcast_step_advantages, which
/// takes step ids from anywhere, first validates them against the mask and then reads both
/// again -- three more passes over (B, T) arrays.
#pragma once

#include <cstdint>
#include <type_traits>

#include "advantages.hpp"
#include "checks.hpp"
#include "dispatch.hpp"
#include "parallel.hpp"
#include "rewards.hpp"
#include "simd.hpp"
#include "segment.hpp"
#include "view.hpp"

namespace sapo {

struct pipeline_options {
  segment_options segment;  ///< K, layout, SID ranges; its num_threads is every stage's
  reward_options reward;
  advantage_options advantage;
};

/// Caller-allocated outputs, any strides. R is float or double.
template <class R>
struct pipeline_outputs {
  segment_outputs segment;       ///< step (B, T), n_steps (B), codes (B, K), malformed (B)
  mat_view<R> rewards;           ///< (B, K) step rewards
  mat_view<R> advantages;        ///< (B, K) A[i,k]
  mat_view<R> token_advantages;  ///< (B, T) A[i, step[i,t]] on response tokens, else 0; empty = not wanted
};

struct pipeline_result {
  segment_stats segment;
  advantage_stats advantage;
};

namespace detail {
inline namespace SAPO_ISA_NAMESPACE {

/// token_adv[i,t] = A[i, step[i,t]] for step ids the pipeline wrote itself (-1 -> 0): no mask
/// and no range check needed. A row's A is a table indexed by step + 1: with float lanes on
/// AVX2 / AVX-512 a lane permute looks up a table of up to 8 / 16 slots, a gather a larger one.
template <class A, class O>
void broadcast_own_step_ids(mat_view<A> adv, mat_view<const int32_t> step, mat_view<O> token_adv, int num_threads) {
  const int64_t B = step.rows, T = step.cols, K = adv.cols;
  const row_chunks chunks(B, T);
  parallel_for_chunks(chunks.count, num_threads, [&](int64_t c) {
    // Slot 0: no step. The permute reads register_table_slots slots whatever K.
    alignas(64) O table[max_steps + 1] = {};
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      for (int64_t k = 0; k < K; ++k) table[k + 1] = static_cast<O>(adv(i, k));
      const int32_t* s = step.data + i * step.row_stride;
      O* out = token_adv.data + i * token_adv.row_stride;
      if (step.col_stride == 1 && token_adv.col_stride == 1) {
        int64_t t = 0;
#if SAPO_HAS_XSIMD
        if constexpr (simd::vector_ints<O>) {
          using I = simd::ipack;  // as many lanes as float
          constexpr int64_t W = static_cast<int64_t>(I::size);
          if (K + 1 <= simd::register_table_slots<O>)
            for (; t + W <= T; t += W)
              simd::store(out + t, simd::lookup_register(table, I::load_unaligned(s + t) + I(1)));
          else
            for (; t + W <= T; t += W) simd::store(out + t, simd::gather(table, I::load_unaligned(s + t) + I(1)));
        }
#endif
        for (; t < T; ++t) out[t] = table[s[t] + 1];
      } else {
        for (int64_t t = 0; t < T; ++t) out[t * token_adv.col_stride] = table[s[t * step.col_stride] + 1];
      }
    }
  });
}

}  // namespace SAPO_ISA_NAMESPACE
}  // namespace detail

namespace dispatch {
/// (advantage, output) types of the dispatched token broadcast.
using broadcast_types = type_list<types<const float, float>, types<const double, double>>;
/// broadcast_own_step_ids on the active instruction set (src/dispatch.cpp).
template <class A, class O>
void broadcast_own_step_ids(mat_view<A> adv, mat_view<const int32_t> step, mat_view<O> token_adv, int num_threads);
}  // namespace dispatch

inline namespace SAPO_ENTRY_NAMESPACE {

/// \brief segment_steps, step_rewards, group_advantages and the token broadcast in one call.
/// \param tokens  (B, T) token ids (any integer type)
/// \param mask    (B, T) 1 = response token, 0 = prompt/padding
/// \param targets (B, K) target SID codes of each response's prompt
/// \param groups  contiguous groups of G or explicit ids
/// \param options the three stages' options (segment.num_threads serves them all)
/// \param out     see pipeline_outputs
///
/// Every check that needs no data runs before anything is written, then segment_steps checks
/// the mask before it writes: a rejected argument leaves every output untouched.
template <class Id, class M, class Y, class R>
pipeline_result step_advantage_pipeline(mat_view<Id> tokens, mat_view<M> mask, mat_view<Y> targets,
                                        const group_layout& groups, const pipeline_options& options,
                                        const pipeline_outputs<R>& out) {
  static_assert(std::is_floating_point<R>::value, "rewards and advantages must be float or double");
  const int64_t B = tokens.rows, T = tokens.cols, K = options.segment.num_steps;
  detail::check_num_steps("options.segment.num_steps (K)", K);
  detail::check_shape("targets", targets, B, K);
  detail::check_shape("out.rewards", out.rewards, B, K);
  detail::check_output("out.rewards", out.rewards);
  detail::check_shape("out.advantages", out.advantages, B, K);
  detail::check_output("out.advantages", out.advantages);
  const bool broadcast = !out.token_advantages.empty();
  if (broadcast) {
    detail::check_shape("out.token_advantages", out.token_advantages, B, T);
    detail::check_output("out.token_advantages", out.token_advantages);
  }
  detail::check_reward_options(options.reward, K);
  detail::check_advantage_options(options.advantage);
  int64_t n_groups = 0;
  detail::resolve_groups(groups, B, n_groups);

  pipeline_result r;
  r.segment = segment_steps(tokens, mask, options.segment, out.segment);
  const segment_outputs& seg = out.segment;
  step_rewards(mat_view<const int64_t>(seg.codes), vec_view<const uint8_t>(seg.malformed), targets, options.reward,
               out.rewards);
  r.advantage = group_advantages(mat_view<const R>(out.rewards), groups, options.advantage, out.advantages);
  if (broadcast) {
    const mat_view<const R> adv(out.advantages);
    const mat_view<const int32_t> step(seg.step);
#ifdef SAPO_USE_DISPATCH
    if constexpr (dispatch::contains<dispatch::types<const R, R>, dispatch::broadcast_types>::value)
      dispatch::broadcast_own_step_ids(adv, step, out.token_advantages, options.segment.num_threads);
    else
#endif
      detail::broadcast_own_step_ids(adv, step, out.token_advantages, options.segment.num_threads);
  }
  return r;
}

}  // namespace SAPO_ENTRY_NAMESPACE

}  // namespace sapo
