"""A store URL's query holds only what its driver reads: nbqueue's own options, and the URL
parameters its client library documents (redis-py's, pika's), which still reach the library.
Any other key (a typo) is a ConfigurationError when the App or store is made, naming the key,
the URL without its password and the keys the driver knows; a malformed Redis URL, an empty
key prefix and a Redis database the server lacks are refused naming what is wrong. Only the
database test needs a server: the query is read before any connection."""
from __future__ import annotations

import re
import uuid

import pytest

import nbqueue
from nbqueue.drivers import backend_from_url, broker_from_url
from nbqueue.errors import ConfigurationError

from conftest import AMQP_URL, require_server, with_query

SQS_URL = "sqs://testing:testing@127.0.0.1:1?region=us-east-1"
MEMCACHE_URL = "memcache://127.0.0.1:11211"


def unknown(*keys: str, url: str, known: str):
    """pytest.raises for the error naming the unknown ``keys``, the URL and a known option."""
    return pytest.raises(ConfigurationError, match=(
        rf"unknown query option\(s\) {re.escape(keys[0])}.* in '{re.escape(url)}' \(known: .*{re.escape(known)}"))


def private(url: str) -> str:
    return url.replace("PREFIX", f"urlq-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("url, key", [
    ("redis://127.0.0.1:6379/0?key_prefx=trialx", "key_prefx"),
    ("redis://127.0.0.1:6379/0?prefix=trialx", "prefix"),
    ("rediss://127.0.0.1:6380/0?key_prefix=PREFIX&sokcet_timeout=5", "sokcet_timeout"),
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs"),      # TLS settings need rediss://
    ("memory://PREFIX?socket_timeout=5", "socket_timeout"),                # no socket to time out
])
@pytest.mark.parametrize("make", ["app", "broker", "backend"])
def test_an_unknown_redis_query_key_is_refused_when_the_app_is_made(url, key, make):
    url = private(url)
    with unknown(key, url=url, known="key_prefix"):
        if make == "app":
            nbqueue.App(url)
        else:
            (broker_from_url if make == "broker" else backend_from_url)(url)


def test_the_unknown_key_error_suggests_the_nearest_and_lists_the_client_librarys():
    with pytest.raises(ConfigurationError) as caught:
        nbqueue.App("redis://127.0.0.1:6379/0?key_prefx=trialx")
    assert "did you mean key_prefix?" in str(caught.value)
    assert "passed on to redis-py: " in str(caught.value) and "socket_timeout" in str(caught.value)


def test_the_url_in_the_error_hides_its_passwords():
    with pytest.raises(ConfigurationError) as caught:
        nbqueue.App("redis://:hunter2@127.0.0.1:6379/0?password=hunter3&key_prefx=x")
    assert "hunter" not in str(caught.value) and ":***@" in str(caught.value) and "password=***" in str(caught.value)


@pytest.mark.parametrize("make, url, key, known", [
    (broker_from_url, f"{AMQP_URL}?heartbaet=30", "heartbaet", "reconnect_timeout"),
    (broker_from_url, f"{AMQP_URL}?key_prefix=x", "key_prefix", "reconnect_timeout"),  # the backend's, not the broker's
    (backend_from_url, f"{AMQP_URL}?key_prefx=x", "key_prefx", "key_prefix"),
    (broker_from_url, f"{SQS_URL}&regoin=eu-west-1", "regoin", "region"),
    (backend_from_url, f"{MEMCACHE_URL}?key_prefx=x", "key_prefx", "key_prefix"),
    (broker_from_url, "sqlite:///urlq.db?mode=ro", "mode", "none"),
    (backend_from_url, "sqlite:///urlq.db?journal=wal", "journal", "none"),
])
def test_an_unknown_query_key_is_refused_by_every_driver(make, url, key, known):
    shown = url.replace("guest:guest@", "guest:***@").replace("testing:testing@", "testing:***@")
    with unknown(key, url=shown, known=known):
        make(url)


@pytest.mark.parametrize("url", ["file:///tmp/urlq-payloads?auto_mkdir=true", "s3://bucket/prefix?endpoint_url=x"])
def test_a_query_on_an_fsspec_payload_url_is_refused_when_the_app_is_made(url):
    with pytest.raises(ConfigurationError, match=r"unknown query option\(s\) .*payload_options"):
        nbqueue.App(f"memory://urlq-{uuid.uuid4().hex[:8]}", payloads=url)


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigurationError, match="given twice: key_prefix"):
        nbqueue.App("memory://urlq?key_prefix=a&key_prefix=b")


@pytest.mark.parametrize("url", ["rediss:/127.0.0.1", "redis:/127.0.0.1:6379/0", "redis://", "redis:///0"])
def test_a_redis_url_without_its_host_is_refused_naming_it(url):
    with pytest.raises(ConfigurationError, match=rf"names its host after two slashes .* not '{re.escape(url)}'"):
        nbqueue.App(backend=url)


@pytest.mark.parametrize("url, what", [("redis://127.0.0.1:6379/zero", "database number"),
                                       ("redis://127.0.0.1:63x9/0", "bad port")])
def test_a_redis_url_with_a_bad_database_or_port_is_refused_naming_it(url, what):
    with pytest.raises(ConfigurationError, match=rf"{what}.*{re.escape(url)}"):
        nbqueue.App(url)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?key_prefix=", "memory://urlq?key_prefix=",
    f"{AMQP_URL}?key_prefix=", f"{MEMCACHE_URL}?key_prefix=",
])
def test_an_empty_key_prefix_is_refused_naming_it(url):
    make = nbqueue.App if url.startswith(("redis", "memory")) else backend_from_url
    with pytest.raises(ConfigurationError, match="key_prefix must not be empty"):
        make(url)


def test_an_empty_key_prefix_app_option_is_refused_naming_it():
    with pytest.raises(ConfigurationError, match="key_prefix must not be empty"):
        nbqueue.App("memory://urlq", key_prefix="")


def test_the_client_librarys_url_parameters_still_reach_it():
    broker = broker_from_url(private("redis://127.0.0.1:6379/0?key_prefix=PREFIX&socket_timeout=5&max_connections=7"))
    tls = broker_from_url(private("rediss://127.0.0.1:6380/0?key_prefix=PREFIX&ssl_cert_reqs=none"))
    amqp = broker_from_url(f"{AMQP_URL}?heartbeat=30&confirm_timeout=3")
    results = backend_from_url(f"{AMQP_URL}?heartbeat=30&key_prefix=urlq")
    try:
        assert broker.client.connection_pool.connection_kwargs["socket_timeout"] == 5.0
        assert broker.client.connection_pool.max_connections == 7
        assert tls.client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
        assert (amqp._params.heartbeat, amqp.confirm_timeout) == (30, 3.0)
        assert (results._params.heartbeat, results.prefix) == (30, "urlq")
    finally:
        for store in (broker, tls, amqp, results):
            store.close()


def test_a_redis_database_the_server_lacks_is_refused_naming_the_url():
    require_server("Redis", "127.0.0.1", 6379)
    url = with_query("redis://127.0.0.1:6379/99", key_prefix=f"urlq-{uuid.uuid4().hex[:8]}")
    app = nbqueue.App(url)
    try:
        @app.task
        def add(a, b):
            return a + b

        with pytest.raises(ConfigurationError, match=rf"{re.escape(url)} has no database 99"):
            add.delay(1, 2)
    finally:
        app.close()
