"""``initialize``: a drop-in for ``deepspeed.initialize`` with a ``GORP`` optimizer.

It refuses, at start-up and with a message naming the config field and the fix, every setup whose
math it does not guarantee (:mod:`.config_checks`), claims the ``full`` targets for projected
gradients before DeepSpeed sees the model (:func:`~.lowrank_targets.claim_targets`), lets
DeepSpeed build the engine, and installs the distributor of the configured ZeRO stage
(:mod:`.distributor`) as ``engine.gorp``. DeepSpeed's internals are known to the distributors and
to :mod:`.deepspeed_patches` only.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..optim.gorp import GORP
from .config_checks import (
    UnsupportedSetupError,
    check_accumulation,
    check_gradient_settings,
    check_initialize_arguments,
    check_projected_setup,
    check_supported,
    load_ds_config,
    trainable_by_name,
)
from .distributor import select_distributor_class
from .lowrank_targets import claim_targets
from .projected_linear import ProjectedLinearError


def initialize(
    model: torch.nn.Module,
    optimizer: GORP,
    config: str | os.PathLike | dict[str, Any],
    full_gradients: str = "projected",
    refresh_from: str = "auto",
    refresh_memory_mib: float = 1024.0,
    **kwargs: Any,
):
    """``deepspeed.initialize`` for a ``GORP`` optimizer; returns the same tuple
    ``(engine, optimizer, dataloader, lr_scheduler)``. ``engine.gorp`` is the stage's
    :class:`~gorp_ds.zero.distributor.Distributor`.

    ``full_gradients``: ``"projected"`` (default) trains the ``full`` tensors from low-rank gradients
    formed in their Linear's backward, outside DeepSpeed (:mod:`.lowrank_targets`; clipping then uses
    the projected-gradient norm); ``"flat"`` hands their full gradients to DeepSpeed's flat buffers
    like every other tensor (clipping uses ‖G‖). ``refresh_from`` (projected only): ``"gradient"``
    forms the refreshing layers' G and refreshes them in batches of as many as fit
    ``refresh_memory_mib``; ``"sketch"`` computes each layer's projector from products of G through
    its activations when a step has one micro-batch (randomized projector), never forming G;
    ``"auto"`` (default) batches from G when all of a shape's due G's fit the budget, else sketches."""
    import deepspeed

    check_initialize_arguments(optimizer, kwargs)
    source = config if isinstance(config, (str, os.PathLike)) else "DeepSpeed config"
    ds_config = load_ds_config(config)
    stage = check_supported(ds_config, str(source))
    distributor_class = select_distributor_class(stage)
    ds_config["zero_allow_untested_optimizer"] = True
    check_gradient_settings(full_gradients, refresh_from, refresh_memory_mib)
    owned_groups = []
    if full_gradients == "projected" and any(g["role"] == "full" for g in optimizer.param_groups):
        check_projected_setup(optimizer.param_groups, ds_config, source)
        owned_groups = optimizer.detach_groups("full")
    params_by_name = trainable_by_name(optimizer.param_groups)
    claimed = None
    if owned_groups:
        # Before DeepSpeed sees the model: the weights stop requiring gradients, so DeepSpeed
        # builds no flat buffers, gradient hooks or partitions for them.
        try:
            claimed = claim_targets(owned_groups, model)
        except ProjectedLinearError as err:
            raise UnsupportedSetupError(str(err)) from None

    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, **kwargs
    )
    distributor_class.check_zero_optimizer(engine, optimizer, source)
    check_accumulation(stage, engine.zero_overlap_comm(), engine.gradient_accumulation_steps(), source)
    engine.gorp = distributor_class.install(engine, optimizer, params_by_name, claimed, source,
                                            refresh_from=refresh_from, refresh_memory_mib=refresh_memory_mib)
    return engine, ds_optimizer, loader, scheduler
