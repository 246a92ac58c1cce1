"""The Python package as a trainer calls it: sapo_torch.policy_loss (the dispatched build of
sapo_torch._C) on the dense 2048 x 4096 batch of bench_loss's `loss_dense` rows, timed the
way Google Benchmark times the C++ rows, and written as Google Benchmark JSON so that
bench/summarize.py puts it beside them:

  loss_dense/sapo_torch/...      the forward op (the fused kernel: loss and gradient)
  loss_dense/sapo_torch_fb/...   forward + loss.backward() (backward scales the saved gradient)

The batch is built like bench/problems.hpp's: every token used (mask 1), step ids in
contiguous spans with a tail of step -1, logp in [-4, -0.05], old = logp + N(0, 0.15),
A ~ N(0, 1): the kernel takes the same path (fully used tiles, the plain step-table loop).

Run:  PYTHONPATH=<build>/python /usr/bin/python3 bench/bench_python.py --out FILE [--threads 1,2]

Every call returns a fresh (B, T) gradient, as any PyTorch op does. With glibc's malloc a 32 MiB
tensor is mmap'ed anew on every call and its 8192 pages fault in again (about 100 ms on the
project's VMs: more than the kernel). run.sh therefore also runs this script under jemalloc with
page purging off (LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,
rows *_jemalloc), where the freed pages are reused: the kernel's own cost, as in a trainer with a
caching allocator.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
import sapo_torch  # noqa: E402


def make_batch(B, T, K, seed=777):
    g = torch.Generator().manual_seed(seed)
    logp = torch.empty(B, T).uniform_(-4.0, -0.05, generator=g)
    old = logp + 0.15 * torch.randn(B, T, generator=g)
    # K contiguous spans over the first 7/8 of each row, then the tail (step -1).
    t = torch.arange(T)
    step = torch.where(t < T * 7 // 8, t * K // (T * 7 // 8), torch.full_like(t, -1)).to(torch.int32)
    step = step.expand(B, T).contiguous()
    adv = torch.randn(B, K, generator=g)
    mask = torch.ones(B, T)
    return logp, old, step, adv, mask


def time_call(fn, min_time, repetitions):
    """Median over `repetitions` of the mean time per call over >= min_time seconds."""
    fn()  # warm-up (first-touch page faults of the outputs, lazy initialisation)
    per_rep = []
    for _ in range(repetitions):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        per_rep.append(elapsed / n)
    return per_rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--min-time", type=float, default=0.25)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--shape", default="2048,4096,4,16")
    ap.add_argument("--suffix", default="", help="appended to the row names (e.g. _jemalloc)")
    a = ap.parse_args()
    B, T, K, G = (int(x) for x in a.shape.split(","))
    logp, old, step, adv, mask = make_batch(B, T, K)
    leaf = logp.clone().requires_grad_(True)
    bytes_moved = B * T * 4.0 * 5 + B * K * 4.0  # as bench_loss counts loss_bytes
    rows = []
    for th in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(th)

        def forward():
            with torch.no_grad():
                return sapo_torch.policy_loss(logp, old, mask, step=step, step_advantages=adv, num_threads=th)

        def forward_backward():
            leaf.grad = None
            loss, _ = sapo_torch.policy_loss(leaf, old, mask, step=step, step_advantages=adv, num_threads=th)
            loss.backward()

        for impl, fn in (("sapo_torch" + a.suffix, forward), ("sapo_torch_fb" + a.suffix, forward_backward)):
            for t in time_call(fn, a.min_time, a.repetitions):
                rows.append({
                    "name": f"loss_dense/{impl}/B:{B}/T:{T}/K:{K}/G:{G}/threads:{th}/real_time",
                    "run_name": f"loss_dense/{impl}/B:{B}/T:{T}/K:{K}/G:{G}/threads:{th}/real_time",
                    "run_type": "iteration", "real_time": t * 1e3, "time_unit": "ms", "bytes": bytes_moved,
                })
            ts = [r["real_time"] for r in rows if f"/{impl}/" in r["name"] and f"threads:{th}/" in r["name"]]
            print(f"{impl:14s} threads {th}: median {statistics.median(ts):.2f} ms "
                  f"(instruction set {sapo_torch.dispatch_isa()})")
    with open(a.out, "w") as f:
        json.dump({"context": {"source": "bench/bench_python.py"}, "benchmarks": rows}, f, indent=1)


if __name__ == "__main__":
    main()
