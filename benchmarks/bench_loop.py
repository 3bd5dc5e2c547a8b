"""The loop users write: ``.delay()`` per task, then ``.get()`` per handle, in order.

    handles = [add.delay(i, i) for i in range(N)]
    values = [h.get(timeout=60) for h in handles]

Measured for nbqueue on each store beside, in the same run: a floor (a plain script on the
same store doing the same loop), Huey with its polling turned down to 1 ms, and Celery 5
with its defaults on RabbitMQ (results over ``rpc://``). Then the round trip (send one,
get it, repeat), p50.

    .venv/bin/python benchmarks/bench_loop.py                     # every store
    N=2000 .venv/bin/python benchmarks/bench_loop.py sqlite memory

Figures are tasks per second end to end (first send to last value); "sending" is the
rate of the ``.delay()`` loop alone. CPU per task (microseconds, over the timed loop) is the
sending process's, all its threads (with worker threads in process, theirs too), then ``+``
the worker's or the floor's consumer's process.

The RabbitMQ floor keeps the promise nbqueue's ``.delay()`` keeps: each send a persistent
message that the broker has confirmed before the call returns; its "sending" figure is the
rate of confirmed publishes alone on this broker.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

N = int(os.environ.get("N", "4000"))
LAT_N = int(os.environ.get("LAT_N", "200"))
# the server may be shared: every key here is under a prefix of this run
REDIS_URL = os.environ.get("BENCH_LOOP_REDIS", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))


#: a loop's figures: tasks/s end to end, sends/s, round trip p50 (ms), CPU per task (see ``timed_loop``)
Figure = tuple[float, float, float, str]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system, s) of this process (every thread) or of process ``pid`` (read
    from /proc: None where there is none)."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_loop(send, get, n: int, around=contextlib.nullcontext, pid: int | None = None) -> tuple[float, float, str]:
    """(tasks/s end to end, sends/s, CPU per task) of ``send(i)`` n times (inside ``around()``)
    then ``get(handle)`` on each in order. CPU per task is in microseconds: this process's
    (all its threads), then ``+`` that of the worker or consumer process ``pid``."""
    mine, theirs = cpu_seconds(), cpu_seconds(pid) if pid is not None else None
    started = time.perf_counter()
    with around():
        handles = [send(i) for i in range(n)]
    sent = time.perf_counter()
    for i, handle in enumerate(handles):
        value = get(handle)
        assert value == 2 * i, (i, value)
    ended = time.perf_counter()
    cpu = f"{(cpu_seconds() - mine) / n * 1e6:.0f}"
    after = cpu_seconds(pid) if theirs is not None else None
    if theirs is not None and after is not None:
        cpu += f" + {(after - theirs) / n * 1e6:.0f}"
    return n / (ended - started), n / (sent - started), cpu


def round_trips(send, get, n: int) -> float:
    """p50 in ms of send one, get it, repeat."""
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        get(send(i))
        lat.append(time.perf_counter() - t0)
    return pct(lat, 0.5) * 1e3


def measured(send, get, pid: int | None = None, around=contextlib.nullcontext) -> Figure:
    """A loop's figures: one warm-up round trip (the worker is up), the timed loop (its sends
    inside ``around()``), then the round trips."""
    get(send(0))
    tp, sending, cpu = timed_loop(send, get, N, around, pid=pid)
    return tp, sending, round_trips(send, get, LAT_N), cpu


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- floors ----------------------------------------------------------------------------------------

SQLITE_SCHEMA = ("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT, state INT DEFAULT 0)",
                 "CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, result TEXT)")


def sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    for statement in SQLITE_SCHEMA:
        conn.execute(statement)
    return conn


def sqlite_consume(path: str) -> None:
    """The floor's consumer process: one UPDATE ... RETURNING claim per task, the result
    written and the message deleted in one transaction; a 0.2 ms sleep when the queue is empty."""
    c = sqlite_connect(path)
    while True:
        row = c.execute("UPDATE q SET state = 1 WHERE id = (SELECT id FROM q WHERE state = 0 ORDER BY id LIMIT 1) "
                        "RETURNING id, body").fetchone()
        if row is None:
            time.sleep(0.0002)
            continue
        x, y = map(int, row[1].split(","))
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO r(id, result) VALUES (?, ?)", (row[0], str(x + y)))
        c.execute("DELETE FROM q WHERE id = ?", (row[0],))
        c.execute("COMMIT")


def sqlite_floor(path: str) -> Figure:
    """One INSERT (its own commit) per send; the result read back by polling its row."""
    conn = sqlite_connect(path)
    proc = subprocess.Popen([PY, __file__, "--consume-sqlite", path], env=ENV)

    def send(i):
        return conn.execute("INSERT INTO q(body) VALUES (?) RETURNING id", (f"{i},{i}",)).fetchone()[0]

    def get(rid):
        while True:
            row = conn.execute("SELECT result FROM r WHERE id = ?", (rid,)).fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.0002)

    try:
        return measured(send, get, proc.pid)
    finally:
        stop(proc)
        conn.close()


def redis_consume(url: str, prefix: str) -> None:
    """The floor's consumer process: BRPOP a message, LPUSH its result to the task's reply list."""
    import redis

    c = redis.Redis.from_url(url)
    while True:
        _, body = c.brpop(prefix + "q")
        rid, x, y = body.split(b",")
        c.lpush(prefix + "r:" + rid.decode(), int(x) + int(y))


def redis_like_floor(client, start_consumer) -> Figure:
    prefix = f"floor{uuid.uuid4().hex[:8]}:"
    stopper, pid = start_consumer(prefix)

    def send(i):
        rid = uuid.uuid4().hex
        client.lpush(prefix + "q", f"{rid},{i},{i}")
        return rid

    def get(rid):
        return int(client.brpop(prefix + "r:" + rid, timeout=60)[1])

    try:
        return measured(send, get, pid)
    finally:
        stopper()
        for key in client.scan_iter(prefix + "*"):
            client.delete(key)


def redis_floor() -> Figure:
    """redis-py LPUSH per send; a consumer process BRPOPs and answers on a reply list per task."""
    import redis

    def start(prefix):
        proc = subprocess.Popen([PY, __file__, "--consume-redis", REDIS_URL, prefix], env=ENV)
        return (lambda: stop(proc)), proc.pid

    return redis_like_floor(redis.Redis.from_url(REDIS_URL), start)


def fakeredis_floor() -> Figure:
    """The same loop on raw fakeredis (one FakeServer, a consumer thread)."""
    import fakeredis

    server = fakeredis.FakeServer()

    def start(prefix):
        c = fakeredis.FakeRedis(server=server)
        done = threading.Event()

        def consume():
            while not done.is_set():
                got = c.brpop(prefix + "q", timeout=0.2)
                if got:
                    rid, x, y = got[1].split(b",")
                    c.lpush(prefix + "r:" + rid.decode(), int(x) + int(y))

        threading.Thread(target=consume, daemon=True).start()
        return done.set, None

    return redis_like_floor(fakeredis.FakeRedis(server=server), start)


def amqp_consume(url: str, queue: str, replies: str) -> None:
    """The RabbitMQ floor's consumer process: a message at a time (prefetch 16), its result
    published (transient, unconfirmed) to the sender's reply queue, then the message acked."""
    import pika

    channel = pika.BlockingConnection(pika.URLParameters(url)).channel()
    channel.basic_qos(prefetch_count=16)

    def on_message(ch, method, _properties, body):
        rid, x, y = body.split(b",")
        ch.basic_publish("", replies, rid + b"," + str(int(x) + int(y)).encode())
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(queue, on_message)
    channel.start_consuming()


def amqp_floor() -> Figure:
    """pika, the promise nbqueue's ``.delay()`` keeps: each send a persistent message to a
    durable queue (``x-max-priority`` 9, as nbqueue's work queues), returning once the broker
    confirmed it; a consumer process answers on a reply queue the sender reads."""
    import pika

    name = f"floor-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = conn.channel()
    channel.confirm_delivery()
    channel.queue_declare(name, durable=True, arguments={"x-max-priority": 9})
    channel.queue_declare(name + ".replies", exclusive=True)
    answers: dict[bytes, int] = {}

    def on_reply(_ch, _method, _properties, body):
        rid, value = body.split(b",")
        answers[rid] = int(value)

    replies = conn.channel()
    replies.basic_consume(name + ".replies", on_reply, auto_ack=True)
    proc = subprocess.Popen([PY, __file__, "--consume-amqp", AMQP_URL, name, name + ".replies"], env=ENV)
    persistent = pika.BasicProperties(delivery_mode=2)

    def send(i):
        rid = uuid.uuid4().hex.encode()
        channel.basic_publish("", name, rid + f",{i},{i}".encode(), persistent)      # returns once confirmed
        return rid

    def get(rid):
        while rid not in answers:
            conn.process_data_events(time_limit=0.05)
        return answers.pop(rid)

    try:
        return measured(send, get, proc.pid)
    finally:
        stop(proc)
        channel.queue_delete(name)
        conn.close()


# -- nbqueue ------------------------------------------------------------------------------------------

def nbqueue_app(broker, backend, queue):
    from bench_tasks import add

    import nbqueue

    app = nbqueue.App(broker, backend, default_queue=queue)
    app.register_tasks({"add": add.fn})
    return app


def nbqueue_loop(broker, backend, process: bool, batch: bool = False) -> Figure:
    """The loop with a worker of 4 threads in this process, or an ``nbqueue worker`` process;
    ``batch``: the sends inside ``with app.batch():`` (written, and confirmed, when it ends)."""
    queue = f"loop-{uuid.uuid4().hex[:6]}"
    app = nbqueue_app(broker, backend, queue)
    add = app.registry["add"]
    proc = worker = None
    if process:
        env = dict(ENV, NBQUEUE_BROKER=broker, NBQUEUE_BACKEND=backend or "", NBQUEUE_DEFAULT_QUEUE=queue)
        proc = subprocess.Popen([PY, "-m", "nbqueue", "--log-level", "WARNING", "worker", "--app", "bench_tasks:app",
                                 "-c", "4"],
                                env=env, stdout=subprocess.DEVNULL)
    else:
        worker = app.start_worker(concurrency=4)
    try:
        return measured(lambda i: add.delay(i, i), lambda h: h.get(timeout=60),
                        proc.pid if proc is not None else None, app.batch if batch else contextlib.nullcontext)
    finally:
        if worker is not None:
            worker.stop()
        if proc is not None:
            stop(proc)
        if broker.startswith("amqp"):
            app.broker.delete_queues([queue])
        app.close()


# -- Huey and Celery ---------------------------------------------------------------------------------

PEER_TIMEOUT = 300      # seconds a peer's get() may wait (a slow peer still gets a figure)


def huey_get(result):
    return result.get(blocking=True, timeout=PEER_TIMEOUT, backoff=1.0, max_delay=0.001)


def peer(measure_peer, *args):
    """A peer's figures, or None (said on stderr) when it could not finish the loop."""
    try:
        return measure_peer(*args)
    except Exception as exc:
        print(f"{measure_peer.__name__}{args[:1]} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None


def huey_loop(kind: str, tmp: str) -> Figure:
    """Huey on SQLite or Redis with a consumer process, or MemoryHuey with its consumer's threads here."""
    name = f"loop{uuid.uuid4().hex[:6]}"
    env = dict(ENV, BENCH_PEER=f"huey-{kind}", BENCH_NAME=name, BENCH_PATH=os.path.join(tmp, name + ".db"),
               BENCH_URL=REDIS_URL)
    saved = {k: os.environ.get(k) for k in ("BENCH_PEER", "BENCH_NAME", "BENCH_PATH", "BENCH_URL")}
    os.environ.update({k: env[k] for k in saved})
    import importlib

    import bench_loop_peers as peers

    peers = importlib.reload(peers)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc = consumer = None
    if kind == "memory":
        consumer = peers.huey_consumer(peers.huey)
        consumer.start()
    else:
        code = "import bench_loop_peers as p; p.huey_consumer(p.huey).run()"     # task names from the module's name
        proc = subprocess.Popen([PY, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        huey_get(peers.add(0, 0))
        tp, sending, cpu = timed_loop(lambda i: peers.add(i, i), huey_get, N,
                                      pid=proc.pid if proc is not None else None)
        p50 = round_trips(lambda i: peers.add(i, i), huey_get, LAT_N)
    finally:
        if consumer is not None:
            consumer.stop(graceful=True)
        if proc is not None:
            stop(proc)
        if kind == "redis":
            peers.huey.storage.flush_all()
    return tp, sending, p50, cpu


def celery_loop() -> Figure:
    """Celery 5, defaults (prefork pool, concurrency 4), results over rpc:// on the same RabbitMQ."""
    name = f"celery-loop-{uuid.uuid4().hex[:6]}"
    env = dict(ENV, BENCH_PEER="celery", BENCH_URL=AMQP_URL, BENCH_NAME=name)
    os.environ.update(BENCH_PEER="celery", BENCH_URL=AMQP_URL, BENCH_NAME=name)
    import importlib

    import bench_loop_peers as peers

    peers = importlib.reload(peers)
    proc = subprocess.Popen([PY, "-m", "celery", "-A", "bench_loop_peers:celery_app", "worker", "-c", "4",
                             "--loglevel", "WARNING"],
                            env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    add = peers.celery_app.tasks["add"]
    try:
        add.delay(0, 0).get(timeout=PEER_TIMEOUT)
        tp, sending, cpu = timed_loop(lambda i: add.delay(i, i), lambda h: h.get(timeout=PEER_TIMEOUT), N)
        p50 = round_trips(lambda i: add.delay(i, i), lambda h: h.get(timeout=PEER_TIMEOUT), LAT_N)
    finally:
        stop(proc)
        with peers.celery_app.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)
    return tp, sending, p50, cpu


# -- the table --------------------------------------------------------------------------------------

def fmt(figure) -> str:
    return "" if figure is None else f"{figure[0]:,.0f}/s"


def measure(kinds: list[str], tmp: str) -> list[tuple]:
    """Rows: (label, nbqueue, floor, floor label, Huey, Celery), each figure (tasks/s, sends/s, p50 ms) or None."""
    have_huey = importlib.util.find_spec("huey") is not None
    have_celery = importlib.util.find_spec("celery") is not None
    rows = []

    def db():
        return f"sqlite:///{os.path.join(tmp, uuid.uuid4().hex[:8] + '.db')}"

    if "sqlite" in kinds:
        floor = sqlite_floor(os.path.join(tmp, "floor.db"))
        huey = peer(huey_loop, "sqlite", tmp) if have_huey else None
        url = db()
        rows.append(("SQLite, `nbqueue worker` in another process", nbqueue_loop(url, None, True), floor, huey, None))
        url = db()
        rows.append(("SQLite, worker threads in the sending process", nbqueue_loop(url, None, False), floor, None,
                     None))
    if "redis" in kinds:
        floor = redis_floor()
        huey = peer(huey_loop, "redis", tmp) if have_huey else None
        url = f"{REDIS_URL}?key_prefix=loop{uuid.uuid4().hex[:6]}"
        rows.append(("Redis, `nbqueue worker` process", nbqueue_loop(url, None, True), floor, huey, None))
    if "amqp" in kinds:
        floor = amqp_floor()
        celery = peer(celery_loop) if have_celery else None
        rows.append(("RabbitMQ, `nbqueue worker` process", nbqueue_loop(AMQP_URL, db(), True), floor, None, celery))
        batched = nbqueue_loop(AMQP_URL, db(), True, batch=True)
        rows.append(("RabbitMQ, the sends in `with app.batch():`", batched, floor, None, celery))
    if "memory" in kinds:
        floor = fakeredis_floor()
        huey = peer(huey_loop, "memory", tmp) if have_huey else None
        memory = nbqueue_loop(f"memory://loop{uuid.uuid4().hex[:6]}", None, False)
        rows.append(("`memory://` in process", memory, floor, huey, None))
    return rows


#: the loop as first measured on this machine, before the per-call work (rate, ratio then): a
#: figure of another run, shown beside today's for direction only (the ratios are the comparison)
FIRST_MEASURED = {
    "SQLite, `nbqueue worker` in another process": "776/s, 0.06x",
    "SQLite, worker threads in the sending process": "3,263/s, 0.25x",
    "Redis, `nbqueue worker` process": "2,113/s, 0.51x",
    "RabbitMQ, `nbqueue worker` process": "708/s",
    "`memory://` in process": "419/s, 0.11x",
}


def table(rows) -> str:
    lines = ["| store | first measured | nbqueue | floor | ratio | Huey (tuned) | Celery | p50 nbqueue / floor "
             "| CPU µs per task, nbqueue / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, nbq, floor, huey, celery in rows:
        ratios = [f"{nbq[0] / floor[0]:.2f}x"] if floor else []
        ratios += [f"{nbq[0] / celery[0]:.2f}x Celery"] if celery else []
        ratio = ", ".join(ratios)
        p50 = f"{nbq[2]:.2f} ms" + (f" / {floor[2]:.2f} ms" if floor else "")
        lines.append(f"| {label} | {FIRST_MEASURED.get(label, '')} | {fmt(nbq)} (sending {nbq[1]:,.0f}/s) "
                     f"| {fmt(floor)}{f' (sending {floor[1]:,.0f}/s)' if floor else ''} | {ratio} | {fmt(huey)} "
                     f"| {fmt(celery)} | {p50} | {nbq[3]}{f' / {floor[3]}' if floor else ''} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--consume-sqlite"]:
        return sqlite_consume(argv[1])
    if argv[:1] == ["--consume-redis"]:
        return redis_consume(argv[1], argv[2])
    if argv[:1] == ["--consume-amqp"]:
        return amqp_consume(*argv[1:4])
    known = ["sqlite", "redis", "amqp", "memory"]
    kinds = ["amqp" if kind == "rabbitmq" else kind for kind in argv] or known
    unknown = sorted(set(kinds) - set(known))
    if unknown:
        sys.exit(f"bench_loop.py: unknown store {', '.join(unknown)}; choose from {', '.join(known)} (rabbitmq = amqp)")
    tmp = tempfile.mkdtemp(prefix="nbqueue-loop-")
    print(f"nbqueue: .delay() then .get() per handle, N={N}, round trips {LAT_N}; {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}", flush=True)
    try:
        print(table(measure(kinds, tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
