"""Broken model directories: each is one ModelError line naming the file (or tensor) and the fix,
raised by the checks that run at start-up (``resolve_model_source``, called by the preflight) or,
for what only a load can see, by ``load_model_and_tokenizer`` before any training. Never a
traceback, never a silently re-initialised tensor. (Generated variants: integration/test_fuzz_inputs.py.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gorp_ds.models.loading import ModelConfig, ModelError, load_model_and_tokenizer, resolve_model_source


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _weights(folder: Path, change: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _nan(state: dict) -> None:
    state["model.layers.1.self_attn.k_proj.weight"][2, 5] = float("nan")


def _as_bin(folder: Path, data: bytes | None) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    if data is not None:
        (folder / "pytorch_model.bin").write_bytes(data)


def _cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size * 2 // 3])


# name -> (break the copy; the --model value (``{dir}`` is the copy); where it is found; needles)
CASES: dict[str, tuple[Callable[[Path], None], str, str, tuple[str, ...]]] = {
    "hidden_size_text": (lambda d: _config(d, hidden_size="abc"), "{dir}", "start-up",
                         ("{dir}/config.json", '"hidden_size"', "'abc'", "positive integer")),
    "layers_zero": (lambda d: _config(d, num_hidden_layers=0), "{dir}", "start-up", ('"num_hidden_layers" is 0',)),
    "heads_true": (lambda d: _config(d, num_attention_heads=True), "{dir}", "start-up", ('"num_attention_heads"', "bool")),
    "rms_eps_text": (lambda d: _config(d, rms_norm_eps="small"), "{dir}", "start-up",
                     ("{dir}/config.json", '"rms_norm_eps" is \'small\'', "finite number > 0")),
    # a negative epsilon built and loaded, and every loss was NaN (found by test_fuzz_inputs)
    "rms_eps_negative": (lambda d: _config(d, rms_norm_eps=-1.0), "random-init:{dir}", "start-up",
                         ('"rms_norm_eps" is -1.0', "finite number > 0")),
    "rope_theta_negative": (lambda d: _config(d, rope_parameters={"rope_type": "default", "rope_theta": -5.0}),
                            "{dir}", "start-up", ('"rope_parameters.rope_theta" is -5.0',)),
    "dropout_above_one": (lambda d: _config(d, attention_dropout=2), "{dir}", "start-up",
                          ('"attention_dropout" is 2', "probability")),
    "init_range_negative": (lambda d: _config(d, initializer_range=-0.5), "random-init:{dir}", "start-up",
                            ('"initializer_range" is -0.5',)),
    "layers_absurd": (lambda d: _config(d, num_hidden_layers=10**9), "random-init:{dir}", "start-up",
                      ('"num_hidden_layers" is 1000000000', "at most 1024")),
    "random_init_too_big_for_memory": (lambda d: _config(d, vocab_size=2**36), "random-init:{dir}", "start-up",
                                       ("describes a model of", "GiB", "more than the")),
    "model_type_unknown": (lambda d: _config(d, model_type="no-such-arch"), "{dir}", "start-up",
                           ("{dir}/config.json", "no-such-arch")),
    "more_layers_than_weights": (lambda d: _config(d, num_hidden_layers=3), "{dir}", "start-up",
                                 ("describes 3 layers", "hold 2", "random values", "num_hidden_layers to 2")),
    "fewer_layers_than_weights": (lambda d: _config(d, num_hidden_layers=1), "{dir}", "start-up",
                                  ("describes 1 layers", "hold 2", "dropped")),
    "hidden_size_other": (lambda d: _config(d, hidden_size=64), "{dir}", "start-up",
                          ("lm_head.weight is [300, 32] in model.safetensors but [300, 64]", "and 20 more")),
    "intermediate_other": (lambda d: _config(d, intermediate_size=80), "{dir}", "start-up",
                           ("model.layers.0.mlp.down_proj.weight is [32, 72]", "[32, 80]")),
    "missing_tensor": (lambda d: _weights(d, lambda s: s.pop("model.layers.1.mlp.up_proj.weight")), "{dir}", "load",
                       ("lack tensors", "model.layers.1.mlp.up_proj.weight", "random values")),
    "extra_tensor": (lambda d: _weights(d, lambda s: s.update({"model.extra.weight": torch.zeros(3)})), "{dir}", "load",
                     ("hold tensors its configuration does not describe", "model.extra.weight")),
    "nan_weight": (lambda d: _weights(d, _nan), "{dir}", "load",
                   ("NaN or infinite", "model.layers.1.self_attn.k_proj.weight")),
    "inf_weight": (lambda d: _weights(d, lambda s: s["lm_head.weight"].__setitem__((0, 0), float("inf"))), "{dir}",
                   "load", ("NaN or infinite", "lm_head.weight")),
    "tokenizer_bytes": (lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage"), "{dir}", "start-up",
                        ("{dir}/tokenizer.json", "not UTF-8")),
    "tokenizer_other_json": (lambda d: (d / "tokenizer.json").write_text('{"version": 1}'), "{dir}", "start-up",
                             ("cannot read the tokenizer in {dir}",)),
    "tokenizer_list": (lambda d: (d / "tokenizer_config.json").write_text("[1, 2]"), "{dir}", "start-up",
                       ("{dir}/tokenizer_config.json", "JSON list, not an object")),
    "bin_garbage": (lambda d: _as_bin(d, b"not a pickle at all"), "{dir}", "start-up",
                    ("{dir}/pytorch_model.bin", "not a readable PyTorch weights file")),
    "safetensors_garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00" + b"\xab" * 100), "{dir}",
                            "start-up", ("{dir}/model.safetensors", "damaged header")),
    "safetensors_truncated": (lambda d: _cut(d / "model.safetensors"), "{dir}", "start-up",
                              ("{dir}/model.safetensors", "truncated")),
    "gguf_garbage": (lambda d: (d / "m.gguf").write_bytes(b"PK\x03\x04 not gguf"), "{dir}/m.gguf", "start-up",
                     ("{dir}/m.gguf", 'does not start with "GGUF"')),
    "gguf_magic_then_garbage": (lambda d: (d / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40),
                                "{dir}/m.gguf", "start-up", ("{dir}/m.gguf", "re-download the .gguf file")),
    "random_init_without_tokenizer": (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                                      "random-init:{dir}", "start-up", ("{dir} has no tokenizer",)),
    "random_init_vocab_too_small": (lambda d: _config(d, vocab_size=100), "random-init:{dir}", "start-up",
                                    ("has 300 tokens", "100 rows (vocab_size)")),
}


@pytest.fixture
def broken(tmp_path, tiny_model_dir) -> Callable[[str], tuple[str, Path]]:
    def make(name: str) -> tuple[str, Path]:
        change, model, _, _ = CASES[name]
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        change(folder)
        return model.format(dir=folder), folder
    return make


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_model_is_one_line(broken, name: str) -> None:
    model, folder = broken(name)
    _, _, stage, needles = CASES[name]
    cfg = ModelConfig(model=model, dtype="fp32", gradient_checkpointing=False)
    if stage == "start-up":  # found by the preflight's resolve_model_source, before the output directory is touched
        with pytest.raises(ModelError) as err:
            resolve_model_source(cfg)
    else:  # the start-up checks pass; each method's load refuses before training
        resolve_model_source(cfg)
        with pytest.raises(ModelError) as err:
            load_model_and_tokenizer(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--model {model}: ") and len(message) < 700, message
    missing = [n.format(dir=folder) for n in needles if n.format(dir=folder) not in message]
    assert not missing, f"{message!r} lacks {missing}"


def test_intact_directories_load_every_tensor_from_the_files(tiny_model_dir, tmp_path) -> None:
    """The checks pass intact directories (safetensors and .bin) and random-init: ones; what loads
    equals the files' tensors."""
    from safetensors.torch import load_file

    reference = load_file(Path(tiny_model_dir) / "model.safetensors")
    as_bin = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, as_bin)
    _as_bin(as_bin, None)
    for source in (str(tiny_model_dir), str(as_bin)):
        model, _ = load_model_and_tokenizer(ModelConfig(model=source, dtype="fp32", gradient_checkpointing=False))
        state = model.state_dict()
        assert sorted(state) == sorted(reference)
        assert all(torch.equal(state[name], tensor) for name, tensor in reference.items())
    model, _ = load_model_and_tokenizer(ModelConfig(model=f"random-init:{tiny_model_dir}", dtype="fp32",
                                                    gradient_checkpointing=False))
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in reference.values())
