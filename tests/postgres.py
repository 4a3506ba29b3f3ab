"""Start a real PostgreSQL server (Debian's `postgresql` package) on loopback for tests.

`start_postgres` runs `initdb` and `pg_ctl` from the newest `/usr/lib/postgresql/*/bin` on a fresh
cluster in its own `/tmp/healer-pg-*` directory, with password (SCRAM) authentication on a free
127.0.0.1 port. PostgreSQL refuses to run as root, so when the tests run as root its binaries run as
the `postgres` user that the package creates, on a directory that user owns; otherwise they run as
the current user. The server is stopped by `pg_ctl` and, as a last resort, by its own PID (the
postmaster's, from `postmaster.pid`). One cluster per test session is cheap to share: each test gets
its own database from `create_database`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.servers import free_port, process_alive, wait_for

USER = "healer"
DATABASE = "healer"
# fsync stays on: the durability and outage tests must see what a real server keeps.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "logging_collector": "off",
    "log_min_messages": "warning",
}
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_VERSION = re.compile(r"^\d+$")


def postgres_bindir() -> Path:
    """The `bin` directory of the newest PostgreSQL that Debian's packages installed."""
    versions = [p for p in Path("/usr/lib/postgresql").glob("*") if _VERSION.match(p.name)]
    for version in sorted(versions, key=lambda p: int(p.name), reverse=True):
        if (version / "bin" / "pg_ctl").is_file():
            return version / "bin"
    raise RuntimeError(
        "no /usr/lib/postgresql/*/bin/pg_ctl: install Debian's postgresql package (scripts/dev.sh test does)"
    )


def _run_as() -> list[str]:
    """The prefix that runs a PostgreSQL binary as a user it accepts: `postgres` when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in its own directory, with a superuser `healer` that logs in with a password."""

    bindir: Path
    root: Path
    port: int
    password: str
    password_file: Path
    log_path: Path
    pid: int | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        """The URL of the `healer` database, without the password (as healer's `store.url` takes it)."""
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = DATABASE, password: str | None = None, **options: Any) -> str:
        """A libpq connection string for `database` with the password (or the one given)."""
        return make_conninfo(
            self.url_for(database), password=self.password if password is None else password, **options
        )

    def connect(self, database: str = DATABASE, password: str | None = None) -> psycopg.Connection[Any]:
        """An autocommit psycopg connection to `database` over TCP with the password."""
        return psycopg.connect(self.conninfo(database, password, connect_timeout=5), autocommit=True)

    @property
    def running(self) -> bool:
        return self.pid is not None and process_alive(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _pg(self, tool: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        # The server's own output goes to log_path, a file this process opened: the postgres user
        # could not open it in a pytest temporary directory, and a pipe would keep `run` waiting for
        # the server to exit.
        with self.log_path.open("a") as log:
            return subprocess.run(
                [*_run_as(), str(self.bindir / tool), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                text=True,
                timeout=timeout,
                check=False,
            )

    def start(self, timeout: float = 60.0) -> None:
        """Start the server on its data directory and port (again, after `stop`), and record its PID."""
        options = " ".join(f"-c {key}={value}" for key, value in SETTINGS.items())
        result = self._pg(
            "pg_ctl",
            "-D", str(self.data),
            "-w", "-t", str(int(timeout)),
            "-o", f"-p {self.port} -k {self.root} {options}",
            "start",
            timeout=timeout + 10,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed with {result.returncode}:\n{self.log()}")
        # pg_ctl -w returns once postmaster.pid says ready; its first line is the postmaster's PID.
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        wait_for(lambda: self.connect("postgres").close() is None, timeout, what="PostgreSQL accepting logins")

    def stop(self, mode: Literal["fast", "immediate", "smart"] = "fast", timeout: float = 30.0) -> None:
        """Stop the server by `pg_ctl -m MODE`, then by its own PID if it is still alive; wait until it is gone."""
        pid = self.pid
        if pid is None or not process_alive(pid):
            self.pid = None
            return
        self._pg(
            "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)), "stop", timeout=timeout + 10
        )
        deadline = time.monotonic() + timeout
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if process_alive(pid):
            # SIGQUIT is the postmaster's immediate shutdown; SIGKILL if even that does not end it.
            for sig in (signal.SIGQUIT, signal.SIGKILL):
                os.kill(pid, sig)
                end = time.monotonic() + 10
                while process_alive(pid) and time.monotonic() < end:
                    time.sleep(0.02)
                if not process_alive(pid):
                    break
        if process_alive(pid):
            raise RuntimeError(f"PostgreSQL (PID {pid}) is still alive after stop")
        self.pid = None

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (named `name` or a fresh one) owned by `healer`, and return its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a plain lower-case identifier")
        with self.connect("postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any sessions still connected to it."""
        with self.connect("postgres") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if name in self.databases:
            self.databases.remove(name)

    def destroy(self) -> None:
        """Stop the server (immediately: nothing in it is kept) and delete its directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(workdir: Path, timeout: float = 60.0) -> PostgresServer:
    """Create a cluster in a fresh /tmp/healer-pg-* directory and start it on a free loopback port.

    `workdir` (e.g. a pytest temporary directory) holds the server's log and `password_file` (0600);
    the cluster itself lives where the `postgres` user can reach it and is deleted by `destroy`.
    """
    bindir = postgres_bindir()
    workdir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(18)
    password_file = workdir / "postgres-password"
    password_file.touch(mode=0o600)
    password_file.chmod(0o600)
    password_file.write_text(password + "\n")
    # /tmp itself is world-traversable, unlike a pytest temporary directory (0700 under /tmp/pytest-of-root).
    root = Path(tempfile.mkdtemp(prefix="healer-pg-", dir="/tmp"))
    server = PostgresServer(bindir, root, free_port(), password, password_file, workdir / "postgres.log")
    try:
        pwfile = root / "initdb-password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        result = server._pg(
            "initdb",
            "-D", str(server.data),
            "-U", USER,
            "-A", "scram-sha-256",
            f"--pwfile={pwfile}",
            "-E", "UTF8",
            "--locale=C",
            # initdb's own fsyncs of the new files only; the server runs with fsync on.
            "--no-sync",
            "--no-instructions",
            timeout=timeout,
        )  # fmt: skip
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed with {result.returncode}:\n{server.log()}")
        for attempt in range(3):
            try:
                server.start(timeout)
                break
            except RuntimeError:
                # Another process may have taken the free port in the meantime: try another.
                if attempt == 2 or "could not bind" not in server.log():
                    raise
                server.port = free_port()
        server.create_database(DATABASE)
        server.databases.remove(DATABASE)
    except BaseException:
        server.destroy()
        raise
    return server
