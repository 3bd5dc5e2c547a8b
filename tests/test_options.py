"""Every option a user gives (App keyword arguments, environment variables, YAML, store URLs'
queries, worker arguments, the ``nbqueue`` command's flags) is checked when the App, store or
worker is made: a value out of range is a ConfigurationError (argparse's error on the command
line) naming the option and the value, never a bare ValueError from deep inside, never taken
silently. None of these tests needs a server: stores read their options before they connect.
"""
from __future__ import annotations

import math
import re
import uuid

import pytest

import nbqueue
from nbqueue import cli
from nbqueue.drivers import backend_from_url, broker_from_url, drivers, payload_store
from nbqueue.errors import ConfigurationError

from conftest import AMQP_URL, REDIS_URL


def refused(option: str, value: object):
    """pytest.raises for the ConfigurationError that names ``option`` and ``value``."""
    return pytest.raises(ConfigurationError, match=rf"{re.escape(option)} must be .*{re.escape(repr(value))}")


def memory_url() -> str:
    return f"memory://options-{uuid.uuid4().hex[:8]}"


# -- App options -------------------------------------------------------------------------------------

NOT_SECONDS = ["soon", -1, math.nan, math.inf, True, [30], "nan"]


@pytest.mark.parametrize("option, value", [
    *[("visibility_timeout", v) for v in [*NOT_SECONDS, 0, "0"]],
    *[("results_expire_in", v) for v in NOT_SECONDS],
    *[("poll_interval", v) for v in [*NOT_SECONDS, 0]],
    *[("prefetch", v) for v in [0, -1, "four", 2.5, True, [4]]],
    *[("max_deliveries", v) for v in [0, "many", True]],
    ("key_prefix", 5), ("secret", b"bytes"),
    ("inline", "false"), ("inline", 1),
    ("timezone", "Mars/Olympus"), ("timezone", 5),
])
def test_an_app_option_out_of_range_is_refused_naming_it(option, value):
    with refused(option, value):
        nbqueue.App(memory_url(), **{option: value})


def test_valid_app_options_still_work():
    app = nbqueue.App(memory_url(), visibility_timeout="7.5", results_expire_in=60, poll_interval=0.05,
                      prefetch=8, max_deliveries="3", timezone="Europe/Paris", inline=False, key_prefix="opts",
                      secret="s3cret")
    try:
        assert (app.visibility_timeout, app.backend.results_expire_in, app.broker.max_deliveries) == (7.5, 60.0, 3)
        assert app.worker().prefetch == 8
    finally:
        app.close()


def test_results_expire_in_of_zero_or_none_keeps_results():
    for value in (0, None, "0"):
        app = nbqueue.App(memory_url(), results_expire_in=value)
        try:
            assert app.backend.results_expire_in is None
        finally:
            app.close()


@pytest.mark.parametrize("variable, value", [
    ("NBQUEUE_VISIBILITY_TIMEOUT", "soon"), ("NBQUEUE_VISIBILITY_TIMEOUT", "-1"),
    ("NBQUEUE_VISIBILITY_TIMEOUT", "nan"), ("NBQUEUE_VISIBILITY_TIMEOUT", "0"),
    ("NBQUEUE_RESULTS_EXPIRE_IN", "soon"), ("NBQUEUE_RESULTS_EXPIRE_IN", "-5"),
    ("NBQUEUE_RESULTS_EXPIRE_IN", "inf"),
    ("NBQUEUE_MAX_DELIVERIES", "0"), ("NBQUEUE_MAX_DELIVERIES", "many"),
])
def test_an_environment_variable_out_of_range_is_refused_naming_it(tmp_path, variable, value):
    with refused(variable, value):
        nbqueue.App.from_env({"NBQUEUE_BROKER": f"sqlite:///{tmp_path}/env.db", variable: value})


def test_valid_environment_variables_still_work(tmp_path):
    app = nbqueue.App.from_env({"NBQUEUE_BROKER": f"sqlite:///{tmp_path}/env.db", "NBQUEUE_VISIBILITY_TIMEOUT": "2.5",
                                "NBQUEUE_RESULTS_EXPIRE_IN": " 60 ", "NBQUEUE_MAX_DELIVERIES": "2"})
    try:
        assert (app.visibility_timeout, app.backend.results_expire_in, app.broker.max_deliveries) == (2.5, 60.0, 2)
    finally:
        app.close()


@pytest.mark.parametrize("value", ["soon", "-1", ".nan", "[60]"])
def test_a_yaml_results_expire_in_out_of_range_is_refused_naming_it(tmp_path, value):
    config = tmp_path / "config.yml"
    config.write_text(f"broker: sqlite:///{tmp_path}/y.db\nresults_expire_in: {value}\n")
    with pytest.raises(ConfigurationError, match=rf"results_expire_in in {re.escape(str(config))} must be"):
        nbqueue.App.from_yaml(str(config))


# -- result backends (the base's options) and the SQLite broker --------------------------------------

@pytest.mark.parametrize("option, value", [
    *[("results_expire_in", v) for v in NOT_SECONDS],
    *[("poll_interval", v) for v in [*NOT_SECONDS, 0]],
])
@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_backend_option_out_of_range_is_refused_naming_it(tmp_path, kind, option, value):
    url = f"sqlite:///{tmp_path}/b.db" if kind == "sqlite" else memory_url()
    with refused(option, value):
        backend_from_url(url, options={option: value})


@pytest.mark.parametrize("value", ["soon", 0, -1, math.nan, math.inf, True])
def test_the_sqlite_brokers_poll_interval_out_of_range_is_refused(tmp_path, value):
    with refused("poll_interval", value):
        broker_from_url(f"sqlite:///{tmp_path}/b.db", options={"poll_interval": value})


def test_valid_backend_and_sqlite_broker_options_still_work(tmp_path):
    backend = backend_from_url(f"sqlite:///{tmp_path}/b.db",
                               options={"results_expire_in": "90", "poll_interval": "0.5"})
    broker = broker_from_url(f"sqlite:///{tmp_path}/b.db", options={"poll_interval": 0.25})
    try:
        assert (backend.results_expire_in, backend.options["poll_interval"], broker.poll_interval) == (90.0, 0.5, 0.25)
    finally:
        backend.close()
        broker.close()


# -- RabbitMQ ----------------------------------------------------------------------------------------

AMQP_BAD = [
    *[("reconnect_timeout", v) for v in ["soon", -1, math.nan, True, [60]]],
    *[("confirm_timeout", v) for v in ["soon", 0, -1, math.nan, math.inf, True]],
    *[("publish_batch", v) for v in ["many", 0, -3, 2.5, True, [500]]],
    *[("eta_tolerance", v) for v in ["soon", -1, math.nan, math.inf, False]],
]


@pytest.mark.parametrize("option, value", AMQP_BAD)
def test_an_amqp_broker_option_out_of_range_is_refused_naming_it(option, value):
    with refused(option, value):
        broker_from_url(AMQP_URL, options={option: value})


@pytest.mark.parametrize("option, value", [(o, v) for o, v in AMQP_BAD if isinstance(v, (str, int, float))
                                           and not isinstance(v, bool)])
def test_an_amqp_broker_option_out_of_range_in_the_url_is_refused_naming_it(option, value):
    with refused(option, str(value)):
        broker_from_url(f"{AMQP_URL}?{option}={value}")


def test_valid_amqp_broker_options_still_work():
    broker = broker_from_url(f"{AMQP_URL}?reconnect_timeout=inf&confirm_timeout=2.5&publish_batch=7&eta_tolerance=0")
    assert (broker.reconnect_timeout, broker.confirm_timeout, broker.publish_batch, broker.eta_tolerance) == (
        math.inf, 2.5, 7, 0.0)
    assert broker_from_url(f"{AMQP_URL}?reconnect_timeout=", options={"publish_batch": "3"}).publish_batch == 3
    given = broker_from_url(f"{AMQP_URL}?confirm_timeout=9", options={"confirm_timeout": 4, "reconnect_timeout": 0})
    assert (given.confirm_timeout, given.reconnect_timeout, given.publish_batch) == (4.0, 0.0, 500)


@pytest.mark.parametrize("query", ["results_expire_in=soon", "results_expire_in=-1", "poll_interval=0",
                                   "poll_interval=nan", "lock_timeout=-2"])
def test_an_amqp_backend_option_out_of_range_in_the_url_is_refused_naming_it(query):
    option, _, value = query.partition("=")
    with refused(option, value):
        backend_from_url(f"{AMQP_URL}?{query}")


# -- Memcache ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    *[("index_size", v) for v in [-1, "many", 2.5, True]],
    *[("max_item_size", v) for v in [0, 100, "big", True, 1024.5]],
    *[("socket_timeout", v) for v in [0, -1, "soon", math.nan, math.inf, True]],
    *[("socket_connect_timeout", v) for v in [0, "soon", math.nan]],
    *[("poll_interval", v) for v in [0, "soon"]],
    ("key_prefix", 5),
])
def test_a_memcache_option_out_of_range_is_refused_naming_it(option, value):
    with refused(option, value):
        backend_from_url("memcache://127.0.0.1:11211", options={option: value})
    if option != "key_prefix" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with refused(option, str(value)):
            backend_from_url(f"memcache://127.0.0.1:11211?{option}={value}")


def test_valid_memcache_options_still_work():
    backend = backend_from_url("memcache://127.0.0.1:11211?max_item_size=8192&socket_timeout=1.5",
                               options={"index_size": 0})
    try:
        assert (backend.index_size, backend.max_item_size, backend.options["poll_interval"]) == (0, 8192, 0.1)
    finally:
        backend.close()


def test_drivers_declare_only_the_options_their_stores_read():
    # the Memcache backend takes no lock (its writes are compare-and-swap); the AMQP backend keeps no
    # index of recent tasks and no item size
    assert "lock_timeout" not in drivers()["memcache"].options
    assert {"index_size", "max_item_size"}.isdisjoint(drivers()["amqp"].options)
    assert {"index_size", "max_item_size", "socket_timeout", "socket_connect_timeout"} <= drivers()["memcache"].options


# -- Redis and memory:// -----------------------------------------------------------------------------

REDIS_BROKER_BAD = [
    *[("max_block", v) for v in [0, -1, "soon", math.nan, math.inf, True]],
    *[("batch", v) for v in [0, -1, "many", 2.5, True]],
]
REDIS_BAD = [
    *[("retries", v) for v in [-1, "often", 1.5, True]],
    *[("retry_base", v) for v in [-1, "soon", math.nan, math.inf]],
    *[("retry_cap", v) for v in [-1, "soon", math.inf]],
    *[("socket_timeout", v) for v in [0, -1, "soon", math.nan]],
    *[("socket_connect_timeout", v) for v in [0, "soon"]],
    *[("health_check_interval", v) for v in [-1, "soon", math.nan]],
    ("client_name", 5), ("password", 5), ("key_prefix", 5),
]


@pytest.mark.parametrize("make, option, value", [*[(broker_from_url, o, v) for o, v in REDIS_BROKER_BAD + REDIS_BAD],
                                                  *[(backend_from_url, o, v) for o, v in REDIS_BAD]])
def test_a_redis_option_out_of_range_is_refused_naming_it(make, option, value):
    with refused(option, value):
        make(memory_url(), options={option: value})


@pytest.mark.parametrize("query", ["batch=0", "max_block=soon", "retries=-1", "retry_cap=nan", "retry_base=x"])
def test_a_redis_option_out_of_range_in_the_url_is_refused_naming_it(query):
    option, _, value = query.partition("=")
    with refused(option, value):
        broker_from_url(f"{REDIS_URL}?{query}")


@pytest.mark.parametrize("option, value", [("retries", -1), ("socket_timeout", 0), ("client_name", 5)])
def test_a_redis_payload_stores_option_out_of_range_is_refused_naming_it(option, value):
    with refused(option, value):
        payload_store(memory_url(), options={option: value})


def test_valid_redis_options_still_work():
    url = memory_url()
    broker = broker_from_url(url + "?batch=50", options={"max_block": "0.5", "retries": 0, "retry_cap": 1,
                                                         "health_check_interval": 0})
    try:
        assert (broker.batch, broker.max_block) == (50, 0.5)
        assert broker.client.get_retry()._retries == 0
    finally:
        broker.close()


def test_the_redis_password_option_is_sent_where_the_url_has_none():
    plain = broker_from_url(REDIS_URL, options={"password": "pw"})
    in_url = broker_from_url(REDIS_URL.replace("redis://", "redis://:fromurl@"), options={"password": "pw"})
    try:
        assert plain.client.connection_pool.connection_kwargs["password"] == "pw"
        assert in_url.client.connection_pool.connection_kwargs["password"] == "fromurl"
    finally:
        plain.close()
        in_url.close()


# -- SQS ---------------------------------------------------------------------------------------------

SQS_BAD = [
    *[("wait_time_seconds", v) for v in [21, -1, "long", 2.5, True]],
    *[("idle_poll", v) for v in [-1, "soon", math.nan, math.inf]],
    *[("create_queues", v) for v in ["maybe", 2]],
    *[("max_deliveries", v) for v in [0, "many"]],
    ("region", 5), ("endpoint_url", 5),
]


@pytest.mark.parametrize("option, value", SQS_BAD)
def test_an_sqs_option_out_of_range_is_refused_naming_it(option, value):
    with refused(option, value):
        broker_from_url("sqs://127.0.0.1:1", options={option: value})


@pytest.mark.parametrize("query", ["wait_time_seconds=25", "wait_time_seconds=x", "idle_poll=-1",
                                   "create_queues=maybe", "max_deliveries=0", "max_deliveries=x"])
def test_an_sqs_option_out_of_range_in_the_url_is_refused_naming_it(query):
    option, _, value = query.partition("=")
    with refused(option, value):
        broker_from_url(f"sqs://127.0.0.1:1?{query}")


def test_valid_sqs_options_still_work():
    broker = broker_from_url("sqs://127.0.0.1:1?wait_time_seconds=0&idle_poll=0.5&create_queues=no&max_deliveries=2")
    assert (broker.wait_time_seconds, broker.idle_poll, broker.create_queues, broker.max_deliveries) == (
        0, 0.5, False, 2)
    given = broker_from_url("sqs://127.0.0.1:1?create_queues=no", options={"create_queues": True,
                                                                           "wait_time_seconds": 20})
    assert (given.create_queues, given.wait_time_seconds, given.idle_poll) == (True, 20, 1.0)


# -- workers -----------------------------------------------------------------------------------------

WORKER_BAD = [
    *[("concurrency", v) for v in [0, -1, "two", 1.5, True]],
    *[("prefetch", v) for v in [0, -2, "x", 2.5, False]],
    ("pool", "fork"), ("pool", None),
    *[("heartbeat_interval", v) for v in [0, -1, math.nan, math.inf, "soon"]],
    *[("unknown_grace", v) for v in [-1, math.nan, math.inf, "soon"]],
    *[("shutdown_grace", v) for v in [-1, math.nan, math.inf, "soon"]],
    *[("max_tasks_per_child", v) for v in [-1, "x", 1.5, True]],
    *[("max_memory_per_child", v) for v in [-1, "x", 2.5]],
    *[(flag, v) for flag in ("allow_cells", "allow_code", "echo_output", "beat", "local_follow_ups")
      for v in ("no", 1, None)],
    ("name", 5),
]


@pytest.fixture
def memory_app():
    app = nbqueue.App(memory_url())
    yield app
    app.close()


@pytest.mark.parametrize("argument, value", WORKER_BAD)
def test_a_worker_argument_out_of_range_is_refused_naming_it(memory_app, argument, value):
    with refused(argument, value):
        memory_app.worker(**{argument: value})


@pytest.mark.parametrize("argument, value", [("concurrency", 0), ("prefetch", 0), ("heartbeat_interval", 0),
                                             ("allow_code", "no")])
def test_start_worker_refuses_a_bad_argument_before_it_asks_the_stores(memory_app, monkeypatch, argument, value):
    asked = []
    monkeypatch.setattr(memory_app, "check_stores", lambda **kw: asked.append(kw))
    with refused(argument, value):
        memory_app.start_worker(**{argument: value})
    assert asked == [] and memory_app.workers == []


def test_valid_worker_arguments_still_work(memory_app):
    worker = memory_app.worker(concurrency=3, prefetch=2, heartbeat_interval=0.5, unknown_grace=1,
                               shutdown_grace=None, max_tasks_per_child=0, max_memory_per_child=0, name="w1")
    assert (worker.concurrency, worker.prefetch, worker.heartbeat_interval, worker.unknown_grace) == (3, 2, 0.5, 1.0)
    assert (worker.shutdown_grace, worker.name, worker.pool) == (None, "w1", None)
    default = memory_app.worker()
    assert (default.concurrency, default.prefetch, default.shutdown_grace) == (1, 4, 30.0)
    assert default.heartbeat_interval == pytest.approx(5.0)


def test_a_process_pool_keeps_its_children_limits(memory_app):
    worker = memory_app.worker(pool="processes", max_tasks_per_child=5, max_memory_per_child=0)
    assert (worker.pool.max_tasks_per_child, worker.pool.max_memory_per_child) == (5, None)
    worker.pool.close()


# -- the command line --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag, value", [
    (["worker", "-c", "0"], "--concurrency", "0"),
    (["worker", "--concurrency", "-2"], "--concurrency", "-2"),
    (["worker", "-c", "two"], "--concurrency", "two"),
    (["worker", "--prefetch", "0"], "--prefetch", "0"),
    (["worker", "--max-tasks-per-child", "-1"], "--max-tasks-per-child", "-1"),
    (["worker", "--max-memory-per-child", "lots"], "--max-memory-per-child", "lots"),
    (["worker", "--shutdown-grace", "nan"], "--shutdown-grace", "nan"),
    (["worker", "--shutdown-grace", "-1"], "--shutdown-grace", "-1"),
    (["worker", "--metrics-port", "70000"], "--metrics-port", "70000"),
    (["dashboard", "--interval", "0"], "--interval", "0"),
    (["dashboard", "--port", "-1"], "--port", "-1"),
    (["--log-level", "loud", "status"], "--log-level", "loud"),
])
def test_a_command_line_option_out_of_range_is_refused_naming_it(monkeypatch, capsys, argv, flag, value):
    def reached(spec):
        raise AssertionError(f"the command ran with {argv}")

    monkeypatch.setattr(cli, "load_app", reached)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and flag in err and repr(value) in err, err


def test_valid_command_line_options_still_work(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_worker", lambda args: seen.append(args) or 0)
    assert cli.main(["--log-level", "warning", "worker", "-c", "3", "--prefetch", "2", "--shutdown-grace", "0.5",
                     "--max-tasks-per-child", "0", "--max-memory-per-child", "1024", "--metrics-port", "9100"]) == 0
    args = seen[0]
    assert (args.concurrency, args.prefetch, args.shutdown_grace, args.max_tasks_per_child,
            args.max_memory_per_child, args.metrics_port) == (3, 2, 0.5, 0, 1024, 9100)
    assert cli.main(["worker"]) == 0 and (seen[1].shutdown_grace, seen[1].prefetch) == (30.0, None)


# -- the helpers every check uses --------------------------------------------------------------------

def test_option_helpers_read_numbers_and_their_text():
    from nbqueue import options

    assert options.seconds("s", "2.5", 1.0) == 2.5 and options.seconds("s", 3, 1.0) == 3.0
    assert options.seconds("s", None, 1.0) == 1.0 and options.seconds("s", "", 1.0) == 1.0
    assert options.seconds("s", "inf", 1.0, infinite=True) == math.inf
    assert options.count("n", " 12 ", 1) == 12 and options.count("n", 0, 1, minimum=0) == 0
    assert options.flag("f", "Yes", False) is True and options.flag("f", "off", True) is False
    assert options.flag("f", None, True) is True
    with refused("s", 30.5):
        options.seconds("s", 30.5, None, maximum=20)
