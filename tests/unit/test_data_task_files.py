"""Task folders with a task.json (gorp_ds/data/task_files.py): instruction and chat files, their
declared metric and generation length, one-line errors naming the file and field, and the length
rule for long free-form answers (the prompt's input text is cut first, then the answer's end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gorp_ds.data import DataConfig, DataError, load_task_sequence
from gorp_ds.data.prompting import PromptFormat
from gorp_ds.data.task_files import DEFAULT_NEW_TOKENS
from gorp_ds.data.tasks import ANSWER_MARK, INPUT_MARK, Example, Task
from gorp_ds.data.tokenize import IGNORE_INDEX, check_fits, encode_for_training

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
            "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_model import make_tokenizer

    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.chat_template = TEMPLATE
    return tok


def _folder(root: Path, name: str, spec: dict | str, **files: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    for file_name, text in files.items():
        (folder / file_name.replace("_", ".")).write_text(text)
    return folder


def _jsonl(*records: dict) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


INSTR = _jsonl({"instruction": "Repeat.", "input": "red cat", "output": "red cat"},
               {"instruction": "Sort.", "input": "b a", "output": "a b"})
CHAT = _jsonl({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi: red"},
                            {"role": "assistant", "content": "red"}]})


def _load(root: Path, *tasks: str) -> list[Task]:
    return load_task_sequence(DataConfig(data_dir=str(root), tasks=list(tasks), eval_samples=None))


def test_instruction_and_chat_folders(tmp_path, tokenizer) -> None:
    _folder(tmp_path / "GEN", "repeat", {"kind": "instruction"}, train_jsonl=INSTR, test_json=json.dumps(
        [{"instruction": "Repeat.", "input": "", "output": "x"}]))
    _folder(tmp_path / "CHAT", "hello", {"kind": "chat", "max_new_tokens": 5}, train_jsonl=CHAT, test_jsonl=CHAT)
    repeat, hello = _load(tmp_path, "repeat", "CHAT/hello")
    assert (repeat.kind, repeat.metric, repeat.max_new_tokens, repeat.labels) == ("instruction", "rougeL",
                                                                                   DEFAULT_NEW_TOKENS, ())
    assert repeat.train[1] == Example("b a", "a b", instruction="Sort.")
    assert repeat.prompt(repeat.train[1]) == f"Sort.{INPUT_MARK}b a{ANSWER_MARK}"
    assert (hello.kind, hello.metric, hello.max_new_tokens) == ("chat", "exact_match", 5)
    ex = hello.test[0]
    assert (ex.text, ex.label, ex.messages) == ("Hi: red", "red", (("system", "Be brief."), ("user", "Hi: red")))
    # a chat example goes through the template in either prompt format; the answer is the assistant turn
    for fmt in (PromptFormat("plain"), PromptFormat("chat")):
        assert fmt.prompt(tokenizer, hello, ex) == "<<SYS>>Be brief.<</SYS>><s>[INST] Hi: red [/INST]"
        enc = encode_for_training(tokenizer, hello, ex, 256, prompt_format=fmt)
        answer = tokenizer("red", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert [t for t in enc["labels"] if t != IGNORE_INDEX] == answer
        assert enc["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's, not a second


def test_classification_folder_may_declare_its_metric(tmp_path) -> None:
    folder = _folder(tmp_path, "topics", {"kind": "classification", "metric": "exact_match", "max_new_tokens": 3})
    (folder / "labels.json").write_text('["World", "Sports"]')
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps([{"sentence": "goal", "label": "Sports"}]))
    (task,) = _load(tmp_path, "topics")
    assert (task.kind, task.metric, task.max_new_tokens, task.labels) == ("classification", "exact_match", 3,
                                                                          ("World", "Sports"))


@pytest.mark.parametrize("spec, files, where, words", [
    ({"kind": "instruction", "metric": "bleu"}, {}, "task.json", ['"metric"', "'bleu'", "rougeL"]),
    ({"kind": "instruction", "metric": "accuracy"}, {}, "task.json", ['"metric"', "label set", "exact_match"]),
    ({"kind": "chat", "metric": "accuracy"}, {}, "task.json", ['"metric"', "label set"]),
    ({"kind": "summary"}, {}, "task.json", ['"kind"', "instruction"]),
    ({"kind": "instruction", "max_new_tokens": 5000}, {}, "task.json", ['"max_new_tokens"', "1024"]),
    ({"kind": "instruction", "metrc": "rougeL"}, {}, "task.json", ["unknown field 'metrc'"]),
    ("{not json", {}, "task.json", ["not valid JSON"]),
    ({"kind": "instruction"}, {"train_jsonl": INSTR + '{"instruction": "a", "input": "b"}\n'}, "train.jsonl",
     ["line 3", '"output"']),
    ({"kind": "instruction"}, {"train_jsonl": INSTR + "{oops\n"}, "train.jsonl", ["line 3", "not valid JSON"]),
    ({"kind": "instruction"}, {"train_jsonl": _jsonl({"instruction": "a", "input": 3, "output": "b"})}, "train.jsonl",
     ["line 1", '"input"', "int"]),
    ({"kind": "instruction"}, {"train_jsonl": ""}, "train.jsonl", ["no train records"]),
    ({"kind": "instruction"}, {"train_json": '{"a": 1}'}, "train.json", ["JSON list"]),
    ({"kind": "chat"}, {"train_jsonl": _jsonl({"messages": [{"role": "user", "content": "q"}]})}, "train.jsonl",
     ["line 1", '"messages"', "assistant"]),
    ({"kind": "chat"}, {"train_jsonl": _jsonl({"messages": [{"role": "bot", "content": "q"}]})}, "train.jsonl",
     ["line 1 message 0", '"role"', "'bot'"]),
    ({"kind": "chat"}, {"train_jsonl": _jsonl({"text": "q"})}, "train.jsonl", ['"messages"']),
])
def test_bad_folders_are_one_line_naming_file_and_field(tmp_path, spec, files, where, words) -> None:
    files = {"train_jsonl": INSTR if spec == {"kind": "instruction"} or "chat" not in str(spec) else CHAT,
             "test_jsonl": CHAT if "chat" in str(spec) else INSTR, **files}
    if "train_json" in files:
        del files["train_jsonl"]
    folder = _folder(tmp_path, "t", spec, **files)
    with pytest.raises(DataError) as err:
        _load(tmp_path, "t")
    message = str(err.value)
    assert "\n" not in message and str(folder / where) in message, message
    for word in words:
        assert word in message, message


def test_missing_split(tmp_path) -> None:
    folder = _folder(tmp_path, "t", {"kind": "instruction"}, train_jsonl=INSTR)
    with pytest.raises(DataError, match="no test.jsonl or test.json") as err:
        _load(tmp_path, "t")
    assert str(folder) in str(err.value)


# --------------------------------------------------------------------- long answers within max_length
def _split(enc: dict) -> tuple[list[int], list[int]]:
    prompt = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label == IGNORE_INDEX]
    return prompt, enc["input_ids"][len(prompt):]


def test_long_input_is_cut_before_the_answer(tokenizer) -> None:
    task = Task("gen", (), "Repeat the words.", kind="instruction", metric="rougeL")
    answer = "red cat apple"
    ex = Example(" ".join(["dog"] * 200), answer)
    enc = encode_for_training(tokenizer, task, ex, 48)
    prompt, target = _split(enc)
    full_answer = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert target == full_answer and len(enc["input_ids"]) <= 48
    text = tokenizer.decode(prompt)
    assert text.startswith("Repeat the words.\nInput: ") and text.endswith(" dog dog\nAnswer:")


def test_long_answer_is_cut_from_its_end_after_the_whole_input(tokenizer) -> None:
    task = Task("gen", (), "Repeat the words.", kind="instruction", metric="rougeL")
    answer = " ".join(["horse"] * 100)
    enc = encode_for_training(tokenizer, task, Example("red cat", answer), 40)
    prompt, target = _split(enc)
    floor = len(tokenizer(f"Repeat the words.{INPUT_MARK}{ANSWER_MARK}")["input_ids"])
    full_answer = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    assert len(prompt) == floor and tokenizer.decode(prompt) == f"Repeat the words.{INPUT_MARK}{ANSWER_MARK}"
    assert target == full_answer[: 40 - floor] and len(enc["input_ids"]) == 40  # no EOS: the answer goes on


def test_a_prompt_that_leaves_no_answer_token_is_refused(tokenizer) -> None:
    task = Task("gen", (), "Repeat the words. " * 20, kind="instruction", metric="rougeL")
    with pytest.raises(DataError, match="max_length=16 leaves no room for the answer of task gen"):
        encode_for_training(tokenizer, task, Example("red", "red"), 16)
    # a label word is never cut: a classification prompt that does not fit is an error, as before
    cls = Task("cls", ("Good",), "Classify. " * 20)
    with pytest.raises(DataError, match="max_length"):
        encode_for_training(tokenizer, cls, Example("red", "Good"), 16)


def test_check_fits_refuses_a_free_form_task_before_training(tokenizer) -> None:
    ok = Task("gen", (), "Repeat.", train=[Example("a", "a")], test=[Example("b", "b")], kind="instruction")
    long = Task("long", (), "", train=[Example("a", "a", instruction="Repeat the words. " * 5)],
                test=[Example("b", "b", instruction="Repeat.")], kind="instruction")
    for task in (ok, long):
        check_fits(tokenizer, task, 256)
    floor = len(tokenizer("Repeat the words. " * 5 + INPUT_MARK + ANSWER_MARK)["input_ids"])
    check_fits(tokenizer, long, floor + 1)  # one answer token left: accepted
    with pytest.raises(DataError, match=f"task long: its prompt without input text needs {floor} tokens") as err:
        check_fits(tokenizer, long, floor)
    assert "raise max_length" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="more than max_source_length; raise max_source_length"):
        check_fits(tokenizer, long, 10_000, max_source_length=floor - 1)
    # a chat conversation always leaves room: its prompt is cut to at most half the budget
    chat = Task("chat", (), "", train=[Example("q", "a", messages=(("user", "q " * 100),))],
                test=[Example("q", "a", messages=(("user", "q"),))], kind="chat", metric="exact_match")
    check_fits(tokenizer, chat, 16)
    enc = encode_for_training(tokenizer, chat, chat.train[0], 16)
    assert len(enc["input_ids"]) <= 16 and [t for t in enc["labels"] if t != IGNORE_INDEX]
