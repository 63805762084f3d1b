#!/usr/bin/env bash
# The main job: builds Nefele and runs the demo on an embedded single-node
# fabric (no daemon to start, nothing to configure). Until the seed's Monte
# Carlo pi sample exists (procmgr issue), the demo is a two-process
# ping-pong over the fabric that prints its round-trip latency.
# Extra arguments go to the demo, e.g. `ci/demo.sh pingpong --size 1024`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
cargo build --release -q -p nefele --bin nefele-demo
exec target/release/nefele-demo "$@"
