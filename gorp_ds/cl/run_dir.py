"""The output directory of a run: whether this launch may use it, and the run's resolved
configuration (``config.yaml``).

A directory that already holds a run (its ``config.yaml``, a method's results, progress or
checkpoints, TensorBoard events) is only used again with

- ``--resume``: the saved ``config.yaml`` must describe the same run (every field of
  :data:`FIXED_ON_RESUME` equal); other settings may change and take effect from the resume on,
  and each resumed method records the change in its progress and results. A method whose
  ``results.json`` exists is skipped only when those results were produced with this run's
  settings (all but :data:`NICETIES`).
- ``--overwrite``: the old contents are moved aside to ``<dir>.old-<time>`` (a rename: instant,
  nothing lost if the flag was a mistake, and nothing of the old run left to mix with the new one).

Rank 0 inspects the directory and decides; every rank receives the decision by broadcast, so all
ranks act, or stop with the same error, together, whether or not the nodes share a filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .. import safe_write
from ..log import get_logger
from ..zero import has_checkpoint
from .command_line import format_config
from .config import SETTINGS, ConfigError, RunConfig, flatten_run, show
from .report import is_finished

log = get_logger(__name__)

CONFIG_FILE = "config.yaml"
# Each setting declares what --resume does when it differs (``setting(on_resume=...)``):
# "fixed" ones define which run this is (a change would relabel R's columns, mix training across
# tasks, or load state of another shape) and are refused, naming each; "launch" ones say how this
# launch treats the directory, not what the run is; "ignored" ones have no effect on a finished
# method's results (a finished method is skipped despite them), nor has the world size.
FIXED_ON_RESUME = tuple(flat for flat, spec in SETTINGS.items() if spec.on_resume == "fixed")
NOT_COMPARED = tuple(flat for flat, spec in SETTINGS.items() if spec.on_resume == "launch")
NICETIES = (*(flat for flat, spec in SETTINGS.items() if spec.on_resume == "ignored"), "world_size")
# The DeepSpeed settings recorded next to the run's (changes are allowed and recorded).
DS_FIELDS = {"zero_stage": ("zero_optimization", "stage"), "bf16": ("bf16", "enabled"),
             "gradient_clipping": ("gradient_clipping",), "train_batch_size": ("train_batch_size",),
             "train_micro_batch_size_per_gpu": ("train_micro_batch_size_per_gpu",),
             "gradient_accumulation_steps": ("gradient_accumulation_steps",)}
_MISSING = "<not set>"


def run_settings(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """The run's settings as flat plain data (what checkpoints and results record and resume compares)."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.flat().items() if k not in NOT_COMPARED}
    if world_size is not None:
        settings["world_size"] = world_size
    return settings


def resolved_config(cfg: RunConfig, ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Contents of config.yaml: every run setting by section (a run file: ``--config <it>`` runs it
    again), the world size and DeepSpeed's systems settings."""
    systems = {}
    for name, keys in DS_FIELDS.items():
        value: Any = ds_config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        systems[name] = value
    return {"run": cfg.to_sections(), "world_size": world_size, "deepspeed": systems}


def recorded_settings(cfg: RunConfig, ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """config.yaml's contents as one flat mapping (``deepspeed.<field>`` for the systems settings):
    what checkpoints record and resume compares."""
    return _flat(resolved_config(cfg, ds_config, world_size))


def _flat(resolved: dict[str, Any]) -> dict[str, Any]:
    flat = flatten_run(resolved.get("run") or {})
    flat["world_size"] = resolved.get("world_size")
    flat.update({f"deepspeed.{k}": v for k, v in (resolved.get("deepspeed") or {}).items()})
    return flat


def compare(saved: dict[str, Any], current: dict[str, Any], refuse: tuple[str, ...] | None = None,
            ignore: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """``(refused, changed)``: one ``"field: saved X, this run Y"`` line per differing field in
    ``refuse`` (default :data:`FIXED_ON_RESUME`; ``None`` there means every field not ignored),
    and ``(field, old, new)`` for every other differing field."""
    refuse = FIXED_ON_RESUME if refuse is None else refuse
    refused, changed = [], []
    for key in sorted(set(saved) | set(current)):
        if key in NOT_COMPARED or key in ignore:
            continue
        old, new = saved.get(key, _MISSING), current.get(key, _MISSING)
        if isinstance(old, tuple):
            old = list(old)
        if isinstance(new, tuple):
            new = list(new)
        if old == new:
            continue
        if key in refuse:
            refused.append(f"{key}: saved {old!r}, this run {new!r}")
        else:
            changed.append((key, old, new))
    return refused, changed


def describe_changes(changed: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} → {new!r}" for key, old, new in changed)


# ---------------------------------------------------------------------------------- inspection
def path_problem(output_dir: str, flag: str = "--output-dir") -> str | None:
    """Why this process cannot create or write ``output_dir`` (``None``: it can); ``flag`` names
    where the path was given."""
    return safe_write.path_problem(output_dir, f"{flag} {output_dir}")


def monitor_path_problem(ds_config: dict[str, Any], source: str) -> str | None:
    """Why a monitor folder of the DeepSpeed config (``tensorboard.output_path``,
    ``csv_monitor.output_path``) cannot be made: DeepSpeed makes them only when the engine starts,
    after the model is loaded."""
    for monitor in ("tensorboard", "csv_monitor"):
        section = ds_config.get(monitor)
        if isinstance(section, dict) and section.get("enabled") and section.get("output_path"):
            problem = path_problem(str(section["output_path"]), f"{source}: '{monitor}.output_path'")
            if problem is not None:
                return problem
    return None


def tensorboard_dirs(cfg: RunConfig, ds_config: dict[str, Any]) -> list[Path]:
    """Per-method TensorBoard event folders that live outside ``--output-dir`` (an explicit
    ``tensorboard.output_path`` in the DeepSpeed config)."""
    board = ds_config.get("tensorboard")
    if not isinstance(board, dict) or not board.get("output_path"):
        return []
    root = Path(board["output_path"]).expanduser().resolve()
    out = Path(cfg.runner.output_dir).expanduser().resolve()
    if root == out or out in root.parents:
        return []
    return [root / method for method in cfg.runner.methods]


def held_run(out: Path, boards: list[Path] = ()) -> list[str]:
    """What in ``out`` (and the outside TensorBoard folders) belongs to an earlier run."""
    found = []
    if not out.is_dir():
        return found
    for name in (CONFIG_FILE, "summary.json", "summary.md"):
        if (out / name).is_file():
            found.append(name)
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name == "tensorboard":
            if any(sub.rglob("events.out.tfevents.*")):
                found.append("tensorboard/")
            continue
        found += [f"{sub.name}/{item}" for item in ("results.json", "progress.json", "checkpoints")
                  if (sub / item).exists()]
    found += [str(board) for board in boards if board.is_dir() and any(board.rglob("events.out.tfevents.*"))]
    return found


def _has_checkpoint(out: Path, method: str) -> bool:
    """A ``latest`` file or, without one, a committed tag (loading then takes the newest complete
    tag and says so)."""
    return has_checkpoint(str(out / method / "checkpoints"))


def _finished(out: Path, method: str) -> Path | None:
    """The method's results, where they are its last write (not those written before a final
    export that did not finish: that method resumes from its checkpoint)."""
    path = out / method / "results.json"
    if not path.is_file():
        return None
    try:
        return path if is_finished(json.loads(path.read_text(encoding="utf-8"))) else None
    except (ValueError, OSError, AttributeError):
        return path  # unreadable: the caller says so


# ---------------------------------------------------------------------------------- decision
@dataclass
class Decision:
    """What this launch does with ``--output-dir`` (the same on every rank)."""

    resume: bool = False  # methods continue from their checkpoints / finished results
    move_aside: bool = False  # the old contents go to `aside` first
    aside: str | None = None  # <output-dir>.old-<time>
    stamp: str = ""  # <time>, the same on every rank (other nodes' stale copies go to <their dir>.old-<time>)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def decide(cfg: RunConfig, current: dict[str, Any], boards: list[Path], stamp: str) -> Decision:
    """The decision for ``cfg.output_dir`` as seen from this process (rank 0 calls it)."""
    out = Path(cfg.runner.output_dir).expanduser()
    aside = _aside(out, stamp)
    held = held_run(out, boards)
    decision = _decide(cfg, current, out, held, aside)
    decision.stamp = stamp
    return decision


def _aside(out: Path, stamp: str) -> str:
    return f"{str(out).rstrip('/')}.old-{stamp}"


def _decide(cfg: RunConfig, current: dict[str, Any], out: Path, held: list[str], aside: str) -> Decision:
    if not held:
        if cfg.runner.resume == "on":
            return Decision(error=f"--resume: {cfg.runner.output_dir} holds no run to resume (no checkpoint, no results); "
                                  "drop --resume to start one, or pass --resume auto to resume only when there is one")
        return Decision()
    listing = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
    if cfg.runner.overwrite:
        return Decision(move_aside=True, aside=aside, notes=[f"--overwrite: {cfg.runner.output_dir} held a run ({listing}); "
                                                           f"moving it aside to {aside}"])
    if cfg.runner.resume == "off":
        return Decision(error=f"--output-dir {cfg.runner.output_dir} already holds a run ({listing}); pass --resume to "
                              "continue it, --overwrite to move it aside first, or choose another --output-dir")
    config_file = out / CONFIG_FILE
    if not config_file.is_file():
        return Decision(error=f"--resume: {cfg.runner.output_dir} holds a run ({listing}) but no {CONFIG_FILE}, so it "
                              "cannot be checked against this run; pass --overwrite or choose another --output-dir")
    try:
        import yaml

        saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("run"), dict):
            raise ValueError("not a gorp_ds run configuration")
    except Exception as err:  # yaml.YAMLError, ValueError
        return Decision(error=f"--resume: {config_file} is unreadable ({str(err).splitlines()[0]}); "
                              "pass --overwrite or choose another --output-dir")
    refused, changed = compare(_flat(saved), current)
    if refused:
        return Decision(error=f"--resume: {config_file} describes a different run; run this one in another "
                              "--output-dir or pass --overwrite instead of --resume. Differing:\n  "
                              + "\n  ".join(refused))
    problems, resumable = [], []
    settings = {k: v for k, v in current.items() if not k.startswith("deepspeed.")}
    for method in cfg.runner.methods:
        finished = _finished(out, method)
        if finished is not None:
            try:
                recorded = flatten_run(json.loads(finished.read_text(encoding="utf-8")).get("config") or {})
            except (ValueError, OSError, AttributeError) as err:  # JSONDecodeError, UnicodeDecodeError
                problems.append(f"{finished}: unreadable ({err})")
                continue
            differing, _ = compare(recorded, settings, refuse=tuple(settings), ignore=NICETIES)
            problems += [f"{finished}: {line}" for line in differing]
            resumable.append(method)
        elif _has_checkpoint(out, method):
            resumable.append(method)
    if problems:
        return Decision(error="--resume: finished results in " + cfg.runner.output_dir + " were produced with other "
                              "settings (a finished method is not re-run); restore those settings, or pass "
                              "--overwrite or another --output-dir. Differing:\n  " + "\n  ".join(problems))
    if not resumable:
        if cfg.runner.resume == "on":
            return Decision(error=f"--resume: {cfg.runner.output_dir} holds no checkpoint or results of "
                                  f"{', '.join(cfg.runner.methods)} (the earlier launch stopped before its first "
                                  "checkpoint); pass --resume auto to start again from the beginning, or --overwrite")
        return Decision(move_aside=True, aside=aside,
                        notes=[f"--resume auto: nothing to resume in {cfg.runner.output_dir}; starting fresh (the earlier "
                               f"attempt's files ({listing}) are moved aside to {aside})"])
    notes = [f"--resume: continuing {', '.join(resumable)} in {cfg.runner.output_dir}"]
    if changed:
        notes.append("settings changed since the saved run (the new values apply; each resumed method records "
                     f"the change): {describe_changes(changed)}")
    return Decision(resume=True, notes=notes)


def _move_aside(out: Path, aside: Path, boards: list[Path]) -> str:
    """Rename ``out`` to ``aside`` (and outside TensorBoard folders beside themselves); a directory
    that cannot be renamed (a mount point, a read-only parent) has its contents moved into
    ``out/.old-<time>`` instead, which no later inspection reads."""
    for board in boards:
        if board.is_dir():
            board.rename(board.with_name(f"{board.name}{aside.name[len(out.name):]}"))
    if not out.exists():
        return str(aside)
    try:
        out.rename(aside)
        out.mkdir(parents=True, exist_ok=True)
        return str(aside)
    except OSError:
        inside = out / f".old-{aside.name.rsplit('.old-', 1)[-1]}"
        inside.mkdir()
        for entry in out.iterdir():
            if entry != inside and not entry.name.startswith(".old-"):
                shutil.move(str(entry), str(inside / entry.name))
        return str(inside)


def config_text(cfg: RunConfig, resolved: dict[str, Any]) -> str:
    """config.yaml: the resolved run configuration by section, each value's source as a comment
    (the --print-config layout), then the world size and DeepSpeed's systems settings."""
    run = "\n".join("  " + line for line in format_config(cfg).splitlines())
    systems = "\n".join(f"  {k}: {show(v)}" for k, v in resolved["deepspeed"].items())
    return ("# gorp_ds run configuration, written at the start of every launch; --resume compares against it.\n"
            "# `--config <this file>` runs it again.\n"
            f"run:\n{run}\nworld_size: {resolved['world_size']}\ndeepspeed:\n{systems}\n")


def _write_config(out: Path, text: str) -> str:
    safe_write.write_file(str(out / CONFIG_FILE), text, what="the run configuration", site="config")
    return text


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def settle_output_dir(cfg: RunConfig, ds_config: dict[str, Any], world_size: int) -> Decision:
    """Decide on rank 0, agree on every rank, act (move aside), and write config.yaml. Raises
    :class:`ConfigError` on every rank when the directory may not be used or rank 0 could not act
    (every failure is broadcast, so no rank waits for one that stopped)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    resolved = resolved_config(cfg, ds_config, world_size)
    boards = tensorboard_dirs(cfg, ds_config)
    out = Path(cfg.runner.output_dir).expanduser()
    decision, text = None, ""
    if rank == 0:
        try:
            decision = decide(cfg, _flat(resolved), boards, time.strftime("%Y%m%d-%H%M%S"))
        except OSError as err:
            decision = Decision(error=f"--output-dir {cfg.runner.output_dir}: cannot inspect it ({err})")
        if not decision.error:
            try:
                if decision.move_aside:
                    decision.notes.append(f"the earlier contents of {cfg.runner.output_dir} are now in "
                                          f"{_move_aside(out, Path(decision.aside), boards)}")
                text = _write_config(out, config_text(cfg, resolved))
            except safe_write.WriteError as err:
                decision.error = str(err)
            except OSError as err:
                decision.error = f"--output-dir {cfg.runner.output_dir}: {err.strerror or err} ({err.filename or out})"
    decision, text = _broadcast((decision, text))
    if decision.error:
        raise ConfigError(decision.error)
    for note in decision.notes:
        log.info(note)
    if rank == 0:
        log.info(f"run configuration ({out / CONFIG_FILE}):\n{text.rstrip()}")
    # A node with its own filesystem (it does not see rank 0's new config.yaml) may hold a stale
    # copy of an earlier run there: unless resuming, its first rank moves it aside too.
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    config_file = out / CONFIG_FILE
    if not decision.resume and rank != 0 and local_rank == 0 and held_run(out, boards) \
            and not (config_file.is_file() and config_file.read_text() == text):
        aside = _aside(out, decision.stamp)
        log.info(f"rank {rank}: this node's {cfg.runner.output_dir} is not rank 0's and holds an earlier run; moving it "
                 f"aside to {aside}", extra={"all_ranks": True})
        _move_aside(out, Path(aside), boards)
    _barrier()
    return decision
