"""CLAUDE.md's recovery table works: its commands, parsed out of the file, fix real scenarios.

Each row of the table (bad data trained, model deleted, wrong config, daemon dead, disk
full, corrupt file) has a scenario here that makes the mistake on a real training root;
the row's `python3 ...` commands are then run exactly as written (python3 -> this
interpreter, `ID` -> the newest verified backup), in order, and the last one must pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import state_tracker as st
from test_state_tracker import (dead_pid, edit_config, publish_trained, root,  # noqa: F401
                                template, write_daemon_state, write_metrics)

REPO = Path(__file__).resolve().parent.parent
DIAGNOSTICS = ("state_tracker.py --check", "state_tracker.py --warnings",
               "model_versioner.py verify --all", "model_versioner.py prune",
               "backup_manager.py list")  # may exit 1 while they report the problem


def recovery_table() -> dict[str, list[str]]:
    """{mistake: [command, ...]} from the table under '## 4. Recovery table'."""
    text = (REPO / "CLAUDE.md").read_text()
    section = text.split("## 4. Recovery table", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*\*\*(.+?)\*\*\s*\|(.*)\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c for c in re.findall(r"`([^`]+)`", m.group(3))
                                if c.startswith("python3 ")]
    return rows


def run(command: str, root: Path, background: bool = False):
    line = command.replace("python3 ", shlex.quote(sys.executable) + " ", 1)
    env = {**os.environ, "TRAINING_ROOT": str(root)}
    if background:
        return subprocess.Popen(line, shell=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    return subprocess.run(line, shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def newest_verified_backup(root: Path) -> str:
    proc = run("python3 backup_manager.py list --json", root)
    doc = json.loads(proc.stdout)
    items = doc if isinstance(doc, list) else doc.get("backups", [])
    return [b["id"] for b in items if b.get("status") == "verified"][-1]


def run_row(commands: list[str], root: Path) -> list[subprocess.CompletedProcess]:
    """Run a row's commands in order; all must succeed (diagnostics may report failure)."""
    results = []
    for command in commands:
        if " ID" in command:
            command = command.replace(" ID", " " + newest_verified_backup(root))
        proc = run(command, root)
        allowed = (0, 1) if any(d in command for d in DIAGNOSTICS) else (0,)
        assert proc.returncode in allowed, f"{command} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        results.append(proc)
    assert results[-1].returncode == 0, f"the last step still fails: {results[-1].stdout}"
    return results


def warning_codes(root) -> set[str]:
    return {w["code"] for w in st.build_state(root)["warnings"]}


# --------------------------------------------------------------------------- the table

def test_every_row_has_a_scenario_and_commands():
    rows = recovery_table()
    assert set(rows) == {"Bad data trained", "Model deleted", "Wrong config", "Daemon dead",
                         "Disk full", "Corrupt file"}
    for mistake, commands in rows.items():
        assert commands, f"no python3 command in the row {mistake!r}"
    text = (REPO / "CLAUDE.md").read_text()
    assert text.index("python3 state_tracker.py --check") < text.index("## 2. Never")
    assert "CLAUDE.md" in (REPO / "AGENTS.md").read_text()


def test_bad_data_trained(root):
    publish_trained(root, 41)
    write_metrics(root, [2.0 + 0.01 * (i % 3) for i in range(40)] + [9.5])
    assert "LOSS_SPIKE" in warning_codes(root)
    run_row(recovery_table()["Bad data trained"], root)
    doc = st.build_state(root)
    assert "LOSS_SPIKE" not in warning_codes(root)
    assert doc["current_model"]["global_step"] == 0 and doc["current_model"]["matches_version"] == "v001"


def test_model_deleted(root):
    subprocess.run(f"rm -rf {shlex.quote(str(root))}/current_model/", shell=True, check=True)
    assert "MODEL_MISSING" in warning_codes(root)
    run_row(recovery_table()["Model deleted"], root)
    assert st.build_state(root)["current_model"]["matches_version"] == "v001"


def test_wrong_config(root):
    edit_config(root, learning_rate=0.01)
    assert "CONFIG_UNAPPROVED" in warning_codes(root)
    first, *rest = run_row(recovery_table()["Wrong config"], root)
    assert first.returncode == 1 and "learning_rate: 0.0003 -> 0.01" in first.stdout
    assert "CONFIG_UNAPPROVED" not in warning_codes(root)


@pytest.mark.timeout(240)
def test_daemon_dead(root, tmp_path):
    import training_queue
    edit_config(root, monitor_port=0)  # no monitor: port 8080 may be taken on a shared machine
    src = tmp_path / "notes.jsonl"
    src.write_text("".join(json.dumps({"text": f"note {i}: keep going"}) + "\n" for i in range(8)))
    queued = training_queue.enqueue(root, src)
    training_queue.move_with_record(queued["path"], root / "processing",
                                    training_queue.read_record(queued["path"]), "test: claimed")
    write_daemon_state(root, pid=dead_pid(), state="training")
    assert "DAEMON_DEAD" in warning_codes(root)
    commands = recovery_table()["Daemon dead"]
    start = [c for c in commands if "training_daemon.py run" in c]
    assert start == ["python3 training_daemon.py run"]
    daemon = run(start[0], root, background=True)
    seen = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            doc = st.build_state(root)
            seen.add((doc["daemon"]["alive"], doc["training"]["state"]))
            codes = {w["code"] for w in doc["warnings"]}
            if not (root / "processing" / "notes.jsonl").exists() and "DAEMON_DEAD" not in codes:
                break
            assert time.monotonic() < deadline, doc["training"]
            time.sleep(0.2)
    finally:
        run("python3 training_controller.py stop --wait 60", root)
        try:
            daemon.wait(60)
        finally:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
    assert (root / "done" / "notes.jsonl").exists()
    assert any(alive for alive, _ in seen), seen  # the tracker saw the restarted daemon live
    run_row([c for c in commands if c not in start], root)


def test_disk_full(root):
    edit_config(root, keep_versions=1, keep_backups=1)
    for step in (10, 20, 30):
        publish_trained(root, step)
        assert run("python3 model_versioner.py snapshot", root).returncode == 0
        if step != 20:  # backups on the model's disk: a usual way to fill it
            assert run("python3 backup_manager.py backup", root).returncode == 0
    before = st.build_state(root)["versions"]
    assert before["count"] == 4 and st.build_state(root)["backups"]["count"] == 2
    results = run_row(recovery_table()["Disk full"], root)
    after = st.build_state(root)
    assert after["versions"]["count"] < before["count"]
    assert after["versions"]["latest"] == before["latest"]
    assert after["current_model"]["complete"]
    assert after["versions"]["total_size_bytes"] < before["total_size_bytes"]
    assert all(r.returncode == 0 for r in results[1:])
    backups = after["backups"]
    assert backups["count"] == 1 and backups["latest"]["global_step"] == 30


def test_corrupt_file(root):
    assert run("python3 backup_manager.py backup", root).returncode == 0
    weights = root / "current_model" / "model.safetensors"
    with open(weights, "r+b") as f:  # bit rot: in place, so the hard-linked v001 rots too
        f.seek(os.path.getsize(weights) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert run("python3 model_versioner.py verify latest", root).returncode == 1
    results = run_row(recovery_table()["Corrupt file"], root)
    assert results[0].returncode == 1 and "model.safetensors" in results[0].stderr
    bid = newest_verified_backup(root)
    record = json.loads((root / "backups" / bid / "backup.json").read_text())
    good = record["files"]["model.safetensors"]["sha256"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == good
    assert not st.build_state(root)["current_model"]["problems"]
