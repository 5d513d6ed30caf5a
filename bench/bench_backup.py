"""Benchmark: a verified backup of a 1 GB model folder, against baselines measured in this run.

1. Time of `backup_manager.create_backup` (copy+hash in one pass, fsync, drop the page
   cache, re-read and re-hash) against `cp -r` + Python hashlib over the same bytes
   (goal <= 1.2x), with and without `sync` so the durable and the lazy baseline both show.
   The source is evicted from the page cache before every run, so each starts cold.
2. Training tokens/s while backups run (`backup_manager.py backup --idle`, SCHED_IDLE)
   against the same training with no backup (goal >= 0.95), and, for contrast, while
   backups run at normal priority. The training is a proxy: the tiny Llama from
   `training_engine.build_tiny_model`, a plain torch AdamW loop, batch 8 x 256, 2 threads.

    .venv/bin/python bench/bench_backup.py              # both parts, ~2-3 minutes
    .venv/bin/python bench/bench_backup.py --size-mb 256 --skip-training
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import backup_manager  # noqa: E402


def make_model_folder(folder: Path, size_mb: int) -> None:
    """config + tokenizer + one big weights file (random blocks: nothing compresses)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "tokenizer.json").write_bytes(os.urandom(2 << 20))
    (folder / "trainer_state.json").write_text('{"global_step": 1, "tokens_seen": 1}\n')
    block = os.urandom(16 << 20)
    with open(folder / "model.safetensors", "wb") as f:
        for i in range(size_mb // 16):
            f.write(block[i % 7:] + block[:i % 7])  # every block distinct
        f.flush()
        os.fsync(f.fileno())


def evict(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def hash_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while block := fh.read(8 << 20):
                    h.update(block)


def baseline(src: Path, dst: Path, sync: bool) -> float:
    evict(src)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(dst / "model.safetensors")], check=True)
    hash_tree(src)
    elapsed = time.perf_counter() - t
    shutil.rmtree(dst)
    return elapsed


def ours(root: Path) -> float:
    evict(root / "current_model")
    t = time.perf_counter()
    rec = backup_manager.create_backup(root)
    elapsed = time.perf_counter() - t
    shutil.rmtree(rec["path"])
    return elapsed


def bench_time(root: Path, repeats: int) -> dict:
    src = root / "current_model"
    runs = {"cp -r + hashlib": [], "cp -r + sync + hashlib": [], "backup_manager": []}
    for _ in range(repeats):  # interleaved, so load from others hits all three alike
        runs["cp -r + hashlib"].append(baseline(src, root / "cp", sync=False))
        runs["cp -r + sync + hashlib"].append(baseline(src, root / "cp", sync=True))
        runs["backup_manager"].append(ours(root))
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}  # the least disturbed run of each
    return {"runs_s": runs, "median_s": med, "min_s": best,
            "ratio_vs_cp_hash": med["backup_manager"] / med["cp -r + hashlib"],
            "ratio_vs_cp_sync_hash": med["backup_manager"] / med["cp -r + sync + hashlib"],
            "ratio_of_min_vs_cp_hash": best["backup_manager"] / best["cp -r + hashlib"],
            "ratio_of_min_vs_cp_sync_hash": best["backup_manager"] / best["cp -r + sync + hashlib"]}


TRAINER = r"""
import os, sys, time, json
import torch
torch.set_num_threads(2)
sys.path.insert(0, sys.argv[3])
import training_engine
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, 256, (8, 256))
out = open(sys.argv[2], "w", buffering=1)
deadline = time.time() + float(sys.argv[4])
print("ready", flush=True)
while time.time() < deadline:
    loss = model(input_ids=x, labels=x).loss
    loss.backward(); opt.step(); opt.zero_grad()
    out.write(json.dumps([time.time(), 8 * 256]) + "\n")
"""


def tokens_per_s(log: list, t0: float, t1: float) -> float:
    steps = [n for t, n in log if t0 <= t < t1]
    return sum(steps) / (t1 - t0)


def backups_during(root: Path, seconds: float, idle: bool) -> int:
    """Back up repeatedly for `seconds` in child processes; returns how many completed."""
    end, done = time.time() + seconds, 0
    env = dict(os.environ, TRAINING_ROOT=str(root))
    while time.time() < end:
        cmd = [sys.executable, str(REPO / "backup_manager.py"), "backup", "--json"]
        if idle:
            cmd.append("--idle")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        try:
            out, _ = proc.communicate(timeout=max(1.0, end - time.time()) + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            break
        if proc.returncode == 0:
            done += 1
            shutil.rmtree(json.loads(out)["path"])
    return done


def bench_training(root: Path, window: float, rounds: int) -> dict:
    import training_engine  # the tiny model to train; torch is imported in the child
    tiny = root / "tiny"
    training_engine.build_tiny_model(tiny)
    log_path = root / "steps.jsonl"
    total = 24 * 3600  # runs until killed below: windows with backups run over their time
    child = subprocess.Popen([sys.executable, "-c", TRAINER, str(tiny), str(log_path), str(REPO),
                              str(total)], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()  # "ready"
        time.sleep(5)  # warm-up steps are not counted
        windows = {"none": [], "idle": [], "normal": []}
        for _ in range(rounds):
            for kind in ("none", "idle", "normal"):
                t0 = time.time()
                if kind == "none":
                    time.sleep(window)
                    n = 0
                else:
                    n = backups_during(root, window, idle=(kind == "idle"))
                if child.poll() is not None:
                    raise RuntimeError(f"the training proxy exited ({child.returncode})")
                windows[kind].append((t0, time.time(), n))
                time.sleep(1)  # let the last backup's writeback settle between windows
    finally:
        child.kill()
        child.wait()
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rates = {k: [tokens_per_s(log, a, b) for a, b, _ in v] for k, v in windows.items()}
    base = statistics.mean(rates["none"])
    return {"tokens_per_s": rates, "backups_completed": {k: sum(n for *_, n in v)
                                                         for k, v in windows.items()},
            "ratio_idle": statistics.mean(rates["idle"]) / base,
            "ratio_normal_priority": statistics.mean(rates["normal"]) / base}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=float, default=12.0, help="seconds per training window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-time", action="store_true", help="only the training part")
    ap.add_argument("--dir", default=None, help="where to put the model folder (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-", dir=args.dir))
    try:
        root = work / "root"
        make_model_folder(root / "current_model", args.size_mb)
        result = {"size_mb": args.size_mb}
        if not args.skip_time:
            result["time"] = t = bench_time(root, args.repeats)
            print(f"backup of {args.size_mb} MB ({args.repeats} runs each, interleaved):",
                  file=sys.stderr)
            for k in t["median_s"]:
                print(f"  {k:<24} median {t['median_s'][k]:6.2f} s   min {t['min_s'][k]:6.2f} s",
                      file=sys.stderr)
            print(f"  ratio vs cp -r + hashlib:        median {t['ratio_vs_cp_hash']:.2f}x, "
                  f"min {t['ratio_of_min_vs_cp_hash']:.2f}x (goal <= 1.2)", file=sys.stderr)
            print(f"  ratio vs cp -r + sync + hashlib: median {t['ratio_vs_cp_sync_hash']:.2f}x, "
                  f"min {t['ratio_of_min_vs_cp_sync_hash']:.2f}x", file=sys.stderr)
        if not args.skip_training:
            result["training"] = tr = bench_training(root, args.window, args.rounds)
            print("training tokens/s (2 threads), per window:", file=sys.stderr)
            for k, v in tr["tokens_per_s"].items():
                print(f"  backups {k:<7} mean {statistics.mean(v):6.0f}  windows "
                      f"{[round(x) for x in v]}  ({tr['backups_completed'][k]} backups)",
                      file=sys.stderr)
            print(f"  ratio with SCHED_IDLE backups:   {tr['ratio_idle']:.3f} (goal >= 0.95)",
                  file=sys.stderr)
            print(f"  ratio with normal-priority ones: {tr['ratio_normal_priority']:.3f}",
                  file=sys.stderr)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
