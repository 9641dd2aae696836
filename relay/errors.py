"""Whole-request errors and the one place they become gRPC status codes.

    RelayError
     ├── InvalidArgument     → INVALID_ARGUMENT   malformed request, unknown app, limits exceeded
     ├── Unauthenticated     → UNAUTHENTICATED    missing or wrong caller credentials
     ├── PermissionDenied    → PERMISSION_DENIED  the caller may not use that app
     ├── ResourceExhausted   → RESOURCE_EXHAUSTED rate or in-flight limit
     └── Draining            → UNAVAILABLE        shutting down

Everything a provider says is a per-device ``DeviceResult`` under status OK, never one of these.
Messages name the field and the rule (``devices[3].token: not a hex APNs token``) and never echo a
value a caller sent, since that value may be personal data.
"""

from __future__ import annotations

from grpclib.const import Status


class RelayError(Exception):
    """Base of every whole-request error; ``str(error)`` is the client-facing message."""


class InvalidArgument(RelayError):
    """The request is malformed or exceeds a limit; ``problems`` lists each by field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:10]
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__("; ".join(shown) + more)


class Unauthenticated(RelayError):
    """No credentials, or credentials that match no configured client."""


class PermissionDenied(RelayError):
    """The caller is known but may not use an app the request names."""


class ResourceExhausted(RelayError):
    """A rate or in-flight limit is reached; the caller should retry later."""


class Draining(RelayError):
    """The server is shutting down and takes no new work."""


_STATUS: dict[type[RelayError], Status] = {
    InvalidArgument: Status.INVALID_ARGUMENT,
    Unauthenticated: Status.UNAUTHENTICATED,
    PermissionDenied: Status.PERMISSION_DENIED,
    ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    Draining: Status.UNAVAILABLE,
}


def status_for(error: RelayError) -> Status:
    """The gRPC status code of a whole-request error (a test checks every class is mapped)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    raise TypeError(f"unmapped error class {type(error).__name__}")
