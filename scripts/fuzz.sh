#!/usr/bin/env bash
# Fuzzes the manifest and bundle parsers briefly (SECONDS_PER_TARGET, default 20) with
# cargo fuzz (libFuzzer). Installs cargo-fuzz if missing. RUSTC_BOOTSTRAP lets the stable
# toolchain use the sanitizer flags cargo fuzz needs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${SECONDS_PER_TARGET:-20}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in manifest bundle; do
  mkdir -p "corpus/$target"
  if ! cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$secs" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target failed (crash input saved under fuzz/artifacts/$target)" >&2
    exit 1
  fi
  echo "fuzz $target: $(grep -E '^Done' "$log" || echo 'no summary')"
done
