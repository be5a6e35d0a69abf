#!/bin/sh
# The request body is on stdin and the response goes to stdout; exit 0 means success.
# stderr lines land in the function's log, tagged with the request id.
set -eu
name=$(cat)
echo "greeting ${name:-world} (request $FNLET_REQUEST_ID)" >&2
printf '%s, %s! (from %s version %s)\n' \
  "$GREETING" "${name:-world}" "$FNLET_FUNCTION_NAME" "$FNLET_FUNCTION_VERSION"
