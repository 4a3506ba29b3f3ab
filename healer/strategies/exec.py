"""The `exec` strategy: run an argv list in its own process group, never through a shell.

The machinery here (`Invocation`, `run_invocation`) is shared with the `systemd` strategy.

Process lifetime:

* the program starts with `start_new_session=True`, so it and everything it spawns form one
  process group whose id is the program's pid;
* on timeout or when the calling task is cancelled, the whole group gets SIGTERM (and SIGCONT, so
  a stopped process sees it); whatever is still alive after KILL_GRACE_SECONDS gets SIGKILL. This
  includes grandchildren that outlive the program itself;
* when healer itself dies (SIGKILL, a lost host's OOM), the program gets SIGKILL from the kernel
  (Linux's parent-death signal), so that the step, retried by another replica once healer's claim
  on it lapses, never runs twice at once;
* when the program exits by itself, processes it left running in the background are left alone
  (a restart script may have started the service that way). Output is read for at most
  OUTPUT_GRACE_SECONDS more, after which healer closes its end of the pipe: background processes
  should redirect their output.

stdout and stderr are merged into one pipe that is always drained to the end, but only the first
`output_limit_bytes` are kept.

With `user` (and/or `group`) the program runs as that user: the child sets its supplementary
groups (the user's, or none with only `group`), gid and uid before exec, and asks for its
parent-death signal only after that, since Linux clears it when credentials change. `{secret.NAME}`
is filled into argv and env only here, at run time; every configured secret value is masked in
the output and detail that the runner returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import os
import pwd
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from healer.config.secrets import SecretError
from healer.config.strategy_params import ExecParams, StrategyParams
from healer.durations import format_duration
from healer.strategies.base import params_of
from healer.strategies.runner import AlertContext, OutputBuffer, StepResult, one_line
from healer.strategies.templating import lookup, render

KILL_GRACE_SECONDS = 2.0
OUTPUT_GRACE_SECONDS = 1.0
BASE_ENV_KEYS = ("PATH", "LANG")
_READ_CHUNK = 65536
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Invocation:
    """A fully rendered program run: argv, the environment healer adds, cwd and limits."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    timeout: float = 30.0
    output_limit: int = 65536
    user: str | int | None = None  # as configured; resolved by `credentials` when the program starts
    group: str | int | None = None

    def describe(self) -> dict[str, object]:
        """The plan for dry-run and audit; `inherited_env` names what comes from healer's env."""
        plan: dict[str, object] = {
            "argv": list(self.argv),
            "env": dict(self.env),
            "inherited_env": list(BASE_ENV_KEYS),
            "cwd": None if self.cwd is None else str(self.cwd),
            "timeout": self.timeout,
        }
        if self.user is not None:
            plan["user"] = self.user
        if self.group is not None:
            plan["group"] = self.group
        return plan


def credentials(user: str | int | None, group: str | int | None) -> dict[str, object]:
    """The `user`, `group` and `extra_groups` arguments of subprocess for a configured user and group.

    A user alone gets its primary group and its supplementary groups; a group alone replaces the
    supplementary groups by none. Nothing is changed when both are healer's own already.
    Raises KeyError for a name this machine no longer knows.
    """
    if user is None and group is None:
        return {}
    uid: int | None = None
    gid: int | None = None
    extra: list[int] = []
    if user is not None:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        uid = entry.pw_uid
        gid = entry.pw_gid
        with contextlib.suppress(KeyError, OSError):
            extra = os.getgrouplist(entry.pw_name, entry.pw_gid)
    if group is not None:
        gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        if user is not None:
            extra = [gid]
    if (uid is None or uid == os.geteuid()) and gid == os.getegid() and os.geteuid() != 0:
        return {}  # already so; an unprivileged healer could not set groups anyway
    args: dict[str, object] = {"group": gid, "extra_groups": extra}
    if uid is not None:
        args["user"] = uid
    return args


# Loaded in healer, not in the forked child: a child of a threaded process must not take the loader's locks.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def _die_with_healer() -> None:
    """In the child before exec: ask the kernel for SIGKILL when healer dies, and drop the ambient
    capabilities a systemd unit may give healer (CAP_KILL, CAP_SETUID...), so that the program does
    not inherit them (Linux only; elsewhere a no-op)."""
    if _LIBC is not None:
        # A failure leaves the program running as before, so it is not fatal.
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        _LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def base_env() -> dict[str, str]:
    """The minimal environment every program starts from: PATH and LANG of healer itself."""
    env = {key: os.environ[key] for key in BASE_ENV_KEYS if key in os.environ}
    env.setdefault("PATH", os.defpath)
    return env


def alert_env(params: StrategyParams, alert: AlertContext) -> dict[str, str]:
    """HEALER_ALERTNAME, HEALER_FINGERPRINT, HEALER_STATUS; the alert name passes the allowlist."""
    alertname = lookup("labels", "alertname", params, alert) if "alertname" in alert.labels else ""
    return {
        "HEALER_ALERTNAME": alertname,
        "HEALER_FINGERPRINT": _plain(alert.fingerprint),
        "HEALER_STATUS": _plain(alert.status),
    }


def _plain(value: str) -> str:
    """Keep printable ASCII only, at most 128 characters, of a value Alertmanager produced."""
    return "".join(char for char in value[:128] if " " <= char <= "~")


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    """True while any process of the group is alive; zombies waiting to be reaped do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


async def terminate_group(proc: asyncio.subprocess.Process, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the group of `proc`, SIGKILL what is left after `grace` seconds, reap `proc`."""
    pgid = proc.pid
    loop = asyncio.get_running_loop()
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)
    try:
        deadline = loop.time() + grace
        while proc.returncode is None or _group_alive(pgid):
            if loop.time() >= deadline:
                _kill(proc)
                break
            await asyncio.sleep(_POLL_SECONDS)
        await proc.wait()
    except asyncio.CancelledError:
        _kill(proc)
        raise


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the group and, should the group be unreachable, the process itself."""
    _signal_group(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def _drain(reader: asyncio.StreamReader, output: OutputBuffer) -> None:
    while chunk := await reader.read(_READ_CHUNK):
        output.feed(chunk)


async def _finish_drain(drain: asyncio.Task[None], grace: float) -> None:
    """Let the reader reach end of file for at most `grace` seconds, then stop it."""
    await asyncio.wait({drain}, timeout=grace)
    if not drain.done():
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    elif not drain.cancelled():
        drain.exception()  # retrieved: a read error only loses output


def _spawn_failure(exc: Exception, invocation: Invocation) -> str:
    program = invocation.argv[0]
    if isinstance(exc, OSError):
        if invocation.cwd is not None and str(exc.filename) == str(invocation.cwd):
            return f"cannot use working directory {invocation.cwd}: {exc.strerror}"
        if isinstance(exc, FileNotFoundError):
            return f"executable not found: {program}"
        if isinstance(exc, PermissionError):
            return f"executable not permitted: {program}"
        return f"cannot start {program}: {exc.strerror or exc}"
    return f"cannot start {program}: {exc}"


def _exit_detail(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


async def run_invocation(invocation: Invocation) -> StepResult:
    """Run an invocation to completion, timeout or cancellation; see the module docstring."""
    env = {**base_env(), **invocation.env}
    try:
        run_as = credentials(invocation.user, invocation.group)
    except KeyError as exc:
        return StepResult(ok=False, detail=one_line(f"cannot start {invocation.argv[0]}: {exc.args[0]}"))
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *invocation.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            env=env,
            cwd=invocation.cwd,
            start_new_session=True,
            # subprocess changes groups, gid and uid first and calls this last (the order matters).
            preexec_fn=_die_with_healer,
            **run_as,  # type: ignore[arg-type]
        )
    except (OSError, ValueError) as exc:
        os.close(read_fd)
        return StepResult(ok=False, detail=one_line(_spawn_failure(exc, invocation)))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)

    output = OutputBuffer(invocation.output_limit)
    pipe = None
    transport: asyncio.BaseTransport | None = None
    drain: asyncio.Task[None] | None = None
    terminated = False
    try:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_CHUNK)
        pipe = open(read_fd, "rb", buffering=0)  # noqa: SIM115 - handed to the transport
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        drain = asyncio.create_task(_drain(reader, output))
        try:
            async with asyncio.timeout(invocation.timeout):
                returncode = await proc.wait()
        except TimeoutError:
            terminated = True
            await terminate_group(proc)
            await _finish_drain(drain, OUTPUT_GRACE_SECONDS)
            return StepResult(
                ok=False,
                detail=f"timed out after {format_duration(invocation.timeout)}",
                output=output.text(),
                exit_code=proc.returncode,
                timed_out=True,
            )
        await _finish_drain(drain, OUTPUT_GRACE_SECONDS)
        return StepResult(
            ok=returncode == 0,
            detail=_exit_detail(returncode),
            output=output.text(),
            exit_code=returncode,
        )
    except BaseException:
        # Cancelled (or anything unexpected): never leave the group running behind us.
        if not terminated and proc.returncode is None:
            await terminate_group(proc)
        raise
    finally:
        if drain is not None and not drain.done():
            drain.cancel()
        if transport is not None:
            transport.close()
        elif pipe is not None:
            pipe.close()
        else:
            os.close(read_fd)


def masked(result: StepResult, params: StrategyParams, values: Mapping[str, str] | None = None) -> StepResult:
    """`result` with every configured secret value masked in its detail and output."""
    mask = params.masker(values)
    return StepResult(
        ok=result.ok,
        detail=mask(result.detail),
        output=mask(result.output),
        exit_code=result.exit_code,
        timed_out=result.timed_out,
    )


class ExecRunner:
    """Runner of the `exec` strategy type."""

    def invocation(
        self, params: StrategyParams, alert: AlertContext, secrets: Mapping[str, str] | None = None
    ) -> Invocation:
        """Render argv and env from the alert (and `secrets`, to run only); raises UnsafeLabelError."""
        exec_params = params_of(params, ExecParams, "exec")
        argv = tuple(render(arg, params, alert, secrets) for arg in exec_params.command)
        env = {key: render(value, params, alert, secrets) for key, value in exec_params.env.items()}
        env.update(alert_env(params, alert))
        return Invocation(
            argv=argv,
            env=env,
            cwd=exec_params.cwd,
            timeout=exec_params.timeout,
            output_limit=exec_params.output_limit_bytes,
            user=exec_params.user,
            group=exec_params.group,
        )

    def plan(self, params: StrategyParams, alert: AlertContext) -> dict[str, object]:
        """argv, env (what healer adds), inherited_env, cwd and timeout, without running."""
        return self.invocation(params, alert).describe()

    async def run(self, params: StrategyParams, alert: AlertContext) -> StepResult:
        """Run the program; see the module docstring for timeouts, cancellation and output."""
        try:
            values = params.secret_values()
        except SecretError as exc:
            return StepResult(ok=False, detail=one_line(str(exc)))
        return masked(await run_invocation(self.invocation(params, alert, values)), params, values)
