"""Generated data files and model directories: each loads cleanly or is refused with one line.

The property, for every input Hypothesis builds: the loaders the CLI calls either succeed, and what
they return is exactly what the files hold (the examples as the JSON parses, every weight equal to
the file's tensor, a finite loss), or they raise one of the project's user errors (``USER_ERRORS``),
which ``gorp_ds.cli`` prints as ``gorp_ds: error: <host>: <message>`` with exit status 2: one line,
printable as UTF-8, naming the file. Any other exception is a failure (Hypothesis prints the input).

In-process: the data side calls ``load_task_sequence`` (what ``prepare`` calls) and tokenizes what
loaded; the model side builds the run configuration from flags (as the launcher does), runs
``preflight`` and ``load_model_and_tokenizer`` (what every method's session calls). Two cases go
through the real 2-rank launcher at the end: a weights file holding a NaN (refused when the model is
loaded, after the start-up checks) and a data file holding a lone surrogate (refused at start-up).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gorp_ds.cl.command_line import add_arguments, build_run_config
from gorp_ds.cl.preflight import preflight
from gorp_ds.cl.user_errors import USER_ERRORS
from gorp_ds.data import DataConfig, encode_for_training, load_task_sequence
from gorp_ds.data.tasks import lone_surrogate
from gorp_ds.data.tokenize import check_fits
from gorp_ds.models.loading import ModelConfig, load_model_and_tokenizer
from tests.support import REPO
from tests.support.launch import clean_env, launch_train
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow

ERROR_PREFIX = "gorp_ds: error:"
# Reproducible (derandomize) and without a deadline: a model load takes ~0.1 s, the first one seconds.
FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                   HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])
DATA_EXAMPLES, MODEL_EXAMPLES = 250, 150
EXAMPLES_RUN = {"data": 0, "model": 0, "hf": 0}
OUTCOMES: Counter[str] = Counter()  # "<property> <input kind>: loaded|refused", for the report below


def _seen(label: str) -> None:
    event(label)
    OUTCOMES[label] += 1


def rendered(err: BaseException) -> str:
    """The line ``gorp_ds.cli`` prints for a user error (``_run``: ``gorp_ds: error: <host>: <err>``),
    checked to be one printable line."""
    assert isinstance(err, USER_ERRORS), f"not a user error: {type(err).__name__}: {err}"
    line = f"{ERROR_PREFIX} host: {err}"
    assert len(line.splitlines()) == 1, f"more than one line: {line!r}"
    line.encode("utf-8")  # stderr can print it (a lone surrogate in the message would raise here)
    assert len(line) < 1500, f"{len(line)} characters: {line[:300]!r}..."
    return line


def outcome(call) -> str | None:
    """None when ``call()`` succeeds, else the rendered error line; any other exception propagates."""
    try:
        call()
    except USER_ERRORS as err:
        return rendered(err)
    return None


# ------------------------------------------------------------------------------------ data files
LABELS = ["World", "Sports", "Business"]
# Any code point, surrogates included (Hypothesis leaves them out unless told).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
WORDS = st.sampled_from(["a b", "hello world", "Ünïcødé ✓", "line\nbreak", "tab\tx", "😀 emoji"])
SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc80", "\ud83d"])
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | ANY_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["sentence", "label", "x"]) | ANY_TEXT, inner, max_size=3),
                           max_leaves=8)


@st.composite
def texts(draw) -> str:
    """A sentence or label: ordinary words, any code points, a lone surrogate spliced in, or a long line."""
    kind = draw(st.sampled_from(["words", "any", "surrogate", "long", "empty"]))
    if kind == "words":
        return draw(WORDS)
    if kind == "any":
        return draw(ANY_TEXT)
    if kind == "surrogate":
        word = draw(WORDS)
        cut = draw(st.integers(0, len(word)))
        return word[:cut] + draw(SURROGATES) + word[cut:]
    if kind == "long":
        return "word " * draw(st.sampled_from([2_000, 20_000]))
    return draw(st.sampled_from(["", "   ", "\n"]))


@st.composite
def entries(draw) -> list:
    """A train/test list: mostly valid entries, some with a field missing, of a wrong type, with an
    unknown label or generated text."""
    rows = []
    for i in range(draw(st.integers(0, 5))):
        row: object = {"sentence": f"example {i}", "label": LABELS[i % len(LABELS)]}
        change = draw(st.sampled_from(["none", "none", "drop", "type", "label", "text", "not_object"]))
        if change == "drop":
            del row[draw(st.sampled_from(["sentence", "label"]))]
        elif change == "type":
            row[draw(st.sampled_from(["sentence", "label"]))] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
        elif change == "label":
            row["label"] = draw(st.sampled_from(["world", "Maybe", " World", "World "]) | texts())
        elif change == "text":
            row["sentence"] = draw(texts())
        elif change == "not_object":
            row = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
        rows.append(row)
    return rows


@st.composite
def label_lists(draw) -> object:
    change = draw(st.sampled_from(["none", "extra", "duplicate", "type", "empty"]))
    words = list(LABELS)
    if change == "extra":
        words.append(draw(texts()))
    elif change == "duplicate":
        words.append(draw(st.sampled_from(["world", "SPORTS!", "business."])))
    elif change == "type":
        words[draw(st.integers(0, 2))] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
    elif change == "empty":
        words = draw(st.sampled_from([[], {}, "World"]))
    return words


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]


@st.composite
def file_bytes(draw, document) -> tuple[bytes, str]:
    """The bytes of one data file, and how they were made: the document as JSON in some encoding,
    a random JSON value, random bytes, nothing, or JSON too big for a parser (depth, digits)."""
    kind = draw(st.sampled_from(["json"] * 4 + ["encoded"] * 2 + ["value", "bytes", "empty", "deep", "digits", "cut"]))
    text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    if kind == "json":
        return text.encode("utf-8", "surrogatepass"), kind
    if kind == "encoded":
        encoding = draw(st.sampled_from(ENCODINGS))
        return text.encode(encoding, "replace"), f"encoded {encoding}"
    if kind == "value":
        return json.dumps(draw(JSON_VALUES)).encode(), kind
    if kind == "bytes":
        return draw(st.binary(max_size=64)), kind
    if kind == "empty":
        return draw(st.sampled_from([b"", b"  \n", b"\xef\xbb\xbf"])), kind
    if kind == "deep":
        depth = draw(st.sampled_from([50, 5_000, 100_000]))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth])), kind
    if kind == "digits":
        return b'[{"sentence": "a", "label": ' + b"7" * draw(st.sampled_from([10, 5_000])) + b"}]", kind
    raw = text.encode("utf-8", "surrogatepass")
    return raw[: draw(st.integers(0, max(0, len(raw) - 1)))], kind


def _valid_rows(n: int = 4) -> list[dict]:
    return [{"sentence": f"example {i}", "label": LABELS[i % len(LABELS)]} for i in range(n)]


@st.composite
def task_folders(draw) -> dict:
    """A CL_Benchmark task folder's three files; exactly one of them generated."""
    target = draw(st.sampled_from(["labels.json", "train.json", "test.json"]))
    document = label_lists() if target == "labels.json" else entries()
    data, how = draw(file_bytes(draw(document)))
    files = {"labels.json": json.dumps(LABELS).encode(), "train.json": json.dumps(_valid_rows()).encode(),
             "test.json": json.dumps(_valid_rows()).encode()}
    files[target] = data
    return {"files": files, "target": target, "how": how}


def _expected_examples(raw: bytes) -> list[tuple[str, str]]:
    """The reference reading of a data file that loaded: UTF-8 (a BOM allowed), JSON, each entry's
    sentence and label."""
    return [(row["sentence"], row["label"]) for row in json.loads(raw.decode("utf-8-sig"))]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_data_files_load_cleanly_or_are_refused_in_one_line(tokenizer) -> None:
    @settings(max_examples=DATA_EXAMPLES, **FUZZ)
    @given(case=task_folders())
    def check(case: dict) -> None:
        EXAMPLES_RUN["data"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "XX" / "fuzz"
            folder.mkdir(parents=True)
            for name, data in case["files"].items():
                (folder / name).write_bytes(data)
            loaded = []
            line = outcome(lambda: loaded.extend(load_task_sequence(DataConfig(data_dir=tmp, tasks=["XX/fuzz"]))))
            _seen(f"data {case['target']} {case['how']}: {'refused' if line else 'loaded'}")
            if line is not None:
                assert str(folder / case["target"]) in line, f"the line does not name {case['target']}: {line}"
                return
            (task,) = loaded
            assert list(task.labels) == json.loads(case["files"]["labels.json"].decode("utf-8-sig"))
            for split in ("train", "test"):
                got = [(e.text, e.label) for e in getattr(task, split)]
                assert got == _expected_examples(case["files"][f"{split}.json"])
            # What the session checks before training (check_fits); once it passes, every example
            # encodes within the budget: no error at the first batch or evaluation that meets it.
            line = outcome(lambda: check_fits(tokenizer, task, 96))
            if line is not None:
                assert "task fuzz:" in line and "label words" in line, line
                return
            for example in task.train + task.test:
                encoded = encode_for_training(tokenizer, task, example, max_length=96)
                assert len(encoded["input_ids"]) <= 96 and encoded["input_ids"][-1] == tokenizer.eos_token_id

    check()


HF_EXAMPLES = 40


def test_datasets_source_loads_cleanly_or_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """The same generated train files through ``hf:json?train=…&test=…`` (the ``datasets`` JSON
    builder): loaded examples are strings of the file's rows, or one line naming the task."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    test_rows = json.dumps(_valid_rows()).encode()

    @settings(max_examples=HF_EXAMPLES, **FUZZ)
    @given(data=entries().flatmap(file_bytes))
    def check(data: tuple[bytes, str]) -> None:
        EXAMPLES_RUN["hf"] += 1
        raw, how = data
        with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
            (Path(tmp) / "train.json").write_bytes(raw)
            (Path(tmp) / "test.json").write_bytes(test_rows)
            spec = f"hf:json?train={tmp}/train.json&test={tmp}/test.json&name=fuzz"
            loaded: list = []
            line = outcome(lambda: loaded.extend(load_task_sequence(DataConfig(tasks=[spec]))))
            _seen(f"hf train.json {how}: {'refused' if line else 'loaded'}")
            if line is not None:
                assert spec in line or f"{tmp}/train.json" in line, line
                return
            (task,) = loaded
            rows = json.loads(raw.decode("utf-8-sig"))
            assert len(task.train) == len(rows)
            for example, row in zip(task.train, rows, strict=True):
                assert example.text == row["sentence"] and example.label in task.labels
                assert lone_surrogate(example.text) is None and lone_surrogate(example.label) is None

    check()


def test_hf_labels_json_and_text_columns_are_checked(tmp_path: Path) -> None:
    """The ``datasets`` source reads its labels.json and its text the same way: a lone surrogate in
    either, or a labels.json in UTF-16, is one line naming the file or the column."""
    folder = tmp_path / "hfsrc"
    folder.mkdir()
    rows = [{"sentence": "a", "label": "World"}, {"sentence": "b", "label": "Sports"}]
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps(rows))
    (folder / "labels.json").write_bytes(json.dumps(["World", "Sports"]).encode("utf-16"))
    line = outcome(lambda: load_task_sequence(DataConfig(tasks=[f"hf:{folder}"])))
    assert line is not None and str(folder / "labels.json") in line and "not UTF-8" in line
    (folder / "labels.json").write_text('["World", "Sports\\udc00"]')
    line = outcome(lambda: load_task_sequence(DataConfig(tasks=[f"hf:{folder}"])))
    assert line is not None and "entry 1" in line and "surrogate" in line
    (folder / "labels.json").write_text(json.dumps(["World", "Sports"]))
    assert outcome(lambda: load_task_sequence(DataConfig(tasks=[f"hf:{folder}"]))) is None


# -------------------------------------------------------------------------------- model directories
SHAPES = st.sampled_from([  # (hidden, layers, heads, kv_heads, intermediate): tiny random LLaMAs
    (16, 1, 2, 1, 24), (16, 2, 4, 2, 40), (32, 2, 4, 2, 72), (24, 3, 2, 2, 32)])
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "head_dim", "max_position_embeddings", "model_type", "rms_norm_eps", "hidden_act",
               "tie_word_embeddings", "rope_parameters", "architectures", "attention_bias", "pad_token_id",
               "eos_token_id", "dtype"]
CONFIG_VALUES = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([2**31, 10**15, 16, 32, 64, 300])
                 | st.floats(allow_nan=True) | st.sampled_from(["abc", "llama", "bert", "silu", "gelu", "", "32"])
                 | st.lists(st.integers(0, 3), max_size=2) | st.dictionaries(st.sampled_from(["rope_type", "x"]),
                                                                             st.sampled_from(["default", 1]), max_size=2))
_TEMPLATES: dict[tuple, Path] = {}


def _template(shape: tuple, tokenizer_dir: Path, root: Path) -> Path:
    """A saved tiny LLaMA of ``shape`` with the fixture's tokenizer (made once per shape)."""
    if shape not in _TEMPLATES:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, layers, heads, kv_heads, intermediate = shape
        folder = root / "template_{}_{}_{}_{}_{}".format(*shape)
        config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False)
        torch.manual_seed(sum(shape))
        LlamaForCausalLM(config).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folder / name)
        _TEMPLATES[shape] = folder
    return _TEMPLATES[shape]


def _edit_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@st.composite
def model_mutations(draw) -> tuple[str, dict]:
    """One change to a valid model directory (or none): a file deleted, cut short, overwritten or
    with bytes flipped; a config key set to a generated value; a layer more or fewer; a tensor
    dropped, added, reshaped or made non-finite; weights as pytorch_model.bin; a random-init:
    directory; a .gguf file of garbage."""
    kind = draw(st.sampled_from(["none", "delete", "truncate", "garbage", "flip", "config", "config", "layers",
                                 "tensor", "tensor", "bin", "random_init", "random_init", "gguf"]))
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    if kind in ("delete", "truncate", "garbage", "flip"):
        return kind, {"file": draw(st.sampled_from(files)), "fraction": draw(st.floats(0, 0.999)),
                      "bytes": draw(st.binary(max_size=48)), "seed": draw(st.integers(0, 2**16)),
                      "count": draw(st.integers(1, 8))}
    if kind == "config":
        return kind, {"key": draw(st.sampled_from(CONFIG_KEYS)), "value": draw(CONFIG_VALUES)}
    if kind == "layers":
        return kind, {"delta": draw(st.sampled_from([-1, 1, 2]))}
    if kind == "tensor":
        return kind, {"how": draw(st.sampled_from(["drop", "add", "reshape", "nan", "inf"])),
                      "pick": draw(st.integers(0, 10**6))}
    if kind == "bin":
        return kind, {"garbage": draw(st.booleans()), "bytes": draw(st.binary(max_size=48))}
    if kind == "random_init":
        return kind, {"drop": draw(st.sampled_from([[], [], [], ["tokenizer.json"],
                                                    ["tokenizer.json", "tokenizer_config.json"], ["config.json"]])),
                      "key": draw(st.sampled_from(CONFIG_KEYS)), "value": draw(CONFIG_VALUES),
                      "edit": draw(st.sampled_from([False, True]))}
    if kind == "gguf":
        return kind, {"magic": draw(st.booleans()), "bytes": draw(st.binary(max_size=64))}
    return kind, {}


def _apply(folder: Path, kind: str, p: dict) -> str:
    """Apply a mutation to a copy of a valid directory; the --model value to load it with."""
    if kind in ("delete", "truncate", "garbage", "flip"):
        file = folder / p["file"]
        data = file.read_bytes()
        if kind == "delete":
            file.unlink()
        elif kind == "truncate":
            file.write_bytes(data[: int(len(data) * p["fraction"])])
        elif kind == "garbage":
            file.write_bytes(p["bytes"])
        else:
            generator = torch.Generator().manual_seed(p["seed"])
            raw = bytearray(data)
            for index in torch.randint(0, len(raw), (p["count"],), generator=generator).tolist():
                raw[index] ^= 1 << int(torch.randint(0, 8, (1,), generator=generator))
            file.write_bytes(bytes(raw))
    elif kind in ("config", "layers") or (kind == "random_init" and p["edit"]):
        config = json.loads((folder / "config.json").read_text())
        if kind == "layers":
            config["num_hidden_layers"] += p["delta"]
        else:
            config[p["key"]] = p["value"]
        (folder / "config.json").write_text(json.dumps(config))
    if kind == "tensor":
        def change(state: dict) -> None:
            names = sorted(state)
            name = names[p["pick"] % len(names)]
            if p["how"] == "drop":
                del state[name]
            elif p["how"] == "add":
                state["model.extra.weight"] = torch.zeros(3)
            elif p["how"] == "reshape":
                state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
            else:
                state[name][(0,) * state[name].dim()] = float("nan") if p["how"] == "nan" else -float("inf")
        _edit_weights(folder, change)
    elif kind == "bin":
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
        if p["garbage"]:
            (folder / "pytorch_model.bin").write_bytes(p["bytes"])
    elif kind == "random_init":
        (folder / "model.safetensors").unlink()
        for name in p["drop"]:
            (folder / name).unlink()
        return f"random-init:{folder}"
    elif kind == "gguf":
        file = folder / "model.gguf"
        file.write_bytes((b"GGUF" if p["magic"] else b"") + p["bytes"])
        return str(file)
    return str(folder)


def _reference_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of the directory's weight files, read with the file formats' own readers."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def _run_config(model: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_run_config(parser.parse_args(["--preset", "none", "--model", model, "--method", "gorp", "--dtype",
                                               "fp32", "--no-gradient-checkpointing"]))


def test_model_directories_load_cleanly_or_are_refused_in_one_line(tiny_model_dir, tmp_path) -> None:
    @settings(max_examples=MODEL_EXAMPLES, **FUZZ)
    @given(shape=SHAPES, mutation=model_mutations())
    def check(shape: tuple, mutation: tuple[str, dict]) -> None:
        EXAMPLES_RUN["model"] += 1
        kind, params = mutation
        with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
            folder = Path(tmp) / "model"
            shutil.copytree(_template(shape, Path(tiny_model_dir), tmp_path), folder)
            model_flag = _apply(folder, kind, params)
            loaded: list = []

            def load() -> None:
                cfg = _run_config(model_flag)
                preflight(cfg)  # what prepare() runs before any training
                loaded.extend(load_model_and_tokenizer(cfg.base_model))  # what each method's session runs

            line = outcome(load)
            _seen(f"model {kind}: {'refused' if line else 'loaded'}")
            if line is not None:
                assert str(folder) in line, f"the line does not name the model: {line}"
                return
            model, tok = loaded
            if not model_flag.startswith("random-init:"):
                reference = _reference_weights(folder)
                state = model.state_dict()
                assert sorted(state) == sorted(reference), "loaded tensors differ from the file's"
                for name, tensor in reference.items():  # nothing re-initialised, nothing altered
                    assert torch.equal(state[name], tensor.to(state[name].dtype)), name
            ids = torch.tensor([tok("Input: hello world\nAnswer: World")["input_ids"]])
            with torch.no_grad():
                loss = model(input_ids=ids, labels=ids).loss
            assert torch.isfinite(loss), f"{kind} {params}: loss {loss}"

    check()


def test_hub_name_without_network_is_one_line(monkeypatch, tmp_path) -> None:
    """A hub name that is neither a local directory nor in the (empty) cache, with the hub offline:
    one line saying so and how to point --model at a directory."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = outcome(lambda: load_model_and_tokenizer(ModelConfig(model="nobody-here/no-such-model", dtype="fp32")))
    assert line is not None and "nobody-here/no-such-model" in line, line
    assert "not in the local Hugging Face cache" in line and "local directory" in line, line
    bad = outcome(lambda: load_model_and_tokenizer(ModelConfig(model="not a name!", dtype="fp32")))
    assert bad is not None and "no such file or directory" in bad and "not a hub name" in bad, bad


def test_examples_were_run() -> None:
    """The two properties ran their full budgets, and each met both outcomes: inputs that load and
    inputs that are refused (a generator that only ever produced one kind would test half)."""
    print("\n".join(f"{count:4d}  {label}" for label, count in sorted(OUTCOMES.items())))
    assert EXAMPLES_RUN["data"] >= DATA_EXAMPLES and EXAMPLES_RUN["model"] >= MODEL_EXAMPLES, EXAMPLES_RUN
    assert EXAMPLES_RUN["hf"] >= HF_EXAMPLES, EXAMPLES_RUN
    for family in ("data", "model"):
        for result in ("loaded", "refused"):
            assert sum(n for label, n in OUTCOMES.items() if label.startswith(family) and label.endswith(result)) >= 10


# --------------------------------------------------------------------------- the real 2-rank launcher
def test_two_rank_launches_refuse_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Through ``deepspeed --num_gpus 2 launch/train.py``: NaN weights (found when each rank loads
    the model) and a lone surrogate in a data file (found at start-up). Both: status 2, one
    ``gorp_ds: error:`` line naming the file, no traceback, no checkpoint written."""
    nan_model = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, nan_model)
    _edit_weights(nan_model, lambda state: state["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 4), float("nan")))
    bench = tmp_path / "bench" / "XX" / "odd"
    bench.mkdir(parents=True)
    (bench / "labels.json").write_text(json.dumps(["yes", "no"]))
    rows = [{"sentence": f"s {i}", "label": ["yes", "no"][i % 2]} for i in range(8)]
    (bench / "train.json").write_text(json.dumps(rows))
    rows[5]["sentence"] = "half a pair \ud83d here"
    (bench / "test.json").write_text(json.dumps(rows))  # ensure_ascii: the surrogate as the escape \ud83d
    common = ["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--method", "gorp", "--max-steps-per-task", "1",
              "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-samples", "2"]
    cases = {
        "nan": ([*common, "--model", str(nan_model), "--output-dir", str(tmp_path / "out_nan")],
                ("model.layers.1.mlp.up_proj.weight", "NaN", str(nan_model))),
        "surrogate": ([*common, "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "bench"),
                       "--tasks", "XX/odd", "--output-dir", str(tmp_path / "out_surrogate")],
                      (str(bench / "test.json"), "entry 5", '"sentence"', "surrogate")),
    }
    procs = side_by_side(*(lambda argv=argv: launch_train(argv, env=clean_env(OMP_NUM_THREADS="1",
                                                                            PYTHONPATH=str(REPO)), timeout=240)
                           for argv, _ in cases.values()))  # independent launches, side by side
    for (name, (_, needles)), proc in zip(cases.items(), procs):
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, f"{name}: {output[-3000:]}"
        lines = [line for line in output.splitlines() if ERROR_PREFIX in line]
        assert len(lines) == 1, f"{name}: {output[-3000:]}"
        assert all(n in lines[0] for n in needles), f"{name}: {lines[0]}"
        assert "Traceback" not in output, f"{name}: {output[-3000:]}"
        out = tmp_path / f"out_{name}"
        assert not list(out.rglob("checkpoints/*")) if out.exists() else True, f"{name}: trained before refusing"

