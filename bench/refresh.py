"""Benchmark of batched projector refreshes and of host-device syncs in the GORP step, at the
LLaMA-2-7B shape.

Part 1, refresh of all 32 ``gate_proj`` projectors (11008×4096 fp32 gradients, k = 8, the
optimizer's settings: randomized, oversample 8, 2 power iterations, aligned to the previous
projector), median of ``--reps`` timed runs after ``--warmup``, ``torch.cuda.synchronize()``
around each run:

- ``batched``: one :func:`gorp_ds.optim.update.refresh_projectors` call on the ``(32, m, n)`` stack
  (what the optimizer does);
- ``loop``: the same function on one matrix at a time (``B = 1``), 32 calls;
- ``legacy``: the per-matrix code before batching (Householder QR, SVD of the ``l × c`` sketch,
  ``bool(isfinite)`` host checks, a device sync around each matrix as its refresh timer did),
  32 calls: the baseline.

It also checks that ``batched`` and ``loop`` agree (max |ΔQ|) and, on member 0, the fraction of the
exact top-k energy they capture (one full SVD, ~1 s on a GPU).

Part 2, syncs per optimizer step on a 7B-shape GORP param set (LoRA r = 8 on q_proj and v_proj of
32 layers: 128 factors; the 32 gate_proj with role ``full``; one process, ``LocalDriver``), with S
in use (a first task, then ``end_task``): ``torch.cuda.set_sync_debug_mode("warn")`` counts the
synchronisations of the first step of the task (first refresh: reads one success flag per batch;
torch's eigh/svd check their errors), of a non-refresh step (expected: 0) and of a later refresh
step; the non-refresh step is also timed.

Part 3, projection off S with members of different S widths: S zero-padded to the widest (what
the optimizer does) against one call per width (stacks grouped by width), on the lora_A stack.

Output: one JSON line per measurement on stdout and appended to ``--out/refresh.jsonl`` as it
goes, and a markdown table in ``--out/refresh.md`` (rewritten after every measurement).

On an H200, from the repository root (about 2 minutes; ~40 GiB of GPU memory):

    python bench/refresh.py --out bench/results/refresh_h200

CPU smoke test with tiny shapes (seconds): ``python bench/refresh.py --tiny --out /tmp/refresh``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from gorp_ds.optim import GORP  # noqa: E402
from gorp_ds.optim.projector import compute_projectors, projection_side, projector_seed  # noqa: E402
from gorp_ds.optim.shared_space import project_off, stack_bases  # noqa: E402
from gorp_ds.optim.update import UpdateConfig, refresh_projectors  # noqa: E402

SHAPES = {  # (gate_proj shape, layers, hidden, batch of gate_proj)
    "7b": ((11008, 4096), 32, 4096, 32),
    "tiny": ((344, 128), 2, 128, 4),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - began))
    return times


# ----------------------------------------------------------------------------- the baseline


def legacy_projector(grad: Tensor, k: int, seed: int, oversample: int, power_iters: int) -> Tensor | None:
    """The per-matrix refresh as it was before batching (for comparison only)."""
    if not bool(torch.isfinite(grad).all()):
        return None
    a = grad.mT if projection_side(grad.shape) == "right" else grad
    d, c = a.shape
    sketch = min(k + oversample, d, c)
    generator = torch.Generator(device=a.device)
    generator.manual_seed(seed)
    omega = torch.randn(c, sketch, generator=generator, device=a.device, dtype=a.dtype)
    basis, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        back, _ = torch.linalg.qr(a.mT @ basis)
        basis, _ = torch.linalg.qr(a @ back)
    u_small, _, _ = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    basis = basis @ u_small[:, :k]
    if not bool(torch.isfinite(basis).all()):
        return None
    return basis.contiguous()


def legacy_refresh(grads: Tensor, previous: Tensor, cfg: UpdateConfig, seeds: list[int]) -> list[Tensor]:
    out = []
    for i in range(grads.shape[0]):
        sync(grads.device)  # the refresh timer synchronised before and after each matrix
        new = legacy_projector(grads[i], cfg.rank, seeds[i], cfg.oversample, cfg.power_iters)
        if new is None:
            new = previous[i]
        else:
            u, _, vh = torch.linalg.svd(new.mT @ previous[i])
            new = new @ (u @ vh)
        sync(grads.device)
        out.append(new)
    return out


# ----------------------------------------------------------------------------- output


class Report:
    def __init__(self, out: Path, common: dict) -> None:
        self.out, self.common, self.rows = out, common, []
        out.mkdir(parents=True, exist_ok=True)
        (out / "refresh.jsonl").write_text("")

    def emit(self, **record: object) -> None:
        record = {**self.common, **record}
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.out / "refresh.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        self.rows.append(record)
        self.write_table()

    def write_table(self) -> None:
        lines = [f"# Batched projector refresh and step syncs ({self.common['mode']} shapes)", "",
                 f"- device: {self.common['device']}", f"- torch: {self.common['torch']}",
                 f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
                 f"- command: `{' '.join(sys.argv)}`", "",
                 "| measurement | what | median ms | min ms | syncs | notes |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            notes = r.get("notes", "")
            lines.append(f"| {r['name']} | {r['what']} | {r.get('median_ms', '')} | {r.get('min_ms', '')} | "
                         f"{r.get('syncs', '')} | {notes} |")
        (self.out / "refresh.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def stats(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "reps": len(times)}


# ----------------------------------------------------------------------------- part 1


def bench_refresh(report: Report, device: torch.device, mode: str, warmup: int, reps: int, skip_legacy: bool) -> None:
    (m, n), _, _, batch = SHAPES[mode]
    cfg = UpdateConfig(role="full", lr=1e-6, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, rank=8,
                       update_gap=10, projector="randomized", oversample=8, power_iters=2)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    # Gradient-like stack: a decaying rank-64 signal plus noise per member, built in place to keep
    # peak memory at one stack.
    grads = torch.randn(batch, m, n, generator=gen, device=device).mul_(0.05)
    r0 = 64
    for i in range(batch):
        u = torch.randn(m, r0, generator=gen, device=device)
        v = torch.randn(n, r0, generator=gen, device=device)
        s = 0.9 ** torch.arange(r0, device=device, dtype=torch.float32)
        grads[i].addmm_(u * s, v.mT, alpha=1.0 / (m * n) ** 0.25)
    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(batch)]
    seeds = [projector_seed(name, 1, 3) for name in names]
    previous, ok = compute_projectors(grads, cfg.rank, seeds=[projector_seed(nm, 1, 2) for nm in names])
    assert bool(ok.all())
    note = f"B={batch}, {m}×{n} fp32, k={cfg.rank}, oversample 8, 2 power iterations, aligned"

    t = timed(lambda: refresh_projectors(grads, previous, cfg, seeds), device, warmup, reps)
    report.emit(name="refresh_batched", what=f"all {batch} gate_proj in one batched call", **stats(t), notes=note)
    t = timed(lambda: [refresh_projectors(grads[i : i + 1], previous[i : i + 1], cfg, seeds[i : i + 1])
                       for i in range(batch)], device, warmup, reps)
    report.emit(name="refresh_loop", what=f"{batch} calls of the same function, B=1", **stats(t), notes=note)
    if not skip_legacy:
        t = timed(lambda: legacy_refresh(grads, previous, cfg, seeds), device, warmup, reps)
        report.emit(name="refresh_legacy", what=f"{batch} calls of the pre-batching per-matrix code", **stats(t),
                    notes=note + "; host isfinite checks and a sync around each matrix")

    batched, _ = refresh_projectors(grads, previous, cfg, seeds)
    looped = torch.cat([refresh_projectors(grads[i : i + 1], previous[i : i + 1], cfg, seeds[i : i + 1])[0]
                        for i in range(batch)])
    diff = float((batched - looped).abs().max())
    exact = torch.linalg.svd(grads[0].double(), full_matrices=False)
    top = exact.S[: cfg.rank].square().sum()
    energy = float((grads[0].double() @ batched[0].double()).square().sum() / top)
    report.emit(name="refresh_check", what="batched vs loop projectors; energy vs exact top-k (member 0)",
                max_abs_diff=diff, energy_frac=round(energy, 6),
                notes=f"max |Q_batched − Q_loop| = {diff:.2e}; captured energy {energy:.5f} of the exact top-{cfg.rank}")


# ----------------------------------------------------------------------------- part 2


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronisations ``fn`` causes (CUDA sync debug mode); ``None`` on a CPU (nothing to sync)."""
    if device.type != "cuda":
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_step_syncs(report: Report, device: torch.device, mode: str, warmup: int, reps: int) -> None:
    (m, n), layers, hidden, _ = SHAPES[mode]
    gap = 10  # steps 2..gap-1 of task 2 time the non-refresh step
    params: dict[str, torch.nn.Parameter] = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            params[f"model.layers.{layer}.self_attn.{proj}.lora_A"] = torch.nn.Parameter(
                torch.randn(8, hidden, device=device) * 0.01)
            params[f"model.layers.{layer}.self_attn.{proj}.lora_B"] = torch.nn.Parameter(
                torch.zeros(hidden, 8, device=device))
        params[f"model.layers.{layer}.mlp.gate_proj"] = torch.nn.Parameter(torch.randn(m, n, device=device) * 0.01)

    def group(suffix: str, role: str, **extra) -> dict:
        names = [k for k in params if k.endswith(suffix)]
        return {"params": [params[k] for k in names], "names": names, "role": role, **extra}

    opt = GORP([group("lora_A", "lora_a", lr=2e-4), group("lora_B", "lora_b", lr=2e-4),
                group("gate_proj", "full", lr=1e-6, rank=8, update_gap=gap, scale=0.25)])
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    grads = {k: torch.randn(p.shape, generator=gen, device=device) for k, p in params.items()}

    def step() -> None:
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()

    for _ in range(gap + 1):  # task 1
        step()
    sizes = opt.end_task()
    note = (f"{len(params)} tensors ({4 * layers} LoRA factors, {layers} gate_proj {m}×{n} full), S in use "
            f"(mean {sum(sizes.values()) / len(sizes):.1f} columns), LocalDriver")
    sync(device)
    report.emit(name="syncs_first_refresh", what="step 0 of task 2 (first refresh)", syncs=count_syncs(step, device),
                notes=note + "; one success-flag read per batch plus eigh/svd error checks")
    report.emit(name="syncs_non_refresh", what="step 1 of task 2 (no refresh)", syncs=count_syncs(step, device),
                notes=note + "; expected 0")
    t = timed(step, device, 0, min(reps, gap - 2))  # steps 2.. stay before the next refresh
    report.emit(name="step_non_refresh", what="one optimizer step without refresh", **stats(t), notes=note)
    while int(opt.state[next(k for k in params if k.endswith("gate_proj"))]["step"]) % gap != 0:
        step()
    report.emit(name="syncs_later_refresh", what=f"step {gap} of task 2 (refresh)", syncs=count_syncs(step, device),
                notes=note + "; eigh/svd error checks only")


# ----------------------------------------------------------------------------- part 3


def bench_shared_padding(report: Report, device: torch.device, mode: str, warmup: int, reps: int) -> None:
    """Projection off S of a lora_A stack whose members' S widths differ: one call on S zero-padded
    to the widest member (what the optimizer does) against one call per distinct width on stacks
    pre-grouped by width (the best case for grouping: no gather counted)."""
    _, layers, hidden, _ = SHAPES[mode]
    batch, max_width = 2 * layers, hidden // 32
    gen = torch.Generator(device=device)
    gen.manual_seed(2)
    x = torch.randn(batch, 8, hidden, generator=gen, device=device)  # lora_A gradients, S on the input side
    widths = torch.randint(1, max_width + 1, (batch,), generator=gen, device=device).tolist()
    bases = [torch.linalg.qr(torch.randn(hidden, w, generator=gen, device=device))[0] for w in widths]
    padded = stack_bases(bases)
    groups = {}
    for i, w in enumerate(widths):
        groups.setdefault(w, []).append(i)
    grouped = [(x[idx].clone(), torch.stack([bases[i] for i in idx])) for idx in groups.values()]
    note = f"{batch} lora_A 8×{hidden}, S widths 1..{max_width} ({len(groups)} distinct)"
    t = timed(lambda: project_off(x, padded, "input"), device, warmup, reps)
    report.emit(name="shared_padded", what="X − (X S) Sᵀ, S zero-padded, one batched call", **stats(t), notes=note)
    t = timed(lambda: [project_off(xs, ss, "input") for xs, ss in grouped], device, warmup, reps)
    report.emit(name="shared_grouped", what="X − (X S) Sᵀ, one call per S width", **stats(t), notes=note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for refresh.jsonl and refresh.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--skip-legacy", action="store_true", help="do not time the pre-batching baseline")
    parser.add_argument("--part", choices=["all", "refresh", "syncs", "shared"], default="all")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "tiny" if args.tiny else "7b"
    if device.type != "cuda":
        print("WARNING: running on the CPU: these are not GPU numbers, and syncs cannot be counted.", file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = Report(Path(args.out), {"device": name, "torch": torch.__version__, "mode": mode})
    with torch.no_grad():
        if args.part in ("all", "refresh"):
            bench_refresh(report, device, mode, args.warmup, args.reps, args.skip_legacy)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the 5.8 GB gradient stack went out of scope
        if args.part in ("all", "syncs"):
            bench_step_syncs(report, device, mode, args.warmup, args.reps)
        if args.part in ("all", "shared"):
            bench_shared_padding(report, device, mode, args.warmup, args.reps)
    print("\n" + (Path(args.out) / "refresh.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
