"""A stand-in for vLLM's server in the standby tests: prints its argv, an environment variable
and its session, then waits for a signal (SIGTERM exits 7)."""

import os
import signal
import sys
import time


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    print(f"argv={sys.argv[1:]} marker={os.environ.get('MARKER')} sid={os.getsid(0)}", flush=True)
    if "--exit-now" in sys.argv:
        sys.exit(3)
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
