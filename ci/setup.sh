#!/usr/bin/env bash
# Installs what building and testing Nefele needs, idempotently: a second run
# changes nothing. Needs: the machine's Rust toolchain (rustup, cargo).
# Everything else comes from the package registries (crates.io); protobuf is
# compiled by protox (a Rust crate), so no protoc is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

if ! need cargo; then
  echo "ci/setup.sh: cargo not found; this machine kind ships a Rust toolchain via rustup" >&2
  exit 1
fi

# rustfmt and clippy: present on this machine kind; add them only if missing.
for comp in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${comp}"; then
    echo "ci/setup.sh: adding rustup component ${comp}"
    rustup component add "${comp}"
  fi
done

# A C compiler and make build libnefele's samples (present on this machine
# kind; installed from Debian's packages if missing).
if ! need cc || ! need make; then
  echo "ci/setup.sh: installing gcc and make"
  apt-get update -qq && apt-get install -y -qq gcc make >/dev/null
fi

# Fetch crates once so later steps work from the local registry.
cargo fetch --locked -q 2>/dev/null || cargo fetch -q
echo "ci/setup.sh: ok ($(cargo --version))"
