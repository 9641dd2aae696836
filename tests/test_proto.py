"""The committed API code must be what the generator makes of proto/ today."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pushrelay.v1 import relay_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("relay_pb2.py", "relay_pb2_grpc.py", "relay_pb2.pyi", "relay_pb2_grpc.pyi")


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            str(ROOT / "proto/pushrelay/v1/relay.proto"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "pushrelay/v1" / name).read_text()
        committed = (ROOT / "proto/pushrelay/v1" / name).read_text()
        assert fresh == committed, f"proto/pushrelay/v1/{name} is stale: run `make proto`"


@pytest.mark.parametrize(
    ("enum", "names"),
    [
        (
            pb.Kind,
            # Appended, wire-compatible: existing numbers never change (buf breaking checks).
            [
                "KIND_UNSPECIFIED",
                "INSTANT_MESSAGE",
                "INVITATION",
                "MISSED_CALL",
                "MESSAGE_WAITING",
                "INCOMING_CALL",
                "CLEAR",
            ],
        ),
        (pb.Privacy, ["PRIVACY_UNSPECIFIED", "FULL", "REDACTED", "ID_ONLY", "ENCRYPTED"]),
        (
            pb.Outcome,
            [
                "OUTCOME_UNSPECIFIED",
                "DELIVERED",
                "TOKEN_INVALID",
                "REJECTED",
                "RATE_LIMITED",
                "UNAVAILABLE",
            ],
        ),
    ],
)
def test_enums_are_exact(enum, names) -> None:  # type: ignore[no-untyped-def]
    assert list(enum.keys()) == names


def test_messages_are_exact() -> None:
    fields = {
        "SendRequest": ["request_id", "notification", "devices"],
        "Notification": [
            "kind",
            "sender_display_name",
            "preview",
            "conversation_id",
            "badge",
            "waiting_count",
            "privacy",
            "ttl_seconds",
        ],
        "Device": ["app_id", "token", "keys"],
        "DeviceKeys": ["p256dh", "auth"],
        "SendResponse": ["request_id", "results"],
        "DeviceResult": [
            "outcome",
            "reason",
            "provider_message_id",
            "retry_after_seconds",
            "privacy",
            "token_invalid_since_ms",
        ],
    }
    for message, names in fields.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert [f.name for f in descriptor.fields] == names
    service = pb.DESCRIPTOR.services_by_name["PushRelay"]
    assert service.full_name == "pushrelay.v1.PushRelay"
    assert [m.name for m in service.methods] == ["Send", "SendStream"]
    stream = service.methods_by_name["SendStream"]
    assert stream.client_streaming and stream.server_streaming
