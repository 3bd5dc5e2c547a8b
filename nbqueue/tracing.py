"""OpenTelemetry traces: a span per send and per task run, one trace from sender to worker.

A send (``App.send_task``, ``send_many``, ``send`` of a workflow) opens a PRODUCER span
``send <name>``; the W3C trace context of the code that sends (``traceparent``, and
``tracestate`` when there is one) is written into each message's ``headers``, as
machinery carries its span context in a signature's headers. A worker opens a CONSUMER
span ``run <name>`` per task run, a child of the context in its message's headers; it is
the current span while the task runs, so whatever the task sends joins the same trace.
A workflow is prepared whole when it is sent, so each of its tasks (chain steps, group
members, a chord's callback) carries the sender's context: one trace, one run span per
task under the send span.

Everything here is a no-op unless opentelemetry-api is installed (``nbqueue[otel]``) and
the application has set a tracer provider (the SDK's, configured as usual; nbqueue never
configures exporters). ``use(provider)`` points nbqueue at a provider of its own (tests).
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .message import Message

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind
except ImportError:     # the extra is not installed: every function below does nothing
    trace = None

_NULL = contextlib.nullcontext()
_provider: Any = None           # set by use(); else the global tracer provider
_global: Any = None             # the global provider once it records (OpenTelemetry sets it only once)
_next_look = 0.0                # time.monotonic() of the next look for one while there is none
_cache: tuple[Any, Any] = (None, None)


def use(provider: Any) -> None:
    """Send nbqueue's spans to ``provider`` (a TracerProvider) instead of the global one; None: the global one again."""
    global _provider
    _provider = provider


def _tracer():
    """nbqueue's tracer, or None while no tracer provider records spans (no SDK configured).

    Cheap on every send and run: while there is no global provider, one is looked for at
    most once a second (a provider set after the first sends is used within a second)."""
    global _cache, _global, _next_look
    if trace is None:
        return None
    provider = _provider
    if provider is None:
        if _global is None:
            now = time.monotonic()
            if now < _next_look:
                return None
            _next_look = now + 1.0
            found = trace.get_tracer_provider()
            if isinstance(found, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
                return None
            _global = found
        provider = _global
    if _cache[0] is not provider:
        _cache = (provider, provider.get_tracer("nbqueue", _version()))
    return _cache[1]


def _version() -> str | None:
    """nbqueue's installed version (read from the package metadata: this module is below the package's __init__)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("nbqueue")
    except importlib.metadata.PackageNotFoundError:
        return None


#: nbqueue's tracer, or None while no tracer provider records spans (one call: the send
#: path's check that tracing is off)
tracer = _tracer


def enabled() -> bool:
    """True when spans are being recorded (opentelemetry installed and a provider set)."""
    return _tracer() is not None


def sending(name: str, count: int = 1):
    """The span of one send (a context manager): ``send <name>``; ``count`` messages."""
    tracer = _tracer()
    if tracer is None:
        return _NULL
    return tracer.start_as_current_span(
        f"send {name}",
        kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "nbqueue", "messaging.batch.message_count": count},
    )


def inject(message: dict) -> None:
    """Write the current trace context into ``message["headers"]`` (nothing outside a span)."""
    if _tracer() is None:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if carrier:
        message["headers"] = {**(message.get("headers") or {}), **carrier}


def running(message: Message, queue: str | None = None):
    """The span of one task run (a context manager), a child of the context its message
    carries; current while the task runs. Records what the task raises."""
    tracer = _tracer()
    if tracer is None:
        return _NULL
    headers = message.headers
    parent = propagate.extract(headers) if isinstance(headers, dict) and "traceparent" in headers else None
    attributes = {
        "messaging.system": "nbqueue",
        "messaging.message.id": message.id,
        "nbqueue.task.name": message.name,
        "messaging.destination.name": queue or message.queue or "",
        "nbqueue.task.retries": message.retries,
    }
    return tracer.start_as_current_span(
        f"run {message.name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    )
