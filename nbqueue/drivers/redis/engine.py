"""The fused Redis engine: broker and result backend on one server under one key prefix.

Its fast paths, each a whole-method override of SplitEngine:

- ``send``: the PENDING records and the messages in one script call (records first; lua/send.lua).
- ``claim`` / ``run_next``: the claim script (and the one that publishes a worker's own
  follow-ups already reserved) also begins the tasks' records: one round trip per batch.
- ``finish``: the results and acks in one script call (lua/finish.lua), then the group member
  counts, in one pipeline; an ack acts only once its record is final, and a member is counted
  only once its record is SUCCESS, so a result that was not stored never loses its message
  nor counts its member. Its
  ``then_claim`` (the worker's next batch) runs the claim script at the end of that pipeline;
  where this thread's last claim left the queues empty, the claim first waits (up to
  ``FINISH_WAIT``) for a publish or a ``wake()`` in that round trip, as a claim would: the
  results and acks are stored before the wait. A finish that counts group members does not
  wait (their workflows advance when it returns): it claims only when the queues were not
  left empty.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ...backend import ResultBackend
from ...broker import Broker, Delivery, Outgoing
from ...engine import Begins, Claim, Finished, NextClaim, Outcome, SplitEngine, decode
from . import twins
from .backend import CHUNK, DONE_TTL_MS, RedisBackend
from .broker import LUA_HEADER, PUBLISH_CHUNK, SIGNAL_TOKENS, SIGNAL_TTL_MS, RedisBroker, publish_args
from .client import guarded, lua, pipeline, register
from .twins import twin

log = logging.getLogger(__name__)

FINISH_WAIT = 0.25      # at most this long (s) a finish waits for the next batch when the queues are empty

_SEND = lua("queues", "create_records", "publish_messages", "send", header=LUA_HEADER)
_FINISH = lua("queues", "state", "ack", "finish", header=LUA_HEADER + f"local DONE_TTL_MS = '{DONE_TTL_MS}'\n")

# the script memory:// runs as Python (see nbqueue.drivers.redis.twins)
twin(_SEND, twins.send, tokens=SIGNAL_TOKENS, signal_ttl=SIGNAL_TTL_MS)
twin(_FINISH, twins.finish, done_ttl=DONE_TTL_MS)


class RedisEngine(SplitEngine):
    runs_next = True
    counts_members = True
    claims_in_finish = True
    broker: RedisBroker
    backend: RedisBackend

    def __init__(self, broker: RedisBroker, backend: RedisBackend):
        super().__init__(broker, backend)
        self._send = register(broker.client, _SEND)
        self._finish = register(broker.client, _FINISH)

    @staticmethod
    def serves(broker: Broker, backend: ResultBackend) -> bool:
        """True when both are on one Redis (same URL) under one key prefix."""
        return (isinstance(broker, RedisBroker) and isinstance(backend, RedisBackend) and backend.url == broker.url
                and backend.prefix == broker.prefix)

    def _records(self, worker: str) -> tuple[str, str, str]:
        """The scripts' record arguments: record key prefix, results index, worker."""
        return self.backend._rec(""), self.backend._index, worker

    @guarded
    def send(self, records: Sequence[dict], outgoing: Sequence[Outgoing]) -> None:
        """The records, then the messages (a fast worker's result is never overwritten): in one
        script call (lua/send.lua), or for a send of many, in one pipeline of the create and
        publish scripts."""
        if len(records) > CHUNK or len(outgoing) > PUBLISH_CHUNK:
            pipe = pipeline(self.broker.client)
            self.backend.create(records, client=pipe)
            self.broker.publish_many(outgoing, client=pipe)
            pipe.execute()
            return
        self.backend.created(records)
        keys: list = [self.backend._index]
        args: list = [self.broker.prefix, repr(self.broker.clock.time())]
        self.backend.create_args(records, self.backend.clock.time(), keys, args)
        publish_args(outgoing, args)
        self._send(keys=keys, args=args)

    def claim(self, queues: Sequence[str], *, limit: int, timeout: float, lease: float, worker: str,
              begins: Begins | None = None, handoff: bool = False) -> list[Claim]:
        deliveries = self.broker.claim(
            list(queues), timeout=timeout, lease=lease, limit=limit, records=self._records(worker)
        )
        return _begun(decode(deliveries))

    def run_next(
        self, outgoing: Sequence[Outgoing], *, lease: float, worker: str, begins: Begins | None = None
    ) -> list[Claim]:
        deliveries = self.broker.publish_reserved(outgoing, lease=lease, records=self._records(worker))
        return _begun(decode(deliveries))

    @guarded
    def finish(self, outcomes: Sequence[Outcome], acks: Sequence[Delivery] = (),
               then_claim: NextClaim | None = None) -> Finished:
        """One pipeline: the results and acks, then the member counts, then the claim (see the
        module docstring)."""
        members = [o for o in outcomes if o.group is not None]
        backend = self.backend
        now, ttl = backend.clock.time(), backend.results_expire_in
        args: list = [self.broker.prefix, len(outcomes)]     # the record keys follow from the prefix
        for o in outcomes:
            fields = o.fields if "finished_at" in o.fields else {**o.fields, "finished_at": now}
            args += backend._state_args(o.task_id, o.state, o.token, fields, ttl, counted=True)
        ids = {o.task_id for o in outcomes}
        for d in acks:
            args += [d.message_id, str(d.tag), "1" if d.message_id in ids else ""]
        # where this thread's last claim left the queues empty, the claim waits for a publish
        # first, in this round trip (Redis stores the results before the wait), unless group
        # members are counted here: their workflows advance as soon as this returns
        drained = then_claim is not None and self.broker.drained(then_claim.queues)
        claiming = then_claim is not None and not (drained and members)
        # claims are read with the broker's reader (a body that is not UTF-8 comes back marked)
        pipe = pipeline(self.broker._reader if claiming else self.broker.client)
        self._finish(args=args, client=pipe)
        for o in members:
            assert o.group is not None
            backend._count_member(o.group, o.task_id, client=pipe, if_succeeded=True)
        parse, queued = None, 0
        if claiming:
            assert then_claim is not None
            wait = 0.0 if members else min(FINISH_WAIT, self.broker.max_block)
            parse, queued = self.broker.queue_claim(pipe, then_claim.queues, lease=then_claim.lease,
                                                    limit=then_claim.limit, records=self._records(then_claim.worker),
                                                    wait=wait)
        if queued > 1:
            with self.broker.waiting():
                replies = pipe.execute(raise_on_error=False)
        else:
            replies = pipe.execute(raise_on_error=False)
        claimed: list[Claim] = []
        if parse is not None:
            reply = replies[-1]
            del replies[-queued:]       # the claim's replies (a wait's pop, then the claim)
            if isinstance(reply, Exception):
                log.warning("claiming in a finish failed (%s); the next claim takes what is ready", reply)
            else:
                claimed = _begun(decode(parse(reply)))
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            self.hand_back([c.delivery for c in claimed])    # the caller goes on as if finish had not run
            raise errors[0]
        counts = replies[1:1 + len(members)]
        return Finished(stored=[reply == 1 for reply in replies[0]],
                        counts=[None if c is None else (int(c[0]), int(c[1])) for c in counts], claimed=claimed)


def _begun(claims: list[Claim]) -> list[Claim]:
    """Claims whose records the script began: their tokens came with the deliveries (a delivery
    after a lapse is not begun by the script: the worker first looks for a live attempt)."""
    for c in claims:
        if c.message is not None and not c.delivery.after_lapse:
            c.begun, c.token = True, c.delivery.token
    return claims
