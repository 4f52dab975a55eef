"""Param-group hyperparameters are parsed and checked once, into a typed ``UpdateConfig``
(gorp_ds/optim/param_group.py): a wrong value fails where the group is created or changed, naming
its key; steps reuse the config and rebuild it only when a value changed, so that an ``lr`` written
between steps (an LR scheduler, DeepSpeed's ``set_lr``) takes effect."""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP, UpdateConfig


def _p(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))))


def _group(kind: str, **values) -> dict:
    """A one-tensor group of role ``kind`` (its shape fits the role), with ``values`` set."""
    shapes = {"full": (12, 8), "lora_a": (4, 8), "lora_b": (8, 4), "plain": (8,)}
    group = {"params": [_p(*shapes[kind])], "names": [f"bad.{kind}"], "role": kind}
    if kind == "full":
        group["rank"] = 4
    return {**group, **values}


def _good() -> list[dict]:
    return [{"params": [_p(4, 6)], "names": ["ok.lora_A"], "role": "lora_a"},
            {"params": [_p(6)], "names": ["ok.norm"], "role": "plain"}]


BAD = {
    # case: (role, key, value)
    "negative lr": ("lora_a", "lr", -1e-3),
    "lr a string": ("plain", "lr", "1e-3"),
    "negative eps": ("plain", "eps", -1.0),
    "weight_decay NaN": ("lora_b", "weight_decay", float("nan")),
    "weight_decay a bool": ("lora_b", "weight_decay", True),
    "one beta": ("plain", "betas", (0.9,)),
    "beta2 = 1": ("plain", "betas", (0.9, 1.0)),
    "shared_threshold > 1": ("lora_a", "shared_threshold", 1.5),
    "unknown role": ("plain", "role", "lora_c"),
    "rank 0": ("full", "rank", 0),
    "rank a float": ("full", "rank", 4.0),
    "rank above min(m, n)": ("full", "rank", 9),
    "update_gap 0": ("full", "update_gap", 0),
    "scale 0": ("full", "scale", 0.0),
    "unknown projector": ("full", "projector", "svd"),
    "negative oversample": ("full", "oversample", -1),
    "negative power_iters": ("full", "power_iters", -2),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_wrong_group_value_fails_at_group_creation_naming_the_key(case):
    role, key, value = BAD[case]
    group = _group(role, **{key: value})
    with pytest.raises(ValueError) as info:
        GORP(_good() + [group], lr=1e-3)
    message = str(info.value)
    assert key in message and group["names"][0] in message, message
    opt = GORP(_good(), lr=1e-3)  # add_param_group is public API: the same check, and nothing is left behind
    with pytest.raises(ValueError, match=key):
        opt.add_param_group(_group(role, **{key: value}))
    assert len(opt.param_groups) == 2 and group["names"][0] not in opt.tensor_meta


def _counting_parses(monkeypatch) -> list[dict]:
    parsed: list[dict] = []
    original = UpdateConfig.from_group.__func__

    def counting(cls, group):
        parsed.append(group)
        return original(cls, group)

    monkeypatch.setattr(UpdateConfig, "from_group", classmethod(counting))
    return parsed


def _set_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_steps_reuse_the_config_and_rebuild_it_only_when_a_value_changed(monkeypatch):
    parsed = _counting_parses(monkeypatch)
    groups = _good() + [_group("full", update_gap=2)]
    params = [p for g in groups for p in g["params"]]
    opt = GORP(groups, lr=1e-2)
    assert len(parsed) == 3  # once per group, where it was added
    for step in range(4):
        _set_grads(params, step)
        opt.step()
    assert len(parsed) == 3, "no parsing on the step path"
    opt.param_groups[2]["lr"] = 5e-3  # what DeepSpeed's set_lr does
    _set_grads(params, 4)
    opt.step()
    assert len(parsed) == 4 and opt.group_config(opt.param_groups[2]).lr == 5e-3
    opt.param_groups[0]["betas"] = [0.8, 0.99]
    _set_grads(params, 5)
    opt.step()
    assert len(parsed) == 5 and opt.group_config(opt.param_groups[0]).beta1 == 0.8
    opt.param_groups[0]["betas"][0] = 0.7  # changed in place: still a change
    _set_grads(params, 6)
    opt.step()
    assert len(parsed) == 6 and opt.group_config(opt.param_groups[0]).beta1 == 0.7
    _set_grads(params, 7)
    opt.step()
    assert len(parsed) == 6


def test_an_lr_scheduler_changes_the_step_like_torch_adamw():
    """A torch LR scheduler writes ``group["lr"]`` before each step: ``plain`` GORP follows AdamW."""
    init = [torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.randn(7, generator=torch.Generator().manual_seed(2))]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = GORP([{"params": ours, "names": ["a", "b"], "role": "plain"}], lr=3e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=3e-2, weight_decay=0.1, foreach=False)
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (opt, ref)]
    for step in range(6):
        for params, o, scheduler in ((ours, opt, schedulers[0]), (theirs, ref, schedulers[1])):
            _set_grads(params, step)
            o.step()
            scheduler.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-2 / 7)


def test_lr_written_between_steps_is_the_step_lr():
    group = _group("lora_b")
    (param,) = group["params"]
    opt = GORP([group], lr=1e-2)
    _set_grads([param], 0)
    opt.step()
    before = param.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    _set_grads([param], 1)
    opt.step()
    assert torch.equal(param.detach(), before), "lr 0 written before the step: the weights must not move"
    opt.param_groups[0]["lr"] = 1e-2
    _set_grads([param], 2)
    opt.step()
    assert not torch.equal(param.detach(), before)


def test_update_group_checks_before_changing_the_group(monkeypatch):
    opt = GORP(_good() + [_group("full")], lr=1e-2)
    with pytest.raises(ValueError, match="lr") as info:
        opt.update_group(0, {"lr": -1.0, "eps": 1e-6})
    assert "ok.lora_A" in str(info.value)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["eps"] == 1e-8, "a refused change changes nothing"
    with pytest.raises(ValueError, match="rank"):
        opt.update_group(2, {"rank": 9})  # bad.full is 12 × 8
    with pytest.raises(ValueError, match="role cannot change"):
        opt.update_group(1, {"role": "lora_a"})
    parsed = _counting_parses(monkeypatch)
    opt.update_group(2, {"lr": 2e-3, "update_gap": 5, "names": ["ignored"], "params": []})
    assert opt.param_groups[2]["names"] == ["bad.full"] and len(opt.param_groups[2]["params"]) == 1
    cfg = opt.group_config(opt.param_groups[2])
    assert (cfg.lr, cfg.update_gap) == (2e-3, 5) and len(parsed) == 1, "checked once, where it changed"


def test_a_wrong_value_written_into_the_dict_fails_at_the_next_step_naming_the_key():
    group = _group("lora_a")
    opt = GORP([group], lr=1e-2)
    opt.param_groups[0]["eps"] = -1.0
    _set_grads(group["params"], 0)
    with pytest.raises(ValueError, match="eps") as info:
        opt.step()
    assert "bad.lora_a" in str(info.value)


def test_load_state_dict_puts_back_checked_hyperparameters():
    groups = _good()
    opt = GORP(groups, lr=1e-2)
    saved = opt.state_dict()
    saved["param_groups"][1]["lr"] = 4e-3
    opt.load_state_dict(saved)
    assert opt.group_config(opt.param_groups[1]).lr == 4e-3
    saved["param_groups"][0]["weight_decay"] = -0.5
    with pytest.raises(ValueError, match="weight_decay"):
        opt.load_state_dict(saved)
