"""Benchmark one planner cycle against the floor of its PromQL queries, in the same run.

What it measures
----------------
A real Prometheus scrapes a tiny exporter of ``--series`` series (``bench_series{i="N"} 1``)
every second. healer's planner is built in this process (``healer.server.create_app``, so the
real store, engine and PromQL client) with ``--templates`` goal templates whose trigger is
``bench_series``: every template opens one goal per series, ``templates x series`` open goals
in all. Their target is never reached and their settle and deadline are an hour, so the goals
stay open and each cycle does the full work: every trigger query, the store's
"open unless open" insert of every series, the cancellation check, and the measurement of the
goal in progress.

The baseline
------------
The floor is the PromQL alone: the same trigger queries and the one target query, sent in the
same order through the same client (``prometheus-api-client`` in a worker thread). Rounds
alternate cycle and floor, so both see the same noise; the ratio cycle / floor is the figure to
compare between runs. Also printed: the resident memory this process gained while the goals
were opened (1 MB = 10**6 bytes), and the store's size.

Target printed as PASS/FAIL: the median cycle costs at most 3x its queries' floor with 1,000
open goals (the planner's own work stays below twice the time Prometheus takes).

Usage: ``python bench/planner.py [--templates 20] [--series 50] [--rounds 30] [--json]``.
Everything started is stopped by its own PID on exit; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# isort: split
import common  # bench/common.py: `python bench/planner.py` puts bench/ first on sys.path

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
RATIO_LIMIT = 3.0


@dataclass
class Report:
    templates: int
    series: int
    open_goals: int
    rounds: int
    cycle_p50_ms: float
    cycle_p99_ms: float
    floor_p50_ms: float
    floor_p99_ms: float
    ratio_p50: float
    opening_ms: float
    rss_gain_mb: float
    store_kb: float
    passed: bool


async def measure(args: argparse.Namespace, prometheus_url: str, workdir: Path) -> Report:
    from healer.config import parse_config
    from healer.planner.routes import PLANNER
    from healer.server import STORAGE, create_app

    template = {
        "type": "reliability",
        "trigger": "bench_series",
        "target": {"query": "vector(1)", "below": 0},
        "plan": ["noop"],
        "settle": "1h",
        "deadline": "1h",
    }
    config = parse_config(
        {
            "prometheus": {"url": prometheus_url, "timeout": "5s"},
            "store": {"path": str(workdir / "healer.db")},
            "exporter": {"host": False},
            "planner": {"goals": [{"name": f"t{i}", **template} for i in range(args.templates)]},
            "strategies": {"noop": {"type": "exec", "command": ["true"]}},
        }
    )
    app = create_app(config)
    planner = app[PLANNER]
    promql = planner.promql
    queries = [t.trigger for t in config.planner.goals]

    async def floor() -> None:
        for query in queries:
            await promql.query(query)
        await promql.scalar("vector(1)")

    await floor()  # connections and imports, outside the figures
    rss_before = common.rss_mb(os.getpid())
    started = time.perf_counter()
    await planner.cycle()  # opens every goal
    opening_ms = (time.perf_counter() - started) * 1000
    rss_gain = common.rss_mb(os.getpid()) - rss_before
    open_goals = len(await planner.records.open_goals())
    cycles, floors = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        await planner.cycle()
        cycles.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await floor()
        floors.append((time.perf_counter() - started) * 1000)
    await app[STORAGE].close()
    promql.close()
    cycle_p50, floor_p50 = statistics.median(cycles), statistics.median(floors)
    return Report(
        templates=args.templates,
        series=args.series,
        open_goals=open_goals,
        rounds=args.rounds,
        cycle_p50_ms=round(cycle_p50, 2),
        cycle_p99_ms=round(common.percentile(cycles, 0.99), 2),
        floor_p50_ms=round(floor_p50, 2),
        floor_p99_ms=round(common.percentile(floors, 0.99), 2),
        ratio_p50=round(cycle_p50 / floor_p50, 2),
        opening_ms=round(opening_ms, 1),
        rss_gain_mb=round(rss_gain, 1),
        store_kb=round((workdir / "healer.db").stat().st_size / 1000 + _wal_kb(workdir), 1),
        passed=cycle_p50 <= RATIO_LIMIT * floor_p50 and open_goals == args.templates * args.series,
    )


def _wal_kb(workdir: Path) -> float:
    wal = workdir / "healer.db-wal"
    return wal.stat().st_size / 1000 if wal.exists() else 0.0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "_exporter":
        count = int(sys.argv[3])
        body = ("# TYPE bench_series gauge\n" + "".join(f'bench_series{{i="{i}"}} 1\n' for i in range(count))).encode()
        common.serve_exposition(int(sys.argv[2]), lambda: body)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", type=int, default=20)
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="healer-bench-planner-"))
    keeper = common.Keeper(workdir)
    try:
        port = common.free_port()
        keeper.start("exporter", [sys.executable, __file__, "_exporter", str(port), str(args.series)])
        common.wait_for(lambda: common.http_get(f"http://127.0.0.1:{port}/")[0] == 200, "the exporter")
        prometheus_dir = workdir / "prometheus"
        prometheus_dir.mkdir()
        common.write_yaml(
            prometheus_dir / "prometheus.yml",
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "bench", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
            },
        )
        prom_port = common.free_port()
        prometheus = keeper.start("prometheus", [
            PROMETHEUS, f"--config.file={prometheus_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prometheus_dir / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ])  # fmt: skip
        url = f"http://127.0.0.1:{prom_port}"
        common.wait_ready(prometheus, url)

        def scraped() -> bool:
            query = f"{url}/api/v1/query?query=count(bench_series)"
            answer = json.loads(common.http_get(query)[1])
            result = answer["data"]["result"]
            return bool(result) and int(float(result[0]["value"][1])) == args.series

        common.wait_for(scraped, "Prometheus to scrape every series")
        report = asyncio.run(measure(args, url, workdir / "healer"))
    finally:
        keeper.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"planner cycle, {report.templates} templates x {report.series} series = {report.open_goals} open goals, "
          f"{report.rounds} rounds")  # fmt: skip
    print(f"  cycle  p50 {report.cycle_p50_ms:8.2f} ms   p99 {report.cycle_p99_ms:8.2f} ms")
    print(f"  floor  p50 {report.floor_p50_ms:8.2f} ms   p99 {report.floor_p99_ms:8.2f} ms   (the same PromQL alone)")
    print(f"  cycle / floor at p50: {report.ratio_p50:.2f}   (target <= {RATIO_LIMIT}: "
          f"{'PASS' if report.passed else 'FAIL'})")  # fmt: skip
    print(f"  opening {report.open_goals} goals: {report.opening_ms:.0f} ms; RSS gained {report.rss_gain_mb} MB; "
          f"store {report.store_kb:.0f} kB")  # fmt: skip
    if args.json:
        print(json.dumps(asdict(report)))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
