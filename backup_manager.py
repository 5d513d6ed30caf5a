"""Verified, independent backups of the model, and a restore that cannot make things worse.

A backup is a full copy (never a hard link) of `current_model/` or of a version, in
`<backup_dir>/<ID>/` with `backup.json` (sha256 per file, sizes, source, version,
global_step). It is written under `.staging-<ID>/`: every piece is hashed as it is read
from the source (and checked against the source's manifest), written, synced, dropped from
the page cache, read back from the disk and compared with the bytes that were hashed; then
files and folders are fsynced and a no-replace rename publishes it (that copy engine is
verified_copy.py). A backup that fails is removed and reported, never listed (docs/design.md, Backups).

    python3 backup_manager.py backup --note "before the big run"
    python3 backup_manager.py verify --all
    python3 backup_manager.py restore b20261128T172301-3f9a    # or --to DIR to look first

Standard library only; the daemon calls `backup_in_background`, a child process at
SCHED_IDLE priority, so training keeps its cores.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import backup_records
import base_backup
import base_store
import cli_guard
from backup_records import (ID_RE, RECORD, backups_dir, config, latest_backup,  # noqa: F401
                            list_backups, next_seq, read_record)
import training_controller
from model_manifest import MANIFEST, has_weights, not_its_own, write_manifest
from trainroot import (BusyError, FileLock, GuardrailError, Paths, UsageError, add_common_args,
                       atomic_write_json, fsync_dir, model_lock, parse_time, print_json,
                       read_json, rename_noreplace, resolve_root, run_cli, same_file, subcommands,
                       utc_now)
from verified_copy import copy_tree_verified, hash_file, list_files, set_idle_priority

SCHEMA_VERSION = 1
META_FILES = {RECORD, MANIFEST}          # ours, not model files
STAGING_PREFIX, DELETING_PREFIX = ".staging-", ".deleting-"
LIST_CMD = "python3 backup_manager.py list"
BACKUP_CMD = "python3 backup_manager.py backup"


# --------------------------------------------------------------------------- small helpers

def _p(root) -> Paths:
    return Paths(resolve_root(root))


def new_backup_id() -> str:
    """`b` + UTC time to the second + 4 random hex digits; callers reserve it with mkdir."""
    return "b" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)


def check_id(bid: str, where=None) -> str:
    """Accept only well-formed IDs, so no input ever names a path outside backup_dir."""
    if not isinstance(bid, str) or not ID_RE.fullmatch(bid):
        raise UsageError(f"invalid backup id {bid!r} (IDs look like b20261128T172301-3f9a)",
                         where, f"List backups with `{LIST_CMD}`.")
    return bid


def _backup_path(root, bid: str) -> Path:
    folder = backups_dir(root) / check_id(bid, backups_dir(root))
    earlier = backup_records.earlier_folder(root)
    if not folder.is_dir() and earlier is not None and (earlier / bid).is_dir():
        return earlier / bid  # made before backup_dir changed: still a backup of this root
    if not folder.is_dir():
        raise GuardrailError(f"no backup {bid}", backups_dir(root),
                             f"List backups with `{LIST_CMD}`.")
    return folder


def _source_manifest(folder: Path, skip: set[str]) -> dict | None:
    """current_model's `.manifest.json` files ({relpath: {sha256, size}}) if it lists exactly
    the folder's files with their sizes, else None (then the bytes read are the reference)."""
    try:
        doc = read_json(folder / MANIFEST, default=None)
    except GuardrailError as exc:
        print(f"warning: ignoring unreadable {MANIFEST} ({exc})", file=sys.stderr)
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("files"), dict)):
        return None
    files = {rel: info for rel, info in doc["files"].items() if rel not in skip}
    if set(files) != set(list_files(folder, skip)):
        print(f"warning: {folder / MANIFEST} does not list the folder's files; hashing the "
              "source", file=sys.stderr)
        return None
    for rel, info in files.items():
        try:
            if os.path.getsize(folder / rel) != info.get("size"):
                print(f"warning: manifest size of {rel} is stale; hashing the source",
                      file=sys.stderr)
                return None
        except (OSError, AttributeError) as exc:
            print(f"warning: manifest entry {rel} unusable ({exc}); hashing the source",
                  file=sys.stderr)
            return None
    return files


def _trainer_state(folder: Path) -> dict:
    try:
        doc = read_json(folder / "trainer_state.json", default={})
    except GuardrailError:
        return {}
    return doc if isinstance(doc, dict) else {}


# --------------------------------------------------------------------------- records

def _fs_dev(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def same_filesystem(root, cfg: dict | None = None) -> bool:
    """True when backup_dir is on the same filesystem as current_model: not redundancy."""
    p = _p(root)
    bdir = backups_dir(p.root, cfg)
    model = p.current_model if p.current_model.exists() else p.root
    return _fs_dev(bdir) == _fs_dev(model)


def _same_fs_warning(root, cfg=None) -> str | None:
    if not same_filesystem(root, cfg):
        return None
    return (f"backup_dir {backups_dir(root, cfg)} is on the same filesystem as current_model: "
            "a disk failure loses both. Set `backup_dir` in config.json to another disk.")


# --------------------------------------------------------------------------- create

def _resolve_source(root, src: str | None) -> tuple[Path, str, str | None, set[str], dict | None]:
    """(folder, source name, version it matches, files to skip, the files it must hold)
    for `current_model`, or a version (vNNN, a tag or latest, as model_versioner reads them).

    A version must hold exactly what its version.json records: a damaged one is refused,
    never backed up under its name. current_model is checked against its `.manifest.json`
    when that lists its files (else hashed as it is read).
    """
    p = _p(root)
    if src and ("/" in src or src in (".", "..")):  # a path: current_model or a version folder
        path = Path(src).expanduser().resolve()
        if path == p.current_model.resolve():
            src = "current_model"
        elif path.parent == p.versions.resolve():
            src = path.name
    if src in (None, "current_model"):
        if not ((p.current_model / "config.json").exists()
                or base_store.is_adapter_folder(p.current_model)):
            import model_versioner  # a lost current_model comes back from a version, not init
            fix = (f"Bring it back with `python3 model_versioner.py restore latest`, then run "
                   f"`{BACKUP_CMD}`." if model_versioner.latest_version(p.root) else
                   f"Run `python3 training_daemon.py init --root {p.root}`.")
            raise GuardrailError("no current_model to back up", p.current_model, fix)
        skip = {MANIFEST}
        if not has_weights(list_files(p.current_model, skip)):
            # a copy of config files alone would be listed as a good backup and count
            # toward the retention rules, so `prune --yes` would delete a real one for it
            raise GuardrailError("current_model is incomplete (no weights file: *.safetensors "
                                 "or *.bin); a broken model is never backed up", p.current_model,
                                 "Bring it back with `python3 model_versioner.py restore "
                                 f"latest`, then run `{BACKUP_CMD}`.")
        return (p.current_model, "current_model", _current_version(p.root), skip,
                _source_manifest(p.current_model, skip))
    import model_versioner
    try:
        vid = model_versioner.resolve_version(p.root, src)
    except UsageError:
        raise UsageError(f"invalid source {src!r} (give current_model, a version id like v003, "
                         "a tag or latest)", p.versions,
                         "List versions with `python3 model_versioner.py list`.") from None
    rec = model_versioner.read_version(p.root, vid)
    folder, skip = p.versions / vid, {MANIFEST, "version.json"}
    expected = {rel: {"sha256": e.get("sha256"), "size": e.get("size")}
                for rel, e in rec["manifest"].items() if isinstance(e, dict)}
    present = set(list_files(folder, skip))
    if present != set(expected):
        missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
        raise GuardrailError(
            f"version {vid} does not hold what its record lists (missing {missing}, extra "
            f"{extra}); a damaged version is never backed up", folder,
            f"See every problem with `python3 model_versioner.py verify {vid}`, then back up "
            f"current_model or another version (`{BACKUP_CMD} vNNN`).")
    return folder, vid, vid, skip, expected


def _current_version(root) -> str | None:
    import model_versioner
    version = model_versioner.current_version(root)
    return version.get("id") if isinstance(version, dict) else version


def clean_staging(root) -> list[str]:
    """Remove `.staging-*`/`.deleting-*` left by a killed run. Call only holding the lock."""
    bdir = backups_dir(root)
    removed = []
    if not bdir.is_dir():
        return removed
    for entry in os.listdir(bdir):
        for prefix in (STAGING_PREFIX, DELETING_PREFIX):
            if entry.startswith(prefix) and ID_RE.fullmatch(entry[len(prefix):]):
                _remove_entry(bdir / entry)
                removed.append(entry)
    store = bdir / base_backup.BASES_DIR  # a base copy prune was deleting
    for entry in os.listdir(store) if store.is_dir() else ():
        if entry.startswith(DELETING_PREFIX) and base_backup.NAME_RE.fullmatch(entry[len(DELETING_PREFIX):]):
            _remove_entry(store / entry)
            removed.append(f"{base_backup.BASES_DIR}/{entry}")
    return removed


def _remove_entry(path: Path) -> None:
    """Delete one entry of backup_dir: a folder with its files, but a symlink (or file) only
    as the link itself, never what it points to (rmtree refuses links, and must)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


_BDIR_FIX = (f"Make it writable, or set `backup_dir` in config.json to a writable folder on "
             f"another disk, then run `{BACKUP_CMD}`.")


LOCK_WAIT = 30.0  # seconds: two backups started together both succeed, one after the other


NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
FALLBACK_LOCK = ".backups.lock"  # in backup_dir, when the root cannot hold the lock file


@contextlib.contextmanager
def _lock(root, purpose: str, wait: float = LOCK_WAIT, bdir: Path | None = None):
    """The `backups` lock; waits up to `wait` s for another holder, then BusyError (exit 3).

    A root this process cannot write (remounted read-only, another user's folder) cannot
    change under a backup or a `restore --to`, which only read it: the lock is then taken
    without writing there (see _lock_unwritable_root), with a note on stderr.
    """
    path = _p(root).lock("backups")
    try:
        lock = FileLock(path, purpose).acquire(timeout=wait)
    except OSError as exc:
        if exc.errno not in NOT_WRITABLE:
            raise
        with _lock_unwritable_root(path, purpose, wait, bdir, exc):
            yield None
        return
    try:
        yield lock
    finally:
        lock.release()


def _flock_read_only(path: Path, wait: float) -> int:
    """flock needs no write access: an existing lock file opened read-only still excludes
    every holder (the holder's pid just cannot be recorded). Returns the held fd."""
    import fcntl
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BusyError("busy: the backups lock is held", path,
                                "Wait for it to finish, or check it with "
                                "`python3 training_controller.py status`.") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _lock_unwritable_root(path: Path, purpose: str, wait: float, bdir: Path | None,
                          exc: OSError):
    why = f"the training root is read-only for this process ({exc.strerror}: {exc.filename or path})"
    try:
        fd = _flock_read_only(path, wait)
    except OSError:
        fd = None   # no lock file there yet: take the lock in backup_dir instead
    if fd is not None:
        print(f"note: {why}; {purpose} holds its lock file read-only and writes nothing there",
              file=sys.stderr)
        try:
            yield
        finally:
            os.close(fd)  # closing drops the flock
        return
    lock = None
    if bdir is not None:
        try:
            lock = FileLock(bdir / FALLBACK_LOCK, purpose).acquire(timeout=wait)
        except OSError as exc2:
            if exc2.errno not in NOT_WRITABLE:
                raise
    where = f"takes the lock in {bdir / FALLBACK_LOCK}" if lock else \
        "goes on without a lock (nothing it reads can change)"
    print(f"note: {why}; {purpose} {where} and writes nothing in the root", file=sys.stderr)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _make_room(root: Path, cfg: dict, need: int, bdir: Path, prune: bool = True) -> None:
    """Raise (nothing written yet) unless a backup of `need` bytes fits backup_max_disk_gb
    (max_disk_gb too when backup_dir is inside the root) and the free space, after
    applying the backups' retention policy (`prune`)."""
    import retention
    for where in ("backups", "root") if retention.usage(root, cfg)["backups_inside_root"] \
            else ("backups",):
        if prune:
            room = retention.make_room(root, cfg, need, where)
            problem, fix = room["problem"], room["fix"]
        else:
            problem, fix = retention.check_write(root, cfg, need, where), None
        if problem:
            fix = fix or "python3 backup_manager.py prune --keep 1"
            raise GuardrailError(f"not enough free space for a backup ({need} bytes needed: "
                                 f"{problem}); nothing was written", bdir,
                                 f"Free space with `{fix}` (a dry run; add --yes once the user "
                                 "agrees: the newest verified backup always stays), "
                                 "raise the budget in config.json, or set `backup_dir` to a "
                                 f"larger disk, then run `{BACKUP_CMD}`.")


def create_backup(root, src: str | None = None, note: str | None = None) -> dict:
    """Back up `current_model` (or version `src`) into a new verified backup; its record.

    Raises GuardrailError (exit 1) when anything fails; the partial copy is removed, so
    nothing is ever listed that was not proven byte for byte.
    """
    p = _p(root)
    cfg = config(p.root)
    bdir = backups_dir(p.root, cfg)
    folder, source, version, skip, expected = _resolve_source(p.root, src)
    # a configured folder that is missing may be a disk that is not mounted: say so
    warnings = [] if bdir.is_dir() or bdir == p.default_backups else [
        f"backup_dir {bdir} did not exist; created it (if it is on a disk that was not "
        "mounted, this backup is not on that disk)"]
    try:
        bdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuardrailError(f"cannot create backup_dir ({exc.strerror})", bdir,
                             _BDIR_FIX) from None
    need = sum(i["size"] for i in expected.values()) if expected else sum(
        os.path.getsize(folder / r) for r in list_files(folder, skip))
    _make_room(p.root, cfg, need, bdir)  # before the lock: a prune takes it itself
    with _lock(p.root, f"backup {source}", bdir=bdir):
        cleaned = clean_staging(p.root)
        _make_room(p.root, cfg, need, bdir, prune=False)  # another writer may have filled it
        while True:  # reserve an ID: mkdir is atomic, the final rename never replaces
            bid = new_backup_id()
            staging = bdir / (STAGING_PREFIX + bid)
            try:
                os.mkdir(staging)
            except FileExistsError:
                continue
            except OSError as exc:  # read-only, permission: nothing was written
                raise GuardrailError(f"cannot write in backup_dir ({exc.strerror})", bdir,
                                     _BDIR_FIX) from None
            if (bdir / bid).exists():
                os.rmdir(staging)
                continue
            break
        started = time.monotonic()
        with contextlib.suppress(OSError):
            started_ino = os.stat(folder).st_ino  # a swap (restore, rollback, publish) moves it
        try:
            # adapter mode: the base is backed up once (verified), referenced from the record
            base_id = base_store.adapter_base(folder)
            base_ref = base_backup.backup_base(p.root, bdir, base_id) if base_id else None
            import model_versioner
            with (contextlib.nullcontext() if source == "current_model" else
                  model_versioner.pinned(p.root, source, f"backup {bid}")):  # no prune meanwhile
                files = copy_tree_verified(folder, staging, skip=skip, expected=expected,
                                           src_label=str(folder), file_mode=0o444,  # read-only
                                           check_cmd="python3 model_versioner.py verify"
                                           + (f" {version}" if version else ""))  # not the latest
            state = _trainer_state(staging)
            if source == "current_model" and _current_version(p.root) != version:
                version = None  # current_model was replaced while we copied: claim nothing
            now = utc_now()
            record = {"schema_version": SCHEMA_VERSION, "id": bid, "seq": next_seq(p.root),
                      "created_at": now,
                      "source": source, "version": version,
                      "global_step": state.get("global_step"),
                      "tokens_seen": state.get("tokens_seen"), "note": note, "files": files,
                      "total_bytes": sum(f["size"] for f in files.values()),
                      "verified_at": now, "status": "verified"}
            if base_ref:
                record.update(kind="adapter", base=base_ref)
            write_manifest(staging, files=files, global_step=record["global_step"],
                           tokens_seen=record["tokens_seen"])
            atomic_write_json(staging / RECORD, record)
            rename_noreplace(staging, bdir / bid)
        except BaseException as exc:
            _discard(staging)
            swapped = False
            with contextlib.suppress(OSError, NameError):
                swapped = source == "current_model" and os.stat(folder).st_ino != started_ino
            if swapped and isinstance(exc, (OSError, GuardrailError)):  # not damage: a race
                raise GuardrailError(
                    "backup failed: current_model was replaced while it was copied (a restore, "
                    "a rollback or a trained file); nothing was kept", folder,
                    f"Run `{BACKUP_CMD}` again: it copies current_model as it is now.") from exc
            if isinstance(exc, OSError):
                reason = ("no space left on device" if exc.errno == errno.ENOSPC
                          else f"{exc.strerror or exc}")
                raise GuardrailError(
                    f"backup failed: {reason} ({exc.filename or staging}); nothing was kept",
                    bdir, f"Fix the cause, then run `{BACKUP_CMD}`.") from exc
            if isinstance(exc, GuardrailError):
                raise GuardrailError(f"backup failed: {exc.what}; nothing was kept",
                                     exc.where, exc.fix) from exc
            raise
    record["path"] = str(bdir / bid)
    record["seconds"] = round(time.monotonic() - started, 3)
    record["cleaned_staging"] = cleaned
    warning = _same_fs_warning(p.root, cfg)
    record["same_filesystem"] = warning is not None
    record["warnings"] = warnings + ([warning] if warning else [])
    return record


def _discard(staging: Path) -> None:
    """Remove our own staging folder; if that fails too, the next run cleans it."""
    try:
        shutil.rmtree(staging)
    except FileNotFoundError:
        pass
    except OSError as exc:
        print(f"warning: could not remove {staging} ({exc}); the next backup removes it",
              file=sys.stderr)


# --------------------------------------------------------------------------- verify

def verify_backup(root, bid: str) -> list[str]:
    """Re-read every byte of backup `bid` from disk; the problems found (empty: good).

    Records the outcome (status, verified_at) in its backup.json.
    """
    folder = _backup_path(root, bid)
    rec = read_record(folder)
    if rec is None or not isinstance(rec.get("files"), dict):
        return [f"{RECORD}: missing or unreadable"]
    problems = []
    want = rec["files"]
    present = set(list_files(folder, set(META_FILES)))
    for rel in sorted(present - set(want)):
        problems.append(f"{rel}: extra file, not in the backup's manifest")
    for rel, info in sorted(want.items()):
        path = folder / rel
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        if not isinstance(info, dict):  # backup.json edited by hand
            problems.append(f"{rel}: no sha256/size in {RECORD}")
            continue
        if (linked := not_its_own(folder, rel)) is not None:  # a backup holds its own copies
            problems.append(linked)
            continue
        size, want_size = os.path.getsize(path), info.get("size")
        if not isinstance(want_size, int):  # backup.json edited by hand
            problems.append(f"{rel}: no valid size in {RECORD} (got {want_size!r})")
            continue
        if size != want_size:
            kind = "truncated" if size < want_size else "grown"
            problems.append(f"{rel}: {kind} ({size} bytes, expected {want_size})")
            continue
        digest, _ = hash_file(path, cold=True)
        if digest != info.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch ({digest[:12]}…, expected "
                            f"{str(info.get('sha256'))[:12]}…)")
    if rec.get("base") is not None:  # an adapter's backup: its base copy must be good too
        problems += base_backup.verify_base_copy(folder.parent, rec["base"])
    rec["status"] = "corrupt" if problems else "verified"
    rec["verified_at"] = utc_now()
    rec["problems"] = problems
    try:
        atomic_write_json(folder / RECORD, rec)
    except OSError as exc:  # a read-only backup disk: the result still stands
        print(f"warning: could not record the verification in {folder / RECORD} ({exc})",
              file=sys.stderr)
    return problems


# --------------------------------------------------------------------------- restore

def restore_backup(root, bid: str, to: str | os.PathLike | None = None) -> dict:
    """Verify backup `bid`, then make it current_model (keeping the present state as a
    version first) or write it into the new/empty folder `to`."""
    p = _p(root)
    if to is not None and not str(to).strip():  # Path("") is the working folder: never a guess
        raise UsageError("--to needs a folder", None, "Give a new or empty folder: --to DIR.")
    folder = _backup_path(p.root, bid)
    with _lock(p.root, f"restore {bid}", bdir=backups_dir(p.root)):  # prune must not delete it under our feet
        if to is not None:
            return _restore_locked(p, folder, bid, to)
        # The model lock from before the check to the publish: the daemon takes no file from
        # the queue meanwhile, and no file's end-of-file publish can undo this restore.
        with model_lock(p.root, f"restore backup {bid}"):
            return _restore_locked(p, folder, bid, to)


def _restore_locked(p: Paths, folder: Path, bid: str, to) -> dict:
    if to is None:
        training_controller.refuse_while_training(p.root)  # cheap, so before the long verify too
        import model_versioner  # as a version's restore: the gate's decision would undo it
        model_versioner.refuse_during_hold(p, f"restore backup {bid}",
                                           allowed=(read_record(folder) or {}).get("version"),
                                           again=f"python3 backup_manager.py restore {bid}")
    problems = verify_backup(p.root, bid)
    if problems:
        raise GuardrailError(
            f"backup {bid} is corrupt ({problems[0]}"
            + (f"; {len(problems) - 1} more problem(s)" if len(problems) > 1 else "")
            + "); nothing was restored", folder,
            f"List the others with `{LIST_CMD}` and check one with "
            "`python3 backup_manager.py verify ID`.")
    rec = read_record(folder)
    if to is not None:
        return _restore_to(folder, rec, _check_target(p, bid, to))
    training_controller.refuse_while_training(p.root)
    import model_versioner
    kept, previous, attic = None, None, False
    if os.path.lexists(p.current_model):
        previous = model_versioner.present_version(p.root)  # (a copy of one: not stored again)
        if previous is None and not model_versioner.check_model_dir(p.current_model):
            # keep the present state first, so this restore can be undone
            kept, _ = model_versioner.create_version(p.root, "pre-backup-restore")
            previous = kept
        elif previous is None:  # incomplete (what a restore repairs): publish_model
            attic = True        # hard-links it into ROOT/.attic/ rather than versioning it
    p.staging.mkdir(parents=True, exist_ok=True)
    # A restore killed mid-copy left its full copy here; only restores (which hold the
    # backups lock, as we do) write these, so any one found now is a leftover.
    for old in p.staging.glob("backup-restore-*"):
        _discard(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    staged = p.staging / f"backup-restore-{bid}-{secrets.token_hex(3)}"
    # an adapter never comes back without its base (verified above with the backup)
    base_done = base_backup.install_base(p.root, folder.parent, rec["base"]) \
        if rec.get("base") else None
    try:
        files = copy_tree_verified(folder, staged, skip=set(META_FILES), expected=rec["files"])
        for rel, entry in files.items():  # a write in place moves it (model_versioner.copy_of_version)
            entry["mtime_ns"] = os.stat(staged / rel).st_mtime_ns
        # its parent is the version it was a backup of (rollback goes back from there, and
        # lineage lists what trained into that), not the model it replaces: none if unknown
        source = rec.get("version")
        known = isinstance(source, str) and model_versioner.VERSION_RE.fullmatch(source) and (
            (p.versions / source).is_dir() or (p.versions / ".pruned" / f"{source}.json").is_file())
        # the copy is that version's bytes only if the version still holds them: hashed now (a
        # restore reads the whole model anyway), as bit rot keeps sizes and time stamps
        copy_of = source if known and (p.versions / source).is_dir() and \
            _version_holds(p.root, source, files) else None
        write_manifest(staged, files=files, global_step=rec.get("global_step"),
                       tokens_seen=rec.get("tokens_seen"),
                       extra={**(_kind_of(rec) or {}), **({"copy_of": copy_of} if copy_of else {})})
        model_versioner.publish_model(p.root, staged, reason="backup-restore",
                                      parent=source if known else None)
    finally:
        if staged.exists():
            _discard(staged)
    return {"ok": True, "id": bid, "restored_to": str(p.current_model), "kept_version": kept,
            "previous_version": previous, "incomplete_kept_in": str(p.root / ".attic")
            if attic else None, "global_step": rec.get("global_step"),
            "version": rec.get("version"), "base": (rec.get("base") or {}).get("id"),
            "base_restored": base_done,
            "undo": f"python3 model_versioner.py restore {previous}" if previous else None}


def repair_version(root, vid: str) -> dict:
    """Put back the bytes of version `vid` that changed since it was recorded (bit rot, a
    write in place) from the newest verified backup holding them: each bad file is copied
    from the backup beside the version, checked against the version's own record, and
    renamed over the bad one; a current_model that shared the bad file (it was `vid`) is
    given the sound one too. A file with its recorded bytes but a moved time stamp (a
    `touch`) only has its time stamp recorded again. VERSION_DAMAGED then clears."""
    import model_versioner
    p = _p(root)
    training_controller.refuse_while_training(p.root)
    with model_lock(p.root, f"repair {vid}"), model_versioner.versions_lock(p, f"repair {vid}"):
        vid = model_versioner.resolve_version(p.root, vid)
        rec = model_versioner.read_version(p.root, vid)
        folder = p.versions / vid
        bad, touched = [], []
        for rel, entry in sorted(rec["manifest"].items()):
            path = folder / rel
            try:
                model_versioner.require_safe_rel(rel, folder)
                st = os.lstat(path)
                sound = stat.S_ISREG(st.st_mode) and hash_file(path, cold=False) == (
                    entry.get("sha256"), entry.get("size"))
            except OSError:
                sound = False
            if not sound:
                bad.append(rel)
            elif entry.get("mtime_ns") not in (None, st.st_mtime_ns):
                touched.append(rel)
        holder = None
        if bad:
            def holds(b, rel) -> bool:  # (a hand-edited record: anything but a dict holds nothing)
                entry = b.get("files", {}).get(rel) if isinstance(b.get("files"), dict) else None
                return isinstance(entry, dict) and entry.get("sha256") == rec["manifest"][rel].get("sha256")
            holder = next((b for b in reversed(list_backups(p.root)) if b.get("status") == "verified"
                           and all(holds(b, rel) for rel in bad)), None)
            if holder is None:
                raise GuardrailError(
                    f"version {vid}'s {', '.join(bad[:5])} changed since it was recorded, and no "
                    "verified backup holds those bytes; nothing was changed", folder,
                    f"Restore another version (`python3 model_versioner.py list`), or a backup of "
                    f"another one (`{LIST_CMD}`).")
        staging = p.versions / f".staging-repair-{secrets.token_hex(4)}"
        shared = set()
        try:
            for n, rel in enumerate(bad):
                tmp = staging / str(n)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                src = _backup_path(p.root, holder["id"]) / rel
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                entry = rec["manifest"][rel]
                if hash_file(tmp) != (entry.get("sha256"), entry.get("size")):
                    raise GuardrailError(
                        f"backup {holder['id']}'s {rel} does not hold what version {vid} "
                        "recorded; nothing was changed", src,
                        f"Check it with `python3 backup_manager.py verify {holder['id']}`.")
            for n, rel in enumerate(bad):  # all copied and proven: now swap them in
                sound = staging / str(n)
                os.chmod(sound, model_versioner.READ_ONLY)
                if same_file(folder / rel, p.current_model / rel):
                    # current_model was this version: its link first, so a repair killed
                    # between the two renames is finished by running it again
                    shared.add(rel)
                    p.staging.mkdir(parents=True, exist_ok=True)  # (a leftover: recover's)
                    tmp = p.staging / f"{model_versioner.PREFIX}repair-{secrets.token_hex(4)}"
                    os.link(sound, tmp)
                    os.replace(tmp, p.current_model / rel)
                os.replace(sound, folder / rel)
            if bad or touched:
                manifest = {rel: ({**e, "mtime_ns": os.stat(folder / rel).st_mtime_ns}
                                  if rel in bad or rel in touched else e)
                            for rel, e in rec["manifest"].items()}
                atomic_write_json(folder / model_versioner.VERSION_FILE, {**rec, "manifest": manifest})
                os.chmod(folder / model_versioner.VERSION_FILE, model_versioner.READ_ONLY)
            for d in {folder, p.current_model, *((folder / r).parent for r in bad)}:
                fsync_dir(d)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        base = model_versioner.version_base(rec)  # an adapter's base is repaired by restore-base
        base_bad = bool(base and base_store.verify_base(p.root, base))
    return {"ok": True, "version": vid, "repaired": bad, "time_stamps": touched,
            "from_backup": holder["id"] if holder else None, "current_model_too": sorted(shared),
            "base_damaged": base if base_bad else None,
            "base_fix": model_versioner.base_fix(p.root, base) if base_bad else None}


def _version_holds(root, vid: str, files: dict) -> bool:
    """Version `vid` records exactly `files`' sha256s and its files hold them (hashed)."""
    import model_versioner
    try:
        rec = model_versioner.read_version(root, vid)
        recorded = {rel: e.get("sha256") for rel, e in rec["manifest"].items()}
        return recorded == {rel: e.get("sha256") for rel, e in files.items()} and \
            not model_versioner.verify_version(root, vid)
    except (GuardrailError, OSError):
        return False


def restore_base(root, base_id: str) -> dict:
    """Bring base `base_id` back into ROOT/base/ from the newest backup holding a copy of
    it (verified first); nothing changes when the root's base is already good."""
    p = _p(root)
    base_store.validate_base_id(base_id)
    holders = [b for b in list_backups(p.root)
               if isinstance(b.get("base"), dict) and b["base"].get("id") == base_id]
    ref = holders[-1]["base"] if holders else None
    if ref is None:  # its backups were pruned, but a verified copy may still be there
        ref = next(iter(base_backup.kept_copies(backups_dir(p.root), base_id)), None)
    if ref is None:
        raise GuardrailError(f"no backup holds base {base_id}", backups_dir(p.root),
                             "Restore a version on another base or a full one "
                             "(`python3 model_versioner.py list` shows each one's kind).")
    with _lock(p.root, f"restore base {base_id}", bdir=backups_dir(p.root)):
        done = base_backup.install_base(p.root, backups_dir(p.root), ref)
    return {"ok": True, "base": base_id, "from_backup": holders[-1]["id"] if holders else ref["path"],
            "restored": done is not None, "message": done or f"base {base_id} is already good"}


def _check_target(p: Paths, bid: str, to) -> Path:
    """`--to DIR` resolved; never inside a folder the product manages (a model folder put
    in versions/ would look like a version; in current_model/ it would bypass the swap)."""
    target = Path(to).expanduser().resolve()
    bdir = backups_dir(p.root).resolve()
    managed = p.managed_inside(target) or (bdir if target == bdir or bdir in target.parents else None)
    if managed is not None:
        raise GuardrailError(
            f"--to is {'the training root or above it' if managed == p.root.resolve() else 'inside ' + str(managed)}"
            ", where only the product writes (a model folder there would be taken for data, "
            "a version or a backup)", target,
            f"Make the backup current_model with `python3 backup_manager.py restore {bid}`, "
            "or give --to a folder outside the training root's folders (e.g. "
            f"{shlex.quote(str(p.root.resolve().parent / ('restored-' + bid)))}).")
    return target


def _kind_of(rec: dict) -> dict | None:
    """The manifest's kind and base for a restored copy of backup `rec` (None: full)."""
    base = rec.get("base")
    return {"kind": "adapter", "base": base["id"]} if isinstance(base, dict) else None


def _restore_to(folder: Path, rec: dict, to: Path) -> dict:
    fix = ("Choose a new or empty folder: `python3 backup_manager.py restore "
           f"{rec.get('id') or folder.name} --to {shlex.quote(str(to) + '-restored')}`.")
    if to.exists() and not to.is_dir():
        raise GuardrailError("--to names a file; restore never writes over files", to, fix)
    if to.exists() and any(to.iterdir()):
        raise GuardrailError("target folder is not empty; restore never writes over files", to,
                             fix)
    to.parent.mkdir(parents=True, exist_ok=True)
    staged = to.parent / f".{to.name}.restore-{secrets.token_hex(3)}"
    try:
        files = copy_tree_verified(folder, staged, skip=set(META_FILES), expected=rec["files"])
        if rec.get("base"):  # an adapter never comes back without its base: a copy inside
            files.update(base_backup.export_base(folder.parent, rec["base"], staged, to))
        write_manifest(staged, files=files, global_step=rec.get("global_step"),
                       tokens_seen=rec.get("tokens_seen"), extra=_kind_of(rec))
        if to.exists():
            os.rmdir(to)  # empty (checked above); fails rather than lose anything if not
        rename_noreplace(staged, to)
    finally:
        if staged.exists():
            _discard(staged)
    return {"ok": True, "id": rec.get("id"), "restored_to": str(to), "kept_version": None,
            "global_step": rec.get("global_step"), "version": rec.get("version")}


# --------------------------------------------------------------------------- prune and policy

def backup_in_background(root, note: str | None = None, timeout: float | None = None) -> dict:
    """For the daemon: run `backup --idle --json` in a child process (SCHED_IDLE, so
    training keeps its cores) and return its record; GuardrailError naming the cause if it
    fails, so the caller can pause with that warning."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--root", str(_p(root).root),
           "backup", "--idle", "--json"] + (["--note", note] if note else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GuardrailError(f"automatic backup did not finish within {timeout:.0f} s",
                             backups_dir(root), f"Run `{BACKUP_CMD}` to see why.") from None
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        doc = None
    if proc.returncode == 0 and isinstance(doc, dict):
        return doc
    err = (doc or {}).get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and err.get("what"):
        raise GuardrailError(err["what"], err.get("where"), err.get("fix"),
                             exit_code=err.get("exit_code"))
    tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    raise GuardrailError(f"automatic backup exited {proc.returncode} ({tail[0]})",
                         backups_dir(root), f"Run `{BACKUP_CMD}` to see why.")


def prune_plan(root, keep: int | None = None, *, rules: dict | None = None,
               bad: set | None = None, cfg: dict | None = None) -> dict:
    """Which backups the retention policy keeps (config retention.backups, or `--keep N`:
    the newest N), with why; only verified independent copies (no links) count toward the
    rules, and the newest of them is always kept. `bad`: ids found corrupt just now."""
    import retention
    p = _p(root)
    cfg = cfg if cfg is not None else config(p.root)
    if rules is None:
        rules = {"keep_last": keep} if keep is not None else retention.policy(cfg, "backups")
    rules = {r: int(rules.get(r) or 0) for r in retention.RULES}
    bdir = backups_dir(p.root, cfg)
    backups = list_backups(p.root, cfg)
    good = [b for b in backups if b.get("status") == "verified" and b["id"] not in (bad or ())
            and not (bdir / b["id"]).is_symlink()]  # a link is no independent copy
    reasons = retention.apply_rules([(b["id"], b.get("created_at")) for b in good], rules)
    if good:
        reasons.setdefault(good[-1]["id"], []).append("latest verified")
    return {"policy": rules, "reasons": {b["id"]: reasons[b["id"]] for b in backups
                                        if b["id"] in reasons},
            "kept": [b["id"] for b in backups if b["id"] in reasons],
            "doomed": [b["id"] for b in backups if b["id"] not in reasons]}


def prune_backups(root, keep: int | None = None, yes: bool = False, *,
                  rules: dict | None = None, verify_kept: bool = True) -> dict:
    """Apply the retention policy to backups (config retention.backups; `keep`: only the
    newest N), deleting the rest. Dry run unless `yes`.

    With `yes`, the backups to keep are re-verified first (`verify_kept`), so a backup is
    deleted only once the ones that replace it are proven; one that fails is not counted
    and the plan is made again. The last verified backup is never deleted. The daemon's
    automatic pass (after each backup) trusts the verification each backup had when it
    was written (`verify_kept=False`): re-reading every kept copy each time would cost
    hours of disk reads a day on a big model.
    """
    p = _p(root)
    cfg = config(p.root)
    if keep is not None and keep < 1:
        raise UsageError(f"--keep must be at least 1 (got {keep})", None,
                         "Run `python3 backup_manager.py prune --keep 1`.")
    with _lock(p.root, "prune", bdir=backups_dir(p.root, cfg)):
        if yes:
            clean_staging(p.root)
        bad: set = set()
        proven: set = set()
        while True:
            plan = prune_plan(p.root, keep, rules=rules, bad=bad, cfg=cfg)
            if not (yes and verify_kept):
                break
            unproven = [b for b in plan["kept"] if b not in proven]
            if not unproven:
                break
            for bid in unproven:
                (bad if verify_backup(p.root, bid) else proven).add(bid)
        if not plan["kept"]:
            raise GuardrailError("no verified backup exists; prune deletes nothing",
                                 backups_dir(p.root, cfg),
                                 f"Make one with `{BACKUP_CMD}`, then prune.")
        doomed = plan["doomed"]
        bdir = backups_dir(p.root, cfg)
        # base copies (adapter mode) no backup left names, of bases no version applies to
        named = set()
        for b in list_backups(p.root, cfg):
            if b["id"] not in doomed and isinstance(b.get("base"), dict):
                with contextlib.suppress(GuardrailError):
                    named.add(base_backup.copy_path(bdir, b["base"]).name)
        bases = base_backup.unused_copies(p.root, bdir, named)
        if yes:
            for bid in doomed:  # rename first: a half-deleted backup is never listed
                gone = bdir / (DELETING_PREFIX + bid)
                os.rename(bdir / bid, gone)
                fsync_dir(bdir)
                _remove_entry(gone)  # a symlink: only the link goes, never its target
            for name in bases:
                gone = bdir / base_backup.BASES_DIR / (DELETING_PREFIX + name)
                os.rename(bdir / base_backup.BASES_DIR / name, gone)
                fsync_dir(gone.parent)
                _remove_entry(gone)
    return {"ok": True, "dry_run": not yes, "keep": keep, "policy": plan["policy"],
            "kept": plan["kept"], "reasons": plan["reasons"],
            "deleted" if yes else "would_delete": doomed,
            "base_copies_deleted" if yes else "base_copies_would_delete": bases}


def backup_due(root, cfg: dict, files_since_last: int, latest: dict | None | bool = False) -> bool:
    """True when the backup policy asks for a backup now (every N files and/or hours).

    Not due when the newest verified backup already holds current_model's global_step.
    `latest`: latest_backup(root) when the caller has read it already.
    """
    if latest is False:
        latest = latest_backup(root)
    if latest is not None:
        state = _trainer_state(_p(root).current_model)
        if state.get("global_step") is not None and state.get("global_step") == latest.get(
                "global_step") and files_since_last == 0:
            return False
    every_files, every_hours = cfg.get("backup_every_files", 0), cfg.get("backup_every_hours", 0)
    if every_files and files_since_last >= every_files:
        return True
    if every_hours:
        if latest is None or _dated_in_the_future(latest):
            return True  # a clock that ran ahead made that date: how old it is, nobody knows
        age = latest.get("age_seconds")
        return age is None or age >= every_hours * 3600
    return False


FUTURE_SLACK_S = 60.0  # NTP slews small offsets; only a step of more than this is a clock jump


def _dated_in_the_future(rec: dict) -> bool:
    try:
        return parse_time(rec.get("created_at")) > time.time() + FUTURE_SLACK_S
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- CLI

def _human_bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _human_age(s) -> str:
    if s is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def cmd_backup(args) -> int:
    """Back up current_model (or a version id) as a verified, independent copy."""
    if args.idle:
        set_idle_priority()
    rec = create_backup(args.root, args.src, note=args.note)
    if args.prune:  # the daemon's automatic backups: retention right after each one
        rec["pruned"] = prune_backups(args.root, yes=True, verify_kept=False)["deleted"]
    if args.json:
        print_json(dict(rec, ok=True))
    else:
        print(f"backup {rec['id']}: {len(rec['files'])} files, {_human_bytes(rec['total_bytes'])}, "
              f"verified from disk in {rec['seconds']:.1f}s -> {rec['path']}")
        for w in rec["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    """List the newest backups, oldest first: age, size, verified-at and status (never the
    staging ones); --limit N (default 50), --all for every one."""
    limit = None if args.all else args.limit
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}", backups_dir(args.root),
                         f"Run `{cli_guard.command('python3 backup_manager.py list --all', cli_guard.explicit_root(args))}`.")
    every = backup_records.summaries(args.root)  # each record but its file list
    backups = every[-limit:] if limit else every
    more = len(every) - len(backups)
    warning = _same_fs_warning(args.root)
    if args.json:
        earlier = backup_records.earlier_folder(args.root)
        print_json({"ok": True, "backup_dir": str(backups_dir(args.root)),
                    "earlier_backup_dir": str(earlier) if earlier is not None else None,
                    "same_filesystem": warning is not None,
                    "warnings": [warning] if warning else [], "backups": backups,
                    "total": len(every), "not_listed": more})
        return 0
    if not backups_dir(args.root).is_dir():
        print(f"backup_dir {backups_dir(args.root)} does not exist (no backup yet, or its disk is "
              f"not mounted); `{BACKUP_CMD}` creates it")
    elif not backups:
        print(f"no backups in {backups_dir(args.root)}; make one with `{BACKUP_CMD}`")
    if more:
        print(f"  ({more} older backup(s) not listed: "
              f"`{cli_guard.command('python3 backup_manager.py list --all', cli_guard.explicit_root(args))}`)")
    for b in backups:
        print(f"{b['id']}  {_human_age(b.get('age_seconds')):>6} ago  "
              f"{_human_bytes(b.get('total_bytes')):>9}  {b.get('status', '?'):<10}  "
              f"verified {b.get('verified_at') or '-'}  {b.get('source') or '-'}"
              f"@{b.get('version') or '-'} step {b.get('global_step')}"
              + (f"  {cli_guard.shown(b['note'])}" if b.get("note") else ""))
    earlier = backup_records.earlier_folder(args.root)
    if earlier is not None and any(backup_records.ID_RE.fullmatch(n) for n in os.listdir(earlier)):
        print(f"  (backups made before backup_dir changed are in {earlier}: `restore ID` and "
              "`verify ID` find them there too)")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    """Re-read every byte of one backup (default: the newest), or of all with --all."""
    if args.all and args.id is not None:
        raise UsageError(f"give a backup id or --all, not both (got {args.id} and --all)",
                         backups_dir(args.root), "Run `python3 backup_manager.py verify --all`.")
    if args.all:
        ids = [b["id"] for b in list_backups(args.root)]
    elif args.id is not None:
        ids = [check_id(args.id, backups_dir(args.root))]
    else:
        all_ = list_backups(args.root)
        if not all_:
            raise GuardrailError("no backups to verify", backups_dir(args.root),
                                 f"Make one with `{BACKUP_CMD}`.")
        ids = [all_[-1]["id"]]
    results = [{"id": bid, "ok": not (pr := verify_backup(args.root, bid)), "problems": pr}
               for bid in ids]
    bad = [r for r in results if not r["ok"]]
    if args.json:
        print_json({"ok": not bad, "backups": results})
    else:
        for r in results:
            print(f"{r['id']}: " + ("ok" if r["ok"] else "CORRUPT"))
            for pr in r["problems"]:
                print(f"  {pr}")
    if bad:
        b = bad[0]
        print(f"Error: backup {b['id']} is corrupt ({b['problems'][0]}), "
              f"{backups_dir(args.root) / b['id']}. Make a new one with "
              f"`{cli_guard.command(BACKUP_CMD, cli_guard.explicit_root(args))}`.",
              file=sys.stderr)
        return 1
    return 0


def cmd_restore(args) -> int:
    """Verify a backup, keep the present model as a version, then make the backup current."""
    result = restore_backup(args.root, check_id(args.id, backups_dir(args.root)), to=args.to)
    if result.get("undo"):
        result["undo"] = cli_guard.command(result["undo"], cli_guard.explicit_root(args))
    if args.json:
        print_json(result)
    else:
        print(f"restored backup {result['id']} to {result['restored_to']}")
        if result.get("incomplete_kept_in"):
            print(f"the incomplete current_model it replaced is kept in "
                  f"{result['incomplete_kept_in']}/")
        if result.get("undo"):
            print(f"the previous model is version {result['previous_version']}; "
                  f"undo with `{result['undo']}`")
    return 0


def cmd_repair(args) -> int:
    """Put back a version's changed files from the newest verified backup holding them."""
    result = repair_version(args.root, args.version)
    if args.json:
        print_json(result)
    elif not result["repaired"] and not result["time_stamps"]:
        print(f"version {result['version']} holds what it recorded: nothing to repair"
              + (f"; its base {result['base_damaged']} is damaged. {result['base_fix']}."
                 if result["base_damaged"] else ""))
    else:
        if result["repaired"]:
            print(f"repaired {result['version']}: {', '.join(result['repaired'])} from backup "
                  f"{result['from_backup']}" + (" (current_model, which shares them, too)"
                                                if result["current_model_too"] else ""))
        if result["time_stamps"]:
            print(f"{result['version']}: {', '.join(result['time_stamps'])} hold what was "
                  "recorded (only the time stamp moved): recorded again")
        if result["base_damaged"]:
            print(f"Its base {result['base_damaged']} is damaged too. {result['base_fix']}.")
    return 0


def cmd_restore_base(args) -> int:
    """Bring an adapter's base (b001, ...) back into ROOT/base/ from a backup holding it."""
    result = restore_base(args.root, args.base_id)
    print_json(result) if args.json else print(result["message"]
                                               + f" (from backup {result['from_backup']})")
    return 0


def cmd_prune(args) -> int:
    """Apply the retention policy to backups (config retention.backups, or --keep N: the
    newest N verified); a dry run unless --yes."""
    import retention
    result = prune_backups(args.root, keep=args.keep, yes=args.yes)
    if args.json:
        print_json(result)
    else:
        gone = result.get("deleted", result.get("would_delete", []))
        verb = "deleted" if args.yes else "would delete"
        source = f"--keep {args.keep}" if args.keep is not None else "config retention.backups"
        print(f"policy: {retention.describe(result['policy'])} ({source})")
        for bid in result["kept"]:
            print(f"keep    {bid}  ({', '.join(result['reasons'].get(bid, []))})")
        bases = result.get("base_copies_deleted", result.get("base_copies_would_delete", []))
        print(f"keeping {', '.join(result['kept'])}; {verb}: {', '.join(gone) or 'nothing'}"
              + (f"; and the base copies {', '.join(bases)} (no backup names them, no version "
                 "applies to their base)" if bases else ""))
        if not args.yes and (gone or bases):
            again = "python3 backup_manager.py prune" + (
                f" --keep {args.keep}" if args.keep is not None else "") + " --yes"
            print(f"dry run: run `{cli_guard.command(again, cli_guard.explicit_root(args))}` to "
                  "delete (kept backups are re-verified first)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backup_manager.py",
                                      description=__doc__.split("\n")[0])
    add_common_args(parser)
    add = subcommands(parser, wrap=cli_guard.guarded)
    sp = add("backup", cmd_backup)
    sp.add_argument("src", nargs="?", default=None,
                    help="current_model (default), or a version: vNNN, a tag or latest (or the "
                         "path of current_model or a version folder)")
    sp.add_argument("--note", default=None, help="a note kept in backup.json")
    sp.add_argument("--idle", action="store_true", help="run at SCHED_IDLE CPU priority")
    sp.add_argument("--prune", action="store_true", help="then apply the retention policy "
                    "(config retention.backups), trusting each kept backup's last verification")
    sp = add("list", cmd_list)
    sp.add_argument("--limit", type=int, default=50, metavar="N",
                    help="the newest N backups (default 50)")
    sp.add_argument("--all", action="store_true", help="every backup")
    sp = add("verify", cmd_verify)
    sp.add_argument("id", nargs="?", default=None, help="backup id (default: the newest)")
    sp.add_argument("--all", action="store_true", help="verify every backup")
    sp = add("restore", cmd_restore)
    sp.add_argument("id", help="backup id, as shown by `list`")
    sp.add_argument("--to", metavar="DIR", default=None,
                    help="restore into this new or empty folder instead of current_model")
    sp = add("repair", cmd_repair)
    sp.add_argument("version", help="the damaged version (vNNN, a tag or latest)")
    sp = add("restore-base", cmd_restore_base)
    sp.add_argument("base_id", help="the base an adapter version names (b001, ...)")
    sp = add("prune", cmd_prune)
    sp.add_argument("--keep", type=int, default=None, help="keep only the newest N verified "
                    "backups (default: the policy in config retention.backups)")
    sp.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
