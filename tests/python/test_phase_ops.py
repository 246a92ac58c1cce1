"""The distributed phases as operators (sapo_torch.group_partials, group_deviations,
finalize_group_advantages, finish_advantage_std, loss_counts) on one process: a batch is
split into 2-3 "ranks" by hand, the test reduces their arrays itself (sum / min / max of
tensors, the all-reduces of docs/distributed.md), and each rank's advantages and the
statistics must equal the single-process group_advantages on the whole batch and the
plain-Python reference of sapo_reference.py. The round-1 arrays, finish_advantage_std and the
loss counts are also checked against values counted here in plain Python; bad inputs raise
messages naming the tensor and both shapes.

Tolerances: the ranks add partial sums in another order than one process, so advantages
agree to 1e-12 relative (float32 rewards: one float rounding, 1e-6); with one rank holding
the whole batch the phases are the very computation of group_advantages, bit for bit.
"""
import inspect
import math
import random

import pytest
import torch

import sapo_reference as ref
import sapo_torch as st

NORMS = ("std", "std_floor", "none", "loo", "batch_std")


def close(a, b, tol):
    """|a - b| <= tol (1 + |b|) everywhere, same shape."""
    a, b = a.detach().double(), b.detach().double()
    return a.shape == b.shape and bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def same_stats(got, want, adv):
    """(6, K) statistics: rows 0-1 to 1e-12, counts (rows 3-5) exactly, advantage_std (row 2)
    through the variance, whose rounding error is relative to E[A^2] <= max A^2."""
    max_a2 = float(adv.double().pow(2).max()) if adv.numel() else 0.0
    return (got.shape == want.shape and close(got[:2], want[:2], 1e-12) and torch.equal(got[3:], want[3:])
            and bool(((got[2] ** 2 - want[2] ** 2).abs() <= 1e-12 * max_a2 + 1e-300).all()))


def make_batch(seed=11, B=17, K=3, n_groups=6):
    """Unequal explicit groups with a singleton (group 4) and an empty group (5), absent steps
    (NaN), continuous and tied rewards."""
    rng = random.Random(seed)
    rewards = torch.tensor([[math.nan if rng.random() < 0.15 else
                             (3 * rng.random() - 1 if rng.random() < 0.4 else 0.5 * rng.randrange(3))
                             for _ in range(K)] for _ in range(B)], dtype=torch.float64)
    ids = torch.tensor([4 if i == 6 else rng.randrange(4) for i in range(B)])
    return rewards, ids, n_groups


def run_ranks(shards, n_groups, opts):
    """The protocol over hand-made ranks. shards: per rank (rewards, layout kwargs). Returns
    per rank (adv, stats after finish_advantage_std)."""
    parts = [st.group_partials(r, n_groups=n_groups, **lay) for r, lay in shards]
    # Round 1 all-reduce: count, sum -> SUM; min -> MIN; max -> MAX.
    count = torch.stack([p.count for p in parts]).sum(0)
    total = torch.stack([p.sum for p in parts]).sum(0)
    lo = torch.stack([p.min for p in parts]).amin(0)
    hi = torch.stack([p.max for p in parts]).amax(0)
    # Round 2 all-reduce: SUM.
    sq_dev = torch.stack([st.group_deviations(r, n_groups=n_groups, count=count, sum=total, **lay)
                          for r, lay in shards]).sum(0)
    fins = [st.finalize_group_advantages(r, n_groups=n_groups, count=count, sum=total, min=lo, max=hi,
                                         sq_dev=sq_dev, **lay, **opts) for r, lay in shards]
    a_sums = torch.stack([f.advantage_sums for f in fins]).sum(0)
    return [(f.adv, st.finish_advantage_std(f.stats, a_sums)) for f in fins]


OPTION_SETS = [dict(norm=n, unbiased_std=u, singleton="zero" if u else "raw", eps=1e-3)
               for n in NORMS for u in (True, False)]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: f"{o['norm']}-{'unbiased' if o['unbiased_std'] else 'biased'}")
def test_scattered_rows_over_three_ranks_equal_the_single_process_advantages(opts):
    rewards, ids, n = make_batch()
    rng = random.Random(3)
    owner = torch.tensor([0, 1, 2] + [rng.randrange(3) for _ in range(rewards.shape[0] - 3)])
    rows = [(owner == q).nonzero().squeeze(1) for q in range(3)]
    single = st.group_advantages(rewards, group_ids=ids, n_groups=n, **opts)
    want_adv, want_stats = ref.group_advantages(rewards.tolist(), ids.tolist(), n, norm=opts["norm"],
                                                unbiased=opts["unbiased_std"], eps=opts["eps"],
                                                singleton=opts["singleton"])
    got = run_ranks([(rewards[m], dict(group_ids=ids[m])) for m in rows], n, opts)
    for (adv, stats), m in zip(got, rows):
        assert adv.dtype == torch.float64 and adv.shape == (len(m), 3)
        assert close(adv, single.adv[m], 1e-12)
        assert close(adv, torch.tensor(want_adv, dtype=torch.float64)[m], 1e-12)
        assert same_stats(stats, single.stats, single.adv)
        assert stats[3].tolist() == [float(x) for x in want_stats["n_present"]]
        assert stats[5].tolist() == [float(x) for x in want_stats["n_pairs"]]
        assert stats[4].tolist() == [float(x) for x in want_stats["n_zero_variance"]]


@pytest.mark.parametrize("opts", OPTION_SETS[::3], ids=lambda o: o["norm"])
def test_contiguous_groups_straddling_ranks_and_an_empty_rank(opts):
    rewards, _, _ = make_batch(seed=5, B=20)
    G, n = 4, 5
    cuts = [(0, 7), (7, 7), (7, 13), (13, 20)]  # groups 1 and 3 straddle; rank 1 holds no rows
    single = st.group_advantages(rewards, group_size=G, **opts)
    got = run_ranks([(rewards[a:b], dict(group_size=G, first_row=a)) for a, b in cuts], n, opts)
    for (adv, stats), (a, b) in zip(got, cuts):
        assert adv.shape == (b - a, 3)
        assert close(adv, single.adv[a:b], 1e-12)
        assert same_stats(stats, single.stats, single.adv)


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: f"{o['norm']}-{o['unbiased_std']}")
def test_one_rank_with_the_whole_batch_is_group_advantages_bit_for_bit(opts):
    rewards, ids, n = make_batch(seed=8)
    single = st.group_advantages(rewards, group_ids=ids, n_groups=n, **opts)
    (adv, stats), = run_ranks([(rewards, dict(group_ids=ids))], n, opts)
    assert torch.equal(adv, single.adv)
    assert torch.equal(stats, single.stats)


def test_float32_and_bfloat16_rewards_keep_their_dtype():
    rewards, ids, n = make_batch(seed=9)
    halves = [torch.arange(0, 9), torch.arange(9, rewards.shape[0])]
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        r = rewards.to(dtype)
        single = st.group_advantages(r, group_ids=ids, n_groups=n)
        got = run_ranks([(r[m], dict(group_ids=ids[m])) for m in halves], n, {})
        for (adv, _), m in zip(got, halves):
            assert adv.dtype == dtype
            assert close(adv, single.adv[m], tol)


def test_round_one_arrays_equal_plain_python_counts():
    rewards, ids, n = make_batch(seed=2)
    p = st.group_partials(rewards, group_ids=ids, n_groups=n)
    K = rewards.shape[1]
    assert p.count.dtype == torch.int64 and p.sum.dtype == p.min.dtype == p.max.dtype == torch.float64
    assert all(t.shape == (n + 1, K) for t in p)
    for g in range(n + 1):  # row n: the whole batch
        for k in range(K):
            vals = [float(rewards[i, k]) for i in range(rewards.shape[0])
                    if (g == n or int(ids[i]) == g) and not math.isnan(float(rewards[i, k]))]
            assert int(p.count[g, k]) == len(vals)
            assert math.isclose(float(p.sum[g, k]), math.fsum(vals), rel_tol=1e-13, abs_tol=1e-13)
            assert float(p.min[g, k]) == (min(vals) if vals else math.inf)
            assert float(p.max[g, k]) == (max(vals) if vals else -math.inf)
    assert int(p.count[5].sum()) == 0  # the empty group


def test_round_two_is_the_sum_of_squared_deviations_from_the_given_means():
    rewards, ids, n = make_batch(seed=4)
    p = st.group_partials(rewards, group_ids=ids, n_groups=n)
    sq = st.group_deviations(rewards, group_ids=ids, n_groups=n, count=p.count, sum=p.sum)
    for g in range(n + 1):
        for k in range(rewards.shape[1]):
            vals = [float(rewards[i, k]) for i in range(rewards.shape[0])
                    if (g == n or int(ids[i]) == g) and not math.isnan(float(rewards[i, k]))]
            mu = math.fsum(vals) / len(vals) if vals else 0.0
            assert math.isclose(float(sq[g, k]), math.fsum((v - mu) ** 2 for v in vals), rel_tol=1e-12,
                                abs_tol=1e-12)


def test_finish_advantage_std_is_the_population_std_from_the_sums():
    K = 3
    stats = torch.zeros(6, K, dtype=torch.float64)
    stats[0] = torch.tensor([0.1, 0.2, 0.3])  # rows other than advantage_std come back unchanged
    stats[2] = torch.tensor([9.0, 9.0, 9.0])  # a stale local value, replaced
    stats[3] = torch.tensor([4.0, 0.0, 2.0])  # n_present; step 1 has none
    a = [[1.0, -2.0, 0.5, 0.5], [], [3.0, 3.0]]
    sums = torch.tensor([[math.fsum(x) for x in a], [math.fsum(v * v for v in x) for x in a]], dtype=torch.float64)
    out = st.finish_advantage_std(stats, sums)
    want = []
    for x in a:
        if not x:
            want.append(0.0)
            continue
        mu = sum(x) / len(x)
        want.append(math.sqrt(sum((v - mu) ** 2 for v in x) / len(x)))
    assert close(out[2], torch.tensor(want, dtype=torch.float64), 1e-14)
    assert torch.equal(out[[0, 1, 3, 4, 5]], stats[[0, 1, 3, 4, 5]])
    assert float(stats[2, 0]) == 9.0  # the input is not modified


def test_loss_counts_equal_plain_python_counts():
    rng = random.Random(7)
    B, T = 9, 13
    mask = [[int(rng.random() < 0.6) for _ in range(T)] for _ in range(B)]
    mask[2] = [0] * T  # an empty row
    step = [[rng.randrange(-1, 4) for _ in range(T)] for _ in range(B)]
    tokens = sum(map(sum, mask))
    sequences = sum(1 for row in mask if any(row))
    steps = sum(len({s for s, m in zip(srow, mrow) if m and s >= 0}) for srow, mrow in zip(step, mask))
    for m_dtype in (torch.bool, torch.uint8, torch.float32, torch.int64):
        got = st.loss_counts(torch.tensor(mask, dtype=m_dtype), torch.tensor(step))
        assert got.dtype == torch.int64 and got.tolist() == [tokens, sequences, steps, B]
    assert st.loss_counts(torch.tensor(mask)).tolist() == [tokens, sequences, 0, B]
    assert st.LOSS_COUNT_NAMES == ("tokens", "sequences", "steps", "rows")
    assert st.loss_counts(torch.zeros(0, 5)).tolist() == [0, 0, 0, 0]


def test_phase_ops_record_no_graph():
    rewards, ids, n = make_batch()
    r = rewards.clone().requires_grad_(True)
    p = st.group_partials(r, group_ids=ids, n_groups=n)
    fin = st.finalize_group_advantages(r, group_ids=ids, n_groups=n, count=p.count, sum=p.sum, min=p.min, max=p.max,
                                       sq_dev=st.group_deviations(r, group_ids=ids, n_groups=n, count=p.count,
                                                                  sum=p.sum))
    assert not fin.adv.requires_grad and not p.sum.requires_grad


# ------------------------------------------------------------------------------ the Python surface
WRAPPED = {
    "group_partials": st.group_partials,
    "group_deviations": st.group_deviations,
    "finalize_group_advantages": st.finalize_group_advantages,
    "finish_advantage_std": st.finish_advantage_std,
    "loss_counts": st.loss_counts,
}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_wrapper_arguments_match_the_operator_schema(name):
    schema = getattr(torch.ops.sapo, name).default._schema
    params = inspect.signature(WRAPPED[name]).parameters
    assert [a.name for a in schema.arguments] == [p for p in params]
    for a in schema.arguments:
        p = params[a.name]
        assert (p.kind == inspect.Parameter.KEYWORD_ONLY) == a.kwarg_only, a.name
        if a.default_value is None and p.default is inspect.Parameter.empty:
            continue  # required in both (None also stands for a Tensor? default of None)
        want = a.default_value
        got = p.default
        assert got == want and (got is None) == (want is None), f"{name}({a.name}): python {got!r}, op {want!r}"


# ------------------------------------------------------------------------------ errors
R, IDS, N = make_batch()
P = st.group_partials(R, group_ids=IDS, n_groups=N)
SQ = st.group_deviations(R, group_ids=IDS, n_groups=N, count=P.count, sum=P.sum)
FULL = dict(count=P.count, sum=P.sum, min=P.min, max=P.max, sq_dev=SQ)
BAD_IDS = IDS.clone()
BAD_IDS[3] = N
INF_R = R.clone()
INF_R[2, 1] = math.inf
NEG_COUNT = P.count.clone()
NEG_COUNT[0, 0] = -1


def _finalize(**over):
    args = dict(FULL, **over)
    return st.finalize_group_advantages(R, group_ids=IDS, n_groups=N, **args)


ERROR_CASES = [
    ("rewards 1-D", lambda: st.group_partials(R[:, 0], group_ids=IDS, n_groups=N), ["rewards", "2-D", "(17)"]),
    ("rewards dtype", lambda: st.group_partials(R.long(), group_ids=IDS, n_groups=N), ["rewards", "floating", "int64"]),
    ("rewards K = 0", lambda: st.group_partials(R[:, :0], group_ids=IDS, n_groups=N), ["rewards", "[1, 64]", "(17, 0)"]),
    ("group_ids shape", lambda: st.group_partials(R, group_ids=IDS[:-1], n_groups=N), ["group_ids", "(17)", "(16)"]),
    ("group_ids dtype", lambda: st.group_partials(R, group_ids=IDS.double(), n_groups=N), ["group_ids", "integer", "float64"]),
    ("group_ids value", lambda: st.group_partials(R, group_ids=BAD_IDS, n_groups=N),
     ["group_ids", "[0, 6)", "6 at response 3"]),
    ("n_groups", lambda: st.group_partials(R, group_ids=IDS), ["n_groups", "> 0", "got 0"]),
    ("both layouts", lambda: st.group_partials(R, 4, IDS, N), ["group_size", "group_ids", "not both"]),
    ("first_row with ids", lambda: st.group_partials(R, group_ids=IDS, n_groups=N, first_row=3), ["first_row", "group_ids", "got 3"]),
    ("first_row outside", lambda: st.group_partials(R, group_size=4, n_groups=5, first_row=4),
     ["first_row", "rows [4, 21)", "global rows < 20"]),
    ("Inf reward", lambda: st.group_partials(INF_R, group_ids=IDS, n_groups=N), ["rewards", "finite", "(2, 1)", "inf"]),
    ("count shape", lambda: st.group_deviations(R, group_ids=IDS, n_groups=N, count=P.count[:-1], sum=P.sum),
     ["count", "(n_groups + 1, K) = (7, 3)", "(6, 3)"]),
    ("count dtype", lambda: st.group_deviations(R, group_ids=IDS, n_groups=N, count=P.count.double(), sum=P.sum),
     ["count", "integer", "float64"]),
    ("count negative", lambda: st.group_deviations(R, group_ids=IDS, n_groups=N, count=NEG_COUNT, sum=P.sum),
     ["count", ">= 0", "-1 at entry 0"]),
    ("sum shape", lambda: st.group_deviations(R, group_ids=IDS, n_groups=N, count=P.count, sum=P.sum.t()),
     ["sum", "(7, 3)", "(3, 7)"]),
    ("sum dtype", lambda: st.group_deviations(R, group_ids=IDS, n_groups=N, count=P.count, sum=P.count),
     ["sum", "floating", "int64"]),
    ("partials of another n_groups", lambda: st.group_deviations(R, group_ids=IDS, n_groups=N + 1, count=P.count, sum=P.sum),
     ["count", "(8, 3)", "(7, 3)"]),
    ("min shape", lambda: _finalize(min=P.min[:, :2]), ["min", "(7, 3)", "(7, 2)"]),
    ("max shape", lambda: _finalize(max=P.max[0]), ["max", "(7, 3)", "(3)"]),
    ("sq_dev shape", lambda: _finalize(sq_dev=torch.zeros(8, 3, dtype=torch.float64)), ["sq_dev", "(7, 3)", "(8, 3)"]),
    ("norm", lambda: st.finalize_group_advantages(R, group_ids=IDS, n_groups=N, norm="x", **FULL), ["norm", "'std'", "'x'"]),
    ("eps", lambda: st.finalize_group_advantages(R, group_ids=IDS, n_groups=N, eps=0.0, **FULL), ["eps", "> 0", "0"]),
    ("stats shape", lambda: st.finish_advantage_std(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(2, 3)),
     ["stats", "(6, K)", "(5, 3)"]),
    ("advantage_sums shape", lambda: st.finish_advantage_std(torch.zeros(6, 3, dtype=torch.float64), torch.zeros(2, 4)),
     ["advantage_sums", "(2, K) = (2, 3)", "(2, 4)"]),
    ("loss_counts mask 1-D", lambda: st.loss_counts(torch.ones(5)), ["mask", "2-D", "(5)"]),
    ("loss_counts step shape", lambda: st.loss_counts(torch.ones(2, 5), torch.zeros(2, 4, dtype=torch.int32)),
     ["step", "(2, 5)", "(2, 4)"]),
    ("loss_counts mask value", lambda: st.loss_counts(torch.full((2, 5), 2.0)), ["mask", "0 or 1", "got 2"]),
    ("loss_counts step id", lambda: st.loss_counts(torch.ones(2, 5), torch.full((2, 5), 64)), ["step", "[-1, 64)", "64"]),
]


@pytest.mark.parametrize("what,call,parts", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_names_the_tensor_and_both_shapes(what, call, parts):
    with pytest.raises(RuntimeError) as e:
        call()
    msg = str(e.value)
    for part in parts:
        assert part in msg, f"{what}: {part!r} not in {msg!r}"
