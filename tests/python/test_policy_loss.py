"""sapo_torch.policy_loss against the op-by-op PyTorch formula of SPEC §4-6 (sapo_reference.py):
loss, gradient through autograd with an upstream gradient != 1, and the diagnostics, for every
aggregation x ratio level x KL setting, float32 and float64."""
import itertools
import math

import pytest
import torch

import sapo_reference as ref
import sapo_torch

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "step_mean"]
RATIOS = ["token", "step", "sequence"]
KLS = [None, "k1", "k2", "k3"]  # None: no reference policy, no KL term


def _close(got, want, rel, abs_):
    assert abs(got - want) <= abs_ + rel * abs(want), f"got {got!r}, want {want!r}"


def _run(problem, dtype, *, by_step, ratio, agg, kl, dual, upstream=-1.7, **extra):
    p = problem
    opts = dict(ratio=ratio, agg=agg, clip_low=0.2, clip_high=0.28, dual_clip=dual, dual_clip_c=1.5, **extra)
    if kl is not None:
        opts.update(kl_coef=0.05, kl=kl)
    logp = p.logp.to(dtype).requires_grad_(True)
    old, refp, mask = p.old_logp.to(dtype), p.ref_logp.to(dtype), p.mask.to(dtype)
    kw = dict(step=p.step, ref_logp=refp if kl is not None else None)
    if by_step:
        kw["step_advantages"] = p.step_adv.to(dtype)
    else:
        kw["token_advantages"] = p.token_adv.to(dtype)
    out = sapo_torch.policy_loss(logp, old, mask, **kw, **opts)
    (grad,) = torch.autograd.grad(out.loss, logp, grad_outputs=torch.tensor(upstream, dtype=dtype))

    # The reference runs in double on the values the kernel saw (rounded to dtype).
    r_logp = logp.detach().double().requires_grad_(True)
    # token_adv is the broadcast of step_adv, so rounding either to dtype gives the same values.
    r_loss, r_diag = ref.policy_loss(r_logp, old.double(), mask.double(), p.token_adv.to(dtype).double(),
                                     step=p.step, ref_logp=refp.double() if kl is not None else None, **opts)
    (r_grad,) = torch.autograd.grad(r_loss, r_logp, grad_outputs=torch.tensor(upstream, dtype=torch.float64))
    return out, grad, r_loss, r_grad, r_diag


PROBLEM = ref.LossProblem(seed=2024, B=13, T=29, spread=0.4, empty_rows=(5,), truncated_rows=(2,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("agg,ratio,kl", list(itertools.product(AGGS, RATIOS, KLS)))
@pytest.mark.parametrize("dual", [False, True], ids=["nodual", "dual"])
@pytest.mark.parametrize("by_step", [False, True], ids=["token_adv", "step_adv"])
def test_loss_and_gradient_match_reference(dtype, agg, ratio, kl, dual, by_step):
    out, grad, r_loss, r_grad, r_diag = _run(PROBLEM, dtype, by_step=by_step, ratio=ratio, agg=agg, kl=kl, dual=dual)
    f32 = dtype == torch.float32
    tol = 2e-6 if f32 else 1e-12
    assert out.loss.dtype == dtype and grad.dtype == dtype and grad.shape == PROBLEM.logp.shape
    _close(float(out.loss), float(r_loss), tol, tol)
    g, w = grad.double(), r_grad
    assert torch.allclose(g, w, rtol=tol, atol=1e-9 if f32 else 1e-15), (g - w).abs().max()
    # Masked-out tokens (including the empty row 5) get exactly zero gradient.
    assert bool((grad[PROBLEM.mask == 0] == 0).all())
    d = out.as_dict()
    assert list(d) == list(sapo_torch.LOSS_DIAGNOSTIC_NAMES)
    for name, want in r_diag.items():
        _close(d[name], want, tol, tol)


def test_the_problem_has_the_edge_cases_it_claims():
    """The batch must exercise what the test above is meant to cover, or the test is weaker
    than it looks: tokens without a step, rows missing steps, an empty row, both clip sides."""
    p = PROBLEM
    m = p.mask > 0
    assert bool((m & (p.step < 0)).any()), "no masked token with step -1"
    assert int(m[5].sum()) == 0
    present = [{int(s) for s, mm in zip(p.step[i], m[i]) if mm and s >= 0} for i in range(p.B)]
    assert any(0 < len(s) < p.K for s in present), "no response with missing steps"
    ratio = torch.exp(p.logp - p.old_logp)[m]
    assert bool((ratio < 0.8).any()) and bool((ratio > 1.28).any())


@pytest.mark.parametrize("agg", AGGS)
def test_caller_given_normalizers(agg):
    """global_tokens / global_sequences / global_steps and max_response_length replace the
    local counts (decisions.md "Normalizers")."""
    p = ref.LossProblem(seed=7, B=11, T=23)
    extra = dict(global_tokens=500.0, global_sequences=37.0, global_steps=91.0, max_response_length=64.0)
    out, grad, r_loss, r_grad, _ = _run(p, torch.float64, by_step=False, ratio="token", agg=agg, kl=None,
                                        dual=False, **extra)
    _close(float(out.loss), float(r_loss), 1e-12, 1e-12)
    assert torch.allclose(grad, r_grad, rtol=1e-12, atol=1e-15)
    # The normalizer really changed the value (else the comparison above proves nothing).
    plain = sapo_torch.policy_loss(p.logp, p.old_logp, p.mask, p.token_adv, step=p.step, agg=agg)
    assert abs(float(plain.loss) - float(out.loss)) > 1e-6


@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (3, 64)])
def test_odd_sizes_and_upstream_gradient_scaling(B, T):
    p = ref.LossProblem(seed=B * 100 + T, B=B, T=T)
    for upstream in (1.0, -3.25, 0.0):
        out, grad, r_loss, r_grad, _ = _run(p, torch.float64, by_step=True, ratio="step", agg="step_mean",
                                            kl="k3", dual=True, upstream=upstream)
        _close(float(out.loss), float(r_loss), 1e-12, 1e-12)
        assert torch.allclose(grad, r_grad, rtol=1e-12, atol=1e-15)


def test_empty_batch_gives_zero_loss_and_empty_gradient():
    logp = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(0, 5, dtype=torch.float64)
    out = sapo_torch.policy_loss(logp, z, z, z)
    out.loss.backward()
    assert float(out.loss) == 0.0 and logp.grad.shape == (0, 5)


def test_all_masked_gives_zero_loss_and_zero_gradient():
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = sapo_torch.policy_loss(logp, logp.detach() + 0.3, torch.zeros(3, 4), torch.ones(3, 4))
    out.loss.backward()
    assert float(out.loss) == 0.0 and bool((logp.grad == 0).all())


def test_gradients_accumulate_over_two_losses_on_one_logp():
    p = ref.LossProblem(seed=3, B=4, T=9)
    logp = p.logp.clone().requires_grad_(True)
    a = sapo_torch.policy_loss(logp, p.old_logp, p.mask, p.token_adv).loss
    b = sapo_torch.policy_loss(logp, p.old_logp, p.mask, p.token_adv, agg="seq_mean_token_sum").loss
    (2.0 * a - b).backward()
    ga = torch.autograd.grad(sapo_torch.policy_loss(logp, p.old_logp, p.mask, p.token_adv).loss, logp)[0]
    gb = torch.autograd.grad(
        sapo_torch.policy_loss(logp, p.old_logp, p.mask, p.token_adv, agg="seq_mean_token_sum").loss, logp)[0]
    assert torch.allclose(logp.grad, 2.0 * ga - gb, rtol=1e-12, atol=1e-15)


def test_policy_loss_forward_returns_the_same_gradient_without_autograd():
    p = ref.LossProblem(seed=11, B=5, T=17)
    logp = p.logp.clone().requires_grad_(True)
    fwd = sapo_torch.policy_loss_forward(logp, p.old_logp, p.mask, p.token_adv, ratio="sequence",
                                         agg="seq_mean_token_mean")
    assert not fwd.loss.requires_grad and not fwd.grad.requires_grad
    out = sapo_torch.policy_loss(logp, p.old_logp, p.mask, p.token_adv, ratio="sequence", agg="seq_mean_token_mean")
    out.loss.backward()
    assert torch.equal(fwd.grad, logp.grad)
    assert float(fwd.loss) == float(out.loss)
    assert fwd.as_dict() == out.as_dict()


def test_nonfinite_mask_policy_drops_and_counts_tokens():
    p = ref.LossProblem(seed=8, B=9, T=21)
    logp = p.logp.clone()
    m = p.mask > 0
    where = m.nonzero()[:3]
    for i, t in where.tolist():
        logp[i, t] = math.nan
    with pytest.raises(RuntimeError, match="logp"):
        sapo_torch.policy_loss(logp, p.old_logp, p.mask, p.token_adv)
    x = logp.clone().requires_grad_(True)
    out = sapo_torch.policy_loss(x, p.old_logp, p.mask, p.token_adv, nonfinite="mask")
    out.loss.backward()
    assert out.as_dict()["n_nonfinite_masked"] == 3.0
    # Same as masking those tokens out by hand.
    mask2 = p.mask.clone()
    for i, t in where.tolist():
        mask2[i, t] = 0
    y = p.logp.clone().requires_grad_(True)
    want = sapo_torch.policy_loss(y, p.old_logp, mask2, p.token_adv)
    want.loss.backward()
    assert float(out.loss) == float(want.loss)
    assert torch.equal(torch.nan_to_num(x.grad), y.grad)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32])
def test_mask_dtypes_give_the_same_result(mask_dtype):
    p = ref.LossProblem(seed=12, B=6, T=10)
    want = sapo_torch.policy_loss(p.logp, p.old_logp, p.mask, p.token_adv).loss
    got = sapo_torch.policy_loss(p.logp, p.old_logp, p.mask.to(mask_dtype), p.token_adv).loss
    assert float(got) == float(want)


def test_strided_inputs_give_the_same_result_as_contiguous():
    p = ref.LossProblem(seed=13, B=6, T=10)
    big = torch.randn(12, 30, dtype=torch.float64)
    big[::2, 1::3] = p.logp
    view = big[::2, 1::3]
    lp = view.clone()
    assert not view.is_contiguous()
    a = sapo_torch.policy_loss(view, p.old_logp, p.mask, p.token_adv.t().contiguous().t(), step=p.step,
                               ratio="step", agg="step_mean")
    b = sapo_torch.policy_loss(lp, p.old_logp, p.mask, p.token_adv, step=p.step, ratio="step", agg="step_mean")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.diagnostics, b.diagnostics)
