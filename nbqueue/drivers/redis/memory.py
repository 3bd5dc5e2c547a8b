"""``memory://``: fakeredis in this process, with the driver's scripts run as their Python twins.

A ``memory://`` client (``connect`` in nbqueue.drivers.redis.client) gets a
``MemoryConnection``, whose server socket runs an EVALSHA of a script that has a twin
(nbqueue.drivers.redis.twins) as that function: where fakeredis would run the Lua, under
the server's lock, with the script's ``redis.call``s made through fakeredis' own command
table (``Call``), so keys, types, expiry and blocked clients behave as with the Lua. An
EVALSHA of a script not loaded fails with NOSCRIPT as before; one without a twin runs as Lua.
The connection also hands each command to the socket as its arguments in bytes
(``Command``): the same fields fakeredis would parse out of RESP, without packing and
parsing it. Everything else is fakeredis' own (its command table, data types, blocking
pops and server lock), reached through its socket class and its internal modules.
"""
from __future__ import annotations

from typing import Any

import hiredis
from fakeredis import FakeRedisConnection
from fakeredis._helpers import SimpleError
from fakeredis._msgs import CONNECTION_ERROR_MSG, SCRIPT_ERROR_MSG
from fakeredis._socket import FakeSocket

from .twins import TWINS, ErrorReply


def _arg(value: Any) -> bytes:
    """A ``redis.call`` argument as Lua passes it: strings as they are, numbers as ``%.17g``."""
    if type(value) is bytes:
        return value
    if type(value) in (int, float):
        return f"{value:.17g}".encode()
    return str(value).encode()


class Call:
    """``redis.call`` for a Python script: one command run through fakeredis' command
    table on the socket running the script (its errors raised, as the Lua call raises)."""

    __slots__ = ("sock",)

    def __init__(self, sock: FakeSocket):
        self.sock = sock

    def __call__(self, name: str, *args: Any) -> Any:
        sock = self.sock
        func, sig = sock._name_to_func(name)
        result = sock._run_command(func, sig, [_arg(a) for a in args], True)
        if isinstance(result, SimpleError):
            raise result
        return result


class Command(tuple):
    """One command's arguments as the bytes RESP would carry, handed to the server socket as they
    are: the client packs no RESP and the socket parses none (``MemoryConnection.pack_command``)."""


def _command(args: tuple) -> Command | None:
    """``args`` as the redis-py packer (hiredis) sends them: a command name with a space split
    in two, text as UTF-8, an int in decimal, a float as ``repr``; None for another type (the
    packer then reports it)."""
    name = args[0]
    if isinstance(name, str):
        name = name.encode()
    head = name.split() if b" " in name else [name]
    fields = []
    for arg in args[1:]:
        kind = type(arg)
        if kind is bytes:
            fields.append(arg)
        elif kind is str:
            fields.append(arg.encode())
        elif kind is int:
            fields.append(b"%d" % arg)
        elif kind is float:
            fields.append(repr(arg).encode())
        else:
            return None
    return Command(head + fields)


class MemorySocket(FakeSocket):
    """fakeredis' server socket, running the scripts registered in nbqueue.drivers.redis.twins as
    Python, and taking a ``Command`` without RESP in between."""

    def sendall(self, data: Any) -> None:
        if type(data) is not Command:
            return super().sendall(data)
        if not self._server.connected or self._killed:
            raise self._connection_error_class(CONNECTION_ERROR_MSG)
        if self._paused:                    # commands wait in the parser's buffer: this one goes after them
            return super().sendall(hiredis.pack_command(tuple(data)))
        self._process_command(list(data))
        return None

    def evalsha(self, sha1: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        fn = TWINS.get(sha1)
        if fn is None or sha1 not in self._server.script_cache or not 0 <= numkeys <= len(keys_and_args):
            return super().evalsha(sha1, numkeys, *keys_and_args)
        # as fakeredis' EVAL: the script's calls reply in RESP2 and see no HIMPORT fieldsets of the caller
        self._script_resp = 2
        caller_fieldsets, self._fieldsets = self._fieldsets, {}
        try:
            return fn(Call(self), list(keys_and_args[:numkeys]), list(keys_and_args[numkeys:]))
        except SimpleError:
            raise
        except ErrorReply as exc:
            raise SimpleError(str(exc)) from exc
        except Exception as exc:        # what a Lua runtime error would be
            raise SimpleError(SCRIPT_ERROR_MSG.format(sha1.decode(), exc)) from exc
        finally:
            self._script_resp = None
            self._fieldsets = caller_fieldsets


class MemoryConnection(FakeRedisConnection):
    """A fakeredis connection to a ``MemorySocket``, sending it ``Command``s."""

    def pack_command(self, *args: Any) -> list:
        command = _command(args)
        return [command] if command is not None else super().pack_command(*args)

    def pack_commands(self, commands: Any) -> list:
        return [chunk for args in commands for chunk in self.pack_command(*args)]

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.send_packed_command(self.pack_command(*args), check_health=kwargs.get("check_health", True))

    def _connect(self) -> FakeSocket:
        server = self._server
        if server is None or not server.connected:
            raise self._connection_error_class(CONNECTION_ERROR_MSG)
        return MemorySocket(server, client_class=self._client_class, db=self.db,
                            lua_modules=self._lua_modules, client_info=self._client_info)
