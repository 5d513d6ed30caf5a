"""Scenario tests: the promise, lived with for months, as a person and an assistant would.

Each test is one realistic story on a real training root, driven only through the
documented commands (`python3 SCRIPT ...` in a fresh interpreter, real daemons, real
signals, a real full disk), checking after every step that nothing is lost and that every
mistake is undone within a minute of commands. Setup (config tuning for speed) goes through
training_config as tests/test_training_daemon.py's `tune()` does: a person editing the file
and approving it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script
from realdaemon import (RealDaemon, assert_same_weights, controller, daemon_fixture, drop,
                        lifecycle_files, record, set_config, step_of, weights)

pytestmark = pytest.mark.slow

FAST = {"settle_seconds": 0.25, "rescan_seconds": 0.5, "max_length": 32, "batch_size": 2,
        "checkpoint_every_steps": 1, "monitor_port": 0, "backup_every_files": 0,
        "backup_every_hours": 0, "loss_spike_factor": 0.0, "warmup_steps": 2,
        "num_threads": 1}  # same threads everywhere: bitwise-equal weights on CPU

LIFECYCLE = ("inbox", "inbox/high", "inbox/low", "queue/high", "queue/normal", "queue/low",
             "processing", "done", "failed", "skipped")

daemons = daemon_fixture(RealDaemon)


# --------------------------------------------------------------------------- helpers

def tune(root: Path, **over) -> dict:
    return set_config(root, **{**FAST, **over})


def new_root(path: Path, tiny_model_dir: Path, **over) -> Path:
    import training_daemon
    path.mkdir(parents=True, exist_ok=True)
    training_daemon.init_root(path, base=str(tiny_model_dir))
    tune(path, **over)
    return path


def sh(root: Path, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A documented command line (`python3 X.py ...`) as a person types it, from the repo."""
    line = command.replace("python3 ", shlex.quote(sys.executable) + " ", 1)
    return subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TRAINING_ROOT=str(root)))


def ok(root: Path, command: str) -> subprocess.CompletedProcess:
    proc = sh(root, command)
    assert proc.returncode == 0, f"{command} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def tracker(root: Path) -> dict:
    proc = sh(root, "python3 state_tracker.py --json")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def codes(doc: dict) -> set[str]:
    return {w["code"] for w in doc["warnings"]}


def warning(doc: dict, code: str) -> dict:
    found = [w for w in doc["warnings"] if w["code"] == code]
    assert found, f"no {code} among {codes(doc)}"
    return found[0]


def run_once(root: Path) -> subprocess.CompletedProcess:
    return run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root,
                      timeout=180)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_files(root: Path) -> dict[str, list[str]]:
    return lifecycle_files(root, LIFECYCLE, hidden=False)


def metric_steps(root: Path) -> list[int]:
    return [json.loads(line)["global_step"]
            for line in (root / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loads(model_dir: Path) -> None:
    """current_model loads with from_pretrained, as the promise says it always does."""
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)


def newest_verified_backup(root: Path) -> dict:
    doc = json.loads(ok(root, "python3 backup_manager.py list --json").stdout)
    good = [b for b in doc["backups"] if b.get("status") == "verified"]
    assert good, doc
    return good[-1]


def wait_until(what: str, check, timeout: float = 60, daemon: RealDaemon | None = None):
    if daemon is not None:
        return daemon.until(what, check, timeout)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def daemon_state(root: Path) -> dict:
    try:
        return json.loads((root / ".daemon_state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def train_two_files(root: Path) -> dict:
    """Weeks of training, in miniature: a.jsonl then b.jsonl, trained with `run --once`."""
    drop(root, "a.jsonl", seed=1, lines=10)
    drop(root, "b.jsonl", seed=2, lines=10)
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"done": ["a.jsonl", "b.jsonl"]}
    return {"a": record(root / "done" / "a.jsonl"), "b": record(root / "done" / "b.jsonl")}


# --------------------------------------------------------------------------- 1. rm -rf

def test_model_and_versions_deleted_come_back_from_a_backup_with_global_step_intact(
        initialized_root):
    """Weeks of training, a backup as CLAUDE.md says, then `rm -rf current_model versions`
    while the daemon is stopped. The tracker says it is critical and points at the backups;
    restoring the newest verified one and snapshotting it (the 'Corrupt file' row's steps)
    brings the model back bitwise, global_step intact, in well under a minute, and the next
    file trains on from it."""
    root = initialized_root
    train_two_files(root)
    ok(root, "python3 backup_manager.py backup --note 'before cleaning up'")
    step, before = step_of(root), weights(root / "current_model")
    assert step > 0

    subprocess.run(["rm", "-rf", str(root / "current_model"), str(root / "versions")], check=True)

    check = sh(root, "python3 state_tracker.py --check")
    assert check.returncode == 1, check.stdout
    doc = tracker(root)
    assert doc["current_model"]["exists"] is False and doc["versions"]["count"] == 0
    missing = warning(doc, "MODEL_MISSING")
    assert missing["severity"] == "critical"
    assert "backup_manager.py" in (missing["fix"] + (missing.get("note") or ""))

    t0 = time.monotonic()
    bid = newest_verified_backup(root)["id"]
    restore = ok(root, f"python3 backup_manager.py restore {bid}")
    ok(root, "python3 model_versioner.py snapshot --note 'restored from backup'")
    ok(root, "python3 model_versioner.py verify latest")
    ok(root, "python3 training_controller.py resume")  # nothing to resume: fine (CLAUDE.md)
    elapsed = time.monotonic() - t0
    assert elapsed < 60, elapsed
    assert bid in restore.stdout

    assert step_of(root) == step
    assert_same_weights(weights(root / "current_model"), before)
    loads(root / "current_model")
    doc = tracker(root)
    assert doc["ok"] is True, doc["warnings"]
    assert doc["current_model"]["global_step"] == step
    assert doc["current_model"]["matches_version"] == doc["versions"]["latest"]
    assert data_files(root) == {"done": ["a.jsonl", "b.jsonl"]}  # no data file lost

    drop(root, "c.jsonl", seed=3, lines=10)
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    rec = record(root / "done" / "c.jsonl")
    assert rec["global_step_before"] == step and step_of(root) == rec["global_step_after"] > step


def test_following_the_trackers_fix_commands_after_rm_rf_keeps_the_training(initialized_root):
    """The assistant does what CLAUDE.md §1 says: read the tracker, run each critical
    warning's fix. That must bring the trained model back, not a new random one."""
    root = initialized_root
    train_two_files(root)
    ok(root, "python3 backup_manager.py backup --note 'weekly'")
    step = step_of(root)
    subprocess.run(["rm", "-rf", str(root / "current_model"), str(root / "versions")], check=True)

    for _ in range(4):
        doc = tracker(root)
        critical = [w for w in doc["warnings"] if w["severity"] == "critical"]
        if not critical:
            break
        assert sh(root, critical[0]["fix"]).returncode == 0, critical[0]
    assert tracker(root)["ok"] is True
    assert step_of(root) == step, "the tracker's fix replaced the trained model"


def test_claude_md_model_deleted_row_names_the_backup_when_versions_are_gone(initialized_root):
    root = initialized_root
    ok(root, "python3 backup_manager.py backup")
    subprocess.run(["rm", "-rf", str(root / "current_model"), str(root / "versions")], check=True)
    proc = sh(root, "python3 model_versioner.py restore latest")
    if proc.returncode != 0:  # failing is fine, if it names the command that does fix it
        assert "backup_manager.py restore" in proc.stderr, proc.stderr
    else:
        assert (root / "current_model").is_dir()


def test_backup_every_file_backs_up_every_trained_version(initialized_root):
    root = initialized_root
    tune(root, backup_every_files=1)
    recs = train_two_files(root)
    backed_up = {b.get("version") for b in
                 json.loads(ok(root, "python3 backup_manager.py list --json").stdout)["backups"]
                 if b.get("status") == "verified"}
    assert {recs["a"]["version_after"], recs["b"]["version_after"]} <= backed_up


# --------------------------------------------------------------------------- 2. bad data

def test_bad_data_file_rolled_back_then_training_goes_on_and_the_rollback_is_undoable(
        initialized_root):
    root = initialized_root
    recs = train_two_files(root)
    bad = recs["b"]                       # loss fine, but the user says b.jsonl was wrong
    trained_b = weights(root / "current_model")
    step_b = step_of(root)

    ok(root, "python3 state_tracker.py --check")
    t0 = time.monotonic()
    rb = ok(root, "python3 model_versioner.py rollback")
    assert time.monotonic() - t0 < 60
    assert_same_weights(weights(root / "current_model"),
                        weights(root / "versions" / bad["version_before"]))
    assert step_of(root) == bad["global_step_before"] == recs["a"]["global_step_after"]
    assert (root / "done" / "b.jsonl").exists() and sha(root / "done" / "b.jsonl") == bad["sha256"]
    doc = tracker(root)
    assert doc["ok"] and doc["current_model"]["matches_version"] == bad["version_before"]

    # the rollback itself is undone with the command it printed
    undo = [ln for ln in rb.stdout.splitlines() if "Undo with" in ln]
    assert undo, rb.stdout
    undo_cmd = undo[0].split("`")[1]
    ok(root, undo_cmd)
    assert_same_weights(weights(root / "current_model"), trained_b)
    assert step_of(root) == step_b
    # ... and done again: the user really wants b gone
    ok(root, "python3 model_versioner.py rollback")
    assert_same_weights(weights(root / "current_model"),
                        weights(root / "versions" / bad["version_before"]))

    # the next file continues from the version before b, not from b
    drop(root, "c.jsonl", seed=3, lines=10)
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    c = record(root / "done" / "c.jsonl")
    assert c["global_step_before"] == bad["global_step_before"]
    lineage = ok(root, f"python3 model_versioner.py lineage {c['version_after']} --json").stdout
    assert "a.jsonl" in lineage and "c.jsonl" in lineage and "b.jsonl" not in lineage
    assert data_files(root) == {"done": ["a.jsonl", "b.jsonl", "c.jsonl"]}


# --------------------------------------------------------------------------- 3. kill -9 twice

def test_kill_9_twice_mid_file_trains_it_exactly_once_like_an_uninterrupted_run(
        initialized_root, tiny_model_dir, tmp_path, daemons):
    root = initialized_root
    tune(root)
    drop(root, "long.jsonl", seed=5, lines=40)
    twin = new_root(tmp_path / "twin", tiny_model_dir)
    (twin / "inbox" / "long.jsonl").write_bytes((root / "inbox" / "long.jsonl").read_bytes())
    reference = daemons(twin, "--once")   # never interrupted, runs alongside

    d = daemons(root)
    first = d.training_step("long.jsonl", 3)["global_step"]
    d.proc.kill()
    d.wait()
    assert data_files(root) == {"processing": ["long.jsonl"]}
    loads(root / "current_model")
    doc = tracker(root)
    assert doc["daemon"]["alive"] is False and "DAEMON_DEAD" in codes(doc)

    d = daemons(root)  # "python3 training_daemon.py run", as the DAEMON_DEAD fix says
    d.until("a step past the first kill", lambda: (
        (s := metric_steps(root)) and s[-1] >= first + 3 and s[-1]))
    d.proc.kill()
    d.wait()
    assert data_files(root) == {"processing": ["long.jsonl"]}
    loads(root / "current_model")

    d = daemons(root, "--once")
    assert d.wait() == 0, d.output()
    assert reference.wait() == 0, reference.output()
    assert data_files(root) == {"done": ["long.jsonl"]}
    rec, twin_rec = record(root / "done" / "long.jsonl"), record(twin / "done" / "long.jsonl")
    assert rec["steps"] == twin_rec["steps"] > first + 3
    assert step_of(root) == step_of(twin)
    assert_same_weights(weights(root / "current_model"), weights(twin / "current_model"))
    assert metric_steps(twin) == list(range(1, step_of(twin) + 1))
    steps = metric_steps(root)
    assert len(steps) == len(set(steps)) and steps == sorted(steps), "a global_step twice"
    # each step's line is written before its checkpoint: no kill can lose one
    assert steps == list(range(1, step_of(root) + 1))


# --------------------------------------------------------------------------- 4. config edit

def edit_config_by_hand(root: Path, **values) -> None:
    """A person opens config.json in an editor and changes values (no approval)."""
    path = root / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def test_locked_parameter_edited_while_the_daemon_runs(initialized_root, daemons):
    root = initialized_root
    cfg = tune(root)
    old_lr = cfg["learning_rate"]
    d = daemons(root)
    d.until("daemon ready", lambda: daemon_state(root).get("pid") == d.proc.pid)

    edit_config_by_hand(root, learning_rate=old_lr * 10)
    change = f"learning_rate: {old_lr} -> {old_lr * 10}"
    drop(root, "one.jsonl", seed=1, lines=10)
    st = d.until("paused for the config", lambda: (
        (s := daemon_state(root)).get("state") == "paused" and s))
    said = (st.get("paused_reason") or "") + (st.get("last_error") or "")
    assert change in said and "training_controller.py approve-config" in said, said
    assert not (root / "done" / "one.jsonl").exists() and step_of(root) == 0
    doc = tracker(root)
    w = warning(doc, "CONFIG_UNAPPROVED")
    assert w["severity"] == "critical" and change in w["message"]
    assert "approve-config" in w["fix"]
    warn = sh(root, "python3 state_tracker.py --warnings")
    assert warn.returncode == 1 and change in warn.stdout

    # the user approves the new value
    approve = ok(root, "python3 training_controller.py approve-config --yes")
    assert change in approve.stdout
    ok(root, "python3 training_controller.py resume --wait 60")
    d.until("one.jsonl done", lambda: (root / "done" / "one.jsonl.record.json").exists())
    assert json.loads((root / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == \
        pytest.approx(old_lr * 10)

    # next time the edit is reverted instead of approved
    edit_config_by_hand(root, max_length=64)
    drop(root, "two.jsonl", seed=2, lines=10)
    d.until("paused again", lambda: "max_length: 32 -> 64" in (
        daemon_state(root).get("paused_reason") or ""))
    edit_config_by_hand(root, max_length=32)
    ok(root, "python3 training_controller.py resume --wait 60")
    d.until("two.jsonl done", lambda: (root / "done" / "two.jsonl.record.json").exists())
    assert tracker(root)["config"]["approved"] is True
    ok(root, "python3 training_controller.py stop --wait 60")
    assert d.wait() == 0
    assert data_files(root) == {"done": ["one.jsonl", "two.jsonl"]}


# --------------------------------------------------------------------------- 5. disk full

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs, unmounted afterwards (skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem of `path` until `leave` bytes are free (again: the daemon frees
    an old checkpoint after writing a new one, so a caller tops it up until it pauses)."""
    filler = path / "filler.bin"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(filler, "ab", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        remaining = max(0, free - leave)
        try:
            while remaining > 0:
                n = min(remaining, len(chunk))
                f.write(chunk[:n])
                remaining -= n
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:  # the daemon took the rest meanwhile: full is what we want
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_disk_fills_mid_file_pauses_then_resumes_exactly(small_disk, tiny_model_dir, tmp_path,
                                                         daemons):
    root = new_root(small_disk / "root", tiny_model_dir, min_free_disk_mb=1)
    twin = new_root(tmp_path / "twin", tiny_model_dir)
    drop(root, "long.jsonl", seed=7, lines=120)
    (twin / "inbox" / "long.jsonl").write_bytes((root / "inbox" / "long.jsonl").read_bytes())
    reference = daemons(twin, "--once")

    d = daemons(root)
    d.training_step("long.jsonl", 3)
    # less than one checkpoint (~1.6 MB) free, kept so until the daemon pauses
    st = d.until("paused for the disk", lambda: (
        (s := daemon_state(root)).get("state") == "paused" and s
        or fill(small_disk, leave=200 << 10) and None), timeout=60)
    filler = small_disk / "filler.bin"
    assert "disk" in (st.get("paused_reason") or "").lower(), st
    loads(root / "current_model")
    assert data_files(root) == {"processing": ["long.jsonl"]}
    doc = tracker(root)
    assert doc["training"]["state"] == "paused"
    assert {"DISK_LOW"} <= codes(doc), codes(doc)
    paused_at = step_of(root)
    time.sleep(0.5)
    assert step_of(root) == paused_at

    filler.unlink()
    ok(root, "python3 training_controller.py resume --wait 60")
    d.until("long.jsonl done", lambda: (root / "done" / "long.jsonl.record.json").exists())
    ok(root, "python3 training_controller.py stop --wait 60")
    assert d.wait() == 0, d.output()
    assert reference.wait() == 0, reference.output()
    loads(root / "current_model")
    assert step_of(root) == step_of(twin)
    assert_same_weights(weights(root / "current_model"), weights(twin / "current_model"))
    assert metric_steps(root) == list(range(1, step_of(root) + 1))
    assert sh(root, "python3 model_versioner.py verify --all").returncode == 0


# --------------------------------------------------------------------------- 6. amnesia

def test_a_fresh_shell_learns_everything_from_state_tracker_json(initialized_root, daemons):
    """After a busy session (files in every lifecycle folder, a daemon stopped mid-file),
    `state_tracker.py --json` alone, from a fresh shell, tells the truth."""
    root = initialized_root
    tune(root)
    drop(root, "good.jsonl", seed=1, lines=10)
    (root / "inbox" / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "inbox" / "notes.txt").write_text("not data\n")
    assert run_once(root).returncode == 0
    (root / "inbox" / "again.jsonl").write_bytes((root / "done" / "good.jsonl").read_bytes())
    drop(root, "a_long.jsonl", seed=2, lines=400)
    drop(root, "b_later.jsonl", seed=3, lines=10)   # queued behind a_long.jsonl
    d = daemons(root)
    d.training_step("a_long.jsonl", 2)
    ok(root, "python3 training_controller.py stop --wait 60")
    assert d.wait() == 0
    drop(root, "new.jsonl", seed=4, lines=10)     # dropped while nothing runs

    truth = data_files(root)
    assert truth == {"inbox": ["new.jsonl"], "queue/normal": ["b_later.jsonl"],
                     "processing": ["a_long.jsonl"], "done": ["good.jsonl"],
                     "failed": ["broken.jsonl", "notes.txt"], "skipped": ["again.jsonl"]}

    doc = tracker(root)
    assert doc["root"] == str(root)
    assert doc["daemon"]["alive"] is False and doc["daemon"]["pid"] is None
    assert doc["current_model"]["global_step"] == step_of(root) > 0
    assert doc["versions"]["count"] == len(list((root / "versions").glob("v[0-9]*")))
    assert doc["versions"]["latest"] == sorted(p.name for p in (root / "versions").glob("v[0-9]*"))[-1]
    q = doc["queue"]
    assert (q["counts"], q["inbox"], q["processing"], q["done"]) == \
        ({"high": 0, "normal": 1, "low": 0}, 1, "a_long.jsonl", 1)
    assert q["failed_count"] == 2 and q["skipped_count"] == 1
    reasons = {f["name"]: f["reason"] for f in q["failed"]}
    assert set(reasons) == {"broken.jsonl", "notes.txt"}
    assert reasons["notes.txt"] == "not a .jsonl file" and "invalid" in reasons["broken.jsonl"]
    assert "already trained" in q["skipped"][0]["reason"]
    assert doc["training"]["processing_file"] == "a_long.jsonl"
    # stopped cleanly (the one liveness definition: `status` says the same); the file that
    # waits half-trained in processing/ is said, not as a dead daemon: it was stopped on purpose
    assert doc["training"]["state"] == "stopped"
    assert "DAEMON_DEAD" not in codes(doc) and "FILES_FAILED" in codes(doc)
    stopped = warning(doc, "DAEMON_NOT_RUNNING")
    assert stopped["severity"] == "info" and "processing/a_long.jsonl part-way" in stopped["message"]
    assert "training_daemon.py run" in stopped["fix"]
    fix = warning(doc, "FILES_FAILED")["fix"]
    if q["failed"][0]["name"] == "notes.txt":  # the newest: add refuses the name, so a rename
        assert fix == f"mv {root / 'failed' / 'notes.txt'} {root / 'inbox' / 'notes.jsonl'}"
    else:
        assert "training_queue.py add" in fix and "--move" in fix
    assert "last_error" in doc["training"]
    assert doc["loss"]["last_step"] == step_of(root)


# --------------------------------------------------------------------------- 7. pause + reboot

def test_pause_survives_a_reboot_and_resumes_exactly(initialized_root, tiny_model_dir, tmp_path,
                                                     daemons):
    root = initialized_root
    tune(root)
    drop(root, "notes.jsonl", seed=9, lines=40)
    twin = new_root(tmp_path / "twin", tiny_model_dir)
    (twin / "inbox" / "notes.jsonl").write_bytes((root / "inbox" / "notes.jsonl").read_bytes())
    reference = daemons(twin, "--once")

    d = daemons(root)
    d.training_step("notes.jsonl", 3)
    res = controller(root, "pause", "--reason", "checking the data", "--wait", "60")
    assert res["outcome"] == "done"
    paused_at = step_of(root)
    d.proc.kill()                    # the machine reboots: kill -9 of the paused daemon
    d.wait()

    d = daemons(root)
    time.sleep(2.0)
    d.until("running again", lambda: daemon_state(root).get("pid") == d.proc.pid)
    time.sleep(1.5)
    st = controller(root, "status")
    assert st["alive"] and st["state"] == "paused", st
    assert step_of(root) == paused_at and metric_steps(root)[-1] == paused_at
    assert "TRAINING_PAUSED" in codes(tracker(root)) or "PAUSED_LONG" in codes(tracker(root))

    assert controller(root, "resume", "--wait", "60")["outcome"] == "done"
    d.until("notes.jsonl done", lambda: (root / "done" / "notes.jsonl.record.json").exists())
    ok(root, "python3 training_controller.py stop --wait 60")
    assert d.wait() == 0
    assert reference.wait() == 0, reference.output()
    assert step_of(root) == step_of(twin)
    assert_same_weights(weights(root / "current_model"), weights(twin / "current_model"))
    assert metric_steps(root) == list(range(1, step_of(root) + 1))


# --------------------------------------------------------------------------- 8. skip --discard

def test_skip_discard_mid_file_then_requeue_with_the_records_command(initialized_root, daemons):
    root = initialized_root
    tune(root)
    d = daemons(root)
    drop(root, "maybe.jsonl", seed=4, lines=40)
    d.training_step("maybe.jsonl", 3)
    content = sha(root / "processing" / "maybe.jsonl")
    res = controller(root, "skip", "--discard", "--reason", "not sure about it", "--wait", "60")
    assert res["outcome"] == "done"
    d.until("skipped", lambda: (root / "skipped" / "maybe.jsonl.record.json").exists())
    rec = record(root / "skipped" / "maybe.jsonl")
    assert rec["discarded"] is True and sha(root / "skipped" / "maybe.jsonl") == content
    assert_same_weights(weights(root / "current_model"),
                        weights(root / "versions" / rec["version_before"]))
    assert step_of(root) == 0
    assert tracker(root)["queue"]["skipped_count"] == 1

    fix = rec["fix"].split("`")[1]
    assert fix == (f"python3 training_queue.py add {root / 'skipped' / 'maybe.jsonl'} --move "
                   f"--root {root}")  # works from any shell, $TRAINING_ROOT or not
    ok(root, fix)
    d.until("maybe.jsonl trained after all",
            lambda: (root / "done" / "maybe.jsonl.record.json").exists())
    done = record(root / "done" / "maybe.jsonl")
    assert done["sha256"] == content and done["global_step_before"] == 0
    assert step_of(root) == done["global_step_after"] > 0
    ok(root, "python3 training_controller.py stop --wait 60")
    assert d.wait() == 0
    assert data_files(root) == {"done": ["maybe.jsonl"]}
