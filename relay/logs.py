"""JSON-lines logging on stdout: one object per line, no content, no raw tokens.

Fields come from ``extra=`` on each call; the formatter keeps only values of plain types, and
tracebacks are rendered as frame locations without exception text or local variables (an
exception's message may hold whatever the failing code had in hand).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sys
import time
import traceback
from typing import Any

# `message` and `asctime` hold text another formatter may already have rendered (a URL, say).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Protocol libraries log URLs (a Web Push endpoint is a device token) and, at DEBUG, whole
# header blocks with authorization: they stay at WARNING whatever the relay's own level.
QUIET_LOGGERS = ("hpack", "h2", "httpcore", "httpx", "aioapns", "grpc", "asyncio")
_PLAIN = (str, int, float, bool, type(None), list, dict)


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
            line["error"] = type(record.exc_info[1]).__name__
            line["where"] = _frames(record.exc_info[2])
        return json.dumps(line, ensure_ascii=False, default=str)


def _frames(tb: Any) -> list[str]:
    return [
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in traceback.extract_tb(tb)
    ]


def setup_logging(level: str = "info") -> None:
    """Send every log record to stdout as JSON lines (the CLI calls this; library users don't)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime


class Fingerprints:
    """Keyed fingerprints of device tokens, for correlating log lines without the token."""

    def __init__(self, key: bytes) -> None:
        self._key = hmac.new(key, b"push-relay token fingerprint", hashlib.sha256).digest()

    def of(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()[:16]
