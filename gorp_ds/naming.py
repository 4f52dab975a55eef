"""Module names independent of PEFT's wrapping: the key every layer uses for a tensor.

GORP keys its state and shared spaces by module name, and LoRA factors are re-created at every task, so
names must not depend on PEFT's wrapping: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.
default.weight`` is called ``model.layers.3.self_attn.q_proj.lora_A``. Imports nothing from the project,
so that every layer may use it.
"""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."


def canonical_name(parameter_name: str) -> str:
    """Module name of a parameter (or module), independent of PEFT's wrapping and adapter name."""
    name = parameter_name.removeprefix(PEFT_PREFIX)
    name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1", name)  # ….lora_A.<adapter>.weight
    name = name.replace(".base_layer.weight", ".weight")
    return name.removesuffix(".weight")
