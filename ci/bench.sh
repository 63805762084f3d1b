#!/usr/bin/env bash
# Runs the benchmarks and writes their numbers under perf/results/:
#   ci/bench.sh            quick run (under a minute per benchmark)
#   ci/bench.sh --full     ten times the iterations
# Each run appends JSON lines (one per measurement) to
# perf/results/<UTC date>-{latency,throughput}.jsonl and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
mode=--quick; [ "${1:-}" = "--full" ] && mode=
cargo build --release -q -p nefele-perf
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p perf/results
for bench in latency throughput; do
  target/release/nefele-perf "$bench" $mode --out "perf/results/${stamp}-${bench}.jsonl"
done
echo "results: perf/results/${stamp}-*.jsonl"
