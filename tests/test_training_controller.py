"""training_controller: the control protocol, the CLI, and a real daemon obeying it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import training_config
import training_controller as tc
import trainroot
from conftest import REPO, run_script
from realdaemon import (RealDaemon, assert_same_weights, controller, daemon_fixture, drop,
                        set_config, step_of, weights)

STATUS = "python3 training_controller.py status"


@pytest.fixture
def root(tmp_root) -> Path:
    """A root with an approved default config (enough for the controller; no model needed)."""
    cfg = training_config.default_config()
    training_config.write_config(tmp_root, cfg)
    training_config.approve(tmp_root, cfg)
    return tmp_root


def ctl(capsys, *args) -> tuple[int, str, str]:
    """Run `training_controller.main(args)` in this process; (exit code, stdout, stderr)."""
    code = tc.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def request_files(root: Path) -> list[str]:
    control = root / "control"
    return sorted(n for n in os.listdir(control) if n.endswith(".request.json")) \
        if control.exists() else []


# A stand-in daemon process speaking the protocol (the real one is tested further down): it
# holds the daemon lock, writes .daemon_state.json, and claims and acknowledges requests.
# mode "deaf" never reads control/; "obey" acts like the daemon would.
FAKE_DAEMON = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
import trainroot, training_controller as tc
root, mode = sys.argv[1], sys.argv[2]
p = trainroot.Paths(root)
lock = trainroot.FileLock(p.lock("daemon"), "run").acquire()
started = trainroot.utc_now()
state = {"schema_version": 1, "pid": os.getpid(), "started_at": started, "state": "training",
         "paused_reason": None, "paused_since": None,
         "current_file": {"name": "a.jsonl", "sha256": "0" * 64, "priority": "normal"},
         "progress": {"global_step": 7, "step_in_file": 3, "records_done": 12, "records_total": 40,
                      "tokens_per_sec": 1500.0, "loss": 2.5, "eta_seconds": 9.0},
         "last_error": None}
def write(**kw):
    state.update(kw, heartbeat=trainroot.utc_now())
    trainroot.atomic_write_json(p.daemon_state, state)
write()
print("ready", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    time.sleep(0.05)
    write()
    if mode == "deaf":
        continue
    for req in tc.pending_requests(root, daemon_started_at=started):
        if not tc.claim_request(root, req):
            continue
        action = req["action"]
        if action == "stop":
            write(state="stopping")
            time.sleep(1.5)  # finishing the step and saving, as the real daemon does
            write(state="stopped", current_file=None, progress=None)
            tc.acknowledge(root, req, "done", "stopped at step 7")
            lock.release()
            sys.exit(0)
        if action == "pause":
            write(state="paused", paused_reason=req["reason"], paused_since=trainroot.utc_now())
            tc.acknowledge(root, req, "done", "paused at step 7")
        elif action == "resume":
            write(state="training", paused_reason=None, paused_since=None)
            tc.acknowledge(root, req, "done", "resumed")
        elif action == "skip":
            tc.acknowledge(root, req, "done", "skipped a.jsonl")
"""


@pytest.fixture
def fake_daemon(root):
    """Start a protocol-speaking stand-in daemon: `fake_daemon(mode)` returns its Popen."""
    procs = []

    def start(mode: str = "obey") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(root), mode, str(REPO)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


# --------------------------------------------------------------------------- protocol

def test_import_does_not_load_torch_psutil_or_rich():
    code = ("import sys, training_controller; "
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'psutil', 'rich', "
            "'watchdog') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_submit_pending_claim_ack_round_trip(root):
    a = tc.submit_request(root, "pause", reason="look at the loss")
    b = tc.submit_request(root, "skip", options={"discard": True})
    assert Path(a["path"]).name == f"{a['created_at'].replace('-', '').replace(':', '').replace('.', '')}-{a['id']}.request.json"
    on_disk = json.loads(Path(b["path"]).read_text())
    assert {k: on_disk[k] for k in ("id", "action", "reason", "options")} == \
        {"id": b["id"], "action": "skip", "reason": None, "options": {"discard": True}}
    assert [r["id"] for r in tc.pending_requests(root)] == [a["id"], b["id"]]
    assert tc.read_ack(root, a["id"]) is None
    assert tc.claim_request(root, a) is True
    assert tc.claim_request(root, a) is False
    assert (root / "control" / "claimed" / Path(a["path"]).name).exists()
    ack = tc.acknowledge(root, a, "done", "paused at step 3")
    assert tc.read_ack(root, a["id"]) == ack
    assert (ack["id"], ack["action"], ack["outcome"], ack["message"]) == \
        (a["id"], "pause", "done", "paused at step 3")
    assert [r["id"] for r in tc.pending_requests(root)] == [b["id"]]
    with pytest.raises(trainroot.GuardrailError, match="unknown control action 'halt'"):
        tc.submit_request(root, "halt")


CLAIMER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
import training_controller as tc
root, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.001)
won = [r["id"] for r in tc.pending_requests(root) if tc.claim_request(root, r)]
# a second pass catches requests the other claimer listed but had not claimed yet
won += [r["id"] for r in tc.pending_requests(root) if tc.claim_request(root, r)]
print(" ".join(won))
"""


def test_each_request_is_claimed_exactly_once_by_two_racing_processes(root):
    ids = {tc.submit_request(root, "pause")["id"] for _ in range(60)}
    go = root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(root), str(go), str(REPO)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)  # both interpreters started and spinning on the go file
    go.touch()
    won = [set(p.communicate(timeout=60)[0].split()) for p in procs]
    assert won[0] | won[1] == ids
    assert won[0] & won[1] == set()
    assert len(os.listdir(root / "control" / "claimed")) == 60
    assert request_files(root) == []


def test_malformed_control_files_are_moved_aside_with_a_reason_and_never_raise(root):
    control = root / "control"
    control.mkdir()
    good = tc.submit_request(root, "stop")
    (control / "20260101T000000000000Z-aa.request.json").write_text("{not json")
    (control / "20260101T000000000001Z-bb.request.json").write_text(
        json.dumps({"id": "bb", "action": "halt", "created_at": trainroot.utc_now(), "options": {}}))
    (control / "20260101T000000000002Z-cc.request.json").write_bytes(b"\xff\xfe[]")
    (control / "20260101T000000000003Z-dd.request.json").write_text("[1, 2]")
    # read-only callers (status) see nothing moved
    seen = []
    assert [r["id"] for r in tc.pending_requests(root, rejected=seen, move_aside=False)] == [good["id"]]
    assert len(seen) == 4 and len(request_files(root)) == 5
    rejected = []
    assert [r["id"] for r in tc.pending_requests(root, rejected=rejected)] == [good["id"]]
    errors = {Path(r["path"]).name: r["error"] for r in rejected}
    assert errors["20260101T000000000001Z-bb.request.json"] == \
        "action: expected one of stop, pause, resume, skip, accept, reject, got 'halt'"
    assert errors["20260101T000000000003Z-dd.request.json"] == "expected a JSON object, got list"
    assert errors["20260101T000000000000Z-aa.request.json"].startswith("unreadable (JSONDecodeError")
    assert errors["20260101T000000000002Z-cc.request.json"].startswith("unreadable (UnicodeDecodeError")
    assert request_files(root) == [Path(good["path"]).name]
    note = (control / "rejected" / "20260101T000000000001Z-bb.request.json.error.txt").read_text()
    assert "rejected 20260101T000000000001Z-bb.request.json: action: expected one of" in note
    assert len(os.listdir(control / "rejected")) == 8


def test_a_stop_written_before_the_daemon_started_is_stale_but_a_kept_pause_is_not(root):
    stop = tc.submit_request(root, "stop")
    pause = tc.submit_request(root, "pause")
    time.sleep(0.01)
    started = trainroot.utc_now()
    rejected = []
    assert [r["id"] for r in tc.pending_requests(root, rejected=rejected,
                                                 daemon_started_at=started)] == [pause["id"]]
    assert rejected[0]["error"].startswith(f"stale: a stop written at {stop['created_at']}, before")
    assert tc.read_ack(root, stop["id"])["outcome"] == "rejected"


def _wall_clock_at(monkeypatch, seconds_from_now: float) -> None:
    """The wall clock stepped by `seconds_from_now` (NTP, a VM resume): what utc_now reads."""
    from datetime import datetime, timezone
    when = datetime.fromtimestamp(time.time() + seconds_from_now, timezone.utc)
    monkeypatch.setattr(tc, "utc_now", lambda: when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def test_a_stop_written_after_the_daemon_started_is_accepted_while_the_clock_is_behind(
        root, monkeypatch):
    """Staleness and order come from the boot id and the boot clock, never the wall clock:
    stop and skip written after the daemon started count while the clock reads an hour
    (then two) behind its start, in the order written; a stop written before it started,
    while the clock ran a day ahead, is still stale. The real daemon's check is used."""
    import training_daemon
    _wall_clock_at(monkeypatch, 86_400)
    old_stop = tc.submit_request(root, "stop")
    daemon = training_daemon.Daemon(root, monitor=False)
    _wall_clock_at(monkeypatch, -3600)
    stop = tc.submit_request(root, "stop")
    _wall_clock_at(monkeypatch, -7200)
    skip = tc.submit_request(root, "skip")
    assert stop["created_at"] < daemon.started_at and skip["created_at"] < stop["created_at"]
    assert [r["id"] for r in daemon._requests()] == [stop["id"], skip["id"]]
    assert tc.read_ack(root, old_stop["id"])["outcome"] == "rejected"
    assert tc.read_ack(root, stop["id"]) is None and tc.read_ack(root, skip["id"]) is None


def test_a_stop_from_another_boot_is_stale_and_one_without_a_boot_clock_falls_back(root):
    """A request written in an earlier boot is stale whatever its time says; one written
    before requests carried a boot clock (a hand-written one) keeps the wall-clock rule."""
    started = tc.clock_mark()
    started_at = trainroot.utc_now()
    other_boot = tc.submit_request(root, "stop")
    doc = json.loads(Path(other_boot["path"]).read_text())
    trainroot.atomic_write_json(Path(other_boot["path"]), dict(doc, boot_id="0" * 32 + "-earlier"))
    legacy = {"schema_version": 1, "id": "legacy", "action": "skip", "reason": None,
              "created_at": "2099-01-01T00:00:00.000000Z", "options": {}}
    trainroot.atomic_write_json(root / "control" / "20990101T000000000000Z-legacy.request.json",
                                legacy)
    rejected = []
    assert [r["id"] for r in tc.pending_requests(root, rejected=rejected, daemon_started=started,
                                                 daemon_started_at=started_at)] == ["legacy"]
    assert [r["error"] for r in rejected] == [
        f"stale: a stop written at {other_boot['created_at']} in an earlier boot, before this "
        f"daemon started at {started_at}"]


# --------------------------------------------------------------------------- with no daemon

def test_stop_and_skip_with_no_daemon_say_so_and_leave_nothing_behind(root, capsys):
    assert ctl(capsys, "stop", "--reason", "x") == \
        (0, f"no daemon is running in {root}: nothing to stop\n", "")
    code, out, _ = ctl(capsys, "skip", "--discard", "--wait", "--json")
    assert code == 0 and json.loads(out)["outcome"] == "nothing"
    assert not (root / "control").exists()


def test_pause_with_no_daemon_is_kept_shown_by_status_and_cleared_by_resume(root, capsys):
    code, out, _ = ctl(capsys, "pause", "--reason", "new data tomorrow", "--json")
    kept = json.loads(out)
    assert code == 0 and kept["outcome"] == "kept"
    assert kept["message"] == ("no daemon is running: the pause is kept and applies when it starts; "
                               "undo it with `python3 training_controller.py resume`")
    code, out, _ = ctl(capsys, "pause")  # safe to repeat: still one kept pause
    assert code == 0 and f"a pause is already kept (request {kept['request']['id']}" in out
    assert len(request_files(root)) == 1
    code, out, _ = ctl(capsys, "status", "--json")
    st = json.loads(out)
    assert (st["alive"], st["state"], st["kept_pause"]["id"], st["kept_pause"]["reason"]) == \
        (False, "stopped", kept["request"]["id"], "new data tomorrow")
    assert [p["action"] for p in st["pending"]] == ["pause"]
    code, out, _ = ctl(capsys, "status")
    assert "kept pause  applies when the daemon starts" in out
    code, out, _ = ctl(capsys, "resume")
    assert (code, out) == (0, f"cleared the kept pause ({kept['request']['id']}); the daemon will "
                              "train when it starts\n")
    assert request_files(root) == []
    assert tc.read_ack(root, kept["request"]["id"])["outcome"] == "cancelled"
    assert ctl(capsys, "resume") == (0, f"no daemon is running and no pause is kept in {root}: "
                                        "nothing to resume\n", "")


def test_two_controllers_at_once_with_no_daemon(root):
    procs = [subprocess.Popen([sys.executable, str(REPO / "training_controller.py"), verb, "--json"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
             for verb in ("pause", "pause", "stop", "skip")]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert [o["outcome"] for o in outs] == ["kept", "kept", "nothing", "nothing"]
    # both may have written a pause in the same instant; one resume clears them all
    assert 1 <= len(request_files(root)) <= 2
    assert run_script("training_controller.py", "resume", root=root).returncode == 0
    assert request_files(root) == []


def test_status_of_a_daemon_that_died_while_training_says_dead(root, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trainroot.atomic_write_json(root / ".daemon_state.json", {
        "schema_version": 1, "pid": gone.pid, "started_at": trainroot.utc_now(),
        "heartbeat": trainroot.utc_now(), "state": "training",
        "current_file": {"name": "a.jsonl", "sha256": "0", "priority": "high"}, "progress": None})
    code, out, _ = ctl(capsys, "status", "--json")
    st = json.loads(out)
    assert (st["alive"], st["state"], st["reported_state"], st["pid"], st["last_pid"]) == \
        (False, "dead", "training", None, gone.pid)
    assert tc.is_training(root) is False
    code, out, _ = ctl(capsys, "status")
    assert "the daemon died while training; start it again" in out


def test_status_reports_a_corrupt_state_file_instead_of_crashing(root, capsys):
    (root / ".daemon_state.json").write_text('{"state": "train')
    code, out, _ = ctl(capsys, "status", "--json")
    st = json.loads(out)
    assert (code, st["alive"], st["state"]) == (0, False, "stopped")
    assert st["state_file_error"] == ("corrupt JSON (line 1 column 11: Unterminated string starting "
                                      f"at), {root / '.daemon_state.json'}. Inspect it, then move "
                                      f"it aside: `mv {root / '.daemon_state.json'} "
                                      f"{root / '.daemon_state.json'}.bad`.")


def test_approve_config_asks_on_a_terminal_and_records_a_typed_yes(root):
    import pty
    cfg = training_config.load_config(root)
    cfg["max_length"] = 128
    training_config.write_config(root, cfg)
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "training_controller.py"), "approve-config"],
                            cwd=REPO, stdin=child_fd, stdout=child_fd, stderr=child_fd)
    os.close(child_fd)
    seen = b""
    end = time.monotonic() + 30
    while b"[y/N]" not in seen and time.monotonic() < end:
        seen += os.read(main_fd, 4096)
    os.write(main_fd, b"y\n")
    assert proc.wait(timeout=30) == 0
    os.close(main_fd)
    assert b"max_length: 256 -> 128" in seen
    assert training_config.changed_locked(root, cfg) == []
    assert training_config.read_approval(root)["values"]["max_length"] == 128


# --------------------------------------------------------------------------- with a daemon process

def test_wait_times_out_with_exit_1_naming_what_is_pending(root, fake_daemon, capsys):
    daemon = fake_daemon("deaf")
    assert tc.is_training(root) is True
    code, out, err = ctl(capsys, "stop", "--wait", "0.3")
    [req] = tc.pending_requests(root)
    assert (code, out) == (1, "")
    assert err == (f"Error: timed out after 0.3 s waiting for stop request {req['id']}: not yet "
                   f"acknowledged by the daemon (pid {daemon.pid}, state training), {req['path']}. "
                   f"The request stays pending; check `{STATUS}`.\n")
    code, out, _ = ctl(capsys, "status", "--json")
    st = json.loads(out)
    assert (st["alive"], st["pid"], st["state"], st["responsive"]) == (True, daemon.pid, "training", True)
    assert st["current_file"]["name"] == "a.jsonl" and st["progress"]["records_total"] == 40
    assert [(p["id"], p["action"]) for p in st["pending"]] == [(req["id"], "stop")]


def test_wait_returns_when_paused_resumed_skipped_and_stopped(root, fake_daemon, capsys):
    daemon = fake_daemon("obey")
    code, out, _ = ctl(capsys, "pause", "--reason", "check", "--wait", "10", "--json")
    res = json.loads(out)
    assert (code, res["outcome"], res["ack"]["message"]) == (0, "done", "paused at step 7")
    st = tc.daemon_status(root)
    assert (st["state"], st["paused_reason"]) == ("paused", "check")
    code, out, _ = ctl(capsys, "resume", "--wait", "10")
    assert (code, out) == (0, "resumed\n")
    code, out, _ = ctl(capsys, "skip", "--discard", "--wait", "10", "--json")
    assert code == 0 and json.loads(out)["request"]["options"] == {"discard": True}
    code, out, _ = ctl(capsys, "stop", "--wait", "10")
    assert (code, out) == (0, "stopped at step 7\n")
    assert daemon.poll() == 0  # --wait returned only after the daemon exited
    assert tc.daemon_status(root)["state"] == "stopped"
    assert request_files(root) == []


def test_two_controllers_stop_one_daemon_at_once(root, fake_daemon):
    daemon = fake_daemon("obey")
    procs = [subprocess.Popen([sys.executable, str(REPO / "training_controller.py"), "stop",
                               "--wait", "20", "--json"], stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o["outcome"] for o in outs) == ["done", "done"]
    assert daemon.wait(timeout=10) == 0
    assert request_files(root) == []


def test_approve_config_shows_changes_needs_yes_and_refuses_while_training(root, fake_daemon, capsys):
    cfg = training_config.load_config(root)
    cfg["learning_rate"] = 1e-4
    training_config.write_config(root, cfg)
    code, out, err = ctl(capsys, "approve-config")
    assert (code, out) == (1, "")
    assert err == ("Error: approval not confirmed (learning_rate: 0.0003 -> 0.0001), "
                   + str(root / "config.json") + ". Read the "
                   "changes, then run `python3 training_controller.py approve-config --yes`.\n")
    daemon = fake_daemon("deaf")
    code, out, err = ctl(capsys, "approve-config", "--yes")
    assert code == 3
    assert err == ("Error: cannot approve the config while a file is training (learning_rate: "
                   "0.0003 -> 0.0001), " + str(root / "processing") + ". Stop it first: "
                   "`python3 training_controller.py stop --wait`, then run "
                   "`python3 training_controller.py approve-config --yes`.\n")
    daemon.kill()
    daemon.wait()

    code, out, _ = ctl(capsys, "approve-config", "--yes")
    assert (code, out) == (0, "learning_rate: 0.0003 -> 0.0001\napproved 1 changed locked parameter(s)\n")
    assert training_config.changed_locked(root, cfg) == []
    code, out, _ = ctl(capsys, "approve-config", "--yes", "--json")
    assert code == 0 and json.loads(out)["changes"] == []


def test_stop_with_control_not_writable_names_sigterm_and_the_pid(root, fake_daemon, capsys,
                                                                   read_only):
    """control/ on a read-only filesystem: the request cannot be written, so `stop` names
    the way that needs no file, SIGTERM to the live daemon (was a bare EROFS line)."""
    daemon = fake_daemon("deaf")
    control = root / "control"
    control.mkdir(exist_ok=True)
    read_only(control)
    code, out, err = ctl(capsys, "stop", "--wait", "5")
    assert (code, out) == (1, "")
    assert err == (f"Error: cannot write the stop request (Read-only file system), {control}. "
                   f"Stop the daemon with `kill -TERM {daemon.pid}` instead (SIGTERM "
                   "acts like stop: it finishes the step, checkpoints and exits); make "
                   f"{control} writable to use the controller again.\n")
    code, _, err = ctl(capsys, "pause")
    assert code == 1 and f"or stop the daemon with `kill -TERM {daemon.pid}`" in err
    assert daemon.poll() is None and request_files(root) == []


def test_an_eval_set_with_an_invalid_file_is_not_approved(root, capsys):
    """Approved, a bad eval file made every daemon start fail; it is named here instead."""
    (root / "eval").mkdir()
    bad = root / "eval" / "bad.jsonl"
    bad.write_text("not json\n")
    code = tc.main(["approve-config", "--yes"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot approve the eval set: bad.jsonl is invalid" in err, err
    assert f"validate_data.py {bad}" in err
    assert not training_config.read_approval(root).get("eval_set")  # still the approved none
    bad.write_text('{"text": "a good line"}\n')
    assert tc.main(["approve-config", "--yes"]) == 0


def test_approve_config_is_refused_while_a_file_is_part_way_trained(root, capsys):
    """A paused (or stopped) file resumes from its checkpoint: approving a new max_length
    let the rest of it be packed another way (was accepted). Operational parameters pass."""
    processing = root / "processing"
    processing.mkdir()
    (processing / "notes.jsonl").write_text('{"text": "a"}\n')
    trainroot.atomic_write_json(processing / "notes.jsonl.record.json",
                                {"sha256": "0" * 64, "file_id": "notes-1", "in_training": False})
    ckpt = root / "checkpoints" / "checkpoint-000040"
    ckpt.mkdir(parents=True)
    trainroot.atomic_write_json(ckpt / "meta.json", {
        "file_id": "notes-1", "global_step": 40, "complete": False,
        "position": {"record_line": 12, "exhausted": False}})
    cfg = training_config.load_config(root)
    cfg["max_length"] = 128
    training_config.write_config(root, cfg)
    code, out, err = ctl(capsys, "approve-config", "--yes")
    assert (code, out) == (1, "")
    assert err == (
        "Error: cannot approve max_length: 256 -> 128 while processing/notes.jsonl is part-way "
        "trained (checkpoint at step 40): the rest of the file would be packed and trained "
        "under other values than its start, " + str(root / "config.json") + ". Either finish "
        "the file with the old values: put max_length: 256 back in config.json (a daemon "
        "paused on the change resumes the file at its next rescan; a stopped one: start it); "
        "or, with the daemon running, `python3 training_controller.py skip` (keeps its steps; "
        "`skip --discard` undoes them), then `python3 training_controller.py approve-config "
        "--yes`.\n")
    assert training_config.changed_locked(root, cfg) == [("max_length", 256, 128, False)]

    # a parameter that only steers the daemon keeps the resume exact: approved
    cfg["max_length"] = 256
    cfg["locked"] = cfg["locked"] + ["keep_backups"]
    cfg["keep_backups"] = 9
    training_config.write_config(root, cfg)
    code, out, _ = ctl(capsys, "approve-config", "--yes")
    assert (code, out) == (0, "keep_backups: newly locked at 9, not approved yet\napproved 1 changed locked parameter(s)\n")

    # the file finished (its end-of-file checkpoint only waits for the publish): approved
    cfg["max_length"] = 128
    training_config.write_config(root, cfg)
    trainroot.atomic_write_json(ckpt / "meta.json", {
        "file_id": "notes-1", "global_step": 41, "complete": True,
        "position": {"record_line": 99, "exhausted": True}})
    code, out, _ = ctl(capsys, "approve-config", "--yes")
    assert code == 0 and out.endswith("approved 1 changed locked parameter(s)\n")


# --------------------------------------------------------------------------- a real daemon

TINY = {"max_length": 32, "batch_size": 2, "checkpoint_every_steps": 1, "settle_seconds": 0.2,
        "num_threads": 1,  # same threads in every run (bitwise equality), and kind to a busy CI
        "rescan_seconds": 0.5, "monitor_port": 0, "backup_every_files": 0, "backup_every_hours": 0.0}
# drop() writes 100 lines, ~10 KB of bytes -> ~140 optimizer steps of 2 x 32 tokens.
# A quiet machine trains a step of the tiny model in ~15 ms, a busy one in ~100 ms: the tests
# never race the clock. They find the step in metrics.jsonl (one line per step), freeze the
# daemon with SIGSTOP, write the request, and let it go on (SIGCONT): it must act within the
# next steps, wherever the request landed.


def prepare_root(root: Path, tiny_model_dir: Path) -> Path:
    import training_daemon
    root.mkdir(parents=True, exist_ok=True)
    training_daemon.init_root(root, base=str(tiny_model_dir))
    set_config(root, **TINY)
    return root


def assert_different_weights(a: dict, b: dict) -> None:
    import torch
    assert any(not torch.equal(a[k], b[k]) for k in a)


class Daemon(RealDaemon):
    def request(self, *args: str) -> dict:
        """`training_controller.py ARGS --json` sent while this daemon is frozen (SIGSTOP)."""
        before = set(request_files(self.root))
        self.proc.send_signal(signal.SIGSTOP)
        try:
            ctl = subprocess.Popen([sys.executable, str(REPO / "training_controller.py"), *args,
                                    "--json"], cwd=REPO, env=dict(os.environ, TRAINING_ROOT=str(self.root)),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            end = time.monotonic() + 60
            while set(request_files(self.root)) <= before and ctl.poll() is None:
                assert time.monotonic() < end, "the controller wrote no request in 60 s"
                time.sleep(0.01)
        finally:
            self.proc.send_signal(signal.SIGCONT)
        out, err = ctl.communicate(timeout=120)
        assert ctl.returncode == 0, f"{args} exited {ctl.returncode}: {out}{err}"
        return json.loads(out)


daemons = daemon_fixture(Daemon)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> dict:
    """Final weights of one uninterrupted run over notes.jsonl: what every test must equal."""
    root = prepare_root(tmp_path_factory.mktemp("ref") / "root", tiny_model_dir)
    drop(root)
    d = Daemon(root, "--once")
    try:
        assert d.wait() == 0, d.output()
    finally:
        d.close()
    assert (root / "done" / "notes.jsonl").exists()
    return {"weights": weights(root / "current_model"), "global_step": step_of(root)}


def stop_together(root: Path, daemon: subprocess.Popen, n: int = 2) -> list[dict]:
    """`n` controllers run `stop --wait` at the same time, written while the daemon is frozen
    (SIGSTOP) so both land during one step; returns their --json answers."""
    daemon.send_signal(signal.SIGSTOP)
    try:
        procs = [subprocess.Popen([sys.executable, str(REPO / "training_controller.py"), "stop",
                                   "--reason", f"controller {i}", "--wait", "90", "--json"],
                                  cwd=REPO, env=dict(os.environ, TRAINING_ROOT=str(root)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(n)]
        end = time.monotonic() + 60
        while len(request_files(root)) < n and all(p.poll() is None for p in procs):
            assert time.monotonic() < end, f"{n} controllers wrote no {n} requests in 60 s"
            time.sleep(0.01)
    finally:
        daemon.send_signal(signal.SIGCONT)
    outs = [p.communicate(timeout=150) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    return [json.loads(out) for out, _ in outs]


# One daemon life story instead of four separate ones: each daemon start costs an import of
# torch + transformers, and the suite has a time budget. Every interruption below must leave
# the final weights bitwise equal to the uninterrupted run's.
@pytest.mark.slow
def test_pause_resume_stop_kept_pause_and_sigterm_all_end_in_the_uninterrupted_weights(
        tmp_path, tiny_model_dir, uninterrupted, daemons):
    root = prepare_root(tmp_path / "root", tiny_model_dir)
    drop(root)
    total = uninterrupted["global_step"]

    # 1. pause -> checkpoint, current_model published, no further step; resume continues
    d = daemons(root)
    d.training_step("notes.jsonl", 3)
    res = d.request("pause", "--reason", "look at the loss", "--wait", "60")
    assert res["outcome"] == "done"
    st = tc.daemon_status(root)
    assert (st["alive"], st["state"]) == (True, "paused") and "look at the loss" in st["paused_reason"]
    assert st["processing_file"] == "notes.jsonl"
    paused_at = step_of(root)
    assert 3 <= paused_at < total
    time.sleep(1.0)  # paused means paused: no step is taken
    assert step_of(root) == paused_at
    assert json.loads((root / "metrics.jsonl").read_text().splitlines()[-1])["global_step"] == paused_at
    assert controller(root, "resume", "--wait", "60")["outcome"] == "done"

    # 2. two controllers stop it at once: both answered, one clean exit, file left in processing/
    d.step_reached(paused_at + 3)
    assert [o["outcome"] for o in stop_together(root, d.proc)] == ["done", "done"]
    assert d.wait() == 0
    stopped_at = step_of(root)
    assert paused_at < stopped_at < total
    st = tc.daemon_status(root)
    assert (st["alive"], st["state"], st["processing_file"], st["pending"]) == \
        (False, "stopped", "notes.jsonl", [])
    assert request_files(root) == []

    # 3. a pause given while no daemon runs is kept, and the next start honours it
    assert controller(root, "pause", "--reason", "before restart")["outcome"] == "kept"
    d = daemons(root)
    d.until("paused at start", lambda: tc.daemon_status(root)["state"] == "paused")
    time.sleep(0.5)
    assert step_of(root) == stopped_at and (root / "processing" / "notes.jsonl").exists()
    assert controller(root, "resume", "--wait", "60")["outcome"] == "done"

    # 4. SIGTERM acts like stop: the step finishes, the checkpoint is saved, exit 0
    d.step_reached(stopped_at + 3)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0
    assert stopped_at < step_of(root) < total
    assert (root / "processing" / "notes.jsonl").exists()
    assert tc.daemon_status(root)["state"] == "stopped"

    # 5. the last start finishes the file: same weights as the run nobody touched
    d = daemons(root, "--once")
    assert d.wait() == 0, d.output()
    assert (root / "done" / "notes.jsonl").exists()
    assert step_of(root) == total
    assert_same_weights(weights(root / "current_model"), uninterrupted["weights"])


@pytest.mark.slow
def test_skip_discard_restores_the_version_before_the_file_and_skip_keeps_the_training(
        tmp_path, tiny_model_dir, daemons):
    root = prepare_root(tmp_path / "root", tiny_model_dir)
    initial = weights(root / "versions" / "v001")
    d = daemons(root)

    # skip --discard: the file goes to skipped/ and current_model is the version before it
    drop(root, "a.jsonl", seed=1)
    assert d.training_step("a.jsonl", 3)["global_step"] >= 3
    res = d.request("skip", "--discard", "--reason", "wrong file", "--wait", "60")
    assert res["outcome"] == "done" and res["request"]["options"] == {"discard": True}
    d.until("a.jsonl in skipped/", lambda: (root / "skipped" / "a.jsonl").exists())
    record = json.loads((root / "skipped" / "a.jsonl.record.json").read_text())
    assert record["outcome"] == "skipped" and record["discarded"] is True
    before = record["version_before"]
    assert_same_weights(weights(root / "current_model"), weights(root / "versions" / before))
    assert_same_weights(weights(root / "current_model"), initial)
    assert step_of(root) == 0

    # skip (keep): the file goes to skipped/ and the steps trained on it stay in current_model
    drop(root, "b.jsonl", seed=2)
    d.training_step("b.jsonl", 3)
    res = d.request("skip", "--wait", "60")
    assert res["outcome"] == "done" and res["request"]["options"] == {"discard": False}
    d.until("b.jsonl in skipped/", lambda: (root / "skipped" / "b.jsonl").exists())
    record = json.loads((root / "skipped" / "b.jsonl.record.json").read_text())
    assert record["outcome"] == "skipped" and record["discarded"] is False
    assert record["fix"] == (f"`python3 training_queue.py add {root / 'skipped' / 'b.jsonl'} "
                             f"--move --root {root}` queues it again.")
    d.until("idle after the skip", lambda: tc.daemon_status(root)["state"] == "idle")
    # skip kept the steps trained on b.jsonl: current_model moved past the version before it
    assert_different_weights(weights(root / "current_model"),
                             weights(root / "versions" / record["version_before"]))
    assert step_of(root) >= 3

    # kill -9 (not reaped yet: a zombie): status says dead as soon as the kernel has torn the
    # process down (its lock released; under load that can take longer than a fixed sleep),
    # and nothing is training
    d.proc.kill()
    deadline = time.monotonic() + 30  # (no d.until: its poll() would reap the zombie)
    while tc.daemon_status(root)["alive"] and time.monotonic() < deadline:
        time.sleep(0.05)
    st = tc.daemon_status(root)
    assert (st["alive"], st["state"], st["reported_state"], st["last_pid"]) == \
        (False, "dead", "idle", d.proc.pid)
    assert tc.is_training(root) is False
    assert d.wait() == -9


def test_commands_printed_for_a_root_given_with_root_carry_it(initialized_root):
    """Pasted from another folder, the commands a message names must act on the same root:
    the controller's own lines, its status rows, and every script's `Error:` fix."""
    root = initialized_root
    env = {"TRAINING_ROOT": ""}
    pause = run_script("training_controller.py", "pause", "--root", str(root), env=env)
    assert pause.stdout.strip().endswith(
        f"undo it with `python3 training_controller.py resume --root {root}`"), pause.stdout
    status = run_script("training_controller.py", "status", "--root", str(root), env=env)
    assert f"clear it with `python3 training_controller.py resume --root {root}`" in status.stdout
    init = run_script("training_daemon.py", "init", "--root", str(root), env=env)
    assert init.returncode == 1
    assert f"`python3 state_tracker.py --check --root {root}`" in init.stderr, init.stderr
    # from the root's own variable, the same lines stay short
    pause = run_script("training_controller.py", "pause", root=root)
    assert "--root" not in pause.stdout, pause.stdout
