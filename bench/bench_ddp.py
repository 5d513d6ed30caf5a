"""What torchrun costs per file: daemon start of a file -> its first step, N=2 vs N=1.

    .venv/bin/python bench/bench_ddp.py              # 3 files per N, ~1 minute on 2 cores
    .venv/bin/python bench/bench_ddp.py --files 5 --records 40

For nproc_per_node 1 and 2, one root each, `training_daemon.py run --once` over the same
small files. Per file: from `started_at` in its record (the daemon moved it to processing/)
to the first metrics.jsonl line of its file_id. N=1 trains in the daemon (engine imported
once, while the inbox settles), so its later files pay only the model load; N=2 launches
a torchrun job per file, whose ranks import torch and transformers afresh. The first file
is shown apart: for N=1 it may still wait for the daemon's engine import. Baseline: N=1's
later files. Also printed: the whole train_s per file (launch + steps + saving).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainroot import parse_time  # noqa: E402

FAST = {"settle_seconds": 0.2, "rescan_seconds": 0.5, "max_length": 32, "batch_size": 2,
        "checkpoint_every_steps": 0, "monitor_port": 0, "backup_every_files": 0,
        "backup_every_hours": 0, "loss_spike_factor": 0.0, "num_threads": 1}


def run_root(base: Path, nproc: int, files: int, records: int) -> list[dict]:
    """Train `files` files with `nproc` processes; per file {first_step_s, train_s}."""
    import training_config
    root = base / f"n{nproc}"
    subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "init", "--root", str(root)],
                   check=True, capture_output=True)
    cfg = training_config.load_config(root)
    cfg.update(FAST, nproc_per_node=nproc)
    training_config.write_config(root, cfg)
    training_config.approve(root, cfg, by="bench")
    for k in range(files):
        (root / "inbox" / f"f{k}.jsonl").write_text("".join(
            json.dumps({"text": f"file {k} line {i}: the quick brown fox jumps over the dog"}) + "\n"
            for i in range(records)))
    proc = subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "run", "--once",
                           "--no-monitor", "--root", str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"daemon (nproc {nproc}) exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    first_step = {}
    for line in (root / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        first_step.setdefault(m["file_id"], parse_time(m["time"]))
    out = []
    for path in (root / "done").glob("*.record.json"):
        rec = json.loads(path.read_text())
        out.append({"started": parse_time(rec["started_at"]), "train_s": rec["timings"]["train_s"],
                    "first_step_s": first_step[rec["file_id"]] - parse_time(rec["started_at"])})
    if len(out) != files:
        raise SystemExit(f"nproc {nproc}: expected {files} files in done/, found {len(out)}")
    return sorted(out, key=lambda r: r["started"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3, help="files per N (the first is shown apart)")
    ap.add_argument("--records", type=int, default=20, help="records per file")
    args = ap.parse_args(argv)
    if args.files < 2:
        ap.error("--files must be at least 2 (the first file is shown apart)")
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        res = {n: run_root(Path(tmp), n, args.files, args.records) for n in (1, 2)}
    med = {n: statistics.median(r["first_step_s"] for r in rs[1:]) for n, rs in res.items()}
    for n, rs in res.items():
        print(f"nproc_per_node {n}: file start -> first step {med[n]:.2f} s (median of "
              f"{len(rs) - 1} later files; first file {rs[0]['first_step_s']:.2f} s); train_s per "
              f"file {statistics.median(r['train_s'] for r in rs):.2f} s")
    print(f"torchrun launch overhead per file: {med[2] - med[1]:.2f} s "
          f"({med[2] / max(med[1], 1e-9):.1f}x N=1's file start -> first step)")
    print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
