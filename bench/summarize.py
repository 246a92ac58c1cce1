#!/usr/bin/python3
"""Summarize a bench/run.sh run.

Reads DIR/raw_*.json (Google Benchmark JSON) and DIR/memory.jsonl (bench_memory), writes
  DIR/summary.jsonl   one line per kernel x shape x impl x threads:
                      kernel, B, T, K, G, impl, threads, seconds (median real time of one
                      call over the repetitions), bytes (the kernel's minimal bytes)
  DIR/summary.md      the tables printed below
  DIR/throughput.png  tokens/s against B*T, log-log, one line per implementation, fewest threads
and prints, as markdown, the ratio table per shape and the peak extra memory table.

Run with Debian's /usr/bin/python3 (python3-matplotlib).
"""
import argparse
import glob
import json
import os
import statistics
import sys
from collections import defaultdict

IMPLS = ["sapo", "sapo_autograd", "libtorch", "reference", "roofline", "roofline_2pass"]
# Runtime dispatch (the compiled artefacts' path), one row per instruction set, and the Python package.
ISA_IMPLS = ["sapo_sse2", "sapo_avx2", "sapo_avx512", "sapo_native", "sapo_torch", "sapo_torch_fb",
             "sapo_torch_jemalloc", "sapo_torch_fb_jemalloc"]
UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_name(run_name):
    """'loss/sapo/B:2048/T:4096/K:4/G:16/threads:1/real_time' -> dict."""
    parts = run_name.split("/")
    rec = {"kernel": parts[0], "impl": parts[1]}
    for p in parts[2:]:
        if ":" in p:
            k, v = p.split(":", 1)
            rec[k] = int(v)
    return rec


def load_runs(out_dir):
    """Median real time per benchmark over its repetitions (iteration rows only)."""
    times = defaultdict(list)
    info = {}
    files = sorted(glob.glob(os.path.join(out_dir, "raw_*.json")))
    if not files:
        sys.exit(f"summarize.py: no raw_*.json in {out_dir}")
    for path in files:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
                continue
            name = b.get("run_name", b["name"])
            times[name].append(b["real_time"] * UNIT[b.get("time_unit", "ns")])
            info[name] = b
    rows = []
    for name, ts in times.items():
        rec = parse_name(name)
        rows.append({
            "kernel": rec["kernel"], "B": rec["B"], "T": rec["T"], "K": rec["K"], "G": rec["G"],
            "impl": rec["impl"], "threads": rec["threads"],
            "seconds": statistics.median(ts), "bytes": int(round(info[name]["bytes"])),
        })
    rows.sort(key=lambda r: (r["kernel"], r["B"] * r["T"], r["B"], r["K"], r["G"],
                             IMPLS.index(r["impl"]) if r["impl"] in IMPLS else 99, r["threads"]))
    return rows


def fmt_x(v):
    return "–" if v is None else (f"{v:.1f}×" if v < 100 else f"{v:.0f}×")


def fmt_pct(v):
    return "–" if v is None else f"{100 * v:.0f}%"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ratio_table(rows):
    threads = sorted({r["threads"] for r in rows})
    t1, tn = threads[0], threads[-1]
    by = {(r["kernel"], r["B"], r["T"], r["K"], r["G"], r["impl"], r["threads"]): r["seconds"] for r in rows}
    shapes = []
    for r in rows:
        key = (r["kernel"], r["B"], r["T"], r["K"], r["G"])
        if key not in shapes:
            shapes.append(key)
    kernel_order = ["loss", "loss_dense", "loss_step_kl", "advantages_i32", "advantages_i64", "advantages_bcast_i32",
                    "advantages_bcast_i64"]
    shapes.sort(key=lambda k: (kernel_order.index(k[0]) if k[0] in kernel_order else 99, k[1] * k[2], k[1], k[3]))

    cols = ["kernel", "B×T", "K", "G", f"sapo ms ({t1}t)", f"sapo vs libtorch ({t1}t)",
            f"sapo_autograd vs libtorch ({t1}t)"]
    if tn != t1:
        cols.append(f"sapo vs libtorch ({tn}t)")
    cols += [f"sapo vs reference ({t1}t)", f"% of roofline ({t1}t)", f"% of roofline_2pass ({t1}t)"]
    if tn != t1:
        cols += [f"% of roofline ({tn}t)", f"sapo {tn}t/{t1}t", f"roofline {tn}t/{t1}t"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for (kernel, B, T, K, G) in shapes:
        def t(impl, th):
            return by.get((kernel, B, T, K, G, impl, th))
        s1, sn = t("sapo", t1), t("sapo", tn)
        cells = [kernel, f"{B}×{T}", str(K), str(G), "–" if s1 is None else f"{1e3 * s1:.3g}",
                 fmt_x(ratio(t("libtorch", t1), s1)), fmt_x(ratio(t("libtorch", t1), t("sapo_autograd", t1)))]
        if tn != t1:
            cells.append(fmt_x(ratio(t("libtorch", tn), sn)))
        cells += [fmt_x(ratio(t("reference", t1), s1)), fmt_pct(ratio(t("roofline", t1), s1)),
                  fmt_pct(ratio(t("roofline_2pass", t1), s1))]
        if tn != t1:
            cells += [fmt_pct(ratio(t("roofline", tn), sn)), fmt_x(ratio(s1, sn)),
                      fmt_x(ratio(t("roofline", t1), t("roofline", tn)))]
        lines.append("| " + " | ".join(cells) + " |")
    ref_shapes = sorted({(r["B"], r["T"]) for r in rows if r["impl"] == "reference"}, key=lambda bt: bt[0] * bt[1])
    ref_at = ", ".join(f"{B}×{T}" for B, T in ref_shapes) or "no shape"
    legend = (
        f"\"sapo vs X\" = time of X / time of sapo (> 1: sapo is faster); \"% of roofline\" = roofline time / "
        f"sapo time (100% = at the memory-bandwidth limit of the kernel's minimal bytes); \"{tn}t/{t1}t\" = "
        f"speed-up of {tn} threads over {t1}. Times are medians of the repetitions; \"–\": not run. The "
        f"reference is single-threaded and slow, so it runs only at {ref_at}; roofline_2pass exists for the "
        f"loss kernels only.")
    return "\n".join(lines), legend


def isa_table(rows):
    """Per instruction set: time of each dispatched variant, of the -march=native header build
    ("sapo") and of the Python package, and the best variant against the two-pass roofline."""
    present = [i for i in ISA_IMPLS if any(r["impl"] == i for r in rows)]
    if not present:
        return None
    by = {(r["kernel"], r["B"], r["T"], r["K"], r["G"], r["impl"], r["threads"]): r["seconds"] for r in rows}
    keys = []
    for r in rows:
        k = (r["kernel"], r["B"], r["T"], r["K"], r["G"], r["threads"])
        if r["impl"] in present and k not in keys:
            keys.append(k)
    cols = ["kernel", "B×T", "K", "threads", "sapo (native) ms"] + [f"{i} ms" for i in present] + [
        "best dispatched / native", "best dispatched % of roofline_2pass"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for (kernel, B, T, K, G, th) in keys:
        def t(impl):
            return by.get((kernel, B, T, K, G, impl, th))
        native = t("sapo")
        disp = [t(i) for i in present if i.startswith("sapo_") and not i.startswith("sapo_torch") and t(i)]
        best = min(disp) if disp else None
        fmt = lambda v: "–" if v is None else (f"{1e3 * v:.3g}" if v >= 1e-4 else f"{1e6 * v:.3g} µs")
        cells = [kernel, f"{B}×{T}", str(K), str(th), fmt(native)] + [fmt(t(i)) for i in present]
        cells += [fmt_x(ratio(best, native)) if best and native else "–",
                  fmt_pct(ratio(t("roofline_2pass"), best))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(path):
    if not os.path.exists(path):
        return None
    recs = [json.loads(line) for line in open(path) if line.strip()]
    if not recs:
        return None
    kernels = []
    for r in recs:
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    impls = [i for i in IMPLS if any(r["impl"] == i for r in recs)]
    by = {(r["kernel"], r["impl"]): r for r in recs}
    MiB = 1024.0 * 1024.0
    s = recs[0]
    head = (f"Peak extra memory of one call at B={s['B']}, T={s['T']}, K={s['K']}, G={s['G']}, 1 thread: heap bytes "
            f"allocated during the call beyond its inputs and the output it returns, as MiB and % of the inputs' size "
            f"(float32/int32 arrays as benchmarked). In brackets: the output the call allocated itself.")
    cols = ["kernel", "inputs"] + impls
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for k in kernels:
        inp = next(r["input_bytes"] for r in recs if r["kernel"] == k)
        cells = [k, f"{inp / MiB:.0f} MiB"]
        for i in impls:
            r = by.get((k, i))
            if r is None:
                cells.append("–")
                continue
            cell = f"{r['peak_extra_bytes'] / MiB:.1f} MiB ({100.0 * r['peak_extra_bytes'] / r['input_bytes']:.1f}%)"
            if r["output_bytes"] > 0:
                cell += f" [+{r['output_bytes'] / MiB:.0f} MiB out]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n\n" + "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t1 = min(r["threads"] for r in rows)
    colors = {"sapo": "tab:blue", "sapo_autograd": "tab:cyan", "libtorch": "tab:red", "reference": "tab:gray", "roofline": "tab:green",
              "roofline_2pass": "tab:olive"}
    panels = [("policy loss, forward + backward", [("loss", "-", "default"), ("loss_step_kl", "--", "step ratio + step_mean + k3")]),
              ("advantage pipeline (int32 ids)", [("advantages_i32", "-", "segment→rewards→A"),
                                                  ("advantages_bcast_i32", "--", "+ token broadcast")])]
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.2))
    for ax, (title, kernels) in zip(axes, panels):
        handles = []
        for impl in IMPLS:
            drawn = False
            for kernel, style, _ in kernels:
                pts = defaultdict(list)
                for r in rows:
                    if r["kernel"] == kernel and r["impl"] == impl and r["threads"] == t1:
                        pts[r["B"] * r["T"]].append(r["B"] * r["T"] / r["seconds"])
                if not pts:
                    continue
                xs = sorted(pts)
                ys = [statistics.median(pts[x]) for x in xs]  # shapes with equal B*T: their median
                ax.plot(xs, ys, style, marker="o", ms=4, color=colors.get(impl))
                drawn = True
            if drawn:
                handles.append(Line2D([], [], color=colors.get(impl), marker="o", ms=4, label=impl))
        handles += [Line2D([], [], color="black", ls=style, label=label) for _, style, label in kernels]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call (B×T)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{title}, {t1} thread{'s' if t1 > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(handles=handles, fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.suptitle("sapo benchmarks (float32; roofline = read the inputs once + write the outputs once, no math)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="the --out folder of bench/run.sh")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    rows = load_runs(args.dir)
    with open(os.path.join(args.dir, "summary.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table, legend = ratio_table(rows)
    mem = memory_table(os.path.join(args.dir, "memory.jsonl"))
    machine = os.path.join(args.dir, "machine.txt")
    text = ""
    if os.path.exists(machine):
        text += "".join(f"    {line}" for line in open(machine)) + "\n"
    text += "## Ratios per shape\n\n" + table + "\n\n" + legend + "\n"
    isa = isa_table(rows)
    if isa:
        text += ("\n## Per instruction set (runtime dispatch) and the Python package\n\n" + isa + "\n\n"
                 "sapo_<isa>: the kernels as libsapo_torch.so and sapo_torch run them (built without -march, "
                 "dispatched at run time, forced to that instruction set); sapo: the header build with -march=native; "
                 "sapo_torch: sapo_torch.policy_loss forward from Python (sapo_torch_fb: + backward), with glibc's "
                 "malloc (a fresh gradient's page faults on every call) and under jemalloc without purging "
                 "(*_jemalloc: the pages are reused). "
                 "\"best dispatched / native\" > 1: the dispatched build is slower.\n")
    if mem:
        text += "\n## Peak extra memory\n\n" + mem + "\n"
    print(text)
    with open(os.path.join(args.dir, "summary.md"), "w") as f:
        f.write(text)
    if not args.no_plot:
        plot(rows, os.path.join(args.dir, "throughput.png"))
        print(f"wrote {os.path.join(args.dir, 'summary.jsonl')}, summary.md and throughput.png")


if __name__ == "__main__":
    main()
