"""Segmentation, step rewards, group / outcome / mixed advantages and the token broadcasts
against the plain-Python reference of sapo_reference.py (written from SPEC §1-3 and
docs/decisions.md), on random batches with the structure of the C++ tests' batches."""
import itertools
import math
import random

import pytest
import torch

import sapo_reference as ref
import sapo_torch as st

K = 3


def _assert_matrix_close(got, want, rel=1e-12, abs_=1e-12):
    assert len(got) == len(want)
    for i, (g_row, w_row) in enumerate(zip(got, want)):
        for j, (g, w) in enumerate(zip(g_row, w_row)):
            if math.isnan(w):
                assert math.isnan(g), (i, j, g)
            else:
                assert abs(g - w) <= abs_ + rel * abs(w), f"({i}, {j}): got {g}, want {w}"


# ------------------------------------------------------------------------------ segmentation
@pytest.mark.parametrize("think_then_sid,per_level,tail_last,sid_in_step,tok_dtype,catalogue",
                         list(itertools.product([False, True], [False, True], [False, True], [True, False],
                                                [torch.int64, torch.int32], [False, True])))
def test_segment_steps_matches_reference(think_then_sid, per_level, tail_last, sid_in_step, tok_dtype, catalogue):
    rng = random.Random(17 + 2 * think_then_sid + per_level)
    B, T = 37, 23  # odd sizes; T small enough that some responses are truncated
    tokens, mask = ref.random_tokens(rng, K, B, T, think_then_sid=think_then_sid, per_level=per_level,
                                     defect_rate=0.4)
    ranges = ref.per_level_ranges(K) if per_level else [(ref.SID_BASE, ref.SID_BASE + ref.LEVEL_WIDTH)]
    cpl = [8, 9, 10] if catalogue else []
    want = ref.segment(tokens, mask, K, ranges, think_then_sid=think_then_sid, think_end=ref.THINK_END,
                       codes_per_level=cpl, sid_token_in_step=sid_in_step, tail_last_step=tail_last)
    got = st.segment_steps(torch.tensor(tokens, dtype=tok_dtype), torch.tensor(mask, dtype=torch.uint8), K, ranges,
                           layout="think_then_sid" if think_then_sid else "interleaved", codes_per_level=cpl,
                           think_end_id=ref.THINK_END, sid_token_in_step=sid_in_step,
                           tail="last_step" if tail_last else "no_step")
    assert got.step.dtype == torch.int32 and got.codes.dtype == torch.int64 and got.malformed.dtype == torch.bool
    assert got.step.tolist() == want[0]
    assert got.n_steps.tolist() == want[1]
    assert got.codes.tolist() == want[2]
    assert got.malformed.tolist() == want[3]
    # The batch has both kinds of response, or the comparison is weaker than it looks.
    assert 0 < sum(want[3]) < B


def test_segment_accepts_flat_ranges():
    rng = random.Random(3)
    tokens, mask = ref.random_tokens(rng, K, 9, 19)
    flat = [x for r in ref.per_level_ranges(K) for x in r]
    a = st.segment_steps(torch.tensor(tokens), torch.tensor(mask), K, flat)
    b = st.segment_steps(torch.tensor(tokens), torch.tensor(mask), K, ref.per_level_ranges(K))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ rewards
@pytest.mark.parametrize("kind", ["per_level", "prefix", "weighted_prefix", "exact"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_step_rewards_match_reference(kind, dtype):
    rng = random.Random(5)
    B = 41
    codes = [[rng.randint(0, 3) if rng.random() > 0.1 else -1 for _ in range(K)] for _ in range(B)]
    targets = [[rng.randint(0, 3) for _ in range(K)] for _ in range(B)]
    for i in range(0, B, 5):
        targets[i] = list(codes[i])  # some exact matches
    malformed = [rng.random() < 0.2 for _ in range(B)]
    w = [0.25, 0.5, 1.0] if kind == "weighted_prefix" else []
    want = ref.step_rewards(codes, malformed, targets, kind, w, malformed_reward=-0.5)
    got = st.step_rewards(torch.tensor(codes), torch.tensor(malformed), torch.tensor(targets), kind=kind,
                          level_weights=w, malformed_reward=-0.5, dtype=dtype)
    assert got.dtype == (dtype or torch.float32)
    _assert_matrix_close(got.double().tolist(), want, 0, 0)


# ------------------------------------------------------------------------------ advantages
def _rewards(rng, B, absent=0.15, levels=(0.0, 0.25, 0.5, 1.0)):
    return [[math.nan if rng.random() < absent else rng.choice(levels) for _ in range(K)] for _ in range(B)]


@pytest.mark.parametrize("norm", ["std", "std_floor", "none", "loo", "batch_std"])
@pytest.mark.parametrize("singleton", ["zero", "raw"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_group_advantages_explicit_ids_match_reference(norm, singleton, unbiased, dtype):
    rng = random.Random(23)
    B, n_groups = 31, 9  # unequal groups, one empty, singletons
    group_of = [rng.randrange(n_groups - 1) for _ in range(B)]
    group_of[7] = n_groups - 2  # make sure of at least one singleton group...
    for i in range(B):
        if i != 7 and group_of[i] == n_groups - 2:
            group_of[i] = 0
    rewards = _rewards(rng, B)
    r32 = torch.tensor(rewards, dtype=dtype)
    want, wstats = ref.group_advantages(r32.double().tolist(), group_of, n_groups, norm, unbiased, 1e-6, singleton)
    got = st.group_advantages(r32, group_ids=torch.tensor(group_of), n_groups=n_groups, norm=norm,
                              unbiased_std=unbiased, singleton=singleton)
    assert got.adv.dtype == dtype and got.adv.shape == (B, K)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    _assert_matrix_close(got.adv.double().tolist(), want, tol, tol)
    stats = got.statistics()
    assert list(stats) == list(st.ADVANTAGE_STAT_NAMES)
    for name, w in wstats.items():
        _assert_matrix_close([stats[name]], [[float(x) for x in w]], tol, tol)
    # Absent steps always get A = 0; a singleton group gets A = r (raw) or 0.
    for i in range(B):
        for k in range(K):
            if math.isnan(rewards[i][k]):
                assert float(got.adv[i, k]) == 0.0


@pytest.mark.parametrize("G", [1, 4, 8])
def test_contiguous_groups_equal_explicit_ids(G):
    rng = random.Random(G)
    B = 8 * 3
    r = torch.tensor(_rewards(rng, B), dtype=torch.float64)
    a = st.group_advantages(r, group_size=G)
    b = st.group_advantages(r, group_ids=torch.arange(B) // G)  # n_groups counted from the ids
    assert torch.equal(a.adv, b.adv) and torch.equal(a.stats, b.stats)
    want, _ = ref.group_advantages(r.tolist(), [i // G for i in range(B)], B // G)
    _assert_matrix_close(a.adv.tolist(), want)


def test_zero_variance_group_gets_zero_not_rounding_noise():
    # mean of three 0.1s is not exactly 0.1 in floating point; decisions.md says A = 0 anyway.
    r = torch.tensor([[0.1], [0.1], [0.1], [0.0], [1.0], [0.5]], dtype=torch.float64)
    out = st.group_advantages(r, group_size=3)
    assert out.adv[:3].abs().max().item() == 0.0
    assert out.statistics()["zero_variance_fraction"] == [0.5]


@pytest.mark.parametrize("norm", ["std", "none", "loo"])
def test_outcome_advantages_match_reference(norm):
    rng = random.Random(31)
    B = 20
    r = [rng.choice([0.0, 1.0, 0.3]) for _ in range(B)]
    want, _ = ref.group_advantages([[x] for x in r], [i // 5 for i in range(B)], 4, norm)
    got = st.outcome_advantages(torch.tensor(r, dtype=torch.float64), group_size=5, norm=norm)
    assert got.adv.shape == (B,) and got.stats.shape == (6, 1)
    _assert_matrix_close([[x] for x in got.adv.tolist()], want)


def test_mix_and_broadcasts_match_reference():
    rng = random.Random(41)
    B, T = 6, 11
    tokens, mask = ref.random_tokens(rng, K, B, T)
    step, _, _, _ = ref.segment(tokens, mask, K, ref.per_level_ranges(K))
    step_adv = [[rng.uniform(-1, 1) for _ in range(K)] for _ in range(B)]
    out_adv = [rng.uniform(-1, 1) for _ in range(B)]
    mixed = st.mix_advantages(torch.tensor(out_adv, dtype=torch.float64), torch.tensor(step_adv, dtype=torch.float64),
                              outcome_weight=0.3, step_weight=0.7)
    _assert_matrix_close(mixed.tolist(), [[0.3 * out_adv[i] + 0.7 * step_adv[i][k] for k in range(K)] for i in range(B)])
    tok = st.broadcast_step_advantages(torch.tensor(step_adv, dtype=torch.float64), torch.tensor(step),
                                       torch.tensor(mask))
    _assert_matrix_close(tok.tolist(), ref.broadcast(step_adv, step, mask), 0, 0)
    tok_o = st.broadcast_outcome_advantages(torch.tensor(out_adv, dtype=torch.float64), torch.tensor(mask))
    _assert_matrix_close(tok_o.tolist(), [[out_adv[i] if mask[i][t] else 0.0 for t in range(T)] for i in range(B)], 0, 0)


def test_exact_rewards_make_sapo_equal_grpo_bit_for_bit():
    """README: with exact-match rewards every step of a response has the same reward, so the
    per-step advantages equal the outcome advantage and the losses agree exactly."""
    rng = random.Random(55)
    B, T, G = 16, 27, 4
    tokens, mask = ref.random_tokens(rng, K, B, T, defect_rate=0.2)
    seg = st.segment_steps(torch.tensor(tokens), torch.tensor(mask), K, ref.per_level_ranges(K))
    targets = seg.codes.clone()
    targets[::3] = (targets[::3] + 1) % 10  # some misses
    r = st.step_rewards(seg.codes, seg.malformed, targets, kind="exact", dtype=torch.float64)
    step_a = st.group_advantages(r, group_size=G, singleton="raw")
    out_a = st.outcome_advantages(r[:, 0].contiguous(), group_size=G, singleton="raw")
    assert torch.equal(step_a.adv, out_a.adv.unsqueeze(1).expand(B, K))
    logp = torch.tensor([[rng.uniform(-3, -0.1) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    old = logp + 0.2 * torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = torch.tensor(mask, dtype=torch.float64)
    # Only tokens inside a step get the step advantage; give GRPO the same token set.
    in_step = m * (seg.step >= 0)
    sapo_loss = st.policy_loss(logp, old, in_step, step_advantages=step_a.adv, step=seg.step).loss
    grpo_loss = st.policy_loss(logp, old, in_step, st.broadcast_outcome_advantages(out_a.adv, in_step)).loss
    assert float(sapo_loss) == float(grpo_loss)
