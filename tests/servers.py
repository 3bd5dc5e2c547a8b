"""Servers the test session starts itself, each on a free 127.0.0.1 port, and stops at the end.

- moto's SQS server (``moto[server]``), for the SQS broker; NBQUEUE_TEST_SQS=http://host:port
  uses one that runs already instead.
- memcached (Debian's ``memcached``), for the Memcache result backend; NBQUEUE_TEST_MEMCACHE=
  host:port uses one that runs already instead.

Only servers started here are stopped here. Locally a server that cannot be started
skips its tests; under CI=true it fails them.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class LocalServer:
    """One server process of the session's own, started on first use."""

    def __init__(self, name: str, env_var: str, command):
        self.name, self.env_var, self.command = name, env_var, command
        self.proc: subprocess.Popen | None = None
        self.address: tuple[str, int] | None = None
        self.error: str | None = None
        self.log_path: str | None = None
        self._lock = threading.Lock()

    def get(self) -> tuple[str, int]:
        """(host, port), or raise RuntimeError saying why there is none."""
        with self._lock:
            if self.address is None and self.error is None:
                self._start()
            if self.error is not None:
                raise RuntimeError(self.error)
            return self.address

    def _start(self) -> None:
        given = os.environ.get(self.env_var)
        if given:
            host, _, port = given.rpartition("//")[2].rstrip("/").rpartition(":")
            self.address = (host or "127.0.0.1", int(port))
            if not listening(*self.address):
                self.error = f"{self.name} given by {self.env_var}={given} is not reachable"
            return
        for _ in range(3):          # a free port may be taken by another process before the server binds it
            port = free_port()
            argv = self.command(port)
            if argv is None:
                self.error = f"{self.name} is not installed (see the Makefile: make services)"
                return
            if self._launch(argv, port):
                self.address, self.error = ("127.0.0.1", port), None
                return
            self.stop()
            with open(self.log_path, errors="replace") as fh:
                tail = fh.read()[-2000:]
            self.error = f"{self.name} did not start on 127.0.0.1:{port}: {tail}"

    def _launch(self, argv: list[str], port: int) -> bool:
        """Start ``argv``; True once it listens on ``port``, False if it exits or takes 60 s."""
        fd, self.log_path = tempfile.mkstemp(prefix=f"nbqueue-{self.name.split()[0].lower()}-", suffix=".log")
        self.proc = subprocess.Popen(argv, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(fd)
        atexit.register(self.stop)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            # what listens is ours only while ours runs (another process may hold the port)
            if listening("127.0.0.1", port) and self.proc.poll() is None:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _moto_command(port: int):
    try:
        import flask  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _memcached_command(port: int):
    binary = shutil.which("memcached") or ("/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None)
    if binary is None:
        return None
    user = ["-u", "nobody"] if os.geteuid() == 0 else []   # memcached refuses to run as root without -u
    return [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-t", "2", *user]


MOTO = LocalServer("moto SQS server", "NBQUEUE_TEST_SQS", _moto_command)
MEMCACHED = LocalServer("memcached", "NBQUEUE_TEST_MEMCACHE", _memcached_command)


def stop_all() -> None:
    MOTO.stop()
    MEMCACHED.stop()
