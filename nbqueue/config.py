"""Configuration: URLs, machinery-style YAML files and environment variables -> Config."""
from __future__ import annotations

import dataclasses
import logging
import os
import zoneinfo
from typing import Any

from . import options as _options
from .errors import ConfigurationError

log = logging.getLogger(__name__)

#: options App accepts besides broker/backend/default_queue, with their defaults
DEFAULTS: dict[str, Any] = {
    "visibility_timeout": 30.0,     # seconds a reservation lasts before redelivery, extended by heartbeats
    "results_expire_in": None,      # seconds to keep finished results; None (or 0) keeps them
    "serializer": "json",           # or "pickle", an explicit opt-in
    "timezone": "UTC",              # for periodic schedules
    "poll_interval": 0.1,           # idle poll ceiling for stores without a push channel
    "prefetch": 4,                  # messages a worker thread reserves at once
    "secret": None,                 # HMAC key for cell messages (NBQUEUE_SECRET)
    "clock": None,
    "key_prefix": "nbq",
    "max_deliveries": 5,            # deliveries that may end without finishing (worker died) before a dead letter
    # large values out of band (nbqueue/payloads.py)
    # payload store URL: None is beside the records; s3://bucket/prefix, file:///dir, ...
    "payloads": None,
    "payload_threshold": 1 << 20,   # bytes: binary values packed larger go to the payload store; None keeps all inline
    "payload_compression": None,    # "zstd" or "lz4": frames through Arrow IPC's compression, arrays and pickles whole
    "payload_options": None,        # dict: the fsspec filesystem's options (endpoint_url, key, secret, ...)
    "inline": False,                # run each task in the caller at send time (inline.py), for tests
}

def store_options() -> frozenset:
    """Options a broker or backend reads (each driver declares its own); passed through as given."""
    from .drivers import store_options as declared

    return declared()


def store_sections() -> frozenset:
    """Per-store sections of a YAML config: the drivers' names."""
    from .drivers import drivers

    return frozenset(drivers())


@dataclasses.dataclass
class Config:
    broker: str | None = None
    backend: str | None = None
    default_queue: str = "nbqueue"
    options: dict = dataclasses.field(default_factory=dict)

    def option(self, key: str) -> Any:
        return self.options.get(key, DEFAULTS.get(key))


def check_options(options: dict) -> None:
    known = set(DEFAULTS) | store_options()
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(f"unknown App option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if options.get("serializer", "json") not in ("json", "pickle"):
        raise ConfigurationError(f"serializer must be 'json' or 'pickle', not {options['serializer']!r}")
    _options.seconds("visibility_timeout", options.get("visibility_timeout"), None, positive=True)
    _options.seconds("results_expire_in", options.get("results_expire_in"), None)
    _options.seconds("poll_interval", options.get("poll_interval"), None, positive=True)
    _options.count("prefetch", options.get("prefetch"), None)
    _options.count("max_deliveries", options.get("max_deliveries"), None)
    _options.string("key_prefix", options.get("key_prefix"), None, empty=False)
    _options.string("secret", options.get("secret"), None)
    if options.get("inline") is not None:
        _options.boolean("inline", options["inline"])
    _check_timezone(options.get("timezone"))
    threshold = options.get("payload_threshold", 0)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0):
        raise ConfigurationError("payload_threshold must be a number of bytes (an int, 0 or more) or None, "
                                 f"not {threshold!r}")
    if options.get("payload_compression") not in (None, "zstd", "lz4"):
        raise ConfigurationError("payload_compression must be 'zstd', 'lz4' or None, "
                                 f"not {options['payload_compression']!r}")
    if options.get("payloads") is not None and not isinstance(options["payloads"], str):
        raise ConfigurationError(
            "payloads must be a URL (s3://bucket/prefix, file:///dir, sqlite:///file.db, redis://...), "
            f"not {options['payloads']!r}"
        )
    if options.get("payload_options") is not None and not isinstance(options["payload_options"], dict):
        raise ConfigurationError("payload_options must be a dict of the payload filesystem's options, "
                                 f"not {options['payload_options']!r}")


def _check_timezone(name: Any) -> None:
    """ConfigurationError unless ``name`` is None, a ZoneInfo or an IANA time zone name."""
    if name is None or isinstance(name, zoneinfo.ZoneInfo):
        return
    try:
        if isinstance(name, str) and name:
            zoneinfo.ZoneInfo(name)
            return
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        pass
    raise ConfigurationError(f"timezone must be an IANA time zone name such as 'UTC' or 'Europe/Paris', not {name!r}")


def from_yaml(path: str) -> Config:
    """Read a machinery-style config.yml.

    Keys: ``broker``, ``default_queue``, ``result_backend``, ``results_expire_in``, and
    per-store sections (named for a driver: ``redis:``, ``amqp:``, ...) whose keys become options.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigurationError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {path} must hold a mapping at the top level")
    options: dict[str, Any] = {}
    sections = store_sections()
    known_top = {"broker", "default_queue", "result_backend", "results_expire_in"} | sections
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigurationError(f"section {key!r} in {path} must be a mapping")
            ignored = sorted(set(value) - set(DEFAULTS) - store_options())
            if ignored:  # machinery's own settings (exchange, binding_key, max_idle, ...) mean nothing here
                log.warning("ignoring key(s) %s in section %r of %s", ", ".join(ignored), key, path)
            options.update({k: v for k, v in value.items() if k not in ignored})
        elif key in DEFAULTS:
            options[key] = value
        elif key not in known_top:
            raise ConfigurationError(
                f"unknown key {key!r} in {path} (known: {', '.join(sorted(known_top | set(DEFAULTS)))})"
            )
    if data.get("results_expire_in") is not None:
        options["results_expire_in"] = _options.seconds(f"results_expire_in in {path}", data["results_expire_in"], None)
    return Config(
        broker=data.get("broker"),
        backend=data.get("result_backend"),
        default_queue=data.get("default_queue") or "nbqueue",
        options=options,
    )


def from_env(environ: dict | None = None) -> Config:
    """NBQUEUE_BROKER, NBQUEUE_BACKEND, NBQUEUE_DEFAULT_QUEUE, NBQUEUE_RESULTS_EXPIRE_IN, NBQUEUE_SECRET,
    NBQUEUE_VISIBILITY_TIMEOUT, NBQUEUE_MAX_DELIVERIES, NBQUEUE_PAYLOADS, NBQUEUE_PAYLOAD_THRESHOLD (bytes, or
    ``none``), NBQUEUE_PAYLOAD_COMPRESSION."""
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    if env.get("NBQUEUE_RESULTS_EXPIRE_IN"):
        options["results_expire_in"] = _options.seconds(
            "NBQUEUE_RESULTS_EXPIRE_IN", env["NBQUEUE_RESULTS_EXPIRE_IN"].strip(), None)
    if env.get("NBQUEUE_VISIBILITY_TIMEOUT"):
        options["visibility_timeout"] = _options.seconds(
            "NBQUEUE_VISIBILITY_TIMEOUT", env["NBQUEUE_VISIBILITY_TIMEOUT"].strip(), None, positive=True)
    if env.get("NBQUEUE_SECRET"):
        options["secret"] = env["NBQUEUE_SECRET"]
    if env.get("NBQUEUE_MAX_DELIVERIES"):
        options["max_deliveries"] = _options.count("NBQUEUE_MAX_DELIVERIES", env["NBQUEUE_MAX_DELIVERIES"].strip(),
                                                   None)
    if env.get("NBQUEUE_PAYLOADS"):
        options["payloads"] = env["NBQUEUE_PAYLOADS"]
    if env.get("NBQUEUE_PAYLOAD_THRESHOLD"):
        text = env["NBQUEUE_PAYLOAD_THRESHOLD"].strip()
        try:
            options["payload_threshold"] = None if text.lower() == "none" else int(text)
        except ValueError:
            raise ConfigurationError(f"NBQUEUE_PAYLOAD_THRESHOLD must be a number of bytes or 'none', "
                                     f"not {text!r}") from None
    if env.get("NBQUEUE_PAYLOAD_COMPRESSION"):
        options["payload_compression"] = env["NBQUEUE_PAYLOAD_COMPRESSION"]
    return Config(
        broker=env.get("NBQUEUE_BROKER") or None,
        backend=env.get("NBQUEUE_BACKEND") or None,
        default_queue=env.get("NBQUEUE_DEFAULT_QUEUE") or "nbqueue",
        options=options,
    )
