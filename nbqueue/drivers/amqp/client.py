"""What the AMQP driver's broker and result backend share: reading an amqp:// URL into pika's
connection parameters (nbqueue's own query options taken out first), and the errors and helpers
of a pika connection.

The vhost is the URL's path without its first ``/``, percent-decoded: ``amqp://h:5672/`` and
``amqp://h:5672/%2F`` name the vhost ``/``, ``amqp://h/jobs`` the vhost ``jobs``; as in kombu
(Celery), ``amqp://h:5672//`` names the vhost ``/`` too (pika alone would read an empty name)."""
from __future__ import annotations

from typing import Any, Callable, Collection
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions as pex

try:        # pika's plain-TCP transport (private; see send_now): without it, frames take pika's own way
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
except ImportError:                                       # pragma: no cover - another pika layout
    _AsyncPlaintextTransport = None

from ...errors import ConfigurationError
from ...options import url_query
from ...urls import redact

#: the query keys pika reads from a URL: its ``URLParameters`` has a ``_set_url_<key>`` for each
PIKA_URL_PARAMETERS = frozenset(name[len("_set_url_"):] for name in dir(pika.URLParameters)
                                if name.startswith("_set_url_"))


def check_url(url: str, ours: Collection[str]) -> dict:
    """The query options of an amqp:// or amqps:// URL; ConfigurationError for any other URL, or
    for a query key that is neither one of ``ours`` (nbqueue's options read from the URL) nor pika's."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {redact(url)!r} (use amqp://user:pass@host:5672/vhost)")
    return url_query(url, ours, PIKA_URL_PARAMETERS, library="pika")


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


#: errors that mean "this connection is gone": reconnect
CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.ChannelWrongStateError, pex.StreamLostError, OSError)
#: errors of a first connection that mean "wrong login or vhost": no point retrying
AUTH_ERRORS = (pex.ProbableAuthenticationError, pex.AuthenticationError, pex.ProbableAccessDeniedError)


def _noop() -> None:
    pass


def wake(connection: pika.BlockingConnection) -> None:
    """Make a process_data_events() of this connection return (safe from pika callbacks)."""
    try:
        connection.add_callback_threadsafe(_noop)
    except Exception:   # closing: process_data_events returns anyway
        pass


def send_now(connection: pika.BlockingConnection, emit: Callable[[], Any]) -> None:
    """Run ``emit`` (calls that write frames on ``connection``'s channels, such as ``basic_publish``
    or ``basic_ack`` of the async channel) and write its frames out before returning.

    On a plain TCP connection whose send buffer is empty, the frames are joined and handed to the
    socket in one ``send()``, without a turn of pika's I/O loop (which would watch the socket for
    writability, poll, write, and stop watching it: two ``epoll_ctl``, an ``epoll_wait`` and the
    loop's timers, per flush). What the socket does not take, or a failed send, goes through pika's
    buffer as usual, whose flush then writes it or meets the error and closes the connection (raising
    as ``BlockingConnection`` does). TLS connections, and output already waiting, take pika's way."""
    transport = getattr(connection._impl, "_transport", None)     # None while pika holds no socket (closed)
    if (transport is None or _AsyncPlaintextTransport is None or type(transport) is not _AsyncPlaintextTransport
            or transport._state != transport._STATE_ACTIVE
            or transport.get_write_buffer_size()):
        emit()
        _coalesce(transport)
        connection._flush_output()
        return
    frames: list[bytes] = []
    transport.write = frames.append     # an attribute of this transport, in place of its method, while emit runs
    try:
        emit()
    finally:
        del transport.write
        data = b"".join(frames)         # pika counts these bytes as sent: they are written whatever emit raised
        sent = 0
        if data:
            try:
                sent = transport._sock.send(data)
            except OSError:             # would block, or the connection is broken: pika's write and flush tell
                sent = 0
            if sent < len(data):
                transport.write(data[sent:])
    connection._flush_output()


def _coalesce(transport: Any) -> None:
    """Join the frames waiting in a transport's send buffer (a publish is three: method, header,
    body) into one, so they go out in one send() call rather than one each."""
    buffers = getattr(transport, "_tx_buffers", None)
    if buffers is not None and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)


def close_quietly(thing: Any) -> None:
    """Close a connection or channel that may already be closed or broken."""
    try:
        if thing is not None and thing.is_open:
            thing.close()
    except Exception:
        pass


class Link:
    """What the consuming and publishing connections share: the server's parameters, how long
    to keep reconnecting, and whether any connection ever succeeded (a refused login on the
    first connection is a configuration error, not an outage)."""

    def __init__(self, url: str, params: pika.ConnectionParameters, reconnect_timeout: float):
        self.url = url
        self.params = params
        self.reconnect_timeout = reconnect_timeout
        self.ever_connected = False
