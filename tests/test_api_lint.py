"""The API linted and guarded against breaking changes with buf (buf.yaml at the root).

``buf lint`` checks ``proto/`` against buf's STANDARD rules, less those the released v1 names
break (buf.yaml says which and why). ``buf breaking`` compares ``proto/`` with the API as first
released, kept as a buf image in ``proto/released/pushrelay-v1.json``: a change that would break
existing clients (a field renumbered, retyped or removed, an RPC or enum value dropped) fails.
buf comes from the npm package ``@bufbuild/buf``, installed into ``.tools/`` by ``make test``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELEASED = ROOT / "proto" / "released" / "pushrelay-v1.json"
PROTO = Path("pushrelay") / "v1" / "relay.proto"


def buf() -> str:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found:
        return found
    why = "buf is not installed (npm @bufbuild/buf; `make test` installs it into .tools/)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_buf_lint_is_clean() -> None:
    result = run("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_released_api() -> None:
    result = run("breaking", "--against", str(RELEASED))
    assert result.returncode == 0, result.stdout + result.stderr


def _copy(tmp_path: Path) -> Path:
    """A copy of the module (buf.yaml and proto/) to change."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto" / "pushrelay", tmp_path / "proto" / "pushrelay",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))  # fmt: skip
    return tmp_path / "proto" / PROTO


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("string preview = 3;", "string preview = 9;"),  # renumbered
        ("uint32 badge = 5;", "string badge = 5;"),  # retyped
        ("  UNAVAILABLE = 5;", "  // (removed)"),  # an outcome removed
    ],
)
def test_a_breaking_change_fails(tmp_path: Path, old: str, new: str) -> None:
    proto = _copy(tmp_path)
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))
    result = run("breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert result.returncode != 0, result.stdout


def test_an_added_enum_value_is_not_breaking(tmp_path: Path) -> None:
    """New kinds are appended (wire-compatible): buf must let that through."""
    proto = _copy(tmp_path)
    text = proto.read_text()
    anchor = "  CLEAR = 6;"
    assert anchor in text
    proto.write_text(text.replace(anchor, anchor + "\n  SOMETHING_NEW = 7;"))
    result = run("breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
