/// \file policy_loss.cuh
/// \brief SPEC §4-6 on the GPU: the fused clipped policy loss with KL penalty, its gradient
/// d loss / d logp and every diagnostic, in one call. The per-token formulas are the ones
/// of sapo/loss_math.hpp (detail::importance_ratio, clipped_surrogate, kl_penalty), called
/// from device code; this file only adds the passes around them.
///
/// \code
///   sapo::policy_inputs<float> in;                    // every view points to device memory
///   in.logp = logp; in.old_logp = old_logp; in.mask = mask; in.token_advantages = adv;
///   sapo::loss_options opt;
///   sapo::loss_result r = sapo::cuda::policy_loss(in, opt, grad, stream);   // grad (B, T) on the device
/// \endcode
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

#include <sapo/loss_math.hpp>
#include <sapo/policy_loss.hpp>

#include "common.cuh"

namespace sapo {
namespace cuda {
namespace detail {

// Two kernels, one block per row each:
//   scan:    reads only. Validates every masked-in token (mask value, step id, finite
//            values), finds the first rejected one (smallest row-major index), counts the
//            tokens, rows and present steps, and per (row, step) the token counts and the
//            sums of delta that the step / sequence ratios and the aggregation weights need.
//   compute: returns at once if the scan rejected anything (so no output is written);
//            else the per-token formulas, the gradient, and per-row partial sums in double
//            that the block finishing last reduces in row order into the loss_result.
// Then the host copies the status and the result back: the call's only synchronisation.

constexpr int loss_threads = 256;
constexpr unsigned long long loss_checks = 3;  // per token, in the order the CPU checks them:
constexpr unsigned long long loss_bad_mask = 0, loss_bad_step = 1, loss_bad_value = 2;
constexpr int loss_sums = 8;  // loss, ratio, kl_old, kl_old_k3, kl_ref, clip low / high / dual
constexpr int loss_fields = loss_sums + 1;  // + ratio_max
// Mean log-ratios lie in [-20, 20]; a larger value marks a token that keeps its own ratio.
constexpr double loss_no_group = 1e30;

/// Device-side status and result of one call (zeroed before the scan).
struct loss_status {
  unsigned long long error;  // complement of the first rejected key, 0 = none (common.cuh)
  unsigned long long tokens, sequences, steps, nonfinite;
  unsigned int blocks_done;
  loss_result result;
};

/// Everything the kernels read: the inputs' views, the options, the workspace arrays.
template <class T, class M, class G>
struct loss_params {
  policy_inputs<T, M> in;
  mat_view<G> grad;
  loss_options o;
  int64_t rows = 0, cols = 0, K = 0;
  int slots = 0;  // K + 1: slot 0 collects every used token of a row, slot k + 1 step k
  bool use_ref = false, by_step = false, have_step = false, need_counts = false, need_dsum = false;
  int32_t* count = nullptr;  // (rows, slots) used tokens
  double* dsum = nullptr;    // (rows, slots) sums of delta
  double* partials = nullptr;  // (rows, loss_fields)
  loss_status* st = nullptr;
};

__device__ inline double negative_infinity() { return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull)); }

/// The divisor of the aggregation (docs/decisions.md, "Normalizers"); every block computes
/// the same value from the scan's counts.
__device__ inline double loss_normalizer(const loss_options& o, const loss_status& st, int64_t rows, int64_t cols) {
  switch (o.agg) {
    case aggregation::token_mean:
      return o.global_tokens > 0 ? o.global_tokens : static_cast<double>(st.tokens);
    case aggregation::seq_mean_token_mean:
    case aggregation::seq_mean_token_sum:
      return o.global_sequences > 0 ? o.global_sequences : static_cast<double>(st.sequences);
    case aggregation::seq_mean_token_sum_norm:
      return (o.global_sequences > 0 ? o.global_sequences : static_cast<double>(rows)) *
             (o.max_response_length > 0 ? o.max_response_length : static_cast<double>(cols));
    case aggregation::step_mean:
      return o.global_steps > 0 ? o.global_steps : static_cast<double>(st.steps);
  }
  return 0;
}

/// Pass 1, one block per row: validate and count; reads only.
template <class T, class M, class G>
__global__ void loss_scan_kernel(const loss_params<T, M, G> p) {
  // Per-thread accumulators, one column per thread: [slot][thread] sums of delta (double)
  // then [slot][thread] counts. Each thread sums its own tokens in order; the columns are
  // then added in a fixed order, so the sums are the same bits every run.
  extern __shared__ __align__(16) unsigned char loss_scan_smem[];
  const int n = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int64_t i = blockIdx.x, cols = p.cols;
  double* acc = reinterpret_cast<double*>(loss_scan_smem);
  int32_t* cnt = reinterpret_cast<int32_t*>(loss_scan_smem + (p.need_dsum ? sizeof(double) * p.slots * n : 0));
  if (p.need_counts)
    for (int s = 0; s < p.slots; ++s) cnt[s * n + tid] = 0;
  if (p.need_dsum)
    for (int s = 0; s < p.slots; ++s) acc[s * n + tid] = 0.0;

  const bool drop = p.o.nonfinite == nonfinite_policy::mask;
  unsigned long long first = no_key, tokens = 0, nonfinite = 0, seen = 0;
  for (int64_t t = tid; t < cols; t += n) {
    const M m = p.in.mask(i, t);
    if (m == M(0)) continue;  // masked-out tokens are never looked at
    const unsigned long long key = static_cast<unsigned long long>(i * cols + t) * loss_checks;
    // A thread's tokens come in increasing order: its first rejection is its smallest key.
    if (!(m == M(1))) {
      first = key + loss_bad_mask;
      break;
    }
    int32_t s = -1;
    if (p.have_step) {
      s = p.in.step(i, t);
      if (s < -1 || s >= p.K) {
        first = key + loss_bad_step;
        break;
      }
    }
    const T logp = p.in.logp(i, t), old = p.in.old_logp(i, t);
    const T a = p.by_step ? (s >= 0 ? p.in.step_advantages(i, s) : T(0)) : p.in.token_advantages(i, t);
    bool ok = finite(logp) && finite(old) && finite(a);
    if (p.use_ref) ok = ok && finite(p.in.ref_logp(i, t));
    if (!ok) {
      if (!drop) {
        first = key + loss_bad_value;
        break;
      }
      ++nonfinite;  // nonfinite_policy::mask: the token is dropped everywhere
      continue;
    }
    ++tokens;
    if (s >= 0) seen |= 1ull << s;
    if (p.need_counts) {
      ++cnt[tid];
      if (s >= 0) ++cnt[(s + 1) * n + tid];
    }
    if (p.need_dsum) {
      const double d = static_cast<double>(core::importance_ratio(logp, old).delta);
      acc[tid] += d;
      if (s >= 0) acc[(s + 1) * n + tid] += d;
    }
  }

  unsigned long long sums[2] = {tokens, nonfinite};
  block_reduce<2>(sums, sum_op{}, 0ull);
  const unsigned long long steps = block_reduce(seen, or_op{}, 0ull);
  const unsigned long long err = block_reduce(first, min_op{}, no_key);
  if (tid == 0) {
    report_key(&p.st->error, err);
    if (sums[0] > 0) {
      atomicAdd(&p.st->tokens, sums[0]);
      atomicAdd(&p.st->sequences, 1ull);
    }
    if (steps != 0) atomicAdd(&p.st->steps, static_cast<unsigned long long>(__popcll(steps)));
    if (sums[1] > 0) atomicAdd(&p.st->nonfinite, sums[1]);
  }
  if (!p.need_counts) return;
  __syncthreads();
  // Warp w adds the columns of slots w, w + n_warps, ...: lane-strided, then a warp tree.
  const int lane = tid % warp_size, warp = tid / warp_size, n_warps = n / warp_size;
  for (int s = warp; s < p.slots; s += n_warps) {
    int32_t c = 0;
    double d = 0.0;
    for (int j = lane; j < n; j += warp_size) {
      c += cnt[s * n + j];
      if (p.need_dsum) d += acc[s * n + j];
    }
    c = warp_reduce(c, sum_op{});
    if (p.need_dsum) d = warp_reduce(d, sum_op{});
    if (lane == 0) {
      p.count[i * p.slots + s] = c;
      if (p.need_dsum) p.dsum[i * p.slots + s] = d;
    }
  }
}

/// Pass 2, one block per row: the per-token formulas, the gradient, the partial sums; the
/// block that finishes last reduces the partials in row order into st->result.
template <class T, class M, class G>
__global__ void loss_compute_kernel(const loss_params<T, M, G> p) {
  // Per-row tables indexed by step + 1 (slot 0: tokens without a step, and unused tokens).
  __shared__ T adv_t[max_steps + 1], weight_t[max_steps + 1], group_t[max_steps + 1];
  __shared__ bool slot_on[max_steps + 1];
  const loss_status& st = *p.st;
  if (has_key(st.error)) return;  // rejected by the scan: write nothing
  const int n = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int64_t i = blockIdx.x, cols = p.cols;
  const loss_options& o = p.o;
  const double norm = loss_normalizer(o, st, p.rows, cols);
  const double inv_norm = norm > 0 ? 1.0 / norm : 0.0;
  const bool drop = st.nonfinite > 0;

  const int32_t* cnt = p.need_counts ? p.count + i * p.slots : nullptr;
  const double* dsum = p.need_dsum ? p.dsum + i * p.slots : nullptr;
  // Aggregation weight before the global 1 / norm (docs/math.md §6).
  double row_weight = 1.0;
  if (o.agg == aggregation::seq_mean_token_mean) row_weight = cnt[0] > 0 ? 1.0 / cnt[0] : 0.0;
  for (int k = tid; k < p.slots; k += n) {
    const double a = k > 0 && p.by_step ? static_cast<double>(p.in.step_advantages(i, k - 1)) : 0.0;
    const bool ok = a - a == 0.0;  // a step whose advantage is not finite: its tokens are dropped
    const double w = o.agg != aggregation::step_mean ? row_weight : (k > 0 && cnt[k] > 0 ? 1.0 / cnt[k] : 0.0);
    // Step / sequence ratio: the mean delta of the group; loss_no_group: "use the token ratio".
    double g = loss_no_group;
    if (o.ratio == ratio_level::step && k > 0 && cnt[k] > 0) g = dsum[k] / cnt[k];
    if (o.ratio == ratio_level::sequence && cnt[0] > 0) g = dsum[0] / cnt[0];
    slot_on[k] = ok;
    adv_t[k] = ok ? static_cast<T>(a) : T(0);
    weight_t[k] = static_cast<T>(w);
    group_t[k] = static_cast<T>(g);
  }
  __syncthreads();

  const core::clip_params clip{o.clip_low, o.clip_high, o.dual_clip, o.dual_clip_c};
  const T inv_norm_t = static_cast<T>(inv_norm), beta = static_cast<T>(o.kl_coef);
  const T row_weight_t = weight_t[0], row_delta = group_t[0];
  const bool step_mean = o.agg == aggregation::step_mean, step_ratio = o.ratio == ratio_level::step;
  const bool grouped_ratio = o.ratio != ratio_level::token;
  double sums[loss_sums] = {};
  double ratio_max = negative_infinity();
  for (int64_t t = tid; t < cols; t += n) {
    // Unused tokens (mask 0, dropped) get logp = old = ref = 0 and a = w = 0: delta = 0,
    // rho = 1, k = 0, nothing is clipped, and whatever they held (NaN padding) is never read.
    bool on = p.in.mask(i, t) != M(0);
    int32_t s = -1;
    T logp(0), old(0), ref(0), a_tok(0);
    if (on) {
      if (p.have_step) s = p.in.step(i, t);
      logp = p.in.logp(i, t);
      old = p.in.old_logp(i, t);
      if (p.use_ref) ref = p.in.ref_logp(i, t);
      if (!p.by_step) a_tok = p.in.token_advantages(i, t);
      if (drop) on = finite(logp) && finite(old) && (!p.use_ref || finite(ref)) && (p.by_step || finite(a_tok));
      if (on && s >= 0 && !slot_on[s + 1]) on = false;
      if (!on) {
        logp = old = ref = a_tok = T(0);
        s = -1;
      }
    }
    const int slot = on ? s + 1 : 0;
    const T a = p.by_step ? adv_t[slot] : a_tok;
    const core::token_ratio<T> tr = core::importance_ratio(logp, old);
    T rho = tr.rho;
    bool moves = tr.moves;
    if (grouped_ratio) {
      // Step / sequence ratio in the stop-gradient form: value exp(mean delta), slope 1.
      const T g = step_ratio ? group_t[slot] : row_delta;
      if (g < static_cast<T>(loss_no_group)) {
        rho = sapo::simd::exp(g);
        moves = true;
      }
    }
    const core::surrogate_value<T> sv = core::clipped_surrogate(a, rho, moves, clip);
    T l = sv.loss, dl = sv.slope;
    if (p.use_ref) {
      const core::kl_value<T> kv = core::kl_penalty(logp, ref, o.kl);
      l = l + beta * kv.k;
      dl = dl + beta * kv.slope;
      sums[4] += static_cast<double>(kv.k);
    }
    const T w = step_mean ? weight_t[slot] : (on ? row_weight_t : T(0));
    p.grad(i, t) = static_cast<G>(on ? w * inv_norm_t * dl : T(0));
    sums[0] += static_cast<double>(w * l);
    if (on) {
      sums[1] += static_cast<double>(rho);
      ratio_max = ratio_max < static_cast<double>(rho) ? static_cast<double>(rho) : ratio_max;
    }
    sums[2] += static_cast<double>(-tr.delta);
    sums[3] += static_cast<double>(T(1) / tr.rho + tr.delta - T(1));
    sums[5] += sv.clipped_low ? 1.0 : 0.0;
    sums[6] += sv.clipped_high ? 1.0 : 0.0;
    sums[7] += sv.dual ? 1.0 : 0.0;
  }

  block_reduce<loss_sums>(sums, sum_op{}, 0.0);
  ratio_max = block_reduce(ratio_max, max_op{}, negative_infinity());
  if (tid == 0) {
    for (int f = 0; f < loss_sums; ++f) p.partials[i * loss_fields + f] = sums[f];
    p.partials[i * loss_fields + loss_sums] = ratio_max;
  }
  if (!last_block_done(&p.st->blocks_done)) return;

  // The last block: rows in a fixed order (thread-strided, then the block tree).
  double total[loss_sums] = {};
  double total_max = negative_infinity();
  for (int64_t r = tid; r < p.rows; r += n) {
    for (int f = 0; f < loss_sums; ++f) total[f] += load_global(&p.partials[r * loss_fields + f]);
    const double m = load_global(&p.partials[r * loss_fields + loss_sums]);
    total_max = total_max < m ? m : total_max;
  }
  block_reduce<loss_sums>(total, sum_op{}, 0.0);
  total_max = block_reduce(total_max, max_op{}, negative_infinity());
  if (tid == 0) {
    loss_result res;
    res.n_tokens = static_cast<int64_t>(st.tokens);
    res.n_sequences = static_cast<int64_t>(st.sequences);
    res.n_steps = static_cast<int64_t>(st.steps);
    res.n_nonfinite_masked = static_cast<int64_t>(st.nonfinite);
    res.loss = total[0] * inv_norm;
    if (res.n_tokens > 0) {
      const double nt = static_cast<double>(res.n_tokens);
      res.ratio_mean = total[1] / nt;
      res.approx_kl_old = total[2] / nt;
      res.approx_kl_old_k3 = total[3] / nt;
      res.kl_ref = total[4] / nt;
      res.clip_frac_low = total[5] / nt;
      res.clip_frac_high = total[6] / nt;
      res.clip_frac_dual = total[7] / nt;
      res.ratio_max = total_max;
    }
    p.st->result = res;
  }
}

/// Threads of the scan: 256, fewer when the per-thread slot columns would not fit in 48 KiB
/// of shared memory (many steps). Depends on the shape only, so the sums stay reproducible.
inline int loss_scan_threads(int slots, bool need_counts, bool need_dsum) {
  if (!need_counts) return loss_threads;
  const size_t per_thread = static_cast<size_t>(slots) * (sizeof(int32_t) + (need_dsum ? sizeof(double) : 0));
  int n = loss_threads;
  while (n > warp_size && n * per_thread > 48 * 1024) n /= 2;
  return n;
}

/// Host checks of one call (the same as sapo::policy_loss's) and the kernel parameters
/// without the workspace pointers.
template <class T, class M, class G>
loss_params<T, M, G> plan_policy_loss(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad,
                                      bool check_grad = true) {
  static_assert(std::is_floating_point<T>::value, "log-probabilities must be float or double");
  static_assert(std::is_floating_point<G>::value, "the gradient must be float or double");
  const int64_t B = in.logp.rows, Tn = in.logp.cols;
  const int64_t K = core::check_policy_inputs(in, options);  // the CPU entry point's checks
  if (check_grad) {
    core::check_shape("grad", grad, B, Tn);
    core::check_output("grad", grad);
  }

  loss_params<T, M, G> p;
  p.in = in;
  p.grad = grad;
  p.o = options;
  p.rows = B;
  p.cols = Tn;
  p.K = K;
  p.slots = static_cast<int>(K + 1);
  p.use_ref = !in.ref_logp.empty();
  p.by_step = !in.step_advantages.empty();
  p.have_step = !in.step.empty();
  p.need_dsum = options.ratio != ratio_level::token;
  p.need_counts = p.need_dsum || options.agg == aggregation::step_mean ||
                  options.agg == aggregation::seq_mean_token_mean;
  return p;
}

template <class T, class M, class G>
size_t layout_policy_loss(carve& c, loss_params<T, M, G>& p) {
  p.st = c.take<loss_status>(1);
  const size_t table = static_cast<size_t>(p.rows) * static_cast<size_t>(p.slots);
  p.count = p.need_counts ? c.take<int32_t>(table) : nullptr;
  p.dsum = p.need_dsum ? c.take<double>(table) : nullptr;
  p.partials = c.take<double>(static_cast<size_t>(p.rows) * loss_fields);
  return c.bytes();
}

/// The sapo::error the CPU kernel throws for the same first rejected token.
template <class T, class M>
[[noreturn]] void throw_policy_loss_error(const policy_inputs<T, M>& in, int64_t cols, int64_t K,
                                          unsigned long long key, cudaStream_t stream) {
  const unsigned long long check = key % loss_checks;
  const int64_t flat = static_cast<int64_t>(key / loss_checks), i = flat / cols, t = flat % cols;
  std::ostringstream where;
  where << "(" << i << ", " << t << ")";
  std::ostringstream expected, actual;
  if (check == loss_bad_mask) {
    expected << "0 or 1 at " << where.str();
    actual << +fetch(&in.mask(i, t), stream);
    throw sapo::error("mask", expected.str(), actual.str(), __FILE__, __LINE__);
  }
  const int32_t s = in.step.empty() ? -1 : fetch(&in.step(i, t), stream);
  if (check == loss_bad_step) {
    expected << "ids in [-1, " << K << ") at " << where.str();
    actual << s;
    throw sapo::error("step", expected.str(), actual.str(), __FILE__, __LINE__);
  }
  const double a = !in.step_advantages.empty()
                       ? (s >= 0 ? static_cast<double>(fetch(&in.step_advantages(i, s), stream)) : 0.0)
                       : static_cast<double>(fetch(&in.token_advantages(i, t), stream));
  expected << "finite values at masked-in token " << where.str();
  actual << "logp " << fetch(&in.logp(i, t), stream) << ", old_logp " << fetch(&in.old_logp(i, t), stream)
         << ", ref_logp "
         << (in.ref_logp.empty() ? std::string("none") : std::to_string(fetch(&in.ref_logp(i, t), stream)))
         << ", advantage " << a;
  throw sapo::error("logp / old_logp / ref_logp / advantages", expected.str(), actual.str(), __FILE__, __LINE__);
}

}  // namespace detail

/// \brief Bytes of workspace policy_loss needs for these inputs and options (no device access).
template <class T, class M>
size_t policy_loss_workspace_bytes(const policy_inputs<T, M>& in, const loss_options& options) {
  mat_view<T> grad(nullptr, in.logp.rows, in.logp.cols);
  auto p = detail::plan_policy_loss(in, options, grad, false);
  detail::carve c(nullptr);
  return detail::layout_policy_loss(c, p);
}

/// \brief Policy loss, its gradient and diagnostics on the GPU (SPEC §4-6); the same
/// contract as sapo::policy_loss.
/// \param in      device views: logp, old_logp, [ref_logp], token_advantages or
///                step_advantages (B, K) + step, [step], mask (B, T) -- any strides
/// \param options host struct; num_threads is ignored
/// \param grad    (B, T) device output: d loss / d logp (0 where mask = 0), float or double
/// \param stream  every kernel and copy goes there
/// \param ws      workspace (common.cuh); empty: cudaMallocAsync on `stream`
/// \return the loss and the diagnostics (copied back: the call waits for the stream)
/// \throws sapo::error for a rejected input (nothing written to grad), cuda_error for a CUDA failure
///
/// Sums are in double (per token, per row, then rows in order), so loss and diagnostics match
/// the CPU kernel to rounding and are bit-identical from run to run; the gradient is computed
/// per token with the same formulas in T.
template <class T, class M, class G>
loss_result policy_loss(const policy_inputs<T, M>& in, const loss_options& options, mat_view<G> grad,
                        cudaStream_t stream, workspace ws = {}) {
  detail::loss_params<T, M, G> p = detail::plan_policy_loss(in, options, grad);
  if (p.rows == 0 || p.cols == 0) return loss_result{};
  SAPO_CHECK(p.rows <= 0x7fffffff, "logp.rows (B)", "at most 2^31 - 1 rows (one block per row)", p.rows);
  detail::carve sizing(nullptr);
  const size_t bytes = detail::layout_policy_loss(sizing, p);
  detail::scratch s(ws, bytes, stream);
  detail::carve c(s.base());
  detail::layout_policy_loss(c, p);

  SAPO_CUDA_CALL(cudaMemsetAsync(p.st, 0, sizeof(detail::loss_status), stream));
  const int scan_threads = detail::loss_scan_threads(p.slots, p.need_counts, p.need_dsum);
  const size_t scan_smem = p.need_counts ? static_cast<size_t>(p.slots) * scan_threads *
                                               (sizeof(int32_t) + (p.need_dsum ? sizeof(double) : 0))
                                         : 0;
  const auto rows = static_cast<unsigned int>(p.rows);
  detail::launch(detail::loss_scan_kernel<T, M, G>, dim3(rows), dim3(scan_threads), scan_smem, stream, p);
  detail::launch(detail::loss_compute_kernel<T, M, G>, dim3(rows), dim3(detail::loss_threads), 0, stream, p);
  detail::loss_status st;
  detail::copy_to_host(&st, p.st, 1, stream);
  if (detail::has_key(st.error)) detail::throw_policy_loss_error(in, p.cols, p.K, detail::key_of(st.error), stream);
  return st.result;
}

}  // namespace cuda
}  // namespace sapo
