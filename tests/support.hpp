// Test helpers: strided buffers in several layouts, conversion to the reference's nested
// vectors, and random batches with real structure (well-formed and malformed responses).
#pragma once

#include <sapo/sapo.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "reference/reference.hpp"

namespace sapo_test {

/// Where a (rows, cols) array sits in memory: row-major, a strided slice of a larger
/// buffer (every other column, padded rows), or column-major.
enum class Layout { contiguous, strided, column_major };
inline const char* name(Layout l) {
  return l == Layout::contiguous ? "contiguous" : l == Layout::strided ? "strided" : "column_major";
}

/// Owns storage and hands out sapo views of one layout. Untouched padding keeps `fill`.
template <class T>
struct Buf {
  int64_t rows = 0, cols = 0, rs = 0, cs = 0;
  std::vector<T> store;

  Buf() = default;
  Buf(int64_t r, int64_t c, Layout layout, T fill = T(0)) : rows(r), cols(c) {
    switch (layout) {
      case Layout::contiguous: rs = c; cs = 1; break;
      case Layout::strided: rs = 2 * c + 3; cs = 2; break;
      case Layout::column_major: rs = 1; cs = r; break;
    }
    store.assign(static_cast<size_t>(std::max<int64_t>(1, r * c * 2 + 2 * r + 3 * r + c + 4)), fill);
  }
  T& at(int64_t i, int64_t j) { return store[static_cast<size_t>(i * rs + j * cs)]; }
  T at(int64_t i, int64_t j) const { return store[static_cast<size_t>(i * rs + j * cs)]; }
  sapo::mat_view<T> view() { return {store.data(), rows, cols, rs, cs}; }
  sapo::mat_view<const T> cview() const { return {store.data(), rows, cols, rs, cs}; }
  /// Rows as a vector view (for (B) arrays stored as (B, 1)).
  sapo::vec_view<T> vec() { return {store.data(), rows, rs}; }
  sapo::vec_view<const T> cvec() const { return {store.data(), rows, rs}; }
};

template <class T>
Buf<T> from_ref(const std::vector<std::vector<double>>& m, int64_t cols, Layout layout) {
  Buf<T> b(static_cast<int64_t>(m.size()), cols, layout);
  for (int64_t i = 0; i < b.rows; ++i)
    for (int64_t j = 0; j < cols; ++j) b.at(i, j) = static_cast<T>(m[size_t(i)][size_t(j)]);
  return b;
}
template <class T>
Buf<T> from_ref_int(const sapo_ref::IntMatrix& m, int64_t cols, Layout layout) {
  Buf<T> b(static_cast<int64_t>(m.size()), cols, layout);
  for (int64_t i = 0; i < b.rows; ++i)
    for (int64_t j = 0; j < cols; ++j) b.at(i, j) = static_cast<T>(m[size_t(i)][size_t(j)]);
  return b;
}
template <class T>
sapo_ref::Matrix to_ref(const Buf<T>& b) {
  sapo_ref::Matrix m(static_cast<size_t>(b.rows), std::vector<double>(static_cast<size_t>(b.cols)));
  for (int64_t i = 0; i < b.rows; ++i)
    for (int64_t j = 0; j < b.cols; ++j) m[size_t(i)][size_t(j)] = static_cast<double>(b.at(i, j));
  return m;
}

inline sapo_ref::Matrix rounded_to(const sapo_ref::Matrix& m, bool to_float) {
  if (!to_float) return m;
  sapo_ref::Matrix r = m;
  for (auto& row : r)
    for (auto& v : row) v = static_cast<double>(static_cast<float>(v));
  return r;
}

/// |a - b| <= abs_tol + rel_tol * |b|, element by element, with the position on failure.
inline void require_close(const sapo_ref::Matrix& got, const sapo_ref::Matrix& want, double rel_tol,
                          double abs_tol) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    REQUIRE(got[i].size() == want[i].size());
    for (size_t j = 0; j < got[i].size(); ++j) {
      const double g = got[i][j], w = want[i][j];
      if (std::isnan(w) && std::isnan(g)) continue;
      INFO("element (" << i << ", " << j << "): got " << g << ", want " << w);
      REQUIRE(std::abs(g - w) <= abs_tol + rel_tol * std::abs(w));
    }
  }
}
inline void require_close(double got, double want, double rel_tol, double abs_tol) {
  INFO("got " << got << ", want " << want);
  REQUIRE(std::abs(got - want) <= abs_tol + rel_tol * std::abs(want));
}

// ------------------------------------------------------------------ random batches

/// Token vocabulary of the generated batches: thought tokens 0..49, think_end 50,
/// eos 51, SID level k in [100 + 10 k, 100 + 10 k + 10) (10 codes per level, of which
/// `catalogue` are valid).
struct Vocab {
  int64_t K = 3;
  static constexpr int64_t think_end = 50, eos = 51, sid_base = 100, level_width = 10;
  int64_t lo(int64_t k) const { return sid_base + level_width * k; }
  sapo::segment_options options(bool think_then_sid, bool per_level) const {
    sapo::segment_options o;
    o.num_steps = K;
    o.layout = think_then_sid ? sapo::step_layout::think_then_sid : sapo::step_layout::interleaved;
    if (per_level)
      for (int64_t k = 0; k < K; ++k) o.sid_ranges.push_back({lo(k), lo(k) + level_width});
    else
      o.sid_ranges.push_back({sid_base, sid_base + level_width});
    o.think_end_id = think_end;
    return o;
  }
  sapo_ref::SegmentConfig ref_config(const sapo::segment_options& o) const {
    sapo_ref::SegmentConfig c;
    c.K = static_cast<int>(o.num_steps);
    c.think_then_sid = o.layout == sapo::step_layout::think_then_sid;
    for (auto r : o.sid_ranges) c.sid_ranges.push_back({r.lo, r.hi});
    c.codes_per_level = o.codes_per_level;
    c.think_end_id = o.think_end_id;
    c.sid_token_in_step = o.sid_token_in_step;
    c.tail_last_step = o.tail == sapo::tail_policy::last_step;
    return c;
  }
};

/// A batch of B responses of length T with a random prompt prefix (mask 0), a response
/// in the given layout with random defects (missing, extra or wrong-level SID tokens,
/// out-of-catalogue codes, truncation), an optional eos and padding.
struct TokenBatch {
  sapo_ref::IntMatrix tokens, mask;
};

inline TokenBatch random_tokens(std::mt19937_64& rng, const Vocab& v, int64_t B, int64_t T, bool think_then_sid,
                                bool per_level, double defect_rate) {
  std::uniform_int_distribution<int64_t> thought(0, 49), code(0, 9), think_len(0, 3), prompt_len(0, 4);
  std::uniform_real_distribution<double> u(0, 1);
  auto sid = [&](int64_t level, int64_t c) { return per_level ? v.lo(level) + c : Vocab::sid_base + c; };
  TokenBatch b;
  for (int64_t i = 0; i < B; ++i) {
    std::vector<int64_t> ids(size_t(T), 0), m(size_t(T), 0);
    int64_t t = prompt_len(rng);
    for (int64_t p = 0; p < t && p < T; ++p) ids[size_t(p)] = thought(rng);  // prompt, mask 0
    auto put = [&](int64_t id) {
      if (t < T) {
        ids[size_t(t)] = id;
        m[size_t(t)] = 1;
      }
      ++t;
    };
    const bool defect = u(rng) < defect_rate;
    const int64_t steps = defect && u(rng) < 0.3 ? std::uniform_int_distribution<int64_t>(0, v.K + 1)(rng) : v.K;
    std::vector<int64_t> sids;
    for (int64_t k = 0; k < steps; ++k) {
      int64_t level = k < v.K ? k : v.K - 1;
      if (defect && u(rng) < 0.2) level = (level + 1) % v.K;  // wrong level
      sids.push_back(sid(level, code(rng)));
    }
    if (!think_then_sid) {
      for (int64_t id : sids) {
        for (int64_t j = think_len(rng); j > 0; --j) put(thought(rng));
        put(id);
      }
    } else {
      const int64_t blocks = defect && u(rng) < 0.3 ? std::uniform_int_distribution<int64_t>(0, v.K + 1)(rng) : v.K;
      for (int64_t k = 0; k < blocks; ++k) {
        for (int64_t j = think_len(rng); j > 0; --j) put(defect && u(rng) < 0.1 ? sid(0, 1) : thought(rng));
        put(Vocab::think_end);
      }
      for (int64_t id : sids) put(id);
    }
    if (u(rng) < 0.5) put(Vocab::eos);
    if (u(rng) < 0.2) put(thought(rng));  // trailing text
    // Padding keeps mask 0 and junk ids (they must never be read).
    for (int64_t p = t; p < T; ++p) ids[size_t(p)] = sid(0, 2);
    b.tokens.push_back(ids);
    b.mask.push_back(m);
  }
  return b;
}

/// Log-probabilities near each other so ratios land on both sides of the clip range.
inline sapo_ref::Matrix random_logp(std::mt19937_64& rng, int64_t B, int64_t T, double lo = -4.0, double hi = -0.05) {
  std::uniform_real_distribution<double> u(lo, hi);
  sapo_ref::Matrix m(static_cast<size_t>(B), std::vector<double>(static_cast<size_t>(T)));
  for (auto& row : m)
    for (auto& x : row) x = u(rng);
  return m;
}
inline sapo_ref::Matrix perturbed(std::mt19937_64& rng, const sapo_ref::Matrix& base, double scale) {
  std::normal_distribution<double> n(0.0, scale);
  sapo_ref::Matrix m = base;
  for (auto& row : m)
    for (auto& x : row) x += n(rng);
  return m;
}

/// Runs `call`, which must throw sapo::error for `argument` with a message naming it, and
/// whose actual value reads `actual`.
template <class F>
inline void require_rejected(F call, const std::string& argument, const std::string& actual) {
  try {
    call();
    FAIL("no error for " << argument);
  } catch (const sapo::error& e) {
    const std::string what = e.what();
    INFO(what);
    REQUIRE(e.argument() == argument);
    REQUIRE(what.find(argument) != std::string::npos);
    REQUIRE(what.find("expected") != std::string::npos);
    REQUIRE(e.actual().find(actual) != std::string::npos);
    REQUIRE(!e.expected().empty());
  }
}


}  // namespace sapo_test
