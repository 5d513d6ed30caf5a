"""Paths, locks and atomic writes for a training root (standard library only).

Every script of Training Guardrails imports this module and nothing heavier for the
plumbing they share: where the root is, what each runtime folder is called, how to hold
a lock that names its holder, how to write a state file so a crash never leaves half of
it, and the one error type whose message says what, where and which command fixes it.

    from trainroot import resolve_root, paths, atomic_write_json, FileLock
    p = paths(resolve_root(args.root))
    with FileLock(p.lock("versions"), "snapshot"):
        atomic_write_json(p.root / "x.json", {"ok": True})

No policy lives here (version rules, queue order, retention): only mechanisms.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

SCRIPTS_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- errors

class GuardrailError(Exception):
    """An expected failure: `what`, `where` it happened, and the command that `fix`es it."""

    exit_code = EXIT_FAILURE

    def __init__(self, what: str, where: str | os.PathLike | None = None,
                 fix: str | None = None, exit_code: int | None = None):
        self.what, self.where, self.fix = what, (str(where) if where else None), fix
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.what + (f", {self.where}" if self.where else "")
        text += "."
        return text + (f" {self.fix}" if self.fix else "")

    def to_dict(self) -> dict:
        return {"message": str(self), "what": self.what, "where": self.where,
                "fix": self.fix, "exit_code": self.exit_code}


class UsageError(GuardrailError):
    exit_code = EXIT_USAGE


class BusyError(GuardrailError):
    exit_code = EXIT_BUSY


# --------------------------------------------------------------------------- root and paths

def resolve_root(arg: str | os.PathLike | None = None) -> Path:
    """`--root DIR` > `$TRAINING_ROOT` > the folder holding the scripts."""
    if arg is not None and not str(arg).strip():  # `--root "$UNSET_VAR"`: never guess a root
        raise UsageError("--root is empty", "--root",
                         "Give the training root's folder (--root DIR), or leave --root out to "
                         "use $TRAINING_ROOT or the scripts' folder.")
    chosen = arg or os.environ.get("TRAINING_ROOT") or SCRIPTS_DIR
    return Path(chosen).expanduser().resolve()


class Paths:
    """Named places inside one training root; nothing is created by naming it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        r = self.root
        self.config = r / "config.json"
        self.config_lock = r / ".config.lock"
        self.current_model = r / "current_model"
        self.versions = r / "versions"
        self.inbox = r / "inbox"
        self.inbox_high = r / "inbox" / "high"
        self.inbox_low = r / "inbox" / "low"
        self.queue = r / "queue"
        self.processing = r / "processing"
        self.done = r / "done"
        self.failed = r / "failed"
        self.skipped = r / "skipped"
        self.checkpoints = r / "checkpoints"
        self.control = r / "control"
        self.logs = r / "logs"
        self.metrics = r / "metrics.jsonl"
        self.system_state = r / ".system_state.json"
        self.daemon_state = r / ".daemon_state.json"
        self.staging = r / ".staging"
        self.locks = r / ".locks"
        self.default_backups = r / "backups"

    def lock(self, name: str) -> Path:
        """The lock file for one concern: `daemon`, `model`, `engine`, `versions`, `config`,
        `backups`."""
        return self.locks / f"{name}.lock"

    def runtime_dirs(self) -> list[Path]:
        return [self.versions, self.inbox, self.inbox_high, self.inbox_low, self.queue,
                self.processing, self.done, self.failed, self.skipped, self.checkpoints,
                self.control, self.logs, self.staging, self.locks]

    def managed_inside(self, path) -> Path | None:
        """The folder of this root that only the product writes (the model, versions,
        bases, the data lifecycle, checkpoints, ...) holding `path`, or the root itself
        when `path` is the root or above it; None for a place of one's own (backups/, a
        folder beside the root)."""
        target, root = Path(path).resolve(), self.root.resolve()
        if target == root or target in root.parents:
            return root
        for d in [*self.runtime_dirs(), self.current_model, root / "base", root / ".attic"]:
            d = d.resolve()
            if target == d or d in target.parents:
                return d
        return None

    def ensure(self) -> "Paths":
        for d in self.runtime_dirs():
            d.mkdir(parents=True, exist_ok=True)
        return self


ROOT_MARKERS = ("config.json", "current_model", "versions")  # what `init` makes first


def is_training_root(root: str | os.PathLike) -> bool:
    """The one check of "is this a training root": a folder holding config.json,
    current_model/ or versions/ (so a root that lost one of them still counts), and not a
    model folder (whose config.json is the model's: `model_folder`)."""
    root = Path(root)
    return root.is_dir() and any(os.path.lexists(root / name) for name in ROOT_MARKERS) \
        and model_folder(root) is None


def model_folder(folder: str | os.PathLike) -> tuple[str, Path | None] | None:
    """(what it is, the training root it belongs to or None) for a Hugging Face model
    folder given where a root belongs (current_model/, a version, a backup, a base model),
    else None. Its config.json is the model's; what a command would write there (a state
    document, an index) would end up in the next version."""
    folder = Path(folder)
    if os.path.lexists(folder / "current_model") or os.path.lexists(folder / "versions"):
        return None
    product = os.path.lexists(folder / ".manifest.json") or os.path.lexists(folder / "version.json")
    if not product:
        try:
            doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not ("model_type" in doc or "architectures" in doc):
            return None
    up = folder.resolve()
    for owner in (up.parent, up.parent.parent):  # ROOT/current_model, ROOT/versions/v012
        if owner != up and os.path.isdir(owner / "current_model") and os.path.lexists(owner / "config.json"):
            return (f"{folder.name}/, a model folder of the training root {owner}", owner)
    return ("a model folder (its config.json is the model's), not a training root", None)


def _whole_root(folder: Path) -> bool:
    """config.json and the model or the versions beside it: a root, not a stray settings file."""
    return os.path.isfile(folder / "config.json") and (
        os.path.lexists(folder / "current_model") or os.path.lexists(folder / "versions"))


def enclosing_root(folder: str | os.PathLike) -> tuple[Path, Path] | None:
    """(the training root, its folder) when `folder` lies inside a folder a training root
    manages (inbox/high/, queue/normal/, versions/v012/, ...), else None: a root made or
    looked for there is the outer root's data, version or clutter (its daemon would move
    the pieces of one dropped in its inbox into failed/)."""
    target = Path(folder).resolve()
    for up in list(target.parents)[:6]:
        # a whole root, not any folder holding a config.json (a project's settings file
        # above a root must lock no one out)
        if _whole_root(up) and is_training_root(up):
            managed = Paths(up).managed_inside(target)
            if managed is not None and managed != up.resolve():
                return up, managed
    return None


def require_root(root: str | os.PathLike) -> Paths:
    """The root's Paths, or the error every script gives for a folder that is no training
    root (missing, a file, or none of its markers), naming `init` and --root."""
    p = Paths(root)
    quoted = _shell_quote(str(p.root))
    fix = (f"Create one with `python3 training_daemon.py init --root {quoted}`, or give the "
           "right one with --root DIR.")
    if os.path.lexists(p.root) and not p.root.is_dir():
        raise GuardrailError("not a training root (a file, not a folder)", p.root,
                             "Give the folder that holds config.json with --root DIR or "
                             "TRAINING_ROOT, e.g. `python3 training_controller.py status --root DIR`.")
    if (inside := model_folder(p.root)) is not None:
        what, owner = inside
        raise GuardrailError(f"not a training root: {what}", p.root,
                             f"Give the root itself: --root {_shell_quote(str(owner))}." if owner else
                             f"To train this model, make a root from it: `python3 training_daemon.py "
                             f"init --root NEW_ROOT --base {quoted}`.")
    if not _whole_root(p.root) and (inside := enclosing_root(p.root)) is not None:
        owner, managed = inside  # (a whole root made there before: still usable)
        where = "" if managed == p.root.resolve() else "inside "
        raise GuardrailError(f"not a training root: it is {where}{managed.name}/ of the training "
                             f"root {owner}, which only the product writes", p.root,
                             f"Give the root itself: --root {_shell_quote(str(owner))}.")
    if not p.root.exists():
        raise GuardrailError("not a training root (no such folder)", p.root, fix)
    if not is_training_root(p.root):
        raise GuardrailError("not a training root (no config.json, current_model/ or versions/)",
                             p.root, fix)
    return p


def _shell_quote(text: str) -> str:
    import shlex  # lazy: only error paths quote
    return shlex.quote(text)


def paths(root: str | os.PathLike | None = None) -> Paths:
    return Paths(resolve_root(root))


# --------------------------------------------------------------------------- time

def utc_now() -> str:
    """An ISO-8601 UTC timestamp with microseconds, e.g. 2026-11-28T17:20:01.123456Z."""
    return utc_at(time.time())


def utc_at(seconds: float) -> str:
    """`utc_now`'s format for a time in seconds since the epoch."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    """Seconds since the epoch for a timestamp written by `utc_now`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc).timestamp()


def age_seconds(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return max(0.0, time.time() - parse_time(text))
    except (ValueError, TypeError):  # a hand-edited file: not a time
        return None


# --------------------------------------------------------------------------- atomic files

def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, or a rename inside it may not survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644, *,
                       sync: bool = True, replace: bool = True) -> None:
    """Temp file in the same folder, fsync, `os.replace`, fsync the folder.

    `sync=False` skips both fsyncs for a caller that batches them (`fsync_paths` later):
    still all-or-nothing for readers, durable only once the caller has synced.
    `replace=False` raises FileExistsError if `path` exists (a link, not a rename): the
    write claims the name, so two writers racing for one name cannot both win.
    """
    path = Path(path)
    import tempfile  # here: every control script pays its imports at start-up
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644, *,
                      sync: bool = True, replace: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode, sync=sync, replace=replace)


def atomic_write_json(path: str | os.PathLike, obj, mode: int = 0o644, *,
                      sync: bool = True, replace: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", mode,
                      sync=sync, replace=replace)


def fsync_paths(files=(), dirs=()) -> None:
    """fsync files, then folders, written with `sync=False`: one journal commit for a batch
    instead of one per file (measured ~6 ms per fsync here). Vanished files are skipped."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(d)


_MISSING = object()


def file_signature(path: str | os.PathLike) -> tuple | None:
    """(mtime_ns, size, inode) of a file, None if it is missing: cheap change detection."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_json(path: str | os.PathLike, default=_MISSING):
    """Parse a JSON file; a missing file gives `default` (or an error), a corrupt one an error.

    Only a regular file is read: a FIFO in its place would block the reader forever.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        if default is _MISSING:
            raise GuardrailError("file not found", path) from None
        return default
    except OSError as exc:
        raise _unreadable(path, exc.strerror or exc.__class__.__name__) from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _unreadable(path, "not a regular file")
            text = f.read().decode("utf-8-sig")  # a BOM, as some editors save: still the JSON
    except UnicodeDecodeError:
        raise _unreadable(path, "not UTF-8 text") from None
    except OSError as exc:
        raise _unreadable(path, exc.strerror or exc.__class__.__name__) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _unreadable(path, f"corrupt JSON (line {exc.lineno} column {exc.colno}: "
                                f"{exc.msg})") from None


def _unreadable(path: Path, why: str) -> GuardrailError:
    import shlex
    where = shlex.quote(str(path))
    what = why if why.startswith("corrupt JSON") else f"cannot read JSON ({why})"
    return GuardrailError(what, path, f"Inspect it, then move it aside: `mv {where} {where}.bad`.")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (for logs such as metrics.jsonl); a torn last line is tolerated by readers."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file in Python (hashlib is ~6x faster here than `sha256sum`)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def unique_path(directory: str | os.PathLike, name: str) -> Path:
    """`directory/name`, or `stem-2.ext`, `stem-3.ext`, ... if taken: nothing is overwritten."""
    directory = Path(directory)
    candidate = directory / name
    stem, dot, ext = name.partition(".")
    n = 2
    while os.path.lexists(candidate):
        candidate = directory / f"{stem}-{n}{dot}{ext}"
        n += 1
    return candidate


# --------------------------------------------------------------------------- renames

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_LIBC = None


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    global _LIBC
    import ctypes  # only the commands that swap folders need it
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap two paths (non-empty folders too) in one atomic step: renameat2(RENAME_EXCHANGE).

    Both must exist on the same filesystem. Raises OSError (ENOSYS/EINVAL) where the
    kernel or filesystem lacks it; callers then use a rename dance with recovery.
    """
    a, b = Path(a), Path(b)
    _renameat2(a, b, _RENAME_EXCHANGE)
    fsync_dir(a.parent)
    if b.parent != a.parent:
        fsync_dir(b.parent)


def same_file(a, b) -> bool:
    """`a` and `b` are one file (the same inode: hard links); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike, *, sync: bool = True) -> None:
    """Rename that fails with FileExistsError instead of replacing `dst` (`sync=False`: the
    caller fsyncs both folders later, see `fsync_paths`)."""
    src, dst = Path(src), Path(dst)
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from None
        if exc.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        # Fallback: link+unlink for files never replaces; folders get a checked rename.
        if src.is_dir():
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from None
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.unlink(src)
    if not sync:
        return
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def move_unique(src: str | os.PathLike, directory: str | os.PathLike,
                name: str | None = None, *, sync: bool = True) -> Path:
    """Move `src` into `directory` under a free name; never overwrites; returns the new path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or Path(src).name
    while True:
        dst = unique_path(directory, name)
        try:
            rename_noreplace(src, dst, sync=sync)
            return dst
        except FileExistsError:
            continue  # raced with another writer for that name: take the next one


# --------------------------------------------------------------------------- locks

class FileLock:
    """An exclusive `flock` on a file that records the holder (pid, purpose, time).

    The kernel drops the lock when the holder dies, even after `kill -9`, so a stale
    lock file never blocks anyone; its recorded pid is only there to name the holder.
    """

    def __init__(self, path: str | os.PathLike, purpose: str = ""):
        self.path, self.purpose, self._fd = Path(path), purpose, None

    def acquire(self, timeout: float = 0.0) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = read_lock_holder(self.path) or {}
                        who = f"pid {holder.get('pid', '?')}"
                        if holder.get("purpose"):
                            who += f" ({holder['purpose']})"
                        raise BusyError(f"busy: held by {who}", self.path,
                                        "Wait for it to finish, or check it with "
                                        "`python3 training_controller.py status`.") from None
                    time.sleep(0.05)
        except BaseException:  # (an interrupt too): the descriptor, and any lock, go with it
            os.close(fd)
            raise
        record = json.dumps({"pid": os.getpid(), "purpose": self.purpose,
                             "since": utc_now()}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError:  # a full disk: the lock holds all the same; /proc/locks names the
            pass         # holder (read_lock_holder), so prune and resume still work there
        self._fd = fd
        return self

    def inode(self) -> int | None:
        """The inode of the file this lock holds (what /proc/locks lists), or None."""
        return os.fstat(self._fd).st_ino if self._fd is not None else None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock_holder(path: str | os.PathLike) -> dict | None:
    """The recorded holder of a lock file if the lock is held right now, else None:
    `{pid, purpose, since}`, each of its type or None (a hand-edited record: an unknown pid)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO there must not block
    except OSError:  # missing, or its folder is a file: nobody can hold it
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except (OSError, ValueError):
                holder = None
            holder = holder if isinstance(holder, dict) else {}
            pid = holder.get("pid")
            if pid is None:  # held, no record (a full disk refused it): the kernel knows
                pid = next(iter(_flock_pids(os.fstat(fd).st_ino)), None)
            text = {k: v if isinstance(v := holder.get(k), str) else None
                    for k in ("purpose", "since")}
            return {"pid": pid if type(pid) is int and 0 < pid < 2**31 else None, **text}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the daemon's liveness

HEARTBEAT_STALE_S = 30.0   # the daemon writes its heartbeat about once a second
BTIME_ROUNDING_S = 1.0     # /proc/stat's btime is whole seconds: a start time reads up to 1 s early
_PROC = Path("/proc")


BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)  # suspend included where it can
_boot_id: list = []


def boot_id() -> str | None:
    """This boot's id (Linux): a pid or a boot-clock time from another boot means nothing."""
    if not _boot_id:
        try:
            _boot_id.append((_PROC / "sys/kernel/random/boot_id").read_text().strip() or None)
        except OSError:
            _boot_id.append(None)
    return _boot_id[0]


def boot_clock() -> float:
    """Seconds since boot: never steps with NTP, a VM resume or a hand-set clock."""
    return time.clock_gettime(BOOT_CLOCK)


def process_running(pid) -> bool:
    """A live, non-zombie process. /proc answers in microseconds; psutil only off Linux."""
    if type(pid) is not int or not 0 < pid < 2**31:
        return False
    if _PROC.joinpath("self/stat").exists():
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    import psutil  # lazy: +55 ms, only where there is no /proc
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3), or None if there is no such process."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return ["S"]  # it exists; its details are not ours to read
    return text.rpartition(")")[2].split()


def process_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot: with the boot id, a process's identity
    (a pid the system reuses gets another start). None off Linux or if unknown."""
    fields = _proc_stat(pid) if type(pid) is int and pid > 0 else None
    try:
        return int(fields[19]) if fields else None  # field 22, starttime
    except (IndexError, ValueError):
        return None


def process_identity() -> dict:
    """What a daemon writes beside its pid so readers can tell it from a later process that
    got the same pid; beside each heartbeat it also writes `heartbeat_clock` (boot_clock())."""
    return {"boot_id": boot_id(), "proc_start": process_start(os.getpid())}


def heartbeat_age(state: dict) -> float | None:
    """Seconds since the daemon's last heartbeat, or None when nothing can vouch for it.

    Measured on the boot clock when the heartbeat was written in this boot (a wall clock
    stepped by NTP or by hand changes nothing); else by wall time, where a heartbeat more
    than a few seconds in the future (a clock jump or a hand edit) is no evidence at all.
    """
    clock = state.get("heartbeat_clock")
    if isinstance(clock, (int, float)) and not isinstance(clock, bool) and state.get("boot_id") == boot_id():
        age = boot_clock() - clock
        return max(0.0, age) if age > -2.0 else None
    text = state.get("heartbeat")
    if not isinstance(text, str):
        return None
    try:
        age = time.time() - parse_time(text)
    except ValueError:
        return None
    return max(0.0, age) if age > -2.0 else None


def _same_process(pid: int, state: dict) -> bool:
    """True unless process `pid` is provably not the one that wrote `state` (a reused pid)."""
    recorded = state.get("proc_start")
    if state.get("boot_id") is not None and state.get("boot_id") != boot_id():
        return False  # written in another boot: whatever runs under that pid now is new
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        now = process_start(pid)
        return now is None or now == recorded
    # An older state without the identity: the process must have started before the
    # heartbeat, allowing for btime's whole-second rounding plus 1 s of scheduling.
    import psutil  # lazy: only for a state written by an older daemon, without its lock
    try:
        started = psutil.Process(pid).create_time()
        return started <= parse_time(state["heartbeat"]) + BTIME_ROUNDING_S + 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return True  # cannot tell: keep the heartbeat's word


def daemon_without_its_lock(root: str | os.PathLike) -> int | None:
    """The pid of another daemon of this root that still holds the daemon lock on a file
    `.locks/` no longer shows (the folder deleted under it), for one that just took the
    lock anew; else None. The kernel says it: /proc/locks lists that process's flock on the
    inode its `.daemon_state.json` names (`lock_inode`). Where /proc/locks cannot be read,
    None."""
    try:
        state = read_json(Paths(root).daemon_state, default=None)
    except GuardrailError:
        return None
    if not isinstance(state, dict):
        return None
    pid, inode = state.get("pid"), state.get("lock_inode")
    if type(pid) is not int or type(inode) is not int or pid == os.getpid():
        return None
    return pid if pid in _flock_pids(inode) else None


def _flock_pids(inode: int) -> list[int]:
    """The pids holding a flock on the file with this inode, from /proc/locks (lines like
    "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"); [] where it cannot be read."""
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4].isdigit() \
                        and fields[5].rsplit(":", 1)[-1] == str(inode):
                    pids.append(int(fields[4]))
    except OSError:
        pass
    return pids


def daemon_liveness(root: str | os.PathLike, state: dict | None) -> dict:
    """The one definition of "the daemon is alive" (docs/design.md, Daemon liveness).

    Alive: the daemon lock is held (flock: the kernel drops it when its holder dies) by a
    running process; or, with no lock to read (its folder deleted), the pid that wrote
    `.daemon_state.json` runs, is that same process (boot id + start time), and its
    heartbeat is fresh. Not alive: `stopped` if its last word was `stopped` (or it never
    ran), else `dead` (killed or crashed, whatever it was doing). `state` is the typed
    content of `.daemon_state.json` ({} if missing).
    """
    state = state or {}
    holder = read_lock_holder(Paths(root).lock("daemon"))
    last_pid = state.get("pid") if type(state.get("pid")) is int else None
    pid = (holder or {}).get("pid") or last_pid
    age = heartbeat_age(state)
    fresh = age is not None and age <= HEARTBEAT_STALE_S
    if holder is not None:
        alive = process_running(pid)
    else:
        alive = fresh and process_running(pid) and _same_process(pid, state)
    if alive:
        verdict = "alive"
    else:
        verdict = "stopped" if state.get("state") in (None, "stopped") else "dead"
    return {"alive": alive, "pid": pid if alive else None, "last_pid": last_pid,
            "holder": holder, "heartbeat_age": age, "fresh": fresh, "verdict": verdict}
MODEL_LOCK_WAIT_S = 2.0  # a restore waits this long for the daemon, then says how to stop it
STOP_WAIT_COMMAND = "python3 training_controller.py stop --wait"
_model_held = threading.local()


@contextlib.contextmanager
def model_lock(root: str | os.PathLike, purpose: str, timeout: float = MODEL_LOCK_WAIT_S):
    """Hold `.locks/model.lock`, the right to decide what current_model is (docs/design.md,
    "The root"): the daemon from taking a file from the queue to that file's end-of-file
    publish (or its pause), a restore, a rollback, a backup restore. Re-entrant within one
    thread (the daemon's own loss-guard and `skip --discard` restores run under its hold).
    Busy after `timeout` s: BusyError naming the holder (and, for the daemon, the stop command)."""
    if getattr(_model_held, "depth", 0):
        _model_held.depth += 1
        try:
            yield
        finally:
            _model_held.depth -= 1
        return
    path = Paths(Path(root)).lock("model")
    try:
        lock = FileLock(path, purpose).acquire(timeout=timeout)
    except BusyError:
        holder = read_lock_holder(path) or {}
        doing = holder.get("purpose") or "unknown"
        if doing.startswith("training "):
            what = (f"the daemon (pid {holder.get('pid') or '?'}) is {doing} "
                    "(current_model is being trained)")
            fix = f"Stop it first with `{STOP_WAIT_COMMAND}`, then run this again."
        else:
            what = f"current_model is busy: pid {holder.get('pid') or '?'} is running {doing}"
            fix = ("Wait for it to finish, then run this again (`python3 training_controller.py "
                   "status` shows the daemon).")
        raise BusyError(what, root, fix) from None
    _model_held.depth = 1
    try:
        yield
    finally:
        _model_held.depth = 0
        lock.release()


# --------------------------------------------------------------------------- CLI helpers

def add_common_args(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """`--root DIR` and (optionally) `--json` on a parser or subparser."""
    parser.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS,
                        help="training root (default: $TRAINING_ROOT, else the scripts' folder)")
    if json_flag:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print exactly one JSON document on stdout")


def subcommands(parser: argparse.ArgumentParser, *, wrap=None, json_flag: bool = True):
    """The one way every script builds its sub-commands: returns `add(name, func)`, which
    adds sub-command `name` run by handler `func` (help from its docstring's first line,
    description from the whole), with `--root` (and `--json`), and returns the sub-parser
    for its own arguments. `wrap` wraps each handler (cli_guard.guarded, say). No command
    given is run_cli's usage error, the same for every script."""
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func, *, json_out: bool = json_flag, root: bool = True) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").strip()
        sp = sub.add_parser(name, help=doc.split("\n")[0], description=doc)
        if root:
            add_common_args(sp, json_out)
        sp.set_defaults(func=wrap(func) if wrap else func)
        return sp
    return add


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def exit_without_teardown(code: int) -> None:
    """Flush stdout/stderr and exit now, skipping the interpreter's teardown (~2.5 s once
    torch is loaded). Only for a process whose state is already durable: nothing after
    this runs, not even `finally` blocks or atexit handlers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def asks_json(argv: list[str]) -> bool:
    """`--json` among `argv`, as argparse reads it (it accepts unambiguous prefixes)."""
    return any(a.startswith("--j") and "--json".startswith(a) for a in argv)


def _usage_errors_raise(parser: argparse.ArgumentParser) -> None:
    """Make `parser` and its subcommands raise UsageError instead of printing and exiting,
    so a usage error reads `Error: what, where. fix` and --json still gets its document."""
    def error(message, _parser=parser):
        _parser.print_usage(sys.stderr)
        raise UsageError(message, f"python3 {_parser.prog}",
                         f"Run `python3 {_parser.prog} --help` to see the usage.")
    parser.error = error
    for action in parser._actions:  # the subcommands' parsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _usage_errors_raise(sub)


def os_error(exc: OSError) -> GuardrailError:
    """An OSError as an expected failure: what the system said, the path, how to fix it."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "Make that path writable/readable (or point --root elsewhere), then run the command again."
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = ("Free space there (e.g. `python3 model_versioner.py prune`), then run the command "
               "again.")
    else:
        fix = "Check that path, then run the command again."
    return GuardrailError(exc.strerror or str(exc), exc.filename or None, fix)


def explicit_root(args) -> Path | None:
    """The root when it came from `--root`, else None: then a printed command needs
    `--root` to act on the same root when pasted (in any shell: $TRAINING_ROOT may differ
    there). None too for the scripts' folder when no $TRAINING_ROOT points elsewhere."""
    given = getattr(args, "root", None)
    if not given:
        return None
    try:
        root = resolve_root(given)
        return None if root == SCRIPTS_DIR == resolve_root(None) else root
    except GuardrailError:
        return None


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, dispatch to `args.func(args)`, and turn errors into `Error: ...` and exit codes.

    Each handler returns an int exit code (or None for 0). With `--json`, a failure
    (usage errors included) prints `{"ok": false, "error": ...}` on stdout as well as the
    plain line on stderr. An OSError is an `Error:` line naming the path, not a traceback;
    a reader that closes the pipe early (`| head`) ends the command quietly.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = asks_json(argv)
    _usage_errors_raise(parser)
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help printed and exited
            return int(exc.code or 0) and EXIT_USAGE
        want_json = bool(getattr(args, "json", False))
        if not hasattr(args, "func"):
            parser.print_help(sys.stderr)
            raise UsageError("no command given", f"python3 {parser.prog}",
                             f"Run `python3 {parser.prog} --help` to see the commands.")
        for name, value in (("root", None), ("json", False)):
            if not hasattr(args, name):
                setattr(args, name, value)
        try:
            code = args.func(args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise os_error(exc) from exc
        return EXIT_OK if code is None else int(code)
    except GuardrailError as exc:
        shown = explicit_root(args)
        if shown is not None:  # pasted, the commands it names act on the root it was given
            import cli_guard
            exc.fix = cli_guard.with_root(exc.fix, shown)
        print(f"Error: {exc}", file=sys.stderr)
        if want_json:
            print_json({"ok": False, "error": exc.to_dict()})
        return exc.exit_code
    except BrokenPipeError:
        # stdout's reader went away: nothing more can be said there, and Python's exit
        # flush must not raise again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("Error: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
