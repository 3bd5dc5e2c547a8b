"""Store URLs as they may be shown: passwords hidden. Below the protocol modules and the drivers."""
from __future__ import annotations

import re

#: a query option whose name holds "password" (redis-py's ``?password=``, ``?ssl_password=``)
_QUERY_PASSWORD = re.compile(r"((?:^|&)[^=&]*password[^=&]*=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password (in its user part or its query) replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    if "password" in parts.query.lower():
        parts = parts._replace(query=_QUERY_PASSWORD.sub(r"\1***", parts.query))
    return urlunsplit(parts) if parts != urlsplit(url) else url
