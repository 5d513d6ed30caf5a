"""Benchmark: the daemon's look for the queue's head (`next_job`) on a deep queue.

Queues N small valid files with `training_queue.enqueue` (as intake does, one SyncBatch)
in a temp root, then times, `--repeat` times each (best kept, the machine is shared):

    before:  the head as next_job found it before: `list_queue` (every record read), then
             the head's record
    after:   `QueueOrder.paths()` (one scandir of the queue folders; a record read once per
             file) and the head's record, each time after the previous head left for
             processing/ (as when a file starts training; the move is not timed)

    .venv/bin/python bench/bench_queue.py            # N = 5000
    .venv/bin/python bench/bench_queue.py -n 50000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import training_config  # noqa: E402
import training_queue as tq  # noqa: E402
from trainroot import Paths  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="queued files (default 5000)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        Paths(root).ensure()
        cfg = training_config.default_config()
        training_config.write_config(root, cfg)
        t0 = time.monotonic()
        batch = tq.SyncBatch()
        incoming = root / "queue" / tq.INCOMING / "normal"
        incoming.mkdir(parents=True, exist_ok=True)
        for i in range(args.n):
            f = incoming / f"f{i:06d}.jsonl"
            f.write_text(json.dumps({"text": f"record {i}"}) + "\n")
            tq.enqueue(root, f, move=True, cfg=cfg, source="inbox", batch=batch,
                       done={}, priority=("high", "normal", "low")[i % 3])
        batch.flush()
        print(f"queued {args.n} files in {time.monotonic() - t0:.1f} s")

        def before():
            for item in tq.list_queue(root):
                return tq.read_record(item["path"])

        order = tq.QueueOrder(root)
        t0 = time.perf_counter()
        list(order.paths())
        cold = time.perf_counter() - t0

        def after():
            return tq.read_record(next(order.paths()))

        def best(fn, between=None) -> float:
            times = []
            for _ in range(args.repeat):
                if between is not None:
                    between()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        def head_leaves():  # as when a file starts training
            head = next(order.paths())
            tq.move_with_record(head, root / "processing", tq.read_record(head), "training")
        b, a = best(before), best(after, between=head_leaves)
        print(f"N={args.n}: before {b * 1000:.1f} ms per next_job (every record read); "
              f"after {a * 1000:.1f} ms (first call, reading every record once: "
              f"{cold * 1000:.0f} ms); {b / a:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
