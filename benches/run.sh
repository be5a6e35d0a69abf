#!/usr/bin/env bash
# fnlet's benchmarks in one command, as root:
# `benches/run.sh [spawn|agent|lambda|cluster|events|topics|control|network|density|schedules|catalog|membership|all]` (default all; membership and
# catalog need no root).
#
# spawn: spawn-to-exit of a sandboxed static binary against fork+exec, bwrap and runc. Installs
#   the peers (bubblewrap, runc, and crun, which is tried and reported when the host refuses it)
#   and the C toolchain for the static fixture; builds fnlet; runs
#   `cargo bench -p fnlet-benches --bench spawn`.
# agent: exec-mode invocation of examples/wordcount-rust over HTTP on a real `fnlet agent`,
#   beside `fnlet sandbox run`, the isolate library and fork+exec; throughput with concurrent
#   clients; the agent's RSS. Builds fnlet and the example (scripts/build-examples.sh); runs
#   `cargo bench -p fnlet-benches --bench agent`.
# lambda: Lambda mode on a real `fnlet agent` with the benchmark no-op (tests/fixtures/lambda-noop,
#   statically linked): cold start with a prepared sandbox beside fork+exec and the isolate
#   library, warm invocation through /fn beside a plain HTTP server and nginx in front of it, and
#   throughput at 32 clients. Installs nginx; builds fnlet and the no-op (as
#   scripts/build-fixtures.sh does, into tests/fixtures/lambda-noop/bundle/bootstrap); runs
#   `cargo bench -p fnlet-benches --bench lambda`.
# cluster: a cluster of real `fnlet agent`s on 127.0.0.1 (3 by default); the same no-op, warm,
#   called on the host that owns it and on a host that forwards the call to it over QUIC, over
#   HTTP (function URL, Invoke API) and as a QUIC caller (fnlet-invoke/1). Builds fnlet and the
#   no-op as for lambda; runs `cargo bench -p fnlet-benches --bench cluster`.
# events: accepting asynchronous events (Invoke API, X-Amz-Invocation-Type: Event) on a real
#   `fnlet agent`: accept latency with one client, events/s at 1 and 32 clients, 202-to-start
#   latency, for the local backend and the NATS JetStream one (a second agent), beside the
#   disk's fdatasync floor and a JetStream publish with ack (Debian's nats-server, a plain
#   async-nats client). Installs nats-server; builds fnlet and the no-op as
#   for lambda; runs `cargo bench -p fnlet-benches --bench events`.
# topics: publishing CloudEvents to a topic on a real `fnlet agent` (10 warm no-op subscribers):
#   publish latency with 1 and 10 subscribers, publish-to-start latency, publishes/s at 32
#   clients, beside the same data as an Invoke API Event and a JetStream publish with ack.
#   Installs nats-server; builds fnlet and the no-op as for lambda; runs
#   `cargo bench -p fnlet-benches --bench topics`.
# control: Lambda's control plane on a real `fnlet agent`: CreateFunction of a 5 MB zip to its
#   first successful invoke, beside `fnlet deploy`'s POST /v1/functions of the same zip; then warm
#   calls of the no-op, the Invoke API (buffered) beside InvokeWithResponseStream's first byte and
#   its InvokeComplete. Builds
#   fnlet and the no-op as for lambda; runs `cargo bench -p fnlet-benches --bench control`.
# network: functions' egress with the isolate library and the agent's network code: cold start
#   of a prepared sandbox with and without egress, the cost of a veth + address + rules per
#   instance, and an HTTP GET loop (curl) from a function against the same from the host, to a
#   server in an upstream namespace of the bench's own. Installs nftables, conntrack, curl; runs
#   `cargo bench -p fnlet-benches --bench network`.
# density: 1,000 idle warm Lambda instances (100 functions x 10 of the no-op, min_instances) on
#   one real `fnlet agent`, beside one: the agent's RSS, descriptors and idle CPU, per-instance
#   memory (cgroup charge, process RSS, host used and slab), time to start and reap them all, and
#   a warm call's latency with the probe alone, all alive, and alone again. Builds fnlet and the
#   no-op as for lambda; runs `cargo bench -p fnlet-benches --bench density` (about 3 minutes;
#   FNLET_BENCH_FUNCTIONS and FNLET_BENCH_PER_FUNCTION change the count).
# schedules: schedule firing accuracy on a real `fnlet agent`: a per-second schedule's delay from
#   the tick to the event stored and to the run's start (median, p99, max) over
#   FNLET_BENCH_SECONDS (default 600), beside a floor that fires the same script from a plain
#   timer loop between fnlet's ticks. Builds fnlet; runs `cargo bench -p fnlet-benches --bench
#   schedules`.
# catalog: what keeping catalog.json costs while schedules fire: one rewrite of a catalog with
#   50 functions, each with a per-second schedule, by the agent's own code, beside writing the
#   same bytes; the rewrites per second per host at 1 s ticks before and after coalescing. No
#   root, no agent; runs `cargo bench -p fnlet-benches --bench catalog`.
# membership: foca instances (the cluster crate's Membership, production foca_config) on a
#   simulated clock, N = 5 to 1,000, 0 and 10 % loss: join dissemination, failure detection,
#   false positives and traffic per host, beside memberlist's and Serf's published figures. No
#   root, no peers to install, no fnlet build; runs
#   `cargo bench -p fnlet-benches --bench membership` (about 5 minutes on 2 cores).
#
# FNLET_BENCH_RUNS and FNLET_BENCH_WARMUP pass through to each (see each bench's header for its
# other variables); arguments after the first go to the bench binary.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
[ $# -gt 0 ] && shift
case "$which" in
  spawn | agent | lambda | cluster | events | topics | control | network | density | schedules | catalog | membership | all) ;;
  *)
    echo "usage: $0 [spawn|agent|lambda|cluster|events|topics|control|network|density|schedules|catalog|membership|all]" >&2
    exit 2
    ;;
esac
if [ "$which" = membership ]; then
  # In-process simulation: nothing to install or build beyond the bench itself.
  exec cargo bench -p fnlet-benches --bench membership -- "$@"
fi
if [ "$which" = catalog ]; then
  # In-process: the agent's library, no agent to run.
  exec cargo bench -p fnlet-benches --bench catalog -- "$@"
fi
if [ "$(id -u)" != 0 ]; then
  echo "the benchmarks create namespaces and cgroups: run them as root (sudo $0 $which)" >&2
  exit 1
fi
need=()
pkgs=(libseccomp-dev pkg-config)
if [ "$which" = spawn ] || [ "$which" = all ]; then
  pkgs+=(bubblewrap runc gcc libc6-dev)
fi
if [ "$which" = lambda ] || [ "$which" = all ]; then
  # Debian's nginx: the reverse proxy peer (started by the bench on a loopback port, never as a
  # service).
  pkgs+=(nginx)
fi
if [ "$which" = events ] || [ "$which" = topics ] || [ "$which" = all ]; then
  # Debian's nats-server (JetStream included): the peer, started by the bench on a loopback
  # port (the package's own service is not used).
  pkgs+=(nats-server)
fi
if [ "$which" = network ] || [ "$which" = all ]; then
  pkgs+=(nftables conntrack curl iproute2)
fi
for pkg in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
optional=()
if [ "$which" = spawn ] || [ "$which" = all ]; then
  dpkg-query -W -f='${Status}' crun 2>/dev/null | grep -q "install ok installed" || optional+=(crun)
fi
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
if [ "$which" = agent ] || [ "$which" = all ]; then
  # The agent bench deploys the example: build it (the bench copies the fresh binary into a
  # temporary bundle beside the example's fnlet.toml).
  scripts/build-examples.sh
fi
if [ "$which" = lambda ] || [ "$which" = cluster ] || [ "$which" = events ] || [ "$which" = topics ] || [ "$which" = control ] || [ "$which" = density ] || [ "$which" = all ]; then
  # The no-op links statically, so the same file is the fork+exec floor and what fnlet runs.
  # With --target the flag reaches only this crate (it has no dependencies), not the host build.
  target=$(rustc -vV | sed -n 's/^host: //p')
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p fixture-lambda-noop --target "$target"
  install -m 0755 "target/$target/release/fixture-lambda-noop" tests/fixtures/lambda-noop/bundle/bootstrap
fi
status=0
if [ "$which" = spawn ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench spawn -- "$@" || status=$?
fi
if [ "$which" = agent ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench agent -- "$@" || status=$?
fi
if [ "$which" = lambda ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench lambda -- "$@" || status=$?
fi
if [ "$which" = cluster ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench cluster -- "$@" || status=$?
fi
if [ "$which" = events ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench events -- "$@" || status=$?
fi
if [ "$which" = topics ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench topics -- "$@" || status=$?
fi
if [ "$which" = control ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench control -- "$@" || status=$?
fi
if [ "$which" = network ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench network -- "$@" || status=$?
fi
if [ "$which" = density ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench density -- "$@" || status=$?
fi
if [ "$which" = schedules ] || [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench schedules -- "$@" || status=$?
fi
if [ "$which" = all ]; then
  cargo bench -p fnlet-benches --bench catalog -- "$@" || status=$?
  cargo bench -p fnlet-benches --bench membership -- "$@" || status=$?
fi
exit $status
