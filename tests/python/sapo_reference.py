"""Independent reference implementations for the Python tests, written from ../shared/SPEC.md
and docs/decisions.md, not from the kernels:

* the policy loss op by op in PyTorch (autograd gives the reference gradient; the
  stop-gradient of the step / sequence ratio is written with .detach());
* segmentation, step rewards, group advantages and the token broadcast as plain Python
  loops over lists (float64 arithmetic, one obvious loop per formula);
* a random batch generator with the structure of tests/support.hpp (prompt prefix, thinking
  tokens, SID tokens, random defects, eos, trailing text, padding).

The C++ tests draw their batches from std::mt19937_64 through libstdc++'s distributions, whose
algorithms are implementation details; reproducing those exact numbers in Python is not worth
the fragility, so this generator draws the same *kinds* of batches (same vocabulary, layouts,
defect rates, sizes and edge cases) from Python's `random` with fixed seeds.
"""
import math
import random

import torch

# ----------------------------------------------------------------------------- vocabulary
# As tests/support.hpp: thought tokens 0..49, think_end 50, eos 51, SID level k in
# [100 + 10 k, 110 + 10 k).
THINK_END, EOS, SID_BASE, LEVEL_WIDTH = 50, 51, 100, 10


def level_lo(k):
    return SID_BASE + LEVEL_WIDTH * k


def per_level_ranges(K):
    return [(level_lo(k), level_lo(k) + LEVEL_WIDTH) for k in range(K)]


def random_tokens(rng, K, B, T, think_then_sid=False, per_level=True, defect_rate=0.3):
    """(tokens, mask) as lists of lists; mask 0 on a prompt prefix and on padding."""
    def sid(level, c):
        return level_lo(level) + c if per_level else SID_BASE + c

    tokens, mask = [], []
    for _ in range(B):
        ids, m = [0] * T, [0] * T
        t = rng.randint(0, 4)
        for p in range(min(t, T)):
            ids[p] = rng.randint(0, 49)  # prompt, mask 0

        def put(tok):
            nonlocal t
            if t < T:
                ids[t] = tok
                m[t] = 1
            t += 1

        defect = rng.random() < defect_rate
        steps = rng.randint(0, K + 1) if defect and rng.random() < 0.3 else K
        sids = []
        for k in range(steps):
            level = k if k < K else K - 1
            if defect and rng.random() < 0.2:
                level = (level + 1) % K  # wrong level
            sids.append(sid(level, rng.randint(0, 9)))
        if not think_then_sid:
            for s in sids:
                for _ in range(rng.randint(0, 3)):
                    put(rng.randint(0, 49))
                put(s)
        else:
            blocks = rng.randint(0, K + 1) if defect and rng.random() < 0.3 else K
            for _ in range(blocks):
                for _ in range(rng.randint(0, 3)):
                    put(sid(0, 1) if defect and rng.random() < 0.1 else rng.randint(0, 49))
                put(THINK_END)
            for s in sids:
                put(s)
        if rng.random() < 0.5:
            put(EOS)
        if rng.random() < 0.2:
            put(rng.randint(0, 49))  # trailing text
        for p in range(t, T):
            ids[p] = sid(0, 2)  # padding: junk ids under mask 0
        tokens.append(ids)
        mask.append(m)
    return tokens, mask


# ----------------------------------------------------------------------------- §1 segmentation
def _range_of(tok, level, ranges):
    """Index of the SID range holding tok (the current level's range wins), or -1."""
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return 0 if lo <= tok < hi else -1
    if 0 <= level < len(ranges) and ranges[level][0] <= tok < ranges[level][1]:
        return level
    for j, (lo, hi) in enumerate(ranges):
        if lo <= tok < hi:
            return j
    return -1


def _bad_sid(rng_idx, level, code, ranges, codes_per_level):
    if len(ranges) != 1 and rng_idx != level:
        return True  # SID token at the wrong level
    if codes_per_level and code >= codes_per_level[level]:
        return True  # outside the catalogue
    return False


def segment(tokens, mask, K, ranges, think_then_sid=False, think_end=-1, codes_per_level=(),
            sid_token_in_step=True, tail_last_step=False):
    """decisions.md "Segmentation": returns (step, n_steps, codes, malformed) as lists."""
    tail_id = K - 1 if tail_last_step else -1
    steps, n_steps, codes, malformed = [], [], [], []
    for ids, m in zip(tokens, mask):
        T = len(ids)
        st = [-1] * T
        cd = [-1] * K
        bad = False
        k = 0
        if not think_then_sid:
            for t in range(T):
                if m[t] != 1:
                    continue
                r = _range_of(ids[t], k if k < K else -1, ranges)
                if k < K:
                    st[t] = k
                    if r >= 0:
                        code = ids[t] - ranges[r][0]
                        cd[k] = code
                        bad = bad or _bad_sid(r, k, code, ranges, codes_per_level)
                        k += 1
                else:
                    st[t] = tail_id
                    if r >= 0:
                        bad = True  # extra boundary
            if k < K:
                bad = True  # unfinished step
        else:
            j = 0
            for t in range(T):
                if m[t] != 1:
                    continue
                tok = ids[t]
                if k < K:
                    st[t] = k
                    if tok == think_end:
                        k += 1
                    elif _range_of(tok, k, ranges) >= 0:
                        bad = True  # SID token before the K-th think_end
                else:
                    if tok == think_end:
                        st[t] = tail_id
                        bad = True
                        continue
                    r = _range_of(tok, j if j < K else -1, ranges)
                    if r >= 0 and j < K:
                        st[t] = j if sid_token_in_step else -1
                        code = tok - ranges[r][0]
                        cd[j] = code
                        bad = bad or _bad_sid(r, j, code, ranges, codes_per_level)
                        j += 1
                    else:
                        st[t] = tail_id
                        if r >= 0:
                            bad = True
            if k < K or j < K:
                bad = True
        steps.append(st)
        n_steps.append(k)
        codes.append(cd)
        malformed.append(bad)
    return steps, n_steps, codes, malformed


# ----------------------------------------------------------------------------- §2 rewards
def step_rewards(codes, malformed, targets, kind="prefix", weights=(), malformed_reward=0.0):
    out = []
    for cd, bad, y in zip(codes, malformed, targets):
        K = len(cd)
        if bad:
            out.append([malformed_reward] * K)
            continue
        exact = all(a == b for a, b in zip(cd, y))
        row, prefix = [], 1.0
        for k in range(K):
            hit = 1.0 if cd[k] == y[k] else 0.0
            prefix *= hit
            row.append({"per_level": hit, "prefix": prefix, "exact": 1.0 if exact else 0.0,
                        "weighted_prefix": (weights[k] * prefix) if weights else 0.0}[kind])
        out.append(row)
    return out


# ----------------------------------------------------------------------------- §3 advantages
def _mean(v):
    return sum(v) / len(v)


def _std(v, unbiased):
    mu = _mean(v)
    return math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1 if unbiased else len(v)))


def group_advantages(rewards, group_of, n_groups, norm="std", unbiased=True, eps=1e-6, singleton="zero"):
    """rewards: list of rows (NaN = absent); group_of: list of ids. Returns (A, stats) where
    stats = dict name -> list per step."""
    B = len(rewards)
    K = len(rewards[0]) if B else 0
    A = [[0.0] * K for _ in range(B)]
    zero_pairs, pairs = [0] * K, [0] * K
    for k in range(K):
        present = [rewards[i][k] for i in range(B) if not math.isnan(rewards[i][k])]
        sigma_batch = _std(present, unbiased) if len(present) >= 2 else 0.0
        for g in range(n_groups):
            idx = [i for i in range(B) if group_of[i] == g and not math.isnan(rewards[i][k])]
            r = [rewards[i][k] for i in idx]
            n = len(r)
            if n == 0:
                continue
            pairs[k] += 1
            if n == 1:
                zero_pairs[k] += 1
                A[idx[0]][k] = r[0] if singleton == "raw" else 0.0
                continue
            if max(r) == min(r):
                zero_pairs[k] += 1
                continue
            mu, sigma, total = _mean(r), _std(r, unbiased), sum(r)
            for i, x in zip(idx, r):
                if norm == "std":
                    a = (x - mu) / (sigma + eps)
                elif norm == "std_floor":
                    a = (x - mu) / max(sigma, eps)
                elif norm == "none":
                    a = x - mu
                elif norm == "loo":
                    a = x - (total - x) / (n - 1)
                elif norm == "batch_std":
                    a = (x - mu) / (sigma_batch + eps)
                else:
                    raise ValueError(norm)
                A[i][k] = a
    stats = {"mean_reward": [], "zero_variance_fraction": [], "advantage_std": [], "n_present": [],
             "n_zero_variance": zero_pairs, "n_pairs": pairs}
    for k in range(K):
        rows = [i for i in range(B) if not math.isnan(rewards[i][k])]
        stats["n_present"].append(len(rows))
        if not rows:
            stats["mean_reward"].append(0.0)
            stats["zero_variance_fraction"].append(0.0)
            stats["advantage_std"].append(0.0)
            continue
        stats["mean_reward"].append(_mean([rewards[i][k] for i in rows]))
        stats["zero_variance_fraction"].append(zero_pairs[k] / pairs[k] if pairs[k] else 0.0)
        stats["advantage_std"].append(_std([A[i][k] for i in rows], unbiased=False))
    return A, stats


def broadcast(A, step, mask):
    return [[A[i][s] if (m == 1 and s >= 0) else 0.0 for s, m in zip(step[i], mask[i])] for i in range(len(step))]


# ----------------------------------------------------------------------------- §4-6 loss
def policy_loss(logp, old_logp, mask, adv, step=None, ref_logp=None, *, ratio="token", clip_low=0.2,
                clip_high=0.2, dual_clip=False, dual_clip_c=3.0, kl_coef=0.0, kl="k3", agg="token_mean",
                max_response_length=0.0, global_tokens=0.0, global_sequences=0.0, global_steps=0.0):
    """Op-by-op loss on (B, T) tensors; adv = token advantages (B, T). Differentiable in logp.
    Returns (loss, diagnostics dict)."""
    B, T = logp.shape
    m = mask.to(logp.dtype)
    mb = m > 0
    delta = torch.clamp(logp - old_logp, -20.0, 20.0)
    token_ratio = torch.exp(delta)
    if ratio == "token":
        rho = token_ratio
    else:
        # Groups of tokens that share one ratio: a step (ids >= 0) or the whole response.
        if ratio == "step":
            gid = step.long()
        else:
            gid = torch.zeros(B, T, dtype=torch.long)
        in_group = mb & (gid >= 0)
        G = int(gid.max().item()) + 1 if gid.numel() else 1
        G = max(G, 1)
        onehot = torch.nn.functional.one_hot(gid.clamp(min=0), G).to(logp.dtype) * in_group.unsqueeze(-1)
        d = delta.detach()
        sums = torch.einsum("bt,btg->bg", d, onehot)
        counts = onehot.sum(1)
        sbar = sums / counts.clamp(min=1)
        sbar_tok = torch.einsum("bg,btg->bt", sbar, onehot)
        # sg(exp(sbar)) * exp(logp - sg(logp)): value exp(sbar), d rho / d logp = rho
        grouped = torch.exp(sbar_tok) * torch.exp(logp - logp.detach())
        rho = torch.where(in_group, grouped, token_ratio)
    a = adv.to(logp.dtype)
    l1 = -a * rho
    l2 = -a * torch.clamp(rho, 1.0 - clip_low, 1.0 + clip_high)
    l = torch.where(l1 >= l2, l1, l2)  # ties: the unclipped branch
    clipped = l2 > l1
    dual = torch.zeros_like(mb)
    if dual_clip:
        cap = -a * dual_clip_c
        dual = (a < 0) & (cap < l)
        l = torch.where(dual, cap, l)
    k = torch.zeros_like(logp)
    if ref_logp is not None:
        D = ref_logp - logp
        if kl == "k1":
            k = -D
        elif kl == "k2":
            k = 0.5 * D * D
        else:
            Dc = torch.clamp(D, -20.0, 20.0)
            k = torch.clamp(torch.exp(Dc) - Dc - 1.0, -10.0, 10.0)
    if kl_coef != 0.0:
        l = l + kl_coef * k
    lm = torch.where(mb, l, torch.zeros_like(l))  # masked tokens: exactly nothing (not 0 * NaN)

    n_tok = int(mb.sum())
    row_counts = m.sum(1)
    n_seq = int((row_counts > 0).sum())
    if agg == "token_mean":
        norm = global_tokens if global_tokens > 0 else n_tok
        loss = lm.sum() / norm if norm > 0 else lm.sum() * 0.0
    elif agg in ("seq_mean_token_mean", "seq_mean_token_sum"):
        per_row = lm.sum(1)
        if agg == "seq_mean_token_mean":
            per_row = per_row / row_counts.clamp(min=1)
        norm = global_sequences if global_sequences > 0 else n_seq
        loss = per_row.sum() / norm if norm > 0 else per_row.sum() * 0.0
    elif agg == "seq_mean_token_sum_norm":
        rows = global_sequences if global_sequences > 0 else B
        L = max_response_length if max_response_length > 0 else T
        loss = lm.sum() / (rows * L) if rows * L > 0 else lm.sum() * 0.0
    elif agg == "step_mean":
        K = int(step.max().item()) + 1 if step.numel() else 1
        K = max(K, 1)
        s = step.long()
        on = torch.nn.functional.one_hot(s.clamp(min=0), K).to(logp.dtype) * (mb & (s >= 0)).unsqueeze(-1)
        cnt = on.sum(1)  # (B, K)
        per_step = torch.einsum("bt,btk->bk", lm, on) / cnt.clamp(min=1)
        n_steps = int((cnt > 0).sum())
        norm = global_steps if global_steps > 0 else n_steps
        loss = per_step.sum() / norm if norm > 0 else per_step.sum() * 0.0
    else:
        raise ValueError(agg)

    with torch.no_grad():
        def mmean(x):
            return float((x.double() * mb).sum() / n_tok) if n_tok else 0.0
        diag = {
            "loss": float(loss),
            "clip_frac_low": mmean((clipped & (rho < 1.0 - clip_low)).double()),
            "clip_frac_high": mmean((clipped & (rho > 1.0 + clip_high)).double()),
            "clip_frac_dual": mmean(dual.double()),
            "ratio_mean": mmean(rho),
            "ratio_max": float(rho[mb].max()) if n_tok else 0.0,
            "approx_kl_old": mmean(-delta),
            "approx_kl_old_k3": mmean(torch.exp(-delta) + delta - 1.0),
            "kl_ref": mmean(k) if ref_logp is not None else 0.0,
            "n_tokens": float(n_tok),
            "n_sequences": float(n_seq),
        }
        if step is not None:
            s = step.long()
            present = set()
            for i in range(B):
                for t in range(T):
                    if mb[i, t] and s[i, t] >= 0:
                        present.add((i, int(s[i, t])))
            diag["n_steps"] = float(len(present))
    return loss, diag


# ----------------------------------------------------------------------------- problems
class LossProblem:
    """A random loss problem like tests/loss_problem.hpp: segmented interleaved responses with
    defects (so some tokens have step -1 and some steps are missing), log-probabilities whose
    ratios land on both sides of the clip range, a reference policy and step advantages."""

    def __init__(self, seed, B, T, K=3, spread=0.3, dtype=torch.float64, empty_rows=(), truncated_rows=()):
        rng = random.Random(seed)
        tokens, mask = random_tokens(rng, K, B, T, think_then_sid=False, per_level=True, defect_rate=0.3)
        for i in empty_rows:
            mask[i] = [0] * T  # a row without any response token
        for i in truncated_rows:
            # Cut the response right after its first SID token: steps 1..K-1 are absent.
            first = next((t for t in range(T) if mask[i][t] and tokens[i][t] >= SID_BASE), None)
            if first is not None:
                mask[i] = [mm if t <= first else 0 for t, mm in enumerate(mask[i])]
        step, _, _, _ = segment(tokens, mask, K, per_level_ranges(K))
        self.B, self.T, self.K = B, T, K
        self.tokens = torch.tensor(tokens, dtype=torch.int64)
        self.mask = torch.tensor(mask, dtype=dtype)
        self.step = torch.tensor(step, dtype=torch.int32)
        logp = [[rng.uniform(-4.0, -0.05) for _ in range(T)] for _ in range(B)]
        self.logp = torch.tensor(logp, dtype=dtype)
        self.old_logp = torch.tensor([[x + rng.gauss(0.0, spread) for x in row] for row in logp], dtype=dtype)
        self.ref_logp = torch.tensor([[x + rng.gauss(0.0, 0.5) for x in row] for row in logp], dtype=dtype)
        step_adv = [[rng.uniform(-1.5, 1.5) for _ in range(K)] for _ in range(B)]
        self.step_adv = torch.tensor(step_adv, dtype=dtype)
        self.token_adv = torch.tensor(broadcast(step_adv, step, mask), dtype=dtype)
