"""The index of trained files: sha256 -> the done/ record that trained that content.

Every file that arrives is checked against it (already trained? then skipped/), and the
daemon counts files trained since the last backup with it. Reading every done/ record for
that cost 53 us and 6 KB of memory per record at every daemon start and every
`training_queue.py add` (100,000 done files: seconds and hundreds of MB). The index is a
small SQLite file, `ROOT/.index/done.sqlite` (outside done/, so that its own journal never
changes the folder it watches):

- It is never trusted over the records: a hit is read back from its done/ record (sha256
  must match) before it is used; a record that is gone or changed makes the index resync.
- It follows done/ by itself: done/'s directory signature (inode, mtime) is stored with
  it; when the folder changed (a file moved in or out by anyone: the daemon, `add`, a
  person with `mv`), the names that came or went are read or dropped. A resync lists
  done/ (not every record): ~50 ms at 100,000 files; a missing index is rebuilt once. A
  signature younger than the file system's timestamp tick is not believed (a second
  change within the same tick would not move it): done/ is listed again next time.
- The daemon's own index (`owner`) is synced once per process, then kept by the daemon:
  it indexes each file it moves into done/, and lists done/ for what others changed at
  most once a minute and when idle; its duplicate check per queued file lists nothing.
- A damaged index (not SQLite, a torn file) is moved aside and rebuilt, with a warning.
- SQLite makes each update atomic (kill -9 leaves the old or the new state) and serialises
  writers across processes (the daemon and a person's `add` at once).

Standard library only (sqlite3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

import versions_index
from trainroot import Paths, read_json

INDEX_DIR, INDEX_NAME = ".index", "done.sqlite"
RECORD_SUFFIX = ".record.json"
_VERSION = re.compile(r"v(\d{3,})")
log = logging.getLogger("done_index")


def _version_num(vid) -> int | None:
    m = _VERSION.fullmatch(vid) if isinstance(vid, str) else None
    return int(m.group(1)) if m else None


class DoneIndex:
    """done/'s records by content hash, in done/.index.sqlite (see the module docstring)."""

    def __init__(self, root, *, owner: bool = False):
        """`owner`: the daemon's index. Its questions use the index as it is once it was
        synced in this process: the daemon indexes every file it moves into done/ (`add`)
        and brings the index in step with what others did to done/ between files, at most
        once a minute, and when idle (a listing of 100,000 names per file otherwise). A
        hit is still read back from its record; a person's `add` always syncs first."""
        self.done = Paths(root).done
        self.path = index_path(root)
        self.owner, self._synced = owner, False

    # ------------------------------------------------------------------ the file

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        # names are stored as the file system's bytes (os.fsencode): any name, even one
        # that is not UTF-8, is a key
        db.execute("CREATE TABLE IF NOT EXISTS files (name BLOB PRIMARY KEY, sha256 TEXT, "
                   "version_num INTEGER, finished_at TEXT)")
        db.execute("CREATE INDEX IF NOT EXISTS by_sha ON files (sha256)")
        # trained_since's count: ~0.1 ms at 100,000 files, where a scan of every row took ~6 ms
        db.execute("CREATE INDEX IF NOT EXISTS by_version ON files (version_num)")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        return db

    @contextlib.contextmanager
    def _db(self, sync: bool = True):
        """A connection to an up-to-date index (one per call: threads and processes alike);
        without `sync`, to the index as it is (still rebuilt when damaged)."""
        self.done.mkdir(parents=True, exist_ok=True)
        self.path.parent.mkdir(exist_ok=True)
        try:
            db = self._connect()
            try:  # (never synced, e.g. just rebuilt after an `rm`: synced whatever is asked)
                if sync or not db.execute("SELECT 1 FROM meta WHERE key = 'dir'").fetchone():
                    self._sync(db)
            except BaseException:
                db.close()
                raise
        except sqlite3.OperationalError:  # busy or an I/O error: not damage, nothing moved
            raise
        except sqlite3.DatabaseError as exc:  # not SQLite, torn: aside, rebuilt from the records
            aside = self.path.with_name(f"{INDEX_NAME}.damaged-{time.time_ns()}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, aside)
            log.warning("%s was damaged (%s): moved to %s and rebuilt from done/'s records",
                        self.path, exc, aside.name)
            db = self._connect()
            self._sync(db)
        try:
            yield db
        finally:
            db.close()

    def _signature(self) -> str:
        """done/'s signature; prefixed `racy:` while it is too young to be believed (a
        change within the same timestamp tick would not move it: versions_index.dir_signature):
        such a one is never trusted, and done/ is listed again until it is older."""
        sig, believable = versions_index.dir_signature(self.done)
        return sig if believable else f"racy:{sig}"

    def _sync(self, db: sqlite3.Connection, force: bool = False) -> None:
        sig = self._signature()
        row = db.execute("SELECT value FROM meta WHERE key = 'dir'").fetchone()
        self._synced = True
        if row and row[0] == sig and not force and not sig.startswith("racy:"):
            return
        names = record_names(os.listdir(self.done))
        db.execute("BEGIN IMMEDIATE")
        try:
            known = {os.fsdecode(r[0]) for r in db.execute("SELECT name FROM files")}
            gone = known - names
            db.executemany("DELETE FROM files WHERE name = ?", ((os.fsencode(n),) for n in gone))
            for n in sorted(names - known if not force else names):
                self._put(db, n, read_json(self.done / (n + RECORD_SUFFIX), default=None))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dir', ?)", (sig,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _put(db, name: str, rec) -> None:
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
            db.execute("INSERT OR REPLACE INTO files VALUES (?, NULL, NULL, NULL)",
                       (os.fsencode(name),))
            return
        finished = rec.get("finished_at") if isinstance(rec.get("finished_at"), str) else None
        db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                   (os.fsencode(name), rec["sha256"], _version_num(rec.get("version_after")),
                    finished))

    # ------------------------------------------------------------------ questions

    def get(self, sha256) -> dict | None:
        """The newest done/ record that trained content `sha256` (with its `name`), or None."""
        if not isinstance(sha256, str):
            return None
        for attempt in range(2):
            with self._db(sync=not (self.owner and self._synced)) as db:
                if attempt:
                    self._sync(db, force=True)
                rows = db.execute("SELECT name FROM files WHERE sha256 = ? ORDER BY "
                                  "version_num DESC, finished_at DESC, name DESC",
                                  (sha256,)).fetchall()
            for (raw,) in rows:
                name = os.fsdecode(raw)
                rec = read_json(self.done / (name + RECORD_SUFFIX), default=None)
                if isinstance(rec, dict) and rec.get("sha256") == sha256:
                    return dict(rec, name=name)
            if not rows:
                return None
        return None  # the index named records that no longer say so, even after a resync

    def add(self, name: str, rec: dict) -> None:
        """The daemon moved `name` into done/ with `rec`: index it now, without listing
        done/ (100,000 names, every file); the stored signature stays the one before the
        move, so the next query that needs done/ whole lists it once."""
        with self._db(sync=False) as db:
            self._put(db, name, rec)

    def trained_since(self, backup: dict | None, *, sync: bool = True) -> int:
        """Files trained after `backup` was taken: by version ids, which only grow (a clock
        that ran ahead when the backup was made cannot hide files); by time only for a
        backup that names no version; every file when there is no backup. `sync=False`:
        the rows as they are (the daemon's count for its backup trigger, which `add` keeps)."""
        with self._db(sync=sync) as db:
            if backup is None:
                return db.execute("SELECT count(*) FROM files WHERE sha256 IS NOT NULL").fetchone()[0]
            num = _version_num(backup.get("version"))
            if num is not None:
                return db.execute("SELECT count(*) FROM files WHERE version_num > ? OR "
                                  "(version_num IS NULL AND finished_at > ?)",
                                  (num, backup.get("created_at") or "")).fetchone()[0]
            return db.execute("SELECT count(*) FROM files WHERE finished_at > ?",
                              (backup.get("created_at") or "",)).fetchone()[0]

    def highest_version(self) -> int | None:
        """The highest version number a done/ record names as `version_after` (a new id
        must not be one of them, even after versions/ itself was lost)."""
        with self._db() as db:
            return db.execute("SELECT max(version_num) FROM files").fetchone()[0]

    def __len__(self) -> int:
        with self._db() as db:
            return db.execute("SELECT count(*) FROM files").fetchone()[0]

    def fresh_count(self) -> int | None:
        """How many files the index holds, if it is up to date with done/ (its stored
        signature is done/'s now); else None. Read-only: never builds, syncs or locks
        anything (status commands read it; the daemon and `add` keep it in step)."""
        try:
            sig = self._signature()
            db = sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True, timeout=2)
        except (OSError, sqlite3.Error):
            return None
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'dir'").fetchone()
            if not row or row[0] != sig or sig.startswith("racy:"):
                return None
            return db.execute("SELECT count(*) FROM files").fetchone()[0]
        except sqlite3.Error:  # missing, busy, damaged: the caller counts done/ itself
            return None
        finally:
            db.close()


def index_path(root) -> Path:
    return Paths(root).root / INDEX_DIR / INDEX_NAME


def record_names(entries) -> set:
    """The trained files among done/'s entries: each record (beside its data file, done_archive's
    NAME.gz, or alone once the data file was deleted by hand: what was trained stays
    known); hidden names never."""
    return {n[:-len(RECORD_SUFFIX)] for n in entries
            if n.endswith(RECORD_SUFFIX) and not n.startswith(".")}


def count(root) -> int:
    """Files in done/ (each a data file with its record): from the index when it is up to
    date, else from one listing of done/ (the index is not built here: a status never
    reads 100,000 records)."""
    n = DoneIndex(root).fresh_count()
    if n is not None:
        return n
    try:
        return len(record_names(os.listdir(Paths(root).done)))
    except (FileNotFoundError, NotADirectoryError):
        return 0
