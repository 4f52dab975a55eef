"""GORP under DeepSpeed ZeRO-2 and ZeRO-3 versus LoRA-only, on the LLaMA-2-7B shape (random init).

Configurations, side by side in one launch on the same model shape, batch and ZeRO setup; with
``--stage 2,3`` every configuration runs under both stages (the same launch code, only the DeepSpeed
config's ``zero_optimization`` differs: ``ds_config``):
  lora          PEFT LoRA r=8 on q,v trained by torch AdamW (fused) — DeepSpeed LoRA-only
  lora+adamw    the same plus full-rank mlp.gate_proj, all with AdamW (no projection)
  gorp-flat     GORP: LoRA q,v + full-rank gate_proj projected Adam (k=8, T=--gap), full gradients of
                gate_proj through DeepSpeed's flat buffers (--full-gradients flat: the earlier path)
  gorp          the same GORP with projected gradients (the default path): R = δᵀ(X Q) formed in
                gate_proj's backward, gate_proj outside DeepSpeed; refreshes from the sketch (products
                of G through the activations, no G)
  gorp-grefresh gorp, but refreshes form G = δᵀX on refresh steps (--refresh-from gradient)
  gorp-nockpt   gorp without gradient checkpointing (memory only; not in the default list)

Every configuration runs in a fresh process of its own (``--in-process`` runs them one after the other
in this one): on CUDA a finished configuration's model and optimizer state were seen to stay allocated
into the next one's measurement (the previous configuration's ~12.6 GiB model and its masters were
inside the next one's peak), so peaks measured in one process depend on the order. Each result also
records ``mem_gib_at_start``, the memory allocated before its model is built (0 in a fresh process).

Reported per configuration (median of the timed steps without a projector refresh, after warm-up,
torch.cuda.synchronize around each step): seconds per step, tokens/s per GPU, ratios to lora (speed
and peak memory), MFU, peak memory per GPU (max allocated over all timed steps, refresh steps
included; the JSON lines also give it for refresh steps and the other steps apart), and for GORP the refresh overhead: the median time of the timed refresh steps minus the
median step, and that as a share of training at T = 10 and T = 20 (overhead / (T · median step)).
Also, refresh steps included: tokens/s/GPU end to end over the first whole number of cycles of T
timed steps (any T consecutive steps after step 0 hold each layer's refresh once, under either
schedule), and the longest timed step over the median of all timed steps (the stall of a refresh
step). ``--refresh-schedule spread`` (docs/algorithm.md §2.1) spreads the layers' refreshes over the
cycle; then nearly every step refreshes some layers, so the median step is of all timed steps and no
refresh overhead is reported (compare the cycle throughput and max/median with a ``cycle`` run).
The JSON lines also hold every step's seconds (``step_times_s``, warm-up steps first), the seconds
Python's garbage collector ran in each step where it ran at all (``gc_s_by_step``), and, for GORP,
the seconds of projector refreshes in each step (``refresh_s_by_step``) and
how the split-master update ran (``split_update``: compiled, eager or fell back; ``compiled_graphs``).

Beside each measured peak the memory model's prediction (``gorp_ds/planning/memory_model.py``, the same
shape, batch, stage and DeepSpeed settings; none for gorp-flat) and the ratio measured/predicted.
A configuration that ``gorp_ds.initialize`` refuses at a stage (GORP at ZeRO-3 before the stage-3
engine path exists) is reported with the refusal's message, the others are still measured, and the
script exits with status 1 at the end.

MFU counts only the FLOPs a step executes (``executed_flops_per_token``), per token, for a LLaMA of
L layers, hidden h, MLP width i, vocabulary V, sequence s, LoRA rank r on q and v, GORP rank k:
  forward      F = L·(2·(4h² + 3hi) + 2sh + 8rh) + 2Vh
               (matmuls; causal attention QKᵀ and PV at 2sh per layer, i.e. half of the dense 4sh;
               LoRA A and B on two modules 8rh)
  recompute    F − 2Vh under gradient checkpointing (every decoder layer's forward runs again)
  input grads  L·(2·(4h² + 3hi) + 4sh + 8rh) + 2Vh (every matmul's input-gradient GEMM; attention
               backward at twice its forward)
  weight grads LoRA factors 8rh per layer; gate_proj 2hi per layer when its full gradient is formed
               (lora+adamw, gorp-flat); 2k(h + i) per layer for R = δᵀ(X Q) (gorp); frozen weights 0
MFU = flops per token × tokens/s / 766 TFLOP/s (bf16 dense peak measured on an H200). Refresh steps
(G formed, 2hi per layer more) are excluded from the median and so from the MFU.

    deepspeed --num_gpus 1 bench/zero_gorp.py --out bench/results/zero_gorp_h200.md
    deepspeed --num_gpus 1 bench/zero_gorp.py --configs lora,gorp --stage 2,3 --steps 9 \
        --out bench/results/zero_gorp_stage3_h200.md                     # ZeRO-3 beside ZeRO-2
    deepspeed --num_gpus 1 bench/zero_gorp.py --configs lora,gorp --steps 20 --refresh-schedule spread \
        --out bench/results/zero_gorp_spread_h200.md                     # refreshes spread over the cycle
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 bench/zero_gorp.py --tiny    # CPU smoke run (~2 min)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 bench/zero_gorp.py --tiny --seq 64 --micro 2 --configs lora,gorp \
        --stage 2,3 --steps 3 --warmup 1 --gap 2 --out /tmp/zero_gorp/out.md   # both stages (~1 min)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gorp_ds.optim.refresh_schedule import REFRESH_SCHEDULES  # noqa: E402  (plain Python: no torch import)

PEAK_TFLOPS = 766.0  # measured bf16 GEMM ceiling on an H200 (../MEASURE anchors)


def model_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max(4096, args.seq))


def build_model(args, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if not args.tiny else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(model_config(args)).to(dtype)
    model.config.use_cache = False
    return model


def ds_config(args, stage: int) -> dict:
    """The DeepSpeed config of every configuration at ``stage``: the same launch path for stage 2 and 3,
    only ``zero_optimization`` differs (stage 3 with DeepSpeed's default bucket and persistence
    settings written out, so the memory model reads the same values)."""
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9)
    else:
        zero.update(reduce_scatter=True, allgather_bucket_size=5e8)
    config = {
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": zero, "steps_per_print": 10**9,
    }
    if not args.tiny:
        config["bf16"] = {"enabled": True}
    return config


class StageRefused(RuntimeError):
    """gorp_ds.initialize refused the ZeRO stage (ZeRO-3 before the stage-3 engine path exists)."""


def make_engine(name: str, args, device, stage: int = 2):
    import deepspeed
    from peft import LoraConfig, get_peft_model

    import gorp_ds
    from gorp_ds.models import TargetsConfig, build_param_groups
    from gorp_ds.models.loading import enable_activation_checkpointing
    from gorp_ds.optim import GORP
    from gorp_ds.optim.config import OptimizerConfig
    from gorp_ds.zero import UnsupportedSetupError

    model = build_model(args, device)
    if name != "gorp-nockpt" and not args.no_ckpt:
        enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    config = ds_config(args, stage)
    roles = TargetsConfig(), OptimizerConfig(rank=8, update_gap=args.gap, scale=0.25, lr_lora=2e-4, lr_full=1e-6,
                                             refresh_schedule=args.refresh_schedule)
    if name.startswith("gorp"):
        optimizer = GORP(build_param_groups(model, "gorp", *roles))
        optimizer.time_refreshes = True
        full_gradients = "flat" if name == "gorp-flat" else "projected"
        refresh_from = "gradient" if name == "gorp-grefresh" else "sketch"
        try:
            engine, *_ = gorp_ds.initialize(model=model, optimizer=optimizer, config=config,
                                            full_gradients=full_gradients, refresh_from=refresh_from)
        except UnsupportedSetupError as err:
            raise StageRefused(f"configuration {name} at ZeRO-{stage}: gorp_ds.initialize refused it: {err}") from None
        return engine, optimizer
    groups = build_param_groups(model, "gorp", *roles)  # LoRA + gate_proj; roles ignored by AdamW
    if name == "lora":
        for p in groups[2]["params"]:
            p.requires_grad_(False)
        groups = groups[:2]
    params = [{"params": g["params"], "lr": g["lr"]} for g in groups]
    optimizer = torch.optim.AdamW(params, fused=torch.cuda.is_available())
    config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def executed_flops_per_token(cfg, seq: int, name: str, checkpointing: bool, lora_r: int = 8, k: int = 8) -> float:
    """FLOPs one training token executes (formula in the module docstring)."""
    h, i, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    dense = 2 * (4 * h * h + 3 * h * i)
    lora = 8 * lora_r * h  # A (r×h) and B (h×r) on q and v
    head = 2 * vocab * h
    forward = layers * (dense + 2 * seq * h + lora) + head
    recompute = forward - head if checkpointing else 0
    input_grads = layers * (dense + 4 * seq * h + lora) + head
    weight_grads = layers * 8 * lora_r * h
    if name in ("lora+adamw", "gorp-flat"):
        weight_grads += layers * 2 * h * i
    elif name.startswith("gorp"):
        weight_grads += layers * 2 * k * (h + i)
    return float(forward + recompute + input_grads + weight_grads)


def predicted_memory(name: str, args, stage: int, world: int, config) -> dict:
    """The memory model's per-GPU peak for this configuration (``None`` where it has no model: gorp-flat,
    whose full-rank gradients go through DeepSpeed's flat buffers)."""
    from gorp_ds.planning.memory_model import GIB, GorpShape, ModelShape, RunShape, ZeroShape, worst_rank

    if name == "gorp-flat":
        return {"predicted_peak_gib": None}
    gorp = GorpShape(refresh_from="gradient" if name == "gorp-grefresh" else "sketch")
    if name == "lora":
        gorp = GorpShape(full_targets=(), optimizer="adamw")
    elif name == "lora+adamw":
        gorp = GorpShape(optimizer="adamw")
    run = RunShape(args.micro, args.seq, name != "gorp-nockpt" and not args.no_ckpt, "fp32" if args.tiny else "bf16")
    prediction = worst_rank(ModelShape.from_config(config), gorp, ZeroShape.from_ds_config(ds_config(args, stage), world),
                            run)
    return {"predicted_peak_gib": prediction.peak / GIB, "predicted_peak_phase": prediction.peak_phase,
            "predicted_terms_gib": {t.name: round(t.bytes / GIB, 4) for t in prediction.terms if t.numel}}


def run_config(name: str, args, device, stage: int = 2) -> dict:
    gc.collect()
    at_start = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0  # leftovers of earlier configurations
    engine, optimizer = make_engine(name, args, device, stage)
    vocab = engine.module.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    # ZeRO-3 releases partitioned parameters (numel 0 outside their module's forward): count ds_numel.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    times = []
    pauses = GcPauses()  # Python's garbage collector inside the timed steps (a full collection can take ~0.5 s)
    refresher = getattr(optimizer, "refresher", None)  # GORP: its projector refreshes, timed between syncs
    refresh_sums = [refresher.seconds()] if refresher is not None else []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    total = args.warmup + args.steps
    step_peaks = []  # peak allocated memory of each step (refresh steps hold more: G or sketches)
    for _ in range(total):
        ids = torch.randint(0, vocab, (args.micro, args.seq), device=device, generator=generator)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            step_peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        pauses.end_step()
        if refresher is not None:  # time_refreshes: host-side sums between device syncs, free to read
            refresh_sums.append(refresher.seconds())
    pauses.close()
    if torch.cuda.is_available():
        step_peaks = step_peaks[1:] + [torch.cuda.max_memory_allocated()]  # entry i: the peak of step i
    timed = times[args.warmup:]
    # Under spread nearly every step refreshes some layers: the median is then of all timed steps.
    cycle = args.refresh_schedule == "cycle"
    refresh_steps = [i for i in range(args.warmup, total) if name.startswith("gorp") and cycle and i % args.gap == 0]
    gib = 2**30
    plain = [t for i, t in zip(range(args.warmup, total), timed) if i not in refresh_steps]
    median = statistics.median(plain)
    whole = len(timed) // args.gap * args.gap  # whole cycles of T timed steps, refresh steps included
    cycle_tokens = args.micro * args.seq * whole / sum(timed[:whole]) if whole else None
    tokens = args.micro * args.seq
    checkpointing = name != "gorp-nockpt" and not args.no_ckpt
    flops = executed_flops_per_token(engine.module.config, args.seq, name, checkpointing)
    overhead = (statistics.median([times[i] for i in refresh_steps]) - median) if refresh_steps else None
    result = {
        "config": name, "zero_stage": stage, "world_size": dist.get_world_size(),
        "layers": engine.module.config.num_hidden_layers,
        "seq": args.seq, "micro_batch": args.micro, "mem_gib_at_start": at_start / gib, "params_b": n_params / 1e9, "median_step_s": median,
        "tokens_per_s_per_gpu": tokens / median, "flops_per_token": flops,
        "refresh_schedule": args.refresh_schedule if name.startswith("gorp") else None,
        "tokens_per_s_per_gpu_cycles": cycle_tokens, "cycle_steps_timed": whole,
        "max_over_median_step": max(timed) / statistics.median(timed),
        "mfu": flops * tokens / median / (PEAK_TFLOPS * 1e12),
        "peak_mem_gib": max(step_peaks[args.warmup:]) / gib if step_peaks else float("nan"),
        "peak_mem_gib_refresh_steps": (max(step_peaks[i] for i in refresh_steps) / gib
                                       if step_peaks and refresh_steps else None),
        "peak_mem_gib_other_steps": (max(p for i, p in enumerate(step_peaks) if i >= args.warmup and i not in refresh_steps)
                                     / gib if step_peaks else None),
        "timed_steps": len(plain), "refresh_steps_timed": len(refresh_steps),
        "refresh_overhead_s": overhead,
        "refresh_share_T10": overhead / (10 * median) if overhead is not None else None,
        "refresh_share_T20": overhead / (20 * median) if overhead is not None else None,
        "refresh_seconds_total": getattr(optimizer, "stats", {}).get("refresh_seconds"),
        "refreshes": getattr(optimizer, "stats", {}).get("refreshes"),
        # Where a stall is: every step's seconds (warm-up first, refresh steps at i % gap == 0 under
        # cycle), and how the split-master update ran (compiled once, recompiled, or fell back to eager).
        "step_times_s": [round(t, 4) for t in times],
        "gc_s_by_step": pauses.by_step(),
        "refresh_s_by_step": [round(b - a, 4) for a, b in zip(refresh_sums, refresh_sums[1:])] or None,
        **split_update_status(name),
        **predicted_memory(name, args, stage, dist.get_world_size(), engine.module.config),
    }
    engine.destroy()
    del engine, optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


class GcPauses:
    """Seconds Python's garbage collector ran in each step (``gc.callbacks``), by generation: a slow
    step with a generation-2 collection in it is the collector's, not the GPU's."""

    def __init__(self) -> None:
        self.steps: list[dict[int, float]] = [{}]
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation = info["generation"]
        current = self.steps[-1]
        current[generation] = current.get(generation, 0.0) + time.perf_counter() - self._began

    def end_step(self) -> None:
        self.steps.append({})

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def by_step(self) -> dict[str, dict[str, float]]:
        """``{step: {"gen<g>": seconds}}`` for the steps (warm-up included) where the collector ran ≥ 1 ms."""
        return {str(i): {f"gen{g}": round(s, 4) for g, s in sorted(step.items())}
                for i, step in enumerate(self.steps[:-1]) if sum(step.values()) >= 1e-3}


def split_update_status(name: str) -> dict:
    """How GORP's split-master update of the projected targets ran in this process: ``compiled``
    (the fused kernel), ``eager`` (never compiled: CPU, or targets too small to repay compiling) or
    ``fell back`` (compiling failed; the eager path ran, ~25 ms a step more at 7B), with the graphs
    torch.compile captured (more than one means recompiles)."""
    if not name.startswith("gorp"):
        return {}
    from gorp_ds.zero import split_master

    fn = split_master._compiled.get("fn")
    status = "eager" if fn is None else "fell back" if fn is False else "compiled"
    graphs = None
    try:
        from torch._dynamo.utils import counters

        graphs = counters["stats"].get("unique_graphs")
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    return {"split_update": status, "compiled_graphs": graphs}


def table(results: list[dict]) -> str:
    """One row per configuration and ZeRO stage; ratios to lora at the same stage; the memory model's
    predicted peak beside the measured one."""
    lines = ["| config | ZeRO | step s | tokens/s/GPU | × lora | MFU | peak GiB/GPU | predicted GiB | measured/predicted "
             "| × lora mem | refresh overhead s | % at T=10 | % at T=20 | tokens/s/GPU over cycles | max/median step |",
             "|---" * 15 + "|"]
    for r in results:
        stage = r.get("zero_stage", 2)
        if r.get("refused"):
            lines.append(f"| {r['config']} | {stage} | refused: {r['refused']} |" + " |" * 12)
            continue
        same = [b for b in results if b.get("zero_stage", 2) == stage and not b.get("refused")]
        base = next((b for b in same if b["config"] == "lora"), same[0])
        none = r["refresh_overhead_s"] is None
        overhead = "–" if none else f"{r['refresh_overhead_s']:.3f}"
        t10 = "–" if none else f"{100 * r['refresh_share_T10']:.1f}"
        t20 = "–" if none else f"{100 * r['refresh_share_T20']:.1f}"
        measured = r["peak_mem_gib"]
        memory = measured / base["peak_mem_gib"] if base["peak_mem_gib"] == base["peak_mem_gib"] else float("nan")
        predicted = r.get("predicted_peak_gib")
        pred = "–" if predicted is None else f"{predicted:.1f}"
        ratio = "–" if predicted is None or measured != measured else f"{measured / predicted:.3f}"
        cycles = r.get("tokens_per_s_per_gpu_cycles")
        cycles = "–" if cycles is None else f"{cycles:,.0f}"
        lines.append(f"| {r['config']} | {stage} | {r['median_step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f} | {100 * r['mfu']:.1f}% | "
                     f"{measured:.1f} | {pred} | {ratio} | {memory:.2f} | {overhead} | {t10} | {t20} | {cycles} | "
                     f"{r['max_over_median_step']:.2f} |")
    return "\n".join(lines)


FORMULA = """MFU counts executed FLOPs only (per token; L layers, hidden h, MLP width i, vocabulary V, sequence s,
LoRA rank r on q and v, GORP rank k): forward F = L·(2·(4h² + 3hi) + 2sh + 8rh) + 2Vh (causal attention
2sh per layer), the recomputed forward F − 2Vh under gradient checkpointing, input gradients
L·(2·(4h² + 3hi) + 4sh + 8rh) + 2Vh, weight gradients 8rh per layer for LoRA plus 2hi per layer for
gate_proj where its full gradient is formed (lora+adamw, gorp-flat) or 2k(h + i) per layer for
R = δᵀ(X Q) (gorp); frozen weights none. Against 766 TFLOP/s. The refresh overhead is the median time of
timed refresh steps minus the median step; its share of training is overhead / (T · median step).
Tokens/s over cycles: the first whole number of cycles of T timed steps, refresh steps included;
max/median step: the longest timed step over the median of all timed steps."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--gap", type=int, default=10, help="GORP refresh gap T")
    parser.add_argument("--refresh-schedule", default="cycle", choices=REFRESH_SCHEDULES,
                        help="GORP's refresh_schedule (docs/algorithm.md §2.1): cycle or spread")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default="lora,lora+adamw,gorp-flat,gorp,gorp-grefresh")
    parser.add_argument("--stage", default="2", help="ZeRO stages to run every configuration at: 2, 3 or 2,3")
    parser.add_argument("--no-ckpt", action="store_true", help="no gradient checkpointing in any configuration")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model for a CPU smoke run")
    parser.add_argument("--out", default=None, help="write the markdown table here (rank 0)")
    parser.add_argument("--in-process", action="store_true",
                        help="run all configurations in this process (peaks then include what earlier ones left)")
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)  # child process: write the result here
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    try:
        stages = [int(v) for v in args.stage.split(",")]
    except ValueError:
        stages = []
    if not stages or any(v not in (2, 3) for v in stages):
        print(f"gorp_ds: error: --stage {args.stage!r}: use 2, 3 or 2,3", file=sys.stderr)
        raise SystemExit(2)
    runs = [(name, stage) for stage in stages for name in args.configs.split(",")]
    if not args.in_process and args.result_file is None:
        run_isolated(args, runs)
        return
    import deepspeed

    deepspeed.init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    results = []
    for name, stage in runs:
        try:
            result = run_config(name, args, device, stage)
        except StageRefused as err:
            if args.result_file is not None:  # child: the parent records the refusal and goes on
                if dist.get_rank() == 0:
                    Path(args.result_file).write_text(json.dumps({"config": name, "zero_stage": stage,
                                                                  "refused": str(err)}))
                raise SystemExit(REFUSED) from None
            result = {"config": name, "zero_stage": stage, "refused": str(err)}
        results.append(result)
        if args.result_file is not None:
            if dist.get_rank() == 0:
                Path(args.result_file).write_text(json.dumps(result))
            continue
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
            if args.out:  # incrementally: a later crash keeps the configurations measured so far
                write_results(args, results)
    if dist.get_rank() == 0 and args.result_file is None:
        print(table(results))
        report_refusals(results)


REFUSED = 3  # a child's exit status when gorp_ds.initialize refused its ZeRO stage


def report_refusals(results: list[dict]) -> None:
    refused = [r for r in results if r.get("refused")]
    if refused:
        for r in refused:
            print(f"zero_gorp: error: {r['refused']}", file=sys.stderr)
        raise SystemExit(f"zero_gorp: {len(refused)} configuration(s) refused; the others were measured")


def run_isolated(args, runs: list[tuple[str, int]]) -> None:
    """Each configuration in a child process of its own (this process, one per rank under the
    launcher, never initialises torch.distributed: child ``i`` of every rank meets on
    ``MASTER_PORT + 1 + i``, so consecutive children never share a rendezvous)."""
    rank = int(os.environ.get("RANK", "0"))
    base_port = int(os.environ.get("MASTER_PORT", "29500"))
    passed = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    results = []
    with tempfile.TemporaryDirectory(prefix="zero_gorp_") as tmp:
        for index, (name, stage) in enumerate(runs):
            result_file = Path(tmp) / f"{index}.json"
            env = dict(os.environ, MASTER_PORT=str(base_port + 1 + index))
            command = [sys.executable, str(Path(__file__).resolve()), *passed, "--configs", name, "--stage", str(stage),
                       "--result-file", str(result_file), f"--local_rank={args.local_rank}"]
            done = subprocess.run(command, env=env)
            if done.returncode not in (0, REFUSED):
                raise SystemExit(f"zero_gorp: configuration {name} at ZeRO-{stage} failed (exit status {done.returncode})")
            if rank != 0:
                continue
            results.append(json.loads(result_file.read_text()))
            print(json.dumps(results[-1]), flush=True)
            if args.out:  # incrementally: a later crash keeps the configurations measured so far
                write_results(args, results, world=int(os.environ.get("WORLD_SIZE", "1")))
    if rank == 0:
        print(table(results))
        report_refusals(results)


def write_results(args, results: list[dict], world: int | None = None) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size() if world is None else world
    ckpt = "no gradient checkpointing" if args.no_ckpt else "gradient checkpointing (except gorp-nockpt)"
    measured = [r for r in results if not r.get("refused")]
    layers = measured[0]["layers"] if measured else args.layers
    stages = ", ".join(sorted({f"ZeRO-{r.get('zero_stage', 2)}" for r in results}))
    header = (f"# GORP under {stages} vs LoRA-only — {gpu} × {world}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}\n\n{'Tiny model' if args.tiny else 'LLaMA-2-7B shape'} "
              f"({layers} layers, random init), {'fp32' if args.tiny else 'bf16'}, seq {args.seq}, "
              f"micro-batch {args.micro}/GPU, {ckpt}, GORP k=8, T={args.gap}, refresh schedule {args.refresh_schedule}, "
              f"{'all configurations in one process' if args.in_process else 'each configuration in a fresh process'}; median of the timed steps "
              f"without a refresh ({args.steps} timed after {args.warmup} warm-up). Predicted: the memory model "
              f"(gorp_ds/planning/memory_model.py) for the same shape, stage and DeepSpeed settings.\n\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + table(results) + "\n\n" + FORMULA + "\n")
    Path(args.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
