/// \file checks.hpp
/// \brief Input validation shared by every entry point. Each check runs before anything
/// is written, so a rejected call leaves every output untouched.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "error.hpp"
#include "view.hpp"

namespace sapo {
namespace detail {

template <class T>
void check_shape(const char* name, const mat_view<T>& v, int64_t rows, int64_t cols) {
  SAPO_CHECK(v.data != nullptr || v.rows * v.cols == 0, name, "an array", "a null pointer");
  SAPO_CHECK(v.rows == rows && v.cols == cols, name, "shape (" << rows << ", " << cols << ")",
             "(" << v.rows << ", " << v.cols << ")");
}

template <class T>
void check_shape(const char* name, const vec_view<T>& v, int64_t size) {
  SAPO_CHECK(v.data != nullptr || v.size == 0, name, "an array", "a null pointer");
  SAPO_CHECK(v.size == size, name, "shape (" << size << ")", "(" << v.size << ")");
}

/// Outputs must not write two elements to one address: a zero stride along an extent
/// longer than 1 would.
template <class T>
void check_output(const char* name, const mat_view<T>& v) {
  SAPO_CHECK(v.rows <= 1 || v.row_stride != 0, name, "a nonzero row stride for an output", v.row_stride);
  SAPO_CHECK(v.cols <= 1 || v.col_stride != 0, name, "a nonzero column stride for an output", v.col_stride);
}

template <class T>
void check_output(const char* name, const vec_view<T>& v) {
  SAPO_CHECK(v.size <= 1 || v.stride != 0, name, "a nonzero stride for an output", v.stride);
}

/// Enumerations arrive from other languages as integers: reject values outside the enum.
template <class E>
void check_enum(const char* name, E value, E last) {
  const auto v = static_cast<int>(value);
  SAPO_CHECK(v >= 0 && v <= static_cast<int>(last), name, "one of the " << static_cast<int>(last) + 1 << " documented values",
             v);
}

inline void check_num_steps(const char* name, int64_t K) {
  SAPO_CHECK(K >= 1 && K <= max_steps, name, "a number of steps K in [1, " << max_steps << "]", K);
}

/// Mask entries must be exactly 0 or 1, whatever their type.
template <class M>
void check_mask_row(const char* name, const mat_view<M>& mask, int64_t i) {
  // A branch-free sweep the compiler vectorizes; the search for the culprit only on failure.
  const M* m = mask.data + i * mask.row_stride;
  int bad = 0;  // an int, not a bool: GCC does not vectorize a bool |= reduction
  if (mask.col_stride == 1) {
    for (int64_t t = 0; t < mask.cols; ++t) bad |= (m[t] != M(0)) & (m[t] != M(1));
  } else {
    for (int64_t t = 0; t < mask.cols; ++t)
      bad |= (m[t * mask.col_stride] != M(0)) & (m[t * mask.col_stride] != M(1));
  }
  if (!bad) return;
  for (int64_t t = 0; t < mask.cols; ++t) {
    const auto v = mask(i, t);
    SAPO_CHECK(v == M(0) || v == M(1), name, "0 or 1 at (" << i << ", " << t << ")", +v);
  }
}

template <class T>
bool is_finite(T x) {
  return std::isfinite(static_cast<double>(x));
}

}  // namespace detail
}  // namespace sapo
