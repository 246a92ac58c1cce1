// The libtorch formulations, op by op with autograd, the way Python trainers (verl, TRL)
// write them. This header keeps libtorch out of the benchmark translation units (its
// headers take ~20 s to compile); torch_impls.cpp is compiled once.
#pragma once

#include <cstdint>
#include <memory>

#include "problems.hpp"

namespace sapo_bench {

/// torch::set_num_threads(n) (intra-op threads).
void torch_set_threads(int n);

/// One call = logp.grad reset (zero_grad(set_to_none=True)), forward, backward.
class TorchLoss {
 public:
  TorchLoss(LossProblem& p, bool step_kl);
  ~TorchLoss();
  double run();
  /// d loss / d logp of the last run (B, T), contiguous float32.
  const float* grad() const;
  /// Frees the outputs of the last run (logp.grad), so a measurement starts without them.
  void release();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// sapo through its LibTorch autograd adapter, as a LibTorch trainer calls it: one call =
/// logp.grad reset, sapo::libtorch::policy_loss (the fused kernel, saving its gradient),
/// loss.backward() (the saved gradient times the incoming one). Inputs wrap the problem's
/// float32 buffers and int32 step ids: no conversion.
class SapoTorchLoss {
 public:
  SapoTorchLoss(LossProblem& p, bool step_kl, int threads);
  ~SapoTorchLoss();
  double run();
  const float* grad() const;
  void release();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// One call = the vectorized pipeline: range masks, cumsum for step ids, scatter for the
/// codes, cumprod for prefix rewards, index_add for the group statistics [, gather for
/// the broadcast].
class TorchAdvantages {
 public:
  TorchAdvantages(const Batch& b, bool int64_ids, bool bcast);
  ~TorchAdvantages();
  void run();
  const int64_t* step() const;       // (B, T) int64
  const float* adv() const;          // (B, K)
  const float* token_adv() const;    // (B, T), only with bcast
  const bool* malformed() const;     // (B)
  void release();                    // frees the outputs of the last run

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Holds one float32 tensor of `bytes` bytes (checks that allocation tracking sees libtorch).
class TorchProbe {
 public:
  explicit TorchProbe(size_t bytes);
  ~TorchProbe();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sapo_bench
