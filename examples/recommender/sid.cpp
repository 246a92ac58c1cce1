// Semantic IDs by residual k-means (RQ-KMeans) and their prefix trie (sid.hpp).
//
// 1. Item vectors: [genres | year | collaborative], each block rescaled to its weight.
// 2. Residual k-means: level l clusters what levels 0..l-1 left unexplained.
// 3. Collisions: two items with the same raw code cannot both keep it (the model must be
//    able to name each item with exactly K tokens), so all but one move to the nearest free
//    code, preferring codes that keep as long a prefix of the raw code as possible.
#include "sid.hpp"

#include <Eigen/Dense>
#include <Eigen/SparseCore>
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>

namespace rec {
namespace {

using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Random numbers from std::mt19937_64's raw output, whose sequence the standard fixes,
// rather than from std::*_distribution, whose algorithms are left to the library: the same
// seed then gives the same SIDs with any standard library.
struct rng {
  std::mt19937_64 g;
  explicit rng(uint64_t seed) : g(seed) {}
  double uniform() { return double(g() >> 11) * 0x1.0p-53; }  // [0, 1), 53 random bits
  double normal() {                                            // Box-Muller, one of the pair
    const double u1 = 1.0 - uniform();                         // (0, 1]: log() stays finite
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// Orthonormal basis of the columns of y (thin Q of a Householder QR).
Eigen::MatrixXd orthonormalize(const Eigen::MatrixXd& y) {
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(y);
  return qr.householderQ() * Eigen::MatrixXd::Identity(y.rows(), y.cols());
}

// Collaborative item embedding from the training interactions: a truncated SVD of the
// user-item matrix normalized as A[u][i] = 1 / sqrt(deg(u) deg(i)) (every user and every item
// weighs the same, so heavy raters and blockbusters do not take the leading directions).
// The leading singular pair of that matrix is the degree vector with singular value 1 (a
// known property of the symmetrically normalized bipartite graph): it says how popular an
// item is and nothing about taste, so it is dropped. Items get the next `dim` right singular
// vectors scaled by their singular values, then unit length; items with no training
// interaction get zeros. The SVD is randomized (Halko, Martinsson & Tropp 2011: Gaussian
// sketch, power iterations, small dense SVD), which is exact enough at this rank and takes
// milliseconds on 9k items.
matrix collaborative(const dataset& data, const split& sp, int dim, rng& g) {
  const int64_t n_items = int64_t(data.items.size());
  const int64_t n_users = int64_t(data.sequences.size());
  std::vector<std::vector<int32_t>> seen(static_cast<size_t>(n_users));
  for (const auto& ex : sp.train) {
    if (ex.user < 0 || ex.user >= n_users) throw std::invalid_argument("build_sids: split user out of range");
    auto& s = seen[size_t(ex.user)];
    s.insert(s.end(), ex.history.begin(), ex.history.end());
    s.push_back(ex.target);
  }
  std::vector<double> deg_item(size_t(n_items), 0.0);
  for (auto& s : seen) {
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    for (int32_t i : s) {
      if (i < 0 || i >= n_items) throw std::invalid_argument("build_sids: split item out of range");
      deg_item[size_t(i)] += 1;
    }
  }
  std::vector<Eigen::Triplet<double>> trip;
  for (int64_t u = 0; u < n_users; ++u) {
    const auto& s = seen[size_t(u)];
    for (int32_t i : s) trip.emplace_back(int(u), int(i), 1.0 / std::sqrt(double(s.size()) * deg_item[size_t(i)]));
  }
  int64_t active_users = 0, active_items = 0;
  for (const auto& s : seen) active_users += s.empty() ? 0 : 1;
  for (double d : deg_item) active_items += d > 0 ? 1 : 0;

  // dim + 1 components (the dropped degree vector first), at most the matrix's rank.
  const int64_t rank_bound = std::min(active_users, active_items);
  const int64_t k = std::min<int64_t>(int64_t(dim) + 1, rank_bound);
  if (dim <= 0 || k < 2) return matrix(n_items, 0);

  Eigen::SparseMatrix<double, Eigen::RowMajor> a(n_users, n_items);
  a.setFromTriplets(trip.begin(), trip.end());
  const Eigen::SparseMatrix<double, Eigen::RowMajor> at = a.transpose();

  // Oversampling by 10 and 6 power iterations: the spectrum of this matrix decays slowly
  // after the first few values, and power iterations are what sharpens it.
  const int64_t q = std::min<int64_t>(k + 10, std::min(n_users, n_items));
  Eigen::MatrixXd omega(n_items, q);
  for (int64_t r = 0; r < n_items; ++r)
    for (int64_t c = 0; c < q; ++c) omega(r, c) = g.normal();
  Eigen::MatrixXd y = a * omega;  // n_users x q
  for (int it = 0; it < 6; ++it) {
    const Eigen::MatrixXd z = orthonormalize(at * orthonormalize(y));
    y = a * z;
  }
  const Eigen::MatrixXd qb = orthonormalize(y);
  // A ~ Q B with B = Q^T A; B^T = A^T Q = U S V^T gives A ~ (Q V) S U^T: the columns of U
  // are A's right singular vectors, one row per item.
  const Eigen::MatrixXd bt = at * qb;  // n_items x q
  Eigen::BDCSVD<Eigen::MatrixXd> svd(bt, Eigen::ComputeThinU);
  const Eigen::MatrixXd& u = svd.matrixU();
  const Eigen::VectorXd& s = svd.singularValues();

  matrix e(n_items, k - 1);
  for (int64_t i = 0; i < n_items; ++i) {
    if (deg_item[size_t(i)] == 0) {
      e.row(i).setZero();
      continue;
    }
    for (int64_t c = 1; c < k; ++c) e(i, c - 1) = u(i, c) * s(c);
    const double norm = e.row(i).norm();
    if (norm > 1e-12) e.row(i) /= norm;
    else e.row(i).setZero();
  }
  return e;
}

// Rescales a block so that its mean squared row norm over the items is `weight`.
void weigh_block(matrix& m, int64_t col, int64_t width, double weight) {
  if (width == 0 || m.rows() == 0) return;
  const double mean_sq = m.middleCols(col, width).squaredNorm() / double(m.rows());
  if (mean_sq > 0) m.middleCols(col, width) *= std::sqrt(weight / mean_sq);
}

matrix features(const dataset& data, const split& sp, const sid_options& opt, rng& g, int* widths) {
  const int64_t n = int64_t(data.items.size());
  const int64_t n_genres = int64_t(data.genre_names.size());
  const matrix cf = collaborative(data, sp, opt.svd_dim, g);
  const int64_t dim = n_genres + 2 + cf.cols();
  matrix x = matrix::Zero(n, dim);

  // Genres: multi-hot divided by sqrt(count), so that every item with genres has a genre
  // vector of length 1 however many genres it lists (a 6-genre movie is not 6x as far out).
  for (int64_t i = 0; i < n; ++i) {
    const auto& gs = data.items[size_t(i)].genres;
    for (int gi : gs) {
      if (gi < 0 || gi >= n_genres) throw std::invalid_argument("build_sids: genre index out of range");
      x(i, gi) = 1.0 / std::sqrt(double(gs.size()));
    }
  }
  // Year: z-score over the items whose year is known; an unknown year sits at the mean (0)
  // and raises a flag column instead, so it neither fakes a year nor goes unnoticed.
  double sum = 0, sum_sq = 0;
  int64_t known = 0;
  for (const auto& it : data.items)
    if (it.year != 0) {
      sum += it.year;
      sum_sq += double(it.year) * it.year;
      ++known;
    }
  const double mean = known ? sum / double(known) : 0.0;
  const double var = known ? std::max(0.0, sum_sq / double(known) - mean * mean) : 0.0;
  const double sd = std::sqrt(var);
  for (int64_t i = 0; i < n; ++i) {
    const int y = data.items[size_t(i)].year;
    if (y == 0) x(i, n_genres + 1) = 1.0;
    else x(i, n_genres) = sd > 0 ? (double(y) - mean) / sd : 0.0;
  }
  x.rightCols(cf.cols()) = cf;

  weigh_block(x, 0, n_genres, opt.genre_weight);
  weigh_block(x, n_genres, 2, opt.year_weight);
  weigh_block(x, n_genres + 2, cf.cols(), opt.cf_weight);
  widths[0] = int(n_genres);
  widths[1] = 2;
  widths[2] = int(cf.cols());
  return x;
}

// Squared distances from every row of x to every row of c: |x|^2 - 2 x.c + |c|^2, one GEMM.
matrix sq_distances(const matrix& x, const matrix& c) {
  matrix d = -2.0 * (x * c.transpose());
  d.colwise() += x.rowwise().squaredNorm();
  d.rowwise() += c.rowwise().squaredNorm().transpose();
  return d;
}

// k-means with k-means++ seeding and Lloyd iterations. Ties go to the lowest index
// everywhere, so the result depends only on x, k, iters and the random stream.
void kmeans(const matrix& x, int k, int iters, rng& g, matrix& centroids, std::vector<int32_t>& assign) {
  const int64_t n = x.rows();
  centroids = matrix::Zero(k, x.cols());
  assign.assign(size_t(n), 0);
  if (n == 0) return;

  // k-means++: the first centre uniformly, each next one with probability proportional to
  // the squared distance to the nearest centre so far. When every point already sits on a
  // centre (fewer distinct points than k), take the next point not yet chosen, in index
  // order, and once all have been chosen repeat them: duplicate centres stay empty, and the
  // collision step gives those items distinct codes anyway.
  std::vector<char> chosen(size_t(n), 0);
  std::vector<double> d2(size_t(n), std::numeric_limits<double>::infinity());
  int64_t pick = std::min<int64_t>(int64_t(g.uniform() * double(n)), n - 1);
  for (int c = 0; c < k; ++c) {
    if (c > 0) {
      double total = 0;
      for (double v : d2) total += v;
      pick = -1;
      if (total > 0) {
        const double target = g.uniform() * total;
        double acc = 0;
        for (int64_t i = 0; i < n; ++i) {
          acc += d2[size_t(i)];
          if (d2[size_t(i)] > 0 && acc > target) {
            pick = i;
            break;
          }
        }
        // Rounding can leave acc a hair below target at the end: take the last candidate.
        if (pick < 0)
          for (int64_t i = n - 1; i >= 0 && pick < 0; --i)
            if (d2[size_t(i)] > 0) pick = i;
      } else {
        for (int64_t i = 0; i < n && pick < 0; ++i)
          if (!chosen[size_t(i)]) pick = i;
        if (pick < 0) pick = c % n;
      }
    }
    chosen[size_t(pick)] = 1;
    centroids.row(c) = x.row(pick);
    for (int64_t i = 0; i < n; ++i) d2[size_t(i)] = std::min(d2[size_t(i)], (x.row(i) - x.row(pick)).squaredNorm());
  }

  std::vector<double> best(static_cast<size_t>(n));
  std::vector<int32_t> prev;
  for (int it = 0;; ++it) {
    const matrix d = sq_distances(x, centroids);
    for (int64_t i = 0; i < n; ++i) {
      int32_t arg = 0;
      for (int c = 1; c < k; ++c)
        if (d(i, c) < d(i, arg)) arg = c;
      assign[size_t(i)] = arg;
      best[size_t(i)] = d(i, arg);
    }
    if (it >= iters || assign == prev) break;
    prev = assign;

    std::vector<int64_t> count(size_t(k), 0);
    matrix sum = matrix::Zero(k, x.cols());
    for (int64_t i = 0; i < n; ++i) {
      sum.row(assign[size_t(i)]) += x.row(i);
      ++count[size_t(assign[size_t(i)])];
    }
    // An empty cluster takes the point worst served by its own centre (largest squared
    // distance, lowest index on ties) from a cluster that keeps at least one point; the
    // point moves with it so the counts stay right. With no such point the centre stays.
    std::vector<char> taken(size_t(n), 0);
    for (int c = 0; c < k; ++c) {
      if (count[size_t(c)] > 0) continue;
      int64_t far = -1;
      for (int64_t i = 0; i < n; ++i)
        if (!taken[size_t(i)] && count[size_t(assign[size_t(i)])] >= 2 && (far < 0 || best[size_t(i)] > best[size_t(far)]))
          far = i;
      if (far < 0) continue;
      taken[size_t(far)] = 1;
      const int32_t from = assign[size_t(far)];
      sum.row(from) -= x.row(far);
      --count[size_t(from)];
      sum.row(c) = x.row(far);
      count[size_t(c)] = 1;
      assign[size_t(far)] = c;
      best[size_t(far)] = 0;
    }
    for (int c = 0; c < k; ++c)
      if (count[size_t(c)] > 0) centroids.row(c) = sum.row(c) / double(count[size_t(c)]);
  }
}

// c^e, saturated: only compared against item counts, so "more than any count" is enough.
int64_t capacity(int64_t c, int64_t e) {
  int64_t r = 1;
  for (int64_t i = 0; i < e; ++i) {
    if (r > std::numeric_limits<int64_t>::max() / c) return std::numeric_limits<int64_t>::max();
    r *= c;
  }
  return r;
}

// Which codes are taken: how many items sit under every prefix (lengths 0..levels).
class occupancy {
 public:
  occupancy(int levels, int codes) : levels_(levels), codes_(codes) {}
  int64_t under(const std::vector<int32_t>& prefix) const {
    auto f = count_.find(prefix);
    return f == count_.end() ? 0 : f->second;
  }
  bool full(const std::vector<int32_t>& prefix) const {
    return under(prefix) >= capacity(codes_, levels_ - int64_t(prefix.size()));
  }
  void claim(const std::vector<int32_t>& code) {
    std::vector<int32_t> p;
    ++count_[p];
    for (int32_t c : code) {
      p.push_back(c);
      ++count_[p];
    }
  }

 private:
  int levels_, codes_;
  std::map<std::vector<int32_t>, int64_t> count_;
};

// Depth-first search for the free full code under `prefix` whose reconstruction is nearest:
// `residual` is x minus the centroids of `prefix`; each level subtracts the candidate's
// centroid; full subtrees are skipped. Strict < keeps the lexicographically first code on
// ties, since codes are visited in increasing order.
void nearest_free(const std::vector<matrix>& cent, const occupancy& occ, std::vector<int32_t>& prefix,
                  const Eigen::RowVectorXd& residual, double& best_cost, std::vector<int32_t>& best_code) {
  const size_t level = prefix.size();
  if (level == cent.size()) {
    const double cost = residual.squaredNorm();
    if (cost < best_cost) {
      best_cost = cost;
      best_code = prefix;
    }
    return;
  }
  for (int32_t c = 0; c < int32_t(cent[level].rows()); ++c) {
    prefix.push_back(c);
    if (!occ.full(prefix)) nearest_free(cent, occ, prefix, residual - cent[level].row(c), best_cost, best_code);
    prefix.pop_back();
  }
}

}  // namespace

item_features make_item_features(const dataset& data, const split& sp, const sid_options& opt) {
  rng g(opt.seed);
  int widths[3] = {0, 0, 0};
  const matrix x = features(data, sp, opt, g, widths);
  item_features f;
  f.n = x.rows();
  f.dim = int(x.cols());
  f.genre_cols = widths[0];
  f.year_cols = widths[1];
  f.cf_cols = widths[2];
  f.v.assign(x.data(), x.data() + x.size());
  return f;
}

sid_table build_sids(const dataset& data, const split& sp, const sid_options& opt) {
  if (opt.levels < 1) throw std::invalid_argument("build_sids: levels must be >= 1, got " + std::to_string(opt.levels));
  if (opt.codes < 2) throw std::invalid_argument("build_sids: codes must be >= 2, got " + std::to_string(opt.codes));
  if (opt.kmeans_iters < 0 || opt.svd_dim < 0)
    throw std::invalid_argument("build_sids: kmeans_iters and svd_dim must be >= 0");
  if (!(opt.genre_weight >= 0 && opt.year_weight >= 0 && opt.cf_weight >= 0))
    throw std::invalid_argument("build_sids: block weights must be >= 0");
  const int64_t n = int64_t(data.items.size());
  const int L = opt.levels, C = opt.codes;
  if (capacity(C, L) < n)
    throw std::invalid_argument("build_sids: " + std::to_string(C) + "^" + std::to_string(L) +
                                " codes cannot name " + std::to_string(n) + " items");

  sid_table t;
  t.levels = L;
  t.codes = C;
  t.code.assign(size_t(n) * size_t(L), 0);
  t.stats.codebook_usage.assign(size_t(L), 0.0);
  t.stats.quantization_error.assign(size_t(L), 0.0);
  if (n == 0) return t;

  rng g(opt.seed);
  int widths[3];
  const matrix x = features(data, sp, opt, g, widths);
  t.stats.input_energy = x.squaredNorm() / double(n);

  // Residual k-means: level l clusters the residuals levels 0..l-1 left.
  std::vector<matrix> cent(static_cast<size_t>(L));
  std::vector<std::vector<int32_t>> raw(static_cast<size_t>(L));
  matrix residual = x;
  for (int l = 0; l < L; ++l) {
    kmeans(residual, C, opt.kmeans_iters, g, cent[size_t(l)], raw[size_t(l)]);
    for (int64_t i = 0; i < n; ++i) residual.row(i) -= cent[size_t(l)].row(raw[size_t(l)][size_t(i)]);
  }

  // Collision resolution. The rule, exactly:
  //  (a) Items are grouped by raw code. In each group the item whose raw code reconstructs
  //      it best (smallest |x - sum of its L centroids|^2, lowest item index on ties) keeps
  //      the code; every owner claims its code first.
  //  (b) The other items move, one at a time in increasing item index. A moving item with
  //      raw code (c_0 .. c_{L-1}) looks for a free full code under the prefix
  //      (c_0 .. c_{m-1}) for m = L-1, L-2, .., 0, stopping at the first m with a free code:
  //      it first tries the other last-level codes under its own (L-1)-prefix, and only when
  //      that prefix is full does the search widen to its (L-2)-prefix, and so on.
  //  (c) Among the free codes under that prefix it takes the one with the smallest
  //      reconstruction error |x - sum of the code's L centroids|^2 (the first in
  //      lexicographic order on ties). With m = L-1 this is the free last-level code whose
  //      centroid is nearest the item's last-level residual; with m < L-1 it picks the
  //      next-best prefix and the slot under it jointly.
  // A free code always exists because codes^levels >= items (checked above).
  std::vector<double> raw_error(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) raw_error[size_t(i)] = residual.row(i).squaredNorm();
  std::map<std::vector<int32_t>, int32_t> owner;
  std::vector<std::vector<int32_t>> raw_code(static_cast<size_t>(n), std::vector<int32_t>(static_cast<size_t>(L)));
  for (int64_t i = 0; i < n; ++i) {
    for (int l = 0; l < L; ++l) raw_code[size_t(i)][size_t(l)] = raw[size_t(l)][size_t(i)];
    auto ins = owner.emplace(raw_code[size_t(i)], int32_t(i));
    if (!ins.second && raw_error[size_t(i)] < raw_error[size_t(ins.first->second)]) ins.first->second = int32_t(i);
  }
  occupancy occ(L, C);
  std::vector<char> moves(size_t(n), 1);
  for (const auto& kv : owner) {
    occ.claim(kv.first);
    moves[size_t(kv.second)] = 0;
  }
  std::vector<std::vector<int32_t>> final_code = raw_code;
  for (int64_t i = 0; i < n; ++i) {
    if (!moves[size_t(i)]) continue;
    ++t.stats.reassigned;
    const auto& rc = raw_code[size_t(i)];
    std::vector<int32_t> best_code;
    for (int m = L - 1; m >= 0 && best_code.empty(); --m) {
      std::vector<int32_t> prefix(rc.begin(), rc.begin() + m);
      if (occ.full(prefix)) continue;
      Eigen::RowVectorXd r = x.row(i);
      for (int l = 0; l < m; ++l) r -= cent[size_t(l)].row(rc[size_t(l)]);
      double best_cost = std::numeric_limits<double>::infinity();
      nearest_free(cent, occ, prefix, r, best_cost, best_code);
    }
    if (best_code.empty()) throw std::logic_error("build_sids: no free code (capacity check is wrong)");
    if (!std::equal(rc.begin(), rc.end() - 1, best_code.begin())) ++t.stats.left_prefix;
    occ.claim(best_code);
    final_code[size_t(i)] = best_code;
  }
  t.stats.collision_rate = double(t.stats.reassigned) / double(n);

  // Stats on the final codes.
  for (int64_t i = 0; i < n; ++i)
    for (int l = 0; l < L; ++l) t.code[size_t(i) * size_t(L) + size_t(l)] = final_code[size_t(i)][size_t(l)];
  matrix r = x;
  for (int l = 0; l < L; ++l) {
    std::vector<char> used(size_t(C), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = final_code[size_t(i)][size_t(l)];
      used[size_t(c)] = 1;
      r.row(i) -= cent[size_t(l)].row(c);
    }
    int64_t n_used = 0;
    for (char u : used) n_used += u;
    t.stats.codebook_usage[size_t(l)] = double(n_used) / double(C);
    t.stats.quantization_error[size_t(l)] = r.squaredNorm() / double(n);
  }
  return t;
}

sid_trie::sid_trie(const sid_table& sids) : levels_(sids.levels) {
  if (sids.levels < 1 || sids.code.size() % size_t(sids.levels) != 0)
    throw std::invalid_argument("sid_trie: malformed sid_table");
  const int64_t n = sids.n_items();
  std::vector<int32_t> p;
  for (int64_t i = 0; i < n; ++i) {
    p.clear();
    under_[p].push_back(int32_t(i));
    for (int l = 0; l < levels_; ++l) {
      const int32_t c = sids.at(int32_t(i), l);
      if (c < 0 || c >= sids.codes)
        throw std::invalid_argument("sid_trie: item " + std::to_string(i) + " has code " + std::to_string(c) +
                                    " at level " + std::to_string(l) + ", outside [0, " + std::to_string(sids.codes) + ")");
      auto& nx = next_[p];
      if (std::find(nx.begin(), nx.end(), c) == nx.end()) nx.push_back(c);
      p.push_back(c);
      under_[p].push_back(int32_t(i));
    }
    auto ins = item_.emplace(p, int32_t(i));
    if (!ins.second)
      throw std::invalid_argument("sid_trie: items " + std::to_string(ins.first->second) + " and " +
                                  std::to_string(i) + " share a semantic ID");
  }
  for (auto& kv : next_) std::sort(kv.second.begin(), kv.second.end());
}

const std::vector<int32_t>& sid_trie::next(const std::vector<int32_t>& prefix) const {
  if (prefix.size() >= size_t(levels_)) return empty_;
  auto f = next_.find(prefix);
  return f == next_.end() ? empty_ : f->second;
}

int32_t sid_trie::item(const std::vector<int32_t>& code) const {
  auto f = item_.find(code);
  return f == item_.end() ? -1 : f->second;
}

const std::vector<int32_t>& sid_trie::items_under(const std::vector<int32_t>& prefix) const {
  auto f = under_.find(prefix);
  return f == under_.end() ? empty_ : f->second;
}

}  // namespace rec
