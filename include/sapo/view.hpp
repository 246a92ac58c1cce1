/// \file view.hpp
/// \brief Non-owning strided views. Sizes and strides are int64_t and counted in
/// elements, so slices of large tensors work without copies. Any stride is allowed on
/// inputs (a zero stride broadcasts); outputs reject a zero stride, which would make two
/// elements share one address.
#pragma once

#include <cstdint>
#include <type_traits>

#include "config.hpp"

namespace sapo {

/// 1-D view: element i is data[i * stride].
template <class T>
struct vec_view {
  T* data = nullptr;
  int64_t size = 0;
  int64_t stride = 1;

  constexpr vec_view() = default;
  constexpr vec_view(T* data_, int64_t size_, int64_t stride_ = 1) : data(data_), size(size_), stride(stride_) {}
  /// A mutable view converts to a read-only one.
  template <class U, class = std::enable_if_t<std::is_same<T, const U>::value>>
  constexpr vec_view(const vec_view<U>& o) : data(o.data), size(o.size), stride(o.stride) {}

  SAPO_HOST_DEVICE T& operator()(int64_t i) const { return data[i * stride]; }
  /// True when no array was given (optional inputs).
  constexpr bool empty() const { return data == nullptr; }
};

/// 2-D view: element (i, j) is data[i * row_stride + j * col_stride].
template <class T>
struct mat_view {
  T* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 1;

  constexpr mat_view() = default;
  constexpr mat_view(T* data_, int64_t rows_, int64_t cols_, int64_t row_stride_, int64_t col_stride_)
      : data(data_), rows(rows_), cols(cols_), row_stride(row_stride_), col_stride(col_stride_) {}
  /// Row-major contiguous (rows, cols).
  constexpr mat_view(T* data_, int64_t rows_, int64_t cols_)
      : data(data_), rows(rows_), cols(cols_), row_stride(cols_), col_stride(1) {}
  template <class U, class = std::enable_if_t<std::is_same<T, const U>::value>>
  constexpr mat_view(const mat_view<U>& o)
      : data(o.data), rows(o.rows), cols(o.cols), row_stride(o.row_stride), col_stride(o.col_stride) {}

  SAPO_HOST_DEVICE T& operator()(int64_t i, int64_t j) const { return data[i * row_stride + j * col_stride]; }
  constexpr vec_view<T> row(int64_t i) const { return {data + i * row_stride, cols, col_stride}; }
  constexpr bool empty() const { return data == nullptr; }
};

/// A (n, 1) matrix over a vector, so per-response (outcome) quantities go through the
/// same code as per-step ones with K = 1.
template <class T>
constexpr mat_view<T> as_column(vec_view<T> v) {
  return {v.data, v.size, 1, v.stride, 1};
}

}  // namespace sapo
