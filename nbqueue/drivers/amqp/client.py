"""What the AMQP driver's broker and result backend share: reading an amqp:// URL into pika's
connection parameters (nbqueue's own query options taken out first)."""
from __future__ import annotations

from typing import Collection
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika

from ...broker import redact
from ...errors import ConfigurationError


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
    try:
        params = pika.URLParameters(urlunsplit(parts._replace(query=pika_query)))
    except ValueError as exc:
        raise ConfigurationError(f"bad AMQP URL {redact(url)!r}: {exc}") from exc
    if params.ssl_options is not None and not params.ssl_options.server_hostname:
        params.ssl_options = pika.SSLOptions(params.ssl_options.context, server_hostname=params.host)
    return params
