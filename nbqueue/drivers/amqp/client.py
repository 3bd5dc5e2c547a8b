"""What the AMQP driver's broker and result backend share: reading an amqp:// URL into pika's
connection parameters (nbqueue's own query options taken out first).

The vhost is the URL's path without its first ``/``, percent-decoded: ``amqp://h:5672/`` and
``amqp://h:5672/%2F`` name the vhost ``/``, ``amqp://h/jobs`` the vhost ``jobs``; as in kombu
(Celery), ``amqp://h:5672//`` names the vhost ``/`` too (pika alone would read an empty name)."""
from __future__ import annotations

from typing import Collection
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import pika

from ...errors import ConfigurationError
from ...urls import redact


def check_url(url: str) -> dict:
    """The query options of an amqp:// or amqps:// URL; ConfigurationError for any other URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {redact(url)!r} (use amqp://user:pass@host:5672/vhost)")
    return dict(parse_qsl(parts.query))


def connection_parameters(url: str, ours: Collection[str]) -> pika.URLParameters:
    """pika's parameters for ``url`` without the query options named in ``ours`` (nbqueue's own);
    a TLS URL checks the server's name. ConfigurationError for a URL pika cannot read."""
    parts = urlsplit(url)
    pika_query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ours])
    path = parts.path
    if path.startswith("//"):     # kombu's ``amqp://host//``: the vhost "/" (the path less its first slash)
        path = "/" + quote(unquote(path[1:]), safe="")
    try:
        params = pika.URLParameters(urlunsplit(parts._replace(path=path, query=pika_query)))
    except ValueError as exc:
        raise ConfigurationError(f"bad AMQP URL {redact(url)!r}: {exc}") from exc
    if params.ssl_options is not None and not params.ssl_options.server_hostname:
        params.ssl_options = pika.SSLOptions(params.ssl_options.context, server_hostname=params.host)
    return params


def refused(url: str, params: pika.ConnectionParameters, exc: BaseException) -> ConfigurationError:
    """The error for a server that refused the login or the vhost: both named (the vhost quoted,
    so an empty name shows), with how a URL writes the vhost ``/``."""
    return ConfigurationError(
        f"RabbitMQ at {redact(url)} refused the login (user {params.credentials.username!r}) or vhost "
        f"{params.virtual_host!r}: {exc!r}; the vhost is the URL's path after the port, percent-encoded: "
        "write %2F for the vhost '/' (amqp://user:pass@host:5672/%2F)")
