"""A tiny application for tests: exports `fault_active{fault="NAME"} 1` for every file in a directory.

A test creates a file to inject a fault and healer's strategy removes it to heal the fault;
Prometheus sees the series disappear and the alert resolves.
Usage: python tests/fault_app.py PORT DIRECTORY
"""

from __future__ import annotations

import http.server
import os
import sys


def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            lines = ["# HELP fault_active 1 while a fault file exists.", "# TYPE fault_active gauge"]
            lines += [f'fault_active{{fault="{name}"}} 1' for name in sorted(os.listdir(directory))]
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
