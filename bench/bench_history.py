"""Routine commands on a root with years of history: time and peak RSS at 1x, 100x, 10,000x.

Grows a root synthetically in the formats the code writes (issue 18): at scale S,
S versions (hard-linked folders + version.json with its manifest, as `create_version`
writes them), 10*S done files (data + record), 1 + S/10 backups (backup.json + files,
hard-linked to save disk: no measured command reads their bytes) and 2,000*S metrics lines
over three years, as metrics_log leaves them: closed months `metrics/YYYY-MM.jsonl.gz`
(gzip level 1 for speed: the same format) with their summaries, and this month's lines in
metrics.jsonl with its open summary covering all but the last file. 10,000x is 10,000
versions, 100,000 done files, 1,001 backups and 20M metrics lines (~3 GB of raw
lines, of which ~80 s to grow on one core). Then runs each routine command as its own process, the
monitor's first load after a start and the daemon's start to first step, and prints wall
time and peak RSS side by side: the median of --repeat runs, the scales' runs alternating
(this VM's pace drifts by tens of percent within minutes; alternating, every scale sees
the same drift).

    .venv/bin/python bench/bench_history.py --scales 1 10 --repeat 1     # a quick check
    .venv/bin/python bench/bench_history.py --scales 1 100 10000 --dir /data/tmp
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import signal
import socket
import urllib.request
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import model_versioner as mv  # noqa: E402
from trainroot import Paths  # noqa: E402

COMMANDS = [
    ("state_tracker.py --json", ["state_tracker.py", "--json"]),
    ("state_tracker.py --check", ["state_tracker.py", "--check"]),
    ("training_controller.py status", ["training_controller.py", "status"]),
    ("training_queue.py status", ["training_queue.py", "status"]),
    ("training_queue.py list", ["training_queue.py", "list"]),
    ("model_versioner.py list", ["model_versioner.py", "list"]),
    ("model_versioner.py show latest", ["model_versioner.py", "show", "latest"]),
    ("model_versioner.py snapshot --force", ["model_versioner.py", "snapshot", "--force"]),
    # current_model put back as the oldest version, then as the latest (rollback is a
    # restore of the version before; the grown versions all hold the same weights)
    ("model_versioner.py restore v001", ["model_versioner.py", "restore", "v001"]),
    ("model_versioner.py restore latest", ["model_versioner.py", "restore", "latest"]),
    ("model_versioner.py prune (dry run)", ["model_versioner.py", "prune"]),
    ("backup_manager.py list", ["backup_manager.py", "list"]),
    # a new file checked against every trained one (the median: the index built once before)
    ("training_queue.py add", ["training_queue.py", "add", "{new}"]),
]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def grow(root: Path, scale: int) -> None:
    """A root as `init` makes it, then years of synthetic history in the real formats.
    Run in a child process (`--grow`): init imports torch, and a parent that big would
    hand its peak RSS to every command it forks."""
    import training_daemon
    training_daemon.init_root(root, base="tiny")
    p = Paths(root)
    v1 = mv.read_version(root, "v001")
    rels = list(v1["manifest"]) + [".manifest.json"]
    span = timedelta(days=365 * 3)
    n_versions = scale
    for n in range(2, n_versions + 1):  # the same files (hard links), a record per version
        vid = f"v{n:03d}"
        folder = p.versions / vid
        folder.mkdir()
        for rel in rels:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(p.versions / "v001" / rel, folder / rel)
        at = T0 + span * n / max(n_versions, 1)
        rec = dict(v1, id=vid, parent=f"v{n - 1:03d}", reason=f"post-train:f{n}.jsonl",
                   created_at=at.isoformat().replace("+00:00", "Z"),
                   data_files=[{"name": f"f{n}.jsonl", "sha256": f"{n:064x}"}])
        (folder / "version.json").write_text(json.dumps(rec, indent=2) + "\n")
    grow_metrics(root, scale)
    if hasattr(mv, "LAST_ID"):  # the index create_version keeps (absent before issue 18)
        (p.versions / mv.LAST_ID).write_text(json.dumps({"schema_version": 1,
                                                         "last": f"v{n_versions:03d}"}))
    p.done.mkdir(exist_ok=True)
    for n in range(10 * scale):
        name = f"f{n:06d}.jsonl"
        data = f'{{"text": "file {n}"}}\n'.encode()
        (p.done / name).write_bytes(data)
        rec = {"schema_version": 1, "name": name, "original_name": name, "priority": "normal",
               "force": False, "seq": n + 1, "arrived_at": "2026-01-01T00:00:00Z",
               "source": "inbox", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
               "records": 1, "format": "text", "outcome": "done",
               "version_before": "v001", "version_after": "v001",
               "finished_at": "2026-01-01T00:00:00Z", "history": []}
        (p.done / f"{name}.record.json").write_text(json.dumps(rec))
    bdir = p.default_backups
    bdir.mkdir(exist_ok=True)
    src = p.versions / "v001"
    for n in range(1 + scale // 10):
        bid = f"b{(T0 + timedelta(hours=n)).strftime('%Y%m%dT%H%M%S')}-{n % 65536:04x}"
        folder = bdir / bid
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("version.json"),
                        copy_function=os.link)
        at = (T0 + span * n / max(1 + scale // 10, 1)).isoformat().replace("+00:00", "Z")
        rec = {"schema_version": 1, "id": bid, "seq": n + 1, "created_at": at,
               "source": "v001", "version": "v001", "global_step": 0, "tokens_seen": 0,
               "note": None, "files": v1["manifest"], "total_bytes": 0, "verified_at": at,
               "status": "verified"}
        (folder / "backup.json").write_text(json.dumps(rec))
    # what the daemon keeps beside the data after each file: the done and versions indexes
    # (as `add`, snapshots and the idle daemon leave them: synced once done/ and versions/
    # are older than the timestamp tick that makes a signature believable) and a disk-usage
    # sample (the state tracker reports the last one)
    import done_index
    import retention
    import training_config
    import versions_index
    time.sleep(versions_index.RACY_S)
    len(done_index.DoneIndex(root))
    versions_index.VersionsIndex(root).ids()
    retention.record_usage(root, training_config.load_config(root))


LINES_PER_SCALE = 2000
MONTHS = 36


def _month(back: int) -> str:
    """The UTC month `back` months before this one, as YYYY-MM."""
    now = datetime.now(timezone.utc)
    y, m = divmod(now.year * 12 + now.month - 1 - back, 12)
    return f"{y:04d}-{m + 1:02d}"


def grow_metrics(root: Path, scale: int) -> None:
    """2,000*S engine-shaped lines (200 per done file), 36 months: 35 closed segments with
    summaries, then this month's lines in metrics.jsonl. Buckets are computed from the
    synthetic pattern (each file's loss is constant), as metrics_log writes them."""
    import metrics_log
    p = Paths(root)
    folder = metrics_log.folder(root)
    folder.mkdir(exist_ok=True)
    total, per_file = LINES_PER_SCALE * scale, 200
    n_files = max(1, total // per_file)
    line = ('{"time": "%sT12:00:00.000000Z", "global_step": %d, "file": "f%06d.jsonl", '
            '"file_id": "f%06d.jsonl-%08x", "loss": %.1f, "lr": 0.0003, "tokens_per_sec": 1000.0, '
            '"grad_norm": 1.0, "tokens_seen": %d, "step_in_file": %d}\n')
    step = 0
    for back in range(MONTHS - 1, -1, -1):
        month = _month(back)
        files = range(n_files * (MONTHS - 1 - back) // MONTHS, n_files * (MONTHS - back) // MONTHS)
        chunks, buckets, size = [], [], 0
        for f in files:
            loss = 2.0 + (f % 10) / 10
            start = step
            body = "".join(line % (f"{month}-15", step + i + 1, f, f, f, loss, (step + i + 1) * 64,
                                   i + 1) for i in range(per_file)).encode()
            step += per_file
            size += len(body)
            chunks.append(body)
            for b in range(start, step, metrics_log.BUCKET_LINES):
                last = min(step, b + metrics_log.BUCKET_LINES)
                buckets.append({"global_step": last, "first_step": b + 1, "file": f"f{f:06d}.jsonl",
                                "n": last - b, "first_time": f"{month}-15T12:00:00.000000Z",
                                "time": f"{month}-15T12:00:00.000000Z", "end_offset": size,
                                "loss": loss, "loss_min": loss, "loss_max": loss, "lr": 0.0003,
                                "tokens_per_sec": 1000.0, "summary": True})
        if back == 0:  # this month: the open segment, summarised up to its last file
            with open(p.metrics, "wb") as out:
                for c in chunks:
                    out.write(c)
            covered = size - (len(chunks[-1]) if chunks else 0)
            keep = [b for b in buckets if b["end_offset"] <= covered]
            head = {"open_summary": 1, "raw_ino": os.stat(p.metrics).st_ino, "covered": covered}
            (folder / metrics_log.OPEN).write_text(
                "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in [head] + keep))
            continue
        h, lines = hashlib.sha256(), 0
        with open(folder / f"{month}.jsonl.gz", "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as z:
                for c in chunks:
                    h.update(c)
                    z.write(c)
                    lines += c.count(b"\n")
        tail = b"".join(chunks)[-metrics_log.TAIL_BYTES:] if chunks else b""
        (folder / f"{month}.tail.jsonl").write_bytes(tail[tail.find(b"\n") + 1:])
        head = {"segment": f"{month}.jsonl.gz", "seq": MONTHS - back, "month": month,
                "source": "metrics.jsonl", "source_bytes": size, "source_sha256": h.hexdigest(),
                "head_sha256": hashlib.sha256((chunks[0] if chunks else b"")[:metrics_log.TAIL_BYTES]).hexdigest(),
                "lines": lines, "closed_at": f"{month}-28T00:00:00.000000Z",
                "bucket_lines": max(metrics_log.BUCKET_LINES, -(-lines // metrics_log.SEGMENT_BUCKETS)),
                "tail": f"{month}.tail.jsonl"}
        buckets = metrics_log.coarsen(buckets, lines)
        (folder / f"{month}.summary.jsonl").write_text(
            "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in [head] + buckets))


def measure(root: Path, argv: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one run of a script as its own process."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / argv[0]), "--root", str(root), *argv[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, proc.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def monitor_first_load(root: Path) -> tuple[float, float, int]:
    """A monitor started on the root: seconds from its start to the answer of the page's
    first /api/metrics request (whole history, <= 2000 points), its peak RSS, exit code."""
    port = _free_port()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "monitor_server.py"), "serve", "--port",
                             str(port), "--root", str(root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    took, code = None, 0
    try:
        while took is None and time.perf_counter() - t < 600:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/metrics?max_points=2000",
                                            timeout=600) as r:
                    json.loads(r.read())
                took = time.perf_counter() - t
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGINT)
        _, status, usage = os.wait4(proc.pid, 0)
    if took is None:
        took, code = float("nan"), 1
    return took, usage.ru_maxrss / 1024, code


INBOX_FILES = 6  # the daemon's run: its per-file overhead is the median over these and the queued


def daemon_first_step(root: Path) -> tuple[float, float, int]:
    """`training_daemon.py run --once` with INBOX_FILES small files in the inbox (after the
    files the `add` runs queued): seconds from its start to the first training step's metrics line
    (whichever file it is), its peak RSS over the whole run, exit code."""
    import training_config
    cfg = training_config.load_config(root)
    cfg.update(settle_seconds=0.2, rescan_seconds=0.5, max_length=32, batch_size=2,
               monitor_port=0, backup_every_files=0, backup_every_hours=0,
               loss_spike_factor=0.0, eval_max_tokens=0)
    training_config.write_config(root, cfg)
    training_config.approve(root, cfg, by="bench")
    for k in range(INBOX_FILES):  # through the intake, as users drop them
        (root / "inbox" / f"bench-{k}.jsonl").write_text(
            "".join(json.dumps({"text": f"file {k} step {i} the quick brown fox"}) + "\n" for i in range(4)))
    p = Paths(root)
    size0 = p.metrics.stat().st_size if p.metrics.exists() else 0
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run", "--once",
                             "--no-monitor", "--root", str(root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    first = None
    while first is None and proc.poll() is None:
        try:
            with open(p.metrics, "rb") as f:
                f.seek(size0)
                if b'"tokens_per_sec"' in f.read():  # a step's line (not an eval's)
                    first = time.perf_counter() - t
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return (first if first is not None else float("nan")), usage.ru_maxrss / 1024, code


def per_file_overhead(root: Path) -> tuple[float, float]:
    """From the done records of the files that run trained (the `add` runs' and the bench's
    own, in the order trained): each file's wall time from its start to the next file's,
    less its train_s (the engine's own time: load, steps, checkpoint, publish). That is
    what the daemon adds per file: snapshots, records, indexes, retention, disk samples.
    Returns (the first file's, the median of the others'); the last file has no next."""
    import training_queue
    p = Paths(root)
    recs = sorted((r for r in (training_queue.read_record(f) for f in p.done.glob("*.jsonl"))
                   if r.get("started_at") and (r.get("name") or "").startswith(("new-", "bench-"))),
                  key=lambda r: r["started_at"])
    t = [datetime.fromisoformat(r["started_at"].replace("Z", "+00:00")).timestamp() for r in recs]
    over = [t[i + 1] - t[i] - float(recs[i]["timings"].get("train_s") or 0)
            for i in range(len(recs) - 1)]
    if not over:
        return float("nan"), float("nan")
    rest = sorted(over[1:]) or [float("nan")]
    return over[0], rest[len(rest) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--dir", default=None, help="where to grow the roots (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per command (the median counts)")
    ap.add_argument("--grow", nargs=2, metavar=("ROOT", "SCALE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.grow:
        grow(Path(args.grow[0]), int(args.grow[1]))
        return 0
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        roots = {scale: Path(tmp) / f"x{scale}" for scale in args.scales}
        for scale, root in roots.items():  # every root first: the runs below alternate them
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--grow", str(root), str(scale)], check=True)
            print(f"grew {scale}x in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        os.sync()  # the growth's gigabytes written back first: not beside the commands timed
        made = [0]

        def fresh_file(scale) -> Path:  # `add` of a file already queued is refused: one per run
            made[0] += 1
            new = Path(tmp) / f"new-{scale}-{made[0]}.jsonl"
            new.write_text(json.dumps({"text": f"a file never trained, {scale}x run {made[0]}"}) + "\n")
            return new

        def alternating(name, run) -> None:
            """`repeat` runs per scale, the scales taking turns (the machine's pace drifts
            by tens of percent within minutes: each scale sees the same drift); the median."""
            runs: dict = {scale: [] for scale in roots}
            for _ in range(args.repeat):
                for scale, root in roots.items():
                    runs[scale].append(run(scale, root))
            for scale, got in runs.items():
                results.setdefault(name, {})[scale] = sorted(got)[len(got) // 2]

        for name, cmd in COMMANDS:
            alternating(name, lambda scale, root, cmd=cmd: measure(root, [
                c.format(new=fresh_file(scale)) if "{new}" in c else c for c in cmd]))
        alternating("monitor: start to first /api/metrics", lambda scale, root: monitor_first_load(root))
        for scale, root in roots.items():  # last: it trains (and applies retention to the history)
            results.setdefault("daemon: start to first step", {})[scale] = daemon_first_step(root)
            first, rest = per_file_overhead(root)
            results.setdefault("daemon: per-file overhead, first file (s; with the engine import it waits for)", {})[scale] = (first, 0, 0)
            results.setdefault("daemon: per-file overhead, later files (s)", {})[scale] = (rest, 0, 0)
    head = "| command | " + " | ".join(f"{s}x s / MB" for s in args.scales) + " |"
    print(head)
    print("|---|" + "---|" * len(args.scales))
    for name, by_scale in results.items():
        cells = [f"{by_scale[s][0]:.3f}" + ("" if "overhead" in name else f" / {by_scale[s][1]:.0f}")
                 + (f" (exit {by_scale[s][2]})" if by_scale[s][2] else "") for s in args.scales]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
