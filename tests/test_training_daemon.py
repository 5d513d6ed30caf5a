"""The daemon with real processes: intake, priorities, exactly-once, kill -9, bursts.

Every test runs `training_daemon.py` as its own process on a root made by `init` with the
session's tiny model, tuned for speed (settle 0.25 s, rescan 0.5 s, 32-token rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import training_daemon
from conftest import REPO, run_script
from realdaemon import lifecycle_files, record, set_config

pytestmark = pytest.mark.slow

FAST = {"settle_seconds": 0.25, "rescan_seconds": 0.5, "max_length": 32, "batch_size": 2,
        "checkpoint_every_steps": 1, "monitor_port": 0, "backup_every_files": 0,
        "backup_every_hours": 0, "loss_spike_factor": 0.0, "warmup_steps": 2}
LIFECYCLE = ("inbox", "inbox/high", "inbox/low", "queue/high", "queue/normal", "queue/low",
             "queue/.incoming/high", "queue/.incoming/normal", "queue/.incoming/low",
             "processing", "done", "failed", "skipped")


# --------------------------------------------------------------------------- helpers

def tune(root: Path, **over) -> dict:
    """Write the fast test settings into config.json and approve them (as a user would)."""
    return set_config(root, **{**FAST, **over})


def write_data(path: Path, n: int, tag: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"{tag} record {i}: the quick brown fox jumps over the lazy dog"})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_files(root: Path) -> dict[str, list[str]]:
    """Folder -> data file names (records, hidden and temp names excluded)."""
    return lifecycle_files(root, LIFECYCLE)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """`training_daemon.py run --no-monitor` as a child process, logs in a file."""

    def __init__(self, root: Path, *args: str):
        self.root = root
        self.log_path = root.parent / f"daemon-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "training_daemon.py"), "run", "--no-monitor", *args],
            env=dict(os.environ, TRAINING_ROOT=str(root)), cwd=str(REPO),
            stdout=self.log, stderr=subprocess.STDOUT)

    def state(self) -> dict:
        try:
            return json.loads((self.root / ".daemon_state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: self.state().get("pid") == self.proc.pid, timeout, "the daemon's state",
                 self.proc)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(root: Path, *args: str) -> Daemon:
        d = Daemon(root, *args)
        started.append(d)
        return d
    yield start
    for d in started:
        d.close()


def run_once(root: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root,
                      timeout=timeout)


# --------------------------------------------------------------------------- tests

def test_once_finds_files_dropped_while_down_in_priority_order(initialized_root):
    root = initialized_root
    tune(root)
    low = write_data(root / "inbox" / "low" / "a_low.jsonl", 3, "low")
    normal = write_data(root / "inbox" / "b_normal.jsonl", 3, "normal")
    high = write_data(root / "inbox" / "high" / "c_high.jsonl", 3, "high")
    # dropped while down: within one priority, older files first (not by name)
    later = write_data(root / "inbox" / "a_later.jsonl", 3, "later")
    os.utime(normal, ns=(later.stat().st_mtime_ns - 10**9,) * 2)
    shas = {p.name: sha(p) for p in (low, normal, high, later)}
    (root / "inbox" / "notes.txt").write_text("not data\n")
    ignored = [".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part", "z.partial", "w.jsonl~",
               ".w.jsonl.swp", "v.swp", "4913"]
    for n in ignored:
        (root / "inbox" / n).write_text("{}\n")

    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr

    files = data_files(root)
    assert files.pop("done") == ["a_later.jsonl", "a_low.jsonl", "b_normal.jsonl", "c_high.jsonl"]
    assert files.pop("failed") == ["notes.txt"]
    assert sorted(files.pop("inbox")) == sorted(ignored)  # never touched
    assert files == {}
    assert record(root / "failed" / "notes.txt")["reason"] == "not a .jsonl file"

    recs = {n: record(root / "done" / n) for n in shas}
    order = sorted(recs, key=lambda n: recs[n]["started_at"])
    assert order == ["c_high.jsonl", "b_normal.jsonl", "a_later.jsonl", "a_low.jsonl"]
    steps = 0
    for name, rec in recs.items():
        assert rec["sha256"] == shas[name] and rec["records"] == 3 and rec["outcome"] == "done"
        assert rec["steps"] >= 1 and rec["tokens"] > 0 and rec["loss"] > 0
        assert rec["global_step_after"] - rec["global_step_before"] == rec["steps"]
        assert rec["version_before"] and rec["version_after"] != rec["version_before"]
        assert (root / "versions" / rec["version_after"] / "version.json").exists()
        assert {"validate_s", "snapshot_s", "train_s"} <= set(rec["timings"])
        steps += rec["steps"]
    # a queue trains on from the model the file before ended with (no load), the first from disk
    assert [recs[n]["timings"]["model_from"] for n in order] == ["disk", "memory", "memory", "memory"]
    assert all(set(recs[n]["timings"]["engine_s"]) >= {"load", "checkpoint", "publish"} for n in order)
    # one file after another: each starts from the version the previous one produced
    assert recs["b_normal.jsonl"]["version_before"] == recs["c_high.jsonl"]["version_after"]
    assert recs["a_later.jsonl"]["version_before"] == recs["b_normal.jsonl"]["version_after"]
    state = json.loads((root / "current_model" / "trainer_state.json").read_text())
    assert state["global_step"] == steps == recs["a_low.jsonl"]["global_step_after"]
    last = json.loads((root / "versions" / recs["a_low.jsonl"]["version_after"]
                       / "version.json").read_text())
    assert last["data_files"] == [{"name": "a_low.jsonl", "sha256": shas["a_low.jsonl"]}]
    daemon_state = json.loads((root / ".daemon_state.json").read_text())
    assert daemon_state["state"] == "stopped"

    # The same content again, under another name: skipped, naming where it went.
    again = root / "inbox" / "b_again.jsonl"
    again.write_bytes((root / "done" / "b_normal.jsonl").read_bytes())
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    rec = record(root / "skipped" / "b_again.jsonl")
    assert rec["trained_into"] == recs["b_normal.jsonl"]["version_after"]
    assert rec["duplicate_of"] == "b_normal.jsonl"
    assert rec["reason"].startswith("already trained: same content as done/b_normal.jsonl")
    assert json.loads((root / "current_model" / "trainer_state.json").read_text()) == state


def test_running_daemon_slow_writer_mv_rename_and_second_daemon(initialized_root, daemons,
                                                                 tmp_path):
    root = initialized_root
    tune(root)
    d = daemons(root)
    d.wait_ready()

    second = run_script("training_daemon.py", "run", "--no-monitor", root=root, timeout=60)
    assert second.returncode == 3
    assert second.stderr.strip() == (
        f"Error: another daemon is running on this root (pid {d.proc.pid}), {root}. Check it "
        "with `python3 training_controller.py status`; stop it with "
        "`python3 training_controller.py stop --wait`.")

    # A slow writer: 20 MB in 20 chunks over 2 s (invalid from the first line, so it ends in
    # failed/ whenever it is taken; taken early, its record would show a partial sha256).
    big = root / "inbox" / "big.jsonl"
    chunk = (b"not json " + b"x" * 990 + b"\n") * 1000   # 1,000,000 bytes
    full = hashlib.sha256()

    def slow_writer():
        with open(big, "wb") as f:
            for _ in range(20):
                f.write(chunk)
                f.flush()
                full.update(chunk)
                time.sleep(0.1)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    # `mv` from outside (same filesystem: only a `created` event, no close)
    outside = write_data(tmp_path / "outside" / "moved.jsonl", 3, "moved")
    moved_sha = sha(outside)
    os.rename(outside, root / "inbox" / "moved.jsonl")
    # temp-then-rename, as editors and downloaders do (only a `moved` event)
    tmp = write_data(root / "inbox" / ".renamed.jsonl.tmp", 3, "renamed")
    renamed_sha = sha(tmp)
    os.rename(tmp, root / "inbox" / "renamed.jsonl")
    (root / "inbox" / "draft.jsonl~").write_text("{}\n")
    writer.join()

    wait_for(lambda: (root / "done" / "moved.jsonl.record.json").exists()
             and (root / "done" / "renamed.jsonl.record.json").exists()
             and (root / "failed" / "big.jsonl.record.json").exists(), 90, "the three files",
             d.proc)
    assert d.stop() == 0, d.output()

    big_rec = record(root / "failed" / "big.jsonl")
    assert big_rec["size"] == 20_000_000
    assert big_rec["sha256"] == full.hexdigest() == sha(root / "failed" / "big.jsonl")
    assert big_rec["report"]["errors"][0]["line"] == 1
    assert record(root / "done" / "moved.jsonl")["sha256"] == moved_sha
    assert record(root / "done" / "renamed.jsonl")["sha256"] == renamed_sha
    assert data_files(root) == {"inbox": ["draft.jsonl~"], "done": ["moved.jsonl", "renamed.jsonl"],
                                "failed": ["big.jsonl"]}
    assert "SIGTERM" in d.output()


def test_files_dropped_while_a_file_trains_are_validated_and_queued_at_once(initialized_root,
                                                                          daemons):
    """A long file trains; a good and a bad file dropped meanwhile are queued and failed
    within seconds, not when the long file ends, and the long one trains on."""
    root = initialized_root
    tune(root)
    d = daemons(root)
    d.wait_ready()
    write_data(root / "inbox" / "long.jsonl", 400, "long")
    wait_for(lambda: (d.state().get("progress") or {}).get("step_in_file"), 60,
             "long.jsonl training", d.proc)
    write_data(root / "inbox" / "later.jsonl", 3, "later")
    (root / "inbox" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    wait_for(lambda: (root / "queue" / "normal" / "later.jsonl.record.json").exists()
             and (root / "failed" / "bad.jsonl.record.json").exists(), 30,
             "the dropped files taken", d.proc)
    assert d.state().get("current_file", {}).get("name") == "long.jsonl"
    assert (root / "processing" / "long.jsonl").exists()
    assert record(root / "failed" / "bad.jsonl")["report"]["errors"][0]["line"] == 2
    assert d.stop() == 0, d.output()
    assert data_files(root) == {"queue/normal": ["later.jsonl"], "processing": ["long.jsonl"],
                                "failed": ["bad.jsonl"]}


def _trained_state(root: Path) -> tuple[dict, bytes]:
    state = json.loads((root / "current_model" / "trainer_state.json").read_text())
    return ({k: state[k] for k in ("global_step", "tokens_seen")},
            (root / "current_model" / "model.safetensors").read_bytes())


def _three_steps_in_beside_a_twin(root: Path, model_dir: Path, daemons, tmp_path: Path):
    """A daemon three optimizer steps into long.jsonl (~10 steps of 64 tokens) on `root`, and
    the same file on a twin root, never interrupted, run alongside (to save wall time):
    (twin root, its --once daemon, the daemon on root)."""
    import training_daemon
    tune(root)
    data = write_data(root / "inbox" / "long.jsonl", 10, "long")
    twin = tmp_path / "twin"
    training_daemon.init_root(twin, base=str(model_dir))
    tune(twin)
    (twin / "inbox" / "long.jsonl").write_bytes(data.read_bytes())
    uninterrupted = daemons(twin, "--once")
    d = daemons(root)
    metrics = root / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, 90,
             "three optimizer steps", d.proc)
    return twin, uninterrupted, d


def test_kill_9_mid_file_then_restart_trains_it_exactly_once(initialized_root, tiny_model_dir,
                                                             daemons, tmp_path):
    killed = initialized_root
    twin, uninterrupted, d = _three_steps_in_beside_a_twin(killed, tiny_model_dir, daemons, tmp_path)
    metrics = killed / "metrics.jsonl"
    d.proc.kill()  # kill -9: no checkpoint on the way out, no cleanup
    d.proc.wait()
    d.close()
    assert data_files(killed) == {"processing": ["long.jsonl"]}

    proc = run_once(killed)
    assert proc.returncode == 0, proc.stderr
    assert data_files(killed) == {"done": ["long.jsonl"]}
    rec = record(killed / "done" / "long.jsonl")
    # killed after checkpoints of progress: resumed, no failed attempt counted (a file is
    # failed only by max_attempts crashes with no new checkpoint between them)
    assert rec["attempts"] == 0
    assert "(a checkpoint since the last start: not counted as a failed attempt)" in proc.stderr

    assert uninterrupted.proc.wait(120) == 0, uninterrupted.output()
    twin_rec = record(twin / "done" / "long.jsonl")
    assert rec["steps"] == twin_rec["steps"] and rec["steps"] > 3
    assert _trained_state(killed)[0] == _trained_state(twin)[0]
    assert _trained_state(killed)[1] == _trained_state(twin)[1]  # bitwise-equal weights (CPU)
    steps = [json.loads(line)["global_step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == rec["global_step_after"]


def test_burst_of_10000_invalid_files_all_accounted_for(initialized_root, daemons):
    """Half dropped while the daemon is down, half while it runs: inotify overflows, the
    rescans still find every one, and each ends in failed/ with a record."""
    root = initialized_root
    tune(root)
    inbox = root / "inbox"
    for i in range(5000):
        (inbox / f"down-{i:05d}.jsonl").write_bytes(b"not json\n")
    d = daemons(root)
    d.wait_ready()
    for i in range(5000):
        (inbox / f"up-{i:05d}.jsonl").write_bytes(b'{"text": 1}\n')
    failed = root / "failed"

    def count():
        n = sum(1 for name in os.listdir(failed) if name.endswith(".jsonl"))
        return n if n >= 10000 else 0
    wait_for(count, 150, "10,000 files in failed/", d.proc)
    assert d.stop() == 0, d.output()
    names = os.listdir(failed)
    assert sum(1 for n in names if n.endswith(".jsonl")) == 10000
    assert sum(1 for n in names if n.endswith(".jsonl.record.json")) == 10000
    assert data_files(root) == {"failed": sorted(n for n in names if n.endswith(".jsonl"))}
    assert "invalid" in record(failed / "up-04999.jsonl")["reason"]


def test_a_file_killed_with_the_daemon_after_each_checkpoint_never_fails(initialized_root):
    """`kill -9` of the daemon three times, each after a new checkpoint of the file: the file
    went to failed/ as "training crashed 3 times" and its steps were thrown away. A kill
    after progress is no crash of its training: it resumes and finishes."""
    import training_engine as te
    from conftest import REPO, kill_9_when
    root = initialized_root
    tune(root, max_attempts=2, checkpoint_every_steps=2)
    data = write_data(root / "inbox" / "long.jsonl", 120, "long")
    steps = []

    def newer_checkpoint():
        ckpts = te.list_checkpoints(root) if (root / "checkpoints").is_dir() else []
        step = max((m.get("global_step", 0) for _, m in ckpts if m.get("file_id")), default=0)
        return step > (steps[-1] if steps else 0) and not steps.append(step)
    for _ in range(3):
        assert kill_9_when([str(REPO / "training_daemon.py"), "run"], root, newer_checkpoint,
                           timeout=60) == -9
    assert len(steps) == 3 and steps == sorted(steps)
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"done": ["long.jsonl"]}
    assert "not counted as a failed attempt" in (root / "logs" / "daemon.log").read_text()
    assert not data.exists()


def test_crashed_file_goes_to_failed_after_max_attempts(initialized_root):
    """A file whose training crashed the daemon max_attempts times is not tried again."""
    import training_queue
    root = initialized_root
    tune(root, max_attempts=2)
    data = write_data(root / "processing" / "poison.jsonl", 3, "poison")
    training_queue.update_record(data, name="poison.jsonl", sha256=sha(data), records=3,
                                 attempts=1, in_training=True, priority="normal")
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"failed": ["poison.jsonl"]}
    rec = record(root / "failed" / "poison.jsonl")
    assert rec["reason"] == "training crashed 2 times (max_attempts 2)"
    assert rec["fix"] == ("Read the reason (and logs/daemon.log); once the cause is fixed, "
                          f"`python3 training_queue.py add {root / 'failed' / 'poison.jsonl'} "
                          f"--move --root {root}` trains it again.")
    assert not (root / "versions" / "v002").exists()  # never trained, nothing snapshotted


def test_changed_locked_config_pauses_before_training(initialized_root):
    """Pre-flight: a locked parameter changed without approval -> never trains; --once says why."""
    import training_config
    root = initialized_root
    cfg = tune(root)
    write_data(root / "inbox" / "f.jsonl", 3, "f")
    cfg["learning_rate"] = 0.001
    training_config.write_config(root, cfg)
    proc = run_once(root)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: pre-flight: locked config changed (learning_rate: 0.0003 -> 0.001), "
        f"{root / 'config.json'}. Run `python3 training_controller.py approve-config` to "
        "approve it, or put the old values back.")
    assert data_files(root) == {"queue/normal": ["f.jsonl"]}
    assert not (root / "versions" / "v002").exists()


def test_automatic_backup_after_a_file_and_a_failed_one_pauses(initialized_root):
    import training_config
    root = initialized_root
    tune(root, backup_every_files=1)
    write_data(root / "inbox" / "one.jsonl", 3, "one")
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    rec = record(root / "done" / "one.jsonl")
    backups = [json.loads(p.read_text()) for p in (root / "backups").glob("*/backup.json")]
    assert [(b["status"], b["version"]) for b in backups] == [("verified", rec["version_after"])]
    assert "automatic backup done" in proc.stderr

    # A backup_dir that cannot exist (its parent is a file): the backup fails -> paused.
    (root / "not_a_dir").write_text("x")
    cfg = training_config.load_config(root)
    cfg["backup_dir"] = str(root / "not_a_dir" / "backups")
    training_config.write_config(root, cfg)
    write_data(root / "inbox" / "two.jsonl", 3, "two")
    proc = run_once(root)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: automatic backup failed: ")
    assert last.endswith("Fix the cause, then run `python3 backup_manager.py backup`.")
    assert data_files(root) == {"done": ["one.jsonl", "two.jsonl"]}
    state = json.loads((root / ".daemon_state.json").read_text())
    assert state["last_error"].startswith("automatic backup failed: ")


def test_files_since_the_last_backup_are_counted_by_version_not_by_the_clock(tmp_path):
    """A backup made while the clock ran a day ahead: counting done files by finished_at
    found none after it, so backup_every_files never fired until the clock caught up."""
    import done_index
    from trainroot import Paths
    Paths(tmp_path).ensure()
    ahead = {"version": "v003", "created_at": "2099-01-01T00:00:00.000000Z"}
    for v in ("v002", "v003", "v004", "v006"):
        (tmp_path / "done" / f"{v}.jsonl").write_text("x\n")
        (tmp_path / "done" / f"{v}.jsonl.record.json").write_text(json.dumps(
            {"sha256": v * 16, "version_after": v, "finished_at": "2026-12-03T08:00:00.000000Z"}))
    idx = done_index.DoneIndex(tmp_path)
    assert idx.trained_since(ahead) == 2
    assert idx.trained_since(None) == 4
    unnamed = {"version": None, "created_at": "2026-12-03T07:00:00.000000Z"}  # by time, as before
    assert idx.trained_since(unnamed) == 4


def test_a_file_skipped_with_its_steps_kept_is_in_the_lineage(initialized_root, capsys):
    """`skip` (no --discard) keeps the steps trained on the file in current_model: the
    version after it lists the file, marked skipped (lineage used to miss it)."""
    import shutil

    import model_versioner
    import training_daemon
    import training_queue
    from trainroot import Paths
    root = initialized_root
    p = Paths(root)
    data = write_data(root / "processing" / "part.jsonl", 3, "part")
    training_queue.update_record(data, sha256=sha(data), records=3, version_before="v001",
                                 in_training=False)
    # what the engine leaves after a few steps on it, then `skip`: current_model moved on
    staged = p.staging / "save-part"
    shutil.copytree(p.current_model, staged, ignore=shutil.ignore_patterns(".manifest.json"))
    weights = next(staged.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(blob))
    model_versioner.publish_model(root, staged, reason="skip")
    daemon = training_daemon.Daemon(root, once=True, monitor=False)
    daemon._finish_skipped(data, False, "skipped by request")
    rec = record(root / "skipped" / "part.jsonl")
    assert rec["discarded"] is False and rec["version_after"] == "v002"
    assert model_versioner.lineage(root, "latest")["data_files"] == [
        {"name": "part.jsonl", "sha256": sha(root / "skipped" / "part.jsonl"), "skipped": True,
         "version": "v002"}]
    assert model_versioner.main(["lineage", "latest"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("part.jsonl  "
                                                             + rec["sha256"][:12]
                                                             + "  (skipped: partly trained)")


def test_a_root_turning_read_only_mid_file_stops_the_daemon_cleanly(initialized_root, daemons,
                                                                    read_only):
    """EROFS (the filesystem remounted read-only) while a file trains: the daemon used to
    end with a traceback (metrics.jsonl's append). Now it pauses, and since it cannot even
    write its state there, stops cleanly: one Error line naming the filesystem and the
    fix, no traceback, the file in processing/ and its last checkpoint kept."""
    root = initialized_root
    tune(root, checkpoint_every_steps=2)
    write_data(root / "inbox" / "ro.jsonl", 400, "ro")
    d = daemons(root)
    wait_for(lambda: (root / "checkpoints").is_dir() and any(
        n.startswith("checkpoint-") for n in os.listdir(root / "checkpoints")), 120,
        "a first checkpoint", d.proc)
    if not read_only(root):
        pytest.skip("mount not permitted here: a read-only root for another process needs one")
    code = d.proc.wait(120)
    out = d.output()
    assert code == 1 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    # whichever write the remount hits first says so: a metrics line or a checkpoint
    assert last.startswith("Error: stopped: saving failed while training ro.jsonl: "), out
    assert "writing metrics.jsonl at step " in last or "checkpoint at step " in last, out
    assert last.endswith("failed (Read-only file system); the daemon cannot even write its "
                         f"state (Read-only file system), {root}. The filesystem is read-only: "
                         "check `dmesg`, remount it read-write (`mount -o remount,rw "
                         "MOUNTPOINT`), then start the daemon: the file stays in processing/ "
                         "and resumes from its last checkpoint."), out
    assert data_files(root) == {"processing": ["ro.jsonl"]}
    ckpts = [n for n in os.listdir(root / "checkpoints") if n.startswith("checkpoint-")]
    assert ckpts and all((root / "checkpoints" / n / "meta.json").is_file() for n in ckpts)


def test_a_read_only_metrics_file_pauses_then_resume_finishes(initialized_root, daemons,
                                                              read_only):
    """EROFS on one file the engine appends to, the root still writable: the daemon stays
    up, paused with pause kind `readonly` and the fix; `resume` after the remount finishes
    the file (it used to crash the file with a traceback)."""
    import training_controller
    root = initialized_root
    tune(root, checkpoint_every_steps=2)
    write_data(root / "inbox" / "m.jsonl", 60, "m")  # ~20 steps: the mount lands mid-file
    d = daemons(root)
    wait_for(lambda: (root / "metrics.jsonl").exists(), 120, "a first metrics line", d.proc)
    if not read_only(root / "metrics.jsonl"):
        pytest.skip("mount not permitted here: a read-only file for another process needs one")
    st = wait_for(lambda: (s := d.state()).get("state") == "paused" and s, 120, "the pause", d.proc)
    assert "Read-only file system" in st["paused_reason"], st
    assert "remount it read-write (`mount -o remount,rw MOUNTPOINT`)" in st["paused_reason"]
    assert record(root / "processing" / "m.jsonl")["hold"]["kind"] == "readonly"
    subprocess.run(["umount", str(root / "metrics.jsonl")], check=True)
    training_controller.request(root, "resume", wait=30)
    wait_for(lambda: (root / "done" / "m.jsonl").exists(), 180, "m.jsonl done", d.proc)
    assert d.stop() == 0
    assert "Traceback" not in d.output()


def test_a_full_disk_around_the_engines_pause_pauses_the_daemon(initialized_root, monkeypatch):
    """The disk fills up completely just as the engine pauses for it: the file's record
    cannot be updated either. The daemon used to exit (`Error: No space left on device`);
    now it pauses with kind `disk`. A full disk outside the engine's saves (a record) pauses
    it the same way, never counting as a crash of the file."""
    import errno
    import training_queue
    root = initialized_root
    tune(root)
    src = write_data(root.parent / "src" / "full.jsonl", 3, "full")
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    assert run_script("training_queue.py", "add", str(src), root=root).returncode == 0
    job = daemon.next_job()
    assert job is not None

    class PausedEngine:  # the engine at its boundary: it paused for the disk, nothing written
        @staticmethod
        def train_file(*args, **kwargs):
            return {"status": "paused", "pause_reason": "disk", "global_step": 0, "steps": 0,
                    "message": "saving checkpoint at step 9 needs 1.5 MB; paused before writing",
                    "seconds": {"checkpoint": 0.0}}

        @staticmethod
        def release_warm():
            pass
    monkeypatch.setattr(daemon, "engine", lambda: PausedEngine)
    real_update = training_queue.update_record

    def full(path, **fields):
        if fields.get("in_training") is False or "hold" in fields:  # after the engine returns
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_update(path, **fields)
    monkeypatch.setattr(training_queue, "update_record", full)
    daemon.process(job)
    assert daemon.state == "paused" and daemon.pause_kind == "disk", daemon.paused_reason
    assert "Free disk space" in daemon.paused_reason
    data = root / "processing" / "full.jsonl"
    assert data.exists() and not record(data).get("attempts")

    # outside the engine's saves: the record's write fails, the file is not crashed
    def full_again(path, **fields):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(training_queue, "update_record", full_again)
    daemon.set_state("idle")
    with pytest.raises(OSError) as exc:
        daemon.process(data)
    daemon._write_refused(data, exc.value)
    assert daemon.state == "paused" and daemon.pause_kind == "disk"
    assert "the disk is full: free space" in daemon.paused_reason
    monkeypatch.setattr(training_queue, "update_record", real_update)
    assert not record(data).get("attempts")


def test_a_file_cut_short_behind_its_record_fails_and_the_real_one_trains(initialized_root):
    """After a power cut a data file can be 0 bytes beside a record of 3 records (its content
    never reached the disk): never trained, never in done/ (the real file would then be
    refused as a duplicate), but failed/ with the reason and the fix."""
    import training_queue
    root = initialized_root
    tune(root)
    src = write_data(root.parent / "src" / "cut.jsonl", 3, "cut")
    queued = write_data(root.parent / "src" / "queued.jsonl", 3, "queued")
    for f in (src, queued):
        assert run_script("training_queue.py", "add", str(f), root=root).returncode == 0
    # one mid-training when the machine died, one still queued: both 0 bytes now
    training_queue.move_with_record(root / "queue" / "normal" / "cut.jsonl", root / "processing",
                                    dict(record(root / "queue" / "normal" / "cut.jsonl"),
                                         in_training=True), "training")
    for f in (root / "processing" / "cut.jsonl", root / "queue" / "normal" / "queued.jsonl"):
        os.truncate(f, 0)
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"failed": ["cut.jsonl", "queued.jsonl"]}
    for name in ("cut.jsonl", "queued.jsonl"):
        rec = record(root / "failed" / name)
        assert rec["reason"].startswith("not the file its record describes (0 bytes on disk, its "
                                        "record says "), rec
        assert rec["fix"] == (f"Drop the original {name} into {root / 'inbox'}/ again (or "
                              "`python3 training_queue.py add PATH`); this copy stays here, "
                              "untouched.")
    assert not (root / "versions" / "v002").exists()  # nothing trained
    # the real file dropped again is trained, not refused as a duplicate
    (root / "inbox" / "cut.jsonl").write_bytes(src.read_bytes())
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert record(root / "done" / "cut.jsonl")["sha256"] == sha(src)


def test_a_file_changed_after_part_of_it_trained_fails_with_its_steps_versioned(initialized_root):
    """A file in processing/ trained part-way (paused), then changed by hand: it went to
    failed/ as "not trained" while current_model kept its steps, unversioned, and lineage
    missed it. Its steps are versioned now (the file marked skipped: partly trained, under
    the content they were trained on), and the fix names how to take them out."""
    import shutil

    import model_versioner
    import training_queue
    from trainroot import Paths
    root = initialized_root
    tune(root)
    p = Paths(root)
    data = write_data(root / "processing" / "part.jsonl", 3, "part")
    trained = sha(data)
    training_queue.update_record(data, sha256=trained, size=data.stat().st_size, records=3,
                                 version_before="v001", file_id="part-1", in_training=False)
    staged = p.staging / "save-part"  # what the engine publishes at a pause: its steps
    shutil.copytree(p.current_model, staged, ignore=shutil.ignore_patterns(".manifest.json"))
    state = json.loads((staged / "trainer_state.json").read_text())
    (staged / "trainer_state.json").unlink()
    (staged / "trainer_state.json").write_text(json.dumps(dict(state, file_id="part-1", global_step=2)))
    model_versioner.publish_model(root, staged, reason="pause")
    with open(data, "a") as f:
        f.write('{"text": "one more line, added by hand"}\n')
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"failed": ["part.jsonl"]}
    rec = record(root / "failed" / "part.jsonl")
    assert rec["reason"].startswith("not the file its record describes (")
    assert "those steps (on its content as recorded) stay in current_model, versioned as v002" \
        in rec["reason"] and rec["version_after"] == "v002"
    assert rec["fix"].endswith("to take out the part trained first, `python3 model_versioner.py "
                               f"restore v001 --root {root}`.")
    assert model_versioner.current_version(root) == "v002"
    assert model_versioner.lineage(root, "v002")["data_files"] == [
        {"name": "part.jsonl", "sha256": trained, "skipped": True, "version": "v002"}]


def test_skip_discard_with_the_version_before_gone_is_refused_and_the_file_waits(initialized_root):
    """`rm -rf versions/v002` (the version taken before the file) while it was paused, then
    `skip --discard`: the daemon died on "no version v002". The skip is refused now, naming
    plain `skip` (the steps kept) or a backup, and nothing moves; plain `skip` then works."""
    import shutil

    import model_versioner
    import training_daemon
    import training_queue
    from trainroot import Paths
    root = initialized_root
    p = Paths(root)
    data = write_data(root / "processing" / "part.jsonl", 3, "part")
    training_queue.update_record(data, sha256=sha(data), records=3, version_before="v002",
                                 file_id="part-1", in_training=False)
    staged = p.staging / "save-part"  # its steps, published at the pause
    shutil.copytree(p.current_model, staged, ignore=shutil.ignore_patterns(".manifest.json"))
    state = json.loads((staged / "trainer_state.json").read_text())
    (staged / "trainer_state.json").unlink()
    (staged / "trainer_state.json").write_text(json.dumps(dict(state, file_id="part-1")))
    model_versioner.publish_model(root, staged, reason="pause")
    daemon = training_daemon.Daemon(root, once=True, monitor=False)
    with pytest.raises(training_daemon._Unrestorable) as exc:
        daemon._finish_skipped(data, True, "skipped by request")
    assert "the version taken before part.jsonl, v002, cannot be restored (no version v002" \
        in exc.value.what and "`python3 training_controller.py skip` (without --discard)" in exc.value.fix
    assert data.exists() and record(data)["version_before"] == "v002"  # nothing moved
    daemon._finish_skipped(data, False, "skipped by request")  # what the refusal names
    assert data_files(root) == {"skipped": ["part.jsonl"]}
    after = record(root / "skipped" / "part.jsonl")["version_after"]
    assert [f["name"] for f in model_versioner.lineage(root, after)["data_files"]] == ["part.jsonl"]


def test_a_file_put_into_processing_by_hand_is_validated_and_queued_first(initialized_root):
    """The daemon moves a file into processing/ only with its record: one put there by hand
    was trained unchecked, into done/ with no sha256. It goes to inbox/ now, is validated
    and queued like any other, then trained (a bad one fails validation, untrained)."""
    import training_daemon
    root = initialized_root
    tune(root)
    daemon = training_daemon.Daemon(root, once=True, monitor=False)  # running: recovery is done
    for name, text in (("byhand.jsonl", None), ("bad.jsonl", "{not json\n")):
        data = write_data(root / "processing" / name, 3, "byhand")
        if text:
            data.write_text(text)
        assert daemon.next_job() == data
        daemon.process(data)
        assert not data.exists() and (root / "queue" / ".incoming" / "normal" / name).exists()
    assert not (root / "versions" / "v002").exists()  # nothing trained unchecked
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    files = data_files(root)
    assert files["done"] == ["byhand.jsonl"] and files["failed"] == ["bad.jsonl"], files
    assert record(root / "done" / "byhand.jsonl")["sha256"] == sha(root / "done" / "byhand.jsonl")


def test_set_priority_as_the_daemon_takes_the_head_does_not_kill_it(initialized_root,
                                                                    monkeypatch):
    """`set-priority` moves the queue's head between the daemon listing the queue and taking
    the file (a real race, made certain here): the daemon lists again and trains it."""
    import training_daemon
    import training_queue
    root = initialized_root
    tune(root)
    src = write_data(root.parent / "head.jsonl", 3, "head")
    assert run_script("training_queue.py", "add", str(src), root=root).returncode == 0
    real_move = training_queue.move_with_record
    raced = []

    def move(src_path, directory, *args, **kw):
        if Path(directory).name == "processing" and not raced:
            raced.append(training_queue.set_priority(root, Path(src_path).name, "low"))
        return real_move(src_path, directory, *args, **kw)
    monkeypatch.setattr(training_queue, "move_with_record", move)
    assert training_daemon.Daemon(root, once=True, monitor=False).run() == 0
    assert raced and raced[0]["changed"]
    assert data_files(root) == {"done": ["head.jsonl"]}
    assert record(root / "done" / "head.jsonl")["priority"] == "low"
    assert "head.jsonl left the queue as it was taken" in (root / "logs" / "daemon.log").read_text()
# --------------------------------------------------------------------------- the model lock

def _in_process_daemon(root: Path):
    """The daemon object in this process (no loop, no signals): `process(path)` trains one
    file exactly as `run` does, so a test can hold a moment of it open."""
    import training_config
    import training_daemon
    d = training_daemon.Daemon(root, once=True, monitor=False)
    d.cfg = training_config.load_config(root)
    return d


def _queue(root: Path, name: str, n: int, tag: str) -> Path:
    import training_queue
    rec = training_queue.enqueue(root, write_data(root / name, n, tag), move=True)
    assert rec["outcome"] == "queued", rec
    return Path(rec["path"])


def _model(root: Path) -> tuple[int, str]:
    """current_model's step and manifest (what a restore or a publish changes)."""
    cm = root / "current_model"
    return (json.loads((cm / "trainer_state.json").read_text())["global_step"],
            (cm / ".manifest.json").read_text())


def test_restores_wait_for_a_file_the_daemon_has_taken_until_it_is_published(initialized_root):
    """The window between taking a file from the queue and the state `training` (seconds
    while the engine loads): rollback, restore and backup restore are refused there, with
    the holder and the stop command, and accepted once the file is done."""
    import backup_manager
    root = initialized_root
    tune(root)
    daemon = _in_process_daemon(root)
    assert daemon.process(_queue(root, "first.jsonl", 4, "first")) is None
    backup = backup_manager.create_backup(root)
    job = _queue(root, "second.jsonl", 4, "second")
    in_window, go_on = threading.Event(), threading.Event()
    real_engine = daemon.engine

    def slow_engine():  # the engine import at start-up, held open
        in_window.set()
        assert go_on.wait(120)
        return real_engine()
    daemon.engine = slow_engine
    worker = threading.Thread(target=daemon.process, args=(job,))
    worker.start()
    try:
        assert in_window.wait(120)
        rec = record(root / "processing" / "second.jsonl")
        assert not rec.get("in_training")  # taken from the queue, snapshot taken, not training
        assert json.loads((root / ".daemon_state.json").read_text())["state"] != "training"
        before = _model(root)
        refusal = (f"the daemon (pid {os.getpid()}) is training second.jsonl (current_model is "
                   f"being trained), {root}. Stop it first with `python3 training_controller.py "
                   "stop --wait`, then run this again.")
        for script, *args in (("model_versioner.py", "rollback"),
                              ("model_versioner.py", "restore", "v001"),
                              ("backup_manager.py", "restore", backup["id"])):
            proc = run_script(script, *args, root=root)
            assert (proc.returncode, proc.stderr.strip()) == (3, f"Error: {refusal}"), args
        assert _model(root) == before
    finally:
        go_on.set()
        worker.join(300)
    rec = record(root / "done" / "second.jsonl")
    assert rec["version_before"] == record(root / "done" / "first.jsonl")["version_after"]
    assert rec["global_step_before"] == before[0]
    # idle: accepted, and the rollback undoes exactly the second file
    proc = run_script("model_versioner.py", "rollback", root=root)
    assert proc.returncode == 0, proc.stderr
    assert _model(root)[0] == rec["global_step_before"]
    proc = run_script("backup_manager.py", "restore", backup["id"], root=root)
    assert proc.returncode == 0, proc.stderr


def test_a_backup_restore_in_progress_keeps_the_next_file_in_the_queue(initialized_root,
                                                                         monkeypatch):
    import backup_manager
    root = initialized_root
    tune(root)
    daemon = _in_process_daemon(root)
    assert daemon.process(_queue(root, "first.jsonl", 4, "first")) is None
    trained = _model(root)
    proc = run_script("model_versioner.py", "restore", "v001", root=root)
    assert proc.returncode == 0, proc.stderr
    backup = backup_manager.create_backup(root)  # of v001, step 0
    proc = run_script("model_versioner.py", "restore", "latest", root=root)
    assert proc.returncode == 0, proc.stderr
    assert _model(root) == trained
    copying, go_on = threading.Event(), threading.Event()
    real_copy = backup_manager.copy_tree_verified

    def slow_copy(*args, **kw):  # a big model's copy, held open
        copying.set()
        assert go_on.wait(120)
        return real_copy(*args, **kw)
    monkeypatch.setattr(backup_manager, "copy_tree_verified", slow_copy)
    restore = threading.Thread(target=backup_manager.restore_backup, args=(root, backup["id"]))
    job = _queue(root, "second.jsonl", 4, "second")
    restore.start()
    try:
        assert copying.wait(120)
        daemon.process(job)  # waits: does not take the file
        assert data_files(root)["queue/normal"] == ["second.jsonl"]
        assert not (root / "processing" / "second.jsonl").exists()
    finally:
        go_on.set()
        restore.join(120)
    assert _model(root)[0] == 0  # the backup is current_model
    daemon.process(job)
    rec = record(root / "done" / "second.jsonl")
    assert rec["global_step_before"] == 0  # trained from the restored model, and says so
    assert rec["global_step_after"] == rec["steps"]


def test_a_restore_while_a_file_is_paused_is_where_the_file_restarts_and_what_it_records(
        initialized_root):
    """Paused mid-file the model lock is free: a restore is accepted, and the file's record
    then starts from the restored model (so `skip --discard` would not undo the restore)."""
    root = initialized_root
    tune(root)
    daemon = _in_process_daemon(root)
    daemon.process(_queue(root, "first.jsonl", 4, "first"))
    job = _queue(root, "second.jsonl", 12, "second")
    daemon.control_training = lambda: "pause"
    daemon.process(job)
    paused = record(root / "processing" / "second.jsonl")
    assert daemon.state == "paused" and paused["global_step_before"] > 0
    proc = run_script("model_versioner.py", "restore", "v001", root=root)
    assert proc.returncode == 0, proc.stderr
    del daemon.control_training
    daemon.process(root / "processing" / "second.jsonl")
    rec = record(root / "done" / "second.jsonl")
    assert rec["version_before"] != paused["version_before"]
    assert json.loads((root / "versions" / rec["version_before"] / "version.json").read_text(
    ))["global_step"] == rec["global_step_before"] == 0
    assert rec["steps"] == rec["global_step_after"]  # the whole file, from the restored model


def test_the_preflight_counts_a_bf16_base_checkpoint_in_fp32(tmp_path, tiny_model_dir):
    """current_model keeps a bf16 base's dtype, the checkpoint holds fp32 weights and AdamW
    moments: the next file writes 7x current_model's bytes, not 4x, and must fit first."""
    from trainroot import Paths
    import shutil
    import torch
    import training_config
    from transformers import AutoModelForCausalLM
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True,
                                         dtype=torch.bfloat16).save_pretrained(base)
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "trainer_state")):
            shutil.copyfile(tiny_model_dir / name, base / name)
    root = tmp_path / "root"
    training_daemon.init_root(root, base=str(base))
    model = training_daemon._folder_bytes(Paths(root).current_model)
    used = training_daemon._folder_bytes(root)
    cfg = json.loads((root / "config.json").read_text())
    cfg["max_disk_gb"] = round((used + 5.5 * model) / 1e9, 6)  # 4x fits, 7x does not
    (root / "config.json").write_text(json.dumps(cfg))
    d = training_daemon.Daemon(root, once=True, monitor=False)
    with pytest.raises(training_daemon._Paused) as info:
        d.preflight(training_config.load_config(root))
    assert f"{7 * model / 1e6:.1f} MB to write is over it" in info.value.error.what


def test_the_idle_daemon_gives_the_spare_checkpoint_back_when_the_disk_runs_short(
        initialized_root, monkeypatch, caplog):
    """Idle, the daemon keeps the spare checkpoint (a pruned one the next file's checkpoint
    writes over) while the disk has as much free as it holds plus min_free_disk_mb; once
    less is free, it gives it back and says so."""
    import collections
    import shutil
    import retention
    import training_config
    root = initialized_root
    spare = root / ".staging" / f"{retention.SPARE_PREFIX}abc" / "checkpoint-00000004"
    spare.mkdir(parents=True)
    for name in retention.SPARE_FILES:
        (spare / name).write_bytes(b"\0" * 600_000)
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    daemon.cfg = dict(training_config.load_config(root), min_free_disk_mb=1, rescan_seconds=60)
    usage = collections.namedtuple("usage", "total used free")
    free = [10 << 20]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, free[0]))
    daemon._spare_room()
    assert spare.is_dir()  # 10 MB free: room for it
    free[0] = (1 << 20) + 1_200_000 - 1  # one byte short of the spare plus the margin
    daemon._spare_room()
    assert spare.is_dir()  # checked every rescan_seconds, not every idle tick
    daemon._spare_checked -= 60
    with caplog.at_level("INFO", logger="training_daemon"):
        daemon._spare_room()
    assert not spare.parent.exists() and retention.spare_bytes(root) == 0
    assert "gave back the spare checkpoint (1.2 MB in" in caplog.text


def test_the_idle_daemon_keeps_the_model_in_memory_for_keep_warm_seconds(initialized_root,
                                                                         monkeypatch, caplog):
    """keep_warm_seconds: after the queue empties, the last file's model and AdamW state stay
    in memory, so the next file does not load them from disk; they go back once the window
    has passed (an idle eval gives way for that), sooner when less than 10% of memory is
    free, and at once on a pause or a config change, each time saying so; the file after
    that loads from disk. A file waiting for a lock does not hold them past the window."""
    import collections
    import psutil
    import training_engine
    import trainroot
    from trainroot import parse_time
    root = initialized_root
    tune(root, keep_warm_seconds=60)
    caplog.set_level("INFO", logger="training_daemon")
    daemon = _in_process_daemon(root)
    assert daemon._keep_warm_s() == 0  # `run --once` exits once the queue is empty: no window
    daemon.once = False  # as `run` (this test calls the loop's steps itself)
    real_memory = psutil.virtual_memory
    memory = collections.namedtuple("svmem", "total available")
    total = 10 << 30

    def train(name: str) -> str:
        daemon.process(_queue(root, name, 3, name[0]))
        return record(root / "done" / name)["timings"]["model_from"]

    assert train("a.jsonl") == "disk"
    held = training_engine.warm_held()
    params = sum(p.numel() for p in training_engine._WARM[0].model.parameters())
    assert held["device"] == "cpu" and held["bytes"] >= 12 * params  # fp32 weights, two moments
    daemon._warm_room()  # idle from now: within the window, with memory to spare, it stays
    kept = daemon._memory_kept()
    assert kept["bytes"] == held["bytes"] and kept["device"] == "cpu"
    assert 55 < parse_time(kept["until"]) - time.time() <= 60
    assert train("b.jsonl") == "memory"  # as if it had been queued behind a

    daemon._warm_room()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(total, 1 << 30))
    daemon._warm_room()
    assert training_engine.warm_held() is not None  # 10% available: kept
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(total, (1 << 30) - 1))
    daemon._warm_room()
    assert training_engine.warm_held() is None and daemon._memory_kept() is None
    assert "memory runs short (1024 of 10240 MiB free)" in caplog.text and "next file loads them from disk" in caplog.text
    monkeypatch.setattr(psutil, "virtual_memory", real_memory)
    assert train("c.jsonl") == "disk"

    daemon._warm_room()
    daemon._idle_since -= 59
    daemon._warm_room()
    assert training_engine.warm_held() is not None and not daemon._idle_interrupted()
    daemon._idle_since -= 1
    assert daemon._idle_interrupted() and daemon._gave_way == "memory"  # an idle eval gives way
    daemon._warm_room()
    assert training_engine.warm_held() is None and "idle for 60 s (keep_warm_seconds)" in caplog.text
    assert train("d.jsonl") == "disk"

    # a file that waits for a lock (a restore holds it) does not hold the memory past the window
    waiting = _queue(root, "e.jsonl", 3, "e")
    held_lock, let_go = threading.Event(), threading.Event()

    def restore():  # another thread: the daemon's own thread would re-enter the lock
        with trainroot.model_lock(root, "a restore", timeout=1):
            held_lock.set()
            let_go.wait(30)
    other = threading.Thread(target=restore)
    other.start()
    assert held_lock.wait(30)
    daemon.process(waiting)
    assert training_engine.warm_held() is not None and waiting.exists()
    daemon._idle_since -= 60
    daemon.process(waiting)
    assert training_engine.warm_held() is None and waiting.exists()
    let_go.set()
    other.join()
    daemon.process(waiting)
    assert record(root / "done" / "e.jsonl")["timings"]["model_from"] == "disk"

    set_config(root, keep_warm_seconds=0)  # config.json changed: the next tick frees them
    daemon._warm_room()
    assert training_engine.warm_held() is None and "config.json changed" in caplog.text
    assert train("f.jsonl") == "disk"

    daemon.set_state("paused", "look at the loss", "request")
    daemon._warm_room()
    assert training_engine.warm_held() is None and "the daemon is paused" in caplog.text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_memory_check_reads_the_cgroup_limit_a_container_sets(tmp_path, version):
    """In a container psutil sees the host's memory: the check reads the cgroup's limit and
    use (less the page cache the kernel can reclaim), found through /proc/self/cgroup."""
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/box\n")
        base, names = tmp_path / "box", ("memory.max", "memory.current", "inactive_file")
    else:
        proc.write_text("5:devices:/\n4:memory:/box\n0::/\n")
        base, names = tmp_path / "memory" / "box", (
            "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    base.mkdir(parents=True)
    (base / names[0]).write_text(f"{8 << 30}\n")
    (base / names[1]).write_text(f"{7 << 30}\n")
    (base / "memory.stat").write_text(f"anon 123\n{names[2]} {2 << 30}\n")
    assert training_daemon._cgroup_memory(proc, tmp_path) == (8 << 30, 5 << 30)
    (base / names[0]).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert training_daemon._cgroup_memory(proc, tmp_path) is None  # no limit
    assert training_daemon._cgroup_memory(tmp_path / "missing", tmp_path) is None


def test_the_state_tracker_says_what_the_idle_daemon_keeps_in_memory(initialized_root, daemons):
    """A running daemon, idle after a file: the state tracker shows the model and AdamW state
    it keeps (training.memory_kept, in the schema) and the report says until when; a file
    dropped then trains on them; a pause gives them back at once."""
    root = initialized_root
    tune(root, keep_warm_seconds=600)
    d = daemons(root)
    d.wait_ready()
    for name in ("a.jsonl", "b.jsonl"):
        write_data(root / "inbox" / name, 3, name[0])
        wait_for(lambda: (root / "done" / f"{name}.record.json").exists(), 60, name, d.proc)
        kept = wait_for(lambda: d.state().get("memory_kept"), 10, "memory_kept", d.proc)
    assert record(root / "done" / "b.jsonl")["timings"]["model_from"] == "memory"
    doc = json.loads(run_script("state_tracker.py", "--json", root=root, check=True).stdout)
    assert doc["training"]["memory_kept"] == kept and kept["device"] == "cpu" and kept["bytes"] > 0
    text = run_script("state_tracker.py", "--check", root=root, check=True).stdout
    assert f"kept in memory for a next file until {kept['until'][11:19]} UTC" in text, text
    assert run_script("training_controller.py", "pause", root=root).returncode == 0
    wait_for(lambda: d.state().get("state") == "paused" and d.state().get("memory_kept") is None,
             30, "the pause to give the memory back", d.proc)
    assert "the daemon is paused; the next file loads them from disk" in d.output()
    assert d.stop() == 0


def test_a_config_json_broken_while_the_daemon_runs_pauses_it_until_fixed(initialized_root):
    """A hand edit that leaves config.json invalid or unreadable while the daemon runs: the
    next file pauses on pre-flight (the file stays queued), and training goes on by itself
    once config.json reads again; the daemon never exits on it."""
    import training_config
    root = initialized_root
    tune(root)
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    daemon.cfg = training_config.load_config(root)
    job = _queue(root, "f.jsonl", 3, "f")
    good = (root / "config.json").read_text()
    for broken, what in ((json.dumps(dict(json.loads(good), batch_size=0)),
                          "pre-flight: invalid config (batch_size: 0 is out of range"),
                         (good + ",", "pre-flight: corrupt JSON")):
        (root / "config.json").write_text(broken)
        with pytest.raises(training_daemon._Paused) as paused:
            daemon.process(job)
        assert paused.value.error.what.startswith(what), paused.value.error
        assert "training goes on by itself once it reads again" in paused.value.error.fix
        assert job.exists() and data_files(root) == {"queue/normal": ["f.jsonl"]}
        daemon.last_error = str(paused.value.error)  # as the loop keeps it
        daemon.set_state("paused", str(paused.value.error), paused.value.kind)
        daemon._retry_preflight()
        assert daemon.state == "paused"
    (root / "config.json").write_text(good)
    daemon._retry_preflight()
    assert daemon.state == "idle"
    # what paused it is over: not reported as the error of the file that trains next
    assert json.loads((root / ".daemon_state.json").read_text())["last_error"] is None
    assert daemon.process(job) is None
    assert data_files(root) == {"done": ["f.jsonl"]}


def test_a_persons_pause_holds_through_a_preflight_pause_and_resume_says_if_it_pauses_again(
        initialized_root):
    """A pause asked while pre-flight has paused the daemon (a pause that lifts itself once
    its cause is fixed) takes its place and holds until `resume`; a resume that pre-flight
    would pause again at once says so instead of "resumed"."""
    import training_config
    import training_controller as tc
    root = initialized_root
    cfg = tune(root)
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    daemon.cfg = training_config.load_config(root)
    job = _queue(root, "f.jsonl", 3, "f")
    training_config.write_config(root, dict(cfg, learning_rate=0.001))  # not approved

    def asked(action):
        rid = tc.request(root, action)["request"]["id"]
        daemon.control_idle()
        return tc.read_ack(root, rid)

    with pytest.raises(training_daemon._Paused) as paused:
        daemon.process(job)
    daemon.set_state("paused", str(paused.value.error), paused.value.kind)
    ack = asked("pause")
    assert ack["outcome"] == "done" and ack["message"].startswith(
        "paused until `resume` (it was paused on: pre-flight: locked config changed"), ack
    assert (daemon.state, daemon.pause_kind) == ("paused", "request")
    training_config.write_config(root, cfg)  # the cause is fixed: the person's pause holds
    assert daemon.pause_kind == "request"  # (the loop retries pre-flight only for its own kinds)
    training_config.write_config(root, dict(cfg, learning_rate=0.001))
    ack = asked("resume")
    assert ack["outcome"] == "failed" and ack["message"].startswith(
        "resumed, but pre-flight pauses again: pre-flight: locked config changed"), ack
    assert (daemon.state, daemon.pause_kind) == ("paused", "preflight")
    training_config.write_config(root, cfg)
    ack = asked("resume")
    assert ack["outcome"] == "done" and daemon.state == "idle"
    assert daemon.process(job) is None and data_files(root) == {"done": ["f.jsonl"]}


def test_a_second_daemon_is_refused_even_with_the_lock_folder_deleted(initialized_root, daemons):
    """`rm -rf .locks` under a running daemon: the flock a second one takes is a new file,
    so the second also reads the first one's state (its pid, same process, fresh heartbeat)."""
    import shutil
    root = initialized_root
    tune(root)
    d = daemons(root)
    d.wait_ready()
    shutil.rmtree(root / ".locks")
    second = run_script("training_daemon.py", "run", "--no-monitor", root=root, timeout=60)
    assert second.returncode == 3, second.stderr
    assert second.stderr.strip().startswith(
        f"Error: another daemon is running on this root (pid {d.proc.pid}), {root}.")
    assert d.proc.poll() is None
    assert d.stop() == 0, d.output()
    again = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=120)
    assert again.returncode == 0, again.stderr  # the first one gone: starts as always


def test_a_file_put_into_processing_by_hand_is_validated_like_any_other(initialized_root):
    """processing/ holds a file without its record (put there by hand, or its record lost):
    at start-up it goes back to intake, so it is validated and its content hash recorded
    (a later copy is then skipped), and an invalid one fails instead of reaching the engine."""
    root = initialized_root
    tune(root)
    write_data(root / "processing" / "manual.jsonl", 3, "manual")
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert "processing/manual.jsonl: record unreadable, back to intake" in proc.stderr
    assert data_files(root) == {"done": ["manual.jsonl"]}
    assert record(root / "done" / "manual.jsonl")["sha256"] == sha(root / "done" / "manual.jsonl")
    (root / "inbox" / "again.jsonl").write_bytes((root / "done" / "manual.jsonl").read_bytes())
    (root / "processing" / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"done": ["manual.jsonl"], "failed": ["bad.jsonl"],
                                "skipped": ["again.jsonl"]}


def test_run_json_prints_one_document_of_what_the_run_did(initialized_root):
    root = initialized_root
    tune(root)
    (root / "inbox" / "bad.jsonl").write_text("not json\n")
    (root / "inbox" / "later.jsonl").write_text("")
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", "--json", root=root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == {"ok": True, "root": str(root), "once": True, "ended": "queue empty",
                   "files": {"done": 0, "failed": 2, "skipped": 0},
                   "left": {"inbox": 0, "queued": 0, "processing": 0}}
    assert "daemon" in proc.stderr and "stopped (queue empty)" in proc.stderr
    assert json.loads((root / ".daemon_state.json").read_text())["ended_by"] == "once"


def _held(root: Path, name: str, kind: str, reason: str) -> Path:
    """processing/NAME.jsonl as a stopped daemon leaves a file held (a spike, the gate)."""
    import training_queue
    data = write_data(root / "processing" / f"{name}.jsonl", 3, name)
    training_queue.update_record(data, name=f"{name}.jsonl", sha256=sha(data), records=3,
                                 priority="normal", hold={"kind": kind, "reason": reason})
    return data


def test_a_held_file_with_no_daemon_running_is_released_by_resume(initialized_root):
    """A file held in processing/ (a loss spike) when the daemon stopped: `run --once` says
    to resume, and `resume` with no daemon clears the hold (before it found "nothing to
    resume"), so the next run trains it."""
    root = initialized_root
    tune(root)
    data = _held(root, "spiky", "spike", "loss spike at step 3")
    proc = run_once(root)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: spiky.jsonl is on hold: loss spike at step 3, {data}. Inspect it, then run "
        "`python3 training_controller.py resume` (it clears the hold; no daemon needed), then "
        "run `python3 training_daemon.py run --once` again.")
    # ended on an error, not on request: the report must not take it for a stop on purpose
    last = json.loads((root / ".daemon_state.json").read_text())
    assert last["ended_by"] == "error" and last["last_error"].startswith(
        "spiky.jsonl is on hold: loss spike at step 3")  # (the report's DAEMON_DEAD names it)
    resumed = run_script("training_controller.py", "resume", root=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "the hold on spiky.jsonl (loss spike at step 3)" in resumed.stdout
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert data_files(root) == {"done": ["spiky.jsonl"]}


def test_skipping_the_file_a_loss_spike_paused_on_lets_the_queue_go_on(initialized_root):
    """The spike's pause is that file's (a restart would not pause again once it is gone):
    skipped, the daemon goes back to idle; a person's pause would have stayed. So is the
    pause of an engine that refused to go on with the file."""
    import training_config
    import training_controller as tc
    root = initialized_root
    tune(root)
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    daemon.cfg = training_config.load_config(root)
    data = _held(root, "spiky", "spike", "loss spike at step 3")
    daemon.process(data)
    assert (daemon.state, daemon.pause_kind) == ("paused", "spike")
    rid = tc.request(root, "skip")["request"]["id"]
    daemon.control_idle()
    assert tc.read_ack(root, rid)["outcome"] == "done"
    assert daemon.state == "idle" and data_files(root) == {"skipped": ["spiky.jsonl"]}
    # a person who paused meanwhile: their pause takes the spike's place and outlives the skip
    data = _held(root, "spiky2", "spike", "loss spike at step 5")
    daemon.process(data)
    for action in ("pause", "skip"):
        rid = tc.request(root, action)["request"]["id"]
        daemon.control_idle()
        assert tc.read_ack(root, rid)["outcome"] == "done", action
    assert (daemon.state, daemon.pause_kind) == ("paused", "request")
    assert data_files(root) == {"skipped": ["spiky.jsonl", "spiky2.jsonl"]}
    # the engine refused to go on with the file (resumed under another chat_template): the
    # pause is that file's too, and its error message's fix is `skip --discard`
    daemon.set_state("idle")
    data = write_data(root / "processing" / "halfway.jsonl", 3, "halfway")
    import training_queue
    training_queue.update_record(data, name="halfway.jsonl", sha256=sha(data), records=3,
                                 priority="normal")
    daemon.last_error = "config.json's chat_template changed since halfway.jsonl started"
    daemon.set_state("paused", daemon.last_error, "engine")
    rid = tc.request(root, "skip")["request"]["id"]
    daemon.control_idle()
    assert tc.read_ack(root, rid)["outcome"] == "done"
    assert daemon.state == "idle" and daemon.last_error is None
    assert data_files(root)["skipped"] == ["halfway.jsonl", "spiky.jsonl", "spiky2.jsonl"]


def test_a_part_trained_file_whose_record_is_damaged_resumes_from_its_checkpoint(
        initialized_root, tiny_model_dir, daemons, tmp_path):
    """Stopped part-way, then its record damaged: the record is rebuilt from the checkpoint
    that names this content (the damaged one kept aside), so the file resumes there, bit for
    bit as an uninterrupted run, instead of training its first steps twice."""
    root = initialized_root
    twin, uninterrupted, d = _three_steps_in_beside_a_twin(root, tiny_model_dir, daemons, tmp_path)
    stop = run_script("training_controller.py", "stop", "--wait", "60", root=root)
    assert stop.returncode == 0, stop.stderr
    d.close()
    assert data_files(root) == {"processing": ["long.jsonl"]}
    (root / "processing" / "long.jsonl.record.json").write_text("{damaged")
    proc = run_once(root)
    assert proc.returncode == 0, proc.stderr
    assert "record unreadable, rebuilt from checkpoint-" in proc.stderr
    assert data_files(root) == {"done": ["long.jsonl"]}
    [aside] = [n for n in os.listdir(root / ".attic") if n.startswith("long.jsonl.record.json.damaged-")]
    assert (root / ".attic" / aside).read_text() == "{damaged"  # kept, not deleted
    assert uninterrupted.proc.wait(120) == 0, uninterrupted.output()
    assert _trained_state(root) == _trained_state(twin)  # same step, bitwise-equal weights


def test_resume_with_no_daemon_refuses_a_gate_hold_before_changing_anything(initialized_root):
    root = initialized_root
    tune(root)
    data = _held(root, "gated", "gate", "held by the gate")
    kept = run_script("training_controller.py", "pause", root=root)
    assert kept.returncode == 0, kept.stderr
    proc = run_script("training_controller.py", "resume", root=root)
    assert proc.returncode == 1 and "resume does not decide it (nothing was changed)" in proc.stderr
    assert "`python3 training_controller.py accept`" in proc.stderr
    status = run_script("training_controller.py", "status", "--json", root=root)
    assert json.loads(status.stdout)["kept_pause"] is not None  # the kept pause is still there
    assert record(data)["hold"]["kind"] == "gate"


def test_a_held_file_of_a_stopped_daemon_is_said_held_with_what_clears_it(initialized_root):
    root = initialized_root
    tune(root)
    _held(root, "spiky", "spike", "loss spike at step 3")
    status = run_script("training_queue.py", "status", root=root)
    assert ("stopped part-way: spiky.jsonl (held: loss spike at step 3; `python3 "
            "training_controller.py resume` clears it)") in status.stdout, status.stdout
    state = json.loads((root / ".daemon_state.json").read_text()) if (root / ".daemon_state.json").exists() else {}
    (root / ".daemon_state.json").write_text(json.dumps(dict(state, pid=None, state="stopped", ended_by="request")))
    report = json.loads(run_script("state_tracker.py", "--json", root=root).stdout)
    [w] = [x for x in report["warnings"] if x["code"] == "DAEMON_NOT_RUNNING"]
    assert "it is held (loss spike at step 3)" in w["message"] and "training_controller.py resume" in w["message"]


def test_automatic_backups_one_at_a_time_of_versions_retention_keeps_for_them(initialized_root):
    """keep_last 1 and a backup after every file: the automatic backup (idle priority, slower
    than a tiny file) copies a version the next files' retention would prune; and a backup
    that ended while the next was due started the waiting one and a second beside it, the
    first never looked at again. Every backup must finish verified, one at a time."""
    root = initialized_root
    tune(root, backup_every_files=1, retention={"versions": {"keep_last": 1}})
    for i in range(6):
        write_data(root / "inbox" / f"f{i}.jsonl", 2, f"f{i}")
    proc = run_once(root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "automatic backup failed" not in proc.stderr
    started = proc.stderr.count("automatic backup of ")
    assert started >= 2 and proc.stderr.count("automatic backup done") == started, proc.stderr[-3000:]
    listed = json.loads(run_script("backup_manager.py", "list", "--json", root=root).stdout)["backups"]
    assert listed and all(b["status"] == "verified" for b in listed), listed
    assert listed[-1]["global_step"] == max(b["global_step"] for b in listed)


def test_a_log_file_the_disk_refuses_is_said_once_not_a_traceback_a_line(tmp_path, capsys):
    import errno
    import logging

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass
    handler = training_daemon._LogFile(tmp_path / "daemon.log")
    handler.stream = Full()
    records = [logging.LogRecord("t", logging.INFO, __file__, 1, f"line {i}", None, None) for i in range(5)]
    for record in records:
        handler.emit(record)
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "Traceback" not in err, err
    handler.stream = open(tmp_path / "daemon.log", "a")  # room again: said again next time
    handler.emit(records[0])
    handler.stream = Full()
    handler.emit(records[1])
    assert capsys.readouterr().err.count("cannot write") == 1
    handler.close()


def test_preflight_pauses_on_a_current_model_whose_versioned_bytes_changed_in_place(
        initialized_root):
    """Regression: bytes written into current_model's weights (hard links shared with the
    version it is) passed pre-flight: the file trained to a NaN, then the version to go back
    to was damaged too and the daemon died. A moved time stamp alone (`touch`) still trains."""
    import model_versioner
    root = initialized_root
    tune(root)
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    import training_config
    daemon.cfg = training_config.load_config(root)
    weights = root / "current_model" / "model.safetensors"
    os.utime(weights)  # the same bytes, a new mtime: the checksums say it is as versioned
    job = _queue(root, "f.jsonl", 3, "f")
    assert daemon.process(job) is None and data_files(root) == {"done": ["f.jsonl"]}
    vid = model_versioner.current_version(root)
    with open(weights, "r+b") as f:  # a byte changed where the tensors are
        f.seek(weights.stat().st_size - 64)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    job = _queue(root, "g.jsonl", 3, "g")
    with pytest.raises(training_daemon._Paused) as paused:
        daemon.process(job)
    message = str(paused.value.error)
    assert message.startswith(f"pre-flight: current_model's files changed since they were "
                              f"versioned as {vid}, whose files they are (hard links): "
                              f"{vid}/model.safetensors: sha256 mismatch"), message
    parent = model_versioner.read_version(root, vid)["parent"]
    assert f"`python3 model_versioner.py restore {parent}" in message
    assert data_files(root)["done"] == ["f.jsonl"]  # g.jsonl waits, untrained


def test_a_failed_automatic_backup_pause_holds_across_restarts_until_resume(initialized_root, tmp_path):
    """Regression: the pause on a failed automatic backup died with the daemon, and the next
    start trained the next file without a backup (SPEC §12: pause instead)."""
    root = initialized_root
    (tmp_path / "a-file").write_text("")
    tune(root, backup_dir=str(tmp_path / "a-file" / "backups"), backup_every_files=1)
    write_data(root / "inbox" / "c.jsonl", 4, "c")
    first = run_once(root)
    assert first.returncode == 1 and "automatic backup failed: cannot create backup_dir" in first.stderr
    write_data(root / "inbox" / "d.jsonl", 4, "d")
    second = run_once(root)
    assert second.returncode == 1 and "paused on a failed backup since" in second.stderr, second.stderr
    assert data_files(root)["done"] == ["c.jsonl"]  # d.jsonl waits: no file trains unbacked
    assert json.loads((root / "control" / "paused.json").read_text())["kind"] == "backup"
    resumed = run_script("training_controller.py", "resume", root=root)
    assert resumed.returncode == 0, resumed.stderr
    third = run_once(root)  # resumed: d trains, its backup fails again and pauses again
    assert third.returncode == 1 and data_files(root)["done"] == ["c.jsonl", "d.jsonl"]


def test_skip_with_no_daemon_on_a_file_the_gate_holds_names_accept_and_reject(initialized_root):
    """Regression: `skip` said the held file was stopped part-way and named the pause,
    start, skip, resume recipe, whose skip the daemon then refuses for a gate-held file.
    Refused (exit 1, nothing changed), with or without a daemon, naming reject and accept."""
    root = initialized_root
    _held(root, "worse", "gate", "quality gate: eval loss up 8.1%")
    proc = run_script("training_controller.py", "skip", root=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "worse.jsonl is held by the quality gate: skip does not decide it (nothing was " \
           "changed)" in proc.stderr and "`python3 training_controller.py reject`" in proc.stderr
    assert "training_controller.py accept" in proc.stderr and "stopped part-way" not in proc.stderr
    assert (root / "processing" / "worse.jsonl").exists()
