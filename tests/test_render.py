"""relay/render.py: shapes per kind, platform and mode; privacy; grouping keys; truncation."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
import re
from typing import Any

import pytest
import regex  # type: ignore[import-untyped, unused-ignore]
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters.base import DeviceKeys, Push, encode_json
from relay._truncate import ELLIPSIS, fit_text, leading_graphemes
from relay.model import Kind, Message, Privacy
from relay.render import (
    EXPOSURE,
    LIMIT_BYTES,
    MAX_TTL_SECONDS,
    GroupingKeys,
    effective_privacy,
    render,
)

SECRET = b"\x01" * 32
GROUPING = GroupingKeys(SECRET)
PLATFORMS = ("apns", "fcm", "webpush")
MODES = (Privacy.FULL, Privacy.REDACTED, Privacy.ID_ONLY)
SENDER = "Zelda Quux"
PREVIEW = "the secret plan: meet at dawn"
CID = "!conv-4242:example.org"
KEYS = DeviceKeys(p256dh=b"\x04" + b"\x02" * 64, auth=b"\x03" * 16)

FULL, REDACTED, ID_ONLY = Privacy.FULL, Privacy.REDACTED, Privacy.ID_ONLY
IM, INV, CALL, MW = Kind.INSTANT_MESSAGE, Kind.INVITATION, Kind.MISSED_CALL, Kind.MESSAGE_WAITING


def msg(kind: Kind = IM, **fields: Any) -> Message:
    base: dict[str, Any] = {"sender": SENDER, "preview": PREVIEW, "conversation_id": CID}
    return Message(kind=kind, **(base | fields))


def push_for(message: Message, platform: str, privacy: Privacy = FULL, **kw: Any) -> Push:
    args: dict[str, Any] = {"token": "tok", "keys": None, "grouping": GROUPING} | kw
    return render(message, platform, privacy, **args)


def encoded(push: Push) -> bytes:
    return push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)


def doc(push: Push) -> dict[str, Any]:
    """The payload as the receiver parses it."""
    parsed: dict[str, Any] = json.loads(encoded(push))
    return parsed


def relay_of(platform: str, payload: dict[str, Any]) -> dict[str, Any]:
    if platform == "fcm":
        data = payload["data"]
        assert all(isinstance(v, str) for v in data.values())  # FCM rejects other values
        relay: dict[str, Any] = json.loads(data["relay"])
        return relay
    relay = payload["relay"]
    return relay


def alert_of(platform: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The alert in a platform-neutral form (title, body, loc_key, loc_args), or None."""
    if platform == "apns":
        a = payload["aps"].get("alert")
        if a is None:
            return None
        return {
            "title": a.get("title", ""),
            "body": a["body"],
            "loc_key": a.get("loc-key", ""),
            "loc_args": a.get("loc-args", []),
        }
    if platform == "fcm":
        if "notification" not in payload:
            return None
        n, an = payload["notification"], payload["android"]["notification"]
        return {
            "title": n.get("title", ""),
            "body": n["body"],
            "loc_key": an.get("body_loc_key", ""),
            "loc_args": an.get("body_loc_args", []),
        }
    if "body" not in payload:
        return None
    return {
        "title": payload.get("title", ""),
        "body": payload["body"],
        "loc_key": payload.get("loc_key", ""),
        "loc_args": payload.get("loc_args", []),
    }


def expected_alert(kind: Kind, mode: Privacy) -> dict[str, Any] | None:
    if mode is ID_ONLY:
        return None
    plain = {"title": "", "loc_key": "", "loc_args": []}
    table: dict[tuple[Kind, Privacy], dict[str, Any]] = {
        (IM, FULL): plain | {"title": SENDER, "body": PREVIEW},
        (INV, FULL): plain | {"title": SENDER, "body": PREVIEW},
        (IM, REDACTED): plain | {"body": "New message", "loc_key": "INSTANT_MESSAGE"},
        (INV, REDACTED): plain | {"body": "New invitation", "loc_key": "INVITATION"},
        (CALL, FULL): plain
        | {"body": f"Missed call from {SENDER}", "loc_key": "MISSED_CALL", "loc_args": [SENDER]},
        (CALL, REDACTED): plain | {"body": "Missed call", "loc_key": "MISSED_CALL"},
    }
    waiting = plain | {"body": "3 new voicemails", "loc_key": "MESSAGE_WAITING", "loc_args": ["3"]}
    return waiting if kind is MW else table[kind, mode]


# Kind policy: default TTL, high priority, collapses per conversation.
POLICY = {IM: (3600, True, False), INV: (120, True, True), CALL: (86400, True, False)}
POLICY[MW] = (86400, False, True)

# The kinds that alert; INCOMING_CALL (rings) and CLEAR (withdraws) have tests of their own.
ALERT_KINDS = [IM, INV, CALL, MW]
ALL = list(itertools.product(ALERT_KINDS, PLATFORMS, MODES))


@pytest.mark.parametrize(("kind", "platform", "mode"), ALL)
def test_every_kind_platform_and_mode_has_the_documented_shape(
    kind: Kind, platform: str, mode: Privacy
) -> None:
    push = push_for(msg(kind, badge=2, waiting_count=3), platform, mode, keys=KEYS, push_id="p1")
    payload = doc(push)
    ttl, high, collapses = POLICY[kind]
    assert (push.token, push.keys, push.push_id) == ("tok", KEYS, "p1")
    assert isinstance(push.payload, bytes) == (platform == "webpush")
    assert (push.ttl_seconds, push.high_priority, push.background) == (ttl, high, mode is ID_ONLY)
    purpose = kind.name.lower()
    collapse_key = GROUPING.for_conversation(CID, purpose=purpose) if collapses else ""
    assert push.collapse_key == collapse_key
    assert alert_of(platform, payload) == expected_alert(kind, mode)
    relay = {"v": 1, "kind": kind.name.lower(), "conversation_id": CID}
    if mode is not ID_ONLY:
        relay["badge"] = 3 if kind is MW else 2
    assert relay_of(platform, payload) == relay
    assert len(encoded(push)) <= LIMIT_BYTES[platform]


@pytest.mark.parametrize("kind", ALERT_KINDS)
def test_apns_alert_and_silent_payloads(kind: Kind) -> None:
    thread = GROUPING.for_conversation(CID)
    aps = doc(push_for(msg(kind, badge=5, waiting_count=3), "apns", REDACTED))["aps"]
    assert (aps["sound"], aps["thread-id"], aps["badge"]) == (
        "default",
        thread,
        3 if kind is MW else 5,
    )
    silent = doc(push_for(msg(kind, badge=5), "apns", ID_ONLY))
    assert silent["aps"] == {"content-available": 1}  # nothing that would make it an alert
    assert set(silent) == {"aps", "relay"}


def test_apns_full_instant_message_exactly() -> None:
    assert doc(push_for(msg(), "apns")) == {
        "aps": {
            "alert": {"title": SENDER, "body": PREVIEW},
            "sound": "default",
            "thread-id": GROUPING.for_conversation(CID),
        },
        "relay": {"v": 1, "kind": "instant_message", "conversation_id": CID},
    }


def test_fcm_full_invitation_exactly() -> None:
    key = GROUPING.for_conversation(CID, purpose="invitation")
    assert doc(push_for(msg(INV), "fcm")) == {
        "notification": {"title": SENDER, "body": PREVIEW},
        "android": {
            "priority": "high",
            "ttl": "120s",
            "collapse_key": key,
            "notification": {"tag": key},
        },
        "data": {
            "relay": encode_json({"v": 1, "kind": "invitation", "conversation_id": CID}).decode()
        },
    }


def test_fcm_tag_groups_by_thread_and_count_is_set() -> None:
    android = doc(push_for(msg(IM, badge=4), "fcm", REDACTED))["android"]
    assert "collapse_key" not in android
    assert android["notification"]["tag"] == GROUPING.for_conversation(CID)
    assert android["notification"]["notification_count"] == 4


def test_fcm_id_only_is_data_only_at_high_priority() -> None:
    payload = doc(push_for(msg(CALL), "fcm", ID_ONLY))
    assert set(payload) == {"android", "data"}
    assert payload["android"] == {"priority": "high", "ttl": "86400s"}


def test_webpush_documents_exactly() -> None:
    relay = {"v": 1, "kind": "instant_message", "conversation_id": CID}
    assert doc(push_for(msg(), "webpush")) == {"relay": relay, "title": SENDER, "body": PREVIEW}
    assert doc(push_for(msg(), "webpush", REDACTED)) == {
        "relay": relay,
        "body": "New message",
        "loc_key": "INSTANT_MESSAGE",
        "loc_args": [],
    }
    assert doc(push_for(msg(), "webpush", ID_ONLY)) == {"relay": relay}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_message_waiting_singular_and_zero(platform: str) -> None:
    one = alert_of(platform, doc(push_for(msg(MW, waiting_count=1), platform)))
    assert one is not None and one["body"] == "1 new voicemail" and one["loc_args"] == ["1"]
    zero = push_for(msg(MW, waiting_count=0), platform)
    payload = doc(zero)
    # 0 clears the badge without an alert saying "0 new voicemails".
    assert alert_of(platform, payload) is None
    assert relay_of(platform, payload)["badge"] == 0
    assert zero.collapse_key  # still replaces the older count
    if platform == "apns":
        assert payload["aps"]["badge"] == 0 and not zero.background
    else:
        assert zero.background


@pytest.mark.parametrize("platform", PLATFORMS)
def test_badge_only_when_positive_for_other_kinds(platform: str) -> None:
    payload = doc(push_for(msg(IM, badge=0), platform))
    assert "badge" not in relay_of(platform, payload)
    if platform == "apns":
        assert "badge" not in payload["aps"]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_empty_conversation_id_means_no_grouping_except_message_waiting(platform: str) -> None:
    for kind in (IM, INV, CALL):
        push = push_for(msg(kind, conversation_id=""), platform)
        payload = doc(push)
        assert push.collapse_key == ""
        assert "conversation_id" not in relay_of(platform, payload)
        if platform == "apns":
            assert "thread-id" not in payload["aps"]
        if platform == "fcm":
            assert "tag" not in payload["android"]["notification"]
    waiting = push_for(msg(MW, conversation_id="", waiting_count=2), platform)
    assert waiting.collapse_key == GROUPING.for_conversation("", purpose="message_waiting")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_full_without_sender_or_preview_still_shows_a_generic_alert(platform: str) -> None:
    for kind, body in ((IM, "New message"), (CALL, "Missed call")):
        payload = doc(push_for(msg(kind, sender="", preview=""), platform))
        assert alert_of(platform, payload) == expected_alert(kind, REDACTED)
        assert alert_of(platform, payload)["body"] == body  # type: ignore[index]


@pytest.mark.parametrize(
    ("requested", "expected"), [(0, 3600), (60, 60), (MAX_TTL_SECONDS + 1, MAX_TTL_SECONDS)]
)
def test_ttl_override_and_cap(requested: int, expected: int) -> None:
    push = push_for(msg(IM, ttl_seconds=requested), "fcm")
    assert push.ttl_seconds == expected
    assert doc(push)["android"]["ttl"] == f"{expected}s"


# --- privacy -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "platform", "mode"), [c for c in ALL if c[2] is not FULL])
def test_no_sender_or_preview_outside_full(kind: Kind, platform: str, mode: Privacy) -> None:
    push = push_for(msg(kind, sender="Zq7Sender", preview="Pv9Secret"), platform, mode)
    for secret in (b"Zq7", b"Sender", b"Pv9", b"Secret"):
        assert secret not in encoded(push)
        assert secret.decode() not in push.collapse_key


@pytest.mark.parametrize(("kind", "platform", "mode"), ALL)
def test_providers_never_see_the_raw_conversation_id_as_a_key(
    kind: Kind, platform: str, mode: Privacy
) -> None:
    push = push_for(msg(kind, conversation_id="conv-secret"), platform, mode)
    payload = doc(push)
    keys = [push.collapse_key]
    if platform == "apns":
        keys.append(payload["aps"].get("thread-id", ""))
    if platform == "fcm":
        keys += [payload["android"].get("collapse_key", "")]
        keys += [payload["android"].get("notification", {}).get("tag", "")]
    assert all("conv" not in key and "secret" not in key for key in keys)


ENCRYPTED = Privacy.ENCRYPTED

# Exposure: FULL > REDACTED = ENCRYPTED > ID_ONLY. The table docs/privacy.md writes down.
ROWS = [
    # requested, default, maximum, has_keys -> served
    (None, FULL, FULL, False, FULL),
    (None, REDACTED, FULL, False, REDACTED),
    (FULL, REDACTED, REDACTED, False, REDACTED),  # ceiling
    (FULL, ID_ONLY, ID_ONLY, False, ID_ONLY),
    (REDACTED, FULL, ID_ONLY, False, ID_ONLY),
    (ID_ONLY, FULL, FULL, False, ID_ONLY),  # asking for less is always allowed
    (None, FULL, REDACTED, False, REDACTED),  # a default above the ceiling is capped
    (ENCRYPTED, FULL, FULL, True, ENCRYPTED),
    (ENCRYPTED, FULL, FULL, False, REDACTED),  # no device keys: never plaintext
    (ENCRYPTED, FULL, REDACTED, True, ENCRYPTED),  # same exposure as the ceiling
    (ENCRYPTED, FULL, REDACTED, False, REDACTED),
    (ENCRYPTED, FULL, ID_ONLY, True, ID_ONLY),
    (FULL, FULL, ENCRYPTED, True, ENCRYPTED),  # served at the ceiling
    (FULL, FULL, ENCRYPTED, False, REDACTED),
    (REDACTED, FULL, ENCRYPTED, True, REDACTED),  # same exposure as the ceiling
    (ID_ONLY, FULL, ENCRYPTED, True, ID_ONLY),
    (None, ENCRYPTED, FULL, True, ENCRYPTED),
    (None, ENCRYPTED, FULL, False, REDACTED),
    (None, ENCRYPTED, ENCRYPTED, True, ENCRYPTED),
    (None, FULL, ENCRYPTED, True, ENCRYPTED),  # a default above the ceiling is capped
    (None, FULL, ENCRYPTED, False, REDACTED),
    (None, ENCRYPTED, ID_ONLY, True, ID_ONLY),
    (FULL, FULL, FULL, True, FULL),  # keys alone never lower a mode
]


@pytest.mark.parametrize(("requested", "default", "maximum", "keys", "served"), ROWS)
def test_effective_privacy(
    requested: Privacy | None, default: Privacy, maximum: Privacy, keys: bool, served: Privacy
) -> None:
    assert effective_privacy(requested, default, maximum, has_keys=keys) is served


@given(
    st.one_of(st.none(), st.sampled_from(Privacy)),
    st.sampled_from(Privacy),
    st.sampled_from(Privacy),
    st.booleans(),
)
def test_effective_privacy_never_exceeds_the_ceiling_or_leaves_in_plaintext(
    requested: Privacy | None, default: Privacy, maximum: Privacy, keys: bool
) -> None:
    served = effective_privacy(requested, default, maximum, has_keys=keys)
    asked = default if requested is None else requested
    assert EXPOSURE[served] <= min(EXPOSURE[asked], EXPOSURE[maximum])
    assert served is not ENCRYPTED or keys
    if asked is ENCRYPTED and EXPOSURE[asked] <= EXPOSURE[maximum]:
        assert served is (ENCRYPTED if keys else REDACTED)


def test_unknown_platform_is_refused() -> None:
    with pytest.raises(ValueError, match="platform"):
        push_for(msg(), "wns")


def test_encrypted_without_keys_is_refused_by_render() -> None:
    # effective_privacy never asks for it; render refuses rather than send plaintext.
    with pytest.raises(ValueError, match="keys"):
        push_for(msg(), "apns", ENCRYPTED)


# --- grouping keys -------------------------------------------------------------------------

KEY_RE = re.compile(r"[A-Za-z0-9_-]{32}")


def test_grouping_keys_are_keyed_hmacs() -> None:
    key = GROUPING.for_conversation("abc")
    mac = hmac.new(SECRET, b"thread\x00abc", hashlib.sha256).digest()
    assert key == base64.urlsafe_b64encode(mac[:24]).decode()
    assert KEY_RE.fullmatch(key)
    assert key == GroupingKeys(SECRET).for_conversation("abc")  # stable per secret
    assert key != GroupingKeys(b"\x02" * 32).for_conversation("abc")  # differs per secret
    assert key != GROUPING.for_conversation("abd")
    assert key != GROUPING.for_conversation("abc", purpose="invitation")
    assert "<secret>" in repr(GROUPING) and "\\x01" not in repr(GROUPING)


@given(st.text(max_size=300), st.sampled_from(["thread", "invitation", "message_waiting"]))
@settings(max_examples=50)
def test_grouping_keys_fit_apns_and_web_push(conversation_id: str, purpose: str) -> None:
    key = GROUPING.for_conversation(conversation_id, purpose=purpose)
    assert KEY_RE.fullmatch(key)
    assert len(conversation_id) < 4 or conversation_id not in key


def test_grouping_keys_refuse_short_secrets_and_nul_purposes() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        GroupingKeys(b"short")
    with pytest.raises(ValueError, match="NUL"):
        GROUPING.for_conversation("a", purpose="x\x00y")


# --- truncation ----------------------------------------------------------------------------

FAMILY = "👨\u200d👩\u200d👧\u200d👦"  # one grapheme of seven code points
FLAGS = "🇫🇷🇩🇪🇯🇵"  # three graphemes of two regional indicators each
COMBINING = "e\u0301a\u0308o\u0302"  # three graphemes, base + combining mark


def graphemes(text: str) -> list[str]:
    found: list[str] = regex.findall(r"\X", text)
    return found


def is_whole_prefix(cut: str, original: str) -> bool:
    bounds = set(itertools.accumulate(len(g) for g in graphemes(original)))
    return original.startswith(cut) and (cut == "" or len(cut) in bounds)


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        (FAMILY * 3, len((FAMILY * 2 + ELLIPSIS).encode()), FAMILY * 2 + ELLIPSIS),
        (FAMILY * 3, len((FAMILY * 2 + ELLIPSIS).encode()) - 1, FAMILY + ELLIPSIS),
        (FLAGS, len(("🇫🇷🇩🇪" + ELLIPSIS).encode()) + 3, "🇫🇷🇩🇪" + ELLIPSIS),
        (COMBINING, len(("e\u0301" + ELLIPSIS).encode()) + 2, "e\u0301" + ELLIPSIS),
        ("漢字仮名交じり文", 9 + 3, "漢字仮" + ELLIPSIS),
        ("fits", 4, "fits"),
        ("no room", 2, None),
        ("abcd", 3, ELLIPSIS),
    ],
)
def test_fit_text_cuts_on_grapheme_boundaries(text: str, limit: int, expected: str | None) -> None:
    assert fit_text(lambda s: len(s.encode()), text, limit) == expected


@pytest.mark.parametrize("unit", [FAMILY, FLAGS, COMBINING, "漢字", "😀", '"\\\x01'])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_long_previews_are_cut_to_the_limit(unit: str, platform: str) -> None:
    preview = (unit * 4000)[:4000]  # the API's maximum
    push = push_for(msg(IM, preview=preview), platform)
    payload = doc(push)
    body = alert_of(platform, payload)["body"]  # type: ignore[index]
    assert body.endswith(ELLIPSIS) and is_whole_prefix(body[:-1], preview)
    assert len(encoded(push)) <= LIMIT_BYTES[platform]
    # Maximal: one more grapheme would not fit.
    longer = preview[: len(body) - 1 + len(graphemes(preview[len(body) - 1 :])[0])]
    assert size_with(platform, payload, SENDER, longer + ELLIPSIS) > LIMIT_BYTES[platform]


def size_with(platform: str, payload: dict[str, Any], title: str, body: str) -> int:
    """The encoded size of ``payload`` with its title and body replaced."""
    changed = copy.deepcopy(payload)
    target = {"apns": lambda p: p["aps"]["alert"], "fcm": lambda p: p["notification"]}
    fields = target.get(platform, lambda p: p)(changed)
    fields["body"] = body
    if title:
        fields["title"] = title
    return len(encode_json(changed))


WORST = ["\x00", "\x1f", '"', "\\", "😀", "👨", "\u200d", "\u0301", "🇫", "\u2028", "漢"]
CHAR = st.one_of(st.characters(codec="utf-8"), st.sampled_from(WORST))


def text_up_to(max_chars: int) -> st.SearchStrategy[str]:
    # Hypothesis cannot draw 4,000 independent characters cheaply: repeat a drawn unit instead.
    unit = st.text(CHAR, min_size=1, max_size=12)
    return st.one_of(st.text(CHAR, max_size=30), unit.map(lambda u: (u * max_chars)[:max_chars]))


CIDS = text_up_to(256).map(lambda s: s.encode()[:256].decode(errors="ignore"))


@given(
    platform=st.sampled_from(PLATFORMS),
    kind=st.sampled_from([IM, INV, CALL]),
    sender=text_up_to(256),
    preview=text_up_to(4000),
    conversation_id=CIDS,
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_fits_and_is_cut_on_whole_graphemes(
    platform: str, kind: Kind, sender: str, preview: str, conversation_id: str
) -> None:
    message = msg(kind, sender=sender, preview=preview, conversation_id=conversation_id)
    push = push_for(message, platform)
    raw = encoded(push)
    assert len(raw) <= LIMIT_BYTES[platform]
    payload = json.loads(raw)
    assert relay_of(platform, payload).get("conversation_id", "") == conversation_id
    alert = alert_of(platform, payload)
    assert alert is not None
    if kind is CALL:
        check_missed_call(platform, payload, alert, sender)
    elif sender or preview:
        check_message(platform, payload, alert, sender, preview)


def check_missed_call(
    platform: str, payload: dict[str, Any], alert: dict[str, Any], sender: str
) -> None:
    if not sender:
        assert alert["loc_args"] == []
        return
    (shown,) = alert["loc_args"]
    assert alert["body"] == f"Missed call from {shown}"
    event("caller cut" if shown != sender else "caller whole")
    if shown != sender:
        assert shown.endswith(ELLIPSIS) and is_whole_prefix(shown[:-1], sender)
        # The sender shows twice (argument and fallback text); whole, it would not have fitted.
        assert size_with_caller(platform, payload, sender) > LIMIT_BYTES[platform]


def size_with_caller(platform: str, payload: dict[str, Any], caller: str) -> int:
    """The encoded size of a missed-call ``payload`` naming ``caller`` instead."""
    changed = copy.deepcopy(payload)
    body = f"Missed call from {caller}"
    if platform == "apns":
        changed["aps"]["alert"] |= {"body": body, "loc-args": [caller]}
    elif platform == "fcm":
        changed["notification"]["body"] = body
        changed["android"]["notification"]["body_loc_args"] = [caller]
    else:
        changed |= {"body": body, "loc_args": [caller]}
    return len(encode_json(changed))


def check_message(
    platform: str, payload: dict[str, Any], alert: dict[str, Any], sender: str, preview: str
) -> None:
    title, body = alert["title"], alert["body"]
    for shown, original in ((title, sender), (body, preview)):
        cut = shown != original
        assert not cut or (shown.endswith(ELLIPSIS) and is_whole_prefix(shown[:-1], original))
    if title != sender:
        assert body == ELLIPSIS  # the preview is cut away before the sender is touched
    event("sender cut" if title != sender else "preview cut" if body != preview else "whole")
    if (title, body) != (sender, preview):
        # Something was cut, so the original could not have fitted.
        assert size_with(platform, payload, sender, preview) > LIMIT_BYTES[platform]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_sender_is_cut_once_the_preview_is_gone(platform: str) -> None:
    sender = "\x01" * 100 + "👍🏽" * 78  # 256 characters, escaping to 1,224 bytes
    # A conversation id over the API's 256 bytes, so that the sender must go on every platform.
    message = msg(IM, sender=sender, preview="hello", conversation_id="\x01" * 480)
    push = push_for(message, platform)
    alert = alert_of(platform, doc(push))
    assert alert is not None
    assert alert["body"] == ELLIPSIS and alert["title"].endswith(ELLIPSIS)
    assert is_whole_prefix(alert["title"][:-1], sender)
    assert len(encoded(push)) <= LIMIT_BYTES[platform]
    kept = alert["title"][:-1]
    longer = sender[: len(kept) + len(graphemes(sender[len(kept) :])[0])]
    assert size_with(platform, doc(push), longer + ELLIPSIS, ELLIPSIS) > LIMIT_BYTES[platform]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_long_caller_is_cut_in_both_places(platform: str) -> None:
    caller = "\x01" * 200 + "🇫🇷" * 28  # 256 characters, escaping to 1,424 bytes, twice
    push = push_for(msg(CALL, sender=caller, conversation_id="\x01" * 256), platform)
    alert = alert_of(platform, doc(push))
    assert alert is not None
    (shown,) = alert["loc_args"]
    assert shown.endswith(ELLIPSIS) and is_whole_prefix(shown[:-1], caller)
    assert alert["body"] == f"Missed call from {shown}"
    assert (
        len(encoded(push)) <= LIMIT_BYTES[platform] < size_with_caller(platform, doc(push), caller)
    )


@given(st.text(st.sampled_from(["🇫", "🇷", "a", "\u0301", "\u200d", "👨", "\r", "\n", "क", "्"])))
@settings(max_examples=200)
def test_chunked_segmentation_matches_whole_text_segmentation(text: str) -> None:
    for chunk in (1, 2, 3, 64):
        assert leading_graphemes(text, 10**9, chunk) == graphemes(text)
    head = leading_graphemes(text, 8)
    assert head == graphemes(text)[: len(head)]
    assert len("".join(head).encode()) > 8 or "".join(head) == text


@pytest.mark.parametrize(
    ("kind", "platform", "mode"), list(itertools.product(Kind, PLATFORMS, MODES))
)
def test_a_maximal_request_fits(kind: Kind, platform: str, mode: Privacy) -> None:
    # Control characters cost 6 bytes escaped (7 inside FCM's JSON-in-a-string), emoji 4.
    for bad in ("\x01", '"', "😀"):
        message = msg(
            kind,
            sender=bad * 256,
            preview=bad * 4000,
            conversation_id="\x01" * 256,
            waiting_count=2**32 - 1,
        )
        assert len(encoded(push_for(message, platform, mode))) <= LIMIT_BYTES[platform]


def test_a_payload_that_cannot_fit_is_refused_without_echoing_content() -> None:
    with pytest.raises(ValueError, match="limit") as caught:
        push_for(msg(IM, conversation_id="\x01" * 1000), "webpush")
    assert "\x01" not in str(caught.value)
