"""The message envelope: one field set, encoded once, decoded and checked from the same table."""
import dataclasses

import pytest

from nbqueue.errors import MessageError
from nbqueue.message import Message


def test_a_message_encodes_without_its_defaults_and_decodes_equal():
    message = Message(
        id="t1",
        name="add",
        args=[1, 2],
        kwargs={},
        queue="q",
        priority=3,
        on_success=[{"id": "c", "name": "cb", "args": [], "kwargs": {}}],
    )
    body = message.encode()
    assert '"retry_count"' not in body and '"priority":3' in body.replace(" ", "")
    assert Message.decode(body) == message


def test_keys_this_version_does_not_know_travel_on_unchanged():
    body = '{"id": "t1", "name": "add", "args": [], "kwargs": {}, "trace": {"traceparent": "00-ab"}}'
    message = Message.decode(body)
    assert message.extra == {"trace": {"traceparent": "00-ab"}}
    assert Message.decode(message.encode()).to_dict()["trace"] == {"traceparent": "00-ab"}


@pytest.mark.parametrize("fields", [
    {},
    {"queue": "q", "priority": 3, "retry_count": 2, "retry_timeout": 0.5, "eta": 12.5, "immutable": True},
    {"queue": "q", "priority": 0, "retries": 0, "headers": None, "created_at": 1.0, "group_task_count": 4,
     "on_success": [{"id": "c", "name": "cb", "args": [], "kwargs": {}}], "workflow": {"kind": "chain"}},
])
def test_object_of_is_the_json_object_of_the_message_with_those_fields(fields):
    assert Message.object_of("t1", "add", (1, 2), None, **fields) == \
        Message(id="t1", name="add", args=(1, 2), kwargs=None, **fields).to_dict()


def test_object_of_refuses_a_keyword_that_is_not_a_field():
    with pytest.raises(TypeError, match="'colour'"):
        Message.object_of("t1", "add", [], {}, queue="q", colour="red")


def test_copy_changes_fields_and_the_message_is_frozen():
    message = Message(id="t1", name="add", args=[], kwargs={})
    again = message.copy(retries=2, retry_count=1)
    assert (again.retries, again.retry_count, message.retries) == (2, 1, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.retries = 5


@pytest.mark.parametrize("body, reason", [
    ("[1, 2]", "not a JSON object"),
    ('{"id": "t", "name": "n", "args": []}', "lacks required field(s): kwargs"),
    ('{"id": "t", "name": "n", "args": [], "kwargs": {}, "priority": "high"}', "'priority' has the wrong type"),
    ('{"id": "t", "name": "n", "args": [], "kwargs": {}, "on_success": [{"id": "c"}]}', "lacks required field(s)"),
    ("{not json", "not valid JSON"),
    ('{"id": "", "name": "n", "args": [], "kwargs": {}}', "id must be a non-empty string"),
    ('{"id": "t", "name": 5, "args": [], "kwargs": {}}', "name must be a non-empty string"),
    ('{"id": "t", "name": "n", "args": {}, "kwargs": {}}', "args must be a list"),
    ('{"id": "t", "name": "n", "args": [], "kwargs": []}', "kwargs must be an object"),
    ('{"id": "t", "name": "n", "args": [], "kwargs": {}, "priority": true}', "'priority' has the wrong type (bool)"),
    ('{"id": "t", "name": "n", "args": [], "kwargs": {}, "immutable": 1}', "'immutable' has the wrong type (int)"),
    ('{"id": "t", "name": "n", "args": [], "kwargs": {}, "on_error": [{"id": "c", "name": "e", "args": [], '
     '"kwargs": {}, "eta": "soon"}]}', "'eta' has the wrong type (str)"),
])
def test_a_body_that_is_not_an_envelope_is_refused_with_the_reason(body, reason):
    with pytest.raises(MessageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        Message.decode(body)


#: a body as the worker's dict path wrote it: the sender's fields, a key this version does not
#: know, defaults and nulls written out, and the retry counts of a retry re-encoded as a dict copy
DICT_PATH_BODY = (
    '{"id": "t1", "name": "flaky", "args": [1], "kwargs": {}, "queue": "q", "priority": 0, "headers": null, '
    '"created_at": 1800000000.5, "trace": {"traceparent": "00-ab"}, "retry_timeout": 1, "retry_count": 2, '
    '"retries": 1, "retry_backoff": null}'
)


def test_a_body_the_dict_path_wrote_decodes_to_its_fields_and_keeps_its_unknown_keys():
    message = Message.decode(DICT_PATH_BODY)
    assert (message.id, message.name, message.args, message.kwargs, message.queue) == ("t1", "flaky", [1], {}, "q")
    assert (message.retries, message.retry_count, message.retry_timeout, message.priority) == (1, 2, 1, 0)
    assert message.headers is None and message.created_at == 1800000000.5
    assert message.extra == {"trace": {"traceparent": "00-ab"}}
    again = Message.decode(message.copy(retries=2).encode())
    assert again.to_dict()["trace"] == {"traceparent": "00-ab"} and again.retries == 2
    assert again == message.copy(retries=2)


def test_a_null_sent_for_a_counted_field_reads_as_its_default():
    message = Message.decode('{"id": "t", "name": "n", "args": [], "kwargs": {}, "retries": null, '
                             '"retry_count": null, "priority": null, "immutable": null}')
    assert (message.retries, message.retry_count, message.priority, message.immutable) == (0, 0, 0, False)


def test_a_stored_dict_path_message_runs_and_its_retry_keeps_its_unknown_keys(tmp_path):
    """Given a message a worker of the dict path left in the queue (its retry, with a key this
    version does not know), when this version's worker runs it and it fails again, then the
    message goes back with its counts moved on and the unknown key kept, and its next attempt
    succeeds."""
    import nbqueue
    from nbqueue import states
    from nbqueue.broker import Outgoing
    from nbqueue.clock import ManualClock

    clock = ManualClock(1_800_000_000.0)
    app = nbqueue.App(f"sqlite:///{tmp_path}/m.db", default_queue="q", clock=clock)
    try:
        attempts = []

        @app.task(name="flaky")
        def flaky(x):
            attempts.append(x)
            if len(attempts) < 2:
                raise ValueError("not yet")
            return x + 1

        bodies = []
        real_retry = app.broker.retry

        def retry(delivery, *, body=None, eta=None):
            bodies.append(body)
            return real_retry(delivery, body=body, eta=eta)

        app.broker.retry = retry
        record = {"id": "t1", "name": "flaky", "state": states.PENDING, "queue": "q", "created_at": clock.time()}
        app.engine.send([record], [Outgoing(id="t1", body=DICT_PATH_BODY, queue="q")])
        worker = app.worker()
        assert worker.step() == 1
        [body] = bodies
        retried = Message.decode(body)
        assert (retried.retries, retried.retry_count) == (2, 1)
        assert retried.extra == {"trace": {"traceparent": "00-ab"}}
        assert app.backend.get("t1")["state"] == states.RETRY
        assert worker.step(now=clock.time() + 60) == 1
        assert app.backend.get("t1")["state"] == states.SUCCESS and attempts == [1, 1]
    finally:
        app.close()


def test_task_ids_are_version_7_uuids_ordered_by_the_millisecond_they_were_made(monkeypatch):
    """Ids keep to RFC 9562's layout, carry their time, and sort in the order they were made:
    the indexes keyed by task id then grow at one end."""
    import types
    import uuid

    from nbqueue import signature

    clock = iter([1_700_000_000_000_000_000 + ms * 1_000_000 for ms in (0, 0, 1, 2, 2, 5)])
    monkeypatch.setattr(signature, "time", types.SimpleNamespace(time_ns=lambda: next(clock)))
    ids = [signature.new_id() for _ in range(6)]
    parsed = [uuid.UUID(i) for i in ids]
    assert [str(u) for u in parsed] == ids
    assert {u.version for u in parsed} == {7} and {u.variant for u in parsed} == {uuid.RFC_4122}
    assert [u.int >> 80 for u in parsed] == [1_700_000_000_000 + ms for ms in (0, 0, 1, 2, 2, 5)]
    assert max(ids[0:2]) < ids[2] < min(ids[3:5]) and max(ids[3:5]) < ids[5]      # by millisecond
    monkeypatch.undo()
    assert len({signature.new_id() for _ in range(10_000)}) == 10_000


def test_an_envelope_checks_with_nulls_unknown_keys_and_in_process_subclasses_of_json_types():
    class Name(str):
        pass

    sent = {"id": "t", "name": "n", "args": [], "kwargs": {}, "eta": None, "priority": 3, "later": {"a": 1}}
    assert Message.check(sent) is sent
    built = {"id": Name("t"), "name": Name("n"), "args": [], "kwargs": {}, "queue": Name("q"), "immutable": True}
    assert Message.check(built) is built
