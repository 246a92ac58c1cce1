// libtorch formulations (see torch_impls.hpp). Written as a Python trainer writes them:
// whole-tensor ops, autograd for the gradient, float32 throughout.
#include "torch_impls.hpp"

#include <sapo/torch.hpp>
#include <torch/torch.h>

#include "impls.hpp"

namespace sapo_bench {

void torch_set_threads(int n) { torch::set_num_threads(n); }

namespace {
torch::Tensor wrap(float* p, int64_t r, int64_t c) { return torch::from_blob(p, {r, c}, torch::kFloat32); }
torch::Tensor wrap(const float* p, int64_t r, int64_t c) { return wrap(const_cast<float*>(p), r, c); }
torch::Tensor wrap(const int64_t* p, int64_t r, int64_t c) {
  return torch::from_blob(const_cast<int64_t*>(p), {r, c}, torch::kInt64);
}
torch::Tensor wrap(const int32_t* p, int64_t r, int64_t c) {
  return torch::from_blob(const_cast<int32_t*>(p), {r, c}, torch::kInt32);
}
}  // namespace

// ------------------------------------------------------------------ policy loss

struct TorchLoss::Impl {
  int64_t B, T, K;
  bool step_kl;
  torch::Tensor logp, old_logp, ref_logp, mask, step, A;
};

TorchLoss::TorchLoss(LossProblem& p, bool step_kl) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.B = p.shape.B;
  m.T = p.shape.T;
  m.K = p.shape.K;
  m.step_kl = step_kl;
  // Inputs wrap the problem's buffers (no copy). Step ids come as int64, torch's index
  // dtype, converted once outside the timing.
  m.logp = wrap(p.logp.data(), m.B, m.T).requires_grad_(true);
  m.old_logp = wrap(p.old_logp.data(), m.B, m.T);
  m.ref_logp = wrap(p.ref_logp.data(), m.B, m.T);
  m.mask = wrap(p.mask.data(), m.B, m.T);
  m.step = wrap(p.step64.data(), m.B, m.T);
  m.A = wrap(p.step_adv.data(), m.B, m.K);
}

TorchLoss::~TorchLoss() = default;

const float* TorchLoss::grad() const { return impl_->logp.grad().data_ptr<float>(); }
void TorchLoss::release() { impl_->logp.mutable_grad().reset(); }

double TorchLoss::run() {
  Impl& m = *impl_;
  const double clip = 0.2;
  m.logp.mutable_grad().reset();  // optimizer.zero_grad(set_to_none=True)
  const torch::Tensor& logp = m.logp;

  // Token advantages from the step advantages: A[i, step[i,t]] where step >= 0, else 0.
  const torch::Tensor has_step = m.step.ge(0);
  const torch::Tensor adv = m.A.gather(1, m.step.clamp_min(0)).mul_(has_step);

  // delta = clamp(logp - old, -20, 20), as verl's compute_policy_loss.
  const torch::Tensor delta = (logp - m.old_logp).clamp(-20.0, 20.0);
  torch::Tensor ratio, slot, valid, count;
  if (!m.step_kl) {
    ratio = delta.exp();
  } else {
    // Step ratio in the GSPO-token form: sg(exp(mean delta over the step)) * exp(logp - sg(logp)),
    // the step means by index_add over flat (row, step) slots; tokens without a step keep exp(delta).
    slot = (torch::arange(m.B, torch::kInt64).mul_(m.K).unsqueeze(1) + m.step.clamp_min(0)).view(-1);
    valid = has_step.logical_and(m.mask.gt(0)).to(torch::kFloat32);
    torch::Tensor step_mean_delta;
    {
      torch::NoGradGuard no_grad;
      count = torch::zeros({m.B * m.K}).index_add_(0, slot, valid.view(-1));
      const torch::Tensor sum = torch::zeros({m.B * m.K}).index_add_(0, slot, (delta * valid).view(-1));
      step_mean_delta = (sum / count.clamp_min(1.0)).index_select(0, slot).view({m.B, m.T});
    }
    ratio = torch::where(has_step, logp - logp.detach() + step_mean_delta, delta).exp();
  }

  // Clipped surrogate.
  const torch::Tensor pg1 = -adv * ratio;
  const torch::Tensor pg2 = -adv * ratio.clamp(1.0 - clip, 1.0 + clip);
  torch::Tensor l = torch::maximum(pg1, pg2);

  const torch::Tensor n_tok = m.mask.sum() + 1e-8;  // verl's masked_mean
  torch::Tensor loss;
  if (!m.step_kl) {
    loss = (l * m.mask).sum() / n_tok;  // token_mean
  } else {
    // + beta * k3 KL to the reference, as verl's kl_penalty("low_var_kl").
    const torch::Tensor kl = (m.ref_logp - logp).clamp(-20.0, 20.0);
    l = l + 0.01 * (kl.exp() - kl - 1.0).clamp(-10.0, 10.0);
    // step_mean: the mean over present (row, step) pairs of the step's mean loss.
    const torch::Tensor step_sum = torch::zeros({m.B * m.K}).index_add(0, slot, (l * valid).view(-1));
    loss = (step_sum / count.clamp_min(1.0)).sum() / count.gt(0).sum().clamp_min(1);
  }
  {
    // verl's diagnostics, computed alongside the loss (sapo returns these and more).
    torch::NoGradGuard no_grad;
    const torch::Tensor ppo_kl = (-delta * m.mask).sum() / n_tok;
    const torch::Tensor clipfrac = (pg2.gt(pg1).to(torch::kFloat32) * m.mask).sum() / n_tok;
    (void)ppo_kl;
    (void)clipfrac;
  }
  loss.backward();
  return loss.item<double>();
}

// ------------------------------------------------------------------ sapo's autograd adapter

struct SapoTorchLoss::Impl {
  sapo::libtorch::loss_inputs in;
  sapo::loss_options options;
};

SapoTorchLoss::SapoTorchLoss(LossProblem& p, bool step_kl, int threads) : impl_(std::make_unique<Impl>()) {
  const int64_t B = p.shape.B, T = p.shape.T, K = p.shape.K;
  Impl& m = *impl_;
  m.in.logp = wrap(p.logp.data(), B, T).requires_grad_(true);
  m.in.old_logp = wrap(p.old_logp.data(), B, T);
  if (step_kl) m.in.ref_logp = wrap(p.ref_logp.data(), B, T);
  m.in.mask = wrap(p.mask.data(), B, T);
  m.in.step = wrap(p.step.data(), B, T);
  m.in.step_advantages = wrap(p.step_adv.data(), B, K);
  m.options = loss_options_for(step_kl, threads);
}

SapoTorchLoss::~SapoTorchLoss() = default;

const float* SapoTorchLoss::grad() const { return impl_->in.logp.grad().data_ptr<float>(); }
void SapoTorchLoss::release() { impl_->in.logp.mutable_grad().reset(); }

double SapoTorchLoss::run() {
  Impl& m = *impl_;
  m.in.logp.mutable_grad().reset();  // optimizer.zero_grad(set_to_none=True)
  const sapo::libtorch::policy_loss_output out = sapo::libtorch::policy_loss(m.in, m.options);
  out.loss.backward();
  return out.loss.item<double>();
}

// ------------------------------------------------------------------ advantage pipeline

struct TorchAdvantages::Impl {
  int64_t B, T, K, G;
  bool bcast;
  torch::Tensor tokens, mask, targets;
  torch::Tensor step, adv, token_adv, malformed;
};

TorchAdvantages::TorchAdvantages(const Batch& b, bool int64_ids, bool bcast) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.B = b.shape.B;
  m.T = b.shape.T;
  m.K = b.shape.K;
  m.G = b.shape.G;
  m.bcast = bcast;
  m.tokens = int64_ids ? wrap(b.tokens64.data(), m.B, m.T) : wrap(b.tokens32.data(), m.B, m.T);
  m.mask = wrap(b.mask.data(), m.B, m.T);
  m.targets = wrap(b.targets.data(), m.B, m.K);
}

TorchAdvantages::~TorchAdvantages() = default;

void TorchAdvantages::run() {
  Impl& m = *impl_;
  torch::NoGradGuard no_grad;  // the advantage stage runs without autograd
  const int64_t B = m.B, K = m.K, G = m.G;
  const torch::Tensor& tok = m.tokens;
  const torch::Tensor live = m.mask.gt(0);

  // SID tokens, their level and code: one boolean mask per level range.
  torch::Tensor is_sid = torch::zeros_like(live);
  torch::Tensor level = torch::zeros(tok.sizes(), torch::kInt64);
  torch::Tensor code = torch::zeros_like(tok);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t lo = Vocab::sid_lo(k), hi = lo + Vocab::codes;
    const torch::Tensor in_k = tok.ge(lo).logical_and_(tok.lt(hi));
    is_sid.logical_or_(in_k);
    level.masked_fill_(in_k, k);
    code = torch::where(in_k, tok - lo, code);
  }
  is_sid.logical_and_(live);

  // Step ids: the number of SID tokens before t (a SID token closes its step); -1 on
  // masked tokens and after the K-th SID token.
  const torch::Tensor sid_count = is_sid.to(torch::kInt64);
  const torch::Tensor closed = sid_count.cumsum(1);
  const torch::Tensor before = closed - sid_count;
  const torch::Tensor in_step = before.lt(K).logical_and_(live);
  m.step = torch::where(in_step, before, torch::full({}, -1, torch::kInt64));

  // Malformed: not exactly K SID tokens, or a SID token at the wrong level.
  const torch::Tensor n_sid = closed.select(1, closed.size(1) - 1);
  const torch::Tensor wrong = is_sid.logical_and(level.ne(before)).logical_and_(before.lt(K)).any(1);
  m.malformed = n_sid.ne(K).logical_or_(wrong);

  // Generated codes (B, K) by scatter (non-SID tokens go to a dropped column K).
  const torch::Tensor slot = torch::where(is_sid.logical_and(before.lt(K)), before, torch::full({}, K, torch::kInt64));
  const torch::Tensor codes = torch::full({B, K + 1}, -1, tok.scalar_type()).scatter_(1, slot, code).narrow(1, 0, K);

  // Prefix rewards: prod_{j<=k} 1[a_j = y_j]; malformed rows get 0.
  const torch::Tensor rewards =
      codes.eq(m.targets).to(torch::kFloat32).cumprod(1).masked_fill_(m.malformed.unsqueeze(1), 0.0);

  // Group statistics with index_add over contiguous groups of G: mean, unbiased std.
  const int64_t n_groups = B / G;
  const torch::Tensor gid = torch::arange(B, torch::kInt64).div_(G, "floor");
  const torch::Tensor gcount = torch::zeros({n_groups, 1}).index_add_(0, gid, torch::ones({B, 1}));
  const torch::Tensor mean = torch::zeros({n_groups, K}).index_add_(0, gid, rewards) / gcount;
  const torch::Tensor dev = rewards - mean.index_select(0, gid);
  const torch::Tensor var = torch::zeros({n_groups, K}).index_add_(0, gid, dev * dev) / (gcount - 1.0);
  m.adv = dev / (var.sqrt().index_select(0, gid) + 1e-6);

  if (m.bcast) m.token_adv = m.adv.gather(1, m.step.clamp_min(0)).mul_(m.step.ge(0));
}

const int64_t* TorchAdvantages::step() const { return impl_->step.data_ptr<int64_t>(); }
const float* TorchAdvantages::adv() const { return impl_->adv.data_ptr<float>(); }
const float* TorchAdvantages::token_adv() const {
  return impl_->token_adv.defined() ? impl_->token_adv.data_ptr<float>() : nullptr;
}
const bool* TorchAdvantages::malformed() const { return impl_->malformed.data_ptr<bool>(); }
void TorchAdvantages::release() {
  impl_->step.reset();
  impl_->adv.reset();
  impl_->token_adv.reset();
  impl_->malformed.reset();
}

struct TorchProbe::Impl {
  torch::Tensor t;
};
TorchProbe::TorchProbe(size_t bytes) : impl_(std::make_unique<Impl>()) {
  impl_->t = torch::empty({static_cast<int64_t>(bytes / sizeof(float))}, torch::kFloat32);
}
TorchProbe::~TorchProbe() = default;

}  // namespace sapo_bench
