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
import errno
import fcntl
import functools
import json
import os
import shlex
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import trainroot
from trainroot import (SCRIPTS_DIR, GuardrailError, Paths, UsageError, add_common_args,
                       atomic_write_json, print_json, read_json, rename_noreplace, require_root,
                       resolve_root, run_cli, sha256_file, subcommands, utc_now)

SCHEMA_VERSION = 1
PRIORITIES = ("high", "normal", "low")
RECORD_SUFFIX = ".record.json"
INCOMING = ".incoming"          # queue/.incoming/: claimed from the inbox, not yet validated
IGNORED_PATTERNS = (".*", "*.tmp", "*.part", "*.partial", "*~", "*.swp", "4913")
LIST_CMD = "python3 training_queue.py list"
_IGNORED_ENDINGS = (".tmp", ".part", ".partial", "~", ".swp", RECORD_SUFFIX)  # is_ignored


# --------------------------------------------------------------------------- names and records

def is_ignored(name: str) -> bool:
    """Hidden and temporary names (editors, downloads, copies in progress) are never taken."""
    # IGNORED_PATTERNS as string tests (fnmatch per pattern cost ~12 us a name: 2.6 s
    # for a done/ of 100,000 files)
    return name.startswith(".") or name.endswith(_IGNORED_ENDINGS) or name == "4913"


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


SEQ_FILE = ".seq"   # queue/.seq: the last arrival sequence given (a hidden name: never data)


def new_seq(root=None) -> int:
    """Arrival order: nanoseconds since the epoch, but always above the last one given on
    `root` (queue/.seq, under flock; a few microseconds): a clock stepped back (NTP, a VM
    resumed) never puts a new file before older ones. `recover` raises the counter to the
    largest queued seq at daemon start, should a crash have lost its last write."""
    now = time.time_ns()
    if root is None:
        return now
    return _raise_seq(root, now, increment=True)


def _raise_seq(root, at_least: int, increment: bool = False) -> int:
    path = Paths(root).queue / SEQ_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            last = int(os.pread(fd, 32, 0).strip() or 0)
        except ValueError:  # cut short by a crash: the clock and `recover` still hold
            last = 0
        seq = max(at_least, last + 1 if increment else last)
        if seq != last:
            text = b"%d\n" % seq
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
        return seq
    finally:
        os.close(fd)


# A data file's name leaves room for its record's suffix, the temp name the record is
# written under (".NAME.record.json.XXXXXXXX.tmp") and a "-N" clash suffix within the
# 255 bytes a file name may have: a longer name is shortened, keeping its extension.
MAX_NAME_BYTES = 200


def fit_name(name: str) -> str:
    """`name` as a lifecycle folder can hold it: visible (a hidden or temporary name would
    be ignored there, so never listed nor trained) and shortened (at a character
    boundary, extension kept) to MAX_NAME_BYTES."""
    if is_ignored(name):
        name = name.lstrip(".") or "data"
        if is_ignored(name):
            name += ".file"
    if len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES:
        return name
    base, ext = os.path.splitext(name)
    room = MAX_NAME_BYTES - len(ext.encode("utf-8", "surrogateescape"))
    base = base.encode("utf-8", "surrogateescape")[:max(room, 1)].decode("utf-8", "ignore")
    return (base or "data") + ext


ORPHAN_STALE_S = 60.0  # a record without its data this old is no mover's claim in progress


def _drop_own_orphan(dst: Path, record: dict) -> None:
    """The record a mover killed between its two steps left at `dst` (its data never came):
    this very content's (same sha256) or stale, it is removed, so a rerun keeps the name
    (before: `x-2.jsonl`, beside a record of `x.jsonl` with no file, which read as a loss)."""
    rec_path = record_path(dst)
    try:
        if os.path.lexists(dst) or not os.path.lexists(rec_path) or \
                read_record(dst).get("data_removed"):  # a trained file's record: stays
            return
        mine = record.get("sha256") and read_record(dst).get("sha256") == record.get("sha256")
        if mine or time.time() - os.lstat(rec_path).st_mtime > ORPHAN_STALE_S:
            os.unlink(rec_path)
    except (OSError, GuardrailError):
        return  # (gone meanwhile, or unreadable: the name is skipped as before)


def _free_destination(directory: Path, name: str, moving: Path | None = None) -> Path:
    """A name free for both the data file and its record (an orphan record blocks it too).

    In a queue folder the name must be free in all three: `set-priority NAME` and
    `remove NAME` then always mean one file (the file `moving` does not clash with itself).
    """
    name = fit_name(name)
    places = [directory]
    if directory.parent.name == "queue" and directory.name in PRIORITIES:
        places += [directory.parent / pr for pr in PRIORITIES if pr != directory.name]
    stem, dot, ext = name.partition(".")
    n, candidate = 2, name
    while any(d / candidate != moving and (os.path.lexists(d / candidate)
                                           or os.path.lexists(record_path(d / candidate)))
              for d in places):
        candidate = f"{stem}-{n}{dot}{ext}"
        n += 1
    return directory / candidate


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
                     name: str | None = None, batch: SyncBatch | None = None,
                     finish=None) -> Path:
    """Move a data file into `directory` under a free name, with its record beside it.

    Order: write the new record (claiming the name: never replacing one), rename the data
    (never replacing), drop the old record. Two movers racing for one free name: one
    claims it, the other takes the next. A crash between steps leaves at most an orphan
    record, which `recover` removes; the data file itself is always whole and in exactly
    one place. `finish(dst)` returns fields that depend on the final name (the command
    that fixes a failed file names where it is), written with the record in one go.
    """
    src, directory = Path(src), Path(directory)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
    record = dict(record)
    if event:
        record.setdefault("history", []).append({"at": utc_now(), "to": directory.name, "why": event})
    _drop_own_orphan(directory / fit_name(name or src.name), record)
    while True:
        dst = _free_destination(directory, name or src.name, moving=src)
        record["name"] = dst.name
        if finish is not None:
            record.update(finish(dst))
        same_record = record_path(dst) == record_path(src)  # renamed in place: its own record
        try:
            atomic_write_json(record_path(dst), record, sync=batch is None,
                              replace=same_record)
        except FileExistsError:
            continue  # another mover claimed that name first
        try:
            rename_noreplace(src, dst, sync=batch is None)
            break
        except FileExistsError:  # a file arrived under that name without a record
            if not same_record:
                os.unlink(record_path(dst))
            continue
        except BaseException:
            if not same_record:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record_path(dst))
            raise
    old = record_path(src)
    if old != record_path(dst):
        try:
            os.unlink(old)
        except FileNotFoundError:
            pass
        except OSError as exc:        # a name too long to have had a record (an inbox file)
            if exc.errno != errno.ENAMETOOLONG:
                raise
    if batch is not None:
        batch.dirs.update((str(dst.parent), str(src.parent)))
    return dst


def sync_data(path) -> None:
    """fsync a data file's content before a record says it is queued: otherwise a power cut
    can keep the record (3,000 records, its sha256) beside a file that never reached the
    disk (0 bytes). Links, pipes and sockets have no content of their own: nothing to do."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
    finally:
        os.close(fd)


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


def usable_record(data: Path) -> bool:
    """A file in processing/ has a readable record with its sha256 (what the daemon writes
    before it moves a file there)."""
    return _record_ok(data) and bool(read_record(data).get("sha256"))


def recover_processing(p: Paths, data: Path) -> str:
    """A file in processing/ without a usable record (put there by hand, or its record
    damaged): a damaged record is kept aside in `.attic/`. If a checkpoint of this
    very content exists (its id names the file and its sha256), it was trained part-way:
    the record is rebuilt from that id and the file stays, so it resumes there rather than
    training its first steps twice. Else it goes back to intake: validated, hashed and
    deduplicated like any file, never fed to the engine unchecked."""
    rec_path = record_path(data)
    if os.path.lexists(rec_path):
        attic = p.root / ".attic"
        attic.mkdir(exist_ok=True)
        os.replace(rec_path, attic / f"{rec_path.name}.damaged-{time.time_ns()}")
    sha = sha256_file(data)
    for meta_path in sorted(p.checkpoints.glob("*/meta.json")):
        try:
            file_id = json.loads(meta_path.read_text()).get("file_id")
        except (OSError, ValueError, AttributeError):
            continue
        prefix = f"{data.name}#{sha[:12]}-"
        seq = file_id[len(prefix):] if isinstance(file_id, str) and file_id.startswith(prefix) else ""
        if seq.isdigit():
            atomic_write_json(rec_path, {
                "schema_version": SCHEMA_VERSION, "name": data.name, "original_name": data.name,
                "sha256": sha, "seq": int(seq), "priority": "normal", "in_training": True,
                "source": f"record rebuilt from {meta_path.parent.name}"})
            return f"{data}: record unreadable, rebuilt from {meta_path.parent.name} (it resumes there)"
    dst = trainroot.move_unique(data, p.queue / INCOMING / "normal")
    return f"{data}: record unreadable, back to intake as {dst.name}"


def _removed_by_hand(p: Paths, data: Path) -> str | None:
    """For a done/ record without its data file: None when it is a mover's claim that never
    got its data (the file it names, the same `file_id`, is still in processing/ beside its
    own record: removed, as any orphan); else the data file was deleted by hand (to free
    space), and the record stays: it says what was trained into which version, and keeps
    the same content from being trained again. Marked `data_removed` once (said once)."""
    try:
        rec = read_record(data)
    except (GuardrailError, OSError):
        return None
    if rec.get("outcome") != "done" or not isinstance(rec.get("sha256"), str):
        return None
    if rec.get("data_removed"):
        return ""
    file_id = rec.get("file_id")
    try:
        names = os.listdir(p.processing)
    except OSError:
        names = []
    for n in names:
        if n.endswith(RECORD_SUFFIX) and file_id is not None:
            with contextlib.suppress(GuardrailError, OSError):
                if read_record(p.processing / n[:-len(RECORD_SUFFIX)]).get("file_id") == file_id:
                    return None
    atomic_write_json(record_path(data), dict(rec, data_removed=utc_now()))
    return (f"{data}: its data file was removed; its record stays (what it trained into "
            f"{rec.get('version_after')}; the same content is not trained again unless forced)")


def recover(root) -> list[str]:
    """Start-up repair of the lifecycle folders (call holding the daemon lock); says what it did.

    Orphan records (their data file moved on before a crash) are removed. A queued file,
    or one in processing/, without a readable record (one put there by hand) goes back to
    `queue/.incoming/` for intake; a failed or skipped one gets a stub record saying its
    record was lost.
    """
    p = Paths(root)
    actions = []
    folders = [p.processing, p.done, p.failed, p.skipped] + \
        [p.queue / INCOMING / pr for pr in PRIORITIES] + [p.queue / pr for pr in PRIORITIES]
    top_seq = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        present = set(names)
        for n in names:
            if n.endswith(RECORD_SUFFIX):
                data = n[:-len(RECORD_SUFFIX)]
                if data not in present and not (folder == p.done and data + ".gz" in present):
                    kept = _removed_by_hand(p, folder / data) if folder == p.done else None
                    if kept is not None:  # what was trained stays known (dedup, history)
                        if kept:
                            actions.append(kept)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(folder / n)
                    actions.append(f"removed orphan record {folder / n}")
                continue
            if is_ignored(n) or folder.parent.name == INCOMING:
                continue
            if folder not in (p.failed, p.skipped, p.processing) and folder.parent != p.queue:
                continue  # done/: nothing here acts on its records (was a read of each)
            if _record_ok(folder / n) and (folder != p.processing or usable_record(folder / n)):
                if folder.parent == p.queue:
                    seq = read_record(folder / n).get("seq")
                    top_seq = max(top_seq, seq if isinstance(seq, int) else 0)
                continue
            if folder == p.processing:
                actions.append(recover_processing(p, folder / n))
            elif folder.parent == p.queue:
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
    if top_seq:
        _raise_seq(p.root, top_seq)
    return actions


# --------------------------------------------------------------------------- validation

def validate(path, cfg: dict | None = None) -> dict:
    """`validate_data.validate_file` summarised: {ok, records, format, errors, report}."""
    import validate_data
    cfg = cfg or {}
    try:
        report = validate_data.validate_file(path, max_length=cfg.get("max_length"),
                                             **validate_data.read_settings(cfg))
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

def done_index(root, *, owner: bool = False):
    """sha256 -> record of the file in done/ that trained that content (newest wins): a
    done_index.DoneIndex (`.get(sha256)`), kept in ROOT/.index/done.sqlite, read back from
    the record before it is believed (`owner`: the daemon's, see DoneIndex)."""
    import done_index
    return done_index.DoneIndex(root, owner=owner)


# --------------------------------------------------------------------------- enqueue

def _check_source(p: Paths, src: Path, move: bool) -> None:
    """Refuse, before anything moves, a path `add` cannot take (UsageError, exit 2)."""
    try:
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            if move:
                raise UsageError("a symbolic link: --move would queue the link, whose target "
                                 "can change", src,
                                 "Add it without --move (the content is copied).")
            st = os.stat(src)
        if stat.S_ISDIR(st.st_mode):
            raise UsageError("is a directory, not a data file", src,
                             f"Add its .jsonl files one by one, or move them into {p.inbox}/.")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError("not a regular file (a pipe, socket or device)", src,
                             "Save the data to a regular .jsonl file and add that.")
        with open(src, "rb"):
            pass
    except FileNotFoundError:
        if _in_the_inbox(p, src):
            raise _left_the_inbox(src) from None
        raise UsageError("data file not found", src, "Check the path and try again.") from None
    except PermissionError:
        raise UsageError("cannot read the file (permission denied)", src,
                         f"Make it readable (chmod u+r {_q(src)}) or run as its owner.") from None
    if not move:
        return
    # the lifecycle folders are the daemon's: taking a file from there would pull it from
    # under training, or strip a trained file of its record
    here = src.resolve().parent
    managed = {p.processing: "it is being trained",
               p.done: "it was trained; its record belongs with it"}
    managed.update({p.queue / pr: "it is queued already" for pr in PRIORITIES})
    managed.update({p.queue / INCOMING / pr: "the daemon is taking it in" for pr in PRIORITIES})
    for folder, why in managed.items():
        if here == folder.resolve():
            raise UsageError(f"refusing to move a file out of {folder.relative_to(p.root)}/ "
                             f"({why})", src, "Add a copy instead (leave out --move; --force "
                             "if its content was trained before), or use set-priority.")
    # anywhere else in the root but the places a person hands files over (inbox/) or takes
    # them back (failed/, skipped/) is the product's own: a version's, current_model's or a
    # checkpoint's file, an index, config.json; moved out, it would be damaged or lost
    try:
        inside = here.relative_to(p.root.resolve()).parts
    except ValueError:
        return
    if not inside or inside[0] not in (p.inbox.name, p.failed.name, p.skipped.name):
        where = "the root" if not inside else f"{inside[0]}/"
        raise UsageError(f"refusing to move a file out of {where} (the training root's own "
                         "files: a version, current_model, a checkpoint, an index or the "
                         "config; moved, it would be damaged)", src,
                         "Add a copy instead (leave out --move), or put data files into inbox/.")


def _duplicate(p: Paths, sha256: str, done, queued: bool) -> tuple[str, str, dict] | None:
    """(reason, fix, record fields) if content `sha256` was trained, or (`queued`) is
    queued or being trained; else None."""
    prior = done.get(sha256)
    if prior:
        return (f"already trained: same content as done/{prior.get('name')}"
                + (" (its data file since removed)" if prior.get("data_removed") else "")
                + f" (into version {prior.get('version_after')})",
                "Add it with --force to train it again.",
                {"duplicate_of": prior.get("name"), "trained_into": prior.get("version_after")})
    if not queued:
        return None
    for item in _processing(p.root) + list_queue(p.root):
        if item.get("sha256") == sha256:
            where = f"{Path(item['path']).parent.relative_to(p.root)}/{item['name']}"
            state = "being trained" if item.get("priority") is None else "already queued"
            return (f"{state}: same content as {where}",
                    "Add it with --force to queue a second copy anyway.",
                    {"duplicate_of": item["name"]})
    return None


def _q(path) -> str:
    """A path as a shell word, for commands printed in messages."""
    return shlex.quote(str(path))


def with_root(root, cmd: str) -> str:
    """`cmd` with `--root ROOT` unless the root is the scripts' folder: kept in records, it
    must work from a shell without $TRAINING_ROOT."""
    root = Path(root).resolve()
    return cmd if root == SCRIPTS_DIR else f"{cmd} --root {_q(root)}"


def add_cmd(root, path, *flags: str) -> str:
    """`python3 training_queue.py add PATH FLAGS` for `root`, with --root unless it is the
    scripts' folder: kept in records, it must work from a shell without $TRAINING_ROOT."""
    return with_root(root, " ".join(["python3 training_queue.py add", _q(path), *flags]))


def _requeue_cmd(root, path, *flags: str) -> str:
    """The command that queues a file kept in failed/ or skipped/ again (--root if needed)."""
    return add_cmd(root, path, "--move", *flags)


def jsonl_name(name: str) -> str:
    """The name a file with a wrong suffix (`x.JSONL`, `x.json`, `x`, `x.jsonl.part`) would
    have as data."""
    data = name.lower().rfind(".jsonl")
    if data > 0:  # a suffix after it (x.jsonl.part, and the .file failed/ adds to such a name)
        return name[:data] + ".jsonl"
    base, ext = os.path.splitext(name)
    return (base if ext and base else name) + ".jsonl"


def fix_for(p: Paths, reason_kind: str, dst: Path, fix: str | None = None,
            report: dict | None = None, source: Path | None = None) -> str:
    """The command that fixes a file put in failed/ or skipped/ (`dst`) for `reason_kind`:
    unreadable, suffix, special, invalid (intake); training (failed while it trained),
    skipped (by request); anything else: a duplicate. `report` is validate_data's;
    `source`: where the file is while the record is written (before it moves to `dst`)."""
    import validate_data
    if reason_kind == "unreadable":
        return (f"Make it readable for the daemon's user (`chmod a+r {_q(dst)}`), then "
                f"`{_requeue_cmd(p.root, dst)}`.")
    if fix:
        return fix
    if reason_kind in ("suffix", "invalid"):  # JSON, but not JSON lines: one jq command
        errors = (report or {}).get("errors") or [{}]
        first = errors[0] if isinstance(errors[0], dict) else {}
        code = validate_data.json_shape(source or dst) if reason_kind == "suffix" else first.get("code")
        out = p.inbox / jsonl_name(dst.name)  # never over a waiting file (but the one moving)
        if source is None or out != Path(source):
            out = trainroot.unique_path(p.inbox, out.name)
        if (command := validate_data.whole_file_fix(code, dst, out, first.get("message"))) is not None:
            return (f"`{command}` writes it as JSON lines into the inbox (one object per line), "
                    "where the daemon takes it.")
    if reason_kind == "suffix":
        return (f"If it holds JSON lines, `mv {_q(dst)} {_q(trainroot.unique_path(p.inbox, jsonl_name(dst.name)))}` "
                "drops it in the inbox under a .jsonl name.")
    if reason_kind == "special":
        return (f"Save the data as a regular .jsonl file and drop that into {_q(p.inbox)}/ "
                f"(`cp --dereference SOURCE {_q(p.inbox)}/NAME.jsonl`).")
    if reason_kind == "invalid":
        root = Path(p.root).resolve()  # its config.json (fields, limits) judges the file
        check = f"python3 validate_data.py {_q(dst)}" + ("" if root == SCRIPTS_DIR else f" --root {_q(root)}")
        return (f"See every bad line with `{check}`; fix them, then "
                f"`{_requeue_cmd(p.root, dst)}` (or train its valid records only, the others "
                f"counted and listed in its record: `{_requeue_cmd(p.root, dst, '--skip-invalid')}`).")
    if reason_kind == "training":
        return (f"Read the reason (and logs/daemon.log); once the cause is fixed, "
                f"`{_requeue_cmd(p.root, dst)}` trains it again.")
    if reason_kind == "skipped":
        return f"`{_requeue_cmd(p.root, dst)}` queues it again."
    return f"`{_requeue_cmd(p.root, dst, '--force')}` queues it anyway."


def fail_intake(root, claimed, name: str, priority: str, exc: BaseException) -> Path:
    """A claimed inbox file whose intake crashed (not a disk error, which a later start
    retries) -> failed/ with the reason, where status and the state tracker show it: left
    claimed, it would crash again at every start, out of every view."""
    p = Paths(root)
    reason = f"intake crashed: {type(exc).__name__}: {exc}"
    record = {"schema_version": SCHEMA_VERSION, "original_name": name, "priority": priority,
              "arrived_at": utc_now(), "source": "inbox", "sha256": None, "records": None,
              "outcome": "failed", "reason": reason}
    return move_with_record(claimed, p.failed, record, reason, name=name, finish=lambda d: {
        "fix": f"See its problems with `python3 validate_data.py {_q(d)}` and the traceback in "
               f"logs/daemon.log; once the cause is fixed, `{_requeue_cmd(p.root, d)}`."})


def examine(work, name: str, cfg: dict, not_regular: str | None = None) -> dict:
    """Hash and validate a data file (no move, nothing written): what `enqueue` decides on.
    The daemon runs it in a thread for a big file (`enqueue(..., examined=)`), so its
    loop keeps its heartbeat and acts on a stop meanwhile."""
    t0 = time.monotonic()
    problem = not_regular or (None if name.endswith(".jsonl") else "not a .jsonl file")
    unreadable = False
    try:
        sha256 = None if not_regular else sha256_file(work)
    except OSError as exc:  # e.g. mode 000 under a daemon that is not its owner
        sha256 = None
        problem = not_regular = f"cannot be read ({exc.strerror or exc})"
        unreadable = True
    if problem:
        result = {"ok": False, "records": None, "format": None, "errors": 1,
                  "report": {"errors": [f"{problem}: {name}"]}}
    else:
        result = validate(work, cfg)
    return {"sha256": sha256, "result": result, "problem": problem, "not_regular": not_regular,
            "unreadable": unreadable, "validate_s": round(time.monotonic() - t0, 4)}


def enqueue(root, path, *, priority: str = "normal", force: bool = False, move: bool = False,
            cfg: dict | None = None, source: str = "training_queue.py add",
            done=None, extra: dict | None = None, name: str | None = None,
            not_regular: str | None = None, batch: SyncBatch | None = None,
            by_hand: bool = False, fix: str | None = None,
            examined: dict | None = None, skip_invalid: bool = False) -> dict:
    """Validate `path`, then queue it (copy, or move with `move=True`).

    Invalid -> failed/ (only when moving; a copy source is left alone and the error
    raised), already trained content -> skipped/ unless `force`. `by_hand` (a person's
    `add`, not the daemon's intake) also refuses content already queued or being trained
    (the daemon leaves that to the head of the queue), a path that is not a readable file
    (UsageError), and a --move out of the daemon's own folders. Returns the record with
    `outcome` queued|failed|skipped and `path`; a failed or skipped one also has `fix`, the
    command that fixes it (`fix` given here is used for a `not_regular` file).
    `skip_invalid` queues a file with invalid lines when it has valid records: the trainer
    passes over the invalid ones, counted and listed in the record (`skipped_records`).
    """
    p = Paths(root)
    src = Path(path)
    if by_hand and not src.is_absolute() and not os.path.lexists(src) and (
            os.path.lexists(p.root / src) or os.path.lexists(p.root / f"{src}.gz")):
        src = p.root / src  # `add done/NAME.jsonl`, as the docs write it: from the root
    archive = None
    if by_hand and not move:  # a done/ file compressed by done_archive: queued from its gzip
        import done_archive
        archive = done_archive.archived(p, src)
    name = name or (archive[1].get("name") if archive else None) or src.name
    if by_hand:
        if not archive:
            _check_source(p, src, move)
    elif not_regular is None and not src.is_file():
        raise GuardrailError("data file not found", src, "Check the path and try again.")
    if priority not in PRIORITIES:
        queue_dir(root, priority)  # raises the usage error naming the choices
    if cfg is None:
        import training_config
        cfg = training_config.load_config(p.root)
    t0 = time.monotonic()
    record = {"schema_version": SCHEMA_VERSION, "original_name": name, "priority": priority,
              "force": bool(force), "seq": new_seq(p.root), "arrived_at": utc_now(), "source": source,
              "size": archive[1]["archive"].get("size") if archive else src.lstat().st_size,
              "attempts": 0}
    record.update(extra or {})
    if not move:  # copy first, so the bytes validated and hashed are the bytes queued
        incoming = p.queue / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=incoming, prefix=".add-", suffix=".tmp")
        os.close(fd)
        try:
            if archive:
                import gzip
                with gzip.open(archive[0], "rb") as z, open(tmp, "wb") as out:
                    shutil.copyfileobj(z, out, 8 << 20)
            else:
                shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        except BaseException as exc:
            os.unlink(tmp)
            if isinstance(exc, OSError):  # a full disk, an I/O error: the source is untouched
                unreadable = exc.errno in (errno.EACCES, errno.EPERM) and \
                    not os.access(src, os.R_OK)
                raise GuardrailError(f"cannot copy it into the queue ({exc.strerror or exc})",
                                     src, f"Make it readable (`chmod a+r {_q(src)}`), then add it "
                                     "again." if unreadable else f"Free space in {p.root} or "
                                     "check the disk, then add it again.") from None
            raise
        work = Path(tmp)
    else:
        work = src
    with contextlib.suppress(OSError):
        record["size"] = os.lstat(work).st_size  # the bytes hashed: a copy of a growing file
    try:
        ex = examined or examine(work, name, cfg, not_regular)
        problem, not_regular, unreadable = ex["problem"], ex["not_regular"], ex["unreadable"]
        if unreadable:
            fix = None  # fix_for names chmod
        record["sha256"], result = ex["sha256"], ex["result"]
        if archive and ex["sha256"] != archive[1]["archive"].get("sha256"):
            raise GuardrailError(f"the compressed copy does not decompress to the bytes its record "
                                 f"proves (sha256 {ex['sha256'][:12]}, recorded "
                                 f"{str(archive[1]['archive'].get('sha256'))[:12]})", archive[0],
                                 f"Restore done/ from a backup of the data, or check the disk "
                                 f"(`gzip -t {_q(archive[0])}`); nothing was queued.")
        if archive:
            record["requeued_from"] = archive[1]["archive"].get("path")
        record["records"] = result["records"]
        record["format"] = result["format"]
        record["validation"] = _summary(result)
        record["timings"] = {"validate_s": ex["validate_s"] if examined else
                             round(time.monotonic() - t0, 4)}
        # a file refused where it already is (re-adding one from failed/ or skipped/) stays put
        stays = not move or work.resolve().parent in (p.failed.resolve(), p.skipped.resolve())
        if not result["ok"] and skip_invalid and not problem and result["records"]:
            errors = result["report"].get("errors") or []
            if all(e.get("line") is not None for e in errors):  # not a whole-file problem
                record.update(skip_invalid=True, skipped_records={
                    "count": result["errors"], "lines": sorted({e["line"] for e in errors}),
                    "listed": len(errors)})
                result = dict(result, ok=True)
        elif result["ok"] and skip_invalid:  # valid lines, but records the chat template may refuse
            record["skip_invalid"] = True
        if not result["ok"]:
            reason = problem or result.get('verdict') or f"invalid: {result['errors']} error(s)"
            kind = "suffix" if problem == "not a .jsonl file" else \
                "unreadable" if unreadable else \
                "special" if not_regular else "invalid"
            if stays:
                raise GuardrailError(f"{reason}; not queued", src, (
                    f"Rename it to end in .jsonl (`mv {_q(src)} "
                    f"{_q(trainroot.unique_path(src.parent, jsonl_name(src.name)))}`), then add it again."
                    if kind == "suffix" else f"See `python3 validate_data.py {_q(src)}`, fix "
                    "the file, add it again" + ("" if problem or not result["records"] else
                                                " (or add it with --skip-invalid: its valid "
                                                "records train, the others are listed)") + "."))
            record.update(reason=reason, report=result["report"], outcome="failed")
            report = result.get("report")
            dst = move_with_record(work, p.failed, record, reason, name=name, batch=batch,
                                   finish=lambda d: {"fix": fix_for(p, kind, d, fix, report, work)})
            return dict(record, name=dst.name, path=str(dst), fix=fix_for(p, kind, dst, fix, report))
        if done is None:
            done = done_index(p.root)
        dup = None if force else _duplicate(p, record["sha256"], done, queued=by_hand)
        if dup:
            reason, dup_fix, fields = dup
            record.update(reason=reason, outcome="skipped", **fields)
            if stays:
                raise GuardrailError(reason, src, dup_fix)
            dst = move_with_record(work, p.skipped, record, reason, name=name, batch=batch,
                                   finish=lambda d: {"fix": fix_for(p, "duplicate", d)})
            return dict(record, name=dst.name, path=str(dst), fix=fix_for(p, "duplicate", dst))
        record["outcome"] = "queued"
        if move:  # a copy was fsynced as it was made
            sync_data(work)
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


class QueueOrder:
    """The queued files in training order (as `list_queue`) without reading every record
    on each call: one scandir of the three folders, and a record read once per data file
    (folder, name, inode), its `seq` kept. The daemon's `next_job` asks it for the head
    each time a file ends (reading 50,000 records cost 2.4 s per file)."""

    def __init__(self, root):
        self.p = Paths(root)
        self._seq: dict[tuple, int] = {}

    def paths(self):
        """The queued data files, head first (a generator: the daemon reads the head)."""
        known, items = {}, []
        for rank, pr in enumerate(PRIORITIES):
            d = self.p.queue / pr
            try:
                with os.scandir(d) as it:
                    entries = [(e.name, e.inode()) for e in it]
            except FileNotFoundError:
                continue
            present = {name for name, _ in entries}
            for n, inode in entries:
                if n.endswith(RECORD_SUFFIX) or n + RECORD_SUFFIX not in present:
                    continue  # no record yet: not queued yet (see list_queue)
                key = (pr, n, inode)
                seq = self._seq.get(key)
                if seq is None:
                    if is_ignored(n):
                        continue
                    seq = read_record(d / n).get("seq") or 0
                known[key] = seq
                items.append((rank, seq, n, d))
        self._seq = known
        items.sort()
        for *_, n, d in items:
            yield d / n


def _processing(root) -> list[dict]:
    """The records of the files in processing/: the one being trained or waiting to resume."""
    d = Paths(root).processing
    try:
        names = sorted(n for n in os.listdir(d) if not is_ignored(n))
    except FileNotFoundError:
        return []
    return [dict(read_record(d / n), name=n, priority=None, path=str(d / n)) for n in names]


def find_queued(root, name: str) -> dict:
    """The queued file called `name` (also `PRIORITY/NAME`, or its path in the queue).

    A name that is not queued gets an error saying where that file is instead (being
    trained, trained, failed, skipped) and what to run.
    """
    p = Paths(root)
    folder, _, base = name.rpartition("/")
    if base in ("", ".", "..") or not base.strip():
        raise UsageError(f"not a file name: {name!r}", None,
                         f"Name a queued file as `{LIST_CMD}` shows it.")
    priority = Path(folder).name if folder else None
    if priority is not None and priority not in PRIORITIES:
        priority = "?"                    # a folder that is not a queue: matches nothing
    matches = [item for item in list_queue(root)
               if item["name"] == base and priority in (None, item["priority"])]
    if len(matches) == 1:
        return matches[0]
    if matches:                           # one name in two priorities: a root from before
        which = " or ".join(f"{m['priority']}/{base}" for m in matches)
        raise UsageError(f"{base} is queued {len(matches)} times", p.queue,
                         f"Name one: {which} (see `{LIST_CMD}`).")
    import training_controller
    live = training_controller.daemon_status(root)["alive"]
    for folder, state, fix in (
            (p.processing, "is being trained now, not queued", "`python3 training_controller.py "
             "skip` abandons it (to skipped/, nothing is lost).") if live else
            (p.processing, "was stopped part-way (processing/), not queued: it resumes from its "
             "checkpoint when the daemon starts", training_controller.skip_without_daemon(
                 "To skip it instead") + "."),
            (p.done, "was trained already (done/), not queued",
             "Nothing to change; `python3 model_versioner.py rollback` undoes its training."),
            (p.failed, "failed (failed/), not queued",
             "See its reason in NAME.record.json; fix it, then `REQUEUE`."),
            (p.skipped, "was skipped (skipped/), not queued",
             "`REQUEUE` queues it again.")):
        if os.path.lexists(folder / base) or (folder == p.done and
                                               os.path.lexists(folder / (base + ".gz"))):
            raise GuardrailError(f"{base} {state}", folder / base,
                                 fix.replace("REQUEUE", _requeue_cmd(root, folder / base)))
    raise GuardrailError(f"{name} is not in the queue", p.queue, f"See `{LIST_CMD}`.")


def counts(root) -> dict:
    p = Paths(root)

    def n_data(d: Path) -> int:
        try:
            return sum(1 for n in os.listdir(d) if not is_ignored(n))
        except FileNotFoundError:
            return 0

    def n_takeable(d: Path) -> int:
        """Entries the daemon will take: not folders (it never looks inside one), not
        hidden or temporary names."""
        try:
            with os.scandir(d) as it:
                return sum(1 for e in it if not is_ignored(e.name)
                           and not e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return 0
    out = {pr: n_data(p.queue / pr) for pr in PRIORITIES}
    out["queued"] = sum(out[pr] for pr in PRIORITIES)
    out["inbox"] = sum(n_takeable(d) for d in (p.inbox_high, p.inbox, p.inbox_low)) + \
        sum(n_takeable(p.queue / INCOMING / pr) for pr in PRIORITIES)  # being taken from it
    import done_index
    for name in ("processing", "done", "failed", "skipped"):
        # done/: the index while it is up to date, not a listing of 100,000 names
        out[name] = done_index.count(root) if name == "done" else n_data(getattr(p, name))
    return out


def _took_it(root, name: str, path: str) -> GuardrailError:
    """The queued file moved while this ran: most often the daemon took it for training."""
    processing = Paths(root).processing
    if os.path.lexists(processing / name):
        return GuardrailError(f"{name} left the queue while this ran: the daemon took it for "
                              "training (it is in processing/ now)", processing / name,
                              "See `python3 training_controller.py status`; "
                              "`python3 training_controller.py skip` abandons it (to skipped/, "
                              "nothing is lost).")
    return GuardrailError(f"{name} left the queue while this ran (the daemon took it, or "
                          "another command moved it)", path,
                          f"See `python3 training_controller.py status` and `{LIST_CMD}`.")


def set_priority(root, name: str, priority: str) -> dict:
    """Move a queued file to another priority folder; it keeps its arrival order (`seq`)."""
    item = find_queued(root, name)
    if item["priority"] == priority:
        return dict(item, changed=False, was=priority)
    rec = read_record(item["path"])
    rec["priority"] = priority
    try:
        dst = move_with_record(item["path"], queue_dir(root, priority), rec,
                               f"priority {item['priority']} -> {priority}")
    except FileNotFoundError:
        raise _took_it(root, item["name"], item["path"]) from None
    return dict(rec, name=dst.name, path=str(dst), changed=True, was=item["priority"])


def remove(root, name: str, reason: str | None = None) -> dict:
    """Take a queued file out of the queue: to skipped/ with its record, never deleted.

    The result's `undo` is the command that queues it again (where it was, by priority).
    """
    item = find_queued(root, name)
    rec = read_record(item["path"])
    why = "removed from the queue" + (f": {reason}" if reason else "")
    rec.update(reason=why, outcome="skipped")
    try:
        dst = move_with_record(item["path"], Paths(root).skipped, rec, why)
    except FileNotFoundError:
        raise _took_it(root, item["name"], item["path"]) from None
    # --force where the content is queued (a forced copy) or trained meanwhile: the undo works
    again = rec.get("force") or _duplicate(Paths(root), rec.get("sha256"), done_index(root), True)
    undo = _requeue_cmd(root, dst, "--priority", item["priority"], *(["--force"] if again else []))
    return dict(rec, name=dst.name, path=str(dst), priority=item["priority"], undo=undo)


# --------------------------------------------------------------------------- CLI

def _public(rec: dict) -> dict:
    keep = ("name", "priority", "was", "sha256", "records", "format", "size", "seq", "arrived_at",
            "force", "source", "outcome", "reason", "path", "changed", "undo", "skipped_records")
    return {k: rec[k] for k in keep if k in rec}


def _records(n) -> str:
    return f"{n} record{'' if n == 1 else 's'}"


def _root(args) -> Path:
    """The training root the command acts on; a mistyped --root is an error, not an empty queue."""
    return require_root(resolve_root(args.root)).root


def cmd_list(args) -> int:
    """List queued files in the order they will train."""
    items = [_public(r) for r in list_queue(_root(args))]
    if args.json:
        print_json({"ok": True, "queue": items})
        return 0
    if not items:
        print("The queue is empty.")
    for i, r in enumerate(items, 1):
        print(f"{i:4d}  {r['priority']:<6}  {r['name']}  ({_records(r.get('records'))}, "
              f"sha256 {str(r.get('sha256'))[:12]})")
    return 0


def cmd_status(args) -> int:
    """Count files in the inbox, the queue by priority, processing, done, failed, skipped."""
    root = _root(args)
    c = counts(root)
    items = _processing(root)
    processing = [item["name"] for item in items]
    if args.json:
        print_json({"ok": True, "counts": c, "processing": processing})
        return 0
    print(f"inbox {c['inbox']}  queued {c['queued']} (high {c['high']}, normal {c['normal']}, "
          f"low {c['low']})  processing {c['processing']}  done {c['done']}  "
          f"failed {c['failed']}  skipped {c['skipped']}")
    if processing:
        import training_controller
        live = training_controller.daemon_status(root)["alive"]
        for item in items:
            hold = item.get("hold") if isinstance(item.get("hold"), dict) else {}
            clears = ("`python3 training_controller.py accept` or `reject` decides it"
                      if hold.get("kind") == "gate" else "`python3 training_controller.py resume` clears it")
            print(f"training: {item['name']}" if live else
                  f"stopped part-way: {item['name']} (held: {hold.get('reason')}; {clears})" if hold else
                  f"stopped part-way: {item['name']} (resumes when the daemon starts)")
    return 0


def cmd_add(args) -> int:
    """Validate a data file, then queue a copy of it (or move it with --move)."""
    root = resolve_root(args.root)
    rec = enqueue(root, args.file, priority=args.priority, force=args.force, move=args.move,
                  by_hand=True, skip_invalid=args.skip_invalid)
    if rec["outcome"] == "queued":
        if args.json:
            print_json({"ok": True, **_public(rec)})
        else:
            skipped = (rec.get("skipped_records") or {}).get("count")
            print(f"Queued {rec['name']} ({args.priority}, {_records(rec['records'])})"
                  + (f"; {skipped} invalid line(s) will be passed over, listed in its record "
                     "(skipped_records)" if skipped else "") + ".")
        return 0
    # --move of a file that cannot be queued: it is kept where it went, with its reason
    fix = (rec["fix"] if rec.get("reason") == "not a .jsonl file"  # a rename, not an edit
           else f"Fix it, then `{_requeue_cmd(root, rec['path'])}`." if rec["outcome"] == "failed"
           else f"`{_requeue_cmd(root, rec['path'], '--force')}` queues it anyway.")
    error = GuardrailError(f"{rec['reason']}; not queued, moved to {rec['path']}", None, fix)
    print(f"Error: {error}", file=sys.stderr)
    if args.json:
        print_json({"ok": False, "error": error.to_dict(), **_public(rec)})
    return 1


def cmd_set_priority(args) -> int:
    """Move a queued file to another priority (it keeps its arrival order)."""
    rec = set_priority(_root(args), args.name, args.priority)
    if args.json:
        print_json({"ok": True, **_public(rec)})
    elif rec["changed"]:
        print(f"{rec['name']}: priority {args.priority} (was {rec['was']})")
    else:
        print(f"{rec['name']}: priority {args.priority} (unchanged)")
    return 0


def cmd_remove(args) -> int:
    """Take a file out of the queue: it moves to skipped/ with a record, never deleted."""
    rec = remove(_root(args), args.name, args.reason)
    if args.json:
        print_json({"ok": True, **_public(rec)})
    else:
        print(f"Moved {args.name} out of the queue to {rec['path']} (nothing deleted).\n"
              f"Undo: {rec['undo']}")
    return 0


def _os_errors_as_guardrail(func):
    """An OS refusal (a root not writable by this user, a full disk) as an `Error:` line.

    Every move here writes the new record before renaming the data file, so a refusal at
    any step leaves the file whole in one place.
    """
    @functools.wraps(func)
    def run(args):
        try:
            return func(args)
        except OSError as exc:
            if exc.errno == errno.ENOENT and _root_inbox_holds(args, exc.filename):
                raise _left_the_inbox(exc.filename) from None
            raise GuardrailError(f"cannot change the queue ({exc.strerror or exc})",
                                 exc.filename, "Run as the training root's owner and check its "
                                 "free space, then try again.") from None
    return run


def _root_inbox_holds(args, path) -> bool:
    try:
        return _in_the_inbox(Paths(resolve_root(args.root)), path)
    except (GuardrailError, OSError):
        return False


def _in_the_inbox(p: Paths, path) -> bool:
    """`path` is in the root's inbox (or its priority folders), where the daemon takes files."""
    return path is not None and Path(path).resolve().parent in (
        p.inbox.resolve(), p.inbox_high.resolve(), p.inbox_low.resolve())


def _left_the_inbox(path) -> GuardrailError:
    """A file `add --move` was given in the inbox, gone while it ran: the daemon took it."""
    return GuardrailError(f"{Path(path).name} is not in the inbox (any more): the daemon takes "
                          "what is dropped there by itself, and may have taken it while this ran",
                          path,
                          f"See where it is with `{LIST_CMD}` and `python3 training_queue.py "
                          "status`; nothing is lost.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_queue.py", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add = subcommands(parser, wrap=_os_errors_as_guardrail)
    for name, func in (("list", cmd_list), ("status", cmd_status), ("add", cmd_add),
                       ("set-priority", cmd_set_priority), ("remove", cmd_remove)):
        sp = add(name, func)
        named = ("a queued file's name as `list` shows it, or PRIORITY/NAME (put `--` before "
                 "a name starting with '-')")
        if name == "add":
            sp.add_argument("file", help="the .jsonl file to validate and queue")
            sp.add_argument("--priority", choices=PRIORITIES, default="normal",
                            help="which queue (default: normal)")
            sp.add_argument("--force", action="store_true",
                            help="queue it even if the same content is queued, being trained or "
                                 "was trained before")
            sp.add_argument("--move", action="store_true", help="move the file instead of copying it")
            sp.add_argument("--skip-invalid", action="store_true",
                            help="queue a file with invalid lines: its valid records train, the "
                                 "invalid ones are passed over, counted and listed in its record")
        elif name == "set-priority":
            sp.add_argument("name", help=named)
            sp.add_argument("priority", choices=PRIORITIES, help="the new priority")
        elif name == "remove":
            sp.add_argument("name", help=named)
            sp.add_argument("--reason", default=None, help="why, kept in its record")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
