"""Per-task PEFT adapters and the ``full`` targets' delta on one process (gorp_ds/export/peft_adapter.py),
and the prompt record (gorp_ds/cl/prompt_record.py).

A tiny LLaMA with gorp's LoRA (q, v) and a full-rank target (gate_proj, its master the parameter
itself: the DeepSpeed-master path of the writer) goes through one "task": the task-start values are
written, the full target and the adapter change, the LoRA is merged the engine's way and the task's
export written. Then the model before the task, plus the delta, with ``PeftModel.from_pretrained``,
gives the export's logits (fp32, ≤ 1e-5); in bf16 the delta is exact and the LoRA targets are one
bf16 rounding away. The 2-rank ZeRO-2 run with projected targets is tests/integration/test_cl_export.py.
"""

from __future__ import annotations

import pytest
import torch

from gorp_ds.export import export_hf_dir
from gorp_ds.export.peft_adapter import full_target_names, write_adapter, write_full_delta, write_task_start
from gorp_ds.models import LoraSettings, TargetsConfig, add_lora, build_param_groups
from gorp_ds.models.lora import lora_layers, lora_merge_record, merge_and_reinit_
from gorp_ds.optim import GORP
from gorp_ds.optim.config import OptimizerConfig
from gorp_ds.zero import LocalDistributor

GATE = [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_model import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _one_task(tokenizer, folder, dtype: torch.dtype) -> dict:
    """Export before, one simulated task (full target and adapter trained), the merge, the files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config).to(dtype), LoraSettings(r=4, alpha=8.0, targets=["q_proj", "v_proj"]))
    groups = build_param_groups(model, "gorp", TargetsConfig(full_targets=["mlp.gate_proj"]), OptimizerConfig(rank=2))
    optimizer = GORP(groups)
    handle = LocalDistributor(optimizer, {n: p for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])})
    assert full_target_names(handle) == [g.removesuffix(".weight") for g in GATE]
    export_hf_dir(model, handle, tokenizer, dtype, str(folder / "before"))
    start = folder / "start.safetensors"
    assert write_task_start(model, handle, dtype, str(start)) > 0
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the "training": the full targets move, the adapter is trained (B ≠ 0)
        for key in GATE:
            weight = model.get_base_model().get_parameter(key)
            weight.add_((0.05 * torch.randn(weight.shape, generator=generator)).to(dtype))
        for layer in lora_layers(model).values():
            for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                factor.copy_((0.3 * torch.randn(factor.shape, generator=generator)).to(dtype))
    record = lora_merge_record(model)  # what the task's boundary merges (as session.close_adapters does)
    merge_and_reinit_(model, seed=0, task_index=0)
    export_hf_dir(model, handle, tokenizer, dtype, str(folder / "after"))
    assert write_full_delta(model, handle, dtype, str(start), str(folder / "delta.safetensors")) > 0
    assert write_adapter(model, record, str(folder / "adapter"), "tiny") > 0
    # without the task-start values (e.g. the setting turned on by a resume in mid-task): no delta
    assert write_full_delta(model, handle, dtype, str(folder / "missing"), str(folder / "none.safetensors")) is None
    assert not (folder / "none.safetensors").exists()
    return {"record": record, "folder": folder}


def _state(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("Code the color.\nInput: my red old horse\nAnswer:")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fp32_adapter_with_delta_gives_the_export(tokenizer, tmp_path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    done = _one_task(tokenizer, tmp_path, torch.float32)
    delta = load_file(tmp_path / "delta.safetensors")
    before, after = _state(tmp_path / "before"), _state(tmp_path / "after")
    assert sorted(delta) == GATE
    for key in GATE:
        assert delta[key].dtype == torch.float32 and torch.equal(delta[key], after[key] - before[key])
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(factors) == 8
    for layer, merge in done["record"].items():
        assert torch.equal(factors[f"base_model.model.{layer}.lora_A.weight"], merge["A"])
        assert torch.equal(factors[f"base_model.model.{layer}.lora_B.weight"], merge["B"])

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "before", dtype=torch.float32)
    with torch.no_grad():
        for key, value in delta.items():
            base.get_parameter(key).add_(value)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    want = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "after", dtype=torch.float32), tokenizer)
    assert float((_logits(model, tokenizer) - want).abs().max()) <= 1e-5
    with model.disable_adapter():
        assert float((_logits(model, tokenizer) - want).abs().max()) > 1e-3


def test_bf16_delta_is_exact_and_lora_targets_one_rounding_away(tokenizer, tmp_path) -> None:
    """bf16: before (bf16, read in fp32) + delta is exactly the exported bf16 full target; a LoRA
    target's ``before + (α/r) B A`` (what PEFT adds in the forward pass) is within one bf16 rounding
    of the export's ``round(W + (α/r) B A)``, and the adapter's factors are the fp32 values merged."""
    from safetensors.torch import load_file

    done = _one_task(tokenizer, tmp_path, torch.bfloat16)
    delta = load_file(tmp_path / "delta.safetensors")
    before, after = _state(tmp_path / "before"), _state(tmp_path / "after")
    assert before[GATE[0]].dtype == after[GATE[0]].dtype == torch.bfloat16
    for key in GATE:
        assert delta[key].dtype == torch.float32
        assert torch.equal(before[key].float() + delta[key], after[key].float()), key
        assert not torch.equal(before[key], after[key])
    for layer, merge in done["record"].items():
        key = f"{layer}.weight"
        update = float(merge["scaling"]) * (merge["B"].double() @ merge["A"].double())
        assert update.abs().max() > 0
        peft_sum = before[key].double() + update
        exported = after[key].double()
        assert ((exported - peft_sum).abs() <= exported.abs() * 2**-8 + 1e-30).all(), key
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in factors.values())


def test_no_full_targets_no_delta(tokenizer, tmp_path) -> None:
    """seq-lora trains only LoRA factors: nothing to write beside its adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=72, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = add_lora(LlamaForCausalLM(config), LoraSettings(r=2, alpha=4.0, targets=["q_proj"]))
    optimizer = GORP(build_param_groups(model, "seq-lora"))
    handle = LocalDistributor(optimizer, {n: p for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])})
    assert full_target_names(handle) == []
    assert write_task_start(model, handle, torch.float32, str(tmp_path / "start.safetensors")) is None
    assert write_full_delta(model, handle, torch.float32, str(tmp_path / "start.safetensors"),
                            str(tmp_path / "delta.safetensors")) is None
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------- the prompt record
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_prompt_record_gives_the_evaluations_prompt_ids_and_budget(tokenizer, fmt) -> None:
    """Following the record (template, chat template, special-token flag, EOS rule) gives the token
    ids the evaluation feeds the model (``encode_prompts``), and ``max_new_tokens`` is the longest
    label as the answer is written, plus EOS (or ``--max-target-length``)."""
    import copy

    from gorp_ds.cl.config import RunConfig
    from gorp_ds.cl.prompt_record import prompt_record
    from gorp_ds.data.prompting import PromptFormat
    from gorp_ds.data.tasks import Example, Task
    from gorp_ds.data.tokenize import encode_prompts

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT
    tasks = [Task("sentiment", ("good", "terrible"), "Is this {good} or bad?",
                  test=[Example("a fine and moving film", "good"), Example("dull", "terrible")]),
             Task("colors", ("red", "blue"), "Which color?", test=[Example("the sky", "blue")])]
    record = prompt_record(tasks, tok, RunConfig.from_flat(prompt_format=fmt), "gorp")
    assert record["format"] == fmt and record["chat_template"] is (fmt == "chat")
    assert record["tokenizer_chat_template"] == (CHAT if fmt == "chat" else None)
    for task, entry in zip(tasks, record["tasks"]):
        answer = (lambda label: label) if fmt == "chat" else (lambda label: " " + label)
        longest = max(len(tok(answer(label), add_special_tokens=False)["input_ids"]) for label in task.labels)
        assert entry["max_new_tokens"] == longest + 1
        for example in task.test:
            prompt = entry["template"].replace(record["input_slot"], example.text)
            if record["chat_template"]:
                prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            assert prompt == PromptFormat(fmt).prompt(tok, task, example)
            ids = tok(prompt, add_special_tokens=record["add_special_tokens"])["input_ids"]
            if ids[-1] == tok.eos_token_id != tok.bos_token_id:
                ids = ids[:-1]
            evaluated = encode_prompts(tok, [PromptFormat(fmt).prompt(tok, task, example)], 256,
                                       PromptFormat(fmt).add_special_tokens)["input_ids"][0].tolist()
            assert ids == evaluated
            if fmt == "chat":  # the template's BOS, not a second one from the tokenizer
                assert ids.count(tok.bos_token_id) == 1
    fixed = prompt_record(tasks, tok, RunConfig.from_flat(prompt_format=fmt, max_target_length=7), "gorp")
    assert [e["max_new_tokens"] for e in fixed["tasks"]] == [7, 7]


def test_a_task_with_another_prompt_gets_no_template(tokenizer) -> None:
    """A task whose prompt is not instruction + input + answer cue: the record says so (template
    None) instead of giving a template that would not reproduce it."""
    from gorp_ds.cl.config import RunConfig
    from gorp_ds.cl.prompt_record import prompt_record
    from gorp_ds.data.tasks import Example, Task

    class Reversed(Task):
        def prompt(self, example: Example) -> str:
            return f"{example.text}\n{self.instruction}"

    tasks = [Task("plain", ("a", "b"), "Pick.", test=[Example("x", "a")]),
             Reversed("odd", ("a", "b"), "Pick.", test=[Example("x", "a")])]
    record = prompt_record(tasks, tokenizer, RunConfig(), "seq-lora")
    assert [e["template"] for e in record["tasks"]] == ["Pick.\nInput: {input}\nAnswer:", None]


def test_the_record_names_every_setting_an_eval_only_must_repeat(tokenizer) -> None:
    """``record_differences``: nothing for the run's own settings; otherwise each differing setting
    by its flag, with this evaluation's value and the run's (what --eval-only warns with)."""
    from gorp_ds.cl.config import RunConfig
    from gorp_ds.cl.prompt_record import prompt_record, record_differences
    from gorp_ds.data.tasks import Example, Task

    tasks = [Task("colors", ("red", "blue"), "Which color?", test=[Example("the sky", "blue")]),
             Task("fruit", ("pear", "plum"), "Which fruit?", test=[Example("green", "pear")])]
    run = RunConfig.from_flat(eval_samples=100, max_length=64)
    record = prompt_record(tasks, tokenizer, run, "gorp")
    assert record["eval_samples"] == 100 and record["max_prompt_tokens"] == 64
    assert record_differences(record, tasks, run) == []
    other = RunConfig.from_flat(eval_samples=500, max_length=256, prompt_format="chat")
    assert record_differences(record, tasks[:1], other) == [
        "--tasks colors (the run: colors,fruit)", "--prompt-format chat (the run: plain)",
        "--max-length 256 (the run: 64)", "--eval-samples 500 (the run: 100)"]
    older = {k: v for k, v in record.items() if k != "eval_samples"}  # a record written before the field
    assert record_differences(older, tasks, other)[-1] == "--max-length 256 (the run: 64)"
