"""What the tests share and is not a test: scenarios, references, the tiny model, launch helpers.

``REPO`` is the checkout's root, for every path a test names (launch/train.py, ds_configs/, ...).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
