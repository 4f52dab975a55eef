"""The task-boundary LoRA merge is exact in fp32 across tasks (a bf16 base weight keeps its low bits),
and O-LoRA's regularisers: the orthogonality term's value and gradient against a float64 re-derivation,
λ2's finite gradient at B = 0, and old adapters that a task's training leaves exactly as they were."""

from __future__ import annotations

import torch

from gorp_ds.models import (
    LoraSettings,
    ModelConfig,
    TargetsConfig,
    add_lora,
    build_param_groups,
    load_model_and_tokenizer,
)
from gorp_ds.models.lora import (
    base_master,
    lora_layers,
    lora_merge_record,
    merge_and_reinit_,
    merge_remainder,
    merged_base_weight,
    replay_lora_merges_,
)
from gorp_ds.models.olora import OLoraPenalty
from gorp_ds.optim import GORP
from gorp_ds.optim.config import OptimizerConfig

SETTINGS = LoraSettings(r=4, alpha=16.0, targets=["q_proj", "v_proj"])  # scaling 4


def _bf16_peft(model_dir) -> torch.nn.Module:
    model, _ = load_model_and_tokenizer(ModelConfig(model=str(model_dir), dtype="bf16", gradient_checkpointing=False))
    return add_lora(model, SETTINGS)


def _random_masters(model, generator, scale: float) -> dict[str, torch.Tensor]:
    """fp32 "trained" factors: written into the bf16 layers and returned as their fp32 masters."""
    masters = {}
    for name, layer in lora_layers(model).items():
        for factor in ("lora_A", "lora_B"):
            weight = getattr(layer, factor)["default"].weight
            value = torch.randn(weight.shape, generator=generator) * scale
            masters[f"{name}.{factor}"] = value
            weight.data.copy_(value.to(weight.dtype))
    return masters


def test_consecutive_merges_accumulate_exactly_in_fp32(tiny_model_dir) -> None:
    model = _bf16_peft(tiny_model_dir)
    layers = lora_layers(model)
    start = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    generator = torch.Generator().manual_seed(3)
    fp32 = {n: w.float() for n, w in start.items()}  # the same sums in fp32, one merge at a time
    fp64 = {n: w.double() for n, w in start.items()}  # the exact sums
    naive = {n: w.clone() for n, w in start.items()}  # bf16 + bf16 per merge: the rounding this replaces
    records = []
    for task in range(6):
        # Updates well below a bf16 ulp of W (|W| ~ 0.02-0.1): rounding each merge loses most of them.
        masters = _random_masters(model, generator, scale=0.002)
        records.append(lora_merge_record(model, masters))
        for name in layers:
            delta = masters[f"{name}.lora_B"] @ masters[f"{name}.lora_A"] * 4.0
            fp32[name] = fp32[name] + delta
            fp64[name] = fp64[name] + masters[f"{name}.lora_B"].double() @ masters[f"{name}.lora_A"].double() * 4.0
            naive[name] = (naive[name].float() + delta).to(torch.bfloat16)
        merge_and_reinit_(model, seed=0, task_index=task, masters=masters)

    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        assert weight.dtype == torch.bfloat16 and merge_remainder(layer).dtype == torch.int16
        master = base_master(layer)
        # Bit-identical to summing in fp32 (the remainder holds the low 16 bits exactly) ...
        assert torch.equal(master, fp32[name]), name
        # ... and to fp32 rounding of the exact sum; the bf16 weight is that value rounded once.
        assert (master.double() - fp64[name]).abs().max() < 1e-6, name
        differ = weight != master.to(torch.bfloat16)  # only on exact ties (rounded away from zero there)
        assert torch.all((master.view(torch.int32)[differ] & 0xFFFF) == 0x8000), name
        # The rounding this replaces: bf16 + bf16 at every merge drifts by far more than fp32 does.
        exact_error = (master.double() - fp64[name]).abs().mean()
        naive_error = (naive[name].double() - fp64[name]).abs().mean()
        assert naive_error > 100 * exact_error, (name, naive_error.item(), exact_error.item())
        # With B zero after the re-init, the merged weight an export writes is W itself.
        assert torch.equal(merged_base_weight(layer), weight), name

    # Resume rebuilds the weights from the records: the same bf16 values and the same low bits.
    fresh = _bf16_peft(tiny_model_dir)
    for param in fresh.parameters():
        param.requires_grad_(False)
    assert replay_lora_merges_(fresh, records) == 6 * len(layers)
    for name, layer in lora_layers(fresh).items():
        assert torch.equal(layer.get_base_layer().weight, layers[name].get_base_layer().weight), name
        assert torch.equal(merge_remainder(layer), merge_remainder(layers[name])), name
    assert not any(n.endswith("lora_merge_remainder") for n in fresh.state_dict()), "the remainder is not saved"


def test_orthogonality_term_and_gradient_match_float64(tiny_model_dir) -> None:
    model = _bf16_peft(tiny_model_dir)
    model.float()  # fp32 parameters: the float64 reference then checks the math, not bf16 rounding
    layers = lora_layers(model)
    generator = torch.Generator().manual_seed(11)
    old = {n: [torch.randn(4, layer.in_features, generator=generator) for _ in range(3)]  # three earlier tasks
           for n, layer in layers.items()}
    for layer in layers.values():
        layer.lora_A["default"].weight.data.normal_(generator=generator)
        layer.lora_B["default"].weight.data.normal_(generator=generator)
    lambda_orth, lambda_l2 = 0.7, 0.3
    penalty = OLoraPenalty(model, old, lambda_orth, lambda_l2, torch.device("cpu"))
    value = penalty()
    value.backward()

    expected = torch.zeros((), dtype=torch.float64)
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight.detach().double()  # r × n
        b = layer.lora_B["default"].weight.detach().double()
        stacked = torch.cat([o.double() for o in old[name]])  # (3·r) × n
        overlap = stacked @ a.T  # (3·r) × r
        expected += lambda_orth * overlap.abs().sum() + lambda_l2 * (a.norm() + b.norm())
        # Hand-derived: d Σ|O| / dA = sign(O)ᵀ · old;  d ‖X‖_F / dX = X / ‖X‖_F.
        grad_a = lambda_orth * overlap.sign().T @ stacked + lambda_l2 * a / a.norm()
        grad_b = lambda_l2 * b / b.norm()
        torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), grad_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), grad_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0.0)

    # A fresh adapter's B is zero: λ2's subgradient there is 0, not NaN.
    for layer in layers.values():
        layer.lora_B["default"].weight.data.zero_()
        layer.lora_B["default"].weight.grad = None
    OLoraPenalty(model, {}, 0.0, 1.0, torch.device("cpu"))().backward()
    for layer in layers.values():
        assert torch.equal(layer.lora_B["default"].weight.grad, torch.zeros_like(layer.lora_B["default"].weight))


def test_old_adapters_stay_frozen_while_a_task_trains(tiny_model_dir) -> None:
    """Task 2 of o-lora on the bf16 tiny model: its optimizer moves only the new adapter; the merged
    old adapter (base weights and their low bits) and the kept A's are bit-identical at the end,
    and the new A's overlap with the old one shrinks."""
    model = _bf16_peft(tiny_model_dir)
    masters = _random_masters(model, torch.Generator().manual_seed(5), scale=0.05)
    old_a = {n: [masters[f"{n}.lora_A"].clone()] for n in lora_layers(model)}
    merge_and_reinit_(model, seed=0, task_index=0, masters=masters)  # task 1 done: merged, fresh adapter
    groups = build_param_groups(model, "o-lora", TargetsConfig(), OptimizerConfig(lr_lora=1e-2))
    optimizer = GORP(groups)
    frozen = {n: (layer.get_base_layer().weight.clone(), merge_remainder(layer).clone())
              for n, layer in lora_layers(model).items()}
    kept = {n: [a.clone() for a in v] for n, v in old_a.items()}
    penalty = OLoraPenalty(model, old_a, 0.5, 0.0, torch.device("cpu"))
    before = penalty.orthogonality().item()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=generator)
    for _ in range(5):
        optimizer.zero_grad()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        (loss + penalty()).backward()
        optimizer.step()
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, frozen[name][0]), name
        assert torch.equal(merge_remainder(layer), frozen[name][1]), name
        assert all(torch.equal(a, b) for a, b in zip(old_a[name], kept[name], strict=True)), name
        assert layer.lora_B["default"].weight.abs().sum().item() > 0, f"{name}: the new adapter trained"
    assert penalty.orthogonality().item() < 0.5 * before
