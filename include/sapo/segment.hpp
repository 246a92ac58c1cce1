/// \file segment.hpp
/// \brief SPEC §1: split each response into K reasoning steps and read its SID codes.
///
/// \code
///   sapo::segment_options opt;
///   opt.num_steps = 3;
///   opt.sid_ranges = {{1000, 1256}, {1256, 1512}, {1512, 1768}};   // one range per level
///   sapo::segment_steps(tokens, mask, opt, {step, n_steps, codes, malformed});
/// \endcode
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.hpp"
#include "dispatch.hpp"
#include "parallel.hpp"
#include "view.hpp"

namespace sapo {

enum class step_layout {
  interleaved,     ///< think_1 a_1 think_2 a_2 ... think_K a_K  (the paper; default)
  think_then_sid,  ///< <think>..</think> x K, then a_1 ... a_K  (the public prototype)
};

enum class tail_policy {
  no_step,    ///< tokens after the K-th step get step -1 (default)
  last_step,  ///< they join step K-1
};

/// Half-open id range [lo, hi).
struct token_range {
  int64_t lo = 0, hi = 0;
};

struct segment_options {
  int64_t num_steps = 0;                          ///< K, 1..64
  step_layout layout = step_layout::interleaved;
  std::vector<token_range> sid_ranges;            ///< one range shared by all levels, or K per-level ranges
  std::vector<int64_t> codes_per_level;           ///< optional catalogue: codes >= this at level k are malformed
  int64_t think_end_id = -1;                      ///< closes a thinking block (think_then_sid only)
  bool sid_token_in_step = true;                  ///< think_then_sid: a_k belongs to step k (false: step -1)
  tail_policy tail = tail_policy::no_step;
  int num_threads = 0;  ///< worker threads; 0 = every hardware thread. Results do not depend on it.
};

/// Caller-provided outputs (any strides).
struct segment_outputs {
  mat_view<int32_t> step;         ///< (B, T) step id in -1..K-1
  vec_view<int32_t> n_steps;      ///< (B) closed steps
  mat_view<int64_t> codes;        ///< (B, K) generated SID codes, -1 where not found
  vec_view<uint8_t> malformed;    ///< (B) 1 when the response is malformed
};

struct segment_stats {
  int64_t n_malformed = 0;
};

namespace detail {

/// What a token id is under the SID rules, seen from the level the response is at.
struct sid_lookup {
  bool is_sid = false;
  bool wrong_level = false;
  int64_t code = -1;
};

/// The SID rules as a fixed-size parameter block (no heap), shareable with device code.
struct sid_rules {
  int64_t K = 0;
  int64_t n_ranges = 0;
  int64_t lo[max_steps] = {}, hi[max_steps] = {};
  int64_t catalogue[max_steps] = {};  // 0: no limit
  int64_t think_end = -1;
  int64_t lo_min = 0, hi_max = 0;     // hull of all ranges: most tokens are rejected by one test

  SAPO_HOST_DEVICE sid_lookup lookup(int64_t id, int64_t level) const {
    sid_lookup r;
    if (id < lo_min || id >= hi_max) return r;
    if (n_ranges == 1) {
      if (id >= lo[0] && id < hi[0]) {
        r.is_sid = true;
        r.code = id - lo[0];
      }
      return r;
    }
    // Per-level ranges: the current level's range wins when ranges overlap.
    if (level < K && id >= lo[level] && id < hi[level]) {
      r.is_sid = true;
      r.code = id - lo[level];
      return r;
    }
    for (int64_t j = 0; j < n_ranges; ++j)
      if (id >= lo[j] && id < hi[j]) {
        r.is_sid = true;
        r.wrong_level = level < K;  // past the last level every SID token is an extra one anyway
        r.code = id - lo[j];
        return r;
      }
    return r;
  }

  SAPO_HOST_DEVICE bool outside_catalogue(int64_t code, int64_t level) const {
    return catalogue[level] > 0 && code >= catalogue[level];
  }
};

inline sid_rules make_sid_rules(const segment_options& opt) {
  check_num_steps("options.num_steps", opt.num_steps);
  check_enum("options.layout", opt.layout, step_layout::think_then_sid);
  check_enum("options.tail", opt.tail, tail_policy::last_step);
  SAPO_CHECK(opt.num_threads >= 0, "options.num_threads", ">= 0 (0 = every hardware thread)", opt.num_threads);
  const int64_t K = opt.num_steps;
  const auto n = static_cast<int64_t>(opt.sid_ranges.size());
  SAPO_CHECK(n == 1 || n == K, "options.sid_ranges", "1 shared range or K = " << K << " per-level ranges",
             n << " ranges");
  sid_rules rules;
  rules.K = K;
  rules.n_ranges = n;
  for (int64_t j = 0; j < n; ++j) {
    const token_range& r = opt.sid_ranges[static_cast<size_t>(j)];
    SAPO_CHECK(r.lo < r.hi, "options.sid_ranges", "lo < hi in range " << j, "[" << r.lo << ", " << r.hi << ")");
    rules.lo[j] = r.lo;
    rules.hi[j] = r.hi;
    rules.lo_min = j == 0 ? r.lo : std::min(rules.lo_min, r.lo);
    rules.hi_max = j == 0 ? r.hi : std::max(rules.hi_max, r.hi);
  }
  const auto nc = static_cast<int64_t>(opt.codes_per_level.size());
  SAPO_CHECK(nc == 0 || nc == K, "options.codes_per_level", "empty or K = " << K << " entries", nc << " entries");
  for (int64_t k = 0; k < nc; ++k) {
    const int64_t c = opt.codes_per_level[static_cast<size_t>(k)];
    SAPO_CHECK(c > 0, "options.codes_per_level", "> 0 at level " << k, c);
    rules.catalogue[k] = c;
  }
  if (opt.layout == step_layout::think_then_sid) {
    SAPO_CHECK(opt.think_end_id >= 0, "options.think_end_id", "a token id >= 0 for the think_then_sid layout",
               opt.think_end_id);
    const sid_lookup l = rules.lookup(opt.think_end_id, K);
    SAPO_CHECK(!l.is_sid, "options.think_end_id", "an id outside every SID range", opt.think_end_id);
  }
  rules.think_end = opt.think_end_id;
  return rules;
}

/// Result of one row; the row's step ids are written as the walk goes.
struct row_segmentation {
  int64_t n_steps = 0;
  bool malformed = false;
};

/// Walk state of the interleaved layout: steps closed so far, and whether the response is
/// malformed.
struct interleaved_walk {
  int64_t k = 0;
  bool malformed = false;
};

inline namespace SAPO_ISA_NAMESPACE {

/// The step id of one on-token of an interleaved response, advancing the walk: every SID
/// token closes the step it ends.
template <class CodeOut>
SAPO_HOST_DEVICE int32_t interleaved_token(const sid_rules& rules, int32_t tail_id, int64_t id, interleaved_walk& w,
                                           CodeOut& code) {
  if (id < rules.lo_min || id >= rules.hi_max)  // the common case: a thinking token
    return w.k < rules.K ? static_cast<int32_t>(w.k) : tail_id;
  const sid_lookup l = rules.lookup(id, w.k);
  if (w.k >= rules.K) {
    if (l.is_sid) w.malformed = true;  // a boundary beyond the K-th
    return tail_id;
  }
  const auto step = static_cast<int32_t>(w.k);
  if (l.is_sid) {
    if (l.wrong_level || rules.outside_catalogue(l.code, w.k)) w.malformed = true;
    code(w.k) = l.code;
    ++w.k;
  }
  return step;
}

/// One response in the interleaved layout, token by token (any strides; CPU and CUDA).
template <class Id, class M, class StepOut, class CodeOut>
SAPO_HOST_DEVICE row_segmentation segment_interleaved_row(const sid_rules& rules, int32_t tail_id, int64_t T,
                                                          const Id* ids, int64_t id_stride, const M* mask,
                                                          int64_t mask_stride, StepOut step, CodeOut code) {
  interleaved_walk w;
  for (int64_t t = 0; t < T; ++t)
    step(t) = mask[t * mask_stride] == M(0)
                  ? -1
                  : interleaved_token(rules, tail_id, static_cast<int64_t>(ids[t * id_stride]), w, code);
  row_segmentation r;
  r.n_steps = w.k;
  r.malformed = w.malformed || w.k < rules.K;  // unfinished: its tokens already carry id k
  return r;
}

/// The same walk over contiguous rows (CPU), a block of tokens at a time. Most blocks hold
/// no on-token inside the SID ranges' hull: then every on-token gets the current step,
/// which the compiler turns into a few vector instructions per block (two branch-free
/// loops); a block with a candidate goes token by token through interleaved_token.
template <class Id, class M, class CodeOut>
row_segmentation segment_interleaved_row_contiguous(const sid_rules& rules, int32_t tail_id, int64_t T,
                                                    const Id* ids, const M* mask, int32_t* step, CodeOut code) {
  constexpr int64_t block = 64;
  // The hull test in the id's own width (vector lanes as wide as the ids), on bounds
  // clamped to that width: a clamped bound can only add candidates, which the exact walk
  // then clears.
  using C = std::conditional_t<sizeof(Id) <= 4, int32_t, int64_t>;
  constexpr int64_t c_min = std::numeric_limits<C>::min(), c_max = std::numeric_limits<C>::max();
  const auto lo = static_cast<C>(std::min(std::max(rules.lo_min, c_min), c_max));
  const auto hi = static_cast<C>(std::min(std::max(rules.hi_max - 1, c_min), c_max));  // inclusive
  interleaved_walk w;
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t n = T - t0 < block ? T - t0 : block;
    const Id* id = ids + t0;
    const M* m = mask + t0;
    int32_t* out = step + t0;
    int candidate = 0;  // an int: GCC does not vectorize a bool |= reduction
    for (int64_t j = 0; j < n; ++j) {
      const auto v = static_cast<C>(id[j]);
      candidate |= (m[j] != M(0)) & (v >= lo) & (v <= hi);
    }
    if (!candidate) {
      const int32_t current = w.k < rules.K ? static_cast<int32_t>(w.k) : tail_id;
      for (int64_t j = 0; j < n; ++j) out[j] = m[j] != M(0) ? current : -1;
      continue;
    }
    for (int64_t j = 0; j < n; ++j)
      out[j] = m[j] == M(0) ? -1 : interleaved_token(rules, tail_id, static_cast<int64_t>(id[j]), w, code);
  }
  row_segmentation r;
  r.n_steps = w.k;
  r.malformed = w.malformed || w.k < rules.K;
  return r;
}

/// One response in the think_then_sid layout: think_end closes steps, then K SID tokens follow.
template <class Id, class M, class StepOut, class CodeOut>
SAPO_HOST_DEVICE row_segmentation segment_think_then_sid_row(const sid_rules& rules, int32_t tail_id,
                                                             bool sid_in_step, int64_t T, const Id* ids,
                                                             int64_t id_stride, const M* mask, int64_t mask_stride,
                                                             StepOut step, CodeOut code) {
  row_segmentation r;
  int64_t k = 0;  // closed thinking blocks
  int64_t j = 0;  // SID tokens read after them
  for (int64_t t = 0; t < T; ++t) {
    if (mask[t * mask_stride] == M(0)) {
      step(t) = -1;
      continue;
    }
    const int64_t id = static_cast<int64_t>(ids[t * id_stride]);
    if (k < rules.K) {
      step(t) = static_cast<int32_t>(k);
      if (id == rules.think_end)
        ++k;
      else if (rules.lookup(id, k).is_sid)
        r.malformed = true;  // a SID token inside the thinking part
      continue;
    }
    if (id == rules.think_end) {
      step(t) = tail_id;
      r.malformed = true;  // a boundary beyond the K-th
      continue;
    }
    const sid_lookup l = rules.lookup(id, j);
    if (!l.is_sid) {
      step(t) = tail_id;
    } else if (j < rules.K) {
      if (l.wrong_level || rules.outside_catalogue(l.code, j)) r.malformed = true;
      code(j) = l.code;
      step(t) = sid_in_step ? static_cast<int32_t>(j) : -1;
      ++j;
    } else {
      step(t) = tail_id;
      r.malformed = true;  // more than K SID tokens
    }
  }
  r.n_steps = k;
  if (k < rules.K || j < rules.K) r.malformed = true;
  return r;
}

}  // namespace SAPO_ISA_NAMESPACE
}  // namespace detail

namespace dispatch {
/// (token id, mask) types of the dispatched contiguous segmentation row: what the LibTorch
/// adapter passes.
using segment_types = type_list<types<int32_t, uint8_t>, types<int32_t, int32_t>, types<int32_t, int64_t>,
                                types<int32_t, float>, types<int32_t, double>, types<int64_t, uint8_t>,
                                types<int64_t, int32_t>, types<int64_t, int64_t>, types<int64_t, float>,
                                types<int64_t, double>>;
/// segment_interleaved_row_contiguous on the active instruction set (src/dispatch.cpp).
template <class Id, class M>
detail::row_segmentation segment_interleaved_row_contiguous(const detail::sid_rules& rules, int32_t tail_id,
                                                            int64_t T, const Id* ids, const M* mask, int32_t* step,
                                                            vec_view<int64_t> code);
}  // namespace dispatch

inline namespace SAPO_ENTRY_NAMESPACE {

/// \brief Segment B responses into reasoning steps (SPEC §1, docs/decisions.md).
/// \param tokens  (B, T) token ids, int32 or int64, any strides
/// \param mask    (B, T) 1 on response tokens, 0 on prompt and padding (any arithmetic type)
/// \param options layout, K, SID ranges, think_end id, tail policy
/// \param out     (B, T) step ids, (B) n_steps, (B, K) codes, (B) malformed flags
/// \return the number of malformed responses
template <class Id, class M>
segment_stats segment_steps(mat_view<Id> tokens, mat_view<M> mask, const segment_options& options,
                            const segment_outputs& out) {
  static_assert(std::is_integral<std::remove_const_t<Id>>::value, "token ids must be an integer type");
  const detail::sid_rules rules = detail::make_sid_rules(options);
  const int64_t B = tokens.rows, T = tokens.cols, K = rules.K;
  detail::check_shape("tokens", tokens, B, T);
  detail::check_shape("mask", mask, B, T);
  detail::check_shape("out.step", out.step, B, T);
  detail::check_shape("out.n_steps", out.n_steps, B);
  detail::check_shape("out.codes", out.codes, B, K);
  detail::check_shape("out.malformed", out.malformed, B);
  detail::check_output("out.step", out.step);
  detail::check_output("out.n_steps", out.n_steps);
  detail::check_output("out.codes", out.codes);
  detail::check_output("out.malformed", out.malformed);

  // Two parallel passes over fixed row chunks: the mask check (reads only, so a bad mask
  // leaves every output untouched), then the segmentation, one row at a time.
  const detail::row_chunks chunks(B, T);
  detail::parallel_for_chunks(chunks.count, options.num_threads, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) detail::check_mask_row("mask", mask, i);
  });
  const int32_t tail_id = options.tail == tail_policy::last_step ? static_cast<int32_t>(K - 1) : -1;
  using IdT = std::remove_const_t<Id>;
  using MT = std::remove_const_t<M>;
  auto contiguous_row = [&](const IdT* ids, const MT* m, int32_t* step, vec_view<int64_t> code) {
#ifdef SAPO_USE_DISPATCH
    if constexpr (dispatch::contains<dispatch::types<IdT, MT>, dispatch::segment_types>::value)
      return dispatch::segment_interleaved_row_contiguous(rules, tail_id, T, ids, m, step, code);
    else
#endif
      return detail::segment_interleaved_row_contiguous(rules, tail_id, T, ids, m, step, code);
  };
  std::vector<int64_t> malformed_per_chunk(static_cast<size_t>(chunks.count), 0);
  detail::parallel_for_chunks(chunks.count, options.num_threads, [&](int64_t c) {
    for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
      auto step = out.step.row(i);
      auto code = out.codes.row(i);
      for (int64_t k = 0; k < K; ++k) code(k) = -1;
      const auto* ids = tokens.data + i * tokens.row_stride;
      const auto* m = mask.data + i * mask.row_stride;
      const bool contiguous = tokens.col_stride == 1 && mask.col_stride == 1 && out.step.col_stride == 1;
      const detail::row_segmentation r =
          options.layout == step_layout::think_then_sid
              ? detail::segment_think_then_sid_row(rules, tail_id, options.sid_token_in_step, T, ids,
                                                   tokens.col_stride, m, mask.col_stride, step, code)
          : contiguous
              ? contiguous_row(ids, m, step.data, code)
              : detail::segment_interleaved_row(rules, tail_id, T, ids, tokens.col_stride, m, mask.col_stride, step,
                                                code);
      out.n_steps(i) = static_cast<int32_t>(r.n_steps);
      out.malformed(i) = r.malformed ? 1 : 0;
      malformed_per_chunk[static_cast<size_t>(c)] += r.malformed ? 1 : 0;
    }
  });
  segment_stats stats;
  for (int64_t n : malformed_per_chunk) stats.n_malformed += n;
  return stats;
}

}  // namespace SAPO_ENTRY_NAMESPACE

}  // namespace sapo
