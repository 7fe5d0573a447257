"""A stand-in for vLLM's server in the standby tests: prints its argv, an environment variable
and its session, then waits for a signal (SIGTERM exits 7). With `--port N --http` it also
answers a kept engine's claim and release routes on that port, printing each."""

import http.server
import os
import signal
import sys
import threading
import time


class KeptRoutes(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        token = os.environ.get("APPLIANCE_KEPT_ENGINE_TOKEN")
        ok = self.headers.get("Authorization") == f"Bearer {token}"
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print(f"{self.path} {'ok' if ok else 'refused'}", flush=True)
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    if "--http" in sys.argv:  # listening before its first line: the tests read it as "up"
        port = int(sys.argv[sys.argv.index("--port") + 1])
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), KeptRoutes)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"argv={sys.argv[1:]} marker={os.environ.get('MARKER')} sid={os.getsid(0)}", flush=True)
    if "--exit-now" in sys.argv:
        sys.exit(3)
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
