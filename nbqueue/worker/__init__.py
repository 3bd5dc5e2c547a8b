"""The worker: claims batches through the engine, runs them, settles their outcomes.

- ``loop``: Worker (threads, steppable ``step(now)``, ``drain``, start/stop/join);
- ``execute``: running one claimed task and deciding its outcome;
- ``batch``: the finish steps of a batch, settled together through the engine;
- ``heartbeat``: leases, STARTED states, live output, time limits, the heartbeat record.
"""
from .loop import Worker

__all__ = ["Worker"]
