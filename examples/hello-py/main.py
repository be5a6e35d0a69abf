"""fnlet exec mode in Python: a JSON request on stdin, a JSON answer on stdout.

Try: curl -d '{"name": "Ada"}' http://127.0.0.1:8740/fn/hello-py
A request that is not JSON exits with status 1: the caller gets 502 function_error and the
reason is in `fnlet logs hello-py`.
"""

import json
import os
import platform
import sys


def handle(event):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    return {
        "message": f"{os.environ.get('GREETING', 'Hello')}, {name}!",
        "function": os.environ.get("FNLET_FUNCTION_NAME"),
        "version": int(os.environ.get("FNLET_FUNCTION_VERSION", "0")),
        "request_id": os.environ.get("FNLET_REQUEST_ID"),
        "python": platform.python_version(),
    }


def main():
    raw = sys.stdin.read()
    try:
        event = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        print(f"the request is not JSON: {e}", file=sys.stderr)
        return 1
    json.dump(handle(event), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
