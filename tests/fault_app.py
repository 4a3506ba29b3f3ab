"""A tiny application for tests: exports `fault_active{fault="NAME"} 1` for every file in a directory,
and the file's size as `fault_file_bytes{fault="NAME"}`.

A test creates a file to inject a fault and healer's strategy removes it to heal the fault;
Prometheus sees the series disappear and the alert resolves.
Usage: python tests/fault_app.py PORT DIRECTORY
"""

from __future__ import annotations

import contextlib
import http.server
import os
import sys


def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            lines = ["# HELP fault_active 1 while a fault file exists.", "# TYPE fault_active gauge"]
            names = sorted(os.listdir(directory))
            lines += [f'fault_active{{fault="{name}"}} 1' for name in names]
            lines += ["# HELP fault_file_bytes Size of the fault file.", "# TYPE fault_file_bytes gauge"]
            for name in names:
                with contextlib.suppress(OSError):  # removed between the listing and now
                    lines.append(f'fault_file_bytes{{fault="{name}"}} {os.path.getsize(os.path.join(directory, name))}')
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
