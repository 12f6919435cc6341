"""Retrying transient storage errors: a connection reset or refused, a timeout, an HTTP 5xx,
throttling (Ray issue #47939: one S3 hiccup during a save killed the run). Anything else (a
missing bucket, no permission, a full disk) fails at once."""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger("raytitan")

T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}
# botocore / aiohttp / s3fs names and messages of errors worth another try.
_TRANSIENT_NAMES = ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ClientPayloadError", "IncompleteRead", "ProtocolError",
                    "ResponseStreamingError")
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|Throttl|RequestTimeout|ServiceUnavailable|InternalError|"
    r"\b50[0234]\b|Connection (reset|refused|aborted)|Could not connect|"
    r"Server disconnected|Connection closed", re.IGNORECASE)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """Whether `error` (or anything in its cause chain) is worth retrying."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, _PERMANENT):
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if type(e).__name__ in _TRANSIENT_NAMES or _TRANSIENT_TEXT.search(str(e)):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return False


def with_retries(fn: Callable[[], T], what: str, budget_sec: float,
                 first_delay: float = 0.5, max_delay: float = 8.0) -> T:
    """fn(), retried with exponential backoff while it raises transient errors and less than
    `budget_sec` has passed; then the last error is raised (it says how long was tried)."""
    start = time.monotonic()
    delay, attempt = first_delay, 1
    while True:
        try:
            return fn()
        except Exception as e:
            elapsed = time.monotonic() - start
            if not is_transient(e) or elapsed + delay > budget_sec:
                if attempt > 1:
                    e.add_note(f"{what}: gave up after {attempt} attempts over {elapsed:.1f} s "
                               f"(checkpoint.storage_retry_seconds = {budget_sec:g})")
                raise
            logger.warning("checkpoint: transient storage error during %s (%s: %s); attempt "
                           "%d failed, retrying in %.1f s", what, type(e).__name__,
                           str(e)[:200], attempt, delay)
            time.sleep(delay)
            delay, attempt = min(delay * 2, max_delay), attempt + 1
