#!/usr/bin/env bash
# Runs the benchmarks and writes their numbers under perf/results/:
#   ci/bench.sh            quick run (under a minute per benchmark)
#   ci/bench.sh --full     ten times the iterations
# Each run appends JSON lines (one per measurement) to
# perf/results/<UTC date>-{latency,throughput,remote,spawn,pi}.jsonl and
# prints the tables. As root it also measures between network namespaces
# (remote latency, remote spawn, pi on 3 nodes); otherwise those are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
mode=--quick; [ "${1:-}" = "--full" ] && mode=
cargo build --release -q -p nefele-perf -p nefele-sdk-c
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p perf/results
for bench in latency throughput; do
  target/release/nefele-perf "$bench" $mode --out "perf/results/${stamp}-${bench}.jsonl"
done
make -s -C sdk-c/examples/montecarlo NEFELE_LIB="$PWD/target/release" \
  NEFELE_INCLUDE="$PWD/sdk-c/include" BUILD="$PWD/sdk-c/examples/montecarlo/build"
if [ "$(id -u)" = 0 ]; then
  target/release/nefele-perf latency --remote $mode --out "perf/results/${stamp}-remote.jsonl"
  cluster=()
else
  echo "ci/bench.sh: not root: skipping the namespace measurements"
  cluster=(--no-cluster)
fi
target/release/nefele-perf spawn $mode "${cluster[@]}" --json | tee "perf/results/${stamp}-spawn.jsonl"
target/release/nefele-perf pi $mode "${cluster[@]}" --json | tee "perf/results/${stamp}-pi.jsonl"
echo "results: perf/results/${stamp}-*.jsonl"
