/// \file advantages.cuh
/// \brief SPEC §3 on the GPU: group-relative advantages per (group, step), the outcome
/// (GRPO) case K = 1, and the broadcast to tokens. The per-pair formula is
/// detail::group_relative_advantage of sapo/advantages.hpp, called from device code.
///
/// \code
///   sapo::advantage_options opt;
///   auto stats = sapo::cuda::group_advantages(rewards, sapo::group_layout::contiguous(8), opt, A, stream);
///   sapo::cuda::broadcast_step_advantages(A, step, mask, token_adv, stream);
/// \endcode
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <type_traits>
#include <vector>

#include <sapo/advantages.hpp>

#include "common.cuh"
#include "segment.cuh"

namespace sapo {
namespace cuda {
namespace detail {

// group_advantages runs, on one stream:
//   validate   (reads only) first Inf reward (i, k) and first group id outside [0, n_groups);
//              with explicit ids also the size of every group (integer atomics);
//   offsets    explicit ids: exclusive scan of the sizes (one block);
//   fill, sort explicit ids: each group's members (positions from integer atomics), then one
//              thread per group sorts them: response order, as the CPU's stable counting sort;
//   batch      per step: count, mean and std of the present rewards of the whole batch;
//   pairs      one thread per (group, step): the two-pass moments in member order, in double,
//              as the CPU computes them, then group_relative_advantage for every member; the
//              block finishing last reduces the per-pair statistics, groups in order, per step.
// Every kernel after validate returns at once when validate rejected an input.

constexpr int pair_threads = 128;

struct adv_batch {
  long long n;
  double mean, std;
};

/// Per (group, step): sums over its present members, and whether it counts as a pair and as
/// a zero-variance pair.
struct adv_pair {
  double a_sum, a_sq;
  int valid, zero_variance;
};

struct adv_step_stats {
  double mean_reward, zero_variance_fraction, advantage_std;
  long long n_present, n_zero_variance, n_pairs;
};

/// Status and statistics, copied back in one piece.
struct adv_header {
  stage_status st;  // error[0]: Inf reward, error[1]: unknown group id
  adv_step_stats stats[max_steps];
};

template <class R, class A>
struct adv_params {
  mat_view<R> rewards;
  mat_view<A> adv;
  advantage_options o;
  int64_t rows = 0, K = 0, group_size = 0, n_groups = 0;
  vec_view<const int64_t> ids;  // explicit group ids (device), empty for contiguous groups
  int32_t* sizes = nullptr;     // (n_groups) explicit ids
  int64_t* offsets = nullptr;   // (n_groups + 1) explicit ids
  int64_t* members = nullptr;   // (rows) explicit ids
  adv_batch* batch = nullptr;   // (K)
  adv_pair* pairs = nullptr;    // (K, n_groups)
  adv_header* header = nullptr;
  __device__ bool rejected() const { return has_key(header->st.error[0]) || has_key(header->st.error[1]); }
};

template <class R, class A>
__global__ void adv_validate_kernel(const adv_params<R, A> p) {
  unsigned long long first_inf = no_key, first_id = no_key;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t k = 0; k < p.K && first_inf == no_key; ++k) {
      const double r = static_cast<double>(p.rewards(i, k));
      if (r == r && r - r != 0.0) first_inf = static_cast<unsigned long long>(i * p.K + k);  // +-Inf; NaN = absent
    }
    if (p.ids.data != nullptr) {  // (empty() is host-only constexpr)
      const int64_t g = p.ids(i);
      if (g < 0 || g >= p.n_groups) {
        if (first_id == no_key) first_id = static_cast<unsigned long long>(i);
      } else {
        atomicAdd(&p.sizes[g], 1);
      }
    }
  }
  first_inf = block_reduce(first_inf, min_op{}, no_key);
  first_id = block_reduce(first_id, min_op{}, no_key);
  if (threadIdx.x == 0) {
    report_key(&p.header->st.error[0], first_inf);
    report_key(&p.header->st.error[1], first_id);
  }
}

/// offsets[g] = sizes[0] + ... + sizes[g - 1]; one block walks the groups in tiles. The
/// sizes are reset to 0: group_fill_kernel uses them as cursors.
template <class R, class A>
__global__ void group_offsets_kernel(const adv_params<R, A> p) {
  __shared__ int64_t scan[1024];
  __shared__ int64_t carry;
  if (p.rejected()) return;
  const int tid = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  if (tid == 0) carry = 0;
  for (int64_t base = 0; base < p.n_groups; base += n) {
    const int64_t g = base + tid;
    const int64_t size = g < p.n_groups ? p.sizes[g] : 0;
    scan[tid] = size;
    __syncthreads();
    for (int off = 1; off < n; off *= 2) {  // inclusive Hillis-Steele scan
      const int64_t x = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += x;
      __syncthreads();
    }
    if (g < p.n_groups) {
      p.offsets[g] = carry + scan[tid] - size;
      p.sizes[g] = 0;  // from now on the fill cursor of group g
    }
    __syncthreads();
    if (tid == n - 1) carry += scan[tid];
    __syncthreads();
  }
  if (tid == 0) p.offsets[p.n_groups] = carry;
}

/// Every response into its group's slice of `members`, at a position an integer atomic hands
/// out: the slice's *set* is fixed, its order is not (yet).
template <class R, class A>
__global__ void group_fill_kernel(const adv_params<R, A> p) {
  if (p.rejected()) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = p.ids(i);
    p.members[p.offsets[g] + atomicAdd(&p.sizes[g], 1)] = i;
  }
}

/// Heapsort of a[0, n) (in place, O(n log n), no recursion).
__device__ inline void sort_indices(int64_t* a, int64_t n) {
  auto sift = [a](int64_t root, int64_t end) {
    for (int64_t child = 2 * root + 1; child < end; child = 2 * root + 1) {
      if (child + 1 < end && a[child] < a[child + 1]) ++child;
      if (!(a[root] < a[child])) return;
      const int64_t x = a[root];
      a[root] = a[child];
      a[child] = x;
      root = child;
    }
  };
  for (int64_t start = n / 2 - 1; start >= 0; --start) sift(start, n);
  for (int64_t end = n - 1; end > 0; --end) {
    const int64_t x = a[0];
    a[0] = a[end];
    a[end] = x;
    sift(0, end);
  }
}

/// One thread per group sorts its members: response order, the CPU's stable counting sort.
template <class R, class A>
__global__ void group_sort_kernel(const adv_params<R, A> p) {
  if (p.rejected()) return;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < p.n_groups) sort_indices(p.members + p.offsets[g], p.offsets[g + 1] - p.offsets[g]);
}

/// Present-reward count, mean and std of the whole batch at step blockIdx.x (two passes).
template <class R, class A>
__global__ void batch_moments_kernel(const adv_params<R, A> p) {
  __shared__ double mean_s;
  if (p.rejected()) return;
  const int64_t k = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  unsigned long long n = 0;
  double sum = 0;
  for (int64_t i = tid; i < p.rows; i += blockDim.x) {
    const double v = static_cast<double>(p.rewards(i, k));
    if (v == v) {
      ++n;
      sum += v;
    }
  }
  n = block_reduce(n, sum_op{}, 0ull);
  sum = block_reduce(sum, sum_op{}, 0.0);
  if (tid == 0) mean_s = n > 0 ? sum / static_cast<double>(n) : 0.0;
  __syncthreads();
  const double mean = mean_s;
  double ss = 0;
  for (int64_t i = tid; i < p.rows; i += blockDim.x) {
    const double v = static_cast<double>(p.rewards(i, k));
    if (v == v) ss += __dmul_rn(v - mean, v - mean);
  }
  ss = block_reduce(ss, sum_op{}, 0.0);
  if (tid == 0) {
    const long long dof = p.o.unbiased_std ? static_cast<long long>(n) - 1 : static_cast<long long>(n);
    p.batch[k] = adv_batch{static_cast<long long>(n), mean_s, dof > 0 ? sqrt(ss / static_cast<double>(dof)) : 0.0};
  }
}

/// One thread per (group, step); then the last block turns the per-pair sums into the
/// per-step statistics.
template <class R, class A>
__global__ void pair_advantages_kernel(const adv_params<R, A> p) {
  if (p.rejected()) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  if (pair < p.n_groups * p.K) {
    const int64_t g = pair / p.K, k = pair % p.K;
    const bool contiguous = p.ids.data == nullptr;
    const int64_t begin = contiguous ? g * p.group_size : p.offsets[g];
    const int64_t count = contiguous ? p.group_size : p.offsets[g + 1] - begin;
    const int64_t* members = p.members;
    auto member = [=](int64_t j) { return contiguous ? begin + j : members[begin + j]; };
    // The moments of sapo/advantages.hpp: present rewards in member order, in double, two passes.
    core::group_moments m;
    double lo = 0, hi = 0;
    for (int64_t j = 0; j < count; ++j) {
      const double v = static_cast<double>(p.rewards(member(j), k));
      if (v != v) continue;
      if (m.n == 0) lo = hi = v;
      lo = v < lo ? v : lo;
      hi = hi < v ? v : hi;
      m.sum += v;
      ++m.n;
    }
    if (m.n > 0) {
      m.all_equal = lo == hi;
      m.mean = m.sum / static_cast<double>(m.n);
      double ss = 0;
      for (int64_t j = 0; j < count; ++j) {
        const double v = static_cast<double>(p.rewards(member(j), k));
        if (v == v) ss += __dmul_rn(v - m.mean, v - m.mean);  // no FMA: the CPU's rounding
      }
      const int64_t dof = p.o.unbiased_std ? m.n - 1 : m.n;
      m.std = dof > 0 ? sqrt(ss / static_cast<double>(dof)) : 0.0;
    }
    const double batch_std = p.batch[k].std;
    adv_pair out{0.0, 0.0, 0, 0};
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = member(j);
      const double r = static_cast<double>(p.rewards(i, k));
      const double a = r != r ? 0.0 : core::group_relative_advantage(r, m, batch_std, p.o);
      p.adv(i, k) = static_cast<A>(a);
      if (r == r) {
        out.a_sum += a;
        out.a_sq += __dmul_rn(a, a);
      }
    }
    if (m.n >= 1) {
      out.valid = 1;
      out.zero_variance = m.n == 1 || m.all_equal ? 1 : 0;
    }
    p.pairs[k * p.n_groups + g] = out;
  }
  if (!last_block_done(&p.header->st.blocks_done)) return;

  // The last block: per step, the groups in order.
  for (int64_t k = 0; k < p.K; ++k) {
    double sums[2] = {0.0, 0.0};
    unsigned long long counts[2] = {0, 0};
    for (int64_t g = tid; g < p.n_groups; g += blockDim.x) {
      const adv_pair* q = &p.pairs[k * p.n_groups + g];
      sums[0] += load_global(&q->a_sum);
      sums[1] += load_global(&q->a_sq);
      counts[0] += static_cast<unsigned long long>(load_global(&q->valid));
      counts[1] += static_cast<unsigned long long>(load_global(&q->zero_variance));
    }
    block_reduce<2>(sums, sum_op{}, 0.0);
    block_reduce<2>(counts, sum_op{}, 0ull);
    if (tid == 0) {
      adv_step_stats s{};
      const adv_batch b = p.batch[k];
      s.n_present = b.n;
      s.mean_reward = b.mean;
      s.n_pairs = static_cast<long long>(counts[0]);
      s.n_zero_variance = static_cast<long long>(counts[1]);
      if (s.n_pairs > 0) s.zero_variance_fraction = static_cast<double>(s.n_zero_variance) / static_cast<double>(s.n_pairs);
      if (s.n_present > 0) {
        const double n = static_cast<double>(s.n_present), mean = sums[0] / n;
        const double var = sums[1] / n - mean * mean;
        s.advantage_std = sqrt(var > 0.0 ? var : 0.0);
      }
      p.header->stats[k] = s;
    }
  }
}

template <class R, class A>
size_t layout_advantages(carve& c, adv_params<R, A>& p) {
  p.header = c.take<adv_header>(1);
  p.batch = c.take<adv_batch>(static_cast<size_t>(p.K));
  p.pairs = c.take<adv_pair>(static_cast<size_t>(p.K * p.n_groups));
  if (!p.ids.empty()) {
    p.sizes = c.take<int32_t>(static_cast<size_t>(p.n_groups));
    p.offsets = c.take<int64_t>(static_cast<size_t>(p.n_groups + 1));
    p.members = c.take<int64_t>(static_cast<size_t>(p.rows));
  }
  return c.bytes();
}

/// Host checks (those of sapo::group_advantages that need no data) and the parameters.
template <class R, class A>
adv_params<R, A> plan_advantages(mat_view<R> rewards, const group_layout& groups, const advantage_options& options,
                                 mat_view<A> adv) {
  core::check_group_advantage_inputs(rewards, options, adv);  // the CPU entry point's checks
  const int64_t B = rewards.rows, K = rewards.cols;
  adv_params<R, A> p;
  p.rewards = rewards;
  p.adv = adv;
  p.o = options;
  p.rows = B;
  p.K = K;
  if (groups.group_ids.empty()) {
    SAPO_CHECK(groups.group_size > 0, "groups.group_size", "> 0 (or explicit group ids)", groups.group_size);
    SAPO_CHECK(B % groups.group_size == 0, "groups.group_size", "a divisor of the batch size B = " << B,
               groups.group_size << " (B % G = " << B % groups.group_size << ")");
    p.group_size = groups.group_size;
    p.n_groups = B / groups.group_size;
  } else {
    core::check_shape("groups.group_ids", groups.group_ids, B);
    SAPO_CHECK(groups.n_groups > 0, "groups.n_groups", "> 0", groups.n_groups);
    p.ids = groups.group_ids;
    p.n_groups = groups.n_groups;
  }
  return p;
}

}  // namespace detail

/// \brief Bytes of workspace group_advantages needs for B responses, K steps and this layout.
inline size_t group_advantages_workspace_bytes(int64_t B, int64_t K, const group_layout& groups) {
  detail::adv_params<const float, float> p;
  p.rows = B;
  p.K = K;
  p.ids = groups.group_ids;
  p.n_groups = groups.group_ids.empty() ? (groups.group_size > 0 ? B / groups.group_size : 0) : groups.n_groups;
  detail::carve c(nullptr);
  return detail::layout_advantages(c, p);
}

/// \brief Group-relative advantages for every (response, step) on the GPU (SPEC §3); the
/// same contract as sapo::group_advantages.
/// \param rewards (B, K) device step rewards; NaN marks an absent step
/// \param groups  contiguous groups of G, or explicit ids: `group_ids` is a (B) **device** view
/// \param options host struct (normalization, unbiased std, eps, singleton policy)
/// \param adv     (B, K) device output A[i,k], float or double
/// \return per-step statistics (host vectors; the call waits for the stream)
/// \throws sapo::error for a rejected input (nothing written to adv), cuda_error for a CUDA failure
template <class R, class A>
advantage_stats group_advantages(mat_view<R> rewards, const group_layout& groups, const advantage_options& options,
                                 mat_view<A> adv, cudaStream_t stream, workspace ws = {}) {
  detail::adv_params<R, A> p = detail::plan_advantages(rewards, groups, options, adv);
  const int64_t B = p.rows, K = p.K;
  advantage_stats stats;
  stats.mean_reward.assign(static_cast<size_t>(K), 0.0);
  stats.zero_variance_fraction.assign(static_cast<size_t>(K), 0.0);
  stats.advantage_std.assign(static_cast<size_t>(K), 0.0);
  stats.n_present.assign(static_cast<size_t>(K), 0);
  stats.n_zero_variance.assign(static_cast<size_t>(K), 0);
  stats.n_pairs.assign(static_cast<size_t>(K), 0);
  if (B == 0) return stats;
  SAPO_CHECK(p.n_groups <= 0x7fffffff, "groups.n_groups", "at most 2^31 - 1 groups", p.n_groups);

  detail::carve sizing(nullptr);
  detail::scratch s(ws, detail::layout_advantages(sizing, p), stream);
  detail::carve c(s.base());
  detail::layout_advantages(c, p);

  SAPO_CUDA_CALL(cudaMemsetAsync(p.header, 0, sizeof(detail::adv_header), stream));
  if (p.sizes != nullptr) SAPO_CUDA_CALL(cudaMemsetAsync(p.sizes, 0, sizeof(int32_t) * p.n_groups, stream));
  const int threads = detail::tile_threads;
  detail::launch(detail::adv_validate_kernel<R, A>, dim3(detail::blocks_for(B, threads)), dim3(threads), 0, stream, p);
  if (!p.ids.empty()) {
    detail::launch(detail::group_offsets_kernel<R, A>, dim3(1), dim3(1024), 0, stream, p);
    detail::launch(detail::group_fill_kernel<R, A>, dim3(detail::blocks_for(B, threads)), dim3(threads), 0, stream, p);
    detail::launch(detail::group_sort_kernel<R, A>, dim3(detail::blocks_for(p.n_groups, detail::pair_threads, 0x7fffffff)),
                   dim3(detail::pair_threads), 0, stream, p);
  }
  detail::launch(detail::batch_moments_kernel<R, A>, dim3(static_cast<unsigned int>(K)), dim3(threads), 0, stream, p);
  const int64_t pairs = p.n_groups * K;
  detail::launch(detail::pair_advantages_kernel<R, A>,
                 dim3(detail::blocks_for(pairs, detail::pair_threads, 0x7fffffff)), dim3(detail::pair_threads), 0,
                 stream, p);
  detail::adv_header h;
  detail::copy_to_host(&h, p.header, 1, stream);
  if (detail::has_key(h.st.error[0])) {  // the CPU checks the rewards before the group ids
    const auto key = static_cast<int64_t>(detail::key_of(h.st.error[0]));
    const int64_t i = key / K, k = key % K;
    std::ostringstream expected, actual;
    expected << "finite values or NaN (absent step) at (" << i << ", " << k << ")";
    actual << detail::fetch(&rewards(i, k), stream);
    throw sapo::error("rewards", expected.str(), actual.str(), __FILE__, __LINE__);
  }
  if (detail::has_key(h.st.error[1])) {
    const auto i = static_cast<int64_t>(detail::key_of(h.st.error[1]));
    std::ostringstream expected, actual;
    expected << "ids in [0, " << p.n_groups << ")";
    actual << detail::fetch(&groups.group_ids(i), stream) << " at response " << i;
    throw sapo::error("groups.group_ids", expected.str(), actual.str(), __FILE__, __LINE__);
  }
  for (size_t k = 0; k < static_cast<size_t>(K); ++k) {
    const detail::adv_step_stats& x = h.stats[k];
    stats.mean_reward[k] = x.mean_reward;
    stats.zero_variance_fraction[k] = x.zero_variance_fraction;
    stats.advantage_std[k] = x.advantage_std;
    stats.n_present[k] = x.n_present;
    stats.n_zero_variance[k] = x.n_zero_variance;
    stats.n_pairs[k] = x.n_pairs;
  }
  return stats;
}

/// \brief Outcome mode (GRPO family) on the GPU: group_advantages with K = 1.
/// \param rewards (B) device rewards (NaN: left out, A = 0)
/// \param adv     (B) device output
template <class R, class A>
advantage_stats outcome_advantages(vec_view<R> rewards, const group_layout& groups, const advantage_options& options,
                                   vec_view<A> adv, cudaStream_t stream, workspace ws = {}) {
  ::sapo::detail::check_shape("adv", adv, rewards.size);
  ::sapo::detail::check_output("adv", adv);
  return group_advantages(as_column(rewards), groups, options, as_column(adv), stream, ws);
}

// ------------------------------------------------------------------ token broadcast

namespace detail {

template <class A, class S, class M, class O>
struct broadcast_params {
  mat_view<A> adv;
  mat_view<S> step;  // empty: outcome mode, every token in step 0
  mat_view<M> mask;
  mat_view<O> out;
  int64_t K = 0;
  stage_status* st = nullptr;
};

/// The first rejected (i, t), in the CPU's order: rows in order; within a row every mask
/// value first, then the step ids of its masked-in tokens. Key = (2 i + check) T + t.
template <class A, class S, class M, class O>
__global__ void broadcast_validate_kernel(const broadcast_params<A, S, M, O> p) {
  unsigned long long first = no_key;
  const auto cols = static_cast<unsigned long long>(p.mask.cols);
  for (int64_t i = blockIdx.y; i < p.mask.rows; i += gridDim.y)
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < p.mask.cols;
         t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const M m = p.mask(i, t);
      unsigned long long key = no_key;
      if (!(m == M(0) || m == M(1))) {
        key = (2ull * static_cast<unsigned long long>(i)) * cols + static_cast<unsigned long long>(t);
      } else if (m != M(0) && p.step.data != nullptr) {
        const auto s = p.step(i, t);
        if (s < -1 || s >= p.K)
          key = (2ull * static_cast<unsigned long long>(i) + 1) * cols + static_cast<unsigned long long>(t);
      }
      first = key < first ? key : first;
    }
  first = block_reduce(first, min_op{}, no_key);
  if (threadIdx.x == 0) report_key(&p.st->error[0], first);
}

template <class A, class S, class M, class O>
__global__ void broadcast_kernel(const broadcast_params<A, S, M, O> p) {
  if (has_key(p.st->error[0])) return;  // rejected: write nothing
  for (int64_t i = blockIdx.y; i < p.mask.rows; i += gridDim.y)
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < p.mask.cols;
         t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t s = p.mask(i, t) == M(0) ? -1 : (p.step.data == nullptr ? 0 : static_cast<int64_t>(p.step(i, t)));
      p.out(i, t) = s >= 0 ? static_cast<O>(p.adv(i, s)) : O(0);
    }
}

template <class A, class S, class M, class O>
void run_broadcast(const broadcast_params<A, S, M, O>& params, cudaStream_t stream, const workspace& ws) {
  broadcast_params<A, S, M, O> p = params;
  const int64_t B = p.mask.rows, T = p.mask.cols;
  if (B == 0 || T == 0) return;
  scratch s(ws, segment_workspace_bytes(), stream);
  p.st = carve(s.base()).take<stage_status>(1);
  SAPO_CUDA_CALL(cudaMemsetAsync(p.st, 0, sizeof(stage_status), stream));
  const dim3 grid = grid_2d(B, T, tile_threads);
  launch(broadcast_validate_kernel<A, S, M, O>, grid, dim3(tile_threads), 0, stream, p);
  launch(broadcast_kernel<A, S, M, O>, grid, dim3(tile_threads), 0, stream, p);
  stage_status st;
  copy_to_host(&st, p.st, 1, stream);
  if (!has_key(st.error[0])) return;
  const auto key = static_cast<int64_t>(key_of(st.error[0]));
  const int64_t i = key / (2 * T), check = key / T % 2, t = key % T;
  std::ostringstream expected, actual;
  if (check == 0) {
    expected << "0 or 1 at (" << i << ", " << t << ")";
    actual << +fetch(&p.mask(i, t), stream);
    throw sapo::error("mask", expected.str(), actual.str(), __FILE__, __LINE__);
  }
  expected << "ids in [-1, " << p.K << ") at (" << i << ", " << t << ")";
  actual << +fetch(&p.step(i, t), stream);
  throw sapo::error("step", expected.str(), actual.str(), __FILE__, __LINE__);
}

}  // namespace detail

/// \brief Bytes of workspace the broadcasts need (a status word).
inline size_t broadcast_workspace_bytes() { return segment_workspace_bytes(); }

/// \brief Token advantages on the GPU: token_adv[i,t] = A[i, step[i,t]] where step >= 0 and
/// mask = 1, else 0; the same contract as sapo::broadcast_step_advantages.
/// \param adv       (B, K) device
/// \param step      (B, T) device step ids in -1..K-1 (integer type)
/// \param mask      (B, T) device, 0 or 1
/// \param token_adv (B, T) device output, float or double
template <class A, class S, class M, class O>
void broadcast_step_advantages(mat_view<A> adv, mat_view<S> step, mat_view<M> mask, mat_view<O> token_adv,
                               cudaStream_t stream, workspace ws = {}) {
  static_assert(std::is_floating_point<O>::value, "token advantages must be float or double");
  static_assert(std::is_integral<std::remove_const_t<S>>::value, "step ids must be an integer type");
  namespace core = ::sapo::detail;
  const int64_t B = step.rows, T = step.cols, K = adv.cols;
  core::check_num_steps("adv.cols (K)", K);
  core::check_shape("adv", adv, B, K);
  core::check_shape("step", step, B, T);
  core::check_shape("mask", mask, B, T);
  core::check_shape("token_adv", token_adv, B, T);
  core::check_output("token_adv", token_adv);
  detail::broadcast_params<A, S, M, O> p;
  p.adv = adv;
  p.step = step;
  p.mask = mask;
  p.out = token_adv;
  p.K = K;
  detail::run_broadcast(p, stream, ws);
}

/// \brief Outcome-mode broadcast on the GPU: token_adv[i,t] = A[i] on every masked token.
/// \param adv       (B) device
/// \param mask      (B, T) device, 0 or 1
/// \param token_adv (B, T) device output
template <class A, class M, class O>
void broadcast_outcome_advantages(vec_view<A> adv, mat_view<M> mask, mat_view<O> token_adv, cudaStream_t stream,
                                  workspace ws = {}) {
  static_assert(std::is_floating_point<O>::value, "token advantages must be float or double");
  namespace core = ::sapo::detail;
  const int64_t B = mask.rows, T = mask.cols;
  core::check_shape("adv", adv, B);
  core::check_shape("mask", mask, B, T);
  core::check_shape("token_adv", token_adv, B, T);
  core::check_output("token_adv", token_adv);
  detail::broadcast_params<A, const int32_t, M, O> p;
  p.adv = as_column(adv);
  p.step = mat_view<const int32_t>(nullptr, B, T, 0, 0);
  p.mask = mask;
  p.out = token_adv;
  p.K = 1;
  detail::run_broadcast(p, stream, ws);
}

}  // namespace cuda
}  // namespace sapo
