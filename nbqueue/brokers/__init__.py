"""Brokers by URL scheme, imported lazily; a missing optional dependency names its extra."""
from __future__ import annotations

import difflib
import importlib
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import Broker, Delivery, Outgoing

#: scheme -> (module, class, extra to install when the import fails)
BROKERS = {
    "sqlite": ("nbqueue.brokers.sqlite", "SQLiteBroker", None),
    "memory": ("nbqueue.brokers.redis", "RedisBroker", "redis"),
    "redis": ("nbqueue.brokers.redis", "RedisBroker", "redis"),
    "rediss": ("nbqueue.brokers.redis", "RedisBroker", "redis"),
    "amqp": ("nbqueue.brokers.amqp", "AMQPBroker", "amqp"),
    "amqps": ("nbqueue.brokers.amqp", "AMQPBroker", "amqp"),
    "sqs": ("nbqueue.brokers.sqs", "SQSBroker", "sqs"),
    "https": ("nbqueue.brokers.sqs", "SQSBroker", "sqs"),     # https://sqs.<region>.amazonaws.com/<account>, as machinery
}


def resolve(table: dict, url: str, kind: str):
    scheme = urlsplit(url).scheme.lower()
    if scheme not in table:
        hint = difflib.get_close_matches(scheme, table, n=1)
        suggestion = f"; did you mean {hint[0]}://?" if hint else ""
        raise ConfigurationError(f"unknown {kind} URL scheme {scheme!r} in {url!r}{suggestion} (known: {', '.join(sorted(table))})")
    module, name, extra = table[scheme]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if extra is None:
            raise
        raise ConfigurationError(f"the {scheme}:// {kind} needs an optional dependency ({exc.name}): pip install 'nbqueue[{extra}]'") from exc


def broker_from_url(url: str, **kwargs) -> Broker:
    return resolve(BROKERS, url, "broker")(url, **kwargs)


__all__ = ["Broker", "Delivery", "Outgoing", "broker_from_url", "BROKERS", "resolve"]
