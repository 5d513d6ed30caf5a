"""Per-file fixed cost at real sizes: bytes written and time, against one fsynced write of them.

    .venv/bin/python bench/bench_filecost.py               # ~100 MB of fp32 weights, bf16 and fp32 bases
    .venv/bin/python bench/bench_filecost.py --large       # also ~1 GB (minutes; ~10 GB of disk, ~8 GB RAM)
    .venv/bin/python bench/bench_filecost.py --work /var/tmp/fc --files 3
    .venv/bin/python bench/bench_filecost.py --daemon --files 3   # as users see it: the done records
    .venv/bin/python bench/bench_filecost.py --daemon --from-disk --files 4   # one `run --once` per file
    .venv/bin/python bench/bench_filecost.py --daemon --idle 5 --files 4   # one at a time, 5 s apart
    .venv/bin/python bench/bench_filecost.py --writeback --files 6   # the baselines start write-out too

For each size and base dtype: a Llama model built here (random weights, no download) and
saved in that dtype, a root initialised from it (`init`), then `--files` one-step files, each
after the daemon's pre-file snapshot (model_versioner.create_version) and trained through the
engine's entry point (train_file). The first file starts a fresh optimizer; the ones after it
take the fp32 master weights and AdamW the file before ended with: kept in memory by the
engine (a queue of files), or read from the end checkpoint (`--from-disk`: the first file after
an idle spell; the spare checkpoint stays through it, as the idle daemon keeps it).
Printed per file:
  bytes written: the end checkpoint (fp32 weights + optimizer + rng + meta), current_model
    (new files only: its weights hard-linked to the checkpoint's cost nothing), the snapshot
    (links: ~0), and what the kernel counted (/proc/self/io write_bytes);
  fixed time: the engine's own `seconds` (load, checkpoint, publish) plus the snapshot, against
    the time to write those same bytes once with fsync, on the same filesystem
    (fsynced_write_s), two ways: `write1`, as the file must write them (its published weights,
    which the version after it keeps, into a new file with O_DIRECT, the fastest way this
    machine writes a new file; the rest over a file kept between
    writes, as a checkpoint writes over the spare), and `kept`, all of them over the kept
    file (its pages cached: the fastest write this machine does); plain writes and one fsync,
    or with `--writeback` each 8 MB's write-out started as it is written (sync_file_range),
    as the engine's own writes through the page cache do; each the median of one
    such write just before the file and two just after it (`--daemon`: before and after the
    run), since this disk's pace swings 2-5x within minutes;
  file s: the whole file (train_file; --daemon: the done record's train_s), its one step too
    (the first step after a load from disk once paid for copying every page the load had
    left mapped from the files, unseen by the fixed time);
and, per model source (memory: kept from the file before; disk: loaded) and whether the
checkpoint was written over the spare (not for a root's first two files), the median ratio
over the files, the figure to quote (one file's swings with the disk).
Goal (issue 15): fixed / write-once <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (hidden, layers, intermediate, vocab), untied: 26M and 271M parameters, 104 MB and 1.08 GB in fp32
SIZES = {"100MB": (512, 4, 1536, 12000), "1GB": (1024, 16, 2816, 32000)}


def build_model(out: Path, size: str, dtype_name: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import training_engine as te
    hidden, layers, inter, vocab = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype_name))
    model.save_pretrained(out)
    te.build_tiny_tokenizer().save_pretrained(out)
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 0, "tokens_seen": 0}))
    return out


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes")).split()[1])


def new_bytes(folder: Path, shared_inodes=frozenset()) -> int:
    """Bytes of the files under `folder` that are not links to an inode of `shared_inodes`
    nor to any other name (a hard link writes nothing)."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            if st.st_ino not in shared_inodes and st.st_nlink == 1:
                total += st.st_size
    return total


WRITEBACK = False  # --writeback: the baseline also starts each 8 MB's write-out as it writes


def fsynced_write_s(folder: Path, nbytes: int, new: int = 0) -> float:
    """Seconds to write `nbytes` and fsync them (the limit the engine is held to): `new` of
    them into a new file, the rest over one file kept in `folder` for the next call, as a
    checkpoint writes over the spare one. Each file's published weights are new bytes (the
    version after it keeps them), written the fastest way this machine has: O_DIRECT where
    the filesystem takes it, from an aligned buffer with no copy (through the page cache, a
    new file takes a new page per 4 KB: on this VM 2.9-3.4 s per GB, against 0.62-0.70 s).
    The new file is deleted after the timing and the deletion synced: this disk is mounted
    with `discard`, and a write just after a deletion waited for it (three write-and-delete
    rounds of 3.25 GB took 8.4-9.7 s each)."""
    import mmap
    import training_engine as te
    block = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(len(block)))
    path, fresh = folder / "write-once.bin", folder / "write-once.new"

    def write(fd, size, direct=False):
        left, step = size, len(block) if direct or not WRITEBACK else 8 << 20
        while left > 0:
            chunk = min(left, step)
            left -= os.write(fd, memoryview(block)[:chunk + (-chunk % 4096 if direct else 0)])
            if step < len(block):  # --writeback: this chunk's write-out started, as the engine does
                te._start_writeback(fd, size - left - chunk, chunk)
        if direct:
            os.ftruncate(fd, size)  # (the last page was written whole)
        os.fsync(fd)
    kept = nbytes - new
    if not path.exists() or path.stat().st_size < kept:  # its blocks first, untimed
        with open(path, "ab") as f:
            write(f.fileno(), kept - (path.stat().st_size if path.exists() else 0))
    t0 = time.perf_counter()
    with open(path, "r+b") as f:
        write(f.fileno(), kept)
    if new:
        flags, direct = os.O_WRONLY | os.O_CREAT | os.O_EXCL, hasattr(os, "O_DIRECT")
        try:
            fd = os.open(fresh, flags | (os.O_DIRECT if direct else 0))
        except OSError:  # (tmpfs refuses O_DIRECT)
            fd, direct = os.open(fresh, flags), False
        try:
            write(fd, new, direct)
        finally:
            os.close(fd)
    took = time.perf_counter() - t0
    if new:
        fresh.unlink()
        os.sync()
    return took


def write_once(folder: Path, nbytes: int, new: int, before: list | None = None) -> dict:
    """Both limits for `nbytes` (`new` of them new bytes): the median of three writes (one
    `before` the file, scaled to these bytes, when given), since this disk's pace swings."""
    out = {}
    for kind, fresh in (("new", new), ("kept", 0)):
        runs = [fsynced_write_s(folder, nbytes, fresh) for _ in range(3 - bool(before))]
        if before:
            runs.append(before[0][kind] * nbytes / before[1])
        out[kind], out[kind + "_range"] = sorted(runs)[1], [min(runs), max(runs)]
    return out


def limits(fixed: float, once: dict) -> dict:
    """The row's baselines and ratios: `ratio` against the write as the file needs it (its
    published weights into a new file), `ratio_kept` against all of it over a kept file."""
    return {"write_once_s": round(once["new"], 3),
            "write_once_range": [round(x, 2) for x in once["new_range"]],
            "ratio": round(fixed / once["new"], 2),
            "write_kept_s": round(once["kept"], 3),
            "write_kept_range": [round(x, 2) for x in once["kept_range"]],
            "ratio_kept": round(fixed / once["kept"], 2)}


def published_weights(root: Path) -> int:
    """Bytes of current_model's weights: new bytes every file (the next version keeps them)."""
    from trainroot import Paths
    return sum(f.stat().st_size for f in Paths(root).current_model.glob("*.safetensors"))


def run_case(work: Path, size: str, dtype_name: str, files: int, *, from_disk=False) -> list[dict]:
    import model_versioner
    import training_config
    import training_daemon
    import training_engine as te
    from trainroot import Paths
    case = work / f"{size}-{dtype_name}"
    base = build_model(case / "base", size, dtype_name)
    root = case / "root"
    training_daemon.init_root(root, base=str(base))
    cfg = training_config.default_config(max_length=64, batch_size=1, grad_accum_steps=1,
                                         warmup_steps=0, checkpoint_every_steps=0,
                                         checkpoint_every_minutes=0.0, keep_checkpoints=1)
    training_config.write_config(root, cfg)
    p = Paths(root)
    rows = []
    for i in range(files):
        data = case / f"file{i}.jsonl"
        data.write_text(json.dumps({"text": f"file {i}: one short record, one step."}) + "\n")
        t0 = time.perf_counter()
        vid, _ = model_versioner.create_version(root, f"pre-train:{data.name}")
        snapshot_s = time.perf_counter() - t0
        version_bytes = new_bytes(p.versions / vid)  # now, while current_model shares its files
        if from_disk:  # an idle spell: the model let go (the spare checkpoint stays), and
            te.release_warm()  # old checkpoints' deletions over before the next file comes
            te._wait_for_deletions()
        # the disk's own pace swings 2-5x within minutes on a VM: the baseline is the median of
        # one write just before the file and two just after it (the size: the last file's)
        before = None
        if rows:
            last = rows[-1]
            before = ({"new": fsynced_write_s(case, last["bytes_total"], last["bytes_new"]),
                       "kept": fsynced_write_s(case, last["bytes_total"])}, last["bytes_total"])
        # a pruned checkpoint's files of this root to write over (none for its first two files;
        # the case before it leaves its own spare in this process)
        spare = sum(f.stat().st_size for f in te._spare_files() if p.staging in f.parents)
        io0, t0 = write_bytes(), time.perf_counter()
        result = te.train_file(root, data, file_id=f"f{i}", config=cfg)
        train_s = time.perf_counter() - t0
        io = write_bytes() - io0
        if result["status"] != "completed" or result["steps"] != 1:
            raise SystemExit(f"{size} {dtype_name} file {i}: {result}")
        ckpt = te.list_checkpoints(root)[0][0]
        ckpt_inodes = {f.stat().st_ino for f in ckpt.iterdir()}
        written = {"checkpoint": new_bytes(ckpt) + sum(f.stat().st_size for f in ckpt.iterdir()
                                                         if f.stat().st_nlink > 1),
                   "current_model": new_bytes(p.current_model, ckpt_inodes),
                   "version": version_bytes}
        secs = dict(result.get("seconds") or {})
        fixed = snapshot_s + sum(secs.values())
        total = sum(written.values())
        fresh = published_weights(root)
        once = write_once(case, total, fresh, before)
        weights = p.current_model / "model.safetensors"
        rows.append({"size": size, "base": dtype_name, "file": i, "optimizer": result["optimizer"],
                     "bytes": written, "bytes_total": total, "bytes_new": fresh,
                     "kernel_write_bytes": io,
                     "weights_linked": weights.stat().st_ino in ckpt_inodes,
                     "seconds": {**{k: round(v, 3) for k, v in secs.items()},
                                 "snapshot": round(snapshot_s, 3)},
                     "train_s": round(train_s, 3), "fixed_s": round(fixed, 3),
                     "model_source": result.get("model_source"), "over_spare": spare > 0,
                     **limits(fixed, once)})
    return rows


def run_daemon_case(work: Path, size: str, dtype_name: str, files: int, *,
                    from_disk=False, idle: float | None = None) -> list[dict]:
    """The same files through `training_daemon.py run --once` (a queue, as users run it; with
    `from_disk`, one run per file: each comes after an idle spell, into a new process that
    loads the model and takes the spare checkpoint the run before it kept; with `idle`, one
    running daemon, each file dropped that many seconds after the one before is done: within
    keep_warm_seconds it trains on the model kept in memory): per file the done record's
    timings, the daemon's own figures: snapshot before, the engine's load/checkpoint/publish,
    the version after."""
    import subprocess
    import retention
    import training_config
    import training_daemon
    import training_queue
    from trainroot import Paths
    case = work / f"daemon-{size}-{dtype_name}"
    base = build_model(case / "base", size, dtype_name)
    root = case / "root"
    training_daemon.init_root(root, base=str(base))
    cfg = dict(training_config.load_config(root), max_length=64, batch_size=1, grad_accum_steps=1,
               warmup_steps=0, checkpoint_every_steps=0, checkpoint_every_minutes=0.0,
               keep_checkpoints=1)
    training_config.write_config(root, cfg)
    subprocess.run([sys.executable, str(REPO / "training_controller.py"), "approve-config", "--yes",
                    "--root", str(root)], check=True, capture_output=True)
    p = Paths(root)

    def drop(i: int) -> None:
        (p.inbox / f"file{i}.jsonl").write_text(
            json.dumps({"text": f"file {i}: one short record, one step."}) + "\n")
    # BENCH_DAEMON_WRAP: a command to run the daemon under (a profiler: `py-spy record -o F --`)
    wrap = os.environ.get("BENCH_DAEMON_WRAP", "").split()
    # one write-once just before the run, of what a file writes as estimated from the base
    # (fp32 weights and AdamW's two moments, plus current_model when the base is not fp32),
    # scaled to the measured bytes after it: the disk's pace around the run, not after it
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    params = base_bytes // (4 if dtype_name == "float32" else 2)
    estimate = 12 * params + (base_bytes if dtype_name != "float32" else 0)
    before = ({"new": fsynced_write_s(case, estimate, base_bytes),
               "kept": fsynced_write_s(case, estimate)}, estimate)

    def run() -> None:
        proc = subprocess.run([*wrap, sys.executable, str(REPO / "training_daemon.py"), "run",
                               "--once", "--no-monitor", "--root", str(root)], check=False,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the daemon exited {proc.returncode}: {proc.stderr[-2000:]}")
    spare = {}
    if idle is not None:  # one daemon; each file once the one before is done and `idle` s passed
        out = case / "daemon.out"  # (a file, not a pipe nobody reads while it runs)
        with open(out, "w") as log:
            daemon = subprocess.Popen([*wrap, sys.executable, str(REPO / "training_daemon.py"), "run",
                                       "--no-monitor", "--root", str(root)],
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            for i in range(files):
                spare[i] = retention.spare_bytes(root) > 0
                drop(i)
                while not (p.done / f"file{i}.jsonl.record.json").exists():
                    if daemon.poll() is not None:
                        raise SystemExit(f"the daemon exited {daemon.returncode}: "
                                         f"{out.read_text()[-2000:]}")
                    time.sleep(0.05)
                time.sleep(idle if i < files - 1 else 0)
        finally:
            daemon.terminate()
            daemon.wait(120)
    for i in range(files if idle is None else 0):
        drop(i)
        if from_disk:
            spare[i] = retention.spare_bytes(root) > 0
            run()
    if not from_disk and idle is None:
        run()
    import training_engine as te
    ckpt = te.list_checkpoints(root)[0][0]
    ckpt_inodes = {f.stat().st_ino for f in ckpt.iterdir()}
    # the checkpoint, and current_model's weights unless they are the checkpoint's (its other
    # files and the version after it are links to earlier ones: no bytes)
    written = sum(f.stat().st_size for f in ckpt.iterdir()) + sum(
        f.stat().st_size for f in p.current_model.glob("*.safetensors")
        if f.stat().st_ino not in ckpt_inodes)
    once = write_once(case, written, published_weights(root), before)
    rows = []
    for i in range(files):
        t = training_queue.read_record(p.done / f"file{i}.jsonl")["timings"]
        eng = t.get("engine_s") or {}
        secs = {"load": eng.get("load", 0), "checkpoint": eng.get("checkpoint", 0),
                "publish": eng.get("publish", 0),
                "snapshot": float(t.get("snapshot_s") or 0) + float(t.get("post_snapshot_s") or 0)}
        fixed = sum(secs.values())
        rows.append({"size": size, "base": dtype_name, "file": i, "daemon": True,
                     "model_source": t.get("model_from"), "seconds": secs,
                     "over_spare": spare.get(i),
                     "train_s": t.get("train_s"), "fixed_s": round(fixed, 3),
                     "bytes": {"written": written}, **limits(fixed, once)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also the ~1 GB model")
    ap.add_argument("--files", type=int, default=2, help="one-step files per case (default 2)")
    ap.add_argument("--work", help="folder to work in (default: a temp folder, removed)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ap.add_argument("--daemon", action="store_true",
                    help="the files through `training_daemon.py run --once` (the done records' timings)")
    ap.add_argument("--from-disk", action="store_true",
                    help="each file after an idle spell: it loads the model "
                         "(--daemon: one run --once per file)")
    ap.add_argument("--idle", type=float, metavar="S",
                    help="--daemon: one running daemon, each file dropped S seconds after the one "
                         "before is done (the queue empty meanwhile)")
    ap.add_argument("--cases", nargs="+", metavar="SIZE:DTYPE",
                    help="only these cases, e.g. 1GB:bfloat16 (default: every size and dtype)")
    ap.add_argument("--writeback", action="store_true",
                    help="the baselines' writes through the page cache start each 8 MB's write-out "
                         "as they go (sync_file_range), as the engine's do: the strictest limit")
    args = ap.parse_args(argv)
    global WRITEBACK
    WRITEBACK = args.writeback
    import training_engine as te
    te._quiet_transformers()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-filecost-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        large = args.large or any(c.startswith("1GB:") for c in args.cases or [])
        for size in ["100MB"] + (["1GB"] if large else []):
            for dtype_name in ("bfloat16", "float32"):
                if args.cases and f"{size}:{dtype_name}" not in args.cases:
                    continue
                if args.daemon:
                    rows += run_daemon_case(work, size, dtype_name, args.files,
                                            from_disk=args.from_disk, idle=args.idle)
                else:
                    rows += run_case(work, size, dtype_name, args.files, from_disk=args.from_disk)
                if not args.work:  # one case on disk at a time (the 1 GB ones take ~8 GB each)
                    shutil.rmtree(work / f"{size}-{dtype_name}", ignore_errors=True)
                    shutil.rmtree(work / f"daemon-{size}-{dtype_name}", ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    mb = 1e6
    print(f"{'case':16} {'file':>4} {'ckpt MB':>8} {'cur MB':>7} {'ver MB':>7} {'kernel MB':>9} "
          f"{'load':>6} {'ckpt':>6} {'publ':>6} {'snap':>6} {'fixed s':>7} {'write1 s':>8} {'ratio':>6} "
          f"{'kept s':>6} {'ratio':>6} {'file s':>6}")
    for r in rows:
        s, b = r["seconds"], r["bytes"]
        if r.get("daemon"):  # the done records' figures: no per-part byte counts
            parts = (f"{b['written'] / mb:8.1f} {'(daemon)':>7} {'':7} {'':9}", "")
        else:
            parts = (f"{b['checkpoint'] / mb:8.1f} {b['current_model'] / mb:7.1f} "
                     f"{b['version'] / mb:7.2f} {r['kernel_write_bytes'] / mb:9.1f}",
                     ", weights linked" if r["weights_linked"] else "")
        print(f"{r['size'] + ' ' + r['base']:16} {r['file']:>4} {parts[0]} {s.get('load', 0):6.2f} "
              f"{s.get('checkpoint', 0):6.2f} {s.get('publish', 0):6.2f} {s['snapshot']:6.3f} "
              f"{r['fixed_s']:7.2f} {r['write_once_s']:8.2f} {r['ratio']:6.2f} "
              f"{r['write_kept_s']:6.2f} {r['ratio_kept']:6.2f} {r['train_s'] or 0:6.2f}  write1 "
              f"{r['write_once_range'][0]:.2f}-{r['write_once_range'][1]:.2f}, kept "
              f"{r['write_kept_range'][0]:.2f}-{r['write_kept_range'][1]:.2f}, model from "
              f"{r['model_source']}{parts[1]}{', over the spare' if r.get('over_spare') else ''}")
    # one file's ratio swings with the disk: the median over files is the figure to quote, per
    # model source and whether a spare was written over (not for a root's first two files,
    # nor after an idle spell: their checkpoint takes new blocks and pages)
    groups = {(r["model_source"], r.get("over_spare")) for r in rows}
    for source, spare in sorted(groups, key=str):
        mine = [r for r in rows if (r["model_source"], r.get("over_spare")) == (source, spare)]
        where = {True: ", over the spare", False: ", no spare"}.get(spare, "")
        for key, what in (("ratio", "write1"), ("ratio_kept", "kept")):
            ratios = sorted(r[key] for r in mine)
            print(f"model from {source}{where}: median ratio {statistics.median(ratios):.2f} against "
                  f"{what} over {len(ratios)} files (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    print("goal: ratio <= 1.3 (fixed per-file time against one fsynced write of the same bytes;\n"
          "  write1: the published weights into a new file (O_DIRECT), as the file must; kept:\n"
          "  all of them over a kept file whose pages are cached, the fastest write this machine does;\n"
          f"  {'each 8 MB' if WRITEBACK else 'plain writes, then one fsync: without --writeback, no'}"
          " write-out started as they go, as the engine's checkpoint does)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
