"""Daemon latency: start to first training step, and per-file overhead outside training.

    python3 bench/bench_daemon.py              # one root, ~1 minute on 2 cores
    python3 bench/bench_daemon.py --files 20 --runs 3

1. Start -> first step: `training_daemon.py run --once` with one small file in the inbox,
   from process start to the first line of metrics.jsonl. Baseline in the same run: a
   fresh interpreter that only imports the engine and transformers' Auto classes (the
   floor any in-process trainer pays). Goal: <= 8 s.
2. Per-file overhead: N small files in one `--once` run; everything between the first
   file entering processing/ and the last reaching done/ that is not `train_file`
   itself, plus validation at intake (snapshot, records, moves, queue scan), per file.
   Baseline: the median `train_file` time of the same files. Goal: <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainroot import parse_time  # noqa: E402

FAST = {"settle_seconds": 0.2, "rescan_seconds": 0.5, "max_length": 32, "batch_size": 2,
        "checkpoint_every_steps": 0, "monitor_port": 0, "backup_every_files": 0,
        "backup_every_hours": 0, "loss_spike_factor": 0.0}


def make_root(base: Path, name: str) -> Path:
    root = base / name
    subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "init", "--root", str(root)],
                   check=True, capture_output=True)
    import training_config
    cfg = training_config.load_config(root)
    cfg.update(FAST)
    training_config.write_config(root, cfg)
    training_config.approve(root, cfg, by="bench")
    return root


def write_file(path: Path, n: int, tag: str) -> None:
    path.write_text("".join(json.dumps({"text": f"{tag} {i} the quick brown fox"}) + "\n"
                            for i in range(n)))


def import_floor() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import training_engine\n"
                    "from transformers import AutoModelForCausalLM, AutoTokenizer"],
                   check=True, cwd=str(REPO), capture_output=True)
    return time.perf_counter() - t0


def start_to_first_step(base: Path, i: int) -> float:
    root = make_root(base, f"start{i}")
    write_file(root / "inbox" / "one.jsonl", 4, "start")
    metrics = root / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run", "--once",
                             "--no-monitor", "--root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None or first is None:
        if first is None and metrics.exists() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
        if proc.poll() is not None and first is None:
            raise SystemExit(f"daemon exited {proc.returncode} before a training step")
        time.sleep(0.01)
    proc.wait()
    return first


def per_file_overhead(base: Path, files: int) -> tuple[float, float, float]:
    root = make_root(base, "overhead")
    for k in range(files):
        write_file(root / "inbox" / f"f{k:03d}.jsonl", 2, f"file{k}")
    subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "run", "--once",
                    "--no-monitor", "--root", str(root)], check=True, capture_output=True)
    recs = [json.loads(p.read_text()) for p in sorted((root / "done").glob("*.record.json"))]
    if len(recs) != files:
        raise SystemExit(f"expected {files} files in done/, found {len(recs)}")
    # The first file also waits for the engine import (start-up, measured above): the span
    # runs from the second file entering processing/ to the last one reaching done/.
    recs.sort(key=lambda r: r["started_at"])
    rest = recs[1:]
    span = parse_time(rest[-1]["finished_at"]) - parse_time(rest[0]["started_at"])
    train = [r["timings"]["train_s"] for r in rest]
    validate = sum(r["timings"].get("validate_s", 0) for r in rest)
    overhead = (span - sum(train) + validate) / len(rest)
    return overhead, statistics.median(train), recs[0]["timings"]["train_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="start-up measurements (median)")
    ap.add_argument("--files", type=int, default=10, help="small files for the overhead run")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        base = Path(tmp)
        floors, starts = [], []
        for i in range(args.runs):
            floors.append(import_floor())
            starts.append(start_to_first_step(base, i))
        floor, start = statistics.median(floors), statistics.median(starts)
        print(f"start -> first training step: {start:.2f} s (goal <= 8 s: "
              f"{start / 8:.2f}x the goal); import floor (engine + transformers in a fresh "
              f"interpreter) {floor:.2f} s; ratio {start / floor:.2f}x the floor")
        overhead, train_med, _ = per_file_overhead(base, args.files)
        print(f"per-file overhead outside training ({args.files} files of 2 records): "
              f"{overhead * 1000:.0f} ms (goal <= 500 ms: {overhead / 0.5:.2f}x the goal); "
              f"median train_file {train_med * 1000:.0f} ms; overhead/train "
              f"{overhead / train_med:.2f}x")
        print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
