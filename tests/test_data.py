"""Data pipeline: tokenizer, JSONL formats and masks, input errors, truncation, splits, the
resumable cursor, and the bundled task generator / files."""

from __future__ import annotations

import copy
import json
import string
import sys
from pathlib import Path

import pytest

try:
    import lorafleet  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorafleet.data.datasets import (
    DataCursor,
    DatasetError,
    build_examples,
    completion_exact_match,
    detect_format,
    load_examples,
    prompt_and_target,
    read_jsonl,
    rows_format,
    split_eval,
    tokenize_row,
)
from lorafleet.data.tasks import QUICKSTART_TASKS, TASKS, generate_task, write_task_files
from lorafleet.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer
from lorafleet.types import Example

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    with path.open("w") as fh:
        for x in lines:
            fh.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return path


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids_and_roundtrip(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= 256
    enc = ids(tok, PRINTABLE)
    assert len(enc) == len(PRINTABLE)  # one token per character, no <unk>
    assert tok.unk_token_id not in enc
    assert tok.decode(enc) == PRINTABLE
    for s in ["rev: abcd = dcba", "add: 12+35 = 47", "  two  spaces ", "a\nb\tc", "~!@#$%^&*()"]:
        assert tok.decode(ids(tok, s)) == s
    # tokenizer(text) prepends <bos>; special strings in text become the special ids
    assert tok("ab")["input_ids"] == [1] + ids(tok, "ab")
    assert ids(tok, "a<|user|>b") == ids(tok, "a") + [3] + ids(tok, "b")
    assert ids(tok, "é") == [tok.unk_token_id]


def test_tokenizer_deterministic_and_bpe_corpus():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    corpus = ["rev: abcde = edcba", "the quick brown fox jumps over the lazy dog", "add: 12+35 = 47"] * 30
    c1, c2 = build_tokenizer(corpus), build_tokenizer(corpus)
    assert c1.backend_tokenizer.to_str() == c2.backend_tokenizer.to_str()
    assert len(build_tokenizer()) < len(c1) <= 256
    assert [c1.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    s = "the quick brown fox, add: 12+35 = 47 " + string.punctuation
    enc = c1.encode(s, add_special_tokens=False)
    assert len(enc) < len(s) and c1.decode(enc) == s
    assert c1.decode(c1.encode(PRINTABLE, add_special_tokens=False)) == PRINTABLE
    # digits are never merged
    assert c1.convert_ids_to_tokens(c1.encode("1235", add_special_tokens=False)) == list("1235")


def test_tokenizer_save_load_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tokenizer(tok, tmp_path / "tok")
    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    t3 = load_tokenizer(tmp_path / "tok")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for t in (t2, t3):
        assert ids(t, PRINTABLE) == ids(tok, PRINTABLE)
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
        assert t.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
        assert tokenize_row({"messages": msgs}, t) == tokenize_row({"messages": msgs}, tok)


def test_chat_template_renders_and_masks_assistant_only(tok):
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "ab"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<bos><|system|>sys<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|user|>x<|end|><|assistant|>ab<|end|>"
    gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|user|>hi<|end|><|assistant|>")
    tokens, mask = tokenize_row({"messages": msgs}, tok)
    assert tokens == ids(tok, text)
    trained = "".join(tok.convert_ids_to_tokens([t for t, m in zip(tokens, mask) if m]))
    assert trained == "yo<|end|>ab<|end|>"
    end, asst = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|assistant|>")
    # <|assistant|> markers and the user/system turns' <|end|> are not trained on
    assert all(m == 0 for t, m in zip(tokens, mask) if t == asst)
    assert [m for t, m in zip(tokens, mask) if t == end] == [0, 0, 1, 0, 1]
    with pytest.raises(DatasetError, match="unknown chat role"):
        tokenize_row({"messages": [{"role": "robot", "content": "x"}]}, tok)


def test_chat_mask_without_generation_tags_matches(tok):
    """A template without {% generation %} (as most real models ship) gets the same mask from the
    prefix-rendering fallback."""
    plain = copy.deepcopy(tok)
    plain.chat_template = CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert "generation %}" not in plain.chat_template
    for row in read_jsonl(DATA / "chat_reverse.jsonl")[:20]:
        assert tokenize_row(row, plain) == tokenize_row(row, tok)


# ----------------------------------------------------------------------------- formats / masks
def test_text_format_mask(tok):
    tokens, mask = tokenize_row({"text": "ab c"}, tok, "text")
    assert tokens == [1] + ids(tok, "ab c") + [2]
    assert mask == [0.0] + [1.0] * 5


def test_prompt_completion_mask(tok):
    row = {"prompt": "rev: abc =", "completion": " cba"}
    tokens, mask = tokenize_row(row, tok)
    p, c = ids(tok, "rev: abc ="), ids(tok, " cba")
    assert tokens == [1] + p + c + [2]
    assert mask == [0.0] * (1 + len(p)) + [1.0] * (len(c) + 1)
    ex = Example.from_tokens("a", tokens, mask)
    # position i predicts target i: the first trained target is the completion's first token
    first = ex.weights.index(1.0)
    assert ex.target_tokens[first] == c[0] and ex.input_tokens[first] == p[-1]
    assert ex.target_tokens[-1] == 2 and ex.weights[-1] == 1.0
    assert prompt_and_target(row, tok) == ([1] + p, c + [2])


def test_detect_format_and_fields():
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "a", "completion": "b", "extra": 1}) == "prompt_completion"
    assert detect_format({"messages": [{"role": "user", "content": "x"}]}) == "messages"
    for bad, msg in [
        ({"foo": 1}, "no dataset fields"),
        ({"prompt": "a"}, 'no "completion"'),
        ({"text": 3}, '"text" must be a string'),
        ({"text": "a", "prompt": "b", "completion": "c"}, "ambiguous"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, 'has no "content"'),
        ({"messages": [{"role": "user", "content": 5}]}, "must be a string"),
    ]:
        with pytest.raises(DatasetError, match=msg):
            detect_format(bad)


# ----------------------------------------------------------------------------- input errors
def test_malformed_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", {"text": "b"}, '{"text": "c"'])
    with pytest.raises(DatasetError, match=rf"{p.name}:4: malformed JSON"):
        read_jsonl(p)
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, "[1, 2]"])
    with pytest.raises(DatasetError, match=rf"{p.name}:2: expected a JSON object"):
        read_jsonl(p)
    p = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 7}])
    with pytest.raises(DatasetError, match=rf"{p.name}:2: \"completion\" must be a string"):
        read_jsonl(p)
    p = write_jsonl(tmp_path / "g.jsonl", ["", "  "])
    with pytest.raises(DatasetError, match="no rows"):
        read_jsonl(p)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found: .*nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="not a file"):
        read_jsonl(tmp_path)


def test_mixed_formats_error(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, "", {"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match=rf"{p.name}:3: row is in 'prompt_completion' format but line 1 is 'text'"):
        read_jsonl(p)
    with pytest.raises(DatasetError, match="row 1: row is in"):
        rows_format([{"text": "a"}, {"messages": [{"role": "user", "content": "x"}]}])


def test_rows_keep_location_and_extra_keys(tok, tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", ["", {"prompt": "a", "completion": "b", "task": "t", "id": 9}])
    rows = read_jsonl(p)
    assert rows == [{"prompt": "a", "completion": "b", "task": "t", "id": 9}]
    assert rows[0].line == 2
    exs, stats = load_examples(p, tok, "ad", 32)
    assert exs[0].adapter == "ad"
    assert exs[0].meta["task"] == "t" and exs[0].meta["id"] == 9
    assert exs[0].meta["source"].endswith("r.jsonl:2") and exs[0].meta["prompt_tokens"] == 2
    assert stats["format"] == "prompt_completion" and stats["examples"] == 1
    # template errors at build time name the file and line too
    q = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}])
    with pytest.raises(DatasetError, match=r"q.jsonl:1: chat template failed"):
        load_examples(q, tok, "ad", 32)


# ----------------------------------------------------------------------------- truncation
def test_truncate_vs_skip_counts(tok):
    rows = [
        {"prompt": "ab", "completion": "cd"},  # 1+2+2+1 = 6 tokens
        {"prompt": "abcdef", "completion": "ghij"},  # 12 tokens -> truncated to 8 (loss on 'g')
        {"prompt": "abcdefghij", "completion": "xy"},  # 14 tokens -> no loss token left in 8
    ]
    exs, st = build_examples(rows, tok, "a", 8, overflow="truncate")
    assert len(exs) == 2
    assert (st["rows"], st["truncated"], st["skipped"], st["skipped_no_loss"], st["skipped_too_long"]) == (3, 1, 1, 1, 0)
    assert len(exs[1].input_tokens) == 7 and exs[1].meta["truncated"]
    assert exs[1].target_tokens[-2:] == ids(tok, "fg") and exs[1].weights[-2:] == [0.0, 1.0]
    assert st["tokens"] == 5 + 7 and st["loss_tokens"] == 3 + 1
    exs, st = build_examples(rows, tok, "a", 8, overflow="skip")
    assert len(exs) == 1
    assert (st["truncated"], st["skipped"], st["skipped_too_long"], st["skipped_no_loss"]) == (0, 2, 2, 0)
    assert st["tokens"] == 5 and st["loss_tokens"] == 3
    # a chat whose only assistant turn is past max_length, or that has none, is skipped
    chat = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}]}]
    exs, st = build_examples(chat, tok, "a", 8)
    assert exs == [] and st["skipped_no_loss"] == 2 and st["truncated"] == 0
    with pytest.raises(ValueError, match="overflow"):
        build_examples(rows, tok, "a", 8, overflow="drop")


# ----------------------------------------------------------------------------- split / cursor
def _examples(n):
    return [Example.from_tokens("a", [1, 10 + i, 2]) for i in range(n)]


def test_split_eval_deterministic():
    exs = _examples(50)
    tr1, ev1 = split_eval(exs, eval_fraction=0.2, seed=3)
    tr2, ev2 = split_eval(exs, eval_fraction=0.2, seed=3)
    assert tr1 == tr2 and ev1 == ev2
    assert len(ev1) == 10 and len(tr1) == 40
    assert sorted(e.input_tokens[1] for e in tr1 + ev1) == [10 + i for i in range(50)]
    # both parts keep the input order
    assert [e.input_tokens[1] for e in ev1] == sorted(e.input_tokens[1] for e in ev1)
    _, ev3 = split_eval(exs, eval_count=10, seed=4)
    assert ev3 != ev1
    assert split_eval(exs, eval_count=0) == (exs, [])
    with pytest.raises(ValueError):
        split_eval(exs)
    with pytest.raises(DatasetError):
        split_eval(exs[:3], eval_count=3)


def test_cursor_determinism_and_resume():
    exs = _examples(10)
    key = lambda batch: [e.input_tokens[1] for e in batch]  # noqa: E731
    a = DataCursor(exs, seed=7)
    b = DataCursor(exs, seed=7)
    batches_a = [key(a.next_batch(4)) for _ in range(7)]
    assert batches_a == [key(b.next_batch(4)) for _ in range(7)]
    # every epoch is a permutation; epochs are shuffled differently
    flat = sum(batches_a, [])
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10, 20))
    assert flat[:10] != flat[10:20]
    assert a.epochs_done == 2 and a.position == 8

    c = DataCursor(exs, seed=7)
    first = [key(c.next_batch(4)) for _ in range(3)]
    state = json.loads(json.dumps(c.state_dict()))  # survives a JSON round trip
    assert state["epoch"] == 1 and state["position"] == 2
    d = DataCursor(exs, seed=0)
    d.load_state_dict(state)
    rest = [key(d.next_batch(4)) for _ in range(4)]
    assert first + rest == batches_a
    assert DataCursor(exs, seed=8).next_batch(10) != DataCursor(exs, seed=7).next_batch(10)
    assert [e for e in DataCursor(exs, shuffle=False).next_batch(10)] == exs
    with pytest.raises(ValueError, match="dataset changed"):
        DataCursor(exs[:9]).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        DataCursor(_examples(11)[1:]).load_state_dict(state)


def test_completion_exact_match():
    assert completion_exact_match([5, 6, 2, 9, 9], [5, 6, 2])
    assert not completion_exact_match([5, 6, 7], [5, 6, 2])
    assert not completion_exact_match([5], [5, 6, 2])
    assert completion_exact_match([5, 6, 2, 7], [5, 6, 2, 3], stop_ids=[2])
    assert not completion_exact_match([5, 6, 6, 2], [5, 6, 2], stop_ids=[2])


# ----------------------------------------------------------------------------- tasks
def test_tasks_deterministic_and_correct():
    assert len(QUICKSTART_TASKS) >= 3 and set(QUICKSTART_TASKS) <= set(TASKS)
    for name in TASKS:
        a, b = generate_task(name, 60, seed=1), generate_task(name, 60, seed=1)
        assert a == b and a != generate_task(name, 60, seed=2)
        assert len({r["prompt"] for r in a}) == 60
        assert all(r["prompt"].startswith(f"{name}: ") and r["prompt"].endswith(" =") for r in a)
    assert TASKS["rev"].row("abcd")["completion"] == " dcba"
    assert TASKS["sort"].row("dbca")["completion"] == " abcd"
    assert TASKS["upper"].row("abh")["completion"] == " ABH"
    assert TASKS["rot"].row("abh")["completion"] == " bca"
    assert TASKS["add"].row("12+35")["completion"] == " 47"
    with pytest.raises(KeyError):
        generate_task("nope", 3)


def test_bundled_files_match_generator(tok, tmp_path):
    """examples/data holds exactly what `python -m lorafleet.data.tasks` writes; every file loads,
    sequences are short, and train / eval prompts are disjoint."""
    written = write_task_files(tmp_path)
    assert {p.name for p in written} <= {p.name for p in DATA.glob("*.jsonl")}
    for p in written:
        assert (DATA / p.name).read_text() == p.read_text(), p.name
    for name in TASKS:
        train, ev = read_jsonl(DATA / f"{name}_train.jsonl"), read_jsonl(DATA / f"{name}_eval.jsonl")
        assert len(train) >= 300 and len(ev) >= 50
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
        for rows in (train, ev):
            exs, st = build_examples(rows, tok, name, 24)
            assert st["skipped"] == st["truncated"] == 0
            assert max(len(e.input_tokens) + 1 for e in exs) < 24
            assert all(tok.unk_token_id not in e.input_tokens for e in exs)
    assert rows_format(read_jsonl(DATA / "chat_reverse.jsonl")) == "messages"
    assert rows_format(read_jsonl(DATA / "text_upper.jsonl")) == "text"
    for f in ("chat_reverse.jsonl", "text_upper.jsonl"):
        exs, st = load_examples(DATA / f, tok, "x", 64)
        assert st["skipped"] == 0 and st["loss_tokens"] > 0
