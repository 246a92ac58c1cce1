// Tests of adapters/eigen/sapo/eigen.hpp: views address the Eigen storage in place (both
// storage orders, blocks, strided maps), kernels called through the adapter give exactly
// the output of the same kernel on a contiguous row-major copy, and outputs written
// through column-major or sliced targets land where they should and nowhere else.
#include <sapo/eigen.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using Eigen::Dynamic;
template <class T>
using ColMat = Eigen::Matrix<T, Dynamic, Dynamic, Eigen::ColMajor>;
template <class T>
using RowMat = Eigen::Matrix<T, Dynamic, Dynamic, Eigen::RowMajor>;

// Every element different, so equal values at (i, j) mean the same element.
template <class M>
M numbered(Eigen::Index rows, Eigen::Index cols) {
  M m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = 100.0 * static_cast<double>(i) + static_cast<double>(j) + 0.5;
  return m;
}

template <class T, class E>
void require_same_elements(const sapo::mat_view<T>& v, const E& e) {
  REQUIRE(v.rows == e.rows());
  REQUIRE(v.cols == e.cols());
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) REQUIRE(v(i, j) == e(i, j));
}

template <class T, class E>
void require_same_elements(const sapo::vec_view<T>& v, const E& e) {
  REQUIRE(v.size == e.size());
  for (int64_t i = 0; i < v.size; ++i) REQUIRE(v(i) == e(i));
}

// The "raw pointer" side of every comparison: contiguous row-major std::vector buffers.
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
  REQUIRE(static_cast<size_t>(e.size()) == expected.size());
  size_t n = 0;
  for (Eigen::Index i = 0; i < e.rows(); ++i)
    for (Eigen::Index j = 0; j < e.cols(); ++j) REQUIRE(e(i, j) == expected[n++]);
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

// Copy a row-major buffer into an Eigen object of any storage order.
template <class M, class T>
M to_eigen(const std::vector<T>& v, int64_t rows, int64_t cols) {
  M m(rows, cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m(i, j) = static_cast<typename M::Scalar>(v[static_cast<size_t>(i * cols + j)]);
  return m;
}

}  // namespace

// ------------------------------------------------------------------------------ views

TEST_CASE("eigen: a column-major matrix is viewed in place with inner/outer strides", "[eigen][view]") {
  auto m = numbered<ColMat<double>>(4, 5);
  auto v = sapo::eigen::view(m);
  STATIC_REQUIRE(std::is_same<decltype(v), sapo::mat_view<double>>::value);
  REQUIRE(v.data == m.data());
  REQUIRE(v.row_stride == 1);
  REQUIRE(v.col_stride == 4);
  require_same_elements(v, m);
}

TEST_CASE("eigen: a row-major matrix is viewed in place", "[eigen][view]") {
  auto m = numbered<RowMat<double>>(4, 5);
  auto v = sapo::eigen::view(m);
  REQUIRE(v.data == m.data());
  REQUIRE(v.row_stride == 5);
  REQUIRE(v.col_stride == 1);
  require_same_elements(v, m);
}

TEST_CASE("eigen: const and read-only objects give const views", "[eigen][view]") {
  const auto m = numbered<ColMat<double>>(3, 4);
  auto cv = sapo::eigen::view(m);
  STATIC_REQUIRE(std::is_same<decltype(cv), sapo::mat_view<const double>>::value);
  require_same_elements(cv, m);

  Eigen::Map<const RowMat<double>> map(m.data(), 4, 3);  // the same buffer read row-major: m^T
  auto mv = sapo::eigen::view(map);
  STATIC_REQUIRE(std::is_same<decltype(mv), sapo::mat_view<const double>>::value);
  require_same_elements(mv, m.transpose());

  Eigen::Ref<const ColMat<double>> ref(m);
  auto rv = sapo::eigen::view(ref);
  STATIC_REQUIRE(std::is_same<decltype(rv), sapo::mat_view<const double>>::value);
  REQUIRE(rv.data == m.data());
  require_same_elements(rv, m);
}

TEST_CASE("eigen: transpose, arrays and integer matrices need no copy either", "[eigen][view]") {
  auto m = numbered<ColMat<double>>(3, 5);
  auto t = sapo::eigen::view(m.transpose());
  REQUIRE(t.data == m.data());
  require_same_elements(t, m.transpose());

  Eigen::ArrayXXd a = numbered<ColMat<double>>(2, 3).array();
  require_same_elements(sapo::eigen::view(a), a);

  Eigen::Matrix<int32_t, Dynamic, Dynamic, Eigen::RowMajor> ids(2, 3);
  ids << 1, 2, 3, 4, 5, 6;
  auto iv = sapo::eigen::view(ids);
  STATIC_REQUIRE(std::is_same<decltype(iv), sapo::mat_view<int32_t>>::value);
  require_same_elements(iv, ids);
}

TEST_CASE("eigen: blocks of both storage orders are viewed in place", "[eigen][view][slice]") {
  auto col = numbered<ColMat<double>>(6, 7);
  auto row = numbered<RowMat<double>>(6, 7);
  auto cb = sapo::eigen::view(col.block(1, 2, 3, 4));
  auto rb = sapo::eigen::view(row.block(1, 2, 3, 4));
  REQUIRE(cb.data == &col(1, 2));
  REQUIRE(rb.data == &row(1, 2));
  REQUIRE(cb.row_stride == 1);
  REQUIRE(cb.col_stride == 6);
  REQUIRE(rb.row_stride == 7);
  REQUIRE(rb.col_stride == 1);
  require_same_elements(cb, col.block(1, 2, 3, 4));
  require_same_elements(rb, row.block(1, 2, 3, 4));

  // A Ref to a block keeps the parent's outer stride.
  Eigen::Ref<ColMat<double>> ref = col.block(2, 1, 4, 3);
  require_same_elements(sapo::eigen::view(ref), col.block(2, 1, 4, 3));
}

TEST_CASE("eigen: rows, columns and strided maps become strided vectors and matrices", "[eigen][view][slice]") {
  auto col = numbered<ColMat<double>>(6, 7);
  auto row = numbered<RowMat<double>>(6, 7);

  auto c_of_row = sapo::eigen::view(row.col(3));  // a column of a row-major matrix: stride 7
  STATIC_REQUIRE(std::is_same<decltype(c_of_row), sapo::vec_view<double>>::value);
  REQUIRE(c_of_row.stride == 7);
  require_same_elements(c_of_row, row.col(3));

  auto r_of_col = sapo::eigen::view(col.row(2));  // a row of a column-major matrix: stride 6
  REQUIRE(r_of_col.stride == 6);
  require_same_elements(r_of_col, col.row(2));

  Eigen::VectorXd vec = Eigen::VectorXd::LinSpaced(5, 1.0, 5.0);
  require_same_elements(sapo::eigen::view(vec), vec);
  require_same_elements(sapo::eigen::view(vec.segment(1, 3)), vec.segment(1, 3));

  // Every other element of every tenth: inner stride 2, outer stride 10.
  std::vector<double> buf(40);
  for (size_t n = 0; n < buf.size(); ++n) buf[n] = static_cast<double>(n);
  Eigen::Map<ColMat<double>, 0, Eigen::Stride<Dynamic, Dynamic>> map(buf.data(), 3, 4,
                                                                     Eigen::Stride<Dynamic, Dynamic>(10, 2));
  auto mv = sapo::eigen::view(map);
  REQUIRE(mv.row_stride == 2);
  REQUIRE(mv.col_stride == 10);
  require_same_elements(mv, map);
  REQUIRE(mv(2, 3) == 34.0);
}

TEST_CASE("eigen: matrix_view and vector_view pick the rank explicitly", "[eigen][view]") {
  Eigen::VectorXd vec = Eigen::VectorXd::LinSpaced(4, 0.0, 3.0);
  auto as_mat = sapo::eigen::matrix_view(vec);
  REQUIRE(as_mat.rows == 4);
  REQUIRE(as_mat.cols == 1);
  require_same_elements(as_mat, vec);

  auto col = numbered<ColMat<double>>(5, 1);
  require_same_elements(sapo::eigen::vector_view(col, "rewards"), col.col(0));
  auto row = numbered<RowMat<double>>(1, 5);
  auto rv = sapo::eigen::vector_view(row, "rewards");
  REQUIRE(rv.size == 5);
  require_same_elements(rv, row.row(0));

  auto wide = numbered<ColMat<double>>(2, 3);
  try {
    (void)sapo::eigen::vector_view(wide, "rewards");
    FAIL("a 2 x 3 matrix was accepted as a vector");
  } catch (const sapo::error& e) {
    REQUIRE(e.argument() == "rewards");
    REQUIRE(e.actual() == "shape (2, 3)");
  }
}

TEST_CASE("eigen: writes through a mutable view land in the viewed object", "[eigen][view]") {
  auto big = numbered<ColMat<double>>(5, 6);
  const ColMat<double> before = big;
  auto v = sapo::eigen::view(big.block(1, 1, 2, 3));
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) v(i, j) = -1.0;
  for (Eigen::Index i = 0; i < 5; ++i)
    for (Eigen::Index j = 0; j < 6; ++j) {
      const bool inside = i >= 1 && i < 3 && j >= 1 && j < 4;
      REQUIRE(big(i, j) == (inside ? -1.0 : before(i, j)));
    }
}

TEST_CASE("eigen: only objects with storage are viewable", "[eigen][view]") {
  using M = ColMat<double>;
  M a(2, 2), b(2, 2);
  STATIC_REQUIRE(sapo::eigen::is_viewable<M>::value);
  STATIC_REQUIRE(sapo::eigen::is_viewable<decltype(a.block(0, 0, 1, 1))>::value);
  STATIC_REQUIRE(sapo::eigen::is_viewable<decltype(a.transpose())>::value);
  STATIC_REQUIRE(sapo::eigen::is_viewable<Eigen::Map<const M>>::value);
  // Expressions without storage: view() on them stops compilation with a static_assert
  // that says to call .eval() first.
  STATIC_REQUIRE_FALSE(sapo::eigen::is_viewable<decltype(a + b)>::value);
  STATIC_REQUIRE_FALSE(sapo::eigen::is_viewable<decltype(a.cast<float>())>::value);
  STATIC_REQUIRE_FALSE(sapo::eigen::is_viewable<decltype(a.reverse())>::value);
  STATIC_REQUIRE_FALSE(sapo::eigen::is_viewable<std::vector<double>>::value);
  STATIC_REQUIRE(sapo::eigen::is_viewable<decltype((a + b).eval())>::value);
}

// ------------------------------------------------------------- kernels through the adapter

TEST_CASE("eigen: the whole pipeline through the adapter equals the raw-pointer kernels", "[eigen][kernels]") {
  const toy_batch d;
  sapo::segment_options seg;
  seg.num_steps = K;
  seg.sid_ranges = {{100, 110}, {110, 120}, {120, 130}};

  // Raw side: contiguous row-major buffers.
  std::vector<int32_t> step_r(B * T), nsteps_r(B);
  std::vector<int64_t> codes_r(B * K);
  std::vector<uint8_t> malformed_r(B);
  const auto seg_r = sapo::segment_steps(raw(d.tokens, B, T), raw(d.mask, B, T), seg,
                                         {raw(step_r, B, T), {nsteps_r.data(), B}, raw(codes_r, B, K),
                                          {malformed_r.data(), B}});
  REQUIRE(seg_r.n_malformed == 1);

  // Eigen side: column-major copies, a row-major block of a bigger matrix for the mask.
  const auto tokens = to_eigen<ColMat<int64_t>>(d.tokens, B, T);
  RowMat<float> mask_big = RowMat<float>::Constant(B + 2, T + 3, 7.0f);
  mask_big.block(1, 2, B, T) = to_eigen<RowMat<float>>(d.mask, B, T);
  const auto mask = mask_big.block(1, 2, B, T);
  ColMat<int32_t> step(B, T);
  Eigen::VectorXi n_steps(B);
  ColMat<int64_t> codes(B, K);
  Eigen::Matrix<uint8_t, Dynamic, 1> malformed(B);
  const auto seg_e = sapo::eigen::segment_steps(tokens, mask, seg, step, n_steps, codes, malformed);
  REQUIRE(seg_e.n_malformed == seg_r.n_malformed);
  require_equal_to_raw(step, step_r);
  require_equal_to_raw(n_steps, nsteps_r);
  require_equal_to_raw(codes, codes_r);
  require_equal_to_raw(malformed, malformed_r);

  // Rewards (prefix) and group advantages.
  sapo::reward_options ro;
  std::vector<double> rewards_r(B * K);
  sapo::step_rewards(raw(codes_r, B, K), sapo::vec_view<const uint8_t>(malformed_r.data(), B), raw(d.targets, B, K),
                     ro, raw(rewards_r, B, K));
  const auto targets = to_eigen<RowMat<int64_t>>(d.targets, B, K);
  ColMat<double> rewards(B, K);
  sapo::eigen::step_rewards(codes, malformed, targets, ro, rewards);
  require_equal_to_raw(rewards, rewards_r);

  const auto groups = sapo::group_layout::contiguous(G);
  sapo::advantage_options ao;
  std::vector<double> adv_r(B * K);
  const auto stats_r = sapo::group_advantages(raw(rewards_r, B, K), groups, ao, raw(adv_r, B, K));
  ColMat<double> adv(B, K);
  const auto stats_e = sapo::eigen::group_advantages(rewards, groups, ao, adv);
  require_same(stats_e, stats_r);
  require_equal_to_raw(adv, adv_r);

  // Outcome (GRPO) advantages from the last step's reward, read as a strided column.
  std::vector<double> out_adv_r(B);
  const auto ostats_r = sapo::outcome_advantages(sapo::vec_view<const double>(rewards_r.data() + (K - 1), B, K),
                                                 groups, ao, sapo::vec_view<double>(out_adv_r.data(), B));
  Eigen::VectorXd out_adv(B);
  const auto ostats_e = sapo::eigen::outcome_advantages(rewards.col(K - 1), groups, ao, out_adv);
  require_same(ostats_e, ostats_r);
  require_equal_to_raw(out_adv, out_adv_r);

  // Mixed, and both broadcasts.
  std::vector<double> mixed_r(B * K);
  sapo::mix_advantages(sapo::vec_view<const double>(out_adv_r.data(), B), raw(adv_r, B, K), {0.5, 2.0},
                       raw(mixed_r, B, K));
  RowMat<double> mixed(B, K);
  sapo::eigen::mix_advantages(out_adv, adv, {0.5, 2.0}, mixed);
  require_equal_to_raw(mixed, mixed_r);

  std::vector<double> tok_r(B * T), otok_r(B * T);
  sapo::broadcast_step_advantages(raw(adv_r, B, K), raw(step_r, B, T), raw(d.mask, B, T), raw(tok_r, B, T));
  sapo::broadcast_outcome_advantages(sapo::vec_view<const double>(out_adv_r.data(), B), raw(d.mask, B, T),
                                     raw(otok_r, B, T));
  ColMat<double> tok(B, T), otok(B, T);
  sapo::eigen::broadcast_step_advantages(adv, step, mask, tok);
  sapo::eigen::broadcast_outcome_advantages(out_adv, mask, otok);
  require_equal_to_raw(tok, tok_r);
  require_equal_to_raw(otok, otok_r);
}

TEST_CASE("eigen: policy_loss through the adapter equals the raw-pointer kernel", "[eigen][kernels]") {
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

  // Eigen inputs in mixed layouts: column-major, a block of a row-major matrix, a transpose.
  const auto logp = to_eigen<ColMat<double>>(d.logp, B, T);
  RowMat<double> old_big = RowMat<double>::Zero(B + 3, T + 1);
  old_big.block(3, 1, B, T) = to_eigen<RowMat<double>>(d.old_logp, B, T);
  const ColMat<double> ref_t = to_eigen<ColMat<double>>(d.ref_logp, B, T).transpose();
  const auto tok_adv = to_eigen<ColMat<double>>(tok_adv_r, B, T);
  const auto step_adv = to_eigen<ColMat<double>>(step_adv_r, B, K);
  const auto step = to_eigen<ColMat<int32_t>>(step_r, B, T);
  const auto mask = to_eigen<ColMat<float>>(d.mask, B, T);

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

    ColMat<double> grad(B, T);
    const auto res_e = sapo::eigen::policy_loss(logp, old_big.block(3, 1, B, T), tok_adv, mask, o, grad);
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

    RowMat<double> grad(B, T);
    const auto res_e =
        sapo::eigen::policy_loss(logp, old_big.block(3, 1, B, T), step, step_adv, mask, o, grad);
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
    ine.logp = sapo::eigen::view(logp);
    ine.old_logp = sapo::eigen::view(old_big.block(3, 1, B, T));
    ine.ref_logp = sapo::eigen::view(ref_t.transpose());
    ine.token_advantages = sapo::eigen::view(tok_adv);
    ine.mask = sapo::eigen::view(mask);
    ColMat<double> grad(B, T);
    const auto res_e = sapo::eigen::policy_loss(ine, o, grad);
    require_same(res_e, res_r);
    require_equal_to_raw(grad, grad_r);
  }
}

// ------------------------------------------------------------- where outputs land

TEST_CASE("eigen: outputs written through column-major and sliced targets touch only their elements",
          "[eigen][output][slice]") {
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

  const auto logp = to_eigen<ColMat<double>>(d.logp, B, T);
  const auto old_logp = to_eigen<ColMat<double>>(d.old_logp, B, T);
  const auto tok_adv = to_eigen<ColMat<double>>(tok_adv_r, B, T);
  const auto mask = to_eigen<ColMat<float>>(d.mask, B, T);
  const double sentinel = 12345.0;
  const Eigen::Index r0 = 2, c0 = 3;

  auto check_block = [&](const auto& big) {
    for (Eigen::Index i = 0; i < big.rows(); ++i)
      for (Eigen::Index j = 0; j < big.cols(); ++j) {
        const bool inside = i >= r0 && i < r0 + B && j >= c0 && j < c0 + T;
        if (inside)
          REQUIRE(big(i, j) == grad_r[static_cast<size_t>((i - r0) * T + (j - c0))]);
        else
          REQUIRE(big(i, j) == sentinel);
      }
  };

  SECTION("a block of a column-major matrix") {
    ColMat<double> big = ColMat<double>::Constant(B + 4, T + 5, sentinel);
    require_same(sapo::eigen::policy_loss(logp, old_logp, tok_adv, mask, o, big.block(r0, c0, B, T)), res_r);
    check_block(big);
  }
  SECTION("a block of a row-major matrix") {
    RowMat<double> big = RowMat<double>::Constant(B + 4, T + 5, sentinel);
    require_same(sapo::eigen::policy_loss(logp, old_logp, tok_adv, mask, o, big.block(r0, c0, B, T)), res_r);
    check_block(big);
  }
  SECTION("a Ref to a block") {
    ColMat<double> big = ColMat<double>::Constant(B + 4, T + 5, sentinel);
    Eigen::Ref<ColMat<double>> target = big.block(r0, c0, B, T);
    require_same(sapo::eigen::policy_loss(logp, old_logp, tok_adv, mask, o, target), res_r);
    check_block(big);
  }
  SECTION("a map with inner stride 2: the odd slots stay untouched") {
    std::vector<double> buf(static_cast<size_t>(2 * B * T), sentinel);
    Eigen::Map<ColMat<double>, 0, Eigen::Stride<Dynamic, Dynamic>> target(buf.data(), B, T,
                                                                          Eigen::Stride<Dynamic, Dynamic>(2 * B, 2));
    require_same(sapo::eigen::policy_loss(logp, old_logp, tok_adv, mask, o, target), res_r);
    for (int64_t i = 0; i < B; ++i)
      for (int64_t t = 0; t < T; ++t) {
        REQUIRE(buf[static_cast<size_t>(2 * i + 2 * B * t)] == grad_r[static_cast<size_t>(i * T + t)]);
        REQUIRE(buf[static_cast<size_t>(2 * i + 2 * B * t + 1)] == sentinel);
      }
  }
  SECTION("group advantages into a transposed column-major target") {
    std::vector<double> rewards_r(B * K);
    for (int64_t n = 0; n < B * K; ++n) rewards_r[n] = static_cast<double>((n * 7) % 4);
    std::vector<double> adv_r(B * K);
    sapo::group_advantages(raw(rewards_r, B, K), sapo::group_layout::contiguous(G), {}, raw(adv_r, B, K));
    ColMat<double> adv_t = ColMat<double>::Constant(K + 1, B, sentinel);  // stores adv^T in rows 0..K-1
    sapo::eigen::group_advantages(to_eigen<RowMat<double>>(rewards_r, B, K), sapo::group_layout::contiguous(G), {},
                                  adv_t.topRows(K).transpose());
    for (int64_t i = 0; i < B; ++i) {
      for (int64_t k = 0; k < K; ++k) REQUIRE(adv_t(k, i) == adv_r[static_cast<size_t>(i * K + k)]);
      REQUIRE(adv_t(K, i) == sentinel);
    }
  }
  SECTION("a target of the wrong shape is rejected by name and nothing is written") {
    ColMat<double> big = ColMat<double>::Constant(B + 4, T + 5, sentinel);
    try {
      sapo::eigen::policy_loss(logp, old_logp, tok_adv, mask, o, big.block(0, 0, B, T - 1));
      FAIL("a (B, T-1) gradient was accepted");
    } catch (const sapo::error& e) {
      REQUIRE(e.argument() == "grad");
    }
    REQUIRE((big.array() == sentinel).all());
  }
}
