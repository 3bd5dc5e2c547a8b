"""``nbqueue dashboard``: a live web page of queues, workers and tasks, and ``/metrics``.

Needs the ``nbqueue[dashboard]`` extra (Starlette, uvicorn, prometheus_client). Uses only
the public App API, so it works on any broker and backend (a backend that keeps only
recent records, such as Redis, lists those).

    nbqueue dashboard --app tasks:app                     # http://127.0.0.1:8765
    nbqueue dashboard --app tasks:app --host 0.0.0.0 --password s3cret
"""
from __future__ import annotations

import threading
from typing import Any

from ..errors import ConfigurationError

DEFAULT_PORT = 8765


def _need_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(f"the dashboard needs {exc.name}: pip install 'nbqueue[dashboard]'") from exc


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def check_binding(host: str, password: str | None, token: str | None) -> None:
    """Refuse to serve beyond this machine without a password or token (ConfigurationError)."""
    if not is_loopback(host) and not (password or token):
        raise ConfigurationError(f"binding the dashboard to {host} makes it reachable from other machines: "
                                 "give --password or --token (actions and pages then need it)")


def create_app(app, *, password: str | None = None, token: str | None = None, interval: float = 1.0):
    """The dashboard as an ASGI application (for uvicorn, or mounting elsewhere)."""
    _need_extra()
    from .server import create_app as _create

    return _create(app, password=password, token=token, interval=interval)


class Dashboard:
    """A dashboard served by uvicorn in a daemon thread of this process (notebooks, tests).

    ``port=0`` binds a free port chosen by the system; once :meth:`start` returns,
    :attr:`port` and :attr:`url` name the port that was bound.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, password: str | None = None,
                 token: str | None = None, interval: float = 1.0):
        check_binding(host, password, token)
        _need_extra()
        import uvicorn

        self.host, self.port, self.token = host, port, token
        config = uvicorn.Config(
            create_app(app, password=password, token=token, interval=interval),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=1,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self, timeout: float = 10.0) -> "Dashboard":
        import time

        self.thread = threading.Thread(target=self.server.run, name="nbqueue-dashboard", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise ConfigurationError(
                    f"the dashboard could not start on {self.host}:{self.port} (is the port in use?)"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dashboard did not start within {timeout}s")
            time.sleep(0.02)
        if self.port == 0:
            self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __repr__(self) -> str:
        return f"<nbqueue Dashboard {self.url}>"


def serve(
    app,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    password: str | None = None,
    token: str | None = None,
    interval: float = 1.0,
) -> None:
    """Serve the dashboard in the foreground until interrupted (uvicorn owns the signals)."""
    check_binding(host, password, token)
    _need_extra()
    import uvicorn

    uvicorn.run(
        create_app(app, password=password, token=token, interval=interval),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=2,
        lifespan="off",
    )


def server_proxy() -> dict:
    """jupyter-server-proxy's description of the dashboard (entry point ``jupyter_serverproxy_servers``):
    JupyterLab's launcher starts ``nbqueue dashboard`` on a free port with ``App.from_env()``
    (NBQUEUE_BROKER, NBQUEUE_BACKEND) and proxies it under ``/nbqueue-dashboard/``."""
    import sys

    return {"command": [sys.executable, "-m", "nbqueue", "dashboard", "--port", "{port}"], "timeout": 30,
            "launcher_entry": {"title": "nbqueue dashboard"}}


def start(app, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options: Any) -> Dashboard:
    """Start a dashboard in a daemon thread; returns it (``.url``, ``.port``, ``.stop()``).
    ``port=0`` binds a free port."""
    return Dashboard(app, host, port, **options).start()
