"""Database and server URLs: masking their secrets, checking them, reaching them, and setting up
a shared database's schema once.

Used by tracking.py (the MLflow tracking store) and tuning.py (the Optuna storage).

- `mask_url` hides every credential form in a text: the user-info password, query parameters
  such as `?password=`, and `password=` pairs that a driver echoes back.
- `check_url` refuses a URL whose user-info holds an unencoded reserved character (`p@ss/w0rd`):
  a driver would cut it at the wrong place and echo part of the password as a host name.
- `reach` fails within a timeout (GRAINLAB_CONNECT_TIMEOUT_S, default 10 s) when nothing answers
  at a server URL's host and port, instead of a client retrying for minutes.
- `schema_lock` serialises the first connection of several processes to one PostgreSQL database
  with an advisory lock, so that workers starting together on an empty database do not race to
  create the same tables (whatever error form that race would take).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from urllib.parse import urlsplit

from grainlab.errors import GrainlabError

TIMEOUT_ENV = "GRAINLAB_CONNECT_TIMEOUT_S"
# pg_advisory_lock key shared by every grainlab process that sets up a schema (any fixed bigint).
SCHEMA_LOCK_KEY = 0x6772_6169_6E6C_6162 & 0x7FFF_FFFF_FFFF_FFFF
_SECRET_KEYS = r"password|passwd|pwd|secret|token|api_key|apikey|access_token|sslpassword"
_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "http": 80, "https": 443}


def mask_url(text: str) -> str:
    """Hide the credentials in a text that quotes URLs or connection strings."""
    # user:secret@host, up to the last '@' before any whitespace (an unencoded '@' stays hidden)
    text = re.sub(r"(//[^:/@\s]+:)\S*@", r"\1***@", text)
    # ?password=secret, &token=..., and libpq's "password=secret" pairs
    return re.sub(rf"(?i)\b({_SECRET_KEYS})=[^&\s'\"]*", r"\1=***", text)


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "10")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise GrainlabError(f"{TIMEOUT_ENV} = {raw[:40]!r}: expected seconds between 0 and 3600")
    return value


def scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def check_url(url: str, what: str):
    """A clear error for a URL whose user-info holds an unencoded '@', '/', '?' or '#'."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if "@" not in rest:
        return
    userinfo = rest.rsplit("@", 1)[0]
    if any(ch in userinfo for ch in "@/?#"):
        raise GrainlabError(
            f"{what} {mask_url(url)}: the user name or password holds a reserved character "
            "('@', '/', '?' or '#') that is not percent-encoded; encode it (e.g. '@' as %40, '/' as %2F)"
        )


def reach(url: str, what: str):
    """Fail within the timeout, with one line, when nothing answers at a server URL's host and port."""
    kind = scheme(url)
    if kind not in _DEFAULT_PORTS:
        return  # sqlite, file: nothing to reach
    check_url(url, what)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS[kind]
    except ValueError as exc:
        raise GrainlabError(f"{what} {mask_url(url)}: not a valid URL ({exc})") from None
    if not host:
        return  # a local socket (postgresql:///db): the driver reports it
    limit = timeout_s()
    try:
        with socket.create_connection((host, port), timeout=limit):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise GrainlabError(
            f"cannot reach {what} at {mask_url(url)}: {reason} (waited up to {limit:g} s; "
            f"{TIMEOUT_ENV} sets the limit)"
        ) from None


def _libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (postgresql+psycopg://...) as libpq reads it."""
    head, rest = url.split("://", 1)
    return f"postgresql://{rest}" if head.startswith("postgres") else url


@contextlib.contextmanager
def schema_lock(url: str, what: str):
    """Hold a PostgreSQL advisory lock (on the URL's own database) around schema set-up; other
    URLs pass through. The lock ends with its connection, so a killed holder never blocks."""
    if scheme(url) not in ("postgresql", "postgres"):
        yield
        return
    import psycopg

    try:
        conn = psycopg.connect(_libpq_url(url), autocommit=True, connect_timeout=max(1, round(timeout_s())))
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GrainlabError(f"cannot connect to {what} at {mask_url(url)}: {mask_url(first)}") from None
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
        yield
