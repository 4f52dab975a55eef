"""Bad hyperparameters raise ``ValueError`` at construction, naming the offending tensor (docs/algorithm.md §8)."""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP


def _p(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


def _good_groups():
    return [
        {"params": [_p(16, 8)], "names": ["layers.0.mlp.gate_proj"], "role": "full", "rank": 4},
        {"params": [_p(4, 8)], "names": ["layers.0.q_proj.lora_A"], "role": "lora_a"},
        {"params": [_p(16, 4)], "names": ["layers.0.q_proj.lora_B"], "role": "lora_b"},
        {"params": [_p(16)], "names": ["model.norm"], "role": "plain"},
    ]


def test_good_configuration_constructs():
    GORP(_good_groups(), lr=1e-3)


BAD = {
    # case id: (group to append, offending name expected in the message or None, extra kwargs)
    "rank<1": ({"params": [_p(12, 6)], "names": ["bad.rank0"], "role": "full", "rank": 0}, "bad.rank0"),
    "rank>min(m,n)": ({"params": [_p(12, 6)], "names": ["bad.rank7"], "role": "full", "rank": 7}, "bad.rank7"),
    "rank>min(m,n) wide": ({"params": [_p(5, 30)], "names": ["bad.wide"], "role": "full", "rank": 6}, "bad.wide"),
    "rank>min second tensor": (
        {"params": [_p(12, 6), _p(3, 12)], "names": ["ok.first", "bad.second"], "role": "full", "rank": 4},
        "bad.second"),
    "unknown role": ({"params": [_p(4, 4)], "names": ["bad.role"], "role": "lora_c"}, "bad.role"),
    "role missing": ({"params": [_p(4, 4)], "names": ["bad.norole"]}, "bad.norole"),
    "full 1-D": ({"params": [_p(8)], "names": ["bad.full1d"], "role": "full", "rank": 1}, "bad.full1d"),
    "full 3-D": ({"params": [_p(2, 4, 4)], "names": ["bad.full3d"], "role": "full", "rank": 1}, "bad.full3d"),
    "lora 1-D": ({"params": [_p(8)], "names": ["bad.lora1d"], "role": "lora_a"}, "bad.lora1d"),
    "negative lr": ({"params": [_p(4, 4)], "names": ["bad.lr"], "role": "lora_b", "lr": -1e-3}, "bad.lr"),
    "beta1 >= 1": ({"params": [_p(4)], "names": ["bad.beta1"], "role": "plain", "betas": (1.0, 0.999)}, "bad.beta1"),
    "beta2 < 0": ({"params": [_p(4)], "names": ["bad.beta2"], "role": "plain", "betas": (0.9, -0.1)}, "bad.beta2"),
    "unknown projector": (
        {"params": [_p(8, 8)], "names": ["bad.proj"], "role": "full", "rank": 2, "projector": "svd"}, "bad.proj"),
    "duplicate name across groups": ({"params": [_p(4)], "names": ["model.norm"], "role": "plain"}, "model.norm"),
    "duplicate name in group": (
        {"params": [_p(4), _p(4)], "names": ["dup.x", "dup.x"], "role": "plain"}, "dup.x"),
    "names missing": ({"params": [_p(4)], "role": "plain"}, None),
    "names wrong length": ({"params": [_p(4), _p(4)], "names": ["only.one"], "role": "plain"}, None),
    "names a string": ({"params": [_p(4)], "names": "a.string", "role": "plain"}, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hyperparameters_raise_with_name(case):
    group, name = BAD[case]
    with pytest.raises(ValueError) as info:
        GORP(_good_groups() + [group], lr=1e-3)
    message = str(info.value)
    if name is not None:
        assert name in message, message
    else:  # no (complete) list of names to quote: the message must say that 'names' is the problem
        assert "names" in message, message


def test_bad_global_betas_name_the_first_tensor():
    with pytest.raises(ValueError, match="layers.0.mlp.gate_proj"):
        GORP(_good_groups(), lr=1e-3, betas=(0.9, 1.5))


def test_names_of_wrong_length_quote_the_given_names():
    """§8: names "of the wrong length raise ValueError ... with the offending name". The group has
    names, so the message should quote them (today it only says "param group 4 ... 1 names")."""
    group = {"params": [_p(4), _p(4)], "names": ["only.one"], "role": "plain"}
    with pytest.raises(ValueError, match="only.one"):
        GORP(_good_groups() + [group], lr=1e-3)


def test_add_param_group_is_validated():
    """``GORP`` is a ``torch.optim.Optimizer``: ``add_param_group`` is public API, but it skips
    ``_validate_group`` (a negative lr is accepted)."""
    opt = GORP([{"params": [_p(4, 6)], "names": ["x.lora_A"], "role": "lora_a"}], lr=1e-2)
    with pytest.raises(ValueError, match="bad.added"):
        opt.add_param_group({"params": [_p(6, 4)], "names": ["bad.added"], "role": "lora_b", "lr": -1.0})


def test_add_param_group_then_end_task():
    """A group added with ``add_param_group`` is not registered in ``tensor_meta``: after a step,
    ``end_task()`` raises ``KeyError`` for its tensor."""
    a, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(6, 4))
    opt = GORP([{"params": [a], "names": ["x.lora_A"], "role": "lora_a"}], lr=1e-2)
    opt.add_param_group({"params": [b], "names": ["x.lora_B"], "role": "lora_b"})
    a.grad, b.grad = torch.randn(4, 6), torch.randn(6, 4)
    opt.step()
    opt.end_task()
    assert opt.shared_space("x.lora_B") is not None
