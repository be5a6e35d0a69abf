#!/usr/bin/env bash
# The spawn benchmark in one command, as root: installs the peers (bubblewrap, runc, and crun,
# which is tried and reported when the host refuses it) and the C toolchain for the static
# fixture, builds fnlet, then runs `cargo bench -p fnlet-benches --bench spawn`.
# FNLET_BENCH_RUNS (default 200) and FNLET_BENCH_WARMUP (default 10) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the spawn benchmark creates namespaces and cgroups: run it as root (sudo $0)" >&2
  exit 1
fi
need=()
for pkg in bubblewrap runc gcc libc6-dev libseccomp-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
optional=()
dpkg-query -W -f='${Status}' crun 2>/dev/null | grep -q "install ok installed" || optional+=(crun)
if [ $((${#need[@]} + ${#optional[@]})) -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  # crun is a peer only where it runs (it refuses cgroup v1 hybrid hosts); never fail on it.
  if [ ${#optional[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${optional[@]}" || echo "crun not installed; going on without it" >&2
  fi
fi
cargo build --release -p fnlet
exec cargo bench -p fnlet-benches --bench spawn "$@"
