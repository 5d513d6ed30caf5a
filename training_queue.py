"""The priority queue of validated data files, and the moves of the file lifecycle.

Every data file lives in exactly one place: inbox/ -> queue/high|normal|low/ ->
processing/ -> done/ (or failed/, skipped/). Each carries a sidecar
`NAME.jsonl.record.json` (sha256, records, priority, arrival sequence, history, and at the
end the training result). The daemon and these commands share the functions below.

    python3 training_queue.py list
    python3 training_queue.py add notes.jsonl --priority high
    python3 training_queue.py set-priority notes.jsonl low --json

A file is never deleted or overwritten: `remove` moves it to skipped/; clashes get
unique names. Standard library only (no torch): every command answers in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trainroot
from trainroot import (GuardrailError, Paths, UsageError, add_common_args, atomic_write_json,
                       print_json, read_json, rename_noreplace, resolve_root, run_cli,
                       sha256_file, utc_now)

SCHEMA_VERSION = 1
PRIORITIES = ("high", "normal", "low")
RECORD_SUFFIX = ".record.json"
INCOMING = ".incoming"          # queue/.incoming/: claimed from the inbox, not yet validated
IGNORED_PATTERNS = (".*", "*.tmp", "*.part", "*.partial", "*~", "*.swp", "4913")
LIST_CMD = "python3 training_queue.py list"


# --------------------------------------------------------------------------- names and records

def is_ignored(name: str) -> bool:
    """Hidden and temporary names (editors, downloads, copies in progress) are never taken."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in IGNORED_PATTERNS) \
        or name.endswith(RECORD_SUFFIX)


def record_path(data_path) -> Path:
    data_path = Path(data_path)
    return data_path.with_name(data_path.name + RECORD_SUFFIX)


def read_record(data_path) -> dict:
    """The sidecar record of a data file ({} if it has none or it is unreadable)."""
    try:
        rec = read_json(record_path(data_path), default={})
    except GuardrailError:
        return {}
    return rec if isinstance(rec, dict) else {}


def queue_dir(root, priority: str) -> Path:
    if priority not in PRIORITIES:
        raise UsageError(f"unknown priority {priority!r}", None,
                         f"Use one of: {', '.join(PRIORITIES)}.")
    return Paths(root).queue / priority


def new_seq() -> int:
    """Arrival order: nanoseconds since the epoch (unique enough across processes)."""
    return time.time_ns()


def _free_destination(directory: Path, name: str) -> Path:
    """A name free for both the data file and its record (an orphan record blocks it too)."""
    stem, dot, ext = name.partition(".")
    n, candidate = 2, directory / name
    while os.path.lexists(candidate) or os.path.lexists(record_path(candidate)):
        candidate = directory / f"{stem}-{n}{dot}{ext}"
        n += 1
    return candidate


class SyncBatch:
    """Durability for a burst of moves, paid once: records are written without their own
    fsync (~5 ms each on a busy disk) and the folders touched are fsynced at `flush`.

    Renames stay atomic meanwhile. A power cut can undo recent moves (the file is found
    again where it was) or leave a record that never reached the disk; `recover` sends a
    queued file without a readable record back through intake and gives a failed/skipped
    one a stub record. No data file can be lost either way.
    """

    def __init__(self):
        self.dirs: set[str] = set()

    def flush(self) -> None:
        trainroot.fsync_paths((), sorted(self.dirs))
        self.dirs.clear()


def move_with_record(src, directory, record: dict, event: str | None = None,
                     name: str | None = None, batch: SyncBatch | None = None) -> Path:
    """Move a data file into `directory` under a free name, with its record beside it.

    Order: write the new record, rename the data (never replacing), drop the old record.
    A crash between steps leaves at most an orphan record, which `recover` removes; the
    data file itself is always whole and in exactly one place.
    """
    src, directory = Path(src), Path(directory)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
    record = dict(record)
    if event:
        record.setdefault("history", []).append({"at": utc_now(), "to": directory.name, "why": event})
    while True:
        dst = _free_destination(directory, name or src.name)
        record["name"] = dst.name
        atomic_write_json(record_path(dst), record, sync=batch is None)
        try:
            rename_noreplace(src, dst, sync=batch is None)
            break
        except FileExistsError:
            continue  # raced with another writer for that name
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record_path(dst))
            raise
    old = record_path(src)
    if old != record_path(dst):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    if batch is not None:
        batch.dirs.update((str(dst.parent), str(src.parent)))
    return dst


def update_record(data_path, **fields) -> dict:
    rec = read_record(data_path)
    rec.update(fields)
    atomic_write_json(record_path(data_path), rec)
    return rec


def _record_ok(data_path: Path) -> bool:
    try:
        return os.path.getsize(record_path(data_path)) > 0 and bool(read_record(data_path))
    except OSError:
        return False


def recover(root) -> list[str]:
    """Start-up repair of the lifecycle folders (call holding the daemon lock); says what it did.

    Orphan records (their data file moved on before a crash) are removed. A queued file
    without a readable record goes back to `queue/.incoming/` for intake; a failed or
    skipped one gets a stub record saying its record was lost.
    """
    p = Paths(root)
    actions = []
    folders = [p.processing, p.done, p.failed, p.skipped] + \
        [p.queue / INCOMING / pr for pr in PRIORITIES] + [p.queue / pr for pr in PRIORITIES]
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        present = set(names)
        for n in names:
            if n.endswith(RECORD_SUFFIX):
                if n[:-len(RECORD_SUFFIX)] not in present:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(folder / n)
                    actions.append(f"removed orphan record {folder / n}")
                continue
            if is_ignored(n) or folder.parent.name == INCOMING or _record_ok(folder / n):
                continue
            if folder.parent == p.queue:
                dst = trainroot.move_unique(folder / n, p.queue / INCOMING / folder.name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record_path(folder / n))
                actions.append(f"{folder / n}: record unreadable, back to intake as {dst.name}")
            elif folder in (p.failed, p.skipped):
                atomic_write_json(record_path(folder / n), {
                    "schema_version": SCHEMA_VERSION, "name": n, "outcome": folder.name,
                    "reason": "record lost (a crash before it reached the disk); check the file "
                              f"with `python3 validate_data.py {folder / n}`"})
                actions.append(f"{folder / n}: wrote a stub record")
    return actions


# --------------------------------------------------------------------------- validation

def validate(path, cfg: dict | None = None) -> dict:
    """`validate_data.validate_file` summarised: {ok, records, format, errors, report}."""
    import validate_data
    cfg = cfg or {}
    try:
        report = validate_data.validate_file(path, max_length=cfg.get("max_length"),
                                             allow_mixed=bool(cfg.get("allow_mixed_formats")),
                                             max_record_bytes=cfg.get("max_record_bytes"))
    except GuardrailError as exc:  # unreadable (permissions, a FIFO, ...): invalid, with why
        report = {"ok": False, "records": None, "format": None, "error_count": 1,
                  "errors": [{"line": None, "code": "unreadable", "message": exc.what}],
                  "verdict": f"invalid: {exc.what}"}
    return {"ok": bool(report.get("ok")), "records": report.get("records"),
            "format": report.get("format"), "est_tokens": report.get("est_tokens"),
            "errors": report.get("error_count", len(report.get("errors") or [])),
            "warnings": report.get("warning_count", 0), "verdict": report.get("verdict"),
            "report": report}


def _summary(result: dict) -> dict:
    return {k: result.get(k) for k in ("ok", "records", "format", "est_tokens", "errors",
                                       "warnings", "verdict")}


# --------------------------------------------------------------------------- the done index

def done_index(root) -> dict[str, dict]:
    """sha256 -> record of the file in done/ that trained that content (newest wins)."""
    done = Paths(root).done
    index: dict[str, dict] = {}
    try:
        names = sorted(os.listdir(done))
    except FileNotFoundError:
        return index
    present = set(names)
    for n in names:
        if n.endswith(RECORD_SUFFIX) and n[:-len(RECORD_SUFFIX)] in present:
            rec = read_record(done / n[:-len(RECORD_SUFFIX)])
            if rec.get("sha256"):
                index[rec["sha256"]] = rec
    return index


# --------------------------------------------------------------------------- enqueue

def enqueue(root, path, *, priority: str = "normal", force: bool = False, move: bool = False,
            cfg: dict | None = None, source: str = "training_queue.py add",
            done: dict | None = None, extra: dict | None = None, name: str | None = None,
            not_regular: str | None = None, batch: SyncBatch | None = None) -> dict:
    """Validate `path`, then queue it (copy, or move with `move=True`).

    Invalid -> failed/ (only when moving; a copy source is left alone and the error
    raised), already trained content -> skipped/ unless `force`. Returns the record with
    `outcome` queued|failed|skipped and `path`.
    """
    p = Paths(root)
    src = Path(path)
    name = name or src.name
    if not_regular is None and not src.is_file():
        raise GuardrailError("data file not found", src, "Check the path and try again.")
    if priority not in PRIORITIES:
        queue_dir(root, priority)  # raises the usage error naming the choices
    if cfg is None:
        import training_config
        cfg = training_config.load_config(p.root)
    t0 = time.monotonic()
    record = {"schema_version": SCHEMA_VERSION, "original_name": name, "priority": priority,
              "force": bool(force), "seq": new_seq(), "arrived_at": utc_now(), "source": source,
              "size": src.lstat().st_size, "attempts": 0}
    record.update(extra or {})
    if not move:  # copy first, so the bytes validated and hashed are the bytes queued
        incoming = p.queue / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=incoming, prefix=".add-", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        except BaseException:
            os.unlink(tmp)
            raise
        work = Path(tmp)
    else:
        work = src
    try:
        problem = not_regular or (None if name.endswith(".jsonl") else "not a .jsonl file")
        record["sha256"] = None if not_regular else sha256_file(work)
        if problem:
            result = {"ok": False, "records": None, "format": None, "errors": 1,
                      "report": {"errors": [f"{problem}: {name}"]}}
        else:
            result = validate(work, cfg)
        record["records"] = result["records"]
        record["format"] = result["format"]
        record["validation"] = _summary(result)
        record["timings"] = {"validate_s": round(time.monotonic() - t0, 4)}
        if not result["ok"]:
            reason = problem or result.get('verdict') or f"invalid: {result['errors']} error(s)"
            if not move:
                raise GuardrailError(f"{reason}; not queued", src,
                                     f"See `python3 validate_data.py {src}`, fix the file, add it again.")
            record.update(reason=reason, report=result["report"], outcome="failed")
            dst = move_with_record(work, p.failed, record, reason, name=name, batch=batch)
            return dict(record, name=dst.name, path=str(dst))
        if done is None:
            done = done_index(p.root)
        prior = done.get(record["sha256"])
        if prior and not force:
            reason = (f"already trained: same content as done/{prior.get('name')} "
                      f"(into version {prior.get('version_after')})")
            record.update(reason=reason, duplicate_of=prior.get("name"),
                          trained_into=prior.get("version_after"), outcome="skipped")
            if not move:
                raise GuardrailError(reason, src, f"Add it with --force to train it again.")
            dst = move_with_record(work, p.skipped, record, reason, name=name, batch=batch)
            return dict(record, name=dst.name, path=str(dst))
        record["outcome"] = "queued"
        dst = move_with_record(work, p.queue / priority, record, "queued", name=name,
                               batch=batch)
        return dict(record, name=dst.name, path=str(dst))
    finally:
        if not move:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(work)  # the temp copy, if it was not queued


# --------------------------------------------------------------------------- reading the queue

def list_queue(root) -> list[dict]:
    """Queued files in training order: high before normal before low, then arrival."""
    items = []
    for rank, pr in enumerate(PRIORITIES):
        d = queue_dir(root, pr)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        present = set(names)
        for n in names:
            if is_ignored(n) or n + RECORD_SUFFIX not in present:
                continue  # a record is written before its data arrives: no record, not queued yet
            rec = read_record(d / n)
            items.append(dict(rec, name=n, priority=pr, path=str(d / n), _rank=rank))
    items.sort(key=lambda r: (r["_rank"], r.get("seq") or 0, r["name"]))
    for r in items:
        del r["_rank"]
    return items


def find_queued(root, name: str) -> dict:
    for item in list_queue(root):
        if item["name"] == name:
            return item
    raise GuardrailError(f"{name} is not in the queue", Paths(root).queue, f"See `{LIST_CMD}`.")


def counts(root) -> dict:
    p = Paths(root)

    def n_data(d: Path) -> int:
        try:
            return sum(1 for n in os.listdir(d) if not is_ignored(n))
        except FileNotFoundError:
            return 0
    out = {pr: n_data(p.queue / pr) for pr in PRIORITIES}
    out["queued"] = sum(out[pr] for pr in PRIORITIES)
    out["inbox"] = sum(n_data(d) for d in (p.inbox_high, p.inbox, p.inbox_low)) - \
        sum(1 for d in (p.inbox_high, p.inbox_low) if d.is_dir())
    for name in ("processing", "done", "failed", "skipped"):
        out[name] = n_data(getattr(p, name))
    return out


def set_priority(root, name: str, priority: str) -> dict:
    item = find_queued(root, name)
    if item["priority"] == priority:
        return dict(item, changed=False)
    rec = read_record(item["path"])
    rec["priority"] = priority
    try:
        dst = move_with_record(item["path"], queue_dir(root, priority), rec,
                               f"priority {item['priority']} -> {priority}")
    except FileNotFoundError:
        raise GuardrailError(f"{name} left the queue (the daemon took it)", item["path"],
                             "See `python3 training_controller.py status`.") from None
    return dict(rec, name=dst.name, path=str(dst), changed=True)


def remove(root, name: str, reason: str | None = None) -> dict:
    item = find_queued(root, name)
    rec = read_record(item["path"])
    why = "removed from the queue" + (f": {reason}" if reason else "")
    rec.update(reason=why, outcome="skipped")
    try:
        dst = move_with_record(item["path"], Paths(root).skipped, rec, why)
    except FileNotFoundError:
        raise GuardrailError(f"{name} left the queue (the daemon took it)", item["path"],
                             "See `python3 training_controller.py status`.") from None
    return dict(rec, name=dst.name, path=str(dst))


# --------------------------------------------------------------------------- CLI

def _public(rec: dict) -> dict:
    keep = ("name", "priority", "sha256", "records", "format", "size", "seq", "arrived_at",
            "force", "source", "outcome", "reason", "path", "changed")
    return {k: rec[k] for k in keep if k in rec}


def cmd_list(args) -> int:
    """List queued files in the order they will train."""
    items = [_public(r) for r in list_queue(resolve_root(args.root))]
    if args.json:
        print_json({"ok": True, "queue": items})
        return 0
    if not items:
        print("The queue is empty.")
    for i, r in enumerate(items, 1):
        print(f"{i:4d}  {r['priority']:<6}  {r['name']}  ({r.get('records')} records, "
              f"sha256 {str(r.get('sha256'))[:12]})")
    return 0


def cmd_status(args) -> int:
    """Count files in the inbox, the queue by priority, processing, done, failed, skipped."""
    root = resolve_root(args.root)
    c = counts(root)
    processing = [n for n in sorted(os.listdir(Paths(root).processing))
                  if not is_ignored(n)] if Paths(root).processing.is_dir() else []
    if args.json:
        print_json({"ok": True, "counts": c, "processing": processing})
        return 0
    print(f"inbox {c['inbox']}  queued {c['queued']} (high {c['high']}, normal {c['normal']}, "
          f"low {c['low']})  processing {c['processing']}  done {c['done']}  "
          f"failed {c['failed']}  skipped {c['skipped']}")
    for n in processing:
        print(f"training: {n}")
    return 0


def cmd_add(args) -> int:
    """Validate a data file, then queue a copy of it (or move it with --move)."""
    root = resolve_root(args.root)
    rec = enqueue(root, args.file, priority=args.priority, force=args.force, move=args.move)
    if args.json:
        print_json({"ok": rec["outcome"] == "queued", **_public(rec)})
    elif rec["outcome"] == "queued":
        print(f"Queued {rec['name']} ({args.priority}, {rec['records']} records).")
    else:
        print(f"Error: {rec['reason']}, moved to {rec['path']}.", file=sys.stderr)
    return 0 if rec["outcome"] == "queued" else 1


def cmd_set_priority(args) -> int:
    """Move a queued file to another priority (it keeps its arrival order)."""
    rec = set_priority(resolve_root(args.root), args.name, args.priority)
    if args.json:
        print_json({"ok": True, **_public(rec)})
    else:
        print(f"{rec['name']}: priority {args.priority}" + ("" if rec["changed"] else " (unchanged)"))
    return 0


def cmd_remove(args) -> int:
    """Take a file out of the queue: it moves to skipped/ with a record, never deleted."""
    rec = remove(resolve_root(args.root), args.name, args.reason)
    if args.json:
        print_json({"ok": True, **_public(rec)})
    else:
        print(f"Moved {args.name} to {rec['path']}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_queue.py", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    sub = parser.add_subparsers(dest="command")
    for name, func in (("list", cmd_list), ("status", cmd_status), ("add", cmd_add),
                       ("set-priority", cmd_set_priority), ("remove", cmd_remove)):
        sp = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        add_common_args(sp)
        sp.set_defaults(func=func)
        if name == "add":
            sp.add_argument("file")
            sp.add_argument("--priority", choices=PRIORITIES, default="normal")
            sp.add_argument("--force", action="store_true",
                            help="train it even if the same content was trained before")
            sp.add_argument("--move", action="store_true", help="move the file instead of copying it")
        elif name == "set-priority":
            sp.add_argument("name")
            sp.add_argument("priority", choices=PRIORITIES)
        elif name == "remove":
            sp.add_argument("name")
            sp.add_argument("--reason", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
