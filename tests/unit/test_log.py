"""gorp_ds.log's start-up policy for what the libraries print: the warnings and log records it drops
are exactly the listed ones, and progress bars are drawn by each node's local rank 0 only.

The launch itself (no such warning, one set of bars) is checked on the six-method run of
``tests/integration/test_cl_end_to_end.py`` (test_launch_prints_no_noise, test_one_rank_draws_the_progress_bars)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from gorp_ds.log import _DropRecords, local_rank, quiet_third_party, show_progress

GATHER = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
          "`torch.distributed.all_gather_single` instead.")
UNTESTED = "**** You are using ZeRO with an untested optimizer, proceed with caution *****"


@pytest.fixture
def restored() -> Iterator[None]:
    """Undo what quiet_third_party changes in this process (warnings filters are restored by
    catch_warnings inside the tests)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    deepspeed = logging.getLogger("DeepSpeed")
    filters = list(deepspeed.filters)
    yield
    deepspeed.filters[:] = filters
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()


@pytest.mark.parametrize(("env", "rank"), [({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"SLURM_LOCALID": "2"}, 2),
                                           ({"LOCAL_RANK": "0", "SLURM_LOCALID": "3"}, 0)])
def test_local_rank_and_progress(monkeypatch, env, rank) -> None:
    """LOCAL_RANK first: under SLURM every rank of a node inherits the launcher task's SLURM_LOCALID."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert local_rank() == rank
    assert show_progress() is (rank == 0)


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit(message, category, f"/{module.replace('.', '/')}.py", 83, module=module)
    return len(caught) == 1


def test_only_the_listed_warnings_are_dropped(restored) -> None:
    c10d = "torch.distributed.c10d_logger"
    assert not _shown(GATHER, FutureWarning, c10d)
    assert not _shown(GATHER.replace("all_gather_into_tensor", "reduce_scatter_tensor"), FutureWarning, c10d)
    # the same message from the project, another category, another deprecation of that module: shown
    assert _shown(GATHER, FutureWarning, "gorp_ds.zero.deepspeed_bridge")
    assert _shown(GATHER, DeprecationWarning, c10d)
    assert _shown("`torch.distributed._all_gather_base` is a private function and will be deprecated.",
                  FutureWarning, c10d)


def test_only_deepspeeds_untested_optimizer_record_is_dropped(restored) -> None:
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter
    deepspeed = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, _DropRecords) for f in deepspeed.filters) == 1
    assert not deepspeed.filter(logging.makeLogRecord({"name": "DeepSpeed", "msg": UNTESTED,
                                                       "levelno": logging.WARNING}))
    assert deepspeed.filter(logging.makeLogRecord({"name": "DeepSpeed", "levelno": logging.WARNING,
                                                   "msg": "zero_optimization.stage 2: overlap_comm is off"}))
    # another logger's record with the same words is not DeepSpeed's to drop
    assert logging.getLogger("gorp_ds.test").filter(logging.makeLogRecord({"msg": UNTESTED}))


@pytest.mark.parametrize("rank", [0, 1])
def test_transformers_bars_on_local_rank_0_only(monkeypatch, restored, rank) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    quiet_third_party()
    assert hf_logging.is_progress_bar_enabled() is (rank == 0)
