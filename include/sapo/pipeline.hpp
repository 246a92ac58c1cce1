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

/// token_adv[i,t] = A[i, step[i,t]] for step ids the pipeline wrote itself (-1 -> 0): no mask
/// and no range check needed. A row's A is a table indexed by step + 1.
template <class A, class O>
void broadcast_own_step_ids(mat_view<A> adv, mat_view<const int32_t> step, mat_view<O> token_adv, int num_threads) {
  const int64_t B = step.rows, T = step.cols, K = adv.cols;
  const row_chunks chunks(B, T);
  parallel_for_chunks(chunks.count, num_threads, [&](int64_t c) {
    O table[max_steps + 1] = {};  // slot 0: no step; the SIMD lookup reads 8 slots whatever K
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      for (int64_t k = 0; k < K; ++k) table[k + 1] = static_cast<O>(adv(i, k));
      const int32_t* s = step.data + i * step.row_stride;
      O* out = token_adv.data + i * token_adv.row_stride;
      if (step.col_stride == 1 && token_adv.col_stride == 1) {
        int64_t t = 0;
#if SAPO_HAS_XSIMD && defined(__AVX2__)
        if constexpr (std::is_same<O, float>::value) {
          using I = xsimd::batch<int32_t>;  // as many lanes as float
          if (K + 1 <= 8)
            for (; t + 8 <= T; t += 8) simd::store(out + t, simd::lookup8(table, I::load_unaligned(s + t) + I(1)));
        }
#endif
        for (; t < T; ++t) out[t] = table[s[t] + 1];
      } else {
        for (int64_t t = 0; t < T; ++t) out[t * token_adv.col_stride] = table[s[t * step.col_stride] + 1];
      }
    }
  });
}

}  // namespace detail

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
  if (broadcast)
    detail::broadcast_own_step_ids(mat_view<const R>(out.advantages), mat_view<const int32_t>(seg.step),
                                   out.token_advantages, options.segment.num_threads);
  return r;
}

}  // namespace sapo
