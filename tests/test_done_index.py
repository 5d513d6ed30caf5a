""".index/done.sqlite: sha256 -> the done/ record that trained it, never trusted over the
records, rebuilt when missing or damaged, safe under two writers and kill -9."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
import done_index
import training_queue
import versions_index
from trainroot import Paths


@pytest.fixture
def root(tmp_root) -> Path:
    Paths(tmp_root).ensure()
    return tmp_root


def put_done(root: Path, name: str, content: str, version: str, finished: str = "2026-01-01T00:00:00Z") -> str:
    """A data file and its record in done/, as the daemon leaves them."""
    done = Paths(root).done
    (done / name).write_text(content)
    sha = hashlib.sha256(content.encode()).hexdigest()
    rec = {"name": name, "sha256": sha, "outcome": "done", "version_after": version,
           "finished_at": finished}
    (done / (name + ".record.json")).write_text(json.dumps(rec))
    return sha


def test_a_hit_is_read_back_from_its_record_and_follows_done(root):
    a = put_done(root, "a.jsonl", '{"text": "a"}\n', "v002")
    put_done(root, "a-2.jsonl", '{"text": "a"}\n', "v005")       # the same content, later
    b = put_done(root, "b.jsonl", '{"text": "b"}\n', "v003")
    odd = put_done(root, "bad\udcffname.jsonl", '{"text": "odd"}\n', "v004")  # not UTF-8
    idx = training_queue.done_index(root)
    assert idx.get(a)["name"] == "a-2.jsonl" and idx.get(a)["version_after"] == "v005"
    assert idx.get(b)["name"] == "b.jsonl" and idx.get("0" * 64) is None
    assert idx.get(odd)["name"] == "bad\udcffname.jsonl"
    assert done_index.index_path(root).is_file() and len(idx) == 4
    # a person moves a file out of done/ (and its record): the index follows the folder
    done = Paths(root).done
    os.rename(done / "b.jsonl", root / "b.jsonl")
    os.rename(done / "b.jsonl.record.json", root / "b.jsonl.record.json")
    assert idx.get(b) is None and len(idx) == 3
    # a record rewritten in place (the folder does not change): not believed
    rec = json.loads((done / "a-2.jsonl.record.json").read_text())
    (done / "a-2.jsonl.record.json").write_text(json.dumps(dict(rec, sha256="f" * 64)))
    assert idx.get(a)["name"] == "a.jsonl"
    # the backup count: by version ids
    assert idx.trained_since({"version": "v002"}) == 2 and idx.trained_since(None) == 3


def test_a_change_in_the_same_clock_tick_as_the_last_listing_is_not_missed(root):
    """done/ listed just after a change, then changed again within the same timestamp
    tick (its mtime does not move: set back here by hand): the second file is found."""
    put_done(root, "a.jsonl", '{"text": "a"}\n', "v002")
    done = Paths(root).done
    tick = os.stat(done).st_mtime_ns
    idx = training_queue.done_index(root)
    assert len(idx) == 1  # listed while done/'s signature is young
    b = put_done(root, "b.jsonl", '{"text": "b"}\n', "v003")
    os.utime(done, ns=(tick, tick))  # the same tick: the signature is the one just stored
    time.sleep(versions_index.RACY_FINE_S * 1.5)
    assert idx.get(b)["name"] == "b.jsonl" and len(idx) == 2


def test_a_missing_or_damaged_index_is_rebuilt_from_the_records(root, caplog):
    a = put_done(root, "a.jsonl", '{"text": "a"}\n', "v002")
    idx = done_index.DoneIndex(root)
    assert idx.get(a)["name"] == "a.jsonl"
    done_index.index_path(root).unlink()
    assert idx.get(a)["name"] == "a.jsonl"                       # rebuilt after rm
    done_index.index_path(root).write_bytes(b"this is not sqlite at all" * 100)
    with caplog.at_level(logging.WARNING, logger="done_index"):
        assert idx.get(a)["name"] == "a.jsonl"
    assert "was damaged" in caplog.text
    assert list((root / ".index").glob("done.sqlite.damaged-*"))  # kept aside, not deleted


WRITER = r"""
import sys
sys.path.insert(0, {repo!r})
import done_index
idx = done_index.DoneIndex({root!r})
for i in range({n}):
    name = f"{tag}-{{i}}.jsonl"
    idx.add(name, {{"sha256": f"{tag}{{i:062d}}", "version_after": f"v{{i + 2:03d}}"}})
    print(i, flush=True)
"""


def writer(root: Path, tag: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), root=str(root),
                                                                 tag=tag, n=n)],
                            stdout=subprocess.PIPE, text=True)


def test_two_writers_and_a_kill_9_leave_a_consistent_index(root):
    past = time.time_ns() - 10**10  # done/ as it looks a moment after its last change: the
    os.utime(Paths(root).done, ns=(past, past))  # writers' rows are not resynced away
    done_index.DoneIndex(root).get("x")  # created
    procs = [writer(root, "aa", 150), writer(root, "bb", 150)]
    for proc in procs:
        assert proc.wait(120) == 0
    db = sqlite3.connect(done_index.index_path(root))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM files").fetchone() == (300,)
    db.close()
    # kill -9 in the middle of updates: the old or the new state, never a torn one
    proc = writer(root, "cc", 100_000)
    for _ in range(50):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(done_index.index_path(root))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    n = db.execute("SELECT count(*) FROM files WHERE name >= CAST('cc-' AS BLOB) "
                   "AND name < CAST('cd' AS BLOB)").fetchone()[0]
    db.close()
    assert n >= 50
    # the index still answers (and its resync drops names done/ does not hold)
    idx = done_index.DoneIndex(root)
    os.utime(Paths(root).done, ns=(time.time_ns(), time.time_ns()))  # done/ "changed"
    assert idx.get(f"cc{0:062d}") is None and len(idx) == 0
