"""The Hugging Face directory writer on one process: a bf16 tiny LLaMA with tied embeddings and a
trained (B ≠ 0) PEFT adapter, written in small shards, loads with ``from_pretrained`` and holds
``W + (α/r) B A`` re-derived in float64 (to bf16 rounding)."""

from __future__ import annotations

import json
import os

import torch

from gorp_ds.export import export_hf_dir
from gorp_ds.models import LoraSettings, TargetsConfig, add_lora, build_param_groups
from gorp_ds.models.lora import lora_layers
from gorp_ds.optim import GORP
from gorp_ds.optim.config import OptimizerConfig
from gorp_ds.zero import LocalDistributor


def _model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config).to(torch.bfloat16), LoraSettings(r=4, alpha=8.0, targets=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        b = layer.lora_B["default"].weight
        b.data.copy_(torch.randn(b.shape, generator=generator).to(b.dtype))
    return model


def test_sharded_tied_bf16_export_loads_and_holds_the_merge(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_model import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    model = _model(tokenizer)
    groups = build_param_groups(model, "gorp", TargetsConfig(full_targets=["mlp.gate_proj"]), OptimizerConfig(rank=2))
    optimizer = GORP(groups)
    params = {n: p for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])}
    handle = LocalDistributor(optimizer, params)  # one process without ZeRO: the masters are the params
    reference = {}
    for key, value in model.get_base_model().state_dict().items():
        if ".lora_" in key:
            continue
        reference[key.replace(".base_layer.", ".")] = value.double()
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        reference[f"{name}.weight"] = layer.base_layer.weight.double() + 2.0 * (b @ a)

    out = tmp_path / "export"
    info = export_hf_dir(model, handle, tokenizer, torch.bfloat16, str(out), max_shard_bytes=8192)
    assert info is not None and info.bytes == sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as save_pretrained does
    # every file as readable as any other new file here (safetensors makes its own 0o600)
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {oct(0o666 & ~mask)}

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and loaded.config.tie_word_embeddings
    state = loaded.state_dict()
    for key, value in reference.items():
        if key == "lm_head.weight":
            continue
        got = state[key].double()
        # one bf16 rounding of the fp32 merge away from the float64 merge
        assert ((got - value).abs() <= value.abs() * 2**-8 + 1e-30).all(), key
    changed = [k for k in reference if "q_proj" in k or "v_proj" in k]
    base = model.get_base_model().state_dict()
    assert all(not torch.equal(state[k], base[k.replace(".weight", ".base_layer.weight")]) for k in changed)


def _handle(model):
    groups = build_param_groups(model, "gorp", TargetsConfig(full_targets=["mlp.gate_proj"]), OptimizerConfig(rank=2))
    optimizer = GORP(groups)
    return LocalDistributor(optimizer, {n: p for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])})


def test_a_failed_export_write_is_one_error_and_the_earlier_export_stays(tmp_path) -> None:
    """ENOSPC while the second weight shard is written (injected, as a full disk fails a write):
    one WriteError naming the export, its bytes and the free bytes; the temporary directory is
    gone and the export already in ``out`` is untouched (a real full disk:
    tests/integration/test_write_real_disk.py)."""
    import pytest

    from gorp_ds import faults
    from gorp_ds.faults import FaultPlan
    from gorp_ds.safe_write import WriteError
    from tests.support.tiny_model import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    model = _model(tokenizer)
    handle = _handle(model)
    out = tmp_path / "export"
    export_hf_dir(model, handle, tokenizer, torch.bfloat16, str(out), max_shard_bytes=8192)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    faults._WRITES.clear()
    faults.install(FaultPlan(write_fault=("export", 3)))  # 1: the directory, 2: shard 1, 3: shard 2
    try:
        with pytest.raises(WriteError) as caught:
            export_hf_dir(model, handle, tokenizer, torch.bfloat16, str(out), max_shard_bytes=8192)
    finally:
        faults._WRITES.clear()
        faults.install(FaultPlan())
    text = str(caught.value)
    assert text.startswith(f"{out}.tmp: cannot write the exported model: No space left on device; it needs "), text
    assert "bytes) are free" in text and "\n" not in text
    assert not (tmp_path / "export.tmp").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
