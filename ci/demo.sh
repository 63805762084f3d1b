#!/usr/bin/env bash
# The main job: the seed's Monte Carlo estimate of pi, in C against
# libnefele, on an embedded single-node Nefele (`nefele run` starts the
# fabric and the process manager inside itself; nothing to configure).
# Arguments go to the sample: [WORKERS, 32] [POINTS per worker, 200000]
# [IN FLIGHT, 4], e.g. `bash ci/demo.sh 64 1000000 8`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
echo "ci/demo.sh: building libnefele, the nefele CLI and the C sample"
cargo build --release -q -p nefele-sdk-c -p nefele-procmgr
make -s -C sdk-c/examples/montecarlo
exec target/release/nefele run sdk-c/examples/montecarlo/build/montecarlo_main "$@"
