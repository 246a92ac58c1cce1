/// \file rewards.cuh
/// \brief SPEC §2 on the GPU: one thread per response runs detail::row_rewards, the
/// function sapo/rewards.hpp uses on the CPU.
///
/// \code
///   sapo::reward_options opt;                       // prefix reward, malformed -> 0
///   sapo::cuda::step_rewards(codes, malformed, targets, opt, rewards, stream);
/// \endcode
#pragma once

#include <cstdint>
#include <sstream>
#include <type_traits>

#include <sapo/rewards.hpp>

#include "common.cuh"
#include "segment.cuh"

namespace sapo {
namespace cuda {
namespace detail {

/// First response whose malformed flag is neither 0 nor 1; reads only.
template <class F>
__global__ void flag_values_kernel(const vec_view<F> flags, unsigned long long* error) {
  unsigned long long first = no_key;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < flags.size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto f = flags(i);
    if (!(f == decltype(f)(0) || f == decltype(f)(1))) {
      first = static_cast<unsigned long long>(i);
      break;
    }
  }
  first = block_reduce(first, min_op{}, no_key);
  if (threadIdx.x == 0) report_key(error, first);
}

template <class C, class F, class Y, class R>
struct reward_params {
  mat_view<C> codes;
  vec_view<F> malformed;
  mat_view<Y> targets;
  mat_view<R> rewards;
  reward_kind kind = reward_kind::prefix;
  int64_t K = 0;
  double weights[max_steps] = {};
  double malformed_reward = 0;
  stage_status* st = nullptr;
};

/// a_k = y_k for row i.
template <class C, class Y>
struct code_match {
  mat_view<C> codes;
  mat_view<Y> targets;
  int64_t i;
  __host__ __device__ bool operator()(int64_t k) const {
    return static_cast<int64_t>(codes(i, k)) == static_cast<int64_t>(targets(i, k));
  }
};

template <class R>
struct reward_writer {
  mat_view<R> rewards;
  int64_t i;
  __host__ __device__ void operator()(int64_t k, double r) const { rewards(i, k) = static_cast<R>(r); }
};

template <class C, class F, class Y, class R>
__global__ void rewards_kernel(const reward_params<C, F, Y, R> p) {
  if (has_key(p.st->error[0])) return;  // a flag was rejected: write nothing
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.codes.rows) return;
  const reward_writer<R> write{p.rewards, i};
  if (p.malformed(i) != F(0)) {
    for (int64_t k = 0; k < p.K; ++k) write(k, p.malformed_reward);
    return;
  }
  core::row_rewards(p.kind, p.weights, p.K, code_match<C, Y>{p.codes, p.targets, i}, write);
}

}  // namespace detail

/// \brief Bytes of workspace step_rewards needs (a status word).
inline size_t step_rewards_workspace_bytes() { return segment_workspace_bytes(); }

/// \brief Built-in step rewards on the GPU (SPEC §2); the same contract as sapo::step_rewards.
/// \param codes     (B, K) device generated codes (from segment_steps)
/// \param malformed (B) device flags, 0 or 1
/// \param targets   (B, K) device target codes of each response's prompt
/// \param options   host struct (kind, level weights, malformed reward)
/// \param rewards   (B, K) device output, float or double
/// \throws sapo::error for a rejected input (nothing written), cuda_error for a CUDA failure
template <class C, class F, class Y, class R>
void step_rewards(mat_view<C> codes, vec_view<F> malformed, mat_view<Y> targets, const reward_options& options,
                  mat_view<R> rewards, cudaStream_t stream, workspace ws = {}) {
  static_assert(std::is_floating_point<R>::value, "rewards must be float or double");
  namespace core = ::sapo::detail;
  const int64_t B = codes.rows, K = codes.cols;
  core::check_num_steps("codes.cols (K)", K);
  core::check_shape("codes", codes, B, K);
  core::check_shape("malformed", malformed, B);
  core::check_shape("targets", targets, B, K);
  core::check_shape("rewards", rewards, B, K);
  core::check_output("rewards", rewards);
  core::check_enum("options.kind", options.kind, reward_kind::exact);
  detail::reward_params<C, F, Y, R> p;
  if (options.kind == reward_kind::weighted_prefix) {
    SAPO_CHECK(static_cast<int64_t>(options.level_weights.size()) == K, "options.level_weights",
               "K = " << K << " weights for weighted_prefix", options.level_weights.size() << " weights");
    for (size_t k = 0; k < options.level_weights.size(); ++k) {
      SAPO_CHECK(core::is_finite(options.level_weights[k]), "options.level_weights", "finite values",
                 options.level_weights[k] << " at level " << k);
      p.weights[k] = options.level_weights[k];
    }
  }
  SAPO_CHECK(core::is_finite(options.malformed_reward), "options.malformed_reward", "a finite value",
             options.malformed_reward);
  if (B == 0) return;

  detail::scratch s(ws, step_rewards_workspace_bytes(), stream);
  p.codes = codes;
  p.malformed = malformed;
  p.targets = targets;
  p.rewards = rewards;
  p.kind = options.kind;
  p.K = K;
  p.malformed_reward = options.malformed_reward;
  p.st = detail::carve(s.base()).take<detail::stage_status>(1);

  SAPO_CUDA_CALL(cudaMemsetAsync(p.st, 0, sizeof(detail::stage_status), stream));
  const unsigned int blocks = detail::blocks_for(B, detail::row_threads, 0x7fffffff);
  detail::launch(detail::flag_values_kernel<F>, dim3(detail::blocks_for(B, detail::row_threads)),
                 dim3(detail::row_threads), 0, stream, malformed, &p.st->error[0]);
  detail::launch(detail::rewards_kernel<C, F, Y, R>, dim3(blocks), dim3(detail::row_threads), 0, stream, p);
  detail::stage_status st;
  detail::copy_to_host(&st, p.st, 1, stream);
  if (detail::has_key(st.error[0])) {
    const auto i = static_cast<int64_t>(detail::key_of(st.error[0]));
    std::ostringstream expected, actual;
    expected << "0 or 1 at response " << i;
    actual << +detail::fetch(&malformed(i), stream);
    throw sapo::error("malformed", expected.str(), actual.str(), __FILE__, __LINE__);
  }
}

}  // namespace cuda
}  // namespace sapo
