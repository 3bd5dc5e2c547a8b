"""The dashboard's web application: Starlette routes, server-sent events, access control.

Starlette (an ASGI toolkit, served by uvicorn) because it is small, well kept, has no
template or ORM layer we do not need, streams responses (``StreamingResponse`` carries
the server-sent events that keep the page live) and comes with a test client. Store
calls are synchronous; each runs in Starlette's thread pool, never on the event loop.

Pages (``/``, ``/tasks/<id>``, ``/queues/<name>``) are one static HTML file with the
view's first data embedded, so the first render is one request; the page then follows
``/api/events`` (one server-sent event per change, computed once per tick for all the
pages showing the same view). JSON: ``/api/overview``, ``/api/tasks``,
``/api/tasks/<id>``, ``/api/queues/<name>``; actions (POST, behind a confirmation in
the page): ``/api/tasks/<id>/cancel``, ``/api/tasks/<id>/cancel-workflow``, ``/api/tasks/<id>/retry``,
``/api/queues/<name>/redrive``, ``/api/queues/<name>/purge``; ``/metrics`` for
Prometheus. Unknown ids and queues answer 404 with a message.

Access: with a ``password`` (HTTP Basic, any user name) or a ``token`` (``?token=`` once,
then a cookie, or ``Authorization: Bearer``), every request must carry it. Without
either, only loopback clients are served (``serve`` refuses to bind elsewhere).
Actions also need the ``X-Nbqueue-Action`` header, which a page of another site cannot
send (so it cannot make a visitor's browser purge a queue).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import data
from .data import NotFound

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ACTION_HEADER = "x-nbqueue-action"
COOKIE = "nbqueue_dashboard_token"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _json(obj: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"))


#: a live view's tick stretches to this many times its computation's cost
SLOWDOWN = 20
#: live task counts (they read every matching record) are read again at most this often, in
#: seconds, and at most once per COUNT_SLOWDOWN times their cost
COUNT_EVERY = 5.0
COUNT_SLOWDOWN = 40


class Snapshots:
    """One computation per view and tick, shared by every page showing that view; the tick
    stretches to ``SLOWDOWN`` times a computation's cost, so the dashboard never keeps a store
    (or a core) busy for more than a twentieth of the time."""

    def __init__(self, interval: float):
        self.interval = interval
        self._cache: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.cost: dict[str, float] = {}

    def pause(self, key: str) -> float:
        return max(self.interval, SLOWDOWN * self.cost.get(key, 0.0))

    async def get(self, key: str, compute: Callable[[], Any]) -> str:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < 0.9 * self.pause(key):
                return cached[1]
            started = time.monotonic()
            text = _json(await run_in_threadpool(compute))
            self.cost[key] = time.monotonic() - started
            self._cache[key] = (time.monotonic(), text)
            if len(self._cache) > 256:          # views nobody follows any more
                for old in sorted(self._cache, key=lambda k: self._cache[k][0])[:128]:
                    self._cache.pop(old, None)
                    self._locks.pop(old, None)
            return text


class Access:
    """Pure ASGI middleware: the password or token on every request (when one is set), and
    the action header on POSTs; loopback clients only when neither is set."""

    def __init__(self, asgi, password: str | None, token: str | None):
        self.asgi, self.password, self.token = asgi, password, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.token and request.query_params.get("token") == self.token and request.method == "GET":
            async def send_with_cookie(message):     # remember the token for the page's later requests
                if message["type"] == "http.response.start":
                    message.setdefault("headers", []).append(
                        (b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict".encode()))
                await send(message)
            return await self.asgi(scope, receive, send_with_cookie)
        return await self.asgi(scope, receive, send)

    def refusal(self, request: Request) -> Response | None:
        if not (self.password or self.token):
            host = request.client.host if request.client else ""
            if host not in LOOPBACK:
                return JSONResponse(
                    {"error": "this dashboard serves loopback clients only (start it with --password or --token)"},
                    status_code=403,
                )
        elif not self.allowed(request):
            headers = {"WWW-Authenticate": 'Basic realm="nbqueue dashboard"'} if self.password else {}
            return JSONResponse(
                {
                    "error": "authentication required: "
                    + ("the dashboard's password" if self.password else "the dashboard's token (?token=...)")
                },
                status_code=401,
                headers=headers,
            )
        if request.method == "POST" and request.headers.get(ACTION_HEADER) != "1":
            return JSONResponse(
                {"error": f"actions need the {ACTION_HEADER} header (sent by the dashboard's page)"}, status_code=403
            )
        return None

    def allowed(self, request: Request) -> bool:
        given = []
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic ") and self.password:
            try:
                given.append(("password", base64.b64decode(auth[6:]).decode("utf-8").partition(":")[2]))
            except Exception:
                pass
        if self.token:
            if auth.lower().startswith("bearer "):
                given.append(("token", auth[7:].strip()))
            for value in (request.query_params.get("token"), request.cookies.get(COOKIE)):
                if value:
                    given.append(("token", value))
        secrets = {"password": self.password, "token": self.token}
        return any(
            secrets[kind] and hmac.compare_digest(value.encode(), secrets[kind].encode()) for kind, value in given
        )


class Dashboard:
    """The route handlers of one App's dashboard and what they share: the views' snapshots
    (Snapshots), the page's HTML and the live task counts."""

    def __init__(self, app, interval: float = 1.0):
        self.app = app
        self.snapshots = Snapshots(interval)
        self.page_html = (STATIC / "index.html").read_text(encoding="utf-8")
        self.counted: dict[str, tuple[float, float, dict]] = {}      # filters -> (when, cost, counts by state)

    def routes(self) -> list:
        return [
            Route("/", self.home),
            Route("/tasks/{task_id}", self.task_page),
            Route("/queues/{queue:path}", self.queue_page),
            Route("/api/overview", self.api_overview),
            Route("/api/tasks", self.api_tasks),
            Route("/api/tasks/{task_id}", self.api_task),
            Route("/api/tasks/{task_id}/{action}", self.action, methods=["POST"]),
            Route("/api/queues/{queue}/{action}", self.action, methods=["POST"]),
            Route("/api/queues/{queue:path}", self.api_queue),
            Route("/api/events", self.events),
            Route("/metrics", self.metrics),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]

    # -- the views' data ---------------------------------------------------------------------------
    def live_counts(self, filters: dict) -> dict:
        """``data.state_counts`` for the live views, read again after COUNT_EVERY seconds (or
        COUNT_SLOWDOWN times its cost)."""
        key = _json(sorted(filters.items()))
        hit = self.counted.get(key)
        if hit is not None and time.monotonic() - hit[0] < max(COUNT_EVERY, COUNT_SLOWDOWN * hit[1]):
            return hit[2]
        started = time.monotonic()
        by_state = data.state_counts(self.app, filters)
        self.counted[key] = (time.monotonic(), time.monotonic() - started, by_state)
        if len(self.counted) > 256:
            self.counted.clear()
        return by_state

    def view_data(self, view: str, params: Any, ident: str | None, counts: Any = True) -> dict:
        """A view's data; ``counts`` False (the first render): the task counts come with the first live update."""
        app = self.app
        if view == "task":
            return {"view": "task", "task": data.task_detail(app, ident)}
        filters = data.filters_from(params)
        page = _int(params.get("page"), "page")
        if view == "queue":
            filters["queue"] = ident
            return {"view": "queue", "queue": data.queue_view(app, ident), "overview": data.overview(app),
                    "tasks": data.task_page(app, filters, page, counts=counts)}
        return {
            "view": "home",
            "overview": data.overview(app),
            "tasks": data.task_page(app, filters, page, counts=counts),
        }

    # -- pages -------------------------------------------------------------------------------------
    async def page(self, request: Request, view: str, ident: str | None = None) -> Response:
        try:
            first = await run_in_threadpool(self.view_data, view, request.query_params, ident, False)
        except NotFound as exc:
            return HTMLResponse(_error_page(404, str(exc), request), status_code=404)
        except ValueError as exc:
            return HTMLResponse(_error_page(400, str(exc), request), status_code=400)
        body = (self.page_html.replace("__NBQ_BASE__", _base(request))
                .replace("__NBQ_INITIAL__", _json(first).replace("</", "<\\/")))
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    async def home(self, request: Request) -> Response:
        return await self.page(request, "home")

    async def task_page(self, request: Request) -> Response:
        return await self.page(request, "task", request.path_params["task_id"])

    async def queue_page(self, request: Request) -> Response:
        return await self.page(request, "queue", request.path_params["queue"])

    # -- JSON and actions --------------------------------------------------------------------------
    async def api_overview(self, request: Request) -> Response:
        return await _api(data.overview, self.app)

    async def api_tasks(self, request: Request) -> Response:
        params = request.query_params

        def tasks():
            return data.task_page(
                self.app,
                data.filters_from(params),
                _int(params.get("page"), "page"),
                _int(params.get("per_page"), "per_page", 50),
            )

        return await _api(tasks)

    async def api_task(self, request: Request) -> Response:
        return await _api(data.task_detail, self.app, request.path_params["task_id"])

    async def api_queue(self, request: Request) -> Response:
        return await _api(data.queue_view, self.app, request.path_params["queue"])

    async def action(self, request: Request) -> Response:
        kind, ident = (
            request.path_params["action"],
            request.path_params.get("task_id") or request.path_params.get("queue"),
        )
        if kind not in ACTIONS:
            return JSONResponse({"error": f"no action {kind!r}"}, status_code=404)
        log.info("dashboard action %s on %s", kind, ident)
        return await _api(ACTIONS[kind], self.app, ident)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from ..metrics import StoreCollector

        def scrape() -> bytes:
            registry = CollectorRegistry()
            registry.register(StoreCollector(self.app))
            return generate_latest(registry)
        return Response(await run_in_threadpool(scrape), media_type=CONTENT_TYPE_LATEST)

    # -- server-sent events ------------------------------------------------------------------------
    async def events(self, request: Request) -> Response:
        params = request.query_params
        view, ident = params.get("view") or "home", params.get("id")
        rest = {k: v for k, v in params.items() if k not in ("view", "id")}
        key = _view_key(view, rest, ident)

        def compute() -> dict:
            return self.view_data(view, rest, ident, self.live_counts)

        try:                                    # the first one here: an unknown id is a 404, not a stream of errors
            await self.snapshots.get(key, compute)
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return StreamingResponse(
            self.stream(key, compute),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def stream(self, key: str, compute: Callable[[], dict]):
        """The events of one view: its data whenever it changed, a keep-alive comment after 15
        quiet seconds, ``gone`` once its task is forgotten."""
        last, quiet = None, 0.0
        yield "retry: 2000\n\n"
        while True:
            try:
                text = await self.snapshots.get(key, compute)
            except NotFound as exc:         # forgotten or expired meanwhile
                yield f"event: gone\ndata: {_json({'error': str(exc)})}\n\n"
                return
            except Exception as exc:        # a store that went away: say so, keep trying
                log.warning("dashboard: reading the stores failed", exc_info=True)
                text = _json({"error": f"{type(exc).__name__}: {exc}"})
            if text != last:
                yield f"data: {text}\n\n"
                last, quiet = text, 0.0
            elif quiet > 15:
                yield ": keep-alive\n\n"
                quiet = 0.0
            pause = self.snapshots.pause(key)
            quiet += pause
            await asyncio.sleep(pause)


#: the actions of ``POST /api/tasks/<id>/<action>`` and ``POST /api/queues/<name>/<action>``
ACTIONS: dict[str, Callable[[Any, str], Any]] = {
    "cancel": data.act_cancel,
    "cancel-workflow": data.act_cancel_workflow,
    "retry": data.act_retry,
    "redrive": data.act_redrive,
    "purge": data.act_purge,
}


def create_app(app, *, password: str | None = None, token: str | None = None, interval: float = 1.0) -> Any:
    """The dashboard of ``app`` (an nbqueue.App) as an ASGI application."""
    dashboard = Dashboard(app, interval)
    web = Starlette(routes=dashboard.routes(), exception_handlers={404: _not_found, 500: _server_error})
    web.state.nbqueue_app = app
    web.state.snapshots = dashboard.snapshots
    return Access(web, password, token)


async def _api(fn: Callable, *args) -> Response:
    """``fn(*args)`` in the thread pool, as JSON; NotFound answers 404, ValueError 400."""
    try:
        return JSONResponse(json.loads(_json(await run_in_threadpool(fn, *args))))
    except NotFound as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)


def _view_key(view: str, params: Any, ident: str | None) -> str:
    return _json([view, ident, sorted((k, v) for k, v in params.items() if k != "token")])


async def _not_found(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": f"no such page: {request.url.path}"}, status_code=404)
    return HTMLResponse(_error_page(404, f"no such page: {request.url.path}", request), status_code=404)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("dashboard: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)


def _int(value: str | None, name: str, default: int = 1) -> int:
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None


def _base(request: Request) -> str:
    """The relative URL of the dashboard's root from this page (it may be served under a
    proxy's prefix, as jupyter-server-proxy does, so no URL in a page is absolute)."""
    depth = request.url.path.count("/") - 1
    return "./" if depth <= 0 else "../" * depth


def _error_page(status: int, message: str, request: Request) -> str:
    return (
        f"<!doctype html><meta charset='utf-8'><title>nbqueue: {status}</title>"
        f"<body style='font-family:sans-serif;margin:2em'><h1>{status}</h1><p class='error'>{data.escape(message)}</p>"
        f"<p><a href='{_base(request)}'>back to the dashboard</a></p></body>"
    )
