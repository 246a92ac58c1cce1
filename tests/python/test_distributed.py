"""sapo_torch.distributed with real processes: two ranks started as subprocesses (this file
is also their program), each in a gloo process group (torch.distributed, file:// store in a
temporary folder). Both draw the same random batch from one seed and take their rows of it
(groups straddle the ranks); every rank checks that its advantages, the loss summed over the
ranks (through dist.all_reduce) and its gradient rows equal the single-process results of
sapo_torch.group_advantages / policy_loss on the whole batch.

The ranks add partial sums in another order than one process does: advantages and losses
agree to 1e-12 relative (float32 advantages: one float rounding, 1e-6). A worker records
every failed check and goes on, so that both ranks make the same collectives and neither
is left waiting; it exits 1 if any check failed.
"""
import datetime
import math
import os
import random
import subprocess
import sys

import pytest
import torch

WORLD = 2
NORMS = ("std", "std_floor", "none", "loo", "batch_std")
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "step_mean")


def test_two_ranks_over_gloo(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # sapo_torch as the parent sees it
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(store)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            out += "\n(timed out)"
        outputs.append(out)
    report = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{o}" for r, (p, o) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    assert all("0 failed" in o for o in outputs), report


# ------------------------------------------------------------------------------ the worker

class Checks:
    def __init__(self, rank):
        self.rank, self.n, self.failed = rank, 0, []

    def __call__(self, ok, what):
        self.n += 1
        if not bool(ok):
            self.failed.append(what)
            print(f"rank {self.rank}: FAILED: {what}", flush=True)


def close(a, b, tol):
    """|a - b| <= tol (1 + |b|) everywhere."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def same_stats(got, want, adv):
    """(6, K) statistics: rows to 1e-12, counts exactly, advantage_std (row 2) through the
    variance: sqrt(E[A^2] - E[A]^2) carries rounding error relative to E[A^2] <= max A^2."""
    max_a2 = float(adv.double().pow(2).max()) if adv.numel() else 0.0
    return (got.shape == want.shape and close(got[:2], want[:2], 1e-12) and torch.equal(got[3:], want[3:])
            and bool(((got[2] ** 2 - want[2] ** 2).abs() <= 1e-12 * max_a2 + 1e-300).all()))


def make_batch():
    """The shared batch (same seed in every process): explicit unequal groups with a singleton
    (group 5) and an empty group (6), absent steps, continuous and tied rewards; a loss
    problem with prompt / padding, an empty response and steps along each response."""
    rng = random.Random(20260105)
    B, K, T, n_groups = 24, 3, 19, 7
    rewards = torch.tensor([[math.nan if rng.random() < 0.15 else
                             (3 * rng.random() - 1 if rng.random() < 0.3 else 0.5 * rng.randrange(3))
                             for _ in range(K)] for _ in range(B)], dtype=torch.float64)
    ids = torch.tensor([5 if i == 7 else rng.randrange(5) for i in range(B)])
    owner = torch.tensor([0, 1] + [rng.randrange(WORLD) for _ in range(B - 2)])
    logp = torch.tensor([[-4 * rng.random() - 0.05 for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    old_logp = logp + 0.3 * (torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.5)
    mask = torch.zeros(B, T, dtype=torch.bool)
    step = torch.full((B, T), -1, dtype=torch.int32)
    for i in range(B):
        start, length = rng.randrange(4), (0 if i == 3 else 1 + rng.randrange(14))
        s = 0
        for t in range(start, min(T, start + length)):
            mask[i, t] = True
            if s < K and rng.random() < 0.3:
                s += 1
            step[i, t] = s if s < K else -1
    return dict(B=B, K=K, T=T, n_groups=n_groups, rewards=rewards, ids=ids, owner=owner, logp=logp,
                old_logp=old_logp, mask=mask, step=step)


def check_advantages(check, b, rank, st, sd):
    mine = (b["owner"] == rank).nonzero().squeeze(1)
    r, ids, n = b["rewards"], b["ids"], b["n_groups"]
    for norm in NORMS:
        for unbiased in (True, False):
            opts = dict(norm=norm, unbiased_std=unbiased, singleton="zero" if unbiased else "raw", eps=1e-3)
            what = f"norm {norm}, unbiased {unbiased}"
            single = st.group_advantages(r, group_ids=ids, n_groups=n, **opts)
            got = sd.group_advantages(r[mine], group_ids=ids[mine], n_groups=n, **opts)
            check(close(got.adv, single.adv[mine], 1e-12), f"explicit ids, advantages, {what}")
            check(same_stats(got.stats, single.stats, single.adv), f"explicit ids, statistics, {what}")

            single_f = st.group_advantages(r.float(), group_ids=ids, n_groups=n, **opts)
            got_f = sd.group_advantages(r.float()[mine], group_ids=ids[mine], n_groups=n, **opts)
            check(got_f.adv.dtype == torch.float32 and close(got_f.adv, single_f.adv[mine], 1e-6),
                  f"float32 advantages, {what}")

            # Contiguous groups of 4: rank 0 rows [0, 10), rank 1 [10, 24); group 2 straddles.
            first, count = (0, 10) if rank == 0 else (10, b["B"] - 10)
            single_c = st.group_advantages(r, group_size=4, **opts)
            got_c = sd.group_advantages(r[first:first + count], group_size=4, first_row=first, n_groups=b["B"] // 4,
                                        **opts)
            check(close(got_c.adv, single_c.adv[first:first + count], 1e-12), f"contiguous, advantages, {what}")
            check(same_stats(got_c.stats, single_c.stats, single_c.adv), f"contiguous, statistics, {what}")

    r1 = r[:, 0].contiguous()
    single_o = st.outcome_advantages(r1, group_ids=ids, n_groups=n)
    got_o = sd.outcome_advantages(r1[mine], group_ids=ids[mine], n_groups=n)
    check(close(got_o.adv, single_o.adv[mine], 1e-12), "outcome advantages")

    rows = b["B"] if rank == 1 else 0  # rank 0 holds nothing
    single_e = st.group_advantages(r, group_ids=ids, n_groups=n)
    got_e = sd.group_advantages(r[:rows], group_ids=ids[:rows], n_groups=n)
    check(got_e.adv.shape == (rows, b["K"]) and close(got_e.adv, single_e.adv[:rows], 1e-12), "empty rank, advantages")
    check(same_stats(got_e.stats, single_e.stats, single_e.adv), "empty rank, statistics")


def check_loss(check, b, rank, st, sd, dist):
    mine = (b["owner"] == rank).nonzero().squeeze(1)
    adv_all = st.group_advantages(b["rewards"], group_ids=b["ids"], n_groups=b["n_groups"]).adv
    adv_mine = sd.group_advantages(b["rewards"][mine], group_ids=b["ids"][mine], n_groups=b["n_groups"]).adv
    cases = [dict(agg=a, ratio=q) for a in AGGS for q in ("token", "step")]
    cases.append(dict(agg="step_mean", ratio="token", nonfinite="mask"))  # counts from a forward pass
    for opts in cases:
        what = ", ".join(f"{k} {v}" for k, v in opts.items())
        logp_all = b["logp"].clone()
        if "nonfinite" in opts:
            for i in (0, 1):  # a dropped token on each rank (rows 0 and 1 belong to ranks 0 and 1)
                logp_all[i, int(b["mask"][i].nonzero()[0, 0])] = math.nan
        logp_all.requires_grad_(True)
        single = st.policy_loss(logp_all, b["old_logp"], b["mask"], step_advantages=adv_all, step=b["step"], **opts)
        single.loss.backward()

        logp = logp_all.detach()[mine].clone().requires_grad_(True)
        out = sd.policy_loss(logp, b["old_logp"][mine], b["mask"][mine], step_advantages=adv_mine,
                             step=b["step"][mine], **opts)
        out.loss.backward()
        total = out.loss.detach().reshape(1).clone()
        dist.all_reduce(total)
        check(close(total, single.loss.detach().reshape(1), 1e-12), f"loss summed over the ranks, {what}")
        grad_all = torch.nan_to_num(logp_all.grad[mine], nan=0.0)
        check(close(torch.nan_to_num(logp.grad, nan=0.0), grad_all, 1e-12), f"gradient rows, {what}")

    # The counts alone, against the single-process kernel's.
    c = sd.loss_counts(b["mask"][mine], b["step"][mine])
    d = st.policy_loss(b["logp"], b["old_logp"], b["mask"], step_advantages=adv_all, step=b["step"]).as_dict()
    check((c["tokens"], c["sequences"], c["steps"], c["rows"]) ==
          (int(d["n_tokens"]), int(d["n_sequences"]), int(d["n_steps"]), b["B"]), f"loss_counts {c} vs {d}")


def check_errors(check, b, rank, sd, dist):
    """A bad input on one rank raises on both, and the group stays in step."""
    r = b["rewards"].clone()
    if rank == 1:
        r[2, 1] = math.inf
    try:
        sd.group_advantages(r, group_ids=b["ids"], n_groups=b["n_groups"])
        check(False, "an Inf reward on rank 1 did not raise")
    except RuntimeError as e:
        check(("rewards" if rank == 1 else "other rank") in str(e), f"message: {e}")
    try:
        sd.loss_counts(b["mask"].int() * (2 if rank == 0 else 1), b["step"])
        check(False, "a bad mask on rank 0 did not raise")
    except RuntimeError as e:
        check(("mask" if rank == 0 else "other rank") in str(e), f"message: {e}")
    one = torch.ones(1)
    dist.all_reduce(one)
    check(float(one) == WORLD, "the process group is still in step")


def worker(rank, store):
    import torch.distributed as dist

    import sapo_torch as st
    import sapo_torch.distributed as sd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    check = Checks(rank)
    b = make_batch()
    for part in (lambda: check_advantages(check, b, rank, st, sd), lambda: check_loss(check, b, rank, st, sd, dist),
                 lambda: check_errors(check, b, rank, sd, dist)):
        try:
            part()
        except Exception as e:  # record and go on: the other rank is waiting in the same collectives
            check(False, f"unexpected {type(e).__name__}: {e}")
    dist.destroy_process_group()
    print(f"rank {rank}: {check.n} checks, {len(check.failed)} failed", flush=True)
    return 0 if not check.failed else 1


if __name__ == "__main__":
    sys.exit(worker(int(sys.argv[1]), sys.argv[2]))
