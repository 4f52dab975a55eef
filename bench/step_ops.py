"""Host work per training step of bench/zero_gorp.py's engines, counted on the CPU: operators
dispatched, host reads of tensor values and Python calls, between projector refreshes and at a
refresh step, per configuration, for this checkout's code or another one's (``--tree``).

    DS_ACCELERATOR=cpu python bench/step_ops.py --configs lora,gorp,gorp:spread
    DS_ACCELERATOR=cpu python bench/step_ops.py --tree /path/to/checkout-at-an-older-commit --configs lora,gorp

Where a GPU waits for its host (launches, or a step that reads a device value and so stops the
host's launches from running ahead), every operator dispatched and every read of a tensor value into
Python (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``torch.nonzero``) costs time. Their
numbers do not depend on the device, so on the CPU they are counted exactly and two commits or two
configurations compare without a GPU; host milliseconds are printed too, but on a shared CPU they
are noisy (best of ``--timed`` steps).

The model is a small LLaMA (``--layers``, ``--hidden``, vocabulary 256, bf16 like the 7B benchmark)
built, wrapped and stepped by the measured tree's own ``bench/zero_gorp.py`` (``make_engine``: PEFT
LoRA on q,v, GORP's ``full`` gate_proj with projected gradients refreshed from the sketch, ZeRO-2
on one gloo rank, gradient checkpointing). A configuration is a zero_gorp name with an optional
``:spread`` or ``:cycle`` (refresh schedule). Per configuration one JSON line (``--out``) and a table:
operators in forward, backward and step; host reads (all tensors here are on the CPU, so the reads
are listed by the line that asked, for the reader to tell device values from host counters); Python
calls per phase (cProfile).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import json
import os
import pstats
import socket
import sys
import time
from pathlib import Path
from typing import Any

READ_OPS = ("_local_scalar_dense", "nonzero")  # what float()/int()/bool()/.item() and nonzero dispatch
READ_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")  # where Python asks (tolist dispatches nothing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostReads:
    """Counts reads of tensor values into Python by the line outside torch that asked for them
    (``Tensor`` methods wrapped while :attr:`on`)."""

    def __init__(self, torch: Any) -> None:
        self.on, self.sites = False, collections.Counter()
        self._torch, self._originals = torch, {}
        for name in READ_METHODS:
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        original = self._originals[name] = getattr(self._torch.Tensor, name)
        counter = self

        def read(tensor, *args, **kwargs):
            if counter.on:
                frame = sys._getframe(1)
                while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                    frame = frame.f_back
                where = "?" if frame is None else f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
                counter.sites[f"{name} {where}"] += 1
            return original(tensor, *args, **kwargs)

        setattr(self._torch.Tensor, name, read)

    def close(self) -> None:
        for name, original in self._originals.items():
            setattr(self._torch.Tensor, name, original)


def _short(path: str) -> str:
    return path.split("site-packages" + os.sep)[-1] if "site-packages" in path else os.path.relpath(path)


def measure(config: str, args: argparse.Namespace, zero_gorp: Any, torch: Any) -> dict[str, Any]:
    """One configuration: ``--steps`` counted steps after two warm-up steps, then ``--timed``
    steps timed, then one cProfile'd cycle of ``--gap`` steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Operators(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*a, **(kw or {}))

    name, _, schedule = config.partition(":")
    bench_args = argparse.Namespace(tiny=False, no_ckpt=False, gap=args.gap, refresh_schedule=schedule or "cycle",
                                    micro=2, seq=32, layers=args.layers)
    engine, _ = zero_gorp.make_engine(name, bench_args, torch.device("cpu"), 2)
    generator = torch.Generator().manual_seed(1)
    vocab = engine.module.config.vocab_size

    def step(phases: dict[str, Any] | None = None) -> list[float]:
        ids = torch.randint(0, vocab, (bench_args.micro, bench_args.seq), generator=generator)
        seconds, loss = [], None
        for phase in ("forward", "backward", "step"):
            began = time.perf_counter()
            with phases[phase] if phases else contextlib.nullcontext():
                if phase == "forward":
                    loss = engine(input_ids=ids, labels=ids).loss
                elif phase == "backward":
                    engine.backward(loss)
                else:
                    engine.step()
            seconds.append(time.perf_counter() - began)
        return seconds

    reads = HostReads(torch)
    try:
        for _ in range(2):  # warm-up; step 0 is every layer's first refresh of the task
            step()
        counted = []
        for index in range(2, 2 + args.steps):
            reads.sites.clear()
            modes = {phase: Operators() for phase in ("forward", "backward", "step")}
            reads.on = True
            step(modes)
            reads.on = False
            counted.append({"index": index, "refresh": index % args.gap == 0,
                            **{f"{p}_ops": sum(m.ops.values()) for p, m in modes.items()},
                            "dispatched_reads": {k: v for m in modes.values() for k, v in m.ops.items() if k in READ_OPS},
                            "host_reads": dict(reads.sites),
                            "step_ops_by_name": dict(modes["step"].ops.most_common())})
    finally:
        reads.close()
    first = 2 + args.steps
    timed = [(i, step()) for i in range(first, first + args.timed)]
    python_calls = []
    for index in range(first + args.timed, first + args.timed + args.gap):
        profiles = {phase: cProfile.Profile() for phase in ("forward", "backward", "step")}
        step(profiles)
        python_calls.append({"index": index, **{p: pstats.Stats(pr).total_calls for p, pr in profiles.items()}})
    engine.destroy()

    def best(refresh: bool) -> list[float] | None:
        rows = [s for i, s in timed if (i % args.gap == 0) == refresh]
        return [round(1e3 * min(col), 2) for col in zip(*rows)] if rows else None

    return {"config": config, "tree": str(args.tree), "layers": args.layers, "gap": args.gap, "steps": counted,
            "best_host_ms": {"between": best(False), "refresh": best(True)}, "python_calls": python_calls}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| config | step | operators fwd / bwd / step | host reads | Python calls fwd / bwd / step | best host ms fwd / bwd / step |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for kind, refresh in (("between", False), ("refresh", True)):
            row = next((s for s in r["steps"] if s["refresh"] == refresh), None)
            calls = next((c for c in r["python_calls"] if (c["index"] % r["gap"] == 0) == refresh), None)
            if row is None:
                continue
            reads = sum(row["host_reads"].values())
            ms = r["best_host_ms"][kind]
            ops = " / ".join(str(row[f"{p}_ops"]) for p in ("forward", "backward", "step"))
            python = "–" if calls is None else " / ".join(str(calls[p]) for p in ("forward", "backward", "step"))
            host_ms = "–" if ms is None else " / ".join(f"{v:.1f}" for v in ms)
            lines.append(f"| {r['config']} | {kind} | {ops} | {reads} | {python} | {host_ms} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="lora,gorp,gorp:spread", help="zero_gorp names, ':spread' for that schedule")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose gorp_ds and bench/zero_gorp.py are measured (default: this one)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--gap", type=int, default=4, help="GORP refresh gap T")
    parser.add_argument("--steps", type=int, default=4, help="counted steps (after 2 warm-up steps)")
    parser.add_argument("--timed", type=int, default=16, help="timed steps (best of, per phase)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines here")
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    sys.path.insert(0, str(args.tree.resolve()))
    import deepspeed
    import torch
    from transformers import LlamaConfig

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    import bench.zero_gorp as zero_gorp

    # The measured tree's own engine code, on a small LLaMA instead of the 7B shape.
    zero_gorp.model_config = lambda _args: LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    results = []
    for config in args.configs.split(","):
        results.append(measure(config, args, zero_gorp, torch))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            args.out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(table(results))


if __name__ == "__main__":
    main()
