/// \file policy_loss.hpp
/// \brief SPEC §4-6: the clipped policy loss with KL penalty and aggregation, in one call
/// that returns the scalar loss, d loss / d logp for every token and the diagnostics.
///
/// \code
///   sapo::policy_inputs<float> in;
///   in.logp = logp; in.old_logp = old_logp; in.mask = mask;
///   in.step = step; in.step_advantages = A;          // or in.token_advantages = token_adv
///   sapo::loss_options opt;                          // token ratio, clip 0.2/0.2, token_mean
///   sapo::loss_result r = sapo::policy_loss(in, opt, grad);   // grad (B, T)
/// \endcode
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.hpp"
#include "dispatch.hpp"
#include "loss_math.hpp"
#include "parallel.hpp"
#include "simd.hpp"
#include "view.hpp"

namespace sapo {

enum class aggregation {
  token_mean,               ///< sum l m / N_tok (default)
  seq_mean_token_mean,      ///< mean_i (sum_t l m / sum_t m)
  seq_mean_token_sum,       ///< mean_i sum_t l m
  seq_mean_token_sum_norm,  ///< sum l m / (B L)
  step_mean,                ///< mean over present steps of the step's mean loss
};

enum class nonfinite_policy {
  error,  ///< throw sapo::error (default)
  mask,   ///< drop the token as if mask = 0 and count it
};

struct loss_options {
  ratio_level ratio = ratio_level::token;
  double clip_low = 0.2;   ///< eps_low in (0, 1)
  double clip_high = 0.2;  ///< eps_high in (0, inf)
  bool dual_clip = false;
  double dual_clip_c = 3.0;  ///< c > 1, used when dual_clip
  double kl_coef = 0.0;      ///< beta; 0 = off
  kl_estimator kl = kl_estimator::k3;
  aggregation agg = aggregation::token_mean;
  double max_response_length = 0;  ///< L of seq_mean_token_sum_norm; 0 = T
  /// Global normalizers for data-parallel use; 0 = the local count.
  double global_tokens = 0, global_sequences = 0, global_steps = 0;
  nonfinite_policy nonfinite = nonfinite_policy::error;
  int num_threads = 0;  ///< worker threads; 0 = every hardware thread. Results do not depend on it.
};

/// Inputs; every (B, T) view may have its own strides. Give either token_advantages or
/// step + step_advantages.
template <class T, class M = T>
struct policy_inputs {
  mat_view<const T> logp;              ///< (B, T) current policy
  mat_view<const T> old_logp;          ///< (B, T) sampling policy
  mat_view<const T> ref_logp;          ///< (B, T) reference policy, optional (needed when kl_coef > 0)
  mat_view<const T> token_advantages;  ///< (B, T) per-token advantages, or
  mat_view<const T> step_advantages;   ///< (B, K) per-step advantages A[i,k], used with step
  mat_view<const int32_t> step;        ///< (B, T) step ids -1..K-1; needed for step ratio / step_mean
  mat_view<const M> mask;              ///< (B, T) 0/1
};

/// Scalar loss and diagnostics (SPEC §6); every mean is over the tokens used.
struct loss_result {
  double loss = 0;
  double clip_frac_low = 0, clip_frac_high = 0, clip_frac_dual = 0;
  double ratio_mean = 0, ratio_max = 0;
  double approx_kl_old = 0;     ///< mean of -delta
  double approx_kl_old_k3 = 0;  ///< mean of exp(-delta) + delta - 1
  double kl_ref = 0;            ///< mean of the KL estimator to the reference (without beta)
  int64_t n_tokens = 0;         ///< local masked tokens used
  int64_t n_sequences = 0;      ///< local rows with at least one token
  int64_t n_steps = 0;          ///< local present (row, step) pairs (0 without step ids)
  int64_t n_nonfinite_masked = 0;
};

namespace detail {

inline void check_loss_options(const loss_options& o) {
  check_enum("options.ratio", o.ratio, ratio_level::sequence);
  check_enum("options.kl", o.kl, kl_estimator::k3);
  check_enum("options.agg", o.agg, aggregation::step_mean);
  check_enum("options.nonfinite", o.nonfinite, nonfinite_policy::mask);
  SAPO_CHECK(o.num_threads >= 0, "options.num_threads", ">= 0 (0 = every hardware thread)", o.num_threads);
  SAPO_CHECK(o.clip_low > 0 && o.clip_low < 1, "options.clip_low", "a value in (0, 1)", o.clip_low);
  SAPO_CHECK(o.clip_high > 0 && std::isfinite(o.clip_high), "options.clip_high", "a value in (0, inf)", o.clip_high);
  if (o.dual_clip)
    SAPO_CHECK(o.dual_clip_c > 1 && std::isfinite(o.dual_clip_c), "options.dual_clip_c", "a value > 1",
               o.dual_clip_c);
  SAPO_CHECK(o.kl_coef >= 0 && std::isfinite(o.kl_coef), "options.kl_coef", "a finite value >= 0", o.kl_coef);
  SAPO_CHECK(o.max_response_length >= 0 && std::isfinite(o.max_response_length), "options.max_response_length",
             "a finite value >= 0 (0 = T)", o.max_response_length);
  SAPO_CHECK(o.global_tokens >= 0 && std::isfinite(o.global_tokens), "options.global_tokens",
             "a finite count >= 0 (0 = local)", o.global_tokens);
  SAPO_CHECK(o.global_sequences >= 0 && std::isfinite(o.global_sequences), "options.global_sequences",
             "a finite count >= 0 (0 = local)", o.global_sequences);
  SAPO_CHECK(o.global_steps >= 0 && std::isfinite(o.global_steps), "options.global_steps",
             "a finite count >= 0 (0 = local)", o.global_steps);
}

/// Counts from the read-only pass over one chunk of rows.
struct chunk_counts {
  int64_t tokens = 0, sequences = 0, steps = 0, nonfinite = 0;
};

/// Partial sums of one chunk, in double, combined in chunk order.
struct chunk_sums {
  double loss = 0, ratio = 0, kl_old = 0, kl_old_k3 = 0, kl_ref = 0;
  double ratio_max = -std::numeric_limits<double>::infinity();
  double clip_low = 0, clip_high = 0, clip_dual = 0;
};

inline namespace SAPO_ISA_NAMESPACE {

/// The fused policy loss. Two passes over the tokens, both parallel over fixed row chunks
/// and both working on tiles of `tile` tokens of one row:
///   scan:    read-only; validates every used value (SIMD), counts tokens / rows / steps
///            and sums delta per (row, step) -- O(B K) memory -- so the normalizers and
///            the step ratios are known, and nothing is written if an input is rejected;
///   compute: the per-token table lookups (step advantage, step weight, step ratio; a lane
///            permute on AVX2), then the branch-free SIMD formulas of loss_math.hpp;
///            writes the gradient once.
/// A strided or ragged tile is first copied into contiguous scratch, so every token goes
/// through the same instructions whatever the layout: the results are bit-identical
/// across layouts and thread counts.
template <class T, class M, class G>
class policy_loss_kernel {
 public:
  static constexpr int64_t tile = 256;
  using P = simd::pack<T>;
  static constexpr int64_t W = static_cast<int64_t>(simd::lanes<T>);
  static_assert(tile % W == 0, "the tile must hold whole packs");
  // The compute pass sums in T over blocks of this many tokens, then flushes to double.
  static constexpr int64_t sum_block = 128;
  static_assert(sum_block < 256 && sum_block % W == 0 && tile % sum_block == 0,
                "a block's clip counts must fit the 8-bit fields of the packed counter");
  // Mean log-ratios lie in [-20, 20]; a larger value marks a token that keeps its own ratio.
  static constexpr double no_group = 1e30;
  static constexpr T no_group_rho = T(-1);  // a ratio is > 0: marks "no group" in group_rho_t
  // What the scan learnt about a tile's mask, so the compute pass can skip work: a tile of
  // padding (every mask 0) only gets its zero gradient, a tile whose every lane is a used
  // token needs no masking selects; anything else (and every tile of a row that took the
  // exact path) goes through the general loop.
  static constexpr uint8_t tile_mixed = 0, tile_off = 1, tile_all_on = 2;
  static constexpr int32_t no_single_step = std::numeric_limits<int32_t>::min();
  // Step tables the plain loop takes: as many slots as one register holds (8 float lanes
  // on AVX2, 16 on AVX-512), and at least 8 where lookups are scalar loads anyway.
  static constexpr int64_t plain_table_slots = std::max<int64_t>(8, simd::register_table_slots<T>);

  policy_loss_kernel(const policy_inputs<T, M>& in, const loss_options& o, mat_view<G> grad, int64_t K)
      : in_(in), o_(o), grad_(grad), B_(in.logp.rows), T_(in.logp.cols), K_(K), slots_(K + 1) {
    use_ref_ = !in.ref_logp.empty();
    by_step_ = !in.step_advantages.empty();
    have_step_ = !in.step.empty();
    counts_ = o.ratio != ratio_level::token || o.agg == aggregation::step_mean ||
              o.agg == aggregation::seq_mean_token_mean;
    if (counts_) count_.assign(static_cast<size_t>(B_ * slots_), 0);
    if (o.ratio != ratio_level::token) delta_sum_.assign(static_cast<size_t>(B_ * slots_), 0.0);
    tiles_per_row_ = (T_ + tile - 1) / tile;
    tile_state_.assign(static_cast<size_t>(B_ * tiles_per_row_), tile_mixed);
    contiguous_ = in.logp.col_stride == 1 && in.old_logp.col_stride == 1 &&
                  (!use_ref_ || in.ref_logp.col_stride == 1) && (by_step_ || in.token_advantages.col_stride == 1) &&
                  (!have_step_ || in.step.col_stride == 1) && in.mask.col_stride == 1;
    grad_direct_ = std::is_same<T, G>::value && grad.col_stride == 1;
  }

  loss_result run() {
    const row_chunks chunks(B_, T_);
    std::vector<chunk_counts> counts(static_cast<size_t>(chunks.count));
    parallel_for_chunks(chunks.count, o_.num_threads, [&](int64_t c) {
      // Default-initialized (new scratch, not make_unique's zeroing): every entry is written
      // before it is read, and zeroing 9 KiB per chunk was 7 % of a small call's instructions.
      const std::unique_ptr<scratch> s(new scratch);
      for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) scan_row(i, *s, counts[static_cast<size_t>(c)]);
    });
    loss_result res;
    for (const chunk_counts& c : counts) {
      res.n_tokens += c.tokens;
      res.n_sequences += c.sequences;
      res.n_steps += c.steps;
      res.n_nonfinite_masked += c.nonfinite;
    }
    drop_nonfinite_ = res.n_nonfinite_masked > 0;
    const double norm = normalizer(res);
    inv_norm_ = norm > 0 ? 1.0 / norm : 0.0;

    std::vector<chunk_sums> sums(static_cast<size_t>(chunks.count));
    parallel_for_chunks(chunks.count, o_.num_threads, [&](int64_t c) {
      const std::unique_ptr<scratch> s(new scratch);
      for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) compute_row(i, *s, sums[static_cast<size_t>(c)]);
    });
    chunk_sums total;
    for (const chunk_sums& c : sums) {
      total.loss += c.loss;
      total.ratio += c.ratio;
      total.ratio_max = std::max(total.ratio_max, c.ratio_max);
      total.kl_old += c.kl_old;
      total.kl_old_k3 += c.kl_old_k3;
      total.kl_ref += c.kl_ref;
      total.clip_low += c.clip_low;
      total.clip_high += c.clip_high;
      total.clip_dual += c.clip_dual;
    }
    res.loss = total.loss * inv_norm_;
    if (res.n_tokens > 0) {
      const double n = static_cast<double>(res.n_tokens);
      res.clip_frac_low = total.clip_low / n;
      res.clip_frac_high = total.clip_high / n;
      res.clip_frac_dual = total.clip_dual / n;
      res.ratio_mean = total.ratio / n;
      res.ratio_max = total.ratio_max;
      res.approx_kl_old = total.kl_old / n;
      res.approx_kl_old_k3 = total.kl_old_k3 / n;
      res.kl_ref = total.kl_ref / n;
    }
    return res;
  }

 private:
  /// Per-thread scratch: one tile of every per-token array, and the per-row tables.
  struct scratch {
    alignas(64) T logp[tile], old[tile], ref[tile], adv[tile], on[tile], delta[tile], grad[tile];
    alignas(64) int32_t step[tile], step_slot[tile];
    double adv_table[max_steps + 1], weight_table[max_steps + 1], group_delta_table[max_steps + 1];
    // The same tables in T for the SIMD lookups; slot_on is 0 for a step whose advantage
    // is not finite (its tokens are dropped under nonfinite_policy::mask).
    alignas(64) T adv_t[max_steps + 1], weight_t[max_steps + 1], grad_weight_t[max_steps + 1],
        group_rho_t[max_steps + 1], slot_on_t[max_steps + 1];
    bool all_slots_on = true;
  };

  /// table[step + 1] for the W tokens at j, slot 0 where the token is off (AllOn: no
  /// token is). With float packs on AVX2 / AVX-512, a table of at most 8 / 16 slots (K <= 7
  /// / 15: `one_register`) sits in one register and a lane permute (vpermps, one
  /// instruction) looks it up; a larger one takes a hardware gather; elsewhere W scalar loads.
  template <bool AllOn>
  static P lookup(const T* table, const int32_t* step, const P& on01, int64_t j, bool one_register) {
#if SAPO_HAS_XSIMD
    if constexpr (simd::vector_ints<T>) {
      using I = simd::ipack;  // as many lanes as float
      I slot = I::load_unaligned(step + j) + I(1);
      if constexpr (!AllOn) slot = slot * xsimd::batch_cast<int32_t>(on01);
      return one_register ? simd::lookup_register(table, slot) : simd::gather(table, slot);
    }
#endif
    (void)one_register;
    alignas(64) T on[W], v[W];
    simd::store(on, on01);
    for (int64_t k = 0; k < W; ++k) v[k] = table[on[k] != T(0) ? step[j + k] + 1 : 0];
    return simd::load(v);
  }

  /// Contiguous pointers to one tile: straight into the inputs, or into scratch copies.
  struct tile_data {
    const T *logp, *old, *ref, *adv, *mask;
    const int32_t* step;
    bool copied;
  };

  /// Tile [t0, t0 + n) of row i, padded to whole packs. Inputs are used in place when they
  /// are contiguous and the tile holds whole packs; otherwise they are copied with the
  /// padding masked out. The mask is converted to T when its type differs.
  tile_data load_tile(int64_t i, int64_t t0, int64_t n, int64_t padded, scratch& s) const {
    const bool copy = !contiguous_ || padded != n;
    tile_data d{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, copy};
    if (!copy) {
      d.logp = &in_.logp(i, t0);
      d.old = &in_.old_logp(i, t0);
      d.ref = use_ref_ ? &in_.ref_logp(i, t0) : nullptr;
      d.adv = by_step_ ? nullptr : &in_.token_advantages(i, t0);
      d.step = have_step_ ? &in_.step(i, t0) : nullptr;
      if constexpr (std::is_same<T, M>::value) {
        d.mask = &in_.mask(i, t0);
        return d;
      }
    }
    for (int64_t j = 0; j < padded; ++j) {
      const bool real = j < n;
      const int64_t t = t0 + j;
      if (!std::is_same<T, M>::value || copy) {
        // A mask value that is neither 0 nor 1 becomes 0.5 here, so the SIMD check finds it.
        const M m = real ? in_.mask(i, t) : M(0);
        s.on[j] = m == M(0) ? T(0) : (m == M(1) ? T(1) : T(0.5));
      }
      if (copy) {
        const bool on = s.on[j] != T(0);
        // Off tokens may hold anything (NaN padding): keep their arithmetic harmless.
        s.logp[j] = on ? in_.logp(i, t) : T(0);
        s.old[j] = on ? in_.old_logp(i, t) : T(0);
        if (use_ref_) s.ref[j] = on ? in_.ref_logp(i, t) : T(0);
        if (!by_step_) s.adv[j] = on ? in_.token_advantages(i, t) : T(0);
        if (have_step_) s.step[j] = on ? in_.step(i, t) : -1;
      }
    }
    d.mask = s.on;
    if (copy) {
      d.logp = s.logp;
      d.old = s.old;
      d.ref = use_ref_ ? s.ref : nullptr;
      d.adv = by_step_ ? nullptr : s.adv;
      d.step = have_step_ ? s.step : nullptr;
    }
    return d;
  }

  static auto finite(const P& x) { return (x - x) == P(0); }  // false for NaN and +-Inf

  /// Tokens that take part: mask 1 and, when non-finite tokens are dropped, finite inputs.
  /// Per-token step advantages are checked by the caller through the row's table.
  auto used_lanes(const tile_data& d, int64_t j, bool drop) const {
    auto on = simd::load(d.mask + j) != P(0);
    if (drop) {
      auto ok = finite(simd::load(d.logp + j)) && finite(simd::load(d.old + j));
      if (d.ref) ok = ok && finite(simd::load(d.ref + j));
      if (d.adv) ok = ok && finite(simd::load(d.adv + j));
      on = on && ok;
    }
    return on;
  }

  // ---- pass 1: validate and count (reads only) ----

  /// Exact per-token validation of one row, in order: finds the first bad value and throws
  /// the message naming it, or counts non-finite tokens under nonfinite_policy::mask.
  /// Only rows where the SIMD scan saw something wrong come here.
  int64_t validate_row_exactly(int64_t i) const {
    int64_t nonfinite = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const M m = in_.mask(i, t);
      if (m == M(0)) continue;
      SAPO_CHECK(m == M(1), "mask", "0 or 1 at (" << i << ", " << t << ")", +m);
      int32_t s = -1;
      if (have_step_) {
        s = in_.step(i, t);
        SAPO_CHECK(s >= -1 && s < K_, "step", "ids in [-1, " << K_ << ") at (" << i << ", " << t << ")", s);
      }
      const double a = by_step_ ? (s >= 0 ? static_cast<double>(in_.step_advantages(i, s)) : 0.0)
                                : static_cast<double>(in_.token_advantages(i, t));
      const bool ok = is_finite(in_.logp(i, t)) && is_finite(in_.old_logp(i, t)) &&
                      (!use_ref_ || is_finite(in_.ref_logp(i, t))) && std::isfinite(a);
      if (!ok) {
        SAPO_CHECK(o_.nonfinite == nonfinite_policy::mask, "logp / old_logp / ref_logp / advantages",
                   "finite values at masked-in token (" << i << ", " << t << ")",
                   "logp " << in_.logp(i, t) << ", old_logp " << in_.old_logp(i, t) << ", ref_logp "
                           << (use_ref_ ? std::to_string(in_.ref_logp(i, t)) : std::string("none")) << ", advantage "
                           << a);
        ++nonfinite;
      }
    }
    return nonfinite;
  }

  /// Step advantages of row i into the table (slot k + 1 = step k, slot 0 = no step);
  /// returns whether every one is finite.
  bool load_adv_table(int64_t i, scratch& s) const {
    bool finite_row = true;
    s.adv_table[0] = 0.0;
    for (int64_t k = 1; k < slots_; ++k) {
      s.adv_table[k] = by_step_ ? static_cast<double>(in_.step_advantages(i, k - 1)) : 0.0;
      finite_row = finite_row && std::isfinite(s.adv_table[k]);
    }
    return finite_row;
  }

  /// Range check of the step ids of on tokens, the set of steps present (bit k) and the
  /// smallest and largest id, for one tile. With float packs on AVX2 / AVX-512 it runs pack
  /// by pack inside the scan's finite-check loop (add), so each input is loaded once per
  /// tile: int32 lanes beside the float ones, off tokens become step -1 and a variable shift
  /// sets bit `step` (vpsllvd gives 0 for shifts of 32 or more, and of -1). Elsewhere
  /// finish() checks the tile token by token.
  struct step_check {
    static constexpr bool vector = simd::vector_ints<T>;
    using I = std::conditional_t<vector, simd::ipack, int32_t>;
    I low = I(0), high = I(0), min_id = I(std::numeric_limits<int32_t>::max()), max_id = I(-1);

    /// The W step ids at `step`; `off`: the lanes whose mask is 0.
    template <class Off>
    void add(const int32_t* step, const Off& off, int32_t K, bool wide) {
#if SAPO_HAS_XSIMD
      if constexpr (vector) {
        const I st = simd::select_int(simd::int_mask(off), I(-1), I::load_unaligned(step));
        min_id = xsimd::min(min_id, st);  // the range check, in finish()
        max_id = xsimd::max(max_id, st);
        low = low | simd::shift_left(I(1), st);
        if (wide) high = high | simd::shift_left(I(1), st - I(32));
        return;
      }
#endif
      (void)step, (void)off, (void)K, (void)wide;
    }

    /// Returns false on an id outside [-1, K); otherwise adds the tile's steps to `seen` and
    /// sets `only_step` to the one id of every token when there is one (off tokens count as
    /// -1), else to no_single_step.
    bool finish(const tile_data& d, int64_t n, int32_t K, uint64_t& seen, int32_t& only_step) const {
      int32_t smallest = std::numeric_limits<int32_t>::max(), largest = -1;
      if constexpr (vector) {
        alignas(64) int32_t lo[W], hi[W], mn[W], mx[W];
        simd::store(lo, low);
        simd::store(hi, high);
        simd::store(mn, min_id);
        simd::store(mx, max_id);
        for (int64_t k = 0; k < W; ++k) {
          smallest = std::min(smallest, mn[k]);
          largest = std::max(largest, mx[k]);
          seen |= static_cast<uint64_t>(static_cast<uint32_t>(lo[k])) |
                  (static_cast<uint64_t>(static_cast<uint32_t>(hi[k])) << 32);
        }
        if (smallest < -1 || largest >= K) return false;
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const int32_t st = d.mask[j] == T(0) ? -1 : d.step[j];
          if (st < -1 || st >= K) return false;
          if (st >= 0) seen |= uint64_t(1) << st;
          smallest = std::min(smallest, st);
          largest = std::max(largest, st);
        }
      }
      only_step = smallest == largest ? smallest : no_single_step;
      return true;
    }
  };

  static constexpr bool vector_step_sums = simd::vector_ints<T>;

  /// step_sums for a tile whose every token is used and in slot `slot`: the same double
  /// lane sums as step_sums (which adds exact zeros for the other lanes), so the same bits,
  /// in one pass instead of one per slot.
  void one_step_sums(const scratch& s, int64_t padded, int64_t slot, int32_t* cnt, double* dsum) const {
    if (cnt) {
      cnt[0] += static_cast<int32_t>(padded);
      if (slot > 0) cnt[slot] += static_cast<int32_t>(padded);
    }
    if (!dsum) return;
    simd::double_sum<T> sum;
    for (int64_t j = 0; j < padded; j += W) sum.add(simd::load(s.delta + j));
    const double tile_sum = sum.total();
    dsum[0] += tile_sum;
    if (slot > 0) dsum[slot] += tile_sum;
  }

  /// Per-step token counts (cnt, slot k + 1 = step k, slot 0 = every token) and delta sums
  /// (dsum, may be null) of the used tokens of one tile whose step ids passed step_check,
  /// slot by slot in SIMD lanes (the tile sits in L1); the delta sums in double lanes.
  /// Float lanes on AVX2 / AVX-512 and at most 8 slots; the caller checks.
  void step_sums(const tile_data& d, scratch& s, int64_t padded, int32_t* cnt, double* dsum) const {
#if SAPO_HAS_XSIMD
    if constexpr (vector_step_sums) {
      using I = simd::ipack;  // as many lanes as float
      // Slot of each token: step + 1 for used tokens, -1 for off ones (whose ids are unchecked).
      for (int64_t j = 0; j < padded; j += W) {
        const I on = xsimd::batch_cast<int32_t>(simd::load(d.mask + j));
        const I slot = (I::load_unaligned(d.step + j) + I(2)) * on - I(1);
        slot.store_aligned(s.step_slot + j);
      }
      for (int64_t k = 0; k < slots_; ++k) {
        I count(0);
        const I want = k == 0 ? I(-1) : I(static_cast<int32_t>(k));
        simd::double_sum<T> sum;
        for (int64_t j = 0; j < padded; j += W) {
          const I slot = I::load_aligned(s.step_slot + j);
          // Slot 0 takes every used token, slot k > 0 the tokens of step k - 1.
          const auto in = k == 0 ? (slot > want) : (slot == want);
          count = count + simd::select_int(in, I(1), I(0));
          if (dsum) sum.add(simd::select(simd::float_mask(in), simd::load(s.delta + j), P(0)));
        }
        if (dsum) dsum[k] += sum.total();
        cnt[k] += static_cast<int32_t>(xsimd::hadd(count));
      }
      return;
    }
#endif
    (void)d, (void)s, (void)padded, (void)cnt, (void)dsum;
  }

  /// The scan's checks of one tile: every mask value 0 or 1, finite inputs wherever it is
  /// 1, and with Steps the step ids (collected into `seen`, the one id of them all into
  /// `only_step`: see step_check::finish). False if anything is wrong.
  template <bool Steps>
  bool check_tile(const tile_data& d, int64_t n, int64_t padded, uint64_t& seen, int32_t& only_step) const {
    const int32_t K = static_cast<int32_t>(K_);
    const bool wide = K > 32;
    const T *mask = d.mask, *logp = d.logp, *old = d.old;
    const int32_t* step = d.step;
    auto good = P(0) == P(0);  // all true
    step_check steps;
    // The inputs every call has, in one loop: finite(logp - old) is finite(logp) &&
    // finite(old), one test for both.
    for (int64_t j = 0; j < padded; j += W) {
      const P m = simd::load(mask + j);
      const auto off = m == P(0);
      good = good && (off || (finite(simd::load(logp + j) - simd::load(old + j)) && m == P(1)));
      if constexpr (Steps) steps.add(step + j, off, K, wide);
    }
    const T* optional_inputs[] = {d.ref, d.adv};
    for (const T* x : optional_inputs)
      if (x)
        for (int64_t j = 0; j < padded; j += W) good = good && ((simd::load(mask + j) == P(0)) || finite(simd::load(x + j)));
    return simd::all(good) && (!Steps || steps.finish(d, n, K, seen, only_step));
  }

  /// One used token of step st (-1: none) into the per-step counts and delta sums (either may
  /// be null; slot 0 takes every token).
  static void count_token(int32_t* cnt, double* dsum, int32_t st, T delta) {
    if (cnt) {
      ++cnt[0];
      if (st >= 0) ++cnt[st + 1];
    }
    if (dsum) {
      dsum[0] += static_cast<double>(delta);
      if (st >= 0) dsum[st + 1] += static_cast<double>(delta);
    }
  }

  void scan_row(int64_t i, scratch& s, chunk_counts& c) const {
    // A non-finite step advantage matters only if a token of its step takes part: the
    // exact path finds out.
    if (!load_adv_table(i, s)) return scan_row_dropping(i, s, c, validate_row_exactly(i));
    bool suspicious = false;
    int32_t* cnt = counts_ ? &count_[static_cast<size_t>(i * slots_)] : nullptr;
    double* dsum = delta_sum_.empty() ? nullptr : &delta_sum_[static_cast<size_t>(i * slots_)];
    uint64_t seen = 0;
    double row_tokens = 0;
    for (int64_t t0 = 0; t0 < T_ && !suspicious; t0 += tile) {
      const int64_t n = std::min(tile, T_ - t0), padded = (n + W - 1) / W * W;
      const tile_data d = load_tile(i, t0, n, padded, s);
      // The mask alone first: a tile of padding needs nothing else read or checked.
      P on_count(0);
      for (int64_t j = 0; j < padded; j += W) on_count = on_count + simd::select(simd::load(d.mask + j) != P(0), P(1), P(0));
      const double tile_tokens = simd::horizontal_sum(on_count);
      uint8_t& state = tile_state_[static_cast<size_t>(i * tiles_per_row_ + t0 / tile)];
      state = tile_tokens == 0 ? tile_off : (tile_tokens == static_cast<double>(padded) ? tile_all_on : tile_mixed);
      if (state == tile_off) continue;
      int32_t only_step = no_single_step;
      if (!(d.step ? check_tile<true>(d, n, padded, seen, only_step)
                   : check_tile<false>(d, n, padded, seen, only_step))) {
        suspicious = true;
        break;
      }
      if (dsum)
        for (int64_t j = 0; j < padded; j += W)
          simd::store(s.delta + j, importance_ratio(simd::load(d.logp + j), simd::load(d.old + j)).delta);
      row_tokens += tile_tokens;
      if (!cnt && !dsum) continue;
      if (d.step && state == tile_all_on && only_step != no_single_step) {
        // The whole tile is one step (the common case: steps are spans of many tiles).
        one_step_sums(s, padded, only_step + 1, cnt, dsum);
        continue;
      }
      if (d.step && slots_ <= 8 && vector_step_sums) {
        step_sums(d, s, padded, cnt, dsum);
        continue;
      }
      // Per-step token counts and delta sums (slot 0: every used token), token by token.
      for (int64_t j = 0; j < n; ++j) {
        if (d.mask[j] == T(0)) continue;
        count_token(cnt, dsum, d.step ? d.step[j] : -1, s.delta[j]);
      }
    }
    if (suspicious) {
      // Something is off in this row: redo it token by token, which throws the precise error
      // or, under nonfinite_policy::mask, counts the dropped tokens and sums without them.
      if (cnt) std::fill(cnt, cnt + slots_, 0);
      if (dsum) std::fill(dsum, dsum + slots_, 0.0);
      return scan_row_dropping(i, s, c, validate_row_exactly(i));
    }
    const auto tokens = static_cast<int64_t>(row_tokens);
    c.tokens += tokens;
    c.sequences += tokens > 0 ? 1 : 0;
    for (; seen; seen &= seen - 1) ++c.steps;
  }

  /// Scan of a row that has non-finite tokens to drop (nonfinite_policy::mask): per token,
  /// as the compute pass will see them.
  void scan_row_dropping(int64_t i, scratch& s, chunk_counts& c, int64_t nonfinite) const {
    std::fill_n(tile_state_.begin() + i * tiles_per_row_, tiles_per_row_, tile_mixed);
    int32_t* cnt = counts_ ? &count_[static_cast<size_t>(i * slots_)] : nullptr;
    double* dsum = delta_sum_.empty() ? nullptr : &delta_sum_[static_cast<size_t>(i * slots_)];
    uint64_t seen = 0;
    int64_t tokens = 0;
    for (int64_t t0 = 0; t0 < T_; t0 += tile) {
      const int64_t n = std::min(tile, T_ - t0), padded = (n + W - 1) / W * W;
      const tile_data d = load_tile(i, t0, n, padded, s);
      for (int64_t j = 0; j < padded; j += W) {
        simd::store(s.on + j, simd::select(used_lanes(d, j, true), P(1), P(0)));
        simd::store(s.delta + j, importance_ratio(simd::load(d.logp + j), simd::load(d.old + j)).delta);
      }
      for (int64_t j = 0; j < n; ++j) {
        const int32_t st = d.step ? d.step[j] : -1;
        if (s.on[j] == T(0) || (st >= 0 && !std::isfinite(s.adv_table[st + 1]))) continue;
        ++tokens;
        if (st >= 0) seen |= uint64_t(1) << st;
        count_token(cnt, dsum, st, s.delta[j]);
      }
    }
    c.nonfinite += nonfinite;
    c.tokens += tokens;
    c.sequences += tokens > 0 ? 1 : 0;
    for (; seen; seen &= seen - 1) ++c.steps;
  }

  double normalizer(const loss_result& r) const {
    switch (o_.agg) {
      case aggregation::token_mean:
        return o_.global_tokens > 0 ? o_.global_tokens : static_cast<double>(r.n_tokens);
      case aggregation::seq_mean_token_mean:
      case aggregation::seq_mean_token_sum:
        return o_.global_sequences > 0 ? o_.global_sequences : static_cast<double>(r.n_sequences);
      case aggregation::seq_mean_token_sum_norm:
        return (o_.global_sequences > 0 ? o_.global_sequences : static_cast<double>(B_)) *
               (o_.max_response_length > 0 ? o_.max_response_length : static_cast<double>(T_));
      case aggregation::step_mean:
        return o_.global_steps > 0 ? o_.global_steps : static_cast<double>(r.n_steps);
    }
    return 0;
  }

  // ---- pass 2: compute and write ----

  /// Per-row tables indexed by step + 1 (slot 0: tokens without a step).
  void row_tables(int64_t i, scratch& s) const {
    load_adv_table(i, s);
    const int32_t* cnt = counts_ ? &count_[static_cast<size_t>(i * slots_)] : nullptr;
    const double* dsum = delta_sum_.empty() ? nullptr : &delta_sum_[static_cast<size_t>(i * slots_)];
    // Aggregation weight before the global 1/norm (docs/math.md §6).
    double row_weight = 1.0;
    if (o_.agg == aggregation::seq_mean_token_mean) row_weight = cnt[0] > 0 ? 1.0 / cnt[0] : 0.0;
    for (int64_t k = 0; k < slots_; ++k) {
      s.weight_table[k] = o_.agg != aggregation::step_mean ? row_weight : (k > 0 && cnt[k] > 0 ? 1.0 / cnt[k] : 0.0);
      // Step / sequence ratio: the mean delta of the group (its exp goes into group_rho_t
      // below); no_group marks "use the token ratio".
      s.group_delta_table[k] = no_group;
      if (o_.ratio == ratio_level::step && k > 0 && cnt[k] > 0) s.group_delta_table[k] = dsum[k] / cnt[k];
      if (o_.ratio == ratio_level::sequence && cnt[0] > 0) s.group_delta_table[k] = dsum[0] / cnt[0];
    }
    s.all_slots_on = true;
    for (int64_t k = 0; k < slots_; ++k) {
      const bool ok = std::isfinite(s.adv_table[k]);
      s.all_slots_on = s.all_slots_on && ok;
      s.slot_on_t[k] = ok ? T(1) : T(0);
      s.adv_t[k] = ok ? static_cast<T>(s.adv_table[k]) : T(0);
      s.weight_t[k] = static_cast<T>(s.weight_table[k]);
      s.grad_weight_t[k] = s.weight_t[k] * static_cast<T>(inv_norm_);  // d loss / d l of the token
      // exp(mean delta) with the SIMD exp of the token ratio, once per step instead of per token.
      alignas(64) T lanes[W];
      simd::store(lanes, simd::exp(P(static_cast<T>(s.group_delta_table[k]))));
      s.group_rho_t[k] = s.group_delta_table[k] == no_group ? no_group_rho : lanes[0];
    }
  }

  /// Lane sums of one block, in double (every lane converted as it is added), flushed to
  /// the chunk's sums by flush_block. The clip counts share one pack of T: exact integers.
  struct block_sums {
    simd::double_sum<T> loss, ratio, kl_old, kl_old_k3, kl_ref;
    P clips = P(T(0));
  };

  /// Row constants of the compute loop.
  struct row_constants {
    clip_params clip;
    P beta, row_weight, row_grad_weight, row_rho;
  };

  /// Which options a compute loop tests at run time. The plain loops are the default loss
  /// (token ratio, no KL, no dual clip, one weight per row) with per-token advantages or
  /// with step advantages from a table of at most 8 slots; they test no option at all.
  enum class loop_kind { general, plain_token_advantages, plain_step_table };

  /// Packs [j0, j_end) of one tile. AllOn: every lane is a used token (the scan saw mask 1
  /// throughout, no token is dropped, every step advantage is finite), so the selects
  /// that switch off tokens fall away. Kind: see loop_kind. Whatever the instantiation, the
  /// arithmetic is the same, so the results are too.
  template <bool AllOn, loop_kind Kind>
  void compute_block(const tile_data& d, const scratch& s, const row_constants& rc, int64_t j0, int64_t j_end,
                     T* g_out, chunk_sums& out, P& ratio_max_out) const {
    // Everything the loop consults goes into locals first: the gradient stores through g_out
    // could alias anything reached through `this` or a reference, which would reload every
    // option, pointer, accumulator and constant from memory on each pack.
    constexpr bool Plain = Kind != loop_kind::general;
    const bool per_token_weight = !Plain && o_.agg == aggregation::step_mean;
    const bool grouped_ratio = !Plain && o_.ratio != ratio_level::token, step_ratio = o_.ratio == ratio_level::step;
    const bool by_step = Plain ? Kind == loop_kind::plain_step_table : by_step_;
    const bool one_register = Kind == loop_kind::plain_step_table || slots_ <= simd::register_table_slots<T>;
    const bool drop = drop_nonfinite_;
    const bool slot_gate = d.step && !s.all_slots_on;
    const kl_estimator kl = o_.kl;
    const T *logp_in = d.logp, *old_in = d.old, *ref_in = Plain ? nullptr : d.ref, *adv_in = d.adv;
    const int32_t* step_in = d.step;
    const T lowest = -std::numeric_limits<T>::infinity();
    block_sums acc;  // the block's sums start at zero and go to `out` at the end (flush_block)
    P ratio_max = ratio_max_out;
    const P beta = rc.beta, row_weight = rc.row_weight, row_grad_weight = rc.row_grad_weight, row_rho = rc.row_rho;
    const clip_params clip = Plain ? clip_params{rc.clip.low, rc.clip.high, false, 0.0} : rc.clip;
    const P clip_lo(static_cast<T>(1.0 - clip.low));
    // The used lanes of the pack at j (AllOn: all) as a mask and as 0 / 1.
    auto used = [&](int64_t j, auto& on, P& on01) {
      if constexpr (!AllOn) {
        on = used_lanes(d, j, drop);
        on01 = simd::select(on, P(1), P(0));
        if (slot_gate) {
          on01 = on01 * lookup<false>(s.slot_on_t, step_in, on01, j, one_register);
          on = on01 != P(0);
        }
      } else {
        (void)j, (void)on, (void)on01;
      }
    };
    // keep(on, x, off): x for used tokens, off elsewhere.
    auto keep = [](const auto& on, const P& x, const P& off) {
      if constexpr (AllOn) {
        (void)on, (void)off;
        return x;
      } else {
        return simd::select(on, x, off);
      }
    };
    const P zero(0);
    // The exponentials of the block first (token ratio, and the KL penalty's with ref_logp),
    // into buffers that stay in L1. An exp is a long chain of dependent operations; in one
    // loop with everything else, the work waiting on it fills the out-of-order window and
    // one pack's exp barely overlaps the next one's. Alone in a loop, the chains of several
    // packs run side by side: the compute pass of the default loss takes 17 % less time
    // with its inputs in cache (docs/benchmarks.md).
    // The used lanes (on01_buf) are kept for the second loop too: finding them reads the mask
    // and, when non-finite tokens are dropped, every input.
    alignas(64) T delta_buf[sum_block], rho_buf[sum_block], moves_buf[sum_block], k_buf[sum_block],
        k_slope_buf[sum_block], on01_buf[AllOn ? 1 : sum_block];
    for (int64_t j = j0; j < j_end; j += W) {
      auto on = P(1) != P(0);  // all true
      P on01(1);
      used(j, on, on01);
      if constexpr (!AllOn) simd::store(on01_buf + (j - j0), on01);
      const P logp = keep(on, simd::load(logp_in + j), zero);
      const token_ratio<P> tr = importance_ratio(logp, keep(on, simd::load(old_in + j), zero));
      simd::store(delta_buf + (j - j0), tr.delta);
      simd::store(rho_buf + (j - j0), tr.rho);
      simd::store(moves_buf + (j - j0), simd::select(tr.moves, P(1), zero));
      if (ref_in) {
        const kl_value<P> kv = kl_penalty(logp, keep(on, simd::load(ref_in + j), zero), kl);
        simd::store(k_buf + (j - j0), kv.k);
        simd::store(k_slope_buf + (j - j0), kv.slope);
      }
    }
    for (int64_t j = j0; j < j_end; j += W) {
      auto on = P(1) != P(0);  // all true
      P on01(1);
      if constexpr (!AllOn) {
        on01 = simd::load(on01_buf + (j - j0));
        on = on01 != zero;
      }
      auto table = [&](const T* t) { return lookup<AllOn>(t, step_in, on01, j, one_register); };
      const P a = by_step ? table(s.adv_t) : keep(on, simd::load(adv_in + j), zero);
      const token_ratio<P> tr{simd::load(delta_buf + (j - j0)), simd::load(rho_buf + (j - j0)),
                              simd::load(moves_buf + (j - j0)) != zero};
      P rho = tr.rho;
      auto moves = tr.moves;
      if (grouped_ratio) {
        // Step / sequence ratio in the stop-gradient form: value exp(mean delta), slope 1;
        // the exponentials come from the row's table (no_group_rho: the token's own ratio).
        const P group_rho = step_ratio ? table(s.group_rho_t) : row_rho;
        const auto grouped = group_rho > zero;
        rho = simd::select(grouped, group_rho, rho);
        moves = moves || grouped;
      }
      const surrogate_value<P> sv = clipped_surrogate(a, rho, moves, clip);
      P l = sv.loss, dl = sv.slope;
      if (ref_in) {
        const kl_value<P> kv{simd::load(k_buf + (j - j0)), simd::load(k_slope_buf + (j - j0))};
        l = l + beta * kv.k;
        dl = dl + beta * kv.slope;
        acc.kl_ref.add(kv.k);
      }
      // w: the token's aggregation weight; the gradient's weight is w / norm.
      const P w = per_token_weight ? table(s.weight_t) : keep(on, row_weight, zero);
      const P gw = per_token_weight ? table(s.grad_weight_t) : keep(on, row_grad_weight, zero);
      simd::store(g_out + j, keep(on, gw * dl, zero));
      acc.loss.add(w * l);
      acc.ratio.add(keep(on, rho, zero));
      ratio_max = simd::max(ratio_max, keep(on, rho, P(lowest)));
      acc.kl_old.add(-tr.delta);
      acc.kl_old_k3.add(P(1) / tr.rho + tr.delta - P(1));
      // A clipped branch wins only outside [1 - low, 1 + high]: one select picks the field.
      acc.clips = acc.clips + simd::select(sv.clipped, simd::select(rho < clip_lo, P(1), P(256)), zero);
      if (clip.dual) acc.clips = acc.clips + simd::select(sv.dual, P(65536), zero);
    }
    flush_block(acc, out);
    ratio_max_out = ratio_max;
  }

  template <bool AllOn, class... Args>
  void compute_block_of_kind(loop_kind kind, Args&&... args) const {
    switch (kind) {
      case loop_kind::plain_step_table:
        return compute_block<AllOn, loop_kind::plain_step_table>(std::forward<Args>(args)...);
      case loop_kind::plain_token_advantages:
        return compute_block<AllOn, loop_kind::plain_token_advantages>(std::forward<Args>(args)...);
      case loop_kind::general:
        return compute_block<AllOn, loop_kind::general>(std::forward<Args>(args)...);
    }
  }

  static void flush_block(block_sums& acc, chunk_sums& out) {
    out.loss += acc.loss.total();
    out.ratio += acc.ratio.total();
    out.kl_old += acc.kl_old.total();
    out.kl_old_k3 += acc.kl_old_k3.total();
    out.kl_ref += acc.kl_ref.total();
    const auto packed = static_cast<int64_t>(simd::horizontal_sum(acc.clips));
    out.clip_low += static_cast<double>(packed & 255);
    out.clip_high += static_cast<double>((packed >> 8) & 255);
    out.clip_dual += static_cast<double>(packed >> 16);
    acc = block_sums();
  }

  void compute_row(int64_t i, scratch& s, chunk_sums& out) const {
    row_tables(i, s);
    row_constants rc{clip_params{o_.clip_low, o_.clip_high, o_.dual_clip, o_.dual_clip_c},
                     P(static_cast<T>(o_.kl_coef)), P(s.weight_t[0]), P(s.grad_weight_t[0]),
                     P(s.group_rho_t[0])};  // sequence ratio: one ratio per row
    // A tile the scan found fully on runs without masking when nothing else can switch a
    // token off.
    const bool fast_ok = !drop_nonfinite_ && (!have_step_ || s.all_slots_on);
    const bool plain = o_.ratio == ratio_level::token && !use_ref_ && !o_.dual_clip && o_.agg != aggregation::step_mean;
    const loop_kind kind = !plain      ? loop_kind::general
                           : !by_step_ ? loop_kind::plain_token_advantages
                                       : (slots_ <= plain_table_slots ? loop_kind::plain_step_table : loop_kind::general);
    P ratio_max(-std::numeric_limits<T>::infinity());
    for (int64_t t0 = 0; t0 < T_; t0 += tile) {
      const int64_t n = std::min(tile, T_ - t0), padded = (n + W - 1) / W * W;
      const uint8_t state = tile_state_[static_cast<size_t>(i * tiles_per_row_ + t0 / tile)];
      if (state == tile_off) {
        // Padding: only the zero gradient (nothing else is read).
        if (grad_.col_stride == 1)
          std::fill_n(&grad_(i, t0), n, G(0));
        else
          for (int64_t j = 0; j < n; ++j) grad_(i, t0 + j) = G(0);
        continue;
      }
      const tile_data d = load_tile(i, t0, n, padded, s);
      T* g_out = s.grad;
      const bool direct_out = grad_direct_ && !d.copied;
      if constexpr (std::is_same<T, G>::value) {
        if (direct_out) g_out = &grad_(i, t0);
      }
      // Sums run in double lanes over a short block, then flush to the chunk's double sums
      // (one horizontal add per block, not per pack).
      // The three clip counts share one accumulator, low + 2^8 high + 2^16 dual: a block has
      // 128 tokens, so each field stays below 2^8 and the sum below 2^24, exact in float.
      // Off tokens (mask 0, padding, dropped) get logp = old = ref = 0 and a = w = 0: then
      // delta = 0, rho = 1, k = 0, nothing is clipped and every sum but the ratio ones
      // needs no mask of its own, whatever the off tokens held (NaN padding included).
      constexpr int64_t block = sum_block;
      const bool all_on = fast_ok && state == tile_all_on;
      for (int64_t j0 = 0; j0 < padded; j0 += block) {
        const int64_t j_end = std::min(padded, j0 + block);
        if (all_on)
          compute_block_of_kind<true>(kind, d, s, rc, j0, j_end, g_out, out, ratio_max);
        else
          compute_block_of_kind<false>(kind, d, s, rc, j0, j_end, g_out, out, ratio_max);
      }
      if (!direct_out)
        for (int64_t j = 0; j < n; ++j) grad_(i, t0 + j) = static_cast<G>(s.grad[j]);
    }
    alignas(64) T lanes[W];
    simd::store(lanes, ratio_max);
    for (int64_t j = 0; j < W; ++j) out.ratio_max = std::max(out.ratio_max, static_cast<double>(lanes[j]));
  }

  const policy_inputs<T, M>& in_;
  const loss_options& o_;
  mat_view<G> grad_;
  int64_t B_, T_, K_, slots_;
  bool use_ref_ = false, by_step_ = false, have_step_ = false, counts_ = false;
  bool contiguous_ = false, grad_direct_ = false, drop_nonfinite_ = false;
  double inv_norm_ = 0;
  mutable std::vector<int32_t> count_;
  mutable std::vector<double> delta_sum_;
  int64_t tiles_per_row_ = 0;
  mutable std::vector<uint8_t> tile_state_;  // per (row, tile), written by the scan
};

}  // namespace SAPO_ISA_NAMESPACE
}  // namespace detail
namespace detail {

/// The checks of policy_loss that need no data (shapes, options, which inputs are given),
/// shared by the CPU and CUDA entry points. Returns K (64 without step advantages).
template <class T, class M>
int64_t check_policy_inputs(const policy_inputs<T, M>& in, const loss_options& options) {
  const int64_t B = in.logp.rows, Tn = in.logp.cols;
  check_loss_options(options);
  check_shape("logp", in.logp, B, Tn);
  check_shape("old_logp", in.old_logp, B, Tn);
  check_shape("mask", in.mask, B, Tn);
  const bool use_ref = !in.ref_logp.empty();
  if (use_ref) check_shape("ref_logp", in.ref_logp, B, Tn);
  SAPO_CHECK(use_ref || options.kl_coef == 0, "ref_logp", "an array when options.kl_coef > 0", "none");
  const bool by_step = !in.step_advantages.empty();
  SAPO_CHECK(by_step != !in.token_advantages.empty(), "token_advantages / step_advantages", "exactly one of them",
             (by_step ? "both" : "neither"));
  int64_t K = max_steps;
  if (by_step) {
    K = in.step_advantages.cols;
    check_num_steps("step_advantages.cols (K)", K);
    check_shape("step_advantages", in.step_advantages, B, K);
  } else {
    check_shape("token_advantages", in.token_advantages, B, Tn);
  }
  const bool need_step = by_step || options.ratio == ratio_level::step || options.agg == aggregation::step_mean;
  SAPO_CHECK(!need_step || !in.step.empty(), "step",
             "step ids (needed by step_advantages, the step ratio and step_mean)", "none");
  if (!in.step.empty()) check_shape("step", in.step, B, Tn);
  return K;
}

}  // namespace detail

namespace dispatch {
/// (logp, mask, grad) types of the dispatched loss kernel: what the LibTorch adapter and
/// the Python module pass (mask as the compute type or as bytes).
using loss_types = type_list<types<float, float, float>, types<float, uint8_t, float>,
                             types<double, double, double>, types<double, uint8_t, double>>;
/// The fused kernel after policy_loss's checks, on the active instruction set (src/dispatch.cpp).
template <class T, class M, class G>
loss_result policy_loss_kernel(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad,
                               int64_t K);
}  // namespace dispatch

inline namespace SAPO_ENTRY_NAMESPACE {

/// \brief Policy loss, its gradient and diagnostics in one call (SPEC §4-6).
/// \param in      logp, old_logp, [ref_logp], advantages, [step], mask; see policy_inputs
/// \param options ratio level, clip, dual clip, KL, aggregation, normalizers, threads
/// \param grad    (B, T) output: d loss / d logp (0 where mask = 0)
///
/// Float inputs are computed in float SIMD lanes with sums in double; double inputs in
/// double. The result does not depend on the thread count or on the memory layout.
template <class T, class M, class G>
loss_result policy_loss(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad) {
  static_assert(std::is_floating_point<T>::value, "log-probabilities must be float or double");
  static_assert(std::is_floating_point<G>::value, "the gradient must be float or double");
  const int64_t K = detail::check_policy_inputs(in, options);
  detail::check_shape("grad", grad, in.logp.rows, in.logp.cols);
  detail::check_output("grad", grad);
#ifdef SAPO_USE_DISPATCH
  if constexpr (dispatch::contains<dispatch::types<T, M, G>, dispatch::loss_types>::value)
    return dispatch::policy_loss_kernel(in, options, grad, K);
  else
#endif
    return detail::policy_loss_kernel<T, M, G>(in, options, grad, K).run();
}

}  // namespace SAPO_ENTRY_NAMESPACE

}  // namespace sapo
