"""Wake-ups across processes sharing one store file: unix datagram sockets beside the file.

A process that waits on the store binds a socket in the directory ``.<file name>.wake/``
beside it, one per kind of event it waits for: ``m-<pid>-<token>`` (new messages: reservers) and
``r-<pid>-<token>`` (stored results: waiters). A process that commits messages or results
sends one datagram to each socket of that kind; the listener thread of the receiving
process turns it into a local wake-up (``WAKEUPS.notify`` under the store's key, with the
task ids of a result datagram), so waits there end as they do for a sender in the same
process.

Polling stays the fallback: a datagram may be dropped (the receiver's buffer is full: it
has wake-ups pending anyway), a directory may not allow sockets, and a platform without
``AF_UNIX`` has no channel at all; each costs latency only, never correctness. Sockets of
processes that died are removed by the first sender that finds nobody behind them
(``ECONNREFUSED``); a listener whose socket file was removed binds a new one. The
listener threads end with the last broker or backend of this process on the file
(``hold``/``release``), or with the process. A path
too long for ``sun_path`` is reached through ``/proc/self/fd/<directory fd>/`` where
Linux offers it; otherwise there is no channel.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

MESSAGES = "m"          # a socket kind: new messages (reservers listen)
RESULTS = "r"           # stored results (waiters listen); the datagram carries the task ids
MAX_IDS_BYTES = 8192    # larger id lists are sent as "every waiter" (an empty list)
_SUN_PATH = 104         # the smallest sun_path among the platforms (macOS); Linux allows 107
RELIST = 1.0            # seconds after which the directory is listed again even if its mtime did not change
RESTAT = 0.02           # seconds between looks at the directory (a new listener is found within this)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)     # without it, each datagram is handled alone


class WakeChannel:
    """The wake-up channel of one store file in this process (``channel_for(path)``)."""

    def __init__(self, path: str) -> None:
        head, name = os.path.split(path)
        self.directory = os.path.join(head, f".{name}.wake")
        self._checked = 0.0                         # when listen() last checked that its sockets' files exist
        self._lock = threading.Lock()
        self._listeners: dict[str, tuple[socket.socket, str]] = {}     # kind -> (socket, its file name)
        self._handlers: dict[str, Callable[[bytes], None]] = {}
        self._sender: socket.socket | None = None
        self._dir_fd: int | None = None
        self._peers: dict[str, list[str]] = {}      # kind -> peer file names, as last listed
        self._listed: tuple | None = None           # (st_mtime_ns, st_ino) of the directory when listed
        self._listed_at = 0.0
        self._statted = 0.0
        self.usable = hasattr(socket, "AF_UNIX")
        self._users = 0                             # brokers and backends holding it (hold/release)

    # -- addresses ------------------------------------------------------------------
    def _address(self, name: str) -> str | None:
        full = os.path.join(self.directory, name)
        if len(full.encode()) < _SUN_PATH:
            return full
        if self._dir_fd is None:
            try:
                self._dir_fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:
                return None
        short = f"/proc/self/fd/{self._dir_fd}/{name}"
        return short if os.path.isdir(f"/proc/self/fd/{self._dir_fd}") else None

    def _check_dir_fd(self) -> None:
        """Drop the directory descriptor of long paths when the directory at the path is
        another one now (removed and made again): the next address opens the new one."""
        if self._dir_fd is None:
            return
        try:
            same = os.stat(self.directory).st_ino == os.fstat(self._dir_fd).st_ino
        except OSError:
            same = False
        if not same:
            try:
                os.close(self._dir_fd)
            except OSError:
                pass
            self._dir_fd = None

    # -- listening ------------------------------------------------------------------
    def listen(self, kind: str, handler: Callable[[bytes], None]) -> bool:
        """Bind this process's socket for ``kind`` (once) and call ``handler(payload)`` from a
        listener thread for each datagram. False when the channel cannot be used here."""
        if kind in self._listeners and not self._gone(kind) or not self.usable:
            return kind in self._listeners
        with self._lock:
            if kind in self._listeners:
                if not self._gone(kind):
                    return True
                _shut(self._listeners.pop(kind)[0])       # its thread ends; bind afresh
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._check_dir_fd()
                name = f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
                address = self._address(name)
                if address is None:
                    self.usable = False
                    return False
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind(address)
            except OSError as exc:
                log.debug("no wake-up channel beside %s (%s): waits poll", self.directory, exc)
                self.usable = False
                return False
            self._handlers[kind] = handler
            self._listeners[kind] = (sock, name)
        threading.Thread(target=self._receive, args=(sock, handler), name=f"nbqueue-wake-{kind}", daemon=True).start()
        return True

    def listening(self, kind: str) -> bool:
        """Whether this process listens for ``kind`` (``listen`` succeeded and was not closed)."""
        return kind in self._listeners

    def _gone(self, kind: str) -> bool:
        """True when the file of this process's ``kind`` socket was removed (``rm -rf`` of the
        store's directory), checked at most once per RELIST seconds."""
        now = time.monotonic()
        if now - self._checked < RELIST:
            return False
        self._checked = now
        return not os.path.exists(os.path.join(self.directory, self._listeners[kind][1]))

    @staticmethod
    def _receive(sock: socket.socket, handler: Callable[[bytes], None]) -> None:
        """Call ``handler`` once per batch of datagrams that arrived together (``_merged``), so
        a burst of commits in another process costs this process one wake-up, not one each."""
        while True:
            try:
                payload = sock.recv(65536)
            except OSError:
                return                                # closed (a fork's child)
            if not payload:
                return                                # shut down (close()); a sender's datagram is never empty
            payloads = [payload]
            try:
                while _DONTWAIT and len(payloads) < 256:
                    more = sock.recv(65536, _DONTWAIT)
                    if not more:
                        break
                    payloads.append(more)
            except OSError:                           # none pending (or closed: the next recv says so)
                pass
            try:
                handler(_merged(payloads))
            except Exception:
                log.exception("a wake-up handler failed")

    # -- sending --------------------------------------------------------------------
    def _list_peers(self, kind: str) -> list[str]:
        now = time.monotonic()
        if now - self._statted < RESTAT:
            return self._peers.get(kind, [])
        self._statted = now
        try:
            st = os.stat(self.directory)
        except OSError:
            self._peers = {}
            return []
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._listed or now - self._listed_at > RELIST:
            self._check_dir_fd()
            own = {name for _, name in self._listeners.values()}
            try:
                names = [n for n in os.listdir(self.directory) if n not in own]
            except OSError:
                return []
            self._peers = {k: [n for n in names if n.startswith(k + "-")] for k in (MESSAGES, RESULTS)}
            self._listed, self._listed_at = stamp, now
        return self._peers.get(kind, [])

    def has_peers(self, kind: str) -> bool:
        """Whether another process listens for ``kind`` (as last listed: at most ``RESTAT``
        seconds old, see ``send``)."""
        return self.usable and bool(self._list_peers(kind))

    def send(self, kind: str, payload: bytes = b"") -> None:
        """One datagram to every other process listening for ``kind``; never raises, never blocks."""
        if not self.usable or not self._list_peers(kind):
            return
        with self._lock:
            peers = self._list_peers(kind)
            if self._sender is None:
                try:
                    self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sender.setblocking(False)
                except OSError:
                    self.usable = False
                    return
            for name in peers:
                address = self._address(name)
                if address is None:
                    continue
                try:
                    self._sender.sendto(payload or b"-", address)
                except BlockingIOError:
                    pass                                  # its buffer is full: it has wake-ups pending
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):    # nobody behind it: a dead process's
                        self._remove(name)
                    elif exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                        log.debug("wake-up to %s failed: %s", name, exc)

    def _remove(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass
        self._listed = None
        self._statted = 0.0

    # -- life -----------------------------------------------------------------------
    def hold(self) -> "WakeChannel":
        """Count a user (a broker or backend on this file); ``release()`` when it closes."""
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        """One user fewer; with none left, close: the listener threads end, the socket files
        go (a later ``listen`` binds afresh)."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if not self._users:
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for sock, name in self._listeners.values():
            self._remove(name)
            _shut(sock)
        self._listeners.clear()
        self._handlers.clear()
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _after_fork(self) -> None:
        """In a forked child: the listener threads are the parent's; the sockets stay the
        parent's (its files are not removed), the child binds its own when it waits."""
        self._lock = threading.Lock()
        self._listeners = {}
        self._handlers = {}
        self._sender = None
        self._listed = None
        self._statted = 0.0


def _shut(sock: socket.socket) -> None:
    """Close a listener's socket and end its thread: a ``recv`` blocked in another thread
    returns only when the socket is shut down (closing alone leaves it blocked on Linux)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


_CHANNELS: dict[str, WakeChannel] = {}
_CHANNELS_LOCK = threading.Lock()


def channel_for(path: str) -> WakeChannel:
    """The channel beside the store file ``path`` (one per file and process)."""
    channel = _CHANNELS.get(path)
    if channel is None:
        with _CHANNELS_LOCK:
            channel = _CHANNELS.get(path)
            if channel is None:
                channel = _CHANNELS[path] = WakeChannel(path)
    return channel


def ids_payload(ids: Iterable[str] | None) -> bytes:
    """A result datagram's payload: the ids, newline-separated; empty (every waiter) when
    unknown or too many."""
    if ids is None:
        return b""
    payload = "\n".join(ids).encode()
    return payload if len(payload) <= MAX_IDS_BYTES else b""


def _merged(payloads: list[bytes]) -> bytes:
    """One payload for datagrams received together: their ids, or "every waiter" (``-``)
    when one of them said so."""
    if len(payloads) == 1:
        return payloads[0]
    if any(p == b"-" for p in payloads):
        return b"-"
    return b"\n".join(payloads)


def payload_ids(payload: bytes) -> list[str] | None:
    """The ids of a result datagram; None for every waiter."""
    if not payload or payload == b"-":
        return None
    return payload.decode(errors="replace").split("\n")


@atexit.register
def _close_all() -> None:
    """This process's sockets go with it (a dead process's are removed by the next sender)."""
    for channel in list(_CHANNELS.values()):
        channel.close()


def _after_fork_in_child() -> None:
    global _CHANNELS_LOCK
    _CHANNELS_LOCK = threading.Lock()
    for channel in _CHANNELS.values():
        channel._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def results_key(path: str) -> tuple:
    """The key under which this process's waiters for results stored in ``path`` wait (``WAKEUPS``)."""
    return ("sqlite-backend", path)


def local_waker(notify: Callable[..., Any], key: Any) -> Callable[[bytes], None]:
    """A handler for ``listen`` that wakes this process's waiters of ``key`` (``WAKEUPS.notify``)."""
    return lambda payload: notify(key, payload_ids(payload))
