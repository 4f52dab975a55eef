"""``state_dict`` / ``load_state_dict`` resume bit-exactly and hold tensors only (docs/algorithm.md §8)."""

from __future__ import annotations

import io

import pytest
import torch

from gorp_ds.optim import GORP

SHAPES = {
    "mlp.tall": (12, 6),  # full, right projection
    "mlp.wide": (5, 10),  # full, left projection
    "attn.lora_A": (3, 10),
    "attn.lora_B": (8, 3),
    "norm": (8,),  # plain
}
BASE = torch.randn(8, 10, generator=torch.Generator().manual_seed(99))


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen) * (0.3 if n == "attn.lora_B" else 1.0))
            for n, s in SHAPES.items()}


def make_opt(params, projector="exact", update_gap=4):
    return GORP(
        [
            {"params": [params["mlp.tall"], params["mlp.wide"]], "names": ["mlp.tall", "mlp.wide"], "role": "full",
             "rank": 2, "update_gap": update_gap, "scale": 0.5, "projector": projector, "lr": 1e-2},
            {"params": [params["attn.lora_A"]], "names": ["attn.lora_A"], "role": "lora_a"},
            {"params": [params["attn.lora_B"]], "names": ["attn.lora_B"], "role": "lora_b"},
            {"params": [params["norm"]], "names": ["norm"], "role": "plain", "lr": 3e-3},
        ],
        lr=5e-3, weight_decay=0.01, shared_threshold=0.9,
    )


def loss_fn(p, step, task):
    gen = torch.Generator().manual_seed(1000 * task + step)
    x = torch.randn(16, 10, generator=gen)
    u = torch.randn(16, 6, generator=gen)
    h = x @ (BASE + p["attn.lora_B"] @ p["attn.lora_A"]).mT * p["norm"]  # 16×8
    y = torch.tanh(u @ p["mlp.tall"].mT)  # 16×12
    z = x @ p["mlp.wide"].mT  # 16×5
    return (h - task).square().mean() + (y[:, :8] - h).square().mean() + (z.sum(1) - x[:, 0] * task).square().mean()


def train(params, opt, steps, task, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_fn(params, step, task).backward()
        opt.step()


def clone_params(params):
    return {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}


def roundtrip(sd, via_bytes):
    if not via_bytes:
        return sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)  # default weights_only loading must work: tensors and plain python only


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


@pytest.mark.parametrize("via_bytes", [False, True], ids=["in-memory", "torch.save"])
@pytest.mark.parametrize(
    "projector, first_task_steps, second_task_steps",
    [
        ("exact", 7, None),  # mid refresh interval (refreshes at 0, 4, 8)
        ("exact", 8, None),  # exactly on a refresh step
        ("exact", 9, 6),  # after an end_task (S present), mid interval of task 2
        ("randomized", 6, None),
        ("randomized", 9, 3),  # randomized, S present, next refresh (step 4 of task 2) after resume
    ],
)
def test_resume_is_bit_exact(projector, first_task_steps, second_task_steps, via_bytes):
    torch.manual_seed(0)
    params = make_params()
    opt = make_opt(params, projector)
    train(params, opt, first_task_steps, task=0)
    task = 0
    if second_task_steps is not None:
        opt.end_task()
        assert all(opt.shared_space(n) is not None for n in ("mlp.tall", "mlp.wide", "attn.lora_A", "attn.lora_B"))
        task = 1
        train(params, opt, second_task_steps, task=task)
    done = second_task_steps if second_task_steps is not None else first_task_steps

    sd = roundtrip(opt.state_dict(), via_bytes)
    for part in ("state", "shared"):
        leaves = list(_leaves(sd[part]))
        assert all(isinstance(v, torch.Tensor) for v in leaves), part
    assert len(list(_leaves(sd["state"]))) == 2 * 5 + 3 * 3  # full: 5 entries, others: 3
    assert len(sd["shared"]) == (4 if second_task_steps is not None else 0)
    assert isinstance(sd["tasks_completed"], torch.Tensor)

    params2 = clone_params(params)
    opt2 = make_opt(params2, projector)
    opt2.load_state_dict(sd)
    if not via_bytes:  # the loaded state must not alias the saved one
        for name, st in opt2.state.items():
            for key, v in st.items():
                assert v.data_ptr() != opt.state[name][key].data_ptr(), (name, key)

    train(params, opt, 9, task=task, start=done)  # crosses at least two refreshes
    train(params2, opt2, 9, task=task, start=done)
    for n in SHAPES:
        assert torch.equal(params[n], params2[n]), n
    # and after a further task boundary the shared spaces are still identical
    opt.end_task()
    opt2.end_task()
    for n in SHAPES:
        a, b = opt.shared.get(n), opt2.shared.get(n)
        assert (a is None and b is None) or torch.equal(a, b), n
    train(params, opt, 5, task=task + 1)
    train(params2, opt2, 5, task=task + 1)
    for n in SHAPES:
        assert torch.equal(params[n], params2[n]), n


def test_state_dict_contents():
    params = make_params()
    opt = make_opt(params)
    train(params, opt, 3, task=0)
    opt.end_task()
    train(params, opt, 2, task=1)
    sd = opt.state_dict()
    assert set(sd["state"]) == set(SHAPES)
    assert {"step", "projector", "exp_avg", "exp_avg_sq", "projector_failures"} <= set(sd["state"]["mlp.tall"])
    assert sd["state"]["mlp.tall"]["exp_avg"].shape == (12, 2)  # moments have R's shape, never W's
    assert sd["state"]["mlp.wide"]["exp_avg"].shape == (2, 10)
    assert set(sd["shared"]) == {"mlp.tall", "mlp.wide", "attn.lora_A", "attn.lora_B"}
    assert int(sd["tasks_completed"]) == 1
