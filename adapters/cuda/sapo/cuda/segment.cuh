/// \file segment.cuh
/// \brief SPEC §1 on the GPU: one thread per response runs the row walk of sapo/segment.hpp
/// (detail::segment_interleaved_row / segment_think_then_sid_row, shared with the CPU).
///
/// \code
///   sapo::segment_options opt;  opt.num_steps = 3;  opt.sid_ranges = {{1000, 1256}};
///   auto stats = sapo::cuda::segment_steps(tokens, mask, opt, {step, n_steps, codes, malformed}, stream);
/// \endcode
#pragma once

#include <cstdint>
#include <sstream>
#include <type_traits>

#include <sapo/segment.hpp>

#include "common.cuh"

namespace sapo {
namespace cuda {
namespace detail {

constexpr int row_threads = 128;   // one thread per row
constexpr int tile_threads = 256;  // (rows, cols) grid-stride kernels

/// First (i, t), row-major, whose mask value is neither 0 nor 1; reads only.
template <class M>
__global__ void mask_values_kernel(const mat_view<M> mask, unsigned long long* error) {
  unsigned long long first = no_key;
  // A thread meets its elements in increasing row-major order: its first hit is its minimum.
  for (int64_t i = blockIdx.y; i < mask.rows && first == no_key; i += gridDim.y)
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < mask.cols;
         t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const auto m = mask(i, t);
      if (!(m == decltype(m)(0) || m == decltype(m)(1))) {
        first = static_cast<unsigned long long>(i * mask.cols + t);
        break;
      }
    }
  first = block_reduce(first, min_op{}, no_key);
  if (threadIdx.x == 0) report_key(error, first);
}

template <class Id, class M>
struct segment_params {
  mat_view<Id> tokens;
  mat_view<M> mask;
  segment_outputs out;
  core::sid_rules rules;
  int32_t tail_id = -1;
  bool think_then_sid = false, sid_in_step = true;
  stage_status* st = nullptr;
};

template <class Id, class M>
__global__ void segment_kernel(const segment_params<Id, M> p) {
  if (has_key(p.st->error[0])) return;  // a mask value was rejected: write nothing
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned long long malformed = 0;
  if (i < p.tokens.rows) {
    const segment_outputs& out = p.out;
    const strided<int32_t> step{out.step.data + i * out.step.row_stride, out.step.col_stride};
    const strided<int64_t> code{out.codes.data + i * out.codes.row_stride, out.codes.col_stride};
    for (int64_t k = 0; k < p.rules.K; ++k) code(k) = -1;
    const auto* ids = p.tokens.data + i * p.tokens.row_stride;
    const auto* m = p.mask.data + i * p.mask.row_stride;
    const core::row_segmentation r =
        p.think_then_sid
            ? core::segment_think_then_sid_row(p.rules, p.tail_id, p.sid_in_step, p.tokens.cols, ids,
                                               p.tokens.col_stride, m, p.mask.col_stride, step, code)
            : core::segment_interleaved_row(p.rules, p.tail_id, p.tokens.cols, ids, p.tokens.col_stride, m,
                                            p.mask.col_stride, step, code);
    out.n_steps(i) = static_cast<int32_t>(r.n_steps);
    out.malformed(i) = r.malformed ? 1 : 0;
    malformed = r.malformed ? 1 : 0;
  }
  malformed = block_reduce(malformed, sum_op{}, 0ull);
  if (threadIdx.x == 0 && malformed > 0) atomicAdd(&p.st->count, malformed);
}

}  // namespace detail

/// \brief Bytes of workspace segment_steps needs (a status word).
inline size_t segment_workspace_bytes() {
  detail::carve c(nullptr);
  c.take<detail::stage_status>(1);
  return c.bytes();
}

/// \brief Segment B responses into reasoning steps on the GPU (SPEC §1); the same contract
/// as sapo::segment_steps.
/// \param tokens  (B, T) device token ids, int32 or int64, any strides
/// \param mask    (B, T) device mask, 0 or 1 (any arithmetic type)
/// \param options host struct (layout, K, SID ranges, think_end, tail policy); num_threads is ignored
/// \param out     device outputs: (B, T) step ids, (B) n_steps, (B, K) codes, (B) malformed
/// \return the number of malformed responses (the call waits for the stream)
/// \throws sapo::error for a rejected input (nothing written), cuda_error for a CUDA failure
template <class Id, class M>
segment_stats segment_steps(mat_view<Id> tokens, mat_view<M> mask, const segment_options& options,
                            const segment_outputs& out, cudaStream_t stream, workspace ws = {}) {
  static_assert(std::is_integral<std::remove_const_t<Id>>::value, "token ids must be an integer type");
  const ::sapo::detail::sid_rules rules = ::sapo::detail::make_sid_rules(options);
  const int64_t B = tokens.rows, T = tokens.cols, K = rules.K;
  namespace core = ::sapo::detail;
  core::check_shape("tokens", tokens, B, T);
  core::check_shape("mask", mask, B, T);
  core::check_shape("out.step", out.step, B, T);
  core::check_shape("out.n_steps", out.n_steps, B);
  core::check_shape("out.codes", out.codes, B, K);
  core::check_shape("out.malformed", out.malformed, B);
  core::check_output("out.step", out.step);
  core::check_output("out.n_steps", out.n_steps);
  core::check_output("out.codes", out.codes);
  core::check_output("out.malformed", out.malformed);
  if (B == 0) return {};

  detail::scratch s(ws, segment_workspace_bytes(), stream);
  detail::segment_params<Id, M> p;
  p.tokens = tokens;
  p.mask = mask;
  p.out = out;
  p.rules = rules;
  p.tail_id = options.tail == tail_policy::last_step ? static_cast<int32_t>(K - 1) : -1;
  p.think_then_sid = options.layout == step_layout::think_then_sid;
  p.sid_in_step = options.sid_token_in_step;
  p.st = detail::carve(s.base()).take<detail::stage_status>(1);

  SAPO_CUDA_CALL(cudaMemsetAsync(p.st, 0, sizeof(detail::stage_status), stream));
  if (T > 0)
    detail::launch(detail::mask_values_kernel<M>, detail::grid_2d(B, T, detail::tile_threads),
                   dim3(detail::tile_threads), 0, stream, mask, &p.st->error[0]);
  detail::launch(detail::segment_kernel<Id, M>, dim3(detail::blocks_for(B, detail::row_threads, 0x7fffffff)),
                 dim3(detail::row_threads), 0, stream, p);
  detail::stage_status st;
  detail::copy_to_host(&st, p.st, 1, stream);
  if (detail::has_key(st.error[0])) {
    const int64_t flat = static_cast<int64_t>(detail::key_of(st.error[0])), i = flat / T, t = flat % T;
    std::ostringstream expected, actual;
    expected << "0 or 1 at (" << i << ", " << t << ")";
    actual << +detail::fetch(&mask(i, t), stream);
    throw sapo::error("mask", expected.str(), actual.str(), __FILE__, __LINE__);
  }
  segment_stats stats;
  stats.n_malformed = static_cast<int64_t>(st.count);
  return stats;
}

}  // namespace cuda
}  // namespace sapo
