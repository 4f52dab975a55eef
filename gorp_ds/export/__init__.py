"""The trained model out: a plain Hugging Face directory with every LoRA merged (``hf_dir``); a
task's LoRA as a PEFT adapter and the ``full`` targets' change beside it (``peft_adapter``).
``python -m gorp_ds.export <checkpoint> <dir>`` (``__main__``) is ``gorp-ds export``, for any saved
checkpoint."""

from .hf_dir import ExportInfo, export_hf_dir

__all__ = ["ExportInfo", "export_hf_dir"]
