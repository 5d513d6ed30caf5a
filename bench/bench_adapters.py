"""Benchmark: adapter mode (LoRA) against full fine-tuning, side by side in one run.

For a realistic-vocabulary model (Qwen2 shape, 151,936-token vocabulary, ~10M parameters)
and a ~100M-parameter one, both built locally (random weights, no download), each mode
trains the same files through `training_engine.train_file` and versions each result with
`model_versioner.create_version`, as the daemon does. Each (model, mode) runs in its own
process so peak RSS is its own. Reported per mode:

- bytes per version: bytes of inodes a new version adds (versions share unchanged files
  through hard links, so this is what each version really costs on disk);
- per-file fixed time: wall time of a one-step file (load, isolation probe, end checkpoint,
  publish) plus its create_version, less the time spent in its optimizer steps (the bench
  times `FileRun.optimizer_step`): what every file pays whatever its length;
- tokens/s: tokens of the long file over the time spent in its optimizer steps;
- peak RSS of the process.

Goals (issue 16): a version <= 1% of a full version's bytes at r=8 on all linear layers;
per-file fixed time <= 0.2x full mode's; tokens/s reported against full mode's.

    .venv/bin/python bench/bench_adapters.py                  # both models (~10 min on 2 cores)
    .venv/bin/python bench/bench_adapters.py --models 10m --records 60   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# hidden, layers, heads, kv heads, intermediate: Qwen2-style, tied embeddings like Qwen2.5-0.5B
SHAPES = {"10m": (64, 2, 4, 2, 256), "100m": (512, 6, 8, 2, 1536)}
VOCAB = 151_936


def build_model(out: Path, shape: str) -> int:
    """A random Qwen2 model with the real vocabulary size and the byte tokenizer (ids < 259
    are all the data uses; the vocabulary still costs what it costs in embeddings and head)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import training_engine as te
    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    te.build_tiny_tokenizer().save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def write_file(path: Path, records: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = "the a model keeps learning while bench measures every version of its weights".split()
    with open(path, "w") as f:
        for i in range(records):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))})
                    + "\n")
    return path


def new_bytes(root: Path, seen: set) -> int:
    """Bytes of the inodes under versions/ not counted before (hard links share inodes)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root / "versions"):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run_one(model_dir: Path, mode: str, work: Path, args) -> dict:
    """In this process: init a root on `model_dir`, train one long file and `--files`
    one-step files in `mode`, versioning each; the figures."""
    import torch
    import model_versioner
    import training_config
    import training_daemon
    import training_engine as te
    root = work / f"root-{mode}"
    training_daemon.init_root(root, base=str(model_dir))
    cfg = training_config.load_config(root)
    cfg.update(finetune=mode, max_length=args.max_length, batch_size=args.batch_size,
               grad_accum_steps=1, num_threads=args.threads, checkpoint_every_steps=0,
               checkpoint_every_minutes=0.0, loss_spike_factor=0.0, warmup_steps=2,
               learning_rate=1e-4 if mode == "full" else 1e-3)
    training_config.write_config(root, cfg)
    training_config.approve(root, cfg)
    in_steps = [0.0]
    step = te.FileRun.optimizer_step

    def timed_step(self, batch):
        t = time.perf_counter()
        try:
            return step(self, batch)
        finally:
            in_steps[0] += time.perf_counter() - t
    te.FileRun.optimizer_step = timed_step
    seen: set = set()
    new_bytes(root, seen)  # v001 (init) is the base: not counted
    # 1. the long file: throughput (its fixed part subtracted below); also the full -> lora switch
    data = write_file(work / f"long-{mode}.jsonl", args.records, 1)
    long = te.train_file(root, data, file_id="long", config=cfg)
    assert long["status"] == "completed", long
    train_s = in_steps[0]
    model_versioner.create_version(root, "post-train:long")
    version_bytes = [new_bytes(root, seen)]
    # 2. one-step files: the fixed cost of a file, and the bytes of each further version
    fixed = []
    one = write_file(work / f"one-{mode}.jsonl", max(1, args.batch_size // 2), 2)
    for i in range(args.files):
        t0, in_steps[0] = time.perf_counter(), 0.0
        r = te.train_file(root, one, file_id=f"one-{i}", config=cfg)
        model_versioner.create_version(root, f"post-train:one-{i}")
        fixed.append(time.perf_counter() - t0 - in_steps[0])
        assert r["status"] == "completed" and r["steps"] >= 1, r
        version_bytes.append(new_bytes(root, seen))
    fixed_s = sorted(fixed)[len(fixed) // 2]
    base_bytes = sum(f.stat().st_size for f in (root / "base").rglob("*") if f.is_file()) \
        if (root / "base").is_dir() else 0
    del torch
    return {"mode": mode, "steps": long["steps"], "tokens": long["tokens"],
            "tokens_per_s": long["tokens"] / train_s, "fixed_s": fixed_s,
            "version_bytes": sorted(version_bytes)[len(version_bytes) // 2],
            "base_bytes": base_bytes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args) -> int:
    out = run_one(Path(args.model_dir), args.mode, Path(args.work), args)
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="10m,100m", help="comma-separated: 10m, 100m")
    ap.add_argument("--records", type=int, default=200, help="records of the long file")
    ap.add_argument("--files", type=int, default=3, help="one-step files per mode")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: all cores")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        for shape in args.models.split(","):
            model_dir = Path(tmp) / f"model-{shape}"
            code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
                    "import bench_adapters as b; from pathlib import Path;"
                    "print(b.build_model(Path(sys.argv[3]), sys.argv[4]))")
            params = int(subprocess.run([sys.executable, "-c", code, str(REPO), str(REPO / "bench"),
                                         str(model_dir), shape], check=True, capture_output=True,
                                        text=True).stdout.split()[-1])
            for mode in ("full", "lora"):
                work = Path(tmp) / f"{shape}-{mode}"
                work.mkdir()
                proc = subprocess.run([sys.executable, __file__, "--child", "--mode", mode,
                                       "--model-dir", str(model_dir), "--work", str(work),
                                       "--records", str(args.records), "--files", str(args.files),
                                       "--max-length", str(args.max_length),
                                       "--batch-size", str(args.batch_size),
                                       "--threads", str(args.threads)],
                                      capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                if proc.returncode != 0:
                    print(proc.stderr[-4000:], file=sys.stderr)
                    return 1
                rows.append(dict(json.loads(proc.stdout.strip().splitlines()[-1]),
                                 model=shape, params=params))
    print("| model | params | mode | bytes/version | vs full | fixed s/file | vs full | "
          "tokens/s | vs full | peak RSS MB | base store MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full = next(x for x in rows if x["model"] == r["model"] and x["mode"] == "full")
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['mode']} | {r['version_bytes']:,} | "
              f"{r['version_bytes'] / full['version_bytes']:.2%} | {r['fixed_s']:.2f} | "
              f"{r['fixed_s'] / full['fixed_s']:.2f}x | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x | {r['peak_rss_mb']:.0f} | "
              f"{r['base_bytes'] / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
