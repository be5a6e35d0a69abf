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
# The Lambda fixtures are built once, in release, by build-fixtures.sh into their bundles.
cargo build --workspace --bins --exclude fixture-lambda-rust --exclude fixture-lambda-http \
  --exclude fixture-lambda-noop
scripts/build-fixtures.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
