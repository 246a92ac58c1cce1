"""Python call overhead of sapo_torch.policy_loss on a tiny batch (default 2 x 8), where the
kernel's own work is negligible and what is measured is the cost of the call path:
Python wrapper -> torch.ops dispatcher -> autograd Function -> kernel, and back.

Prints the median (and the minimum) over N timed calls, after a warm-up, of

* forward            sapo_torch.policy_loss(...)
* forward + backward the same, then loss.backward()
* raw op forward     torch.ops.sapo.policy_loss(...) without the Python wrapper
* baseline backward  x.sum().backward() on the same (B, T) leaf: the autograd engine's own
                     fixed cost, which any loss pays (for scale)
* op-by-op PyTorch   the token-ratio clipped loss written with torch ops + backward (for scale)

Run:  PYTHONPATH=<build>/python /usr/bin/python3 adapters/python/bench_overhead.py [--calls 1000]
Not a test: timings depend on the machine and its load (the script prints the load average).
"""
import argparse
import os
import statistics
import sys
import time

import torch

# This file sits next to the *source* package adapters/python/sapo_torch, which has no compiled
# _C; drop the script's folder from the path so the built package on PYTHONPATH is imported.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
import sapo_torch  # noqa: E402


def time_us(fn, calls, warmup):
    """(median, minimum) of `calls` timed calls, in microseconds. On a busy machine the minimum
    is the better estimate of the path's own cost; the median is what a caller sees."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, min(times) * 1e6


def main():
    ap = argparse.ArgumentParser(description="sapo_torch.policy_loss call overhead")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (kernel threads follow)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.tokens
    logp = torch.randn(B, T, generator=g).sub_(1.0).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)

    def fwd():
        sapo_torch.policy_loss(logp, old, mask, adv)

    def fwd_bwd():
        sapo_torch.policy_loss(logp, old, mask, adv).loss.backward()

    op = torch.ops.sapo.policy_loss

    def raw():
        op(logp, old, mask, adv)

    def baseline():
        logp.sum().backward()

    def op_by_op():
        r = torch.exp(torch.clamp(logp - old, -20, 20))
        l = torch.maximum(-adv * r, -adv * torch.clamp(r, 0.8, 1.2))
        ((l * mask).sum() / mask.sum()).backward()

    rows = [
        ("forward", fwd),
        ("forward + backward", fwd_bwd),
        ("raw op forward (no wrapper)", raw),
        ("baseline x.sum().backward()", baseline),
        ("op-by-op PyTorch fwd + bwd", op_by_op),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"sapo_torch.policy_loss, B x T = {B} x {T}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.calls} calls, load average {load:.2f} on {os.cpu_count()} CPUs")
    print(f"  {'':32s} {'median':>8s}    {'min':>8s}")
    for name, fn in rows:
        med, low = time_us(fn, args.calls, args.warmup)
        print(f"  {name:32s} {med:8.1f} us {low:8.1f} us")


if __name__ == "__main__":
    main()
