"""Where backups are and what each one is (standard library only): the backup records as
every script reads them, in the one order they have.

backup_manager.py writes backups; model_versioner.py (to name the newest backup when no
version is left) and state_tracker.py (the report) only read them, through this module,
so neither imports the other and a backup is listed, ordered and typed one way.

    import backup_records
    newest = backup_records.latest_backup(root)      # newest verified, or None
    for rec in backup_records.list_backups(root):    # oldest first, by seq
        print(rec["id"], rec["status"])
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import training_config
from trainroot import GuardrailError, Paths, age_seconds, atomic_write_text, read_json, resolve_root

RECORD = "backup.json"
SUMMARY = ".index/backups.json"  # in ROOT: each backup's record but its file list (a cache)
ID_RE = re.compile(r"b\d{8}T\d{6}-[0-9a-f]{4}")


def _p(root) -> Paths:
    return Paths(resolve_root(root))


_warned_config: set = set()  # a broken config is reported once per process, not per lookup


def config(root) -> dict:
    """The root's config; the defaults when there is no config.json yet.

    A corrupt or invalid config.json must not lock anyone out of their backups (restoring
    one may be how they recover): its `backup_dir` and retention are used when they
    can be read, the defaults otherwise, with a warning on stderr.
    """
    p = _p(root)
    if not p.config.exists():
        return training_config.default_config()
    try:
        return training_config.load_config(p.root)
    except GuardrailError as exc:
        try:
            raw = read_json(p.config, default=None)
        except GuardrailError:
            raw = None
        raw = raw if isinstance(raw, dict) else {}
        cfg = training_config.default_config()
        if isinstance(raw.get("backup_dir"), str) and raw["backup_dir"]:
            cfg["backup_dir"] = raw["backup_dir"]
        for key in ("keep_backups", "keep_versions"):  # retention.policy reads them
            if isinstance(raw.get(key), int) and raw[key] >= 1:
                cfg[key] = raw[key]
        import retention
        if isinstance(raw.get("retention"), dict) and not retention.validate_policy(raw["retention"]):
            cfg["retention"] = raw["retention"]
        if (p.config, exc.what) not in _warned_config:
            _warned_config.add((p.config, exc.what))
            print(f"warning: config.json is not usable ({exc.what}); using backup_dir "
                  f"{training_config.backup_dir(p.root, cfg)}. Fix it: `python3 state_tracker.py "
                  "--check` names each problem.", file=sys.stderr)
        return cfg


def backups_dir(root, cfg: dict | None = None) -> Path:
    """config `backup_dir`; refused inside a folder the product manages (a backup written
    into current_model/ or inbox/ would be taken for the model or for data) or at or above
    the root (prune would look at the root's own folders as backups)."""
    p = _p(root)
    bdir = training_config.backup_dir(p.root, cfg if cfg is not None else config(root))
    managed = p.managed_inside(bdir)
    if managed is not None:
        raise GuardrailError(
            f"backup_dir {bdir} is " + ("the training root or above it" if managed == p.root.resolve()
                                        else f"inside {managed}, which only the product writes"),
            p.config, "Set `backup_dir` in config.json to a folder of its own, best on another "
            "disk (e.g. /mnt/backup/training), or remove it for ROOT/backups.")
    return bdir


def read_record(folder: Path) -> dict | None:
    try:
        doc = read_json(folder / RECORD, default=None)
    except GuardrailError:
        return None
    return doc if isinstance(doc, dict) else None


def _typed(rec: dict | None, entry: str, bdir: Path, age) -> dict:
    """A record as every listing gives it: a hand-edited backup.json must not break every
    listing (sort, table, policy); a missing or unreadable one is status "unreadable"."""
    if rec is None:
        rec = {"id": entry, "status": "unreadable", "created_at": None, "files": {}}
    rec = dict(rec, id=entry, path=os.path.join(bdir, entry))
    for key in ("created_at", "verified_at", "status"):
        if not isinstance(rec.get(key), str):
            rec[key] = "unknown" if key == "status" and key in rec else None
    if rec["status"] is None:
        rec["status"] = "unknown"
    if not isinstance(rec.get("total_bytes"), int):
        rec["total_bytes"] = None
    if not (isinstance(rec.get("seq"), int) and not isinstance(rec["seq"], bool)):
        rec["seq"] = None  # written before seq existed (or hand-edited): ranked by time
    rec["age_seconds"] = age(rec.get("created_at"))
    return rec


def list_backups(root, cfg: dict | None = None) -> list[dict]:
    """Every published backup, oldest first; `.staging-*`/`.deleting-*` are never listed.

    A folder whose backup.json is missing or unreadable is listed with status
    "unreadable" (never as good). Each record whole, with its file list: `summaries`
    gives the same without it, for a cost that does not grow with every record's size.
    """
    bdir = backups_dir(root, cfg)
    out = []
    if not bdir.is_dir():
        return out
    for entry in sorted(os.listdir(bdir)):
        if not ID_RE.fullmatch(entry) or not (bdir / entry).is_dir():
            continue
        out.append(_typed(read_record(bdir / entry), entry, bdir, age_seconds))
    out.sort(key=order_key)
    return out


def quick_age_seconds(text) -> float | None:
    """Seconds since a `utc_now()` timestamp, or None: trainroot.age_seconds through
    `fromisoformat` (C code; strptime cost ~45 us a record and imports _strptime, calendar
    and locale: a few ms of every status command's start)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return max(0.0, time.time() - datetime.fromisoformat(text).timestamp())
    except ValueError:
        return None


def summaries(root, cfg: dict | None = None) -> list[dict]:
    """`list_backups` without each record's file list (`files`), oldest first, for the
    routine commands (`list`, the state report, the newest backup): a backup.json is read
    only when it changed since the last call, which ROOT/.index/backups.json remembers
    (each record's inode, size and mtime, and its fields but the file list).

    That summary is a cache, never trusted over a record: one stat per backup tells
    whether it still holds (a record is rewritten by rename, so its inode changes); a
    missing or damaged summary is rebuilt from the records, and it is written atomically
    (kill -9 leaves the old or the new; two writers: the last wins, both right).
    """
    p = _p(root)
    bdir = backups_dir(root, cfg)
    path = p.root / SUMMARY
    try:
        doc = read_json(path, default=None)
    except GuardrailError:
        doc = None  # damaged: rebuilt from the records below
    kept = doc.get("backups") if isinstance(doc, dict) and doc.get("schema_version") == 1 \
        and doc.get("dir") == str(bdir) else None
    kept = kept if isinstance(kept, dict) else {}
    try:
        with os.scandir(bdir) as it:
            entries = sorted(e.name for e in it if ID_RE.fullmatch(e.name) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    fresh, out = {}, []
    for entry in entries:
        try:
            st = os.stat(os.path.join(bdir, entry, RECORD))
            sig = [st.st_ino, st.st_size, st.st_mtime_ns]
        except OSError:
            sig = None  # no record: "unreadable", read again each time (it may come back)
        hit = kept.get(entry)
        if sig is not None and isinstance(hit, dict) and hit.get("sig") == sig \
                and isinstance(hit.get("rec"), (dict, type(None))):
            rec = hit["rec"]
        else:  # stat first, then read: what is kept is never older than its signature
            rec = read_record(bdir / entry)
            rec = {k: v for k, v in rec.items() if k != "files"} if rec is not None else None
        fresh[entry] = {"sig": sig, "rec": rec}
        out.append(_typed(rec, entry, bdir, quick_age_seconds))
    if fresh != kept and p.root.is_dir():
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_write_text(path, json.dumps({"schema_version": 1, "dir": str(bdir),  # compact:
                                                "backups": fresh}, separators=(",", ":")),  # read often
                              sync=False)  # a cache: lost, it is rebuilt
        except OSError as exc:  # a read-only root: every record is read next time too
            import logging  # lazy: ~5 ms of every status command otherwise
            logging.getLogger("backup_records").info("cannot keep %s (%s)", path, exc.strerror)
    out.sort(key=order_key)
    return out


def order_key(rec: dict) -> tuple:
    """Oldest first by `seq`, never by time: a clock that ran ahead (then NTP set it right)
    dates a backup after the ones made later, and the ID carries that same time. Records
    without a seq come first, among themselves by created_at, then ID."""
    if rec["seq"] is not None:
        return (1, rec["seq"], "", rec["id"])
    return (0, 0, rec.get("created_at") or "", rec["id"])


def next_seq(root) -> int:
    """One above every listed backup's `seq`; call only holding the `backups` lock."""
    return max((b["seq"] for b in summaries(root) if b["seq"] is not None), default=0) + 1


def latest_backup(root) -> dict | None:
    """The newest backup whose last verification passed, or None."""
    good = [b for b in summaries(root) if b.get("status") == "verified"]
    return good[-1] if good else None


def earlier_folder(root) -> Path | None:
    """ROOT/backups when config `backup_dir` now names another folder: where the backups
    made before that change still are (restore and verify find an ID there too)."""
    p = _p(root)
    try:
        bdir = backups_dir(root)
    except GuardrailError:
        return None
    default = p.default_backups
    return default if default.resolve() != bdir.resolve() and default.is_dir() else None


def latest_earlier_backup(root) -> dict | None:
    """The newest verified backup in `earlier_folder` (for a root that lost its model and
    has none in backup_dir): read from the records, no cache."""
    folder = earlier_folder(root)
    if folder is None:
        return None
    good = []
    for entry in sorted(os.listdir(folder)):
        if ID_RE.fullmatch(entry) and (folder / entry).is_dir():
            rec = _typed(read_record(folder / entry), entry, folder, quick_age_seconds)
            if rec.get("status") == "verified":
                good.append(rec)
    good.sort(key=order_key)
    return good[-1] if good else None
