// Plain double-precision reference of ../shared/SPEC.md (and docs/decisions.md),
// written straight from the text and independently of include/sapo/.
// Slow on purpose: nested std::vector, one obvious loop per formula.
// Every kernel test compares the library against these functions.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace sapo_ref {

using Matrix = std::vector<std::vector<double>>;        // [row][col]
using IntMatrix = std::vector<std::vector<int64_t>>;    // [row][col]

// ---------------------------------------------------------------- §1 segmentation
struct SegmentConfig {
  int K = 0;
  bool think_then_sid = false;                          // false: interleaved layout
  std::vector<std::pair<int64_t, int64_t>> sid_ranges;  // 1 shared range or K per-level ranges, [lo, hi)
  std::vector<int64_t> codes_per_level;                 // empty or K entries (catalogue)
  int64_t think_end_id = -1;                            // think_then_sid only
  bool sid_token_in_step = true;                        // think_then_sid only
  bool tail_last_step = false;                          // false: tail tokens get -1
};
struct SegmentResult {
  IntMatrix step;                 // (B, T), -1 .. K-1
  std::vector<int64_t> n_steps;   // (B)
  IntMatrix codes;                // (B, K), -1 where not found
  std::vector<bool> malformed;    // (B)
};
SegmentResult segment(const IntMatrix& tokens, const IntMatrix& mask, const SegmentConfig& cfg);

// ---------------------------------------------------------------- §2 step rewards
enum class RewardKind { per_level, prefix, weighted_prefix, exact };
Matrix step_rewards(const IntMatrix& codes, const std::vector<bool>& malformed, const IntMatrix& targets,
                    RewardKind kind, const std::vector<double>& weights, double malformed_reward);

// ---------------------------------------------------------------- §3 advantages
enum class Norm { std_eps, std_floor, none, loo, batch_std };
struct AdvantageConfig {
  Norm norm = Norm::std_eps;
  bool unbiased = true;
  double eps = 1e-6;
  bool singleton_raw = false;  // false: singleton pairs get A = 0
};
struct AdvantageStats {           // one entry per step k
  std::vector<double> mean_reward;
  std::vector<double> zero_variance_fraction;
  std::vector<double> advantage_std;
  std::vector<int64_t> n_present;
};
// rewards (B, K), NaN = absent; group_of[i] in [0, n_groups).
Matrix advantages(const Matrix& rewards, const std::vector<int64_t>& group_of, int64_t n_groups,
                  const AdvantageConfig& cfg, AdvantageStats* stats = nullptr);
// A (B, K), step (B, T), mask (B, T) -> token advantages (B, T)
Matrix broadcast(const Matrix& A, const IntMatrix& step, const IntMatrix& mask);

// ---------------------------------------------------------------- §4-6 policy loss
enum class Ratio { token, step, sequence };
enum class KL { k1, k2, k3 };
enum class Agg { token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, step_mean };
struct LossConfig {
  Ratio ratio = Ratio::token;
  double clip_low = 0.2, clip_high = 0.2;
  bool dual_clip = false;
  double dual_clip_c = 3.0;
  double kl_coef = 0.0;
  KL kl = KL::k3;
  Agg agg = Agg::token_mean;
  double max_response_length = 0;  // 0: T
  double num_tokens = 0, num_sequences = 0, num_steps = 0;  // 0: local counts
  bool mask_nonfinite = false;     // false: the caller guarantees finite inputs
};
struct LossResult {
  double loss = 0;
  Matrix grad;  // (B, T) d loss / d logp
  double clip_frac_low = 0, clip_frac_high = 0, clip_frac_dual = 0;
  double ratio_mean = 0, ratio_max = 0;
  double approx_kl_old = 0, approx_kl_old_k3 = 0, kl_ref = 0;
  int64_t n_tokens = 0, n_sequences = 0, n_steps = 0, n_nonfinite_masked = 0;
};
// ref_logp empty: no reference. step empty: allowed only for Ratio::token/sequence and non-step_mean.
// frozen_logp (optional): the point where the stop-gradients of the step/sequence ratio are taken;
// nullptr means logp itself. Finite differences vary logp with frozen_logp fixed.
LossResult policy_loss(const Matrix& logp, const Matrix& old_logp, const Matrix& ref_logp, const Matrix& token_adv,
                       const IntMatrix& step, const IntMatrix& mask, const LossConfig& cfg,
                       const Matrix* frozen_logp = nullptr);

}  // namespace sapo_ref

#include "reference_impl.hpp"
