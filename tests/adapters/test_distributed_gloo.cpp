// adapters/torch/sapo/distributed.hpp with real processes: two ranks forked on this machine,
// each with a c10d::ProcessGroupGloo on 127.0.0.1 meeting through a FileStore in a temporary
// folder. Both build the same random batch from one seed, take their rows of it (groups
// straddle the ranks), and check that the distributed advantages, the loss (summed over
// the ranks through the process group) and the gradient rows equal the single-process
// results of sapo::libtorch::group_advantages / policy_loss on the whole batch.
//
// A plain program: exit 0 when both ranks pass, 1 on a failure, 77 (skipped) when this
// machine cannot open a gloo device on 127.0.0.1.
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <sapo/distributed.hpp>
#include <torch/version.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace sl = sapo::libtorch;
constexpr int world = 2;
constexpr int skip_code = 77;

using Gloo = c10::intrusive_ptr<c10d::ProcessGroupGloo>;
// libtorch 1.x: ProcessGroupGloo is a c10d::ProcessGroup, so the ProcessGroup overloads take
// it (tested here); 2.x made it a c10d::Backend, which goes through all_reduce_over.
#if TORCH_VERSION_MAJOR < 2
c10::intrusive_ptr<c10d::ProcessGroup> group_of(const Gloo& g) { return g; }
#else
sl::all_reduce_fn group_of(const Gloo& g) { return sl::all_reduce_over(g); }
#endif

int rank_ = -1;
int checks = 0, failures = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (ok) return;
  ++failures;
  std::cerr << "rank " << rank_ << ": FAILED: " << what << std::endl;
}

/// |a - b| <= tol (1 + |b|) everywhere (a and b on the CPU, same shape).
bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  if (a.sizes() != b.sizes()) return false;
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs() <= tol * (1 + y.abs())).all().item<bool>();
}

/// The (6, K) statistics: every row to 1e-12, but advantage_std (row 2) through the
/// variance: it is sqrt(E[A^2] - E[A]^2), whose rounding error is relative to E[A^2]
/// (<= max A^2), and the ranks sum in another order.
bool same_stats(const at::Tensor& got, const at::Tensor& want, const at::Tensor& adv) {
  if (got.sizes() != want.sizes()) return false;
  const double max_a2 = adv.numel() ? adv.to(at::kDouble).pow(2).max().item<double>() : 0.0;
  const at::Tensor var_got = got[2].pow(2), var_want = want[2].pow(2);
  return close(got.index({at::indexing::Slice(0, 2)}), want.index({at::indexing::Slice(0, 2)}), 1e-12) &&
         close(got.index({at::indexing::Slice(3, 6)}), want.index({at::indexing::Slice(3, 6)}), 0) &&
         ((var_got - var_want).abs() <= 1e-12 * max_a2 + 1e-300).all().item<bool>();
}

/// The shared batch: every process draws the same numbers.
struct Batch {
  int64_t B = 24, K = 3, T = 19, n_groups = 7;
  at::Tensor rewards, ids, owner;           // (B, K) double with NaN; (B) int64; (B) rank of each row
  at::Tensor logp, old_logp, mask, step;    // (B, T)
};

Batch make_batch() {
  Batch b;
  std::mt19937_64 rng(20260105);
  std::uniform_int_distribution<int> level(0, 2);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<double> r(size_t(b.B * b.K));
  for (auto& x : r) x = u(rng) < 0.15 ? std::nan("") : u(rng) < 0.3 ? 3 * u(rng) - 1 : 0.5 * level(rng);
  // Unequal groups: group 5 a singleton, group 6 empty, the rest random; rows alternate
  // ranks at random, so most groups straddle them.
  std::vector<int64_t> ids(size_t(b.B)), owner(size_t(b.B));
  for (int64_t i = 0; i < b.B; ++i) {
    ids[size_t(i)] = i == 7 ? 5 : static_cast<int64_t>(rng() % 5);
    owner[size_t(i)] = static_cast<int64_t>(rng() % world);
  }
  owner[0] = 0;  // each rank holds at least one row
  owner[1] = 1;
  b.rewards = at::from_blob(r.data(), {b.B, b.K}, at::kDouble).clone();
  b.ids = at::from_blob(ids.data(), {b.B}, at::kLong).clone();
  b.owner = at::from_blob(owner.data(), {b.B}, at::kLong).clone();

  std::vector<double> lp(size_t(b.B * b.T)), old(size_t(b.B * b.T));
  std::vector<int32_t> st(size_t(b.B * b.T), -1);
  std::vector<uint8_t> m(size_t(b.B * b.T), 0);
  for (int64_t i = 0; i < b.B; ++i) {
    const int64_t start = static_cast<int64_t>(rng() % 4), len = i == 3 ? 0 : 1 + static_cast<int64_t>(rng() % 14);
    int64_t s = 0;
    for (int64_t t = 0; t < b.T; ++t) {
      const size_t j = size_t(i * b.T + t);
      lp[j] = -4 * u(rng) - 0.05;
      old[j] = lp[j] + 0.3 * (u(rng) - 0.5);
      if (t < start || t >= start + len) continue;
      m[j] = 1;
      if (s < b.K && u(rng) < 0.3) ++s;  // steps advance along the response
      st[j] = s < b.K ? static_cast<int32_t>(s) : -1;
    }
  }
  b.logp = at::from_blob(lp.data(), {b.B, b.T}, at::kDouble).clone();
  b.old_logp = at::from_blob(old.data(), {b.B, b.T}, at::kDouble).clone();
  b.step = at::from_blob(st.data(), {b.B, b.T}, at::kInt).clone();
  b.mask = at::from_blob(m.data(), {b.B, b.T}, at::kBool).clone();
  return b;
}

void check_advantages(const Batch& b, const Gloo& pg) {
  const at::Tensor mine = (b.owner == rank_).nonzero().squeeze(1);
  for (auto norm : {sapo::normalization::std, sapo::normalization::std_floor, sapo::normalization::none,
                    sapo::normalization::loo, sapo::normalization::batch_std})
    for (bool unbiased : {true, false}) {
      sapo::advantage_options o;
      o.norm = norm;
      o.unbiased_std = unbiased;
      o.singleton = unbiased ? sapo::singleton_policy::zero : sapo::singleton_policy::raw;
      o.eps = 1e-3;
      const std::string what = "norm " + std::to_string(static_cast<int>(norm)) + (unbiased ? " unbiased" : " biased");

      // Explicit ids, rows scattered over the ranks.
      const sl::advantage_result single = sl::group_advantages(b.rewards, b.ids, b.n_groups, o);
      const sl::advantage_result dist = sl::distributed_group_advantages(
          b.rewards.index_select(0, mine), b.ids.index_select(0, mine), b.n_groups, o, group_of(pg));
      check(close(dist.adv, single.adv.index_select(0, mine), 1e-12), "explicit ids, advantages, " + what);
      check(same_stats(dist.stats, single.stats, single.adv), "explicit ids, statistics, " + what);

      // float32 rewards: float advantages, one float rounding apart at most.
      const sl::advantage_result single_f = sl::group_advantages(b.rewards.to(at::kFloat), b.ids, b.n_groups, o);
      const sl::advantage_result dist_f = sl::distributed_group_advantages(
          b.rewards.to(at::kFloat).index_select(0, mine), b.ids.index_select(0, mine), b.n_groups, o,
          sl::all_reduce_over(pg));
      check(dist_f.adv.scalar_type() == at::kFloat && close(dist_f.adv, single_f.adv.index_select(0, mine), 1e-6),
            "float32 advantages, " + what);

      // Contiguous groups of 4 over 24 rows: rank 0 holds rows [0, 10), rank 1 [10, 24),
      // so group 2 (rows 8-11) straddles the cut.
      const int64_t cut = 10, first = rank_ == 0 ? 0 : cut, count = rank_ == 0 ? cut : b.B - cut;
      const sl::advantage_result single_c = sl::group_advantages(b.rewards, 4, o);
      const sl::advantage_result dist_c =
          sl::distributed_group_advantages(b.rewards.narrow(0, first, count), 4, first, b.B / 4, o, group_of(pg));
      check(close(dist_c.adv, single_c.adv.narrow(0, first, count), 1e-12), "contiguous, advantages, " + what);
      check(same_stats(dist_c.stats, single_c.stats, single_c.adv), "contiguous, statistics, " + what);
    }

  // Outcome mode, and a rank without rows (rank 1 holds everything).
  const at::Tensor r1 = b.rewards.select(1, 0).contiguous();
  const sl::advantage_result single_o = sl::outcome_advantages(r1, b.ids, b.n_groups);
  const sl::advantage_result dist_o =
      sl::distributed_outcome_advantages(r1.index_select(0, mine), b.ids.index_select(0, mine), b.n_groups, {},
                                         group_of(pg));
  check(close(dist_o.adv, single_o.adv.index_select(0, mine), 1e-12), "outcome advantages");
  const int64_t rows = rank_ == 1 ? b.B : 0;
  const sl::advantage_result dist_e = sl::distributed_group_advantages(
      b.rewards.narrow(0, 0, rows), b.ids.narrow(0, 0, rows), b.n_groups, {}, sl::all_reduce_over(pg));
  const sl::advantage_result single_e = sl::group_advantages(b.rewards, b.ids, b.n_groups);
  check(dist_e.adv.size(0) == rows && close(dist_e.adv, single_e.adv.narrow(0, 0, rows), 1e-12),
        "empty rank 0, advantages");
  check(same_stats(dist_e.stats, single_e.stats, single_e.adv), "empty rank 0, statistics");
}

void check_loss(const Batch& b, const Gloo& pg) {
  const at::Tensor mine = (b.owner == rank_).nonzero().squeeze(1);
  // The step advantages of the pipeline: distributed ones on the ranks, the whole batch's
  // in the single process.
  const at::Tensor adv_all = sl::group_advantages(b.rewards, b.ids, b.n_groups).adv;
  const at::Tensor adv_mine =
      sl::distributed_group_advantages(b.rewards.index_select(0, mine), b.ids.index_select(0, mine), b.n_groups, {},
                                       group_of(pg))
          .adv;
  std::vector<sapo::loss_options> cases;
  for (auto agg : {sapo::aggregation::token_mean, sapo::aggregation::seq_mean_token_mean,
                   sapo::aggregation::seq_mean_token_sum, sapo::aggregation::seq_mean_token_sum_norm,
                   sapo::aggregation::step_mean})
    for (auto ratio : {sapo::ratio_level::token, sapo::ratio_level::step}) {
      sapo::loss_options o;
      o.agg = agg;
      o.ratio = ratio;
      cases.push_back(o);
    }
  // nonfinite_policy::mask drops tokens, which only a pass of the loss knows: the counts
  // come from a local forward pass then. One NaN logp on each rank (rows 0 and 1).
  cases.push_back(cases.back());
  cases.back().nonfinite = sapo::nonfinite_policy::mask;
  for (const sapo::loss_options& o : cases) {
    {
      const bool drop = o.nonfinite == sapo::nonfinite_policy::mask;
      const std::string what = "agg " + std::to_string(static_cast<int>(o.agg)) + ", ratio " +
                               std::to_string(static_cast<int>(o.ratio)) + (drop ? ", nonfinite mask" : "");
      at::Tensor logp = b.logp.clone();
      if (drop)
        for (int64_t i : {0, 1}) logp[i][b.mask[i].nonzero()[0][0].item<int64_t>()] = std::nan("");

      sl::loss_inputs all;
      all.logp = logp.clone().requires_grad_(true);
      all.old_logp = b.old_logp;
      all.mask = b.mask;
      all.step = b.step;
      all.step_advantages = adv_all;
      const sl::policy_loss_output single = sl::policy_loss(all, o);
      single.loss.backward();

      sl::loss_inputs part;
      part.logp = logp.index_select(0, mine).requires_grad_(true);
      part.old_logp = b.old_logp.index_select(0, mine);
      part.mask = b.mask.index_select(0, mine);
      part.step = b.step.index_select(0, mine);
      part.step_advantages = adv_mine;
      const sl::policy_loss_output dist = sl::distributed_policy_loss(part, o, group_of(pg));
      dist.loss.backward();

      // The rank losses add up to the whole batch's loss (summed through the process group).
      std::vector<at::Tensor> total{dist.loss.detach().reshape({1}).clone()};
      pg->allreduce(total)->wait();
      check(close(total[0], single.loss.detach().reshape({1}), 1e-12), "loss sum over ranks, " + what);
      check(close(part.logp.grad().nan_to_num(0), all.logp.grad().index_select(0, mine).nan_to_num(0), 1e-12),
            "gradient rows, " + what);
      check(!drop || dist.result().n_nonfinite_masked == 1, "one token dropped on this rank, " + what);
    }
  }
}

/// A bad input on one rank raises on both, and the group stays usable: nobody waits.
void check_errors(const Batch& b, const Gloo& pg) {
  at::Tensor r = b.rewards.clone();
  if (rank_ == 1) r[2][1] = std::numeric_limits<double>::infinity();
  bool raised = false;
  std::string message;
  try {
    sl::distributed_group_advantages(r, b.ids, b.n_groups, {}, group_of(pg));
  } catch (const c10::Error& e) {
    raised = true;
    message = e.what();
  }
  check(raised, "an Inf reward on rank 1 raises on rank " + std::to_string(rank_));
  check(message.find(rank_ == 1 ? "rewards" : "other rank") != std::string::npos,
        "the message names the cause or the other rank: " + message);

  sl::loss_inputs in;
  in.logp = b.logp;
  in.old_logp = b.old_logp;
  in.mask = rank_ == 0 ? b.mask.to(at::kInt) * 2 : b.mask;  // 2 is not a mask value
  in.step = b.step;
  raised = false;
  try {
    sl::distributed_loss_counts(in, {}, sl::all_reduce_over(pg));
  } catch (const c10::Error&) {
    raised = true;
  }
  check(raised, "a bad mask on rank 0 raises on rank " + std::to_string(rank_));

  // Both ranks made the same collectives: one more all-reduce still pairs up.
  std::vector<at::Tensor> one{at::ones({1}, at::kDouble)};
  pg->allreduce(one)->wait();
  check(one[0].item<double>() == world, "the process group is still in step");
}

int run_rank(int rank, const std::string& store_path) {
  rank_ = rank;
  at::set_num_threads(1);  // two processes on a small machine
  std::shared_ptr<::gloo::transport::Device> device;
  try {
    device = c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  } catch (const std::exception& e) {
    std::cerr << "rank " << rank << ": no gloo device on 127.0.0.1 (" << e.what() << "): skipped" << std::endl;
    return skip_code;
  }
  auto store = c10::make_intrusive<c10d::FileStore>(store_path, world);
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  options->devices.push_back(device);
  const Gloo pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);

  const Batch b = make_batch();
  try {
    check_advantages(b, pg);
    check_loss(b, pg);
    check_errors(b, pg);
  } catch (const std::exception& e) {
    check(false, std::string("unexpected exception: ") + e.what());
  }
  std::cout << "rank " << rank << ": " << checks << " checks, " << failures << " failed" << std::endl;
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main() {
  char dir[] = "/tmp/sapo_gloo_XXXXXX";
  if (mkdtemp(dir) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string store_path = std::string(dir) + "/store";
  // Fork before this process touches torch (no thread pools exist yet to be lost).
  std::vector<pid_t> kids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fork");
      return 1;
    }
    if (pid == 0) {
      const int code = run_rank(r, store_path);
      std::fflush(nullptr);
      _exit(code);
    }
    kids.push_back(pid);
  }
  // Wait for both, at most 240 s (the store and gloo have 60 s timeouts of their own).
  std::vector<int> codes(kids.size(), -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  size_t done = 0;
  while (done < kids.size() && std::chrono::steady_clock::now() < deadline) {
    for (size_t r = 0; r < kids.size(); ++r) {
      if (codes[r] != -1) continue;
      int status = 0;
      if (waitpid(kids[r], &status, WNOHANG) == kids[r]) {
        codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        ++done;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (size_t r = 0; r < kids.size(); ++r)
    if (codes[r] == -1) {
      std::cerr << "rank " << r << " timed out" << std::endl;
      kill(kids[r], SIGKILL);
      waitpid(kids[r], nullptr, 0);
      codes[r] = 1;
    }
  std::remove(store_path.c_str());
  rmdir(dir);
  bool skipped = false, failed = false;
  for (int c : codes) {
    skipped = skipped || c == skip_code;
    failed = failed || (c != 0 && c != skip_code);
  }
  if (failed) return 1;
  return skipped ? skip_code : 0;
}
