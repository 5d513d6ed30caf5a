"""Routine commands on a root with years of history: time and peak RSS at 1x, 100x, 10,000x.

Grows a root synthetically in the formats the code writes (issue 18): at scale S,
S versions (hard-linked folders + version.json with its manifest, as `create_version`
writes them; the first ones through `create_version` itself), 10*S done files (data +
record), 1 + S/10 backups (backup.json + read-only copies) and 200*S metrics lines; 10,000x is
10,000 versions, 100,000 done files, 1,001 backups and 2M metrics lines. Then runs each
routine command as its own process and prints wall time and peak RSS side by side.

    .venv/bin/python bench/bench_history.py                 # 1x and 100x
    .venv/bin/python bench/bench_history.py --scales 1 100 10000 --dir /data/tmp
"""

from __future__ import annotations

import argparse
import hashlib
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
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("version.json"))
        at = (T0 + span * n / max(1 + scale // 10, 1)).isoformat().replace("+00:00", "Z")
        rec = {"schema_version": 1, "id": bid, "seq": n + 1, "created_at": at,
               "source": "v001", "version": "v001", "global_step": 0, "tokens_seen": 0,
               "note": None, "files": v1["manifest"], "total_bytes": 0, "verified_at": at,
               "status": "verified"}
        (folder / "backup.json").write_text(json.dumps(rec))
    with open(p.metrics, "w") as f:
        for n in range(200 * scale):
            f.write(json.dumps({"time": "2026-01-01T00:00:00Z", "global_step": n + 1,
                                "file": "f.jsonl", "loss": 2.0, "lr": 3e-4,
                                "tokens_per_sec": 1000.0}) + "\n")


def measure(root: Path, argv: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one run of a script as its own process."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / argv[0]), "--root", str(root), *argv[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, proc.returncode


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
        for scale in args.scales:
            root = Path(tmp) / f"x{scale}"
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--grow", str(root), str(scale)], check=True)
            print(f"grew {scale}x in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            new = Path(tmp) / "new.jsonl"
            new.write_text('{"text": "a file never trained"}\n')
            for name, cmd in COMMANDS:
                cmd = [c.format(new=new) for c in cmd]
                runs = sorted(measure(root, cmd) for _ in range(args.repeat))
                results.setdefault(name, {})[scale] = runs[len(runs) // 2]
            shutil.rmtree(root, ignore_errors=True)
    head = "| command | " + " | ".join(f"{s}x s / MB" for s in args.scales) + " |"
    print(head)
    print("|---|" + "---|" * len(args.scales))
    for name, by_scale in results.items():
        cells = [f"{by_scale[s][0]:.3f} / {by_scale[s][1]:.0f}" + (
            f" (exit {by_scale[s][2]})" if by_scale[s][2] else "") for s in args.scales]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
