"""The `signal` strategy: send a signal to processes found by pidfile or command-line regex.

A pidfile holds one positive integer. A cmdline regex is searched (`re.search`) in each
process's arguments joined by spaces, as the exporter's process watches do. healer's own process
is never a target, and pids 0 and below (which would address process groups) are refused.

With `user` (and/or `group`) the signal is sent by procps's `kill`, run as that user exactly as the
exec strategy runs its programs (groups, gid and uid switched, ambient capabilities dropped, killed with
healer), one run per pid: the kernel then applies that user's permission, so a strategy meant for one
service's processes cannot reach another user's, or root's. Only the validated signal name and the pids
found reach its argv, never a label.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal as signal_module
from dataclasses import dataclass
from pathlib import Path

import psutil

from healer.config.strategy_params import SignalParams, StrategyParams
from healer.strategies.base import params_of
from healer.strategies.exec import Invocation, base_env, run_invocation
from healer.strategies.runner import AlertContext, StepResult

# Where procps installs kill, for a PATH without it.
KILL_FALLBACK = "/bin/kill"


@dataclass(frozen=True)
class Targets:
    """The processes a signal strategy would address, or why there are none."""

    signal: str
    source: str  # "pidfile /run/x.pid" or "cmdline regex 'x'"
    pids: tuple[int, ...]
    problem: str | None = None

    user: str | int | None = None
    group: str | int | None = None

    def describe(self) -> dict[str, object]:
        """The plan for dry-run and audit."""
        plan: dict[str, object] = {
            "signal": self.signal,
            "target": self.source,
            "pids": list(self.pids),
        }
        if self.user is not None:
            plan["user"] = self.user
        if self.group is not None:
            plan["group"] = self.group
        if self.problem is not None:
            plan["problem"] = self.problem
        return plan


def _from_pidfile(pidfile: Path) -> tuple[tuple[int, ...], str | None]:
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return (), f"pidfile {pidfile} not found"
    except (OSError, UnicodeDecodeError) as exc:
        return (), f"cannot read pidfile {pidfile}: {getattr(exc, 'strerror', None) or exc}"
    if not text.isdigit() or int(text) <= 0:
        return (), f"pidfile {pidfile} does not hold a positive pid: {text[:40]!r}"
    pid = int(text)
    if pid == os.getpid():
        return (), f"pidfile {pidfile} names healer itself (pid {pid})"
    if not psutil.pid_exists(pid):
        return (), f"pidfile {pidfile} names pid {pid}, which is not running"
    return (pid,), None


def _from_cmdline(pattern: str) -> tuple[tuple[int, ...], str | None]:
    regex = re.compile(pattern)
    own = os.getpid()
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        info = proc.info
        if info["pid"] == own or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or ())
        if cmdline and regex.search(cmdline):
            pids.append(info["pid"])
    if not pids:
        return (), f"no process matches cmdline regex {pattern!r}"
    return tuple(sorted(pids)), None


class SignalRunner:
    """Runner of the `signal` strategy type."""

    def targets(self, params: StrategyParams) -> Targets:
        """Find the processes to signal now."""
        signal_params = params_of(params, SignalParams, "signal")
        if signal_params.pidfile is not None:
            pids, problem = _from_pidfile(signal_params.pidfile)
            source = f"pidfile {signal_params.pidfile}"
        else:
            assert signal_params.cmdline is not None
            pids, problem = _from_cmdline(signal_params.cmdline)
            source = f"cmdline regex {signal_params.cmdline!r}"
        return Targets(signal_params.signal, source, pids, problem, signal_params.user, signal_params.group)

    def plan(self, params: StrategyParams, alert: AlertContext) -> dict[str, object]:
        """signal, target, the pids found now, and `problem` when none were found."""
        return self.targets(params).describe()

    async def run(self, params: StrategyParams, alert: AlertContext) -> StepResult:
        """Signal every target; ok when at least one process received the signal."""
        targets = await asyncio.to_thread(self.targets, params)
        if not targets.pids:
            return StepResult(ok=False, detail=targets.problem or f"no process matches {targets.source}")
        if targets.user is not None or targets.group is not None:
            sent, failed = await _send_as(targets, params.timeout)
        else:
            sent, failed = _send(targets)
        detail = (
            f"{targets.signal} sent to {len(sent)} process{'' if len(sent) == 1 else 'es'}"
            f" ({', '.join(map(str, sent))})"
            if sent
            else f"{targets.signal} not delivered"
        )
        if failed:
            detail += f"; failed for {', '.join(failed)}"
        return StepResult(ok=bool(sent), detail=detail)


def _send(targets: Targets) -> tuple[list[int], list[str]]:
    """Signal each target from healer's own process: the pids reached, and why the others were not."""
    signum = signal_module.Signals[targets.signal]
    sent: list[int] = []
    failed: list[str] = []
    for pid in targets.pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            failed.append(f"{pid} (gone)")
        except PermissionError:
            failed.append(f"{pid} (permission denied)")
        else:
            sent.append(pid)
    return sent, failed


async def _send_as(targets: Targets, timeout: float) -> tuple[list[int], list[str]]:
    """Signal each target by `kill` run as the targets' user and group, one run per pid so that each answer
    is its own exit status: the pids reached, and why the others were not (permission, gone, or kill's error)."""
    env = base_env()
    kill = shutil.which("kill", path=env["PATH"]) or KILL_FALLBACK
    who = f"as user {targets.user}" if targets.user is not None else f"as group {targets.group}"
    name = targets.signal.removeprefix("SIG")
    sent: list[int] = []
    failed: list[str] = []
    for pid in targets.pids:
        invocation = Invocation(
            (kill, "-s", name, "--", str(pid)),
            {"LC_ALL": "C"},  # kill's message in the detail reads the same everywhere
            timeout=timeout,
            output_limit=1024,
            user=targets.user,
            group=targets.group,
        )
        result = await run_invocation(invocation)
        if result.ok:
            sent.append(pid)
        elif result.exit_code is None:  # kill did not start (an unknown user, no kill) or timed out
            failed.append(f"{pid} ({result.detail})")
        elif not psutil.pid_exists(pid):
            failed.append(f"{pid} (gone)")
        else:
            # The process exists and kill refused: the kernel denied the user this signal to it.
            failed.append(f"{pid} (permission denied {who}: {result.output.strip()[:200] or result.detail})")
    return sent, failed
