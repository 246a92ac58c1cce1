#!/usr/bin/env python3
"""Mean and standard deviation over seeds of sapo_recommender's results.json files.

    examples/recommender/aggregate.py out/full-seed1/results.json out/full-seed2/results.json ...

Prints a markdown table: per model and split, each metric as mean ± sample standard deviation
(n - 1), the training and evaluation seconds likewise, and the number of runs. Every file
must come from the same preset; the seeds must differ.
"""
import json
import statistics
import sys

METRICS = ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"]


def load(paths):
    runs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            runs.append(json.load(f))
    presets = {r["preset"] for r in runs}
    if len(presets) != 1:
        sys.exit(f"aggregate.py: the files mix presets {sorted(presets)}")
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"aggregate.py: repeated seeds {seeds}")
    return runs


def mean_std(values, digits):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    runs = load(argv[1:])
    names = [m["name"] for m in runs[0]["models"]]
    print(f"preset {runs[0]['preset']}, seeds {sorted(r['seed'] for r in runs)}; "
          f"program seconds {mean_std([r['seconds'] for r in runs], 0)}\n")
    print("| model | split | " + " | ".join(m.upper() for m in METRICS) + " | train s | eval s |")
    print("|---|---|" + "---:|" * (len(METRICS) + 2))
    for name in names:
        models = []
        for r in runs:
            found = [m for m in r["models"] if m["name"] == name]
            if not found:
                sys.exit(f"aggregate.py: model {name} missing in the run of seed {r['seed']}")
            models.append(found[0])
        for split in ("valid", "test"):
            rows = [m["valid"] if split == "valid" else m for m in models]
            cells = [mean_std([row[k] for row in rows], 4) for k in METRICS]
            cells += [mean_std([m["train_seconds"] for m in models], 0), mean_std([m["eval_seconds"] for m in models], 0)]
            print(f"| {name} | {split} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv)
