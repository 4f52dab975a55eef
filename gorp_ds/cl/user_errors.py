"""The problems a user can fix, as one tuple: each layer's own exception for bad input.

The entry points turn exactly these into one ``gorp_ds: error:`` line and exit status 2; the
runner's start-up checks collect them on every rank before any training. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from ..data.errors import DataError
from ..models import ModelError, RoleError
from ..safe_write import WriteError
from ..settings import SettingError
from ..zero import CheckpointError, UnsupportedSetupError
from .config import ConfigError
from .nonfinite import NonFiniteError

# Bad settings or files, a setup the math does not cover, a checkpoint or another output that cannot
# be written (or read), and a run whose loss or gradients stay non-finite.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ModelError, RoleError, UnsupportedSetupError,
                                            CheckpointError, SettingError, NonFiniteError, WriteError)
