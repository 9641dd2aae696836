"""JSON-lines logging on stdout: one object per line, no content, no raw tokens.

Fields come from ``extra=`` on each call; the formatter keeps only values of plain types and
never renders a record's ``args`` (a library's ``%s`` arguments may be URLs or headers), and
tracebacks are rendered as frame locations without exception text or local variables (an
exception's message may hold whatever the failing code had in hand). A device token appears
only as :func:`fingerprint`: a keyed HMAC, random per process unless
:func:`use_fingerprint_key` sets the configured key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, TextIO

# `message` and `asctime` hold text another formatter may already have rendered (a URL, say).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Protocol libraries log URLs (a Web Push endpoint is a device token) and, at DEBUG, whole
# header blocks with authorization: they stay at WARNING whatever the relay's own level.
QUIET_LOGGERS = ("hpack", "h2", "httpcore", "httpx", "aioapns", "grpc", "grpclib", "asyncio")
_PLAIN = (str, int, float, bool, type(None), list, dict)
# Built once: json.dumps with options builds a new encoder for every line.
_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode
_handler: logging.StreamHandler[TextIO] | None = None  # the one setup_logging installed


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.msg if isinstance(record.msg, str) else type(record.msg).__name__,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and isinstance(value, _PLAIN):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            line.update(error_fields(record.exc_info[1]))
        return _encode(line)


def error_fields(exc: BaseException, *, limit: int | None = None) -> dict[str, Any]:
    """An exception as log fields: its type and where it was raised, never its text or locals.

    Args:
        exc: the exception.
        limit: keep only the innermost ``limit`` frames (all when None).
    """
    frames = traceback.extract_tb(exc.__traceback__)  # locations only: no locals captured
    where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in frames]
    return {"error": type(exc).__name__, "where": where[-limit:] if limit else where}


def setup_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stdout) as JSON lines.

    The CLI calls this; library users don't. Protocol libraries (:data:`QUIET_LOGGERS`) stay at
    WARNING whatever ``level`` says.
    """
    global _handler
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _handler = handler
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime
    # No line shows where it was logged from, nor the thread or process: the logging HOWTO's
    # "Optimization" switches skip collecting them for every record (a stack walk each).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def info_line(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra=fields)`` for the line written for every request, at a fraction
    of its cost: when :func:`setup_logging`'s handler is the only place the record would go, the
    line is encoded and written straight to it, as :class:`JsonFormatter` would have written it.

    The logging module's own path (a ``LogRecord``, the handler chain, the formatter's pass over
    every record attribute) cost ~30 µs a request in the serving loop, a tenth of a push
    (``bench/RESULTS.md``). Anything else that would see the record (another handler, a filter,
    another formatter, pytest's ``caplog``) gets it the usual way. ``fields`` must hold plain
    values only (str, int, float, bool, None, lists and dicts of them).
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _handler
    if handler is None or not _only_to(logger, handler):
        logger.info(msg, extra=fields)
        return
    line = _encode(
        {"ts": round(time.time(), 3), "level": "info", "logger": logger.name, "msg": msg, **fields}
    )
    written = False
    handler.acquire()  # as Handler.handle holds it around emit
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
        written = True
    except Exception:  # a broken stream: the logging module's own path reports it, below
        pass
    finally:
        handler.release()
    if not written:
        logger.info(msg, extra=fields)


def _only_to(logger: logging.Logger, handler: logging.StreamHandler[TextIO]) -> bool:
    """Whether an INFO record from ``logger`` would reach ``handler`` alone, unfiltered and
    formatted by a plain :class:`JsonFormatter` (the walk ``Logger.callHandlers`` makes)."""
    if logger.filters or logger.disabled or handler.filters or handler.level > logging.INFO:
        return False
    if type(handler.formatter) is not JsonFormatter:
        return False
    current: logging.Logger | None = logger
    reached = False
    while current is not None:
        for other in current.handlers:
            if other is not handler:
                return False
            reached = True
        if not current.propagate:
            break
        current = current.parent
    return reached


class Fingerprints:
    """Keyed fingerprints of device tokens, for correlating log lines without the token."""

    def __init__(self, key: bytes) -> None:
        self._key = hmac.new(key, b"push-relay token fingerprint", hashlib.sha256).digest()

    def of(self, token: str) -> str:
        """16 hex digits: enough to tell a device's lines apart, too few to be a token."""
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()[:16]


# Random per process: fingerprints then correlate lines within one process only, and a log
# reader without the key cannot test a guessed token against them.
_fingerprints = Fingerprints(os.urandom(32))


def use_fingerprint_key(key: bytes) -> None:
    """Fingerprint tokens with ``key`` (e.g. ``server.hmac_key_file``), stable across replicas."""
    global _fingerprints
    _fingerprints = Fingerprints(key or os.urandom(32))


def fingerprint(token: str) -> str:
    """The keyed fingerprint of a device token, the only form in which a token is logged."""
    return _fingerprints.of(token)
