"""The daemon's intake: from inbox/ (and inbox/high/, inbox/low/) to the queue.

`InboxIntake` (an object training_daemon.Daemon owns) watches the inbox with watchdog, takes
each settled file, validates and queues it, or moves it to failed/ or skipped/ with its
reason and fix. For one entry: `open_for_writing` (a file still being written is never
half-read), `special_file` (what a link, pipe, socket or device is, and its fix), and
`claim_across` (an inbox on another filesystem: copy, fsync, name, then remove the
original, as `mv` does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shlex
import shutil
import stat
import threading
import time
from pathlib import Path

import training_queue
import trainroot


def open_for_writing(path: str) -> bool:
    """True if some process has `path` open for writing (a read lease is refused then).

    Linux only and cheap (three syscalls). Where leases are unsupported (NFS, another
    owner without CAP_LEASE) it answers False and the settle interval alone decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    finally:
        os.close(fd)


def special_file(path: str, root: Path) -> tuple[str, str] | None:
    """(reason, fix) for an inbox entry that is not a regular file, judged where it is (a
    relative link means something else once moved); None for a regular file or none."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    inbox = root / "inbox"
    save = f"Save the data as a regular .jsonl file and drop that into {shlex.quote(str(inbox))}/."
    if stat.S_ISLNK(mode):
        try:
            link = os.readlink(path)
        except OSError:
            link = "?"
        itself = f"Drop the file itself into {shlex.quote(str(inbox))}/, not a link to it."
        try:
            target_mode = os.stat(path).st_mode
        except FileNotFoundError:
            return f"not a regular file: a symbolic link to {link}, which does not exist", itself
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"not a regular file: a symbolic link loop ({link})", itself
            return (f"not a regular file: a symbolic link to {link}, which cannot be read "
                    f"({exc.strerror})", itself)
        target = os.path.realpath(path)
        if stat.S_ISREG(target_mode):
            return (f"not a regular file: a symbolic link to {target} (only a file itself is "
                    "taken: a link's target can change while it trains)",
                    f"`{training_queue.add_cmd(root, target)}` queues a copy of its content.")
        return f"not a regular file: a symbolic link to {target}, which is not a file", itself
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"not a regular file: {kind}", save


def claim_across(src: str, directory: Path, sig: tuple | None) -> Path | None:
    """Take `src` from another filesystem into `directory` (rename(2) said EXDEV), as `mv`
    does across disks: copy under a hidden temp name, fsync, give the copy its name (never
    replacing one), and only then remove the original. A crash in between leaves it in the
    inbox as well, and the second copy is skipped as already trained: never in no place.

    Regular files and links (re-made with the same target) only; None for anything else,
    or when the file changed while it was copied (it settles and is taken later).
    """
    directory.mkdir(parents=True, exist_ok=True)
    st = os.lstat(src)
    name = os.path.basename(src)
    tmp = directory / f".claim-{os.getpid()}-{time.time_ns()}.tmp"   # hidden: never taken
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    elif stat.S_ISREG(st.st_mode):
        # O_NONBLOCK: a file swapped for a FIFO since it was looked at must not hang us
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            with open(fd, "rb", closefd=False) as f_in, open(tmp, "xb") as f_out:
                shutil.copyfileobj(f_in, f_out, 1 << 20)
                f_out.flush()
                os.fsync(f_out.fileno())
            after = os.fstat(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        now = (after.st_size, after.st_mtime_ns, after.st_ino)
        if not stat.S_ISREG(after.st_mode) or now != (sig or now) or \
                now != (st.st_size, st.st_mtime_ns, st.st_ino) or os.path.getsize(tmp) != after.st_size:
            os.unlink(tmp)
            return None
        shutil.copystat(src, tmp)  # its mode and mtime, as `mv` keeps them
    else:
        return None
    dst = trainroot.move_unique(tmp, directory, name=name)   # fsyncs the folder
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass  # removed meanwhile: the copy is the one left
    except OSError:  # a read-only drop folder: keep the original there, never two of it
        os.unlink(dst)
        raise
    return dst


# --------------------------------------------------------------------------- the daemon's intake

BURST_LOG_LINES = 20     # files logged one by one per intake pass before a summary line
INTAKE_WHILE_TRAINING_S = (1.0, 0.25)  # while a file trains: an intake pass every 1 s, of
                                       # at most 0.25 s (a burst goes on at the next one)
INTAKE_WHILE_TRAINING_MAX_BYTES = 32 << 20  # validated in ~0.2 s; a bigger file waits for the
                                            # file in training to end, so a stop stays prompt
_PRIORITY_DIRS = (("high", "inbox_high"), ("normal", "inbox"), ("low", "inbox_low"))


class _Candidate:
    __slots__ = ("priority", "sig", "since")

    def __init__(self, priority: str, sig: tuple, since: float):
        self.priority, self.sig, self.since = priority, sig, since


class InboxIntake:
    """The daemon's intake: watch inbox/ and its priority folders, take each settled file,
    validate and queue it (or fail or skip it, with its reason and fix).

    The daemon owns one (`Daemon.intake`, made once config.json is loaded); this is all it
    gives it, and all the intake touches of the daemon:
      paths, cfg, log   the root's `Paths`, the loaded config, the daemon's logger
      wake              the Event the daemon's loop waits on: set when a watched folder changes
      done              the done index (done_index.DoneIndex: sha256 -> done/ record)
      tend()            write the heartbeat and act on requests (a long pass calls it every 0.5 s)
      stopping()        True once a stop is claimed or signalled: a pass ends there
      on_queued(rec)    a file was queued (the daemon may start loading torch meanwhile, and
                        test-renders its first records with the model's chat template)
      on_failed(msg)    intake of one file failed (the daemon's last_error): it stays claimed
                        after a disk error, else goes to failed/ (training_queue.fail_intake)
    The daemon calls `start_watching`, `recover_incoming`, `scan_inbox`, `take`,
    `between_steps`, `waiting` and `stop_watching`. Its own state: the candidates (inbox
    path -> first seen), the watcher's hints, the warnings already given, and its timers.
    """

    def __init__(self, paths, cfg: dict, log: logging.Logger, wake: threading.Event, *,
                 done: dict, tend, stopping, on_queued, on_failed):
        self.p, self.cfg, self.log, self.wake, self.done = paths, cfg, log, wake, done
        self.tend, self.stopping = tend, stopping
        self.on_queued, self.on_failed = on_queued, on_failed
        self.candidates: dict[str, _Candidate] = {}  # inbox path -> when first seen
        self.hinted: set[str] = set()            # paths the watcher saw change (hint_lock)
        self.warned: set[str] = set()            # inbox entries already warned about, once each
        self.hint_lock = threading.Lock()
        self._next_rescan = 0.0                  # a full rescan then (cfg rescan_seconds)
        self._claimed_left = False               # an intake failed on the disk: retried then
        self._checked_while_training = 0.0       # the last pass between training steps
        self._intake_count = self._burst_quiet = 0
        self._observer = None

    def waiting(self) -> bool:
        """True while some inbox file is seen and not yet taken (settling, or still open)."""
        return bool(self.candidates)

    def start_watching(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError as exc:
            self.log.warning("watchdog unavailable (%s): rescanning every %ss only", exc,
                             self.cfg["rescan_seconds"])
            return
        intake = self

        class Hints(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                path = getattr(event, "dest_path", None) or event.src_path
                with intake.hint_lock:
                    intake.hinted.add(os.fsdecode(path))
                intake.wake.set()

        obs = Observer()
        try:
            for d in (self.p.inbox, self.p.inbox_high, self.p.inbox_low):
                obs.schedule(Hints(), str(d), recursive=False)
            obs.start()
        except OSError as exc:  # inotify limits come back as ENOSPC (watchdog#673)
            self.log.warning("inbox watcher failed (%s): rescanning every %ss only", exc,
                             self.cfg["rescan_seconds"])
            with contextlib.suppress(Exception):
                obs.stop()
            return
        self._observer = obs

    def stop_watching(self) -> None:
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.stop()
                self._observer.join(timeout=5)

    def _note(self, path: str, priority: str, now: float) -> None:
        name = os.path.basename(path)
        if training_queue.is_ignored(name):
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.candidates.pop(path, None)
            return
        priority_dir = path in (str(self.p.inbox_high), str(self.p.inbox_low))
        if stat.S_ISDIR(st.st_mode) or (priority_dir and os.path.isdir(path)):
            # (inbox/high or inbox/low may be a link to a folder elsewhere, as inbox/ may)
            if not priority_dir:
                self._warn_once(path, "%s is a folder: the daemon never looks inside folders "
                                "(only inbox/, inbox/high/, inbox/low/), so what it holds stays "
                                "there untouched. Move its .jsonl files into %s/ to train them.",
                                path, os.path.dirname(path))
            return
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        cand = self.candidates.get(path)
        if cand is None or cand.sig != sig:
            self.candidates[path] = _Candidate(priority, sig, now)

    def _warn_once(self, key: str, msg: str, *args, level: int = logging.WARNING) -> None:
        """Log `msg` the first time only: a rescan every few seconds must not repeat it."""
        if key not in self.warned:
            self.warned.add(key)
            self.log.log(level, msg, *args)

    def scan_inbox(self, full: bool) -> None:
        now = time.monotonic()
        with self.hint_lock:
            hinted, self.hinted = self.hinted, set()
        prio_of = {str(getattr(self.p, attr)): pr for pr, attr in _PRIORITY_DIRS}
        if full:
            for pr, attr in _PRIORITY_DIRS:
                try:
                    with os.scandir(getattr(self.p, attr)) as it:
                        for entry in it:
                            self._note(entry.path, pr, now)
                except FileNotFoundError:
                    getattr(self.p, attr).mkdir(parents=True, exist_ok=True)
            for path in list(self.candidates):
                if not os.path.lexists(path):
                    del self.candidates[path]
        else:
            for path in hinted:
                pr = prio_of.get(os.path.dirname(path))
                if pr is not None:
                    self._note(path, pr, now)

    def between_steps(self, now: float) -> None:
        """While a file trains: files dropped now are validated and queued now, in a short
        pass every so often (INTAKE_WHILE_TRAINING_S)."""
        every, budget = INTAKE_WHILE_TRAINING_S
        if now - self._checked_while_training >= every:
            self._checked_while_training = now
            self.take(budget_s=budget)

    def take(self, budget_s: float | None = None) -> None:
        """Claim every settled inbox file, validate it and queue it (or fail/skip it).

        With `budget_s` (while a file trains, between steps) a pass ends after about that
        long; the files left wait for the next pass, and requests for the training loop.
        """
        now = time.monotonic()
        full = now >= self._next_rescan
        if full:
            self._next_rescan = now + self.cfg["rescan_seconds"]
            if self._claimed_left and budget_s is None:  # an intake the disk refused: again
                self._claimed_left = False
                self.recover_incoming()
        self.scan_inbox(full)
        settle = self.cfg["settle_seconds"]
        # arrival order: when first seen, then (files found by one scan, e.g. at start-up)
        # by modification time, then name
        ready = [(c.since, c.sig[1], path) for path, c in self.candidates.items()
                 if now - c.since >= settle]
        ready.sort()
        batch = training_queue.SyncBatch()
        self._intake_count = self._burst_quiet = 0
        try:
            self._intake_ready(ready, now, batch, budget_s)
        finally:
            batch.flush()
            if self._burst_quiet:
                self.log.warning("... and %d more files moved to failed/ or skipped/ (each with "
                                 "its reason in NAME.record.json)", self._burst_quiet)

    def _intake_ready(self, ready: list, now: float, batch, budget_s: float | None) -> None:
        started = last_control = time.monotonic()
        for *_, path in ready:
            if budget_s is not None and time.monotonic() - started > budget_s:
                return  # training goes on; the rest stay candidates for the next pass
            cand = self.candidates.pop(path)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) != cand.sig:
                self.candidates[path] = _Candidate(cand.priority,
                                                   (st.st_size, st.st_mtime_ns, st.st_ino), now)
                continue
            if budget_s is not None and st.st_size > INTAKE_WHILE_TRAINING_MAX_BYTES:
                self.candidates[path] = cand  # taken once no file trains
                continue
            if stat.S_ISREG(st.st_mode) and open_for_writing(path):
                cand.since = time.monotonic()   # still being written: wait another interval
                self.candidates[path] = cand
                self._warn_once(f"{path}\0open", "%s is still open for writing by another "
                                "process: it is taken once that closes it (a file being written "
                                "is never half-read)", path, level=logging.INFO)
                continue
            self._ingest(path, cand.priority, batch, cand.sig)
            if self.stopping():  # claimed while a big file was validated
                return
            if budget_s is None and time.monotonic() - last_control > 0.5:  # a burst must not hide a stop
                last_control = time.monotonic()
                batch.flush()
                self.tend()
                if self.stopping():
                    return

    def _ingest(self, path: str, priority: str, batch, sig: tuple | None = None) -> None:
        name = os.path.basename(path)
        incoming = self.p.queue / training_queue.INCOMING / priority
        special = special_file(path, self.p.root)  # where it is: a relative link means this
        try:
            claimed = trainroot.move_unique(path, incoming, sync=False)
        except FileNotFoundError:
            return  # someone took it back first
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # inbox/ on another disk (a link to a shared drop folder): copy, then remove
            try:
                claimed = claim_across(path, incoming, sig)
            except OSError as err:
                self._warn_once(path, "%s cannot be taken from the inbox (%s); it stays there. "
                                "Make %s writable for this user, or copy the file in with "
                                "`python3 training_queue.py add %s`.", path,
                                err.strerror or err, os.path.dirname(path), shlex.quote(path))
                return
            if claimed is None:
                if special is not None and not special[0].startswith("not a regular file: a "
                                                                     "symbolic link"):
                    self._warn_once(path, "%s: %s on another filesystem than the root; it stays "
                                    "where it is. %s", path, special[0], special[1])
                return  # changed while copied, or a pipe/socket/device: looked at again later
        batch.dirs.update((os.path.dirname(path), str(incoming)))
        self._enqueue_claimed(claimed, priority, name, batch, special)

    def _enqueue_claimed(self, claimed: Path, priority: str, name: str, batch=None,
                         special: tuple[str, str] | None = None) -> None:
        if claimed.is_file() and not claimed.is_symlink():
            special = None
        elif special is None:
            special = special_file(str(claimed), self.p.root) or ("not a regular file", None)
        try:
            examined = None
            if special is None and claimed.stat().st_size > INTAKE_WHILE_TRAINING_MAX_BYTES:
                examined = self._examine_aside(claimed, name)  # never while a file trains
                if examined is None:
                    return  # a stop came first: it stays claimed, taken at the next start
            rec = training_queue.enqueue(
                self.p.root, claimed, priority=priority, move=True, cfg=self.cfg,
                source="inbox", done=self.done, name=name, batch=batch,
                not_regular=special and special[0], fix=special and special[1],
                examined=examined)
        except Exception as exc:  # never lose it: whatever broke, the file is kept
            if not isinstance(exc, OSError):  # not the disk: it would crash at every start
                with contextlib.suppress(OSError):
                    dst = training_queue.fail_intake(self.p.root, claimed, name, priority, exc)
                    self.log.exception("intake of %s crashed; it is kept in %s", name, dst)
                    self.on_failed(f"intake of {name} crashed ({exc}); it is in failed/")
                    return
            self.log.exception("intake of %s failed; it stays in %s and is taken again at "
                               "the next rescan", name, claimed.parent)
            self._claimed_left = True
            self.on_failed(f"intake of {name} failed: {exc}")
            return
        self._intake_count += 1
        if self._intake_count > BURST_LOG_LINES and rec["outcome"] != "queued":
            self._burst_quiet += 1  # a burst: one summary line instead of 10,000
        else:
            level = logging.INFO if rec["outcome"] == "queued" else logging.WARNING
            self.log.log(level, "%s: %s (%s)%s%s", name, rec["outcome"], priority,
                         f" - {rec['reason']}" if rec.get("reason") else "",
                         f". {rec['fix']}" if rec.get("fix") else "")
        if rec["outcome"] == "queued":  # (after the line: its test render may fail it next)
            self.on_queued(rec)

    def _examine_aside(self, claimed: Path, name: str) -> dict | None:
        """Hash and validate a big file (over 32 MB; a 2 GB one takes ~20 s) in a thread,
        while this loop keeps the heartbeat and acts on requests; None if a stop came
        first (the thread only reads: it is left to end with the process)."""
        box: dict = {}

        def work():
            try:
                box["examined"] = training_queue.examine(claimed, name, self.cfg)
            except BaseException as exc:  # raised here, in the loop, by the caller's handler
                box["error"] = exc
        worker = threading.Thread(target=work, name=f"examine {name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            self.tend()
            if self.stopping():
                self.log.info("%s: stopping before its validation ended; it stays in %s and "
                              "is validated again at the next start", name, claimed.parent)
                return None
        if "error" in box:
            raise box["error"]
        return box["examined"]

    def recover_incoming(self) -> None:
        """Files claimed from the inbox before a crash go through intake again."""
        base = self.p.queue / training_queue.INCOMING
        for pr in training_queue.PRIORITIES:
            d = base / pr
            if not d.is_dir():
                continue
            for n in sorted(os.listdir(d)):
                if n.startswith(".claim-") and n.endswith(".tmp"):
                    # a copy from another disk cut short: its original is still in the inbox
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(d / n)
                    self.log.info("recovery: removed %s (a partial copy; the original is still "
                                  "in the inbox)", d / n)
                elif not training_queue.is_ignored(n):
                    self._enqueue_claimed(d / n, pr, n)
