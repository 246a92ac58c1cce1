"""Runtime instruction-set dispatch of the compiled module (include/sapo/dispatch.hpp): the
module picks the best instruction set this CPU runs, SAPO_ISA forces another (checked
against /proc/cpuinfo, not against the module's own detection), and every instruction set
gives the same loss and gradient to float rounding."""
import os
import subprocess
import sys

import pytest
import torch

import sapo_torch as st


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _runnable():
    flags = _cpu_flags()
    if flags is None or "sse2" not in flags:
        return None
    avx2 = {"avx2", "fma"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags
    return ["sse2"] + (["avx2"] if avx2 else []) + (["avx512"] if avx512 else [])


RUNNABLE = _runnable()
x86_only = pytest.mark.skipif(RUNNABLE is None, reason="not an x86-64 CPU with /proc/cpuinfo")

# A child process reads SAPO_ISA at its first kernel call: prints the instruction set, the
# loss and the gradient of one fixed problem.
CHILD = r"""
import sys, torch, sapo_torch as st
g = torch.Generator().manual_seed(5)
B, T, K = 8, 300, 17
logp = torch.empty(B, T).uniform_(-4, -0.05, generator=g).requires_grad_(True)
old = (logp + 0.3 * torch.randn(B, T, generator=g)).detach()
step = (torch.arange(T) * K // T).to(torch.int32).expand(B, T).contiguous()
adv = torch.randn(B, K, generator=g)
mask = (torch.rand(B, T, generator=g) > 0.1).float()
loss, _ = st.policy_loss(logp, old, mask, step=step, step_advantages=adv, ratio="step", agg="step_mean")
loss.backward()
print(st.dispatch_isa())
print(repr(loss.item()))
print(",".join(repr(x) for x in logp.grad.flatten().tolist()))
"""


def _child(isa):
    env = dict(os.environ)
    env.pop("SAPO_ISA", None)
    if isa is not None:
        env["SAPO_ISA"] = isa
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)


@x86_only
def test_the_best_instruction_set_is_picked():
    if os.environ.get("SAPO_ISA"):
        pytest.skip("SAPO_ISA is set for this run")
    assert st.dispatch_isa() == RUNNABLE[-1]


@x86_only
def test_every_instruction_set_agrees():
    runs = {}
    for isa in RUNNABLE:
        r = _child(isa)
        assert r.returncode == 0, r.stderr
        name, loss, grad = r.stdout.strip().split("\n")
        assert name == isa
        runs[isa] = (float(loss), torch.tensor([float(x) for x in grad.split(",")], dtype=torch.float64))
    base_loss, base_grad = runs["sse2"]
    for isa, (loss, grad) in runs.items():
        assert abs(loss - base_loss) <= 1e-6 * abs(base_loss) + 1e-7, isa
        assert torch.allclose(grad, base_grad, rtol=1e-5, atol=1e-9), isa
    for isa in {"sse2", "avx2", "avx512"} - set(RUNNABLE):
        print(f"not run here: {isa} (this CPU lacks it)")


def test_a_bad_sapo_isa_is_a_clear_error():
    r = _child("avx1024")
    assert r.returncode != 0
    assert "SAPO_ISA" in r.stderr and "avx1024" in r.stderr and "expected one of" in r.stderr
