"""The guides' code runs:

* docs/guides/plain_pytorch.md: every block is a verbatim excerpt of
  adapters/python/examples/plain_loop.py, and that script runs and learns;
* docs/guides/verl.md and trl.md: their python blocks run in order in one namespace, against
  the stand-ins of guide_stubs.py, and what they define behaves as the guide says;
* adapters/python/bench_overhead.py runs (a smoke run with few calls; timings not checked).
"""
import os
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import guide_stubs
import sapo_reference as ref
from sapo_torch import verl as sv

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
EXAMPLE = os.path.join(REPO, "adapters", "python", "examples", "plain_loop.py")


def python_blocks(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONDONTWRITEBYTECODE="1")


# ----------------------------------------------------------------------------- plain PyTorch
def test_plain_pytorch_guide_blocks_are_excerpts_of_the_example():
    with open(EXAMPLE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = python_blocks(os.path.join(REPO, "docs", "guides", "plain_pytorch.md"))
    assert len(blocks) >= 4
    for block in blocks:
        want = block.rstrip("\n").splitlines()
        n = len(want)
        found = any(textwrap.dedent("\n".join(lines[i:i + n])).splitlines() == want
                    for i in range(len(lines) - n + 1))
        assert found, f"not an excerpt of plain_loop.py:\n{block}"


def test_plain_loop_example_runs_and_learns():
    res = subprocess.run([sys.executable, EXAMPLE, "--iterations", "30"], env=_env(), capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    m = re.match(r"mean step reward: first iteration ([\d.]+), last 5 iterations ([\d.]+)", last)
    assert m, last
    first, final = float(m.group(1)), float(m.group(2))
    # Random guessing gets (1/4 + 1/16 + 1/64) / 3 ~ 0.11 per step; the loop must clearly learn.
    assert first < 0.4 and final > 0.8, (first, final)


def test_bench_overhead_script_runs():
    script = os.path.join(REPO, "adapters", "python", "bench_overhead.py")
    res = subprocess.run([sys.executable, script, "--calls", "20", "--warmup", "5"], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "forward + backward" in res.stdout


# ----------------------------------------------------------------------------- verl, TRL
@pytest.fixture
def stubs():
    mods = guide_stubs.install()
    try:
        yield mods
    finally:
        guide_stubs.uninstall()


def run_guide(name):
    ns = {"__name__": f"guide_{name}"}
    for block in python_blocks(os.path.join(REPO, "docs", "guides", f"{name}.md")):
        exec(compile(block, f"docs/guides/{name}.md", "exec"), ns)
    return ns


def _verl_batch(seed=0, B=12, G=4, T=16):
    rng = random.Random(seed)
    rows = [guide_stubs.interleaved_response(rng, T=T, defect=(i == 5)) for i in range(B)]
    targets = [[rng.randrange(4) for _ in range(3)] for _ in range(B // G)]
    data = guide_stubs.DataProto(
        {"responses": torch.tensor([r[0] for r in rows]), "response_mask": torch.tensor([r[1] for r in rows])},
        {"uid": np.array([f"p{i // G}" for i in range(B)], dtype=object),
         "reward_model": np.array([{"ground_truth": targets[i // G]} for i in range(B)], dtype=object)})
    return data, rows, targets


def test_verl_guide(stubs):
    ns = run_guide("verl")
    rt = stubs["verl.trainer.ppo.ray_trainer"]
    data, rows, targets = _verl_batch()
    # The advantage hook: "sapo" goes to the guide's function, anything else to verl's.
    other = rt.compute_advantage(_verl_batch()[0], "grpo")
    assert other.meta_info["computed_by"] == "verl:grpo"
    out = rt.compute_advantage(data, "sapo", norm_adv_by_std_in_grpo=True)
    assert "computed_by" not in out.meta_info
    # Expected: the reference pipeline on the same tokens.
    K, B, G = 3, len(rows), 4
    ranges = [(guide_stubs.SID_LO + 256 * k, guide_stubs.SID_LO + 256 * (k + 1)) for k in range(K)]
    tokens, mask = [r[0] for r in rows], [r[1] for r in rows]
    step, _, codes, malformed = ref.segment(tokens, mask, K, ranges)
    assert any(malformed) and not all(malformed)
    r = ref.step_rewards(codes, malformed, [targets[i // G] for i in range(B)], "prefix")
    A, _ = ref.group_advantages(r, [i // G for i in range(B)], B // G, singleton="raw")
    want = torch.tensor(ref.broadcast(A, step, mask), dtype=torch.float32)
    assert torch.allclose(out.batch["advantages"], want, rtol=1e-5, atol=1e-6)
    assert out.batch["returns"] is out.batch["advantages"]

    # The policy loss in the registry, and the metrics-dict adapter.
    fn = stubs["verl.trainer.ppo.core_algos"].get_policy_loss_fn("sapo")
    p = ref.LossProblem(seed=4, B=6, T=11, spread=0.4)
    cfg = {"clip_ratio": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    got = fn(p.old_logp, p.logp, p.token_adv, p.mask, "token-mean", cfg)
    direct = sv.compute_policy_loss(p.old_logp, p.logp, p.token_adv, p.mask, 0.2, 0.2, 0.28, 3.0, "token-mean")
    assert all(torch.equal(a, b) for a, b in zip(got, direct))
    loss, metrics = ns["sapo_policy_loss_with_metrics"](p.old_logp, p.logp, p.token_adv, p.mask, "token-mean", cfg)
    assert torch.equal(loss, direct[0])
    assert metrics == {"actor/pg_clipfrac": float(direct[1]), "actor/ppo_kl": float(direct[2]),
                       "actor/pg_clipfrac_lower": float(direct[3])}


def _trl_grpo_loss(logps, old, adv, mask, ref_logps, beta, eps_low, eps_high):
    """TRL's GRPO loss (loss_type="grpo"), written from its documented formula."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    ptl = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if beta != 0.0:
        d = ref_logps - logps
        ptl = ptl + beta * (torch.exp(d) - d - 1)
    return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def test_trl_guide(stubs):
    ns = run_guide("trl")
    # Block 2 ran trainer.train(): one SAPO step with the step ratio and step_mean.
    trainer = ns["trainer"]
    assert type(trainer).__name__ == "SAPOGRPOTrainer"
    assert trainer.last_batch["sapo_step_advantages"].shape == (32, 3)
    assert torch.isfinite(trainer.last_loss) and trainer.model.a.grad.abs().sum() > 0
    assert trainer._metrics["train"]["clip_ratio"]

    # Block 1: TRL's GRPO loss, computed by sapo.
    trl = stubs["trl"]
    tr = ns["FusedLossGRPOTrainer"](model="stub", reward_funcs=lambda prompts, completions, **kw: [
        float(i % 3) for i in range(len(completions))], args=trl.GRPOConfig(num_generations=4, beta=0.04, epsilon=0.2,
                                                                           epsilon_high=0.28),
        train_dataset=[{"prompt": f"u{u}"} for u in range(3)])
    inputs = [x for x in tr.train_dataset for _ in range(4)]
    batch = tr._generate_and_score_completions(inputs)
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    C = batch["completion_ids"].size(1)
    batch["old_per_token_logps"] = (tr.model(ids)[:, -C:] + 0.3 * torch.randn(12, C, generator=gen)).detach()
    tr.num_iterations = 2
    loss = tr.compute_loss(tr.model, batch)
    logps = tr.model(ids)[:, -C:]
    want = _trl_grpo_loss(logps.double(), batch["old_per_token_logps"].double(), batch["advantages"].double(),
                          batch["completion_mask"].double(), batch["ref_per_token_logps"].double(), 0.04, 0.2, 0.28)
    assert abs(float(loss) - float(want)) < 1e-6
    (g1,) = torch.autograd.grad(loss, tr.model.a)
    (g2,) = torch.autograd.grad(want, tr.model.a)
    assert torch.allclose(g1.double(), g2.double(), rtol=1e-5, atol=1e-7)
