"""What the quality gate costs a file, as the daemon reports it: gate seconds / training seconds.

    .venv/bin/python bench/bench_eval_cost.py                      # tiny model, 5k/20k/100k-token files
    .venv/bin/python bench/bench_eval_cost.py --model qwen --tokens 5000 20000   # 151k vocabulary

A root with an eval set of English-like text (~40k tokens, more than the default
`eval_max_tokens`), the default config (B=8 x L=256, 2 threads, the gate on at its
defaults); one file of each size (in the order given) dropped into inbox/ and trained by
`training_daemon.py run --once` in a fresh process (the first file also scores the initial
version; each process loads its tokenizer once, for training and gate). Figures from the daemon's
own done record: `timings.train_s` (the engine's whole run: load, steps, checkpoints,
publish) and `timings.gate_s` (scoring the new weights and the version before on the prefix
the file asks for, `eval_gate.gate_tokens`, model loads included), `eval_tokens`; and the
whole eval the idle daemon then completes (versions/.eval/vNNN.json `seconds`), which is
what scoring every file on all `eval_max_tokens` would cost. Goal: gate <= 5% of training.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

WORDS = ("the a cat dog sat on mat ran to house garden tree river saw big small red blue old "
         "new quick slow green bird fish").split()


def english(tokenizer, tokens: int, seed: int) -> str:
    """Records of 60-200 words until they hold `tokens` tokens of `tokenizer`."""
    r, lines, n = random.Random(seed), [], 0
    while n < tokens:
        text = " ".join(r.choice(WORDS) for _ in range(r.randint(60, 200)))
        n += len(tokenizer(text)["input_ids"]) + 1
        lines.append(json.dumps({"text": text}) + "\n")
    return "".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "qwen"), default="tiny")
    ap.add_argument("--tokens", type=int, nargs="+", default=[5000, 20000, 100000],
                    help="sizes of the trained files, in tokens, in this order (the first file also scores the initial version)")
    ap.add_argument("--eval-tokens", type=int, default=40000, help="size of the eval set")
    args = ap.parse_args(argv)
    import training_config
    import training_daemon
    from bench_endtoend import build_model
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        model_dir = build_model(Path(tmp), args.model)
        tok = AutoTokenizer.from_pretrained(model_dir)
        root = Path(tmp) / "root"
        training_daemon.init_root(root, base=str(model_dir))
        (root / "eval").mkdir()
        (root / "eval" / "english.jsonl").write_text(english(tok, args.eval_tokens, 1))
        cfg = training_config.load_config(root)
        cfg.update(monitor_port=0, num_threads=2, loss_spike_factor=0.0, backup_every_files=0,
                   backup_every_hours=0.0)
        training_config.write_config(root, cfg)
        training_config.approve(root, cfg, by="bench")
        rows = []
        for i, size in enumerate(args.tokens):
            name = f"f{i}-{size}.jsonl"
            (root / "inbox" / name).write_text(english(tok, size, 100 + i))
            subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "run", "--once",
                            "--no-monitor", "--root", str(root)], check=True, capture_output=True,
                           cwd=str(REPO))
            rec = json.loads((root / "done" / f"{name}.record.json").read_text())
            whole = json.loads((root / "versions" / ".eval" / f"{rec['version_after']}.json").read_text())
            trained = rec["tokens_seen_after"] - rec["tokens_seen_before"]
            t = rec["timings"]
            rows.append((trained, t["train_s"], t["gate_s"], rec["eval_tokens"], whole["seconds"],
                         sum(r["tokens"] for r in whole["results"].values())))
            print(f"{name}: {trained} tokens trained in {t['train_s']:.1f} s; gate {rec['eval_tokens']} "
                  f"eval tokens in {t['gate_s']:.2f} s ({t['gate_s'] / t['train_s']:.1%}); whole eval "
                  f"{rows[-1][5]} tokens in {whole['seconds']:.2f} s", file=sys.stderr)
    print(f"\nmodel {args.model}, default config (batch {cfg['batch_size']} x {cfg['max_length']}, "
          f"eval_max_tokens {cfg['eval_max_tokens']}), figures from the daemon's done records:")
    print(f"{'trained tokens':>15} {'train_s':>8} {'gate_s':>7} {'gate/train':>10} {'eval tokens':>11} "
          f"{'whole eval s':>12} {'whole/train':>11}")
    for trained, train_s, gate_s, eval_tokens, whole_s, _ in rows:
        print(f"{trained:>15} {train_s:>8.1f} {gate_s:>7.2f} {gate_s / train_s:>10.1%} {eval_tokens:>11} "
              f"{whole_s:>12.2f} {whole_s / train_s:>11.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
