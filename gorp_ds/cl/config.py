"""The run configuration: each component's settings dataclass, composed into :class:`RunConfig`.

Every resolved value remembers its source (``--print-config`` shows them; ``config.yaml`` records
them); the command line, run files and presets that produce it are :mod:`gorp_ds.cl.command_line`.

Run settings (what to train, how long, learning rates, outputs) live here; systems settings
(ZeRO stage, precision, buckets, TensorBoard, W&B) live in the DeepSpeed JSON. The few settings both
could express (batch sizes, precision) are filled into the DeepSpeed config when it leaves them
out, and a value that contradicts it is an error.

The owners of the settings: :class:`~gorp_ds.models.loading.ModelConfig` (``model:``),
:class:`~gorp_ds.data.config.DataConfig` (``data:``), :class:`~gorp_ds.models.lora.LoraSettings`
(``lora:``), :class:`~gorp_ds.models.roles.TargetsConfig` (``targets:``),
:class:`~gorp_ds.optim.config.OptimizerConfig` (``optimizer:``) and :class:`RunnerConfig` below
(``runner:``). Adding a field to one of them adds its flag, its run-file key and its line in
``--print-config`` and ``config.yaml``. Flat names (``rank``, ``lora_r``) are unique across
sections, so a run file may also use them without a section; ``cfg.optimizer.rank`` reads the field
from the section that owns it (``cfg.value("rank")`` by its flat name).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.config import MAX_DRAWN_PER_TASK, MAX_SEED, DataConfig
from ..models.loading import ModelConfig
from ..models.lora import LoraSettings
from ..models.methods import METHODS
from ..models.roles import TargetsConfig
from ..optim.config import OptimizerConfig
from ..settings import SettingError, check_settings, setting
from .evaluate import DECODER_CHOICES, DEFAULT_DECODER

RESUME_MODES = ("off", "on", "auto")
# --model embedded with no --preset: the embedded model's preset; with no data settings either, the
# embedded quick run (the main job's default).
AUTO_PRESET_MODEL, AUTO_PRESET_SUITE = "embedded", "embedded_quick"
# The O-LoRA / GORP papers' orders (gorp_ds.data.registry.PAPER_ORDERS) use 512 source and 50 target tokens.
PAPER_ORDERS = ("1", "2", "3", "4", "5", "6")
PAPER_LENGTHS: dict[str, Any] = {"max_source_length": 512, "max_target_length": 50}


class ConfigError(ValueError):
    """Bad run configuration; the launcher prints the message and exits with status 2."""


@dataclass(kw_only=True)
class RunnerConfig:
    """What the runner does with the components: methods, budget, outputs, resume (``runner:``)."""

    # choices: the method registry itself (a registered method is accepted by name).
    methods: list[str] = setting(["gorp"], "methods to run one after another (comma-separated)",
                                 choices=METHODS, aliases=("method",), on_resume="fixed")
    # The budgets' maxima: a task's batch order is built whole before training and holds at most
    # MAX_DRAWN_PER_TASK (2**24) example draws, steps × global batch (gorp_ds/data/config.py says
    # why); each step draws at least one example and each epoch at least one, so no budget beyond
    # it can finish. The product (and --epochs against the loaded tasks' sizes) is checked too.
    max_steps_per_task: int | None = setting(None, "optimizer steps per task (none: --epochs over the train split; "
                                             f"steps × --global-batch-size at most {MAX_DRAWN_PER_TASK})",
                                             minimum=1, maximum=MAX_DRAWN_PER_TASK, on_resume="fixed")
    epochs: float = setting(1.0, "passes over each task's train split (without --max-steps-per-task; the examples "
                                 f"drawn per task at most {MAX_DRAWN_PER_TASK})", above=0.0,
                            maximum=MAX_DRAWN_PER_TASK, on_resume="fixed")
    global_batch_size: int = setting(16, "examples per optimizer step, all ranks together (at most each task's "
                                         "train examples: a larger batch would hold an example twice)", minimum=1,
                                     maximum=MAX_DRAWN_PER_TASK, on_resume="fixed")
    micro_batch_size: int = setting(1, "examples per forward pass and rank (0: the whole global batch per rank, "
                                       "no accumulation)", minimum=0, on_resume="fixed")
    eval_batch_size: int = setting(64, "examples per generation batch in evaluation", minimum=1, on_resume="ignored")
    # choices: the decoder registry (gorp_ds/cl/evaluate.py); both give the same tokens.
    eval_decoder: str = setting(DEFAULT_DECODER, "how evaluation decodes: generate (transformers' generate()) "
                                "or loop (our own greedy loop, kept for bench/eval_throughput.py's comparison)",
                                choices=DECODER_CHOICES, on_resume="ignored")
    # 0 .. 2**32-1: the data order reads the seed's low 32 bits (a larger one would alias a smaller
    # one's order) and torch.manual_seed / numpy refuse what does not fit 64 bits with a traceback.
    seed: int = setting(0, "seed of the data order, sampling and LoRA re-initialisation", minimum=0,
                        maximum=MAX_SEED, on_resume="fixed")
    output_dir: str = setting("runs/gorp_ds", "where config.yaml, results, TensorBoard events and checkpoints go", on_resume="ignored")
    resume: str = setting("off", "continue each method from its last checkpoint in --output-dir (the saved "
                                 "config.yaml must describe the same run); on (plain --resume) stops when there "
                                 "is nothing to resume, auto then starts fresh", choices=RESUME_MODES, bare="on", on_resume="launch")
    overwrite: bool = setting(False, "an --output-dir that already holds a run is moved aside to <dir>.old-<time> "
                                     "first", on_resume="launch")
    save_every: int = setting(100, "optimizer steps between mid-task checkpoints (0: task boundaries only)",
                              minimum=0, on_resume="ignored")
    keep_checkpoints: int = setting(2, "checkpoints kept per method (older ones are deleted)", minimum=1, on_resume="ignored")
    checkpoints: bool = setting(True, "write checkpoints (off: benchmarks; --resume then impossible)", on_resume="ignored")
    profile: bool = setting(False, "time every training phase and projector refresh with device syncs (slower)", on_resume="ignored")
    export: bool = setting(True, "write <output-dir>/<method>/export/ (a Hugging Face directory, LoRA merged)", on_resume="ignored")
    export_every_task: bool = setting(False, "also write export/task_XX/ after every task", on_resume="ignored")
    export_adapters: bool = setting(True, "after every task of a LoRA method, write export/task_XX/adapter/ (the task's "
                                          "LoRA as a PEFT adapter on the model before the task) and, with --full-targets, "
                                          "export/task_XX/full_delta.safetensors (their change in fp32: 4 bytes per "
                                          "element per task)", on_resume="ignored")
    predictions: bool = setting(True, "write every evaluation's generations as JSONL under <method>/predictions/", on_resume="ignored")
    eval_only: bool = setting(False, "evaluate --model (an exported directory or a checkpoint) on the task list "
                                     "and any --eval-tasks; no training", on_resume="fixed")
    max_bad_steps: int = setting(3, "consecutive steps with a non-finite loss or gradient (each skipped) before "
                                    "the run stops", minimum=1, on_resume="ignored")

    def __post_init__(self) -> None:
        if isinstance(self.methods, list) and not self.methods:
            raise SettingError("methods", "needs at least one method", "runner")
        check_settings(self, "runner")
        if isinstance(self.methods, list):
            # Each method writes <output-dir>/<method>/: a second run of it would overwrite the first's results.
            twice = next((m for i, m in enumerate(self.methods) if m in self.methods[:i]), None)
            if twice is not None:
                raise SettingError("methods", f"names {twice!r} twice ({','.join(self.methods)}); each method runs "
                                   "once per launch: drop the repeat", "runner")
        if isinstance(self.output_dir, str) and not self.output_dir.strip():
            # An empty path would write the run into the current directory, mixed with whatever is there.
            raise SettingError("output_dir", f"is empty ({self.output_dir!r}); give a directory, e.g. runs/gorp_ds",
                               "runner")
        steps, batch = self.max_steps_per_task, self.global_batch_size
        if isinstance(steps, int) and isinstance(batch, int) and steps * batch > MAX_DRAWN_PER_TASK:
            raise SettingError("max_steps_per_task", f"{steps} × {{global_batch_size}} {batch} = {steps * batch} "
                               f"example draws per task; a task's batch order holds at most {MAX_DRAWN_PER_TASK}: "
                               "train fewer steps or use a smaller batch", "runner", others=("global_batch_size",))
        if self.resume != "off" and self.overwrite:
            raise SettingError("resume", "and {overwrite} contradict each other: --resume continues the run in "
                               "--output-dir, --overwrite moves it aside; give one of them", "runner",
                               others=("overwrite",))


# file section -> (RunConfig attribute, owning dataclass, prefix of its flat names)
SECTIONS: dict[str, tuple[str, type, str]] = {
    "model": ("base_model", ModelConfig, ""),
    "data": ("data", DataConfig, ""),
    "lora": ("lora", LoraSettings, "lora_"),
    "targets": ("targets", TargetsConfig, ""),
    "optimizer": ("optimizer", OptimizerConfig, ""),
    "runner": ("runner", RunnerConfig, ""),
}


@dataclass(frozen=True)
class Setting:
    """One run setting as the command line and run files see it."""

    section: str  # file section
    name: str  # field name in its dataclass
    flat: str  # unique name outside sections: flat run-file key, flag, RunConfig attribute
    kind: type  # int, float, bool, str or list (of str)
    optional: bool  # None allowed ("derive it")
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    aliases: tuple[str, ...]
    bare: Any
    on_resume: str  # what --resume does when the value differs (gorp_ds.settings.RESUME_POLICIES)

    @property
    def flag(self) -> str:
        return "--" + self.flat.replace("_", "-")

    @property
    def flags(self) -> list[str]:
        names = [self.flat, *self.aliases]
        return list(dict.fromkeys(f"--{n.replace('_', '-')}" for n in names))


def _kind(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list \
        else hint
    if typing.get_origin(base) is list:
        return list, optional
    return base, optional


def _collect() -> dict[str, Setting]:
    found: dict[str, Setting] = {}
    for section, (_, cls, prefix) in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "help" not in meta or not meta["run"]:
                continue
            flat = meta["flat"] or prefix + f.name
            kind, optional = _kind(hints[f.name])
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if flat in found:
                raise RuntimeError(f"setting name {flat!r} is declared twice ({found[flat].section}, {section})")
            choices = None if meta["choices"] is None else tuple(meta["choices"])  # a registry: its names now
            found[flat] = Setting(section, f.name, flat, kind, optional, default, meta["help"], choices,
                                  meta["aliases"], True if kind is bool else meta["bare"], meta["on_resume"])
    return found


SETTINGS: dict[str, Setting] = _collect()
_BY_FIELD = {(s.section, s.name): s for s in SETTINGS.values()}
_KEYS = {**{a.replace("-", "_"): s.flat for s in SETTINGS.values() for a in s.aliases}, **{k: k for k in SETTINGS}}


@dataclass(kw_only=True)
class RunConfig:
    """A run: one settings object per component, each handed as its own type to the code that uses
    it (``cfg.optimizer`` is an :class:`OptimizerConfig`, read as ``cfg.optimizer.rank``);
    :meth:`value` reads a setting by its flat name, :meth:`replace` returns a changed copy."""

    base_model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    # flat name -> where the value came from ("default", "preset embedded", "file run.yaml", "flag --rank")
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # flat name -> how the user wrote it ("--max-length", "--config run.yaml: data.max_length")
    written: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def value(self, flat: str) -> Any:
        """The setting with flat name ``flat`` (``"lora_r"`` is ``cfg.lora.r``), read from its section."""
        spec = SETTINGS.get(flat)
        if spec is None:
            raise KeyError(f"RunConfig has no setting {flat!r}")
        return getattr(getattr(self, SECTIONS[spec.section][0]), spec.name)

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, sources: dict[str, str] | None = None,
                  **more: Any) -> RunConfig:
        """Build from flat settings (missing ones take their defaults). Raises :class:`SettingError`."""
        values = {**(values or {}), **more}
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise TypeError(f"RunConfig: unknown settings {unknown}")
        parts: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for flat, value in values.items():
            spec = SETTINGS[flat]
            parts[spec.section][spec.name] = value
        parts["data"]["seed"] = values.get("seed", SETTINGS["seed"].default)  # the runner's seed samples the data
        built = {SECTIONS[s][0]: SECTIONS[s][1](**kw) for s, kw in parts.items()}
        return cls(**built, sources=dict(sources or {}))

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunConfig:
        """From a saved configuration: sectioned (by file section or attribute name) or flat (older runs)."""
        return cls.from_flat({k: v for k, v in flatten_run(saved).items() if k in SETTINGS})

    def replace(self, **changes: Any) -> RunConfig:
        new = RunConfig.from_flat({**self.flat(), **changes}, self.sources)
        new.written = dict(self.written)
        return new

    def written_as(self, name: str) -> str | None:
        """How the user wrote setting ``name`` (a flat name or a data-section field); its flag if unset."""
        spec = SETTINGS.get(name) or _BY_FIELD.get(("data", name))
        return None if spec is None else self.written.get(spec.flat, spec.flag)

    def flat(self) -> dict[str, Any]:
        return {flat: self.value(flat) for flat in SETTINGS}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}``: a run file's layout (what config.yaml holds under ``run``)."""
        out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for spec in SETTINGS.values():
            value = self.value(spec.flat)
            out[spec.section][spec.name] = list(value) if isinstance(value, tuple) else value
        return out


def flatten_run(run: dict[str, Any]) -> dict[str, Any]:
    """Flat settings from a saved ``run`` mapping: sections (file or attribute names) first, flat
    keys then override (older config.yaml files are flat)."""
    flat: dict[str, Any] = {}
    attrs = {attr: section for section, (attr, _, _) in SECTIONS.items()}
    for key, value in run.items():
        section = key if key in SECTIONS else attrs.get(key)
        if section is not None and isinstance(value, dict):
            for name, item in value.items():
                spec = _BY_FIELD.get((section, name))
                flat[spec.flat if spec else f"{section}.{name}"] = item
    for key, value in run.items():
        if not (key in SECTIONS or key in attrs) or not isinstance(value, dict):
            flat[_KEYS.get(key, key)] = value
    return flat


# ---------------------------------------------------------------------------------- values
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of strings or a comma-separated string"}


def coerce(spec: Setting, value: Any, where: str) -> Any:
    """Type-check one value from a file (YAML types) or the command line (text); ``where`` names
    the flag or key as the user wrote it."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and spec.optional:
        return None
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where} must be {_KIND_NAMES[spec.kind]}, not empty (it has no 'none' setting)")
    if spec.choices and {"on", "off"} <= set(spec.choices):  # resume: true/false mean on/off
        text = str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")
        value = "on" if text in _TRUE else "off" if text in _FALSE else text
    try:
        if spec.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in _TRUE + _FALSE:
                raise ValueError
            return text in _TRUE
        if spec.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                # Text as a file's number: "1e3" is 1000 here as 1.0e+3 is in YAML, so a flag and a run
                # file accept the same values and meet the same bounds (1e12 was refused as text but
                # accepted, unbounded, from a file).
                text = value.strip()
                try:
                    return int(text)
                except ValueError:
                    value = float(text)
                    if not value.is_integer():  # also nan and inf
                        raise
            return int(value)
        if spec.kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if spec.kind is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                      for v in value):
                raise ValueError
            return [str(v) for v in value]
        if isinstance(value, (dict, list, bool)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {_KIND_NAMES[spec.kind]}, got {value!r}") from None


def show(value: Any) -> str:
    """A value as YAML flow text (what --print-config and config.yaml write)."""
    import yaml

    return yaml.safe_dump({"v": value}, default_flow_style=True, width=10**6).strip()[4:-1]


def reconcile_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int, source: str) -> dict[str, Any]:
    """Fill batch sizes and precision into the DeepSpeed config, or fail on a contradiction."""
    ds = json.loads(json.dumps(ds))
    micro = cfg.runner.micro_batch_size or cfg.runner.global_batch_size // world_size
    if micro < 1 or cfg.runner.global_batch_size % (micro * world_size):
        raise ConfigError(
            f"--global-batch-size {cfg.runner.global_batch_size} is not a multiple of --micro-batch-size "
            f"{micro} × {world_size} ranks"
        )
    accumulation = cfg.runner.global_batch_size // (micro * world_size)
    wanted = {"train_batch_size": cfg.runner.global_batch_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accumulation}
    for key, value in wanted.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"{source}: '{key}' is {ds[key]} but the run needs {value} "
                              f"(global batch {cfg.runner.global_batch_size}, micro batch {micro}, "
                              f"{world_size} ranks); remove it from the DeepSpeed config or change the run")
        ds[key] = value
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    if "bf16" in ds and bf16 != (cfg.base_model.dtype == "bf16"):
        hint = " (ds_configs/zero2_fp32.json is one for fp32)" if cfg.base_model.dtype == "fp32" else ""
        raise ConfigError(f"{source}: 'bf16.enabled' is {str(bf16).lower()} but the run's --dtype is {cfg.base_model.dtype}; "
                          f"make them agree{hint}")
    if cfg.base_model.dtype == "bf16":
        ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": True}
    tensorboard = ds.get("tensorboard")
    if isinstance(tensorboard, dict) and tensorboard.get("enabled") and not tensorboard.get("output_path"):
        tensorboard["output_path"] = str(Path(cfg.runner.output_dir) / "tensorboard")
    return ds
