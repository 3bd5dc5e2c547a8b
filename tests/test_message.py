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
])
def test_a_body_that_is_not_an_envelope_is_refused_with_the_reason(body, reason):
    with pytest.raises(MessageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        Message.decode(body)
