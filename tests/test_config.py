"""relay/config.py: the example file loads, and every rule reports its problem by path."""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.apns import ApnsSettings
from adapters.fcm import FcmSettings
from adapters.webpush import WebPushSettings
from relay._schema import schema_keys
from relay.config import (
    SCHEMA,
    Config,
    ConfigError,
    Limits,
    PrivacyPolicy,
    ServerConfig,
    load_config,
    parse_config,
)
from relay.model import Privacy

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLE = CONFIG_DIR / "relay.example.yaml"
DEMO = CONFIG_DIR / "demo.yaml"


# --- key material ---------------------------------------------------------------------------------


def _pem(key: Any, fmt: Any = serialization.PrivateFormat.PKCS8) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))


def _service_account(private_key_pem: bytes, **changes: Any) -> bytes:
    account = {
        "type": "service_account",
        "project_id": "example-chat",
        "private_key_id": "0123456789abcdef",
        "private_key": private_key_pem.decode(),
        "client_email": "relay@example-chat.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    account.update(changes)
    return json.dumps({k: v for k, v in account.items() if v is not None}).encode()


class Material:
    """Real keys and certificates, made once per module (RSA generation is the slow part)."""

    def __init__(self) -> None:
        self.server_ca, self.client_ca, self.apple_ca = trustme.CA(), trustme.CA(), trustme.CA()
        server = self.server_ca.issue_cert("relay.example.com")
        self.server_chain = b"".join(blob.bytes() for blob in server.cert_chain_pems)
        self.server_key = server.private_key_pem.bytes()
        apns = self.apple_ca.issue_cert("com.example.chat.legacy")
        self.apns_cert = apns.cert_chain_pems[0].bytes()
        self.apns_key = apns.private_key_pem.bytes()
        self.p8 = _pem(ec.generate_private_key(ec.SECP256R1()))
        self.vapid = _pem(
            ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL
        )
        self.p384 = _pem(ec.generate_private_key(ec.SECP384R1()))
        self.rsa = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        # Checking an RSA key costs ~45 ms at 2048 bits; the ~100 small configs use a small one.
        self.rsa_small = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
        self.token = secrets.token_urlsafe(24).encode()
        self.hmac = secrets.token_bytes(32)

    def example_files(self) -> dict[str, bytes]:
        """The secret files config/relay.example.yaml names."""
        return {
            "secrets/server-chain.pem": self.server_chain,
            "secrets/server.key": self.server_key,
            "secrets/clients-ca.pem": self.client_ca.cert_pem.bytes(),
            "secrets/hmac.key": self.hmac,
            "secrets/chat-eu.token": b"  " + self.token + b"\n",
            "secrets/AuthKey_ABC123DEFG.p8": self.p8,
            "secrets/apns-legacy.pem": self.apns_cert + self.apns_key,
            "secrets/chat-android-sa.json": _service_account(self.rsa),
            "secrets/gateway-ca.pem": self.apple_ca.cert_pem.bytes(),
            "secrets/vapid.pem": self.vapid,
        }

    def secrets(self) -> list[bytes]:
        """Every secret, for checking that no repr or message shows one."""
        keys = [self.server_key, self.apns_key, self.p8, self.vapid, self.rsa, self.rsa_small]
        return [*keys, self.token, self.hmac]


@pytest.fixture(scope="module")
def material() -> Material:
    return Material()


def write_files(base: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(content)


@pytest.fixture
def example(tmp_path: Path, material: Material) -> Path:
    shutil.copy(EXAMPLE, tmp_path / "relay.yaml")
    write_files(tmp_path, material.example_files())
    return tmp_path / "relay.yaml"


# --- the documented example -----------------------------------------------------------------------


def test_example_loads(example: Path, material: Material) -> None:
    config = load_config(example)
    base = example.parent

    assert config.server.listen == "0.0.0.0:50051"
    assert config.server.http_listen == "0.0.0.0:9464"
    assert config.server.tls is not None
    assert config.server.tls.cert_pem == material.server_chain
    assert config.server.tls.key_pem == material.server_key
    assert config.server.tls.client_ca_pem == material.client_ca.cert_pem.bytes()
    assert config.server.shutdown_grace_seconds == 10.0
    assert config.server.hmac_key == material.hmac
    assert config.server.log_level == "info"

    [client] = config.clients
    assert client.name == "chat-eu"
    assert client.token == material.token  # surrounding whitespace stripped
    assert client.apps == ("chat-ios", "chat-ios-legacy", "chat-android", "chat-web")

    assert list(config.apps) == [
        "chat-ios",
        "chat-ios-legacy",
        "chat-ios-voip",
        "chat-android",
        "chat-web",
    ]
    ios = config.apps["chat-ios"]
    assert (ios.id, ios.platform, ios.max_concurrency) == ("chat-ios", "apns", 100)
    assert ios.privacy == PrivacyPolicy(Privacy.FULL, Privacy.FULL)
    assert ios.settings == ApnsSettings(
        app_id="chat-ios",
        topic="com.example.chat",
        environment="production",
        key_pem=material.p8,
        key_id="ABC123DEFG",
        team_id="TEAM123456",
    )

    voip = config.apps["chat-ios-voip"].settings
    assert isinstance(voip, ApnsSettings)
    assert (voip.voip, voip.topic, voip.key_pem) == (True, "com.example.chat", material.p8)
    assert ios.settings.voip is False

    legacy = config.apps["chat-ios-legacy"].settings
    assert isinstance(legacy, ApnsSettings)
    assert (legacy.environment, legacy.key_pem) == ("sandbox", b"")
    assert legacy.cert_file == str(base / "secrets/apns-legacy.pem")
    assert legacy.proxy == "http://proxy.internal.example:3128"

    android = config.apps["chat-android"]
    assert android.privacy == PrivacyPolicy(Privacy.ENCRYPTED, Privacy.ENCRYPTED)
    assert isinstance(android.settings, FcmSettings)
    assert android.settings.service_account["project_id"] == "example-chat"
    assert android.settings.service_account["token_uri"] == "https://oauth2.googleapis.com/token"
    assert android.settings.endpoint == "https://fcm.googleapis.com"
    assert android.settings.ca_pem == material.apple_ca.cert_pem.bytes()

    assert config.apps["chat-web"].settings == WebPushSettings(
        app_id="chat-web",
        vapid_private_key_pem=material.vapid,
        subject="mailto:ops@example.com",
        allowed_endpoints=(
            "*.push.services.mozilla.com",
            "fcm.googleapis.com",
            "*.notify.windows.com",
            "web.push.apple.com",
        ),
    )
    assert config.limits == Limits(100, 65536, 10.0)


def _data_keys(data: Any, path: str = "") -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{key}" if path else str(key)
            yield sub
            yield from _data_keys(value, sub)
    elif isinstance(data, list):
        for item in data:
            yield from _data_keys(item, path + "[]")


def test_example_uses_every_key_the_parser_accepts() -> None:
    used = set(_data_keys(yaml.safe_load(EXAMPLE.read_text())))
    accepted = set(schema_keys(SCHEMA))
    assert accepted - used == set(), "document these keys in config/relay.example.yaml"
    assert used - accepted == set()


def test_example_comments_every_key() -> None:
    """Each key the parser accepts has at least one line in the example with a comment on it or
    directly above it."""
    lines = EXAMPLE.read_text().splitlines()
    documented = set()
    for i, line in enumerate(lines):
        match = re.match(r"\s*(?:- )?([a-z_]+):", line)
        if match and ("#" in line or lines[i - 1].lstrip().startswith("#")):
            documented.add(match[1])
    names = {key.rsplit(".", 1)[-1].removesuffix("[]") for key in schema_keys(SCHEMA)}
    assert names - documented == set()


def test_demo_config_is_valid(tmp_path: Path, material: Material) -> None:
    shutil.copy(DEMO, tmp_path / "demo.yaml")
    write_files(tmp_path, {"demo-secrets/AuthKey_DEMO000001.p8": material.p8})
    write_files(tmp_path, {"demo-secrets/fake-ca.pem": material.apple_ca.cert_pem.bytes()})
    config = load_config(tmp_path / "demo.yaml")
    assert {app.platform for app in config.apps.values()} == {"apns"}


# --- one small valid config, and the rules --------------------------------------------------------


@pytest.fixture
def base(tmp_path: Path, material: Material) -> Path:
    write_files(
        tmp_path,
        {
            "k.p8": material.p8,
            "vapid.pem": material.vapid,
            "sa.json": _service_account(material.rsa_small),
            "token": material.token,
            "hmac": material.hmac,
            "ca.pem": material.apple_ca.cert_pem.bytes(),
            "apns.pem": material.apns_cert + material.apns_key,
            "chain.pem": material.server_chain,
            "server.key": material.server_key,
            "p384.pem": material.p384,
            "rsa.pem": material.rsa,
            "garbage": b"SECRET-CONTENT-1234\n",
        },
    )
    (tmp_path / "dir").mkdir()
    return tmp_path


VALID: dict[str, Any] = {
    "clients": [{"name": "eu", "token_file": "token", "apps": ["ios", "web"]}],
    "apps": [
        {
            "id": "ios",
            "platform": "apns",
            "topic": "com.example.chat",
            "auth": {"key_file": "k.p8", "key_id": "ABC123DEFG", "team_id": "TEAM123456"},
        },
        {"id": "android", "platform": "fcm", "service_account_file": "sa.json"},
        {
            "id": "web",
            "platform": "webpush",
            "vapid": {"private_key_file": "vapid.pem", "subject": "https://example.com/ops"},
            "allowed_endpoints": [],
        },
    ],
}
DELETE = object()


def changed(**changes: Any) -> dict[str, Any]:
    """VALID with ``path=value`` changes; paths use ``__`` for dots and ``_N`` for list items."""
    data = copy.deepcopy(VALID)
    for key, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in key.split("__")]
        node: Any = data
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


def problems(data: Any, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base_dir)
    return info.value.problems


def test_valid_minimal_config_and_defaults(base: Path) -> None:
    config = parse_config(VALID, base_dir=base)
    assert config.server == ServerConfig()
    assert config.limits == Limits()
    assert config.apps["ios"].privacy == PrivacyPolicy(Privacy.FULL, Privacy.FULL)
    assert config.apps["ios"].max_concurrency == 100
    assert isinstance(config.apps["web"].settings, WebPushSettings)
    assert config.apps["web"].settings.allowed_endpoints == ()  # deny everything
    assert parse_config({"apps": VALID["apps"]}, base_dir=base).clients == ()  # open API


RULES: list[tuple[dict[str, Any], str]] = [
    # unknown keys, and secrets can't be inlined
    (changed(sever={}), "sever: unknown key (did you mean server?)"),
    (changed(apps__0__auht={}), "apps[0].auht: unknown key (did you mean auth?)"),
    (changed(apps__0__auth__key="-----BEGIN SECRET"), "apps[0].auth.key: unknown key"),
    (
        changed(limits={"max_device": 3}),
        "limits.max_device: unknown key (did you mean max_devices?)",
    ),
    (changed(apps__2__endpoint="https://x.example"), "apps[2].endpoint: unknown key"),
    # types
    (changed(server={"listen": 50051}), "server.listen: expected a string"),
    (changed(limits={"max_devices": "100"}), "limits.max_devices: expected an integer"),
    (changed(limits={"max_devices": True}), "limits.max_devices: expected an integer"),
    (
        changed(limits={"default_deadline_seconds": "10"}),
        "limits.default_deadline_seconds: expected a number",
    ),
    (changed(server={"tls": []}), "server.tls: expected a mapping"),
    (changed(apps={}), "apps: expected a list"),
    (changed(apps=[], clients=DELETE), "apps: must have at least 1 item(s)"),
    (changed(clients=[]), "clients: must have at least 1 item(s)"),
    (changed(apps__0="ios"), "apps[0]: expected a mapping"),
    # required keys
    (changed(apps=DELETE), "apps: required"),
    (changed(apps__0__topic=DELETE), "apps[0].topic: required"),
    (changed(apps__0__id=DELETE), "apps[0].id: required"),
    (changed(apps__1__service_account_file=DELETE), "apps[1].service_account_file: required"),
    (changed(apps__2__allowed_endpoints=DELETE), "apps[2].allowed_endpoints: required"),
    (changed(clients__0__token_file=DELETE), "clients[0].token_file: required"),
    (changed(server={"tls": {"key_file": "server.key"}}), "server.tls.cert_file: required"),
    # platform
    (changed(apps__0__platform="apn"), "apps[0].platform: must be one of apns, fcm, webpush"),
    (changed(apps__0__platform=DELETE), "apps[0].platform: required"),
    # names, duplicates, references
    (changed(apps__1__id="ios"), "apps[1].id: duplicate of apps[0]"),
    (changed(apps__1__id="has space"), "apps[1].id: must be 1-64 letters, digits, '.', '_', '-'"),
    (changed(clients=[VALID["clients"][0]] * 2), "clients[1].name: duplicate of clients[0]"),
    (
        changed(clients__0__apps=["ios", "nope"]),
        "clients[0].apps[1]: not a configured app (no apps[].id matches)",
    ),
    (changed(clients__0__apps=[]), "clients[0].apps: must have at least 1 item(s)"),
    # privacy
    (
        changed(apps__0__privacy={"default": "full", "max": "redacted"}),
        "apps[0].privacy: default full exposes more than max redacted",
    ),
    (
        changed(apps__0__privacy={"default": "redacted", "max": "id_only"}),
        "apps[0].privacy: default redacted exposes more than max id_only",
    ),
    (
        changed(apps__0__privacy={"default": "FULL"}),
        "apps[0].privacy.default: must be one of full, redacted, id_only, encrypted",
    ),
    # addresses and numbers
    (changed(server={"listen": "localhost"}), "server.listen: must be host:port"),
    (changed(server={"listen": "::1:50051"}), "server.listen: must be host:port"),
    (changed(server={"listen": "127.0.0.1:70000"}), "server.listen: must be host:port"),
    (changed(server={"http_listen": "999.1.1.1:80"}), "server.http_listen: must be host:port"),
    (changed(server={"http_listen": "[zz::1]:80"}), "server.http_listen: must be host:port"),
    (changed(server={"http_listen": "my host:80"}), "server.http_listen: must be host:port"),
    (changed(limits={"max_devices": 0}), "limits.max_devices: must be between 1 and 10000"),
    (changed(limits={"max_devices": 10001}), "limits.max_devices: must be between 1 and 10000"),
    (changed(limits={"max_request_bytes": -1}), "limits.max_request_bytes: must be between 1"),
    (
        changed(limits={"default_deadline_seconds": 0}),
        "limits.default_deadline_seconds: must be above 0",
    ),
    (
        changed(limits={"default_deadline_seconds": float("nan")}),
        "limits.default_deadline_seconds: expected a number",
    ),
    (
        changed(server={"shutdown_grace_seconds": -1}),
        "server.shutdown_grace_seconds: must be 0 and at most 3600",
    ),
    (changed(apps__0__max_concurrency=0), "apps[0].max_concurrency: must be between 1 and 10000"),
    (
        changed(server={"log_level": "loud"}),
        "server.log_level: must be one of debug, info, warning, error",
    ),
    # URLs
    (
        changed(apps__0__endpoint="http://127.0.0.1:8443"),
        "apps[0].endpoint: must be a URL of the form https://host[:port]",
    ),
    (
        changed(apps__0__endpoint="https://api.example/path"),
        "apps[0].endpoint: must be a URL of the form https://host[:port]",
    ),
    (changed(apps__0__endpoint="https://api.example:99999"), "apps[0].endpoint: must be a URL"),
    (
        changed(apps__1__proxy="https://proxy:3128"),
        "apps[1].proxy: must be a URL of the form http://host[:port]",
    ),
    (
        changed(apps__1__proxy="http://user:pw@proxy:3128"),
        "apps[1].proxy: must not contain credentials",
    ),
    # files
    (changed(apps__0__auth__key_file="missing.p8"), "apps[0].auth.key_file: no such file"),
    (changed(apps__0__auth__key_file="dir"), "apps[0].auth.key_file: is a directory, not a file"),
    (changed(apps__0__auth__key_file="garbage"), "apps[0].auth.key_file: no PEM private key found"),
    (
        changed(apps__0__auth__key_file="p384.pem"),
        "apps[0].auth.key_file: not an EC P-256 private key",
    ),
    (
        changed(apps__0__auth__key_file="rsa.pem"),
        "apps[0].auth.key_file: not an EC P-256 private key",
    ),
    (
        changed(apps__0__auth__key_id="abc123defg"),
        "apps[0].auth.key_id: must be 10 upper-case letters or digits",
    ),
    (
        changed(apps__0__auth__team_id="TEAM12345"),
        "apps[0].auth.team_id: must be 10 upper-case letters or digits",
    ),
    (changed(apps__0__ca_file="garbage"), "apps[0].ca_file: no PEM certificate found"),
    (
        changed(apps__0__auth={"cert_file": "ca.pem"}),
        "apps[0].auth.cert_file: no PEM private key found",
    ),
    (
        changed(apps__0__auth={"cert_file": "k.p8"}),
        "apps[0].auth.cert_file: no PEM certificate found",
    ),
    (
        changed(server={"hmac_key_file": "garbage"}),
        "server.hmac_key_file: the key must be at least 32 bytes",
    ),
    (
        changed(clients__0__token_file="hmac"),
        "clients[0].token_file: the token must be printable ASCII",
    ),
    (changed(clients__0__token_file="dir"), "clients[0].token_file: is a directory"),
    # APNs auth forms
    (
        changed(apps__0__auth__cert_file="apns.pem"),
        "apps[0].auth: give key_file, key_id and team_id (token auth) or cert_file, not both",
    ),
    (
        changed(apps__0__auth={}),
        "apps[0].auth: token auth needs key_file, key_id and team_id (missing key_file, key_id",
    ),
    (
        changed(apps__0__auth__team_id=DELETE),
        "apps[0].auth: token auth needs key_file, key_id and team_id (missing team_id)",
    ),
    (changed(apps__0__topic="com example"), "apps[0].topic: must be the app's bundle ID"),
    (
        changed(apps__0__environment="development"),
        "apps[0].environment: must be one of production, sandbox",
    ),
    # FCM service account
    (
        changed(apps__1__service_account_file="garbage"),
        "apps[1].service_account_file: not a JSON file",
    ),
    (
        changed(apps__1__service_account_file="k.p8"),
        "apps[1].service_account_file: not a JSON file",
    ),
    # Web Push
    (
        changed(apps__2__vapid__private_key_file="p384.pem"),
        "apps[2].vapid.private_key_file: not an EC P-256 private key",
    ),
    (
        changed(apps__2__vapid__subject="ops@example.com"),
        "apps[2].vapid.subject: must be a mailto: or https: URI",
    ),
    (
        changed(apps__2__vapid__subject="http://example.com"),
        "apps[2].vapid.subject: must be a mailto: or https: URI",
    ),
    (
        changed(apps__2__allowed_endpoints=["https://push.example/x"]),
        "apps[2].allowed_endpoints[0]: must be a host glob",
    ),
    (
        changed(apps__2__allowed_endpoints=["ok.example", "*"]),
        "apps[2].allowed_endpoints[1]: matches every host",
    ),
    (changed(apps__2__allowed_endpoints="*.example"), "apps[2].allowed_endpoints: expected a list"),
]


@pytest.mark.parametrize(("data", "expected"), RULES, ids=[p for _, p in RULES])
def test_each_rule_reports_its_path(base: Path, data: dict[str, Any], expected: str) -> None:
    found = problems(data, base)
    assert len(found) == 1, found
    assert found[0].startswith(expected)


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        (
            {"type": "authorized_user"},
            'not a service-account key ("type" must be "service_account")',
        ),
        (
            {"client_email": None},
            "needs string fields project_id, private_key, client_email, token_uri",
        ),
        ({"project_id": 7}, "needs string fields"),
        (
            {"token_uri": "http://oauth2.example/token"},
            "token_uri must be a URL of the form https://",
        ),
        ({"private_key": "SECRET-CONTENT-1234"}, "private_key: no PEM private key found"),
        ({"private_key": "p8"}, "private_key: not an RSA private key"),
    ],
)
def test_service_account_rules(
    base: Path, material: Material, account: dict[str, Any], expected: str
) -> None:
    if account.get("private_key") == "p8":
        account["private_key"] = material.p8.decode()
    (base / "sa.json").write_bytes(_service_account(material.rsa_small, **account))
    [problem] = problems(VALID, base)
    assert problem.startswith(f"apps[1].service_account_file: {expected}")


def test_platform_typo_reports_only_the_platform(base: Path) -> None:
    data = changed(apps__0__platform="apn", apps__0__auth__key_file="missing.p8")
    assert problems(data, base) == [
        "apps[0].platform: must be one of apns, fcm, webpush",
        "apps[0].auth.key_file: no such file",
    ]


def test_privacy_defaults_and_equal_exposure(base: Path) -> None:
    data = changed(
        apps__0__privacy={"max": "id_only"},
        apps__1__privacy={"default": "redacted"},
        apps__2__privacy={"default": "encrypted", "max": "redacted"},
    )
    apps = parse_config(data, base_dir=base).apps
    assert apps["ios"].privacy == PrivacyPolicy(Privacy.ID_ONLY, Privacy.ID_ONLY)
    assert apps["android"].privacy == PrivacyPolicy(Privacy.REDACTED, Privacy.FULL)
    assert apps["web"].privacy == PrivacyPolicy(Privacy.ENCRYPTED, Privacy.REDACTED)


def test_ipv6_and_hostname_addresses_and_cert_auth(base: Path, material: Material) -> None:
    data = changed(
        server={
            "listen": "[::1]:0",
            "http_listen": "metrics.internal:9464",
            "tls": {"cert_file": "chain.pem", "key_file": "server.key", "client_ca_file": "ca.pem"},
        },
        apps__0__auth={"cert_file": "apns.pem"},
        apps__0__endpoint="https://127.0.0.1:8443",
        apps__0__ca_file="ca.pem",
    )
    config = parse_config(data, base_dir=base)
    assert config.server.listen == "[::1]:0"
    settings = config.apps["ios"].settings
    assert isinstance(settings, ApnsSettings)
    assert settings.cert_file == str(base / "apns.pem")
    assert settings.ca_pem == material.apple_ca.cert_pem.bytes()


def test_mismatched_keys_are_refused(base: Path, material: Material) -> None:
    (base / "other.pem").write_bytes(material.apns_cert + material.server_key)
    data = changed(
        server={"tls": {"cert_file": "chain.pem", "key_file": "k.p8"}},
        apps__0__auth={"cert_file": "other.pem"},
    )
    assert problems(data, base) == [
        "apps[0].auth.cert_file: the private key does not match the certificate",
        "server.tls: key_file does not match cert_file",
    ]


def test_encrypted_key_is_refused(base: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = serialization.BestAvailableEncryption(b"pass")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    (base / "k.p8").write_bytes(pem)
    assert problems(VALID, base) == [
        "apps[0].auth.key_file: the private key is encrypted; give an unencrypted key"
    ]


def test_unreadable_files(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open

    def refusing_open(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path.name == "k.p8":  # chmod 0 does not stop root, who runs some CI
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    (base / "loop").symlink_to("loop")
    data = changed(apps__0__ca_file="loop")
    assert problems(data, base) == [
        "apps[0].auth.key_file: cannot read the file (permission denied)",
        "apps[0].ca_file: cannot read the file (Too many levels of symbolic links)",
    ]


def test_every_problem_is_reported_at_once(base: Path) -> None:
    data = changed(
        sever={},
        server={"listen": "nope", "hmac_key_file": "missing"},
        apps__0__auth__key_id="short",
        apps__1__id="ios",
        apps__2__vapid__private_key_file="garbage",
        clients__0__apps=["ios", "ghost"],
        limits={"max_devices": 0},
    )
    assert [p.split(":")[0] for p in problems(data, base)] == [  # file order, then references
        "apps[0].auth.key_id",
        "apps[1].id",
        "apps[2].vapid.private_key_file",
        "sever",
        "server.listen",
        "server.hmac_key_file",
        "limits.max_devices",
        "clients[0].apps[1]",
    ]


def test_messages_never_echo_values(base: Path, material: Material) -> None:
    secret = material.p8.decode()
    data = changed(
        apps__0__auth__key_file="garbage",
        apps__0__auth__key=secret,
        apps__0__topic=secret,
        apps__1__service_account_file="garbage",
        clients__0__token_file="garbage",
        server={"hmac_key_file": "garbage", "listen": secret},
    )
    text = "\n".join(problems(data, base))
    assert "SECRET-CONTENT" not in text
    assert "PRIVATE KEY" not in text


def test_reprs_hide_secrets(example: Path, material: Material) -> None:
    config = load_config(example)
    text = repr(config)
    assert "chat-android" in text and "0.0.0.0:50051" in text
    for secret in material.secrets():
        assert secret.decode("latin-1") not in text
        assert repr(secret)[2:40] not in text
    assert "PRIVATE KEY" not in text and "hmac_key=" not in text and "token=" not in text


# --- files, YAML and paths ------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_file(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (base / "etc").mkdir()
    data = changed(
        server={"hmac_key_file": str(base / "hmac")},  # absolute paths work too
        clients__0__token_file="../token",
        apps__0__auth__key_file="../k.p8",
        apps__1__service_account_file="../sa.json",
        apps__2__vapid__private_key_file="../vapid.pem",
    )
    (base / "etc/relay.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(base / "dir")  # the working directory plays no part
    config = load_config(Path("..") / "etc" / "relay.yaml")
    assert len(config.server.hmac_key) == 32
    assert parse_config(VALID, base_dir=base).apps["ios"].settings == config.apps["ios"].settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "config: the file is empty"),
        ("# nothing\n", "config: the file is empty"),
        ("- apps\n", "config: expected a mapping with keys server, clients, apps, limits"),
        ("apps: [\n", "config: not valid YAML (line 2, column 1: expected the node content"),
        ("a: 1\n---\nb: 2\n", "config: not valid YAML"),
        (b"\xff\xfe".decode("latin-1"), "config: not UTF-8 text"),
    ],
)
def test_file_level_problems(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "relay.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "relay.yaml")
    [problem] = info.value.problems
    assert problem.startswith(expected)
    assert str(info.value).startswith("invalid config:\n  config: ")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == ["config: no such file"]


def test_duplicate_yaml_keys_are_problems(base: Path) -> None:
    text = yaml.safe_dump(VALID) + "limits:\n  max_devices: 5\n  max_devices: 0\nclients: []\n"
    (base / "relay.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(base / "relay.yaml")
    found = info.value.problems
    assert re.fullmatch(r"limits\.max_devices: duplicate key \(lines \d+ and \d+\)", found[0])
    assert re.fullmatch(r"clients: duplicate key \(lines \d+ and \d+\)", found[1])
    assert found[2:] == [
        "clients: must have at least 1 item(s)",
        "limits.max_devices: must be between 1 and 10000",
    ]


def test_config_objects_are_frozen(base: Path) -> None:
    config = parse_config(VALID, base_dir=base)
    with pytest.raises(AttributeError):
        config.limits = Limits()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.apps["x"] = config.apps["ios"]  # type: ignore[index]
    assert isinstance(config, Config)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["apps", "id", "platform", "server", "tls", "auth", "clients", "x"])
            | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_JSONISH)
def test_any_input_gives_config_error_or_config(data: Any) -> None:
    try:
        parse_config(data, base_dir=Path("/nonexistent"))
    except ConfigError as error:
        assert error.problems
        assert all(": " in p for p in error.problems)


# --- callers: subjects, rates, in-flight cap, health listener -------------------------------------

MUTUAL_TLS = {
    "tls": {"cert_file": "chain.pem", "key_file": "server.key", "client_ca_file": "ca.pem"}
}


def test_example_documents_the_caller_keys(example: Path) -> None:
    config = load_config(example)
    [client] = config.clients
    assert client.subject == "CN=chat-eu,O=Example Chat"
    assert (client.rate_per_second, client.burst) == (500.0, 1000)
    assert config.server.health_listen == "0.0.0.0:50052"
    assert config.limits.max_inflight_requests == 1000


def test_caller_defaults(base: Path) -> None:
    config = parse_config(VALID, base_dir=base)
    [client] = config.clients
    assert (client.subject, client.rate_per_second, client.burst) == ("", 500.0, 1000)
    assert config.server.health_listen == ""  # no plaintext health listener
    assert config.limits.max_inflight_requests == 1000


def test_a_subject_can_name_a_client_instead_of_a_token(base: Path) -> None:
    data = changed(
        server=MUTUAL_TLS,
        clients__0__token_file=DELETE,
        clients__0__subject="CN=chat-eu,O=Example Chat,C=DE",
        clients__0__rate_per_second=0.5,
        clients__0__burst=3,
        limits={"max_inflight_requests": 7},
    )
    config = parse_config(data, base_dir=base)
    [client] = config.clients
    assert (client.token, client.subject) == (b"", "CN=chat-eu,O=Example Chat,C=DE")
    assert (client.rate_per_second, client.burst) == (0.5, 3)
    assert config.limits.max_inflight_requests == 7


CALLER_RULES: list[tuple[dict[str, Any], str]] = [
    (
        changed(clients__0__token_file=DELETE),
        "clients[0].token_file: required unless subject is given",
    ),
    (
        changed(clients__0__subject="CN=chat-eu"),
        "clients[0].subject: needs server.tls.client_ca_file (mutual TLS)",
    ),
    (
        changed(server=MUTUAL_TLS, clients__0__subject="CN=chat-eu, O=Example"),
        'clients[0].subject: must be an RFC 4514 name like "CN=chat-eu,O=Example"',
    ),
    (
        changed(server=MUTUAL_TLS, clients__0__subject="chat-eu"),
        "clients[0].subject: must be an RFC 4514 name",
    ),
    (
        changed(clients=[VALID["clients"][0], {**VALID["clients"][0], "name": "us"}]),
        "clients[1].token_file: the same token as clients[0]",
    ),
    (
        changed(
            server=MUTUAL_TLS,
            clients=[
                {"name": "eu", "subject": "CN=a", "apps": ["ios"]},
                {"name": "us", "subject": "CN=a", "apps": ["ios"]},
            ],
        ),
        "clients[1].subject: the same subject as clients[0]",
    ),
    (changed(clients__0__rate_per_second=0), "clients[0].rate_per_second: must be above 0"),
    (changed(clients__0__burst=0), "clients[0].burst: must be between 1 and 1000000"),
    (
        changed(limits={"max_inflight_requests": 0}),
        "limits.max_inflight_requests: must be between 1 and 1000000",
    ),
    (changed(server={"health_listen": "50052"}), "server.health_listen: must be host:port"),
]


@pytest.mark.parametrize(("data", "expected"), CALLER_RULES, ids=[p for _, p in CALLER_RULES])
def test_each_caller_rule_reports_its_path(base: Path, data: dict[str, Any], expected: str) -> None:
    found = problems(data, base)
    assert len(found) == 1, found
    assert found[0].startswith(expected)
