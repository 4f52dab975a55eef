"""The world-size-independent GORP checkpoint format in a single process (no DeepSpeed): save
mid-run, load into a fresh model and optimizer, and continue bit-exactly like the run that was
not interrupted."""

from __future__ import annotations

import torch

from gorp_ds.zero import LocalDistributor, load_gorp_state, save_gorp_state
from tests.support import zero_scenarios as zs


def _handle(model, opt) -> LocalDistributor:
    params = {name: p for g in opt.param_groups for name, p in zip(g["names"], g["params"])}
    return LocalDistributor(opt, params)


def test_local_save_and_load_continue_bit_exactly(tmp_path):
    reference = zs.TinyNet()
    ref_opt = zs.build_optimizer(reference)
    zs.train_single_process(reference, ref_opt, range(zs.STEPS))

    model = zs.TinyNet()
    opt = zs.build_optimizer(model)
    zs.train_single_process(model, opt, range(zs.SAVE_AFTER))
    save_gorp_state(_handle(model, opt), str(tmp_path))
    assert opt.shared, "the checkpoint is taken after a task boundary, with S present"

    resumed = zs.TinyNet()  # fresh weights: everything must come from the checkpoint
    resumed_opt = zs.build_optimizer(resumed)
    load_gorp_state(_handle(resumed, resumed_opt), str(tmp_path))
    zs.train_single_process(resumed, resumed_opt, range(zs.SAVE_AFTER, zs.STEPS))
    for a, b in zip(zs.trainable(resumed), zs.trainable(reference)):
        assert torch.equal(a, b)
    assert set(resumed_opt.shared) == set(ref_opt.shared)
