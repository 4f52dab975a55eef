"""LoRA through PEFT on the tiny LLaMA: task-boundary merge + re-init (docs/algorithm.md §4), canonical
module names, and the parameter roles of every method (table in gorp_ds/models/roles.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gorp_ds.models import (
    METHODS,
    LoraSettings,
    RoleError,
    TargetsConfig,
    add_lora,
    build_param_groups,
    canonical_name,
    lora_factor_names,
    merge_and_reinit_,
)
from gorp_ds.models.lora import seed_lora_dropout
from gorp_ds.optim.config import OptimizerConfig

R, ALPHA = 4, 8.0  # scaling α/r = 2
LAYERS = 2
LORA_LAYERS = [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]


def _base(model_dir, init_seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(init_seed)  # PEFT draws A from the global generator
    return model


def _peft(model_dir, init_seed: int = 0):
    return add_lora(_base(model_dir, init_seed), LoraSettings(r=R, alpha=ALPHA, targets=["q_proj", "v_proj"]))


def _factors(model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter, torch.nn.Parameter]]:
    """{layer: (A, B, base weight)} read straight from PEFT's module tree."""
    out = {}
    for name in LORA_LAYERS:
        layer = model.get_submodule("base_model.model." + name)
        out[name] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()


def test_merge_and_reinit_keeps_the_function(tiny_model_dir) -> None:
    model = _peft(tiny_model_dir)
    generator = torch.Generator().manual_seed(5)
    for _a, b, _ in _factors(model).values():  # a trained-looking adapter: B ≠ 0
        b.data.copy_(0.3 * torch.randn(b.shape, generator=generator))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=generator)
    before = _logits(model, ids)
    with model.disable_adapter():
        without_adapter = _logits(model, ids)
    assert (before - without_adapter).abs().max() > 1e-3, "the adapter must matter for this test to mean anything"

    expected_base = {n: (w.double() + (ALPHA / R) * b.double() @ a.double()) for n, (a, b, w) in _factors(model).items()}
    old_a = {n: a.detach().clone() for n, (a, _, _) in _factors(model).items()}

    changed = merge_and_reinit_(model, seed=3, task_index=1)

    assert sorted(changed) == sorted(f"{n}.lora_{f}" for n in LORA_LAYERS for f in "AB")
    for name, (a, b, w) in _factors(model).items():
        assert torch.equal(b, torch.zeros_like(b)), name
        assert not torch.equal(a, old_a[name]), name
        assert torch.allclose(w.double(), expected_base[name], atol=1e-6, rtol=0), name
    after = _logits(model, ids)
    assert (after - before).abs().max().item() < 1e-5


def _reinit_a(model_dir, *, init_seed: int, seed: int, task: int) -> dict[str, torch.Tensor]:
    model = _peft(model_dir, init_seed)
    merge_and_reinit_(model, seed=seed, task_index=task)
    return {n: a.detach().clone() for n, (a, _, _) in _factors(model).items()}


def test_lora_dropout_drops_the_adapter_input_only_while_training(tiny_model_dir) -> None:
    """--lora-dropout p: in training the adapter reads dropout(x) (the base path reads x), in
    evaluation it reads x; checked against a float64 re-derivation with the same dropout mask."""
    p = 0.5
    model = add_lora(_base(tiny_model_dir), LoraSettings(r=R, alpha=ALPHA, targets=["q_proj", "v_proj"], dropout=p))
    layer = model.get_submodule("base_model.model." + LORA_LAYERS[0])
    a, b, w = _factors(model)[LORA_LAYERS[0]]
    generator = torch.Generator().manual_seed(2)
    b.data.copy_(torch.randn(b.shape, generator=generator))  # B = 0 would hide the adapter path
    x = torch.randn(3, 5, w.shape[1], generator=generator)
    a64, b64, w64, x64 = a.detach().double(), b.detach().double(), w.detach().double(), x.double()
    scaling = ALPHA / R

    layer.train()
    torch.manual_seed(7)
    trained = layer(x).double()
    torch.manual_seed(7)  # the same draw: the mask nn.Dropout applied (kept entries scaled by 1/(1-p))
    dropped = torch.nn.functional.dropout(torch.ones_like(x), p, training=True).double() * x64
    assert 0 < int((dropped == 0).sum()) < x.numel(), "the mask drops some entries and keeps others"
    torch.testing.assert_close(trained, x64 @ w64.T + scaling * dropped @ a64.T @ b64.T, rtol=1e-5, atol=1e-5)

    layer.eval()
    torch.testing.assert_close(layer(x).double(), x64 @ w64.T + scaling * x64 @ a64.T @ b64.T, rtol=1e-5, atol=1e-5)
    # The default (0) leaves the adapter's input alone in training too.
    plain = _peft(tiny_model_dir).get_submodule("base_model.model." + LORA_LAYERS[0])
    assert isinstance(plain.lora_dropout["default"], torch.nn.Identity)


def test_lora_dropout_masks_are_a_function_of_seed_task_step_and_rank(tiny_model_dir) -> None:
    """The session seeds every step's masks with seed_lora_dropout: the same position draws the same
    masks whatever was drawn before (a resume), another step, task, rank or seed other masks."""
    model = add_lora(_base(tiny_model_dir), LoraSettings(r=R, alpha=ALPHA, targets=["q_proj", "v_proj"], dropout=0.5))
    layer = model.get_submodule("base_model.model." + LORA_LAYERS[0])
    generator = torch.Generator().manual_seed(4)
    layer.lora_B["default"].weight.data.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=generator))
    x = torch.randn(2, 6, layer.in_features, generator=generator)
    layer.train()

    def output(seed: int, task: int, step: int, rank: int) -> torch.Tensor:
        seed_lora_dropout(seed, task, step, rank)
        return layer(x).detach()

    first = output(0, 1, 3, 0)
    torch.rand(1000)  # whatever the generator drew in between (the steps a resumed run never ran)
    assert torch.equal(output(0, 1, 3, 0), first)
    for other in ((0, 1, 4, 0), (0, 2, 3, 0), (0, 1, 3, 1), (1, 1, 3, 0)):
        assert not torch.equal(output(*other), first), other


def test_reinit_is_deterministic_per_seed_task_and_layer(tiny_model_dir) -> None:
    first = _reinit_a(tiny_model_dir, init_seed=0, seed=0, task=2)
    # A different starting adapter (another PEFT draw): the re-drawn A depends only on (seed, task, layer).
    again = _reinit_a(tiny_model_dir, init_seed=99, seed=0, task=2)
    other_task = _reinit_a(tiny_model_dir, init_seed=0, seed=0, task=3)
    other_seed = _reinit_a(tiny_model_dir, init_seed=0, seed=1, task=2)
    for name in LORA_LAYERS:
        assert torch.equal(first[name], again[name]), name
        assert not torch.equal(first[name], other_task[name]), name
        assert not torch.equal(first[name], other_seed[name]), name
        # PEFT's default A init: kaiming uniform (a = √5), i.e. U(−1/√n, 1/√n) with n = in_features.
        bound = 1 / math.sqrt(first[name].shape[1])
        assert first[name].abs().max() <= bound and first[name].abs().max() > 0.8 * bound, name
    # Same (seed, task), same shape, different layers: different draws.
    assert not torch.equal(first["model.layers.0.self_attn.q_proj"], first["model.layers.1.self_attn.q_proj"])
    assert not torch.equal(first["model.layers.0.self_attn.q_proj"], first["model.layers.0.self_attn.v_proj"])


def test_canonical_name_documented_examples() -> None:
    prefix = "base_model.model."
    assert canonical_name(prefix + "model.layers.3.self_attn.q_proj.lora_A.default.weight") == (
        "model.layers.3.self_attn.q_proj.lora_A"
    )
    assert canonical_name(prefix + "model.layers.3.self_attn.q_proj.lora_B.default.weight") == (
        "model.layers.3.self_attn.q_proj.lora_B"
    )
    assert canonical_name(prefix + "model.layers.3.self_attn.q_proj.base_layer.weight") == "model.layers.3.self_attn.q_proj"
    assert canonical_name(prefix + "model.layers.0.mlp.gate_proj.weight") == "model.layers.0.mlp.gate_proj"
    assert canonical_name("model.layers.0.mlp.gate_proj.weight") == "model.layers.0.mlp.gate_proj"  # not wrapped
    assert canonical_name("lm_head.weight") == "lm_head"


def test_canonical_names_do_not_depend_on_peft_wrapping(tiny_model_dir) -> None:
    plain = [n.removesuffix(".weight") for n, _ in _base(tiny_model_dir).named_parameters()]
    wrapped = [canonical_name(n) for n, _ in _peft(tiny_model_dir).named_parameters()]
    assert len(set(wrapped)) == len(wrapped), "two parameters share a canonical name"
    lora = sorted(n for n in wrapped if ".lora_" in n)
    assert lora == sorted(f"{n}.lora_{f}" for n in LORA_LAYERS for f in "AB")
    assert sorted(n for n in wrapped if ".lora_" not in n) == sorted(plain)
    assert sorted(lora_factor_names(_peft(tiny_model_dir))) == lora


def test_canonical_name_does_not_depend_on_adapter_name(tiny_model_dir) -> None:
    """The docstring promises independence of PEFT's adapter name, not only of "default"."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(tiny_model_dir), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]),
                           adapter_name="task1")
    lora = sorted(canonical_name(n) for n, _ in model.named_parameters() if ".lora_" in n)
    assert lora == sorted(f"model.layers.{i}.self_attn.q_proj.lora_{f}" for i in range(LAYERS) for f in "AB")


TARGETS = TargetsConfig(full_targets=["mlp.gate_proj"])
OPTIMIZER = OptimizerConfig(rank=4, update_gap=7, scale=0.5, projector="exact", shared_threshold=0.8, lr_lora=1e-3,
                            lr_full=2e-4, lr_plain=3e-5, weight_decay=0.01)
LORA_A = sorted(f"{n}.lora_A" for n in LORA_LAYERS)
LORA_B = sorted(f"{n}.lora_B" for n in LORA_LAYERS)
GATES = [f"model.layers.{i}.mlp.gate_proj" for i in range(LAYERS)]


def _groups(model_dir, method: str, targets: TargetsConfig = TARGETS):
    model = _base(model_dir) if method == "seq-ft" else _peft(model_dir)
    groups = build_param_groups(model, method, targets, OPTIMIZER)
    # Exactly the grouped tensors train; each tensor in one group; names match the tensors.
    names_by_id = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    for group in groups:
        assert [names_by_id[id(p)] for p in group["params"]] == list(group["names"])
    return model, groups


def _summary(groups) -> list[tuple[str, list[str], float, float | None]]:
    return [(g["role"], sorted(g["names"]), g["lr"], g.get("shared_threshold")) for g in groups]


@pytest.mark.parametrize("method", ["gorp", "galore"])
def test_roles_projected_methods(tiny_model_dir, method) -> None:
    _, groups = _groups(tiny_model_dir, method)
    threshold = 0.8 if method == "gorp" else 0.0  # galore = GORP without the shared space
    assert _summary(groups) == [("lora_a", LORA_A, 1e-3, threshold), ("lora_b", LORA_B, 1e-3, threshold),
                                ("full", GATES, 2e-4, threshold)]
    full = groups[2]
    assert (full["rank"], full["update_gap"], full["scale"], full["projector"]) == (4, 7, 0.5, "exact")
    assert all(g["weight_decay"] == 0.01 for g in groups)


@pytest.mark.parametrize("method", ["seq-lora", "o-lora", "mtl"])
def test_roles_plain_lora_methods(tiny_model_dir, method) -> None:
    model, groups = _groups(tiny_model_dir, method)
    assert [(g["role"], sorted(g["names"]), g["lr"]) for g in groups] == [("plain", LORA_A, 1e-3), ("plain", LORA_B, 1e-3)]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "gate_proj" in n)


def test_roles_seq_ft_trains_everything(tiny_model_dir) -> None:
    model, groups = _groups(tiny_model_dir, "seq-ft")
    everything = sorted(n.removesuffix(".weight") for n, _ in model.named_parameters())
    assert len(everything) == 1 + LAYERS * 9 + 2  # embeddings; 7 linears + 2 norms per layer; final norm, lm_head
    assert [(g["role"], sorted(g["names"]), g["lr"]) for g in groups] == [("plain", everything, 3e-5)]


def test_roles_cover_every_method() -> None:
    assert set(METHODS) == {"gorp", "galore", "seq-lora", "o-lora", "mtl", "seq-ft"}


def test_full_targets_patterns_and_errors(tiny_model_dir) -> None:
    regex = TargetsConfig(full_targets=[r"re:layers\.1\.mlp\.(gate|up)_proj$"])
    _, groups = _groups(tiny_model_dir, "gorp", regex)
    assert sorted(groups[2]["names"]) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    # Patterns match at a dot boundary: "ate_proj" is not "gate_proj".
    with pytest.raises(RoleError, match="ate_proj"):
        build_param_groups(_peft(tiny_model_dir), "gorp", TargetsConfig(full_targets=["ate_proj"]), OPTIMIZER)
    # gate_proj is 72 × 32: k = 33 does not fit.
    with pytest.raises(RoleError, match="gate_proj"):
        build_param_groups(_peft(tiny_model_dir), "gorp", TARGETS, dataclasses.replace(OPTIMIZER, rank=33))
    with pytest.raises(RoleError, match="sgd"):
        build_param_groups(_peft(tiny_model_dir), "sgd", TARGETS, OPTIMIZER)
    with pytest.raises(RoleError):  # a LoRA method on a model without LoRA factors
        build_param_groups(_base(tiny_model_dir), "seq-lora", TARGETS, OPTIMIZER)
