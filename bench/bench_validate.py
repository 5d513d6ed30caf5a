"""Benchmark: `validate_data.validate_file` throughput against a bare json.loads loop, same run.

Generates a data file (default 200 MB of realistic chat records: a system turn on some,
1-3 user/assistant exchanges, lognormal lengths, some non-ASCII) in a temp folder, then
times, alternately and `--repeat` times each (best kept, the machine is shared):

    baseline:  with open(p) as f: for line in f: json.loads(line)
    validate:  validate_data.validate_file(p, max_length=256)   (all checks, warnings on)

and prints MB/s for both and the ratio validate/baseline (goal >= 0.7). Times are CPU
seconds of this process (time.process_time): both loops are single-threaded and CPU-bound,
and on a shared 2-core machine wall time mostly measures the neighbours. The file is
written first, so both loops read it from the page cache. `--format all` runs the four
formats one after the other, each on its own file.

    .venv/bin/python bench/bench_validate.py
    .venv/bin/python bench/bench_validate.py --size-mb 50 --format prompt_completion
    .venv/bin/python bench/bench_validate.py --format all
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import validate_data  # noqa: E402

WORDS = ("the model learns from every file you drop in the inbox and keeps each version "
         "so a mistake costs a minute to undo café naïve 東京 🙂").split()


def _text(rng: random.Random, median_words: int) -> str:
    n = max(1, int(rng.lognormvariate(0, 0.8) * median_words))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_record(rng: random.Random, fmt: str) -> dict:
    if fmt == "text":
        return {"text": _text(rng, 120)}
    if fmt == "prompt_completion":
        return {"prompt": _text(rng, 30), "completion": _text(rng, 80)}
    if fmt == "instruction":
        return {"instruction": _text(rng, 15), "input": _text(rng, 20) if rng.random() < 0.4 else "",
                "output": _text(rng, 80)}
    messages = [{"role": "system", "content": _text(rng, 10)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": _text(rng, 25)},
                     {"role": "assistant", "content": _text(rng, 60)}]
    return {"messages": messages}


def _distinct(record: dict, i: int) -> dict:
    """The record with a counter in its trained text: every line distinct, as in real data."""
    record = json.loads(json.dumps(record))
    if "messages" in record:
        record["messages"][-1]["content"] += f" #{i}"
    else:
        key = {"text": "text", "prompt": "completion", "instruction": "output"}[next(iter(record))]
        record[key] += f" #{i}"
    return record


def make_file(path: Path, size_mb: int, fmt: str) -> int:
    """Write distinct records until the file reaches size_mb; returns its size in bytes."""
    rng = random.Random(1234)
    pool = [make_record(rng, fmt) for _ in range(2000)]
    target, written, i = size_mb * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = json.dumps(_distinct(pool[i % len(pool)], i), ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            i += 1
    return path.stat().st_size


def baseline(path: Path) -> float:
    t = time.process_time()
    with open(path, encoding="utf-8") as f:
        for line in f:
            json.loads(line)
    return time.process_time() - t


def validate(path: Path) -> tuple[float, dict]:
    t = time.process_time()
    report = validate_data.validate_file(path, max_length=256)
    return time.process_time() - t, report


def bench(fmt: str, size_mb: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        path = Path(tmp) / f"{fmt}.jsonl"
        t = time.perf_counter()
        size = make_file(path, size_mb, fmt)
        print(f"generated {size / 1e6:.0f} MB of {fmt} records in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        base_times, val_times, report = [], [], None
        for _ in range(repeat):
            base_times.append(baseline(path))
            seconds, report = validate(path)
            val_times.append(seconds)
        b, v = min(base_times), min(val_times)
        mb = size / 1e6
        print(f"file: {mb:.0f} MB, {report['records']:,} {report['format']} records, "
              f"ok={report['ok']}, {report['warning_count']:,} warnings")
        print(f"baseline json.loads loop: {mb / b:7.1f} MB/s  (best of {repeat}: {b:.2f} CPU s)")
        print(f"validate_file:            {mb / v:7.1f} MB/s  (best of {repeat}: {v:.2f} CPU s)")
        print(f"ratio validate/baseline:  {b / v:.2f}  (goal >= 0.70)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--format", choices=validate_data.FORMATS + ("all",), default="messages")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for fmt in validate_data.FORMATS if args.format == "all" else (args.format,):
        bench(fmt, args.size_mb, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
