""".index/versions.sqlite: the versions' records that lists and plans need, so that show,
snapshot, rollback, restore and prune cost the same at many versions as at a few; never
trusted over the folders, rebuilt when missing or damaged, safe under two writers and kill -9.

Costs are counted, not timed: which files a command opens (an audit hook on `open`), at a
root with a few versions and one with many more."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
import model_versioner as mv
import versions_index
from trainroot import Paths

_opened: list | None = None


def _audit(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # process-wide and permanent: it records only while _opened is a list


def opened_by(fn, *args, **kw) -> list[str]:
    """The files `fn` opened (every open() and os.open(); sqlite's own are not counted)."""
    global _opened
    _opened = []
    try:
        fn(*args, **kw)
        return list(_opened)
    finally:
        _opened = None


def stats_by(monkeypatch, fn, *args) -> int:
    """How many times `fn` called os.stat (pathlib's stat, is_dir, exists all do)."""
    calls, real = [], os.stat

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)
    monkeypatch.setattr(os, "stat", counting)
    try:
        fn(*args)
    finally:
        monkeypatch.setattr(os, "stat", real)
    return len(calls)


def version_json_reads(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith("/version.json")]


def grow(root: Path, upto: int, *, start: int = 2) -> None:
    """Versions v<start>..v<upto>, one a day, as create_version leaves them: the weights hard
    links of v001's, each its own trainer_state.json (so each is a different model),
    manifest and version.json."""
    import hashlib
    from model_manifest import write_manifest
    p = Paths(root)
    v1 = json.loads((p.versions / "v001" / "version.json").read_text())
    for n in range(start, upto + 1):
        folder = p.versions / f"v{n:03d}"
        files = dict(v1["manifest"])
        for rel in files:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel != "trainer_state.json":
                os.link(p.versions / "v001" / rel, folder / rel)
        state = json.dumps({"global_step": n, "tokens_seen": 64 * n}).encode()
        (folder / "trainer_state.json").write_bytes(state)
        files["trainer_state.json"] = {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)}
        write_manifest(folder, files={k: {"sha256": e["sha256"], "size": e["size"]}
                                      for k, e in files.items()})
        for rel in files:
            os.chmod(folder / rel, 0o444)
        manifest = {rel: {**e, "mtime_ns": (folder / rel).stat().st_mtime_ns} for rel, e in files.items()}
        rec = dict(v1, id=folder.name, parent=f"v{n - 1:03d}", reason=f"post-train:f{n}.jsonl",
                   created_at=f"2026-{1 + n // 28 % 12:02d}-{1 + n % 28:02d}T00:00:00Z",
                   global_step=n, manifest=manifest)
        (folder / "version.json").write_text(json.dumps(rec))
    (p.versions / mv.LAST_ID).write_text(json.dumps({"schema_version": 1, "last": f"v{upto:03d}"}))


def synthetic(root: Path, n: int, **extra) -> None:
    """n versions with a record and no model (enough for the index and prune's plan)."""
    p = Paths(root)
    for i in range(1, n + 1):
        folder = p.versions / f"v{i:03d}"
        folder.mkdir(parents=True)
        (folder / ".manifest.json").write_text("{}")
        rec = {"id": folder.name, "created_at": f"2026-01-{1 + i % 28:02d}T00:00:00Z",
               "reason": "manual", "parent": f"v{i - 1:03d}" if i > 1 else None,
               "manifest": {}, **extra.get(folder.name, {})}
        (folder / "version.json").write_text(json.dumps(rec))


@pytest.fixture
def two_roots(tmp_path, tiny_model_dir, monkeypatch):
    """The same initialised root with 3 versions and with 60 (indexes built)."""
    import training_daemon
    roots = []
    for n in (3, 60):
        root = tmp_path / f"r{n}"
        training_daemon.init_root(root, base=str(tiny_model_dir))
        grow(root, n)
        mv.latest_version(root)  # the index catches up with the grown folders once
        roots.append(root)
    return roots


COMMANDS = (("show", ["show", "latest"]), ("prune", ["prune"]),
            ("snapshot", ["snapshot", "--force"]), ("restore", ["restore", "v002"]),
            ("rollback", ["rollback"]), ("snapshot again", ["snapshot", "--force"]))


def test_routine_commands_read_the_same_files_at_3_and_60_versions(two_roots, capsys, monkeypatch):
    """show latest, prune's dry run, snapshot --force, restore and rollback open no more
    files at 60 versions than at 3 (no version.json but the ones they show or use), and
    all but prune stat no more either (prune's plan: one stat per version, no read)."""
    counts, files_by = {}, {}
    for root in two_roots:
        os.utime(Paths(root).versions, ns=(1, 1))  # its signature old enough to believe
        mv.latest_version(root)
        for name, argv in COMMANDS:
            files = [f for f in opened_by(mv.main, ["--root", str(root), *argv])
                     if f.startswith(str(root))]  # not the imports
            files_by.setdefault(name, []).append([f.replace(str(root), "R") for f in files])
            counts.setdefault(name, []).append((len(version_json_reads(files)), len(files)))
        for name, argv in COMMANDS:
            if name != "prune":
                counts[name][-1] += (stats_by(monkeypatch, mv.main, ["--root", str(root), *argv]),)
    capsys.readouterr()
    for name, (small, large) in counts.items():
        assert small == large, (name, counts, files_by[name])
    assert counts["prune"][1][0] <= 1  # current_model's own record at most: rows, not records


def gate_holds(root: Path, vid: str) -> None:
    """processing/held.jsonl, held by the quality gate with its training kept as `vid`."""
    import training_queue
    data = Paths(root).processing / "held.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text('{"text": "x"}\n')
    training_queue.update_record(data, name="held.jsonl", hold={"kind": "gate", "version": vid})


def test_prune_plan_reads_the_index_not_every_record(tmp_root):
    synthetic(tmp_root, 40, v007={"held": True}, v009={"rejected": {"by": "gate"}})
    gate_holds(tmp_root, "v009")
    plan = mv.prune_plan(tmp_root, 3)
    assert plan["keep"]["v009"] == ["the quality gate holds held.jsonl's training as it"]
    assert set(plan["keep"]) == {"v009", "v038", "v039", "v040"}  # v007: decided, as any other
    assert version_json_reads(opened_by(mv.prune_plan, tmp_root, 3)) == []
    # a hand edit of one record is seen (its stat changed): read again, that one only
    rec = Paths(tmp_root).versions / "v020" / "version.json"
    doc = json.loads(rec.read_text())
    rec.write_text(json.dumps(dict(doc, held=True)) + "\n" * 7)
    gate_holds(tmp_root, "v020")
    files = opened_by(mv.prune_plan, tmp_root, 3)
    assert version_json_reads(files) == [str(rec)]
    assert mv.prune_plan(tmp_root, 3)["keep"]["v020"] == ["the quality gate holds held.jsonl's training as it"]


def test_an_index_removed_or_damaged_is_rebuilt_with_the_same_answers(tmp_root, caplog):
    synthetic(tmp_root, 12, v004={"held": True})
    tags = Paths(tmp_root).versions / mv.TAGS_FILE
    tags.write_text(json.dumps({"keep": "v002"}))
    before = (mv.prune_plan(tmp_root, 2), mv.latest_version(tmp_root), mv._version_dirs(Paths(tmp_root)))
    path = versions_index.index_path(tmp_root)
    assert path.is_file()
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="versions_index"):
        assert (mv.prune_plan(tmp_root, 2), mv.latest_version(tmp_root),
                mv._version_dirs(Paths(tmp_root))) == before
    assert "is missing: rebuilding it from 12 version folders" in caplog.text
    caplog.clear()
    path.write_bytes(b"this is not sqlite at all" * 100)
    with caplog.at_level(logging.WARNING, logger="versions_index"):
        assert (mv.prune_plan(tmp_root, 2), mv.latest_version(tmp_root),
                mv._version_dirs(Paths(tmp_root))) == before
    assert "was damaged" in caplog.text
    assert list(path.parent.glob("versions.sqlite.damaged-*"))  # kept aside, not deleted


def test_the_index_follows_the_folders(tmp_root):
    synthetic(tmp_root, 6)
    p = Paths(tmp_root)
    assert mv.latest_version(tmp_root) == "v006"
    shutil.rmtree(p.versions / "v006")                      # a person deletes the newest
    assert mv.latest_version(tmp_root) == "v005" and "v006" not in mv._version_dirs(p)
    (p.versions / "v005" / "version.json").write_text("{torn")  # damaged: the one before
    assert mv.latest_version(tmp_root) == "v004"
    assert "v005" in mv._version_dirs(p)                    # still a folder (verify --all sees it)
    (p.versions / "v7").mkdir()                             # a hand-made name: its own folder
    assert versions_index.VersionsIndex(tmp_root).summary(2) == {
        "count": 6, "oldest": "v001", "newest": "v7", "last": ["v005", "v7"]}
    os.rmdir(p.versions / "v7")
    # a folder replaced under the same name (rm -rf, then another copied in): read again
    shutil.rmtree(p.versions / "v003")
    (p.versions / "v003").mkdir()
    (p.versions / "v003" / "version.json").write_text(json.dumps(
        {"id": "v003", "created_at": "2026-01-01T00:00:00Z", "manifest": {}, "held": True}))
    gate_holds(tmp_root, "v003")
    assert mv.prune_plan(tmp_root, 1)["keep"]["v003"] == ["the quality gate holds held.jsonl's training as it"]


def test_a_change_in_the_same_clock_tick_is_not_missed(tmp_root, monkeypatch):
    """versions/'s mtime may not move for a change within one tick: a signature younger
    than the file system's tick margin is not believed, so the folder is listed again."""
    import types
    synthetic(tmp_root, 3)
    p = Paths(tmp_root)
    st = os.stat(p.versions)
    clock = types.SimpleNamespace(time=lambda: st.st_mtime_ns / 1e9 + 0.01, time_ns=time.time_ns)
    monkeypatch.setattr(versions_index, "time", clock)  # the index is read 10 ms after the change
    assert mv.latest_version(tmp_root) == "v003"
    (p.versions / "v004").mkdir()
    (p.versions / "v004" / "version.json").write_text(json.dumps(
        {"id": "v004", "created_at": "2026-01-01T00:00:00Z", "manifest": {}}))
    os.utime(p.versions, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if the same tick
    assert mv.latest_version(tmp_root) == "v004"
    monkeypatch.undo()
    # an old signature is believed: one stat, no listing
    os.utime(p.versions, ns=(1, 1))
    mv.latest_version(tmp_root)
    (p.versions / "v005").mkdir()
    os.utime(p.versions, ns=(1, 1))
    assert versions_index.VersionsIndex(tmp_root).ids()[-1] == "v004"


WRITER = r"""
import json, os, sys
sys.path.insert(0, {repo!r})
import versions_index
root, tag, n = {root!r}, {tag!r}, {n}
idx = versions_index.VersionsIndex(root)
for i in range(n):
    num = {base} + i
    staging = os.path.join(root, "versions", f".staging-{tag}")  # as model_versioner makes one:
    os.mkdir(staging)                                            # whole, then renamed into place
    with open(os.path.join(staging, "version.json"), "w") as f:
        json.dump({{"id": f"v{{num:03d}}", "created_at": "2026-01-01T00:00:00Z", "manifest": {{}}}}, f)
    os.rename(staging, os.path.join(root, "versions", f"v{{num:03d}}"))
    idx.ids()
    print(i, flush=True)
"""


def writer(root: Path, tag: str, base: int, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), root=str(root),
                                                                 tag=tag, base=base, n=n)],
                            stdout=subprocess.PIPE, text=True)


def test_two_writers_and_a_kill_9_leave_a_consistent_index(tmp_root):
    p = Paths(tmp_root)
    p.versions.mkdir(parents=True)
    versions_index.VersionsIndex(tmp_root).ids()  # created
    procs = [writer(tmp_root, "a", 1, 60), writer(tmp_root, "b", 101, 60)]
    for proc in procs:
        assert proc.wait(120) == 0
        proc.stdout.close()
    db = sqlite3.connect(versions_index.index_path(tmp_root))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    expected = sorted(os.listdir(p.versions), key=lambda n: int(n[1:]))
    assert versions_index.VersionsIndex(tmp_root).ids() == expected and len(expected) == 120
    # kill -9 in the middle of updates: the old or the new state, and the next call catches up
    proc = writer(tmp_root, "c", 1001, 100_000)
    for _ in range(30):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    db = sqlite3.connect(versions_index.index_path(tmp_root))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    expected = sorted((n for n in os.listdir(p.versions) if versions_index.version_number(n)),
                      key=versions_index.version_number)  # (not a kill's .staging-c)
    idx = versions_index.VersionsIndex(tmp_root)
    assert idx.ids() == expected and len(expected) >= 150
    assert [r["id"] for r in idx.rows()] == [v for v in expected
                                             if (p.versions / v / "version.json").is_file()]


def test_a_read_only_index_folder_falls_back_to_the_folders(tmp_root, monkeypatch):
    synthetic(tmp_root, 4)
    monkeypatch.setattr(versions_index, "INDEX_DIR", "no/such/dir")  # cannot be created
    monkeypatch.setattr(versions_index, "index_path",
                        lambda root: Paths(root).root / "no" / "such" / "dir" / "x.sqlite")
    assert mv.latest_version(tmp_root) == "v004"
    assert mv.prune_plan(tmp_root, 1)["delete"] == ["v001", "v002", "v003"]
    assert not (tmp_root / "no").exists()


def test_the_pre_flight_without_a_budget_does_not_walk_the_versions(tmp_root, monkeypatch):
    """retention.check_write (the daemon's check before each file): with no max_disk_gb only
    the free space counts, so it stats as much at 60 versions as at 3 (it walked every
    version file: seconds of the daemon's start at 10,000 versions)."""
    import retention
    counts = []
    for n in (3, 60):
        root = tmp_root / f"r{n}"
        synthetic(root, n)
        counts.append(stats_by(monkeypatch, retention.check_write, root, {}, 1000, "root"))
        assert retention.check_write(root, {}, 1000, "root") is None
        assert "free on the disk" in retention.check_write(root, {}, 1 << 62, "root")
    assert counts[0] == counts[1]
    # with a budget the usage still counts
    assert "max_disk_gb 1e-09 GB" in retention.check_write(tmp_root / "r3", {"max_disk_gb": 1e-9}, 1000)


def test_a_prune_of_many_versions_syncs_each_record_once(tmp_root, monkeypatch):
    """A first retention pass over years of history prunes thousands of versions: one fsync
    per pruned record plus one per folder (was three per version: ~60 s for 10,000), and
    every record is durable before any folder goes."""
    synthetic(tmp_root, 40)
    p = Paths(tmp_root)
    order, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        order.append("fsync")
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        if ".staging-pruned-" in os.fspath(dst):
            order.append("rename")
        return real_rename(src, dst, *a, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    result = mv.prune(tmp_root, 2, yes=True)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "rename", real_rename)
    assert result["deleted"] == [f"v{i:03d}" for i in range(1, 39)]
    assert mv._version_dirs(p) == ["v039", "v040"]
    assert sorted(os.listdir(p.versions / ".pruned")) == [f"v{i:03d}.json" for i in range(1, 39)]
    assert order.count("fsync") <= 38 + 3
    assert order[:order.index("rename")].count("fsync") >= 38  # every record synced first
    assert [n for n in os.listdir(p.versions) if n.startswith(".staging")] == []


def test_a_reason_naming_an_undecodable_file_name_is_kept(tmp_path):
    """A data file named with a byte that is not UTF-8 gives a version whose reason holds a
    lone surrogate (as JSON writes it): the index stores it and gives it back unchanged (it
    refused the row, and the daemon's retention crashed after such a file)."""
    synthetic(tmp_path, 3, v002={"reason": "post-train:bad\udcffname.jsonl"})
    rows = {r["id"]: r for r in versions_index.VersionsIndex(tmp_path).rows()}
    assert rows["v002"]["reason"] == "post-train:bad\udcffname.jsonl"
    assert [r["id"] for r in versions_index.VersionsIndex(tmp_path).newest(2)] == ["v003", "v002"]
