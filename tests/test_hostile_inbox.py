"""Hostile intake: what people and programs really drop into inbox/, and hostile `init`s.

Each test runs the real scripts (`training_daemon.py run --once`, `init`, `training_queue.py`)
on a real root and checks that every entry ends in exactly one place, whole, with a reason
and the command that fixes it, and that nothing prints a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script

import training_config
import training_queue
from trainroot import Paths

FAST = {"settle_seconds": 0.2, "rescan_seconds": 0.5, "max_length": 16, "batch_size": 2,
        "checkpoint_every_steps": 100, "monitor_port": 0, "backup_every_files": 0,
        "backup_every_hours": 0, "loss_spike_factor": 0.0, "warmup_steps": 1}


def tune(root: Path) -> None:
    cfg = training_config.load_config(root)
    cfg.update(FAST)
    training_config.write_config(root, cfg)
    training_config.approve(root, cfg, by="test")


def lines(tag: str, n: int = 1) -> bytes:
    return "".join(json.dumps({"text": f"{tag} {i}"}) + "\n" for i in range(n)).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def record(path: Path) -> dict:
    return json.loads(Path(str(path) + ".record.json").read_text())


def run_once(root: Path):
    return run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=180)


def no_traceback(proc) -> None:
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text and "Logging error" not in text, text[-3000:]


def assert_fix_in_record(rec: dict) -> None:
    """A file the daemon could not train carries its reason and a command that fixes it."""
    assert rec["reason"]
    assert "`" in rec.get("fix", ""), rec


# --------------------------------------------------------------------------- the daemon

@pytest.mark.slow
def test_hostile_names_train_once_each_and_log_one_line_each(initialized_root):
    root = initialized_root
    tune(root)
    inbox = root / "inbox"
    good = {  # name -> content: each trains and ends in done/ under its own name
        "with space.jsonl": put(inbox / "with space.jsonl", lines("space")),
        "ünï✓.jsonl": put(inbox / "ünï✓.jsonl", lines("unicode")),
        "new\nline.jsonl": put(inbox / "new\nline.jsonl", lines("newline")),
        "-rf.jsonl": put(inbox / "-rf.jsonl", lines("dash")),
        "bad\udcffname.jsonl": put(inbox / "bad\udcffname.jsonl", lines("not utf-8 name")),
        "dup1.jsonl": put(inbox / "dup1.jsonl", lines("dup")),
        "h.jsonl": put(inbox / "high" / "h.jsonl", lines("high")),
    }
    dup2 = put(inbox / "dup2.jsonl", lines("dup"))     # same content, another name
    long_name = "L" * 249 + ".jsonl"                   # 255 bytes: no room for a record suffix
    good_long = put(inbox / long_name, lines("long"))

    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)

    done = root / "done"
    for name, content in good.items():
        assert (done / name).read_bytes() == content, name
        rec = record(done / name)
        assert rec["outcome"] == "done" and rec["sha256"] == sha(content)
    (long_done,) = [n for n in os.listdir(done) if n.startswith("L") and n.endswith(".jsonl")]
    assert (done / long_done).read_bytes() == good_long
    assert record(done / long_done)["original_name"] == long_name

    skipped = record(root / "skipped" / "dup2.jsonl")
    assert (root / "skipped" / "dup2.jsonl").read_bytes() == dup2
    assert skipped["duplicate_of"] == "dup1.jsonl"
    assert skipped["fix"] == (f"`python3 training_queue.py add {root / 'skipped' / 'dup2.jsonl'} "
                              f"--move --force --root {root}` queues it anyway.")

    # one log line per event: a newline or an undecodable byte in a name is shown escaped
    assert "new\\nline.jsonl: queued" in proc.stderr
    assert "bad\\udcffname.jsonl: queued" in proc.stderr
    log = (root / "logs" / "daemon.log").read_text(encoding="utf-8")
    assert "bad\\udcffname.jsonl: done" in log and "new\\nline.jsonl: done" in log
    assert sorted(os.listdir(inbox)) == ["high", "low"]
    for folder in ("queue/high", "queue/normal", "queue/low", "processing",
                   "queue/.incoming/normal", "queue/.incoming/high"):
        assert not (root / folder).is_dir() or os.listdir(root / folder) == [], folder


@pytest.fixture
def qroot(tmp_root) -> Path:
    """A root with a config and no model: enough for intake when nothing is valid to train."""
    Paths(tmp_root).ensure()
    training_config.write_config(tmp_root, dict(training_config.default_config(), **FAST))
    return tmp_root


def test_what_cannot_be_data_goes_to_failed_with_its_reason_and_fix(qroot):
    root = qroot
    inbox = root / "inbox"
    bad = {  # name -> content: each ends in failed/, whole
        "zero.jsonl": put(inbox / "zero.jsonl", b""),
        "blank.jsonl": put(inbox / "blank.jsonl", b"\n  \n\n"),
        "binary.jsonl": put(inbox / "binary.jsonl", bytes(range(256)) * 4),
        "badmid.jsonl": put(inbox / "badmid.jsonl", lines("a", 2) + b"{oops\n" + lines("b", 2)),
        "upper.JSONL": put(inbox / "upper.JSONL", lines("upper")),
        "mixed.Jsonl": put(inbox / "low" / "mixed.Jsonl", lines("mixed")),
        "a.json": put(inbox / "a.json", lines("json")),
        "notes.txt": put(inbox / "high" / "notes.txt", b"hello\n"),
        "nosuffix": put(inbox / "nosuffix", lines("nosuffix")),
    }
    # Not regular files: never opened (a FIFO would block), moved to failed/ as they are.
    os.mkfifo(inbox / "fifo.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock.jsonl"))
    target = put(root / "elsewhere" / "target.jsonl", lines("target"))
    os.symlink("../elsewhere/target.jsonl", inbox / "link.jsonl")   # relative, to a good file
    os.symlink("/nonexistent/x.jsonl", inbox / "dangling.jsonl")
    os.symlink("loop2.jsonl", inbox / "loop1.jsonl")
    os.symlink("loop1.jsonl", inbox / "loop2.jsonl")
    # Folders other than high/ and low/: left alone, with a warning (never silently).
    nested = put(inbox / "sub" / "deeper" / "nested.jsonl", lines("nested"))
    in_dir = put(inbox / "high" / "dir.jsonl" / "inner.jsonl", lines("inner"))
    ignored = put(inbox / ".hidden.jsonl", lines("hidden"))

    try:
        proc = run_once(root)
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)

    failed = root / "failed"
    for name, content in bad.items():
        assert (failed / name).read_bytes() == content, name
        assert_fix_in_record(record(failed / name))
    bad_mid = record(failed / "badmid.jsonl")
    assert [e["line"] for e in bad_mid["report"]["errors"]] == [3]
    # with --root: run from elsewhere, validate would judge it by another root's config
    # (a `fields` mapping, limits) and report other errors
    assert bad_mid["fix"].startswith(
        f"See every bad line with `python3 validate_data.py {failed / 'badmid.jsonl'} --root "
        f"{root.resolve()}`")
    # a wrong suffix is fixed by a rename, not by editing lines
    assert record(failed / "upper.JSONL")["fix"] == (
        f"If it holds JSON lines, `mv {failed / 'upper.JSONL'} {inbox / 'upper.jsonl'}` drops it "
        "in the inbox under a .jsonl name.")
    assert f"mv {failed / 'a.json'} {inbox / 'a.jsonl'}" in record(failed / "a.json")["fix"]
    assert record(failed / "notes.txt")["priority"] == "high"

    assert stat.S_ISFIFO(os.lstat(failed / "fifo.jsonl").st_mode)
    assert stat.S_ISSOCK(os.lstat(failed / "sock.jsonl").st_mode)
    assert record(failed / "fifo.jsonl")["reason"] == "not a regular file: a named pipe (FIFO)"
    assert record(failed / "sock.jsonl")["reason"] == "not a regular file: a socket"
    # The links are moved as links (their targets untouched), each saying what it pointed at.
    assert os.readlink(failed / "link.jsonl") == "../elsewhere/target.jsonl"
    assert (root / "elsewhere" / "target.jsonl").read_bytes() == target
    link = record(failed / "link.jsonl")
    assert link["reason"].startswith(
        f"not a regular file: a symbolic link to {root / 'elsewhere' / 'target.jsonl'} ")
    assert link["fix"] == (f"`python3 training_queue.py add {root / 'elsewhere' / 'target.jsonl'} "
                           f"--root {root}` queues a copy of its content.")
    assert record(failed / "dangling.jsonl")["reason"] == (
        "not a regular file: a symbolic link to /nonexistent/x.jsonl, which does not exist")
    assert record(failed / "loop1.jsonl")["reason"] == (
        "not a regular file: a symbolic link loop (loop2.jsonl)")
    for name in ("fifo.jsonl", "sock.jsonl", "link.jsonl", "dangling.jsonl", "loop2.jsonl"):
        rec = record(failed / name)   # the log line says it all too: what, where, the fix
        assert rec["fix"] and f"{name}: failed (normal) - {rec['reason']}. {rec['fix']}" \
            in proc.stderr

    # The inbox keeps only what the daemon never takes, untouched, and says why once.
    assert sorted(os.listdir(inbox)) == [".hidden.jsonl", "high", "low", "sub"]
    assert os.listdir(inbox / "high") == ["dir.jsonl"]
    assert (inbox / ".hidden.jsonl").read_bytes() == ignored
    assert (inbox / "sub" / "deeper" / "nested.jsonl").read_bytes() == nested
    assert (inbox / "high" / "dir.jsonl" / "inner.jsonl").read_bytes() == in_dir
    for folder in (inbox / "sub", inbox / "high" / "dir.jsonl"):
        assert proc.stderr.count(f"{folder} is a folder: the daemon never looks inside") == 1
    assert training_queue.counts(root)["inbox"] == 0     # nothing there it will ever take


def test_a_file_held_open_for_writing_waits_and_says_so(qroot):
    """A writer that keeps the file open (a slow download): never half-read, and the daemon
    says why it waits instead of sitting there silently."""
    root = qroot
    held = root / "inbox" / "held.jsonl"
    out = root.parent / "daemon.out"
    with open(held, "wb") as writer, open(out, "w+") as log:
        writer.write(b"not json yet\n")
        writer.flush()
        proc = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run",
                                 "--once", "--no-monitor"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ, TRAINING_ROOT=str(root)))
        try:
            deadline = time.monotonic() + 30
            while "still open for writing" not in out.read_text():
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, f"no word of the wait:\n{out.read_text()}"
                time.sleep(0.05)
            assert held.exists() and not (root / "failed" / "held.jsonl").exists()
            writer.write(b"still not json\n")
        finally:
            writer.close()
            try:
                code = proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    text = out.read_text()
    assert code == 0, text
    assert text.count(f"{held} is still open for writing by another process") == 1
    assert (root / "failed" / "held.jsonl").read_bytes() == b"not json yet\nstill not json\n"


def _other_filesystem() -> Path | None:
    """A writable folder on another filesystem than the temp dir (tmpfs /dev/shm), or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        return None
    if os.stat(shm).st_dev == os.stat(tempfile.gettempdir()).st_dev:
        return None
    return shm


def test_inbox_on_another_filesystem_is_taken_not_a_crash(tmp_root, tmp_path):
    """inbox/ as a link to another disk (a shared drop folder): rename(2) fails with EXDEV;
    the file must still be taken (copied, checked, then the original removed), not crash the
    daemon. Invalid files need no model loaded, so no training is paid here."""
    other = _other_filesystem()
    if other is None:
        pytest.skip("no second filesystem (tmpfs /dev/shm) to put the inbox on")
    root = tmp_root
    Paths(root).ensure()
    training_config.write_config(root, dict(training_config.default_config(), **FAST))
    remote = Path(tempfile.mkdtemp(prefix="inbox-", dir=other))
    try:
        (root / "inbox" / "high").rmdir()
        (root / "inbox" / "low").rmdir()
        (root / "inbox").rmdir()
        os.symlink(remote, root / "inbox")
        bad = put(remote / "bad.jsonl", b"{not json\n")
        txt = put(remote / "high" / "notes.txt", b"plain text\n")
        (remote / "low").mkdir()
        proc = run_once(root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        no_traceback(proc)
        assert (root / "failed" / "bad.jsonl").read_bytes() == bad
        assert (root / "failed" / "notes.txt").read_bytes() == txt
        assert record(root / "failed" / "bad.jsonl")["sha256"] == sha(bad)
        assert record(root / "failed" / "notes.txt")["priority"] == "high"
        assert sorted(os.listdir(remote)) == ["high", "low"]          # taken: in one place only
        assert os.listdir(remote / "high") == []
        assert [n for n in os.listdir(root / "queue" / ".incoming" / "normal")] == []
    finally:
        shutil.rmtree(remote, ignore_errors=True)


def test_inbox_high_and_low_as_links_to_folders_elsewhere_are_read_not_failed(tmp_root, tmp_path):
    """inbox/high -> a folder elsewhere (as inbox/ itself may be): its files are taken with
    their priority; the link is a folder to read, not a bad file to move into failed/."""
    root = tmp_root
    Paths(root).ensure()
    training_config.write_config(root, dict(training_config.default_config(), **FAST))
    for pr in ("high", "low"):
        (root / "inbox" / pr).rmdir()
        (tmp_path / f"{pr}-elsewhere").mkdir()
        os.symlink(tmp_path / f"{pr}-elsewhere", root / "inbox" / pr)
        put(tmp_path / f"{pr}-elsewhere" / f"{pr}.jsonl", b"{not json\n")
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)
    assert sorted(n for n in os.listdir(root / "failed") if n.endswith(".jsonl")) == ["high.jsonl", "low.jsonl"]
    assert [record(root / "failed" / f"{pr}.jsonl")["priority"] for pr in ("high", "low")] == ["high", "low"]
    for pr in ("high", "low"):
        assert os.path.islink(root / "inbox" / pr) and os.listdir(tmp_path / f"{pr}-elsewhere") == []


def test_a_lifecycle_folder_that_is_a_file_is_named_with_the_fix(qroot):
    root = qroot
    (root / "inbox" / "high").rmdir()
    put(root / "inbox" / "high", lines("someone's data named high"))
    proc = run_once(root)
    assert proc.returncode == 1
    no_traceback(proc)
    high = root / "inbox" / "high"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: inbox/high is a file, not a folder, {high}. Move it aside "
        f"(e.g. `mv {high} {high}.jsonl`), then run the command again; the folder is "
        "created anew.")
    assert high.read_bytes() == lines("someone's data named high")


# --------------------------------------------------------------------------- init

def test_init_into_an_empty_current_model_names_the_real_fix(tmp_root):
    (tmp_root / "current_model").mkdir()
    proc = run_script("training_daemon.py", "init", root=tmp_root)
    assert proc.returncode == 1
    no_traceback(proc)
    cm = tmp_root / "current_model"
    assert proc.stderr.strip() == (
        f"Error: current_model exists but is empty (no model in it); init never replaces "
        f"it, {cm}. Remove the empty folder with `rmdir {cm}`, then run "
        f"`python3 training_daemon.py init --root {tmp_root}` again.")
    assert cm.is_dir() and os.listdir(cm) == []
    assert not (tmp_root / "config.json").exists()


def test_init_with_an_empty_base_is_a_usage_error_not_the_current_folder(tmp_root):
    proc = run_script("training_daemon.py", "init", "--base", "", root=tmp_root)
    assert proc.returncode == 2
    no_traceback(proc)
    assert proc.stderr.strip() == (
        "Error: --base is empty, python3 training_daemon.py init. Pass --base tiny or the "
        "path of a local Hugging Face model folder.")
    assert not (tmp_root / "current_model").exists()


# --------------------------------------------------------------------------- the queue CLI

def test_add_of_a_wrong_suffix_says_rename_not_validate(qroot, tmp_path):
    src = tmp_path / "data.JSONL"
    put(src, lines("upper"))
    proc = run_script("training_queue.py", "add", str(src), root=qroot)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: not a .jsonl file; not queued, {src}. Rename it to end in .jsonl "
        f"(`mv {src} {tmp_path / 'data.jsonl'}`), then add it again.")
    moved = run_script("training_queue.py", "add", str(src), "--move", root=qroot)
    assert moved.returncode == 1
    dst = qroot / "failed" / "data.JSONL"
    assert dst.read_bytes() == lines("upper") and not src.exists()
    assert moved.stderr.strip() == (
        f"Error: not a .jsonl file; not queued, moved to {dst}. If it holds JSON lines, "
        f"`mv {dst} {qroot / 'inbox' / 'data.jsonl'}` drops it in the inbox under a .jsonl name.")


def test_status_counts_only_files_the_daemon_will_take(qroot):
    inbox = qroot / "inbox"
    put(inbox / "a.jsonl", lines("a"))
    put(inbox / "low" / "b.jsonl", lines("b"))
    put(inbox / "sub" / "c.jsonl", lines("c"))          # never taken: a folder
    (inbox / "dir.jsonl").mkdir()
    put(inbox / ".x.jsonl.part", lines("p"))             # never taken: a temporary name
    assert training_queue.counts(qroot)["inbox"] == 2


def test_once_on_a_broken_current_model_names_a_fix_that_applies_to_once(qroot):
    """--once has exited when it says so: "then `resume`" would talk to no daemon."""
    put(qroot / "inbox" / "a.jsonl", lines("a"))
    (qroot / "current_model").mkdir()
    proc = run_once(qroot)
    assert proc.returncode == 1
    no_traceback(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: pre-flight: current_model is not usable (")
    assert last.endswith(f"{qroot / 'current_model'}. Bring it back with `python3 "
                         "model_versioner.py restore latest`, then run `python3 "
                         "training_daemon.py run --once` again.")
    assert (qroot / "queue" / "normal" / "a.jsonl").read_bytes() == lines("a")


def test_run_on_a_mistyped_root_fails_and_creates_nothing(tmp_path):
    typo = tmp_path / "trian"
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", "--root", str(typo))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"Error: no config.json in the training root, {typo}. Run "
                                   f"`python3 training_daemon.py init --root {typo}`.")
    assert not typo.exists()   # else `training_queue.py --root` would take it for a root
    a_file = put(tmp_path / "file", b"x")
    proc = run_script("training_daemon.py", "init", "--root", str(tmp_path / "file"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: the training root is not a folder, {tmp_path / 'file'}. Point --root (or "
        "$TRAINING_ROOT) at a folder, e.g. `python3 training_daemon.py init --root ~/train`.")
    assert (tmp_path / "file").read_bytes() == a_file


def test_a_big_inbox_file_does_not_block_the_heartbeat_nor_a_stop(qroot):
    """A file that takes seconds to hash and validate (2 GB took 19 s): the daemon's loop
    keeps its heartbeat fresh and acts on `stop` within about a second, and the file waits,
    whole and claimed, for the next start."""
    import trainroot
    root = qroot
    line = (json.dumps({"text": "the quick brown fox jumps over the lazy dog, twice"}) +
            "\n").encode()
    staged = root.parent / "big.jsonl"
    with open(staged, "wb") as f:  # 320 MB of short records: ~20 s to validate here
        for _ in range(320):
            f.write(line * ((1 << 20) // len(line)))
    size = staged.stat().st_size
    out = root.parent / "daemon.out"
    with open(out, "w+") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run",
                                 "--no-monitor"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TRAINING_ROOT=str(root)))
        try:
            claimed = root / "queue" / ".incoming" / "normal" / "big.jsonl"
            deadline = time.monotonic() + 60
            while not (root / ".daemon_state.json").exists():
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.05)
            os.rename(staged, root / "inbox" / "big.jsonl")
            while not claimed.exists():
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.02)
            ages = []
            for _ in range(16):   # 4 s into its validation
                time.sleep(0.25)
                state = json.loads((root / ".daemon_state.json").read_text())
                ages.append(trainroot.age_seconds(state["heartbeat"]))
            assert max(ages) < 3.0, ages
            assert claimed.exists() and not training_queue.record_path(claimed).exists()
            asked = time.monotonic()
            stop = run_script("training_controller.py", "stop", root=root)
            assert stop.returncode == 0, stop.stderr
            code = proc.wait(60)
            latency = time.monotonic() - asked
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out.read_text()
    assert code == 0, text
    assert latency < 6.0, (latency, text)   # the controller's own start-up included
    # it stopped before the validation ended: the file waits, whole, for the next start
    assert claimed.stat().st_size == size and not training_queue.record_path(claimed).exists()
    assert "big.jsonl: stopping before its validation ended" in text


@pytest.mark.parametrize("crash", [ValueError("a validator bug"), OSError(28, "No space left")])
def test_a_file_whose_intake_crashes_is_kept_where_status_shows_it(qroot, monkeypatch, crash):
    """A crash while taking a file in (a bug, not the disk) must not leave it claimed in
    queue/.incoming/, out of every view, crashing again at every start: it goes to failed/
    with the reason and the fix. A disk error leaves it claimed, for a later start."""
    import logging
    import threading
    import inbox_files
    p = Paths(qroot)
    claimed = p.queue / training_queue.INCOMING / "normal" / "a.jsonl"
    data = put(claimed, lines("a", 3))

    def crashing(*args, **kwargs):
        raise crash
    enqueue = training_queue.enqueue
    monkeypatch.setattr(training_queue, "enqueue", crashing)  # (the fault injected)
    said = []
    intake = inbox_files.InboxIntake(
        p, training_config.load_config(qroot), logging.getLogger("test"), threading.Event(),
        done={}, tend=lambda: None, stopping=lambda: False, on_queued=lambda *a, **k: None,
        on_failed=said.append)
    intake.recover_incoming()
    if isinstance(crash, OSError):
        assert claimed.read_bytes() == data and not list(p.failed.glob("*.jsonl"))
        assert said == ["intake of a.jsonl failed: [Errno 28] No space left"]
        # seen meanwhile (status counts it with the inbox), and taken again at the next
        # rescan once the disk has room: not only at the daemon's next start
        assert training_queue.counts(qroot)["inbox"] == 1
        monkeypatch.setattr(training_queue, "enqueue", enqueue)
        intake._next_rescan = 0.0
        intake.take()
        assert not claimed.exists() and (p.queue / "normal" / "a.jsonl").read_bytes() == data
        return
    assert not claimed.exists() and (p.failed / "a.jsonl").read_bytes() == data
    rec = record(p.failed / "a.jsonl")
    assert rec["outcome"] == "failed" and rec["reason"] == "intake crashed: ValueError: a validator bug"
    assert_fix_in_record(rec)
    assert "validate_data.py" in rec["fix"] and "training_queue.py add" in rec["fix"]
    assert said == ["intake of a.jsonl crashed (a validator bug); it is in failed/"]
    monkeypatch.undo()
    status = run_script("training_queue.py", "status", "--json", root=qroot)
    assert json.loads(status.stdout)["counts"]["failed"] == 1, status.stdout


def test_once_with_an_unreadable_chat_template_stops_before_taking_a_file(initialized_root):
    """A mistyped `chat_template` path: every file's encoder would fail on it. Pre-flight
    names it before a file is moved into processing/ (where the report then called it
    half-trained), and the log's last line says why the run ended."""
    root = initialized_root
    tune(root)
    cfg = training_config.load_config(root)
    cfg["chat_template"] = "missing.jinja"
    training_config.write_config(root, cfg)
    put(root / "inbox" / "t.jsonl", lines("t", 3))
    proc = run_once(root)
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc)
    assert "pre-flight: chat_template 'missing.jinja' cannot be read" in proc.stderr
    assert "set it to null" in proc.stderr and "run --once" in proc.stderr
    assert (root / "queue" / "normal" / "t.jsonl").exists() and not os.listdir(root / "processing")
    assert "stopped (on an error: pre-flight: chat_template" in (root / "logs" / "daemon.log").read_text()
    # one jinja cannot parse: named with its line, not blamed on each chat file in turn
    (root / "broken.jinja").write_text("{% for m in messages %}\n{{ m.content }{% endfor %}")
    cfg["chat_template"] = "broken.jinja"
    training_config.write_config(root, cfg)
    # a chat file dropped meanwhile stays queued: the intake's test render does not blame it
    put(root / "inbox" / "c.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}).encode() + b"\n")
    proc = run_once(root)
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc)
    assert "pre-flight: chat_template 'broken.jinja' is not a valid template (line 2: unexpected " \
           "'}')" in proc.stderr, proc.stderr
    assert (root / "queue" / "normal" / "t.jsonl").exists() and not os.listdir(root / "failed")
    assert (root / "inbox" / "c.jsonl").exists()  # (pre-flight stopped the run before intake)
    # the intake's test render of a chat file queued while the template is broken (a running
    # daemon, paused on it): it stays queued, not failed for a record's fault
    import training_daemon
    import training_queue
    daemon = training_daemon.Daemon(root, once=True, monitor=False)
    daemon.cfg = training_config.load_config(root)
    queued = training_queue.enqueue(root, root / "inbox" / "c.jsonl", move=True)
    daemon.check_render(Path(queued["path"]))
    assert Path(queued["path"]).exists() and not os.listdir(root / "failed")
    # a name the model has no template of ("PLAIN"): before the file is taken, not after
    cfg["chat_template"] = "PLAIN"
    training_config.write_config(root, cfg)
    proc = run_once(root)
    assert proc.returncode == 1, proc.stderr
    assert "pre-flight: chat_template 'PLAIN' is not a named template of the model (it has none)" \
        in proc.stderr and '"plain" (lower case)' in proc.stderr, proc.stderr
    assert (root / "queue" / "normal" / "t.jsonl").exists() and not os.listdir(root / "processing")
