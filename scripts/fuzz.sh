#!/usr/bin/env bash
# Fuzzes the manifest and bundle parsers briefly (SECONDS_PER_TARGET, default 30) with
# cargo fuzz (libFuzzer). Installs cargo-fuzz if missing. RUSTC_BOOTSTRAP lets the stable
# toolchain use the sanitizer flags cargo fuzz needs. --dev: an unoptimized build with debug
# assertions (overflow checks) takes 4 minutes here against 11 for -O, whose hundredfold run
# rate buys little in a run this short; a long campaign wants `cargo fuzz run -O`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${SECONDS_PER_TARGET:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in manifest bundle; do
  mkdir -p "corpus/$target"
  if ! cargo fuzz run --dev "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$secs" >"$log" 2>&1; then
    # A link line runs to tens of kilobytes: cut long lines so the linker's own words show.
    tail -n 80 "$log" | cut -c1-400
    df -h . | sed 's/^/    /'
    echo "fuzz target $target failed (crash input saved under fuzz/artifacts/$target)" >&2
    exit 1
  fi
  echo "fuzz $target: $(grep -E '^Done' "$log" || echo 'no summary')"
done
