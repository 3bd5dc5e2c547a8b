"""Prometheus metrics (prometheus_client, the ``nbqueue[metrics]`` extra).

Two sources, each exact for what it sees:

- ``StoreCollector(app)``: what the stores hold, read at each scrape (the dashboard's
  ``/metrics``): ``nbqueue_queue_messages{queue,state}`` (state ready, delayed, in_flight),
  ``nbqueue_dead_letters{queue}``, ``nbqueue_tasks{state,name}`` (task records now in each
  state: the counts ``app.tasks()`` shows; RETRY is a task waiting for its next attempt),
  ``nbqueue_workers`` (live workers), and per worker
  ``nbqueue_worker_last_heartbeat_timestamp_seconds``, ``nbqueue_worker_concurrency`` and
  ``nbqueue_worker_processed_tasks`` (labels worker, host).
- ``WorkerMetrics(worker)``: what one worker process runs (``nbqueue worker --metrics-port``),
  through the worker's event hooks: ``nbqueue_tasks_total{name,state}`` (runs ended
  SUCCESS, FAILURE or RETRY), ``nbqueue_task_retries_total{name}``,
  ``nbqueue_task_run_seconds{name}`` and ``nbqueue_task_queue_wait_seconds{name}``
  (histograms; the wait is from when the message was due, its eta or its send, to its
  start), ``nbqueue_tasks_running``.

Names follow Prometheus' conventions: seconds as the unit, ``_total`` only on counters
(records in a state rise and fall, so ``nbqueue_tasks`` is a gauge).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .message import Message

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    from prometheus_client.core import GaugeMetricFamily
except ImportError as exc:  # pragma: no cover - the message is the point
    from .errors import ConfigurationError

    raise ConfigurationError("Prometheus metrics need prometheus_client: pip install 'nbqueue[metrics]'") from exc

#: run time and queue wait buckets, in seconds (5 ms to 30 min)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf"))
QUEUE_STATES = ("ready", "delayed", "in_flight")


class StoreCollector:
    """A prometheus_client collector reading the App's stores at each scrape (read-only)."""

    def __init__(self, app):
        self.app = app

    def describe(self) -> list:
        return []          # collected only when scraped, never at registration

    def collect(self):
        status = self.app.status()
        messages = GaugeMetricFamily(
            "nbqueue_queue_messages", "Messages in a queue, by state", labels=["queue", "state"]
        )
        dead = GaugeMetricFamily("nbqueue_dead_letters", "Dead-lettered messages of a queue", labels=["queue"])
        for row in status["queues"]:
            for state in QUEUE_STATES:
                messages.add_metric([row["queue"], state], row.get(state) or 0)
            dead.add_metric([row["queue"]], row.get("dead") or 0)
        yield messages
        yield dead
        tasks = GaugeMetricFamily("nbqueue_tasks", "Task records in each state, by task name", labels=["state", "name"])
        try:
            counts = self.app.count_tasks()
        except NotImplementedError:     # a backend that cannot list its records
            counts = {}
        for (state, name), n in sorted(counts.items()):
            tasks.add_metric([state, name], n)
        yield tasks
        workers = status["workers"]
        yield GaugeMetricFamily("nbqueue_workers", "Live workers (heartbeat not expired)", value=len(workers))
        seen = GaugeMetricFamily(
            "nbqueue_worker_last_heartbeat_timestamp_seconds",
            "When a live worker last sent its heartbeat",
            labels=["worker", "host"],
        )
        threads = GaugeMetricFamily(
            "nbqueue_worker_concurrency", "Executor threads of a live worker", labels=["worker", "host"]
        )
        done = GaugeMetricFamily(
            "nbqueue_worker_processed_tasks",
            "Tasks a live worker has finished successfully since it started",
            labels=["worker", "host"],
        )
        for w in workers:
            labels = [str(w.get("worker_id")), str(w.get("host") or "")]
            seen.add_metric(labels, float(w.get("last_seen") or 0))
            threads.add_metric(labels, float(w.get("concurrency") or 0))
            done.add_metric(labels, float(w.get("processed") or 0))
        yield seen
        yield threads
        yield done


class WorkerMetrics:
    """Counters and histograms of the tasks one worker runs, fed by its event hooks."""

    def __init__(self, worker, registry: Any = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "nbqueue_tasks", "Task runs by how they ended (SUCCESS, FAILURE, RETRY)", ["name", "state"], registry=r
        )
        self.retries = Counter("nbqueue_task_retries", "Task runs that end in a retry", ["name"], registry=r)
        self.run_seconds = Histogram(
            "nbqueue_task_run_seconds", "Run time of a task's function", ["name"], buckets=BUCKETS, registry=r
        )
        self.wait_seconds = Histogram(
            "nbqueue_task_queue_wait_seconds",
            "From when a message was due to the start of its run",
            ["name"],
            buckets=BUCKETS,
            registry=r,
        )
        self.running = Gauge("nbqueue_tasks_running", "Tasks running in this worker now", registry=r)
        self.info = Gauge("nbqueue_worker_info", "This worker (always 1)", ["worker", "queues"], registry=r)
        self.info.labels(worker.name, ",".join(worker.queues)).set(1)
        worker.events.on_start.append(self.started)
        worker.events.on_finish.append(self.finished)

    def started(self, message: Message, queue: str | None) -> None:
        self.running.inc()
        due = max(float(message.created_at or 0), float(message.eta or 0))
        if due:
            self.wait_seconds.labels(message.name).observe(max(0.0, time.time() - due))

    def finished(self, message: Message, queue: str | None, outcome: str, seconds: float) -> None:
        self.running.dec()
        name = message.name
        self.tasks.labels(name, outcome).inc()
        self.run_seconds.labels(name).observe(seconds)
        if outcome == "RETRY":
            self.retries.labels(name).inc()


def serve_worker_metrics(worker, port: int, host: str = "127.0.0.1") -> WorkerMetrics:
    """Expose a worker's metrics on ``http://host:port/metrics`` (a daemon thread of prometheus_client's)."""
    metrics = WorkerMetrics(worker)
    start_http_server(port, addr=host, registry=metrics.registry)
    return metrics

