#!/usr/bin/env bash
# Builds the Lambda test fixtures (crates under tests/fixtures/) in release mode and copies each
# binary into its bundle folder as the `bootstrap` its fnlet.toml expects (gitignored):
#   tests/fixtures/lambda-rust/bundle/bootstrap   lambda_runtime
#   tests/fixtures/lambda-http/bundle/bootstrap   lambda_http
#   tests/fixtures/lambda-noop/bundle/bootstrap   std only, statically linked (benchmark no-op)
# tests/fixtures/lambda-py is ready as it is; its runtime client (awslambdaric) is installed
# by the test that runs it, see tests/fixtures/lambda-py/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
cargo build --release -p fixture-lambda-rust -p fixture-lambda-http
# The no-op links statically so the same file serves the fork+exec floor and fnlet. With
# --target the flag reaches only this crate's own artifacts (it has no dependencies), not the
# host build and its cache.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release -p fixture-lambda-noop --target "$target"
install -m 0755 target/release/fixture-lambda-rust tests/fixtures/lambda-rust/bundle/bootstrap
install -m 0755 target/release/fixture-lambda-http tests/fixtures/lambda-http/bundle/bootstrap
install -m 0755 "target/$target/release/fixture-lambda-noop" tests/fixtures/lambda-noop/bundle/bootstrap
# Functions run as an unprivileged uid: every file must be readable, bootstraps executable.
chmod -R a+rX tests/fixtures/lambda-rust/bundle tests/fixtures/lambda-http/bundle \
  tests/fixtures/lambda-noop/bundle tests/fixtures/lambda-py
echo "fixtures ready: tests/fixtures/lambda-{rust,http,noop}/bundle tests/fixtures/lambda-py"
