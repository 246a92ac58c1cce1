// Data-parallel use (docs/distributed.md): a batch is split over 2-3 simulated ranks, the
// partials of every rank are all-reduced by hand here (element-wise sum / min / max over the
// ranks, written out in this file, not taken from the library), and every rank's result must
// equal the single-process result for its rows. The single-process functions are themselves
// checked against the reference in test_advantages.cpp / test_policy_loss.cpp.
#include "loss_problem.hpp"

#include <algorithm>
#include <numeric>

using namespace sapo_test;

namespace {

// ------------------------------------------------------------------ hand all-reduce

template <class T, class Op>
std::vector<T> all_reduce(const std::vector<std::vector<T>>& per_rank, Op op) {
  std::vector<T> out = per_rank.at(0);
  for (size_t r = 1; r < per_rank.size(); ++r) {
    REQUIRE(per_rank[r].size() == out.size());
    for (size_t j = 0; j < out.size(); ++j) out[j] = op(out[j], per_rank[r][j]);
  }
  return out;
}
template <class T>
T plus(T a, T b) {
  return a + b;
}
double lower(double a, double b) { return a < b ? a : b; }
double higher(double a, double b) { return a > b ? a : b; }

// ------------------------------------------------------------------ batches and splits

/// Rewards with ties ({0, 0.5, 1}), some continuous values (so the order of summation shows
/// in the last bits), absent steps, and sometimes one step equal (0.1) everywhere.
sapo_ref::Matrix mixed_rewards(std::mt19937_64& rng, int64_t B, int64_t K) {
  std::uniform_int_distribution<int> level(0, 2);
  std::uniform_real_distribution<double> cont(-1.0, 2.0);
  std::bernoulli_distribution absent(0.15), continuous(0.3), flat(0.2);
  sapo_ref::Matrix r(static_cast<size_t>(B), std::vector<double>(static_cast<size_t>(K)));
  for (auto& row : r)
    for (auto& x : row) x = absent(rng) ? std::nan("") : continuous(rng) ? cont(rng) : 0.5 * level(rng);
  if (flat(rng))
    for (auto& row : r) row[0] = 0.1;
  return r;
}

/// Group ids of unequal groups (empty groups and singletons included), rows in random order.
std::vector<int64_t> unequal_groups(std::mt19937_64& rng, int64_t n_groups) {
  const int64_t sizes[] = {0, 1, 1, 2, 3, 5, 8};
  std::vector<int64_t> ids;
  for (int64_t g = 0; g < n_groups; ++g)
    for (int64_t j = sizes[rng() % 7]; j > 0; --j) ids.push_back(g);
  if (ids.empty()) ids.push_back(0);
  std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

/// Every row to a random rank, in random order on the rank; the last rank is sometimes empty.
std::vector<std::vector<int64_t>> scatter(std::mt19937_64& rng, int64_t B, int ranks) {
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(ranks));
  const bool last_empty = ranks > 2 && rng() % 3 == 0;
  const int used = last_empty ? ranks - 1 : ranks;
  for (int64_t i = 0; i < B; ++i) rows[rng() % static_cast<size_t>(used)].push_back(i);
  for (auto& r : rows) std::shuffle(r.begin(), r.end(), rng);
  return rows;
}

/// Consecutive chunks of random lengths (groups straddle the cuts; a chunk may be empty).
std::vector<std::vector<int64_t>> cut(std::mt19937_64& rng, int64_t B, int ranks) {
  std::vector<int64_t> ends;
  for (int r = 1; r < ranks; ++r) ends.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(B + 1)));
  ends.push_back(B);
  std::sort(ends.begin(), ends.end());
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(ranks));
  int64_t begin = 0;
  for (int r = 0; r < ranks; ++r) {
    for (int64_t i = begin; i < ends[size_t(r)]; ++i) rows[size_t(r)].push_back(i);
    begin = ends[size_t(r)];
  }
  return rows;
}

template <class M>
M pick_rows(const M& m, const std::vector<int64_t>& rows) {
  M out;
  for (int64_t i : rows) out.push_back(m[size_t(i)]);
  return out;
}

// ------------------------------------------------------------------ the protocol, by hand

template <class T>
struct RankAdvantages {
  Buf<T> adv;
  sapo::advantage_stats stats;
};

/// Runs the three phases on every rank with the all-reduces done by hand between them.
/// slice(r) gives rank r's group_slice.
template <class T, class SliceOf>
std::vector<RankAdvantages<T>> run_ranks(const std::vector<Buf<T>>& rewards, SliceOf slice,
                                         const sapo::advantage_options& opt) {
  const size_t R = rewards.size();
  std::vector<sapo::group_partials> p(R);
  for (size_t r = 0; r < R; ++r) p[r] = sapo::local_group_partials(rewards[r].cview(), slice(r));

  // Round 1: count and sum add up, min and max take the extremes.
  std::vector<std::vector<int64_t>> counts;
  std::vector<std::vector<double>> sums, mins, maxs;
  for (const auto& q : p) {
    counts.push_back(q.count);
    sums.push_back(q.sum);
    mins.push_back(q.min);
    maxs.push_back(q.max);
  }
  sapo::group_partials reduced = p[0];
  reduced.count = all_reduce(counts, plus<int64_t>);
  reduced.sum = all_reduce(sums, plus<double>);
  reduced.min = all_reduce(mins, lower);
  reduced.max = all_reduce(maxs, higher);

  // Round 2: every rank starts from the reduced round-1 arrays.
  std::vector<std::vector<double>> sq;
  for (size_t r = 0; r < R; ++r) {
    p[r] = reduced;
    sapo::local_group_deviations(rewards[r].cview(), slice(r), p[r]);
    sq.push_back(p[r].sq_dev);
  }
  reduced.sq_dev = all_reduce(sq, plus<double>);

  // Finish, then the advantage_std sums.
  std::vector<RankAdvantages<T>> out(R);
  std::vector<std::vector<double>> a_sum, a_sq;
  for (size_t r = 0; r < R; ++r) {
    out[r].adv = Buf<T>(rewards[r].rows, rewards[r].cols, Layout::strided, T(99));
    sapo::advantage_sums s;
    out[r].stats = sapo::finalize_group_advantages(rewards[r].cview(), slice(r), reduced, opt, out[r].adv.view(), s);
    a_sum.push_back(s.sum);
    a_sq.push_back(s.sum_sq);
  }
  sapo::advantage_sums total;
  total.sum = all_reduce(a_sum, plus<double>);
  total.sum_sq = all_reduce(a_sq, plus<double>);
  for (auto& o : out) sapo::finish_advantage_std(o.stats, total);
  return out;
}

/// Every rank's rows and statistics against the single-process call. The ranks add their
/// partial sums in another order than one process does, so the means differ in the last
/// bits: 1e-12 relative (double; float: one float rounding of such a value, 1e-6).
template <class T>
void require_same_as_single(const std::vector<RankAdvantages<T>>& ranks, const std::vector<std::vector<int64_t>>& rows,
                            const Buf<T>& single, const sapo::advantage_stats& want) {
  const bool f = std::is_same<T, float>::value;
  const double tol = f ? 1e-6 : 1e-12;
  int64_t seen = 0;
  for (size_t r = 0; r < ranks.size(); ++r) {
    INFO("rank " << r);
    for (size_t j = 0; j < rows[r].size(); ++j)
      for (int64_t k = 0; k < single.cols; ++k) {
        INFO("local row " << j << " = global row " << rows[r][j] << ", step " << k);
        require_close(double(ranks[r].adv.at(int64_t(j), k)), double(single.at(rows[r][j], k)), tol, tol);
      }
    seen += static_cast<int64_t>(rows[r].size());
    const sapo::advantage_stats& got = ranks[r].stats;
    REQUIRE(got.n_present == want.n_present);
    REQUIRE(got.n_pairs == want.n_pairs);
    REQUIRE(got.n_zero_variance == want.n_zero_variance);
    REQUIRE(got.zero_variance_fraction == want.zero_variance_fraction);  // ratios of equal integers
    for (size_t k = 0; k < want.mean_reward.size(); ++k) {
      require_close(got.mean_reward[k], want.mean_reward[k], 1e-12, 1e-12);
      // advantage_std is sqrt(E[A^2] - E[A]^2) (one pass, as the single-process code always
      // computed it): its rounding error is relative to E[A^2] <= max A^2, not to the std
      // (equal A everywhere gives 0 or ~1e-9 depending on the order of the sums). So the
      // variances are compared, to 1e-12 of max A^2.
      double max_a2 = 0;
      for (int64_t i = 0; i < single.rows; ++i)
        max_a2 = std::max(max_a2, double(single.at(i, int64_t(k))) * double(single.at(i, int64_t(k))));
      require_close(got.advantage_std[k] * got.advantage_std[k], want.advantage_std[k] * want.advantage_std[k], 0,
                    1e-12 * max_a2 + 1e-300);
    }
  }
  REQUIRE(seen == single.rows);
}

}  // namespace

TEMPLATE_TEST_CASE("distributed advantages equal the single-process call", "[distributed]", float, double) {
  const auto norm = GENERATE(sapo::normalization::std, sapo::normalization::std_floor, sapo::normalization::none,
                             sapo::normalization::loo, sapo::normalization::batch_std);
  const bool unbiased = GENERATE(true, false);
  const auto singleton = GENERATE(sapo::singleton_policy::zero, sapo::singleton_policy::raw);
  const int ranks = GENERATE(2, 3);
  const int64_t K = GENERATE(1, 3);
  CAPTURE(static_cast<int>(norm), unbiased, static_cast<int>(singleton), ranks, K);
  sapo::advantage_options opt;
  opt.norm = norm;
  opt.unbiased_std = unbiased;
  opt.singleton = singleton;
  opt.eps = 1e-3;  // large enough that std and std_floor differ

  const bool explicit_ids = GENERATE(true, false);
  const int64_t G = GENERATE(1, 3, 4);  // contiguous groups only
  if (explicit_ids && G != 1) return;   // explicit ids draw their own unequal sizes
  CAPTURE(explicit_ids, G);

  std::mt19937_64 rng(2024 + static_cast<uint64_t>(ranks * 10 + K + G));
  for (int trial = 0; trial < 8; ++trial) {
    CAPTURE(trial);
    if (explicit_ids) {
      // Unequal groups (empty ones and singletons too), rows scattered over the ranks.
      const int64_t n_groups = 7;
      const std::vector<int64_t> ids = unequal_groups(rng, n_groups);
      const auto B = static_cast<int64_t>(ids.size());
      const sapo_ref::Matrix rewards = mixed_rewards(rng, B, K);
      const Buf<TestType> all = from_ref<TestType>(rewards, K, Layout::column_major);
      Buf<TestType> single(B, K, Layout::contiguous, TestType(99));
      const auto want = sapo::group_advantages(all.cview(), sapo::group_layout::explicit_ids({ids.data(), B}, n_groups),
                                               opt, single.view());

      const auto rows = scatter(rng, B, ranks);
      std::vector<Buf<TestType>> local;
      std::vector<std::vector<int64_t>> local_ids;
      for (const auto& rr : rows) {
        local.push_back(from_ref<TestType>(pick_rows(to_ref(all), rr), K, Layout::strided));
        std::vector<int64_t> li;
        for (int64_t i : rr) li.push_back(ids[size_t(i)]);
        local_ids.push_back(li);
      }
      const auto got = run_ranks(
          local,
          [&](size_t r) {
            return sapo::group_slice::explicit_ids(
                {local_ids[r].data(), static_cast<int64_t>(local_ids[r].size())}, n_groups);
          },
          opt);
      require_same_as_single(got, rows, single, want);
    } else {
      // Contiguous groups of G, cut into consecutive chunks: groups straddle the ranks.
      const int64_t n_groups = 6, B = G * n_groups;
      const sapo_ref::Matrix rewards = mixed_rewards(rng, B, K);
      const Buf<TestType> all = from_ref<TestType>(rewards, K, Layout::contiguous);
      Buf<TestType> single(B, K, Layout::contiguous, TestType(99));
      const auto want = sapo::group_advantages(all.cview(), sapo::group_layout::contiguous(G), opt, single.view());

      const auto rows = cut(rng, B, ranks);
      std::vector<Buf<TestType>> local;
      for (const auto& rr : rows) local.push_back(from_ref<TestType>(pick_rows(to_ref(all), rr), K, Layout::strided));
      const auto got = run_ranks(
          local,
          [&](size_t r) { return sapo::group_slice::contiguous(G, rows[r].empty() ? 0 : rows[r].front(), n_groups); },
          opt);
      require_same_as_single(got, rows, single, want);
    }
  }
}

TEST_CASE("distributed advantages by hand: a group split over two ranks", "[distributed]") {
  // Group 0 = {1, 0 | 0, 0}: mu = 1/4, sigma (unbiased) = 1/2; group 1 = {| 3} is a
  // singleton living on rank 1 only. Rank 0 holds rows 0-1, rank 1 rows 2-4.
  const double r0[] = {1, 0}, r1[] = {0, 0, 3};
  const int64_t id0[] = {0, 0}, id1[] = {0, 0, 1};
  const auto g0 = sapo::group_slice::explicit_ids({id0, 2}, 2), g1 = sapo::group_slice::explicit_ids({id1, 3}, 2);
  const sapo::mat_view<const double> v0(r0, 2, 1), v1(r1, 3, 1);
  sapo::group_partials p0 = sapo::local_group_partials(v0, g0), p1 = sapo::local_group_partials(v1, g1);
  REQUIRE(p0.count == std::vector<int64_t>{2, 0, 2});  // group 0, group 1, batch
  REQUIRE(p1.count == std::vector<int64_t>{2, 1, 3});
  REQUIRE(p0.sum == std::vector<double>{1, 0, 1});
  REQUIRE(p1.min == std::vector<double>{0, 3, 0});
  REQUIRE(p0.max[1] == -std::numeric_limits<double>::infinity());  // nothing of group 1 here

  sapo::group_partials red = p0;
  for (size_t j = 0; j < red.size(); ++j) {
    red.count[j] += p1.count[j];
    red.sum[j] += p1.sum[j];
    red.min[j] = std::min(red.min[j], p1.min[j]);
    red.max[j] = std::max(red.max[j], p1.max[j]);
  }
  sapo::group_partials q0 = red, q1 = red;
  sapo::local_group_deviations(v0, g0, q0);
  sapo::local_group_deviations(v1, g1, q1);
  // Rank 0: (1 - 1/4)^2 + (0 - 1/4)^2 = 10/16; rank 1: 2 (1/4)^2 = 2/16.
  REQUIRE(q0.sq_dev[0] == 10.0 / 16);
  REQUIRE(q1.sq_dev[0] == 2.0 / 16);
  for (size_t j = 0; j < red.size(); ++j) red.sq_dev.push_back(q0.sq_dev[j] + q1.sq_dev[j]);

  sapo::advantage_options opt;
  opt.eps = 1e-12;
  double a0[2], a1[3];
  sapo::advantage_sums s0, s1;
  const auto st = sapo::finalize_group_advantages(v0, g0, red, opt, sapo::mat_view<double>(a0, 2, 1), s0);
  sapo::finalize_group_advantages(v1, g1, red, opt, sapo::mat_view<double>(a1, 3, 1), s1);
  REQUIRE(a0[0] == Approx(1.5).epsilon(1e-10));  // (1 - 1/4) / (1/2)
  REQUIRE(a0[1] == Approx(-0.5).epsilon(1e-10));
  REQUIRE(a1[0] == Approx(-0.5).epsilon(1e-10));
  REQUIRE(a1[2] == 0.0);  // singleton, policy zero
  REQUIRE(st.n_present[0] == 5);
  REQUIRE(st.mean_reward[0] == 4.0 / 5);
  REQUIRE(st.n_pairs[0] == 2);
  REQUIRE(st.n_zero_variance[0] == 1);  // the singleton
  // A over the batch: {1.5, -0.5, -0.5, -0.5, 0}: mean 0, population std sqrt(3 / 5).
  sapo::advantage_sums total{{s0.sum[0] + s1.sum[0]}, {s0.sum_sq[0] + s1.sum_sq[0]}};
  sapo::advantage_stats fin = st;
  sapo::finish_advantage_std(fin, total);
  REQUIRE(fin.advantage_std[0] == Approx(std::sqrt(3.0 / 5)).epsilon(1e-10));
}

TEST_CASE("distributed phases reject bad input and write nothing", "[distributed][errors]") {
  const double r[] = {1, 0, 0.5, 0.5};
  const int64_t ids[] = {0, 1, 1, 2};
  const sapo::mat_view<const double> v(r, 4, 1);
  const auto slice = sapo::group_slice::explicit_ids({ids, 4}, 3);
  auto rejects = [](auto call, const std::string& argument) {
    try {
      call();
      FAIL("no error for " << argument);
    } catch (const sapo::error& e) {
      INFO(e.what());
      REQUIRE(e.argument() == argument);
    }
  };
  rejects([&] { sapo::local_group_partials(v, sapo::group_slice::explicit_ids({ids, 4}, 2)); }, "groups.group_ids");
  // Global rows [10, 14) lie outside 3 groups of 4 (12 rows).
  rejects([&] { sapo::local_group_partials(v, sapo::group_slice::contiguous(4, 10, 3)); }, "groups.first_row");
  rejects([&] { sapo::local_group_partials(v, sapo::group_slice::contiguous(0, 0, 3)); }, "groups.group_size");

  sapo::group_partials p = sapo::local_group_partials(v, slice);
  double adv[4] = {99, 99, 99, 99};
  sapo::advantage_sums s;
  // Round 2 not done: no squared deviations.
  rejects([&] { sapo::finalize_group_advantages(v, slice, p, {}, sapo::mat_view<double>(adv, 4, 1), s); },
          "partials.sq_dev");
  // Partials of another layout.
  sapo::group_partials other = sapo::local_group_partials(v, sapo::group_slice::explicit_ids({ids, 4}, 4));
  rejects([&] { sapo::local_group_deviations(v, slice, other); }, "partials");
  for (double a : adv) REQUIRE(a == 99);
  sapo::advantage_stats st;
  st.n_present = {4, 4};
  rejects([&] { sapo::finish_advantage_std(st, s); }, "advantage_sums");
}

TEST_CASE("an empty rank takes part with empty partials", "[distributed]") {
  const sapo::mat_view<const double> v(nullptr, 0, 2, 2, 1);
  const auto p = sapo::local_group_partials(v, sapo::group_slice::explicit_ids({nullptr, 0}, 3));
  REQUIRE(p.count == std::vector<int64_t>(8, 0));  // (3 + 1) x 2
  REQUIRE(p.min == std::vector<double>(8, std::numeric_limits<double>::infinity()));
  const auto q = sapo::local_group_partials(v, sapo::group_slice::contiguous(4, 12, 3));  // after the last row
  REQUIRE(q.sum == std::vector<double>(8, 0.0));
}

// ------------------------------------------------------------------ loss normalizers

TEST_CASE("count_loss_normalizers by hand", "[distributed][loss]") {
  const int32_t mask[] = {1, 1, 1, 0, 0,  //
                          0, 0, 0, 0, 0,  //
                          1, 1, 0, 1, 1};
  const int32_t step[] = {0, 0, 1, -1, -1,  //
                          7, 9, 9, 9, 9,    // masked out: never looked at
                          -1, 2, 2, 2, -1};
  const sapo::mat_view<const int32_t> m(mask, 3, 5), s(step, 3, 5);
  const sapo::loss_counts c = sapo::count_loss_normalizers(m, s);
  REQUIRE(c.tokens == 7);
  REQUIRE(c.sequences == 2);  // row 1 has no token
  REQUIRE(c.steps == 3);      // row 0: steps 0 and 1; row 2: step 2 (-1 is no step)
  REQUIRE(c.rows == 3);
  REQUIRE(sapo::count_loss_normalizers(m).steps == 0);

  sapo::loss_options o;
  o.agg = sapo::aggregation::seq_mean_token_sum_norm;
  sapo::set_global_normalizers(o, c);
  REQUIRE(o.global_sequences == 3);  // rows, the B of B * L
  o.agg = sapo::aggregation::seq_mean_token_mean;
  sapo::set_global_normalizers(o, c);
  REQUIRE(o.global_sequences == 2);
  REQUIRE(o.global_tokens == 7);
  REQUIRE(o.global_steps == 3);

  const int32_t bad_mask[] = {1, 2};
  const int32_t bad_step[] = {0, 64};
  REQUIRE_THROWS_AS(sapo::count_loss_normalizers(sapo::mat_view<const int32_t>(bad_mask, 1, 2)), sapo::error);
  REQUIRE_THROWS_AS(sapo::count_loss_normalizers(sapo::mat_view<const int32_t>(mask, 1, 2),
                                                 sapo::mat_view<const int32_t>(bad_step, 1, 2)),
                    sapo::error);
}

TEST_CASE("global normalizers: rank losses add up to the single-process loss", "[distributed][loss]") {
  const auto agg = GENERATE(sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                            sapo::aggregation::seq_mean_token_sum, sapo::aggregation::seq_mean_token_sum_norm,
                            sapo::aggregation::step_mean);
  const auto ratio = GENERATE(sapo::ratio_level::token, sapo::ratio_level::step, sapo::ratio_level::sequence);
  const bool with_ref = GENERATE(false, true);
  const int ranks = GENERATE(2, 3);
  CAPTURE(static_cast<int>(agg), static_cast<int>(ratio), with_ref, ranks);
  sapo::loss_options opt;
  opt.agg = agg;
  opt.ratio = ratio;
  opt.kl_coef = with_ref ? 0.1 : 0.0;
  opt.dual_clip = with_ref;

  std::mt19937_64 rng(77 + static_cast<uint64_t>(ranks));
  for (int trial = 0; trial < 3; ++trial) {
    const LossProblem p = random_problem(rng, 17, 23);
    LossBuffers<double> all(p, Layout::contiguous);
    const sapo::loss_result single = sapo::policy_loss(all.inputs(with_ref, true), opt, all.grad.view());

    const auto rows = scatter(rng, p.B, ranks);
    sapo::loss_counts total;
    std::vector<LossProblem> parts;
    for (const auto& rr : rows) {
      LossProblem q = p;
      q.B = static_cast<int64_t>(rr.size());
      q.logp = pick_rows(p.logp, rr);
      q.old_logp = pick_rows(p.old_logp, rr);
      q.ref_logp = pick_rows(p.ref_logp, rr);
      q.step_adv = pick_rows(p.step_adv, rr);
      q.token_adv = pick_rows(p.token_adv, rr);
      q.step = pick_rows(p.step, rr);
      q.mask = pick_rows(p.mask, rr);
      const LossBuffers<double> b(q, Layout::strided);
      const sapo::loss_counts c = sapo::count_loss_normalizers(b.mask.cview(), b.step.cview());
      total.tokens += c.tokens;  // the all-reduce (SUM), by hand
      total.sequences += c.sequences;
      total.steps += c.steps;
      total.rows += c.rows;
      parts.push_back(q);
    }
    // The counts are the ones the single-process kernel used.
    REQUIRE(total.tokens == single.n_tokens);
    REQUIRE(total.sequences == single.n_sequences);
    REQUIRE(total.steps == single.n_steps);
    REQUIRE(total.rows == p.B);

    sapo::loss_options ro = opt;
    sapo::set_global_normalizers(ro, total);
    double loss = 0;
    for (size_t r = 0; r < parts.size(); ++r) {
      if (parts[r].B == 0) continue;  // an empty rank adds 0 (and sends its zero counts)
      LossBuffers<double> b(parts[r], Layout::strided);
      loss += sapo::policy_loss(b.inputs(with_ref, true), ro, b.grad.view()).loss;
      // Every token's gradient is row-local math times 1 / normalizer, and the normalizer is
      // the single-process one: the rows are equal bit for bit.
      for (size_t j = 0; j < rows[r].size(); ++j)
        for (int64_t t = 0; t < p.T; ++t) {
          INFO("rank " << r << ", global row " << rows[r][j] << ", token " << t);
          REQUIRE(b.grad.at(int64_t(j), t) == all.grad.at(rows[r][j], t));
        }
    }
    // The ranks add their rows' terms in another order than one process: last bits.
    require_close(loss, single.loss, 1e-12, 1e-14);
  }
}
