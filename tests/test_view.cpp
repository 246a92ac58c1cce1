// view.hpp: element addressing of strided views.
#include "support.hpp"

TEST_CASE("mat_view addresses elements through both strides", "[view]") {
  std::vector<int> data(40);
  for (int i = 0; i < 40; ++i) data[size_t(i)] = i;
  const sapo::mat_view<int> v(data.data() + 1, 3, 4, 10, 2);  // rows 10 apart, every other column
  REQUIRE(v(0, 0) == 1);
  REQUIRE(v(2, 3) == 1 + 20 + 6);
  const sapo::vec_view<int> r = v.row(1);
  REQUIRE(r.size == 4);
  REQUIRE(r(2) == 1 + 10 + 4);
  const sapo::mat_view<const int> c = v;  // mutable -> read-only
  REQUIRE(c(1, 1) == v(1, 1));
  const sapo::mat_view<int> contiguous(data.data(), 5, 8);
  REQUIRE(contiguous(4, 7) == 39);
}

TEST_CASE("as_column makes a (n, 1) view of a vector", "[view]") {
  std::vector<double> x = {1, 2, 3, 4, 5, 6};
  const sapo::vec_view<double> every_other(x.data(), 3, 2);
  const auto col = sapo::as_column(every_other);
  REQUIRE(col.rows == 3);
  REQUIRE(col.cols == 1);
  REQUIRE(col(2, 0) == 5);
}

TEST_CASE("views carry 64-bit sizes and strides", "[view]") {
  STATIC_REQUIRE(std::is_same<decltype(sapo::mat_view<float>::row_stride), int64_t>::value);
  STATIC_REQUIRE(std::is_same<decltype(sapo::mat_view<float>::rows), int64_t>::value);
  STATIC_REQUIRE(std::is_same<decltype(sapo::vec_view<float>::stride), int64_t>::value);
  // A row offset past 2^31 elements is computed without wrapping.
  std::vector<char> one(1);
  const int64_t big = int64_t(1) << 33;
  const sapo::mat_view<const char> v(one.data(), 1, 1, big, 1);
  REQUIRE(&v(0, 0) == one.data());
  REQUIRE(v.row_stride * 3 == 3 * big);
}
