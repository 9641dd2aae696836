"""Push provider adapters: one module per provider, registered by platform name.

The registry is explicit (no import-by-string): a new provider is one new module here, one line
in ``ADAPTERS``, and its fake in ``relay/testing/``.
"""

from adapters.apns import ApnsAdapter, ApnsSettings
from adapters.base import Adapter, DeviceKeys, Outcome, Push, Verdict
from adapters.fcm import FcmAdapter, FcmSettings
from adapters.webpush import WebPushAdapter, WebPushSettings

ADAPTERS: dict[str, type[Adapter[object]]] = {
    "apns": ApnsAdapter,  # type: ignore[dict-item]
    "fcm": FcmAdapter,  # type: ignore[dict-item]
    "webpush": WebPushAdapter,  # type: ignore[dict-item]
}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ApnsAdapter",
    "ApnsSettings",
    "DeviceKeys",
    "FcmAdapter",
    "FcmSettings",
    "Outcome",
    "Push",
    "Verdict",
    "WebPushAdapter",
    "WebPushSettings",
]
