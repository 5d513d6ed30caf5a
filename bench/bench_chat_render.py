"""Benchmark: what rendering chat records with the model's own template costs, same run.

With the Qwen BPE tokenizer (tests/chat_fixtures.py, built offline) and each real template
of tests/fixtures/chat_templates, for N chat records (a system turn, two exchanges, the
last answer with a think block; with --tools, a tool call and its result), times:

    plain:     Encoder(chat_template="plain").encode(record)   (tokenize the plain segments)
    template:  Encoder(template).encode(record)   (render once, locate each assistant turn
               by re-rendering, tokenize once with offsets, label)
    check:     Encoder(template).check_file(file)  (render only: the engine's pre-pass over
               the whole file before its first step, per record)
    intake:    check_file(file, limit=20)  (what the daemon pays when a file is queued)

and prints ms per record and the ratio template/plain. CPU seconds of this process
(time.process_time), best of --repeat.

    .venv/bin/python bench/bench_chat_render.py
    .venv/bin/python bench/bench_chat_render.py --records 500 --tools
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import chat_fixtures  # noqa: E402

SYSTEM = "You answer briefly and exactly."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def conversation(i: int, tools: bool) -> dict:
    q = f"Question {i}: what is {i} times {i + 1}? Explain the steps in one sentence."
    a = f"{i} times {i + 1} is {i * (i + 1)}: multiply {i} by {i + 1}. " * 3
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
            {"role": "assistant", "content": a}, {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"<think>\n2 * {i * (i + 1)}\n</think>\n\n{2 * i * (i + 1)}."}]
    if not tools:
        return {"messages": msgs}
    msgs[3:] = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "id": "abc123xyz",
                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "abc123xyz"},
                {"role": "assistant", "content": "21 degrees."}]
    return {"messages": msgs[1:], "tools": TOOLS}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tools", action="store_true", help="tool-call conversations (tool templates only)")
    args = ap.parse_args()
    import training_engine as te
    import validate_data
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_fixtures.cached_qwen_tokenizer_dir(), local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        path.write_text("".join(json.dumps(conversation(i, args.tools)) + "\n" for i in range(args.records)))
        records = list(validate_data.iter_records(path))
        plain = te.Encoder(tok, chat_template="plain")
        if not args.tools:
            t_plain = best(lambda: [plain.encode(r) for r in records], args.repeat) / len(records)
        print(f"{args.records} chat records{' with tool calls' if args.tools else ''}, Qwen BPE "
              f"({len(tok)} tokens), CPU ms per record, best of {args.repeat}")
        print(f"{'template':<26}{'encode':>9}{'vs plain':>10}{'check':>9}{'intake (20)':>13}")
        if not args.tools:
            print(f"{'plain':<26}{t_plain * 1e3:>9.3f}{1.0:>10.2f}{'-':>9}{'-':>13}")
        for name in chat_fixtures.template_names():
            enc = te.Encoder(tok, chat_template=str(chat_fixtures.TEMPLATES / f"{name}.jinja"))
            if enc.check_file(path, limit=1) is not None:  # this template refuses them
                print(f"{name:<26}{'refused':>9}")
                continue
            t_enc = best(lambda: [enc.encode(r) for r in records], args.repeat) / len(records)
            t_check = best(lambda: enc.check_file(path), args.repeat) / len(records)
            t_intake = best(lambda: enc.check_file(path, limit=20), args.repeat)
            ratio = f"{t_enc / t_plain:>10.2f}" if not args.tools else f"{'-':>10}"
            print(f"{name:<26}{t_enc * 1e3:>9.3f}{ratio}{t_check * 1e3:>9.3f}{t_intake * 1e3:>10.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
