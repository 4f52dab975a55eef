"""Run a bench script's ``main`` in a fresh interpreter where only torch and transformers import:
the GPU benchmarks that must work on a machine without the project's other dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import REPO

#: What the child refuses to import (it fails there), and checks it never imported.
BLOCKED = ("deepspeed", "datasets", "gguf")


def run_torch_only(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``bench.<module>.main(args)`` in a child with :data:`BLOCKED` unimportable, a minimal
    environment (one thread, ``HOME`` in ``cwd``); returns the finished process."""
    child = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED) +
             f"sys.path.insert(0, {str(REPO)!r})\n"
             f"from bench.{module} import main\n"
             "code = main(sys.argv[1:])\n"
             f"assert not any(sys.modules.get(m) for m in {BLOCKED!r})\n"
             "sys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                        "TOKENIZERS_PARALLELISM": "false", "HOME": str(cwd)})
