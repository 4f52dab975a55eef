"""Fused kernels (``--kernels liger``) against the eager model: gradients, loss, throughput, memory.

What ``--kernels`` changes (gorp_ds/models/kernels.py): Liger's RMSNorm, SwiGLU and RoPE patched
into the model and its fused linear cross-entropy for the answer loss. This script runs one
forward+backward of the session's loss (the decoder, the answer positions, the LM head and the
mean cross-entropy: gorp_ds/cl/session.py) on the same batch with three copies of one randomly
initialised model, each built and patched by the project's own code:

  ref      fp32, eager modules       (the reference)
  eager    bf16, eager modules       (what a run computes today)
  kernels  bf16, --kernels liger     (with --smoke: eager again, to test the plumbing)

in two modes: ``lora`` (PEFT LoRA on the run's default targets, the factors set to seeded random
values so both A and B have gradients) and ``full`` (every tensor trains: the norms' and the tied
embedding/LM head's gradients go through the fused kernels too). Gradient checkpointing is on, as
in a run.

The criterion. bf16 keeps 8 significant bits: each rounding has relative error at most u = 2^-8
(≈ 3.9e-3); through 30 layers the eager bf16 model's gradients differ from fp32 by a measured
amount e_eager (relative, Frobenius norm) per tensor. Liger's kernels do the same arithmetic,
keeping fp32 inside each fused op and rounding to bf16 once, so their error against fp32, e_kernels,
should be of the same size. A tensor passes when ``e_kernels <= k * e_eager + u`` (k =
``--factor``, default 2: a different order of the same roundings may double an error, not more;
the floor u covers a tensor whose eager error happens to be tiny, one bf16 rounding of the
gradient itself); the loss likewise with its absolute errors and the floor u·|loss|. The direct
difference kernels vs eager is reported too.

Throughput: tokens per second of forward+backward (no optimizer step: the kernels do not touch
it) and the peak memory above the resident model, eager and kernels alternating ``--rounds``
times, the median step time of each. Results go to ``<out>/kernel_check.json`` and
``<out>/kernel_check.md``, rewritten after each measurement (a timeout keeps what was measured).
Needs torch, transformers, peft, liger_kernel (the wheel) and the project; no deepspeed, no data.

    python bench/kernel_check.py --out $OUT                # one GPU: the 135M shape, < 3 minutes
    python bench/kernel_check.py --smoke --out /tmp/kc     # CPU: a tiny model, eager vs eager
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gorp_ds.models.kernels import answer_loss_for, apply_kernels  # noqa: E402
from gorp_ds.models.loading import enable_activation_checkpointing  # noqa: E402
from gorp_ds.models.lora import LoraSettings, add_lora  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0},
    "smoke": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 72, "vocab_size": 300, "tie_word_embeddings": True, "rope_theta": 10000.0},
}
U = 2.0 ** -8  # bf16 unit roundoff
MODES = ("lora", "full")
# transformers' LLaMA module globals Liger's patch replaces (RoPE is a module-level function):
# swapped around each model's calls so that the eager models run the eager code in this process.
PATCHED_GLOBALS = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for kernel_check.json and kernel_check.md")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="135m")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: lora, full")
    parser.add_argument("--batch", type=int, default=4, help="rows of the gradient check's batch")
    parser.add_argument("--seq", type=int, default=256, help="longest row (tokens); rows are 1/2 to all of it")
    parser.add_argument("--answer-tokens", type=int, default=16, help="answer tokens per row (the loss's positions)")
    parser.add_argument("--factor", type=float, default=2.0, help="k: kernels' error vs fp32 <= k x eager's + u")
    parser.add_argument("--tp-batch", type=int, default=16, help="throughput: rows per step (all --tp-seq long)")
    parser.add_argument("--tp-seq", type=int, default=512, help="throughput: tokens per row")
    parser.add_argument("--steps", type=int, default=10, help="throughput: timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: rounds (eager and kernels alternate)")
    parser.add_argument("--warmup", type=int, default=3, help="throughput: untimed steps of each first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: the smoke shape, eager vs eager, "
                        "a few short rows and steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.batch, args.seq, args.answer_tokens = "smoke", 3, 24, 4
        args.tp_batch, args.tp_seq, args.steps, args.rounds, args.warmup = 2, 16, 2, 1, 1
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in MODES for m in args.mode_list):
        parser.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    if min(args.batch, args.seq, args.answer_tokens, args.tp_batch, args.tp_seq, args.steps, args.rounds) < 1:
        parser.error("sizes, --steps and --rounds must be >= 1")
    if args.answer_tokens >= args.seq // 2 or args.answer_tokens >= args.tp_seq:
        parser.error("--answer-tokens must be below half of --seq and below --tp-seq")
    args.device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the kernels need a CUDA device; pass --smoke for the CPU plumbing check")
    args.kernels = "eager" if args.smoke else "liger"
    return args


class Report:
    """The JSON and the markdown table, rewritten after each measurement."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out, self.data = out, {**header, "numerics": {}, "throughput": {}, "passed": None}
        out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        (self.out / "kernel_check.json").write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        (self.out / "kernel_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        d = self.data
        lines = [f"# Kernel check: {d['kernels']} vs eager ({d['shape']}, {d['device_name']})", "",
                 f"torch {d['torch']}, transformers {d['transformers']}, liger_kernel {d['liger_kernel']}; "
                 f"criterion per tensor: e_kernels <= {d['factor']:g} x e_eager + 2^-8 (errors relative to fp32).", ""]
        for mode, n in d["numerics"].items():
            lines += [f"## Gradients, {mode} ({n['tensors']} tensors): {'PASS' if n['passed'] else 'FAIL'}", "",
                      "| | fp32 ref | bf16 eager | bf16 kernels |", "| --- | --- | --- | --- |",
                      f"| loss | {n['loss']['ref']:.6f} | {n['loss']['eager']:.6f} | {n['loss']['kernels']:.6f} |", "",
                      "| gradient error vs fp32 | median | max |", "| --- | --- | --- |",
                      f"| eager | {n['eager_error']['median']:.3e} | {n['eager_error']['max']:.3e} |",
                      f"| kernels | {n['kernels_error']['median']:.3e} | {n['kernels_error']['max']:.3e} |",
                      f"| kernels vs eager (direct) | {n['direct']['median']:.3e} | {n['direct']['max']:.3e} |", "",
                      f"Worst ratio e_kernels / e_eager: {n['worst']['ratio']:.2f} ({n['worst']['name']}); "
                      f"failing tensors: {len(n['failing'])}; MLP's own Linear submodules called: "
                      f"{n['mlp_submodules_called']}; patched modules: {n['patched_modules']}; fused loss: {n['fused_loss']}; "
                      f"attention (eager, kernels): {n['attention']['eager']}, {n['attention']['kernels']}.", ""]
        if d["throughput"]:
            lines += ["## Throughput (forward+backward, bf16, gradient checkpointing)", "",
                      "| mode | kernels | tokens/s | step ms (median) | peak memory above model (MiB) |",
                      "| --- | --- | --- | --- | --- |"]
            for mode, by_kind in d["throughput"].items():
                for kind, t in by_kind.items():
                    lines.append(f"| {mode} | {kind} | {t['tokens_per_s']:.0f} | {1000 * t['step_s']:.1f} | "
                                 f"{'-' if t['peak_mib'] is None else format(t['peak_mib'], '.0f')} |")
            lines.append("")
        for where, text in d.get("errors", {}).items():
            lines += [f"Error in {where}:", "", "```", text.rstrip(), "```", ""]
        lines.append(f"Overall: {'PASS' if d['passed'] else 'FAIL' if d['passed'] is False else 'incomplete'}")
        return "\n".join(lines) + "\n"


def llama_globals() -> dict[str, Any]:
    from transformers.models.llama import modeling_llama

    return {name: getattr(modeling_llama, name) for name in PATCHED_GLOBALS}


@contextlib.contextmanager
def using(saved: dict[str, Any]):
    """transformers' LLaMA module globals set to ``saved`` (one model's) for the calls inside."""
    from transformers.models.llama import modeling_llama

    before = llama_globals()
    for name, value in saved.items():
        setattr(modeling_llama, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(modeling_llama, name, value)


def base_model(shape: str, seed: int) -> torch.nn.Module:
    """The shape's LLaMA in fp32 on the CPU, seeded (transformers' own initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build(base: torch.nn.Module, dtype: torch.dtype, kernels: str, mode: str, device: str, seed: int):
    """A copy of ``base`` as the session builds it: kernels (the loader's call), then LoRA (the
    factors set to seeded values, equal in every copy) or every tensor trainable; checkpointing on.
    Returns the model, its loss and transformers' module globals as the model needs them."""
    eager = llama_globals()
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    model.config.use_cache = False
    apply_kernels(model, kernels, dtype)
    own = llama_globals()
    for name, value in eager.items():  # the next eager copy is built and run with the eager code
        setattr(sys.modules["transformers.models.llama.modeling_llama"], name, value)
    enable_activation_checkpointing(model)  # the loader's order: kernels, checkpointing, then LoRA
    if mode == "lora":
        model = add_lora(model, LoraSettings())
        generator = torch.Generator().manual_seed(seed + 1)
        for _, param in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
            param.data.copy_(0.02 * torch.randn(param.shape, generator=generator))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model, answer_loss_for(core, core.get_output_embeddings()), own


def make_batch(rows: int, seq: int, answers: int, vocab: int, seed: int, device: str, ragged: bool) -> dict[str, torch.Tensor]:
    """Random ids, right-padded rows (as collate_training pads) of 1/2 to all of ``seq`` tokens
    when ``ragged``; the last ``answers`` tokens of each row are its answer: position p predicts p+1."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(seq // 2, seq + 1, (rows,), generator=generator) if ragged
               else torch.full((rows,), seq))
    ids = torch.randint(3, vocab, (rows, seq), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    positions = torch.tensor([[r, c] for r in range(rows) for c in range(int(lengths[r]) - 1 - answers, int(lengths[r]) - 1)])
    targets = ids[positions[:, 0], positions[:, 1] + 1]
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "answer_positions": positions,
                                          "answer_targets": targets}.items()}


def session_loss(model: torch.nn.Module, loss_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """gorp_ds/cl/session.py's ``_loss`` (without a method's penalty)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows, cols = batch["answer_positions"].unbind(1)
    return loss_fn(core.get_output_embeddings(), hidden[rows, cols], batch["answer_targets"])


def gradients(model, loss_fn, own, batch) -> tuple[float, dict[str, torch.Tensor]]:
    with using(own):
        loss = session_loss(model, loss_fn, batch)
        loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def mlp_calls(model, loss_fn, own, batch) -> bool:
    """Every layer's MLP calls its own gate/up/down Linear submodules (LoRA or projected wrappers
    included) once per forward: Liger's SwiGLU forward must not bypass them."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts: dict[str, int] = {}
    hooks = []
    for index, layer in enumerate(core.model.layers):
        for part in ("gate_proj", "up_proj", "down_proj"):
            key = f"{index}.{part}"
            hooks.append(getattr(layer.mlp, part).register_forward_hook(
                lambda *_, key=key: counts.__setitem__(key, counts.get(key, 0) + 1)))
    with torch.no_grad(), using(own):
        session_loss(model, loss_fn, batch)
    for hook in hooks:
        hook.remove()
    return len(counts) == 3 * len(core.model.layers) and set(counts.values()) == {1}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    scale = float(b.norm())
    return float((a - b).norm()) / scale if scale > 0 else float((a - b).norm() > 0) * math.inf


def check_numerics(args, base, mode: str) -> dict[str, Any]:
    batch = make_batch(args.batch, args.seq, args.answer_tokens, SHAPES[args.shape]["vocab_size"], args.seed + 2,
                       args.device, ragged=True)
    results: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
    attention: dict[str, str | None] = {}
    patched = 0
    for label, dtype, kernels in (("ref", torch.float32, "eager"), ("eager", torch.bfloat16, "eager"),
                                  ("kernels", torch.bfloat16, args.kernels)):
        model, loss_fn, own = build(base, dtype, kernels, mode, args.device, args.seed)
        results[label] = gradients(model, loss_fn, own, batch)
        attention[label] = getattr(model.config, "_attn_implementation", None)
        if label == "kernels":
            called = mlp_calls(model, loss_fn, own, batch)
            patched = sum("forward" in m.__dict__ for m in model.modules())
            fused = loss_fn.fused
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    (loss_ref, ref), (loss_eager, eager), (loss_kernels, kern) = results["ref"], results["eager"], results["kernels"]
    rows = []
    for name, g_ref in ref.items():
        e_eager, e_kernels = relative(eager[name], g_ref), relative(kern[name], g_ref)
        rows.append({"name": name, "eager": e_eager, "kernels": e_kernels, "direct": relative(kern[name], eager[name]),
                     "passed": e_kernels <= args.factor * e_eager + U})
    loss_passed = abs(loss_kernels - loss_ref) <= args.factor * abs(loss_eager - loss_ref) + U * abs(loss_ref)
    worst = max(rows, key=lambda r: r["kernels"] / max(r["eager"], 1e-30))

    def spread(key: str) -> dict[str, float]:
        values = [r[key] for r in rows]
        return {"median": statistics.median(values), "max": max(values)}

    missing = sorted(set(ref) ^ set(kern))
    return {"tensors": len(rows), "loss": {"ref": loss_ref, "eager": loss_eager, "kernels": loss_kernels,
                                           "passed": loss_passed},
            "eager_error": spread("eager"), "kernels_error": spread("kernels"), "direct": spread("direct"),
            "worst": {"name": worst["name"], "ratio": worst["kernels"] / max(worst["eager"], 1e-30)},
            "failing": [r for r in rows if not r["passed"]], "missing_gradients": missing,
            "mlp_submodules_called": called, "patched_modules": patched, "fused_loss": fused,
            "attention": attention,
            "per_tensor": rows,
            "passed": loss_passed and not missing and called and all(r["passed"] for r in rows)
            and (args.kernels == "eager" or (patched > 0 and fused))}


def measure_throughput(args, base, mode: str, report: Report) -> None:
    batch = make_batch(args.tp_batch, args.tp_seq, args.answer_tokens, SHAPES[args.shape]["vocab_size"], args.seed + 3,
                       args.device, ragged=False)
    tokens = args.tp_batch * args.tp_seq
    models = {kind: build(base, torch.bfloat16, kernels, mode, args.device, args.seed)
              for kind, kernels in (("eager", "eager"), ("kernels", args.kernels))}
    times: dict[str, list[float]] = {kind: [] for kind in models}
    peaks: dict[str, float] = {}
    cuda = args.device == "cuda"

    def step(kind: str) -> None:
        model, loss_fn, own = models[kind]
        with using(own):
            session_loss(model, loss_fn, batch).backward()
        model.zero_grad(set_to_none=True)

    for kind in models:
        for _ in range(args.warmup):
            step(kind)
    for _ in range(args.rounds):
        for kind in models:
            if cuda:
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(kind)
            if cuda:
                torch.cuda.synchronize()
                peaks[kind] = max(peaks.get(kind, 0.0), (torch.cuda.max_memory_allocated() - resident) / 2**20)
            times[kind].append((time.perf_counter() - start) / args.steps)
    report.data["throughput"][mode] = {
        kind: {"step_s": statistics.median(times[kind]), "tokens_per_s": tokens / statistics.median(times[kind]),
               "peak_mib": peaks.get(kind), "rounds_s": times[kind]} for kind in models}
    report.write()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import peft
    import transformers

    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:
        liger = "not installed"
    report = Report(Path(args.out), {
        "shape": args.shape, "kernels": args.kernels, "factor": args.factor, "unit_roundoff": U,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "liger_kernel": liger, "batch": [args.batch, args.seq, args.answer_tokens],
        "throughput_batch": [args.tp_batch, args.tp_seq]})
    report.write()
    base = base_model(args.shape, args.seed)
    errors = report.data["errors"] = {}
    for mode in args.mode_list:
        try:
            report.data["numerics"][mode] = check_numerics(args, base, mode)
        except Exception as err:  # recorded, and the other measurements still run
            errors[f"numerics {mode}"] = traceback.format_exc()
            print(f"[kernel_check] {mode}: ERROR {type(err).__name__}: {err}", flush=True)
            continue
        report.write()
        print(f"[kernel_check] {mode}: {'PASS' if report.data['numerics'][mode]['passed'] else 'FAIL'}", flush=True)
    for mode in args.mode_list:
        try:
            measure_throughput(args, base, mode, report)
        except Exception as err:
            errors[f"throughput {mode}"] = traceback.format_exc()
            print(f"[kernel_check] throughput {mode}: ERROR {type(err).__name__}: {err}", flush=True)
            continue
        print(f"[kernel_check] throughput {mode}: " + ", ".join(
            f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in report.data["throughput"][mode].items()), flush=True)
    report.data["passed"] = not errors and all(n["passed"] for n in report.data["numerics"].values())
    report.write()
    print(report.markdown(), end="", flush=True)
    return 0 if report.data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
