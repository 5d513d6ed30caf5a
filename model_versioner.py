"""Immutable model versions, O(files) snapshots, and atomic swaps of `current_model/`.

A version `versions/vNNN/` is a complete Hugging Face model folder whose files are hard
links to the files `current_model/` had when it was taken, plus `version.json` (reason,
parent, steps, data files, loss, config, sha256 manifest). Linking is safe only because
nothing ever writes a file in `current_model/` or `versions/` in place: a new model is
saved into `.staging/`, fsynced and swapped in with `renameat2(RENAME_EXCHANGE)` by
`publish_model`; files are made read-only (0444) when published or versioned. The
`.manifest.json` of every model folder is model_manifest.py's (re-exported here).

    python3 model_versioner.py snapshot --note "before the risky data"
    python3 model_versioner.py rollback            # undo the last training (itself undoable)
    python3 model_versioner.py restore latest      # after `rm -rf current_model`
    python3 model_versioner.py verify --all --json
    python3 model_versioner.py eval v004           # eval loss on ROOT/eval/ (eval_gate.py)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import threading
import time
from pathlib import Path

import backup_records
import base_store
import cli_guard
import lora_mode
import versions_index
from training_controller import file_midway, refuse_while_training  # the daemon's liveness, one definition
from model_manifest import (MANIFEST, READ_ONLY, VERSION_FILE, check_model_dir, not_its_own,
                            read_manifest, verify_files, walk, write_manifest)
from trainroot import (BusyError, FileLock, GuardrailError, Paths, UsageError, add_common_args,
                       atomic_write_json, exchange_paths, fsync_dir, fsync_paths, model_lock,
                       print_json, read_json, rename_noreplace, resolve_root, run_cli,
                       sha256_file, subcommands, utc_now)

SCHEMA_VERSION = 1
TAGS_FILE = "tags.json"
PUBLISHED = ".published.json"    # in versions/: which version current_model last became
LAST_ID = ".last_id"             # in versions/: the highest id ever given (_next_id's index)
VERSION_RE = re.compile(r"v(\d{1,9})")
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
CMD = "python3 model_versioner.py"
DANCE_INTENT = "mv-dance.json"   # in ROOT/.staging/: a rename dance in progress
PREFIX = "mv-"                   # ROOT/.staging/mv-* belongs to this module; recover() cleans it


# --------------------------------------------------------------------------- ids

def validate_version_id(text, where=None) -> str:
    """`v3` / `v003` -> `v003`; anything else (paths, `..`, tags, v0) raises UsageError."""
    if isinstance(text, str):
        m = VERSION_RE.fullmatch(text)
        if m and int(m.group(1)) >= 1:  # ids start at v001: `v0` can only be a typo
            return f"v{int(m.group(1)):03d}"
    raise UsageError(f"invalid version id {text!r} (expected vNNN such as v003, a tag, or latest)",
                     where, f"Run `{CMD} list` to see the versions.")


def _version_number(vid: str) -> int:
    return int(vid[1:])


WRITTEN_IN_PLACE = "written in place after it was versioned"  # check_version: a moved mtime


def moved_in_place(root, vid) -> list[str]:
    """The files of version `vid` whose time stamp moved since it was taken (the cheap
    check's "written in place"): changed bytes, or only a `touch`; the checksums tell."""
    tail = f": {WRITTEN_IN_PLACE}"
    return [line[len(vid) + 1:-len(tail)] for line in check_version(root, vid) if line.endswith(tail)]


def check_version(root, vid) -> list[str]:
    """Cheap check of a version (no hashing): every file present with its recorded size and
    mtime. A file written in place through any hard link changes its mtime for all links."""
    p = Paths(root)
    rec = read_version(p.root, vid)
    folder = p.versions / rec["id"]
    problems = not_its_own_folder(p, rec["id"])
    for rel, entry in sorted(rec["manifest"].items()):
        try:
            st = os.lstat(folder / rel)  # a symbolic link is not the versioned file
        except OSError:
            problems.append(f"{rec['id']}/{rel}: missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rec['id']}/{not_its_own(folder, rel) or rel + ': not a regular file'}")
        elif st.st_size != entry.get("size"):
            problems.append(f"{rec['id']}/{rel}: size {st.st_size}, expected {entry.get('size')}")
        elif entry.get("mtime_ns") not in (None, st.st_mtime_ns):
            problems.append(f"{rec['id']}/{rel}: {WRITTEN_IN_PLACE}")
    return problems


# --------------------------------------------------------------------------- locking

_held = threading.local()


@contextlib.contextmanager
def _versions_lock(p: Paths, purpose: str, timeout: float = 30.0):
    """The shared `versions` lock, re-entrant within one thread (publish inside restore)."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    lock = FileLock(p.lock("versions"), purpose).acquire(timeout=timeout)
    _held.depth = 1
    try:
        yield
    finally:
        _held.depth = 0
        lock.release()


# --------------------------------------------------------------------------- reading versions

def _version_dirs(p: Paths) -> list[str]:
    """Every version folder's id, oldest first (from the versions index: no stat each)."""
    return versions_index.VersionsIndex(p.root).ids()


def _load_record(p: Paths, vid: str) -> dict | None:
    try:
        doc = read_json(p.versions / vid / VERSION_FILE, default=None)
    except GuardrailError:
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("manifest"), dict)):
        return None
    return _normalize_record(doc, vid)


def _normalize_record(doc: dict, vid: str) -> dict:
    """A record as the code may rely on it, whatever a hand edit left in version.json.

    The folder's name is the id (an edited `id` such as `../current_model` or `.pruned`
    must never become a path prune deletes); a `parent` that is no version id reads as
    none; data files and manifest entries that are not objects read as empty ones, so
    `verify` reports them instead of a traceback.
    """
    rec = dict(doc, id=vid)
    try:
        rec["parent"] = validate_version_id(doc.get("parent")) if doc.get("parent") else None
    except UsageError:
        rec["parent"] = None
    files = doc.get("data_files")
    rec["data_files"] = [
        {"name": f.get("name") if isinstance(f, dict) else f if isinstance(f, str) else None,
         "sha256": f.get("sha256") if isinstance(f, dict) else None,
         **({"skipped": True} if isinstance(f, dict) and f.get("skipped") is True else {})}
        for f in (files if isinstance(files, list) else [])]
    if isinstance(doc.get("manifest"), dict):
        rec["manifest"] = {rel: {k: v for k, v in e.items()
                                 if not (k in ("size", "mtime_ns") and not isinstance(v, int))}
                           if isinstance(e, dict) else {}
                           for rel, e in doc["manifest"].items()}
    return rec


def _pruned_record(p: Paths, vid) -> dict | None:
    """The record prune kept in `versions/.pruned/` (no manifest), or None."""
    try:
        vid = validate_version_id(vid)
        doc = read_json(p.versions / ".pruned" / f"{vid}.json", default=None)
    except GuardrailError:
        return None
    return _normalize_record(doc, vid) if isinstance(doc, dict) else None


def list_versions(root) -> list[dict]:
    """Every complete version's record (oldest first); folders without a readable record are skipped."""
    p = Paths(root)
    return [rec for vid in _version_dirs(p) if (rec := _load_record(p, vid)) is not None]


def latest_version(root) -> str | None:
    """The newest version whose record reads (the index names it; its record is read)."""
    p = Paths(root)
    for row in versions_index.VersionsIndex(p.root).newest(4, readable=True):
        if _load_record(p, row["id"]) is not None:
            return row["id"]
    for vid in reversed(_version_dirs(p)):  # the index's newest did not read: ask each folder
        if _load_record(p, vid) is not None:
            return vid
    return None


def read_tags(root, *, strict: bool = False) -> dict:
    """versions/tags.json: {name: version}. A damaged file (a hand edit) reads as no tags
    for showing and resolving; `strict` (prune, tag, untag: what would delete a tagged
    version or write the file over) raises instead, naming it."""
    path = Paths(root).versions / TAGS_FILE
    try:
        tags = read_json(path, default={})
        problem = None if isinstance(tags, dict) else f"holds {type(tags).__name__}, not an object"
        if problem is None and any(not isinstance(v, str) for v in tags.values()):
            problem = "a tag names something that is not a version id"
    except GuardrailError as exc:
        tags, problem = {}, exc.what
    if problem is not None and strict:
        raise GuardrailError(f"versions/tags.json is damaged ({problem}): which versions are "
                             "tagged, and so kept, cannot be known; nothing was pruned or "
                             "tagged", path, f"Fix it by hand (`python3 -m json.tool {path}` "
                             "shows where it breaks; the form is {\"name\": \"v012\"}), or "
                             "move it aside and tag again (`python3 model_versioner.py tag V NAME`).")
    return {k: v for k, v in tags.items() if isinstance(v, str)} if isinstance(tags, dict) else {}


def read_version(root, vid) -> dict:
    """The record of version `vid`; raises if the id is invalid or the version is missing."""
    p = Paths(root)
    vid = validate_version_id(vid, p.versions)
    rec = _load_record(p, vid)
    if rec is None and (p.versions / ".pruned" / f"{vid}.json").is_file():
        held = []
        with contextlib.suppress(GuardrailError, OSError):  # a verified backup of it brings it back
            held = [b["id"] for b in backup_records.list_backups(p.root)
                    if b.get("version") == vid and b.get("status") == "verified"]
        raise GuardrailError(f"version {vid} was pruned (only its record is kept, for lineage)",
                             p.versions / ".pruned" / f"{vid}.json",
                             f"A verified backup holds it: `python3 backup_manager.py restore {held[-1]}` "
                             f"makes it current_model (then `{CMD} snapshot`)." if held else
                             f"Run `{CMD} list` to see the versions that remain (`python3 "
                             "backup_manager.py list` the backups).")
    if rec is None and (p.versions / vid).is_dir():
        raise GuardrailError(f"version {vid} has no readable {VERSION_FILE} (damaged; its folder "
                             "is left as it is)", p.versions / vid / VERSION_FILE,
                             f"Restore another version: `{CMD} list` shows them.")
    if rec is None:
        raise GuardrailError(f"no version {vid}", p.versions / vid,
                             f"Run `{CMD} list` to see the versions.")
    for rel in rec["manifest"]:
        _require_safe_rel(rel, p.versions / vid)
    return rec


def resolve_version(root, text) -> str:
    """A version id from `vNNN`, `latest`, or a tag name."""
    if text == "latest":
        vid = latest_version(root)
        if vid is None:
            p = Paths(root)
            if not os.path.lexists(p.current_model):  # nothing to snapshot: a backup, if any
                b = None
                with contextlib.suppress(GuardrailError, OSError):
                    b = backup_records.latest_backup(p.root)
                if b:
                    raise GuardrailError(
                        "no versions yet, and no current_model", p.versions,
                        f"Bring the model back from the newest verified backup ({b['id']}, "
                        f"step {b.get('global_step')}): `python3 backup_manager.py restore "
                        f"{b['id']}`, then `{CMD} snapshot --note restored`.")
            raise GuardrailError("no versions yet", p.versions, f"Take one with `{CMD} snapshot`.")
        return vid
    if isinstance(text, str) and TAG_RE.fullmatch(text) and not VERSION_RE.fullmatch(text):
        tags = read_tags(root)
        if text in tags:
            return validate_version_id(tags[text], Paths(root).versions / TAGS_FILE)
        raise GuardrailError(f"no version or tag named {text!r}" + (
            f" (the tags: {', '.join(sorted(tags)[:10])})" if tags else " (no version has a tag)"),
            Paths(root).versions / TAGS_FILE, f"Run `{CMD} list` to see the versions and their tags.")
    return read_version(root, text)["id"]


def _signature(folder: Path) -> dict | None:
    """{relpath: (inode, size)} of a model folder (version.json excluded), None if unreadable."""
    try:
        return {rel: ((st := (folder / rel).stat()).st_ino, st.st_size)
                for rel in walk(folder, skip=(VERSION_FILE,))}
    except OSError:
        return None


def _tree_version(p: Paths, folder: Path) -> str | None:
    """Which version `folder` is (same inodes and sizes), newest first; None if none."""
    try:
        manifest_ino = (folder / MANIFEST).stat().st_ino
    except OSError:
        return None
    sig = None
    # candidates by the manifest's inode (the index's; each checked here): a folder that
    # is no version costs one query, not a stat of every version's manifest
    for vid in versions_index.VersionsIndex(p.root).with_manifest(manifest_ino):
        try:
            if (p.versions / vid / MANIFEST).stat().st_ino != manifest_ino:
                continue
        except OSError:
            continue
        sig = sig or _signature(folder)
        if sig is not None and sig == _signature(p.versions / vid) and _load_record(p, vid):
            return vid
    return None


def current_version(root) -> str | None:
    """The version `current_model/` is right now (cheap: inodes and sizes), or None."""
    p = Paths(root)
    return _tree_version(p, p.current_model)


def copy_of_version(root) -> str | None:
    """The version whose very bytes current_model holds in files of its own (a backup
    restore's verified copy), or None: its manifest names it as `copy_of` (the restore
    hashed the version and found it holds those bytes: bit rot keeps sizes and time stamps),
    its sha256s equal the version's, every file is as that manifest recorded it, size and
    mtime (`mtime_ns`, which a backup restore records: a write in place moves it), and the
    version passes its cheap check (a damaged one, restored from a backup, is versioned
    anew). Cheap: no hashing. Keeping such a current_model before a restore, or a snapshot
    of it, would store the same bytes again as a new version."""
    p = Paths(root)
    try:
        manifest = read_manifest(p.current_model)
    except (GuardrailError, OSError):
        return None
    files = (manifest or {}).get("files")
    vid = (manifest or {}).get("copy_of")  # (a backup restore hashed the version to say so)
    if not files or not isinstance(vid, str) or not VERSION_RE.fullmatch(vid) \
            or manifest.get("parent_version") != vid:
        return None
    for rel, entry in files.items():
        try:
            _require_safe_rel(rel, p.current_model)
            st = os.lstat(p.current_model / rel)
        except (OSError, GuardrailError):
            return None
        if not isinstance(entry, dict) or entry.get("mtime_ns") != st.st_mtime_ns \
                or entry.get("size") != st.st_size or not stat.S_ISREG(st.st_mode):
            return None
    if check_model_dir(p.current_model):  # (no file beside those the manifest lists)
        return None
    rec = _load_record(p, vid)
    if not rec or _content(rec.get("manifest")) != _content(files):
        return None
    try:  # a damaged version holds other bytes than it records: the copy is no copy of it
        return None if check_version(root, vid) else vid
    except GuardrailError:
        return None


def present_version(root) -> str | None:
    """The version current_model is (its files), or holds the very bytes of (a copy)."""
    return current_version(root) or copy_of_version(root)


# --------------------------------------------------------------------------- creating versions

def _stamp() -> str:
    return f"{time.time_ns()}-{os.getpid()}"


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirs, _files in os.walk(folder):
        fsync_dir(dirpath)


def _require_safe_rel(rel, where) -> None:
    """A manifest name stays inside its folder (a tampered record must not reach outside)."""
    parts = Path(rel).parts if isinstance(rel, str) else ()
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise GuardrailError(f"unsafe file name {rel!r} in a manifest", where,
                             f"Its record was edited by hand: restore another version with "
                             f"`{CMD} restore VNNN` (see `{CMD} list`).")


versions_lock, require_safe_rel = _versions_lock, _require_safe_rel  # (backup_manager.repair_version)


def _fsync_files(folder: Path, rels) -> None:
    """fsync each file: what the product publishes already is (a no-op then), but a file a
    person wrote into current_model by hand may not be, and the version vouches for it."""
    for rel in rels:
        fd = os.open(folder / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: Path, dst: Path, rels) -> None:
    """Hard-link each relpath of `src` into `dst` (O(files), no bytes copied)."""
    for rel in rels:
        _require_safe_rel(rel, src)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(src / rel, target)


def _chmod_read_only(folder: Path) -> None:
    for rel in walk(folder, skip=()):
        path = folder / rel
        if stat.S_IMODE(path.stat().st_mode) != READ_ONLY:
            os.chmod(path, READ_ONLY)


def _write_private(path: Path, doc: dict) -> None:
    """Write + fsync a JSON file inside a private staging folder (the folder's rename publishes
    it, so the temp-file dance of atomic_write_json would only add an fsync)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, READ_ONLY)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _named_ids(p: Paths) -> list:
    """Every id named anywhere (the full scan: every version.json and backup.json)."""
    named = list(_version_dirs(p))
    pruned = p.versions / ".pruned"
    if pruned.is_dir():
        named += [n[:-5] for n in os.listdir(pruned) if n.endswith(".json")]
    named += list(backup_versions(p.root))
    named += [rec.get("parent") for rec in list_versions(p.root)]
    with contextlib.suppress(Exception):  # the trained files' records (versions/ may be gone)
        with os.scandir(p.done) as entries:
            trained = any(e.name.endswith(".record.json") for e in entries)
        if trained:  # (a new root has none: no index is built for it)
            import done_index
            top = done_index.DoneIndex(p.root).highest_version()
            if top:
                named.append(f"v{top:03d}")
    return named


def _read_last_id(p: Paths) -> str | None:
    """The highest id ever given (`versions/.last_id`), or None if missing or damaged."""
    try:
        doc = read_json(p.versions / LAST_ID, default=None)
        return validate_version_id(doc.get("last")) if isinstance(doc, dict) else None
    except (GuardrailError, UsageError):
        return None


def _next_id(p: Paths) -> str:
    """One past every id that exists or is still named anywhere: after `rm -rf versions/v003`
    a new v003 would silently become what a tag, a backup record, a parent link or a
    printed undo command (`restore v003`) meant by the deleted one.

    `versions/.last_id` (the highest id given, written after each new version) stands for
    every id the product ever gave, so only folder names, tags, processing/ and
    current_model's parent are read besides it: no version.json or backup.json per
    snapshot. Missing or damaged (rm, a hand edit), it is rebuilt by the full scan, with a
    warning; it can only raise the next id, never lower it below a folder's."""
    newest = versions_index.VersionsIndex(p.root).summary()["newest"]  # the highest folder
    named = [newest]
    last = _read_last_id(p)
    if last is None:
        if newest:  # a new root has none yet; an older root or an `rm` lost it
            print(f"model_versioner: {p.versions / LAST_ID} is missing or damaged; rebuilding "
                  "it from every version and backup record", file=sys.stderr)
        named += _named_ids(p)
    named.append(last)
    named += list(read_tags(p.root).values())
    named += list(_processing_versions(p))
    with contextlib.suppress(GuardrailError, OSError):
        named.append((read_manifest(p.current_model) or {}).get("parent_version"))
    numbers = []
    for vid in named:
        with contextlib.suppress(UsageError):
            numbers.append(_version_number(validate_version_id(vid)))
    return f"v{max(numbers, default=0) + 1:03d}"


def _note_last_id(p: Paths, vid: str) -> None:
    last = _read_last_id(p)
    if last is None or _version_number(last) < _version_number(vid):
        atomic_write_json(p.versions / LAST_ID, {"schema_version": 1, "last": vid})


def _normalize_data_files(data_files) -> list[dict]:
    out = []
    for item in data_files or []:
        if isinstance(item, dict):  # "skipped": a file skipped part-way, its steps kept
            out.append({"name": item.get("name"), "sha256": item.get("sha256"),
                        **({"skipped": True} if item.get("skipped") else {})})
        else:
            path = Path(item)
            out.append({"name": path.name, "sha256": sha256_file(path)})
    return out


def bring_back(root) -> str:
    """The restore that brings a missing current_model back as it last was: the version it
    last became (after a rollback or a restore to an older one, not `latest`, which would
    bring back what was rolled back), else `latest`."""
    was = versions_index.last_published(root, latest_version(root))
    return f"{CMD} restore {was or 'latest'}"


def _moved(folder: Path, manifest: dict) -> bool:
    """A file whose manifest entry records an mtime (a backup restore's copy) and that was
    written since: its recorded sha256 no longer holds."""
    for rel, entry in manifest["files"].items():
        if isinstance(entry, dict) and "mtime_ns" in entry:
            try:
                if os.stat(folder / rel).st_mtime_ns != entry["mtime_ns"]:
                    return True
            except OSError:
                return True
    return False


def _ensure_current_manifest(p: Paths) -> dict:
    """current_model's manifest, rewritten (hashing) only when missing or stale in names/sizes."""
    cur = p.current_model
    if not cur.is_dir():
        raise GuardrailError("current_model is missing", cur, f"Bring it back with `{bring_back(p.root)}`.")
    names = walk(cur, skip=(MANIFEST,))
    incomplete = [line for line in check_model_dir(cur) if not line.startswith(MANIFEST)
                  and "manifest" not in line]  # a stale manifest is rewritten below
    if incomplete or not names:
        raise GuardrailError("current_model is incomplete (" + "; ".join(
            incomplete) + ")", cur, f"Bring it back with `{bring_back(p.root)}`.")
    try:
        manifest = read_manifest(cur)
    except GuardrailError:
        manifest = None
    if manifest is None or check_model_dir(cur) or _moved(cur, manifest):
        # New file + rename: the old manifest's inode (maybe shared with a version) is untouched.
        keep = {k: manifest[k] for k in ("parent_version", "kind", "base")
                if manifest and k in manifest}
        if base_store.is_adapter_folder(cur) and not keep.get("base"):
            keep.update(kind="adapter", base=base_store.adapter_base(cur))
        manifest = write_manifest(cur, extra=keep)
    return manifest


def create_version(root, reason: str, *, note=None, data_files=None, loss=None,
                   force: bool = False, extra: dict | None = None) -> tuple[str, bool]:
    """Snapshot `current_model/` as a new immutable version; returns `(id, created)`.

    No new version when current_model already equals the latest one (unless `force`).
    Hard links + version.json in `versions/.staging-*`, fsync, rename to `vNNN`.
    `extra`: more fields for version.json (`eval`, `rejected`, `gate`: eval_gate.py);
    never one of the fields above.
    """
    p = Paths(root)
    with _versions_lock(p, f"snapshot ({reason})"):
        return _create_version_locked(p, reason, note=note, data_files=data_files, loss=loss,
                                      force=force, extra=extra)


def _create_version_locked(p: Paths, reason, *, note=None, data_files=None, loss=None,
                           force=False, extra=None) -> tuple[str, bool]:
    manifest = _ensure_current_manifest(p)
    same = present_version(p.root)
    latest = latest_version(p.root)
    if same is not None and same == latest and not force:
        return same, False
    try:
        cfg = read_json(p.config, default=None)
    except GuardrailError:
        cfg = None
    p.versions.mkdir(parents=True, exist_ok=True)
    vid = _next_id(p)  # before the staging folder changes versions/ (the index would list it)
    staging = p.versions / f".staging-{_stamp()}"
    staging.mkdir()
    try:
        rels = list(manifest["files"]) + [MANIFEST]
        _link_tree(p.current_model, staging, rels)
        _fsync_files(staging, rels)
        _chmod_read_only(staging)  # shared inodes: current_model's files become 0444 too
        problems = check_model_dir(staging)
        if problems:  # current_model changed under us (someone bypassed the lock)
            raise GuardrailError("current_model changed while it was being versioned ("
                                 + "; ".join(problems) + ")", p.current_model,
                                 f"Run `{CMD} snapshot` again.")
        record = {"schema_version": SCHEMA_VERSION, "id": None, "created_at": utc_now(),
                  "reason": reason, "note": note,
                  "parent": same or manifest.get("parent_version") or latest,
                  "global_step": manifest.get("global_step"),
                  "tokens_seen": manifest.get("tokens_seen"),
                  "data_files": _normalize_data_files(data_files), "loss": loss,
                  "config": cfg, "manifest": {
                      rel: {**entry, "mtime_ns": (staging / rel).stat().st_mtime_ns}
                      for rel, entry in manifest["files"].items()}}
        if manifest.get("kind") == "adapter":  # adapter mode: the version names its base
            record.update(kind="adapter", base=manifest.get("base"))
        record.update({k: v for k, v in (extra or {}).items() if k not in record})
        while True:
            record["id"] = vid
            _write_private(staging / VERSION_FILE, record)
            _fsync_tree(staging)
            try:
                rename_noreplace(staging, p.versions / vid)
            except FileExistsError:  # a folder appeared by hand under that name: take the next
                vid = _next_id(p)
                continue
            try:
                _note_last_id(p, vid)
            except OSError as exc:  # the version is made; the next one rebuilds the index
                print(f"model_versioner: cannot write {p.versions / LAST_ID} ({exc.strerror})",
                      file=sys.stderr)
            return vid, True
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- publishing

_warned_dance: list = []  # the fallback is logged once per process, not per publish


def _exchange_available() -> bool:
    # Tests set this to exercise the rename dance that kernels without renameat2 need.
    return os.environ.get("GUARDRAILS_NO_RENAME_EXCHANGE") != "1"


_TRAINED_FROM_OLD = object()  # publish_model's default parent: the tree it replaces


def publish_model(root, staged_dir, *, reason: str = "publish",
                  keep_old: str = "if-unversioned", parent=_TRAINED_FROM_OLD) -> dict:
    """Make a complete, fsynced folder the new `current_model/` in one atomic step.

    The old tree is discarded when it equals a version; otherwise, with
    keep_old="if-unversioned", it is first kept as a version (reason `superseded`);
    keep_old="never" discards it (the trainer replacing its own intermediate save).
    The new tree's `parent_version` is the old one's version (it was trained from it), or
    `parent` when given (a backup restored: the version it was taken of, or None).
    Returns `{method, previous_version, kept_version, parent_version}`.
    """
    if keep_old not in ("if-unversioned", "never"):
        raise ValueError(f"keep_old must be 'if-unversioned' or 'never', not {keep_old!r}")
    p = Paths(root)
    with _versions_lock(p, f"publish ({reason})"):
        return _publish_locked(p, Path(staged_dir), reason, keep_old, parent)


def _publish_locked(p: Paths, staged: Path, reason: str, keep_old: str,
                    parent=_TRAINED_FROM_OLD) -> dict:
    if read_manifest(staged) is None:
        write_manifest(staged)
    problems = check_model_dir(staged)
    if problems:
        raise GuardrailError("refusing to publish an incomplete model (" + "; ".join(problems)
                             + ")", staged, "Save the model again into a fresh folder under "
                             ".staging/ and publish that.")
    p.staging.mkdir(parents=True, exist_ok=True)
    work = staged
    if not (staged.parent == p.staging and staged.name.startswith(PREFIX)):
        work = p.staging / f"{PREFIX}publish-{_stamp()}"
        os.rename(staged, work)  # ours now: recover() cleans it if we die
    new_ino = work.stat().st_ino
    try:
        return _swap_in(p, work, reason, keep_old, parent)
    except BaseException:
        with contextlib.suppress(OSError):  # not swapped: the caller keeps its folder
            if (work != staged and work.stat().st_ino == new_ino
                    and os.path.lexists(p.current_model) and not os.path.lexists(staged)):
                os.rename(work, staged)
        raise


def _swap_in(p: Paths, work: Path, reason: str, keep_old: str, parent=_TRAINED_FROM_OLD) -> dict:
    cur = p.current_model
    old_exists = os.path.lexists(cur)
    previous = (_tree_version(p, cur) or copy_of_version(p.root)) if old_exists else None
    kept = attic = None
    old_manifest = None
    if old_exists and previous is None:
        with contextlib.suppress(GuardrailError, OSError):
            old_manifest = read_manifest(cur)
        if keep_old == "if-unversioned":
            if cur.is_dir() and not check_model_dir(cur):
                kept, _ = _create_version_locked(p, "superseded", note=f"kept before: {reason}",
                                                 force=True)
            else:  # a broken tree is not a version, but it is not thrown away either
                attic = p.root / ".attic" / f"current_model-{_stamp()}"
                attic.mkdir(parents=True)
                if cur.is_dir() and not cur.is_symlink():
                    _link_tree(cur, attic, walk(cur, skip=()))
                else:  # a file or a link where the folder belongs: someone's, keep it
                    os.link(cur, attic / cur.name, follow_symlinks=False)
                _fsync_tree(attic.parent)
    if parent is _TRAINED_FROM_OLD:
        parent = previous or kept or (old_manifest or {}).get("parent_version")
    becomes = _tree_version(p, work)
    if becomes is None:  # a version's own manifest is shared: leave it be
        manifest = read_manifest(work)
        if manifest.get("parent_version") != parent:
            manifest["parent_version"] = parent
            atomic_write_json(work / MANIFEST, manifest, mode=READ_ONLY)
    _chmod_read_only(work)
    _fsync_tree(work)
    if not old_exists:
        rename_noreplace(work, cur)
        method = "rename"
    else:
        method = "exchange"
        try:
            if not _exchange_available():
                raise OSError(errno.ENOSYS, "renameat2 disabled")
            exchange_paths(work, cur)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            if not _warned_dance:
                _warned_dance.append(True)
                print(f"model_versioner: renameat2 unavailable ({exc.strerror}); using the "
                      "rename dance", file=sys.stderr)
            method = "dance"
            _rename_dance(p, work)
        # `work` now holds the old tree: a version's links, a kept copy, or a discard.
        shutil.rmtree(work, ignore_errors=True)
    _note_published(p, becomes, parent, reason)
    return {"method": method, "previous_version": previous, "kept_version": kept,
            "parent_version": parent, "kept_in": str(attic) if attic else None}


def _note_published(p: Paths, version, parent, reason: str) -> None:
    """Record which version current_model became (`versions/PUBLISHED`), with the newest id
    then: after a rollback and `rm -rf current_model`, state_tracker names this version
    (not the newest, which is what was rolled back) as long as no version was taken since."""
    if not p.versions.is_dir():
        return  # the first publish of a new root: no version to name yet
    doc = {"version": version, "parent_version": parent, "latest": latest_version(p.root),
           "reason": reason, "at": utc_now()}
    try:
        atomic_write_json(p.versions / PUBLISHED, doc)
    except OSError as exc:  # the swap is done; only the tracker's hint is missing
        with contextlib.suppress(OSError):
            os.unlink(p.versions / PUBLISHED)  # never a stale hint
        print(f"model_versioner: cannot write {p.versions / PUBLISHED} ({exc.strerror})",
              file=sys.stderr)


def _rename_dance(p: Paths, work: Path) -> None:
    """current_model -> aside, work -> current_model, aside -> work; recover() finishes it."""
    aside = p.staging / f"{PREFIX}old-{_stamp()}"
    intent = p.staging / DANCE_INTENT
    atomic_write_json(intent, {"new": work.name, "old": aside.name, "created_at": utc_now()})
    os.rename(p.current_model, aside)
    fsync_dir(p.root)
    fsync_dir(p.staging)
    os.rename(work, p.current_model)
    fsync_dir(p.root)
    fsync_dir(p.staging)
    os.unlink(intent)
    os.rename(aside, work)


def recover(root) -> dict:
    """Start-up recovery: finish or undo a half-done rename dance, drop staging leftovers.

    A busy lock means another command is mid-operation: nothing is touched then.
    """
    p = Paths(root)
    actions = []
    try:
        lock_cm = _versions_lock(p, "recover", timeout=0)
        lock_cm.__enter__()
    except BusyError:
        return {"skipped": "busy", "actions": []}
    try:
        intent = p.staging / DANCE_INTENT
        if intent.exists():
            try:
                doc = read_json(intent)
            except GuardrailError:
                doc = {}
            doc = doc if isinstance(doc, dict) else {}
            new = p.staging / str(doc.get("new", "")) if doc.get("new") else None
            old = p.staging / str(doc.get("old", "")) if doc.get("old") else None
            if not os.path.lexists(p.current_model):
                for src, word in ((new, "finished"), (old, "undid")):
                    if src and src.is_dir() and not check_model_dir(src):
                        os.rename(src, p.current_model)
                        fsync_dir(p.root)
                        actions.append(f"{word} an interrupted swap of current_model")
                        break
            os.unlink(intent)
        for folder, prefix in ((p.staging, PREFIX), (p.versions, ".staging-")):
            with contextlib.suppress(FileNotFoundError):
                for name in sorted(os.listdir(folder)):
                    if name.startswith(prefix):
                        path = folder / name
                        if path.is_dir() and not path.is_symlink():
                            shutil.rmtree(path)
                        else:
                            path.unlink()
                        actions.append(f"removed {path.relative_to(p.root)}")
    finally:
        lock_cm.__exit__(None, None, None)
    return {"skipped": None, "actions": actions}


# --------------------------------------------------------------------------- restore, rollback

def restore_version(root, vid, reason: str = "restore", *, by_person: bool = False) -> dict:
    """Make current_model equal to version `vid`, keeping the present state as a version first
    (reason `pre-<reason>`: pre-restore, pre-backup-restore, ...). `latest` is the newest
    version the quality gate did not reject (or hold); a rejected one named by its id is
    restored, and said. `by_person` (the CLI): refused while the gate holds a file, but for
    the version before it (accept and reject restore what they decide themselves).

    Returns `{restored, previous_version, kept_version, changed, undo, passed_over, rejected}`.
    """
    p = Paths(root)
    refuse_while_training(p.root)
    # the model lock: never in the window between the daemon taking a file and its training
    with model_lock(p.root, f"restore {vid}"), _versions_lock(p, f"restore {vid}"):
        passed_over = []
        if vid == "latest":
            for row in versions_index.VersionsIndex(p.root).newest(readable=True):
                if not row.get("review"):
                    vid = row["id"]
                    break
                passed_over.append(row["id"])
            else:
                passed_over = []  # every one rejected: `latest` as it reads
        vid = resolve_version(p.root, vid)
        if by_person and not (os.path.lexists(p.current_model) and present_version(p.root) == vid):
            refuse_during_hold(p, f"restore {vid}", allowed=vid)  # (one that changes nothing: let be)
        result = _restore_locked(p, vid, f"pre-{reason}")  # pre-restore, pre-backup-restore, ...
        rec = _load_record(p, vid) or {}
        rejected = ((rec.get("gate") or {}).get("file") or "its file") if rec.get("rejected") else None
        return dict(result, passed_over=passed_over, rejected=rejected)


def gate_hold(root) -> dict | None:
    """The quality gate's hold: {file, version (the held training), before (current_model's
    version meanwhile)}, or None."""
    import eval_gate
    import training_queue
    held = eval_gate.held_file(root)
    if held is None:
        return None
    rec = training_queue.read_record(held)
    return {"file": held.name, "version": (rec.get("hold") or {}).get("version"),
            "before": rec.get("version_before")}


def refuse_during_hold(p: Paths, what: str, allowed: str | None = None,
                       again: str | None = None) -> None:
    """While the gate holds a file, current_model stays at the version before it and the
    decision (accept/reject) publishes or drops the held training: a rollback or restore
    meanwhile would be undone by it, or undo the file before the held one. Restoring the
    version before it (current_model deleted meanwhile) is allowed."""
    hold = gate_hold(p.root)
    if hold is None or (allowed is not None and allowed == hold["before"]):
        return
    import eval_gate
    accept, reject = eval_gate.decision_cmds(p.root)
    raise GuardrailError(
        f"cannot {what} while processing/{hold['file']} is held by the quality gate: its "
        f"training is kept as {hold['version']}, not in current_model (still "
        f"{hold['before']}), and the decision on it would undo this", p.processing / hold["file"],
        f"Decide first: `{reject}` (the file goes to skipped/, current_model stays "
        f"{hold['before']}) or `{accept}` (current_model becomes its training); then "
        f"`{again or CMD + ' ' + what.split()[0]}` again if you still want it.")


def _restore_locked(p: Paths, vid: str, keep_reason: str) -> dict:
    rec = read_version(p.root, vid)
    src = p.versions / vid
    problems = check_version(p.root, vid)
    if problems and all(line.endswith(f": {WRITTEN_IN_PLACE}")
                        for line in problems):
        # Only mtimes moved (a rewrite with the same bytes, a copy tool keeping sizes): the
        # full hash decides, as `verify` does, or restore refuses what verify calls OK.
        # Nothing is refreshed: the record lives inside the immutable version.
        problems = verify_version(p.root, vid)
    problems = problems or check_model_dir(src)
    if problems:
        raise GuardrailError(f"version {vid} is damaged (" + "; ".join(problems) + ")", src,
                             f"Check it with `{CMD} verify {vid}`, then restore another version.")
    _require_base(p, rec)  # never an adapter without its base
    previous = present_version(p.root) if os.path.lexists(p.current_model) else None
    if previous == vid:
        return {"restored": vid, "previous_version": vid, "kept_version": None,
                "changed": False, "undo": None, "incomplete_kept_in": None}
    # Link the restore stage first: the fsync that makes the kept version durable then
    # commits these links too (one journal commit fewer on ext4; each costs ~2-15 ms).
    p.staging.mkdir(parents=True, exist_ok=True)
    stage = p.staging / f"{PREFIX}restore-{_stamp()}"
    stage.mkdir()
    try:
        _link_tree(src, stage, list(rec["manifest"]) + [MANIFEST])
        kept = None
        if os.path.lexists(p.current_model) and previous is None \
                and not check_model_dir(p.current_model):
            kept, _ = _create_version_locked(p, keep_reason, note=f"kept before restoring {vid}",
                                             force=True)
        result = _publish_locked(p, stage, f"restore {vid}", "if-unversioned")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    before = previous or kept or result.get("kept_version")
    return {"restored": vid, "previous_version": previous, "kept_version": kept or
            result.get("kept_version"), "changed": True,
            # a broken tree is no version: say where it went, or it looks lost
            "incomplete_kept_in": result.get("kept_in"),
            "undo": f"{CMD} restore {before}" if before else None}


def version_base(rec: dict) -> str | None:
    """The base id an adapter version applies to (None for a full model version)."""
    return rec.get("base") if rec.get("kind") == "adapter" else None


def base_fix(root, base_id: str) -> str:
    """The command that brings base `base_id` back: from the newest backup holding it."""
    holders = [b for b in backup_records.list_backups(root)
               if isinstance(b.get("base"), dict) and b["base"].get("id") == base_id]
    if holders:
        return (f"Bring it back with `python3 backup_manager.py restore-base {base_id}` "
                f"(backup {holders[-1].get('id')} holds it)")
    return (f"No backup holds base {base_id}: restore a version on another base or a full "
            f"one (`{CMD} list` shows each version's kind and base)")


def _require_base(p: Paths, rec: dict) -> None:
    """Refuse (GuardrailError) to restore an adapter version whose base is missing or damaged."""
    base = version_base(rec)
    if rec.get("kind") != "adapter":
        return
    if not base:
        raise GuardrailError(f"version {rec['id']} is an adapter whose record names no base",
                             p.versions / rec["id"], f"Restore another version (`{CMD} list`).")
    problems = base_store.check_base(p.root, base)
    if problems:
        raise GuardrailError(
            f"version {rec['id']} is an adapter on base {base}, which is "
            + ("missing" if problems[0].endswith(f"({base_store.base_dir(p.root, base)})")
               else "damaged (" + "; ".join(problems[:3]) + ")")
            + "; restoring it would leave an adapter without its base, so nothing was changed",
            base_store.base_dir(p.root, base),
            (fix := base_fix(p.root, base)) + (f", then run `{CMD} restore {rec['id']}` again."
                                               if fix.startswith("Bring it back") else "."))


def _content(files) -> dict:
    """{relpath: sha256} of a manifest's `files`: equal content whatever the inodes."""
    return {rel: e.get("sha256") for rel, e in (files or {}).items() if isinstance(e, dict)}


def rollback_target(root) -> str:
    """The version taken before the last training of current_model (walks past pruned ones,
    and past versions with current_model's very content, e.g. a `snapshot --force`)."""
    p = Paths(root)
    cur = current_version(p.root)
    if cur is not None:
        rec = read_version(p.root, cur)
        start, here = rec.get("parent"), _content(rec["manifest"])
    else:
        try:
            manifest = read_manifest(p.current_model) or {}
        except GuardrailError:
            manifest = {}
        start = manifest.get("parent_version") if isinstance(manifest, dict) else None
        try:  # a hand-edited manifest: only a real id may start the walk
            start = validate_version_id(start) if start else latest_version(p.root)
        except UsageError:
            start = latest_version(p.root)
        here = _content(manifest.get("files") if isinstance(manifest, dict) else None)
    seen = set()
    vid = start
    while vid and vid not in seen:
        seen.add(vid)
        rec = _load_record(p, vid)
        if rec is not None and _content(rec["manifest"]) != here:
            return vid
        if rec is None:
            rec = _pruned_record(p, vid)
        vid = rec.get("parent") if isinstance(rec, dict) else None
    raise GuardrailError("nothing to roll back to (current_model has no earlier version)",
                         p.versions, f"See what exists with `{CMD} list`.")


def rollback(root) -> dict:
    """Undo the last training: current_model becomes the version taken before it."""
    p = Paths(root)
    refuse_while_training(p.root)
    with model_lock(p.root, "rollback"), _versions_lock(p, "rollback"):
        refuse_during_hold(p, "rollback")
        target = rollback_target(p.root)
        result = _restore_locked(p, target, "pre-rollback")
    # what it undoes: the data files of the versions from the one it left back to the target
    # (more than the last file when retention pruned the versions between)
    undone, cursor, seen = [], result.get("previous_version") or result.get("kept_version"), set()
    pruned = False
    while cursor and cursor != target and cursor not in seen:
        seen.add(cursor)
        rec = _load_record(p, cursor)
        if rec is None:
            rec, pruned = _pruned_record(p, cursor), True
        if rec is None:
            break
        if not _accepted_hold(rec):  # (its file is its parent's, the held version's: once)
            undone = [{"name": f.get("name"), "version": cursor}
                      for f in rec.get("data_files") or [] if isinstance(f, dict)] + undone
        cursor = rec.get("parent")
    return dict(result, undone_files=undone, undone_pruned=pruned)


def _accepted_hold(rec: dict) -> bool:
    """A version an `accept` published: it names the file the held version (its parent)
    trained, which lineage and rollback count once."""
    return isinstance(rec.get("gate"), dict) and rec.get("parent") is not None \
        and rec["gate"].get("accepted_from") == rec.get("parent")


# --------------------------------------------------------------------------- consolidate (adapter mode)

def _merged_since(p: Paths, vid: str, base: str) -> list[str]:
    """The adapter versions on `base` in `vid`'s history, oldest first: what a consolidate of
    `vid` merges. The fresh adapter a consolidate starts (B = 0) trains nothing into it."""
    out, seen, cursor = [], set(), vid
    while cursor and cursor not in seen:
        seen.add(cursor)
        rec = _load_record(p, cursor) or _pruned_record(p, cursor)
        if not isinstance(rec, dict) or version_base(rec) != base:
            break
        if rec.get("reason") != "consolidate":
            out.append(cursor)
        cursor = rec.get("parent")
    return out[::-1]


def _merge_and_stage(p: Paths, before: str, base: str, base_rec: dict, merged: list,
                     work: Path, full: bool) -> tuple[str, Path, dict]:
    """Merge `before`'s adapter into a new base and stage what current_model becomes:
    (new base id, the staged folder, the merge's report). Nothing published yet."""
    import adapter_merge
    cur = p.current_model
    report = adapter_merge.merge(base_store.base_dir(p.root, base), p.versions / before,
                                 work / "merged", dtype=base_rec.get("dtype"))
    new_base = base_store.create_base(p.root, work / "merged", source="consolidate",
                                      merged=merged)
    if new_base == base:
        raise GuardrailError(f"the merged model equals base {base} (the adapter changes "
                             "nothing); nothing was changed", cur,
                             "Train on a file first, then consolidate.")
    state = read_json(cur / "trainer_state.json", default={}) or {}
    state = {**state, "warmup_from_step": state.get("global_step")}  # the engine warms up
    stage = work / "publish"
    new_dir = base_store.base_dir(p.root, new_base)
    if full:  # lora -> full: current_model is the merged model itself (its files linked)
        stage.mkdir()
        rels = [r for r in walk(new_dir, skip=(MANIFEST, base_store.BASE_FILE,
                                               "trainer_state.json"))]
        _link_tree(new_dir, stage, rels)
        atomic_write_json(stage / "trainer_state.json", state)
        write_manifest(stage, extra={"kind": "full"})
    else:
        try:
            cfg = read_json(p.config, default={}) or {}
        except GuardrailError:
            cfg = {}
        adapter_merge.fresh_adapter(new_dir, cur, stage, seed=int(cfg.get("seed") or 0),
                                    state=state, config=cfg if isinstance(cfg, dict) else None)
        write_manifest(stage, extra={"kind": "adapter", "base": new_base})
    return new_base, stage, report


def _consolidated_into(p: Paths, base_id: str) -> bool:
    """Whether a consolidate version (kept or pruned) made `base_id`."""
    pruned = sorted(f.stem for f in (p.versions / ".pruned").glob("v*.json"))  # (none: [])
    for vid in _version_dirs(p) + pruned:
        rec = _load_record(p, vid) or _pruned_record(p, vid)
        made = rec.get("consolidate") if isinstance(rec, dict) else None
        if isinstance(made, dict) and made.get("base") == base_id:
            return True
    return False


def consolidate(root, *, note=None, full: bool = False) -> dict:
    """Merge current_model's adapter into its base (float32, cast once to the base's dtype)
    as a new immutable base, proven equal on a probe batch, then make current_model a fresh
    adapter on it (or, with `full`, the merged full model: lora -> full) and version it
    (reason `consolidate`). Undo: `restore` of the version it names."""
    p = Paths(root)
    refuse_while_training(p.root)
    refuse_during_hold(p, "consolidate")
    midway = file_midway(p.root)
    if midway:  # its checkpoint holds an adapter of this base: it could not resume on the new one
        raise GuardrailError(
            f"cannot consolidate while processing/{midway['name']} is part-way trained "
            f"(checkpoint at step {midway['global_step']}): the rest of it must train on the "
            "adapter and base its start trained", p.processing,
            "Finish the file first (`python3 training_daemon.py run --once`, or `python3 "
            "training_controller.py skip` with the daemon running, which keeps its steps), "
            f"then `{CMD} consolidate`.")
    with model_lock(p.root, "consolidate"), _versions_lock(p, "consolidate"):
        return _consolidate_locked(p, note, full)


def _consolidate_locked(p: Paths, note, full: bool) -> dict:
    cur = p.current_model
    if not base_store.is_adapter_folder(cur):
        raise GuardrailError("current_model is a full model, not an adapter: nothing to "
                             "consolidate", cur, "Consolidate is for adapter mode (config "
                             "\"finetune\": \"lora\"); see docs/adapters.md.")
    before = current_version(p.root) or _create_version_locked(
        p, "pre-consolidate", note="kept before consolidate")[0]
    rec = read_version(p.root, before)
    base = version_base(rec)
    _require_base(p, rec)
    merged = _merged_since(p, before, base)
    if not merged:
        raise GuardrailError(f"nothing to consolidate: {before} is the fresh adapter the last "
                             "consolidate started (nothing trained into it since)", cur,
                             "Train on a file first, then consolidate.")
    # The same merge again (a consolidate undone, nothing trained since) would make the same
    # base: refused. Trained on after the undo, the adapter is another one on the same base
    # (the versions it has in common with an earlier merge are in it once): a new merge. A
    # base no consolidate version names is what a failed or killed one left: merged again
    # (create_base finds it by its weights).
    same = next((b["base_id"] for b in base_store.list_bases(p.root)
                 if (b.get("merged") or []) == merged and _consolidated_into(p, b["base_id"])), None)
    if same:
        raise GuardrailError(f"{', '.join(merged)} {'was' if len(merged) == 1 else 'were'} "
                             f"merged into base {same} already (a consolidate undone, nothing "
                             "trained since)", base_store.base_dir(p.root, same),
                             f"Restore the version that consolidate made on {same} (`{CMD} "
                             "list`: reason consolidate), or train on a file first.")
    base_rec = base_store.read_base(p.root, base)
    if not full:  # the fresh adapter's shape names layers the model has: checked before any write
        lora_mode.refuse_missing_targets(read_json(p.config, default={}) or {},
                                         base_store.base_dir(p.root, base), p.config)
    p.staging.mkdir(parents=True, exist_ok=True)
    work = p.staging / f"{PREFIX}consolidate-{_stamp()}"
    work.mkdir()
    try:
        try:
            new_base, stage, report = _merge_and_stage(p, before, base, base_rec, merged, work, full)
        except (GuardrailError, OSError):
            raise
        except Exception as exc:  # peft's or transformers' own: said, never a traceback
            raise GuardrailError(f"consolidate failed ({exc.__class__.__name__}: {exc}); "
                                 "current_model and the versions are unchanged", cur,
                                 "Check config.json's LoRA settings (lora_r, lora_alpha, "
                                 "lora_target_modules) against the model, then run "
                                 f"`{CMD} consolidate` again.") from None
        published = _publish_locked(p, stage, "consolidate", "if-unversioned")
        vid, _ = _create_version_locked(p, "consolidate", note=note, force=True, extra={
            "consolidate": {"from": before, "base_before": base, "base": new_base,
                            "merged": merged, "full": full, **report}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"version": vid, "from": before, "base_before": base, "base": new_base,
            "merged": merged, "full": full, **report, "publish": published["method"],
            "undo": f"{CMD} restore {before}"}


# --------------------------------------------------------------------------- tags, verify, prune, lineage

def tag_version(root, vid, name: str) -> dict:
    """Name a version in `versions/tags.json` (versions themselves are immutable)."""
    p = Paths(root)
    if not isinstance(name, str) or not TAG_RE.fullmatch(name) or re.fullmatch(r"[vV]\d+", name) \
            or name.lower() in ("latest", "current"):  # V002 or Latest would read as v002, latest
        raise UsageError(f"invalid tag name {name!r} (a letter, then up to 63 letters, digits, "
                         ". _ -; not vNNN, latest or current)", p.versions / TAGS_FILE,
                         f"Choose another name, e.g. `{CMD} tag {vid} baseline`.")
    with _versions_lock(p, f"tag {name}"):
        vid = resolve_version(p.root, vid)
        tags = read_tags(p.root, strict=True)
        if tags.get(name) not in (None, vid):
            raise GuardrailError(f"tag {name} already names {tags[name]}", p.versions / TAGS_FILE,
                                 f"Run `{CMD} untag {name}` first.")
        tags[name] = vid
        atomic_write_json(p.versions / TAGS_FILE, dict(sorted(tags.items())))
    return {"tag": name, "version": vid}


def untag(root, name: str) -> dict:
    p = Paths(root)
    with _versions_lock(p, f"untag {name}"):
        tags = read_tags(p.root, strict=True)
        if name not in tags:
            raise GuardrailError(f"no tag {name!r}", p.versions / TAGS_FILE,
                                 f"Run `{CMD} list` to see the tags.")
        vid = tags.pop(name)
        atomic_write_json(p.versions / TAGS_FILE, tags)
    return {"untagged": name, "version": vid}


def not_its_own_folder(p: Paths, vid: str) -> list[str]:
    """A version folder that is a link, or that holds another version (its record names
    another id: a copy of that version's folder), is not version `vid`, sound as its files
    may be."""
    folder = p.versions / vid
    if folder.is_symlink():
        return [f"{vid}: a link to {os.readlink(folder)}, not a version folder of its own"]
    try:
        said = read_json(folder / VERSION_FILE, default=None)
    except GuardrailError:
        return []  # (an unreadable record is said by whoever reads it)
    said = said.get("id") if isinstance(said, dict) else None
    if isinstance(said, str) and said != vid:
        return [f"{vid}: its {VERSION_FILE} is {said}'s (the folder holds another version)"]
    return []


def verify_version(root, vid, bases: dict | None = None) -> list[str]:
    """Recompute every checksum of a version (and of its base, for an adapter version);
    returns `vNNN/FILE: problem` lines. `bases` caches base results across calls."""
    p = Paths(root)
    rec = read_version(p.root, vid)
    lines = not_its_own_folder(p, rec["id"]) + [
        f"{rec['id']}/{line}" for line in verify_files(p.versions / rec["id"], rec["manifest"])]
    base = version_base(rec)
    if rec.get("kind") == "adapter":
        if not base:
            return lines + [f"{rec['id']}: an adapter whose record names no base"]
        bases = {} if bases is None else bases
        if base not in bases:
            bases[base] = base_store.verify_base(p.root, base)
        lines += [f"{rec['id']}: {line}" for line in bases[base]]
    return lines


def backup_versions(root) -> dict:
    """{version id: [backup folder names]} for every backup whose backup.json names a version."""
    p = Paths(root)
    try:
        import training_config
        cfg = read_json(p.config, default={})
        where = training_config.backup_dir(p.root, cfg if isinstance(cfg, dict) else {})
    except (GuardrailError, OSError, TypeError, ValueError):
        where = p.default_backups
    out: dict = {}
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(where)):
            try:
                doc = read_json(Path(where) / name / "backup.json", default=None)
            except GuardrailError:
                continue
            vid = doc.get("version") if isinstance(doc, dict) else None
            with contextlib.suppress(UsageError):  # a record naming no real id relies on none
                out.setdefault(validate_version_id(vid), []).append(name)
    return out


def _processing_versions(p: Paths) -> dict:
    """{version: why prune keeps it} for the data file(s) in processing/: the version each
    started from, and the one the quality gate holds (their records)."""
    out = {}
    for rec_path in sorted(p.processing.glob("*.record.json")) if p.processing.is_dir() else []:
        try:
            rec = read_json(rec_path, default=None)
        except GuardrailError:
            continue
        hold = rec.get("hold") if isinstance(rec, dict) else None
        held = hold.get("version") if isinstance(hold, dict) else None  # the gate's: accept needs it
        name = rec_path.name[:-len(".record.json")]
        for vid, why in ((rec.get("version_before") if isinstance(rec, dict) else None,
                          f"{name} in processing/ started from it"),
                         (held, f"the quality gate holds {name}'s training as it")):
            with contextlib.suppress(UsageError):
                out[validate_version_id(vid)] = why
    return out


def prune_plan(root, keep: int | None = None, *, rules: dict | None = None,
               protect: dict | None = None) -> dict:
    """Which versions prune would delete, and why each other one is kept.

    The rules are config `retention.versions` (retention.py; restic's keep_last, keep_daily,
    ...), or `{"keep_last": keep}` with `--keep N`. Always kept besides: the latest, tags,
    current_model (or the version it was trained from), the version a file in processing/
    started from, the version the quality gate holds (until accept or reject: a version
    marked rejected is then kept only as the rules keep any other), the best by eval loss
    once versions
    are scored (versions/.eval/), `protect` ({version: why}: the daemon's automatic
    backup copying one) and a version a backup is copying now (`pinned`). A finished backup
    pins nothing: it is an independent copy that restores without its source version."""
    import retention
    p = Paths(root)
    if keep is not None and keep < 1:
        raise UsageError(f"--keep must be at least 1, got {keep}", p.versions,
                         f"Run `{CMD} prune --keep 1` to keep only the newest.")
    if rules is None:
        rules = {"keep_last": keep} if keep is not None else \
            retention.policy(backup_records.config(p.root), "versions")
    rules = {r: int(rules.get(r) or 0) for r in retention.RULES}
    # the index's rows (one query and a stat each), not every version.json with its manifest
    recs = versions_index.VersionsIndex(p.root).rows()
    ids = [rec["id"] for rec in recs]
    by_rules = retention.apply_rules([(rec["id"], rec.get("created_at")) for rec in recs], rules)
    reasons: dict = {vid: list(by_rules.get(vid, [])) for vid in ids}
    for name, vid in read_tags(p.root, strict=True).items():
        if vid in reasons:
            reasons[vid].append(f"tag {name}")
    if ids:
        reasons[ids[-1]].append("latest")
    cur = current_version(p.root)
    if cur in reasons:
        reasons[cur].append("current_model")
    manifest = None
    with contextlib.suppress(GuardrailError, OSError):
        manifest = read_manifest(p.current_model)
        parent = (manifest or {}).get("parent_version")
        if parent in reasons and cur is None:
            reasons[parent].append("current_model was trained from it")
    if cur is None and manifest is None:  # current_model missing or damaged: the version it
        was = versions_index.last_published(p.root, ids[-1] if ids else None)  # last was is the
        if was in reasons:                                                      # way back
            reasons[was].append("current_model was it when it went missing")
    for vid, why in _processing_versions(p).items():
        if vid in reasons:  # skip --discard, the loss guard and accept restore it
            reasons[vid].append(why)
    for vid, why in (protect or {}).items():
        if vid in reasons:
            reasons[vid].append(why)
    for _, vid in _pins(p.versions / PINS):
        if vid in reasons and "a backup is copying it" not in reasons[vid]:
            reasons[vid].append("a backup is copying it")
    # a version marked rejected is kept while the gate holds its file (above, with the
    # processing/ records); once decided, only as the rules keep any other
    best = best_by_eval(p.root, ids)
    if best:
        reasons[best[0]].append(f"best eval loss {best[1]:.4g}")
    # Bases (ROOT/base/) are never pruned: each is listed with the kept versions naming it.
    bases: dict = {}
    for rec in recs:
        if version_base(rec) and reasons[rec["id"]]:
            bases.setdefault(version_base(rec), []).append(rec["id"])
    return {"policy": rules, "keep": {v: r for v, r in reasons.items() if r},
            "delete": [v for v, r in reasons.items() if not r], "bases": bases}


PINS = ".backup-pins"  # versions/.backup-pins/: one file per backup copying a version now


@contextlib.contextmanager
def pinned(root, vid: str, why: str):
    """Keep version `vid` from prune while `why` (a backup) copies it: a file in
    versions/.backup-pins/ naming it, flocked by this process for as long (a pin whose lock
    can be taken was left by a killed process: it protects nothing, and the next pin
    removes it). Written under the versions lock once `vid` is seen still there, so a prune
    either ended before (GuardrailError here: the version is gone) or keeps `vid` until the
    pin goes. A root that cannot be written gets no pin (nothing prunes there either)."""
    import fcntl
    p = Paths(root)
    folder, fd = p.versions / PINS, None
    try:
        with _versions_lock(p, f"pin {vid} for {why}"):
            if not (p.versions / vid / VERSION_FILE).is_file():
                raise GuardrailError(f"version {vid} is gone (pruned or removed) before {why} "
                                     "could copy it", p.versions / vid,
                                     f"See `{CMD} list` for the versions there are, and back "
                                     "up one of them.")
            folder.mkdir(exist_ok=True)
            for stale, _ in _pins(folder, live=False):
                with contextlib.suppress(OSError):
                    stale.unlink()
            path = folder / f"{vid}-{_stamp()}.json"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.write(fd, json.dumps({"version": vid, "for": why, "pid": os.getpid()}).encode())
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)


def _pins(folder: Path, live: bool = True) -> list[tuple[Path, str]]:
    """(pin file, version) of the pins in `folder` held by a live process (`live`), or of
    those left by a killed one."""
    import fcntl
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    found = []
    for name in names:
        vid = name.split("-", 1)[0]
        if not name.endswith(".json") or versions_index.version_number(vid) is None:
            continue
        try:
            fd = os.open(folder / name, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        finally:
            os.close(fd)
        if held == live:
            found.append((folder / name, vid))
    return found


def best_by_eval(root, ids: list[str]) -> tuple[str, float] | None:
    """(version, loss): of `ids`, the one with the lowest token-weighted mean eval loss in
    versions/.eval/ (eval_gate's results), among those scored under the newest scored
    version's key (the same eval set and settings: other numbers do not compare); ties go
    to the newer. None before any eval."""
    folder = Paths(root).versions / ".eval"
    try:  # only the results that exist are read (not a missing file per version)
        present = set(os.listdir(folder))
    except OSError:
        return None
    scored = []
    for vid in reversed(ids):  # newest first: its key is the one compared
        if f"{vid}.json" not in present:
            continue
        try:
            doc = read_json(folder / f"{vid}.json", default=None)
        except GuardrailError:
            continue  # a damaged result protects nothing; `model_versioner.py eval` redoes it
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, dict) or not results or doc.get("complete") is False:
            continue  # (a gate's prefix compares with no other version)
        if scored and doc.get("key") != scored[0][2]:
            continue
        num = den = 0.0
        for r in results.values():
            loss = r.get("loss") if isinstance(r, dict) else None
            if not isinstance(loss, (int, float)) or isinstance(loss, bool) or loss != loss \
                    or loss in (float("inf"), float("-inf")):
                num = None
                break
            w = r.get("tokens") if isinstance(r.get("tokens"), int) and r["tokens"] > 0 else 1
            num, den = num + loss * w, den + w
        if num is not None and den:
            scored.append((vid, num / den, doc.get("key")))
    if not scored:
        return None
    best = min(scored, key=lambda s: s[1])  # min keeps the first: the newer of equals
    return best[0], best[1]


def prune(root, keep: int | None = None, *, yes: bool = False, rules: dict | None = None,
          protect: dict | None = None) -> dict:
    """Delete the versions the retention policy does not keep (dry run unless `yes`).

    A pruned version's record stays in `versions/.pruned/` so `lineage` still works, and
    `show` names it as pruned. The daemon calls this after each file (`yes=True`).
    """
    p = Paths(root)
    with _versions_lock(p, "prune"):
        plan = prune_plan(p.root, keep, rules=rules, protect=protect)
        deleted = []
        if yes and plan["delete"]:
            # Batched: every record written, then one fsync each and one of .pruned/ (all
            # durable before any folder goes), then the renames and one fsync of versions/.
            # A first pass over years of history prunes thousands: 3 fsyncs per version
            # took ~60 s for 10,000, now ~1 per version.
            pruned = p.versions / ".pruned"
            pruned.mkdir(exist_ok=True)
            written = []
            for vid in plan["delete"]:
                rec = _load_record(p, vid)
                if rec is not None:
                    rec = {k: v for k, v in rec.items() if k != "manifest"}
                    atomic_write_json(pruned / f"{vid}.json", rec, sync=False)
                    written.append(pruned / f"{vid}.json")
            fsync_paths(written, [pruned])
            import retention
            freed = retention.unique_bytes([p.versions / vid for vid in plan["delete"]])
            doomed = []
            try:
                for vid in plan["delete"]:
                    folder = p.versions / f".staging-pruned-{vid}-{_stamp()}"
                    os.rename(p.versions / vid, folder)  # gone from `list` at once
                    doomed.append((vid, folder))
            finally:  # what was renamed is deleted (recover() would, at the next start)
                if doomed:
                    fsync_dir(p.versions)
                for vid, folder in doomed:
                    if folder.is_symlink():  # only the link is ours to delete, not its target
                        folder.unlink()
                    else:
                        shutil.rmtree(folder)
                    deleted.append(vid)
            if deleted:
                retention.note_freed(p.root, freed)
    return {"dry_run": not yes, "deleted": deleted, **plan}


def lineage(root, vid) -> dict:
    """Every data file, in order, trained into `vid` since v001 (following `parent` links)."""
    p = Paths(root)
    try:
        vid = resolve_version(p.root, vid)
    except GuardrailError:  # a pruned version: its record is kept for this
        if _pruned_record(p, vid) is None:
            raise
        vid = validate_version_id(vid)
    chain, seen, missing = [], set(), []
    cursor = vid
    while cursor and cursor not in seen:
        seen.add(cursor)
        rec = _load_record(p, cursor) or _pruned_record(p, cursor)
        if rec is None:
            missing.append(cursor)
            break
        chain.append(rec)
        cursor = rec.get("parent")
    chain.reverse()
    # an accepted hold's version names the file its parent (the held version) trained: once
    files = [{**f, "version": rec.get("id")} for rec in chain for f in rec.get("data_files") or []
             if not _accepted_hold(rec)]
    return {"version": vid, "chain": [rec.get("id") for rec in chain], "data_files": files,
            "incomplete_from": missing[0] if missing else None,
            # adapter mode: which base each version of the chain applied to (None: full)
            "bases": {rec.get("id"): version_base(rec) for rec in chain}}


# --------------------------------------------------------------------------- CLI

def _root(args) -> Path:
    return resolve_root(args.root)


def _summary(rec: dict, tags: dict, cur: str | None) -> dict:
    files = rec.get("manifest") or {}
    return {"id": rec.get("id"), "created_at": rec.get("created_at"), "reason": rec.get("reason"),
            "note": rec.get("note"), "parent": rec.get("parent"),
            "global_step": rec.get("global_step"), "tokens_seen": rec.get("tokens_seen"),
            "loss": rec.get("loss"), "files": len(files),
            "bytes": sum(e.get("size", 0) for e in files.values() if isinstance(e, dict)),
            "data_files": [f.get("name") for f in rec.get("data_files") or []],
            "tags": sorted(n for n, v in tags.items() if v == rec.get("id")),
            "current": rec.get("id") == cur,
            "kind": rec.get("kind") or "full", "base": version_base(rec)}


def newest_versions(root, limit: int | None) -> tuple[list[dict], list[str], int]:
    """(records of the newest `limit` versions oldest first, damaged ids among the folders
    looked at, how many version folders exist): reads `limit` records, not every one."""
    p = Paths(root)
    take = limit
    while True:  # the newest ids from the index (not all 10,000); more if some are damaged
        if take is None:
            dirs = _version_dirs(p)
            total = len(dirs)
        else:
            summary = versions_index.VersionsIndex(p.root).summary(take)
            dirs, total = summary["last"], summary["count"]
        rows, damaged = [], []
        for vid in reversed(dirs):
            if limit is not None and len(rows) >= limit:
                break
            rec = _load_record(p, vid)
            if rec is None:
                damaged.append(vid)
            else:
                rows.append(rec)
        if take is None or len(rows) >= limit or len(dirs) >= total:
            return rows[::-1], damaged[::-1], total
        take *= 4


def _eval_of(root, rec: dict) -> dict | None:
    """{eval file: loss} of a version: in its version.json, else kept by `eval` beside it
    (versions/.eval/vNNN.json, outside the folder `verify` checks)."""
    if isinstance(rec.get("eval"), dict) and rec["eval"]:
        return rec["eval"]
    import eval_gate
    doc = eval_gate.read_cached(root, rec["id"])
    return eval_gate.losses(doc) or None if doc else None  # a gate's prefix: not yet a version's loss


def _eval_text(losses: dict | None) -> str:
    return "  eval " + ", ".join(f"{n} {v:.4f}" if isinstance(v, (int, float)) else f"{n} -"
                                 for n, v in losses.items()) if losses else ""


def cmd_list(args) -> int:
    """List the newest versions, oldest first (* marks the one current_model equals);
    --limit N (default 50), --all for every one."""
    root = _root(args)
    limit = None if args.all else args.limit
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}", Paths(root).versions,
                         f"Run `{CMD} list --all` to list every version.")
    tags, linked = read_tags(root), current_version(root)
    cur = linked or copy_of_version(root)  # (a backup restore's copy holds a version's bytes)
    recs, damaged, total = newest_versions(root, limit)
    rows = [dict(_summary(rec, tags, cur), eval=_eval_of(root, rec),
                 rejected=rec.get("rejected") is True) for rec in recs]
    more = total - len(rows) - len(damaged)
    if args.json:
        print_json({"ok": True, "versions": rows, "current": cur, "latest": latest_version(root),
                    "current_model_exists": os.path.lexists(Paths(root).current_model),
                    "damaged": damaged, "total": total, "not_listed": max(0, more)})
        return 0
    for vid in damaged:
        print(f"! {vid}  damaged: no readable {VERSION_FILE} (see `"
              f"{cli_guard.command(f'{CMD} verify {vid}', cli_guard.explicit_root(args))}`)")
    if more > 0:
        print(f"  ({more} older version(s) not listed: "
              f"`{cli_guard.command(f'{CMD} list --all', cli_guard.explicit_root(args))}`)")
    there = os.path.lexists(Paths(root).current_model)
    if not rows and not damaged and not there:
        print("No versions and no current_model: bring the model back from a backup (`"
              + cli_guard.command("python3 backup_manager.py list", cli_guard.explicit_root(args))
              + "`, then `backup_manager.py restore ID`).")
        return 0
    if not rows:
        print(f"No versions yet. Take one with `{CMD} snapshot`.")
    for r in rows:
        extra = " ".join(f"[{t}]" for t in r["tags"])
        print(f"{'*' if r['current'] else ' '} {r['id']}  {str(r['created_at'] or '')[:19]}  "
              f"step {r['global_step']}  {cli_guard.shown(r['reason'])}"
              + (f"  adapter on {r['base']}" if r["kind"] == "adapter" else "")
              + ("  REJECTED" if r["rejected"] else "")
              + _eval_text(r["eval"])
              + (f"  note: {cli_guard.shown(r['note'])}" if r["note"] else "") + (f"  {extra}" if extra else ""))
    if not there:
        print("  current_model is missing: bring it back with "
              f"`{cli_guard.command(bring_back(root), cli_guard.explicit_root(args))}`.")
    elif rows and cur is None:
        print("  current_model is not a version yet (trained since, or changed).")
    elif cur != linked:
        print(f"  current_model holds {cur}'s bytes in files of its own (a backup restored).")
    return 0


def cmd_show(args) -> int:
    """Show one version's record (V: vNNN, a tag or latest)."""
    root = _root(args)
    rec = read_version(root, resolve_version(root, args.version))
    out = {**rec, "kind": rec.get("kind") or "full", "base": version_base(rec),
           "tags": sorted(n for n, v in read_tags(root).items() if v == rec["id"]),
           "current": present_version(root) == rec["id"], "eval": _eval_of(root, rec)}
    if args.json:
        print_json({"ok": True, "version": out})
    else:
        for key in ("id", "created_at", "reason", "note", "parent", "kind", "base", "global_step",
                    "tokens_seen", "loss", "tags", "current", "eval", "rejected", "gate",
                    "consolidate"):
            if key in ("rejected", "gate", "consolidate") and key not in out \
                    or key == "base" and out["base"] is None:
                continue
            print(f"{key:12} {cli_guard.shown(out.get(key), 2000)}")
        for f in rec.get("data_files") or []:
            print(f"data_file    {f.get('name')}  {str(f.get('sha256'))[:12]}")
        for rel, e in sorted(rec["manifest"].items()):
            print(f"file         {rel}  {e.get('size')} B  {str(e.get('sha256'))[:12]}")
    return 0


def cmd_eval(args) -> int:
    """Eval loss of a version on ROOT/eval/ (V: vNNN, a tag or latest; default: current_model's),
    kept in versions/.eval/vNNN.json; loads the model with torch (seconds)."""
    import eval_gate
    import training_config
    root = _root(args)
    cfg = training_config.load_config(root)
    if not eval_gate.eval_files(root):
        raise GuardrailError("no eval set: ROOT/eval/ holds no .jsonl file", root / eval_gate.EVAL_DIR,
                             "Put one or more .jsonl files there (any format validate_data.py "
                             "accepts), then run `python3 training_controller.py approve-config`.")
    if not int(cfg.get("eval_max_tokens") or 0):  # (it scored one row, kept as complete)
        raise GuardrailError("the eval is off: config.json eval_max_tokens is 0", Paths(root).config,
                             "Set `eval_max_tokens` above 0 (16384 by default) and approve it "
                             "(`python3 training_controller.py approve-config`), then run eval again.")
    vid = resolve_version(root, args.version) if args.version else current_version(root)
    if vid is not None:
        doc = eval_gate.eval_version(root, vid, cfg, refresh=args.refresh)
    else:  # trained since its last version: scored, not kept (no version to keep it beside)
        doc = eval_gate.evaluate(root, Paths(root).current_model, cfg)
    out = {"ok": True, "version": vid, "eval": eval_gate.losses(doc), "results": doc["results"],
           "global_step": doc.get("global_step"), "seconds": doc.get("seconds")}
    if args.json:
        print_json(out)
    else:
        print(f"{vid or 'current_model (not a version)'}  step {doc.get('global_step')}")
        for name, r in doc["results"].items():
            print(f"  {name}  loss {r['loss']}  ({r['tokens']} tokens)")
    return 0


def cmd_snapshot(args) -> int:
    """Keep current_model as a new version (nothing new if it equals the latest)."""
    vid, created = create_version(_root(args), "manual", note=args.note, force=args.force)
    if args.json:
        print_json({"ok": True, "version": vid, "created": created})
    else:
        print(f"Created version {vid}." if created else f"current_model already equals {vid}; "
              "no new version (use --force to take one anyway).")
    return 0


def _print_restore(args, result: dict, verb: str) -> None:
    result["undo"] = cli_guard.command(result["undo"], cli_guard.explicit_root(args))
    if args.json:
        print_json({"ok": True, **result})
        return
    passed = result.get("passed_over") or []
    if passed:
        print(f"latest is {result['restored']}: {', '.join(passed)} "
              f"{'was' if len(passed) == 1 else 'were'} rejected by the quality gate (restore "
              "one by its id if you mean it).")
    elif result.get("rejected"):
        print(f"Note: {result['restored']} is the training of {result['rejected']}, which the "
              "quality gate rejected.")
    if not result["changed"]:
        print(f"current_model already equals {result['restored']}; nothing to do.")
    else:
        kept = f" (the previous state was kept as {result['kept_version']})" \
            if result["kept_version"] else ""
        print(f"{verb} current_model to {result['restored']}{kept}.")
        if result.get("incomplete_kept_in"):
            print("The incomplete current_model it replaced is kept in "
                  f"{result['incomplete_kept_in']}/ (copy back what you need from there).")
        undone = result.get("undone_files") or []
        if len(undone) > 1:  # (retention pruned the versions between): say all it undoes
            print(f"This undoes {len(undone)} trained files, not only the last: "
                  + ", ".join(f"{f['name']} ({f['version']})" for f in undone)
                  + (" (the versions between them were pruned)" if result.get("undone_pruned")
                     else "") + ". Their copies are in done/.")
        if result["undo"]:
            print(f"Undo with `{result['undo']}`.")


def cmd_rollback(args) -> int:
    """Undo the last training: current_model becomes the version taken before it."""
    _print_restore(args, rollback(_root(args)), "Rolled back")
    return 0


def cmd_restore(args) -> int:
    """Make current_model equal to version V (vNNN, a tag or latest); undoable."""
    _print_restore(args, restore_version(_root(args), args.version, by_person=True), "Restored")
    return 0


def cmd_verify(args) -> int:
    """Recompute every checksum of V (default: the latest) or of --all versions; exit 1 if bad."""
    root = _root(args)
    if args.all and args.version is not None:
        raise UsageError(f"give a version or --all, not both (got {args.version} and --all)",
                         Paths(root).versions, f"Run `{CMD} verify --all`.")
    if args.all:  # every folder, so one whose record is unreadable is reported, not skipped
        ids = _version_dirs(Paths(root))
    else:
        ids = [resolve_version(root, "latest" if args.version is None else args.version)]
    results, bases = {}, {}
    for vid in ids:
        try:
            results[vid] = verify_version(root, vid, bases)
        except GuardrailError as exc:  # e.g. a record edited by hand: report it, go on
            results[vid] = [exc.what if exc.what.startswith(f"version {vid}") else f"{vid}: {exc.what}"]
    bad = [line for lines in results.values() for line in lines]
    if args.json:
        print_json({"ok": not bad, "versions": {v: {"ok": not lines, "problems": lines}
                                                 for v, lines in results.items()}})
    else:
        for vid, lines in results.items():
            print(f"{vid}: {'ok' if not lines else 'BAD'}")
    for vid, lines in results.items():
        fix = cli_guard.with_root(_verify_fix(root, vid, results), cli_guard.explicit_root(args))
        for line in lines:
            print(f"Error: {line}, {Paths(root).versions}. {fix}", file=sys.stderr)
    return 1 if bad else 0


def _verify_fix(root, vid: str, results: dict) -> str:
    """What to do about version `vid` that failed verify: restore a verified backup of it,
    or else a sound version (the newest that verified, or passes the cheap check); its
    base's command where only its base (adapter mode) is damaged."""
    damaged = {m.group(1) for line in results.get(vid, [])
               if (m := re.match(rf"{vid}: base (b\d+): ", line))}
    if damaged and all(re.match(rf"{vid}: base b\d+: ", line) for line in results[vid]):
        base = sorted(damaged)[0]
        return f"Its own files are sound; its base {base} is damaged. {base_fix(root, base)}."
    try:
        backup = next((b for b in reversed(backup_records.summaries(root))
                       if b.get("status") == "verified" and b.get("version") == vid), None)
    except (GuardrailError, OSError):
        backup = None
    if backup:
        return (f"Its verified backup {backup['id']} holds it: `python3 backup_manager.py repair "
                f"{vid}` puts its bytes back (in current_model too where it shares them).")
    good = None
    for other in sorted(_version_dirs(Paths(root)), key=versions_index.version_number, reverse=True):
        if other in results:
            sound = not results[other]
        else:
            try:
                sound = not check_version(root, other)
            except GuardrailError:
                sound = False
        if sound:
            good = other
            break
    if good is None:
        return (f"No version passes its checks and no backup holds {vid}: see "
                "`python3 backup_manager.py list` for a backup of another version (`"
                f"{CMD} list` shows the versions).")
    return (f"No backup holds {vid}; restore a sound version instead: `{CMD} restore {good}` "
            f"(the newest that {'verified' if good in results else 'passes the cheap check'}; "
            f"`{CMD} verify {good}` recomputes its checksums).")


def cmd_tag(args) -> int:
    """Give version V a name (kept by prune)."""
    result = tag_version(_root(args), args.version, args.name)
    print_json({"ok": True, **result}) if args.json else print(
        f"Tagged {result['version']} as {result['tag']}.")
    return 0


def cmd_untag(args) -> int:
    """Remove a tag (the version itself stays)."""
    result = untag(_root(args), args.name)
    print_json({"ok": True, **result}) if args.json else print(
        f"Removed tag {result['untagged']} (was {result['version']}).")
    return 0


def cmd_prune(args) -> int:
    """Apply the retention policy (config retention.versions, or --keep N: the newest N);
    tagged, latest, current, in-processing and held versions stay. Dry run unless --yes."""
    import retention
    result = prune(_root(args), args.keep, yes=args.yes)
    if args.json:
        print_json({"ok": True, **result})
        return 0
    source = f"--keep {args.keep}" if args.keep is not None else "config retention.versions"
    print(f"policy: {retention.describe(result['policy'])} ({source})")
    for vid, why in result["keep"].items():
        print(f"keep    {vid}  ({', '.join(why)})")
    for vid in result["delete"]:
        print(f"{'deleted' if args.yes else 'delete '} {vid}")
    if not args.yes and result["delete"]:
        again = f"{CMD} prune" + (f" --keep {args.keep}" if args.keep is not None else "") + " --yes"
        print(f"Dry run: nothing deleted. Run `{cli_guard.command(again, cli_guard.explicit_root(args))}`"
              " to delete these.")
    return 0


def cmd_lineage(args) -> int:
    """Every data file, in order, trained into V since v001."""
    result = lineage(_root(args), args.version)
    if args.json:
        print_json({"ok": True, **result})
        return 0
    print(" -> ".join(v + (f" (adapter on {result['bases'][v]})" if result["bases"].get(v) else "")
                      for v in result["chain"]))
    for f in result["data_files"]:
        print(f"{f['version']}  {f.get('name')}  {str(f.get('sha256'))[:12]}"
              + ("  (skipped: partly trained)" if f.get("skipped") else ""))
    if result["incomplete_from"]:
        print(f"(history before {result['incomplete_from']} is gone)")
    return 0


def cmd_consolidate(args) -> int:
    """Merge current_model's adapter into a new base (adapter mode) and continue with a fresh
    adapter on it (--full: with the merged full model); undo with `restore`."""
    result = consolidate(_root(args), note=args.note, full=args.full)
    result["undo"] = cli_guard.command(result["undo"], cli_guard.explicit_root(args))
    if args.json:
        print_json({"ok": True, **result})
    else:
        what = "the merged full model" if result["full"] else f"a fresh adapter on {result['base']}"
        print(f"Merged {', '.join(result['merged'])} (on {result['base_before']}) into base "
              f"{result['base']}: logits within {result['max_abs_diff']:.3g} of base+adapter "
              f"(tolerance {result['tolerance']:.3g}, {result['dtype']}). current_model is "
              f"{what}, version {result['version']}.")
        print(f"Undo with `{result['undo']}`.")
    return 0


def cmd_recover(args) -> int:
    """Finish or undo an interrupted swap and remove staging leftovers (the daemon runs this)."""
    result = recover(_root(args))
    print_json({"ok": True, **result}) if args.json else print(
        "\n".join(result["actions"]) or "Nothing to recover.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model_versioner.py",
                                      description=__doc__.split("\n")[0])
    add_common_args(parser)
    add_command = subcommands(parser, wrap=cli_guard.guarded)

    def add(name, func, *arguments):
        sp = add_command(name, func)
        for flags, kwargs in arguments:
            sp.add_argument(*flags, **kwargs)

    add("list", cmd_list, (("--limit",), {"type": int, "default": 50, "metavar": "N",
                                           "help": "the newest N (default 50)"}),
        (("--all",), {"action": "store_true", "help": "every version"}))
    add("show", cmd_show, (("version",), {"metavar": "V"}))
    add("snapshot", cmd_snapshot, (("--note",), {}),
        (("--force",), {"action": "store_true", "help": "a new version even if unchanged"}))
    add("rollback", cmd_rollback)
    add("restore", cmd_restore, (("version",), {"metavar": "V"}))
    add("verify", cmd_verify, (("version",), {"metavar": "V", "nargs": "?"}),
        (("--all",), {"action": "store_true"}))
    add("tag", cmd_tag, (("version",), {"metavar": "V"}), (("name",), {"metavar": "NAME"}))
    add("untag", cmd_untag, (("name",), {"metavar": "NAME"}))
    add("prune", cmd_prune, (("--keep",), {"type": int, "metavar": "N"}),
        (("--yes",), {"action": "store_true", "help": "really delete (default: dry run)"}))
    add("lineage", cmd_lineage, (("version",), {"metavar": "V"}))
    add("eval", cmd_eval, (("version",), {"metavar": "V", "nargs": "?"}),
        (("--refresh",), {"action": "store_true", "help": "score again, even if kept"}))
    add("consolidate", cmd_consolidate, (("--note",), {}),
        (("--full",), {"action": "store_true", "help": "then train the merged full model "
                       "(lora -> full) instead of a fresh adapter"}))
    add("recover", cmd_recover)
    return parser


def main(argv=None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
