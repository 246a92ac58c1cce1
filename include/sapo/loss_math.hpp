/// \file loss_math.hpp
/// \brief SPEC §4 for one token: importance ratio, clipped surrogate, KL penalty and their
/// derivatives with respect to logp. Shared by the CPU loops and the CUDA kernels.
#pragma once

#include <cmath>

#include "config.hpp"

namespace sapo {

enum class ratio_level {
  token,     ///< rho = exp(delta) (default)
  step,      ///< geometric mean over the step, GSPO-token form
  sequence,  ///< geometric mean over the response (GSPO)
};

enum class kl_estimator { k1, k2, k3 };

namespace detail {

constexpr double log_ratio_bound = 20.0;  // delta and the k3 argument are clamped to +-20
constexpr double k3_bound = 10.0;         // k3 itself is clamped to +-10

SAPO_HOST_DEVICE double clamp(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }

/// delta = clamp(logp - old_logp, -20, 20).
SAPO_HOST_DEVICE double clamped_log_ratio(double logp, double old_logp) {
  return clamp(logp - old_logp, -log_ratio_bound, log_ratio_bound);
}

/// d delta / d logp: the clamp passes the gradient on its closed interval (as torch.clamp).
SAPO_HOST_DEVICE double log_ratio_slope(double logp, double old_logp) {
  const double d = logp - old_logp;
  return (d >= -log_ratio_bound && d <= log_ratio_bound) ? 1.0 : 0.0;
}

struct clip_params {
  double low = 0.2, high = 0.2;  // rho is clipped to [1 - low, 1 + high]
  bool dual = false;
  double dual_c = 3.0;
};

/// Which branch of the surrogate won, for the clip fractions.
enum class branch : unsigned char { unclipped, clipped_low, clipped_high, clipped_inside, dual };

struct surrogate_value {
  double loss;   // l
  double slope;  // dl / dlogp
  branch won;
};

/// l = max(-a rho, -a clip(rho, 1-low, 1+high)); for a < 0 with dual clip, min(l, -a c).
/// dl/dlogp = -a rho dlogrho on the unclipped branch (ties included), 0 on a clipped one,
/// where dlogrho = d log(rho) / d logp (1, or 0 where the delta clamp bites).
SAPO_HOST_DEVICE surrogate_value clipped_surrogate(double a, double rho, double dlogrho, const clip_params& c) {
  const double clipped_rho = clamp(rho, 1.0 - c.low, 1.0 + c.high);
  const double unclipped = -a * rho;
  const double clipped = -a * clipped_rho;
  surrogate_value v;
  if (unclipped >= clipped) {
    v = {unclipped, -a * rho * dlogrho, branch::unclipped};
  } else {
    v = {clipped, 0.0,
         rho < 1.0 - c.low ? branch::clipped_low : (rho > 1.0 + c.high ? branch::clipped_high : branch::clipped_inside)};
  }
  if (c.dual && a < 0) {
    const double cap = -a * c.dual_c;
    if (cap < v.loss) v = {cap, 0.0, branch::dual};
  }
  return v;
}

struct kl_value {
  double k;      // the estimator's value
  double slope;  // dk / dlogp
};

/// KL to the reference with delta = ref_logp - logp:
///   k1 = -delta,                       dk/dlogp = 1
///   k2 = delta^2 / 2,                  dk/dlogp = -delta
///   k3 = exp(delta) - delta - 1,       dk/dlogp = 1 - exp(delta)  (0 where a clamp bites)
SAPO_HOST_DEVICE kl_value kl_penalty(double logp, double ref_logp, kl_estimator est) {
  const double delta = ref_logp - logp;
  switch (est) {
    case kl_estimator::k1: return {-delta, 1.0};
    case kl_estimator::k2: return {0.5 * delta * delta, -delta};
    case kl_estimator::k3: break;
  }
  const double dc = clamp(delta, -log_ratio_bound, log_ratio_bound);
  const double k = std::exp(dc) - dc - 1.0;
  const bool inside = delta >= -log_ratio_bound && delta <= log_ratio_bound && k >= -k3_bound && k <= k3_bound;
  return {clamp(k, -k3_bound, k3_bound), inside ? 1.0 - std::exp(delta) : 0.0};
}

}  // namespace detail
}  // namespace sapo
