"""Reading one option's value, whether an App keyword argument, a YAML value, a URL query's text
or an environment variable's: seconds, counts, flags and text, each checked once here and
refused with a ConfigurationError naming the option and the value; and the query of a store's
URL, whose keys each driver checks against the options it knows. Below the protocol modules
and the drivers (imports nothing of nbqueue but its errors and nbqueue.urls).

A value that is not given (None, or the empty text of ``?name=``) reads as the default."""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable, Mapping, TypeVar
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigurationError
from .urls import redact

T = TypeVar("T")

#: the words a URL or an environment variable may spell a flag with
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def given(value: object) -> bool:
    """Whether an option has a value (None and ``""`` leave it to its default)."""
    return value is not None and not (isinstance(value, str) and value == "")


def over_query(query: Mapping[str, Any], options: Mapping[str, Any] | None) -> dict:
    """A store's options: those given (``options``) over the URL's (``query``); an option
    given as None or ``""`` (see ``given``) leaves the URL's value of that name."""
    return {**query, **{k: v for k, v in (options or {}).items() if given(v) or k not in query}}


def seconds(name: str, value: object, default: T, *, positive: bool = False, infinite: bool = False,
            maximum: float | None = None) -> float | T:
    """``value`` as seconds: a number or its text, 0 or more (more than 0 when ``positive``),
    finite unless ``infinite`` (``inf``: no end), at most ``maximum``; ``default`` when not given."""
    if not given(value):
        return default
    number = math.nan
    if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            pass
    low_ok = number > 0 if positive else number >= 0         # False for NaN: what did not convert
    if not low_ok or (math.isinf(number) and not infinite) or (maximum is not None and number > maximum):
        bounds = "more than 0" if positive else "0 or more"
        if maximum is not None:
            bounds = f"{bounds} and at most {maximum:g}"
        elif not infinite:
            bounds += ", finite"
        raise ConfigurationError(f"{name} must be a number of seconds, {bounds}, not {value!r}")
    return number


def count(name: str, value: object, default: T, *, minimum: int = 1, maximum: int | None = None) -> int | T:
    """``value`` as a whole number (an int or its text) from ``minimum`` to ``maximum``;
    ``default`` when not given."""
    if not given(value):
        return default
    number: int | None = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    if number is None or number < minimum or (maximum is not None and number > maximum):
        bounds = f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigurationError(f"{name} must be a whole number {bounds}, not {value!r}")
    return number


def flag(name: str, value: object, default: bool) -> bool:
    """``value`` as True or False: a bool, or a word a URL or environment variable spells one
    with (``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``); ``default`` when not given."""
    if not given(value):
        return default
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigurationError(f"{name} must be True or False (in a URL: true/false, yes/no, on/off, 1/0), "
                             f"not {value!r}")


def boolean(name: str, value: object) -> bool:
    """``value`` when it is True or False (an argument given in Python: no word, no number)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, not {value!r}")
    return value


def string(name: str, value: object, default: T, *, empty: bool = True) -> str | T:
    """``value`` as text (a str); ``default`` when not given (None), or given as ``""`` while
    ``empty`` (otherwise the empty text is refused: an empty key prefix is a mistake, not a wish
    for the default one)."""
    if not empty and value == "":
        raise ConfigurationError(f"{name} must not be empty (leave it out for the default)")
    if not given(value):
        return default
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be text (a str), not {value!r}")
    return value


def choice(name: str, value: Any, allowed: tuple) -> Any:
    """``value`` when it is one of ``allowed``; ConfigurationError listing them otherwise."""
    if value not in allowed or isinstance(value, bool) and not any(a is value for a in allowed):
        raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
    return value


def url_query(url: str, own: Iterable[str], passed_on: Iterable[str] = (), *, library: str = "",
              hint: str = "") -> dict[str, str]:
    """The options in ``url``'s query by name (``?name=`` reads as ``""``). ConfigurationError
    naming the URL (without its password), each key given twice, and each key that is neither
    one of ``own`` (the options the driver reads from its URL) nor of ``passed_on`` (the URL
    parameters of its client library, called ``library``), with the known keys and ``hint``."""
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    found = dict(pairs)
    own, passed_on = frozenset(own), frozenset(passed_on) - frozenset(own)
    unknown = sorted(set(found) - own - passed_on)
    twice = sorted({name for name, _ in pairs if [n for n, _ in pairs].count(name) > 1})
    if not unknown and not twice:
        return found
    problems = []
    if unknown:
        close = {name: difflib.get_close_matches(name, own | passed_on, n=1) for name in unknown}
        problems.append("unknown query option(s) " + ", ".join(
            name + (f" (did you mean {close[name][0]}?)" if close[name] else "") for name in unknown))
    if twice:
        problems.append(f"query option(s) given twice: {', '.join(twice)}")
    known = f"known: {', '.join(sorted(own)) or 'none'}"
    if passed_on:
        known += f"; passed on to {library or 'the client library'}: {', '.join(sorted(passed_on))}"
    raise ConfigurationError(f"{'; '.join(problems)} in {redact(url)!r} ({known}){hint}")
