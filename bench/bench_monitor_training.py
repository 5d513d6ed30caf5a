"""What polled monitor pages cost real training: the engine's own tokens/s, end to end.

    python3 bench/bench_monitor_training.py                  # 200 pages, 3 rounds, ~4 minutes
    python3 bench/bench_monitor_training.py --pages 50 --rounds 2

The daemon trains in its own process (nproc_per_node 1) and serves the live monitor beside
it. This trains files of the tiny model with `training_engine.train_file`, as the daemon
does, on the default config (batch 8 x 256, 2 threads), three ways in each round: alone;
with the monitor in a thread of the training process (`start_in_thread`, as the daemon
serves it: SCHED_IDLE, at most API_RATE answers a second) and N pages polling it; and the
same without the rate cap (what the daemon did before). The pages (a browser's work) run
in another process at SCHED_IDLE, so only the server's cost is measured. Figures: the
engine's tokens/s as a ratio to "alone" in the same round, median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import monitor_server  # noqa: E402
from bench_monitor import polling_pages, write_metrics  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=1500, help="records per trained file")
    args = ap.parse_args(argv)
    import training_config
    import training_daemon
    import training_engine
    with tempfile.TemporaryDirectory(prefix="bench-montrain-") as tmp:
        root = Path(tmp) / "root"
        training_daemon.init_root(root, base="tiny")
        cfg = training_config.default_config(num_threads=2, checkpoint_every_steps=0,
                                             loss_spike_factor=0.0)
        write_metrics(root / "metrics.jsonl", 20_000)
        n = 0

        def train() -> float:
            nonlocal n
            n += 1
            data = Path(tmp) / f"f{n}.jsonl"
            data.write_text("".join(json.dumps({"text": f"{n} {i} " + "the quick brown fox " * 40})
                                    + "\n" for i in range(args.records)))
            t0 = time.perf_counter()
            r = training_engine.train_file(root, data, file_id=f"f{n}", config=cfg)
            return r["tokens"] / (time.perf_counter() - t0)

        def with_pages(**kw) -> float:
            handle = monitor_server.start_in_thread(root, 0, **kw)  # as the daemon serves it
            try:
                with polling_pages(handle.port, args.pages):
                    return train()
            finally:
                handle.stop()

        train()  # warm-up: imports, first-file costs
        ratios = {"capped": [], "uncapped": []}
        for r in range(args.rounds):
            alone = train()
            capped = with_pages()
            uncapped = with_pages(max_rate=None)
            ratios["capped"].append(capped / alone)
            ratios["uncapped"].append(uncapped / alone)
            print(f"round {r + 1}: alone {alone:.0f} tok/s, with the pages {capped:.0f} "
                  f"(without the rate cap {uncapped:.0f})", file=sys.stderr)
    print(f"\nengine tokens/s with {args.pages} pages polling every 2 s, {os.cpu_count()} cores, "
          f"{args.rounds} rounds (ratio to training alone in the same round, median):")
    for kind, label in (("capped", f"monitor as served ({monitor_server.API_RATE:g} answers/s)"),
                        ("uncapped", "without the rate cap")):
        vals = ratios[kind]
        print(f"  {label:34s} {statistics.median(vals):.3f}  ({', '.join(f'{v:.3f}' for v in vals)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
