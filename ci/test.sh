#!/usr/bin/env bash
# The test run: formatting, lints, then every test of the workspace
# (unit, property, conformance, daemon and SDK integration, perf harness
# smoke, the 2- and 3-node clusters in network namespaces). About 11
# minutes on 2 cores from a clean checkout, most of it the builds. Tests
# build with the `ci` profile (Cargo.toml): release optimisation without
# LTO, so artefacts land in target/ci.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh

echo "$(date +%T) == cargo fmt --check"
cargo fmt --all -- --check

echo "$(date +%T) == cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -q -- -D warnings

echo "$(date +%T) == cargo clippy --features rdma (the ibverbs backend: built and linted; no device here to run it)"
# rdma-sys generates its bindings with bindgen 0.59, which cannot read what
# libclang 19 (installed for the eBPF programs) makes of anonymous unions;
# point it at libclang 14 (Debian's libclang-dev, from ci/setup.sh).
LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}" \
  cargo clippy -p nefele-fabric --features rdma --all-targets -q -- -D warnings

echo "$(date +%T) == the C models of perf/model/ build without warnings (run by hand: see perf/NOTES.md)"
for model in perf/model/*.c; do
  cc -O2 -pthread -Wall -Wextra -Werror -o /dev/null "$model"
done

echo "$(date +%T) == cargo build (profile ci): libnefele.so and the CLIs the C and sample tests use"
# cargo test builds no cdylib (nothing links it), so build the workspace first.
cargo build --workspace --profile ci -q

echo "$(date +%T) == cargo test (profile ci, optimised: the perf smoke test runs the real harness)"
mkdir -p target
cargo test --workspace --profile ci 2>&1 | tee target/test.log
# cargo test's own exit status is kept by pipefail; also fail loudly if no
# test ran at all.
grep -q "test result: ok" target/test.log
