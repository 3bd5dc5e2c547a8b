"""Store URLs as they may be shown: passwords hidden. Below the protocol modules and the drivers."""
from __future__ import annotations


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
