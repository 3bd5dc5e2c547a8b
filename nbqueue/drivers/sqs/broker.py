"""Amazon SQS broker with boto3 (``pip install 'nbqueue[sqs]'``).

URLs:

- ``https://sqs.<region>.amazonaws.com/<account>`` as machinery spells it: the region
  comes from the host, queues are looked up in that account.
- ``sqs://`` with the endpoint and region from options or boto3's usual sources
  (``AWS_DEFAULT_REGION``, ``~/.aws/config``); ``sqs://?region=eu-west-1``.
- ``sqs://host:port`` for an SQS-compatible server over plain HTTP (moto, ElasticMQ,
  LocalStack); ``endpoint_url`` (option or query) for anything else.
- Credentials: boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, an instance role), or in the URL: ``sqs://KEY:SECRET@host:port``
  (URL-quoted: ``/`` as ``%2F``, ``+`` as ``%2B``; the secret is redacted wherever the
  URL is shown).

Options (App keyword arguments or URL query; an option given wins over the URL's):
``region``, ``endpoint_url``, ``max_deliveries`` (1 or more, default 5),
``wait_time_seconds`` (longest long poll, whole seconds from 0 to 20, default 20),
``idle_poll`` (seconds, 0 or more, after an empty poll during which a short reserve
long-polls for a second instead, default 1.0; see Receiving), ``create_queues`` (default
true; in a URL ``true``/``false``, ``yes``/``no``, ``on``/``off`` or ``1``/``0``). Any
other value is a ConfigurationError naming the option when the broker is made.

Capabilities:

- Queues: a missing queue is created on first use (standard, or FIFO for names
  ending in ``.fifo``) with a dead-letter queue ``<name>-dead`` (``<name>-dead.fifo``)
  and a redrive policy; with ``create_queues=false`` a missing queue is a
  ConfigurationError. A queue made elsewhere keeps its own redrive policy's
  dead-letter queue. Names are 1-75 letters, digits, ``-`` and ``_`` (SQS allows 80;
  the ``-dead`` suffix needs 5), plus ``.fifo``.
- Queue names with dots: nbqueue separates the names it derives with ``.`` (a notebook's
  code queue ``<queue>.code``, a kernel's queue ``<queue>.kernel-<pid>-<hex>``), which
  SQS refuses. Each ``.`` but that of a final ``.fifo`` is written ``-_`` in the SQS name
  (``jobs.code`` is the SQS queue ``jobs-_code``; ``jobs.fifo.code`` is the standard queue
  ``jobs-_fifo-_code``), and a dotted name longer than 75 characters once written so is cut
  to 61 and ends in ``-_`` and 12 hex digits of the SHA-256 of nbqueue's name. So ``-_``
  marks nbqueue's mapping, and a name given to this broker may not contain it (nor end in
  ``.``): every name maps to its own SQS queue. The ending ``-dead`` marks the dead-letter
  queues this broker makes: a name whose SQS name would end so gets ``-_`` appended
  (``jobs-dead`` is the SQS queue ``jobs-dead-_``, with the dead-letter queue
  ``jobs-dead-_-dead``), so no queue is another's dead-letter queue. Anything else SQS
  cannot hold (spaces, ``/``, a name without dots over 75 characters) is a
  ConfigurationError naming it at send and in the worker's log. Deliveries, ``stats()``,
  ``purge()``, ``dead_letters()`` and the dashboard speak nbqueue's names.
- Leases: the visibility timeout, in whole seconds (a lease is rounded up, at most 12
  hours from the receive: SQS's limit); ``extend()`` is ChangeMessageVisibility, which the
  worker's heartbeat calls. A delivery not acknowledged in time is received again.
- Receiving: batches of up to 10 (``ReceiveMessage`` returns no more); long polling of
  up to ``wait_time_seconds`` when the reserve may wait a second or more. With several
  queues each is short-polled in turn, then one is long-polled for a second (so a
  message on another queue waits at most about a second). A reserve asked to wait less
  than a second (a worker asks for 0.25 s, to stop promptly) short-polls once, and is
  woken by a publish from this process; once its queues were found empty (within
  ``idle_poll`` seconds) it long-polls for a second instead, overrunning its timeout by
  less than a second. So an idle worker thread makes about one request a second, a
  message sent from anywhere is received at once, and short polling's sampling (SQS
  may answer a short poll with nothing while messages wait) does not leave a waiting
  message unseen. ``idle_poll=0`` keeps every reserve within its timeout.
- Delays (eta, retry with eta): up to 15 minutes natively (``DelaySeconds``, rounded up
  to whole seconds: never early). Longer delays travel in 15-minute hops: the due time
  rides in the ``nbq-eta`` attribute and a message received early is sent again with
  the rest of its delay (and the original deleted) instead of being handed out; hops do
  not count as deliveries. FIFO queues have no per-message delays: a FIFO message
  received early is hidden for the rest of its delay (ChangeMessageVisibility, up to 12
  hours); received early again, it is sent again (so a copy is hidden once at most).
- Bounded redelivery (see nbqueue.broker): a lapse is a receive whose visibility
  timeout ran out. SQS's ``ApproximateReceiveCount`` counts every receive of a message,
  so nothing else may end a receive with the message left in place: every hand-back
  that is not a lapse (``release``, ``retry`` (with or without a new body or eta),
  ``defer``, a delay's hop, a batch-mate put back, ``reject``) sends a copy carrying the
  counts so far in attributes (``nbq-attempts``, ``nbq-lapses``) and deletes the
  original; ``ack`` deletes it. A copy's earlier receives are then its lapses:
  ``Delivery.lapsed`` = ``nbq-lapses`` + ApproximateReceiveCount - 1 (less the one early
  receive that hid a FIFO copy until its eta, known from
  ``ApproximateFirstReceiveTimestamp``). ``maybe_lapsed`` is never set. A message after a
  lapse is handed out alone (its batch-mates of the same receive are put back as
  ``release`` does); at ``max_deliveries`` lapses it is handed out with ``dead_reason``
  "delivered N times without finishing" for the worker to fail its record and
  dead-letter it. ``defer`` is a retry with an eta: the copy keeps ``nbq-lapses``, so it
  comes back ``after_lapse``. A second copy of a held message (see Stale deliveries)
  adds a receive, so a later lapse of that delivery counts one too many (rare).
- Redrive policy, a backstop: queues this broker creates get ``maxReceiveCount`` =
  ``max_deliveries`` + 1 (+ 1 more on FIFO queues, for the early receive): the most
  receives a copy has up to and including its ``dead_reason`` delivery, so SQS moves a
  message (at its next receive) only when that delivery lapsed as well (its worker died
  before dead-lettering it); such a dead letter shows the redrive policy as its reason.
- Attempts: ``Delivery.attempt`` is ``nbq-attempts`` (attempts of earlier copies:
  ``retry()`` counts its reservation, ``release()`` and a put-back batch-mate do not)
  + this copy's lapses + 1.
- Priority: **not supported** (``Capabilities.priority`` False): SQS has no priorities and
  this broker does not emulate them; ``priority`` is accepted, carried on the delivery
  and otherwise ignored. Use a separate queue (and worker) for urgent work.
- Dedupe (publishing an id already waiting is a no-op): **no** on standard queues
  (``Capabilities.dedupes_publish`` False): the result backend refuses to run a task twice. FIFO
  queues use the task id as ``MessageDeduplicationId`` (SQS drops a repeat within 5
  minutes) and as ``MessageGroupId`` (so tasks do not wait for one another; FIFO order
  holds per task id only).
- Delivery: at least once (``Capabilities.delivers_once`` False). SQS standard queues may, rarely,
  hand one message to two consumers at the same time (AWS documents this; moto's server
  does it under concurrent receives); the result backend's fencing tokens record the task
  once and a final record is not run again. FIFO queues deliver exactly once.
- Stale deliveries: SQS accepts a stale receipt handle for some calls, so this broker
  fences in process: ack/retry/extend/reject/release of a delivery whose message was
  received again by this broker object after its lease ran out return False. A copy
  received while this broker's delivery of the message still holds its lease is not
  handed out again; its receipt (the newest, which SQS wants) is used for what follows. Across processes the result
  backend's fencing tokens keep a stale attempt from recording.
- Dead letters: ``reject()`` sends a copy to the dead-letter queue with ``nbq-reason``
  and ``nbq-queue`` attributes, then deletes the original; ``dead_letters()`` peeks
  (receives with a zero visibility timeout).
- stats(): per queue this broker used, from SQS's approximate counts: ready
  (ApproximateNumberOfMessages), delayed (...Delayed), in_flight (...NotVisible), dead
  (the dead-letter queue's messages). purge(queue) empties the queue: the visible
  messages are received and deleted (so that their tasks can be revoked), then PurgeQueue
  removes the delayed and in-flight ones (draining again when SQS refuses a second purge
  within 60 s); it returns the approximate count the queue held.
- Size: a message body is at most 1 MiB (SQS's limit; less if the queue's
  MaximumMessageSize says so); a larger one is refused with PublishRefused naming it.
- Errors: missing or wrong credentials and a missing region are ConfigurationErrors
  naming the setting to fix; throttling and transient errors are retried by botocore
  (standard retry mode, exponential back-off, up to 10 attempts).
- Processes: the boto3 client is thread-safe; a forked child makes its own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit

import boto3
import botocore.config
import botocore.exceptions as bex

from ...broker import Broker, Capabilities, Delivery, Outgoing, Purged
from ...errors import BrokerError, ConfigurationError, PublishRefused
from ...options import count, flag, over_query, seconds, string, url_query
from ...urls import redact
from ...wakeups import WAKEUPS

log = logging.getLogger(__name__)

#: SQS's limits
MAX_BATCH = 10                      # entries per SendMessageBatch / ReceiveMessage / DeleteMessageBatch
MAX_DELAY_S = 900                   # DelaySeconds
MAX_VISIBILITY_S = 43_200           # a message's visibility, counted from its receive
MAX_BODY_BYTES = 1_048_576          # one message, and one batch request
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}(\.fifo)?$")
MAX_NAME = 75                       # before .fifo: SQS's 80 less our "-dead" suffix
#: nbqueue's "." (bar a final ".fifo") in SQS names; reserved, so the mapping stays one to one
DOT = "-_"
#: the ending of the dead-letter queues this broker makes; an SQS name of nbqueue's queue ending so
#: gets DOT appended (names ending in "." are refused), so no queue's name is another's dead-letter queue
DEAD = "-dead"

#: our message attributes
A_ID, A_ETA, A_ATTEMPTS, A_REASON, A_QUEUE, A_PRIORITY = (
    "nbq-id",
    "nbq-eta",
    "nbq-attempts",
    "nbq-reason",
    "nbq-queue",
    "nbq-priority",
)
A_LAPSES = "nbq-lapses"             # lapses counted on earlier copies of the message

#: a FIFO message hidden until its eta (local clock) is taken for received early when SQS's
#: first-receive time (SQS's clock) is before eta + this: clock skew then undercounts a lapse
#: rather than counting one that did not happen
CLOCK_SLACK_S = 5.0

#: SQS's longest long poll (ReceiveMessage's WaitTimeSeconds)
MAX_WAIT_TIME_S = 20

OPTIONS = {
    "region": "",
    "endpoint_url": "",
    "max_deliveries": 5,
    "wait_time_seconds": 20,
    "idle_poll": 1.0,
    "create_queues": True,
}

#: error codes that mean the credentials are missing or wrong
CREDENTIAL_CODES = {"InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException", "AccessDenied",
                    "AccessDeniedException", "ExpiredToken", "InvalidSecurity", "MissingAuthenticationToken"}
CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or put them in the broker URL "
                    "as sqs://KEY:SECRET@...")


def _attr(value: Any) -> dict:
    return {
        "DataType": "Number" if isinstance(value, (int, float)) else "String",
        "StringValue": repr(value) if isinstance(value, float) else str(value),
    }


def dead_queue_name(queue: str) -> str:
    """The dead-letter queue this broker makes for the SQS queue ``queue`` (an SQS name)."""
    return queue[:-5] + DEAD + ".fifo" if queue.endswith(".fifo") else queue + DEAD


@functools.lru_cache(maxsize=4096)
def sqs_name(queue: str) -> str:
    """The SQS queue that holds nbqueue's queue ``queue`` (see "Queue names with dots" in the
    module docstring); ConfigurationError naming ``queue`` when SQS can hold none."""
    stem, fifo = (queue[:-5], ".fifo") if queue.endswith(".fifo") else (queue, "")
    if DOT in stem:
        raise ConfigurationError(f"{queue!r} is not a usable SQS queue name: '{DOT}' is reserved (the SQS broker "
                                 "writes nbqueue's '.' separators so)")
    if stem.endswith("."):
        raise ConfigurationError(f"{queue!r} is not a usable SQS queue name: a name may not end in '.' (nor in "
                                 "'..fifo')")
    name = stem.replace(".", DOT)
    if name.endswith(DEAD):
        name += DOT                 # the "-dead" ending marks the dead-letter queues this broker makes
    if "." in stem and len(name) > MAX_NAME:
        digest = hashlib.sha256(queue.encode("utf-8")).hexdigest()[:12]
        name = name[:MAX_NAME - len(DOT) - len(digest)] + DOT + digest
    if not QUEUE_NAME.match(name + fifo) or len(name) > MAX_NAME:
        raise ConfigurationError(f"{queue!r} is not a usable SQS queue name: 1-{MAX_NAME} letters, digits, '-', '_' "
                                 "and '.', optionally ending in '.fifo' (one ending in '-dead' is written with 2 more)")
    return name + fifo


class SQSBroker(Broker):
    """Amazon SQS broker; see the module docstring for what it supports."""

    scheme = "sqs"
    capabilities = Capabilities(priority=False, dedupes_publish=False, delivers_once=False)
    #: the longest native delay; longer ones hop (an attribute, so tests can shorten it)
    max_delay = MAX_DELAY_S

    def __init__(self, url: str = "sqs://", *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        parts = urlsplit(url)
        query = url_query(url, OPTIONS)
        option = over_query(query, self.options).get     # an option given wins over the URL's
        self.region = string("region", option("region"), None)
        self.endpoint_url = string("endpoint_url", option("endpoint_url"), None)
        self.max_deliveries = count("max_deliveries", option("max_deliveries"), OPTIONS["max_deliveries"])
        self.wait_time_seconds = count("wait_time_seconds", option("wait_time_seconds"), OPTIONS["wait_time_seconds"],
                                       minimum=0, maximum=MAX_WAIT_TIME_S)
        self.idle_poll = seconds("idle_poll", option("idle_poll"), OPTIONS["idle_poll"])
        self.create_queues = flag("create_queues", option("create_queues"), OPTIONS["create_queues"])
        self.account: str | None = None
        scheme = parts.scheme.lower()
        if scheme == "https":
            found = re.match(r"^sqs[.-]([a-z0-9-]+)\.amazonaws\.com(\.cn)?$", (parts.hostname or "").lower())
            if not found:
                raise ConfigurationError(
                    "an https:// broker URL must be an SQS endpoint such as "
                    "https://sqs.<region>.amazonaws.com/<account>, "
                    f"not {redact(url)!r}"
                )
            self.region = self.region or found.group(1)
            self.endpoint_url = self.endpoint_url or f"https://{parts.netloc.rpartition('@')[2]}"
        elif scheme == "sqs":
            if parts.hostname and not self.endpoint_url:
                self.endpoint_url = f"http://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        else:
            raise ConfigurationError(f"not an SQS URL: {redact(url)!r} (use sqs://, sqs://host:port or https://sqs.<region>.amazonaws.com/<account>)")
        account = parts.path.strip("/")
        self.account = account or None
        self._keys = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
        self._pid = os.getpid()
        self._fresh_state()

    def _fresh_state(self) -> None:
        """Client and caches of this process (called again in a forked child)."""
        self._client_obj = None
        self._client_lock = threading.Lock()
        self._urls: dict[str, str] = {}           # SQS name -> URL
        self._urls_lock = threading.Lock()
        self._dead: dict[str, str] = {}            # SQS name of a queue -> that of its dead-letter queue
        self._used: dict[str, None] = {}          # nbqueue's queues this broker published to or reserved from, in order
        #: SQS message id -> [the receipt its delivery holds, lease end (monotonic), the newest receipt]
        self._receipts: dict[str, list] = {}
        self._receipts_lock = threading.Lock()
        self._quiet = threading.local()            # .queues, .at: the last poll that found nothing (per thread)
        self._rotation = 0

    # -- the client -----------------------------------------------------------------------
    @property
    def client(self):
        if os.getpid() != self._pid:         # a forked child: the parent's connection pool is not ours
            self._pid = os.getpid()
            self._fresh_state()
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    config = botocore.config.Config(
                        retries={"mode": "standard", "max_attempts": 10},
                        max_pool_connections=50,
                        connect_timeout=10,
                        read_timeout=self.wait_time_seconds + 20,
                    )
                    kwargs: dict[str, Any] = {
                        "region_name": self.region,
                        "endpoint_url": self.endpoint_url,
                        "config": config,
                    }
                    if self._keys:
                        kwargs.update(aws_access_key_id=self._keys[0], aws_secret_access_key=self._keys[1])
                    try:
                        self._client_obj = boto3.session.Session().client("sqs", **kwargs)
                    except bex.NoRegionError:
                        raise ConfigurationError(
                            f"no AWS region for the SQS broker {redact(self.url)}: add ?region=... to the URL "
                            "or set AWS_DEFAULT_REGION"
                        ) from None
        return self._client_obj

    def _call(self, operation: str, **params) -> dict:
        """One SQS API call; credential problems become ConfigurationErrors naming what to set."""
        try:
            return getattr(self.client, operation)(**params)
        except (bex.NoCredentialsError, bex.PartialCredentialsError) as exc:
            raise ConfigurationError(
                f"no AWS credentials for the SQS broker {redact(self.url)} ({exc}): {CREDENTIALS_HINT}"
            ) from None
        except bex.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in CREDENTIAL_CODES:
                raise ConfigurationError(
                    f"SQS refused the credentials for {redact(self.url)} ({code}: "
                    f"{exc.response['Error'].get('Message', '')}): {CREDENTIALS_HINT}"
                ) from None
            raise
        except bex.EndpointConnectionError as exc:
            raise BrokerError(f"cannot reach SQS at {self.endpoint_url or 'its AWS endpoint'}: {exc}") from exc

    @staticmethod
    def _code(exc: bex.ClientError) -> str:
        return exc.response.get("Error", {}).get("Code", "")

    # -- queues ---------------------------------------------------------------------------
    def _url(self, queue: str) -> str:
        """The URL of nbqueue's queue ``queue``; a missing queue is created with its dead-letter queue."""
        return self._sqs_url(sqs_name(queue), shown=queue)

    def _sqs_url(self, name: str, *, dead: bool = False, shown: str | None = None) -> str:
        """The URL of the SQS queue ``name`` (nbqueue's ``shown``, for errors); a missing queue
        is created (a dead-letter queue ``dead`` without one of its own)."""
        url = self._urls.get(name)
        if url is not None:
            return url
        with self._urls_lock:
            url = self._urls.get(name)
            if url is None:
                url = self._lookup(name)
                if url is None:
                    if not self.create_queues:
                        called = f" (nbqueue's {shown!r})" if shown and shown != name else ""
                        raise ConfigurationError(f"SQS queue {name!r}{called} does not exist and create_queues is off: "
                                                 "create it, or let the broker create it")
                    url = self._create_dead(name) if dead else self._create(name)
                self._urls[name] = url
        return url

    def _lookup(self, queue: str) -> str | None:
        params: dict[str, Any] = {"QueueName": queue}
        if self.account:
            params["QueueOwnerAWSAccountId"] = self.account
        try:
            return self._call("get_queue_url", **params)["QueueUrl"]
        except bex.ClientError as exc:
            if self._code(exc) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                return None
            raise

    def _create_dead(self, queue: str) -> str:
        attributes = {"MessageRetentionPeriod": "1209600"}       # 14 days, SQS's longest
        if queue.endswith(".fifo"):
            attributes["FifoQueue"] = "true"
        return self._call("create_queue", QueueName=queue, Attributes=attributes)["QueueUrl"]

    def _create(self, queue: str) -> str:
        """Create the queue and its dead-letter queue, with a redrive policy between them."""
        fifo = queue.endswith(".fifo")
        dead = dead_queue_name(queue)
        dead_url = self._urls[dead] = self._create_dead(dead)
        dead_arn = self._call("get_queue_attributes", QueueUrl=dead_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        # a copy's receives are its lapses, the delivery that comes with dead_reason and, on a FIFO
        # queue, one early receive hiding it until its eta: SQS moves it only if that delivery lapses too
        receives = self.max_deliveries + (2 if fifo else 1)
        policy = '{"deadLetterTargetArn": "%s", "maxReceiveCount": "%d"}' % (dead_arn, receives)
        attributes = {"RedrivePolicy": policy, **({"FifoQueue": "true"} if fifo else {})}
        url = self._call("create_queue", QueueName=queue, Attributes=attributes)["QueueUrl"]
        self._dead[queue] = dead
        log.info("created SQS queue %s with dead-letter queue %s", queue, dead)
        return url

    def _note(self, queue: str) -> None:
        self._used.setdefault(queue, None)

    # -- publishing -----------------------------------------------------------------------
    def publish_many(self, outs: Sequence[Outgoing]) -> None:
        by_queue: dict[str, list[dict]] = {}
        now = self.clock.time()
        for o in outs:
            by_queue.setdefault(o.queue, []).append(
                self._entry(o.id, o.queue, o.body, o.eta, o.priority, 0, now, first=True)
            )
        for queue, entries in by_queue.items():
            self._note(queue)
            self._send(queue, entries)
        if outs:
            WAKEUPS.notify(self._wake_key)

    def _entry(
        self,
        message_id: str,
        queue: str,
        body: str,
        eta: float | None,
        priority: int,
        attempts: int,
        now: float,
        *,
        lapses: int = 0,
        first: bool = False,
        extra: dict | None = None,
    ) -> dict:
        """A SendMessageBatch entry (without its batch Id); ``attempts`` and ``lapses`` are those of
        earlier copies (see _delivery)."""
        size = len(body.encode("utf-8"))
        if size > MAX_BODY_BYTES:
            raise PublishRefused(
                f"message {message_id} is {size:,} bytes; an SQS message holds at most {MAX_BODY_BYTES:,} "
                "(keep large values out of task arguments)"
            )
        attributes = {A_ID: _attr(message_id), A_ATTEMPTS: _attr(int(attempts))}
        if lapses:
            attributes[A_LAPSES] = _attr(int(lapses))
        if priority:
            attributes[A_PRIORITY] = _attr(int(priority))
        entry: dict[str, Any] = {"MessageBody": body}
        if eta is not None and eta > now:
            attributes[A_ETA] = _attr(float(eta))
            if not queue.endswith(".fifo"):
                entry["DelaySeconds"] = min(self.max_delay, math.ceil(eta - now))
        attributes.update(extra or {})
        entry["MessageAttributes"] = attributes
        if queue.endswith(".fifo"):
            entry["MessageGroupId"] = message_id
            # the task id itself for a first publish (a repeat within 5 minutes is dropped);
            # copies (retries, hand-backs, dead letters) are new messages
            entry["MessageDeduplicationId"] = message_id if first else f"{message_id}.{uuid.uuid4().hex[:12]}"
        return entry

    def _send(self, queue: str, entries: list[dict]) -> None:
        """SendMessageBatch in chunks of 10 entries and at most 1 MiB; entries SQS fails are sent
        again once when the fault is SQS's, else PublishRefused."""
        url = self._url(queue)
        chunk: list[dict] = []
        size = 0
        for entry in entries:
            n = len(entry["MessageBody"].encode("utf-8")) + 1024        # attributes, roughly
            if chunk and (len(chunk) == MAX_BATCH or size + n > MAX_BODY_BYTES):
                self._send_batch(queue, url, chunk)
                chunk, size = [], 0
            chunk.append(entry)
            size += n
        if chunk:
            self._send_batch(queue, url, chunk)

    def _send_batch(self, queue: str, url: str, entries: list[dict]) -> None:
        pending = {str(i): e for i, e in enumerate(entries)}
        for attempt in range(3):
            reply = self._call("send_message_batch", QueueUrl=url, Entries=[{"Id": i, **e} for i, e in pending.items()])
            failed = reply.get("Failed") or []
            if not failed:
                return
            refused = [f for f in failed if f.get("SenderFault")]
            if refused:
                f = refused[0]
                message_id = pending[f["Id"]]["MessageAttributes"][A_ID]["StringValue"]
                raise PublishRefused(
                    f"SQS refused message {message_id} for queue {queue!r}: {f.get('Code')}: {f.get('Message')}"
                )
            pending = {f["Id"]: pending[f["Id"]] for f in failed}
            time.sleep(0.1 * 2 ** attempt)
        raise PublishRefused(f"SQS did not take {len(pending)} message(s) for queue {queue!r} after 3 tries")

    # -- consuming ------------------------------------------------------------------------
    @property
    def _wake_key(self):
        return ("sqs", self.endpoint_url or self.region or "aws")

    def reserve(
        self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1
    ) -> list[Delivery]:
        queues = list(queues)
        deadline = time.monotonic() + max(0.0, timeout)
        visibility = max(1, min(MAX_VISIBILITY_S, math.ceil(lease)))
        for q in queues:
            self._note(q)
        key = tuple(queues)
        while True:
            version = WAKEUPS.version(self._wake_key)
            remaining = deadline - time.monotonic()
            quiet = getattr(self._quiet, "queues", None) == key and time.monotonic() - self._quiet.at < self.idle_poll
            if remaining >= 1:
                wait = int(min(self.wait_time_seconds, remaining))
            else:
                wait = 1 if quiet and timeout > 0 else 0   # found empty just now: a long poll of a second
            got = self._poll(queues, wait, visibility, limit)
            if got:
                self._quiet.queues = None
                return got
            self._quiet.queues, self._quiet.at = key, time.monotonic()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if wait == 0:
                # a short look found nothing: wait for a publish of this process, or the time left
                if WAKEUPS.wait(self._wake_key, version, remaining) == version:
                    return []
                self._quiet.queues = None            # published here: look again at once

    def _poll(self, queues: list[str], wait: int, visibility: int, limit: int) -> list[Delivery]:
        """One round: the only queue polled (long when ``wait``), or each of several short-polled,
        then one of them long-polled for a second."""
        if len(queues) == 1:
            return self._receive(queues[0], min(limit, MAX_BATCH), wait, visibility)
        for q in queues:
            got = self._receive(q, min(limit, MAX_BATCH), 0, visibility)
            if got:
                return got
        if wait:
            self._rotation += 1
            return self._receive(queues[self._rotation % len(queues)], min(limit, MAX_BATCH), 1, visibility)
        return []

    def _receive(self, queue: str, limit: int, wait: int, visibility: int) -> list[Delivery]:
        url = self._url(queue)
        reply = self._call(
            "receive_message",
            QueueUrl=url,
            MaxNumberOfMessages=max(1, min(MAX_BATCH, limit)),
            WaitTimeSeconds=wait,
            VisibilityTimeout=visibility,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp"],
        )
        now = self.clock.time()
        out = []
        for m in reply.get("Messages") or []:
            delivery = self._delivery(queue, url, m, now, visibility)
            if delivery is not None:
                out.append(delivery)
        if len(out) > 1 and any(d.after_lapse for d in out):
            # a message after a lapse comes alone (it may kill its worker): the rest go back uncounted
            alone = next(d for d in out if d.after_lapse)
            self._hand_back(queue, url, [d for d in out if d is not alone])
            out = [alone]
        return out

    def _delivery(self, queue: str, url: str, m: dict, now: float, visibility: int) -> Delivery | None:
        """A Delivery for a received message, or None when it was put off (not due yet) or is a
        second copy of one this broker holds.

        Every hand-back that is not a lapse (ack, release, retry, defer, reject, a delay's hop,
        a batch-mate of a message that comes alone) deletes the message, after sending a copy
        that carries the attempts (``nbq-attempts``) and lapses (``nbq-lapses``) counted so far.
        So a copy's earlier receives ended with its visibility timeout: lapses, but for the one
        early receive that hid a FIFO copy until its eta."""
        attrs = {k: v.get("StringValue") for k, v in (m.get("MessageAttributes") or {}).items()}
        system = m.get("Attributes") or {}
        message_id = attrs.get(A_ID) or m["MessageId"]
        receives = max(1, int(system.get("ApproximateReceiveCount", 1)))
        eta = float(attrs[A_ETA]) if attrs.get(A_ETA) else None
        if eta is not None and eta > now:
            self._delay_again(queue, url, m, message_id, attrs, eta, now, receives)
            return None
        early = 0
        if eta is not None and queue.endswith(".fifo") and receives > 1:
            first = int(system.get("ApproximateFirstReceiveTimestamp", 0)) / 1000.0
            early = 1 if first and first < eta + CLOCK_SLACK_S else 0
        lapsed_here = max(0, receives - 1 - early)
        lapsed = int(attrs.get(A_LAPSES) or 0) + lapsed_here
        attempt = int(attrs.get(A_ATTEMPTS) or 0) + lapsed_here + 1
        tag = (url, m["MessageId"], m["ReceiptHandle"])
        receipt = m["ReceiptHandle"]
        with self._receipts_lock:
            held = self._receipts.get(m["MessageId"])
            if held is not None and held[1] > time.monotonic() and held[0] != receipt:
                # a second copy of a message this process holds (a concurrent receive): not handed
                # out again; SQS wants the newest receipt for what follows
                held[2] = receipt
                return None
            self._receipts[m["MessageId"]] = [receipt, time.monotonic() + visibility, receipt]
        return Delivery(
            message_id=message_id,
            queue=queue,
            body=m["Body"],
            attempt=attempt,
            lease_until=now + visibility,
            tag=tag,
            priority=int(attrs.get(A_PRIORITY) or 0),
            lapsed=lapsed,
            dead_reason=self.limit_reason(lapsed),
        )

    def _delay_again(
        self, queue: str, url: str, m: dict, message_id: str, attrs: dict, eta: float, now: float, receives: int
    ) -> None:
        """A message received before its due time: sent again for the rest of its delay (the
        original deleted), or, on a FIFO queue (no per-message delays), hidden until then. A FIFO
        copy is hidden once at most: received early again (its eta more than 12 hours away, or
        the hiding failed), it is sent again, so its receives tell its lapses (see _delivery)."""
        if queue.endswith(".fifo") and receives < 2:
            try:
                self._call("change_message_visibility", QueueUrl=url, ReceiptHandle=m["ReceiptHandle"],
                           VisibilityTimeout=max(1, min(MAX_VISIBILITY_S - 60, math.ceil(eta - now))))
            except bex.ClientError as exc:
                log.warning("could not hide early message %s on %s until its eta: %s", message_id, queue, exc)
            return
        entry = self._entry(
            message_id,
            queue,
            m["Body"],
            eta,
            int(attrs.get(A_PRIORITY) or 0),
            int(attrs.get(A_ATTEMPTS) or 0),
            now,
            lapses=int(attrs.get(A_LAPSES) or 0),
        )
        self._send_batch(queue, url, [entry])
        self._delete(url, m["ReceiptHandle"])

    def _hand_back(self, queue: str, url: str, deliveries: list[Delivery]) -> None:
        """Put back received messages that are not handed out, as release() does (a copy sent,
        the original deleted), in batches."""
        now = self.clock.time()
        entries, receipts = [], []
        for d in deliveries:
            receipt = self._receipt(d, forget=True)
            if receipt is not None:
                entries.append(
                    self._entry(d.message_id, queue, d.body, None, d.priority, d.attempt - 1, now, lapses=d.lapsed)
                )
                receipts.append(receipt)
        if entries:
            self._send(queue, entries)
        for start in range(0, len(receipts), MAX_BATCH):
            self._call(
                "delete_message_batch",
                QueueUrl=url,
                Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(receipts[start : start + MAX_BATCH])],
            )
        if entries:
            WAKEUPS.notify(self._wake_key)

    # -- acting on deliveries -------------------------------------------------------------------
    def _receipt(self, delivery: Delivery, *, forget: bool = False) -> str | None:
        """The receipt to act with while ``delivery`` is this broker's latest of its message
        (the newest SQS gave for it), else None: the delivery is stale."""
        if not isinstance(delivery.tag, tuple):
            return None
        _, sqs_id, receipt = delivery.tag
        with self._receipts_lock:
            held = self._receipts.get(sqs_id)
            if held is None or held[0] != receipt:
                return None
            if forget:
                del self._receipts[sqs_id]
            return held[2]

    def _delete(self, url: str, receipt: str) -> bool:
        try:
            self._call("delete_message", QueueUrl=url, ReceiptHandle=receipt)
            return True
        except bex.ClientError as exc:
            if self._code(exc) in (
                "ReceiptHandleIsInvalid",
                "InvalidParameterValue",
                "AWS.SimpleQueueService.NonExistentQueue",
            ):
                return False
            raise

    def ack(self, delivery: Delivery) -> bool:
        return self.ack_many([delivery])[0]

    def ack_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        results = [False] * len(deliveries)
        by_url: dict[str, list[tuple[int, str]]] = {}
        for i, d in enumerate(deliveries):
            receipt = self._receipt(d, forget=True)
            if receipt is not None:
                by_url.setdefault(d.tag[0], []).append((i, receipt))
        for url, items in by_url.items():
            for start in range(0, len(items), MAX_BATCH):
                chunk = items[start:start + MAX_BATCH]
                reply = self._call("delete_message_batch", QueueUrl=url,
                                   Entries=[{"Id": str(i), "ReceiptHandle": receipt} for i, receipt in chunk])
                for ok in reply.get("Successful") or []:
                    results[int(ok["Id"])] = True
        return results

    def extend(self, delivery: Delivery, lease: float) -> bool:
        receipt = self._receipt(delivery)
        if receipt is None:
            return False
        seconds = max(1, min(MAX_VISIBILITY_S, math.ceil(lease)))
        try:
            self._call(
                "change_message_visibility", QueueUrl=delivery.tag[0], ReceiptHandle=receipt, VisibilityTimeout=seconds
            )
        except bex.ClientError as exc:
            if self._code(exc) in (
                "ReceiptHandleIsInvalid",
                "InvalidParameterValue",
                "MessageNotInflight",
                "AWS.SimpleQueueService.MessageNotInflight",
            ):
                return False  # gone, or past SQS's 12 hours from the receive
            raise
        delivery.lease_until = self.clock.time() + seconds
        with self._receipts_lock:
            held = self._receipts.get(delivery.tag[1])
            if held is not None:
                held[1] = time.monotonic() + seconds
        return True

    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        """Put the message back: a copy with the new body and delay (this reservation counted as an
        attempt, not as a lapse) replaces it. Never ChangeMessageVisibility: SQS would count the
        next receive of the same message, which reads as a lapse (see _delivery)."""
        return self._replace(delivery, body if body is not None else delivery.body, eta, delivery.attempt)

    def release(self, delivery: Delivery) -> bool:
        """Hand back an unstarted message at once, without counting this reservation."""
        return self._replace(delivery, delivery.body, None, delivery.attempt - 1)

    def _replace(self, delivery: Delivery, body: str, eta: float | None, attempts: int, *, to_dead: str | None = None,
                 extra: dict | None = None) -> bool:
        """Send a copy (to the dead-letter queue ``to_dead``, an SQS name, else to the same queue)
        carrying the delivery's lapses, then delete the original."""
        receipt = self._receipt(delivery, forget=True)
        if receipt is None:
            return False
        queue = to_dead or delivery.queue
        url = self._sqs_url(to_dead, dead=True) if to_dead else self._url(queue)
        entry = self._entry(
            delivery.message_id,
            queue,
            body,
            eta,
            delivery.priority,
            max(0, attempts),
            self.clock.time(),
            lapses=delivery.lapsed,
            extra=extra,
        )
        self._send_batch(queue, url, [entry])
        self._delete(delivery.tag[0], receipt)
        WAKEUPS.notify(self._wake_key)
        return True

    def reject(self, delivery: Delivery, reason: str) -> bool:
        extra = {A_REASON: _attr(reason[:10_000] or "rejected"), A_QUEUE: _attr(delivery.queue)}
        dead = self._dead_queue(delivery.queue)
        return self._replace(delivery, delivery.body, None, delivery.attempt, to_dead=dead, extra=extra)

    def _dead_queue(self, queue: str) -> str:
        """The SQS name of nbqueue's queue's dead-letter queue: its redrive policy's target where
        it has one (queues made elsewhere), else ``<SQS name>-dead``; created when missing."""
        work = sqs_name(queue)
        name = self._dead.get(work)
        if name is None:
            url = self._url(queue)             # creates the pair when missing
            name = self._dead.get(work)
            if name is None:
                attrs = (
                    self._call("get_queue_attributes", QueueUrl=url, AttributeNames=["RedrivePolicy"]).get("Attributes")
                    or {}
                )
                target = (
                    json.loads(attrs["RedrivePolicy"]).get("deadLetterTargetArn", "")
                    if attrs.get("RedrivePolicy")
                    else ""
                )
                name = self._dead[work] = target.rpartition(":")[2] or dead_queue_name(work)
        self._sqs_url(name, dead=True)
        return name

    # -- inspection and upkeep ---------------------------------------------------------------
    def _counts(self, url: str) -> dict[str, int]:
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesDelayed",
            "ApproximateNumberOfMessagesNotVisible",
        ]
        attrs = self._call("get_queue_attributes", QueueUrl=url, AttributeNames=names)["Attributes"]
        return {name: int(attrs.get(name, 0)) for name in names}

    def stats(self) -> list[dict]:
        rows = []
        for queue in sorted(self._used):
            work, dead = self._counts(self._url(queue)), self._counts(self._sqs_url(self._dead_queue(queue), dead=True))
            rows.append(
                {
                    "queue": queue,
                    "ready": work["ApproximateNumberOfMessages"],
                    "delayed": work["ApproximateNumberOfMessagesDelayed"],
                    "in_flight": work["ApproximateNumberOfMessagesNotVisible"],
                    "dead": dead["ApproximateNumberOfMessages"] + dead["ApproximateNumberOfMessagesNotVisible"],
                }
            )
        return rows

    def purge_messages(self, queue: str) -> Purged:
        """Empty the queue. PurgeQueue returns nothing, so the visible messages are first
        received and deleted (their bodies returned); PurgeQueue then removes what receiving
        cannot reach: delayed messages and those in flight, unseen (``complete`` False when
        SQS counted any). SQS takes one PurgeQueue per queue a minute: a refused one leaves
        the delayed and in-flight messages in place. The count is SQS's approximate one."""
        self._note(queue)
        url = self._url(queue)
        counts = self._counts(url)
        bodies = self._drain(url, max(1, counts["ApproximateNumberOfMessages"]))
        hidden = counts["ApproximateNumberOfMessagesDelayed"] + counts["ApproximateNumberOfMessagesNotVisible"]
        try:
            self._call("purge_queue", QueueUrl=url)
        except bex.ClientError as exc:
            if self._code(exc) not in ("AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress"):
                raise
            bodies += self._drain(url, None)     # SQS takes one purge per queue a minute
            hidden = 0
        return Purged(max(len(bodies), sum(counts.values())), bodies, complete=not hidden)

    def _drain(self, url: str, limit: int | None) -> list[str]:
        """Receive and delete visible messages (about ``limit``, or until none is left); their bodies."""
        bodies: list[str] = []
        while limit is None or len(bodies) < limit:
            messages = (
                self._call("receive_message", QueueUrl=url, MaxNumberOfMessages=MAX_BATCH, WaitTimeSeconds=0).get(
                    "Messages"
                )
                or []
            )
            if not messages:
                break
            self._call(
                "delete_message_batch",
                QueueUrl=url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
            bodies += [m["Body"] for m in messages]
        return bodies

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        queues = [queue] if queue is not None else sorted(self._used)
        out: list[dict] = []
        for q in queues:
            url = self._sqs_url(self._dead_queue(q), dead=True)
            seen: set[str] = set()
            for _ in range(max(1, limit // MAX_BATCH) + 2):
                reply = self._call(
                    "receive_message",
                    QueueUrl=url,
                    MaxNumberOfMessages=MAX_BATCH,
                    WaitTimeSeconds=0,
                    VisibilityTimeout=0,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                )
                fresh = [m for m in reply.get("Messages") or [] if m["MessageId"] not in seen]
                if not fresh:
                    break
                for m in fresh:
                    seen.add(m["MessageId"])
                    attrs = {k: v.get("StringValue") for k, v in (m.get("MessageAttributes") or {}).items()}
                    reason = (
                        attrs.get(A_REASON)
                        or "moved by the queue's redrive policy (received more often than its maxReceiveCount)"
                    )
                    out.append(
                        {
                            "id": attrs.get(A_ID) or m["MessageId"],
                            "queue": attrs.get(A_QUEUE) or q,
                            "reason": reason,
                            "body": m["Body"],
                        }
                    )
                if len(out) >= limit:
                    return out[:limit]
        return out[:limit]

    def wake(self) -> None:
        WAKEUPS.notify(self._wake_key)

    def delete_queues(self, names) -> None:
        """Delete queues (nbqueue's names) and their dead-letter queues (tests and tidy-ups)."""
        for name in names:
            work = sqs_name(name)
            for q in (work, self._dead.pop(work, None) or dead_queue_name(work)):
                url = self._urls.pop(q, None) or self._lookup(q)
                if url:
                    try:
                        self._call("delete_queue", QueueUrl=url)
                    except bex.ClientError:
                        pass
            self._used.pop(name, None)

    def close(self) -> None:
        client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"
