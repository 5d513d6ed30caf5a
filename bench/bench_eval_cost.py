"""What the quality gate costs a file: one eval (eval_gate.evaluate) against its training.

    python3 bench/bench_eval_cost.py                       # 300 records, ~2 minutes on 2 cores
    python3 bench/bench_eval_cost.py --records 1500 --eval-max-tokens 32768

Trains files of the tiny model with `training_engine.train_file` on the default config
(batch 8 x 256, 2 threads), as the daemon does, and after each scores current_model on an
eval set of English-like text with `eval_gate.evaluate` (model load included) at the
default `eval_max_tokens`. The daemon scores each file once (the version before a file is
the version after the last one: its result is kept). Figures: eval seconds / training
seconds per file (median over rounds), eval tokens/s, and the file size (tokens) from which
one eval costs at most 5% of the file's training.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = ("the a cat dog sat on mat ran to house garden tree river saw big small red blue old "
         "new quick slow green bird fish").split()


def english(n: int, seed: int) -> str:
    r = random.Random(seed)
    return "".join(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(r.randint(60, 200)))})
                   + "\n" for _ in range(n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300, help="records per trained file (~700 B each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="default: config's default")
    args = ap.parse_args(argv)
    import eval_gate
    import training_config
    import training_daemon
    import training_engine
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp) / "root"
        training_daemon.init_root(root, base="tiny")
        (root / "eval").mkdir()
        (root / "eval" / "english.jsonl").write_text(english(400, 1))
        over = {} if args.eval_max_tokens is None else {"eval_max_tokens": args.eval_max_tokens}
        cfg = training_config.default_config(num_threads=2, checkpoint_every_steps=0,
                                             loss_spike_factor=0.0, **over)
        rows = []
        for n in range(args.rounds + 1):
            data = Path(tmp) / f"f{n}.jsonl"
            data.write_text(english(args.records, 100 + n))
            t0 = time.perf_counter()
            r = training_engine.train_file(root, data, file_id=f"f{n}", config=cfg)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            doc = eval_gate.evaluate(root, root / "current_model", cfg)
            eval_s = time.perf_counter() - t0
            tokens = sum(x["tokens"] for x in doc["results"].values())
            if n == 0:
                continue  # warm-up: imports, first-file costs
            rows.append((train_s, eval_s, r["tokens"], tokens))
            print(f"round {n}: trained {r['tokens']} tokens in {train_s:.1f} s "
                  f"({r['tokens'] / train_s:.0f} tok/s); eval {tokens} tokens in {eval_s:.2f} s "
                  f"-> {eval_s / train_s:.2%}", file=sys.stderr)
    ratio = statistics.median(e / t for t, e, _, _ in rows)
    train_tps = statistics.median(n / t for t, _, n, _ in rows)
    eval_s = statistics.median(e for _, e, _, _ in rows)
    print(f"\neval_max_tokens {cfg['eval_max_tokens']}, default config (batch {cfg['batch_size']} x "
          f"{cfg['max_length']}), {args.records}-record files of ~{rows[0][2]} tokens:")
    print(f"  eval / training time per file  {ratio:.2%}  "
          f"({', '.join(f'{e / t:.2%}' for t, e, _, _ in rows)})")
    print(f"  one eval: {eval_s:.2f} s ({statistics.median(k / e for _, e, _, k in rows):.0f} "
          f"scored tokens/s); training {train_tps:.0f} tokens/s")
    print(f"  at most 5% for files of {eval_s * train_tps / 0.05:.0f} tokens or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
