#!/usr/bin/env bash
# The whole test suite, as root: installs what it needs, builds every binary the integration
# tests drive, then runs unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "fnlet's tests create namespaces and cgroups: run them as root (sudo $0)" >&2
  exit 1
fi
scripts/install-deps.sh
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
