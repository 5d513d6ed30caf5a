"""The control plane against hostile roots and inputs: no traceback, the SPEC's exit codes,
one JSON document under --json, errors that name what, where and the fixing command.

Each test builds a broken root by hand (no model needed) and runs the real command, in
this process through `main([...])` or in a fresh interpreter where a terminal, a port or
argument parsing matters.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

import monitor_server
import state_tracker
import training_config
import training_controller as tc
import trainroot
from conftest import REPO, run_script

SCHEMA = json.loads((REPO / "docs" / "system_state.schema.json").read_text())


@pytest.fixture
def root(tmp_root) -> Path:
    """A root with an approved default config and its folders (no model)."""
    cfg = training_config.default_config()
    training_config.write_config(tmp_root, cfg)
    training_config.approve(tmp_root, cfg)
    trainroot.Paths(tmp_root).ensure()
    return tmp_root


def run(main, capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_json(text: str) -> dict:
    """Exactly one strict JSON document (no NaN: browsers and jq reject it)."""
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=no_constants)


def state_doc(capsys, root: Path) -> dict:
    code, out, err = run(state_tracker.main, capsys, "--json", "--root", str(root))
    assert code in (0, 1), err
    doc = one_json(out)
    jsonschema.validate(doc, SCHEMA)
    return doc


# --------------------------------------------------------------------------- damaged state files

HAND_EDITED_STATE = {"pid": True, "state": 5, "heartbeat": 12, "started_at": [], "paused_since": 3,
                     "paused_reason": 5, "current_file": ["a.jsonl"], "progress": [1],
                     "last_error": {"code": 7}}


def test_status_survives_a_daemon_state_with_wrong_types(root, capsys):
    (root / ".daemon_state.json").write_text(json.dumps(HAND_EDITED_STATE))
    code, out, _ = run(tc.main, capsys, "status", "--json")
    st = one_json(out)
    assert code == 0 and st["alive"] is False and st["last_pid"] is None  # `true` is no pid
    assert st["current_file"] is None and st["progress"] is None
    code, out, _ = run(tc.main, capsys, "status")
    assert code == 0 and "state" in out


def test_state_tracker_types_a_hand_edited_daemon_state(root, capsys):
    (root / ".daemon_state.json").write_text(json.dumps(HAND_EDITED_STATE))
    (root / "metrics.jsonl").write_text(
        'garbage\n[1, 2]\n{"global_step": 3, "loss": 2.0, "file": 5, "time": 7}\n{"global_st')
    doc = state_doc(capsys, root)
    assert doc["daemon"]["last_pid"] is None and doc["training"]["reported_state"] is None
    assert doc["loss"]["last_step"] == 3 and doc["loss"]["last_file"] is None
    code, out, err = run(state_tracker.main, capsys, "--check", "--root", str(root))
    assert code in (0, 1) and "training" in out, err


def test_state_tracker_survives_a_corrupt_manifest_and_shard_index(root, capsys):
    cm = root / "current_model"
    cm.mkdir()
    (cm / "config.json").write_text("{}")
    (cm / ".manifest.json").write_text('{"files": {"config.json": 5, "b": {"size": "x"}}}')
    (cm / "model.safetensors.index.json").write_text('{"weight_map": {"a": 5, "b": null}}')
    (cm / "trainer_state.json").write_text('{"global_step": "7", "tokens_seen": [1]}')
    doc = state_doc(capsys, root)
    assert doc["current_model"]["complete"] is False
    assert doc["current_model"]["global_step"] is None
    assert any(w["code"] == "MODEL_INCOMPLETE" for w in doc["warnings"])
    (cm / ".manifest.json").unlink()  # files are then listed from the folder, index included
    (cm / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    doc = state_doc(capsys, root)
    assert any("weight_map" in p for p in doc["current_model"]["problems"])


def test_state_tracker_survives_backup_records_with_wrong_types(root, capsys):
    b1, b2, b3 = (f"b20260101T00000{i}-000{i}" for i in (1, 2, 3))
    for bid, rec in ((b1, '[1]'), (b2, '{"status": "verified", "created_at": 5}'),
                     (b3, '{"status": "verified", "created_at": "2026-01-01T00:00:00.000000Z"}')):
        (root / "backups" / bid).mkdir(parents=True)
        (root / "backups" / bid / "backup.json").write_text(rec)
    (root / "backups" / "notes").mkdir()  # not a backup id: listed by neither command
    doc = state_doc(capsys, root)
    assert doc["backups"]["count"] == 3 and doc["backups"]["latest"]["id"] == b3


def test_files_where_folders_should_be_are_reported_not_fatal(root, capsys):
    import shutil
    for name in (".locks", "control", "versions"):
        shutil.rmtree(root / name)
        (root / name).write_text("not a folder")
    (root / "metrics.jsonl").mkdir()
    code, out, err = run(tc.main, capsys, "status", "--json")
    assert code == 0 and one_json(out)["alive"] is False, err
    state_doc(capsys, root)
    code, out, err = run(tc.main, capsys, "pause", "--json")
    assert code == 1 and one_json(out)["ok"] is False
    control = str(root / "control")
    assert err.startswith(f"Error: expected a folder, found a file, {control}. ")
    assert f"`mv {shlex.quote(control)} " in err and (root / "control").read_text() == "not a folder"


def test_resume_keeps_the_pause_when_acks_is_not_a_folder(root, capsys):
    code, out, _ = run(tc.main, capsys, "pause", "--json")
    kept = one_json(out)["request"]["id"]
    (root / "control" / "acks").write_text("x")
    code, out, err = run(tc.main, capsys, "resume", "--json")
    assert code == 1 and "expected a folder, found a file" in err
    # the kept pause is still there, not claimed and left without an acknowledgement
    assert [r["id"] for r in tc.pending_requests(root, move_aside=False)] == [kept]


def test_a_corrupt_acknowledgement_does_not_crash_wait(root):
    req = tc.submit_request(root, "pause")
    acks = root / "control" / "acks"
    acks.mkdir(parents=True, exist_ok=True)
    for junk in ("[]", '{"id": "x"}', '{"outcome": 5}'):
        (acks / f"{req['id']}.json").write_text(junk)
        res = tc.wait_for(root, req, 0.2, {"ok": True, "action": "pause", "request": req})
        assert res["outcome"] == "kept"  # no daemon: the pause stays for its next start


# --------------------------------------------------------------------------- daemon liveness

def _dead_daemon_state(pid: int, **fields) -> dict:
    """The state file a daemon left when it died: this boot, a heartbeat written just now."""
    return {"pid": pid, "state": "training", "heartbeat": trainroot.utc_now(),
            "started_at": trainroot.utc_now(), "boot_id": trainroot.boot_id(),
            "heartbeat_clock": trainroot.boot_clock(), **fields}


@pytest.fixture
def stranger():
    """A live process that is not the daemon: say the system gave it the dead daemon's pid."""
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_pid_reused_after_the_daemon_died_is_not_alive(root, capsys, stranger):
    start = trainroot.process_start(stranger.pid)
    assert isinstance(start, int)
    # The dead daemon recorded its own start; the pid's new owner started at another tick.
    (root / ".daemon_state.json").write_text(json.dumps(
        _dead_daemon_state(stranger.pid, proc_start=start - 1)))
    assert tc.daemon_status(root)["alive"] is False
    assert tc.daemon_status(root)["state"] == "dead"
    doc = state_doc(capsys, root)
    assert doc["daemon"]["alive"] is False and doc["training"]["state"] == "dead"
    assert tc.request(root, "stop")["outcome"] == "nothing"  # nothing written for a stranger
    assert not list((root / "control").glob("*.request.json"))
    # The same process (its recorded start) with a fresh heartbeat is the daemon, even
    # without its lock to read (someone deleted .locks/): no clock is involved.
    (root / ".daemon_state.json").write_text(json.dumps(
        _dead_daemon_state(stranger.pid, proc_start=start)))
    assert tc.daemon_status(root)["alive"] is True
    assert state_doc(capsys, root)["daemon"]["alive"] is True


def test_a_pid_reused_is_told_from_an_older_state_without_the_identity(root, capsys, stranger):
    # A state written by an older daemon has only wall-clock times. Its pid's new owner
    # started 5 s after the heartbeat: beyond btime's 1 s rounding plus 1 s of slack
    # (the test used to allow 1.2 s, and failed by chance when create_time read early).
    beat = time.time() - 5.0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(beat)) + f".{int(beat % 1 * 1e6):06d}Z"
    (root / ".daemon_state.json").write_text(json.dumps(
        {"pid": stranger.pid, "state": "training", "heartbeat": stamp, "started_at": stamp}))
    assert tc.daemon_status(root)["alive"] is False
    assert state_doc(capsys, root)["daemon"]["alive"] is False


def test_a_heartbeat_is_aged_by_the_boot_clock_not_the_wall_clock(root, capsys, stranger):
    start = trainroot.process_start(stranger.pid)
    # The wall clock was stepped a day back after the heartbeat was written (NTP, a VM
    # resume): its wall time lies in the future, its boot clock says 1 s ago.
    doc = _dead_daemon_state(stranger.pid, proc_start=start,
                             heartbeat="2099-01-01T00:00:00.000000Z",
                             heartbeat_clock=trainroot.boot_clock() - 1.0)
    (root / ".daemon_state.json").write_text(json.dumps(doc))
    st = tc.daemon_status(root)
    assert st["alive"] is True and st["responsive"] is True
    assert 0.5 < st["heartbeat_age_s"] < 30
    # A heartbeat written in another boot vouches for nothing, whatever its times say.
    (root / ".daemon_state.json").write_text(json.dumps(dict(doc, boot_id="another-boot")))
    assert tc.daemon_status(root)["alive"] is False


def test_the_controller_and_the_tracker_agree_on_a_killed_idle_daemon(root, capsys):
    other = subprocess.Popen(["sleep", "30"])
    pid = other.pid
    other.kill()
    other.wait()  # gone: an idle daemon killed with -9 leaves its last state behind
    (root / ".daemon_state.json").write_text(json.dumps(_dead_daemon_state(pid, state="idle")))
    assert tc.daemon_status(root)["state"] == "dead"
    assert state_doc(capsys, root)["training"]["state"] == "dead"
    (root / ".daemon_state.json").write_text(json.dumps(_dead_daemon_state(pid, state="stopped")))
    assert tc.daemon_status(root)["state"] == "stopped"
    assert state_doc(capsys, root)["training"]["state"] == "stopped"


def test_a_heartbeat_from_the_future_does_not_make_pid_1_a_daemon(root, capsys):
    (root / ".daemon_state.json").write_text(json.dumps(
        {"pid": 1, "state": "training", "heartbeat": "2099-01-01T00:00:00.000000Z"}))
    st = tc.daemon_status(root)
    assert st["alive"] is False and st["state"] == "dead"


# --------------------------------------------------------------------------- roots and arguments

def test_status_refuses_a_root_that_is_missing_a_file_or_empty(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    empty = tmp_path / "empty dir"
    empty.mkdir()
    for bad, what in ((tmp_path / "nope", "no such folder"), (afile, "a file, not a folder"),
                      (empty, "no config.json, current_model/ or versions/")):
        code, out, err = run(tc.main, capsys, "status", "--json", "--root", str(bad))
        assert code == 1 and one_json(out)["ok"] is False
        assert err.startswith(f"Error: not a training root ({what}), {bad}.")
        assert "--root" in err
    assert err.count(f"--root {shlex.quote(str(empty))}`") == 1  # pasteable: quoted
    assert os.listdir(empty) == []  # status wrote nothing into a folder that is no root


def test_state_tracker_on_a_root_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    doc = state_doc(capsys, afile)
    assert [w["code"] for w in doc["warnings"]] == ["NOT_INITIALIZED"]
    assert "is a file" in doc["warnings"][0]["message"]
    code, out, err = run(state_tracker.main, capsys, "--root", str(afile))
    assert code == 1 and "is a file, not a folder" in err and "--root DIR" in err
    assert afile.read_text() == "keep me"


def test_state_tracker_refresh_of_a_missing_root_names_init(tmp_path, capsys):
    missing = tmp_path / "no root"
    code, _, err = run(state_tracker.main, capsys, "--root", str(missing))
    assert code == 1
    assert err.startswith(f"Error: cannot write the state file: the training root does not exist, {missing}.")
    assert f"`python3 training_daemon.py init --root {shlex.quote(str(missing))}`" in err
    assert not missing.exists()


@pytest.mark.parametrize("value", ["-1", "nan", "-inf"])
def test_wait_rejects_negative_and_nan(root, capsys, value):
    code, out, err = run(tc.main, capsys, "pause", "--json", f"--wait={value}")
    assert code == 2 and one_json(out)["ok"] is False
    assert "argument --wait: expected seconds (a number >= 0)" in err
    assert not list((root / "control").glob("*.request.json"))  # nothing was requested


@pytest.mark.parametrize("changed", [True, False])
def test_approve_config_with_stdin_closed(root, changed):
    """`approve-config <&-` (no stdin at all, as under some service managers): sys.stdin is
    None, which must read as "nobody to ask", not crash."""
    cfg = training_config.default_config(learning_rate=0.001 if changed else 0.0003)
    training_config.write_config(root, cfg)
    proc = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", sys.executable,
                           str(REPO / "training_controller.py"), "approve-config", "--json",
                           "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr
    doc = one_json(proc.stdout)
    if changed:
        assert proc.returncode == 1 and doc["error"]["what"] == \
            "approval not confirmed (learning_rate: 0.0003 -> 0.001)"
        assert doc["error"]["fix"] == ("Read the changes, then run "  # given --root: it carries it
                                       f"`python3 training_controller.py approve-config --yes --root {root}`.")
        assert training_config.changed_locked(root, cfg)  # still not approved
    else:
        assert proc.returncode == 0 and doc["approved"] is False and doc["changes"] == []


def test_approve_config_with_a_folder_as_the_approval_record(root, capsys):
    training_config.write_config(root, training_config.default_config(learning_rate=0.001))
    lock = root / ".config.lock"
    lock.unlink()
    lock.mkdir()
    (lock / "keep").write_text("x")
    code, out, err = run(tc.main, capsys, "approve-config", "--yes", "--json")
    assert code == 1 and one_json(out)["error"]["where"] == str(lock)
    assert err.startswith(f"Error: the approval record is not a file, {lock}. Move it aside")
    assert (lock / "keep").read_text() == "x"


# --------------------------------------------------------------------------- monitor

def test_monitor_rejects_a_port_out_of_range_without_a_traceback(root):
    proc = run_script("monitor_server.py", "serve", "--port", "99999", root=root, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "argument --port: expected a port 0..65535, got '99999'" in proc.stderr


def get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, one_json(resp.read())
    finally:
        conn.close()


def test_monitor_serves_strict_json_for_nan_metrics_and_a_folder_as_metrics(root):
    (root / "metrics.jsonl").write_text(
        '{"global_step": 1, "loss": 2.5, "file": "a.jsonl"}\n'
        '{"global_step": 2, "loss": NaN, "lr": Infinity, "file": "a.jsonl"}\n'
        '{"global_step": 3, "loss": 1e999, "file": "a.jsonl"}\n')
    handle = monitor_server.start_in_thread(root, 0, idle_priority=False, max_rate=None)
    try:
        status, doc = get(handle.port, "/api/metrics")
        assert status == 200
        assert [(p["global_step"], p["loss"], p["lr"]) for p in doc["points"]] == \
            [(1, 2.5, None), (2, None, None), (3, None, None)]
        (root / "metrics.jsonl").unlink()
        (root / "metrics.jsonl").mkdir()
        status, doc = get(handle.port, "/api/metrics?since=0")
        assert status == 200 and doc["lines"] == 0 and doc["points"] == []
        status, doc = get(handle.port, "/api/state")
        assert status == 200 and doc["schema_version"] == 1
    finally:
        handle.stop()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_state_tracker_warns_when_a_configured_root_has_no_model_and_no_version(root, capsys, kind):
    if kind == "file":
        (root / "current_model").write_text("not a model")
    doc = state_doc(capsys, root)
    assert doc["ok"] is False
    (warning,) = [w for w in doc["warnings"] if w["code"] == "MODEL_MISSING"]
    assert warning["severity"] == "critical"
    q = shlex.quote(str(root))
    if kind == "file":
        assert warning["message"] == ("current_model/ is not a folder and there is no version to "
                                      "restore it from")
        assert warning["fix"] == (f"mv {shlex.quote(str(root / 'current_model'))} "
                                  f"{shlex.quote(str(root / 'current_model.moved-aside'))} && "
                                  f"python3 training_daemon.py init --root {q}")
        assert (root / "current_model").read_text() == "not a model"
    else:
        assert warning["fix"] == f"python3 training_daemon.py init --root {q}"


def test_fifos_in_place_of_state_files_do_not_hang_status_or_the_tracker(root, capsys):
    """A FIFO (or a symlink to one) blocks a plain read forever: both must answer."""
    os.mkfifo(root / "control" / "x.request.json")
    os.mkfifo(root / ".daemon_state.json")
    os.mkfifo(root / "control" / "fifo")
    os.symlink("fifo", root / "control" / "y.request.json")
    (root / ".config.lock").unlink()
    os.mkfifo(root / ".config.lock")
    proc = run_script("training_controller.py", "status", "--json", root=root, timeout=20)
    st = one_json(proc.stdout)
    assert proc.returncode == 0 and st["alive"] is False
    assert "not a regular file" in st["state_file_error"]
    proc = run_script("state_tracker.py", "--json", root=root, timeout=20)
    doc = one_json(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    codes = {w["code"] for w in doc["warnings"]}
    assert {"DAEMON_STATE_UNREADABLE", "CONFIG_UNAPPROVED"} <= codes  # the lock approves nothing
    code, out, _ = run(tc.main, capsys, "resume", "--json")  # moves both aside, keeps them
    assert code == 0 and one_json(out)["outcome"] == "nothing"
    assert sorted(n for n in os.listdir(root / "control" / "rejected")
                  if not n.endswith(".error.txt")) == ["x.request.json", "y.request.json"]


def test_the_inbox_count_matches_what_the_queue_and_the_daemon_count(root, capsys):
    """A dangling link and a pipe in inbox/ are taken by the daemon (to failed/ with the
    reason), so the report counts them, as `training_queue.py status` does; a folder is not."""
    import training_queue
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    (inbox / "a.jsonl").write_text('{"text": "a"}\n')
    os.symlink("gone.jsonl", inbox / "dangling.jsonl")
    os.mkfifo(inbox / "pipe.jsonl")
    (inbox / "folder").mkdir()
    doc = state_doc(capsys, root)
    assert doc["queue"]["inbox"] == training_queue.counts(root)["inbox"] == 3


def test_a_fifo_in_place_of_metrics_jsonl_does_not_hang_the_report(root):
    """The monitor's /api/state comes from the same report: one FIFO must not hang both."""
    os.mkfifo(root / "metrics.jsonl")
    proc = run_script("state_tracker.py", "--json", root=root, timeout=20)
    assert proc.returncode in (0, 1), proc.stderr
    jsonschema.validate(one_json(proc.stdout), SCHEMA)


def test_a_model_folder_given_as_the_root_is_refused_and_nothing_is_written_there(initialized_root):
    """`--root ROOT/current_model` (an easy slip): its config.json is the model's, so it
    once passed for a root; read-only commands wrote .index/ and .system_state.json into
    current_model/, and the next snapshot versioned them."""
    root = initialized_root
    for folder in (root / "current_model", root / "versions" / "v001"):
        before = sorted(p.name for p in folder.rglob("*"))
        for script, *args in (("model_versioner.py", "list"), ("state_tracker.py",),
                              ("training_controller.py", "status"), ("training_queue.py", "status"),
                              ("backup_manager.py", "list")):
            proc = run_script(script, *args, "--root", str(folder))
            assert proc.returncode == 1, (script, proc.stdout, proc.stderr)
            assert f"a model folder of the training root {root}" in proc.stderr, proc.stderr
            assert f"--root {root}" in proc.stderr
        state = state_tracker.build_state(folder)
        w = {x["code"]: x for x in state["warnings"]}["NOT_INITIALIZED"]
        assert w["fix"] == f"python3 state_tracker.py --check --root {root}"
        assert sorted(p.name for p in folder.rglob("*")) == before
    assert state_tracker.build_state(root)["ok"] is True
