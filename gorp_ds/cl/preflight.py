"""Check every method's trainable set on a weightless copy of the model before any training, so that
a LoRA or full-rank target that matches nothing, or a rank larger than a matrix, fails at start-up
even when it concerns the third method of a launch."""

from __future__ import annotations

import torch

from ..data.prompting import PromptFormat
from ..models import add_lora, build_param_groups, method_spec
from ..models.loading import resolve_model_source
from ..models.roles import RoleError
from .config import RunConfig


def preflight(cfg: RunConfig) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    source, extra = resolve_model_source(cfg.base_model)
    config = AutoConfig.from_pretrained(source, **extra)
    if cfg.data.prompt_format != "plain":  # a chat format needs the tokenizer's chat template
        from transformers import AutoTokenizer

        PromptFormat(cfg.data.prompt_format).check(AutoTokenizer.from_pretrained(source, **extra))
    for method in map(method_spec, cfg.runner.methods):
        # Before the adapters are built: a rank of 2**62 would overflow the (meta) tensor's size first.
        if method.adapters and cfg.lora.r > min(config.hidden_size, getattr(config, "intermediate_size", 10**9)):
            raise RoleError(f"{cfg.written_as('lora_r')} {cfg.lora.r} is larger than the model's hidden size "
                            f"{config.hidden_size}")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        if method.adapters:
            try:
                model = add_lora(model, cfg.lora)
            except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
                raise RoleError(f"{cfg.written_as('lora_targets')} {','.join(cfg.lora.targets)}: {str(err).splitlines()[0]}") from None
        build_param_groups(model, method, cfg.targets, cfg.optimizer)
