"""OpenTelemetry: the sender's trace context travels in the message headers; one trace per workflow."""
from __future__ import annotations

import pytest

import nbqueue
from nbqueue import tracing
from nbqueue.testing import wait_for

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is part of the test extra")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402


@pytest.fixture
def spans():
    """The spans nbqueue records during the test (an SDK provider of its own, in-memory)."""
    provider = sdk.TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)


def test_a_chain_is_one_trace_a_send_span_and_a_run_span_per_step(app_factory, spans):
    app = app_factory()

    @app.task(name="add")
    def add(x, y):
        return x + y

    worker = app.start_worker(1)
    chain = app.send(add.s(1, 1) | add.s(10) | add.s(100))
    assert chain.get(timeout=30) == 112
    worker.stop()
    wait_for(lambda: len([s for s in spans.get_finished_spans() if s.name == "run add"]) == 3, timeout=10)
    finished = spans.get_finished_spans()
    sends = [s for s in finished if s.name.startswith("send")]
    runs = [s for s in finished if s.name == "run add"]
    assert [s.name for s in sends] == ["send chain"] and sends[0].kind == SpanKind.PRODUCER
    assert len({s.context.trace_id for s in sends + runs}) == 1
    assert all(r.parent.span_id == sends[0].context.span_id and r.kind == SpanKind.CONSUMER for r in runs)
    assert sorted(r.attributes["messaging.message.id"] for r in runs) == sorted(r.id for r in chain.results)


def test_a_task_that_sends_a_task_continues_the_trace(app_factory, spans):
    app = app_factory()

    @app.task(name="leaf")
    def leaf(x):
        return x * 2

    @app.task(name="fanout")
    def fanout(x):
        return leaf.delay(x).id

    worker = app.start_worker(2)
    child_id = fanout.delay(5).get(timeout=30)
    assert app.result(child_id).get(timeout=30) == 10
    worker.stop()
    wait_for(lambda: any(s.name == "run leaf" for s in spans.get_finished_spans()), timeout=10)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    send_outer, run_outer = by_name["send fanout"], by_name["run fanout"]
    send_inner, run_inner = by_name["send leaf"], by_name["run leaf"]
    assert run_outer.parent.span_id == send_outer.context.span_id
    assert send_inner.parent.span_id == run_outer.context.span_id
    assert run_inner.parent.span_id == send_inner.context.span_id
    assert len({s.context.trace_id for s in by_name.values()}) == 1


def test_a_failing_task_records_its_exception_on_the_run_span(tmp_path, spans):
    app = nbqueue.App(f"sqlite:///{tmp_path}/t.db")

    @app.task(name="boom")
    def boom():
        raise ValueError("no")

    worker = app.start_worker(1)
    r = boom.delay()
    wait_for(r.ready, timeout=20)
    worker.stop()
    run = next(s for s in spans.get_finished_spans() if s.name == "run boom")
    assert run.status.status_code.name == "ERROR"
    assert any(e.name == "exception" and e.attributes["exception.type"] == "ValueError" for e in run.events)


def test_no_provider_no_headers(tmp_path):
    tracing.use(None)
    app = nbqueue.App(f"sqlite:///{tmp_path}/t.db")
    message, _, _ = app.prepare(app.signature("add", (1, 2)))
    assert "headers" not in message and not tracing.enabled()


def test_the_global_tracer_provider_is_used(tmp_path):
    """As an application configures OpenTelemetry: ``trace.set_tracer_provider`` (in a process
    of its own: it can be set once)."""
    import subprocess
    import sys

    script = f"""
import nbqueue
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
app = nbqueue.App("sqlite:///{tmp_path}/g.db")

@app.task(name="add")
def add(x, y):
    return x + y

worker = app.start_worker(1)
with trace.get_tracer("test").start_as_current_span("notebook cell") as cell:
    assert add.delay(1, 2).get(timeout=30) == 3
worker.stop()
spans = {{s.name: s for s in exporter.get_finished_spans()}}
assert spans["send add"].parent.span_id == cell.get_span_context().span_id
assert spans["run add"].parent.span_id == spans["send add"].context.span_id
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
