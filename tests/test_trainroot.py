"""trainroot: root resolution, atomic writes under kill -9, locks that name their holder."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainroot
from trainroot import (EXIT_USAGE, BusyError, FileLock, GuardrailError, Paths, add_common_args,
                       atomic_write_json, run_cli,
                       exchange_paths, move_unique, read_json, read_lock_holder, rename_noreplace,
                       resolve_root)

REPO = Path(__file__).resolve().parent.parent


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINING_ROOT", raising=False)
    assert resolve_root() == REPO
    monkeypatch.setenv("TRAINING_ROOT", str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_paths_names_fixed_folders(tmp_path):
    p = Paths(tmp_path).ensure()
    for name in ("inbox", "current_model", "versions", "control", "config.json",
                 ".system_state.json"):
        assert (tmp_path / name) in {p.inbox, p.current_model, p.versions, p.control,
                                     p.config, p.system_state}
    assert p.inbox_high.is_dir() and p.inbox_low.is_dir() and p.processing.is_dir()
    assert not p.current_model.exists(), "naming a path must not create current_model"


def test_error_message_reads_what_where_fix():
    err = GuardrailError("version not found", "versions/v009", "Run `python3 model_versioner.py list`.")
    assert str(err) == "version not found, versions/v009. Run `python3 model_versioner.py list`."
    assert err.exit_code == 1 and BusyError("x").exit_code == 3


def test_read_json_default_and_corrupt(tmp_path):
    assert read_json(tmp_path / "missing.json", default={"a": 1}) == {"a": 1}
    with pytest.raises(GuardrailError, match="file not found"):
        read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,')
    with pytest.raises(GuardrailError) as exc:
        read_json(bad)
    assert str(exc.value) == (f"corrupt JSON (line 1 column 9: Expecting property name enclosed "
                              f"in double quotes), {bad}. Inspect it, then move it aside: `mv {bad} {bad}.bad`.")


def test_read_json_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    """A FIFO in place of a state file would block a reader forever; a folder, or a file
    where a folder should be, is an error naming the path, never a traceback."""
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "plain").write_text("{}")
    for path, why in ((fifo, "not a regular file"), (tmp_path / "folder.json", "Is a directory"),
                      (tmp_path / "plain" / "x.json", "Not a directory")):
        with pytest.raises(GuardrailError) as exc:
            read_json(path, default={})
        assert str(exc.value).startswith(f"cannot read JSON ({why}), {path}. "), str(exc.value)
    lock = tmp_path / "busy.lock"
    os.mkfifo(lock)
    assert trainroot.read_lock_holder(lock) is None
    assert trainroot.read_lock_holder(tmp_path / "plain" / "x.lock") is None


def test_atomic_write_leaves_no_temp_and_sets_mode(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"n": 1})
    atomic_write_json(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 2}
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


WRITER = r"""
import sys, json
sys.path.insert(0, sys.argv[1])
from trainroot import atomic_write_json
i = int(sys.argv[3])
while True:
    i += 1
    atomic_write_json(sys.argv[2], {"i": i, "payload": str(i) * (1000 + i % 5000)})
    if i == int(sys.argv[3]) + 1:
        print("ready", flush=True)  # one write done: the kill lands in the stream of writes
"""


def test_atomic_write_survives_kill_9_at_random_moments(tmp_path):
    """50+ kills of a writer mid-stream: the file is always a complete old or new document."""
    target = tmp_path / "state.json"
    atomic_write_json(target, {"i": 0, "payload": ""})
    rng = random.Random(7)
    torn = 0
    for k in range(1, 56):
        base = k * 1_000_000
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(target), str(base)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        doc = json.loads(target.read_text())  # never partial: must parse
        assert doc["payload"] == (str(doc["i"]) * (1000 + doc["i"] % 5000) if doc["i"] else "")
        assert doc["i"] > base
        # a kill inside a write leaves its temp file behind (hidden, never read as the state)
        leftovers = list(tmp_path.glob(".state.json.*.tmp"))
        torn += bool(leftovers)
        for leftover in leftovers:
            leftover.unlink()
    print(f"{torn} of 55 kills landed inside a write")
    assert torn >= 5, f"only {torn} of 55 kills landed inside a write; the test proves nothing"


HOLDER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from trainroot import FileLock
with FileLock(sys.argv[2], "daemon"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_excludes_second_process_and_names_holder(tmp_path):
    lock_path = tmp_path / ".locks" / "daemon.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO), str(lock_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert read_lock_holder(lock_path)["pid"] == proc.pid
        with pytest.raises(BusyError) as exc:
            FileLock(lock_path, "second").acquire()
        assert str(exc.value) == (f"busy: held by pid {proc.pid} (daemon), {lock_path}. Wait for it "
                                  "to finish, or check it with `python3 training_controller.py status`.")
        assert exc.value.exit_code == 3
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    # kill -9 releases the lock: the stale file does not block anyone
    assert read_lock_holder(lock_path) is None
    with FileLock(lock_path, "third"):
        assert read_lock_holder(lock_path)["purpose"] == "third"


def test_a_lock_taken_on_a_full_disk_holds_names_its_holder_and_is_given_back(tmp_path, monkeypatch):
    """The holder record is a write: on a full disk it fails. The lock must hold all the
    same (its holder named by the kernel's /proc/locks), and be given back on release;
    before, the descriptor leaked and the lock stayed held until the process ended."""
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    path = tmp_path / "daemon.lock"
    with monkeypatch.context() as disk:
        disk.setattr(trainroot.os, "pwrite", full)
        lock = FileLock(path, "prune").acquire()
        assert read_lock_holder(path) == {"pid": os.getpid(), "purpose": None, "since": None}
        with pytest.raises(BusyError):
            FileLock(path, "another").acquire()
        lock.release()
    assert read_lock_holder(path) is None
    FileLock(path, "again").acquire().release()


def test_exchange_swaps_non_empty_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(); b.mkdir()
    (a / "f").write_text("A"); (b / "f").write_text("B")
    exchange_paths(a, b)
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


def test_rename_noreplace_and_move_unique_never_overwrite(tmp_path):
    src, dst = tmp_path / "x.jsonl", tmp_path / "d" / "x.jsonl"
    dst.parent.mkdir()
    src.write_text("new"); dst.write_text("old")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    moved = move_unique(src, dst.parent)
    assert moved.name == "x-2.jsonl" and moved.read_text() == "new" and dst.read_text() == "old"
    assert not src.exists()


def test_run_cli_formats_errors_and_json(capsys):
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd = sub.add_parser("boom")
    trainroot.add_common_args(cmd)

    def fail(args):
        raise GuardrailError("it broke", "/some/where", "Run `fix-it`.")
    cmd.set_defaults(func=fail)
    assert trainroot.run_cli(parser, ["boom"]) == 1
    assert capsys.readouterr().err == "Error: it broke, /some/where. Run `fix-it`.\n"
    assert trainroot.run_cli(parser, ["boom", "--json"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out)["error"]["message"] == "it broke, /some/where. Run `fix-it`."
    assert trainroot.run_cli(parser, ["nope"]) == 2


def _cli(tmp_path):
    parser = argparse.ArgumentParser(prog="tool.py")
    add_common_args(parser)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("write")
    add_common_args(p)
    p.add_argument("--count", type=int, default=1)
    p.set_defaults(func=lambda args: (tmp_path / "ro" / "x").write_text("x"))
    return parser


@pytest.mark.parametrize("argv, what, prog, fix", [
    (["write", "--count", "two", "--json"], "argument --count: invalid int value: 'two'",
     "tool.py write", "usage"),
    (["bogus", "--json"], "argument command: invalid choice: 'bogus' (choose from 'write')",
     "tool.py", "usage"),
    (["--json"], "no command given", "tool.py", "commands"),
])
def test_usage_errors_read_like_every_error_and_json_gets_its_document(tmp_path, capsys, argv,
                                                                       what, prog, fix):
    assert run_cli(_cli(tmp_path), argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    doc = json.loads(out)
    fix = f"Run `python3 {prog} --help` to see the {fix}."
    assert doc["ok"] is False and (doc["error"]["what"], doc["error"]["fix"]) == (what, fix)
    assert err.splitlines()[-1] == f"Error: {what}, python3 {prog}. {fix}"


def test_an_os_error_is_an_error_line_naming_the_path(tmp_path, capsys):
    (tmp_path / "ro").write_text("a file where the command expects a folder")
    assert run_cli(_cli(tmp_path), ["write"]) == 1
    err = capsys.readouterr().err
    assert err == (f"Error: Not a directory, {tmp_path / 'ro' / 'x'}. Check that path, then run the "
                   "command again.\n")


def test_a_write_that_must_not_replace_leaves_the_existing_file_and_no_temp(tmp_path):
    path = tmp_path / "claimed.json"
    trainroot.atomic_write_json(path, {"first": 1}, replace=False)
    with pytest.raises(FileExistsError):
        trainroot.atomic_write_json(path, {"second": 2}, replace=False)
    assert json.loads(path.read_text()) == {"first": 1}
    assert os.listdir(tmp_path) == ["claimed.json"]


def test_an_empty_root_argument_is_a_usage_error_not_a_guess(tmp_path, monkeypatch):
    """`--root "$ROOT"` with ROOT unset must not fall back to $TRAINING_ROOT or the repo."""
    monkeypatch.setenv("TRAINING_ROOT", str(tmp_path))
    assert trainroot.resolve_root(None) == tmp_path.resolve()
    for empty in ("", "  "):
        with pytest.raises(trainroot.UsageError, match="--root is empty"):
            trainroot.resolve_root(empty)
    proc = subprocess.run([sys.executable, str(REPO / "state_tracker.py"), "--root", ""],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: --root is empty, --root. ")
    assert not (tmp_path / ".system_state.json").exists()
