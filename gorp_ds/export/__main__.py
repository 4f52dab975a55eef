"""``python -m gorp_ds.export <checkpoint> <dir>`` is ``gorp-ds export`` (``gorp_ds.cli.export``).

A leaf that nothing imports: the command rebuilds the run layer's session, so its code lives with
the other commands, above the run layer, while the export package stays below it."""

from __future__ import annotations

import sys

from ..cli import export

if __name__ == "__main__":
    sys.exit(export(sys.argv[1:], "python -m gorp_ds.export"))
