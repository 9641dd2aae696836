"""A small declarative schema for the config file: sections of fields, checked all at once.

A *checker* is a callable ``(ctx, path, value) -> result``: it returns the converted value, or
raises :class:`Invalid` with a rule to report at ``path``, or reports several problems itself and
returns :data:`INVALID`. :class:`Section`, :class:`ListOf` and :class:`OneOf` are checkers built
from other checkers, so the whole file is described as data in ``relay/config.py`` and walked
here once, collecting every problem as ``"path: message"``. Messages name the rule and never
echo a value: a value may be a secret that landed in the wrong key.

The generic leaf checkers (strings, numbers, addresses, URLs, files, PEM material) live here too;
what the config builds from them lives in ``relay/config.py``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()  # the result of a check that reported a problem
_NO_DEFAULT: Final = object()
MAX_FILE_BYTES = 1 << 20  # nothing a config names (keys, certs, tokens) is anywhere near this


class Invalid(Exception):
    """Raised by a checker: ``str(exc)`` is the rule the value broke, reported at its path."""


@dataclass
class Ctx:
    """The walk's state: where relative file paths start, and the problems found so far."""

    base_dir: Path
    problems: list[str] = field(default_factory=list)

    def report(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def check(self, checker: Checker, path: str, value: Any) -> Any:
        """Run one checker, turning a raised :class:`Invalid` into a reported problem."""
        try:
            return checker(self, path, value)
        except Invalid as exc:
            self.report(path, str(exc))
            return INVALID


Checker = Callable[[Ctx, str, Any], Any]
Builder = Callable[[dict[str, Any]], Any]


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _shown(key: object) -> str:
    """A key as a path segment; odd ones (empty, spaces, not strings) quoted."""
    return key if isinstance(key, str) and re.fullmatch(r"[\w-]+", key) else repr(key)


@dataclass(frozen=True)
class Field:
    """One key of a section: its checker, whether it is required (or, with ``unless``, required
    when that other key is absent), and its output name."""

    check: Checker
    required: bool = False
    unless: str = ""
    default: Any = _NO_DEFAULT  # absent and no default: left out, so the dataclass default applies
    attr: str = ""  # the name in the built object, when it differs from the key (``*_file``)


@dataclass(frozen=True)
class Section:
    """A mapping with a fixed set of keys; unknown keys are errors.

    ``build`` receives the checked values by output name and runs only when all of them are valid;
    it may raise :class:`Invalid` for a rule that spans several keys.
    """

    fields: Mapping[str, Field]
    build: Builder = dict

    def __call__(self, ctx: Ctx, path: str, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise Invalid("expected a mapping")
        out: dict[str, Any] = {}
        for key, value in data.items():  # in file order, so problems are too
            spec = self.fields.get(key) if isinstance(key, str) else None
            if spec is None:
                ctx.report(join(path, _shown(key)), self._unknown(key))
            else:
                out[spec.attr or key] = ctx.check(spec.check, join(path, key), value)
        self._fill_absent(ctx, path, data, out)
        if any(value is INVALID for value in out.values()):
            return INVALID
        return self.build(out)

    def _fill_absent(
        self, ctx: Ctx, path: str, data: Mapping[Any, Any], out: dict[str, Any]
    ) -> None:
        """Required keys that are absent are problems; others take their default, if any."""
        for key, spec in self.fields.items():
            if key in data:
                continue
            if spec.required and spec.unless and spec.unless not in data:
                ctx.report(join(path, key), f"required unless {spec.unless} is given")
                out[spec.attr or key] = INVALID
            elif spec.required and not spec.unless:
                ctx.report(join(path, key), "required")
                out[spec.attr or key] = INVALID
            elif spec.default is not _NO_DEFAULT:
                out[spec.attr or key] = spec.default

    def _unknown(self, key: object) -> str:
        close = difflib.get_close_matches(str(key), list(self.fields), n=1)
        if close:
            return f"unknown key (did you mean {close[0]}?)"
        return f"unknown key (allowed: {', '.join(self.fields)})"


@dataclass(frozen=True)
class ListOf:
    """A list whose items all pass ``item``; optionally at least ``min_items``, and with
    ``unique`` naming a key whose value must differ between items. ``across`` checks a rule
    between items, given the valid ones with their indexes. Returns a tuple."""

    item: Checker
    min_items: int = 0
    unique: str = ""
    across: Callable[[Ctx, str, list[tuple[int, Any]]], None] | None = None

    def __call__(self, ctx: Ctx, path: str, data: Any) -> Any:
        if not isinstance(data, list):
            raise Invalid("expected a list")
        if len(data) < self.min_items:
            raise Invalid(f"must have at least {self.min_items} item(s)")
        items: list[Any] = []
        seen: dict[str, int] = {}  # unique key -> index of the first item with it
        for i, value in enumerate(data):
            items.append(ctx.check(self.item, f"{path}[{i}]", value))
            key = value.get(self.unique) if self.unique and isinstance(value, Mapping) else None
            if isinstance(key, str) and key in seen:
                ctx.report(f"{path}[{i}].{self.unique}", f"duplicate of {path}[{seen[key]}]")
            elif isinstance(key, str):
                seen[key] = i
        if self.across is not None:
            self.across(
                ctx, path, [(i, item) for i, item in enumerate(items) if item is not INVALID]
            )
        return INVALID if any(i is INVALID for i in items) else tuple(items)


@dataclass(frozen=True)
class OneOf:
    """A mapping whose ``tag`` key picks its section (``platform: apns`` → the APNs section).

    With a missing or unknown tag, the keys given are still checked against every variant's, but
    only what every variant requires is required, so one typo does not bury the file in
    ``required`` problems.
    """

    tag: str
    variants: Mapping[str, Section]

    def __call__(self, ctx: Ctx, path: str, data: Any) -> Any:
        tag = data.get(self.tag) if isinstance(data, Mapping) else None
        variant = self.variants.get(tag) if isinstance(tag, str) else None
        return (variant or self._any_variant())(ctx, path, data)

    def _any_variant(self) -> Section:
        """Checks the keys any variant knows; required only what every variant requires."""
        keys = {k: f for v in self.variants.values() for k, f in v.fields.items()}
        every = [k for k in keys if all(k in v.fields for v in self.variants.values())]
        fields = {k: Field(f.check, required=f.required and k in every) for k, f in keys.items()}
        return Section(fields, build=lambda _: INVALID)


def schema_keys(checker: Checker, path: str = "") -> Iterator[str]:
    """Every key path a checker accepts (``apps[].auth.key_file``), list items as ``[]``."""
    if isinstance(checker, Section):
        for key, spec in checker.fields.items():
            yield join(path, key)
            yield from schema_keys(spec.check, join(path, key))
    elif isinstance(checker, ListOf):
        yield from schema_keys(checker.item, path + "[]")
    elif isinstance(checker, OneOf):
        for variant in checker.variants.values():
            yield from schema_keys(variant, path)


# --- YAML -----------------------------------------------------------------------------------------


def read_yaml(path: Path) -> tuple[Any, list[str]]:
    """The file's data, and its duplicate keys (which PyYAML would silently overwrite)."""
    try:
        text = read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("not UTF-8 text") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        problems = list(_duplicate_keys(node, "", depth=0))
        return loader.construct_document(node) if node is not None else None, problems
    except yaml.YAMLError as exc:
        raise Invalid(f"not valid YAML ({_yaml_problem(exc)})") from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return str(exc)


def _duplicate_keys(node: yaml.Node | None, path: str, depth: int) -> Iterator[str]:
    if depth > 20:  # aliases can make a cycle; no real config is this deep
        return
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{i}]", depth + 1)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
        line = key_node.start_mark.line + 1
        if key in lines:
            yield f"{join(path, key)}: duplicate key (lines {lines[key]} and {line})"
        lines.setdefault(key, line)
        yield from _duplicate_keys(value_node, join(path, key), depth + 1)


# --- leaf checkers -------------------------------------------------------------------------------


def string(pattern: str = "", rule: str = "") -> Checker:
    """A non-empty string, wholly matching ``pattern`` if given; ``rule`` says what it must be."""
    regex = re.compile(pattern) if pattern else None

    def check(ctx: Ctx, path: str, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid("expected a string")
        if not value:
            raise Invalid("must not be empty")
        if regex is not None and not regex.fullmatch(value):
            raise Invalid(rule)
        return value

    return check


def choice(options: Mapping[str, Any] | tuple[str, ...]) -> Checker:
    """One of a fixed set of strings; with a mapping, returns the mapped value."""
    table = options if isinstance(options, Mapping) else {o: o for o in options}

    def check(ctx: Ctx, path: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in table:
            raise Invalid(f"must be one of {', '.join(table)}")
        return table[value]

    return check


def integer(low: int, high: int) -> Checker:
    def check(ctx: Ctx, path: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid("expected an integer")
        if not low <= value <= high:
            raise Invalid(f"must be between {low} and {high}")
        return value

    return check


def number(high: float, *, zero_ok: bool = False) -> Checker:
    """A finite number above zero (or at least zero) and at most ``high``, as a float."""

    def check(ctx: Ctx, path: str, value: Any) -> float:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise Invalid("expected a number")
        if value > high or value < 0 or (value == 0 and not zero_ok):
            low = "0" if zero_ok else "above 0"
            raise Invalid(f"must be {low} and at most {high:g}")
        return float(value)

    return check


_ADDRESS = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def listen_address(ctx: Ctx, path: str, value: Any) -> str:
    """``host:port`` or ``[v6]:port``; port 0 asks the OS for a free port (tests)."""
    text: str = string()(ctx, path, value)
    match = _ADDRESS.fullmatch(text)
    if match is None or int(match["port"]) > 65535 or not _host_ok(match["host"], match["v6"]):
        raise Invalid("must be host:port, e.g. 127.0.0.1:50051 or [::1]:50051")
    return text


def _host_ok(host: str | None, v6: str | None) -> bool:
    try:
        if v6 is not None:
            ipaddress.IPv6Address(v6)
        elif re.fullmatch(r"[0-9.]+", host or ""):
            ipaddress.IPv4Address(host)
        return v6 is not None or bool(_HOSTNAME.fullmatch(host or ""))
    except ValueError:
        return False


def url(scheme: str, *, path_ok: bool = False) -> Checker:
    """An absolute ``scheme://host[:port]`` URL (with a path when ``path_ok``), no credentials."""

    def check(ctx: Ctx, path: str, value: Any) -> str:
        text: str = string()(ctx, path, value)
        check_url(text, scheme, path_ok=path_ok)
        return text

    return check


def check_url(text: str, scheme: str, *, path_ok: bool = False) -> None:
    form = f"a URL of the form {scheme}://host[:port]" + ("[/path]" if path_ok else "")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise Invalid(f"must be {form}") from None
    if parts.username is not None or parts.password is not None:
        raise Invalid("must not contain credentials (secrets are read from files)")
    extra = parts.query or parts.fragment or (parts.path not in ("", "/") and not path_ok)
    if parts.scheme != scheme or not parts.hostname or extra or re.search(r"\s", text):
        raise Invalid(f"must be {form}")


def file(parse: Callable[[bytes], Any], *, as_path: bool = False) -> Checker:
    """A file named relative to the config's directory, read and passed to ``parse``.

    Returns what ``parse`` returns, or with ``as_path`` the absolute path once it parses (for
    consumers that must be given a file name).
    """

    def check(ctx: Ctx, path: str, value: Any) -> Any:
        name = ctx.base_dir / string()(ctx, path, value)
        result = parse(read_file(name))
        return str(name) if as_path else result

    return check


def read_file(name: Path) -> bytes:
    try:
        with name.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise Invalid("no such file") from None
    except IsADirectoryError:
        raise Invalid("is a directory, not a file") from None
    except PermissionError:
        raise Invalid("cannot read the file (permission denied)") from None
    except OSError as exc:
        raise Invalid(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise Invalid(f"larger than {MAX_FILE_BYTES} bytes; not a key, certificate or token")
    return data


# --- PEM material ---------------------------------------------------------------------------------


def private_key(data: bytes) -> PrivateKeyTypes:
    """The first PEM private key in ``data``; never echoes the content in errors."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise Invalid("the private key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise Invalid("no PEM private key found") from None


def private_key_pem(data: bytes) -> bytes:
    private_key(data)
    return data


def ec_p256_key_pem(data: bytes) -> bytes:
    """A PEM EC P-256 private key (an APNs ``.p8`` or a VAPID key)."""
    key = private_key(data)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise Invalid("not an EC P-256 private key")
    return data


def certificates(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise Invalid("no PEM certificate found") from None


def certificates_pem(data: bytes) -> bytes:
    certificates(data)
    return data


def cert_and_key_pem(data: bytes) -> bytes:
    """One PEM file with a certificate (chain, leaf first) and the leaf's private key."""
    check_key_matches(certificates(data)[0], private_key(data))
    return data


def check_key_matches(cert: x509.Certificate, key: PrivateKeyTypes) -> None:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, public) != key.public_key().public_bytes(der, public):
        raise Invalid("the private key does not match the certificate")
