// Tests of adapters/xtensor/sapo/xtensor.hpp: views address the xtensor storage in place
// (row- and column-major containers, xt::view / xt::strided_view slices, transposes),
// wrong ranks are rejected by name, kernels called through the adapter give exactly the
// output of the same kernel on a contiguous row-major copy, and outputs written through
// column-major or sliced targets land where they should and nowhere else.
#include <sapo/xtensor.hpp>

#include <catch2/catch.hpp>

#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xfixed.hpp>
#include <xtensor/xmanipulation.hpp>
#include <xtensor/xstrided_view.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr auto col_major = xt::layout_type::column_major;
template <class T>
using Row2 = xt::xtensor<T, 2>;
template <class T>
using Col2 = xt::xtensor<T, 2, col_major>;

template <class Tensor>
Tensor numbered(std::size_t rows, std::size_t cols) {
  auto t = Tensor::from_shape({rows, cols});
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < cols; ++j) t(i, j) = 100.0 * static_cast<double>(i) + static_cast<double>(j) + 0.5;
  return t;
}

template <class T, class E>
void require_same_elements(const sapo::mat_view<T>& v, const E& e) {
  REQUIRE(e.dimension() == 2);
  REQUIRE(v.rows == static_cast<int64_t>(e.shape()[0]));
  REQUIRE(v.cols == static_cast<int64_t>(e.shape()[1]));
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) REQUIRE(v(i, j) == e(i, j));
}

template <class T, class E>
void require_same_elements(const sapo::vec_view<T>& v, const E& e) {
  REQUIRE(e.dimension() == 1);
  REQUIRE(v.size == static_cast<int64_t>(e.shape()[0]));
  for (int64_t i = 0; i < v.size; ++i) REQUIRE(v(i) == e(i));
}

template <class T>
sapo::mat_view<const T> raw(const std::vector<T>& v, int64_t rows, int64_t cols) {
  return {v.data(), rows, cols};
}
template <class T>
sapo::mat_view<T> raw(std::vector<T>& v, int64_t rows, int64_t cols) {
  return {v.data(), rows, cols};
}

template <class E, class T>
void require_equal_to_raw(const E& e, const std::vector<T>& expected) {
  REQUIRE(e.size() == expected.size());
  if (e.dimension() == 1) {
    for (std::size_t i = 0; i < e.shape()[0]; ++i) REQUIRE(e(i) == expected[i]);
    return;
  }
  std::size_t n = 0;
  for (std::size_t i = 0; i < e.shape()[0]; ++i)
    for (std::size_t j = 0; j < e.shape()[1]; ++j) REQUIRE(e(i, j) == expected[n++]);
}

void require_same(const sapo::loss_result& a, const sapo::loss_result& b) {
  REQUIRE(a.loss == b.loss);
  REQUIRE(a.clip_frac_low == b.clip_frac_low);
  REQUIRE(a.clip_frac_high == b.clip_frac_high);
  REQUIRE(a.clip_frac_dual == b.clip_frac_dual);
  REQUIRE(a.ratio_mean == b.ratio_mean);
  REQUIRE(a.ratio_max == b.ratio_max);
  REQUIRE(a.approx_kl_old == b.approx_kl_old);
  REQUIRE(a.approx_kl_old_k3 == b.approx_kl_old_k3);
  REQUIRE(a.kl_ref == b.kl_ref);
  REQUIRE(a.n_tokens == b.n_tokens);
  REQUIRE(a.n_sequences == b.n_sequences);
  REQUIRE(a.n_steps == b.n_steps);
}

void require_same(const sapo::advantage_stats& a, const sapo::advantage_stats& b) {
  REQUIRE(a.mean_reward == b.mean_reward);
  REQUIRE(a.zero_variance_fraction == b.zero_variance_fraction);
  REQUIRE(a.advantage_std == b.advantage_std);
  REQUIRE(a.n_present == b.n_present);
  REQUIRE(a.n_zero_variance == b.n_zero_variance);
  REQUIRE(a.n_pairs == b.n_pairs);
}

// A small batch: B = 6 responses in groups of G = 3, K = 3 interleaved steps, T = 12.
// Thinking tokens are ids 1..99; level k's SID tokens are 100 + 10k + code.
constexpr int64_t B = 6, T = 12, K = 3, G = 3;
constexpr std::size_t uB = B, uT = T, uK = K;

struct toy_batch {
  std::vector<int64_t> tokens = std::vector<int64_t>(B * T, 0);
  std::vector<float> mask = std::vector<float>(B * T, 0.0f);
  std::vector<int64_t> targets = std::vector<int64_t>(B * K, 0);
  std::vector<double> logp = std::vector<double>(B * T, 0.0), old_logp = logp, ref_logp = logp;

  toy_batch() {
    for (int64_t i = 0; i < B; ++i) {
      int64_t t = 0;
      const int64_t steps_written = i == 4 ? K - 1 : K;  // response 4 never closes its last step
      for (int64_t k = 0; k < steps_written; ++k) {
        for (int64_t j = 0; j < 1 + (i + k) % 2; ++j, ++t) tokens[i * T + t] = 1 + (7 * i + t) % 90;
        tokens[i * T + t] = 100 + 10 * k + (i + k) % 3;
        ++t;
      }
      if (i % 2 == 0) tokens[i * T + t++] = 2;  // a trailing token (tail)
      for (int64_t u = 0; u < t; ++u) mask[i * T + u] = 1.0f;
      for (int64_t k = 0; k < K; ++k) targets[i * K + k] = (i / G + k) % 3;
    }
    for (int64_t n = 0; n < B * T; ++n) {
      old_logp[n] = -0.5 - 0.1 * static_cast<double>(n % 7);
      logp[n] = old_logp[n] + 0.4 * std::sin(0.7 * static_cast<double>(n));  // some tokens get clipped
      ref_logp[n] = old_logp[n] - 0.05 * std::cos(1.3 * static_cast<double>(n));
    }
  }
};

// Copy a row-major buffer into an xtensor container of any layout.
template <class Tensor, class T>
Tensor to_xt(const std::vector<T>& v, std::size_t rows, std::size_t cols) {
  auto t = Tensor::from_shape({rows, cols});
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < cols; ++j) t(i, j) = static_cast<typename Tensor::value_type>(v[i * cols + j]);
  return t;
}

// Not xtensor at all: the minimum a pytensor-like container offers (data, shape, strides
// in elements), without data_offset.
struct foreign_matrix {
  std::vector<double> buf;
  std::array<std::size_t, 2> shp;
  std::array<std::ptrdiff_t, 2> str;
  double* data() { return buf.data(); }
  const double* data() const { return buf.data(); }
  const std::array<std::size_t, 2>& shape() const { return shp; }
  const std::array<std::ptrdiff_t, 2>& strides() const { return str; }
};

}  // namespace

// ------------------------------------------------------------------------------ views

TEST_CASE("xtensor: row- and column-major containers are viewed in place", "[xtensor][view]") {
  auto r = numbered<Row2<double>>(4, 5);
  auto c = numbered<Col2<double>>(4, 5);
  auto rv = sapo::xtensor::matrix_view(r, "r");
  auto cv = sapo::xtensor::matrix_view(c, "c");
  STATIC_REQUIRE(std::is_same<decltype(rv), sapo::mat_view<double>>::value);
  REQUIRE(rv.data == r.data());
  REQUIRE(cv.data == c.data());
  REQUIRE(rv.row_stride == 5);
  REQUIRE(rv.col_stride == 1);
  REQUIRE(cv.row_stride == 1);
  REQUIRE(cv.col_stride == 4);
  require_same_elements(rv, r);
  require_same_elements(cv, c);

  xt::xarray<double> ar = r;
  xt::xarray<double, col_major> ac = r;
  require_same_elements(sapo::xtensor::matrix_view(ar, "ar"), r);
  require_same_elements(sapo::xtensor::matrix_view(ac, "ac"), r);
  REQUIRE(sapo::xtensor::matrix_view(ac, "ac").row_stride == 1);
}

TEST_CASE("xtensor: const containers give const views", "[xtensor][view]") {
  const auto c = numbered<Col2<double>>(3, 4);
  auto v = sapo::xtensor::matrix_view(c, "c");
  STATIC_REQUIRE(std::is_same<decltype(v), sapo::mat_view<const double>>::value);
  require_same_elements(v, c);
  auto s = sapo::xtensor::matrix_view(xt::view(c, xt::range(1, 3), xt::all()), "s");
  STATIC_REQUIRE(std::is_same<decltype(s), sapo::mat_view<const double>>::value);
  require_same_elements(s, xt::view(c, xt::range(1, 3), xt::all()));
}

TEST_CASE("xtensor: xt::view slices of both layouts are viewed in place", "[xtensor][view][slice]") {
  auto r = numbered<Row2<double>>(6, 7);
  auto c = numbered<Col2<double>>(6, 7);
  auto rs = xt::view(r, xt::range(1, 4), xt::range(0, 7, 2));
  auto cs = xt::view(c, xt::range(1, 4), xt::range(0, 7, 2));
  auto rv = sapo::xtensor::matrix_view(rs, "rs");
  auto cv = sapo::xtensor::matrix_view(cs, "cs");
  REQUIRE(rv.data == &r(1, 0));
  REQUIRE(cv.data == &c(1, 0));
  REQUIRE(rv.row_stride == 7);
  REQUIRE(rv.col_stride == 2);
  REQUIRE(cv.row_stride == 1);
  REQUIRE(cv.col_stride == 12);
  require_same_elements(rv, rs);
  require_same_elements(cv, cs);

  // A temporary view is fine: the elements belong to r.
  require_same_elements(sapo::xtensor::matrix_view(xt::view(r, xt::range(2, 6), xt::range(3, 5)), "tmp"),
                        xt::view(r, xt::range(2, 6), xt::range(3, 5)));

  // Integer indices reduce the rank: a row and a column become strided vectors.
  auto row2 = sapo::xtensor::vector_view(xt::view(c, 2, xt::all()), "row");
  REQUIRE(row2.stride == 6);
  require_same_elements(row2, xt::view(c, 2, xt::all()));
  auto col3 = sapo::xtensor::vector_view(xt::view(r, xt::all(), 3), "col");
  REQUIRE(col3.stride == 7);
  require_same_elements(col3, xt::view(r, xt::all(), 3));
}

TEST_CASE("xtensor: strided_view, transpose and foreign containers", "[xtensor][view][slice]") {
  auto r = numbered<Row2<double>>(6, 7);
  auto sv = xt::strided_view(r, {xt::range(1, 5, 2), xt::range(2, 6)});
  auto v = sapo::xtensor::matrix_view(sv, "sv");
  REQUIRE(v.data == &r(1, 2));
  REQUIRE(v.row_stride == 14);
  require_same_elements(v, sv);

  auto tr = xt::transpose(r);
  auto tv = sapo::xtensor::matrix_view(tr, "tr");
  REQUIRE(tv.data == r.data());
  REQUIRE(tv.row_stride == 1);
  REQUIRE(tv.col_stride == 7);
  require_same_elements(tv, tr);

  std::vector<double> buf(12);
  for (std::size_t n = 0; n < 12; ++n) buf[n] = static_cast<double>(n);
  auto adapted = xt::adapt(buf.data(), buf.size(), xt::no_ownership(), std::array<std::size_t, 2>{3, 4});
  auto av = sapo::xtensor::matrix_view(adapted, "adapted");
  REQUIRE(av.data == buf.data());
  require_same_elements(av, adapted);

  xt::xtensor_fixed<double, xt::xshape<2, 3>, col_major> fixed = {{1, 2, 3}, {4, 5, 6}};
  auto fxv = sapo::xtensor::matrix_view(fixed, "fixed");
  REQUIRE(fxv.row_stride == 1);
  require_same_elements(fxv, fixed);

  foreign_matrix f{std::vector<double>(12), {3, 4}, {1, 3}};  // column-major 3 x 4
  for (std::size_t n = 0; n < 12; ++n) f.buf[n] = static_cast<double>(n);
  auto fv = sapo::xtensor::matrix_view(f, "f");
  REQUIRE(fv(2, 1) == 5.0);
  REQUIRE(fv(0, 3) == 9.0);
}

TEST_CASE("xtensor: writes through a mutable view land in the viewed container", "[xtensor][view]") {
  auto c = numbered<Col2<double>>(5, 6);
  const Col2<double> before = c;
  auto v = sapo::xtensor::matrix_view(xt::view(c, xt::range(1, 3), xt::range(1, 4)), "v");
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) v(i, j) = -1.0;
  for (std::size_t i = 0; i < 5; ++i)
    for (std::size_t j = 0; j < 6; ++j) {
      const bool inside = i >= 1 && i < 3 && j >= 1 && j < 4;
      REQUIRE(c(i, j) == (inside ? -1.0 : before(i, j)));
    }
}

TEST_CASE("xtensor: only strided expressions with storage are viewable", "[xtensor][view]") {
  Row2<double> a = numbered<Row2<double>>(2, 2), b = a;
  STATIC_REQUIRE(sapo::xtensor::is_viewable<Row2<double>>::value);
  STATIC_REQUIRE(sapo::xtensor::is_viewable<xt::xarray<float>>::value);
  STATIC_REQUIRE(sapo::xtensor::is_viewable<decltype(xt::view(a, xt::range(0, 1), xt::all()))>::value);
  STATIC_REQUIRE(sapo::xtensor::is_viewable<decltype(xt::transpose(a))>::value);
  STATIC_REQUIRE(sapo::xtensor::is_viewable<foreign_matrix>::value);
  // No storage of their own: matrix_view() on them stops compilation with a static_assert
  // that says to evaluate them first.
  STATIC_REQUIRE_FALSE(sapo::xtensor::is_viewable<decltype(a + b)>::value);
  STATIC_REQUIRE_FALSE(sapo::xtensor::is_viewable<decltype(xt::view(a, xt::keep(0, 1), xt::all()))>::value);
  STATIC_REQUIRE_FALSE(sapo::xtensor::is_viewable<std::vector<double>>::value);
}

TEST_CASE("xtensor: a wrong rank is an error naming the argument, the expected and actual rank",
          "[xtensor][view][errors]") {
  xt::xtensor<double, 1> vec = xt::zeros<double>({5});
  xt::xarray<double> cube = xt::zeros<double>({2, 3, 4});
  auto mat = numbered<Row2<double>>(2, 3);

  try {
    (void)sapo::xtensor::matrix_view(vec, "logp");
    FAIL("a rank-1 tensor was accepted as a matrix");
  } catch (const sapo::error& e) {
    REQUIRE(e.argument() == "logp");
    REQUIRE(e.expected() == "a 2-D array (rank 2)");
    REQUIRE(e.actual() == "rank 1, shape (5)");
  }
  try {
    (void)sapo::xtensor::vector_view(mat, "rewards");
    FAIL("a rank-2 tensor was accepted as a vector");
  } catch (const sapo::error& e) {
    REQUIRE(e.argument() == "rewards");
    REQUIRE(e.expected() == "a 1-D array (rank 1)");
    REQUIRE(e.actual() == "rank 2, shape (2, 3)");
  }
  try {
    (void)sapo::xtensor::matrix_view(xt::view(mat, 1, xt::all()), "mask");
    FAIL("a row view was accepted as a matrix");
  } catch (const sapo::error& e) {
    REQUIRE(e.argument() == "mask");
    REQUIRE(e.actual() == "rank 1, shape (3)");
  }

  SECTION("through a kernel wrapper, with nothing written") {
    Row2<double> m = xt::zeros<double>({2, 3});
    Row2<float> mask = xt::ones<float>({2, 3});
    Row2<double> grad = xt::full_like(m, 9.0);
    try {
      sapo::xtensor::policy_loss(m, cube, m, mask, sapo::loss_options{}, grad);
      FAIL("a rank-3 old_logp was accepted");
    } catch (const sapo::error& e) {
      REQUIRE(e.argument() == "old_logp");
      REQUIRE(e.actual() == "rank 3, shape (2, 3, 4)");
    }
    REQUIRE(xt::all(xt::equal(grad, 9.0)));

    xt::xarray<double> A = xt::zeros<double>({2});
    try {
      sapo::xtensor::outcome_advantages(cube, sapo::group_layout::contiguous(1), {}, A);
      FAIL("a rank-3 reward tensor was accepted");
    } catch (const sapo::error& e) {
      REQUIRE(e.argument() == "rewards");
    }
    // Two bad arguments: the first one (an input) is reported, whatever the compiler's
    // evaluation order.
    xt::xarray<double> A2 = xt::zeros<double>({2, 3});
    try {
      sapo::xtensor::outcome_advantages(cube, sapo::group_layout::contiguous(1), {}, A2);
      FAIL("a rank-3 reward tensor was accepted");
    } catch (const sapo::error& e) {
      REQUIRE(e.argument() == "rewards");
    }
    REQUIRE(xt::all(xt::equal(A2, 0.0)));
  }
}

// ------------------------------------------------------------- kernels through the adapter

TEST_CASE("xtensor: the whole pipeline through the adapter equals the raw-pointer kernels", "[xtensor][kernels]") {
  const toy_batch d;
  sapo::segment_options seg;
  seg.num_steps = K;
  seg.sid_ranges = {{100, 110}, {110, 120}, {120, 130}};

  std::vector<int32_t> step_r(B * T), nsteps_r(B);
  std::vector<int64_t> codes_r(B * K);
  std::vector<uint8_t> malformed_r(B);
  const auto seg_r = sapo::segment_steps(raw(d.tokens, B, T), raw(d.mask, B, T), seg,
                                         {raw(step_r, B, T), {nsteps_r.data(), B}, raw(codes_r, B, K),
                                          {malformed_r.data(), B}});
  REQUIRE(seg_r.n_malformed == 1);

  // xtensor side: column-major copies; the mask is a slice of a bigger row-major tensor.
  const auto tokens = to_xt<Col2<int64_t>>(d.tokens, uB, uT);
  Row2<float> mask_big = xt::full_like(Row2<float>::from_shape({uB + 2, uT + 3}), 7.0f);
  xt::view(mask_big, xt::range(1, 1 + B), xt::range(2, 2 + T)) = to_xt<Row2<float>>(d.mask, uB, uT);
  const auto mask = xt::view(mask_big, xt::range(1, 1 + B), xt::range(2, 2 + T));
  auto step = Col2<int32_t>::from_shape({uB, uT});
  auto n_steps = xt::xtensor<int32_t, 1>::from_shape({uB});
  auto codes = Col2<int64_t>::from_shape({uB, uK});
  auto malformed = xt::xtensor<uint8_t, 1>::from_shape({uB});
  const auto seg_e = sapo::xtensor::segment_steps(tokens, mask, seg, step, n_steps, codes, malformed);
  REQUIRE(seg_e.n_malformed == seg_r.n_malformed);
  require_equal_to_raw(step, step_r);
  require_equal_to_raw(n_steps, nsteps_r);
  require_equal_to_raw(codes, codes_r);
  require_equal_to_raw(malformed, malformed_r);

  sapo::reward_options ro;
  std::vector<double> rewards_r(B * K);
  sapo::step_rewards(raw(codes_r, B, K), sapo::vec_view<const uint8_t>(malformed_r.data(), B), raw(d.targets, B, K),
                     ro, raw(rewards_r, B, K));
  const auto targets = to_xt<Row2<int64_t>>(d.targets, uB, uK);
  auto rewards = xt::xarray<double, col_major>::from_shape({uB, uK});
  sapo::xtensor::step_rewards(codes, malformed, targets, ro, rewards);
  require_equal_to_raw(rewards, rewards_r);

  const auto groups = sapo::group_layout::contiguous(G);
  sapo::advantage_options ao;
  std::vector<double> adv_r(B * K);
  const auto stats_r = sapo::group_advantages(raw(rewards_r, B, K), groups, ao, raw(adv_r, B, K));
  auto adv = Col2<double>::from_shape({uB, uK});
  const auto stats_e = sapo::xtensor::group_advantages(rewards, groups, ao, adv);
  require_same(stats_e, stats_r);
  require_equal_to_raw(adv, adv_r);

  // Outcome (GRPO) advantages from the last step's reward, read as a strided column.
  std::vector<double> out_adv_r(B);
  const auto ostats_r = sapo::outcome_advantages(sapo::vec_view<const double>(rewards_r.data() + (K - 1), B, K),
                                                 groups, ao, sapo::vec_view<double>(out_adv_r.data(), B));
  auto out_adv = xt::xtensor<double, 1>::from_shape({uB});
  const auto ostats_e = sapo::xtensor::outcome_advantages(xt::view(rewards, xt::all(), K - 1), groups, ao, out_adv);
  require_same(ostats_e, ostats_r);
  require_equal_to_raw(out_adv, out_adv_r);

  std::vector<double> mixed_r(B * K);
  sapo::mix_advantages(sapo::vec_view<const double>(out_adv_r.data(), B), raw(adv_r, B, K), {0.5, 2.0},
                       raw(mixed_r, B, K));
  auto mixed = Row2<double>::from_shape({uB, uK});
  sapo::xtensor::mix_advantages(out_adv, adv, {0.5, 2.0}, mixed);
  require_equal_to_raw(mixed, mixed_r);

  std::vector<double> tok_r(B * T), otok_r(B * T);
  sapo::broadcast_step_advantages(raw(adv_r, B, K), raw(step_r, B, T), raw(d.mask, B, T), raw(tok_r, B, T));
  sapo::broadcast_outcome_advantages(sapo::vec_view<const double>(out_adv_r.data(), B), raw(d.mask, B, T),
                                     raw(otok_r, B, T));
  auto tok = Col2<double>::from_shape({uB, uT});
  auto otok = Col2<double>::from_shape({uB, uT});
  sapo::xtensor::broadcast_step_advantages(adv, step, mask, tok);
  sapo::xtensor::broadcast_outcome_advantages(out_adv, mask, otok);
  require_equal_to_raw(tok, tok_r);
  require_equal_to_raw(otok, otok_r);
}

TEST_CASE("xtensor: policy_loss through the adapter equals the raw-pointer kernel", "[xtensor][kernels]") {
  const toy_batch d;
  sapo::segment_options seg;
  seg.num_steps = K;
  seg.sid_ranges = {{100, 130}};
  std::vector<int32_t> step_r(B * T), nsteps_r(B);
  std::vector<int64_t> codes_r(B * K);
  std::vector<uint8_t> malformed_r(B);
  sapo::segment_steps(raw(d.tokens, B, T), raw(d.mask, B, T), seg,
                      {raw(step_r, B, T), {nsteps_r.data(), B}, raw(codes_r, B, K), {malformed_r.data(), B}});
  std::vector<double> step_adv_r(B * K), tok_adv_r(B * T);
  for (int64_t n = 0; n < B * K; ++n) step_adv_r[n] = 0.3 * static_cast<double>(n % 5) - 0.6;
  sapo::broadcast_step_advantages(raw(step_adv_r, B, K), raw(step_r, B, T), raw(d.mask, B, T), raw(tok_adv_r, B, T));

  // Inputs in mixed layouts: column-major, a slice of a bigger row-major tensor, a transpose.
  const auto logp = to_xt<Col2<double>>(d.logp, uB, uT);
  Row2<double> old_big = xt::zeros<double>({uB + 3, uT + 1});
  xt::view(old_big, xt::range(3, 3 + B), xt::range(1, 1 + T)) = to_xt<Row2<double>>(d.old_logp, uB, uT);
  const auto old_logp = xt::view(old_big, xt::range(3, 3 + B), xt::range(1, 1 + T));
  const Col2<double> ref_t = xt::transpose(to_xt<Col2<double>>(d.ref_logp, uB, uT));
  const auto tok_adv = to_xt<Col2<double>>(tok_adv_r, uB, uT);
  const auto step_adv = to_xt<xt::xarray<double, col_major>>(step_adv_r, uB, uK);
  const auto step = to_xt<Col2<int32_t>>(step_r, uB, uT);
  const auto mask = to_xt<Col2<float>>(d.mask, uB, uT);

  SECTION("token advantages, dual clip, token_mean") {
    sapo::loss_options o;
    o.dual_clip = true;
    sapo::policy_inputs<double, float> in;
    in.logp = raw(d.logp, B, T);
    in.old_logp = raw(d.old_logp, B, T);
    in.token_advantages = raw(tok_adv_r, B, T);
    in.mask = raw(d.mask, B, T);
    std::vector<double> grad_r(B * T);
    const auto res_r = sapo::policy_loss(in, o, raw(grad_r, B, T));
    REQUIRE(res_r.clip_frac_low + res_r.clip_frac_high > 0);  // the data exercises the clip

    auto grad = Col2<double>::from_shape({uB, uT});
    const auto res_e = sapo::xtensor::policy_loss(logp, old_logp, tok_adv, mask, o, grad);
    require_same(res_e, res_r);
    require_equal_to_raw(grad, grad_r);
  }

  SECTION("step advantages, step ratio, step_mean") {
    sapo::loss_options o;
    o.ratio = sapo::ratio_level::step;
    o.agg = sapo::aggregation::step_mean;
    sapo::policy_inputs<double, float> in;
    in.logp = raw(d.logp, B, T);
    in.old_logp = raw(d.old_logp, B, T);
    in.step = raw(step_r, B, T);
    in.step_advantages = raw(step_adv_r, B, K);
    in.mask = raw(d.mask, B, T);
    std::vector<double> grad_r(B * T);
    const auto res_r = sapo::policy_loss(in, o, raw(grad_r, B, T));

    auto grad = xt::xarray<double>::from_shape({uB, uT});
    const auto res_e = sapo::xtensor::policy_loss(logp, old_logp, step, step_adv, mask, o, grad);
    require_same(res_e, res_r);
    require_equal_to_raw(grad, grad_r);
  }

  SECTION("KL to a reference given as a transposed view, seq_mean_token_mean") {
    sapo::loss_options o;
    o.kl_coef = 0.1;
    o.agg = sapo::aggregation::seq_mean_token_mean;
    sapo::policy_inputs<double, float> in;
    in.logp = raw(d.logp, B, T);
    in.old_logp = raw(d.old_logp, B, T);
    in.ref_logp = raw(d.ref_logp, B, T);
    in.token_advantages = raw(tok_adv_r, B, T);
    in.mask = raw(d.mask, B, T);
    std::vector<double> grad_r(B * T);
    const auto res_r = sapo::policy_loss(in, o, raw(grad_r, B, T));

    sapo::policy_inputs<double, float> ine;
    ine.logp = sapo::xtensor::matrix_view(logp, "logp");
    ine.old_logp = sapo::xtensor::matrix_view(old_logp, "old_logp");
    ine.ref_logp = sapo::xtensor::matrix_view(xt::transpose(ref_t), "ref_logp");
    ine.token_advantages = sapo::xtensor::matrix_view(tok_adv, "token_advantages");
    ine.mask = sapo::xtensor::matrix_view(mask, "mask");
    auto grad = Row2<double>::from_shape({uB, uT});
    const auto res_e = sapo::xtensor::policy_loss(ine, o, grad);
    require_same(res_e, res_r);
    require_equal_to_raw(grad, grad_r);
  }
}

// ------------------------------------------------------------- where outputs land

TEST_CASE("xtensor: outputs written through column-major and sliced targets touch only their elements",
          "[xtensor][output][slice]") {
  const toy_batch d;
  std::vector<double> tok_adv_r(B * T);
  for (int64_t n = 0; n < B * T; ++n) tok_adv_r[n] = d.mask[n] * (0.25 * static_cast<double>(n % 9) - 1.0);
  sapo::policy_inputs<double, float> in;
  in.logp = raw(d.logp, B, T);
  in.old_logp = raw(d.old_logp, B, T);
  in.token_advantages = raw(tok_adv_r, B, T);
  in.mask = raw(d.mask, B, T);
  std::vector<double> grad_r(B * T);
  const sapo::loss_options o;
  const auto res_r = sapo::policy_loss(in, o, raw(grad_r, B, T));

  const auto logp = to_xt<Col2<double>>(d.logp, uB, uT);
  const auto old_logp = to_xt<Col2<double>>(d.old_logp, uB, uT);
  const auto tok_adv = to_xt<Col2<double>>(tok_adv_r, uB, uT);
  const auto mask = to_xt<Row2<float>>(d.mask, uB, uT);
  const double sentinel = 12345.0;
  const std::size_t r0 = 2, c0 = 3;

  auto check_block = [&](const auto& big) {
    for (std::size_t i = 0; i < big.shape()[0]; ++i)
      for (std::size_t j = 0; j < big.shape()[1]; ++j) {
        const bool inside = i >= r0 && i < r0 + uB && j >= c0 && j < c0 + uT;
        if (inside)
          REQUIRE(big(i, j) == grad_r[(i - r0) * uT + (j - c0)]);
        else
          REQUIRE(big(i, j) == sentinel);
      }
  };

  SECTION("a slice of a column-major tensor") {
    Col2<double> big = xt::full_like(Col2<double>::from_shape({uB + 4, uT + 5}), sentinel);
    require_same(sapo::xtensor::policy_loss(logp, old_logp, tok_adv, mask, o,
                                            xt::view(big, xt::range(r0, r0 + uB), xt::range(c0, c0 + uT))),
                 res_r);
    check_block(big);
  }
  SECTION("a strided_view of a row-major xarray") {
    xt::xarray<double> big = xt::full_like(xt::xarray<double>::from_shape({uB + 4, uT + 5}), sentinel);
    auto target = xt::strided_view(big, {xt::range(r0, r0 + uB), xt::range(c0, c0 + uT)});
    require_same(sapo::xtensor::policy_loss(logp, old_logp, tok_adv, mask, o, target), res_r);
    check_block(big);
  }
  SECTION("every other row and column: the skipped elements stay untouched") {
    Col2<double> big = xt::full_like(Col2<double>::from_shape({2 * uB, 2 * uT}), sentinel);
    require_same(sapo::xtensor::policy_loss(logp, old_logp, tok_adv, mask, o,
                                            xt::view(big, xt::range(0, 2 * B, 2), xt::range(1, 2 * T, 2))),
                 res_r);
    for (std::size_t i = 0; i < 2 * uB; ++i)
      for (std::size_t j = 0; j < 2 * uT; ++j) {
        if (i % 2 == 0 && j % 2 == 1)
          REQUIRE(big(i, j) == grad_r[(i / 2) * uT + j / 2]);
        else
          REQUIRE(big(i, j) == sentinel);
      }
  }
  SECTION("group advantages into a transposed column-major target") {
    std::vector<double> rewards_r(B * K);
    for (int64_t n = 0; n < B * K; ++n) rewards_r[n] = static_cast<double>((n * 7) % 4);
    std::vector<double> adv_r(B * K);
    sapo::group_advantages(raw(rewards_r, B, K), sapo::group_layout::contiguous(G), {}, raw(adv_r, B, K));
    Col2<double> adv_t = xt::full_like(Col2<double>::from_shape({uK + 1, uB}), sentinel);  // adv^T in rows 0..K-1
    sapo::xtensor::group_advantages(to_xt<Row2<double>>(rewards_r, uB, uK), sapo::group_layout::contiguous(G), {},
                                    xt::transpose(xt::view(adv_t, xt::range(0, K), xt::all())));
    for (std::size_t i = 0; i < uB; ++i) {
      for (std::size_t k = 0; k < uK; ++k) REQUIRE(adv_t(k, i) == adv_r[i * uK + k]);
      REQUIRE(adv_t(uK, i) == sentinel);
    }
  }
  SECTION("a target of the wrong shape is rejected by name and nothing is written") {
    Col2<double> big = xt::full_like(Col2<double>::from_shape({uB + 4, uT + 5}), sentinel);
    try {
      sapo::xtensor::policy_loss(logp, old_logp, tok_adv, mask, o,
                                 xt::view(big, xt::range(0, B), xt::range(0, T - 1)));
      FAIL("a (B, T-1) gradient was accepted");
    } catch (const sapo::error& e) {
      REQUIRE(e.argument() == "grad");
    }
    REQUIRE(xt::all(xt::equal(big, sentinel)));
  }
}
