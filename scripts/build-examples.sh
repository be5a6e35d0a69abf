#!/usr/bin/env bash
# Makes every bundle under examples/ deployable. The shell and Python examples are ready as
# they are; the compiled one is built here (release) and copied into its bundle folder as the
# executable its fnlet.toml names:
#   examples/wordcount-rust/bundle/bootstrap   (gitignored)
#   examples/hello-lambda/bundle/bootstrap     (gitignored; an AWS Lambda function)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p example-wordcount -p example-hello-lambda
install -m 0755 target/release/example-wordcount examples/wordcount-rust/bundle/bootstrap
install -m 0755 target/release/example-hello-lambda examples/hello-lambda/bundle/bootstrap
# Functions run as an unprivileged uid: every file must be readable, scripts executable.
chmod 0755 examples/hello-sh/hello.sh
chmod -R a+rX examples/hello-sh examples/hello-py examples/wordcount-rust/bundle \
  examples/hello-lambda/bundle
echo "examples ready: examples/hello-sh examples/hello-py examples/wordcount-rust/bundle examples/hello-lambda/bundle"
