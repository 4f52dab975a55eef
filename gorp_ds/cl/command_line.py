"""From the command line and run files to a :class:`~gorp_ds.cl.config.RunConfig`: the flags
(generated from the settings' fields), run files and presets, their layering with each value's
source, and ``--print-config``.

Layers, later ones win: the fields' defaults < presets (``recipes/<name>.yaml``, ``--preset``) <
the papers' lengths for orders 1-6 < the ``--config`` run file < command-line flags. Every value is
type-checked where it is read (``coerce``) and the component dataclasses check it once more as they
are built; a bad value is reported with the flag or file key the user wrote.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..resources import RECIPES
from ..settings import SettingError
from ..zero.config_checks import MAX_NESTING, nesting_depth
from .config import (
    _BY_FIELD,
    _KEYS,
    AUTO_PRESET_MODEL,
    AUTO_PRESET_SUITE,
    PAPER_LENGTHS,
    PAPER_ORDERS,
    SECTIONS,
    SETTINGS,
    ConfigError,
    RunConfig,
    Setting,
    coerce,
    show,
)


# ---------------------------------------------------------------------------------- run files
@dataclass
class RunFile:
    """A parsed run file: ``settings`` flat name -> (value, key as written); ``presets`` named in it."""

    path: str
    settings: dict[str, tuple[Any, str]]
    presets: list[str]


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A mapping that names each key once: JSON and YAML would keep the last of two silently."""
    found: dict[Any, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(str(key))
        found[key] = value
    return found


def _yaml(text: str) -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            self.flatten_mapping(node)  # merge keys (<<) first: they may be overridden
            pairs = [(self.construct_object(k, deep=deep), self.construct_object(v, deep=deep)) for k, v in node.value]
            return _unique_keys(pairs)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def _load(path: str, label: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{label}: file not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save "
                          "it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{label}: cannot be read ({err.strerror or err})") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            data = _yaml(text)
        else:
            data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ConfigError(f"{label}: key '{err}' is given twice in one mapping; keep one") from None
    except Exception as err:  # json.JSONDecodeError / yaml.YAMLError / RecursionError
        raise ConfigError(f"{label}: cannot parse ({(str(err) or type(err).__name__).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of settings")
    if nesting_depth(data) > MAX_NESTING:
        raise ConfigError(f"{label}: mappings or lists nested deeper than {MAX_NESTING} levels; a run file is a "
                          "mapping of sections and settings")
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
            # The same names as --preset takes: a name, a comma list, or a list of names.
            if isinstance(value, str):
                value = [n.strip() for n in value.split(",") if n.strip()]
            if value is not None and not (isinstance(value, list) and all(isinstance(n, str) and n.strip()
                                                                        for n in value)):
                raise ConfigError(f"{label}: {raw_key} must be a preset name or a list of names (recipes/<name>.yaml "
                                  f"or a file path), got {value!r}")
            presets += [n.strip() for n in value or []]
        elif key in SECTIONS and (isinstance(value, dict) or (value is None and key not in _KEYS)):
            # an empty section (`runner:` with its lines commented out) sets nothing
            for raw_name, item in (value or {}).items():
                name = str(raw_name).replace("-", "_")
                spec = _BY_FIELD.get((key, name)) or SETTINGS.get(_KEYS.get(name, ""))  # field or flat name
                if spec is not None and spec.section != key:
                    spec = None
                if spec is None:
                    known = ", ".join(s.name for s in SETTINGS.values() if s.section == key)
                    raise ConfigError(f"{label}: unknown setting '{raw_key}.{raw_name}' (the {key} section has: "
                                      f"{known})")
                put(spec.flat, item, f"{raw_key}.{raw_name}")
        elif key in _KEYS:  # a flat key ("model" is also its section's name)
            put(_KEYS[key], value, str(raw_key))
        elif key in SECTIONS:
            raise ConfigError(f"{label}: section '{raw_key}' must be a mapping of its settings (e.g. {key}: "
                              f"{{{next(s.name for s in SETTINGS.values() if s.section == key)}: ...}}), got {value!r}")
        else:
            raise ConfigError(f"{label}: unknown setting '{raw_key}' (sections: {', '.join(SECTIONS)}; flat keys: "
                              f"{', '.join(sorted(SETTINGS))})")
    return RunFile(path, settings, [str(p) for p in presets])


def preset_path(name: str, where: str = "--preset") -> Path:
    """``recipes/<name>.yaml`` for a bare name, otherwise the path itself (``where``: how the user
    named it, for the message)."""
    path = RECIPES / f"{name}.yaml"
    if "/" not in name and not name.endswith((".yaml", ".yml", ".json")) and path.is_file():
        return path
    if Path(name).is_file():
        return Path(name)
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml"))) if RECIPES.is_dir() else "none"
    raise ConfigError(f"{where} {name}: no such preset (recipes/{name}.yaml) or file; presets: {known}")


def _preset_layers(names: list[str], seen: tuple[str, ...] = (), where: str = "--preset") -> list[tuple[str, RunFile]]:
    layers = []
    for name in names:
        if name in seen:
            raise ConfigError(f"{where} {name}: presets include each other in a cycle ({' -> '.join(seen)})")
        path = preset_path(name, where)
        label = f"preset {name}" + (f" ({path})" if str(path) != name else "")
        parsed = read_run_file(str(path), label)
        layers += _preset_layers(parsed.presets, (*seen, name), f"{label}: preset") + [(name, parsed)]
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
    where = "--preset"
    if flag_preset is not None:
        names, how = [n.strip() for n in str(flag_preset).split(",") if n.strip()], "preset {}"
    elif run_file and run_file.presets:
        names, how, where = run_file.presets, "preset {}", f"--config {run_file.path}: preset"
    else:
        names = _auto_presets(explicit_values)
        how = "preset {} (auto: --model embedded" + (", no data settings)" if AUTO_PRESET_SUITE in names else ")")
    names = [n for n in names if n.lower() != "none"]

    values: dict[str, Any] = {}
    sources: dict[str, str] = {flat: "default" for flat in SETTINGS}
    spelling: dict[str, str] = {flat: spec.flag for flat, spec in SETTINGS.items()}
    for name, layer in _preset_layers(names, where=where):
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
