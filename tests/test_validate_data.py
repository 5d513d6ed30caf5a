"""validate_data: every bad input named with its code and line, valid data of all four formats
accepted and parsed into exact segments, bounded memory on huge lines, and the CLI contract."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, run_script

import training_config
import validate_data as vd
from trainroot import GuardrailError, UsageError

GOOD = b'{"text": "a good line"}\n'
CHAT_OK = (b'{"messages": [{"role": "user", "content": "hi"}, '
           b'{"role": "assistant", "content": "hello"}]}\n')


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def chat(*turns) -> bytes:
    msgs = [{"role": r, "content": c} for r, c in turns]
    return json.dumps({"messages": msgs}).encode() + b"\n"


# --------------------------------------------------------------------------- the bad-input corpus
# (id, file bytes, expected code, expected line, fragment of the message). Each file holds
# exactly one bad line (mostly after a good one), so the count of errors is exactly one.

CORPUS = [
    ("trailing-comma", GOOD + b'{"text": "a",}\n', "invalid_json", 2,
     "Expecting property name enclosed in double quotes (column 14)"),
    ("single-quotes", GOOD + b"{'text': 'a'}\n", "invalid_json", 2, "(column 2)"),
    ("two-objects-one-line", GOOD + b'{"text": "a"}{"text": "b"}\n', "invalid_json", 2,
     "Extra data (column 14)"),
    ("bare-word", GOOD + GOOD + b"hello\n", "invalid_json", 3, "Expecting value (column 1)"),
    ("cut-after-a-bracket", GOOD + b"[\n", "invalid_json", 2, "Expecting value (column 2): one "
     "JSON value spread over several lines?"),
    ("huge-integer", GOOD + b'{"text": "a", "n": ' + b"9" * 5000 + b"}\n", "invalid_json", 2,
     "a number too long to read"),
    ("invalid-utf8", GOOD + b'{"text": "caf\xe9"}\n', "invalid_utf8", 2,
     "invalid UTF-8 byte 0xe9 at byte offset 37 (column 14)"),
    ("array-line", GOOD + b"[1, 2]\n", "not_object", 2, "expected a JSON object, got an array"),
    ("string-line", GOOD + b'"just text"\n', "not_object", 2, "got a string"),
    ("null-line", GOOD + b"null\n", "not_object", 2, "got null"),
    ("unknown-fields", GOOD + b'{"question": "a", "answer": "b"}\n', "unknown_format", 2,
     'no known fields (has "question", "answer")'),
    ("empty-object", GOOD + b"{}\n", "unknown_format", 2, "has none"),
    ("two-formats", GOOD + b'{"text": "a", "prompt": "b", "completion": "c"}\n',
     "ambiguous_format", 2, "(prompt_completion, text)"),
    ("prompt-only", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "missing_field", 2,
     'prompt_completion record without "completion"'),
    ("instruction-no-output", b'{"instruction": "a", "input": "b"}\n', "missing_field", 1,
     'instruction record without "output"'),
    ("empty-text", GOOD + b'{"text": ""}\n', "empty_field", 2, '"text" is empty'),
    ("blank-completion", b'{"prompt": "a", "completion": "  \\n "}\n', "empty_field", 1,
     '"completion" is empty'),
    ("number-text", GOOD + b'{"text": 5}\n', "wrong_type", 2, '"text" must be a string, got a number'),
    ("null-prompt", b'{"prompt": null, "completion": "b"}\n', "wrong_type", 1, "got null"),
    ("list-input", b'{"instruction": "a", "input": ["x"], "output": "b"}\n', "wrong_type", 1,
     '"input" must be a string, got an array'),
    ("messages-string", CHAT_OK + b'{"messages": "hi"}\n', "wrong_type", 2,
     '"messages" must be an array, got a string'),
    ("messages-empty", CHAT_OK + b'{"messages": []}\n', "empty_field", 2, '"messages" is empty'),
    ("message-not-object", CHAT_OK + b'{"messages": ["hi"]}\n', "wrong_type", 2,
     "messages[0] must be an object, got a string"),
    ("message-pairs-array", CHAT_OK + b'{"messages": [[["role", "user"], ["content", "x"]]]}\n',
     "wrong_type", 2, "messages[0] must be an object, got an array"),
    ("message-no-role", CHAT_OK + b'{"messages": [{"content": "x"}]}\n', "missing_field", 2,
     'messages[0] without "role"'),
    ("message-no-content", CHAT_OK + b'{"messages": [{"role": "user"}]}\n', "missing_field", 2,
     'messages[0] without "content"'),
    ("tool-result-without-a-call", CHAT_OK + chat(("user", "q"), ("tool", "{}"), ("assistant", "a")),
     "role_order", 2, "messages[1] is a tool result after a user turn"),
    ("content-parts", CHAT_OK + b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}\n',
     "wrong_type", 2, "messages[0].content must be a string, got an array"),
    ("empty-assistant", CHAT_OK + chat(("user", "q"), ("assistant", "")), "empty_field", 2,
     "messages[1].content is empty"),
    ("two-user-turns", CHAT_OK + chat(("user", "a"), ("user", "b"), ("assistant", "c")),
     "role_order", 2, "messages[1] is a user turn after a user turn"),
    ("starts-with-assistant", CHAT_OK + chat(("system", "s"), ("assistant", "a"), ("user", "b")),
     "role_order", 2, "messages[1] is an assistant turn after no user turn"),
    ("late-system", CHAT_OK + chat(("user", "a"), ("assistant", "b"), ("system", "c")),
     "role_order", 2, "messages[2] is a system turn after the conversation started"),
    ("no-assistant", CHAT_OK + chat(("system", "s"), ("user", "a")), "no_assistant_turn", 2,
     "nothing to train on"),
    ("nan", GOOD + b'{"text": "a", "score": NaN}\n', "non_finite_number", 2,
     "NaN is not valid JSON"),
    ("minus-infinity", GOOD + b'{"prompt": "a", "completion": "b", "w": -Infinity}\n',
     "non_finite_number", 2, "-Infinity is not valid JSON"),
    ("duplicate-key", GOOD + b'{"text": "a", "text": "b"}\n', "duplicate_key", 2,
     'duplicate key "text"'),
    ("escaped-duplicate-key", CHAT_OK
     + b'{"messages": [{"role": "user", "content": "a", "\\u0063ontent": "b"}]}\n',
     "duplicate_key", 2, 'duplicate key "content"'),
    ("deep-nesting", GOOD + b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     "too_deep", 2, "nested too deeply"),
    ("lone-surrogate", GOOD + b'{"text": "bad \\ud800 escape"}\n', "lone_surrogate", 2,
     '"text" holds a lone surrogate \\ud800'),
    # a line with literal UTF-8 as well: the fast path counts its bytes without encoding
    ("lone-surrogate-beside-utf8", GOOD + '{"text": "é \\udc00"}\n'.encode(), "lone_surrogate", 2,
     '"text" holds a lone surrogate \\udc00'),
    ("lone-surrogate-in-chat", CHAT_OK + chat(("user", "\x00"), ("assistant", "\ud800"))
     .replace(b"\\u0000", "é".encode()),
     "lone_surrogate", 2, "messages[1].content holds a lone surrogate \\ud800"),
    # anywhere in a record: a tokenizer would fail on it halfway through training
    ("lone-surrogate-in-tool-call-arguments", CHAT_OK + b'{"messages": [{"role": "user", "content": '
     b'"w?"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", '
     b'"function": {"name": "w", "arguments": {"city": "P\\ud800"}}}]}, {"role": "tool", '
     b'"content": "sun"}, {"role": "assistant", "content": "Sunny."}]}\n', "lone_surrogate", 2,
     "messages[1].tool_calls[0].function.arguments.city holds a lone surrogate \\ud800"),
    ("lone-surrogate-in-tools", CHAT_OK + b'{"messages": [{"role": "user", "content": "w?"}, '
     b'{"role": "assistant", "content": "Sunny."}], "tools": [{"type": "function", "function": '
     b'{"name": "w", "description": "x \\udc00"}}]}\n', "lone_surrogate", 2,
     "tools[0].function.description holds a lone surrogate \\udc00"),
    ("lone-surrogate-in-string-arguments", CHAT_OK + b'{"messages": [{"role": "user", "content": '
     b'"w?"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", '
     b'"function": {"name": "w", "arguments": "{\\"c\\": \\"\\\\ud800\\"}"}}]}, {"role": "tool", '
     b'"content": "sun"}, {"role": "assistant", "content": "Sunny."}]}\n', "lone_surrogate", 2,
     "messages[1].tool_calls[0].function.arguments.c holds a lone surrogate \\ud800"),
    ("lone-surrogate-in-an-ignored-key", GOOD + b'{"text": "a", "meta": {"\\ud800": 1}}\n',
     "lone_surrogate", 2, 'a key of "meta" holds a lone surrogate \\ud800'),
    ("string-arguments-not-json", CHAT_OK + b'{"messages": [{"role": "user", "content": "w?"}, '
     b'{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": '
     b'{"name": "w", "arguments": "{not json"}}]}, {"role": "tool", "content": "sun"}, '
     b'{"role": "assistant", "content": "Sunny."}]}\n', "wrong_type", 2,
     'messages[1].tool_calls[0].function.arguments is a string that does not hold a JSON object '
     '("{not json")'),
    # a role holding "|" once passed the fast path's joined-roles pattern as two turns
    ("role-with-a-pipe", CHAT_OK + chat(("user|assistant", "x")), "unknown_role", 2,
     'messages[0].role is "user|assistant"'),
    ("bare-cr-line-end", GOOD + b'{"text": "a"}\r{"text": "b"}\n', "invalid_json", 2,
     "Extra data (column 15): a bare CR (\\r) ends a record inside this line"),
    ("nul-after-the-sniffed-head", b"".join(b'{"text": "%d"}\n' % i for i in range(1000))
     + b'{"text": "a\x00b"}\n', "invalid_json", 1001,
     "Invalid control character at column 12 (U+0000): escape it as \\u0000"),
    ("mixed-formats", GOOD + b'{"prompt": "a", "completion": "b"}\n', "mixed_formats", 2,
     "a prompt_completion record in a file of text records (line 1)"),
    ("truncated-last-line", GOOD + GOOD + b'{"text": "cut sho', "truncated_last_line", 3,
     "last line ends without a newline in the middle of a JSON value"),
    ("truncated-after-colon", GOOD + b'{"text":', "truncated_last_line", 2, "cut short"),
    ("huge-line", GOOD + b'{"text": "' + b"x" * 300_000 + b'"}\n' + GOOD, "line_too_long", 2,
     "line is 300,012 bytes, over max_record_bytes 250,000"),
    ("empty-file", b"", "empty_file", None, "empty file: no records"),
    ("only-blank-lines", b"\n   \n\t\r\n\n", "no_records", None, "only blank lines"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary_file", 3,
     "binary data (NUL byte at byte offset 8)"),
    ("gzip-named-jsonl", gzip.compress(GOOD * 3), "compressed_file", None,
     "gzip-compressed data, not JSON lines; decompress it first (gunzip -c FILE > NEW.jsonl)"),
    ("utf16", "\ufeff".encode("utf-16-le") + GOOD.decode().encode("utf-16-le"), "utf16_file", None,
     "UTF-16 text"),
    ("json-array", b'[\n  {"text": "a"},\n  {"text": "b"}\n]\n', "json_array", None,
     "jq -c '.[]' FILE > NEW.jsonl"),
    ("pretty-printed", b'{\n  "text": "a"\n}\n{\n  "text": "b"\n}\n', "pretty_printed", None,
     "jq -c . FILE > NEW.jsonl"),
    ("git-lfs-pointer", b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64
     + b"\nsize 123456\n", "git_lfs_pointer", None, "git-lfs pointer file"),
]


LIMIT = 250_000  # max_record_bytes for the corpus: "huge-line" is over it, "deep-nesting" not


def corpus_file(tmp_path: Path, name: str, data: bytes) -> Path:
    return write(tmp_path / f"{name}.jsonl", data)


def test_corpus_has_at_least_25_kinds():
    assert len({c[0] for c in CORPUS}) == len(CORPUS) >= 25
    assert {c[2] for c in CORPUS} == set(vd.ERROR_CODES)  # every error code is exercised


@pytest.mark.parametrize("name,data,code,line,fragment", CORPUS, ids=[c[0] for c in CORPUS])
def test_each_bad_input_is_named_with_its_code_and_line(tmp_path, name, data, code, line, fragment):
    path = corpus_file(tmp_path, name, data)
    report = vd.validate_file(path, max_record_bytes=LIMIT)
    assert report["ok"] is False
    assert report["error_count"] == 1, report["errors"]
    err = report["errors"][0]
    assert (err["code"], err["line"]) == (code, line), err
    assert fragment in err["message"], err["message"]
    assert code in vd.ERROR_CODES
    assert report["verdict"].startswith("invalid: ") and "\n" not in report["verdict"]
    assert fragment in report["verdict"] or code not in vd._FILE_CODES
    if line is not None:  # iter_records, the trainer's parser, stops at the same line
        with pytest.raises(GuardrailError) as exc:
            list(vd.iter_records(path, max_record_bytes=LIMIT))
        assert str(exc.value).startswith(f"invalid record at line {line} ({code}: ")
        assert str(exc.value).endswith(
            f", {path}. Run `python3 validate_data.py {path}` to list every problem.")


def test_look_alike_formats_get_the_change_that_fixes_them(tmp_path):
    """Real exports that are almost one of the four formats: the error says what to change."""
    openai_tool_call = {"messages": [
        {"role": "user", "content": "weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    cases = [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
         "unknown_format", 'no known fields (has "conversations"); accepted formats: {"text"}, '
         '{"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} or '
         '{"instruction", "input"?, "output"} (ShareGPT "conversations": rename it "messages"'),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
         "role_order", "messages[1] is a tool result after a user turn; tool results follow the "
         "assistant turn whose tool_calls they answer"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "function_call": {"name": "w", "arguments": "{}"}}]},
         "wrong_type", "messages[1].function_call (OpenAI's legacy form) is not supported: write "
         'it as "tool_calls"'),
        ({"messages": [{"role": "User", "content": "q"}]}, "unknown_role",
         'messages[0].role is "User"; expected system, user, assistant or tool (roles are '
         'lowercase: write "user")'),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]},
         "wrong_type", 'got an array (content parts are not supported: join their "text"'),
        (json.dumps({"text": "a"}), "not_object",
         "got a string holding JSON text (encoded twice? write the object itself)")]
    for i, (value, code, message) in enumerate(cases):
        path = write(tmp_path / f"{i}.jsonl", json.dumps(value).encode() + b"\n")
        err = vd.validate_file(path)["errors"][0]
        assert (err["line"], err["code"]) == (1, code) and message in err["message"], err
    # OpenAI's tool calls (content null, arguments a JSON string) and tool results are chat
    path = write(tmp_path / "tools.jsonl", json.dumps(openai_tool_call).encode() + b"\n")
    assert vd.validate_file(path)["ok"]
    # records in one array: one whole-file error with the command that splits it
    path = write(tmp_path / "array.jsonl", json.dumps([{"text": "a"}, {"text": "b"}]).encode())
    err = vd.validate_file(path)["errors"]
    assert [(e["line"], e["code"]) for e in err] == [(None, "json_array")], err
    assert "jq -c '.[]' FILE > NEW.jsonl" in err[0]["message"]
    # a user message's extra "name" field is fine
    ok = write(tmp_path / "named.jsonl", chat(("user", "a"), ("assistant", "b"))
               .replace(b'"content": "a"', b'"content": "a", "name": "ann"'))
    assert vd.validate_file(ok)["ok"]


def test_positions_of_json_and_utf8_errors(tmp_path):
    report = vd.validate_file(corpus_file(tmp_path, "pos", GOOD + b'{"text": "a",}\n'
                                          + b'{"text": "caf\xe9"}\n'), allow_mixed=True)
    assert report["errors"] == [
        {"line": 2, "column": 14, "byte_offset": len(GOOD) + 13, "code": "invalid_json",
         "message": "Expecting property name enclosed in double quotes (column 14)"},
        {"line": 3, "column": 14, "byte_offset": len(GOOD) + 15 + 13, "code": "invalid_utf8",
         "message": f"invalid UTF-8 byte 0xe9 at byte offset {len(GOOD) + 28} (column 14)"}]


def test_the_whole_corpus_through_the_cli_without_a_traceback(tmp_path):
    paths = [corpus_file(tmp_path, c[0], c[1]) for c in CORPUS]
    proc = run_script("validate_data.py", *map(str, paths), "--json", "--max-record-bytes", str(LIMIT),
                      root=tmp_path / "no-such-root")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["max_record_bytes"] == LIMIT
    got = [(f["errors"][0]["code"], f["errors"][0]["line"]) for f in doc["files"]]
    assert got == [(c[2], c[3]) for c in CORPUS]


def test_a_name_the_daemon_would_not_take_is_a_warning_with_its_rename(tmp_path):
    """Valid content under a name `add` refuses and the daemon fails (or ignores): the
    validator says so too, not a bare "valid"."""
    # (fine.jsonl exists: the rename never lands on it; ignored names get no rename at all:
    # an editor's swap file renamed over the real file would replace it)
    names = {"UP.JSONL": "UP.jsonl", "notes.txt": "notes.jsonl", "fine.json": "fine-2.jsonl",
             "y.jsonl.part": None, "fine.jsonl~": None, ".fine.jsonl.swp": None}
    for name in names:
        write(tmp_path / name, GOOD)
    write(tmp_path / "fine.jsonl", GOOD)
    proc = run_script("validate_data.py", *(str(tmp_path / n) for n in [*names, "fine.jsonl"]),
                      "--json", root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)["files"]
    for report, (name, new) in zip(files, names.items()):
        [warning] = [w for w in report["warnings"] if w["code"] == "data_name"]
        assert warning["line"] is None, warning
        if new is None:
            assert "ignores hidden and temporary names" in warning["message"]
            assert "mv " not in warning["message"], warning
        else:
            assert warning["message"].endswith(f"(`mv {tmp_path / name} {tmp_path / new}`)"), warning
        assert report["ok"] and report["verdict"].endswith("1 warning")
    assert files[-1]["warning_count"] == 0


def test_error_listing_stops_at_100_then_counts(tmp_path):
    path = write(tmp_path / "many.jsonl", GOOD + b"[1]\n" * 150)
    report = vd.validate_file(path)
    assert report["error_count"] == 150 and len(report["errors"]) == 100
    assert [e["line"] for e in report["errors"]] == list(range(2, 102))
    proc = run_script("validate_data.py", str(path), root=tmp_path)
    assert proc.returncode == 1
    assert f"  {path}:101: error [not_object] expected a JSON object, got an array\n" in proc.stdout
    assert "  ... and 50 more errors\n" in proc.stdout


# --------------------------------------------------------------------------- valid data

OPENAI_CHAT = [
    {"messages": [
        {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        {"role": "user", "content": "What's the capital of France?"},
        {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."}]},
    {"messages": [
        {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        {"role": "user", "content": "Who wrote 'Romeo and Juliet'?"},
        {"role": "assistant", "content": "Oh, just some guy named William Shakespeare."},
        {"role": "user", "content": "And how far is the Moon from Earth?"},
        {"role": "assistant", "content": "Around 384,400 kilometers. Give or take."}]},
    {"messages": [
        {"role": "user", "content": "Translate to French: “good morning” 🙂"},
        {"role": "assistant", "content": "« Bonjour » — voilà."}]},
]

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."},
    {"instruction": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram",
     "output": "Telegram"},
    {"instruction": "Write a haiku about autumn.",
     "output": "Crisp leaves drift and fall\nGolden light on quiet paths\nThe year exhales slow"},
]


def jsonl(path: Path, records, **dumps) -> Path:
    path.write_text("".join(json.dumps(r, **dumps) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "utf8"])
def test_openai_chat_and_alpaca_files_are_accepted(tmp_path, ensure_ascii):
    for name, records, fmt in (("chat", OPENAI_CHAT, "messages"), ("alpaca", ALPACA, "instruction")):
        path = jsonl(tmp_path / f"{name}.jsonl", records, ensure_ascii=ensure_ascii)
        report = vd.validate_file(path, max_length=4096)
        assert report["ok"], report["errors"]
        assert (report["format"], report["records"]) == (fmt, 3)
        assert report["errors"] == [] and report["warnings"] == []
        parsed = list(vd.iter_records(path))
        assert report["est_tokens"] == sum(len(t.encode()) for r in parsed for t, _ in r.segments)
        assert report["verdict"] == f"valid: 3 {fmt} records, ~{report['est_tokens']:,} tokens"


def test_segments_of_each_format_are_exact(tmp_path):
    path = jsonl(tmp_path / "all.jsonl", [
        {"text": "héllo"},
        {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
        ALPACA[1], ALPACA[2], OPENAI_CHAT[1]])
    recs = list(vd.iter_records(path, allow_mixed=True))
    assert [r.format for r in recs] == ["text", "prompt_completion", "instruction", "instruction",
                                        "messages"]
    assert recs[0].segments == [("héllo", True)] and recs[0].messages is None
    assert recs[1].segments == [("Q: 2+2?\nA:", False), (" 4", True)]
    assert recs[2].segments == [("### Instruction:\nIdentify the odd one out.\n\n### Input:\n"
                                 "Twitter, Instagram, Telegram\n\n### Response:\n", False),
                                ("Telegram", True)]
    assert recs[3].segments[0] == ("### Instruction:\nWrite a haiku about autumn.\n\n"
                                   "### Response:\n", False)
    sys_ = "Marv is a factual chatbot that is also sarcastic."
    assert recs[4].segments == [
        (f"<|system|>\n{sys_}\n<|user|>\nWho wrote 'Romeo and Juliet'?\n<|assistant|>\n", False),
        ("Oh, just some guy named William Shakespeare.", True),
        ("\n<|user|>\nAnd how far is the Moon from Earth?\n<|assistant|>\n", False),
        ("Around 384,400 kilometers. Give or take.", True)]
    assert recs[4].messages == OPENAI_CHAT[1]["messages"]
    sizes = [len(line.encode()) + 1 for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r.line, r.offset, r.next_offset) for r in recs] == [
        (i + 1, sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(5)]
    assert [vd.detect_format(json.loads(line)) for line in path.read_text().splitlines()] == \
        [r.format for r in recs]
    assert vd.detect_format({"text": "a", "prompt": "b"}) is None and vd.detect_format([1]) is None


def test_iter_records_resumes_from_next_offset(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", OPENAI_CHAT * 3)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\n\n", 2))  # blank lines shift numbering
    whole = list(vd.iter_records(path))
    assert [r.line for r in whole] == [1, 3, 5, 6, 7, 8, 9, 10, 11]
    for i, r in enumerate(whole):
        assert list(vd.iter_records(path, start_offset=r.next_offset, start_line=r.line + 1)) \
            == whole[i + 1:]


def test_a_turn_field_nothing_reads_is_reported_once_per_name_with_a_close_name(tmp_path):
    """Regression: only top-level fields were reported: a misspelled `"wieght": 0` trained
    the turn it meant to keep out, with no word from validate."""
    turn = {"role": "assistant", "content": "BAD ANSWER", "wieght": 0}
    recs = [{"messages": [{"role": "user", "content": "hi"}, turn, {"role": "user", "content": "more"},
                          {"role": "assistant", "content": "good", "reasoning_content": "r", "meta": 1}]},
            {"messages": [{"role": "user", "content": "hi", "wieght": 1}, {"role": "assistant", "content": "x"}]}]
    path = tmp_path / "turns.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = vd.validate_file(path)
    assert report["ok"] and report["error_count"] == 0
    assert [(w["line"], w["message"]) for w in report["warnings"]] == [
        (1, 'turn field "meta" is not one the product reads; the chat template is given it, and '
            "most ignore it"),
        (1, 'turn field "wieght" is not one the product reads; the chat template is given it, and '
            'most ignore it (did you mean "weight"? as written, it does nothing)')]


def test_warnings_do_not_reject(tmp_path):
    data = (b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n")      # 1: BOM + CRLF
            + b"\r\n"                                           # 2: blank
            + b'{"text": "' + b"y" * 40 + b'"}\r\n'             # 3: too long
            + GOOD                                              # 4: not a duplicate (1 ends CRLF)
            + b'{"text": "b", "meta": 1, "id": 2}\n'            # 5: ignored fields
            + b'{"text": "c", "meta": 3}\n')                    # 6: "meta" not repeated
    report = vd.validate_file(write(tmp_path / "w.jsonl", data), max_length=32)
    assert report["ok"] and report["records"] == 5 and report["error_count"] == 0
    got = [(w["line"], w["code"]) for w in report["warnings"]]
    assert got == [(1, "bom"), (1, "crlf"), (2, "blank_line"), (3, "too_long"),
                   (5, "ignored_field"), (5, "ignored_field")]
    assert report["warnings"][1]["message"] == "CRLF line endings on 3 lines (first shown)"
    assert report["warnings"][3]["message"] == ("about 40 tokens, over max_length 32: it will be "
                                                "split across rows, not dropped")
    assert {w["code"] for w in report["warnings"]} <= set(vd.WARNING_CODES)
    assert report["verdict"] == "valid: 5 text records, ~64 tokens, 6 warnings"


def test_duplicates_and_trailing_user_turns_warn(tmp_path):
    data = GOOD + CHAT_OK + GOOD + chat(("user", "a"), ("assistant", "b"), ("user", "c"))
    report = vd.validate_file(write(tmp_path / "d.jsonl", data), allow_mixed=True)
    assert report["ok"] and report["format"] == "mixed"
    assert report["formats"] == {"text": 2, "messages": 2}
    assert [(w["line"], w["code"], w["message"]) for w in report["warnings"]] == [
        (3, "duplicate", "same content as line 1"),
        (4, "trailing_user_turn", "conversation ends on a user turn, which trains nothing")]


def fast_verdict(raw: bytes):
    """validate_file's fast path on one line: (format, tokens, ends_on_user), or None where
    it leaves the line to the careful path (it returns None or raises)."""
    try:
        return vd._fast_check(raw)
    except Exception:
        return None


def fast_agrees(raw: bytes) -> bool:
    """Assert that the fast path's verdict on a line is the careful path's; True if it gave one."""
    state = vd._State(allow_mixed=True)
    record, tokens, problems, _ = vd._check_line([raw], 0, 1, raw.endswith(b"\n"), state)
    fast = fast_verdict(raw)
    if fast is None:
        return False
    assert record is not None, raw           # never accepts what the careful path rejects
    codes = {bad.code for _, bad in problems}
    # nor hides a warning: validate_file's fast branch reports these two itself
    assert codes <= {"crlf", "trailing_user_turn"}, (raw, codes)
    assert fast == (record.format, tokens, "trailing_user_turn" in codes), raw
    return True


def msg(*pairs) -> bytes:
    """A JSON object from (key, JSON text) pairs, duplicates and all."""
    return b"{" + b", ".join(b'"%s": %s' % (k.encode(), v) for k, v in pairs) + b"}"


def chat_line(*messages: bytes, end: bytes = b"\n") -> bytes:
    return b'{"messages": [' + b", ".join(messages) + b"]}" + end


U, A, S = (msg(("role", b'"%s"' % r), ("content", b'"%s"' % c))
           for r, c in ((b"user", b"q"), (b"assistant", b"a"), (b"system", b"s")))
# lines one step from a valid record, aimed at what the fast path proves at C level: the
# shape of each message, the line's end, whitespace, escapes, sizes
FAST_PATH_TRAPS = [
    chat_line(msg(("role", b'"user"'), ("content", b'"q"'), ("name", b'"x"')),
              msg(("role", b'"assistant"'))),                      # 3 + 1 pairs: 2 a message
    chat_line(msg(("role", b'"user"')), msg(("content", b'"q"'), ("role", b'"assistant"'),
                                            ("content", b'"a"'))),  # 1 + 3 pairs
    chat_line(U, msg(("role", b'"assistant"'), ("role", b'"assistant"'))),
    chat_line(U, msg(("role", b'"assistant"'), ("content", b'"a"'), ("content", b'"b"'))),
    chat_line(U, msg(("content", b'"a"'), ("role", b'"assistant"'))),   # swapped: valid
    chat_line(msg(("content", b'"q"'), ("content", b'"q"')), A),
    chat_line(msg(("role", b'"user"'), ("\\u0063ontent", b'"q"')), A),  # escaped key: valid
    chat_line(msg(("role", b'"user"'), ("contents", b'"q"')), A),
    chat_line(b'[["role", "user"], ["content", "q"]]', b'[["role", "assistant"], ["content", "a"]]'),
    chat_line(b'["role", "content"]', A), chat_line(b'"user"', A), chat_line(b"null", A),
    chat_line(U, A, b"{}"), chat_line(),
    *(chat_line(msg(("role", role), ("content", b'"q"')), A) for role in
      (b"1", b"null", b"true", b'["user"]', b'{"user": 1}', b'"User"', b'"user "', b'"tool"',
       b'""', b'"user|assistant"', b'"\\u0075ser"', b'"\\ud800"')),
    *(chat_line(U, msg(("role", b'"assistant"'), ("content", content))) for content in
      (b"1", b"null", b"[]", b'["a"]', b'{"text": "a"}', b'""', b'" "', b'"\\u00a0"', b'"\\u2028"',
       b'"\\n\\t"', b'"\\ud800"', b'"\\udc00 \xc3\xa9"', b'"\\u00e9"', b'"\xf0\x9f\x99\x82"')),
    chat_line(msg(("role", b'"system"'), ("content", b'""')), U, A),    # empty system: valid
    chat_line(msg(("role", b'"system"'), ("content", b'" "')), U, A),
    chat_line(S, S, U, A, U), chat_line(U, S, A), chat_line(U, A, A), chat_line(A, U),
    chat_line(U, U, A), chat_line(S), chat_line(U), chat_line(U, A, U, A, U, A, U),
    chat_line(*[U, A] * 128), chat_line(*[U, A] * 129),                 # 256 turns, then 258
    b'{"messages": [' + U + b", " + A + b'], "messages": []}\n',
    b'{"messages": [' + U + b", " + A + b'], "text": "t"}\n',
    b'{"messages": [' + U + b", " + A + b'], "id": 7}\n',
    *(GOOD[:-1] + end for end in (b"", b" ", b"x", b"\r", b"\r\r\n", b" \n", b"\t\n", b"\x0c\n",
                                  b"\n\n", b"\xc2\xa0\n", b"\xef\xbb\xbf\n", b" \r\n")),
    b" " + GOOD, b"\t" + GOOD, b"\xef\xbb\xbf" + GOOD, b"\n", b" \n", b"\r\n",
    CHAT_OK[:-1] + b"\r\n", CHAT_OK[:-1],
    b'{"text": "a", "text": "a"}\n', b'{"text": "\\u00e9 \xc3\xa9"}\n', b'{"text": "\\ud83d\\ude42"}\n',
    b'{"text": "\\ud83d"}\n', b'{"text": "\xc3\xa9 \\udc00"}\n', b'{"text": "\\u0000"}\n',
    b'{"text": "\\u3000"}\n', b'{"text": "\\u200b"}\n', b'{"text": "\xe2\x80\xa8"}\n',
    b'{"text": ["a"]}\n', b'{"text": {"a": 1}}\n', b'{"text": 1e400}\n', b'{"text": "a", "x": NaN}\n',
    b'{"prompt": "a", "completion": "b", "prompt": "a"}\n',
    b'{"prompt": "a", "prompt": "b"}\n', b'{"completion": "a", "completion": "b"}\n',
    b'{"prompt": "", "completion": "b"}\n', b'{"prompt": "a", "completion": " "}\n',
    b'{"prompt": "a", "completion": "b", "input": "c"}\n', b'{"prompt": "a", "output": "b"}\n',
    b'{"instruction": "i", "output": "o", "output": "o"}\n',
    b'{"instruction": "i", "input": "i", "output": "o"}\n', b'{"input": "", "instruction": "i", "output": "o"}\n',
    b'{"instruction": "i", "input": null, "output": "o"}\n', b'{"instruction": "i", "input": " ", "output": "o"}\n',
    b'{"instruction": "i", "input": "x", "input": "x", "output": "o"}\n',
    b'{"output": "o", "input": "\\ud800", "instruction": "i"}\n',
    b'{"instruction": "\xc3\xa9", "input": "\\u00e9", "output": "o"}\n',
]


def test_fast_path_never_accepts_what_the_careful_path_rejects(tmp_path):
    """validate_file's C-level fast path must agree with _check_line, the parser's authority:
    same format, tokens and trailing-user warning, or no verdict at all."""
    lines = [c[1].splitlines(keepends=True)[-1] for c in CORPUS if c[3] is not None]
    good = [json.dumps(r, ensure_ascii=a).encode() + b"\n" for r in OPENAI_CHAT + ALPACA
            for a in (True, False)]
    good += [GOOD, CHAT_OK, b'{"prompt": "a", "completion": "b"}\n',
             b'{"completion": "b\xc3\xa9", "prompt": "a"}\n', b'{"output": "o", "instruction": "i"}\n',
             b'{"input": "x", "output": "o", "instruction": "i"}\n',
             chat(("user", "a"), ("assistant", "b"), ("user", "c")), chat(("system", "s"), ("user", "a"),
                                                                           ("assistant", "b"))]
    assert all([fast_agrees(raw) for raw in good])    # each one proven on the fast path
    spoke = [fast_agrees(raw) for raw in lines + FAST_PATH_TRAPS]
    assert 15 <= sum(spoke) < len(spoke) - 100


# the pieces random_line draws from: JSON texts of every type, odd strings and escapes
VALUES = [b'"a"', b'"q r"', b'""', b'" "', b'"\\u00a0"', b'"\xc3\xa9 \xf0\x9f\x99\x82"', b'"\\u00e9"',
          b'"\\ud800"', b'"\\n"', b'"user"', b'"assistant"', b"0", b"null", b"true", b"[]", b"{}",
          b'["a"]', b'{"text": "a"}', b"1.5"]
STRINGS = [b'"a"', b'"q r"', b'"\xc3\xa9 \xf0\x9f\x99\x82"', b'"\\u00e9"', b'"\\"x\\"\\n"']
KEYS = ["text", "messages", "prompt", "completion", "instruction", "input", "output", "role",
        "content", "name", "\\u0074ext"]


def random_line(rng: random.Random) -> bytes:
    """A record-shaped line, valid or a step or two off: each field, message and role drawn
    with mostly the right choice, sometimes a wrong one, duplicated or missing."""
    def value():
        return rng.choice(VALUES) if rng.random() < 0.2 else rng.choice(STRINGS)

    def fields(names):
        pairs = [(k, value()) for k in names if rng.random() > 0.05]
        if rng.random() < 0.1:
            pairs.append((rng.choice(KEYS), value()))      # an extra or a duplicate key
        if rng.random() < 0.1:
            rng.shuffle(pairs)
        return msg(*pairs)

    def message():
        if rng.random() < 0.05:
            return rng.choice([b'"user"', b"[]", b'[["role", "user"], ["content", "a"]]'])
        role = rng.choice([b'"user"', b'"assistant"'] * 8 + [b'"system"'] * 2
                          + [b'"tool"', b'""', b"null", b'"\\u0075ser"'])
        pairs = [("role", role), ("content", value())]
        if rng.random() < 0.1:
            pairs.append((rng.choice(["role", "content", "name"]), value()))
        if rng.random() < 0.05:
            pairs.pop(rng.randrange(2))
        if rng.random() < 0.05:
            pairs.reverse()
        return msg(*pairs)

    kind = rng.randrange(5)
    if kind == 0:
        body = b'{"messages": [' + b", ".join(message() for _ in range(rng.randint(0, 6))) + b"]}"
    else:
        body = fields([["text"], ["prompt", "completion"], ["instruction", "input", "output"],
                       ["instruction", "output"]][kind - 1])
    end = rng.choice([b"\n"] * 8 + [b"\r\n", b"", b" \n", b"\n\n"])
    return body + end


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """`raw` with a byte or two deleted, inserted, replaced or a piece repeated."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(data) + 1)
        op = rng.randrange(4)
        byte = rng.choice(b'{}[]":,\\ \t\r\nu0a\x00\xff\xc3\x80') if rng.random() < 0.9 \
            else rng.randrange(256)
        if op == 0 and i < len(data):
            del data[i]
        elif op == 1:
            data.insert(i, byte)
        elif op == 2 and i < len(data):
            data[i] = byte
        else:
            j = rng.randrange(i, len(data) + 1)
            data[j:j] = data[i:min(j, i + 8)]
    return bytes(data)


def test_fast_path_agrees_with_the_careful_path_on_random_lines():
    rng = random.Random(20261201)
    seeds = [raw for raw in FAST_PATH_TRAPS if fast_verdict(raw)]
    spoke = total = 0
    for _ in range(10_000):
        raw = random_line(rng)
        spoke += fast_agrees(raw)
        spoke += fast_agrees(mutate(rng, raw))
        spoke += fast_agrees(mutate(rng, rng.choice(seeds)))
        total += 3
    assert total // 10 < spoke < total // 2     # both paths exercised


def test_the_role_order_cache_keeps_no_text_of_the_lines(tmp_path):
    """A chat's role order is remembered for the next chats, by known roles only: an unknown
    role, a megabyte long, is not kept (4096 of them once could be)."""
    long_role = "r" * 1_000_000
    path = write(tmp_path / "roles.jsonl", CHAT_OK + chat(("user", "a"), (long_role, "b"))
                 + chat(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")))
    report = vd.validate_file(path)
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(2, "unknown_role")]
    assert len(vd._ROLE_PATTERNS) >= 2
    assert all(pair is vd._ROLE_PAIRS[pair[1]] for key in vd._ROLE_PATTERNS for pair in key)


def test_validate_file_reports_the_same_with_and_without_the_fast_path(tmp_path, monkeypatch):
    """The whole report, duplicates across the two paths included, is the careful path's."""
    rng = random.Random(7)
    records = [json.dumps(r, ensure_ascii=rng.random() < 0.5).encode() + b"\n"
               for r in OPENAI_CHAT + ALPACA] + [GOOD, CHAT_OK]
    lines = [random_line(rng) for _ in range(1500)] + records * 3 + FAST_PATH_TRAPS
    rng.shuffle(lines)
    files = {"shuffled": b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for raw in lines),
             # chats then text: the first chat decides the file's format; a last line without
             # its newline repeats an earlier line
             "chat-first": CHAT_OK + b"".join(records * 2) + CHAT_OK.replace(b"\n", b"\r\n")
             + chat(("user", "a"), ("assistant", "b"), ("user", "c")) + b"\n" + CHAT_OK[:-1]}
    for name, data in files.items():
        path = write(tmp_path / f"{name}.jsonl", data)
        for options in ({}, {"allow_mixed": True, "max_length": 40}):
            with monkeypatch.context() as m:
                m.setattr(vd, "_fast_check", lambda raw: None)
                careful = vd.validate_file(path, **options)
            report = vd.validate_file(path, **options)
            assert report == careful
            assert report["warning_count"] and report["records"] >= 10


def test_estimate_tokens_is_utf8_bytes():
    assert vd.estimate_tokens("abc") == 3 and vd.estimate_tokens("é🙂") == 6


# --------------------------------------------------------------------------- bounded memory

# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a big pytest
# process would report the parent's size; VmHWM belongs to the new address space.
PEAK = """
import json, sys
sys.path.insert(0, {repo!r})
import validate_data
report = validate_data.validate_file(sys.argv[1], max_record_bytes=int(sys.argv[2]))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({{"peak_kb": int(hwm.split()[1]),
                  "records": report["records"],
                  "errors": [(e["line"], e["code"]) for e in report["errors"]]}}))
"""


def peak(path: Path, max_record_bytes: int) -> dict:
    code = PEAK.format(repo=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, str(path), str(max_record_bytes)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_50_mb_line_is_held_at_most_once_per_bound(tmp_path):
    size = 50 * 1024 * 1024
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.write(GOOD + b'{"text": "' + b"x" * size + b'"}\n' + GOOD.replace(b"good", b"last"))
    small = write(tmp_path / "small.jsonl", GOOD)
    base = peak(small, 1 << 20)["peak_kb"]

    over = peak(big, 1 << 20)         # over the bound: skipped in pieces, reported
    assert over["errors"] == [[2, "line_too_long"]] and over["records"] == 2
    assert over["peak_kb"] - base < 16 * 1024, (over, base)

    within = peak(big, 64 << 20)      # within it: parsed, so the bytes, then the text, then the
    assert within["errors"] == [] and within["records"] == 3   # parsed string: two at a time
    assert within["peak_kb"] - base < 2.3 * size / 1024, (within, base)


@pytest.mark.parametrize("kind", ["invalid-utf8-midway", "long-user-turn"])
def test_a_50_mb_line_with_a_problem_or_a_chat_is_held_at_most_twice(tmp_path, kind):
    """A failing decode once held such a line three times (its bytes, the output, and the
    exception's copy), and a long user turn was copied twice into the chat prompt."""
    size = 50 * 1024 * 1024
    path = tmp_path / f"{kind}.jsonl"
    with open(path, "wb") as f:
        if kind == "invalid-utf8-midway":
            f.write(GOOD + b'{"text": "' + b"x" * (size // 2) + b"\xff" + b"x" * (size // 2)
                    + b'"}\n')
        else:
            f.write(CHAT_OK + b'{"messages": [{"role": "user", "content": "' + b"u" * size
                    + b'"}, {"role": "assistant", "content": "a"}]}\n')
    base = peak(write(tmp_path / "small.jsonl", GOOD), 1 << 20)["peak_kb"]
    got = peak(path, 64 << 20)
    if kind == "invalid-utf8-midway":
        assert got["errors"] == [[2, "invalid_utf8"]]
        report = vd.validate_file(path)
        assert report["errors"][0]["byte_offset"] == len(GOOD) + 10 + size // 2
        assert report["errors"][0]["column"] == 11 + size // 2
    else:
        assert got["errors"] == [] and got["records"] == 2
    assert got["peak_kb"] - base < 2.3 * size / 1024, (got, base)


def test_first_bad_utf8_finds_the_byte_across_piece_boundaries(monkeypatch):
    monkeypatch.setattr(vd, "SKIP_CHUNK", 5)     # characters cut by every boundary
    text = "aé中😀b" * 3
    for cut in range(len(text.encode())):
        raw = bytearray(text.encode())
        raw[cut] = 0xFF
        with pytest.raises(UnicodeDecodeError) as exc:
            bytes(raw).decode("utf-8")
        assert vd._first_bad_utf8(bytes(raw)) == exc.value.start
    assert vd._first_bad_utf8(text.encode()) is None
    assert vd._first_bad_utf8((text + "😀").encode()[:-1]) == len(text.encode())   # cut short


# --------------------------------------------------------------------------- the CLI

def test_cli_valid_file_exits_0_with_a_summary(tmp_path):
    path = jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    proc = run_script("validate_data.py", str(path), root=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = vd.validate_file(path, max_length=256)
    assert proc.stdout == (f"{path}: {report['verdict']}\n"
                           f"  summary: 3 records (instruction), "
                           f"~{report['est_tokens']:,} tokens, 0 errors, 0 warnings\n")


def test_cli_exit_codes_and_json(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", OPENAI_CHAT)
    bad = write(tmp_path / "bad.jsonl", GOOD + b"[1]\n")
    proc = run_script("validate_data.py", str(good), str(bad), "--json", root=tmp_path)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and [f["ok"] for f in doc["files"]] == [True, False]
    assert doc["files"][1]["errors"] == [{"line": 2, "code": "not_object",
                                          "message": "expected a JSON object, got an array"}]

    missing = tmp_path / "missing.jsonl"
    proc = run_script("validate_data.py", str(good), str(missing), "--json", root=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (f"Error: file not found, {missing}. Check the path and pass a "
                           "readable .jsonl file.\n")
    doc = json.loads(proc.stdout)
    assert [f["ok"] for f in doc["files"]] == [True, False]
    assert doc["files"][1]["verdict"] == "not checked: file not found"

    proc = run_script("validate_data.py", str(tmp_path), root=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"Error: is a directory, not a file, {tmp_path}.")

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)                   # opening it would block: refused before opening
    proc = run_script("validate_data.py", str(fifo), root=tmp_path, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr == (f"Error: not a regular file (a pipe, socket or device), {fifo}. "
                           "Save the data to a regular .jsonl file and pass that.\n")

    assert run_script("validate_data.py", root=tmp_path).returncode == 2        # no FILE
    assert run_script("validate_data.py", str(good), "--max-length", "0",
                      root=tmp_path).returncode == 2


def test_output_cut_short_by_its_reader_is_no_traceback(tmp_path):
    """`validate_data.py *.jsonl | head`: more output than a pipe holds, then the reader leaves."""
    paths = [str(write(tmp_path / f"{i}.jsonl", b"1\n" * 150)) for i in range(20)]
    proc = subprocess.Popen([sys.executable, str(REPO / "validate_data.py"), *paths,
                             "--root", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().endswith(b"invalid: 150 errors; first: line 1: expected a JSON "
                                           b"object, got a number\n")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(30) == 1 and err == b""


def test_unreadable_file_is_a_usage_error(tmp_path):
    """Root reads any file, so as root the CLI runs as nobody (as the daemon's user might)."""
    folder = Path(tempfile.mkdtemp(prefix="unreadable-"))     # tmp_path is root-only
    try:
        folder.chmod(0o755)
        path = jsonl(folder / "secret.jsonl", ALPACA)
        path.chmod(0)
        as_nobody = []
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("root reads any file, and setpriv is missing to run as nobody")
            as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.run([*as_nobody, sys.executable, str(REPO / "validate_data.py"),
                               str(path), "--root", str(folder)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, proc
        assert proc.stderr == (f"Error: cannot read the file (permission denied), {path}. Make it "
                               f"readable (chmod u+r {path}) or run as its owner.\n")
    finally:
        shutil.rmtree(folder)


def test_cli_takes_settings_from_the_roots_config(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    training_config.write_config(root, training_config.default_config(
        max_length=16, allow_mixed_formats=True, max_record_bytes=2048))
    path = write(tmp_path / "mixed.jsonl", b'{"text": "' + b"z" * 20 + b'"}\n' + CHAT_OK
                 + b'{"text": "' + b"w" * 3000 + b'"}\n')
    doc = json.loads(run_script("validate_data.py", str(path), "--json", "--root", str(root)).stdout)
    assert (doc["max_length"], doc["allow_mixed"], doc["max_record_bytes"]) == (16, True, 2048)
    report = doc["files"][0]
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(3, "line_too_long")]
    assert [(w["line"], w["code"]) for w in report["warnings"]] == [(1, "too_long"), (2, "too_long")]

    proc = run_script("validate_data.py", str(path), "--json", "--max-record-bytes", "4096",
                      "--root", str(root))
    assert proc.returncode == 0 and json.loads(proc.stdout)["files"][0]["format"] == "mixed"

    # no config (the root need not exist): the defaults, so one format per file
    proc = run_script("validate_data.py", str(path), "--json", "--root", str(tmp_path / "nowhere"))
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["max_length"] == 256 and doc["allow_mixed"] is False
    assert doc["files"][0]["errors"][0]["code"] == "mixed_formats"
    assert not (tmp_path / "nowhere").exists()


def test_validate_file_is_what_the_queue_reads(tmp_path):
    report = vd.validate_file(write(tmp_path / "x.jsonl", GOOD))
    assert set(report) >= {"path", "ok", "verdict", "format", "records", "est_tokens", "errors",
                           "error_count", "warnings", "warning_count"}
    json.dumps(report)  # saved next to a rejected file: must serialise as is
    with pytest.raises(UsageError):
        vd.validate_file(tmp_path / "absent.jsonl")
