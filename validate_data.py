"""What a training record is: the four data formats, the record parser, pre-flight validation.

This is the one place that knows what a line of a `.jsonl` data file means. The trainer
reads every file through `iter_records`; the daemon checks every dropped file with
`validate_file` first and saves its report next to a rejected file. Standard library
only; memory stays bounded whatever the file's size and whatever one line's size
(a line longer than `max_record_bytes` is skipped in 1 MiB pieces and reported).

    python3 validate_data.py inbox/chat.jsonl                 # report, exit 0 valid / 1 invalid
    python3 validate_data.py a.jsonl b.jsonl --json           # one JSON document for both files
    python3 validate_data.py big.jsonl --max-length 2048 --max-record-bytes 1000000

Formats (one JSON object per line, detected per record; one format per file unless
config `allow_mixed_formats` / `--allow-mixed`; unknown extra fields (of a record, or of
a chat turn: a misspelled "weight") are ignored, with one warning per field name; config
`fields` renames a file's own field names to these,
e.g. {"prompt": "user_prompt", "completion": "expected_answer"}). Each record becomes
`segments`, a list of (text, trained) - the plain rendering, used for a model without a
chat template - and, for every format but text, `messages`: the conversation the
model's chat template renders (the trainer uses the template whenever there is one).

- `text`: `{"text": T}` -> [(T, True)].
- `prompt_completion`: `{"prompt": P, "completion": C}` -> a user turn P and an
  assistant turn C; plain: [(P + sep, False), (C, True)] where sep is "\n" unless P
  ends or C starts with whitespace. TRL's conversational form (P and C arrays of
  messages) is a conversation whose completion turns train (the prompt's earlier
  assistant turns get weight 0).
- `instruction`: `{"instruction": I, "input": X, "output": O}` (`input` optional, may be
  ""): a user turn "I\n\nX" (or I) and an assistant turn O; plain, Alpaca style ->
  [("### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n", False), (O, True)];
  with no or empty input the `### Input:` block is left out.
- `messages`: `{"messages": [{"role", "content"}, ...], "tools"?: [schema, ...]}`, roles
  system/user/assistant/tool, content a string (content-part lists are not supported).
  An assistant turn may carry OpenAI `tool_calls` (content then null or absent) and
  `"weight": 0|1` (0: rendered as context, not trained); `tool` turns (results) follow
  the tool call they answer. The plain rendering is "<|system|>\nS\n<|user|>\nU\n
  <|assistant|>\n" untrained, then each assistant content trained, turns joined by
  "\n" (tool calls have no plain rendering: the trainer refuses them without a
  template). Role order, enforced because most chat templates raise on anything else:
  system turns only at the start, then alternating user/assistant beginning with user
  (tool results between a call and the next assistant turn), at least one trained
  assistant turn (errors); a conversation ending on a user turn is a warning.

A file that is JSON but not JSON lines (one array, or pretty-printed objects), a git-lfs
pointer, compressed or UTF-16 data is one whole-file error naming the command that
converts it (`jq -c '.[]'`, `jq -c .`, `git lfs pull`, ...).

Untrained segments are context only: the trainer takes no loss on them unless config
`loss_on_prompt` is true, in which case it trains on every segment (its business, not
this module's). Token counts here are estimates: UTF-8 bytes, exact for the byte-level
tiny model, an upper bound for most BPE tokenizers.

Every problem has a code (ERROR_CODES reject the file, WARNING_CODES do not) and a 1-based
line. Duplicates are found by a hash of the line's bytes. `validate_file` checks most
lines on a fast path of C-level operations and hands anything unusual to `_check_line`,
the same careful checker `iter_records` uses, which decides.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import stat
import sys
import itertools
from pathlib import Path
from typing import Iterator, NamedTuple

import training_config
from trainroot import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE, GuardrailError, Paths, UsageError,
                       add_common_args, print_json, resolve_root, run_cli)

FORMATS = ("text", "messages", "prompt_completion", "instruction")
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_RECORD_BYTES = training_config.PARAMS["max_record_bytes"].default   # 64 MiB
MAX_LISTED = 100            # errors and warnings listed per file; the rest are counted
DUPLICATE_TRACK_LIMIT = 500_000   # distinct lines remembered for duplicate warnings (~50 MB)
SNIFF_BYTES = 8192          # the head of a file checked for binary/compressed content
SKIP_CHUNK = 1 << 20        # an over-long line is skipped in pieces of this size
BIG_LINE = 1 << 20          # longer lines skip the fast path, which holds them three times

_KEY_FORMAT = {"text": "text", "messages": "messages", "prompt": "prompt_completion",
               "completion": "prompt_completion", "instruction": "instruction",
               "input": "instruction", "output": "instruction"}
_KNOWN_KEYS = frozenset(_KEY_FORMAT)
_RECORD_KEYS = _KNOWN_KEYS | {"tools"}     # "tools": function schemas a chat's template is given
# A turn's keys the product reads, or chat templates commonly do (the whole turn is handed
# to the template); any other is reported (a misspelled "weight" trains the turn).
_MESSAGE_KEYS = frozenset({"role", "content", "weight", "tool_calls", "function_call",
                           "tool_call_id", "name", "reasoning_content", "reasoning", "thinking"})
assert _RECORD_KEYS == set(training_config.MAPPABLE_FIELDS)   # what config.json `fields` may map

# Every problem code, with what it means (errors reject the file; warnings do not).
ERROR_CODES = {
    "empty_file": "the file has no bytes",
    "no_records": "the file has only blank lines",
    "binary_file": "NUL bytes: not a text file",
    "compressed_file": "gzip/zip/bz2/xz/zstd data under a .jsonl name",
    "utf16_file": "UTF-16 text; only UTF-8 is read",
    "invalid_utf8": "bytes that are not UTF-8 (byte_offset is in the file)",
    "invalid_json": "the line is not one JSON value (column from the parser)",
    "truncated_last_line": "the last line has no newline and its JSON is cut short",
    "non_finite_number": "NaN or Infinity: not JSON (RFC 8259)",
    "duplicate_key": "an object names the same key twice",
    "too_deep": "JSON nested too deeply to parse",
    "line_too_long": "a line longer than max_record_bytes",
    "not_object": "the line is JSON but not an object",
    "unknown_format": "an object with none of the known fields",
    "ambiguous_format": "fields of more than one format in one record",
    "mixed_formats": "a record whose format differs from the file's first record",
    "missing_field": "a required field is absent",
    "empty_field": "a required string is empty or only whitespace",
    "wrong_type": "a field has the wrong JSON type",
    "unknown_role": "a message role other than system/user/assistant/tool",
    "role_order": "system not first, user/assistant not alternating from user, or a tool "
                  "result not after a tool call",
    "json_array": "the file is one JSON array, not one object per line",
    "pretty_printed": "JSON objects spread over several lines, not one per line",
    "git_lfs_pointer": "a git-lfs pointer file, not the data it points to",
    "no_assistant_turn": "a conversation with nothing to train on",
    "lone_surrogate": "a \\ud800-style escape that is not valid Unicode",
}
WARNING_CODES = {
    "blank_line": "an empty or whitespace-only line (skipped)",
    "bom": "a UTF-8 byte-order mark (skipped)",
    "crlf": "CRLF line endings (accepted; reported once per file)",
    "duplicate": "the same line as an earlier one (by hash)",
    "too_long": "estimated tokens over max_length: the trainer splits it, nothing is dropped",
    "trailing_user_turn": "a conversation ending on a user turn (that turn trains nothing)",
    "ignored_field": "a field no format uses, or a turn field nothing reads (reported once per name)",
    "duplicates_unchecked": "more distinct lines than the duplicate tracker holds",
}

_FILE_CODES = ("empty_file", "no_records", "binary_file", "compressed_file", "utf16_file",
               "json_array", "pretty_printed", "git_lfs_pointer")
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2"),
          (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_UNCOMPRESS = {"gzip": "gunzip -c", "zip": "unzip -p", "bzip2": "bunzip2 -c", "xz": "unxz -c",
               "zstd": "zstd -dc"}


class Record(NamedTuple):
    """One valid record: where it is (1-based line, byte offsets) and what the trainer needs."""
    line: int
    offset: int
    next_offset: int          # byte offset of the next line: seek here to resume after it
    format: str
    segments: list            # [(text, trained: bool), ...]: the plain rendering
    messages: list | None     # the conversation a chat template renders (every format but
                              # text; weight 0 on turns that do not train), else None
    tools: list | None = None  # a chat record's `tools` (function schemas) for the template


class _Bad(Exception):
    """One problem found in a line (internal: becomes an error entry or a GuardrailError)."""

    def __init__(self, code: str, message: str, column: int | None = None,
                 byte_offset: int | None = None):
        super().__init__(message)
        self.code, self.message, self.column, self.byte_offset = code, message, column, byte_offset


# --------------------------------------------------------------------------- parsing one object

def _reject_constant(name: str):
    raise _Bad("non_finite_number", f"{name} is not valid JSON (RFC 8259); write null or a string")


def _unique_pairs(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Bad("duplicate_key", f"duplicate key {_quote(key)} in one object")
            seen.add(key)
    return obj


_decode = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_reject_constant).decode


def _quote(text: str, limit: int = 60) -> str:
    """A string from the data as JSON for a message, cut short: a report lists up to 100
    problems, and a 60 MB key or role must not make each of them 60 MB."""
    if len(text) <= limit:
        return json.dumps(text)
    return json.dumps(text[:limit])[:-1] + f'..." ({len(text):,} characters)'


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def estimate_tokens(text: str) -> int:
    """Estimated tokens of a text: its UTF-8 byte length (exact for the byte-level tiny model)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _byte_len(text: str, where: str) -> int:
    try:
        return estimate_tokens(text)
    except UnicodeEncodeError as exc:
        raise _Bad("lone_surrogate", f"{where} holds a lone surrogate "
                   f"\\u{ord(text[exc.start]):04x}, which is not valid Unicode") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON writes half a pair


def _no_lone_surrogate(value, where: str = "") -> None:
    """Raises lone_surrogate naming the first string (or key) in `value` that holds one:
    it could never be encoded, so a tokenizer would fail on it halfway through training."""
    if type(value) is str:
        _byte_len(value, where)
    elif type(value) is dict:
        for key, item in value.items():
            name = json.dumps(key) if not where else f"{where.strip(chr(34))}.{key}"
            _byte_len(key, f"a key of {where or 'the record'}")
            _no_lone_surrogate(item, name)
    elif type(value) is list:
        for i, item in enumerate(value):
            _no_lone_surrogate(item, f"{where.strip(chr(34))}[{i}]")


def _string(obj: dict, key: str, owner: str, *, allow_empty: bool = False) -> str:
    """obj[key] if it is a non-empty string; `owner` names obj in the message."""
    if key not in obj:
        raise _Bad("missing_field", f'{owner} without "{key}"')
    value = obj[key]
    if type(value) is not str:
        raise _Bad("wrong_type", f'"{key}" must be a string, got {_json_type(value)}'
                   + (' (write "" or leave "input" out when there is none)'
                      if key == "input" and value is None else ""))
    if not allow_empty and (not value or value.isspace()):
        raise _Bad("empty_field", f'"{key}" is empty')
    return value


def detect_format(obj) -> str | None:
    """The format a parsed line belongs to, from its fields; None if it has none or several."""
    if type(obj) is not dict:
        return None
    found = {_KEY_FORMAT[k] for k in obj.keys() & _KNOWN_KEYS}
    return found.pop() if len(found) == 1 else None


def _instruction_prompt(instruction: str, inp: str) -> str:
    if inp:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


# roles other tools write, with the role to write instead
_ROLE_RENAMES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
                 "developer": "system", "chatgpt": "assistant", "ai": "assistant",
                 "function": "tool", "ipython": "tool", "tool_results": "tool"}


def _role_hint(role) -> str:
    if type(role) is str:
        if role.lower() in ROLES:
            return f' (roles are lowercase: write "{role.lower()}")'
        if role.lower() in _ROLE_RENAMES:
            return f' (write "{_ROLE_RENAMES[role.lower()]}" for {json.dumps(role)})'
    return ""


def _tool_calls(msg: dict, where: str) -> list:
    """A turn's `tool_calls` checked: a non-empty array of calls, each naming its function."""
    if "function_call" in msg and msg["function_call"] is not None:
        raise _Bad("wrong_type", f'{where}.function_call (OpenAI\'s legacy form) is not supported: '
                   'write it as "tool_calls": [{"type": "function", "function": {"name", '
                   '"arguments"}}]')
    calls = msg.get("tool_calls")
    if calls is None:
        return []
    if type(calls) is not list or not calls:
        raise _Bad("wrong_type", f"{where}.tool_calls must be a non-empty array, got "
                   f"{_json_type(calls) if calls != [] else 'an empty array'}")
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if type(call) is not dict:
            raise _Bad("wrong_type", f"{at} must be an object, got {_json_type(call)}")
        fn = call.get("function", call)
        if type(fn) is not dict:
            raise _Bad("wrong_type", f"{at}.function must be an object, got {_json_type(fn)}")
        fn_at = at + (".function" if "function" in call else "")
        _string(fn, "name", fn_at)
        args = fn.get("arguments")
        if args is not None and type(args) not in (dict, str):
            raise _Bad("wrong_type", f"{at} arguments must be an object or a JSON string, got "
                       f"{_json_type(args)}")
        if type(args) is str:             # OpenAI's form: the object, written as JSON text
            try:
                held = json.loads(args)
            except (ValueError, RecursionError):
                held = None
            if type(held) is not dict:
                raise _Bad("wrong_type", f"{fn_at}.arguments is a string that does not hold a "
                           f"JSON object ({_quote(args, 40)}): the model would learn to write "
                           "that call malformed; write the arguments as an object")
            _no_lone_surrogate(held, f"{fn_at}.arguments")
    return calls


def _weight(msg: dict, where: str, role: str) -> int:
    """OpenAI's per-turn "weight": 1 (default) trains an assistant turn, 0 renders it only."""
    if "weight" not in msg:
        return 1
    weight = msg["weight"]
    if type(weight) is not int or weight not in (0, 1):
        raise _Bad("wrong_type", f"{where}.weight must be 0 or 1, got {_quote(json.dumps(weight))}")
    if role != "assistant":
        raise _Bad("wrong_type", f"{where}.weight is on a {role} turn; only assistant turns "
                   "have a weight (0: rendered, not trained)")
    return weight


def _chat(messages, *, owner: str = "messages") -> tuple[list, int, bool]:
    """(segments, tokens, ends_on_user) of a messages list; raises _Bad on the first problem."""
    if type(messages) is not list:
        raise _Bad("wrong_type", f'"{owner}" must be an array, got {_json_type(messages)}')
    if not messages:
        raise _Bad("empty_field", f'"{owner}" is empty')
    segments, pending = [], []     # the untrained text since the last assistant turn, in parts
    previous = None        # role of the last user/assistant/tool turn ("call": a tool call)
    assistants = trained = 0
    for i, msg in enumerate(messages):
        where = f"{owner}[{i}]"
        if type(msg) is not dict:
            raise _Bad("wrong_type", f"{where} must be an object, got {_json_type(msg)}")
        if "role" not in msg and "from" in msg:      # ShareGPT turns under "messages"
            raise _Bad("missing_field", f'{where} without "role" (ShareGPT turns: rename "from" '
                       '-> "role" with human -> user and gpt -> assistant, "value" -> "content")')
        role = _string(msg, "role", where)
        article = "an" if role == "assistant" else "a"
        if role not in ROLES:
            raise _Bad("unknown_role", f"{where}.role is {_quote(role)}; expected system, "
                       "user, assistant or tool" + _role_hint(role))
        calls = _tool_calls(msg, where) if role == "assistant" else []
        weight = _weight(msg, where, role)
        content = msg.get("content")
        if calls and content is None:
            content = ""                  # a tool call without text: OpenAI writes null
        elif "content" not in msg:
            raise _Bad("missing_field", f'{where} without "content"')
        if type(content) is not str:
            hint = ""
            if type(content) is list:
                hint = ' (content parts are not supported: join their "text" into one string' + (
                    ", e.g. jq -c '.messages[].content |= (if type == \"array\" then map(.text) "
                    "| join(\"\") else . end)' FILE > NEW.jsonl)"
                    if all(type(p) is dict and p.get("type") == "text" and type(p.get("text")) is str
                           for p in content)
                    else "; parts that are not text, such as images, cannot be trained on: leave "
                         "that turn out)")
            raise _Bad("wrong_type", f"{where}.content must be a string, got "
                       f"{_json_type(content)}{hint}")
        if role not in ("system", "tool") and not calls and (not content or content.isspace()):
            raise _Bad("empty_field", f"{where}.content is empty")
        if role == "system":
            if previous is not None:
                raise _Bad("role_order", f"{where} is a system turn after the conversation "
                           "started; system turns go first")
        elif role == "tool":
            if previous not in ("call", "tool"):
                raise _Bad("role_order", f"{where} is a tool result after "
                           f"{'a ' + previous + ' turn' if previous else 'no turn'}; tool results "
                           "follow the assistant turn whose tool_calls they answer")
        elif role == "user" and previous == "user" or role == "assistant" and previous not in ("user", "tool"):
            shown = {"call": "an assistant tool call", "tool": "a tool result"}.get(previous, previous)
            raise _Bad("role_order", f"{where} is {article} {role} turn after "
                       f"{'a ' + shown + ' turn' if previous in ROLES else shown or 'no user turn'}; "
                       "turns must alternate user/assistant, starting with user"
                       + (f" (merge consecutive {role} turns into one)" if previous == role else ""))
        _byte_len(content, f"{where}.content")   # raises on a lone surrogate
        if role == "assistant":
            assistants += 1
            trained += weight
            text = content + ("\n" + json.dumps(calls, ensure_ascii=False) if calls else "")
            pending.append("<|assistant|>\n")   # joined once: a long turn is copied once
            segments.append(("".join(pending), False))
            segments.append((text, bool(weight)))
            pending = ["\n"]
        else:
            pending += ("<|", role, "|>\n", content, "\n")
        if role != "system":
            previous = "call" if calls else role
    if not assistants:
        raise _Bad("no_assistant_turn", "no assistant turn: nothing to train on")
    if not trained:
        raise _Bad("no_assistant_turn", 'every assistant turn has "weight": 0: nothing to train on')
    if pending != ["\n"]:
        segments.append(("".join(pending), False))
    tokens = sum(estimate_tokens(text) for text, _ in segments)
    return segments, tokens, previous == "user"


def _tools(obj: dict) -> list | None:
    """A chat record's `tools`: an array of function schemas (objects), or None."""
    tools = obj.get("tools")
    if tools is None:
        return None
    if type(tools) is not list or any(type(t) is not dict for t in tools):
        raise _Bad("wrong_type", f'"tools" must be an array of objects (function schemas), got '
                   f"{_json_type(tools)}")
    return tools or None


_ACCEPTED = ('{"text"}, {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} '
             'or {"instruction", "input"?, "output"}')
# Look-alike formats from other tools, with what to change
_FOREIGN_FORMATS = {
    "conversations": ' (ShareGPT "conversations": rename it "messages", "from" -> "role" with '
                     'human -> user and gpt -> assistant, "value" -> "content")',
    "question": ' (question/answer: rename them "prompt" and "completion")',
    "chosen": " (preference pairs (chosen/rejected) are not supported: train on the chosen "
              'text as "messages" or "text")',
}


def _parse_object(obj) -> tuple[str, list, list | None, int, bool, list | None]:
    """(format, segments, messages, tokens, ends_on_user, tools) of one parsed line, or
    raises _Bad."""
    if type(obj) is not dict:
        hint = ""
        if type(obj) is str and obj.lstrip().startswith("{"):
            hint = " holding JSON text (encoded twice? write the object itself)"
        elif type(obj) is list and obj and type(obj[0]) is dict:   # records in one array
            hint = " (one object per line: jq -c '.[]' FILE > NEW.jsonl splits an array)"
        raise _Bad("not_object", f"expected a JSON object, got {_json_type(obj)}{hint}")
    known = obj.keys() & _KNOWN_KEYS
    found = {_KEY_FORMAT[k] for k in known}
    if len(found) != 1:
        if not found:
            keys = ", ".join(map(_quote, itertools.islice(obj, 5))) or "none"
            hint = _FOREIGN_FORMATS.get(next((k for k in obj if k in _FOREIGN_FORMATS), None), "")
            cased = [k for k in obj if k != k.lower()
                     and (k.lower() in _KNOWN_KEYS or k.lower() in _FOREIGN_FORMATS)]
            if cased:                     # "Text", "Messages": field names are case-sensitive
                hint = (" (field names are case-sensitive: rename "
                        + ", ".join(f'{json.dumps(k)} -> {json.dumps(k.lower())}' for k in cased[:3])
                        + ")" + hint)
            raise _Bad("unknown_format", f"no known fields (has {keys}); accepted formats: "
                       + _ACCEPTED + hint)
        raise _Bad("ambiguous_format", "fields of several formats ("
                   + ", ".join(sorted(found)) + ") in one record; keep the fields of one format "
                   "and rename or drop the others (" + ", ".join(sorted(map(json.dumps, known)))
                   + ")")
    fmt = found.pop()
    try:
        return _parse_known(obj, fmt)
    except _Bad as bad:
        if bad.code == "missing_field":   # a look-alike format: say which field to rename
            renames = [(old, new) for old, new in _FIELD_RENAMES[fmt] if old in obj and new not in obj]
            renames += [(k, k.lower()) for k in obj if k.lower() in _KNOWN_KEYS and k.lower() not in obj]
            if renames:
                bad.message += (" (rename " + ", ".join(f'"{old}" -> "{new}"' for old, new in renames)
                                + ")")
        elif bad.code == "empty_field" and bad.message.startswith('"prompt"'):
            bad.message += ' (text with no prompt is a text record: write {"text": COMPLETION})'
        raise


# per format, fields other tools use for one of ours (Dolly's context/response and the like;
# a field of another format would have made the record ambiguous instead)
_FIELD_RENAMES = {
    "text": (),
    "messages": (),
    "prompt_completion": (("response", "completion"), ("answer", "completion"),
                          ("question", "prompt")),
    "instruction": (("response", "output"), ("context", "input"), ("answer", "output")),
}


def plain_join(prompt: str, completion: str) -> str:
    """The separator between a prompt and its completion in the plain rendering: none when
    either side already has whitespace there, else one newline."""
    return "" if prompt[-1:].isspace() or completion[:1].isspace() else "\n"


def _as_chat(user: str, answer: str) -> list:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _parse_known(obj: dict, fmt: str) -> tuple[str, list, list | None, int, bool, list | None]:
    if fmt == "text":
        text = _string(obj, "text", "text record")
        return fmt, [(text, True)], None, _byte_len(text, '"text"'), False, None
    if fmt == "prompt_completion":
        if type(obj.get("prompt")) is list or type(obj.get("completion")) is list:
            return _conversational_pc(obj)
        owner = "prompt_completion record"
        prompt, completion = _string(obj, "prompt", owner), _string(obj, "completion", owner)
        tokens = _byte_len(prompt, '"prompt"') + _byte_len(completion, '"completion"')
        sep = plain_join(prompt, completion)
        return (fmt, [(prompt + sep, False), (completion, True)], _as_chat(prompt, completion),
                tokens + len(sep), False, None)
    if fmt == "instruction":
        owner = "instruction record"
        instruction = _string(obj, "instruction", owner)
        inp = _string(obj, "input", owner, allow_empty=True) if "input" in obj else ""
        output = _string(obj, "output", owner)
        prompt = _instruction_prompt(instruction, inp)
        tokens = (_byte_len(prompt, '"instruction" or "input"') + _byte_len(output, '"output"'))
        user = f"{instruction}\n\n{inp}" if inp else instruction
        return fmt, [(prompt, False), (output, True)], _as_chat(user, output), tokens, False, None
    messages = obj["messages"]
    segments, tokens, ends_on_user = _chat(messages)
    return fmt, segments, messages, tokens, ends_on_user, _tools(obj)


def _conversational_pc(obj: dict):
    """TRL's conversational prompt/completion: two message arrays; the completion's
    assistant turns train, the prompt's (earlier answers) are context (weight 0)."""
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _Bad("missing_field", f'prompt_completion record without "{key}"')
        if type(obj[key]) is not list:
            raise _Bad("wrong_type", f'"{key}" must be an array of messages like the other '
                       f'field, got {_json_type(obj[key])}')
    if not any(type(m) is dict and m.get("role") == "assistant" for m in obj["completion"]):
        raise _Bad("no_assistant_turn", '"completion" has no assistant turn: nothing to train on')
    prompt = [dict(m, weight=0) if type(m) is dict and m.get("role") == "assistant" else m
              for m in obj["prompt"]]
    messages = prompt + obj["completion"]
    segments, tokens, ends_on_user = _chat(messages, owner="prompt+completion")
    return "prompt_completion", segments, messages, tokens, ends_on_user, _tools(obj)


# --------------------------------------------------------------------------- reading lines

JQ_SPLIT_ARRAY = "jq -c '.[]'"     # one JSON array -> one object per line
JQ_COMPACT = "jq -c ."            # pretty-printed objects -> one object per line
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def whole_file_fix(code: str, src, dst, message: str | None = None) -> str | None:
    """The shell command that rewrites `src` as JSON lines into `dst` for a json_array or
    pretty_printed file, or (from its error `message`) decompresses a compressed one or
    converts UTF-16/32 to UTF-8 (None for other codes)."""
    import shlex
    jq = {"json_array": JQ_SPLIT_ARRAY, "pretty_printed": JQ_COMPACT}.get(code)
    if jq is not None:
        return f"{jq} {shlex.quote(str(src))} > {shlex.quote(str(dst))}"
    found = re.search(r"\(([^()]*) FILE > NEW\.jsonl\)", message or "") \
        if code in ("compressed_file", "utf16_file") else None
    if found is None:
        return None
    return f"{found.group(1)} {shlex.quote(str(src))} > {shlex.quote(str(dst))}"


def _shape(head: bytes) -> _Bad | None:
    """JSON that is not one object per line: one array, or objects pretty-printed over
    several lines (one error for the file, not one per physical line)."""
    text = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    body = text.lstrip()
    if body.startswith(b"["):
        return _Bad("json_array", "the file is one JSON array, not JSON lines (one object per "
                    f"line); split it into lines with {JQ_SPLIT_ARRAY} FILE > NEW.jsonl",
                    byte_offset=len(head) - len(body))
    first = body.split(b"\n", 1)[0].rstrip()
    if first.startswith(b"{") and first.endswith((b"{", b"[", b",", b":")) and b"\n" in body:
        return _Bad("pretty_printed", "JSON objects spread over several lines (pretty-printed), "
                    f"not one object per line; rewrite them one a line with {JQ_COMPACT} FILE > "
                    "NEW.jsonl", byte_offset=len(head) - len(body))
    return None


def json_shape(path) -> str | None:
    """"json_array" or "pretty_printed" when the file at `path` holds JSON that is not JSON
    lines (the intake names the jq command that converts it), else None."""
    try:
        with open(path, "rb") as f:
            bad = _shape(f.read(SNIFF_BYTES))
    except OSError:
        return None
    return bad.code if bad is not None else None


def _sniff(head: bytes) -> _Bad | None:
    """A whole-file verdict for content that is not UTF-8 JSON lines at all, else None."""
    if head.startswith(_LFS_POINTER):
        return _Bad("git_lfs_pointer", "a git-lfs pointer file, not the data it points to; "
                    "fetch the real file in its repository (git lfs pull --include=FILE) and "
                    "use that", byte_offset=0)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return _Bad("compressed_file", f"{kind}-compressed data, not JSON lines; decompress "
                        f"it first ({_UNCOMPRESS[kind]} FILE > NEW.jsonl)", byte_offset=0)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):    # before UTF-16's
        return _Bad("utf16_file", "UTF-32 text; convert it to UTF-8 "
                    "(iconv -f UTF-32 -t UTF-8 FILE > NEW.jsonl)", byte_offset=0)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return _Bad("utf16_file", "UTF-16 text; convert it to UTF-8 "
                    "(iconv -f UTF-16 -t UTF-8 FILE > NEW.jsonl)", byte_offset=0)
    nul = head.find(b"\x00")
    if nul >= 0:
        # UTF-16 without a byte-order mark: ASCII text with a NUL beside every character
        even, odd = head[0::2], head[1::2]
        for nuls, other, kind in ((odd, even, "UTF-16LE"), (even, odd, "UTF-16BE")):
            # every NUL on one side, on at least a quarter of the characters (CJK has none)
            if len(nuls) >= 2 and nuls.count(0) * 4 >= len(nuls) and other.count(0) == 0:
                return _Bad("utf16_file", f"{kind} text (no byte-order mark); convert it to UTF-8 "
                            f"(iconv -f {kind} -t UTF-8 FILE > NEW.jsonl)", byte_offset=0)
        return _Bad("binary_file", f"binary data (NUL byte at byte offset {nul}), not JSON lines: "
                    "export the data as UTF-8 JSON lines, or if it is text with stray NUL bytes, "
                    "remove them (tr -d '\\000' < FILE > NEW.jsonl)",
                    byte_offset=nul)
    return _shape(head)


class _State:
    """What one pass over a file remembers between lines: the file's format, where it began,
    and config.json's field mapping."""

    def __init__(self, allow_mixed: bool, fields: dict | None = None):
        self.allow_mixed = allow_mixed
        self.fields = dict(fields or {})
        self.format: str | None = None
        self.format_line = 0


def _read_line(readline, limit: int):
    """(raw, size, terminated) of the next line; raw is None for a line over `limit` - 2 bytes.

    An over-long line is never held whole: the rest of it is read and dropped in
    SKIP_CHUNK pieces. Returns None at the end of the file.
    """
    raw = readline(limit)
    if not raw:
        return None
    size = len(raw)
    terminated = raw[-1:] == b"\n"
    if size - terminated - (raw[-2:] == b"\r\n") <= limit - 2 and (terminated or size < limit):
        return raw, size, terminated
    raw = None
    while not terminated:
        piece = readline(SKIP_CHUNK)
        if not piece:
            break
        size += len(piece)
        terminated = piece[-1:] == b"\n"
    return None, size, terminated


def _check_line(box: list, start: int, line_no: int, terminated: bool, state: _State,
                want_key: bool = False):
    """(record|None, tokens, problems, key) of one line, every check done the careful way.

    `box` is a one-item list holding the line's bytes: it is emptied so that a long line
    is held once, not once here and once by the caller. `problems` is a list of
    (severity, _Bad), severity error, warning or ignored (a warning the caller reports once
    per message); a line with an error has no record. `key` (if `want_key`) is the hash
    of the line's bytes without BOM, ending in a newline: what duplicates are found by.
    """
    raw = box.pop()
    problems = []
    key = None
    if raw.startswith(b"\xef\xbb\xbf"):
        problems.append(("warning", _Bad("bom", "UTF-8 byte-order mark at the start of the line "
                                         "(skipped)", byte_offset=start)))
        raw, start = raw[3:], start + 3
    if raw.endswith(b"\r\n"):
        problems.append(("warning", _Bad("crlf", "CRLF line ending",
                                         byte_offset=start + len(raw) - 2)))
    if not raw or raw.isspace():
        problems.append(("warning", _Bad("blank_line", "blank line (skipped)")))
        return None, 0, problems, None
    if want_key:
        key = hash(raw if terminated else raw + b"\n")
    try:
        bad_byte = _first_bad_utf8(raw) if len(raw) > BIG_LINE else None
        if bad_byte is None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_byte = exc.start
        if bad_byte is not None:
            raise _invalid_utf8(raw, bad_byte, start)
        raw = None                        # hold one copy of a long line at a time
        try:
            obj = _decode(text)
        except json.JSONDecodeError as exc:
            raise _json_error(text, exc, start, terminated) from None
        except RecursionError:
            raise _Bad("too_deep", "JSON nested too deeply to parse") from None
        except ValueError as exc:         # an integer literal over Python's 4300-digit limit
            raise _Bad("invalid_json", f"a number too long to read ({str(exc).split(';')[0]}); "
                       "write it as a string") from None
        escaped_surrogate = _SURROGATE_ESCAPE.search(text) is not None
        text = None
        if state.fields:
            obj = _map_fields(obj, state.fields)
        if escaped_surrogate:             # anywhere: tool calls, tools, ignored fields too
            _no_lone_surrogate(obj)
        fmt, segments, messages, tokens, ends_on_user, tools = _parse_object(obj)
        _check_format(fmt, line_no, state)
    except _Bad as bad:
        if state.fields and bad.code in ("unknown_format", "missing_field"):
            bad.message += (" (config.json `fields` maps " + ", ".join(
                f'"{theirs}" -> "{ours}"' for ours, theirs in state.fields.items()) + ")")
        problems.append(("error", bad))
        return None, 0, problems, None
    if ends_on_user:
        problems.append(("warning", _Bad("trailing_user_turn", "conversation ends on a user "
                                         "turn, which trains nothing")))
    used = _KNOWN_KEYS if tools is None else _RECORD_KEYS
    if len(obj) > 1 and len(obj) > len(obj.keys() & used):
        for name in sorted(obj.keys() - used):
            problems.append(("ignored", _Bad("ignored_field", f"field {_quote(name)} is not "
                                             "used by any format (ignored)")))
    unknown = {name for msg in messages or () if type(msg) is dict for name in msg.keys() - _MESSAGE_KEYS}
    for name in sorted(unknown):
        import difflib  # (only for a record that has one: validate starts fast)
        near = difflib.get_close_matches(name, _MESSAGE_KEYS, n=1, cutoff=0.75)
        problems.append(("ignored", _Bad("ignored_field", f"turn field {_quote(name)} is not one "
                                         "the product reads; the chat template is given it, and "
                                         "most ignore it" + (f" (did you mean {_quote(near[0])}? "
                                                             "as written, it does nothing)" if near else ""))))
    return Record(line_no, start, 0, fmt, segments, messages, tools), tokens, problems, key


def _map_fields(obj, fields: dict):
    """A record with its own field names renamed to ours (config.json `fields`:
    {ours: theirs}); a name of ours already present is kept as it is."""
    if type(obj) is not dict:
        return obj
    out = dict(obj)
    for ours, theirs in fields.items():
        if theirs in out and ours not in obj:
            out[ours] = out.pop(theirs)
    return out


def _first_bad_utf8(raw: bytes) -> int | None:
    """Where a long line stops being UTF-8, found in SKIP_CHUNK pieces, else None.

    A failing `raw.decode` holds the line three times at once (the bytes, the output it
    allocated, and the copy in the exception): 150 MB for a 50 MB line. In pieces, the
    whole-line decode that follows only runs on a line known to be valid.
    """
    decoder, view = codecs.getincrementaldecoder("utf-8")(), memoryview(raw)
    for i in range(0, len(raw), SKIP_CHUNK):
        held = len(decoder.getstate()[0])      # bytes of a character cut by the last piece
        try:
            decoder.decode(view[i:i + SKIP_CHUNK], final=i + SKIP_CHUNK >= len(raw))
        except UnicodeDecodeError as exc:
            return i - held + exc.start
    return None


def _invalid_utf8(raw: bytes, at: int, start: int) -> _Bad:
    # the column counts characters: every byte before `at` but UTF-8 continuation bytes
    # (bytes.count with bounds copies nothing, so a 50 MB line costs no more memory)
    column = at + 1 - sum(raw.count(b, 0, at) for b in _CONTINUATION)
    return _Bad("invalid_utf8", f"invalid UTF-8 byte 0x{raw[at]:02x} at byte offset "
                f"{start + at} (column {column})",
                column=column, byte_offset=start + at)


_CONTINUATION = [bytes([b]) for b in range(0x80, 0xC0)]


def _json_error(text: str, exc: json.JSONDecodeError, start: int, terminated: bool) -> _Bad:
    """The problem of a line json could not parse, said in the line's own terms."""
    # exc.colno restarts after the line's own "\n"; past the content means its end
    column = min(exc.pos, len(text.rstrip("\r\n"))) + 1
    byte_pos = start + (exc.pos if text.isascii() else len(text[:exc.pos].encode("utf-8")))
    msg = exc.msg
    if msg.endswith(" at"):               # "Invalid control character at", "... starting at"
        msg += f" column {column}"
        if msg.startswith("Invalid control"):
            msg += f" (U+{ord(text[exc.pos]):04X}): escape it as \\u{ord(text[exc.pos]):04x}"
    else:
        msg += f" (column {column})"
    if not terminated and (exc.pos >= len(text.rstrip())
                           or exc.msg.startswith("Unterminated string")):
        return _Bad("truncated_last_line", "last line ends without a newline in the middle of "
                    f"a JSON value ({msg}); the file looks cut short",
                    column=column, byte_offset=byte_pos)
    if text[exc.pos:exc.pos + 1] == "\x00" and not msg.startswith("Invalid control"):
        # past the head the sniff checks for binary data
        msg += ": a NUL byte; remove NUL bytes (tr -d '\\000' < FILE > NEW.jsonl)"
    elif msg.startswith("Extra data") and text[:exc.pos].rstrip(" \t\n").endswith("\r"):
        msg += ": a bare CR (\\r) ends a record inside this line; lines must end in LF or " \
               "CRLF (tr '\\r' '\\n' < FILE > NEW.jsonl)"
    elif text.strip() in ("[", "{", "]", "}", "],", "},") or (
            msg.startswith("Extra data") and text[exc.pos:exc.pos + 1] == ":"):  # '"key": ...'
        msg += ": one JSON value spread over several lines? each line must be a whole " \
               "object (jq -c . FILE > NEW.jsonl rewrites pretty-printed JSON one object a " \
               "line; jq -c '.[]' FILE > NEW.jsonl splits a JSON array)"
    return _Bad("invalid_json", msg, column=column, byte_offset=byte_pos)


def _check_format(fmt: str, line_no: int, state: _State) -> None:
    if state.format is None:
        state.format, state.format_line = fmt, line_no
    elif fmt != state.format and not state.allow_mixed:
        raise _Bad("mixed_formats", f"a {fmt} record in a file of {state.format} records (line "
                   f"{state.format_line}); keep one format per file, or pass --allow-mixed "
                   "(allow_mixed_formats in config.json for the daemon)")


# The fast path of validate_file: C-level checks that either prove a line is a plain valid
# record or hand it to _check_line, which decides. It never rejects anything by itself.
# Objects parse to tuples of (key, value) pairs, so a duplicate key shows as keys that
# match no accepted layout, without a Python call per object; arrays stay lists. The C
# scanner is called directly: JSONDecoder.decode wraps it in two Python calls and two
# regex matches, about 0.4 us a line (a tenth of parsing a 700-byte one).
_scan = json.JSONDecoder(object_pairs_hook=tuple, parse_constant=_reject_constant).scan_once
_LINE_ENDS = ("\n", "\r\n", "")     # after the value; other whitespace takes the careful path
_ROLE_ORDER = re.compile(r"(?:system\|)*(?:user\|assistant\|)+(?:user\|)?")
_ROLE_SET = frozenset(ROLES)
_UNICODE_ESCAPE = re.compile(rb"\\u")
_FAST_TURNS = 256           # longer chats take the careful path
_CONTENT_KEYS = [("content",) * k for k in range(_FAST_TURNS + 1)]

# a chat's ("role", r) pairs -> (plain-template bytes, ends_on_user), or None for a bad order;
# the keys are made of _ROLE_PAIRS, so an entry costs 8 bytes a turn, whatever the lines held
_ROLE_PATTERNS: dict = {}
_ROLE_PAIRS = {role: ("role", role) for role in ROLES}
_MISS = object()
_PROMPT_WITH_INPUT = len(_instruction_prompt("", "x")) - 1    # the Alpaca template's own bytes
_PROMPT_NO_INPUT = len(_instruction_prompt("", ""))

# key order of a two- or three-field record -> (format, where each value is, template bytes)
_LAYOUTS: dict = {}
for _fmt, _keys in (("prompt_completion", ("prompt", "completion")),
                    ("instruction", ("instruction", "output")),
                    ("instruction", ("instruction", "output", "input"))):
    for _perm in itertools.permutations(range(len(_keys))):
        _order = tuple(_perm.index(i) for i in range(len(_keys))) + (2,) * (3 - len(_keys))
        _LAYOUTS[tuple(_keys[i] for i in _perm)] = (
            _fmt, None if _order == (0, 1, 2) else _order,
            _PROMPT_NO_INPUT if _fmt == "instruction" else 0)


def _utf8_size(strings, extra: int) -> int:
    """UTF-8 bytes of `strings`, given `extra` = bytes - characters of their whole line.

    Everything else on a fast-path line is ASCII, so when the line holds literal non-ASCII
    text its surplus bytes are these strings'. The caller passes `extra` 0 for a line that
    also holds \\u escapes: those strings are encoded, which counts them exactly and raises
    on a lone surrogate (the careful path then reports it).
    """
    size = sum(map(len, strings))
    if extra:
        return size + extra
    if all(map(str.isascii, strings)):
        return size
    return sum(map(len, map(str.encode, strings)))    # \u escapes only (ensure_ascii files)


def _role_pattern(role_pairs: tuple) -> tuple[int, bool] | None:
    """_ROLE_PATTERNS' entry for a chat's ("role", r) pairs, remembered when the roles are
    known ones (an unknown role may be any string, a long one too, and is rare)."""
    keys, roles = zip(*role_pairs)
    if keys != ("role",) * len(keys) or not _ROLE_SET.issuperset(roles):
        return None
    pattern = None
    # the roles are known, so none holds a "|" that could fake the joined order
    if _ROLE_ORDER.fullmatch("|".join(roles) + "|"):
        # the plain rendering: "<|role|>\n" + content + "\n" per turn, no final "\n" after
        # an assistant turn
        pattern = (sum(map(len, roles)) + 6 * len(roles) - (roles[-1] == "assistant"),
                   roles[-1] == "user")
    if len(_ROLE_PATTERNS) < 4096:
        _ROLE_PATTERNS[tuple(map(_ROLE_PAIRS.__getitem__, roles))] = pattern
    return pattern


def _fast_check(raw: bytes) -> tuple[str, int, bool] | None:
    """(format, tokens, ends_on_user) when the line `raw` is certainly a valid record with
    only the fields of its format, else None or an exception (the caller treats both alike:
    the careful path decides)."""
    text = raw.decode("utf-8")
    top, end = _scan(text, 0)             # raises at leading whitespace and bad JSON
    if type(top) is not tuple or text[end:] not in _LINE_ENDS:
        return None
    extra = len(raw) - len(text)          # see _utf8_size
    # literal and \u-escaped non-ASCII in one line: count exactly (a backslash at all is
    # a memchr; the regex is 3x faster than `b"\\u" in raw`)
    if extra and 92 in raw and _UNICODE_ESCAPE.search(raw):
        extra = 0
    n = len(top)
    if n == 1:
        key, value = top[0]
        if key == "text":
            if type(value) is not str or not value or value.isspace():
                return None
            if extra:
                return "text", len(value) + extra, False
            return "text", (len(value) if value.isascii() else len(value.encode("utf-8"))), False
        if key != "messages" or type(value) is not list or not 0 < len(value) <= _FAST_TURNS:
            return None
        # the common shape only: every message exactly ("role", r), ("content", c), in
        # order. sum() raises unless every message is an object (a tuple: an array is a
        # list); 2 pairs a message in all, and zip() stopping at the shortest message
        # failing to unpack into two, mean exactly 2 in each.
        k = len(value)
        if len(sum(value, ())) != 2 * k:
            return None
        role_pairs, content_pairs = zip(*value)
        pattern = _ROLE_PATTERNS.get(role_pairs, _MISS)     # an unhashable role raises
        if pattern is _MISS:
            pattern = _role_pattern(role_pairs)
        keys, contents = zip(*content_pairs)
        if (pattern is None or keys != _CONTENT_KEYS[k]
                or "" in contents or any(map(str.isspace, contents))):   # non-str raises
            return None
        return "messages", pattern[0] + _utf8_size(contents, extra), pattern[1]
    if n == 2:
        (k0, v0), (k1, v1) = top
        layout = _LAYOUTS.get((k0, k1))          # None for a duplicate key too
        v2 = ""
    elif n == 3:
        (k0, v0), (k1, v1), (k2, v2) = top
        layout = _LAYOUTS.get((k0, k1, k2))
    else:
        return None
    if layout is None:
        return None
    fmt, order, template = layout
    if order is not None:                         # fields not in the usual order
        values = (v0, v1, v2)
        v0, v1, v2 = values[order[0]], values[order[1]], values[order[2]]
    # v0, v1: prompt, completion or instruction, output (required); v2: input or ""
    if (type(v0) is not str or type(v1) is not str or type(v2) is not str
            or not v0 or not v1 or v0.isspace() or v1.isspace()):
        return None
    if extra:
        size = len(v0) + len(v1) + len(v2) + extra
    elif v0.isascii() and v1.isascii() and v2.isascii():
        size = len(v0) + len(v1) + len(v2)
    else:
        size = len(v0.encode("utf-8")) + len(v1.encode("utf-8")) + len(v2.encode("utf-8"))
    if fmt == "prompt_completion":             # plain_join's newline
        template = 0 if v0[-1:].isspace() or v1[:1].isspace() else 1
    return fmt, size + (_PROMPT_WITH_INPUT if v2 else template), False


def _open(path: Path):
    """Open a data file for binary reading; a missing, folder or unreadable path is a usage error."""
    fix = "Check the path and pass a readable .jsonl file."
    try:
        mode = os.stat(path).st_mode     # before open(): opening a FIFO would block
        if stat.S_ISDIR(mode):
            raise UsageError("is a directory, not a file", path,
                             f"Pass the files inside it: python3 validate_data.py {path}/*.jsonl")
        if not stat.S_ISREG(mode):
            raise UsageError("not a regular file (a pipe, socket or device)", path,
                             "Save the data to a regular .jsonl file and pass that.")
        return open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise UsageError("file not found", path, fix) from None
    except PermissionError:
        raise UsageError("cannot read the file (permission denied)", path,
                         f"Make it readable (chmod u+r {path}) or run as its owner.") from None
    except OSError as exc:
        raise UsageError(f"cannot open the file ({exc.strerror})", path, fix) from None


def _too_long(size: int, terminated: bool, start: int, max_record_bytes: int) -> _Bad:
    return _Bad("line_too_long", f"line is {size - terminated:,} bytes, over max_record_bytes "
                f"{max_record_bytes:,} (raise it with --max-record-bytes or in config.json, or "
                "split the record)", byte_offset=start)


# --------------------------------------------------------------------------- the library API

def iter_records(path, *, start_offset: int = 0, start_line: int = 1, allow_mixed: bool = False,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, fields: dict | None = None,
                 skip_invalid: bool = False) -> Iterator[Record]:
    """Yield every record of a data file from a byte offset; raise GuardrailError at a bad one.

    Blank lines are skipped. `start_offset`/`start_line` resume at a Record's `next_offset`
    (and line + 1). The daemon validates files first, so an error here is a safety net: it
    names the file and line and the command that lists every problem. `skip_invalid`
    (a file queued with `add --skip-invalid`) passes over invalid lines instead; `fields`
    is config.json's field mapping.
    """
    path = Path(path)
    state = _State(allow_mixed, fields)
    limit = max_record_bytes + 2          # the content plus "\r\n"
    with _open(path) as f:
        if start_offset:
            f.seek(start_offset)
        else:
            head = f.peek(SNIFF_BYTES)[:SNIFF_BYTES]
            bad = _sniff(head)
            if bad:
                raise _record_error(path, head[:bad.byte_offset].count(b"\n") + 1, bad)
        readline, offset, line_no = f.readline, start_offset, start_line
        while (got := _read_line(readline, limit)) is not None:
            raw, size, terminated = got
            got = None
            if raw is None:
                if skip_invalid:
                    offset, line_no = offset + size, line_no + 1
                    continue
                raise _record_error(path, line_no, _too_long(size, terminated, offset,
                                                             max_record_bytes))
            box, raw = [raw], None
            record, _, problems, _ = _check_line(box, offset, line_no, terminated, state)
            offset += size
            if record is not None:
                yield record._replace(offset=offset - size, next_offset=offset)
            elif not skip_invalid:
                for severity, bad in problems:
                    if severity == "error":
                        raise _record_error(path, line_no, bad)
            line_no += 1


def _record_error(path: Path, line_no: int, bad: _Bad) -> GuardrailError:
    return GuardrailError(f"invalid record at line {line_no} ({bad.code}: {bad.message})", path,
                          f"Run `python3 validate_data.py {path}` to list every problem.")


def _entry(line: int | None, bad: _Bad) -> dict:
    entry = {"line": line}
    if bad.column is not None:
        entry["column"] = bad.column
    if bad.byte_offset is not None:
        entry["byte_offset"] = bad.byte_offset
    entry["code"], entry["message"] = bad.code, bad.message
    return entry


def validate_file(path, *, max_length: int | None = None, allow_mixed: bool = False,
                  max_record_bytes: int | None = None, fields: dict | None = None) -> dict:
    """Check a whole data file; return the report the daemon saves next to a rejected file.

    `{path, ok, verdict, format, formats, records, est_tokens, bytes, errors, error_count,
    warnings, warning_count, max_length, max_record_bytes}`: errors and warnings are
    `{line, column?, byte_offset?, code, message}` (first MAX_LISTED each, sorted by
    line; `line` is None for a whole-file problem). Raises UsageError for a missing,
    folder or unreadable path. `max_length` None skips the too-long warning. `fields` is
    config.json's field mapping ({ours: theirs}).
    """
    path = Path(path)
    max_record_bytes = int(max_record_bytes or DEFAULT_MAX_RECORD_BYTES)
    errors, warnings = [], []
    counts = {"error": 0, "warning": 0}
    formats: dict[str, int] = {}
    records = tokens_total = crlf_lines = 0
    seen: dict[int, int] | None = {}      # hash of a record's line -> its line number
    ignored: set[str] = set()
    state = _State(allow_mixed, fields)
    max_length = max_length or 0

    def add(severity: str, line: int | None, bad: _Bad) -> None:
        counts[severity] += 1
        listed = errors if severity == "error" else warnings
        if len(listed) < MAX_LISTED:
            listed.append(_entry(line, bad))

    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.peek(SNIFF_BYTES)[:SNIFF_BYTES]
        if size == 0:
            add("error", None, _Bad("empty_file", "empty file: no records"))
        elif (bad := _sniff(head)) is not None:
            line = head[:bad.byte_offset].count(b"\n") + 1 if bad.code == "binary_file" else None
            add("error", line, bad)
        else:
            readline, limit = f.readline, max_record_bytes + 2
            fast_limit = min(limit, BIG_LINE)      # longer lines skip the fast path (memory)
            if fields:
                fast_limit = 0                     # renamed fields: every line the careful way
            too_long_at = max_length or 1 << 62
            offset = line_no = fast_records = fast_tokens = unlisted_warnings = 0
            track_limit = DUPLICATE_TRACK_LIMIT
            file_format = None
            while raw := readline(limit):
                line_no += 1
                start = offset
                offset += len(raw)
                try:                      # any surprise hands the line to the careful path
                    fast = _fast_check(raw) if len(raw) < fast_limit else None
                except Exception:
                    fast = None
                # the first record, and any of another format, take the careful path
                if fast is not None and fast[0] == file_format:
                    tokens = fast[1]
                    fast_records += 1
                    fast_tokens += tokens
                    if raw[-1] != 10:     # the last line, complete without its newline
                        raw += b"\n"
                    elif raw[-2] == 13:   # CRLF, reported once per file
                        crlf_lines += 1
                        if crlf_lines == 1:
                            add("warning", line_no, _Bad("crlf", "CRLF line ending",
                                                         byte_offset=offset - 2))
                    if fast[2]:
                        add("warning", line_no, _Bad("trailing_user_turn", "conversation ends "
                                                     "on a user turn, which trains nothing"))
                    key = hash(raw) if seen is not None else None
                else:
                    if len(raw) < limit:
                        terminated = raw[-1] == 10
                    else:                 # possibly over-long: re-read it, bounded
                        f.seek(start)
                        raw, size, terminated = _read_line(readline, limit)
                        offset = start + size
                        if raw is None:
                            add("error", line_no, _too_long(size, terminated, start,
                                                            max_record_bytes))
                            continue
                    box, raw = [raw], None
                    record, tokens, problems, key = _check_line(
                        box, start, line_no, terminated, state, want_key=seen is not None)
                    file_format = state.format
                    for severity, bad in problems:
                        if severity == "ignored":
                            if bad.message in ignored:
                                continue
                            ignored.add(bad.message)
                            severity = "warning"
                        elif bad.code == "crlf":
                            crlf_lines += 1
                            if crlf_lines > 1:
                                continue
                        add(severity, line_no, bad)
                    if record is None:
                        continue
                    records += 1
                    tokens_total += tokens
                    formats[record.format] = formats.get(record.format, 0) + 1
                raw = None
                if seen is not None:      # duplicates by the hash of the line's bytes
                    earlier = seen.setdefault(key, line_no)
                    if earlier != line_no:
                        add("warning", line_no, _Bad("duplicate", f"same content as line {earlier}"))
                    elif len(seen) >= track_limit:
                        add("warning", line_no, _Bad("duplicates_unchecked", "more than "
                            f"{DUPLICATE_TRACK_LIMIT:,} distinct records: duplicates after this "
                            "line are not checked"))
                        seen = None
                if tokens > too_long_at:
                    if len(warnings) < MAX_LISTED:
                        add("warning", line_no, _Bad("too_long", f"about {tokens:,} tokens, over "
                            f"max_length {max_length:,}: it will be split across rows, not dropped"))
                    else:
                        unlisted_warnings += 1
            counts["warning"] += unlisted_warnings
            if fast_records:              # all of the file's first format
                records += fast_records
                tokens_total += fast_tokens
                formats[file_format] += fast_records
            if records == 0 and counts["error"] == 0:
                add("error", None, _Bad("no_records", "no records: the file has only blank lines"))
    if crlf_lines > 1:
        for w in warnings:
            if w["code"] == "crlf":
                w["message"] = f"CRLF line endings on {crlf_lines:,} lines (first shown)"
    errors.sort(key=lambda e: (e["line"] is not None, e["line"] or 0))
    warnings.sort(key=lambda e: e["line"] or 0)
    ok = counts["error"] == 0
    fmt = None if not formats else next(iter(formats)) if len(formats) == 1 else "mixed"
    report = {"path": str(path), "ok": ok, "verdict": "", "format": fmt, "formats": formats,
              "records": records, "est_tokens": tokens_total, "bytes": size,
              "errors": errors, "error_count": counts["error"],
              "warnings": warnings, "warning_count": counts["warning"],
              "max_length": max_length or None, "max_record_bytes": max_record_bytes}
    report["verdict"] = _verdict(report)
    return report


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _verdict(report: dict) -> str:
    """One line a person reads first: valid or not, and the main reason."""
    w = report["warning_count"]
    warns = f", {w:,} warning{'s' * (w != 1)}" if w else ""
    if report["ok"]:
        return (f"valid: {report['records']:,} {report['format']} record"
                f"{'s' * (report['records'] != 1)}, ~{report['est_tokens']:,} tokens{warns}")
    n, first = report["error_count"], report["errors"][0]
    if first["code"] in _FILE_CODES:
        return f"invalid: {first['message']}"
    where = f"line {first['line']}: " if first["line"] is not None else ""
    return f"invalid: {n:,} error{'s' * (n != 1)}{warns}; first: {where}{first['message']}"


# --------------------------------------------------------------------------- the CLI

def read_settings(cfg: dict) -> dict:
    """How config.json says data files are read: iter_records/validate_file keywords."""
    return {"allow_mixed": bool(cfg.get("allow_mixed_formats")),
            "max_record_bytes": cfg.get("max_record_bytes") or DEFAULT_MAX_RECORD_BYTES,
            "fields": cfg.get("fields") or None}


def _settings(args) -> dict:
    """max_length, allow_mixed, max_record_bytes, fields: flags > the root's config.json >
    defaults."""
    defaults = training_config.default_config()
    cfg = defaults
    root = resolve_root(args.root)
    if Paths(root).config.exists():
        try:
            cfg = training_config.load_config(root)
        except GuardrailError as exc:
            print(f"warning: {exc} Validating with the default settings.", file=sys.stderr)
    return {"max_length": args.max_length or cfg["max_length"],
            "allow_mixed": args.allow_mixed or bool(cfg["allow_mixed_formats"]),
            "max_record_bytes": args.max_record_bytes or cfg["max_record_bytes"],
            "fields": cfg.get("fields") or None}


def _print_report(report: dict) -> None:
    path = report["path"]
    print(f"{path}: {report['verdict']}")
    for severity, listed, count in (("error", report["errors"], report["error_count"]),
                                    ("warning", report["warnings"], report["warning_count"])):
        for e in listed:
            where = f"{path}:{e['line']}" if e["line"] is not None else path
            if e.get("column") is not None:
                where += f":{e['column']}"
            print(f"  {where}: {severity} [{e['code']}] {e['message']}")
        if count > len(listed):
            print(f"  ... and {count - len(listed):,} more {severity}s")
    if not report["errors"] or report["errors"][0]["code"] not in _FILE_CODES:
        formats = report["formats"]
        kinds = ", ".join(f"{k} {v:,}" for k, v in formats.items()) if len(formats) > 1 \
            else report["format"]
        kinds = f" ({kinds})" if kinds else ""
        print(f"  summary: {_count(report['records'], 'record')}{kinds}, "
              f"~{report['est_tokens']:,} tokens, {_count(report['error_count'], 'error')}, "
              f"{_count(report['warning_count'], 'warning')}")


def _name_warning(report: dict, path: Path) -> None:
    """A name the daemon and `training_queue.py add` do not take as data (no .jsonl suffix,
    or hidden or temporary), whatever its content: said here too, with the rename."""
    import shlex
    from training_queue import is_ignored, jsonl_name
    from trainroot import unique_path
    name = path.name
    if is_ignored(name):  # an editor's backup or swap file, a copy in progress: no rename
        message = ("the daemon ignores hidden and temporary names (editors' backups and swap "
                   "files, copies in progress): it never takes this file as data")
    elif not name.endswith(".jsonl"):
        new = unique_path(path.parent, jsonl_name(name))  # never over a file of that name
        message = ("the daemon and `training_queue.py add` take only .jsonl names: rename it "
                   f"(`mv {shlex.quote(str(path))} {shlex.quote(str(new))}`)")
    else:
        return
    report["warning_count"] += 1
    report["warnings"].insert(0, {"line": None, "code": "data_name", "message": message})
    report["verdict"] = _verdict(report)


def cmd_validate(args) -> int:
    """Check .jsonl data files before training; exit 0 if all are valid, 1 if not, 2 on usage errors."""
    settings = _settings(args)
    reports, usage_error, all_ok = [], False, True
    for name in args.files:
        try:
            report = validate_file(name, **settings)
        except UsageError as exc:
            usage_error, all_ok = True, False
            print(f"Error: {exc}", file=sys.stderr)
            reports.append({"path": str(name), "ok": False, "verdict": f"not checked: {exc.what}",
                            "error": exc.to_dict()})
            continue
        _name_warning(report, Path(name))
        all_ok = all_ok and report["ok"]
        reports.append(report)
        if not args.json:
            _print_report(report)
    if args.json:
        print_json({"ok": all_ok, "files": reports, **settings})
    return EXIT_USAGE if usage_error else EXIT_OK if all_ok else EXIT_FAILURE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="validate_data.py", description=cmd_validate.__doc__,
        epilog="Settings come from the root's config.json when it has one (max_length, "
               "allow_mixed_formats, max_record_bytes); flags override them.")
    parser.add_argument("files", nargs="+", metavar="FILE", help=".jsonl files to check")
    parser.add_argument("--max-length", type=_positive_int, metavar="N",
                        help="warn about records over N estimated tokens (default: config max_length)")
    parser.add_argument("--max-record-bytes", type=_positive_int, metavar="N",
                        help="longest line accepted, in bytes (default: config max_record_bytes)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="accept several formats in one file (default: config allow_mixed_formats)")
    add_common_args(parser)
    parser.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)  # `| head` leaving early ends quietly there, exit 1


if __name__ == "__main__":
    sys.exit(main())
