"""An example web service with its own metrics, fault injection and the fixes healer applies.

Faults (POST /admin/fault/NAME): memory-leak, cpu-burn, disk-fill, errors, latency, drift,
drift-creep (the drift grows slowly, reaching the alert's threshold after about 12 s), crash.
Fixes: POST /admin/cache/clear (errors come from a corrupted cache), /admin/cache/enable (latency
comes from a disabled cache; /admin/cache/disable undoes it), /admin/memory/free, /admin/model/recalibrate, /admin/reload (clears
every fault but a crash). Files that fill the data directory are `*.fill`; deleting them is the fix.
Batch queues, for the optimizer: POST /admin/batch/QUEUE/start runs a batch job over and over and
exports its duration as app_batch_duration_seconds{queue}; /admin/batch/QUEUE/workers/N processes
N items at once (faster), /admin/batch/QUEUE/prefetch/on|off reads ahead (no faster: the job is
bound by processing, not reading).

Run: python -m examples.app.app --port 8000 --data-dir /var/tmp/healer-demo
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

FAULTS = ("memory-leak", "cpu-burn", "disk-fill", "errors", "latency", "drift", "drift-creep", "crash")
LEAK_CHUNK_BYTES = 10 * 1024 * 1024
LEAK_TOTAL_BYTES = 400 * 1024 * 1024
FILL_CHUNK_BYTES = 1024 * 1024
SLOW_SECONDS = 1.5
HEALTHY_DRIFT = 0.05
DRIFTED = 0.6
# drift-creep: the drift grows by this much every CREEP_SECONDS until it is DRIFTED, crossing
# ModelDriftHigh's 0.3 after about 12 seconds unless something recalibrates the model first.
CREEP_STEP = 0.01
CREEP_SECONDS = 0.5
# A batch of BATCH_ITEMS items, each taking ITEM_SECONDS to process: 0.4 s with one worker.
BATCH_ITEMS = 8
ITEM_SECONDS = 0.05
BATCH_PAUSE_SECONDS = 0.2
MAX_WORKERS = 16


class BatchQueue:
    """A batch job that runs over and over; its duration depends on its workers, not on prefetch."""

    def __init__(self) -> None:
        self.workers = 1
        self.prefetch = False
        self.running = False
        self.task: asyncio.Task[None] | None = None

    async def run_batch(self) -> None:
        semaphore = asyncio.Semaphore(self.workers)
        # Prefetch holds the next batch's input in memory; the items still take as long to process.
        _read_ahead = [bytes(1024) for _ in range(BATCH_ITEMS)] if self.prefetch else []

        async def item() -> None:
            async with semaphore:
                await asyncio.sleep(ITEM_SECONDS)

        await asyncio.gather(*(item() for _ in range(BATCH_ITEMS)))
        del _read_ahead


class AppState:
    """The faults the app suffers from and the resources they hold."""

    def __init__(self, data_dir: Path, data_limit_bytes: int) -> None:
        self.data_dir = data_dir
        self.data_limit_bytes = data_limit_bytes
        self.leaked: list[bytearray] = []
        self.cache: dict[str, bytes] = {}
        self.cache_enabled = True
        self.cache_corrupted = False
        self.slow = False
        self.drift = HEALTHY_DRIFT
        self.knowledge_updated = time.time()
        self.burning = threading.Event()
        self.creeping = False
        self.batches: dict[str, BatchQueue] = {}

    def data_dir_bytes(self) -> int:
        total = 0
        for entry in os.scandir(self.data_dir):
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        return total

    def active(self) -> dict[str, bool]:
        return {
            "memory-leak": bool(self.leaked),
            "cpu-burn": self.burning.is_set(),
            "disk-fill": any(self.data_dir.glob("*.fill")),
            "errors": self.cache_corrupted,
            "latency": self.slow,
            "drift": self.drift > 0.3,
            "drift-creep": self.creeping,
        }


class AppMetrics:
    """The example app's own series on its own registry."""

    def __init__(self, registry: CollectorRegistry, state: AppState) -> None:
        self.requests = Counter(
            "app_http_requests", "HTTP requests by handler and status code.", ["handler", "code"], registry=registry
        )
        self.duration = Histogram(
            "app_http_request_duration_seconds", "HTTP request duration.", ["handler"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        Gauge("app_cache_size_bytes", "Bytes held in the response cache.", registry=registry).set_function(
            lambda: sum(len(v) for v in state.cache.values())
        )
        Gauge("app_cache_enabled", "1 while the response cache is on.", registry=registry).set_function(
            lambda: 1.0 if state.cache_enabled else 0.0
        )
        Gauge("app_model_drift_score", "Distance of the model from its calibration, 0..1.", registry=registry
              ).set_function(lambda: state.drift)
        Gauge(
            "app_knowledge_base_last_update_timestamp_seconds", "Unix time the knowledge base was last updated.",
            registry=registry,
        ).set_function(lambda: state.knowledge_updated)
        Gauge("app_data_dir_bytes", "Bytes of files in the data directory.", registry=registry).set_function(
            state.data_dir_bytes
        )
        Gauge("app_data_dir_limit_bytes", "Quota of the data directory.", registry=registry).set(
            state.data_limit_bytes
        )
        Gauge("app_memory_leaked_bytes", "Bytes held by the memory-leak fault.", registry=registry).set_function(
            lambda: sum(len(b) for b in state.leaked)
        )
        self.batch_duration = Gauge(
            "app_batch_duration_seconds", "How long the last batch of a queue took.", ["queue"], registry=registry
        )
        faults = Gauge("app_faults_active", "1 while a fault is active.", ["fault"], registry=registry)
        for fault in FAULTS:
            if fault != "crash":
                faults.labels(fault).set_function(lambda f=fault: 1.0 if state.active()[f] else 0.0)
        for handler in ("healthz", "work"):
            self.duration.labels(handler)
            for code in ("200", "500"):
                self.requests.labels(handler, code)


STATE = web.AppKey("state", AppState)
METRICS = web.AppKey("metrics", AppMetrics)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def _serve_request(request: web.Request, handler: str) -> web.Response:
    state = request.app[STATE]
    started = time.perf_counter()
    if state.slow and not state.cache_enabled:
        await asyncio.sleep(SLOW_SECONDS)
    status = 500 if state.cache_corrupted else 200
    if state.cache_enabled:
        state.cache.setdefault(request.path_qs, os.urandom(256))
    request.app[METRICS].requests.labels(handler, str(status)).inc()
    request.app[METRICS].duration.labels(handler).observe(time.perf_counter() - started)
    return web.Response(status=status, text="ok\n" if status == 200 else "cache corrupted\n")


async def healthz(request: web.Request) -> web.Response:
    return await _serve_request(request, "healthz")


async def work(request: web.Request) -> web.Response:
    return await _serve_request(request, "work")


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _burn(state: AppState) -> None:
    while state.burning.is_set():
        sum(i * i for i in range(10_000))


async def _creep(state: AppState) -> None:
    """Let the model drift slowly: a trend that predict_linear sees well before the alert's threshold."""
    while state.creeping and state.drift < DRIFTED:
        state.drift += CREEP_STEP
        await asyncio.sleep(CREEP_SECONDS)
    state.creeping = False


async def inject(request: web.Request) -> web.Response:
    """Start a fault."""
    state = request.app[STATE]
    fault = request.match_info["fault"]
    if fault not in FAULTS:
        return web.json_response({"error": f"unknown fault {fault!r}; one of {', '.join(FAULTS)}"}, status=404)
    if fault == "memory-leak":
        while sum(len(b) for b in state.leaked) < LEAK_TOTAL_BYTES:
            state.leaked.append(bytearray(b"x") * LEAK_CHUNK_BYTES)  # touched pages, so resident
    elif fault == "cpu-burn" and not state.burning.is_set():
        state.burning.set()
        threading.Thread(target=_burn, args=(state,), daemon=True, name="cpu-burn").start()
    elif fault == "disk-fill":
        chunk = b"\0" * FILL_CHUNK_BYTES
        index = 0
        while state.data_dir_bytes() < 0.95 * state.data_limit_bytes:
            (state.data_dir / f"junk-{index:05d}.fill").write_bytes(chunk)
            index += 1
    elif fault == "errors":
        state.cache_corrupted = True
    elif fault == "latency":
        state.cache_enabled = False
        state.slow = True
    elif fault == "drift":
        state.drift = DRIFTED
    elif fault == "drift-creep" and not state.creeping:
        state.creeping = True
        asyncio.get_running_loop().create_task(_creep(state))
    elif fault == "crash":
        asyncio.get_running_loop().call_later(0.1, os._exit, 3)
    return web.json_response({"injected": fault})


async def _run_batches(name: str, queue: BatchQueue, metrics: AppMetrics) -> None:
    while queue.running:
        started = time.perf_counter()
        await queue.run_batch()
        metrics.batch_duration.labels(name).set(time.perf_counter() - started)
        await asyncio.sleep(BATCH_PAUSE_SECONDS)


async def start_batches(request: web.Request) -> web.Response:
    """Start a queue's batch job (once); its duration appears after the first batch."""
    state = request.app[STATE]
    name = request.match_info["queue"]
    queue = state.batches.setdefault(name, BatchQueue())
    if not queue.running:
        queue.running = True
        queue.task = asyncio.get_running_loop().create_task(_run_batches(name, queue, request.app[METRICS]))
    return web.json_response({"queue": name, "workers": queue.workers, "prefetch": queue.prefetch})


async def tune_batches(request: web.Request) -> web.Response:
    """Set a queue's workers (1..MAX_WORKERS) or prefetch (on/off): what the optimizer's candidates change."""
    state = request.app[STATE]
    name, knob, value = (request.match_info[k] for k in ("queue", "knob", "value"))
    queue = state.batches.setdefault(name, BatchQueue())
    if knob == "workers" and value.isdigit() and 1 <= int(value) <= MAX_WORKERS:
        queue.workers = int(value)
    elif knob == "prefetch" and value in ("on", "off"):
        queue.prefetch = value == "on"
    else:
        error = f"workers/1..{MAX_WORKERS} or prefetch/on|off, not {knob}/{value}"
        return web.json_response({"error": error}, status=400)
    return web.json_response({"queue": name, "workers": queue.workers, "prefetch": queue.prefetch})


async def clear_cache(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.cache.clear()
    state.cache_corrupted = False
    return web.json_response({"cache": "cleared"})


async def enable_cache(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.cache_enabled = True
    state.slow = False
    return web.json_response({"cache": "enabled"})


async def disable_cache(request: web.Request) -> web.Response:
    """The optimizer's rollback of enable_cache: without the cache, requests are slow again."""
    state = request.app[STATE]
    state.cache_enabled = False
    state.slow = True
    return web.json_response({"cache": "disabled"})


async def free_memory(request: web.Request) -> web.Response:
    state = request.app[STATE]
    freed = sum(len(b) for b in state.leaked)
    state.leaked.clear()
    return web.json_response({"freed_bytes": freed})


async def recalibrate(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.creeping = False
    state.drift = HEALTHY_DRIFT
    state.knowledge_updated = time.time()
    return web.json_response({"drift": state.drift})


async def reload(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.leaked.clear()
    state.burning.clear()
    state.cache_corrupted = False
    state.cache_enabled, state.slow = True, False
    state.creeping = False
    state.drift = HEALTHY_DRIFT
    return web.json_response({"reloaded": True})


async def status(request: web.Request) -> web.Response:
    return web.json_response({"pid": os.getpid(), "faults": request.app[STATE].active()})


def create_app(data_dir: Path, data_limit_bytes: int) -> web.Application:
    """Build the example app with its own registry."""
    data_dir.mkdir(parents=True, exist_ok=True)
    app = web.Application()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    state = AppState(data_dir, data_limit_bytes)
    app[STATE] = state
    app[REGISTRY] = registry
    app[METRICS] = AppMetrics(registry, state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/work", work)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/status", status)
    app.router.add_post("/admin/fault/{fault}", inject)
    app.router.add_post("/admin/cache/clear", clear_cache)
    app.router.add_post("/admin/cache/enable", enable_cache)
    app.router.add_post("/admin/cache/disable", disable_cache)
    app.router.add_post("/admin/memory/free", free_memory)
    app.router.add_post("/admin/model/recalibrate", recalibrate)
    app.router.add_post("/admin/reload", reload)
    app.router.add_post("/admin/batch/{queue}/start", start_batches)
    app.router.add_post("/admin/batch/{queue}/{knob}/{value}", tune_batches)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/healer-demo"))
    parser.add_argument("--data-limit-bytes", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args()
    web.run_app(create_app(args.data_dir, args.data_limit_bytes), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
