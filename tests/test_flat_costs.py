"""Issue 18, flat costs: the routine status commands read the same files on a root with a
long history as on a new one (counted, never timed), and their answers stay right when the
small indexes beside the data are deleted, damaged or stale.

What is counted: files opened and folders listed (the interpreter's audit events) and
os.stat calls. A root grows here the way bench/bench_history.py grows one: versions as
hard-linked folders with their version.json, done files with their records, backups with
their backup.json.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import jsonschema

import backup_manager
import backup_records
import done_index
import model_versioner as mv
import retention
import state_tracker as st
import training_config
import training_queue
import versions_index
from trainroot import Paths

_ACTIVE: list = []  # the recorder in use; an audit hook cannot be removed once added


def _hook(event, args):
    if _ACTIVE and event in ("open", "os.listdir", "os.scandir", "sqlite3.connect"):
        path = args[0] if args else None
        _ACTIVE[-1][event].append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else path)


sys.addaudithook(_hook)


@contextmanager
def recorded(monkeypatch):
    """{"open": [...], "os.listdir": [...], "os.scandir": [...], "stat": [...]} while inside."""
    seen = {"open": [], "os.listdir": [], "os.scandir": [], "sqlite3.connect": [], "stat": []}
    real_stat = os.stat

    def counting_stat(path, *a, **kw):
        seen["stat"].append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else path)
        return real_stat(path, *a, **kw)
    monkeypatch.setattr(os, "stat", counting_stat)
    _ACTIVE.append(seen)
    try:
        yield seen
    finally:
        _ACTIVE.pop()
        monkeypatch.setattr(os, "stat", real_stat)


def grow(root, versions=0, done=0, backups=0) -> None:
    """More history in the formats the code writes (as bench_history.grow does)."""
    p = Paths(root)
    v1 = mv.read_version(root, "v001")
    last = max(int(v[1:]) for v in os.listdir(p.versions) if v[:1] == "v" and v[1:].isdigit())
    for n in range(last + 1, last + 1 + versions):
        vid = f"v{n:03d}"
        shutil.copytree(p.versions / "v001", p.versions / vid, copy_function=os.link,
                        ignore=shutil.ignore_patterns("version.json"))
        rec = dict(v1, id=vid, parent=f"v{n - 1:03d}", reason=f"post-train:f{n}.jsonl",
                   created_at=f"2026-02-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z")
        (p.versions / vid / "version.json").write_text(json.dumps(rec))
    if versions:
        (p.versions / mv.LAST_ID).write_text(json.dumps({"schema_version": 1, "last": f"v{last + versions:03d}"}))
    p.done.mkdir(exist_ok=True)
    have = len([n for n in os.listdir(p.done) if n.endswith(".record.json")])
    for n in range(have, have + done):
        name = f"f{n:06d}.jsonl"
        (p.done / name).write_text(f'{{"text": "file {n}"}}\n')
        (p.done / f"{name}.record.json").write_text(json.dumps(
            {"name": name, "sha256": f"{n:064x}", "outcome": "done", "version_after": "v001",
             "finished_at": "2026-01-01T00:00:00Z"}))
    bdir = p.default_backups
    bdir.mkdir(exist_ok=True)
    have = len([b for b in os.listdir(bdir) if backup_records.ID_RE.fullmatch(b)])
    for n in range(have, have + backups):
        bid = f"b202601{1 + n // 24 // 60:02d}T{n // 60 % 24:02d}{n % 60:02d}00-{n:04x}"
        shutil.copytree(p.versions / "v001", bdir / bid, copy_function=os.link,
                        ignore=shutil.ignore_patterns("version.json"))
        at = f"2026-01-{1 + n // 24 // 60:02d}T{n // 60 % 24:02d}:{n % 60:02d}:00Z"
        (bdir / bid / "backup.json").write_text(json.dumps(
            {"schema_version": 1, "id": bid, "seq": n + 1, "created_at": at, "source": "v001",
             "version": "v001", "global_step": n, "files": v1["manifest"], "total_bytes": 0,
             "verified_at": at, "status": "verified"}))


def _costs(root, monkeypatch, fn):
    fn()  # warm: the first call after a change may refresh a cache beside the data
    with recorded(monkeypatch) as seen:
        out = fn()
    return out, seen


def _settled(folder: Path) -> None:
    """As a folder looks a moment after its last change: its mtime older than the racy
    window in which versions_index lists it again (a same-tick change could hide)."""
    past = os.stat(folder).st_mtime - 10
    os.utime(folder, (past, past))


def _status_commands(root):
    return {
        "state": lambda: st.build_state(root),
        "queue status": lambda: training_queue.counts(root),
        "newest backup": lambda: backup_records.latest_backup(root),
    }


def _under(paths, folder) -> list:
    folder = str(folder) + os.sep
    return [x for x in paths if isinstance(x, str) and x.startswith(folder)]


def test_status_commands_read_the_same_files_at_any_history(initialized_root, monkeypatch):
    """A root with 25 versions, 20 done files, 2 backups, then 100 more versions, 400 more
    done files and 40 more backups: each status command opens the same number of files and
    lists the same number of folders, and stats no more files (1 per backup: whether its
    record changed); never a done/ record, an old version.json or a backup.json."""
    root = initialized_root
    p = Paths(root)
    grow(root, versions=24, done=20, backups=2)
    _settled(p.done)
    len(done_index.DoneIndex(root))  # the index the daemon keeps in step with done/
    _settled(p.versions)
    versions_index.VersionsIndex(root).ids()  # ... and the versions index (each snapshot)
    retention.record_usage(root, training_config.load_config(root))  # the daemon's sample
    small = {name: _costs(root, monkeypatch, fn)[1] for name, fn in _status_commands(root).items()}
    grow(root, versions=100, done=400, backups=40)
    _settled(p.done)
    len(done_index.DoneIndex(root))
    _settled(p.versions)
    versions_index.VersionsIndex(root).ids()
    big = {}
    for name, fn in _status_commands(root).items():
        out, big[name] = _costs(root, monkeypatch, fn)
        if name == "state":
            assert out["versions"]["count"] == 125 and out["versions"]["latest"] == "v125"
            assert out["versions"]["oldest"] == "v001" and len(out["versions"]["ids"]) == 20
            assert out["queue"]["done"] == 420 and out["backups"]["count"] == 42
            assert out["backups"]["latest"]["id"] == backup_records.list_backups(root)[-1]["id"]
        if name == "queue status":
            assert out["done"] == 420
    for name in small:
        s, b = small[name], big[name]
        for event in ("open", "os.listdir", "os.scandir", "sqlite3.connect"):
            assert len(b[event]) == len(s[event]), (name, event, sorted(set(b[event]) - set(s[event])))
        assert len(b["stat"]) <= len(s["stat"]) + 40, (name, len(s["stat"]), len(b["stat"]))
        # done/ (100,000 names after years) is never listed while its index is up to date
        assert str(p.done) not in b["os.scandir"] + b["os.listdir"], name
        opened = b["open"]
        assert not [x for x in _under(opened, p.done) if x.endswith(".record.json")], name
        assert not _under(opened, p.default_backups), name  # no backup.json read: the summary
        old = [x for x in _under(opened, p.versions) if x.endswith("version.json")
               and 1 < int(x.split(os.sep)[-2][1:]) <= 125 - st.CHECK_VERSIONS]  # v001: the oldest
        assert not old, (name, old[:3])


def test_backup_list_pages_and_reads_no_record_it_read_before(initialized_root, monkeypatch, capsys):
    root = initialized_root
    grow(root, backups=60)
    code = backup_manager.main(["list", "--root", str(root)])
    out = capsys.readouterr().out
    assert code == 0 and "(10 older backup(s) not listed: `python3 backup_manager.py list --all" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("b2026")]) == 50
    with recorded(monkeypatch) as seen:
        assert backup_manager.main(["list", "--json", "--all", "--root", str(root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"] == 60 and doc["not_listed"] == 0 and len(doc["backups"]) == 60
    assert [b["seq"] for b in doc["backups"]] == list(range(1, 61))  # oldest first, by seq
    assert "files" not in doc["backups"][0]
    assert not _under(seen["open"], Paths(root).default_backups)


def test_backup_summary_is_never_trusted_over_a_record(initialized_root):
    """Deleted, damaged, stale: the summary is rebuilt and the answers stay those of the
    records (a record rewritten, one unreadable, one gone, one added by hand)."""
    root = initialized_root
    grow(root, backups=5)
    truth = [(b["id"], b["status"], b["seq"]) for b in backup_records.list_backups(root)]
    summary = root / backup_records.SUMMARY
    assert [(b["id"], b["status"], b["seq"]) for b in backup_records.summaries(root)] == truth
    assert summary.exists()
    for damage in (lambda: summary.unlink(), lambda: summary.write_text('{"schema_version": 1, "backups": {'),
                   lambda: summary.write_bytes(b"\x00" * 50)):
        damage()
        assert [(b["id"], b["status"], b["seq"]) for b in backup_records.summaries(root)] == truth
    bdir = Paths(root).default_backups
    ids = [t[0] for t in truth]
    rec = json.loads((bdir / ids[1] / "backup.json").read_text())
    tmp = bdir / ids[1] / "backup.json.tmp"  # rewritten by rename, as verify does
    tmp.write_text(json.dumps(dict(rec, status="corrupt")))
    os.replace(tmp, bdir / ids[1] / "backup.json")
    (bdir / ids[2] / "backup.json").write_text("{torn")  # in place, another size
    shutil.rmtree(bdir / ids[3])
    got = {b["id"]: b["status"] for b in backup_records.summaries(root)}
    assert got == {ids[0]: "verified", ids[1]: "corrupt", ids[2]: "unreadable", ids[4]: "verified"}
    state = st.build_state(root)["backups"]
    assert state["count"] == 4 and state["verified_count"] == 2
    assert {x["id"] for x in state["problems"]} == {ids[1], ids[2]}
    assert backup_records.latest_backup(root)["id"] == ids[4]
    assert backup_records.next_seq(root) == 6


def test_done_count_after_the_index_is_deleted_damaged_or_stale(initialized_root, monkeypatch):
    root = initialized_root
    p = Paths(root)
    grow(root, done=30)
    index = done_index.index_path(root)
    assert not index.exists()  # no index yet: counted from one listing, not built here
    assert training_queue.counts(root)["done"] == 30 and not index.exists()
    _settled(p.done)
    len(done_index.DoneIndex(root))
    with recorded(monkeypatch) as seen:
        assert done_index.count(root) == 30
    assert not seen["os.listdir"] and not seen["os.scandir"]  # the fresh index answered
    grow(root, done=2)  # by hand, no index update: done/ changed, the index is stale
    assert training_queue.counts(root)["done"] == 32
    assert st.build_state(root)["queue"]["done"] == 32
    (p.done / "loose.jsonl").write_text("{}\n")  # a data file without a record is not a done file
    (p.done / "f000000.jsonl").unlink()  # a record whose data file was deleted: still trained
    len(done_index.DoneIndex(root))
    assert done_index.count(root) == 32
    index.write_bytes(b"not sqlite at all" * 10)
    assert done_index.count(root) == 32 == training_queue.counts(root)["done"]
    index.unlink()
    assert st.build_state(root)["queue"]["done"] == 32


def test_the_idle_daemon_brings_the_done_index_in_step(initialized_root, monkeypatch):
    """A file moved into done/ leaves the index's signature too young to be believed, and
    status commands count done/ by listing it until the next resync: the idle daemon makes
    that resync once done/ has settled, so `done` is counted from the index again."""
    import time
    import training_daemon
    root = initialized_root
    grow(root, done=30)
    daemon = training_daemon.Daemon(root, once=True)
    daemon._settle_done_index()  # done/ changed an instant ago: maybe not yet
    time.sleep(versions_index.RACY_FINE_S * 1.5)
    daemon._settle_done_index()
    with recorded(monkeypatch) as seen:
        assert done_index.count(root) == 30
    assert not seen["os.listdir"] and not seen["os.scandir"]


def test_the_daemons_own_file_into_done_lists_nothing(initialized_root, monkeypatch):
    """Per trained file the daemon indexes the file it moved into done/ and counts the files
    since the last backup without listing done/ (100,000 names after years, each file); the
    next question that needs done/ whole lists it once and still sees everything."""
    root = initialized_root
    p = Paths(root)
    grow(root, done=30)
    _settled(p.done)
    idx = done_index.DoneIndex(root)
    assert len(idx) == 30
    sha = "f" * 64
    (p.done / "trained.jsonl").write_text('{"text": "trained"}\n')
    rec = {"name": "trained.jsonl", "sha256": sha, "outcome": "done", "version_after": "v002"}
    (p.done / "trained.jsonl.record.json").write_text(json.dumps(rec))  # the daemon's move
    with recorded(monkeypatch) as seen:
        idx.add("trained.jsonl", rec)
        assert idx.trained_since({"version": "v001"}, sync=False) == 1
    assert not seen["os.listdir"] and not seen["os.scandir"]
    (p.done / "by-hand.jsonl").write_text("{}\n")  # meanwhile a person adds one by hand
    (p.done / "by-hand.jsonl.record.json").write_text(json.dumps(dict(rec, name="by-hand.jsonl",
                                                                      sha256="e" * 64)))
    assert idx.get("e" * 64)["name"] == "by-hand.jsonl" and len(idx) == 32


def test_the_daemons_duplicate_check_after_its_own_move_lists_nothing(initialized_root, monkeypatch):
    """The daemon's index (owner) asks done/ once in its process, then answers each queued
    file's duplicate check from what it indexed itself: no listing of done/ per file. A hit
    is still read back from its record (a record gone makes it list again), and what a
    person did to done/ meanwhile is seen once the daemon brings the index in step."""
    root = initialized_root
    p = Paths(root)
    grow(root, done=30)
    _settled(p.done)
    idx = done_index.DoneIndex(root, owner=True)
    assert idx.get("a" * 64) is None  # the first question of the process: in step with done/
    rec = {"name": "trained.jsonl", "sha256": "f" * 64, "outcome": "done", "version_after": "v002"}
    (p.done / "trained.jsonl").write_text('{"text": "trained"}\n')
    (p.done / "trained.jsonl.record.json").write_text(json.dumps(rec))  # the daemon's move
    idx.add("trained.jsonl", rec)
    with recorded(monkeypatch) as seen:
        assert idx.get("f" * 64)["name"] == "trained.jsonl"
        assert idx.get("d" * 64) is None
    assert not seen["os.listdir"] and not seen["os.scandir"]
    (p.done / "by-hand.jsonl").write_text("{}\n")
    (p.done / "by-hand.jsonl.record.json").write_text(json.dumps(dict(rec, name="by-hand.jsonl",
                                                                      sha256="e" * 64)))
    assert done_index.DoneIndex(root).get("e" * 64)["name"] == "by-hand.jsonl"  # a person's add
    os.remove(p.done / "trained.jsonl.record.json")  # gone: not believed, done/ listed again
    with recorded(monkeypatch) as seen:
        assert idx.get("f" * 64) is None
    assert seen["os.listdir"]
    assert len(idx) == 31  # what the daemon's settle runs: in step with done/


def test_disk_usage_is_the_daemons_sample_or_not_measured(initialized_root, monkeypatch, capsys):
    """A status never walks a long history: with no sample, a root of more than
    MEASURE_NOW_FILES files is 'not measured yet' with the command that measures it;
    --measure-disk keeps a sample, which the next report shows with its time."""
    root = initialized_root
    cfg = training_config.load_config(root)
    small = st.build_state(root)
    assert small["disk"]["budget"]["root"]["used_bytes"] == retention.usage(root, cfg)["root_used"]
    assert small["versions"]["total_size_bytes"] == retention.usage(root, cfg)["versions_used"]
    monkeypatch.setattr(st, "MEASURE_NOW_FILES", 5)  # the root is "big" now
    with recorded(monkeypatch) as seen:
        doc = st.build_state(root)
    walked = seen["os.scandir"] + seen["os.listdir"]  # gave up in versions/, the first folder
    assert not _under(walked, Paths(root).current_model) and not _under(walked, Paths(root).default_backups)
    budget = doc["disk"]["budget"]
    assert budget["root"]["used_bytes"] is None and budget["measured_at"] is None
    assert f"state_tracker.py --measure-disk --root {root}" in budget["not_measured"]
    assert doc["versions"]["total_size_bytes"] is None
    assert "models" not in st._budget_text(budget)
    jsonschema.validate(doc, json.loads((Path(st.__file__).parent / "docs" / "system_state.schema.json").read_text()))
    assert st.main(["--measure-disk", "--json", "--root", str(root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    sample = json.loads((root / retention.USAGE_FILE).read_text())["samples"][-1]
    assert doc["disk"]["budget"]["measured_at"] == sample["at"]
    assert doc["disk"]["budget"]["root"]["used_bytes"] == sample["root_used"]
    assert doc["versions"]["total_size_bytes"] == sample["versions_used"] > 0
    assert "not_measured" not in doc["disk"]["budget"]


def test_is_ignored_matches_the_patterns():
    names = [".hidden", "a.tmp", "a.part", "a.partial", "a~", "a.swp", "4913", "a.jsonl",
             "a.jsonl.record.json", "tmp", "a.tmpx", "x4913", "part", "a.jsonl.gz", "~a", ".", "a.SWP"]
    for n in names:
        want = any(fnmatch.fnmatchcase(n, pat) for pat in training_queue.IGNORED_PATTERNS) \
            or n.endswith(training_queue.RECORD_SUFFIX)
        assert training_queue.is_ignored(n) == want, n


def test_piped_check_prints_what_rich_printed_without_importing_it(initialized_root, capsys):
    """--check piped (an assistant's shell, a log) is plain text: the lines rich printed
    there, markup stripped, and no ~100 ms import of rich."""
    import io
    import subprocess
    from rich.console import Console
    root = initialized_root
    (root / "current_model" / "config.json").unlink()  # a critical warning with a fix and a note
    state = st.build_state(root)
    assert state["warnings"] and any(x["note"] for x in state["warnings"])
    for warnings_only in (False, True):
        buf = io.StringIO()
        console = Console(file=buf, highlight=False, soft_wrap=True)  # as it was when piped
        colours = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
        if not warnings_only:
            verdict = "[bold green]OK[/]" if state["ok"] else f"[bold red]{state['critical_count']} CRITICAL[/]"
            console.print(f"[bold]Training Guardrails state[/] — {verdict}  ({state['generated_at']})")
            for key, line in st.report_rows(state):
                console.print(f"  [bold]{key:<9}[/] ", end="")
                console.print(line, markup=False)
        console.print(f"[bold]Warnings ({len(state['warnings'])})[/]")
        for x in state["warnings"]:
            console.print(f"  [{colours[x['severity']]}]{x['severity'].upper():<8} {x['code']}[/] ", end="")
            console.print(x["message"], markup=False)
            console.print("    [bold]fix:[/] ", end="")
            console.print(x["fix"], markup=False, soft_wrap=True)
            if x.get("note"):
                console.print("    note: ", end="")
                console.print(x["note"], markup=False)
        st.print_report(state, warnings_only=warnings_only)
        assert capsys.readouterr().out == buf.getvalue()
    code = ("import sys, state_tracker; rc = state_tracker.main(['--check', '--root', sys.argv[1]]); "
            "print('rich' in sys.modules, rc, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                          cwd=Path(st.__file__).parent, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "False 1", proc.stderr
    assert "CRITICAL MODEL_INCOMPLETE" in proc.stdout and "[bold" not in proc.stdout


def test_an_unversioned_current_model_is_not_looked_for_in_every_version(initialized_root, monkeypatch):
    """current_model trained since its last snapshot matches no version: its manifest has
    one link, so no version shares it and none of 10,000 manifests is stat-ed to find out."""
    root = initialized_root
    grow(root, versions=40)
    manifest = root / "current_model" / ".manifest.json"
    doc = json.loads(manifest.read_text())
    name = sorted(doc["files"])[0]
    doc["files"][name] = dict(doc["files"][name], sha256="0" * 64)  # trained: other bytes
    (root / "current_model" / ".manifest.tmp").write_text(json.dumps(doc))
    os.replace(root / "current_model" / ".manifest.tmp", manifest)  # a new inode, as a publish
    retention.record_usage(root, training_config.load_config(root))  # the daemon's sample: no walk
    versions_index.VersionsIndex(root).ids()  # in step with versions/, as after each snapshot
    with recorded(monkeypatch) as seen:
        state = st.build_state(root)
    assert state["current_model"]["matches_version"] is None
    assert any(x["code"] == "MODEL_NOT_VERSIONED" for x in state["warnings"])
    assert not [x for x in _under(seen["stat"], root / "versions") if x.endswith(".manifest.json")]


def test_backup_summary_two_writers_and_kill_9(initialized_root):
    """Two processes refreshing the summary while records change, one of them killed -9
    mid-way: the summary always parses, and the answers are the records'."""
    import signal
    import subprocess
    import time
    root = initialized_root
    grow(root, backups=40)
    bdir = Paths(root).default_backups
    code = ("import sys, backup_records\n"
            "while True: backup_records.summaries(sys.argv[1])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=Path(st.__file__).parent)
             for _ in range(2)]
    try:
        ids = sorted(b for b in os.listdir(bdir) if backup_records.ID_RE.fullmatch(b))
        for i, bid in enumerate(ids):  # records rewritten by rename while both refresh
            rec = json.loads((bdir / bid / "backup.json").read_text())
            tmp = bdir / bid / ".backup.json.tmp"
            tmp.write_text(json.dumps(dict(rec, status="corrupt" if i % 3 == 0 else "verified")))
            os.replace(tmp, bdir / bid / "backup.json")
            time.sleep(0.01)
            summary = root / backup_records.SUMMARY
            if summary.exists():
                json.loads(summary.read_text())  # never torn
        procs[0].send_signal(signal.SIGKILL)
        time.sleep(0.3)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    json.loads((root / backup_records.SUMMARY).read_text())
    truth = [(b["id"], b["status"]) for b in backup_records.list_backups(root)]
    assert [(b["id"], b["status"]) for b in backup_records.summaries(root)] == truth
    assert sum(1 for _, s in truth if s == "corrupt") == 14


def test_the_start_up_recovery_reads_no_done_record(initialized_root, monkeypatch):
    """recover() lists done/ (orphan records) but reads none of its records but an orphan's
    (was a read of each, 7.5 s of a daemon start at 100,000 done files)."""
    root = initialized_root
    grow(root, done=300)
    p = Paths(root)
    (p.done / "orphan.jsonl.record.json").write_text("{}")
    with recorded(monkeypatch) as seen:
        actions = training_queue.recover(root)
    assert actions == [f"removed orphan record {p.done / 'orphan.jsonl.record.json'}"]
    assert _under(seen["open"], p.done) == [str(p.done / "orphan.jsonl.record.json")]
