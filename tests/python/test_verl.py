"""sapo_torch.verl against verl's formulas, re-written here op by op from verl's documented
behaviour (core_algos.compute_grpo_outcome_advantage, compute_policy_loss, agg_loss): group by
uid, mean and unbiased torch.std, (r - mean) / (std + epsilon), singleton mean 0 / std 1; the
clipped loss with dual clip always on; agg_loss with empty responses left out of the sequence
means. verl itself is not installed here."""
import random
import types
from collections import defaultdict

import numpy as np
import pytest
import torch

import sapo_reference as ref
import sapo_torch as st
from sapo_torch import verl as sv

# ----------------------------------------------------------------------------- verl formulas


def verl_group_normalize(scores, index, epsilon=1e-6, by_std=True):
    """verl's GRPO normalization of one score per response (a list), grouped by index."""
    groups = defaultdict(list)
    for i, u in enumerate(index):
        groups[u].append(scores[i])
    stats = {}
    for u, v in groups.items():
        t = torch.tensor(v, dtype=torch.float64)
        stats[u] = (0.0, 1.0) if len(v) == 1 else (float(t.mean()), float(t.std()))
    out = []
    for i, u in enumerate(index):
        mu, sd = stats[u]
        out.append((scores[i] - mu) / (sd + epsilon) if by_std else scores[i] - mu)
    return out


def masked_mean(x, m):
    return (x * m).sum() / m.sum()


def verl_agg_loss(mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    if mode == "token-mean":
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (mat * mask).sum() / n * dp_size
    seq_count = mask.sum(-1)
    seq_mask = (seq_count > 0).to(mat.dtype)
    gbs = seq_mask.sum() if global_batch_size is None else global_batch_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        loss = ((mat * mask).sum(-1) * seq_mask).sum() / gbs * dp_size
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
        return loss
    if mode == "seq-mean-token-mean":
        per_seq = (mat * mask).sum(-1) / (seq_count + 1e-8)
        return (per_seq * seq_mask).sum() / gbs * dp_size
    raise ValueError(mode)


def verl_policy_loss(old, logp, adv, mask, clip_low, clip_high, c, mode, **agg_kw):
    nkl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(nkl)
    ppo_kl = masked_mean(-nkl, mask)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    clipfrac = masked_mean(torch.gt(l2, l1).to(logp.dtype), mask)
    l3 = -adv * c
    c2 = torch.min(l3, c1)
    clipfrac_lower = masked_mean((torch.gt(c1, l3) & (adv < 0)).to(logp.dtype), mask)
    pg = torch.where(adv < 0, c2, c1)
    return verl_agg_loss(pg, mask, mode, **agg_kw), clipfrac, ppo_kl, clipfrac_lower


# ----------------------------------------------------------------------------- advantages
def _uid_batch(seed, B, K, T):
    rng = random.Random(seed)
    names = [f"prompt-{j}" for j in range(7)]
    index = np.array([rng.choice(names[:6]) for _ in range(B)], dtype=object)
    index[4] = names[6]  # a singleton group
    rewards = [[rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(K)] for _ in range(B)]
    tokens, mask = ref.random_tokens(rng, K, B, T)
    step, _, _, _ = ref.segment(tokens, mask, K, ref.per_level_ranges(K))
    return index, rewards, torch.tensor(mask, dtype=torch.float32), torch.tensor(step, dtype=torch.int32)


@pytest.mark.parametrize("by_std", [True, False])
def test_step_aligned_advantage_is_verl_grpo_per_step(by_std):
    B, K, T = 29, 3, 21
    index, rewards, mask, step = _uid_batch(1, B, K, T)
    adv, ret = sv.compute_step_aligned_advantage(torch.tensor(rewards, dtype=torch.float64), mask, index,
                                                 step_ids=step, norm_adv_by_std_in_grpo=by_std)
    assert adv is ret and adv.shape == (B, T)
    per_step = [verl_group_normalize([rewards[i][k] for i in range(B)], list(index), by_std=by_std) for k in range(K)]
    want = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            if mask[i, t] and step[i, t] >= 0:
                want[i, t] = per_step[int(step[i, t])][i]
    # verl's singleton value is r / (1 + epsilon); sapo's "raw" is r: 1e-6 relative apart.
    assert torch.allclose(adv, want, rtol=2e-6, atol=1e-12), (adv - want).abs().max()


def test_think_end_positions_give_the_same_advantages_as_step_ids():
    B, K, T = 17, 3, 19
    index, rewards, mask, step = _uid_batch(2, B, K, T)
    # Last token of each step = the think-end position; the tail after step K-1 stays -1.
    pos = torch.full((B, K), -1, dtype=torch.int64)
    for i in range(B):
        for t in range(T):
            if mask[i, t] and step[i, t] >= 0:
                pos[i, int(step[i, t])] = t
    derived = sv.step_ids_from_think_end_positions(pos, T)
    m = mask > 0
    # Where the segmenter found steps the derived ids agree (masked tokens are ignored later).
    assert torch.equal(derived[m & (step >= 0)], step[m & (step >= 0)])
    r = torch.tensor(rewards, dtype=torch.float64)
    a1, _ = sv.compute_step_aligned_advantage(r, mask, index, step_ids=step)
    a2, _ = sv.compute_step_aligned_advantage(r, mask, index, think_end_positions=pos)
    # Unfinished steps differ by construction (positions cannot express them): compare where
    # the response closed all its steps.
    closed = (pos >= 0).all(1)
    assert torch.equal(a1[closed], a2[closed])


def test_step_ids_from_think_end_positions_by_hand_and_errors():
    pos = torch.tensor([[1, 3, 4], [0, -1, -1]])
    got = sv.step_ids_from_think_end_positions(pos, 6)
    assert got.tolist() == [[0, 0, 1, 1, 2, -1], [0, -1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="increase"):
        sv.step_ids_from_think_end_positions(torch.tensor([[2, 2, 4]]), 6)
    with pytest.raises(ValueError, match="before the absent"):
        sv.step_ids_from_think_end_positions(torch.tensor([[-1, 2, 4]]), 6)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        sv.step_ids_from_think_end_positions(torch.tensor([[1, 2, 6]]), 6)
    with pytest.raises(ValueError, match="exactly one"):
        sv.compute_step_aligned_advantage(torch.zeros(1, 3), torch.ones(1, 6), ["a"])


def test_group_index_accepts_strings_ints_and_tensors():
    ids, n = sv.group_index_to_ids(np.array(["b", "a", "b", "c"], dtype=object))
    assert ids.tolist() == [0, 1, 0, 2] and n == 3
    ids, n = sv.group_index_to_ids(torch.tensor([7, 7, 3]))
    assert ids.tolist() == [0, 0, 1] and n == 2


def test_mixed_outcome_and_step_advantages():
    B, K, T = 12, 3, 15
    index, rewards, mask, step = _uid_batch(3, B, K, T)
    r = torch.tensor(rewards, dtype=torch.float64)
    outcome = r.sum(1)
    a, _ = sv.compute_step_aligned_advantage(r, mask, index, step_ids=step, outcome_rewards=outcome,
                                             outcome_weight=0.5, step_weight=2.0)
    a_step, _ = sv.compute_step_aligned_advantage(r, mask, index, step_ids=step)
    a_out = torch.tensor(verl_group_normalize(outcome.tolist(), list(index)), dtype=torch.float64)
    in_step = (mask > 0) & (step >= 0)
    want = torch.where(in_step, 0.5 * a_out[:, None] + 2.0 * a_step, torch.zeros_like(a_step))
    assert torch.allclose(a, want, rtol=2e-6, atol=1e-12)


def test_grpo_outcome_advantage_matches_verl_and_the_sapo_identity():
    B, T = 24, 13
    rng = random.Random(9)
    index = np.array([f"u{rng.randrange(5)}" for _ in range(B)], dtype=object)
    lengths = [rng.randint(1, T) for _ in range(B)]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    scores = [rng.choice([0.0, 1.0]) for _ in range(B)]
    tlr = torch.zeros(B, T, dtype=torch.float64)
    tlr[:, 0] = torch.tensor(scores, dtype=torch.float64)  # the score on one token, as a reward manager does
    adv, ret = sv.compute_grpo_outcome_advantage(tlr, mask, index)
    want = torch.tensor(verl_group_normalize(scores, list(index)), dtype=torch.float64)[:, None] * mask
    assert torch.allclose(adv, want, rtol=2e-6, atol=1e-12)
    # SAPO = GRPO with exact-match rewards: every step reward equals the score.
    K = 3
    step = torch.where(mask > 0, torch.arange(T).remainder(K).expand(B, T), torch.full((B, T), -1)).int()
    a_sapo, _ = sv.compute_step_aligned_advantage(torch.tensor(scores, dtype=torch.float64)[:, None].expand(B, K),
                                                  mask, index, step_ids=step)
    assert torch.equal(a_sapo, adv)


# ----------------------------------------------------------------------------- policy loss
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
P = ref.LossProblem(seed=77, B=9, T=17, spread=0.4, empty_rows=(3,))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [(0.2, None, None), (0.2, 0.1, 0.28)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compute_policy_loss_matches_verl(mode, clip, dtype):
    cliprange, low, high = clip
    adv = P.token_adv.to(dtype)
    x = P.logp.to(dtype).requires_grad_(True)
    got = sv.compute_policy_loss(P.old_logp.to(dtype), x, adv, P.mask.to(dtype), cliprange, low, high, 1.5, mode)
    (g,) = torch.autograd.grad(got[0], x)
    y = P.logp.to(dtype).double().requires_grad_(True)
    want = verl_policy_loss(P.old_logp.to(dtype).double(), y, adv.double(), P.mask.double(), low or cliprange,
                            high or cliprange, 1.5, mode)
    (wg,) = torch.autograd.grad(want[0], y)
    tol = 2e-6 if dtype == torch.float32 else 1e-7  # verl's +1e-8 in seq-mean-token-mean
    for a, b in zip(got, want):
        assert abs(float(a) - float(b)) <= tol * (1 + abs(float(b))), (float(a), float(b))
    assert torch.allclose(g.double(), wg, rtol=tol, atol=1e-9)
    assert float(got[1]) > 0 and float(got[3]) > 0  # both clip kinds happen in this batch


@pytest.mark.parametrize("mode", MODES)
def test_verl_global_normalizers(mode):
    kw = dict(dp_size=4, batch_num_tokens=301.0, global_batch_size=23.0, loss_scale_factor=50.0)
    x = P.logp.clone().requires_grad_(True)
    got = sv.compute_policy_loss(P.old_logp, x, P.token_adv, P.mask, 0.2, loss_agg_mode=mode, **kw)
    want = verl_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, 0.2, 0.2, 3.0, mode, **kw)
    assert abs(float(got[0]) - float(want[0])) <= 1e-7 * (1 + abs(float(want[0])))


def test_kl_penalty_folds_verls_separate_kl_loss_into_pg_loss():
    x = P.logp.clone().requires_grad_(True)
    got = sv.compute_policy_loss(P.old_logp, x, P.token_adv, P.mask, 0.2, ref_log_prob=P.ref_logp,
                                 kl_loss_coef=0.05, kl_loss_type="low_var_kl")
    pg = verl_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, 0.2, 0.2, 3.0, "token-mean")[0]
    d = torch.clamp(P.ref_logp - P.logp, -20, 20)
    low_var_kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)  # verl's "low_var_kl"
    want = pg + 0.05 * verl_agg_loss(low_var_kl, P.mask, "token-mean")
    assert abs(float(got[0]) - float(want)) < 1e-12


def test_registry_form_reads_the_config():
    cfg = dict(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.3, clip_ratio_c=2.0,
               global_batch_info=dict(dp_size=2, global_batch_size=20))
    a = sv.compute_policy_loss_vanilla(P.old_logp, P.logp, P.token_adv, P.mask, "seq-mean-token-sum", cfg)
    b = sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, 0.2, 0.15, 0.3, 2.0, "seq-mean-token-sum",
                               dp_size=2, global_batch_size=20)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    ns = types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0)
    c = sv.compute_policy_loss_vanilla(P.old_logp, P.logp, P.token_adv, P.mask, "token-mean", ns)
    d = sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask)
    assert all(torch.equal(u, v) for u, v in zip(c, d))


def test_step_mean_and_step_ratio_extensions():
    got = sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, 0.2, loss_agg_mode="step-mean",
                                 step_ids=P.step, ratio="step")
    want = st.policy_loss(P.logp, P.old_logp, P.mask, P.token_adv, step=P.step, ratio="step", agg="step_mean",
                          dual_clip=True, dual_clip_c=3.0)
    assert torch.equal(got[0], want.loss)


def test_unmapped_modes_and_weights_raise():
    with pytest.raises(ValueError, match="token-mean-unbiased"):
        sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, 0.2, loss_agg_mode="token-mean-unbiased")
    with pytest.raises(ValueError, match="rollout_is_weights"):
        sv.compute_policy_loss_vanilla(P.old_logp, P.logp, P.token_adv, P.mask, "token-mean", {},
                                       rollout_is_weights=torch.ones_like(P.logp))
    with pytest.raises(ValueError, match="kl_loss_type"):
        sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, ref_log_prob=P.ref_logp, kl_loss_coef=0.1,
                               kl_loss_type="full")
    with pytest.raises(ValueError, match="cliprange"):
        sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, None)
    with pytest.raises(RuntimeError, match="dual_clip_c"):  # verl asserts clip_ratio_c > 1 too
        sv.compute_policy_loss(P.old_logp, P.logp, P.token_adv, P.mask, 0.2, clip_ratio_c=1.0)
