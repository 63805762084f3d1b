#!/usr/bin/env bash
# Installs libnefele: the shared and static libraries, nefele.h and
# hermodr.h, and a pkg-config file.
#   sdk-c/install.sh [--prefix DIR]      (default /usr/local)
# Then: cc prog.c $(pkg-config --cflags --libs nefele)
# (set PKG_CONFIG_PATH=DIR/lib/pkgconfig for a prefix pkg-config does not search).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=/usr/local
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    -h|--help) sed -n 2,7p "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
cargo build --release -q -p nefele-sdk-c
version=$(cargo pkgid -p nefele-sdk-c | sed 's/.*[#@]//')
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 target/release/libnefele.so "$prefix/lib/"
install -m 0644 target/release/libnefele.a "$prefix/lib/"
install -m 0644 sdk-c/include/nefele.h sdk-c/include/hermodr.h "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" sdk-c/nefele.pc.in > "$prefix/lib/pkgconfig/nefele.pc"
echo "installed libnefele $version under $prefix"
