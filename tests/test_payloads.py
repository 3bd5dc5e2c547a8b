"""Large values out of band (nbqueue/payloads.py): stored once in a payload store under their
content hash, referenced from the JSON, read lazily, removed with the records that reference
them, and every fault of the data plane (a missing or corrupted payload, a value too large
for its store, a crash between a payload and its record) met with a clear error or a sweep.

Stores: the SQLite file, Redis keys (also ``memory://``), and fsspec URLs: a local directory
(``file://``) and S3 on moto's server (started by the session, as for SQS) with s3fs and
boto3 as real clients. A small ``payload_threshold`` sends small test values out of band.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_frames_codec import assert_same_frame, assert_same_series, frames, scalar_dtypes, series

import nbqueue
from nbqueue import blobs, chain, chord, group, payloads, serialization, states
from nbqueue.drivers import payload_store
from nbqueue.drivers.redis.payloads import RedisPayloads
from nbqueue.drivers.sqlite.payloads import SQLitePayloads
from nbqueue.errors import ConfigurationError, PayloadCorrupt, PayloadMissing, PayloadTooLarge
from nbqueue.payloads import PayloadRef
from nbqueue.testing import wait_for

from conftest import BACKEND_KINDS, BROKER_KINDS, IN_CI, cli_worker, session_server_url, store_url

TESTS_DIR = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("NBQUEUE_HYPOTHESIS_PAIR_EXAMPLES", "5"))      # per pair; raise it for a longer search
PAIR_PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def big_frame(rows: int = 10_000, seed: int = 3) -> pd.DataFrame:
    """About 300 kB packed: out of band under the tests' thresholds."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "x": rng.random(rows),
        "n": rng.integers(0, 10**9, rows),
        "cat": pd.Categorical(rng.choice(["alpha", "beta", "gamma"], rows)),
        "when": pd.date_range("2024-01-01", periods=rows, freq="s", tz="Europe/Paris"),
        "s": [f"item-{i}" for i in range(rows)],
    })


def register(app):
    @app.task(name="echo")
    def echo(*values):
        return values[0] if len(values) == 1 else list(values)

    @app.task(name="collect")
    def collect(values):
        return values

    @app.task(name="shape")
    def shape(frame):
        return list(frame.shape)

    return echo, collect, shape


def store_of(app) -> payloads.PayloadStore:
    return app.serializer.plane.store


def ref_keys(text: str) -> set[str]:
    return payloads.keys_in(text)


def lazily(app, text: str):
    """A record field decoded without reading payloads: values out of band are PayloadRefs."""
    return app.serializer.decode(serialization.loads(text), lazy=True)


# -- S3 on moto's server ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """(endpoint, fsspec options) of moto's server, with a bucket ``nbq-payloads``."""
    import servers

    try:
        host, port = servers.MOTO.get()
    except RuntimeError as exc:
        if IN_CI:
            pytest.fail(f"{exc} (CI=true: a missing server is a failure, not a skip)")
        pytest.skip(str(exc))
    import boto3

    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket="nbq-payloads")
    return endpoint, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}, client


def s3_location(s3_server) -> tuple[str, dict]:
    """A fresh prefix in the test bucket: (URL, payload_options)."""
    endpoint, options, _ = s3_server
    return f"s3://nbq-payloads/t-{uuid.uuid4().hex[:10]}", dict(options)


# -- 1. every broker/backend pair: generated values out of band, back exactly -------------------------
PAIRS = [(b, r) for b in BROKER_KINDS for r in BACKEND_KINDS]


@pytest.fixture(params=PAIRS, ids=[f"{b}+{r}" for b, r in PAIRS])
def pair_app(request, tmp_path, qname):
    """An App on one broker/backend pair, everything binary out of band (threshold 0), a worker
    thread started; pairs with no store of their own keep payloads on S3 (SQS) or in a directory (AMQP)."""
    broker_kind, backend_kind = request.param
    broker = store_url(broker_kind, tmp_path)
    backend = store_url("amqp-results" if backend_kind == "amqp" else backend_kind, tmp_path)
    options = {"payload_threshold": 0, "default_queue": qname("default")}
    if broker_kind not in ("sqlite", "memory", "redis") and backend_kind not in ("sqlite", "memory", "redis"):
        if broker_kind == "sqs":
            options["payloads"], options["payload_options"] = s3_location(request.getfixturevalue("s3_server"))
        else:
            options["payloads"] = f"file://{tmp_path}/payloads"
    app = nbqueue.App(broker, backend, **options)
    register(app)
    app.start_worker(concurrency=2)
    yield app
    for worker in list(app.workers):
        worker.stop(wait=True, timeout=10)
    if broker_kind in ("amqp", "sqs"):
        app.broker.delete_queues(qname.made)
    if backend_kind == "amqp":
        app.backend.delete_queues()
    app.close()


arrays = hnp.arrays(st.one_of(scalar_dtypes, hnp.array_dtypes(scalar_dtypes, max_size=3)),
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


@PAIR_PROPERTY
@given(frame=frames(), values=series(), array=arrays)
def test_generated_frames_series_and_arrays_come_back_exactly_out_of_band_through_every_broker_and_backend(
    pair_app, frame, values, array
):
    r = pair_app.send_task(nbqueue.Signature("echo", args=[frame, values, array]))
    sent = pair_app.backend.get(r.id)["args"]
    assert all(type(v) is PayloadRef for v in lazily(pair_app, sent))   # every binary value went out of band
    back_frame, back_series, back_array = r.get(timeout=60)
    assert_same_frame(back_frame, frame)
    assert_same_series(back_series, values)
    assert type(back_array) is np.ndarray and back_array.dtype == array.dtype and back_array.shape == array.shape
    assert back_array.tobytes() == array.tobytes()
    result = pair_app.backend.get(r.id)["result"]
    assert all(type(v) is PayloadRef for v in lazily(pair_app, result))  # the result's too
    for key in ref_keys(sent) | ref_keys(result):
        assert r.id in store_of(pair_app).links(key)                 # linked to the task's record


# -- 2. stored once --------------------------------------------------------------------------------------
def test_a_frame_sent_to_a_group_of_100_tasks_is_packed_and_stored_once(app_factory, monkeypatch):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    frame = big_frame()
    packed = []
    real_pack = blobs.pack
    monkeypatch.setattr(blobs, "pack", lambda obj, compression=None: packed.append(1) or real_pack(obj, compression))
    g = app.send(group(shape.s(frame) for _ in range(100)))
    store = store_of(app)
    assert store.stats()["payloads"] == 1 and store.writes == 1
    assert len(packed) == 2                                 # the frame once, and its preview (first rows) once
    [key] = store.keys()
    assert set(store.links(key)) == {r.id for r in g.results}
    many = app.send_many([shape.s(frame) for _ in range(10)])           # send_many too
    assert store.stats()["payloads"] == 1 and store.writes == 1
    app.start_worker(concurrency=4)
    assert g.get(timeout=60) == [list(frame.shape)] * 100
    assert [r.get(timeout=30) for r in many] == [list(frame.shape)] * 10
    again = echo.delay(frame)  # a later send of the same bytes: linked, not written
    pd.testing.assert_frame_equal(again.get(timeout=30), frame, check_exact=True)
    assert store.stats()["payloads"] == 1 and store.writes == 1         # the result is the same bytes again


# -- 3. lifetime: forget, expiry, purge, and crashes ------------------------------------------------------
def test_forget_removes_the_payloads_only_that_task_referenced(app_factory):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    shared, own = big_frame(seed=1), big_frame(seed=2)
    r1, r2 = echo.delay(shared, own), echo.delay(shared)
    app.start_worker()
    r1.get(timeout=30), r2.get(timeout=30)
    store = store_of(app)
    shared_key, own_key = (payloads.key_of(blobs.pack(f).data) for f in (shared, own))
    assert set(store.keys()) == {shared_key, own_key}
    r1.forget()
    assert store.keys() == [shared_key] and set(store.links(shared_key)) == {r2.id}
    r2.forget()
    assert store.keys() == [] and store.stats() == {"payloads": 0, "bytes": 0}


def test_expired_results_take_their_payloads_with_them_through_the_workers_sweep(app_factory, monkeypatch):
    monkeypatch.setattr(payloads, "SWEEP_EVERY", 0.05)
    app = app_factory(payload_threshold=1024, results_expire_in=1)
    echo, collect, shape = register(app)
    store = store_of(app)
    store.grace, store.check_every = 0.5, 0.0
    r = echo.delay(big_frame())
    app.start_worker()
    pd.testing.assert_frame_equal(r.get(timeout=30), big_frame(), check_exact=True)
    assert store.stats()["payloads"] == 1
    wait_for(lambda: app.backend.expire() >= 0 and app.backend.get(r.id) is None, 30, message="the result expired")
    wait_for(lambda: store.stats()["payloads"] == 0, 30, message="the worker's heartbeat swept the payload")


def test_purge_releases_the_payloads_of_the_tasks_it_removed(app_factory, qname):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    purged = [echo.delay(big_frame(seed=i)) for i in range(2)]
    elsewhere = app.send_task(echo.s(big_frame(seed=7)).set(queue=qname("other")))
    store = store_of(app)
    assert store.stats()["payloads"] == 3
    assert app.purge() == 2
    assert store.keys() == sorted(ref_keys(app.backend.get(elsewhere.id)["args"]))
    assert all(app.backend.get(r.id)["state"] == states.REVOKED for r in purged)     # purged tasks end revoked
    assert app.backend.get(elsewhere.id)["state"] == states.PENDING


@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis"], indirect=True)
def test_a_crash_between_the_payload_and_the_record_leaves_nothing_for_ever(app_factory, monkeypatch):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    store = store_of(app)

    def crash(records):
        raise ConnectionError("the store went away")

    with monkeypatch.context() as m:
        m.setattr(app.backend, "create", crash)
        m.setattr(app.engine, "send", lambda records, outs: crash(records))
        with pytest.raises(ConnectionError):
            echo.delay(big_frame(seed=11))
    orphan = app.serializer.encode(big_frame(seed=12), "a captured value")     # put outside any send: a loose pin
    kept = echo.delay(big_frame(seed=13))
    assert store.stats()["payloads"] == 3
    alive = lambda ids: app.backend.states_of(ids)                             # noqa: E731
    assert store.sweep(alive) == 0                                             # within the grace period nothing goes
    later = store._now() + store.grace + 1
    assert store.sweep(alive, now=later) == 2
    assert store.keys() == sorted(ref_keys(app.backend.get(kept.id)["args"]))
    assert payloads.keys_in(serialization.dumps(orphan)).isdisjoint(store.keys())


def test_files_a_dead_writer_left_beside_the_sqlite_file_are_swept(tmp_path):
    store = payload_store(f"sqlite:///{tmp_path}/p.db")
    data = os.urandom(5000)
    key = payloads.key_of(data)
    os.makedirs(os.path.dirname(store._file(key)))
    for name in (store._file(key), store._file(key) + ".tmp-dead"):     # renamed but not recorded; never renamed
        with open(name, "wb") as fh:
            fh.write(data)
    assert not store.exists(key)
    store.sweep(lambda ids: [], now=store._now() + store.grace + 1)
    assert os.listdir(os.path.dirname(store._file(key))) == []
    assert store.put(data, "task-1") == key and bytes(store.get(key)) == data and store.exists(key)


# -- 4. missing and corrupted payloads --------------------------------------------------------------------
def overwrite(store, key: str, data: bytes) -> None:
    """Replace a payload's stored bytes behind nbqueue's back (a disk fault, a hand edit)."""
    if isinstance(store, SQLitePayloads):
        with open(store._file(key), "wb") as fh:
            fh.write(data)
    elif isinstance(store, RedisPayloads):
        store.client.set(store._k(key), data)
    else:
        store.fs.pipe_file(store._data(key), data)


def remove_by_hand(store, key: str) -> None:
    if isinstance(store, SQLitePayloads):
        os.remove(store._file(key))
    elif isinstance(store, RedisPayloads):
        store.client.delete(store._k(key))
    else:
        store.fs.rm_file(store._data(key))


def test_a_missing_payload_fails_that_task_naming_the_payload_and_nothing_else(app_factory):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    lost = shape.delay(big_frame(seed=21))
    fine = shape.delay(big_frame(seed=22))
    store = store_of(app)
    [key] = ref_keys(app.backend.get(lost.id)["args"])
    remove_by_hand(store, key)
    app.start_worker()
    with pytest.raises(nbqueue.TaskFailed) as caught:
        lost.get(timeout=30)
    assert caught.value.exc_type == "PayloadMissing"
    assert (
        f"payload {key} (DataFrame 10,000×5," in caught.value.message
        and "is not in the payload store" in caught.value.message
    )
    assert fine.get(timeout=30) == [10_000, 5]                         # the worker carries on
    with pytest.raises(PayloadMissing, match=key):                       # and get() of a result says the same
        store.get(key, "DataFrame 10,000×5")


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_a_corrupted_payload_is_detected_and_never_decoded(app_factory, monkeypatch, damage):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    bad = shape.delay(big_frame(seed=31))
    store = store_of(app)
    [key] = ref_keys(app.backend.get(bad.id)["args"])
    data = bytes(store.get(key))
    overwrite(store, key, data[:-1] + bytes([data[-1] ^ 1]) if damage == "corrupted" else data[: len(data) // 2])
    decoded = []
    real_unpack = blobs.unpack
    monkeypatch.setattr(
        blobs, "unpack", lambda codec, raw, info=None: decoded.append(codec) or real_unpack(codec, raw, info)
    )
    app.start_worker()
    with pytest.raises(nbqueue.TaskFailed) as caught:
        bad.get(timeout=30)
    assert caught.value.exc_type == "PayloadCorrupt" and f"payload {key}" in caught.value.message
    assert "it was not decoded" in caught.value.message
    assert "arrow" not in decoded                                        # the damaged bytes never reached the codec
    with pytest.raises(PayloadCorrupt):
        store.get(key)


# -- 5. too large for the store --------------------------------------------------------------------------
@pytest.mark.parametrize("app_kind", ["redis", "memory"], indirect=True)
def test_an_array_over_redis_512_mb_value_limit_is_refused_at_send_saying_how_to_configure_a_payload_store(app_factory):
    app = app_factory()
    echo, collect, shape = register(app)
    huge = np.zeros(513 * 2**20, dtype=np.uint8)        # never written to: no memory is used for it
    with pytest.raises(PayloadTooLarge) as caught:
        echo.delay(huge)
    message = str(caught.value)
    assert message.startswith(
        "argument 1 of task 'echo' is ndarray uint8 537,919,488 of 538 MB, more than the 512 MB a Redis "
        "value can hold (the payload store is "
    )
    assert "payloads='s3://bucket/prefix'" in message and "payloads='file:///shared/dir'" in message
    assert isinstance(caught.value, nbqueue.SerializationError)
    assert app.tasks().empty and store_of(app).stats()["payloads"] == 0       # nothing enqueued, nothing stored


def test_a_frame_over_the_stores_limit_is_refused_at_send_before_anything_is_written(app_factory):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    store = store_of(app)
    store.max_size = 100_000  # a store that holds less than the frame
    with pytest.raises(
        PayloadTooLarge,
        match=r"keyword argument 'frame' of task 'shape' is DataFrame 10,000×5 of \d+ kB packed, "
        r"more than the 100 kB the payload store .* can hold",
    ):
        shape.apply_async(kwargs={"frame": big_frame()})
    assert app.tasks().empty and store.stats()["payloads"] == 0


def test_an_app_without_a_payload_store_refuses_large_values_at_send_and_says_how_to_add_one(tmp_path, qname):
    url = session_server_url("memcache")
    app = nbqueue.App(
        f"sqlite:///{tmp_path}/b.db", url, payloads=None, payload_threshold=1024, default_queue=qname("q")
    )
    assert app.serializer.plane.store is not None            # the SQLite broker's file holds them
    sqs = nbqueue.App(session_server_url("sqs"), url, payload_threshold=1024, default_queue=qname("q"))
    try:
        assert sqs.serializer.plane.store is None
        with pytest.raises(
            PayloadTooLarge,
            match=r"argument 1 of task 'echo' is DataFrame 10,000×5 of .* over payload_threshold "
            r"\(1.0 kB\), and this App has no payload store \(its results \(memcache://\) and "
            r"broker \(sqs://\) cannot hold large values\); .*payloads='s3://bucket/prefix'",
        ):
            sqs.send_task(nbqueue.Signature("echo", args=[big_frame()]))
        sqs.send_task(nbqueue.Signature("echo", args=[np.arange(10)]))    # small values still go inline
    finally:
        sqs.broker.delete_queues(qname.made)
        sqs.close()
        app.close()


# -- 6. reading: app.tasks() and the views never load; get() loads once ----------------------------------
def test_app_tasks_shows_summaries_and_the_views_preview_frames_without_reading_payloads(app_factory):
    from nbqueue.notebook import display, widgets

    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    frame = big_frame()
    results = [echo.delay(frame.assign(x=frame["x"] + i)) for i in range(3)]
    app.start_worker()
    for r in results:
        r.wait(timeout=30)
    store = store_of(app)
    store.reads = 0
    tasks = app.tasks()
    assert store.reads == 0
    for column in ("result",):
        refs = tasks[column].tolist()
        assert all(isinstance(v, PayloadRef) for v in refs)
        assert [repr(v) for v in refs] == [f"DataFrame 10,000×5, {payloads.human_size(v.size)}" for v in refs]
    assert all(isinstance(v[0], PayloadRef) and repr(v[0]).startswith("DataFrame 10,000×5, ") for v in tasks["args"])
    newest = tasks.set_index("id").loc[results[2].id, "result"]
    pd.testing.assert_frame_equal(newest.head(), frame.assign(x=frame["x"] + 2).head(), check_exact=True)
    html_static = display.html(results[0])                              # the static HTML (nbconvert, GitHub)
    live = widgets._value_html(results[0].snapshot())                  # the live view's value
    for page in (html_static, live):
        assert "DataFrame 10,000×5" in page and "<table" in page and "item-4" in page and "item-5" not in page
    assert store.reads == 0
    value = results[0].get(timeout=5)                                   # get(): read once, then kept
    assert results[0].get(timeout=5) is value and results[0].result is value and store.reads == 1
    pd.testing.assert_frame_equal(value, frame, check_exact=True)


def test_an_inline_frame_result_previews_as_its_first_rows_and_shape(app):
    from nbqueue.notebook import display

    echo, collect, shape = register(app)
    r = echo.delay(pd.DataFrame({"a": range(8), "b": list("abcdefgh")}))
    app.start_worker()
    r.get(timeout=30)
    page = display.html(r)
    assert "DataFrame 8×2" in page and "<table" in page and "<td>e</td>" in page and "<td>f</td>" not in page


# -- 7. workflows, compression, pickles, configuration -----------------------------------------------------
def test_frames_out_of_band_travel_through_chains_and_chords(app_factory):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    frame = big_frame()
    ch = app.send(chain(echo.s(frame), echo.s()))
    cd = app.send(chord([echo.s(frame), echo.s(big_frame(seed=5))], collect.s()))
    app.start_worker(concurrency=2)
    pd.testing.assert_frame_equal(ch.get(timeout=60), frame, check_exact=True)
    first, second = cd.get(timeout=60)
    pd.testing.assert_frame_equal(first, frame, check_exact=True)
    pd.testing.assert_frame_equal(second, big_frame(seed=5), check_exact=True)
    group_id = cd.header.id
    store = store_of(app)
    assert all(group_id in store.links(k) for k in ref_keys(app.backend.get(group_id)["result"]))


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compression_shrinks_payloads_and_values_come_back_exactly(app_factory, codec):
    plain, packed = app_factory(payload_threshold=1024), app_factory(payload_threshold=1024, payload_compression=codec)
    frame = pd.DataFrame({"k": np.repeat(np.arange(100), 1000), "label": ["same text"] * 100_000})
    array = np.tile(np.arange(1000, dtype="int64"), 100)
    for app in (plain, packed):
        register(app)
    sent = {app: app.send_task(nbqueue.Signature("echo", args=[frame, array])) for app in (plain, packed)}
    packed.start_worker()
    for app, r in sent.items():
        back_frame, back_array = r.get(timeout=30)
        pd.testing.assert_frame_equal(back_frame, frame, check_exact=True)
        assert back_array.dtype == array.dtype and np.array_equal(back_array, array)
    sizes = {
        app: [ref.size for ref in app.serializer.decode(serialization.loads(app.backend.get(r.id)["args"]), lazy=True)]
        for app, r in sent.items()
    }
    assert all(small < large / 2 for small, large in zip(sizes[packed], sizes[plain]))
    refs = packed.serializer.decode(serialization.loads(packed.backend.get(sent[packed].id)["args"]), lazy=True)
    assert all(f"({codec})" in repr(v) for v in refs)


def test_a_pickled_value_out_of_band_is_read_only_by_an_app_that_opted_in(app_factory):
    app = app_factory(serializer="pickle", payload_threshold=1024)
    echo, collect, shape = register(app)
    value = {
        "frame": big_frame(),
        "kind": complex(1, 2),
        "obj": {1, 2, 3},
        "mixed": pd.Series([1, "a"] * 1000, dtype=object),
    }
    r = echo.delay(value)
    app.start_worker()
    back = r.get(timeout=30)
    pd.testing.assert_frame_equal(back["frame"], value["frame"], check_exact=True)
    assert back["kind"] == value["kind"] and back["mixed"].tolist() == value["mixed"].tolist()
    plain = app_factory()
    with pytest.raises(nbqueue.SerializationError, match="serializer='pickle'"):
        plain.serializer.decode(serialization.loads(app.backend.get(r.id)["result"]))
    assert repr(plain.tasks()["result"][0]).startswith("pickled builtins.dict, ")      # shown, not unpickled


def test_payload_options_are_checked_and_the_default_store_sits_beside_the_records(tmp_path):
    for bad in (
        {"payload_threshold": -1},
        {"payload_threshold": "1MB"},
        {"payload_compression": "gzip"},
        {"payloads": 3},
        {"payload_options": "x"},
    ):
        with pytest.raises(ConfigurationError):
            nbqueue.App(f"sqlite:///{tmp_path}/a.db", **bad)
    sqlite = nbqueue.App(f"sqlite:///{tmp_path}/a.db")
    assert (
        isinstance(sqlite.serializer.plane.store, SQLitePayloads)
        and sqlite.serializer.plane.store.path == f"{tmp_path}/a.db"
    )
    assert sqlite.serializer.plane.threshold == 1 << 20
    memory = nbqueue.App("memory://payload-default")
    assert isinstance(memory.serializer.plane.store, RedisPayloads)
    split = nbqueue.App("memory://x", f"sqlite:///{tmp_path}/results.db")
    assert isinstance(split.serializer.plane.store, SQLitePayloads)       # results' store first
    inline = nbqueue.App(f"sqlite:///{tmp_path}/a.db", payload_threshold=None)
    assert '"blob"' in serialization.dumps(inline.serializer.encode(big_frame()))
    env = nbqueue.App.from_env({"NBQUEUE_BROKER": f"sqlite:///{tmp_path}/a.db", "NBQUEUE_PAYLOADS": f"file://{tmp_path}/p",
                                "NBQUEUE_PAYLOAD_THRESHOLD": "2048", "NBQUEUE_PAYLOAD_COMPRESSION": "zstd"})
    assert isinstance(env.serializer.plane.store, payloads.FsspecPayloads)
    assert (env.serializer.plane.threshold, env.serializer.plane.compression) == (2048, "zstd")
    with pytest.raises(ConfigurationError, match="cannot hold payloads"):
        payload_store("memcache://127.0.0.1:11211")


# -- 8. fsspec stores: a directory and S3 (moto's server) ----------------------------------------------------
@pytest.fixture(params=["file", "s3"])
def fsspec_store(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/payloads", None
    return s3_location(request.getfixturevalue("s3_server"))


def test_an_fsspec_payload_store_round_trips_dedupes_and_releases(fsspec_store, tmp_path, qname):
    url, options = fsspec_store
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", payloads=url, payload_options=options, payload_threshold=1024,
                      default_queue=qname("q"))
    echo, collect, shape = register(app)
    frame = big_frame()
    g = app.send(group(echo.s(frame) for _ in range(5)))
    store = store_of(app)
    assert isinstance(store, payloads.FsspecPayloads) and store.writes == 1 and len(store.keys()) == 1
    app.start_worker(concurrency=2)
    for back in g.get(timeout=60):
        pd.testing.assert_frame_equal(back, frame, check_exact=True)
    [key] = store.keys()
    for r in g.results:
        r.forget()
    assert store.keys() == [key] and set(store.links(key)) == {g.id}          # the group's record still holds it
    app.backend.forget([g.id])
    payloads.release(app, [g.id])
    assert store.keys() == [] and store.stats()["payloads"] == 0
    stray = store.put(b"x" * 2000, "pin:stray")             # a link no record will ever have
    assert store.sweep(lambda ids: [], now=store._now() + store.grace + 60) == 1 and not store.exists(stray)
    app.close()


def test_an_fsspec_store_sweeps_what_a_crash_left_behind(fsspec_store, tmp_path, qname):
    url, options = fsspec_store
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", payloads=url, payload_options=options, payload_threshold=1024,
                      default_queue=qname("q"))
    echo, collect, shape = register(app)
    store = store_of(app)
    with pytest.MonkeyPatch.context() as m:     # the record is never written
        m.setattr(app.engine, "send", lambda records, outs: (_ for _ in ()).throw(ConnectionError("gone")))
        with pytest.raises(ConnectionError):
            echo.delay(big_frame(seed=41))
    unlinked = b"y" * 3000                      # bytes written, the process died before linking them
    store._put_data(payloads.key_of(unlinked), unlinked)
    store.fs.pipe_file(store._data(payloads.key_of(unlinked)) + ".tmp-dead", unlinked)
    kept = echo.delay(big_frame(seed=42))
    assert len(store.keys()) == 3
    alive = lambda ids: app.backend.states_of(ids)         # noqa: E731
    assert store.sweep(alive) == 0
    assert store.sweep(alive, now=store._now() + store.grace + 60) == 2
    assert store.keys() == sorted(ref_keys(app.backend.get(kept.id)["args"]))
    assert not [p for p in store.fs.ls(f"{store.root}/data") if ".tmp-" in p]
    app.close()


def test_the_s3_payload_store_writes_real_objects_that_boto3_sees(s3_server, tmp_path, qname):
    url, options = s3_location(s3_server)
    client = s3_server[2]
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", payloads=url, payload_options=options, payload_threshold=1024,
                      default_queue=qname("q"))
    echo, collect, shape = register(app)
    r = shape.delay(big_frame())
    prefix = url.split("/", 3)[3]
    [key] = ref_keys(app.backend.get(r.id)["args"])
    listed = client.list_objects_v2(Bucket="nbq-payloads", Prefix=f"{prefix}/data/")["Contents"]
    assert [o["Key"] for o in listed] == [f"{prefix}/data/{key}"] and listed[0]["Size"] == store_of(app).stats()[
        "bytes"
    ]
    body = client.get_object(Bucket="nbq-payloads", Key=f"{prefix}/data/{key}")["Body"].read()
    assert payloads.key_of(body) == key
    app.start_worker()
    assert r.get(timeout=30) == [10_000, 5]
    r.forget()
    assert client.list_objects_v2(Bucket="nbq-payloads", Prefix=f"{prefix}/data/").get("KeyCount") == 0
    app.close()


# -- 9. a worker in another process ------------------------------------------------------------------------
TASKS_MODULE = '''
import nbqueue
app = nbqueue.App.from_env()

@app.task(name="echo")
def echo(value):
    return value
'''


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp"], indirect=True)  # memory:// lives inside one process
def test_a_worker_process_reads_and_writes_payloads_in_the_shared_store(app_factory, tmp_path):
    app = app_factory(payload_threshold=1024)
    (tmp_path / "payload_tasks.py").write_text(TASKS_MODULE)
    frame = big_frame(rows=50_000)
    r = app.send_task(nbqueue.Signature("echo", args=[frame]))
    with cli_worker(app, tmp_path, "payload_tasks", NBQUEUE_PAYLOAD_THRESHOLD="1024") as (proc, log):
        wait_for(lambda: r.ready() or proc.poll() is not None, 60, message="the worker process ran the task")
        assert proc.poll() is None, log.read_text(errors="replace")
        pd.testing.assert_frame_equal(r.get(timeout=30), frame, check_exact=True)
        assert ref_keys(app.backend.get(r.id)["result"]) == ref_keys(app.backend.get(r.id)["args"])   # stored once
        assert store_of(app).stats()["payloads"] == 1


# -- 10. a %%task cell's captured inputs -------------------------------------------------------------------
import test_magics  # noqa: E402
from test_magics import gate, run  # noqa: E402

ipython, shell = test_magics.ipython, test_magics.shell     # the IPython shell fixtures, under their own names


def test_a_cells_captured_frame_stays_stored_while_the_cell_waits_for_its_dependency(shell):
    from nbqueue.notebook import widgets

    g = gate(shell)
    frame = big_frame(rows=50_000)                      # over the default 1 MiB threshold
    shell.user_ns["frame"] = frame
    run(shell, "%%task load\ngate.wait(30)\n1")
    res = run(shell, "%%task size --after load\nframe.shape")
    widgets.UPDATER.flush()
    app = shell.user_ns["app"]
    store = store_of(app)
    [key] = store.keys()
    assert set(store.links(key)) == {res.id}              # the captured input belongs to the cell's task
    store.sweep(lambda ids: app.backend.states_of(ids), now=store._now() + store.grace + 60)
    assert store.exists(key)                              # its waiting record keeps it, however long the wait
    g.set()
    assert res.get(timeout=30) == (50_000, 5)


# -- 11. keys from messages are only ever payload keys ----------------------------------------------------
@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_a_reference_whose_key_is_not_a_payload_key_reads_nothing(tmp_path, kind):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    url = f"sqlite:///{tmp_path}/p.db" if kind == "sqlite" else f"file://{tmp_path}/payloads"
    store = payload_store(url)
    for key in ("sha256-../../secret.txt", f"sha256-{'0' * 64}/../../../secret.txt", "../secret.txt"):
        with pytest.raises(PayloadCorrupt, match="is not a payload key"):
            store.get(key)
        assert store.link([key], "task-1") == [key]
    assert store.reads == 0


def test_checking_a_periodic_schedule_leaves_no_payload_behind(app_factory):
    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    app.periodic("@every 1h", shape.s(big_frame()), name="big")
    assert store_of(app).stats()["payloads"] == 0


# -- 12. other processes: the process pool, a forked child ---------------------------------------------------
POOL_TASKS_MODULE = '''
import os
import nbqueue

app = nbqueue.App(os.environ["NBQ_PAYLOAD_POOL_BROKER"], os.environ["NBQ_PAYLOAD_POOL_BACKEND"], payload_threshold=1024,
                  default_queue=os.environ["NBQ_PAYLOAD_POOL_QUEUE"])

@app.task(name="echo")
def echo(value):
    return value

@app.task(name="in_child")
def in_child(frame, earlier_id):
    """Runs in a pool's child: reads an earlier result's payload and sends a frame out of band itself."""
    earlier = app.result(earlier_id).get(timeout=30)
    sent = echo.delay(frame.assign(x=frame["x"] + earlier["x"]))
    return {"pid": os.getpid(), "sent": sent.id, "frame": frame.assign(n=frame["n"] * 2)}
'''


@pytest.mark.parametrize("app_kind", ["sqlite", "redis"], indirect=True)     # memory:// lives inside one process
def test_process_pool_children_take_and_return_frames_out_of_band_and_use_the_payload_store_themselves(
        app_factory, tmp_path, monkeypatch):
    """A task in a child of ``pool="processes"``: its frame argument and result travel out of band
    (the worker reads and writes them); code in the child reads a result's payload and sends a frame
    out of band through its own App, on the same store."""
    monkeypatch.setenv("NBQ_PAYLOAD_POOL_BROKER", app_factory.broker_url)
    monkeypatch.setenv("NBQ_PAYLOAD_POOL_BACKEND", app_factory.backend_url)
    monkeypatch.setenv("NBQ_PAYLOAD_POOL_QUEUE", app_factory().default_queue)
    module = f"payload_pool_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(POOL_TASKS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    tasks = importlib.import_module(module)
    app = tasks.app
    try:
        frame = big_frame()
        earlier = tasks.echo.delay(big_frame(seed=5))
        r = tasks.in_child.delay(frame, earlier.id)
        store = store_of(app)
        worker = app.start_worker(pool="processes", concurrency=2)
        out = r.get(timeout=120)
        assert out["pid"] in worker.pool.pids() and out["pid"] != os.getpid()
        pd.testing.assert_frame_equal(out["frame"], frame.assign(n=frame["n"] * 2), check_exact=True)
        sent = app.result(out["sent"])
        expected = frame.assign(x=frame["x"] + big_frame(seed=5)["x"])
        pd.testing.assert_frame_equal(sent.get(timeout=60), expected, check_exact=True)
        for task_id in (r.id, out["sent"]):
            record = app.backend.get(task_id)
            keys = ref_keys(record["args"]) | ref_keys(record["result"])
            assert keys and all(task_id in store.links(k) for k in keys)     # written and linked by whichever process
        assert lazily(app, app.backend.get(out["sent"])["args"])[0].key in store.keys()
    finally:
        for worker in list(app.workers):
            worker.stop(wait=True, timeout=30)
        app.close()
        sys.modules.pop(module, None)


def _read_in_a_forked_child(app, task_id, out) -> None:
    try:
        value = app.result(task_id).get(timeout=30)
        out.put(("ok", list(value.shape)))
    except Exception as exc:
        out.put((type(exc).__name__, str(exc)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("app_kind", ["redis"], indirect=True)
def test_a_child_forked_while_a_thread_holds_the_payload_clients_pool_lock_reads_payloads(app_factory):
    """A thread of the parent is inside the Redis payload store's connection pool at the fork: the
    child's copy of that lock must not stay held (its first payload read would wait for ever)."""
    import multiprocessing
    import threading

    app = app_factory(payload_threshold=1024)
    echo, collect, shape = register(app)
    app.start_worker()
    r = echo.delay(big_frame())
    r.get(timeout=30)
    pool = store_of(app).client.connection_pool
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pool._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_read_in_a_forked_child, args=(app, r.id, out))
    try:
        child.start()
    finally:
        release.set()
        holder.join(10)
    try:
        got = out.get(timeout=60)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    assert got == ("ok", [10_000, 5])


# -- 13. the dashboard's task page -------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_dashboard_previews_values_out_of_band_from_their_references_without_reading_payloads(tmp_path, qname):
    from starlette.testclient import TestClient

    from nbqueue.dashboard import create_app

    app = nbqueue.App(f"sqlite:///{tmp_path}/dash.db", payload_threshold=1024, default_queue=qname("q"))
    echo, collect, shape = register(app)
    frame, array = big_frame(), np.arange(50_000, dtype="float32")
    r = echo.delay(frame, array)
    app.start_worker()
    r.get(timeout=30)
    store = store_of(app)
    store.reads = 0
    client = TestClient(create_app(app, interval=0.05), client=("127.0.0.1", 50000))
    detail = client.get(f"/api/tasks/{r.id}").json()
    shown_frame, shown_array = detail["arguments"]["args"]
    assert shown_frame["kind"] == "frame" and shown_frame["shape"] == [10_000, 5]
    assert shown_frame["summary"].startswith("DataFrame 10,000×5, ")
    assert "item-4" in shown_frame["html"] and "item-5" not in shown_frame["html"]  # the reference's first rows
    assert shown_array == {
        "kind": "text",
        "text": "ndarray float32 50,000, 200 kB",
        "summary": "ndarray float32 50,000, 200 kB",
    }
    assert detail["result"]["kind"] == "text" and "DataFrame 10,000×5, " in detail["result"]["text"]     # a list of two
    [row] = client.get("/api/tasks").json()["tasks"]
    assert row["call"].startswith("DataFrame 10,000×5, ") and "ndarray float32 50,000" in row["call"]
    assert client.get(f"/tasks/{r.id}").status_code == 200
    assert store.reads == 0                                                              # no payload was read
    single = echo.delay(frame)
    single.get(timeout=30)
    reads = store.reads                                                                  # the worker's and get()'s
    shown = client.get(f"/api/tasks/{single.id}").json()["result"]
    assert shown["kind"] == "frame" and shown["shape"] == [10_000, 5] and "item-0" in shown["html"]
    assert store.reads == reads
    for worker in list(app.workers):
        worker.stop(wait=True, timeout=10)
    app.close()


# -- the copies a payload's bytes go through ------------------------------------------------------------
def _buffer_addresses(value) -> list[tuple[int, int]]:
    """(address, size) of the memory a frame's columns and index use, seen through Arrow (zero-copy)."""
    import pyarrow as pa

    table = pa.Table.from_pandas(value if isinstance(value, pd.DataFrame) else value.to_frame())
    return [(b.address, b.size) for column in table.columns for chunk in column.chunks
            for b in chunk.buffers() if b is not None and b.size]


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
def test_a_decoded_frame_holds_none_of_the_payloads_bytes_and_can_be_changed(compression):
    frame = big_frame(rows=50_000).set_index("s")
    frame["t"] = [f"text-{i}" for i in range(len(frame))]
    data = bytearray(memoryview(blobs.pack(frame, compression).data))
    view = np.frombuffer(data, dtype=np.uint8)
    low, high = view.ctypes.data, view.ctypes.data + len(data)
    handed = blobs.Handoff(data)
    back = blobs.unpack("arrow", handed)
    assert handed.data is None                          # taken: unpack held the bytes alone
    assert_same_frame(back, frame)
    inside = [(a, n) for a, n in _buffer_addresses(back) if low <= a < high]
    assert not inside, f"the decoded frame points into the payload's bytes: {inside[:3]}"
    back.iloc[0, 0] = -1.0                              # writable arrays, not read-only views of Arrow memory
    back["n"] += 1
    assert back.iloc[0, 0] == -1.0 and (back["n"] == frame["n"] + 1).all()


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_incompressible_frames_come_back_exactly_compressed(codec):
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"b": rng.integers(0, 2**63, 200_000, dtype=np.int64),
                          "s": [os.urandom(12).hex() for _ in range(200_000)]})
    blob = blobs.pack(frame, codec)
    assert_same_frame(blobs.unpack("arrow", bytes(memoryview(blob.data))), frame)
    assert_same_frame(blobs.unpack("arrow", bytes(memoryview(blobs.pack(frame.iloc[:0], codec).data))), frame.iloc[:0])


@pytest.mark.parametrize("reply, expected", [
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"_\r\n", None),                                   # RESP3's nil
    (b"$3000000\r\n" + b"x" * 3_000_000 + b"\r\n", b"x" * 3_000_000),
])
def test_a_redis_payload_reply_is_read_into_a_buffer_of_its_size(reply, expected):
    import socket
    import threading

    from nbqueue.drivers.redis.payloads import _bulk_into

    ours, theirs = socket.socketpair()
    with ours, theirs:
        parts = [reply[i:i + 7001] for i in range(0, len(reply), 7001)]     # the reply in pieces, as a socket gives it
        sender = threading.Thread(target=lambda: [theirs.sendall(part) for part in parts])
        sender.start()
        got = _bulk_into(ours)
        sender.join()
        assert (None if got is None else bytes(got)) == expected
        theirs.sendall(b"+PONG\r\n")                    # nothing of the reply is left unread
        assert ours.recv(16) == b"+PONG\r\n"


@pytest.mark.parametrize("reply", [b"-ERR wrong type\r\n", b"*1\r\n", b"$5\r\nhello!!"])
def test_a_redis_payload_reply_that_is_no_bulk_string_raises(reply):
    import socket

    import redis

    from nbqueue.drivers.redis.payloads import _bulk_into

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(reply)
        with pytest.raises(redis.RedisError):
            _bulk_into(ours)
