"""Relay configs pointed at the bundled fakes, built in memory (no secret files needed).

Used by the tests and by ``push-relay demo``; a user's own tests can use them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.apns import ApnsSettings
from adapters.fcm import FcmSettings
from adapters.webpush import WebPushSettings
from relay.config import AppConfig, Config, Limits, PrivacyPolicy, ServerConfig
from relay.model import Privacy
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM, ServiceAccount
from relay.testing.fake_webpush import FakeWebPush


def apns_app(
    fake: FakeAPNs,
    key: ApnsKey,
    *,
    app_id: str = "chat-ios",
    topic: str = "com.example.chat",
    default: Privacy = Privacy.FULL,
    maximum: Privacy = Privacy.FULL,
    max_concurrency: int = 100,
    **settings: object,
) -> AppConfig:
    """An APNs app with provider-token auth against ``fake``."""
    return _app(
        "apns",
        default,
        maximum,
        max_concurrency,
        ApnsSettings(
            app_id=app_id,
            topic=topic,
            key_pem=key.key_pem,
            key_id=key.key_id,
            team_id=key.team_id,
            endpoint=fake.url,
            ca_pem=fake.ca_pem,
            **settings,  # type: ignore[arg-type]
        ),
    )


def _app(
    platform: str,
    default: Privacy,
    maximum: Privacy,
    max_concurrency: int,
    settings: ApnsSettings | FcmSettings | WebPushSettings,
) -> AppConfig:
    return AppConfig(
        id=settings.app_id,
        platform=platform,
        privacy=PrivacyPolicy(default=default, max=maximum),
        max_concurrency=max_concurrency,
        settings=settings,
    )


def fcm_app(
    fake: FakeFCM,
    account: ServiceAccount,
    *,
    app_id: str = "chat-android",
    default: Privacy = Privacy.FULL,
    maximum: Privacy = Privacy.FULL,
    max_concurrency: int = 100,
) -> AppConfig:
    """An FCM app whose service account was registered with ``fake``."""
    settings = FcmSettings(
        app_id=app_id, service_account=account.info, endpoint=fake.url, ca_pem=fake.ca_pem
    )
    return _app("fcm", default, maximum, max_concurrency, settings)


def vapid_key_pem() -> bytes:
    """A fresh VAPID signing key (EC P-256, PKCS#8 PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def webpush_app(
    fake: FakeWebPush,
    *,
    app_id: str = "chat-web",
    key_pem: bytes | None = None,
    allowed_endpoints: tuple[str, ...] = ("127.0.0.1",),
    default: Privacy = Privacy.FULL,
    maximum: Privacy = Privacy.FULL,
    max_concurrency: int = 100,
) -> AppConfig:
    """A Web Push app allowed to reach ``fake`` (and only hosts in ``allowed_endpoints``)."""
    settings = WebPushSettings(
        app_id=app_id,
        vapid_private_key_pem=key_pem or vapid_key_pem(),
        subject="mailto:ops@example.com",
        allowed_endpoints=allowed_endpoints,
        ca_pem=fake.ca_pem,
    )
    return _app("webpush", default, maximum, max_concurrency, settings)


def local_config(
    apps: Iterable[AppConfig],
    *,
    limits: Limits | None = None,
    hmac_key: bytes = b"push-relay test grouping secret",
    shutdown_grace_seconds: float = 2.0,
) -> Config:
    """A relay listening on a free loopback port, serving ``apps``."""
    return Config(
        server=ServerConfig(
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            hmac_key=hmac_key,
            shutdown_grace_seconds=shutdown_grace_seconds,
        ),
        clients=(),
        apps={app.id: app for app in apps},
        limits=limits or Limits(),
    )
