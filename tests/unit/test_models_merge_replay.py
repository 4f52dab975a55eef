"""Checkpoints hold no frozen weight: resume rebuilds the base model and replays the finished tasks'
LoRA merges. The replay must give bit-identical weights, and a different base model must be told
apart by its fingerprint."""

from __future__ import annotations

import torch

from gorp_ds.models import LoraSettings, ModelConfig, add_lora, load_model_and_tokenizer, merge_and_reinit_
from gorp_ds.models.loading import fingerprint_mismatch, model_fingerprint
from gorp_ds.models.lora import lora_layers, lora_merge_record, replay_lora_merges_


def _load(model_dir) -> torch.nn.Module:
    model, _ = load_model_and_tokenizer(ModelConfig(model=str(model_dir), dtype="bf16", gradient_checkpointing=False))
    return model


def test_replayed_merges_reproduce_the_weights_bit_exactly(tiny_model_dir) -> None:
    settings = LoraSettings(r=4, alpha=16.0, targets=["q_proj", "v_proj"])
    trained = add_lora(_load(tiny_model_dir), settings)
    generator = torch.Generator().manual_seed(7)
    records = []
    for task in range(3):  # "training": random factors, then the task-boundary merge
        for layer in lora_layers(trained).values():
            for factor in (layer.lora_A, layer.lora_B):
                weight = factor["default"].weight
                weight.data.copy_(torch.randn(weight.shape, generator=generator).to(weight.dtype) * 0.3)
        records.append(lora_merge_record(trained))
        merge_and_reinit_(trained, seed=1, task_index=task)

    fresh = add_lora(_load(tiny_model_dir), settings)
    for param in fresh.parameters():
        param.requires_grad_(False)
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    assert replay_lora_merges_(fresh, records) == 3 * len(lora_layers(fresh))
    expected = dict(trained.named_parameters())
    changed = 0
    for name, param in fresh.named_parameters():
        if ".lora_" in name:
            continue
        assert torch.equal(param, expected[name]), name
        changed += not torch.equal(param, before[name])
    assert changed == len(lora_layers(fresh)), "every LoRA base weight was changed by the replay"
    # An independent fp64 re-derivation of one merged weight agrees to bf16 rounding.
    name = next(iter(lora_layers(fresh)))
    base = before[f"base_model.model.{name}.base_layer.weight"].double()
    for record in records:
        merge = record[name]
        base = base + float(merge["scaling"]) * merge["B"].double() @ merge["A"].double()
    merged = lora_layers(fresh)[name].get_base_layer().weight.double()
    assert torch.allclose(merged, base, rtol=2e-2, atol=2e-2)


def test_fingerprint_tells_base_models_apart(tiny_model_dir) -> None:
    first, second = _load(tiny_model_dir), _load(tiny_model_dir)
    assert fingerprint_mismatch(model_fingerprint(first), model_fingerprint(second)) is None
    saved = model_fingerprint(first)
    with torch.no_grad():
        next(second.parameters()).view(-1)[0] += 1.0
    assert "weights differ" in fingerprint_mismatch(saved, model_fingerprint(second))
    second.config.hidden_act = "gelu"
    assert "config differs in hidden_act" in fingerprint_mismatch(saved, model_fingerprint(second))
