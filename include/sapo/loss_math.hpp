/// \file loss_math.hpp
/// \brief SPEC §4 for one token: importance ratio, clipped surrogate, KL penalty and their
/// derivatives with respect to logp. Written once, branch-free, over a value type V that
/// is a scalar (float, double: the reference-style paths and CUDA) or a SIMD pack
/// (simd.hpp), so every path computes the same formulas.
#pragma once

#include "config.hpp"
#include "simd.hpp"

namespace sapo {

enum class ratio_level {
  token,     ///< rho = exp(delta) (default)
  step,      ///< geometric mean over the step, GSPO-token form
  sequence,  ///< geometric mean over the response (GSPO)
};

enum class kl_estimator { k1, k2, k3 };

namespace detail {
inline namespace SAPO_ISA_NAMESPACE {

constexpr double log_ratio_bound = 20.0;  // delta and the k3 argument are clamped to +-20
constexpr double k3_bound = 10.0;         // k3 itself is clamped to +-10

template <class V>
SAPO_HOST_DEVICE V clamp(V x, V lo, V hi) {
  return simd::min(simd::max(x, lo), hi);
}

template <class V>
struct token_ratio {
  using mask = decltype(V(0) < V(0));
  V delta;     // clamp(logp - old_logp, -20, 20)
  V rho;       // exp(delta)
  mask moves;  // d log(rho) / d logp is 1 (inside the clamp, a closed interval as torch.clamp), else 0
};

template <class V>
SAPO_HOST_DEVICE token_ratio<V> importance_ratio(V logp, V old_logp) {
  const V d = logp - old_logp;
  const V bound(log_ratio_bound);
  const V delta = clamp(d, -bound, bound);
  // The clamp left d alone exactly when d lies in [-bound, bound]: one compare for both ends.
  return {delta, simd::exp(delta), d == delta};
}

struct clip_params {
  double low = 0.2, high = 0.2;  // rho is clipped to [1 - low, 1 + high]
  bool dual = false;
  double dual_c = 3.0;
};

template <class V>
struct surrogate_value {
  using mask = decltype(V(0) < V(0));
  V loss;   // l
  V slope;  // dl / dlogp
  mask clipped;                          // the clipped branch won (strictly): rho < 1-low or rho > 1+high
  mask clipped_low, clipped_high, dual;  // which clipped branch won (strictly)
};

/// l = max(-a rho, -a clip(rho, 1-low, 1+high)); for a < 0 with dual clip, min(l, -a c).
/// dl/dlogp = -a rho on the unclipped branch (ties included) where log(rho) moves with
/// logp (d log(rho) / d logp = 1), 0 on a clipped branch or where it does not (a clamped
/// log-ratio: slope 0).
template <class V, class Mask>
SAPO_HOST_DEVICE surrogate_value<V> clipped_surrogate(V a, V rho, Mask moves, const clip_params& c) {
  const V lo(1.0 - c.low), hi(1.0 + c.high);
  const V unclipped = -a * rho;
  const V clipped = -a * clamp(rho, lo, hi);
  const auto take_clipped = unclipped < clipped;
  // Its complement as a compare of its own (l is finite wherever it matters): negating a
  // SIMD mask costs more than a compare.
  const auto take_unclipped = clipped <= unclipped;
  surrogate_value<V> v{simd::select(take_clipped, clipped, unclipped),
                       simd::select(moves && take_unclipped, unclipped, V(0)), take_clipped,
                       take_clipped && (rho < lo), take_clipped && (rho > hi),
                       typename surrogate_value<V>::mask(false)};
  if (c.dual) {
    const V cap = -a * V(c.dual_c);
    v.dual = (a < V(0)) && (cap < v.loss);
    v.loss = simd::select(v.dual, cap, v.loss);
    v.slope = simd::select(v.dual, V(0), v.slope);
  }
  return v;
}

template <class V>
struct kl_value {
  V k;      // the estimator's value
  V slope;  // dk / dlogp
};

/// KL to the reference with delta = ref_logp - logp:
///   k1 = -delta,                       dk/dlogp = 1
///   k2 = delta^2 / 2,                  dk/dlogp = -delta
///   k3 = exp(delta) - delta - 1,       dk/dlogp = 1 - exp(delta)  (0 where a clamp bites)
template <class V>
SAPO_HOST_DEVICE kl_value<V> kl_penalty(V logp, V ref_logp, kl_estimator est) {
  const V delta = ref_logp - logp;
  if (est == kl_estimator::k1) return {-delta, V(1)};
  if (est == kl_estimator::k2) return {V(0.5) * delta * delta, -delta};
  const V bound(log_ratio_bound), kb(k3_bound);
  const V dc = clamp(delta, -bound, bound);
  const V e = simd::exp(dc);
  const V k = e - dc - V(1);
  // Inside both clamps exp(delta) = exp(dc), so one exponential serves value and slope.
  const auto inside = (delta >= -bound) && (delta <= bound) && (k >= -kb) && (k <= kb);
  return {clamp(k, -kb, kb), simd::select(inside, V(1) - e, V(0))};
}

}  // namespace SAPO_ISA_NAMESPACE
}  // namespace detail
}  // namespace sapo
