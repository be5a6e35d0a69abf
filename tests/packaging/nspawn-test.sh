#!/usr/bin/env bash
# The packages under a real systemd: builds the .deb and the .rpm (packaging/build.sh), boots a
# Debian bookworm container with systemd as its PID 1 (systemd-nspawn; this host's PID 1 need not
# be systemd), and for each package: installs it, waits for `systemctl is-active fnlet`, checks the
# unit (Type=notify, STATUS=, Delegate, the agent's cgroup leaf), deploys and invokes the
# examples with the CLI and curl, finds the invocation in `journalctl -u fnlet` with its fields
# (the function's own stderr line with FUNCTION=, VERSION=, REQUEST_ID= and INSTANCE=),
# says what of functions' egress it can check in the container and why (nft, bridge, veth in the
# container's own network namespace), checks that the shipped default_egress ("none") opens
# nothing and, when it can, egress allowed and refused against an upstream namespace it makes
# in the container, and that removed functions take their chains,
# restarts, lets the watchdog kill a frozen agent, upgrades to a second build with an edited
# /etc/fnlet/config.toml, stops, removes, and checks that no fnlet process, cgroup or directory is
# left, inside the container and on this host.
#
#   tests/packaging/nspawn-test.sh          # as root; called by .ci/run
#
# The .deb runs in a container with this host's cgroup layout (hybrid here: v1 controllers
# mounted read-only, a cgroup2 tree delegated without controllers), the .rpm in a pure cgroup2
# container (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1): the agent's two code paths.
#
# The container root (made by mmdebstrap: apt resolves and downloads in one go, then one dpkg
# run; about 40 s here, where debootstrap took 170 s beside the build) is cached as a tarball in
# $FNLET_CI_CACHE (default /var/cache/fnlet-ci) and rebuilt when missing. Everything else (the
# container, its cgroups on this host, the temp dir) is removed on exit, also on failure.
set -euo pipefail

# `grep -q` for the end of a pipeline: reads all of its input. grep -q exits at the first match,
# and under pipefail the writer's SIGPIPE (journalctl with more to write) fails the pipeline.
contains() { grep -c "$@" >/dev/null; }

cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "nspawn-test: needs root (it boots a container): sudo $0" >&2
  exit 1
fi

cache=${FNLET_CI_CACHE:-/var/cache/fnlet-ci}
# nftables and conntrack: what the agent's function network uses (README "Network (egress)").
include=systemd,systemd-sysv,dbus,procps,iproute2,curl,python3,rpm,nftables,conntrack
# The cache key: what the root holds and how it is made.
recipe="mmdebstrap bookworm minbase $include machine-id v2"
rootfs_tar="$cache/rootfs-$(printf '%s' "$recipe" | sha256sum | cut -c1-12).tar.zst"

t_start=$(date +%s.%N)
timings=()
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
timed() { # timed "label" cmd...: runs it, records its duration
  local label=$1 t
  shift
  t=$(now)
  "$@"
  timings+=("$(printf '%-44s %6s s' "$label" "$(secs "$t")")")
}
say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
fail() {
  printf '\nnspawn-test: FAILED: %s\n' "$*" >&2
  exit 1
}

work=$(mktemp -d /var/tmp/fnlet-nspawn.XXXXXX)
machine=fnlet-ci-$$
cg_unified=/sys/fs/cgroup/unified/$machine
cg_systemd=/sys/fs/cgroup/systemd/$machine
nspawn_pid=
leader=

# ---- container plumbing ----

# Removes a cgroup directory tree that is ours, deepest first, once no process is left in it.
remove_cgroup_tree() {
  local top=$1
  [ -d "$top" ] || return 0
  for _ in $(seq 50); do
    if ! find "$top" -name cgroup.procs -exec cat {} + 2>/dev/null | contains .; then
      break
    fi
    sleep 0.1
  done
  find "$top" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  [ ! -d "$top" ] || { echo "nspawn-test: could not remove $top" >&2; return 1; }
}

poweroff() {
  [ -n "$nspawn_pid" ] || return 0
  if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
    nsenter -t "$leader" -a systemctl poweroff >/dev/null 2>&1 || true
  fi
  for _ in $(seq 150); do
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$nspawn_pid" 2>/dev/null; then
    echo "nspawn-test: the container did not power off: stopping systemd-nspawn ($nspawn_pid)" >&2
    kill -TERM "$nspawn_pid" 2>/dev/null || true
    sleep 2
    kill -KILL "$nspawn_pid" 2>/dev/null || true
  fi
  wait "$nspawn_pid" 2>/dev/null || true
  nspawn_pid='' leader=''
  # nspawn leaves its payload/supervisor cgroups behind (no host systemd to clean them up), and
  # its propagation dirs (this host's /run is not a tmpfs).
  remove_cgroup_tree "$cg_unified"
  remove_cgroup_tree "$cg_systemd"
  rm -rf "/run/systemd/nspawn/propagate/$machine" "/run/systemd/nspawn/unix-export/$machine"
  if [ "${nspawn_run_was_there:-1}" = 0 ]; then
    rm -rf /run/systemd/nspawn
  fi
}

# Mounts on this host under our temp dir or named after our container (nspawn mounts in a
# namespace of its own, so there should be none).
own_mounts() {
  awk -v w="$work" -v m="$machine" '
    $5 == w || index($5, w "/") == 1 || index($5 "/", "/" m "/") {print $5}' /proc/self/mountinfo
}

cleanup() {
  local status=$? m
  # A root still being made (the build failed first): let it finish, then drop it.
  if [ -n "${rootfs_job:-}" ]; then wait "$rootfs_job" 2>/dev/null || true; fi
  poweroff || status=1
  # Never rm -rf through a mount: a leftover bind mount would take its source with it.
  for m in $(own_mounts | sort -r); do
    echo "nspawn-test: unmounting leftover $m" >&2
    umount -l "$m" || status=1
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# boot unified|hybrid: boots the container on a fresh overlay of the cached root.
boot() {
  local mode=$1
  local log="$work/nspawn-$mode.log"
  mkdir -p "$cg_unified" "$cg_systemd"
  [ -d /run/systemd/nspawn ] && nspawn_run_was_there=1 || nspawn_run_was_there=0
  # nspawn (--keep-unit) puts the container below its own cgroup: give it one of ours, in the
  # two hierarchies it uses (never a v1 controller's), so all it makes is ours to remove.
  (
    echo "$BASHPID" >"$cg_unified/cgroup.procs"
    echo "$BASHPID" >"$cg_systemd/cgroup.procs"
    if [ "$mode" = unified ]; then export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1; fi
    # --register=no --keep-unit: there is no host systemd/machined to register with.
    # --private-network: the container gets a network namespace with only lo, and with it
    # CAP_NET_ADMIN, which sandboxes need to bring up their own lo (nspawn drops it otherwise).
    exec systemd-nspawn -D "$work/root" -M "$machine" --register=no --keep-unit -b \
      --volatile=overlay --private-network --console=read-only \
      --bind-ro="$work/share:/mnt/ci" </dev/null
  ) >"$log" 2>&1 &
  nspawn_pid=$!
  for _ in $(seq 100); do
    leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$log" >&2; fail "systemd-nspawn exited"; }
    sleep 0.05
  done
  [ -n "$leader" ] || { cat "$log" >&2; fail "no systemd in the container after 5 s"; }
  local state=
  # Until PID 1 has its private bus socket, systemctl cannot ask it anything.
  for _ in $(seq 200); do
    state=$(nsenter -t "$leader" -a systemctl is-system-running 2>&1 || true)
    case "$state" in *"Failed to connect to bus"*) sleep 0.05 ;; *) break ;; esac
  done
  state=$(timeout 60 nsenter -t "$leader" -a systemctl is-system-running --wait 2>&1 || true)
  if [ "$state" != running ]; then
    nsenter -t "$leader" -a systemctl --failed --no-pager >&2 || true
    fail "the container's systemd is '$state', not running"
  fi
  forward_at_boot=$(in_ct cat /proc/sys/net/ipv4/ip_forward)
}

# Runs a command in the container, as its root, with a clean environment.
in_ct() {
  nsenter -t "$leader" -a -- env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 "$@"
}
sh_ct() { in_ct sh -c "$1"; }

wait_active() {
  local s
  for _ in $(seq 300); do
    s=$(in_ct systemctl is-active fnlet 2>/dev/null || true)
    [ "$s" = active ] && return 0
    [ "$s" = failed ] && break
    sleep 0.1
  done
  in_ct systemctl status fnlet --no-pager -l >&2 || true
  in_ct journalctl -u fnlet --no-pager -n 40 >&2 || true
  fail "fnlet is '$s', not active"
}

main_pid() { in_ct systemctl show fnlet -p MainPID --value; }
prop() { in_ct systemctl show fnlet -p "$1" --value; }

# ---- the checks, the same for both packages ----

check_unit() {
  [ "$(prop Type)" = notify ] || fail "Type is $(prop Type)"
  [ "$(prop NotifyAccess)" = main ] || fail "NotifyAccess is $(prop NotifyAccess)"
  [ "$(prop Delegate)" = yes ] || fail "Delegate is $(prop Delegate)"
  [ "$(prop KillMode)" = mixed ] || fail "KillMode is $(prop KillMode)"
  [ "$(prop WatchdogUSec)" = 30s ] || fail "WatchdogUSec is $(prop WatchdogUSec)"
  local status
  status=$(prop StatusText)
  note "STATUS=$status"
  case "$status" in serving*) ;; *) fail "STATUS= is '$status'" ;; esac
  # Delegation: the agent moved itself into <unit>/agent; sandboxes go to <unit>/instances.
  local pid cg
  pid=$(main_pid)
  cg=$(sh_ct "grep '^0::' /proc/$pid/cgroup")
  note "agent cgroup: $cg"
  [ "$cg" = "0::/system.slice/fnlet.service/agent" ] || fail "the agent is in $cg, not its delegated leaf"
  # The spawn helper (sandbox.spawn_helper, on by default) is the agent's child, in its leaf.
  local helper
  helper=$(sh_ct "pgrep -P $pid -x fnlet-spawner" || true)
  [ -n "$helper" ] || fail "the agent ($pid) has no fnlet-spawner child"
  cg=$(sh_ct "grep '^0::' /proc/$helper/cgroup")
  [ "$cg" = "0::/system.slice/fnlet.service/agent" ] || fail "the spawn helper is in $cg, not the agent's leaf"
  in_ct systemd-analyze verify --man=no fnlet.service || fail "systemd-analyze verify fnlet.service"
}

# Says what cannot be checked here, from what the agent itself reports.
limits_note() {
  local warn
  warn=$(in_ct journalctl -u fnlet -b --no-pager -o cat -p warning | grep -m1 'limits NOT enforced' || true)
  if [ -n "$warn" ]; then
    note "NOT TESTED HERE: function memory, cpu and pids limits. This container's cgroup tree has"
    note "no controllers (on this cgroup v1 hybrid host every controller is bound to v1, and"
    note "nspawn mounts those read-only), so the agent runs functions without them and says:"
    note "  $warn"
    note "The limits are tested outside the container by scripts/test.sh (v1), and need a"
    note "cgroup v2 host with systemd as PID 1 to be tested under the unit."
  else
    note "the agent enforces function limits in this container"
  fi
}

invoke_examples() { # invoke_examples LABEL: CLI and curl, then the journal; prints the request id
  local out rid
  out=$(in_ct fnlet invoke hello-sh -d Ada 2>&1) || fail "fnlet invoke hello-sh: $out"
  case "$out" in *"Hello, Ada!"*) ;; *) fail "fnlet invoke hello-sh answered: $out" ;; esac
  out=$(in_ct curl -sS --fail-with-body -D - -d '{"name": "Grace"}' http://127.0.0.1:8740/fn/hello-py) ||
    fail "curl hello-py: $out"
  case "$out" in *Grace*) ;; *) fail "curl hello-py answered: $out" ;; esac
  out=$(in_ct curl -sS --fail-with-body -D - -d Linus http://127.0.0.1:8740/fn/hello-sh) ||
    fail "curl hello-sh: $out"
  rid=$(printf '%s\n' "$out" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-fnlet-request-id" {print $2}')
  [ -n "$rid" ] || fail "no X-Fnlet-Request-Id in: $out"
  note "$1: hello-sh and hello-py answered (CLI and curl); request $rid"
  # The function's own stderr line reaches the journal, attributed to it.
  local entry=
  for _ in $(seq 50); do
    entry=$(in_ct journalctl -u fnlet --no-pager -o verbose FUNCTION=hello-sh REQUEST_ID="$rid" STREAM=stderr || true)
    case "$entry" in *"greeting Linus"*) break ;; esac
    sleep 0.1
  done
  case "$entry" in *"greeting Linus"*) ;; *) fail "no journal entry of hello-sh's stderr for request $rid" ;; esac
  for field in "_SYSTEMD_UNIT=fnlet.service" "SYSLOG_IDENTIFIER=fnlet" "VERSION=" "TARGET=fnlet::function"; do
    case "$entry" in *"$field"*) ;; *) fail "the journal entry has no $field: $entry" ;; esac
  done
  # INSTANCE= names the sandbox that wrote the line: its cgroup leaf, <function>-<agent pid>-<n>.
  local instance agent_pid
  instance=$(printf '%s\n' "$entry" | sed -n 's/^ *INSTANCE=//p' | head -1)
  agent_pid=$(main_pid)
  [[ $instance =~ ^hello-sh-$agent_pid-[0-9]+$ ]] ||
    fail "the stderr line's INSTANCE is '$instance', not hello-sh-$agent_pid-<n> (its sandbox's cgroup leaf): $entry"
  in_ct journalctl -u fnlet --no-pager -o cat INSTANCE="$instance" | contains "greeting Linus" ||
    fail "journalctl INSTANCE=$instance does not find hello-sh's stderr line"
  in_ct journalctl -u fnlet --no-pager -o verbose FUNCTION=hello-sh REQUEST_ID="$rid" MESSAGE="invocation ok" |
    grep -q DURATION_MS= || fail "no 'invocation ok' entry with DURATION_MS for request $rid"
  note "journalctl -u fnlet FUNCTION=hello-sh REQUEST_ID=$rid STREAM=stderr: the function's own line:"
  in_ct journalctl -u fnlet --no-pager -o json FUNCTION=hello-sh REQUEST_ID="$rid" STREAM=stderr |
    in_ct python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("      " + " ".join(f"{k}={e.get(k)!r}" for k in
        ("_SYSTEMD_UNIT", "PRIORITY", "FUNCTION", "VERSION", "REQUEST_ID", "INSTANCE", "STREAM", "MESSAGE")))
' >&2
}

# ---- function egress: what this container can check, and that ----

# The container's own network namespace (--private-network) holds only lo: nothing here leads
# out of this host, so the only upstream is the namespace the test makes in the container
# (fnlci-up, 198.18.0.2, servers on :8000 and :8001; 198.18.0.1 is the container's end).
UPSTREAM=198.18.0.2

# Sets egress_can=yes when the agent's egress can run in this container (nft with the inet and
# bridge families and the fib and ct count expressions, a bridge, a veth pair, all in the
# container's network namespace), and says what can and cannot be checked here, and why.
egress_probe() {
  local missing=() tool
  for tool in nft tc conntrack; do
    in_ct sh -c "command -v $tool" >/dev/null || missing+=("$tool")
  done
  local can=() cannot=()
  if [ ${#missing[@]} -gt 0 ]; then
    cannot+=("no ${missing[*]} in the container")
  fi
  if sh_ct 'command -v nft >/dev/null && nft -f - <<EOF && nft delete table inet fnlci && nft delete table bridge fnlci
table inet fnlci {
  chain c {
    type filter hook forward priority 0;
    fib daddr type local drop
    ct count over 4 drop
  }
}
table bridge fnlci {
  chain c {
    type filter hook prerouting priority -200;
    iifname "fnlci-*" drop
  }
}
EOF' >/dev/null 2>"$work/probe.err"; then
    can+=("nftables (inet and bridge families, fib, ct count)")
  else
    cannot+=("nftables in the container's namespace: $(tr '\n' ' ' <"$work/probe.err")")
  fi
  if sh_ct 'ip link add fnlci-br type bridge && ip link del fnlci-br && ip link add fnlci-a type veth peer name fnlci-b && ip link del fnlci-a' 2>"$work/probe.err"; then
    can+=("a bridge and veth pairs")
  else
    cannot+=("bridge or veth: $(tr '\n' ' ' <"$work/probe.err")")
  fi
  if [ ${#cannot[@]} -eq 0 ]; then
    egress_can=yes
    local joined
    joined=$(printf '%s, ' "${can[@]}")
    note "egress CAN be exercised here: ${joined%, }; checked: a function allowed ${UPSTREAM}:8000"
    note "  reaches it and not :8001, one with \"all\" reaches :8001 and not the container's own"
    note "  address, one with the default (\"none\") reaches nothing and has only lo; removing"
    note "  them removes their chains; stop leaves no bridge, veth or table"
  else
    egress_can=no
    note "egress CANNOT be exercised here: ${cannot[*]}"
    note "  checked only: the shipped default_egress (\"none\") opens nothing"
  fi
  note "egress NOT checked here (tests/network.rs does, on the host): traffic out of the host"
  note "  (the container has only lo and the test's upstream namespace), the masquerade onto a real"
  note "  uplink, DNS, rate_mbit, max_connections, conntrack cleanup under load, kill -9 and restart"
}

# With the shipped config (default_egress "none") and functions without [network], the agent
# makes nothing of the function network: no bridge, veth or table, ip_forward as it was.
egress_none_opens_nothing() {
  in_ct grep -qx '#default_egress = "none"' /etc/fnlet/config.toml ||
    fail "the shipped config does not leave default_egress at \"none\""
  local left
  left=$(sh_ct 'ip -o link show | grep -o "fnlet0[^:@]*"' || true)
  [ -z "$left" ] || fail "default_egress \"none\", yet links: $left"
  if in_ct sh -c 'command -v nft' >/dev/null; then
    left=$(sh_ct 'nft list tables | grep -w fnlet0' || true)
    [ -z "$left" ] || fail "default_egress \"none\", yet nft tables: $left"
  fi
  [ "$(sh_ct 'cat /proc/sys/net/ipv4/ip_forward')" = "$forward_at_boot" ] ||
    fail "default_egress \"none\", yet ip_forward changed"
  note "default_egress \"none\" (shipped): no bridge, veth or nft table; ip_forward untouched"
}

# ci_net NAME: the function's answer to the shell script on stdin.
ci_net() { in_ct fnlet invoke "$1" -d @- 2>&1; }

check_egress() {
  egress_none_opens_nothing
  in_ct fnlet deploy /mnt/ci/examples/ci-none >/dev/null
  local out
  out=$(echo 'cat /proc/net/dev' | ci_net ci-none) || fail "ci-none: $out"
  case "$out" in *eth0*) fail "a function without egress has eth0: $out" ;; esac
  case "$out" in *lo:*) ;; *) fail "ci-none: no lo in /proc/net/dev: $out" ;; esac
  [ "$egress_can" = yes ] || return 0

  # The upstream: a namespace with a veth to the container's, a server on :8000 and :8001.
  sh_ct "ip netns add fnlci-up && ip link add fnlci-h type veth peer name fnlci-u &&
    ip link set fnlci-u netns fnlci-up && ip addr add 198.18.0.1/30 dev fnlci-h &&
    ip link set fnlci-h up && ip -n fnlci-up addr add $UPSTREAM/30 dev fnlci-u &&
    ip -n fnlci-up link set fnlci-u up" || fail "making the upstream namespace"
  local port
  for port in 8000 8001 8002; do
    # 8002 listens on the container's own address: a function must never reach it.
    # nsenter, not `ip netns exec`: that remounts /sys, which nspawn keeps read-only.
    local ns="nsenter --net=/run/netns/fnlci-up" at=$UPSTREAM
    [ "$port" = 8002 ] && ns='' at=198.18.0.1
    sh_ct "$ns setsid python3 -m http.server $port --bind $at --directory /mnt/ci/examples >/dev/null 2>&1 </dev/null & echo \$! >>/run/fnlci-servers"
  done
  for port in 8000 8001 8002; do
    local at=$UPSTREAM
    [ "$port" = 8002 ] && at=198.18.0.1
    sh_ct "for i in \$(seq 50); do curl -s -o /dev/null http://$at:$port/ && exit 0; sleep 0.1; done; exit 1" ||
      fail "the test's server on $at:$port did not start"
  done
  in_ct fnlet deploy /mnt/ci/examples/ci-rules >/dev/null
  in_ct fnlet deploy /mnt/ci/examples/ci-all >/dev/null
  # fetch ADDR:PORT: a script that prints code=200 when the GET is answered, code=000 when the
  # connection fails.
  fetch() { printf 'echo code=$(curl -s -m 5 -o /dev/null -w "%%{http_code}" http://%s/)\n' "$1"; }
  expect_code() { # expect_code FUNCTION ADDR:PORT CODE WHY
    out=$(fetch "$2" | ci_net "$1")
    case "$out" in *"code=$3"*) ;; *) fail "$1 to $2: $4 (expected code=$3): $out" ;; esac
  }
  expect_code ci-rules "$UPSTREAM:8000" 200 "its rule names it"
  expect_code ci-rules "$UPSTREAM:8001" 000 "its rules name another port"
  expect_code ci-all "$UPSTREAM:8001" 200 "egress \"all\""
  expect_code ci-all 198.18.0.1:8002 000 "the container's own address is always denied"
  expect_code ci-none "$UPSTREAM:8000" 000 "the default egress is \"none\""
  local denied
  denied=$(in_ct curl -sS http://127.0.0.1:8740/metrics | awk '$1 == "fnlet_network_denied_total{function=\"ci-rules\"}" {print $2}')
  [ "${denied:-0}" != 0 ] || fail "ci-rules' refused attempt is not counted in fnlet_network_denied_total"
  note "egress: allowed reached, other port, own address and \"none\" refused; denied counted ($denied)"
  # A removed function's chains go with it (once its instances are gone).
  in_ct fnlet rm ci-rules >/dev/null
  sh_ct 'for i in $(seq 100); do nft list chain inet fnlet0 out_ci-rules >/dev/null 2>&1 || exit 0; sleep 0.1; done; exit 1' ||
    fail "ci-rules was removed, its chain out_ci-rules stayed"
  in_ct fnlet rm ci-all >/dev/null
  in_ct fnlet rm ci-none >/dev/null
  sh_ct 'kill $(cat /run/fnlci-servers); rm -f /run/fnlci-servers; ip netns del fnlci-up; ip link del fnlci-h 2>/dev/null; true'
  note "egress: removed functions took their chains; the upstream namespace is gone"
}

# A lost spawn helper: calls go on (the agent clones in-process), and a fresh one, the agent's
# child in its delegated leaf, takes over; `fnlet status` counts it.
helper_relaunch() {
  local pid old new cg out
  pid=$(main_pid)
  old=$(sh_ct "pgrep -P $pid -x fnlet-spawner" || true)
  [ -n "$old" ] || fail "the agent ($pid) has no fnlet-spawner child"
  in_ct kill -KILL "$old"
  out=$(in_ct fnlet invoke hello-sh -d Ada 2>&1) || fail "fnlet invoke hello-sh after the helper was killed: $out"
  # (The killed one stays a zombie, the agent's to reap, until the new one takes its place.)
  for _ in $(seq 300); do
    new=$(sh_ct "pgrep -P $pid -x fnlet-spawner" | grep -vx "$old" | head -n 1 || true)
    [ -n "$new" ] && break
    sleep 0.1
  done
  [ -n "$new" ] || fail "no new fnlet-spawner after $old was killed"
  cg=$(sh_ct "grep '^0::' /proc/$new/cgroup")
  [ "$cg" = "0::/system.slice/fnlet.service/agent" ] || fail "the relaunched spawn helper is in $cg, not the agent's leaf"
  out=$(in_ct fnlet invoke hello-sh -d Ada 2>&1) || fail "fnlet invoke hello-sh with the new helper: $out"
  out=$(in_ct fnlet status 2>&1) || fail "fnlet status: $out"
  case "$out" in *"spawn helper, pid $new (1 lost and replaced)"*) ;; *) fail "fnlet status after the relaunch: $out" ;; esac
  note "spawn helper $old killed: calls went on, $new took over in the agent's leaf"
}

check_running() {
  local label=$1
  timed "$label: active" wait_active
  timed "$label: unit, delegation, STATUS" check_unit
  timed "$label: deploy (CLI)" sh_ct 'fnlet deploy /mnt/ci/examples/hello-sh >/dev/null && fnlet deploy /mnt/ci/examples/hello-py >/dev/null'
  timed "$label: invoke + journal" invoke_examples "$label"
  timed "$label: spawn helper relaunch" helper_relaunch
  limits_note
  egress_probe
  timed "$label: egress" check_egress
  note "the agent on its cgroups:"
  in_ct journalctl -u fnlet -b --no-pager -o cat | grep -m3 -E 'cgroup|delegat' | sed 's/^/      /' >&2 || true
  in_ct systemctl status fnlet --no-pager -l -n 0 | sed 's/^/    | /' >&2 || true
}

restart_keeps_functions() {
  local before after
  before=$(main_pid)
  in_ct systemctl restart fnlet
  wait_active
  after=$(main_pid)
  [ "$before" != "$after" ] || fail "restart kept MainPID $before"
  in_ct fnlet ls | contains '^hello-sh ' || fail "hello-sh is gone after the restart"
}

watchdog_restarts_a_frozen_agent() {
  sh_ct 'mkdir -p /run/systemd/system/fnlet.service.d && printf "[Service]\nWatchdogSec=2\nTimeoutAbortSec=1\n" >/run/systemd/system/fnlet.service.d/ci-watchdog.conf'
  in_ct systemctl daemon-reload
  in_ct systemctl restart fnlet
  wait_active
  local frozen restarts now_pid
  frozen=$(main_pid)
  restarts=$(prop NRestarts)
  # More than a watchdog period first: the self-check passes and the pings keep it alive.
  sleep 2.5
  [ "$(main_pid)" = "$frozen" ] || fail "the watchdog restarted a healthy agent"
  in_ct kill -STOP "$frozen"
  for _ in $(seq 200); do
    now_pid=$(main_pid)
    if [ "$now_pid" != "$frozen" ] && [ "$now_pid" != 0 ] &&
      [ "$(in_ct systemctl is-active fnlet || true)" = active ]; then
      break
    fi
    sleep 0.1
  done
  [ "$(prop NRestarts)" -gt "$restarts" ] || fail "the watchdog did not restart the frozen agent"
  # journald may write the manager's line a moment after the restart: give it a few seconds.
  local logged=no
  for _ in $(seq 50); do
    if in_ct journalctl -u fnlet -b --no-pager -o cat | contains 'Watchdog timeout'; then
      logged=yes
      break
    fi
    sleep 0.1
  done
  [ "$logged" = yes ] || fail "no 'Watchdog timeout' in the journal"
  sh_ct 'rm -rf /run/systemd/system/fnlet.service.d'
  in_ct systemctl daemon-reload
  in_ct systemctl restart fnlet
  wait_active
  in_ct fnlet ls | contains '^hello-sh ' || fail "hello-sh is gone after the watchdog restart"
}

edit_config() {
  sh_ct "sed -i 's/^#retain_versions = 5\$/retain_versions = 3/' /etc/fnlet/config.toml && echo '# edited by the packaging test' >>/etc/fnlet/config.toml"
  in_ct grep -q '^retain_versions = 3$' /etc/fnlet/config.toml || fail "could not edit the config"
}

after_upgrade() { # after_upgrade VERSION PID_BEFORE
  wait_active
  [ "$(main_pid)" != "$2" ] || fail "the upgrade did not restart the agent"
  in_ct grep -q '^retain_versions = 3$' /etc/fnlet/config.toml || fail "the upgrade lost the edited config"
  in_ct grep -q '^# edited by the packaging test$' /etc/fnlet/config.toml || fail "the upgrade replaced the edited config"
  in_ct fnlet ls | contains '^hello-sh ' || fail "hello-sh is gone after the upgrade"
  in_ct fnlet ls | contains '^hello-py ' || fail "hello-py is gone after the upgrade"
  local out
  out=$(in_ct fnlet invoke hello-sh -d Ada 2>&1) || fail "invoke after the upgrade: $out"
  note "upgraded to $1: config edit kept, functions kept, hello-sh answers"
}

stop_cleanly() {
  in_ct systemctl stop fnlet
  [ "$(in_ct systemctl is-active fnlet || true)" = inactive ] || fail "fnlet did not stop"
  [ "$(prop Result)" = success ] || fail "the stop was not clean: Result=$(prop Result)"
  for _ in $(seq 50); do
    in_ct journalctl -u fnlet -b --no-pager -o cat | contains 'fnlet agent stopped' && return 0
    sleep 0.1
  done
  in_ct journalctl -u fnlet -b --no-pager -n 30 >&2 || true
  fail "the agent did not log its clean stop"
}

# Nothing of fnlet is left in the container: processes, cgroups, files, the unit.
check_nothing_left() {
  local left
  # The agent, and sandbox inits (fnlet-init) it might have left.
  left=$(in_ct pgrep -a fnlet || true)
  [ -z "$left" ] || fail "fnlet processes left: $left"
  # The hierarchies this container may write (hybrid: unified/ and systemd/; the v1 controllers
  # it sees are this host's, read-only, and not the container's business).
  left=$(sh_ct 'if [ -d /sys/fs/cgroup/unified ]; then set -- /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; else set -- /sys/fs/cgroup; fi; find "$@" -name "fnlet*" 2>/dev/null' || true)
  [ -z "$left" ] || fail "cgroups left: $left"
  left=$(sh_ct 'ls -d /etc/fnlet /var/lib/fnlet /var/log/fnlet /run/fnlet /usr/bin/fnlet /usr/lib/systemd/system/fnlet.service /etc/systemd/system/multi-user.target.wants/fnlet.service /usr/share/doc/fnlet /usr/share/man/man1/fnlet.1.gz 2>/dev/null' || true)
  [ -z "$left" ] || fail "files left: $left"
  left=$(in_ct systemctl list-unit-files --no-legend fnlet.service || true)
  [ -z "$left" ] || fail "the unit is still known: $left"
  # The function network (made for the egress checks) went at the agent's stop.
  left=$(sh_ct 'ip -o link show | grep -o "fnlet0[^:@]*"; nft list tables 2>/dev/null | grep -w fnlet0' || true)
  [ -z "$left" ] || fail "function network left: $left"
}

# ---- one package's life ----

test_deb() {
  say "deb: install, run, restart, watchdog, upgrade, stop, purge (container: $1 cgroups)"
  timed "deb: boot ($1)" boot "$1"
  timed "deb: dpkg -i (revision 1)" in_ct dpkg -i "/mnt/ci/pkgs/$deb1" >/dev/null
  check_running deb
  timed "deb: systemctl restart" restart_keeps_functions
  timed "deb: watchdog kills a frozen agent" watchdog_restarts_a_frozen_agent
  edit_config
  local pid
  pid=$(main_pid)
  timed "deb: upgrade (dpkg -i revision 2)" in_ct dpkg -i "/mnt/ci/pkgs/$deb2" >/dev/null
  timed "deb: after the upgrade" after_upgrade "$version-2" "$pid"
  # shellcheck disable=SC2016 # dpkg-query's own ${Version}, not the shell's
  [ "$(in_ct dpkg-query -W -f '${Version}' fnlet)" = "$version-2" ] || fail "dpkg does not have $version-2"
  timed "deb: systemctl stop" stop_cleanly
  timed "deb: dpkg -P (purge)" in_ct dpkg -P fnlet >/dev/null
  check_nothing_left
  note "deb: purged; no fnlet process, cgroup, file or unit left"
  timed "deb: poweroff" poweroff
}

# Debian's rpm warns that it is not Debian's package manager: that much is known.
rpm_ct() {
  local out status=0
  out=$(in_ct rpm --dbpath /var/lib/rpm "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -v -e 'should not be used directly' -e 'assuming you know what you are doing' -e '^$' >&2 || true
  return "$status"
}

test_rpm() {
  say "rpm: install, run, restart, watchdog, upgrade, stop, erase (container: $1 cgroups)"
  timed "rpm: boot ($1)" boot "$1"
  in_ct rpm --initdb --dbpath /var/lib/rpm
  # --nodeps: Debian's rpm database knows none of the container's libraries.
  timed "rpm: rpm -i (release 1)" rpm_ct -i --nodeps "/mnt/ci/pkgs/$rpm1"
  [ "$(in_ct rpm -q --dbpath /var/lib/rpm fnlet 2>/dev/null)" = "fnlet-$version-1.x86_64" ] || fail "rpm -i did not install fnlet"
  in_ct rpm -q --dbpath /var/lib/rpm --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' fnlet 2>/dev/null |
    grep -qx '/etc/fnlet/config.toml cn' || fail "/etc/fnlet/config.toml is not %config(noreplace)"
  check_running rpm
  timed "rpm: systemctl restart" restart_keeps_functions
  timed "rpm: watchdog kills a frozen agent" watchdog_restarts_a_frozen_agent
  edit_config
  local pid
  pid=$(main_pid)
  timed "rpm: upgrade (rpm -U release 2)" rpm_ct -U --nodeps "/mnt/ci/pkgs/$rpm2"
  timed "rpm: after the upgrade" after_upgrade "$version-2" "$pid"
  timed "rpm: systemctl stop" stop_cleanly
  timed "rpm: rpm -e" rpm_ct -e --nodeps fnlet
  # An erase keeps the data and the edited config (RPM's way, README "Install"); the rest goes.
  local kept
  kept=$(sh_ct 'ls -d /var/lib/fnlet /var/log/fnlet /etc/fnlet/config.toml.rpmsave 2>/dev/null | sort | tr "\n" " "')
  [ "$kept" = "/etc/fnlet/config.toml.rpmsave /var/lib/fnlet /var/log/fnlet " ] ||
    fail "after rpm -e expected the data and config.toml.rpmsave kept, found: $kept"
  note "rpm -e kept $kept(by design); removing them as the README says"
  sh_ct 'rm -rf /var/lib/fnlet /var/log/fnlet /etc/fnlet'
  check_nothing_left
  note "rpm: erased; no fnlet process, cgroup, file or unit left"
  timed "rpm: poweroff" poweroff
}

# ---- setup ----

say "host tools"
need=()
for pkg in mmdebstrap systemd-container rpm zstd; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | contains "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt_install() { # with the package lists as they are, else fresh ones
    local get=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q)
    "${get[@]}" install --no-install-recommends "$@" >/dev/null 2>&1 ||
      { "${get[@]}" update >/dev/null && "${get[@]}" install --no-install-recommends "$@" >/dev/null; }
  }
  timed "apt-get install ${need[*]}" apt_install "${need[@]}"
fi

# The container root first, in the background (mostly downloading and unpacking) while the
# packages build.
say "container root: Debian bookworm (minbase + $include)"
rootfs_job=
if [ ! -f "$rootfs_tar" ]; then
  note "not cached: mmdebstrap into $rootfs_tar while the packages build"
  mkdir -p "$cache"
  build_root() {
    local t
    t=$(now)
    # niced: the release build beside it is the longer path. mmdebstrap writes the tarball
    # itself (zstd, from the name) and leaves no apt lists or downloaded .debs in it; the hooks
    # name the container and give it a machine id of its own.
    # shellcheck disable=SC2016 # $1 is the hook's argument: mmdebstrap's shell expands it
    nice -n 10 mmdebstrap --variant=minbase --include="$include" \
      --customize-hook='echo fnlet-ci >"$1/etc/hostname"' \
      --customize-hook='rm -f "$1/etc/machine-id" && chroot "$1" systemd-machine-id-setup' \
      bookworm "$rootfs_tar.tmp.$$.tar.zst" >"$work/mmdebstrap.log" 2>&1 ||
      { tail -20 "$work/mmdebstrap.log"; rm -f "$rootfs_tar.tmp.$$.tar.zst"; return 1; }
    mv "$rootfs_tar.tmp.$$.tar.zst" "$rootfs_tar"
    # Older recipes' tarballs are of no use any more.
    find "$cache" -maxdepth 1 -name 'rootfs-*.tar.zst' ! -path "$rootfs_tar" -delete
    secs "$t" >"$work/rootfs.secs"
  }
  build_root >"$work/build-root.out" 2>&1 &
  rootfs_job=$!
else
  note "cached: $rootfs_tar"
fi

say "packages: revision 1, and revision 2 (the upgrade) of the same binary"
mkdir -p "$work/share/pkgs" "$work/share/examples"
timed "packaging/build.sh --release 1 --release 2" packaging/build.sh --release 1 --release 2
version=$(target/release/fnlet --version | awk '{print $2}')
deb1=fnlet_${version}-1_amd64.deb rpm1=fnlet-${version}-1.x86_64.rpm
deb2=fnlet_${version}-2_amd64.deb rpm2=fnlet-${version}-2.x86_64.rpm
cp "target/packages/$deb1" "target/packages/$rpm1" "target/packages/$deb2" "target/packages/$rpm2" "$work/share/pkgs/"
# The examples as a user deploys them: readable by every uid, scripts executable.
cp -r examples/hello-sh examples/hello-py "$work/share/examples/"
chmod -R a+rX "$work/share"
chmod 0755 "$work/share/examples/hello-sh/hello.sh"
# Functions that run their input as a shell script, with three egress policies (see
# check_egress): the default ("none", as shipped), one rule, "all".
for f in ci-none ci-rules ci-all; do
  mkdir "$work/share/examples/$f"
  printf '#!/bin/sh\n/bin/sh -s 2>&1; exit 0\n' >"$work/share/examples/$f/run.sh"
  chmod 0755 "$work/share/examples/$f/run.sh"
  printf 'name = "%s"\nentrypoint = "run.sh"\ntimeout_s = 20\npublic = true\n' "$f" >"$work/share/examples/$f/fnlet.toml"
done
printf '[network]\negress = ["198.18.0.2:8000"]\n' >>"$work/share/examples/ci-rules/fnlet.toml"
printf '[network]\negress = "all"\n' >>"$work/share/examples/ci-all/fnlet.toml"
chmod -R a+rX "$work/share"

if [ -n "$rootfs_job" ]; then
  t=$(now)
  if ! wait "$rootfs_job"; then
    rootfs_job=
    cat "$work/build-root.out" >&2
    fail "building the container root failed"
  fi
  rootfs_job=
  timings+=("$(printf '%-44s %6s s' "mmdebstrap + cache (beside the build)" "$(cat "$work/rootfs.secs")")")
  timings+=("$(printf '%-44s %6s s' "  of which waited for after the build" "$(secs "$t")")")
fi
mkdir "$work/root"
timed "unpack the root" tar -C "$work/root" --zstd -xf "$rootfs_tar"

test_deb hybrid
test_rpm unified

say "host: nothing left"
if [ -d "$cg_unified" ] || [ -d "$cg_systemd" ]; then fail "nspawn's cgroups are still on the host"; fi
left=$(find /sys/fs/cgroup/unified /sys/fs/cgroup/systemd -maxdepth 1 -name "$machine" 2>/dev/null || true)
[ -z "$left" ] || fail "host cgroups left: $left"
left=$(own_mounts)
[ -z "$left" ] || fail "mounts left on the host: $left"
note "no container, cgroup, mount or process of the test is left on this host"

say "timings"
for t in "${timings[@]}"; do printf '    %s\n' "$t"; done
printf '    %-44s %6s s\n' "total" "$(secs "$t_start")"
echo "nspawn packaging test: 2 passed, 0 failed"
