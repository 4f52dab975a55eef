"""What GorpTrainer (gorp_ds/integrations/hf_trainer.py) refuses before building anything: DeepSpeed
through the Trainer, and the methods whose loss penalty or mixed tasks only the runner carries. The
training itself is compared with the runner in tests/integration/test_hf_trainer.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gorp_ds.integrations.hf_trainer import DEEPSPEED_REFUSAL, check_trainer_setup
from gorp_ds.models import method_spec
from gorp_ds.zero import UnsupportedSetupError


@pytest.mark.parametrize("method", ["gorp", "galore", "seq-lora", "seq-ft"])
def test_methods_the_trainer_carries(method) -> None:
    check_trainer_setup(SimpleNamespace(deepspeed=None), method_spec(method))


@pytest.mark.parametrize(("method", "why"), [("o-lora", "loss penalty"), ("mtl", "mixed task")])
def test_methods_left_to_the_runner(method, why) -> None:
    with pytest.raises(ValueError) as caught:
        check_trainer_setup(SimpleNamespace(deepspeed=None), method_spec(method))
    assert why in str(caught.value) and f"gorp-ds train --method {method}" in str(caught.value)


@pytest.mark.parametrize("deepspeed", [{"zero_optimization": {"stage": 2}}, "ds_configs/zero2.json"])
def test_deepspeed_through_the_trainer(deepspeed) -> None:
    with pytest.raises(UnsupportedSetupError) as caught:
        check_trainer_setup(SimpleNamespace(deepspeed=deepspeed), method_spec("gorp"))
    assert str(caught.value) == DEEPSPEED_REFUSAL
    assert "deepspeed.initialize" in DEEPSPEED_REFUSAL and "gorp-ds train" in DEEPSPEED_REFUSAL


def test_the_runners_schedule_is_left_to_the_trainer() -> None:
    from gorp_ds.optim.config import OptimizerConfig

    check_trainer_setup(SimpleNamespace(deepspeed=None), method_spec("gorp"), OptimizerConfig())
    with pytest.raises(ValueError) as caught:
        check_trainer_setup(SimpleNamespace(deepspeed=None), method_spec("gorp"), OptimizerConfig(lr_schedule="cosine"))
    assert "lr_scheduler_type" in str(caught.value) and "'cosine'" in str(caught.value)
