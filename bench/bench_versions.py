"""Snapshot and rollback time for 1 GB and 4 GB model folders, against `cp -r` in the same run.

Writes real bytes (no sparse files) into a temp dir on the same disk, then times
`create_version` (snapshot) and `rollback` (keep the present state, swap back) as medians
of several runs, and one `cp -r` of the same folder. Goal: <= 50 ms at both sizes. Both are
bound by fsync latency, so each is also given in units of one atomic small write measured
in the same run (on a disk shared with other work, that unit swings from ~1 to ~20 ms).

    .venv/bin/python bench/bench_versions.py
    .venv/bin/python bench/bench_versions.py --sizes-gb 1 --dir /data/tmp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model_versioner as mv  # noqa: E402
from trainroot import Paths, atomic_write_json, fsync_dir  # noqa: E402

BLOCK = 64 << 20


def write_model(folder: Path, size: int, blocks: list[bytes], tag: str) -> None:
    """config.json + model.safetensors of `size` bytes (a valid header + real random bytes)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bench": tag}))
    n = size // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left, i = n * 4, 0
        while left:
            chunk = blocks[i % len(blocks)][:left]
            f.write(chunk)
            left -= len(chunk)
            i += 1
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def bench_size(base: Path, size_gb: float, blocks: list[bytes], runs: int) -> dict:
    root = base / f"root-{size_gb}g"
    p = Paths(root).ensure()
    t = time.perf_counter()
    write_model(p.staging / "base", int(size_gb * (1 << 30)), blocks, "base")
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    mv.write_manifest(p.staging / "base")        # hashing: done once when the trainer saves
    hash_s = time.perf_counter() - t
    mv.publish_model(root, p.staging / "base", reason="init")

    with contextlib.suppress(mv.GuardrailError):
        mv.refuse_while_training(root)           # warm-up: the lazy training_controller import
    commits = []
    for i in range(runs):                        # the disk's price of one durable small write
        t = time.perf_counter()
        atomic_write_json(root / "probe.json", {"i": i})
        commits.append(time.perf_counter() - t)

    snaps = []
    for i in range(runs):
        t = time.perf_counter()
        mv.create_version(root, "manual", force=True)
        snaps.append(time.perf_counter() - t)

    rollbacks = []
    for i in range(runs):
        # "training": a new tree (new config inode, weights linked: same file count and size)
        new = p.staging / f"trained-{i}"
        new.mkdir()
        (new / "config.json").write_text(json.dumps({"model_type": "llama", "bench": i}))
        os.link(p.current_model / "model.safetensors", new / "model.safetensors")
        mv.write_manifest(new)
        mv.publish_model(root, new, reason="train", keep_old="never")
        t = time.perf_counter()
        mv.rollback(root)                          # keeps the trained tree, then swaps back
        rollbacks.append(time.perf_counter() - t)

    dst = base / "cp-copy"
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(p.current_model), str(dst)], check=True)
    cp_s = time.perf_counter() - t
    shutil.rmtree(dst)
    shutil.rmtree(root)
    snap, rb = statistics.median(snaps), statistics.median(rollbacks)
    commit = statistics.median(commits)
    return {"size_gb": size_gb, "write_ms": ms(write_s), "manifest_hash_ms": ms(hash_s),
            "snapshot_ms": ms(snap), "snapshot_max_ms": ms(max(snaps)),
            "rollback_ms": ms(rb), "rollback_max_ms": ms(max(rollbacks)),
            "cp_r_ms": ms(cp_s), "cp_over_snapshot": round(cp_s / snap, 1),
            "cp_over_rollback": round(cp_s / rb, 1),
            "atomic_write_ms": ms(commit), "snapshot_in_atomic_writes": round(snap / commit, 1),
            "rollback_in_atomic_writes": round(rb / commit, 1),
            "goal_50ms_met": max(snaps) <= 0.05 and max(rollbacks) <= 0.05}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="temp folder parent (default: system temp)")
    args = parser.parse_args(argv)
    blocks = [os.urandom(BLOCK) for _ in range(4)]
    base = Path(tempfile.mkdtemp(prefix="bench-versions-", dir=args.dir))
    results = []
    try:
        for size in args.sizes_gb:
            r = bench_size(base, size, blocks, args.runs)
            results.append(r)
            print(f"{size:>4g} GB  snapshot {r['snapshot_ms']:8.2f} ms (max {r['snapshot_max_ms']})"
                  f"  rollback {r['rollback_ms']:8.2f} ms (max {r['rollback_max_ms']})"
                  f"  cp -r {r['cp_r_ms']:9.1f} ms  -> cp/snapshot {r['cp_over_snapshot']}x,"
                  f" cp/rollback {r['cp_over_rollback']}x  goal<=50ms: {r['goal_50ms_met']}",
                  flush=True)
            print(f"        one atomic small write (write+fsync+rename+fsync dir) "
                  f"{r['atomic_write_ms']} ms: snapshot = {r['snapshot_in_atomic_writes']}x, "
                  f"rollback = {r['rollback_in_atomic_writes']}x of it", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (fsync latency "
          "on a shared disk dominates both timings)")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
