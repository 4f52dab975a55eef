"""The command line of the memory model (``python -m gorp_ds.planning.memory_model``, ``gorp-ds
memory``): one table of terms for one setup, or a summary over world sizes and stages (``--world
8,16,64 --stage 2,3``).

    python -m gorp_ds.planning.memory_model --model 13b --world 8 --stage 3
    python -m gorp_ds.planning.memory_model --model 70b --world 8,16,64 --stage 2,3 --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..resources import stage_ds_config
from .memory_model import GIB, MODELS, GorpShape, ModelShape, Prediction, RunShape, ZeroShape, worst_rank

GROUPS = [  # (label, term-name prefixes) of the summary columns
    ("weights", ("weights", "ds.bf16_params")),
    ("masters+optimizer", ("ds.fp32_master", "ds.fp32_grad_buffer", "ds.grad_partitions", "ds.grads_in_partition",
                           "ds.fp32_grad_partition", "optimizer", "lora", "full", "shared", "step")),
    ("DeepSpeed buffers", ("ds.reduce_bucket", "ds.reduce_buckets", "ds.gathered_params")),
    ("activations", ("activations", "refresh")),
]


class CliError(ValueError):
    pass


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected integers separated by commas, e.g. {flag} 8,16") from None
    if not values or any(v < 1 for v in values):
        raise CliError(f"{flag} {text!r}: every value must be at least 1")
    return values


def _model(name: str) -> ModelShape:
    if name in MODELS:
        return MODELS[name]
    path = Path(name) / "config.json" if Path(name).is_dir() else Path(name)
    if not path.is_file():
        raise CliError(f"--model {name!r}: not one of {', '.join(MODELS)} and no config.json there")
    try:
        config = json.loads(path.read_text())
        return ModelShape(path.parent.name or "custom", config["hidden_size"], config["intermediate_size"],
                          config["num_hidden_layers"], config["num_attention_heads"],
                          config.get("num_key_value_heads") or config["num_attention_heads"], config["vocab_size"],
                          bool(config.get("tie_word_embeddings", False)))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CliError(f"--model {path}: not a LLaMA config.json ({type(err).__name__}: {err})") from None


def _group_bytes(prediction: Prediction, prefixes: tuple[str, ...]) -> tuple[int, int]:
    """``(always, at the peak phase)`` bytes of the terms under ``prefixes``."""
    phase = prediction.peak_phase
    chosen = [t for t in prediction.terms if any(t.name == p or t.name.startswith(p + ".") for p in prefixes)]
    return (sum(t.bytes for t in chosen if t.phase == "always"),
            sum(t.bytes for t in chosen if phase in t.phase.split("+")))


def terms_table(prediction: Prediction) -> str:
    peak = prediction.peak_phase
    lines = ["| term | elements/GPU | bytes each | GiB | when | rule |", "|---|---|---|---|---|---|"]
    for t in prediction.terms:
        if t.numel == 0:
            continue
        mark = "" if t.phase == "always" else (" (peak)" if peak in t.phase.split("+") else "")
        lines.append(f"| {t.name} | {t.numel:,} | {t.element_bytes} | {t.bytes / GIB:.3f} | {t.phase}{mark} | {t.rule} |")
    lines.append(f"| **peak** | | | **{prediction.peak / GIB:.2f}** | always {prediction.always / GIB:.2f} + "
                 f"{peak} {prediction.phase(peak) / GIB:.2f} | |")
    return "\n".join(lines)


def summary_table(rows: list[tuple[str, int, int, Prediction]]) -> str:
    header = "| model | GPUs | ZeRO | " + " | ".join(label for label, _ in GROUPS) + " | peak GiB/GPU | fits 80 GB |"
    lines = [header, "|" + "---|" * (len(GROUPS) + 5)]
    for model, world, stage, p in rows:
        cells = []
        for _, prefixes in GROUPS:
            always, transient = _group_bytes(p, prefixes)
            cells.append(f"{(always + transient) / GIB:.1f}")
        fits = "yes" if p.peak <= 80e9 else "no"
        lines.append(f"| {model} | {world} | {stage} | " + " | ".join(cells) + f" | {p.peak / GIB:.1f} | {fits} |")
    return "\n".join(lines)


def parse(argv: list[str] | None, prog: str = "python -m gorp_ds.planning.memory_model") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="7b", help=f"{', '.join(MODELS)}, or a directory/config.json of a LLaMA")
    parser.add_argument("--world", default="8", help="data-parallel GPUs, one value or several: 8,16,64")
    parser.add_argument("--stage", default="3", help="ZeRO stage 2 or 3, or both: 2,3")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per GPU per micro-batch")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", default="q_proj,v_proj")
    parser.add_argument("--full-targets", default="gate_proj", help="module names trained at full rank ('' for none)")
    parser.add_argument("--rank", type=int, default=8, help="GORP rank k of the full targets")
    parser.add_argument("--tasks", type=int, default=0, help="finished tasks (worst-case shared-space size)")
    parser.add_argument("--refresh-from", choices=("sketch", "gradient"), default="sketch")
    parser.add_argument("--optimizer", choices=("gorp", "adamw"), default="gorp",
                        help="adamw: plain DeepSpeed AdamW over the LoRA factors and full targets")
    parser.add_argument("--ds-config", default=None,
                        help="read the bucket and stage-3 settings from this JSON (default: the project's "
                             "ds_configs/zero<stage>.json where it exists, else DeepSpeed's defaults)")
    parser.add_argument("--markdown", action="store_true", help="only the summary table (for several setups)")
    return parser.parse_args(argv)


def default_ds_config(stage: int) -> Path | None:
    """The shipped ``ds_configs/zero{stage}.json`` (what a run uses by default), where there is one."""
    return stage_ds_config(stage)


def read_ds_config(path: str | None, stage: int) -> dict:
    """``--ds-config``, else the project's config of that stage, else ``{}`` (DeepSpeed's defaults)."""
    chosen = Path(path) if path else default_ds_config(stage)
    if chosen is None:
        return {}
    try:
        config = json.loads(chosen.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError (not UTF-8)
        raise CliError(f"--ds-config {chosen}: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
        raise CliError(f"--ds-config {chosen}: expected a JSON object with a zero_optimization object")
    return config


def predictions(args: argparse.Namespace) -> list[tuple[str, int, int, Prediction]]:
    model = _model(args.model)
    worlds, stages = _ints(args.world, "--world"), _ints(args.stage, "--stage")
    if any(s not in (2, 3) for s in stages):
        raise CliError(f"--stage {args.stage!r}: the model covers ZeRO stages 2 and 3")
    for flag, value in (("--micro-batch", args.micro_batch), ("--seq", args.seq), ("--lora-rank", args.lora_rank),
                        ("--rank", args.rank)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be at least 1")
    if args.tasks < 0:
        raise CliError(f"--tasks {args.tasks}: must be at least 0")
    gorp = GorpShape(lora_rank=args.lora_rank, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                     full_targets=tuple(t for t in args.full_targets.split(",") if t), rank=args.rank,
                     tasks=args.tasks, refresh_from=args.refresh_from, optimizer=args.optimizer)
    run = RunShape(args.micro_batch, args.seq, not args.no_checkpointing, args.dtype)
    rows = []
    for world in worlds:
        for stage in stages:
            ds_config = read_ds_config(args.ds_config, stage)
            config = {**ds_config, "zero_optimization": {**(ds_config.get("zero_optimization") or {}), "stage": stage}}
            try:
                zero = ZeroShape.from_ds_config(config, world)
            except ValueError as err:
                raise CliError(f"--ds-config {args.ds_config or default_ds_config(stage)}: {err}") from None
            rows.append((model.name, world, stage, worst_rank(model, gorp, zero, run)))
    return rows


def main(argv: list[str] | None = None, prog: str = "python -m gorp_ds.planning.memory_model") -> int:
    args = parse(argv, prog)
    try:
        rows = predictions(args)
    except (CliError, ValueError) as err:
        print(f"gorp_ds: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    ckpt = "without" if args.no_checkpointing else "with"
    print(f"micro-batch {args.micro_batch} x seq {args.seq} per GPU, {args.dtype}, {ckpt} gradient checkpointing, "
          f"LoRA r={args.lora_rank} on {args.lora_targets}, full targets {args.full_targets or 'none'} (k={args.rank}), "
          f"S after {args.tasks} tasks (worst case), optimizer {args.optimizer}")
    for stage in sorted({stage for _, _, stage, _ in rows}):
        source = args.ds_config or default_ds_config(stage)
        print(f"ZeRO-{stage} buffer settings: {source or 'DeepSpeed defaults'}")
    if not args.markdown:
        for model, world, stage, prediction in rows:
            print(f"\n{model}, {world} GPUs, ZeRO-{stage}: predicted peak {prediction.peak / GIB:.2f} GiB per GPU\n")
            print(terms_table(prediction))
        print()
    print(summary_table(rows))
    return 0
