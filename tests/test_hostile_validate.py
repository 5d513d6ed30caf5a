"""validate_data.py against real exports and hostile files: what a user sees, and what the trainer reads."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import validate_data as vd
from trainroot import GuardrailError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def first_error(path: Path) -> dict:
    report = vd.validate_file(path)
    assert not report["ok"], report
    return report["errors"][0]


def chat(*turns, **extra):
    return [{"role": r, "content": c, **extra} for r, c in turns]


@pytest.mark.parametrize("obj, code, expected", [
    # Dolly 15k: instruction/context/response
    ({"instruction": "Do", "context": "c", "response": "done", "category": "qa"}, "missing_field",
     'instruction record without "output" (rename "response" -> "output", "context" -> "input")'),
    ({"prompt": "Q", "response": "A"}, "missing_field",
     'prompt_completion record without "completion" (rename "response" -> "completion")'),
    ({"prompt": "Q", "Completion": "A"}, "missing_field",
     'prompt_completion record without "completion" (rename "Completion" -> "completion")'),
    ({"Text": "a"}, "unknown_format",
     '(field names are case-sensitive: rename "Text" -> "text")'),
    ({"Messages": chat(("user", "q"), ("assistant", "a"))}, "unknown_format",
     '(field names are case-sensitive: rename "Messages" -> "messages")'),
    ({"messages": chat(("User", "q"), ("Assistant", "a"))}, "unknown_role",
     'messages[0].role is "User"; expected system, user, assistant or tool (roles are lowercase: '
     'write "user")'),
    ({"messages": chat(("developer", "s"), ("user", "q"), ("assistant", "a"))}, "unknown_role",
     '(write "system" for "developer")'),
    ({"messages": chat(("human", "q"), ("gpt", "a"))}, "unknown_role",
     '(write "user" for "human")'),
    # ShareGPT turns put under "messages" without renaming their fields
    ({"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "missing_field", 'messages[0] without "role" (ShareGPT turns: rename "from" -> "role"'),
    # the older OpenAI function_call shape leaves "content" out entirely
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                   {"role": "function", "name": "f", "content": "1"},
                   {"role": "assistant", "content": "a"}]}, "wrong_type",
     "messages[1].function_call (OpenAI's legacy form) is not supported: write it as "
     '"tool_calls": [{"type": "function", "function": {"name", "arguments"}}]'),
    # OpenAI content parts: the error carries a command that converts them, checked below
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "a"}]}, "wrong_type",
     "e.g. jq -c '.messages[].content |= (if type == \"array\" then map(.text) | join(\"\") "
     "else . end)' FILE > NEW.jsonl)"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                   {"role": "assistant", "content": "a"}]}, "wrong_type",
     "parts that are not text, such as images, cannot be trained on: leave that turn out)"),
    ({"text": "a", "prompt": "b", "completion": "c"}, "ambiguous_format",
     'keep the fields of one format and rename or drop the others ("completion", "prompt", '
     '"text")'),
    ({"instruction": "Do", "input": None, "output": "done"}, "wrong_type",
     '"input" must be a string, got null (write "" or leave "input" out when there is none)'),
    ({"prompt": "", "completion": "free text"}, "empty_field",
     '"prompt" is empty (text with no prompt is a text record: write {"text": COMPLETION})'),
    ({"messages": chat(("user", "a"), ("user", "b"), ("assistant", "c"))}, "role_order",
     "starting with user (merge consecutive user turns into one)"),
])
def test_look_alike_exports_say_what_to_rename(tmp_path, obj, code, expected):
    err = first_error(write(tmp_path / "x.jsonl", line(obj)))
    assert (err["line"], err["code"]) == (1, code), err
    assert expected in err["message"], err


def test_openai_weight_zero_turns_are_context_not_trained(tmp_path):
    obj = {"messages": [{"role": "user", "content": "q", "name": "ann"},
                        {"role": "assistant", "content": "bad", "weight": 0},
                        {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "good", "weight": 1}]}
    path = write(tmp_path / "w.jsonl", line(obj) * 2)
    report = vd.validate_file(path)
    assert report["ok"] and report["records"] == 2
    assert [(w["line"], w["code"]) for w in report["warnings"]] == [(2, "duplicate")]
    record = next(vd.iter_records(path))
    assert ("bad", False) in record.segments and ("good", True) in record.segments
    # a plain "name" is passed to the chat template, so it is not reported
    named = write(tmp_path / "n.jsonl", line({"messages": chat(("user", "q"), ("assistant", "a"),
                                                                name="x")}))
    assert vd.validate_file(named)["warnings"] == []
    # a weight other than 0/1, on a user turn, or on every assistant turn is an error
    for bad, message in (({"role": "assistant", "content": "a", "weight": 0.5}, "must be 0 or 1"),
                         ({"role": "assistant", "content": "a", "weight": 0}, "nothing to train on")):
        path = write(tmp_path / "bad.jsonl", line({"messages": [{"role": "user", "content": "q"}, bad]}))
        assert message in vd.validate_file(path)["errors"][0]["message"]
    path = write(tmp_path / "bad.jsonl", line({"messages": [
        {"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}))
    assert "only assistant turns have a weight" in vd.validate_file(path)["errors"][0]["message"]


@pytest.mark.parametrize("encoding, expected", [
    ("utf-32", "UTF-32 text; convert it to UTF-8 (iconv -f UTF-32 -t UTF-8 FILE > NEW.jsonl)"),
    ("utf-16-le", "UTF-16LE text (no byte-order mark); convert it to UTF-8 "
                  "(iconv -f UTF-16LE -t UTF-8 FILE > NEW.jsonl)"),
    ("utf-16-be", "UTF-16BE text (no byte-order mark); convert it to UTF-8 "
                  "(iconv -f UTF-16BE -t UTF-8 FILE > NEW.jsonl)"),
])
def test_other_unicode_encodings_name_the_right_iconv(tmp_path, encoding, expected):
    text = (json.dumps({"text": "café 你好"}, ensure_ascii=False) + "\n") * 3
    err = first_error(write(tmp_path / "u.jsonl", text.encode(encoding)))
    assert (err["line"], err["code"], err["message"]) == (None, "utf16_file", expected)


def test_binary_file_error_says_what_to_do(tmp_path):
    err = first_error(write(tmp_path / "b.jsonl", line({"text": "a"}) + b"\x00\x01\x02\x00\n"))
    assert err["code"] == "binary_file" and err["line"] == 2
    assert err["message"].endswith("remove them (tr -d '\\000' < FILE > NEW.jsonl)"), err


def test_a_pretty_printed_file_is_one_error_whose_fix_works(tmp_path):
    records = [{"messages": chat(("user", "q"), ("assistant", f"a{i}"))} for i in range(3)]
    for name, data, code, jq in (
            ("p", "\n".join(json.dumps(r, indent=2) for r in records), "pretty_printed", "jq -c ."),
            ("a", json.dumps(records, indent=2), "json_array", "jq -c '.[]'"),
            ("one-line-array", json.dumps(records), "json_array", "jq -c '.[]'")):
        path = write(tmp_path / f"{name}.jsonl", data.encode() + b"\n")
        report = vd.validate_file(path)
        assert [(e["line"], e["code"]) for e in report["errors"]] == [(None, code)], report
        assert f"{jq} FILE > NEW.jsonl" in report["errors"][0]["message"]
        with pytest.raises(GuardrailError, match=code):   # the trainer says the same
            next(vd.iter_records(path))
        # the command given really produces the records
        fixed = tmp_path / f"{name}-fixed.jsonl"
        cmd = vd.whole_file_fix(code, path, fixed)
        if shutil.which("jq"):
            subprocess.run(cmd, shell=True, check=True)
            assert [r.messages for r in vd.iter_records(fixed)] == [r["messages"] for r in records]


def test_real_exports_read_by_the_trainer_as_validated(tmp_path):
    """What validate accepts, iter_records yields with exactly the texts a user expects."""
    data = (b"\xef\xbb\xbf" + line({"instruction": "Sum", "input": "", "output": "3"})
            + json.dumps({"prompt": "Q: 1+1\n\nA:", "completion": " 2\n"}).encode() + b"\r\n"
            + b"\n"
            + line({"text": "x", "id": 7})
            + json.dumps({"messages": chat(("system", ""), ("user", "q"), ("assistant", "a"))})
            .encode())                                   # last line without a newline
    path = write(tmp_path / "mix.jsonl", data)
    report = vd.validate_file(path, allow_mixed=True)
    assert report["ok"] and report["records"] == 4
    assert sorted(w["code"] for w in report["warnings"]) == ["blank_line", "bom", "crlf",
                                                             "ignored_field"]
    got = [(r.line, r.format, r.segments) for r in vd.iter_records(path, allow_mixed=True)]
    assert got == [
        (1, "instruction", [("### Instruction:\nSum\n\n### Response:\n", False), ("3", True)]),
        (2, "prompt_completion", [("Q: 1+1\n\nA:", False), (" 2\n", True)]),
        (4, "text", [("x", True)]),
        (5, "messages", [("<|system|>\n\n<|user|>\nq\n<|assistant|>\n", False), ("a", True)])]
    assert report["est_tokens"] == sum(vd.estimate_tokens(t) for _, _, segs in got for t, _ in segs)


def test_cli_json_is_one_document_with_listed_then_counted_problems(tmp_path):
    bad = write(tmp_path / "bad.jsonl", b"".join(line({"Text": str(i)}) for i in range(150)))
    run = subprocess.run([sys.executable, str(ROOT / "validate_data.py"), str(bad), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    doc = json.loads(run.stdout)
    (report,) = doc["files"]
    assert report["error_count"] == 150 and len(report["errors"]) == vd.MAX_LISTED
    assert [e["line"] for e in report["errors"]] == list(range(1, 101))
    assert all('rename "Text" -> "text"' in e["message"] for e in report["errors"])


def test_huge_keys_and_roles_do_not_blow_up_the_report(tmp_path):
    """A report lists 100 problems: each quoting a 2 MB key whole made it 200 MB."""
    big = "k" * 2_000_000
    data = (b'{"%s": 1}\n' % big.encode()                                    # unknown_format
            + line({"messages": [{"role": big, "content": "a"}]})           # unknown_role
            + b'{"text": "a", "%s": 1, "%s": 2}\n' % (big.encode(), big.encode())  # duplicate_key
            + b'{"text": "a", "%s": 1}\n' % big.encode())                    # ignored_field
    path = write(tmp_path / "k.jsonl", data)
    report = vd.validate_file(path, allow_mixed=True)
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (1, "unknown_format"), (2, "unknown_role"), (3, "duplicate_key")]
    assert [(w["line"], w["code"]) for w in report["warnings"]] == [(4, "ignored_field")]
    for problem in report["errors"] + report["warnings"]:
        assert '"' + "k" * 60 + '..." (2,000,000 characters)' in problem["message"], problem
    assert len(json.dumps(report)) < 5_000


def test_nul_bytes_past_the_sniffed_head_say_what_to_do(tmp_path):
    data = line({"text": "x" * 100}) * 100 + b'{"text": "a"}\x00\n' + b"\x00\x00\n"
    report = vd.validate_file(write(tmp_path / "n.jsonl", data))
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(101, "invalid_json"),
                                                                 (102, "invalid_json")]
    for err in report["errors"]:
        assert err["message"].endswith(": a NUL byte; remove NUL bytes "
                                       "(tr -d '\\000' < FILE > NEW.jsonl)"), err
