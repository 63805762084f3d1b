#!/usr/bin/env bash
# A test cluster on one machine: N nodes as network namespaces joined by
# veth pairs to a bridge (in a hub namespace of its own, so the root
# namespace is not touched), each running `nefele up` (fabricd + procmgrd).
#
#   ci/cluster.sh up N     start nodes 1..N (N <= 16); prints how to reach each
#   ci/cluster.sh status   the nodes and whether their daemons run
#   ci/cluster.sh down     stop the daemons, delete the namespaces (idempotent)
#
# Node i: namespace nefele-n$i, address 10.77.0.$i/24, node id i, gossip
# and node links on 10.77.0.$i:7000, control socket
# /run/nefele-cluster/n$i/fabricd.sock, log /run/nefele-cluster/n$i/log,
# cache of programs shipped to it /run/nefele-cluster/n$i/cache.
# The nodes share this machine's filesystem except /run/nefele-cluster/local:
# each node's daemons have a private tmpfs there (their own mount
# namespace), so a program put in node i's (from outside: through
# /proc/$(cat /run/nefele-cluster/n$i/pid)/root/run/nefele-cluster/local)
# exists on that node only, as on separate machines.
# The nodes find each other by broadcast on 10.77.0.0/24 (no seed list);
# `up` returns once every node sees all N alive (at most 10 s) and says how
# long forming took. Needs root (namespaces).
# NEFELE_BIN overrides the nefele binary (default: target/release/nefele).
set -euo pipefail
cd "$(dirname "$0")/.."
state=/run/nefele-cluster
bin=${NEFELE_BIN:-target/release/nefele}
hub=nefele-hub

die() { echo "cluster.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
command -v ip >/dev/null || die "needs iproute2's ip (apt-get install iproute2)"

nodes() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^nefele-n[0-9]+$' | sort -V || true; }

down() {
  if [ -d "$state" ]; then
    for pidfile in "$state"/n*/pid; do
      [ -f "$pidfile" ] || continue
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
      kill -9 "$pid" 2>/dev/null || true
    done
  fi
  for ns in $(nodes) $hub; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$state"
}

up() {
  local n=${1:-}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 16 ] || die "usage: cluster.sh up N (1..16)"
  [ -x "$bin" ] || die "$bin is missing: cargo build --release -p nefele-procmgr (or set NEFELE_BIN)"
  down
  mkdir -p "$state"
  ip netns add $hub
  ip -n $hub link add nbr0 type bridge
  ip -n $hub link set nbr0 up
  ip -n $hub link set lo up
  for i in $(seq 1 "$n"); do
    ns=nefele-n$i
    ip netns add "$ns"
    ip link add "nvh$i" netns $hub type veth peer name eth0 netns "$ns"
    ip -n $hub link set "nvh$i" master nbr0 up
    ip -n "$ns" addr add "10.77.0.$i/24" brd + dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    mkdir -p "$state/n$i" "$state/local"
    # `ip netns exec` gives the command a mount namespace of its own (mounts
    # do not propagate back), where the node-local tmpfs goes; exec keeps
    # the daemon's pid the one recorded.
    ip netns exec "$ns" sh -c 'mount -t tmpfs -o size=1g,mode=0755 nefele-local "$0" && exec "$@"' \
      "$state/local" env NEFELE_FABRICD_SOCKET="$state/n$i/fabricd.sock" \
      "$bin" up --listen "10.77.0.$i:7000" --cluster-id nefele-ci --cache-dir "$state/n$i/cache" \
      >"$state/n$i/log" 2>&1 &
    echo $! >"$state/n$i/pid"
  done
  for i in $(seq 1 "$n"); do
    for _ in $(seq 1 250); do [ -S "$state/n$i/fabricd.sock" ] && break; sleep 0.02; done
    [ -S "$state/n$i/fabricd.sock" ] || die "node $i did not start; see $state/n$i/log"
  done
  local t0=$(date +%s%N) formed=""
  for _ in $(seq 1 500); do
    formed=yes
    for i in $(seq 1 "$n"); do
      alive=$(NEFELE_FABRICD_SOCKET="$state/n$i/fabricd.sock" "$bin" nodes --json 2>/dev/null | grep -c '"state":"alive"' || true)
      [ "$alive" = "$n" ] || { formed=""; break; }
    done
    [ -n "$formed" ] && break
    sleep 0.02
  done
  [ -n "$formed" ] || die "the $n nodes did not all see each other within 10 s; see $state/n*/log"
  echo "cluster of $n nodes formed in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  for i in $(seq 1 "$n"); do
    echo "node $i: 10.77.0.$i  nsenter -t $(cat "$state/n$i/pid") -n -m env NEFELE_FABRICD_SOCKET=$state/n$i/fabricd.sock <program>"
  done
}

status() {
  for ns in $(nodes); do
    i=${ns#nefele-n}
    pid=$(cat "$state/n$i/pid" 2>/dev/null || echo)
    # A daemon that exited may linger as a zombie until init reaps it.
    state_of=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -n "$state_of" ] && [ "$state_of" != Z ]; then s=running; else s=stopped; fi
    echo "node $i: 10.77.0.$i  daemons $s  socket $state/n$i/fabricd.sock"
  done
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  status) status ;;
  *) sed -n 2,23p "$0"; exit 2 ;;
esac
