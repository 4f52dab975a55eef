"""Model loading, LoRA through PEFT, and role assignment by module-name patterns."""

from .loading import EMBEDDED, ModelConfig, ModelError, embedded_gguf_path, load_model_and_tokenizer
from .lora import LoraSettings, add_lora, canonical_name, lora_factor_names, merge_and_reinit_
from .methods import METHODS, MethodSpec, method_spec, register
from .roles import RoleError, TargetsConfig, build_param_groups, trainable_summary

__all__ = [
    "EMBEDDED", "ModelConfig", "ModelError", "embedded_gguf_path", "load_model_and_tokenizer", "LoraSettings",
    "add_lora", "canonical_name", "lora_factor_names", "merge_and_reinit_", "METHODS", "MethodSpec", "method_spec", "register",
    "RoleError", "TargetsConfig",
    "build_param_groups", "trainable_summary",
]
