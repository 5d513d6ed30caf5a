"""state_tracker.py: every warning appears in its scenario and its own fix command clears it.

Scenarios are real training roots (made by `init` once, then copied with hard links kept),
changed the way a person or an assistant would change them; fix commands are taken from
the warning itself and run as subprocesses. Every document is validated against
docs/system_state.schema.json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

import state_tracker as st
from conftest import run_script
from trainroot import atomic_write_json, utc_now

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "docs" / "system_state.schema.json").read_text())
BASELINE = {"BACKUP_NONE", "BACKUP_SAME_FILESYSTEM"}  # a fresh root has no backup yet


# --------------------------------------------------------------------------- helpers

INIT_SCENARIO: dict = {}


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """One root per session, made by the NOT_INITIALIZED fix itself (init costs a torch import
    in a subprocess, so this test process never imports torch); tests copy it (also
    tests/test_claude_md.py)."""
    if "root" not in INIT_SCENARIO:  # a module global: test_claude_md's copy of this fixture shares it
        root = tmp_path_factory.mktemp("st-template") / "root"
        root.mkdir()
        INIT_SCENARIO["before"] = before = codes(root)
        INIT_SCENARIO["fix"] = run_fix(before["NOT_INITIALIZED"]["fix"], root)
        INIT_SCENARIO["after"] = codes(root)
        INIT_SCENARIO["root"] = root
    return INIT_SCENARIO["root"]


@pytest.fixture
def root(template, tmp_path, monkeypatch) -> Path:
    """A private copy of the initialised root; `cp -a` keeps the version's hard links."""
    dst = tmp_path / "root"
    subprocess.run(["cp", "-a", str(template), str(dst)], check=True)
    monkeypatch.setenv("TRAINING_ROOT", str(dst))
    return dst


def state(root, **kw) -> dict:
    doc = st.build_state(root, **kw)
    jsonschema.validate(doc, SCHEMA)
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN sneaks in
    return doc


def codes(root, **kw) -> dict:
    return {w["code"]: w for w in state(root, **kw)["warnings"]}


def run_fix(command: str, root: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a fix command exactly as printed (python3 -> this interpreter), from the repo."""
    command = command.replace("python3 ", shlex.quote(sys.executable) + " ")
    return subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TRAINING_ROOT": str(root)})


def fix_and_check(root: Path, code: str, **kw) -> dict:
    """Run the fix command of warning `code`, and return the warnings afterwards."""
    warning = codes(root, **kw)[code]
    proc = run_fix(warning["fix"], root)
    assert proc.returncode == 0, f"{warning['fix']} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return codes(root, **kw)


def edit_config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    atomic_write_json(root / "config.json", cfg)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_daemon_state(root: Path, **fields) -> None:
    doc = {"schema_version": 1, "pid": None, "started_at": utc_now(), "heartbeat": utc_now(),
           "state": "idle", "paused_reason": None, "paused_since": None, "current_file": None,
           "progress": None, "last_error": None}
    doc.update(fields)
    atomic_write_json(root / ".daemon_state.json", doc)


def ago(seconds: float) -> str:
    from datetime import datetime, timedelta, timezone
    t = datetime.now(timezone.utc) - timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


HOLDER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import training_controller as tc
from trainroot import FileLock, Paths, atomic_write_json, utc_now
root, lock, recorded, act = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
held = FileLock(Paths(root).lock(lock), "test holder").acquire()
if recorded:  # pretend the lock was taken by another (dead) process: an inherited flock
    os.ftruncate(held._fd, 0)
    os.pwrite(held._fd, json.dumps({"pid": recorded, "purpose": "trainer", "since": utc_now()}).encode(), 0)
print("ready", flush=True)
while True:  # a stand-in daemon: acts on `resume` the way the protocol says
    if act:
        for req in tc.pending_requests(root):
            if req["action"] == "resume" and tc.claim_request(root, req):
                state = json.load(open(os.path.join(root, ".daemon_state.json")))
                state.update(state="idle", paused_since=None, paused_reason=None, heartbeat=utc_now())
                atomic_write_json(os.path.join(root, ".daemon_state.json"), state)
                tc.acknowledge(root, req, "done")
    time.sleep(0.05)
"""


class Holder:
    """A child process that holds one of the root's locks (optionally recording another pid)."""

    def __init__(self, root: Path, lock: str, recorded_pid: int = 0, act: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO), str(root), lock,
                                      str(recorded_pid), "1" if act else "0"],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def publish_trained(root: Path, global_step: int) -> None:
    """Publish a 'trained' current_model (new trainer_state) the way the trainer does."""
    import model_versioner as mv
    staged = root / ".staging" / f"trained-{uuid.uuid4().hex[:6]}"
    shutil.copytree(root / "current_model", staged)
    for name in ("trainer_state.json", ".manifest.json"):
        (staged / name).unlink()
    (staged / "trainer_state.json").write_text(json.dumps(
        {"global_step": global_step, "tokens_seen": global_step * 2048}))
    mv.publish_model(root, staged, reason="post-train:test")


def write_metrics(root: Path, losses: list[float], first_step: int = 1, file: str = "bad.jsonl",
                  prefix: bytes = b"") -> None:
    with open(root / "metrics.jsonl", "ab") as f:
        f.write(prefix)
        for i, loss in enumerate(losses):
            f.write((json.dumps({"time": utc_now(), "global_step": first_step + i, "file": file,
                                 "loss": loss, "lr": 3e-4, "tokens_per_sec": 3000.0}) + "\n").encode())


# --------------------------------------------------------------------------- the fresh root

def test_fresh_root_is_ok_and_valid(root):
    doc = state(root)
    assert doc["ok"] and doc["critical_count"] == 0
    assert {w["code"] for w in doc["warnings"]} == BASELINE
    m = doc["current_model"]
    assert m["exists"] and m["complete"] and m["matches_version"] == "v001"
    assert m["global_step"] == 0 and m["size_bytes"] > 100_000
    assert doc["versions"]["count"] == 1 and doc["versions"]["latest"] == "v001"
    assert doc["config"]["approved"] and doc["config"]["changes"] == []
    assert doc["daemon"]["alive"] is False and doc["training"]["state"] == "stopped"
    assert doc["disk"]["enough"] and doc["disk"]["needed_bytes"] == (
        4 * m["size_bytes"] + 100 * 1024 * 1024)
    for w in doc["warnings"]:
        assert w["fix"].startswith("python3 ") and f"--root {root}" in w["fix"]


def test_not_initialized_then_init_fixes_it(template):
    w = INIT_SCENARIO["before"]
    assert set(w) == {"NOT_INITIALIZED"} and w["NOT_INITIALIZED"]["severity"] == "critical"
    assert w["NOT_INITIALIZED"]["fix"] == f"python3 training_daemon.py init --root {template}"
    assert INIT_SCENARIO["fix"].returncode == 0, INIT_SCENARIO["fix"].stderr
    assert set(INIT_SCENARIO["after"]) == BASELINE


def test_a_folder_that_is_not_a_root_is_left_as_it_was(tmp_path):
    """The report on a folder that is no training root writes nothing into it (no index)."""
    folder = tmp_path / "not-a-root"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    state = st.build_state(folder)
    assert [w["code"] for w in state["warnings"]] == ["NOT_INITIALIZED"]
    assert sorted(os.listdir(folder)) == ["notes.txt"]


# --------------------------------------------------------------------------- the model

def test_rm_rf_current_model_is_critical_and_its_fix_restores_it(root):
    subprocess.run(f"rm -rf {shlex.quote(str(root))}/current_model/", shell=True, check=True)
    proc = run_script("state_tracker.py", "--warnings", root=root)
    assert proc.returncode == 1
    assert "CRITICAL MODEL_MISSING" in proc.stdout
    w = codes(root)["MODEL_MISSING"]
    assert w["severity"] == "critical" and "v001" in w["message"]
    assert w["fix"] == f"python3 model_versioner.py restore latest --root {root}"
    assert set(fix_and_check(root, "MODEL_MISSING")) == BASELINE
    assert state(root)["current_model"]["matches_version"] == "v001"
    assert run_script("state_tracker.py", "--warnings", root=root).returncode == 0


def test_rm_rf_after_a_rollback_restores_the_rolled_back_to_version_not_the_newest(root):
    import model_versioner as mv
    publish_trained(root, 7)
    assert mv.create_version(root, "post-train:test") == ("v002", True)
    assert mv.rollback(root)["restored"] == "v001"  # v002 was bad data
    shutil.rmtree(root / "current_model")
    w = codes(root)["MODEL_MISSING"]
    assert "it was v001" in w["message"] and "latest version is v002" in w["message"]
    assert w["fix"] == f"python3 model_versioner.py restore v001 --root {root}"
    assert set(fix_and_check(root, "MODEL_MISSING")) == BASELINE
    assert state(root)["current_model"]["matches_version"] == "v001"
    # a version taken since is current_model as it then was: the newest again
    publish_trained(root, 9)
    assert mv.create_version(root, "post-train:test")[0] == "v003"
    shutil.rmtree(root / "current_model")
    assert codes(root)["MODEL_MISSING"]["fix"] == f"python3 model_versioner.py restore latest --root {root}"


def test_incomplete_model_is_critical_and_restore_fixes_it(root):
    (root / "current_model" / "model.safetensors").unlink()
    w = codes(root)["MODEL_INCOMPLETE"]
    assert w["severity"] == "critical" and "model.safetensors: missing" in w["message"]
    assert set(fix_and_check(root, "MODEL_INCOMPLETE")) == BASELINE


def test_resized_model_file_is_incomplete(root):
    path = root / "current_model" / "tokenizer.json"
    text = path.read_bytes()
    path.unlink()  # a new inode: the version's hard link keeps the old bytes
    path.write_bytes(text + b" ")
    w = codes(root)["MODEL_INCOMPLETE"]
    assert f"tokenizer.json: size {len(text) + 1}, manifest says {len(text)}" in w["message"]
    assert set(fix_and_check(root, "MODEL_INCOMPLETE")) == BASELINE


def test_no_version_then_snapshot(root, tmp_path):
    os.rename(root / "versions" / "v001", tmp_path / "v001-aside")
    w = codes(root)
    assert w["NO_VERSION"]["severity"] == "critical"
    assert set(fix_and_check(root, "NO_VERSION")) == BASELINE


def test_trained_model_not_versioned_is_info_and_snapshot_fixes_it(root):
    publish_trained(root, 7)
    doc = state(root)
    assert doc["current_model"]["global_step"] == 7 and doc["current_model"]["matches_version"] is None
    w = codes(root)["MODEL_NOT_VERSIONED"]
    assert w["severity"] == "info" and doc["ok"]
    assert set(fix_and_check(root, "MODEL_NOT_VERSIONED")) == BASELINE
    assert state(root)["current_model"]["matches_version"] == "v002"


def test_damaged_version_is_found_and_verify_names_the_file(root):
    os.unlink(root / "versions" / "v001" / "tokenizer.json")
    w = codes(root)["VERSION_DAMAGED"]
    assert "v001" in w["message"] and "tokenizer.json: missing" in w["message"]
    proc = run_fix(w["fix"], root)
    assert proc.returncode == 1 and "tokenizer.json" in proc.stdout + proc.stderr
    os.link(root / "current_model" / "tokenizer.json", root / "versions" / "v001" / "tokenizer.json")
    assert set(codes(root)) == BASELINE


def test_in_place_write_to_current_model_is_seen_and_verify_names_the_file(root):
    import model_versioner as mv
    publish_trained(root, 7)
    assert mv.create_version(root, "post-train:test") == ("v002", True)
    path = root / "current_model" / "config.json"
    text = path.read_bytes()
    with open(path, "r+b") as f:  # same size, new bytes, same inode: v002's file changes too
        f.write(text.replace(b" ", b"\t", 1))  # still valid JSON
    w = codes(root)["VERSION_DAMAGED"]
    assert "v002" in w["message"] and "config.json: written in place" in w["message"]
    assert "current_model/ is this version" in w["message"]
    assert f"model_versioner.py restore v001 --root {root}" in w["note"]
    proc = run_fix(w["fix"], root)  # verify: the bytes did change
    assert proc.returncode == 1 and "config.json" in proc.stdout + proc.stderr
    # current_model given back its own copy of the versioned bytes (a backup restored):
    # the version is still damaged, but current_model no longer shares its files
    os.unlink(path)
    path.write_bytes(text)
    w = codes(root)["VERSION_DAMAGED"]
    assert "current_model/ is this version" not in w["message"], w["message"]
    assert "in current_model/ too" not in w["note"]


# --------------------------------------------------------------------------- config

def test_changed_locked_parameter_names_old_new_and_approve_fixes_it(root):
    edit_config(root, learning_rate=0.001)
    w = codes(root)["CONFIG_UNAPPROVED"]
    assert w["severity"] == "critical"
    assert "learning_rate: 0.0003 -> 0.001" in w["message"]
    assert w["fix"] == f"python3 training_controller.py approve-config --yes --root {root}"
    assert run_script("state_tracker.py", "--check", root=root).returncode == 1
    assert set(fix_and_check(root, "CONFIG_UNAPPROVED")) == BASELINE


def test_changed_locked_parameter_reverted_clears(root):
    edit_config(root, max_length=512)
    assert "max_length: 256 -> 512" in codes(root)["CONFIG_UNAPPROVED"]["message"]
    edit_config(root, max_length=256)
    assert set(codes(root)) == BASELINE


def test_invalid_config_lists_each_key(root):
    edit_config(root, lerning_rate=0.1, batch_size=0)
    w = codes(root)["CONFIG_INVALID"]
    assert "lerning_rate: unknown parameter (did you mean learning_rate?)" in w["message"]
    assert "batch_size: 0 is out of range [1, 65536]" in w["message"]
    edit_config(root, lerning_rate=None, batch_size=8)
    proc = run_fix(w["fix"], root)  # the re-check the fix names
    assert proc.returncode == 0 and "CONFIG_INVALID" not in proc.stdout


def test_missing_config_and_the_version_copy_of_it(root):
    os.rename(root / "config.json", root / "config.json.aside")
    w = codes(root)["CONFIG_MISSING"]
    assert w["severity"] == "critical"
    proc = run_fix(w["fix"], root)  # init: writes back the newest version's config
    assert proc.returncode == 0, proc.stderr
    assert json.loads((root / "config.json").read_text()) == \
        json.loads((root / "config.json.aside").read_text())
    assert set(codes(root)) == BASELINE


# --------------------------------------------------------------------------- the daemon

def test_daemon_dead_with_a_file_in_processing_is_critical(root):
    (root / "processing" / "notes.jsonl").write_text('{"text": "hello"}\n')
    write_daemon_state(root, pid=dead_pid(), state="training", heartbeat=ago(30),
                       current_file={"name": "notes.jsonl", "sha256": "0" * 64, "priority": "normal"})
    doc = state(root)
    assert doc["training"]["state"] == "dead" and doc["daemon"]["alive"] is False
    w = codes(root)["DAEMON_DEAD"]
    assert w["severity"] == "critical" and "processing/notes.jsonl" in w["message"]
    assert w["fix"] == f"python3 training_daemon.py run --root {root}"
    assert run_script("state_tracker.py", "--warnings", root=root).returncode == 1
    # Its fix, `python3 training_daemon.py run`, is run on this very scenario (and the file
    # trained to done/) by tests/test_claude_md.py::test_daemon_dead.
    # killed once the file was in done/, before its state said so: nothing waits half-trained
    (root / "processing" / "notes.jsonl").rename(root / "done" / "notes.jsonl")
    w = codes(root)["DAEMON_DEAD"]
    assert w["message"] == (f"the daemon is not running (last pid {doc['daemon']['last_pid']}, state "
                            "said training); no file waits half-trained (processing/ is empty): "
                            "it died between files"), w["message"]
    assert w["note"].startswith("Trains what waits in the queue.")
    # stopped with a file part-way: on purpose (a request, a signal) it is said, not alarmed;
    # ended by an error (its last state says stopped too) it is a dead daemon
    (root / "done" / "notes.jsonl").rename(root / "processing" / "notes.jsonl")
    for ended_by, code, severity in (("request", "DAEMON_NOT_RUNNING", "info"),
                                     ("signal", "DAEMON_NOT_RUNNING", "info"),
                                     ("error", "DAEMON_DEAD", "critical"), (None, "DAEMON_DEAD", "critical")):
        write_daemon_state(root, pid=dead_pid(), state="stopped", ended_by=ended_by)
        found = codes(root)
        assert found[code]["severity"] == severity, (ended_by, found)
        assert "processing/notes.jsonl" in found[code]["message"]
        assert {"DAEMON_NOT_RUNNING", "DAEMON_DEAD"} - {code} - set(found) == {"DAEMON_NOT_RUNNING", "DAEMON_DEAD"} - {code}


def test_a_daemon_that_ended_on_an_error_between_files_is_dead_and_says_why(root):
    """Regression: a `run --once` that pre-flight stopped (a chat_template that cannot be
    read) with files waiting read as DAEMON_NOT_RUNNING, "stopped on purpose: do not start
    it", and the error was nowhere in the report."""
    (root / "inbox" / "notes.jsonl").write_text('{"text": "hello"}\n')
    error = ("pre-flight: chat_template 'missing.jinja' cannot be read (No such file or "
             "directory), ROOT/missing.jinja. Fix the path in config.json's `chat_template`.")
    write_daemon_state(root, pid=dead_pid(), state="stopped", ended_by="error", last_error=error)
    found = codes(root)
    assert "DAEMON_NOT_RUNNING" not in found
    w = found["DAEMON_DEAD"]
    assert w["severity"] == "critical" and w["message"].endswith(f"): {error}"), w
    assert w["note"].startswith("Do what the error names first")
    write_daemon_state(root, pid=dead_pid(), state="stopped", ended_by="once")  # queue emptied
    found = codes(root)
    assert "DAEMON_DEAD" not in found and found["DAEMON_NOT_RUNNING"]["severity"] == "info"
    # with a file part-way (the engine refused to resume it): the error and "do it first",
    # not "died ... resumes the file" (the start fails the same way), and said once
    (root / "inbox" / "notes.jsonl").rename(root / "processing" / "notes.jsonl")
    error = ("config.json's chat_template changed since notes.jsonl started (checkpoint at step "
             "4): the rest of the file would render into other tokens than its first part")
    write_daemon_state(root, pid=dead_pid(), state="stopped", ended_by="error", last_error=error)
    found = codes(root)
    w = found["DAEMON_DEAD"]
    assert w["message"].endswith(f"while processing/notes.jsonl waits part-way: {error}"), w
    assert w["note"].startswith("Do what the error names first") and "TRAINING_ERROR" not in found


def test_a_daemon_killed_while_idle_is_dead_and_a_kept_pause_is_said(root):
    """`kill -9` of an idle daemon: the controller said dead, the report said OK (and with a
    file waiting, DAEMON_NOT_RUNNING: "stopped on purpose"). A pause kept with no daemon (a
    `pause` then, or one a stopped daemon carried out) was not in the report, whose fix,
    a start, trained nothing: TRAINING_PAUSED names `resume`, which clears it."""
    write_daemon_state(root, pid=dead_pid(), state="idle")
    w = codes(root)["DAEMON_DEAD"]
    assert w["severity"] == "critical" and "state said idle" in w["message"]
    assert run_script("state_tracker.py", "--check", root=root).returncode == 1
    (root / "inbox" / "notes.jsonl").write_text('{"text": "hello"}\n')
    assert "DAEMON_NOT_RUNNING" not in codes(root)
    write_daemon_state(root, pid=dead_pid(), state="stopped", ended_by="request")
    assert set(codes(root)) >= {"DAEMON_NOT_RUNNING"}
    proc = run_script("training_controller.py", "pause", "--reason", "checking data", root=root)
    assert proc.returncode == 0, proc.stderr
    found = codes(root)
    assert "DAEMON_NOT_RUNNING" not in found  # a start alone would only pause
    w = found["TRAINING_PAUSED"]
    assert "no daemon runs and a pause is kept" in w["message"] and "checking data" in w["message"]
    assert w["fix"] == f"python3 training_controller.py resume --root {root}"
    assert run_fix(w["fix"], root).returncode == 0
    found = codes(root)
    assert "TRAINING_PAUSED" not in found and "DAEMON_NOT_RUNNING" in found
    # the pause a daemon carried out, kept across its stop
    import training_controller
    training_controller.keep_pause_record(root, "paused by request", None)
    assert "a pause is kept" in codes(root)["TRAINING_PAUSED"]["message"]
    assert run_fix(f"python3 training_controller.py resume --root {root}", root).returncode == 0
    assert "TRAINING_PAUSED" not in codes(root)


def test_a_lost_config_lock_is_named_and_compared_with_what_the_newest_version_trained_with(
        initialized_root):
    """`rm .config.lock` then learning_rate 0.5: CONFIG_UNAPPROVED listed every locked value
    as `null -> ...` and never named the file, hiding the one real change."""
    root = initialized_root
    (root / ".config.lock").unlink()
    edit_config(root, learning_rate=0.5)
    w = codes(root)["CONFIG_UNAPPROVED"]
    assert w["message"].startswith(f"{root / '.config.lock'} is missing: no config value is approved")
    assert w["message"].endswith("against what v001 trained with: learning_rate: 0.0003 -> 0.5"), w
    (root / ".config.lock").write_text("garbage")
    assert "is damaged (" in codes(root)["CONFIG_UNAPPROVED"]["message"]
    assert run_fix(codes(root)["CONFIG_UNAPPROVED"]["fix"], root).returncode == 0
    assert "CONFIG_UNAPPROVED" not in codes(root)


def test_a_chat_template_file_that_cannot_be_read_is_said(root):
    """`"chat_template": "nope.jinja"` with no such file: the report said OK and approved,
    and the next `run --once` stopped in pre-flight."""
    edit_config(root, chat_template="nope.jinja")
    w = codes(root)["CONFIG_INVALID"]
    assert "chat_template 'nope.jinja' cannot be read (No such file or directory)" in w["message"]
    (root / "nope.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert "CONFIG_INVALID" not in codes(root)


def test_stalled_heartbeat_while_training(root):
    with Holder(root, "daemon") as daemon:
        write_daemon_state(root, pid=daemon.pid, state="training", heartbeat=ago(600),
                           progress={"global_step": 3, "loss": float("nan"), "eta_seconds": None})
        doc = state(root)
        assert doc["daemon"]["alive"] and doc["daemon"]["pid"] == daemon.pid
        assert doc["training"]["stalled"] and doc["training"]["progress"]["loss"] is None
        w = codes(root)["TRAINING_STALLED"]
        assert re.search(r"heartbeat is 6\d\d s old", w["message"]), w["message"]
        assert w["fix"].startswith("python3 training_controller.py stop --wait 300")
        write_daemon_state(root, pid=daemon.pid, state="training", heartbeat=utc_now())
        assert "TRAINING_STALLED" not in codes(root)


def test_a_failed_try_of_the_processing_file_is_reported_with_its_error(root):
    """A rank that died (or any crash) leaves attempts and last_error in the file's record."""
    (root / "processing" / "big.jsonl").write_text('{"text": "a"}\n')
    (root / "processing" / "big.jsonl.record.json").write_text(json.dumps(
        {"attempts": 2, "last_error": "TorchrunFailed: rank 1 (local_rank: 1) died: exitcode -9"}))
    doc = state(root)
    assert (doc["training"]["file_attempts"], doc["training"]["file_error"]) == \
        (2, "TorchrunFailed: rank 1 (local_rank: 1) died: exitcode -9")
    w = codes(root)["TRAINING_ERROR"]
    assert w["severity"] == "warning"
    assert w["message"] == ("training processing/big.jsonl failed (2 failed tries): "
                            "TorchrunFailed: rank 1 (local_rank: 1) died: exitcode -9")
    assert w["fix"] == f"tail -n 50 {root / 'logs' / 'daemon.log'}"
    out = subprocess.run([sys.executable, str(REPO / "state_tracker.py"), "--check"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "last error: TorchrunFailed: rank 1" in out
    (root / "processing" / "big.jsonl.record.json").write_text(json.dumps({"attempts": 0}))
    assert "TRAINING_ERROR" not in codes(root)


def test_paused_for_long_and_resume_fixes_it(root):
    with Holder(root, "daemon", act=True) as daemon:
        write_daemon_state(root, pid=daemon.pid, state="paused", paused_since=ago(300),
                           paused_reason="disk check")
        w = codes(root)
        assert w["TRAINING_PAUSED"]["severity"] == "info" and "PAUSED_LONG" not in w
        assert "(disk check)" in w["TRAINING_PAUSED"]["message"]
        write_daemon_state(root, pid=daemon.pid, state="paused", paused_since=ago(2 * 3600),
                           paused_reason="disk check")
        assert "TRAINING_PAUSED" not in codes(root)
        w = codes(root)["PAUSED_LONG"]
        assert "2.0 h (disk check)" in w["message"]
        proc = run_fix(w["fix"], root)
        assert proc.returncode == 0, proc.stderr
        _wait_cleared(root, "PAUSED_LONG")
        assert set(codes(root)) == BASELINE and state(root)["training"]["state"] == "idle"


def _wait_cleared(root, code, seconds=10) -> bool:
    deadline = time.monotonic() + seconds
    while code in codes(root):
        assert time.monotonic() < deadline, f"{code} did not clear"
        time.sleep(0.05)
    return True


def test_unreadable_daemon_state(root):
    (root / ".daemon_state.json").write_text('{"pid": 12')
    w = codes(root)["DAEMON_STATE_UNREADABLE"]
    assert "corrupt JSON" in w["message"]
    assert set(fix_and_check(root, "DAEMON_STATE_UNREADABLE")) == BASELINE


def test_stale_lock_held_through_an_inherited_descriptor(root):
    gone = dead_pid()
    with Holder(root, "versions", recorded_pid=gone) as holder:
        w = codes(root)["LOCK_STALE"]
        assert f"pid {gone}" in w["message"] and "no longer running" in w["message"]
        proc = run_fix(w["fix"], root)
        assert str(holder.pid) in proc.stdout + proc.stderr  # fuser names the real holder
        holder.stop()
        assert "LOCK_STALE" not in codes(root)


def test_live_lock_is_not_stale(root):
    with Holder(root, "versions") as holder:
        doc = state(root)
        assert [lk["pid"] for lk in doc["locks"]] == [holder.pid]
        assert not doc["locks"][0]["stale"] and "LOCK_STALE" not in codes(root)


# --------------------------------------------------------------------------- disk

def test_disk_too_low_for_the_next_snapshot(root):
    need = state(root)["disk"]["needed_bytes"]
    low = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - need + 1, need - 1)  # noqa: E731
    w = codes(root, disk_usage=low)["DISK_LOW"]
    assert w["severity"] == "critical" and "next snapshot and checkpoint need" in w["message"]
    # one version, kept: prune would free nothing, so it is not the fix; what uses the space is named
    assert "prune" not in w["fix"] and "pruning versions frees next to nothing" in w["message"]
    assert "current_model/" in w["message"] and "outside the root" in w["message"]
    proc = run_fix(w["fix"], root)
    assert proc.returncode == 0 and "current_model" in proc.stdout, proc.stderr
    assert (root / "versions" / "v001").is_dir()
    ok = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - need, need)  # noqa: E731
    assert "DISK_LOW" not in codes(root, disk_usage=ok)


def test_disk_low_names_prune_only_with_what_it_frees(root):
    import model_versioner as mv
    for step in (7, 9):
        publish_trained(root, step)  # new inodes each time: v001 and v002 stop sharing files
        mv.create_version(root, "post-train:test")
    edit_config(root, keep_versions=1)
    unique = sum(f.stat().st_blocks * 512 for v in ("v001", "v002")  # on disk, as usage counts
                 for f in (root / "versions" / v).iterdir())
    need = state(root)["disk"]["needed_bytes"]
    low = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - need + 1, need - 1)  # noqa: E731
    w = codes(root, disk_usage=low)["DISK_LOW"]
    assert f"pruning 2 version(s) beyond the keep policy frees {unique / 2**20:.1f} MiB" in w["message"]
    assert w["fix"] == f"python3 model_versioner.py prune --yes --root {root}"
    assert run_fix(w["fix"], root).returncode == 0
    assert sorted(os.listdir(root / "versions")) == [".last_id", ".pruned", ".published.json", "v003"]


def test_disk_low_from_config_margin(root):
    edit_config(root, min_free_disk_mb=1 << 30)  # a petabyte: no real disk has it free
    assert codes(root)["DISK_LOW"]["severity"] == "critical"


# --------------------------------------------------------------------------- backups

def test_no_backup_then_backup_fixes_it(root):
    w = codes(root)["BACKUP_NONE"]
    assert w["fix"] == f"python3 backup_manager.py backup --root {root}"
    after = fix_and_check(root, "BACKUP_NONE")
    assert set(after) == {"BACKUP_SAME_FILESYSTEM"}
    b = state(root)["backups"]
    assert b["verified_count"] == 1 and b["latest"]["status"] == "verified"
    assert b["latest"]["version"] == "v001" and b["latest_age_s"] < 60


def test_old_backup_and_unverified_backup(root):
    assert run_fix(codes(root)["BACKUP_NONE"]["fix"], root).returncode == 0
    (bid,) = [n for n in os.listdir(root / "backups") if not n.startswith(".")]
    record_path = root / "backups" / bid / "backup.json"
    record = json.loads(record_path.read_text())
    atomic_write_json(record_path, dict(record, created_at=ago(10 * 86400)))
    w = codes(root)["BACKUP_OLD"]
    assert "10.0 days old" in w["message"]
    atomic_write_json(record_path, dict(record, status="unverified"))
    w = codes(root)
    assert "BACKUP_NONE" in w and "BACKUP_UNVERIFIED" in w
    after = fix_and_check(root, "BACKUP_UNVERIFIED")  # verify re-reads it: the bytes are good
    assert set(after) == {"BACKUP_SAME_FILESYSTEM"}
    atomic_write_json(record_path, dict(json.loads(record_path.read_text()), created_at=ago(10 * 86400)))
    assert set(fix_and_check(root, "BACKUP_OLD")) == {"BACKUP_SAME_FILESYSTEM"}


def test_a_corrupt_backup_beside_a_good_one_is_cleared_by_its_fix(root):
    """verify found a backup corrupt and a new one was made: BACKUP_UNVERIFIED stayed, its
    fix still `verify` (bad again). With a good backup there, its fix deletes the bad one."""
    assert run_fix(codes(root)["BACKUP_NONE"]["fix"], root).returncode == 0
    (bid,) = [n for n in os.listdir(root / "backups") if not n.startswith(".")]
    weights = next((root / "backups" / bid).glob("*.safetensors"))
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:
        f.write(b"rot")
    assert run_fix(f"python3 backup_manager.py verify {bid} --root {root}", root).returncode == 1
    w = codes(root)["BACKUP_UNVERIFIED"]
    assert w["fix"] == f"python3 backup_manager.py verify {bid} --root {root}"  # no good one yet
    assert run_fix(f"python3 backup_manager.py backup --root {root}", root).returncode == 0
    w = codes(root)["BACKUP_UNVERIFIED"]
    assert w["fix"] == f"python3 backup_manager.py prune --yes --root {root}"
    assert set(fix_and_check(root, "BACKUP_UNVERIFIED")) == {"BACKUP_SAME_FILESYSTEM"}
    assert not (root / "backups" / bid).exists() and state(root)["backups"]["verified_count"] == 1


def test_backup_on_another_filesystem_clears_the_warning(root):
    other = Path("/dev/shm") / f"tg-backups-{uuid.uuid4().hex[:8]}"
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(root).st_dev:
        pytest.skip("no second filesystem here")
    try:
        w = codes(root)["BACKUP_SAME_FILESYSTEM"]
        assert w["fix"] == f"python3 backup_manager.py backup --root {root}"
        assert "another disk" in w["note"]
        edit_config(root, backup_dir=str(other))  # what the note says to do first
        assert state(root)["backups"]["same_filesystem"] is False
        assert "BACKUP_SAME_FILESYSTEM" not in codes(root)
        assert set(fix_and_check(root, "BACKUP_NONE")) == set()
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_an_unusable_backup_dir_is_named_with_what_is_in_the_way(root, tmp_path):
    """backup_dir under a file (or a file itself): every backup fails, yet the report said
    BACKUP_NONE (its fix fails) and BACKUP_SAME_FILESYSTEM (for a path that cannot exist)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for bdir in (blocker / "backups", blocker):
        edit_config(root, backup_dir=str(bdir))
        w = codes(root)
        assert "BACKUP_NONE" not in w and "BACKUP_SAME_FILESYSTEM" not in w
        unusable = w["BACKUP_DIR_UNUSABLE"]
        assert unusable["message"].startswith(f"backup_dir {bdir} cannot hold backups: {blocker} is ")
        assert unusable["fix"] == f"ls -ld {blocker}" and run_fix(unusable["fix"], root).returncode == 0
        assert 'Set "backup_dir" in config.json' in unusable["note"]
        assert run_fix(f"python3 backup_manager.py backup --root {root}", root).returncode != 0
    edit_config(root, backup_dir=str(tmp_path / "backups" / "new"))  # what the note says: clears
    assert "BACKUP_DIR_UNUSABLE" not in codes(root)
    assert set(fix_and_check(root, "BACKUP_NONE")) <= {"BACKUP_SAME_FILESYSTEM"}


# --------------------------------------------------------------------------- queue

def test_failed_file_with_its_reason_then_requeued(root, tmp_path):
    import training_queue
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    training_queue.enqueue(root, bad, move=True)
    doc = state(root)
    assert doc["queue"]["failed_count"] == 1
    assert doc["queue"]["failed"][0]["name"] == "notes.jsonl"
    reason = json.loads((root / "failed" / "notes.jsonl.record.json").read_text())["reason"]
    assert reason and doc["queue"]["failed"][0]["reason"] == reason
    w = codes(root)["FILES_FAILED"]
    assert f"notes.jsonl ({reason})" in w["message"]
    failed = root / "failed" / "notes.jsonl"
    failed.write_text('{"text": "fine"}\n{"text": "fixed"}\n')  # the person fixes the file
    after = fix_and_check(root, "FILES_FAILED")
    assert "FILES_FAILED" not in after and after["DAEMON_NOT_RUNNING"]["severity"] == "info"
    assert state(root)["queue"]["counts"]["normal"] == 1


def test_a_failed_file_without_the_jsonl_suffix_is_named_back_into_the_inbox(root, tmp_path):
    """`add` refuses a name without .jsonl, so FILES_FAILED's fix for one is the rename."""
    import training_queue
    for name, kept in (("data.csv", "data.csv"), ("part.jsonl.part", "part.jsonl.part.file")):
        (tmp_path / name).write_text('{"text": "fine"}\n')
        training_queue.enqueue(root, tmp_path / name, move=True)
        w = codes(root)["FILES_FAILED"]
        assert kept in w["message"]
        assert w["fix"].startswith(f"mv {root / 'failed' / kept} "), w["fix"]
        after = fix_and_check(root, "FILES_FAILED")
        assert "FILES_FAILED" not in after and "DAEMON_NOT_RUNNING" in after
    assert sorted(os.listdir(root / "inbox")) == ["data.jsonl", "high", "low", "part.jsonl"]
    # a file of that name already waits in the inbox: the rename takes a free name
    (tmp_path / "data.csv").write_text('{"text": "other"}\n')
    training_queue.enqueue(root, tmp_path / "data.csv", move=True)
    assert codes(root)["FILES_FAILED"]["fix"].endswith(f"{root / 'inbox' / 'data-2.jsonl'}")


def test_queue_counts_per_priority_and_skip_reasons(root, tmp_path):
    import training_queue
    for i, pr in enumerate(("high", "normal", "normal", "low")):
        f = tmp_path / f"f{i}.jsonl"
        f.write_text(json.dumps({"text": f"file {i}"}) + "\n")
        training_queue.enqueue(root, f, priority=pr)
    training_queue.remove(root, "f3.jsonl", reason="not needed")
    q = state(root)["queue"]
    assert q["counts"] == {"high": 1, "normal": 2, "low": 0} and q["queued"] == 3
    assert q["skipped_count"] == 1 and "not needed" in q["skipped"][0]["reason"]


# --------------------------------------------------------------------------- loss

def test_loss_spike_then_rollback_clears_it(root):
    publish_trained(root, 41)
    write_metrics(root, [2.0 + 0.01 * (i % 3) for i in range(40)] + [9.5])
    doc = state(root)
    assert doc["loss"]["spike"] and doc["loss"]["last_step"] == 41
    w = codes(root)["LOSS_SPIKE"]
    assert "bad.jsonl" in w["message"] and "4.7x" in w["message"]
    assert w["fix"] == f"python3 model_versioner.py rollback --root {root}"
    after = fix_and_check(root, "LOSS_SPIKE")
    assert "LOSS_SPIKE" not in after
    doc = state(root)
    assert doc["current_model"]["global_step"] == 0 and doc["loss"]["points"] == 0


def test_loss_spike_while_the_file_is_still_in_processing_means_skip_discard(root):
    publish_trained(root, 41)
    write_metrics(root, [2.0] * 40 + [9.0])
    (root / "processing" / "bad.jsonl").write_text('{"text": "x"}\n')
    with Holder(root, "daemon") as daemon:
        write_daemon_state(root, pid=daemon.pid, state="paused", paused_reason="loss spike",
                           progress={"global_step": 41})
        w = codes(root)["LOSS_SPIKE"]
        assert w["fix"] == f"python3 training_controller.py skip --discard --root {root}"
        assert "bad.jsonl" in w["note"]


def test_loss_trend_uses_only_the_tail_and_the_current_history(root):
    publish_trained(root, 30)
    junk = b'{"global_step": 999999, "loss": 1e9}\n' * 100_000  # ~4 MB of old history
    write_metrics(root, [3.0 - 0.05 * i for i in range(30)], prefix=junk)
    with open(root / "metrics.jsonl", "ab") as f:
        f.write(b'{"global_step": 31, "lo')  # a torn last line
    started = time.perf_counter()
    loss = state(root)["loss"]
    assert time.perf_counter() - started < 0.5
    assert loss["points"] == 30 and loss["trend"] == "falling" and not loss["spike"]
    assert loss["last_step"] == 30 and loss["recent"][-1] == pytest.approx(1.55)


def test_nan_loss_is_a_spike_and_json_stays_strict(root):
    publish_trained(root, 10)
    write_metrics(root, [2.0] * 9 + [float("nan")])
    doc = state(root)
    assert doc["loss"]["last_loss"] is None and doc["loss"]["last_loss_finite"] is False
    assert "not finite" in codes(root)["LOSS_SPIKE"]["message"]


# --------------------------------------------------------------------------- CLI

def test_bare_refresh_prints_the_path_of_a_valid_document(root):
    proc = run_script("state_tracker.py", root=root)
    assert proc.returncode == 0 and proc.stdout.strip() == str(root / ".system_state.json")
    jsonschema.validate(json.loads((root / ".system_state.json").read_text()), SCHEMA)
    assert st.refresh(root) == root / ".system_state.json"


def test_json_is_one_document_and_exit_code_follows_critical(root):
    proc = run_script("state_tracker.py", "--json", root=root)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    shutil.rmtree(root / "current_model")
    proc = run_script("state_tracker.py", "--json", root=root)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["ok"] is False and doc["critical_count"] == 1
    jsonschema.validate(doc, SCHEMA)


def test_check_report_and_warnings_only(root):
    proc = run_script("state_tracker.py", "--check", root=root)
    assert proc.returncode == 0
    for word in ("model", "versions", "config", "daemon", "training", "disk", "queue",
                 "backups", "loss", "BACKUP_NONE", "fix:"):
        assert word in proc.stdout
    proc = run_script("state_tracker.py", "--warnings", root=root)
    assert proc.returncode == 0 and "BACKUP_NONE" in proc.stdout and "versions" not in proc.stdout


def test_corrupt_files_everywhere_never_crash_the_tracker(root):
    """Every small file it reads, garbled: the document still builds and validates."""
    garbage = {".config.lock": "[1, 2]", "versions/tags.json": '"v001"',
               "versions/v001/version.json": "not json", ".daemon_state.json": "[]",
               "metrics.jsonl": '{"global_step": "x", "loss": null}\n\x00\xff{\n',
               "current_model/.manifest.json": '{"files": 3}',
               "current_model/trainer_state.json": "7"}
    for rel, text in garbage.items():
        path = root / rel
        if path.exists():
            path.unlink()  # a new inode: the version's hard link keeps its bytes
        path.write_text(text)
    os.makedirs(root / "backups" / "b20261128T000000-abcd")
    (root / "backups" / "b20261128T000000-abcd" / "backup.json").write_text("{")
    (root / "failed" / "x.jsonl").write_text("{")
    (root / "failed" / "x.jsonl.record.json").write_text('{"history": 5}')
    w = codes(root)
    assert {"MODEL_INCOMPLETE", "VERSION_DAMAGED", "CONFIG_UNAPPROVED", "BACKUP_UNVERIFIED",
            "FILES_FAILED"} <= set(w)
    assert run_script("state_tracker.py", "--json", root=root).returncode == 1


def test_root_that_does_not_exist(tmp_path):
    missing = tmp_path / "not-yet"
    proc = run_script("state_tracker.py", "--warnings", "--root", str(missing))
    assert proc.returncode == 1 and "NOT_INITIALIZED" in proc.stdout and proc.stderr == ""
    assert not missing.exists()  # a report never creates the root


def test_usage_errors_exit_2():
    assert st.main(["--check", "--warnings"]) == 2
    assert st.main(["--bogus"]) == 2


def test_json_run_imports_no_torch_rich_or_psutil(root):
    code = (f"import sys, io; sys.path.insert(0, {str(REPO)!r}); import state_tracker; "
            "out = sys.stdout; sys.stdout = io.StringIO(); "
            f"rc = state_tracker.main(['--json', '--root', {str(root)!r}]); sys.stdout = out; "
            "print(rc, ','.join(m for m in ('torch', 'transformers', 'safetensors', 'numpy', "
            "'rich', 'psutil') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]


def test_every_warning_code_is_documented():
    guide = (REPO / "docs" / "STATE_TRACKER_GUIDE.md").read_text()
    schema_codes = SCHEMA["properties"]["warnings"]["items"]["properties"]["code"]["enum"]
    assert sorted(schema_codes) == sorted(st.WARNING_CODES)
    for code in st.WARNING_CODES:
        assert f"`{code}`" in guide, f"{code} is not in docs/STATE_TRACKER_GUIDE.md"
    for key in SCHEMA["properties"]:
        assert f"`{key}`" in guide, f"field {key} is not in docs/STATE_TRACKER_GUIDE.md"


def test_the_locks_held_while_one_file_trains_for_hours_are_not_stale(root):
    """The daemon holds model.lock and engine.lock from taking a file to its publish: a file
    that trains for hours is no stale lock; a versions lock held that long still is."""
    import os
    from datetime import datetime, timedelta, timezone
    from trainroot import FileLock, Paths
    two_hours_ago = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    held = []
    try:
        for name in ("model", "engine", "versions"):
            lock = FileLock(Paths(root).lock(name), f"training {name}").acquire()
            held.append(lock)
            os.ftruncate(lock._fd, 0)
            os.pwrite(lock._fd, json.dumps({"pid": os.getpid(), "purpose": f"training {name}",
                                            "since": two_hours_ago}).encode(), 0)
        doc = state(root)
        assert {lk["name"]: lk["stale"] for lk in doc["locks"]} == {
            "model": False, "engine": False, "versions": True}
        assert "lock versions is held" in codes(root)["LOCK_STALE"]["message"]
    finally:
        for lock in held:
            lock.release()


def test_the_memory_a_live_idle_daemon_keeps_is_reported_and_typed(root):
    """`memory_kept` from the daemon (keep_warm_seconds) reaches training.memory_kept only for
    the live daemon that wrote it, typed (a hand-edited `true` is not a byte count), in the
    schema; the report says until when."""
    kept = {"bytes": 3 << 30, "device": "cuda", "until": "2026-12-05T03:04:05.000000Z"}
    write_daemon_state(root, pid=dead_pid(), memory_kept=kept)
    assert state(root)["training"]["memory_kept"] is None  # no daemon: nothing is kept
    with Holder(root, "daemon") as daemon:
        write_daemon_state(root, pid=daemon.pid, memory_kept=kept)
        assert state(root)["training"]["memory_kept"] == kept
        out = run_script("state_tracker.py", "--check", root=root).stdout
        assert ("the model and AdamW state (3.0 GiB) kept in memory for a next file until "
                "03:04:05 UTC (keep_warm_seconds)") in out, out
        for bad in ({**kept, "bytes": True}, {**kept, "bytes": "3"}, [kept], "3 GB"):
            write_daemon_state(root, pid=daemon.pid, memory_kept=bad)
            assert state(root)["training"]["memory_kept"] is None
        write_daemon_state(root, pid=daemon.pid, memory_kept={"bytes": 5, "device": 7, "until": None})
        assert state(root)["training"]["memory_kept"] == {"bytes": 5, "device": None, "until": None}


@pytest.mark.parametrize("backup", [False, True])
def test_a_model_whose_version_is_damaged_too_is_restored_from_a_sound_copy(root, backup):
    """A file written in place in current_model is written in every version hard-linked to
    it: MODEL_INCOMPLETE's fix must not name a version that fails the same check, but the
    newest sound version, or the newest verified backup when that holds more training."""
    import model_versioner as mv
    publish_trained(root, 7)
    assert mv.create_version(root, "post-train:test") == ("v002", True)
    if backup:
        made = run_script("backup_manager.py", "backup", "--json", root=root)
        assert made.returncode == 0, made.stderr
        bid = json.loads(made.stdout)["id"]
    os.truncate(root / "current_model" / "model.safetensors", 100)  # v002's too (same inode)
    doc = state(root)
    damaged = {v for v in doc["versions"]["ids"]
               if any(x["code"] == "VERSION_DAMAGED" and f"version {v} " in x["message"]
                      for x in doc["warnings"])}
    assert damaged == {"v002"}, damaged
    w = codes(root)["MODEL_INCOMPLETE"]
    assert "v002, the version it was, is damaged too" in w["message"], w
    if backup:  # step 7, where v001 is step 0
        assert w["fix"] == f"python3 backup_manager.py restore {bid} --root {root}"
        assert f"the newest verified backup of its lineage, {bid} (of v002, step 7" in w["note"]
    else:
        assert w["fix"] == f"python3 model_versioner.py restore v001 --root {root}"
        assert "files trained after it are undone" in w["note"]
    left = fix_and_check(root, "MODEL_INCOMPLETE")
    assert "MODEL_INCOMPLETE" not in left and "VERSION_DAMAGED" in left
    assert state(root)["current_model"]["global_step"] == (7 if backup else 0)


@pytest.mark.parametrize("backed_up", [False, True])
def test_a_damaged_version_s_fix_never_names_a_pruned_version(root, capsys, backed_up):
    """VERSION_DAMAGED (a tagged v003 written in place) named `restore v002`, its parent,
    which retention had pruned (the command failed), and "a backup of v003" where none was.
    Now: the newest sound version of its line that still exists (v001, through v002's
    pruned record), and the backup that holds v003 when there is one."""
    import backup_manager
    import model_versioner as mv
    for step, vid in ((3, "v002"), (5, "v003"), (7, "v004")):
        publish_trained(root, step)
        assert mv.create_version(root, "post-train:test") == (vid, True)
    mv.tag_version(root, "v003", "golden")
    mv.tag_version(root, "v001", "start")
    assert mv.prune(root, keep=1, yes=True)["deleted"] == ["v002"]
    assert backup_manager.main(["backup", "v003" if backed_up else "v004", "--json",
                                "--root", str(root)]) == 0
    bid = json.loads(capsys.readouterr().out)["id"]
    weights = next((root / "versions" / "v003").glob("*.safetensors"))
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    note = codes(root)["VERSION_DAMAGED"]["note"]
    assert "restore v002" not in note
    assert f"`python3 model_versioner.py restore v001 --root {root}` (the newest sound version" in note
    if backed_up:
        held = f"put its bytes back from its backup {bid} (`python3 backup_manager.py repair v003 --root {root}`)"
        assert held in note
        assert run_fix(f"python3 backup_manager.py repair v003 --root {root}", root).returncode == 0
        assert "VERSION_DAMAGED" not in codes(root)  # repaired: the warning clears
    else:
        assert "no backup holds v003" in note
    proc = run_fix(f"python3 model_versioner.py restore v001 --root {root}", root)
    assert proc.returncode == 0, proc.stderr


def test_a_version_folder_deleted_by_hand_is_named_with_a_fix_that_clears_it(root):
    """`rm -rf versions/v002` (tagged) and `rm -rf versions/v004` (the latest, current_model):
    verify said OK, the report showed the tag and said "trained since the last snapshot".
    VERSION_GONE names each (prune never deletes those and leaves a record of what it
    deletes), with a fix that works: untag, or a snapshot of current_model."""
    import model_versioner as mv
    for step, vid in ((3, "v002"), (5, "v003"), (7, "v004")):
        publish_trained(root, step)
        assert mv.create_version(root, "post-train:test") == (vid, True)
    mv.tag_version(root, "v002", "golden")
    assert mv.prune(root, keep=2, yes=True)["deleted"] == ["v001"]  # pruned: recorded, not gone
    for vid in ("v002", "v004"):
        shutil.rmtree(root / "versions" / vid)
    gone = [x for x in state(root)["warnings"] if x["code"] == "VERSION_GONE"]
    assert [x["message"].split(" is gone")[0] for x in gone] == ["version v002 (tagged golden)",
                                                                  "version v004"]
    assert "MODEL_NOT_VERSIONED" not in codes(root)
    assert gone[0]["fix"] == f"python3 model_versioner.py untag golden --root {root}"
    assert "current_model still holds it, unversioned" in gone[1]["message"]
    for x in gone:
        assert run_fix(x["fix"], root).returncode == 0, x
    left = codes(root)
    assert "VERSION_GONE" not in left and "MODEL_NOT_VERSIONED" not in left, left
    assert mv.current_version(root) == "v005"


def test_the_sound_version_named_for_a_damaged_model_is_in_its_own_lineage(root):
    """current_model was restored to v002 (v003, trained after it, left aside); v002's own
    trainer_state.json is then damaged in place: the fix restores v002's parent v001, never
    the newer v003 of the line the restore left."""
    import model_versioner as mv
    publish_trained(root, 7)
    assert mv.create_version(root, "post-train:test") == ("v002", True)
    publish_trained(root, 9)
    assert mv.create_version(root, "post-train:test") == ("v003", True)
    mv.restore_version(root, "v002")
    os.truncate(root / "current_model" / "trainer_state.json", 3)  # v002's too (same inode)
    w = codes(root)["MODEL_INCOMPLETE"]
    assert "v002, the version it was, is damaged too" in w["message"], w
    assert w["fix"] == f"python3 model_versioner.py restore v001 --root {root}", w
    assert "the newest version it was trained from" in w["note"]
