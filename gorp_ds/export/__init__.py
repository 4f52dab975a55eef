"""The trained model out: a plain Hugging Face directory with every LoRA merged (``hf_dir``), and
``python -m gorp_ds.export <checkpoint> <dir>`` for any saved checkpoint (``__main__``)."""

from .hf_dir import ExportInfo, export_hf_dir

__all__ = ["ExportInfo", "export_hf_dir"]
