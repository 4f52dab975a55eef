"""Scenarios run on spawned gloo ranks by test_zero.py: GORP under DeepSpeed ZeRO-1/2 against the
single-process GORP reference on the same global batch."""

from __future__ import annotations

import torch
import torch.nn as nn

from gorp_ds.optim import GORP

TASK_STEPS = (5, 5)  # steps of task 1 and task 2; end_task() in between
STEPS = sum(TASK_STEPS)
GLOBAL_BATCH = 12
SAVE_AFTER = 6  # checkpoint after this many steps (mid-task 2, between refreshes)


class TinyNet(nn.Module):
    """Shapes chosen so that partitions cut tensors mid-row at 2 and 3 ranks, with both projection
    orientations (21×7, 22×7 right; 7×21, 7×22 left) and LoRA-like factors on a frozen base."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up1 = nn.Linear(7, 21, bias=False)
        self.down1 = nn.Linear(21, 7, bias=False)
        self.up2 = nn.Linear(7, 22, bias=False)
        self.down2 = nn.Linear(22, 7, bias=False)
        self.base = nn.Linear(7, 21)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(3, 7) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(21, 3) * 0.1)
        self.norm = nn.Parameter(torch.ones(21))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up1(x) + self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T
        x = x + self.down1(torch.tanh(h) * self.norm)
        return x + self.down2(torch.tanh(self.up2(x)))


FULL = ("up1", "down1", "up2", "down2")


def build_optimizer(model: TinyNet, refresh_schedule: str = "cycle") -> GORP:
    return GORP(
        [
            {"params": [getattr(model, n).weight for n in FULL], "names": list(FULL), "role": "full", "rank": 2,
             "update_gap": 3, "scale": 0.5, "projector": "randomized", "lr": 2e-2, "weight_decay": 0.01,
             "refresh_schedule": refresh_schedule},
            {"params": [model.lora_a], "names": ["lora_a"], "role": "lora_a", "lr": 2e-2},
            {"params": [model.lora_b], "names": ["lora_b"], "role": "lora_b", "lr": 2e-2},
            {"params": [model.norm], "names": ["norm"], "role": "plain", "lr": 2e-2, "weight_decay": 0.1},
        ],
        shared_threshold=0.9,
    )


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in trainable(model)])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 7, generator=g)


def micro_batches(step: int, world: int, gas: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch cut into world·gas micro-batches; micro-step a of rank r takes a·world + r."""
    x, y = batch(step)
    return list(zip(x.chunk(world * gas), y.chunk(world * gas)))


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x.to(next(model.parameters()).dtype))
    return (out.float() - y).pow(2).mean()


def reference_trajectory(world: int, gas: int, clip: float) -> list[torch.Tensor]:
    """Single-process GORP on the same global batch: mean of the micro-batch gradients, clipped by
    the global norm like DeepSpeed, end_task() after task 1."""
    model = TinyNet()
    opt = build_optimizer(model)
    trajectory = []
    for step in range(STEPS):
        opt.zero_grad()
        chunks = micro_batches(step, world, gas)
        for x, y in chunks:
            (loss_fn(model, x, y) / len(chunks)).backward()
        if clip > 0:
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainable(model)))
            coef = (norm + 1e-6) / clip
            if coef > 1:
                for p in trainable(model):
                    p.grad.div_(coef)
        opt.step()
        if step + 1 == TASK_STEPS[0]:
            opt.end_task()
        trajectory.append(flat_params(model))
    return trajectory


def ds_config(stage: int, *, gas: int = 2, clip: float = 0.0, reduce_scatter: bool = True, overlap: bool = False,
              contiguous: bool = True, bucket: int = 40, bf16: bool = False, world: int = 2) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * gas),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "steps_per_print": 10_000,
        "zero_optimization": {
            "stage": stage, "reduce_scatter": reduce_scatter, "overlap_comm": overlap,
            "contiguous_gradients": contiguous, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
        },
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def run_engine(rank: int, world: int, config: dict, *, steps: range = range(STEPS), load_from: str | None = None,
               save_to: str | None = None):
    """Train TinyNet under gorp_ds.initialize; return the trajectory and per-rank facts."""
    import gorp_ds
    from gorp_ds.zero import load_checkpoint, save_checkpoint

    model = TinyNet()
    if config.get("bf16", {}).get("enabled"):
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model)
    # The path of full gradients in DeepSpeed's flat buffers (partition geometry, cut tensors, clipping by
    # ‖G‖); the projected path has its own scenarios (lowrank_scenarios.py).
    engine, _, _, _ = gorp_ds.initialize(model=model, optimizer=opt, config=config, full_gradients="flat")
    gas = config["gradient_accumulation_steps"]
    if load_from is not None:
        load_checkpoint(engine, load_from)
    trajectory = {}
    for step in steps:
        chunks = micro_batches(step, world, gas)
        for micro in range(gas):
            x, y = chunks[micro * world + rank]
            engine.backward(loss_fn(engine.module, x, y))
            engine.step()
        if step + 1 == TASK_STEPS[0]:
            opt.end_task()
        trajectory[step] = flat_params(model)
        if save_to is not None and step + 1 == SAVE_AFTER:
            save_checkpoint(engine, save_to, tag="mid_task")
    layouts = opt.driver.layouts
    held = {p.name for layout in layouts for p in layout.pieces(rank)}
    facts = {
        "trajectory": trajectory,
        "held": held,
        "cut_mid_row": sorted(
            p.name for layout in layouts for p in layout.pieces(rank)
            if not p.is_whole and len(p.shape) == 2 and p.elem_start % p.shape[1] != 0
        ),
        "cut": sorted({t.name for layout in layouts for t in layout.cut_tensors()}),
        "state_names": {name for name, st in opt.state.items() if isinstance(name, str) and st},
        "low_rank_bytes": {
            name: sum(v.numel() * v.element_size() for v in st.values() if v.dim() > 0)
            for name, st in opt.state.items() if isinstance(name, str) and name != "norm" and st
        },
        "shared": {name: s.shape[1] for name, s in opt.shared.items()},
        "state_dtypes": sorted({str(v.dtype) for st in opt.state.values() if isinstance(st, dict) for v in st.values()}),
    }
    engine.destroy()
    return facts


def scenarios(rank: int, world: int, checkpoint_dir: str, mode: str) -> dict:
    """Everything one process group checks. ``mode`` is "save" (2 ranks) or "load" (3 ranks)."""
    from gorp_ds.zero import UnsupportedSetupError

    results = {}
    results["zero1"] = run_engine(rank, world, ds_config(1, clip=0.3, world=world))
    results["zero2_rs"] = run_engine(
        rank, world, ds_config(2, clip=0.3, overlap=True, world=world),
        save_to=checkpoint_dir if mode == "save" else None,
    )
    results["zero2_no_rs"] = run_engine(
        rank, world, ds_config(2, gas=1, reduce_scatter=False, contiguous=False, world=world)
    )
    results["bf16"] = run_engine(rank, world, ds_config(2, clip=0.3, bf16=True, world=world))
    if mode == "load":
        results["resumed"] = run_engine(
            rank, world, ds_config(2, clip=0.3, overlap=True, world=world),
            steps=range(SAVE_AFTER, STEPS), load_from=checkpoint_dir,
        )
    try:
        run_engine(rank, world, ds_config(1, overlap=True, world=world))
        results["zero1_overlap_error"] = None
    except UnsupportedSetupError as err:
        results["zero1_overlap_error"] = str(err)
    return results


def train_single_process(model: nn.Module, opt: GORP, steps) -> None:
    """The scenario's steps on one process (whole batches; end_task after the first task)."""
    for step in steps:
        opt.zero_grad()
        x, y = batch(step)
        loss_fn(model, x, y).backward()
        opt.step()
        if step + 1 == TASK_STEPS[0]:
            opt.end_task()
