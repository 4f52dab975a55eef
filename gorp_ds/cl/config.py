"""The run configuration: defaults < model profile < ``--config`` file < command-line flags.

Run settings (what to train, how long, learning rates, outputs) live here; systems settings
(ZeRO stage, precision, buckets, TensorBoard) live in the DeepSpeed JSON. The few settings both
could express (batch sizes, precision) are filled into the DeepSpeed config when it leaves them
out, and a value that contradicts it is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.roles import METHODS

EMBEDDED_METHODS = ["gorp", "seq-lora"]


class ConfigError(ValueError):
    """Bad run configuration; the launcher prints the message and exits with status 2."""


@dataclass
class RunConfig:
    # what to train
    model: str = "embedded"
    data_dir: str | None = None
    tasks: list[str] | None = None
    order: str | None = None
    methods: list[str] = field(default_factory=lambda: ["gorp"])
    # budget
    max_steps_per_task: int | None = None  # None: `epochs` passes over each task's train split
    epochs: float = 1.0
    global_batch_size: int = 16
    micro_batch_size: int = 1  # 0: the whole global batch in one micro-batch per rank (no accumulation)
    max_train_per_task: int | None = None
    eval_samples: int | None = 500
    eval_batch_size: int = 64
    max_length: int = 256
    # model
    dtype: str = "bf16"
    gradient_checkpointing: bool = True
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # optimizer (GORP.md §5 defaults for LLaMA-2-7B)
    full_targets: list[str] = field(default_factory=lambda: ["mlp.gate_proj"])
    rank: int = 8
    update_gap: int = 20
    scale: float = 0.25
    projector: str = "randomized"
    shared_threshold: float = 0.9
    lr_lora: float = 2e-4
    lr_full: float = 1e-6
    lr_plain: float = 1e-5
    weight_decay: float = 0.0
    olora_lambda: float = 0.5
    lora_init_off_shared: bool = True  # gorp: new adapters' A starts orthogonal to the shared space
    # run
    output_dir: str = "runs/gorp_ds"
    resume: str = "off"  # "off", "on" (--resume: a checkpoint or results must exist) or "auto" (resume if any)
    save_every: int = 100  # optimizer steps between mid-task checkpoints (0: task boundaries only)
    keep_checkpoints: int = 2
    checkpoints: bool = True  # false: write no checkpoints at all (benchmarks; --resume then impossible)
    seed: int = 0
    # --- gradients of `full` targets (gorp, galore) -----------------------------------------------
    # "projected" (default): their Linear's backward forms the low-rank gradient R = δᵀ(X Q) from the
    # activations, they live outside DeepSpeed's flat buffers, and gradient_clipping uses the norm of
    # the projected gradient for them. "flat": their full gradients go through DeepSpeed's flat
    # buffers like every other tensor (gradient_clipping uses ‖G‖): the earlier path, kept selectable.
    full_gradients: str = "projected"
    # Projector refreshes on the projected path: "sketch" (default) computes them from products of G
    # through the activations (a distributed randomized range finder, no m × n tensor) when a step has
    # one micro-batch and --projector is randomized, else forms G; "gradient" always forms G.
    refresh_from: str = "sketch"
    # ----------------------------------------------------------------------------------------------
    # profiling: device-synchronised wall time per training phase and per projector refresh (costs
    # several syncs per micro-batch; off, a step reads the device once, for its loss)
    profile: bool = False
    # --- issue 10: export, predictions, evaluation only, the papers' orders, prompt format ------------
    export: bool = True  # <output-dir>/<method>/export/: a Hugging Face directory, every LoRA merged
    export_every_task: bool = False  # also <output-dir>/<method>/export/task_XX/ after every task
    predictions: bool = True  # <output-dir>/<method>/predictions/R<i>_<j>_<task>.jsonl for every R entry
    eval_only: bool = False  # evaluate --model (an exported directory or a checkpoint) on the task list
    prompt_format: str = "plain"  # "chat": prompts through the tokenizer's chat template
    max_source_length: int | None = None  # prompt tokens (None: max_length minus the answer)
    max_target_length: int | None = None  # answer / generated tokens (None: the longest label + 1)
    # ----------------------------------------------------------------------------------------------
    # --- runs you can trust, non-finite values (issue 14, second half) ---
    overwrite: bool = False  # a used --output-dir is moved aside (<dir>.old-<time>) before starting
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or gradient before the run stops


RESUME_MODES = ("off", "on", "auto")
MAX_SCALE = 100.0  # --scale above this is a typo or an overflow in the making, not a GaLore scale

# The embedded model (SmolLM2-135M) learns in tens of steps where the 7B recipe of GORP.md §5 needs
# thousands: a larger learning rate (the paper's 200:1 LoRA to full-rank ratio kept), a shorter refresh
# gap and larger micro-batches. Applied whenever --model is the embedded default.
EMBEDDED_MODEL_PROFILE: dict[str, Any] = {
    "micro_batch_size": 0,
    "gradient_checkpointing": False,  # 135M parameters fit without recomputation, which only costs time
    "lr_lora": 1e-3,
    "lr_full": 5e-6,
    "update_gap": 10,
}
# The embedded model on the embedded task suite (no data flags): the main job's default, sized to
# finish in minutes on two CPU processes.
EMBEDDED_SUITE_PROFILE: dict[str, Any] = {
    "methods": EMBEDDED_METHODS,
    "max_steps_per_task": 40,
    "global_batch_size": 16,
    "eval_samples": 100,
    "max_length": 64,  # the generated examples are ~16 tokens
    "save_every": 0,  # task boundaries only: a task takes seconds on a GPU, about a minute on a CPU
    "output_dir": "runs/embedded",
}

# The O-LoRA / GORP papers' orders (gorp_ds.data.registry.PAPER_ORDERS) use 512 source and 50
# target tokens.
PAPER_ORDERS = ("1", "2", "3", "4", "5", "6")
PAPER_LENGTHS: dict[str, Any] = {"max_source_length": 512, "max_target_length": 50}

_LIST_FIELDS = {"tasks", "methods", "lora_targets", "full_targets"}
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Type-check one setting from a file or the command line."""
    default = getattr(RunConfig(), key)
    if value is None:
        return None
    if key == "resume":  # true/false from a file, "auto"/"on" from --resume [auto]
        text = str(value).lower()
        mode = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}.get(text, text)
        if mode not in RESUME_MODES:
            raise ConfigError(f"{source}: 'resume' must be true, false or auto, got {value!r}")
        return mode
    if key in _LIST_FIELDS:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: '{key}' must be a list of strings or a comma-separated string")
        return value
    kind = type(default) if default is not None else None
    if key in ("max_steps_per_task", "max_train_per_task", "eval_samples", "max_source_length", "max_target_length"):
        kind = int
    if key in ("data_dir", "order"):
        kind = str
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value) if kind is not None else value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}' must be of type {kind.__name__}, got {value!r}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON or YAML run file: a flat mapping of RunConfig fields (dashes or underscores)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json.JSONDecodeError / yaml.YAMLError
        raise ConfigError(f"--config {path}: cannot parse ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of settings")
    result = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "method":
            key = "methods"
        if key not in FIELDS:
            raise ConfigError(f"--config {path}: unknown setting '{raw_key}' (known: {', '.join(sorted(FIELDS))})")
        result[key] = _coerce(key, value, f"--config {path}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig field as a flag (defaults None, so only explicit flags override)."""
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                        help="DeepSpeed JSON with systems settings (ZeRO stage, precision, TensorBoard)")
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help="JSON/YAML run file; flags override it")
    parser.add_argument("--method", dest="methods", default=None,
                        help=f"comma-separated methods to run one after another: {', '.join(METHODS)}")
    parser.add_argument("--resume", nargs="?", const="on", default=None, metavar="auto",
                        help="continue each method from its last checkpoint in --output-dir (the saved config.yaml "
                             "must match the run's); plain --resume stops when there is nothing to resume, "
                             "--resume auto then starts fresh")
    parser.add_argument("--overwrite", action="store_const", const="true", default=None,
                        help="an --output-dir that already holds a run is moved aside to <dir>.old-<time> first")
    help_text = {
        "model": "'embedded' (SmolLM2-135M-Instruct), a local HF directory, a .gguf file, or a hub name",
        "data_dir": "CL_Benchmark-layout directory (<type>/<task>/{train,test,labels}.json); none: embedded tasks",
        "tasks": "comma-separated task folders or paths relative to --data-dir, or hf:<dataset>",
        "order": "named order: 1-3 (the papers' 4-task orders), 4-6 (their 15-task orders), or A, B, C "
                 "(4-task substitutes from the tasks at hand)",
        "export": "write <output-dir>/<method>/export/ (Hugging Face directory, LoRA merged; true/false)",
        "export_every_task": "also write export/task_XX/ after every task (true/false)",
        "predictions": "write every evaluation's generations as JSONL under <method>/predictions/ (true/false)",
        "eval_only": "evaluate --model (an exported directory or a checkpoint) on the task list; no training",
        "prompt_format": "plain (default) or chat (the tokenizer's chat template)",
        "max_source_length": "prompt tokens (default: max_length minus the answer; 512 for orders 1-6)",
        "max_target_length": "answer and generation tokens (default: longest label + 1; 50 for orders 1-6)",
        "max_steps_per_task": "optimizer steps per task (default: --epochs over the train split)",
        "eval_samples": "test examples per task used for R",
        "output_dir": "where results, TensorBoard events and checkpoints go",
        "full_gradients": "projected (default: low-rank gradients from activations, outside DeepSpeed's buffers) "
                          "or flat (full gradients in DeepSpeed's flat buffers)",
        "profile": "time every training phase and projector refresh with device syncs (slower; off by default)",
        "max_bad_steps": "consecutive steps with a non-finite loss or gradient (each skipped) before the run stops",
    }
    for name in FIELDS:
        if name in ("methods", "resume", "overwrite"):
            continue
        # Parsed as text and type-checked by _coerce, like values from a config file. A bare
        # boolean flag (`--eval-only`, `--profile`) means true; `--profile false` also works.
        extra = {"nargs": "?", "const": "true"} if isinstance(FIELDS[name].default, bool) else {}
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text.get(name), **extra)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """Merge defaults, the embedded profile, the config file and explicit flags; validate."""
    from_file = read_config_file(args.config) if args.config else {}
    from_cli = {k: _coerce(k, v, f"--{k.replace('_', '-')}") for k, v in vars(args).items()
                if k in FIELDS and v is not None}
    explicit = {**from_file, **from_cli}
    profile: dict[str, Any] = {}
    if explicit.get("model", "embedded") == "embedded":
        profile.update(EMBEDDED_MODEL_PROFILE)
        if not explicit.get("data_dir") and not explicit.get("tasks"):
            profile.update(EMBEDDED_SUITE_PROFILE)
    if str(explicit.get("order") or "").strip() in PAPER_ORDERS:
        profile.update(PAPER_LENGTHS)  # the papers' source/target lengths, unless set explicitly
    settings = {**profile, **explicit}
    cfg = RunConfig(**settings)
    validate(cfg)
    return cfg


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def validate(cfg: RunConfig) -> None:
    # Every float setting must be a finite number: nan passes every comparison below unnoticed.
    for name in FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(name)} must be a finite number, got {value}")
    for method in cfg.methods:
        if method not in METHODS:
            raise ConfigError(f"--method: unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not cfg.methods:
        raise ConfigError("--method: at least one method is needed")
    if cfg.tasks and cfg.order:
        raise ConfigError("--tasks and --order are mutually exclusive: give one of them")
    if cfg.micro_batch_size < 0:
        raise ConfigError(f"--micro-batch-size must be >= 0 (0: whole global batch per rank), got {cfg.micro_batch_size}")
    positive = ("global_batch_size", "eval_batch_size", "max_length", "lora_r", "rank",
                "update_gap", "keep_checkpoints")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    for key in ("max_steps_per_task", "eval_samples", "max_train_per_task"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if cfg.prompt_format not in ("plain", "chat"):
        raise ConfigError(f"--prompt-format must be plain or chat, got {cfg.prompt_format!r}")
    if cfg.max_source_length is not None and cfg.max_source_length < 8:
        raise ConfigError(f"--max-source-length must be >= 8 tokens, got {cfg.max_source_length}")
    if cfg.max_target_length is not None and cfg.max_target_length < 1:
        raise ConfigError(f"--max-target-length must be >= 1, got {cfg.max_target_length}")
    if cfg.epochs <= 0:
        raise ConfigError(f"--epochs must be > 0, got {cfg.epochs}")
    if cfg.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"--dtype must be bf16 or fp32, got {cfg.dtype!r}")
    if cfg.projector not in ("randomized", "exact"):
        raise ConfigError(f"--projector must be randomized or exact, got {cfg.projector!r}")
    if not 0.0 <= cfg.shared_threshold <= 1.0:
        raise ConfigError(f"--shared-threshold must be in [0, 1], got {cfg.shared_threshold}")
    if cfg.full_gradients not in ("projected", "flat"):
        raise ConfigError(f"--full-gradients must be projected or flat, got {cfg.full_gradients!r}")
    if cfg.refresh_from not in ("sketch", "gradient"):
        raise ConfigError(f"--refresh-from must be sketch or gradient, got {cfg.refresh_from!r}")
    if cfg.save_every < 0:
        raise ConfigError(f"--save-every must be >= 0, got {cfg.save_every}")
    for key in ("lr_lora", "lr_full", "lr_plain", "weight_decay", "olora_lambda"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 < cfg.scale <= MAX_SCALE:
        raise ConfigError(f"--scale must be in (0, {MAX_SCALE:g}] (it multiplies the full-rank update; GORP's "
                          f"default is 0.25; change --lr-full for larger steps), got {cfg.scale}")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"--lora-alpha must be > 0 (LoRA's update is scaled by alpha / r; 0 makes it a no-op), "
                          f"got {cfg.lora_alpha}")
    if cfg.max_bad_steps < 1:
        raise ConfigError(f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}")
    if cfg.resume != "off" and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                          "--output-dir, --overwrite moves it aside; give one of them")


def reconcile_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int, source: str) -> dict[str, Any]:
    """Fill batch sizes and precision into the DeepSpeed config, or fail on a contradiction."""
    ds = json.loads(json.dumps(ds))
    micro = cfg.micro_batch_size or cfg.global_batch_size // world_size
    if micro < 1 or cfg.global_batch_size % (micro * world_size):
        raise ConfigError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
            f"{micro} × {world_size} ranks"
        )
    accumulation = cfg.global_batch_size // (micro * world_size)
    wanted = {"train_batch_size": cfg.global_batch_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accumulation}
    for key, value in wanted.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"{source}: '{key}' is {ds[key]} but the run needs {value} "
                              f"(global batch {cfg.global_batch_size}, micro batch {micro}, "
                              f"{world_size} ranks); remove it from the DeepSpeed config or change the run")
        ds[key] = value
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    if "bf16" in ds and bf16 != (cfg.dtype == "bf16"):
        raise ConfigError(f"{source}: 'bf16.enabled' is {str(bf16).lower()} but the run's --dtype is {cfg.dtype}; "
                          "make them agree")
    if cfg.dtype == "bf16":
        ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": True}
    tensorboard = ds.get("tensorboard")
    if isinstance(tensorboard, dict) and tensorboard.get("enabled") and not tensorboard.get("output_path"):
        tensorboard["output_path"] = str(Path(cfg.output_dir) / "tensorboard")
    return ds
