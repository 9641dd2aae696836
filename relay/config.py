"""The relay's config: one YAML file, checked whole at start-up into frozen, typed objects.

The file's shape is the table of sections below (DESIGN §5 names the keys, exactly);
``relay/_schema.py`` walks it and collects every problem by path
(``apps[1].auth.key_file: no such file``), and :class:`ConfigError` carries them all: the relay
refuses to start on any. Secrets (keys, tokens) are read from the files the config names, never
inlined, and no ``repr`` here shows them. ``config/relay.example.yaml`` documents every key and is
loaded by the tests, so it cannot drift from this module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters.apns import ApnsSettings
from adapters.fcm import FcmSettings
from adapters.webpush import WebPushSettings
from relay import _schema as s
from relay._schema import Field, Invalid, ListOf, OneOf, Section
from relay.breaker import CircuitPolicy, RetryBudgetPolicy
from relay.model import Privacy
from relay.render import EXPOSURE

__all__ = [
    "AppConfig",
    "ClientConfig",
    "Config",
    "ConfigError",
    "Limits",
    "PrivacyPolicy",
    "ServerConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
]


class ConfigError(Exception):
    """The config is unusable; ``problems`` lists every reason as ``"path: message"``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The gRPC listener's certificate chain and key; a client CA turns on mutual TLS."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    client_ca_pem: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Listeners and process-wide settings. An empty ``hmac_key`` means a random key per process
    (grouping keys and token fingerprints then differ between replicas and restarts)."""

    listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:9464"
    health_listen: str = ""  # a plaintext gRPC listener serving only health; "" = none
    tls: TlsConfig | None = None
    shutdown_grace_seconds: float = 10.0
    hmac_key: bytes = field(default=b"", repr=False)
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A caller allowed to use ``apps``, named by its bearer ``token`` or, under mutual TLS, by
    its certificate's ``subject`` (RFC 4514, normalized); an empty one is not a credential.

    Its rate limit is a token bucket: ``burst`` requests at once, refilled at
    ``rate_per_second`` (per relay process).
    """

    name: str
    token: bytes = field(repr=False)
    apps: tuple[str, ...]
    subject: str = ""
    rate_per_second: float = 500.0
    burst: int = 1000


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """An app's privacy mode when a request names none, and the most it may ever expose."""

    default: Privacy = Privacy.FULL
    max: Privacy = Privacy.FULL


@dataclass(frozen=True, slots=True)
class AppConfig:
    """One configured app and the settings its adapter is built from.

    ``settings`` is left out of ``repr``: ``ApnsSettings`` would show its ``.p8`` key.
    """

    id: str
    platform: str
    privacy: PrivacyPolicy
    max_concurrency: int
    settings: ApnsSettings | FcmSettings | WebPushSettings = field(repr=False)
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)
    retry_budget: RetryBudgetPolicy = field(default_factory=RetryBudgetPolicy)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits, enforced before any push is sent."""

    max_devices: int = 100
    max_request_bytes: int = 65536
    default_deadline_seconds: float = 10.0
    max_inflight_requests: int = 1000


@dataclass(frozen=True, slots=True)
class Config:
    """The whole config; ``apps`` maps app id to app, in file order. No ``clients`` = open API."""

    server: ServerConfig
    clients: tuple[ClientConfig, ...]
    apps: Mapping[str, AppConfig]
    limits: Limits


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a YAML config file; relative file names start at the file's directory.

    The directory is taken as named, symlinks unresolved (Kubernetes mounts a ConfigMap through
    symlinks into a hidden directory where the secrets are not).

    Raises:
        ConfigError: with every problem found, file-level ones under the path ``config``.
    """
    path = Path(path)
    try:
        data, problems = s.read_yaml(path)
    except Invalid as exc:
        raise ConfigError([f"config: {exc}"]) from None
    try:
        config = parse_config(data, base_dir=path.absolute().parent)
    except ConfigError as error:
        problems += error.problems
    if problems:
        raise ConfigError(problems)
    return config


def parse_config(data: Mapping[str, Any], *, base_dir: Path) -> Config:
    """Check an already-parsed config mapping; relative file names start at ``base_dir``.

    Raises:
        ConfigError: with every problem found.
    """
    if data is None:
        raise ConfigError(["config: the file is empty"])
    if not isinstance(data, Mapping):
        raise ConfigError([f"config: expected a mapping with keys {', '.join(_TOP.fields)}"])
    ctx = s.Ctx(Path(base_dir))
    config = ctx.check(_TOP, "", data)
    _check_client_apps(ctx, data)
    _check_client_subjects(ctx, data)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    assert isinstance(config, Config)
    return config


# --- secrets and other file contents --------------------------------------------------------------


def _hmac_key(data: bytes) -> bytes:
    if len(data) < 32:
        raise Invalid("the key must be at least 32 bytes (e.g. head -c 32 /dev/urandom)")
    return data


def _client_token(data: bytes) -> bytes:
    token = data.strip()
    if not re.fullmatch(rb"[\x21-\x7e]+", token):
        raise Invalid("the token must be printable ASCII without spaces (it travels as metadata)")
    if len(token) < 16:
        raise Invalid("the token must be at least 16 characters")
    return token


_SERVICE_ACCOUNT_KEYS = ("project_id", "private_key", "client_email", "token_uri")


def _subject(ctx: s.Ctx, path: str, value: Any) -> str:
    """A certificate subject as RFC 4514 text, normalized so it compares with a peer's."""
    text: str = s.string()(ctx, path, value)
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError:
        raise Invalid(
            'must be an RFC 4514 name like "CN=chat-eu,O=Example" (no space after commas)'
        ) from None
    return name.rfc4514_string()


def _client(values: dict[str, Any]) -> ClientConfig:
    values["apps"] = tuple(dict.fromkeys(values["apps"]))
    return ClientConfig(**{"token": b"", **values})


def _distinct_credentials(
    ctx: s.Ctx, path: str, clients: Sequence[tuple[int, ClientConfig]]
) -> None:
    """No two clients may share a token or a subject: either would name both. (An entry that
    repeats a name is reported as a duplicate already.)"""
    first: dict[str, tuple[int, ClientConfig]] = {}
    for i, client in clients:
        first.setdefault(client.name, (i, client))
    distinct = list(first.values())  # in file order
    for attr, key in (("token", "token_file"), ("subject", "subject")):
        seen: dict[object, int] = {}
        for i, client in distinct:
            value = getattr(client, attr)
            if value and value in seen:
                ctx.report(f"{path}[{i}].{key}", f"the same {attr} as {path}[{seen[value]}]")
            seen.setdefault(value, i)


def _service_account(data: bytes) -> Mapping[str, Any]:
    """A Google service-account JSON key file, checked but never echoed."""
    try:
        account = json.loads(data)
    except ValueError:
        raise Invalid("not a JSON file") from None
    if not isinstance(account, dict) or account.get("type") != "service_account":
        raise Invalid('not a service-account key ("type" must be "service_account")')
    missing = [k for k in _SERVICE_ACCOUNT_KEYS if not account.get(k)]
    if missing or not all(isinstance(account[k], str) for k in _SERVICE_ACCOUNT_KEYS):
        raise Invalid(f"needs string fields {', '.join(_SERVICE_ACCOUNT_KEYS)}")
    try:
        s.check_url(account["token_uri"], "https", path_ok=True)
    except Invalid as exc:
        raise Invalid(f"token_uri {exc}") from None
    try:
        key = s.private_key(account["private_key"].encode())
    except Invalid as exc:
        raise Invalid(f"private_key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise Invalid("private_key: not an RSA private key")
    return MappingProxyType(account)


# --- the schema -----------------------------------------------------------------------------------

_NAME = s.string(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "must be 1-64 letters, digits, '.', '_', '-'")
_APPLE_ID = s.string(r"[A-Z0-9]{10}", "must be 10 upper-case letters or digits")
_MODES = {mode.name.lower(): mode for mode in Privacy}


def _privacy(values: dict[str, Any]) -> PrivacyPolicy:
    """``max`` defaults to full, ``default`` to ``max``."""
    ceiling = values.get("max", Privacy.FULL)
    default = values.get("default", ceiling)
    if EXPOSURE[default] > EXPOSURE[ceiling]:  # full > redacted = encrypted > id_only
        raise Invalid(
            f"default {default.name.lower()} exposes more than max {ceiling.name.lower()}"
        )
    return PrivacyPolicy(default, ceiling)


_TOKEN_AUTH = {"key_pem": "key_file", "key_id": "key_id", "team_id": "team_id"}


def _apns_auth(values: dict[str, Any]) -> dict[str, Any]:
    """Exactly one form: token auth (all three keys) or certificate auth."""
    missing = [key for attr, key in _TOKEN_AUTH.items() if attr not in values]
    if "cert_file" in values and len(missing) < 3:
        raise Invalid("give key_file, key_id and team_id (token auth) or cert_file, not both")
    if "cert_file" not in values and missing:
        raise Invalid(
            f"token auth needs key_file, key_id and team_id (missing {', '.join(missing)})"
        )
    return values


def _tls(values: dict[str, Any]) -> TlsConfig:
    try:
        s.check_key_matches(s.certificates(values["cert_pem"])[0], s.private_key(values["key_pem"]))
    except Invalid:
        raise Invalid("key_file does not match cert_file") from None
    return TlsConfig(**values)


def _flag(ctx: s.Ctx, path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def _host_glob(ctx: s.Ctx, path: str, value: Any) -> str:
    rule = "must be a host glob like *.push.services.mozilla.com (no scheme, port or path)"
    glob: str = s.string(r"[A-Za-z0-9*?.-]+", rule)(ctx, path, value)
    if not re.search(r"[A-Za-z0-9]", glob):
        raise Invalid("matches every host; name the push services' hosts")
    return glob.lower()


def _vapid_subject(ctx: s.Ctx, path: str, value: Any) -> str:
    text: str = s.string()(ctx, path, value)
    if not re.fullmatch(r"mailto:[^\s@]+@[^\s@]+", text):
        try:
            s.check_url(text, "https", path_ok=True)
        except Invalid:
            raise Invalid("must be a mailto: or https: URI (a contact for push services)") from None
    return text


def _app(
    settings_type: type[ApnsSettings | FcmSettings | WebPushSettings], nested: str = ""
) -> s.Builder:
    """Builds an AppConfig; the rest of the keys (and those under ``nested``) are settings."""

    def build(values: dict[str, Any]) -> AppConfig:
        app = {key: values.pop(key) for key in _RELAY_KEYS if key in values}
        values.update(values.pop(nested, {}))
        return AppConfig(**app, settings=settings_type(app_id=app["id"], **values))

    return build


# An app's keys the relay reads itself; the rest are its adapter's settings.
_RELAY_KEYS = ("id", "platform", "privacy", "max_concurrency", "circuit", "retry_budget")
_CIRCUIT = Section(
    {
        "failure_rate": Field(s.number(1.0)),
        "window_seconds": Field(s.number(3600)),
        "min_requests": Field(s.integer(1, 1_000_000)),
        "cooldown_seconds": Field(s.number(3600)),
        "probes": Field(s.integer(1, 1000)),
    },
    build=lambda values: CircuitPolicy(**values),
)
_RETRY_BUDGET = Section(
    {
        "ratio": Field(s.number(10, zero_ok=True)),
        "min_per_second": Field(s.number(10_000, zero_ok=True)),
    },
    build=lambda values: RetryBudgetPolicy(**values),
)
_PRIVACY = Section(
    {"default": Field(s.choice(_MODES)), "max": Field(s.choice(_MODES))}, build=_privacy
)
_APP_COMMON = {
    "id": Field(_NAME, required=True),
    "platform": Field(s.choice(("apns", "fcm", "webpush")), required=True),
    "privacy": Field(_PRIVACY, default=PrivacyPolicy()),
    "max_concurrency": Field(s.integer(1, 10_000), default=100),
    "circuit": Field(_CIRCUIT, default=CircuitPolicy()),
    "retry_budget": Field(_RETRY_BUDGET, default=RetryBudgetPolicy()),
    "ca_file": Field(s.file(s.certificates_pem), attr="ca_pem"),
    "proxy": Field(s.url("http")),
}
_APNS_AUTH = Section(
    {
        "key_file": Field(s.file(s.ec_p256_key_pem), attr="key_pem"),
        "key_id": Field(_APPLE_ID),
        "team_id": Field(_APPLE_ID),
        "cert_file": Field(s.file(s.cert_and_key_pem, as_path=True)),
    },
    build=_apns_auth,
)
_APNS = Section(
    {
        **_APP_COMMON,
        "topic": Field(s.string(r"[A-Za-z0-9.-]+", "must be the app's bundle ID"), required=True),
        "environment": Field(s.choice(("production", "sandbox"))),
        "auth": Field(_APNS_AUTH, required=True),
        "endpoint": Field(s.url("https")),
        "voip": Field(_flag),
    },
    build=_app(ApnsSettings, "auth"),
)
_FCM = Section(
    {
        **_APP_COMMON,
        "service_account_file": Field(
            s.file(_service_account), required=True, attr="service_account"
        ),
        "endpoint": Field(s.url("https")),
    },
    build=_app(FcmSettings),
)
_VAPID = Section(
    {
        "private_key_file": Field(
            s.file(s.ec_p256_key_pem), required=True, attr="vapid_private_key_pem"
        ),
        "subject": Field(_vapid_subject, required=True),
    }
)
_WEBPUSH = Section(
    {
        **_APP_COMMON,
        "vapid": Field(_VAPID, required=True),
        "allowed_endpoints": Field(ListOf(_host_glob), required=True),
    },
    build=_app(WebPushSettings, "vapid"),
)
_TLS = Section(
    {
        "cert_file": Field(s.file(s.certificates_pem), required=True, attr="cert_pem"),
        "key_file": Field(s.file(s.private_key_pem), required=True, attr="key_pem"),
        "client_ca_file": Field(s.file(s.certificates_pem), attr="client_ca_pem"),
    },
    build=_tls,
)
_SERVER = Section(
    {
        "listen": Field(s.listen_address),
        "http_listen": Field(s.listen_address),
        "health_listen": Field(s.listen_address),
        "tls": Field(_TLS),
        "shutdown_grace_seconds": Field(s.number(3600, zero_ok=True)),
        "hmac_key_file": Field(s.file(_hmac_key), attr="hmac_key"),
        "log_level": Field(s.choice(("debug", "info", "warning", "error"))),
    },
    build=lambda values: ServerConfig(**values),
)
_CLIENT = Section(
    {
        "name": Field(_NAME, required=True),
        "token_file": Field(s.file(_client_token), required=True, unless="subject", attr="token"),
        "subject": Field(_subject),
        "apps": Field(ListOf(_NAME, min_items=1), required=True),
        "rate_per_second": Field(s.number(1_000_000)),
        "burst": Field(s.integer(1, 1_000_000)),
    },
    build=_client,
)
_LIMITS = Section(
    {
        "max_devices": Field(s.integer(1, 10_000)),
        "max_request_bytes": Field(s.integer(1, 16 << 20)),
        "default_deadline_seconds": Field(s.number(3600)),
        "max_inflight_requests": Field(s.integer(1, 1_000_000)),
    },
    build=lambda values: Limits(**values),
)
_TOP = Section(
    {
        "server": Field(_SERVER, default=ServerConfig()),
        "clients": Field(
            ListOf(_CLIENT, min_items=1, unique="name", across=_distinct_credentials), default=()
        ),
        "apps": Field(
            ListOf(OneOf("platform", {"apns": _APNS, "fcm": _FCM, "webpush": _WEBPUSH}), 1, "id"),
            required=True,
        ),
        "limits": Field(_LIMITS, default=Limits()),
    },
    build=lambda v: Config(**{**v, "apps": MappingProxyType({a.id: a for a in v["apps"]})}),
)
SCHEMA: s.Checker = _TOP  # for tests and docs: ``relay._schema.schema_keys(SCHEMA)``


def _check_client_apps(ctx: s.Ctx, data: Mapping[str, Any]) -> None:
    """Every app a client names must be configured (checked on the raw data, so an app with
    other problems still counts as named)."""
    apps, clients = data.get("apps"), data.get("clients")
    if not isinstance(apps, list) or not isinstance(clients, list):
        return
    ids = [app.get("id") if isinstance(app, Mapping) else None for app in apps]
    if not all(isinstance(i, str) for i in ids):
        return  # an app without a usable id is reported already; any name could be its
    for i, client in enumerate(clients):
        names = client.get("apps") if isinstance(client, Mapping) else None
        for j, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in ids:
                ctx.report(f"clients[{i}].apps[{j}]", "not a configured app (no apps[].id matches)")


def _check_client_subjects(ctx: s.Ctx, data: Mapping[str, Any]) -> None:
    """A certificate subject can name a client only when callers must present certificates."""
    server, clients = data.get("server"), data.get("clients")
    tls = server.get("tls") if isinstance(server, Mapping) else None
    if not isinstance(clients, list) or (isinstance(tls, Mapping) and "client_ca_file" in tls):
        return
    for i, client in enumerate(clients):
        if isinstance(client, Mapping) and "subject" in client:
            ctx.report(f"clients[{i}].subject", "needs server.tls.client_ca_file (mutual TLS)")
