"""torch.autograd.gradcheck (finite differences in double) on sapo_torch.policy_loss.

The step / sequence ratios use the GSPO-token stop-gradient form (SPEC §4): every token of a
step gets the value exp(mean delta) and d rho_t / d logp_t = rho_t. That is the true derivative
of the loss when the advantage is constant on the step (sequence) and the aggregation weighs
the step's tokens equally (every aggregation does): then sum_t -A rho d(mean delta)/d logp_u
= -A rho. So the step ratio is checked with step advantages, the sequence ratio with one
advantage per response, and the last test shows that gradcheck does fail for the step ratio
once the advantage varies inside a step (so the checks are not vacuous)."""
import pytest
import torch

import sapo_reference as ref
import sapo_torch as st

P = ref.LossProblem(seed=99, B=5, T=12, spread=0.4)


def _away_from_kinks(logp, old, clip_low, clip_high, margin=1e-3):
    """Moves logp so no token ratio sits within `margin` of a clip bound (finite differences
    straddling a kink would disagree with either one-sided derivative)."""
    logp = logp.clone()
    for bound in (1.0 - clip_low, 1.0 + clip_high, 1.0):
        r = torch.exp(logp - old)
        near = (r - bound).abs() < margin
        logp[near] += 5 * margin
    return logp


def _check(options, by_step=False, outcome=False):
    old = P.old_logp
    logp0 = _away_from_kinks(P.logp, old, options.get("clip_low", 0.2), options.get("clip_high", 0.2))
    kw = {}
    if outcome:
        per_row = P.step_adv[:, 0].contiguous()
        kw["token_advantages"] = st.broadcast_outcome_advantages(per_row, P.mask)
    elif by_step:
        kw["step_advantages"] = P.step_adv
    else:
        kw["token_advantages"] = P.token_adv
    if options.get("kl_coef", 0.0) > 0:
        kw["ref_logp"] = P.ref_logp

    def f(x):
        return st.policy_loss(x, old, P.mask, step=P.step, **kw, **options).loss

    x = logp0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                 "seq_mean_token_sum_norm", "step_mean"])
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3"])
@pytest.mark.parametrize("dual", [False, True])
def test_gradcheck_token_ratio(agg, kl, dual):
    opts = dict(agg=agg, clip_high=0.28, dual_clip=dual, dual_clip_c=1.5)
    if kl:
        opts.update(kl=kl, kl_coef=0.05)
    _check(opts)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "step_mean"])
@pytest.mark.parametrize("kl", [None, "k3"])
@pytest.mark.parametrize("dual", [False, True])
def test_gradcheck_step_ratio_with_step_advantages(agg, kl, dual):
    opts = dict(ratio="step", agg=agg, dual_clip=dual, dual_clip_c=1.5)
    if kl:
        opts.update(kl=kl, kl_coef=0.05)
    _check(opts, by_step=True)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "seq_mean_token_sum", "token_mean"])
@pytest.mark.parametrize("dual", [False, True])
def test_gradcheck_sequence_ratio_with_outcome_advantages(agg, dual):
    _check(dict(ratio="sequence", agg=agg, dual_clip=dual, dual_clip_c=1.5), outcome=True)


@pytest.mark.parametrize("ratio", ["step", "sequence"])
def test_grouped_ratio_is_not_the_true_derivative_when_advantages_vary_inside_a_step(ratio):
    """With an advantage that varies token by token inside a step, the stop-gradient form is
    not the finite-difference derivative; the token ratio would be. gradcheck must notice,
    or the checks above would also pass if the ratio silently fell back to the token ratio."""
    varying = torch.randn(P.B, P.T, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * P.mask
    x = P.logp.clone().requires_grad_(True)

    def f(y):
        return st.policy_loss(y, P.old_logp, P.mask, varying, step=P.step, ratio=ratio, clip_low=0.9,
                              clip_high=9.0).loss

    assert not torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
    assert torch.autograd.gradcheck(
        lambda y: st.policy_loss(y, P.old_logp, P.mask, varying, clip_low=0.9, clip_high=9.0).loss, (x,),
        eps=1e-6, atol=1e-7, rtol=1e-5)
