"""A minimal supervisor for the example app: it starts the app and restarts it on SIGHUP.

A crashed app stays down until something asks for a restart, the way a unit without
`Restart=` behaves, so that healer's `restart-web` strategy (SIGHUP to this supervisor) is what
brings it back. SIGTERM or SIGINT stops the app and the supervisor.

Run: python -m examples.app.supervise [app arguments...]
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading


def main() -> int:
    app_argv = [sys.executable, "-m", "examples.app.app", *sys.argv[1:]]
    restart = threading.Event()
    stop = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: restart.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    app: subprocess.Popen[bytes] | None = subprocess.Popen(app_argv)
    while not stop.is_set():
        if restart.is_set():
            restart.clear()
            if app is not None and app.poll() is None:
                app.terminate()
                try:
                    app.wait(10)
                except subprocess.TimeoutExpired:
                    app.kill()
                    app.wait()
            print("supervise: starting the app", file=sys.stderr, flush=True)
            app = subprocess.Popen(app_argv)
        if app is not None and app.poll() is not None:
            print(f"supervise: the app exited with {app.returncode}; waiting for SIGHUP", file=sys.stderr, flush=True)
            app = None
        stop.wait(0.1)
    if app is not None and app.poll() is None:
        app.terminate()
        app.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
