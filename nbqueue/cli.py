"""The ``nbqueue`` command: worker | dashboard | beat | status | purge | export. The only place with signal handlers."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from . import options
from .errors import ConfigurationError

log = logging.getLogger("nbqueue.cli")


def load_app(spec: str | None):
    """``module:attribute`` (default attribute ``app``); without --app, App.from_env()."""
    from .app import App

    if not spec:
        return App.from_env()
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for --app {spec!r}: {exc}") from exc
    try:
        app = getattr(module, attr or "app")
    except AttributeError:
        raise ConfigurationError(
            f"module {module_name!r} has no attribute {attr or 'app'!r} (--app {spec!r})"
        ) from None
    if not isinstance(app, App):
        raise ConfigurationError(f"--app {spec!r} is a {type(app).__name__}, not an nbqueue.App")
    return app


def _install_stop_handlers(stop, abort) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: exit at once."""
    state = {"signals": 0}

    def stop_then_say(name: str) -> None:
        # said once the worker takes nothing more: a task sent after this line is not started here
        try:
            stop()
        finally:
            log.warning("received %s: finishing running tasks (send again to exit at once)", name)

    def handler(signum, frame):
        state["signals"] += 1
        if state["signals"] == 1:
            threading.Thread(target=stop_then_say, args=(signal.Signals(signum).name,), daemon=True).start()
        else:
            abort()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _stores(app) -> str:
    """The broker and, when it is another, the backend (a SQLite file with its absolute path)."""
    broker = f"broker {app.broker!r}"
    return broker if app.backend_url == app.broker_url else f"{broker}, backend {app.backend!r}"


def _checked(read, **bounds):
    """An argparse ``type`` reading an option's text with ``read`` (nbqueue.options: seconds, count)
    within ``bounds``; argparse's error, naming the option and the value, when it is out of range."""
    def parse(text: str):
        try:
            value = read("value", text, None, **bounds)
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None
        if value is None:
            raise argparse.ArgumentTypeError(f"needs a value, not {text!r}")
        return value

    parse.__name__ = read.__name__
    return parse


#: the level names logging knows
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "WARN", "FATAL", "NOTSET")


def _log_level(text: str) -> str:
    """An argparse ``type``: a logging level's name, in any case."""
    if text.strip().upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.strip().upper()


def cmd_worker(args) -> int:
    app = load_app(args.app)
    worker = app.worker(
        concurrency=args.concurrency,
        queues=args.queues,
        allow_cells=args.allow_cells,
        echo_output=True,
        prefetch=args.prefetch,
        pool=args.pool,
        allow_code=args.allow_code,
        max_tasks_per_child=args.max_tasks_per_child,
        max_memory_per_child=args.max_memory_per_child,
        shutdown_grace=args.shutdown_grace,
    )
    app.check_stores()
    beat = None
    if args.beat:
        beat = app.scheduler()
        beat.start()
    if args.metrics_port is not None:
        from .metrics import serve_worker_metrics

        serve_worker_metrics(worker, args.metrics_port, args.metrics_host)
        print(
            f"nbqueue worker {worker.name}: metrics on http://{args.metrics_host}:{args.metrics_port}/metrics",
            flush=True,
        )
    _install_stop_handlers(lambda: (beat.stop() if beat else None, worker.stop(wait=False)), lambda: os._exit(1))
    units = "child process(es)" if args.pool == "processes" else "thread(s)"
    queues = ",".join(worker.queues)
    print(f"nbqueue worker {worker.name}: {args.concurrency} {units}, queues {queues}, {_stores(app)}", flush=True)
    worker.run()
    print(f"nbqueue worker {worker.name}: stopped after {worker.processed} task(s)", flush=True)
    if worker.crashed:
        print(
            f"nbqueue worker {worker.name}: its executor threads died (see the log above)", file=sys.stderr, flush=True
        )
        return 1
    return 0


def cmd_dashboard(args) -> int:
    from . import dashboard

    app = load_app(args.app)
    password = args.password or os.environ.get("NBQUEUE_DASHBOARD_PASSWORD") or None
    token = args.token or os.environ.get("NBQUEUE_DASHBOARD_TOKEN") or None
    dashboard.check_binding(args.host, password, token)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"nbqueue dashboard: http://{host}:{args.port}/" + (f"?token={token}" if token else "")
          + (" (password required)" if password else ""), flush=True)
    dashboard.serve(app, args.host, args.port, password=password, token=token, interval=args.interval)
    return 0


def cmd_beat(args) -> int:
    app = load_app(args.app)
    beat = app.scheduler()
    done = threading.Event()
    _install_stop_handlers(lambda: (beat.stop(), done.set()), lambda: os._exit(1))
    beat.start()
    print(f"nbqueue beat: {len(app.schedules())} schedule(s)", flush=True)
    while not done.wait(0.5):
        pass
    return 0


def cmd_status(args) -> int:
    import pandas as pd

    app = load_app(args.app)
    status = app.status()
    print(_stores(app))
    queues = pd.DataFrame(status["queues"], columns=["queue", "ready", "delayed", "in_flight", "dead"])
    workers = pd.DataFrame(status["workers"])
    print("queues:")
    print(queues.to_string(index=False) if len(queues) else "  (none)")
    print("workers alive:")
    if len(workers):
        cols = [c for c in ("worker_id", "host", "pid", "concurrency", "running", "processed") if c in workers]
        print(workers[cols].to_string(index=False))
    else:
        print("  (none)")
    return 0


def confirm(question: str) -> bool | None:
    """Ask ``question`` on the terminal: True for yes; None when stdin is not a terminal
    (nobody to ask)."""
    if sys.stdin is None or not sys.stdin.isatty():
        return None
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_purge(args) -> int:
    app = load_app(args.app)
    queue = args.queue or app.default_queue
    what = f"queue {queue!r}" + ("" if args.queue else " (the App's default queue)")
    if not args.force:
        answer = confirm(f"Delete every waiting message of {what}? Their tasks will be recorded REVOKED.")
        if answer is None:
            print(f"nbqueue purge: not purging {what} without confirmation: run it on a terminal to be asked, "
                  "or pass --force", file=sys.stderr)
            return 2
        if not answer:
            print("nothing purged")
            return 1
    n = app.purge(queue)
    print(f"purged {n} message(s) from {queue}")
    return 0


def cmd_export(args) -> int:
    from .notebook.export import run_cli

    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbqueue", description="nbqueue: a job runner for notebooks")
    parser.add_argument("--log-level", type=_log_level, default=os.environ.get("NBQUEUE_LOG_LEVEL", "INFO"),
                        help=f"{', '.join(LOG_LEVELS)} (default: NBQUEUE_LOG_LEVEL, else INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run a worker process in the foreground")
    w.add_argument("--app", help="module:attribute of the App (default: App.from_env())")
    w.add_argument("-c", "--concurrency", type=_checked(options.count), default=os.cpu_count() or 1,
                   help="tasks run at once: threads, or child processes with --pool processes "
                        "(default: the CPU count, %(default)s)")
    w.add_argument(
        "-Q", "--queues", default=None, help="comma-separated queue names (default: the App's default queue)"
    )
    w.add_argument("--prefetch", type=_checked(options.count), default=None,
                   help="messages each thread reserves at once (1 or more)")
    w.add_argument(
        "--allow-cells", action="store_true", help="run %%%%task notebook cells shipped by producers (runs their code)"
    )
    w.add_argument("--pool", choices=("threads", "processes"), default="threads",
                   help="run tasks in threads (default; I/O-bound work) or in child processes (CPU-bound work)")
    w.add_argument("--allow-code", action="store_true",
                   help="run functions shipped from notebooks (runs their code; checked with NBQUEUE_SECRET when set)")
    w.add_argument(
        "--max-tasks-per-child", type=_checked(options.count, minimum=0), default=None,
        help="--pool processes: replace a child after this many tasks (0: never)"
    )
    w.add_argument("--max-memory-per-child", type=_checked(options.count, minimum=0), default=None,
                   help="--pool processes: replace a child whose peak resident memory passed this many KiB (0: never)")
    w.add_argument(
        "--shutdown-grace",
        type=_checked(options.seconds),
        default=30.0,
        help="--pool processes: seconds running tasks may finish after SIGTERM before their children are stopped",
    )
    w.add_argument("--beat", action="store_true", help="also run the periodic-task scheduler")
    w.add_argument(
        "--metrics-port", type=_checked(options.count, maximum=65535), default=None,
        help="serve this worker's Prometheus metrics on this port (/metrics)"
    )
    w.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    w.set_defaults(fn=cmd_worker)

    d = sub.add_parser("dashboard", help="serve the web dashboard (queues, workers, tasks, actions) and /metrics")
    d.add_argument("--app", help="module:attribute of the App (default: App.from_env())")
    d.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --password or --token)"
    )
    d.add_argument("--port", type=_checked(options.count, maximum=65535), default=8765)
    d.add_argument("--password", default=None, help="require this password (HTTP Basic; or NBQUEUE_DASHBOARD_PASSWORD)")
    d.add_argument("--token", default=None, help="require this token (?token=...; or NBQUEUE_DASHBOARD_TOKEN)")
    d.add_argument("--interval", type=_checked(options.seconds, positive=True), default=1.0,
                   help="seconds between live updates (more than 0, default 1)")
    d.set_defaults(fn=cmd_dashboard)

    b = sub.add_parser("beat", help="run the periodic-task scheduler")
    b.add_argument("--app")
    b.set_defaults(fn=cmd_beat)

    s = sub.add_parser("status", help="queue depths and live workers")
    s.add_argument("--app")
    s.set_defaults(fn=cmd_status)

    p = sub.add_parser(
        "purge", help="delete every waiting message of a queue; their tasks are recorded REVOKED",
        description="Delete every waiting message of a queue, ready and delayed (ETA, countdown, retries waiting). "
                    "Each purged task is recorded REVOKED (\"purged from queue ...\"), so waiting on its result "
                    "raises TaskRevoked, and the chain, group or chord it belongs to ends as on a revoke. "
                    "Asks for confirmation first, naming the queue, unless --force is given.",
    )
    p.add_argument("queue", nargs="?", help="the queue to purge (default: the App's default queue, named in the "
                                            "confirmation)")
    p.add_argument("-f", "--force", "-y", "--yes", action="store_true", help="purge without asking for confirmation")
    p.add_argument("--app", help="module:attribute of the App (default: App.from_env())")
    p.set_defaults(fn=cmd_purge)

    e = sub.add_parser("export", help="write a notebook's tasks and the code they need to an importable module")
    e.add_argument("notebook", help="the .ipynb file")
    e.add_argument("-o", "--output", help="the module file to write (default: print it)")
    e.add_argument("--check", action="store_true", help="then import the module in a new interpreter, list its tasks")
    e.set_defaults(fn=cmd_export)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = logging.getLogger().getEffectiveLevel()
    if level > logging.DEBUG:       # store clients' connection chatter only at --log-level DEBUG
        from .drivers import quiet_loggers

        for name in quiet_loggers():
            logging.getLogger(name).setLevel(max(logging.WARNING, level))
    try:
        return args.fn(args)
    except ConfigurationError as exc:
        print(f"nbqueue: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
