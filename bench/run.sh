#!/usr/bin/env bash
# Builds and runs the benchmark suite, then summarizes it.
#
#   bench/run.sh [--quick] [--out DIR] [--threads "1 2"] [--huge-pages]
#
#   --quick      3 shapes (64x512, 512x2048, 2048x4096), one repetition, short min time:
#                about a minute after the build on a 2-core machine
#   --out DIR    where the results go (default: <build>/results)
#   --threads    thread counts to measure (default "1 2"); sapo gets loss_options.num_threads /
#                segment_options.num_threads, libtorch torch::set_num_threads
#   --huge-pages the inputs on 2 MiB pages (madvise; needs transparent huge pages in
#                "madvise" or "always" mode); without it they get the default pages
#
# Installs the Debian packages it needs (only what is missing), configures a Release build
# in $SAPO_BENCH_BUILD_DIR (default <repo>/build/bench; bench targets get -O3 -march=native),
# builds bench_loss, bench_advantages and bench_memory, runs them (Google Benchmark JSON in
# DIR/raw_*.json, peak memory in DIR/memory.jsonl), then bench/summarize.py writes
# DIR/summary.jsonl, DIR/summary.md and DIR/throughput.png and prints the tables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"

# The header comment above, up to its first non-comment line.
usage() { sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

quick=0
out=""
threads="1 2"
huge_pages=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --threads) threads="${2:?--threads needs a list, e.g. \"1 2\"}"; shift ;;
    --threads=*) threads="${1#--threads=}" ;;
    --huge-pages) huge_pages=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
threads_csv="$(echo $threads | tr ' ' ',')"
[[ "$threads_csv" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "run.sh: --threads wants positive integers, got '$threads'" >&2; exit 2; }

sapo_install_debs "${SAPO_BUILD_DEBS[@]}" libtorch-dev libopenblas0-pthread libbenchmark-dev python3-matplotlib \
  python3-torch python3-setuptools python3-dev libjemalloc2

build="${SAPO_BENCH_BUILD_DIR:-$SAPO_ROOT/build/bench}"
out="${out:-$build/results}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

t_start=$(date +%s)
cmake -S "$SAPO_ROOT" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAPO_BUILD_BENCHMARKS=ON \
  -DSAPO_BUILD_TESTS=OFF -DSAPO_BUILD_EXAMPLES=OFF -DSAPO_WITH_EIGEN=OFF -DSAPO_WITH_XTENSOR=OFF -DSAPO_INSTALL=OFF >/dev/null
cmake --build "$build" --target bench_loss bench_advantages bench_memory sapo_python -j "$(nproc)"
t_built=$(date +%s)

if [ "$quick" = 1 ]; then
  ours=(--sapo_quick)
  gbench=(--benchmark_min_time=0.02 --benchmark_repetitions=1)
else
  ours=()
  gbench=(--benchmark_min_time=0.25 --benchmark_repetitions=3 --benchmark_display_aggregates_only=true)
fi
ours+=("--sapo_threads=$threads_csv")
[ "$huge_pages" = 1 ] && ours+=(--sapo_huge_pages)

rm -f "$out"/raw_*.json "$out"/memory.jsonl
{
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "mode: $([ "$quick" = 1 ] && echo quick || echo full), threads: $threads, ${gbench[*]}"
  echo "inputs on: $([ "$huge_pages" = 1 ] && echo "2 MiB pages (--huge-pages)" || echo "default pages"), transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown)"
  echo "OMP_WAIT_POLICY: ${OMP_WAIT_POLICY:-unset (libgomp default: spin, then sleep)}"
} | tee "$out/machine.txt"
load1="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
  echo "run.sh: warning: the machine is busy (load $load1): timings, the multi-threaded ones above all, will be noisy" >&2
fi

for b in loss advantages; do
  echo "== bench_$b"
  "$build/bench/bench_$b" "${ours[@]}" "${gbench[@]}" \
    --benchmark_out="$out/raw_$b.json" --benchmark_out_format=json
done
echo "== sapo_torch (Python, the dispatched build)"
if [ "$quick" = 1 ]; then py=(--min-time 0.05 --repetitions 1); else py=(--min-time 0.25 --repetitions 3); fi
PYTHONPATH="$build/python" /usr/bin/python3 "$SAPO_ROOT/bench/bench_python.py" --out "$out/raw_python.json" \
  --threads "$threads_csv" "${py[@]}"
# The same with the freed pages reused (jemalloc, no purging): without the page faults of a
# fresh 32 MiB gradient on every call (bench_python.py says why).
jemalloc=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
LD_PRELOAD="$jemalloc" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 PYTHONPATH="$build/python" \
  /usr/bin/python3 "$SAPO_ROOT/bench/bench_python.py" --out "$out/raw_python_jemalloc.json" \
  --threads "$threads_csv" --suffix _jemalloc "${py[@]}"
echo "== bench_memory"
"$build/bench/bench_memory" --out="$out/memory.jsonl"
t_ran=$(date +%s)

echo "== summary"
/usr/bin/python3 "$SAPO_ROOT/bench/summarize.py" "$out"
t_end=$(date +%s)
echo "run.sh: build $((t_built - t_start)) s, benchmarks $((t_ran - t_built)) s, summary $((t_end - t_ran)) s; results in $out"
