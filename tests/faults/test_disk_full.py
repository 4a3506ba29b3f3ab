"""A full disk under a running healer: its SQLite store on a small tmpfs that the test mounts and fills.

Needs root (mount); elsewhere the test is skipped with the reason. A read-only remount is not tested
here: the kernel refuses it (busy) while healer holds the store open for writing.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import Server, http_get, start_healer, wait_for
from tests.test_engine_safety import AUTH, actions, alert, all_ended, config, metric, payload, steps_log
from tests.test_receiver import post

# The store's filesystem: room for the store and its write-ahead log, little more.
TMPFS_SIZE = "2m"
# The store checks itself every 2 s; readiness and the webhook follow within a few checks.
FOLLOWS_WITHIN = 10.0


@contextmanager
def small_tmpfs(directory: Path) -> Iterator[Path]:
    """Mount a tmpfs of TMPFS_SIZE on `directory` for the block; skip the test where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("cannot mount a tmpfs: no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True, check=False)


def fill(path: Path) -> None:
    """Write `path` until the filesystem has no space left (unbuffered, so that nothing is left to fail later)."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def ready(healer: Server) -> tuple[int, str]:
    """The status and text of GET /-/ready."""
    status, body = http_get(healer.url + "/-/ready")
    return status, body.decode()


def test_full_disk_answers_503_and_recovers_without_a_restart(tmp_path: Path) -> None:
    """With the store's disk full, the webhook answers 503 (never 500) once the store cannot take more, and
    /-/ready 503 with healer_store_up 0 and the reason disk_full; freed, healer is ready and accepts again
    without a restart. Every alert answered 200, before, during and after, ends as exactly one episode whose
    step ran once, and no log line carries a traceback.

    Failed before the store's write probe changed its row: rewritten as it was, SQLite committed nothing,
    so the probe passed on a full disk while every delivery failed, and /-/ready stayed 200."""
    with small_tmpfs(tmp_path / "disk") as disk:
        settings = config(tmp_path, rule={"max_attempts": 1})
        settings["store"]["path"] = str(disk / "healer.db")
        healer = start_healer(tmp_path, settings)
        try:
            check_faults(healer, disk, tmp_path)
        finally:
            healer.stop()


def check_faults(healer: Server, disk: Path, workdir: Path) -> None:
    """Fill the disk under `healer`, free it, and check what was answered and what was processed."""
    url = healer.url + "/api/v1/alertmanager"
    accepted: list[str] = []
    codes: Counter[int] = Counter()

    def send(identifier: str) -> int:
        code, answer = post(url, payload(alert(identifier)), AUTH)
        codes[code] += 1
        assert code in (200, 503), (code, answer)
        if code == 200:
            accepted.append(identifier)
        return code

    for index in range(5):
        assert send(f"before{index}") == 200
    wait_for(lambda: all_ended(healer, len(accepted)), 30, what="the first alerts processed")

    fill(disk / "filler")
    # The write-ahead log may still have room for a few deliveries: each one it took is kept.
    wait_for(lambda: send(f"full{len(codes)}") == 503, 60, interval=0.05, what="the webhook refusing on a full disk")
    wait_for(lambda: ready(healer)[0] == 503, FOLLOWS_WITHIN, what="not ready on a full disk")
    status, text = ready(healer)
    assert status == 503 and "disk_full" in text, text
    assert metric(healer, "healer_store_up") == 0
    assert metric(healer, "healer_store_down_reason", reason="disk_full") == 1
    code, answer = post(url, payload(alert("refused")), AUTH)
    assert code == 503 and answer["reason"] == "disk_full", answer

    (disk / "filler").unlink()
    wait_for(lambda: ready(healer)[0] == 200, FOLLOWS_WITHIN, what="ready again once space is freed")
    assert metric(healer, "healer_store_up") == 1
    assert send("after") == 200
    wait_for(lambda: all_ended(healer, len(accepted)), 30, what="every accepted alert processed")
    episodes: dict[str, set[int]] = {}
    for step in actions(healer):
        episodes.setdefault(step["episode"]["labels"]["id"], set()).add(step["episode"]["id"])
    assert sorted(episodes) == sorted(accepted) and all(len(ids) == 1 for ids in episodes.values()), episodes
    starts = Counter(line.split()[1] for line in steps_log(workdir) if line.startswith("start"))
    assert starts == Counter(accepted), (starts, accepted)
    assert "refused" not in episodes
    assert codes[503] >= 1 and set(codes) <= {200, 503}
    # A full disk is a fault healer expects: it says so in lines of their own, never with a traceback. (Each
    # HealingFailed whose try the store could not record was posted again at once, with a traceback: about
    # 36 a second here.)
    records = [json.loads(line) for line in healer.log().splitlines() if line.startswith("{")]
    assert [record for record in records if "exception" in record] == []
