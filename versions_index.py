"""The index of versions: what each `versions/vNNN/version.json` says that lists and plans need.

`model_versioner.py show latest`, `snapshot`, `rollback`, `restore` and `prune` asked
every version folder (an `is_dir` each, and for `prune` and `current_version` every
version.json or manifest): at 10,000 versions seconds and 144 MB for a dry run. The index
is a small SQLite file, `ROOT/.index/versions.sqlite` (outside versions/, so its journal
never changes the folder it follows), one row per version folder: id, the folder's inode,
version.json's stat signature, whether the record is readable, created_at, reason,
parent, kind, base, why it is under review, and its manifest's inode.

- It is never trusted over the folders: it follows versions/ by the folder's directory
  signature (inode, mtime); when that changed (a version made, pruned, or a folder
  moved by hand) the folder is listed (`scandir`: names and inodes, no stat each) and the
  folders that came, went or were replaced are read or dropped. A signature younger than
  0.1 s (2 s on a file system with whole-second times) is not believed (a change within
  the same clock tick would not move the mtime), so the folder is listed again until it
  is older.
- A row is used only while version.json's stat signature is the one it was read with
  (a hand edit is read again); the files themselves are still read for what is shown.
- Missing, it is rebuilt from the folders (a warning when there were versions); damaged
  (not SQLite, a torn file) it is moved aside and rebuilt, with a warning.
- SQLite makes each update atomic (kill -9 leaves the old or the new state) and
  serialises writers across processes; every update is also idempotent.
- Where the index cannot be written (a read-only root) the answers come from a scan of
  the folders, as before the index existed (logged).

    import versions_index
    idx = versions_index.VersionsIndex(root)
    idx.ids()            # every version folder, oldest first
    idx.rows()           # readable versions: id, created_at, reason, kind, base, review
    idx.latest()         # the newest version with a readable record

Standard library only (sqlite3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from trainroot import GuardrailError, Paths, read_json

INDEX_DIR, INDEX_NAME = ".index", "versions.sqlite"
VERSION_FILE, MANIFEST = "version.json", ".manifest.json"
SCHEMA = 1
RACY_S = 2.0  # a directory signature younger than this is not believed (same-tick changes)
RACY_FINE_S = 0.1  # ... on a file system with sub-second timestamps (10x a kernel tick)
log = logging.getLogger("versions_index")

COLUMNS = ("num", "id", "dir_ino", "sig", "ok", "created_at", "reason", "parent", "kind",
           "base", "review", "manifest_ino")


def index_path(root) -> Path:
    return Paths(root).root / INDEX_DIR / INDEX_NAME


def version_number(name: str) -> int | None:
    """vNNN's number (model_versioner.VERSION_RE: `v` and 1 to 9 digits), else None; string
    tests, not the regex: a resync asks this of every name in versions/."""
    return int(name[1:]) if 2 <= len(name) <= 10 and name[0] == "v" and name[1:].isdecimal() \
        else None


def last_published(root, latest: str | None) -> str | None:
    """The version current_model last became, read without current_model (it may be gone):
    model_versioner's note of its last publish (`versions/.published.json`: a rollback or a
    restore to an older one, a backup restored), while no version was taken since (the
    note's `latest` is still `latest`); else `latest` (every version is current_model as it
    was when taken)."""
    versions = Paths(root).versions
    try:
        note = read_json(versions / ".published.json", default=None)
    except GuardrailError:
        note = None
    note = note if isinstance(note, dict) else {}
    vid = note.get("version") or note.get("parent_version")
    if latest and note.get("latest") == latest and isinstance(vid, str) and version_number(vid) \
            and (versions / vid).is_dir():
        return vid
    return latest


def _file_sig(path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def dir_signature(path: Path) -> tuple[str, bool]:
    """(signature, believable): a directory changed within its file system's timestamp
    tick (or in the future: a clock stepped back) may change again unseen. A file system
    with sub-second mtimes (ext4, xfs: a tick of 1-10 ms) is given RACY_FINE_S, one with
    whole seconds (or a time that happens to fall on one) RACY_S."""
    st = os.stat(path)
    margin = RACY_FINE_S if st.st_mtime_ns % 1_000_000_000 else RACY_S
    racy = not (st.st_mtime_ns / 1e9 < time.time() - margin)
    return f"{st.st_ino}:{st.st_mtime_ns}", not racy


def read_row(versions: Path, name: str, dir_ino: int) -> tuple:
    """A row for folder `versions/name`, from its version.json (ok 0 when unreadable)."""
    folder = versions / name
    sig = _file_sig(folder / VERSION_FILE)
    try:
        doc = read_json(folder / VERSION_FILE, default=None)
    except GuardrailError:
        doc = None
    try:
        manifest_ino = os.stat(folder / MANIFEST).st_ino
    except OSError:
        manifest_ino = None
    if not (isinstance(doc, dict) and isinstance(doc.get("manifest"), dict)):
        return (version_number(name), name, dir_ino, sig, 0, None, None, None, None, None, None,
                manifest_ino)

    def text(v):  # a lone surrogate (a data file's undecodable name in `reason`) stored as bytes
        if not isinstance(v, str):
            return None
        try:
            v.encode("utf-8")
            return v
        except UnicodeEncodeError:
            return v.encode("utf-8", "surrogatepass")

    parent = text(doc.get("parent"))
    parent = f"v{version_number(parent):03d}" if parent and version_number(parent) else None
    review = next((f"{k} (under review)" for k in ("rejected", "held") if doc.get(k)), None)
    return (version_number(name), name, dir_ino, sig, 1, text(doc.get("created_at")),
            text(doc.get("reason")), parent, text(doc.get("kind")), text(doc.get("base")), review,
            manifest_ino)


def _as_dict(row) -> dict:
    return {k: v.decode("utf-8", "surrogatepass") if isinstance(v, bytes) else v
            for k, v in zip(COLUMNS, row)}


class VersionsIndex:
    """versions/'s records in ROOT/.index/versions.sqlite (see the module docstring)."""

    def __init__(self, root):
        self.p = Paths(root)
        self.versions = self.p.versions
        self.path = index_path(root)

    # ------------------------------------------------------------------ the file

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA:
            return db
        db.execute("BEGIN IMMEDIATE")  # new, or another layout: (re)made once, by one process
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                db.execute("DROP TABLE IF EXISTS versions")
                db.execute("DROP TABLE IF EXISTS meta")
                # keyed by the folder's name: `v7` and `v007` are two folders (a hand-made one)
                db.execute("CREATE TABLE versions (num INTEGER, id TEXT PRIMARY KEY, dir_ino "
                           "INTEGER, sig TEXT, ok INTEGER, created_at TEXT, reason TEXT, "
                           "parent TEXT, kind TEXT, base TEXT, review TEXT, manifest_ino INTEGER)")
                db.execute("CREATE INDEX by_num ON versions (num)")
                db.execute("CREATE INDEX by_manifest ON versions (manifest_ino)")
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                db.execute(f"PRAGMA user_version = {SCHEMA}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _db(self):
        """A connection to an up-to-date index, or None where it cannot be kept (then the
        caller scans the folders)."""
        try:
            self.path.parent.mkdir(exist_ok=True)
            fresh = not self.path.exists()
            db = self._connect()
        except (OSError, sqlite3.OperationalError) as exc:  # read-only root, no room: scan
            log.info("versions index unavailable (%s): reading the version folders", exc)
            yield None
            return
        except sqlite3.DatabaseError as exc:
            db = self._damaged(exc)
            fresh = True
        try:
            try:
                self._sync(db, fresh)
            except sqlite3.OperationalError as exc:  # busy past the timeout, read-only, I/O
                log.info("versions index unavailable (%s): reading the version folders", exc)
                db.close()
                db = None
            except sqlite3.DatabaseError as exc:
                db.close()
                db = self._damaged(exc)
                self._sync(db, True)
            yield db
        finally:
            if db is not None:
                db.close()

    def _damaged(self, exc) -> sqlite3.Connection:
        aside = self.path.with_name(f"{INDEX_NAME}.damaged-{time.time_ns()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)
        for suffix in ("-journal", "-wal", "-shm"):  # a torn index's journal goes with it
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
        log.warning("%s was damaged (%s): moved to %s and rebuilt from versions/", self.path,
                    exc, aside.name)
        return self._connect()

    def _scan(self) -> dict:
        """{name: folder inode} of every version folder (scandir: no stat each)."""
        out = {}
        try:
            with os.scandir(self.versions) as it:
                for e in it:  # version_number's test inline: this runs for 10,000 names
                    name = e.name
                    if name[:1] == "v" and 2 <= len(name) <= 10 and name[1:].isdecimal() \
                            and e.is_dir():
                        out[name] = e.inode()
        except (FileNotFoundError, NotADirectoryError):  # none yet, or a file in its place
            pass
        return out

    def _sync(self, db: sqlite3.Connection, fresh: bool = False) -> None:
        try:
            sig, believable = dir_signature(self.versions)
        except (FileNotFoundError, NotADirectoryError):
            sig, believable = "missing", True
        row = db.execute("SELECT value FROM meta WHERE key = 'dir'").fetchone()
        if row and row[0] == sig and believable:
            return
        found = self._scan()
        meta = sig if believable else f"racy:{sig}"
        if row and row[0] == meta and dict(db.execute("SELECT id, dir_ino FROM versions")) == found:
            return  # listed again (a young signature) and nothing changed: no write, no fsync
        db.execute("BEGIN IMMEDIATE")
        try:
            known = dict(db.execute("SELECT id, dir_ino FROM versions"))
            if not known and found and (fresh or row is None):
                log.warning("%s is missing: rebuilding it from %d version folders", self.path,
                            len(found))
            gone = set(known) - set(found)
            db.executemany("DELETE FROM versions WHERE id = ?", ((n,) for n in gone))
            for name, ino in sorted(found.items()):
                if known.get(name) != ino:  # new, or a folder replaced under the same name
                    db.execute(f"INSERT OR REPLACE INTO versions VALUES ({','.join('?' * len(COLUMNS))})",
                               read_row(self.versions, name, ino))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dir', ?)", (meta,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _fresh(self, db, rows: list[tuple]) -> list[tuple]:
        """`rows` with any whose version.json changed since it was read read again."""
        out, stale = [], []
        base = os.fspath(self.versions)
        for r in rows:
            if _file_sig(os.path.join(base, r[1], VERSION_FILE)) != r[3]:  # str: pathlib per row costs 2x
                r = read_row(self.versions, r[1], r[2])
                stale.append(r)
            out.append(r)
        if stale and db is not None:
            with contextlib.suppress(sqlite3.OperationalError):  # only a cache: next time
                db.executemany(f"INSERT OR REPLACE INTO versions VALUES "
                               f"({','.join('?' * len(COLUMNS))})", stale)
        return out

    def _scanned(self) -> list[tuple[str, int]]:
        """[(name, folder inode)] oldest first, from the folder itself."""
        return sorted(self._scan().items(), key=lambda kv: (version_number(kv[0]), kv[0]))

    def _scanned_rows(self) -> list[tuple]:
        return [read_row(self.versions, name, ino) for name, ino in self._scanned()]

    # ------------------------------------------------------------------ questions

    def ids(self) -> list[str]:
        """Every version folder's id (readable record or not), oldest first."""
        with self._db() as db:
            if db is None:
                return [name for name, _ in self._scanned()]
            return [r[0] for r in db.execute("SELECT id FROM versions ORDER BY num, id")]

    def rows(self) -> list[dict]:
        """The versions with a readable record, oldest first, as dicts of COLUMNS (one
        query and a stat per version: no version.json read unless it changed)."""
        with self._db() as db:
            rows = self._scanned_rows() if db is None else self._fresh(db, list(db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM versions ORDER BY num, id")))
        return [_as_dict(r) for r in rows if r[4]]

    def newest(self, limit: int | None = None, *, readable: bool = False) -> list[dict]:
        """Up to `limit` rows, newest first (with `readable`, only versions whose record reads)."""
        with self._db() as db:
            if db is None:
                rows = self._scanned_rows()[::-1]
                return [_as_dict(r) for r in rows if r[4] or not readable][:limit]
            out, offset, page = [], 0, 16 if limit is None else max(limit, 1)
            while limit is None or len(out) < limit:
                batch = list(db.execute(f"SELECT {', '.join(COLUMNS)} FROM versions ORDER BY num "
                                        "DESC, id DESC LIMIT ? OFFSET ?", (page, offset)))
                if not batch:
                    break
                offset += len(batch)
                out += [r for r in self._fresh(db, batch) if r[4] or not readable]
            return [_as_dict(r) for r in out[:limit]]

    def latest(self) -> str | None:
        """The newest version whose record reads, or None."""
        rows = self.newest(1, readable=True)
        return rows[0]["id"] if rows else None

    def bases(self) -> dict[str, list[str]]:
        """{base id: the ids of the adapter versions on it, oldest first} (adapter mode)."""
        with self._db() as db:
            rows = [(r[1], r[8], r[9]) for r in self._scanned_rows()] if db is None else list(
                db.execute("SELECT id, kind, base FROM versions ORDER BY num, id"))
        out: dict[str, list[str]] = {}
        for vid, kind, base in rows:
            if kind == "adapter" and isinstance(base, str):
                out.setdefault(base, []).append(vid)
        return out

    def with_manifest(self, ino: int) -> list[str]:
        """Ids whose `.manifest.json` had inode `ino` when indexed, newest first: the
        candidates for "which version is this folder" (the caller checks each)."""
        with self._db() as db:
            if db is None:
                rows = self._scanned_rows()[::-1]
                return [r[1] for r in rows if r[11] == ino]
            return [r[0] for r in db.execute("SELECT id FROM versions WHERE manifest_ino = ? "
                                             "ORDER BY num DESC, id DESC", (ino,))]

    def summary(self, last: int = 1) -> dict:
        """{count, oldest, newest, last} of the version folders (for a state document that
        summarises instead of listing every id); `last` holds the newest `last` (>= 1) ids,
        oldest first. One connection, three small queries."""
        last = max(last, 1)
        with self._db() as db:
            if db is None:
                names = [name for name, _ in self._scanned()]
                count, oldest, tail = len(names), (names or [None])[0], names[-last:]
            else:
                count = db.execute("SELECT count(*) FROM versions").fetchone()[0]
                oldest = (db.execute("SELECT id FROM versions ORDER BY num, id LIMIT 1").fetchone()
                          or [None])[0]
                tail = [r[0] for r in db.execute("SELECT id FROM versions ORDER BY num DESC, "
                                                 "id DESC LIMIT ?", (last,))][::-1]
        return {"count": count, "oldest": oldest, "newest": tail[-1] if tail else None,
                "last": tail}
