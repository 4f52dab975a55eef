"""The run configuration: each component's settings dataclass, composed into :class:`RunConfig`.

Layers, later ones win: the fields' defaults < presets (``recipes/<name>.yaml``, ``--preset``) <
the papers' lengths for orders 1-6 < the ``--config`` run file < command-line flags. Every resolved
value remembers its source (``--print-config`` shows them; ``config.yaml`` records them).

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
sections, so a run file may also use them without a section; ``cfg.rank`` reads the field.
"""

from __future__ import annotations

import argparse
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
from ..resources import RECIPES
from ..settings import SettingError, check_settings, setting

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
    predictions: bool = setting(True, "write every evaluation's generations as JSONL under <method>/predictions/", on_resume="ignored")
    eval_only: bool = setting(False, "evaluate --model (an exported directory or a checkpoint) on the task list; "
                                     "no training", on_resume="fixed")
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


# ---------------------------------------------------------------------------------- run files
@dataclass
class RunFile:
    """A parsed run file: ``settings`` flat name -> (value, key as written); ``presets`` named in it."""

    path: str
    settings: dict[str, tuple[Any, str]]
    presets: list[str]


def _load(path: str, label: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{label}: file not found")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json.JSONDecodeError / yaml.YAMLError
        raise ConfigError(f"{label}: cannot parse ({str(err).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of settings")
    if isinstance(data.get("run"), dict) and set(data) <= {"run", "world_size", "deepspeed"}:
        data = data["run"]  # a config.yaml written by a run: its run settings
    return data


def read_run_file(path: str, label: str | None = None) -> RunFile:
    """A JSON or YAML run file: sections (``optimizer: {rank: 8}``) and/or flat keys (``rank: 8``;
    dashes or underscores), and optionally ``preset: <name>``."""
    label = label or f"--config {path}"
    data = _load(path, label)
    settings: dict[str, tuple[Any, str]] = {}
    presets: list[str] = []

    def put(flat: str, value: Any, written: str) -> None:
        if flat in settings:
            raise ConfigError(f"{label}: '{written}' sets {flat} a second time (also as '{settings[flat][1]}')")
        settings[flat] = (coerce(SETTINGS[flat], value, f"{label}: {written}"), written)

    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "preset":
            presets += [value] if isinstance(value, str) else list(value or [])
        elif key in SECTIONS and isinstance(value, dict):
            for raw_name, item in value.items():
                name = str(raw_name).replace("-", "_")
                spec = _BY_FIELD.get((key, name)) or SETTINGS.get(_KEYS.get(name, ""))  # field or flat name
                if spec is not None and spec.section != key:
                    spec = None
                if spec is None:
                    known = ", ".join(s.name for s in SETTINGS.values() if s.section == key)
                    raise ConfigError(f"{label}: unknown setting '{raw_key}.{raw_name}' (the {key} section has: "
                                      f"{known})")
                put(spec.flat, item, f"{raw_key}.{raw_name}")
        elif key in _KEYS:
            put(_KEYS[key], value, str(raw_key))
        else:
            raise ConfigError(f"{label}: unknown setting '{raw_key}' (sections: {', '.join(SECTIONS)}; flat keys: "
                              f"{', '.join(sorted(SETTINGS))})")
    return RunFile(path, settings, [str(p) for p in presets])


def preset_path(name: str) -> Path:
    """``recipes/<name>.yaml`` for a bare name, otherwise the path itself."""
    path = RECIPES / f"{name}.yaml"
    if "/" not in name and not name.endswith((".yaml", ".yml", ".json")) and path.is_file():
        return path
    if Path(name).is_file():
        return Path(name)
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml"))) if RECIPES.is_dir() else "none"
    raise ConfigError(f"--preset {name}: no such preset (recipes/{name}.yaml) or file; presets: {known}")


def _preset_layers(names: list[str], seen: tuple[str, ...] = ()) -> list[tuple[str, RunFile]]:
    layers = []
    for name in names:
        if name in seen:
            raise ConfigError(f"--preset {name}: presets include each other in a cycle ({' -> '.join(seen)})")
        path = preset_path(name)
        parsed = read_run_file(str(path), f"preset {name}" + (f" ({path})" if str(path) != name else ""))
        layers += _preset_layers(parsed.presets, (*seen, name)) + [(name, parsed)]
    return layers


# ---------------------------------------------------------------------------------- command line
class _SettingAction(argparse.Action):
    """Stores the text given and remembers which spelling of the flag was used (for messages)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        spec = SETTINGS[self.dest]
        if option_string and option_string.startswith("--no-"):
            values = "false"
        elif values is None:
            values = spec.bare
        setattr(namespace, self.dest, values)
        spelled = dict(getattr(namespace, "_spelled", None) or {})
        spelled[self.dest] = option_string or spec.flag
        namespace._spelled = spelled


def _metavar(spec: Setting) -> str:
    if spec.kind is bool:
        return "{true,false}"
    if spec.choices and spec.kind is not list:
        return "{" + ",".join(map(str, spec.choices)) + "}"
    if spec.kind is list:
        return "A,B,..." if not spec.choices else "{" + ",".join(map(str, spec.choices)) + "},..."
    return {int: "INT", float: "FLOAT"}.get(spec.kind, "TEXT")


def flag_help(spec: Setting) -> str:
    default = show(spec.default) if spec.default is not None else "none"
    extra = "; none: derived" if spec.optional and spec.default is not None else ""
    if spec.kind is bool:
        extra += f"; bare {spec.flag}: true, --no-{spec.flat.replace('_', '-')}: false"
    return f"{spec.help} [{spec.section}.{spec.name}; default: {default}{extra}]"


def add_arguments(parser: Any) -> None:
    """Every run setting as a flag (defaults None, so only explicit flags override), grouped by section."""
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                        help="DeepSpeed JSON with systems settings (ZeRO stage, precision, TensorBoard, W&B) "
                             "[default: ds_configs/zero2.json; with --dtype fp32 ds_configs/zero2_fp32.json]")
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON/YAML run file (sections model, data, lora, targets, optimizer, runner, or flat "
                             "keys); flags override it")
    parser.add_argument("--preset", default=None, metavar="NAME[,NAME]",
                        help="named presets applied under --config and flags: recipes/<name>.yaml or a file path; "
                             f"'none' for none [default: {AUTO_PRESET_SUITE} when --model is embedded and no "
                             f"data is set, {AUTO_PRESET_MODEL} for --model embedded with data, otherwise none]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration, each value with its source, and exit")
    for section, (_, cls, _) in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings ({cls.__name__})")
        for spec in (s for s in SETTINGS.values() if s.section == section):
            nargs = "?" if spec.bare is not None else None
            group.add_argument(*spec.flags, dest=spec.flat, default=None, nargs=nargs, action=_SettingAction,
                               metavar=_metavar(spec), help=flag_help(spec))
            if spec.kind is bool:  # listed in the flag's help, not as an entry of its own
                group.add_argument(f"--no-{spec.flat.replace('_', '-')}", dest=spec.flat, default=None, nargs=0,
                                   action=_SettingAction, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------- building
def _auto_presets(values: dict[str, Any]) -> list[str]:
    if values.get("model", SETTINGS["model"].default) != "embedded":
        return []
    has_data = any(values.get(k) for k in ("data_dir", "tasks", "order"))
    return [AUTO_PRESET_MODEL if has_data else AUTO_PRESET_SUITE]


def build_run_config(args: Any) -> RunConfig:
    """Merge defaults, presets, the papers' lengths, the run file and explicit flags; validate.
    Every value's source is kept in ``cfg.sources``."""
    run_file = read_run_file(args.config) if getattr(args, "config", None) else None
    spelled = getattr(args, "_spelled", None) or {}
    from_cli: dict[str, tuple[Any, str]] = {}
    for flat in SETTINGS:
        raw = getattr(args, flat, None)
        if raw is not None:
            written = spelled.get(flat, SETTINGS[flat].flag)
            from_cli[flat] = (coerce(SETTINGS[flat], raw, written), written)
    explicit = {**(run_file.settings if run_file else {}), **from_cli}
    explicit_values = {k: v for k, (v, _) in explicit.items()}

    flag_preset = getattr(args, "preset", None)
    if flag_preset is not None:
        names, how = [n.strip() for n in str(flag_preset).split(",") if n.strip()], "preset {}"
    elif run_file and run_file.presets:
        names, how = run_file.presets, "preset {}"
    else:
        names = _auto_presets(explicit_values)
        how = "preset {} (auto: --model embedded" + (", no data settings)" if AUTO_PRESET_SUITE in names else ")")
    names = [n for n in names if n.lower() != "none"]

    values: dict[str, Any] = {}
    sources: dict[str, str] = {flat: "default" for flat in SETTINGS}
    spelling: dict[str, str] = {flat: spec.flag for flat, spec in SETTINGS.items()}
    for name, layer in _preset_layers(names):
        for flat, (value, written) in layer.settings.items():
            values[flat], sources[flat] = value, how.format(name)
            spelling[flat] = f"preset {name}" + (f" ({layer.path})" if layer.path != name else "") + f": {written}"
    order = str(explicit_values.get("order", values.get("order")) or "").strip()
    if order in PAPER_ORDERS:
        for flat, value in PAPER_LENGTHS.items():
            values[flat], sources[flat] = value, f"order {order} (the papers' lengths)"
    if run_file:
        for flat, (value, written) in run_file.settings.items():
            values[flat], sources[flat] = value, f"file {run_file.path}"
            spelling[flat] = f"--config {run_file.path}: {written}"
    for flat, (value, written) in from_cli.items():
        values[flat], sources[flat] = value, f"flag {written}"
        spelling[flat] = written
    try:
        cfg = RunConfig.from_flat(values, sources)
    except SettingError as err:
        raise ConfigError(_render(err, spelling)) from None
    cfg.written = spelling
    return cfg


def _render(err: SettingError, spelling: dict[str, str]) -> str:
    def spell(name: str) -> str:
        spec = _BY_FIELD.get((err.section, name)) if err.section else SETTINGS.get(name)
        return spelling.get(spec.flat, spec.flag) if spec else name

    return err.render(spell)


def format_config(cfg: RunConfig, sources: bool = True) -> str:
    """The resolved configuration as a sectioned run file, each value followed by its source."""
    lines = []
    for section, values in cfg.to_sections().items():
        lines.append(f"{section}:")
        width = max(len(k) + len(show(v)) for k, v in values.items()) + 4
        for name, value in values.items():
            text = f"  {name}: {show(value)}"
            if sources:
                flat = _BY_FIELD[(section, name)].flat
                text = text.ljust(width) + f"  # {cfg.sources.get(flat, 'default')}"
            lines.append(text)
    return "\n".join(lines)


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
