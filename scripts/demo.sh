#!/usr/bin/env bash
# The whole thing on one machine, for a newcomer: as root on a fresh Debian or Ubuntu machine,
# from a checkout, `scripts/demo.sh`.
#
# Installs what fnlet builds with, builds it (release), builds the examples, starts
# `fnlet agent` on its embedded defaults (http://127.0.0.1:8740, state in /var/lib/fnlet),
# deploys every example with `fnlet deploy`, calls each once and prints how to call them.
# The agent then stays in the foreground: Ctrl-C (or SIGTERM) drains it and stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

ENDPOINT=http://127.0.0.1:8740
STATE_DIR=/var/lib/fnlet
FNLET=target/release/fnlet
EXAMPLES=(examples/hello-sh examples/hello-py examples/wordcount-rust/bundle examples/hello-lambda/bundle)

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "fnlet's agent creates namespaces and cgroups for every function: run this as root (sudo $0)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is not installed: install Rust (https://rustup.rs), then run $0 again" >&2
  exit 1
fi

say "Installing the build dependencies"
scripts/install-deps.sh
say "Building fnlet (release)"
# fnlet alone: the test fixtures (the AWS SDK one among them) are the test suite's business.
cargo build --release -p fnlet --bin fnlet
say "Building the examples"
scripts/build-examples.sh

if curl -s -o /dev/null --max-time 2 "$ENDPOINT/healthz"; then
  echo "something already answers on $ENDPOINT (another fnlet agent?): stop it first" >&2
  exit 1
fi

say "Starting the agent: $FNLET agent (listen ${ENDPOINT#http://}, state in $STATE_DIR)"
agent=
stop_agent() {
  if [ -n "$agent" ]; then kill -TERM "$agent" 2>/dev/null || true; fi
}
# Ctrl-C and SIGTERM go to the agent, which drains in-flight invocations and exits 0.
trap stop_agent INT TERM
FNLET_LOG=${FNLET_LOG:-info} "$FNLET" agent &
agent=$!

fail() {
  echo "demo: $*" >&2
  stop_agent
  wait "$agent" 2>/dev/null || true
  exit 1
}

for _ in $(seq 100); do
  curl -sf -o /dev/null --max-time 1 "$ENDPOINT/readyz" && break
  kill -0 "$agent" 2>/dev/null || fail "the agent exited during start-up (its log is above)"
  sleep 0.1
done
curl -sf -o /dev/null --max-time 1 "$ENDPOINT/readyz" || fail "the agent is not ready after 10 s"

# The CLI finds the agent and its admin token (/var/lib/fnlet/admin.token) by default.
export FNLET_ENDPOINT=$ENDPOINT FNLET_STATE_DIR=$STATE_DIR
say "Deploying the examples"
for dir in "${EXAMPLES[@]}"; do
  "$FNLET" deploy "$dir" || fail "deploying $dir failed"
done

say "Calling each example once"
call() {
  local name=$1
  shift
  echo "$name answers:" >&2
  curl -sS --fail-with-body "$@" "$ENDPOINT/fn/$name" || fail "calling $name failed"
}
call hello-sh -d 'Ada'
call hello-py -d '{"name": "Ada"}'
call wordcount --data-binary @README.md
echo "hello-lambda answers (the AWS Lambda Invoke API):" >&2
curl -sS --fail-with-body -d '{"name": "Ada"}' "$ENDPOINT/2015-03-31/functions/hello-lambda/invocations" ||
  fail "calling hello-lambda failed"
echo >&2

cat >&2 <<EOF

fnlet is running at $ENDPOINT with ${#EXAMPLES[@]} functions. From another terminal:

  curl -d 'Ada' $ENDPOINT/fn/hello-sh
  curl -d '{"name": "Ada"}' $ENDPOINT/fn/hello-py
  curl --data-binary @README.md $ENDPOINT/fn/wordcount
  curl -d '{"name": "Ada"}' $ENDPOINT/2015-03-31/functions/hello-lambda/invocations

  $FNLET ls                        # the functions (admin calls read $STATE_DIR/admin.token)
  $FNLET invoke hello-sh -d Ada -v
  $FNLET logs hello-py             # what the functions wrote to stderr
  $FNLET deploy examples/hello-sh  # a new version; then: $FNLET rollback hello-sh

Press Ctrl-C to stop the agent.
EOF

# Stay in the foreground until the agent exits. A trapped signal interrupts `wait` early;
# wait again while the agent drains, then exit with its status.
set +e
while :; do
  wait "$agent"
  status=$?
  if [ "$status" -gt 128 ] && kill -0 "$agent" 2>/dev/null; then
    continue
  fi
  break
done
exit "$status"
