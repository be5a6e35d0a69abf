#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages fnlet builds and tests with. Idempotent; needs root.
set -euo pipefail
need=()
# python3-pip: `fnlet runtime add python3.11` installs awslambdaric with it (tests/python.rs).
# nftables: packet loss and partitions inside the cluster test's network namespace
# (tests/cluster.rs), which also calls its agents with curl.
# conntrack: the agent removes finished instances' connection tracking entries with it;
# dnsmasq: the DNS resolver in tests/network.rs' upstream namespace.
# nats-server: the JetStream cluster tests/events_nats.rs and `benches/run.sh events` start.
# tzdata: schedule triggers read their time zones from /usr/share/zoneinfo.
for pkg in libseccomp-dev pkg-config gcc libc6-dev iproute2 python3 python3-pip curl nftables conntrack dnsmasq-base nats-server tzdata; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
