"""Benchmark of the GORP projector refresh: randomized range finder vs exact SVD vs torch.svd_lowrank.

What it measures, for the LLaMA-2-7B matrix shapes (4096×4096, 11008×4096, 4096×11008) and
k = 8, 32, 128, all in fp32 on one GPU:

* time (median of ``--reps`` timed calls after ``--warmup`` warm-ups, ``torch.cuda.synchronize()``
  before and after each call) of
    - ``compute_projector(G, k, "randomized", seed=..., oversample=8, power_iters=2)``,
    - ``compute_projector(G, k, "exact")`` (full SVD; it does not depend on k, so it is timed once per
      shape, with ``--exact-warmup``/``--exact-reps`` calls, and that time is reused for every k),
    - ``torch.svd_lowrank(G, q=k+8, niter=2)`` (torch's own randomized SVD),
  with the speed-up ``exact_ms / method_ms`` side by side;
* quality: the fraction of the exact top-k energy that a projector captures,
  ``||G Q||²/||G Q_exact||²`` (right projection, m >= n) or ``||Pᵀ G||²/||P_exactᵀ G||²`` (left), on
    - "lowrank+noise", a gradient-like matrix ``G = U diag(s) Vᵀ + N`` with r0 = 64 singular values
      ``s_i = 10·0.9^i`` (U, V random orthonormal) and Gaussian noise N with
      ``||N||_F = --noise · ||U diag(s) Vᵀ||_F`` (default 0.1, i.e. ~10 % of ||G||_F; the measured ratio
      is printed), the same matrix that is timed;
    - "gaussian", a pure-noise Gaussian matrix (worst case: flat spectrum, lower capture expected).

Output: one JSON line per measurement, then a markdown table; ``--out FILE`` also writes the table with a
header (device, torch version, date) to FILE.

Run on an H200 from the repository root (about 1 minute; the full SVDs dominate):

    PYTHONPATH=. python bench/projector.py --out bench/projector_h200.md

Debug on CPU with tiny shapes: ``python bench/projector.py --quick``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from gorp_ds.optim.projector import compute_projector, project_gradient, projection_side

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
FULL_KS = [8, 32, 128]
QUICK_SHAPES = [(256, 256), (688, 256), (256, 688)]
QUICK_KS = [4, 16]
R0 = 64  # rank of the signal part of the gradient-like matrix
EXACT_NOTE = "full SVD does not depend on k: timed once per shape, reused for every k"
CPU_WARNING = "WARNING: running on the CPU (no CUDA device used): these are NOT GPU numbers."
SEED = 1234  # seed passed to compute_projector (a GORP refresh uses a deterministic per-module seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int, reps: int
) -> tuple[list[float], float | None, object]:
    """Run ``fn`` ``warmup`` times, then ``reps`` timed times; returns (times in ms, peak extra MiB, last result)."""
    out: object = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return times, peak, out


def timing(t: list[float], warmup: int, reps: int, peak: float | None) -> dict:
    """The timing fields of one JSON line."""
    med, pk = round(statistics.median(t), 3), None if peak is None else round(peak, 1)
    return {
        "median_ms": med,
        "min_ms": round(min(t), 3),
        "warmup": warmup,
        "reps": reps,
        "peak_extra_mib": pk,
    }


def gradient_like(
    m: int, n: int, noise: float, gen: torch.Generator, device: torch.device
) -> tuple[Tensor, float]:
    """``U diag(s) Vᵀ + N`` with r0 = 64 decaying singular values; returns (G, ||N||_F / ||G||_F)."""
    r = min(R0, m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, device=device))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, device=device))
    s = 10.0 * 0.9 ** torch.arange(r, device=device, dtype=torch.float32)
    low = (u * s) @ v.mT
    n_mat = torch.randn(m, n, generator=gen, device=device)
    n_mat *= noise * low.norm() / n_mat.norm()
    g = low + n_mat
    return g, float(n_mat.norm() / g.norm())


def energy_frac(g: Tensor, proj: Tensor | None, exact: Tensor) -> float:
    """Captured fraction of the exact top-k energy (``exact`` is the exact projector with the same k)."""
    if proj is None:
        return float("nan")
    return float(project_gradient(g, proj).square().sum() / project_gradient(g, exact).square().sum())


def lowrank_projector(g: Tensor, k: int) -> Tensor:
    """The projector on the same side as compute_projector, taken from torch.svd_lowrank."""
    u, _, v = torch.svd_lowrank(g, q=k + 8, niter=2)
    return (v if projection_side(g.shape) == "right" else u)[:, :k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes for a CPU smoke test (< 30 s)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--warmup", type=int, default=2, help="warm-ups for the randomized methods")
    ap.add_argument("--reps", type=int, default=10, help="timed calls for the randomized methods")
    ap.add_argument("--exact-warmup", type=int, default=2)
    ap.add_argument("--exact-reps", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.1, help="||N||_F / ||low-rank part||_F")
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: avoids thread-contention outliers on shared CPUs
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({torch.get_num_threads()} threads)"
        if not args.quick:
            print(CPU_WARNING + " The full SVDs will take a long time.", file=sys.stderr, flush=True)
    shapes, ks = (QUICK_SHAPES, QUICK_KS) if args.quick else (FULL_SHAPES, FULL_KS)
    prec = torch.get_float32_matmul_precision()
    common = {"device": dev_name, "torch": torch.__version__, "dtype": "float32"}
    common |= {"fp32_matmul_precision": prec, "quick": args.quick}
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    rows: list[dict] = []
    noise_ratios: list[float] = []

    def emit(shape: tuple[int, int], k: int | None, method: str, **fields: object) -> None:
        rec = {**common, "shape": list(shape), "side": projection_side(shape), "k": k, "method": method}
        print(json.dumps({**rec, **fields}), flush=True)

    for m, n in shapes:
        side = projection_side((m, n))
        g, nr = gradient_like(m, n, args.noise, gen, device)
        noise_ratios.append(nr)
        g_noise = torch.randn(m, n, generator=gen, device=device)
        kmax = max(ks)
        # Exact: one full SVD per shape, independent of k; the top-kmax basis is sliced for smaller k
        # (the leading singular vectors of a full SVD are nested).
        exact_fn = lambda g=g, kmax=kmax: compute_projector(g, kmax, "exact")  # noqa: E731
        t_ex, pk_ex, q_ex = time_call(exact_fn, device, args.exact_warmup, args.exact_reps)
        assert isinstance(q_ex, Tensor), "exact SVD failed"
        q_ex_noise = compute_projector(g_noise, kmax, "exact")
        assert q_ex_noise is not None, "exact SVD failed"
        ex_ms = statistics.median(t_ex)
        emit(
            (m, n), None, "exact", **timing(t_ex, args.exact_warmup, args.exact_reps, pk_ex), note=EXACT_NOTE
        )
        for k in ks:
            rec: dict = {"k": k, "exact_ms": ex_ms}
            methods: dict[str, Callable[[Tensor], Tensor | None]] = {
                "randomized": lambda a, k=k: compute_projector(
                    a, k, "randomized", seed=SEED, oversample=args.oversample, power_iters=args.power_iters
                ),
                "svd_lowrank": lambda a, k=k: lowrank_projector(a, k),
            }
            for name, fn in methods.items():
                if name == "svd_lowrank":
                    torch.manual_seed(SEED)
                t, pk, proj = time_call(lambda fn=fn, g=g: fn(g), device, args.warmup, args.reps)
                med = statistics.median(t)
                e_g = energy_frac(g, proj, q_ex[:, :k])  # type: ignore[arg-type]
                e_n = energy_frac(g_noise, fn(g_noise), q_ex_noise[:, :k])
                rec[name] = {"ms": med, "speedup": ex_ms / med, "e_g": e_g, "e_n": e_n}
                if name == "randomized":
                    extra: dict = {"oversample": args.oversample, "power_iters": args.power_iters}
                else:
                    extra = {"q": k + 8, "niter": 2}
                extra |= timing(t, args.warmup, args.reps, pk)
                extra |= {"exact_median_ms": round(ex_ms, 3), "speedup_vs_exact": round(ex_ms / med, 2)}
                extra |= {"energy_frac_lowrank_noise": round(e_g, 5), "energy_frac_gaussian": round(e_n, 5)}
                emit((m, n), k, name, **extra, noise_over_G_fro=round(nr, 4))
            rows.append({"shape": f"{m}×{n}", "side": side, **rec})
        del g, g_noise, q_ex, q_ex_noise
        if device.type == "cuda":
            torch.cuda.empty_cache()

    head = (
        "| shape | side | k | exact ms* | randomized ms | svd_lowrank ms | speed-up exact/rand "
        "| speed-up exact/lowrank | rand/lowrank | energy rand (LR+noise) | energy lowrank (LR+noise) "
        "| energy rand (gauss) | energy lowrank (gauss) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, b = r["randomized"], r["svd_lowrank"]
        lines.append(
            f"| {r['shape']} | {r['side']} | {r['k']} | {r['exact_ms']:.1f} | {a['ms']:.2f} | "
            f"{b['ms']:.2f} | {a['speedup']:.1f}× | {b['speedup']:.1f}× | {a['ms'] / b['ms']:.2f} | "
            f"{a['e_g']:.5f} | {b['e_g']:.5f} | {a['e_n']:.4f} | {b['e_n']:.4f} |"
        )
    notes = [
        f"\n*exact = full `torch.linalg.svd`, independent of k: timed once per shape "
        f"({args.exact_warmup} warm-up + {args.exact_reps} timed) and repeated on every k row. "
        f"Randomized methods: {args.warmup} warm-up + {args.reps} timed; all times are medians, fp32, "
        f"`torch.cuda.synchronize()` around each call; fp32 matmul precision "
        f"`{prec}`.",
        f"randomized = `compute_projector(G, k, 'randomized', oversample={args.oversample}, "
        f"power_iters={args.power_iters})`; svd_lowrank = `torch.svd_lowrank(G, q=k+8, niter=2)`.",
        f"energy = ||G Q||²/||G Q_exact||² (right) or ||Pᵀ G||²/||P_exactᵀ G||² (left). LR+noise: "
        f"rank-{R0} signal with s_i = 10·0.9^i plus Gaussian noise, ||N||_F/||G||_F = "
        f"{statistics.mean(noise_ratios):.3f}; gauss: pure N(0,1) matrix (flat spectrum, worst case).",
    ]
    table = "\n".join(lines) + "\n" + "\n\n".join(notes)
    print("\n" + table)
    if device.type != "cuda":
        print("\n" + CPU_WARNING, file=sys.stderr)
    if args.out:
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(
                f"# Projector refresh benchmark\n\n- device: {dev_name}\n- torch: {torch.__version__}\n"
                f"- date: {date}\n- command: `{' '.join(sys.argv)}`\n\n{table}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
