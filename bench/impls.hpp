// The implementations that need no libtorch: sapo (the library), the plain reference of
// tests/reference, and the memory-bandwidth rooflines. Each "runner" owns nothing large
// but its outputs and has a run(threads) that does one call.
#pragma once

#include <sapo/sapo.hpp>

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "problems.hpp"
#include "reference/reference.hpp"

namespace sapo_bench {
// The runners call sapo's entry points, which differ by translation unit: bench_*.cpp take the
// direct path compiled with -march=native, dispatched.cpp the runtime dispatch of the compiled
// artefacts. A namespace per kind keeps the two sets of runners apart (simd.hpp).
inline namespace SAPO_ENTRY_NAMESPACE {

// ------------------------------------------------------------------ threads for the rooflines

/// Fewest tokens worth a thread of its own: below this, starting a thread (tens of
/// microseconds) costs more than it saves, so a roofline never gets slower with threads.
constexpr int64_t roofline_grain_tokens = int64_t(1) << 18;

/// f(row_begin, row_end) over up to `threads` contiguous row blocks (at least
/// roofline_grain_tokens tokens each); the caller runs the first. Threads are started per
/// call, as a header-only library would.
template <class F>
void parallel_rows(int threads, int64_t rows, int64_t cols, F&& f) {
  const int64_t useful = std::max<int64_t>(1, rows * cols / roofline_grain_tokens);
  const int64_t n = std::min<int64_t>({static_cast<int64_t>(threads), rows, useful});
  if (n <= 1) {
    f(int64_t(0), rows);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  for (int64_t w = 1; w < n; ++w) pool.emplace_back([&f, w, n, rows] { f(rows * w / n, rows * (w + 1) / n); });
  f(int64_t(0), rows / n);
  for (auto& th : pool) th.join();
}

// ------------------------------------------------------------------ policy loss

inline sapo::loss_options loss_options_for(bool step_kl, int threads) {
  sapo::loss_options o;  // defaults: token ratio, clip 0.2, token_mean
  o.num_threads = threads;
  if (step_kl) {
    o.ratio = sapo::ratio_level::step;
    o.agg = sapo::aggregation::step_mean;
    o.kl = sapo::kl_estimator::k3;
    o.kl_coef = 0.01;
  }
  return o;
}

/// sapo: one fused forward + backward call, grad written into the problem's buffer.
struct SapoLoss {
  LossProblem& p;
  bool step_kl;
  double run(int threads) {
    const int64_t B = p.shape.B, T = p.shape.T, K = p.shape.K;
    sapo::policy_inputs<float> in;
    in.logp = {p.logp.data(), B, T};
    in.old_logp = {p.old_logp.data(), B, T};
    if (step_kl) in.ref_logp = {p.ref_logp.data(), B, T};
    in.step = {p.step.data(), B, T};
    in.step_advantages = {p.step_adv.data(), B, K};
    in.mask = {p.mask.data(), B, T};
    const sapo::loss_result r = sapo::policy_loss(in, loss_options_for(step_kl, threads),
                                                  sapo::mat_view<float>(p.grad.data(), B, T));
    return r.loss;
  }
};

/// The reference's inputs as nested double vectors, made once outside the timing.
struct RefLossInputs {
  sapo_ref::Matrix logp, old_logp, ref_logp, step_adv;
  sapo_ref::IntMatrix step, mask;
};

inline sapo_ref::Matrix to_nested(const float* x, int64_t rows, int64_t cols) {
  sapo_ref::Matrix m(static_cast<size_t>(rows), std::vector<double>(static_cast<size_t>(cols)));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m[size_t(i)][size_t(j)] = x[i * cols + j];
  return m;
}
template <class I>
sapo_ref::IntMatrix to_nested_int(const I* x, int64_t rows, int64_t cols) {
  sapo_ref::IntMatrix m(static_cast<size_t>(rows), std::vector<int64_t>(static_cast<size_t>(cols)));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m[size_t(i)][size_t(j)] = static_cast<int64_t>(x[i * cols + j]);
  return m;
}

inline RefLossInputs make_ref_loss_inputs(const LossProblem& p) {
  const int64_t B = p.shape.B, T = p.shape.T, K = p.shape.K;
  RefLossInputs r;
  r.logp = to_nested(p.logp.data(), B, T);
  r.old_logp = to_nested(p.old_logp.data(), B, T);
  r.ref_logp = to_nested(p.ref_logp.data(), B, T);
  r.step_adv = to_nested(p.step_adv.data(), B, K);
  r.step = to_nested_int(p.step.data(), B, T);
  r.mask = to_nested_int(p.mask.data(), B, T);
  return r;
}

inline sapo_ref::LossConfig ref_loss_config(bool step_kl) {
  sapo_ref::LossConfig c;
  if (step_kl) {
    c.ratio = sapo_ref::Ratio::step;
    c.agg = sapo_ref::Agg::step_mean;
    c.kl = sapo_ref::KL::k3;
    c.kl_coef = 0.01;
  }
  return c;
}

/// reference: the reference takes token advantages, so one call is broadcast + policy_loss.
inline sapo_ref::LossResult reference_loss(const RefLossInputs& r, bool step_kl) {
  static const sapo_ref::Matrix none;
  const sapo_ref::Matrix token_adv = sapo_ref::broadcast(r.step_adv, r.step, r.mask);
  return sapo_ref::policy_loss(r.logp, r.old_logp, step_kl ? r.ref_logp : none, token_adv, r.step, r.mask,
                               ref_loss_config(step_kl));
}

/// roofline: read every input of the fused kernel once, write grad once, no math.
/// roofline_2pass: first a read-only pass over the same inputs (sapo validates everything
/// before it writes anything), then the roofline pass.
struct LossRoofline {
  LossProblem& p;
  bool with_ref;
  bool two_pass;
  uint32_t run(int threads) {
    const int64_t B = p.shape.B, T = p.shape.T, K = p.shape.K;
    const float *lp = p.logp.data(), *old = p.old_logp.data(), *ref = p.ref_logp.data(), *m = p.mask.data(),
                *A = p.step_adv.data();
    const int32_t* st = p.step.data();
    float* g = p.grad.data();
    std::vector<uint32_t> seen(static_cast<size_t>(B), 0);
    if (two_pass) {
      // Read-only: OR the bit patterns (vectorizes without reassociating floats).
      parallel_rows(threads, B, T, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          uint32_t acc = 0;
          const auto* a = reinterpret_cast<const uint32_t*>(lp + i * T);
          const auto* b = reinterpret_cast<const uint32_t*>(old + i * T);
          const auto* c = reinterpret_cast<const uint32_t*>(m + i * T);
          const auto* d = reinterpret_cast<const uint32_t*>(st + i * T);
          const auto* e = reinterpret_cast<const uint32_t*>(ref + i * T);
          if (with_ref)
            for (int64_t t = 0; t < T; ++t) acc |= a[t] | b[t] | c[t] | d[t] | e[t];
          else
            for (int64_t t = 0; t < T; ++t) acc |= a[t] | b[t] | c[t] | d[t];
          for (int64_t k = 0; k < K; ++k) acc |= reinterpret_cast<const uint32_t*>(A)[i * K + k];
          seen[static_cast<size_t>(i)] = acc;
        }
      });
    }
    parallel_rows(threads, B, T, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t o = i * T;
        const float a = A[i * K];
        if (with_ref)
          for (int64_t t = 0; t < T; ++t) g[o + t] = lp[o + t] + old[o + t] + m[o + t] + float(st[o + t]) + ref[o + t] + a;
        else
          for (int64_t t = 0; t < T; ++t) g[o + t] = lp[o + t] + old[o + t] + m[o + t] + float(st[o + t]) + a;
      }
    });
    uint32_t all = 0;
    for (uint32_t v : seen) all |= v;
    return all;
  }
};

// ------------------------------------------------------------------ advantage pipeline

inline sapo::segment_options segment_options_for(int64_t K, int threads) {
  sapo::segment_options o;
  o.num_steps = K;
  o.layout = sapo::step_layout::interleaved;
  for (int64_t k = 0; k < K; ++k) o.sid_ranges.push_back({Vocab::sid_lo(k), Vocab::sid_lo(k) + Vocab::codes});
  o.num_threads = threads;
  return o;
}

}  // namespace SAPO_ENTRY_NAMESPACE

/// Outputs of the pipeline, shared by sapo and the roofline (caller-owned, as sapo wants).
/// One type for every translation unit (dispatched.hpp passes it across).
struct AdvOutputs {
  Buffer<int32_t> step;       // (B, T)
  Buffer<int32_t> n_steps;    // (B)
  Buffer<int64_t> codes;      // (B, K)
  Buffer<uint8_t> malformed;  // (B)
  Buffer<float> rewards;      // (B, K)
  Buffer<float> adv;          // (B, K)
  Buffer<float> token_adv;    // (B, T)
  explicit AdvOutputs(const Shape& s)
      : step(size_t(s.B * s.T)),
        n_steps(size_t(s.B)),
        codes(size_t(s.B * s.K)),
        malformed(size_t(s.B)),
        rewards(size_t(s.B * s.K)),
        adv(size_t(s.B * s.K)),
        token_adv(size_t(s.B * s.T)) {}
};

inline namespace SAPO_ENTRY_NAMESPACE {

/// sapo: segment_steps -> step_rewards(prefix) -> group_advantages(contiguous G); with the
/// broadcast, the one call that does all four (step_advantage_pipeline).
template <class Id>
struct SapoAdvantages {
  const Batch& b;
  AdvOutputs& out;
  bool bcast;
  int64_t run(int threads) {
    const int64_t B = b.shape.B, T = b.shape.T, K = b.shape.K;
    const Id* ids = nullptr;
    if constexpr (sizeof(Id) == 8)
      ids = b.tokens64.data();
    else
      ids = b.tokens32.data();
    const sapo::mat_view<const Id> tokens(ids, B, T);
    const sapo::mat_view<const float> mask(b.mask.data(), B, T);
    const sapo::segment_outputs seg{{out.step.data(), B, T}, {out.n_steps.data(), B}, {out.codes.data(), B, K},
                                    {out.malformed.data(), B}};
    if (bcast) {
      sapo::pipeline_options po;  // prefix rewards; std, unbiased, eps 1e-6
      po.segment = segment_options_for(K, threads);
      const sapo::pipeline_result r = sapo::step_advantage_pipeline(
          tokens, mask, sapo::mat_view<const int64_t>(b.targets.data(), B, K),
          sapo::group_layout::contiguous(b.shape.G), po,
          sapo::pipeline_outputs<float>{seg, {out.rewards.data(), B, K}, {out.adv.data(), B, K},
                                        {out.token_adv.data(), B, T}});
      return r.segment.n_malformed;
    }
    const sapo::segment_stats st = sapo::segment_steps(
        tokens, mask, segment_options_for(K, threads), seg);
    sapo::reward_options ro;  // prefix
    sapo::step_rewards(sapo::mat_view<const int64_t>(out.codes.data(), B, K),
                       sapo::vec_view<const uint8_t>(out.malformed.data(), B),
                       sapo::mat_view<const int64_t>(b.targets.data(), B, K), ro,
                       sapo::mat_view<float>(out.rewards.data(), B, K));
    sapo::advantage_options ao;  // std, unbiased, eps 1e-6
    sapo::group_advantages(sapo::mat_view<const float>(out.rewards.data(), B, K),
                           sapo::group_layout::contiguous(b.shape.G), ao, sapo::mat_view<float>(out.adv.data(), B, K));
    return st.n_malformed;
  }
};

/// The reference's inputs, made once outside the timing.
struct RefAdvInputs {
  sapo_ref::IntMatrix tokens, mask, targets;
  sapo_ref::SegmentConfig seg;
  std::vector<int64_t> group_of;
  int64_t n_groups = 0;
};

inline RefAdvInputs make_ref_adv_inputs(const Batch& b) {
  const int64_t B = b.shape.B, T = b.shape.T, K = b.shape.K;
  RefAdvInputs r;
  r.tokens = to_nested_int(b.tokens64.data(), B, T);
  r.mask = to_nested_int(b.mask.data(), B, T);
  r.targets = to_nested_int(b.targets.data(), B, K);
  r.seg.K = static_cast<int>(K);
  for (int64_t k = 0; k < K; ++k) r.seg.sid_ranges.push_back({Vocab::sid_lo(k), Vocab::sid_lo(k) + Vocab::codes});
  r.group_of.resize(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) r.group_of[size_t(i)] = i / b.shape.G;
  r.n_groups = B / b.shape.G;
  return r;
}

struct RefAdvResult {
  sapo_ref::SegmentResult seg;
  sapo_ref::Matrix adv, token_adv;
};

inline RefAdvResult reference_advantages(const RefAdvInputs& r, bool bcast) {
  RefAdvResult out;
  out.seg = sapo_ref::segment(r.tokens, r.mask, r.seg);
  const sapo_ref::Matrix rewards =
      sapo_ref::step_rewards(out.seg.codes, out.seg.malformed, r.targets, sapo_ref::RewardKind::prefix, {}, 0.0);
  out.adv = sapo_ref::advantages(rewards, r.group_of, r.n_groups, sapo_ref::AdvantageConfig{});
  if (bcast) out.token_adv = sapo_ref::broadcast(out.adv, out.seg.step, r.mask);
  return out;
}

/// roofline: read tokens + mask once, write step ids once (and with the broadcast, the
/// token advantages once), no math.
template <class Id>
struct AdvRoofline {
  const Batch& b;
  AdvOutputs& out;
  bool bcast;
  void run(int threads) {
    const int64_t B = b.shape.B, T = b.shape.T;
    const Id* ids = nullptr;
    if constexpr (sizeof(Id) == 8)
      ids = b.tokens64.data();
    else
      ids = b.tokens32.data();
    const float* m = b.mask.data();
    int32_t* st = out.step.data();
    float* ta = out.token_adv.data();
    parallel_rows(threads, B, T, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t o = i * T;
        if (bcast)
          for (int64_t t = 0; t < T; ++t) {
            st[o + t] = static_cast<int32_t>(ids[o + t]) + static_cast<int32_t>(m[o + t]);
            ta[o + t] = m[o + t];
          }
        else
          for (int64_t t = 0; t < T; ++t) st[o + t] = static_cast<int32_t>(ids[o + t]) + static_cast<int32_t>(m[o + t]);
      }
    });
  }
};

}  // namespace SAPO_ENTRY_NAMESPACE
}  // namespace sapo_bench
