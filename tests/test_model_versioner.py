"""model_versioner: immutable versions, atomic publish, undoable rollback/restore, kill -9 safety."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import model_versioner as mv
from conftest import run_script
from trainroot import FileLock, GuardrailError, Paths, fsync_dir, utc_now


# --------------------------------------------------------------------------- fake models

def make_model(folder: Path, gen: int, size: int = 4096) -> Path:
    """A small HF-shaped folder: config.json + a real safetensors header + bytes tied to `gen`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "fake", "gen": gen}))
    n = size // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    body = struct.pack("<Q", len(header)) + header + bytes([gen % 251]) * (n * 4)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": gen * 10,
                                                           "tokens_seen": gen * 1000}))
    fsync_dir(folder)
    return folder


def model_gen(folder: Path) -> int:
    """The generation a folder holds; fails if config and weights come from different saves."""
    gen = json.loads((folder / "config.json").read_text())["gen"]
    data = (folder / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    assert set(data[8 + hlen:]) == {gen % 251}, f"{folder}: weights of another save than config"
    return gen


def train(root: Path, gen: int, keep_old: str = "if-unversioned") -> dict:
    """What the trainer does: save into .staging/, then publish."""
    staged = make_model(Paths(root).staging / f"save-{gen}-{time.time_ns()}", gen)
    return mv.publish_model(root, staged, reason=f"train gen {gen}", keep_old=keep_old)


@pytest.fixture
def root(tmp_root) -> Path:
    Paths(tmp_root).ensure()
    train(tmp_root, 1)
    assert mv.create_version(tmp_root, "init") == ("v001", True)
    return tmp_root


def cli(capsys, *args) -> tuple[int, str, str]:
    code = mv.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def files_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- versions

def test_snapshot_is_hard_linked_read_only_and_complete(root):
    p = Paths(root)
    v1 = p.versions / "v001"
    rec = json.loads((v1 / "version.json").read_text())
    assert rec["id"] == "v001" and rec["reason"] == "init" and rec["parent"] is None
    assert rec["global_step"] == 10 and rec["tokens_seen"] == 1000
    assert set(rec["manifest"]) == {"config.json", "model.safetensors", "trainer_state.json"}
    for rel in rec["manifest"]:
        assert (v1 / rel).stat().st_ino == (p.current_model / rel).stat().st_ino
    for f in v1.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o444, f
    assert mv.current_version(root) == "v001"
    assert mv.create_version(root, "manual") == ("v001", False)  # unchanged: nothing new
    assert mv.create_version(root, "manual", force=True) == ("v002", True)
    assert mv.verify_version(root, "v002") == []


def test_snapshot_cli_json_and_note(root, capsys):
    train(root, 2)
    code, out, _ = cli(capsys, "snapshot", "--note", "before risky data", "--json")
    assert code == 0
    vid = json.loads(out)["version"]
    rec = mv.read_version(root, vid)
    assert rec["note"] == "before risky data" and rec["parent"] == "v001"
    code, out, _ = cli(capsys, "snapshot", "--json")
    assert json.loads(out) == {"ok": True, "version": vid, "created": False}


def test_publish_never_touches_version_files(root):
    """Versions share inodes with current_model: a publish must replace by rename, never write."""
    mv.create_version(root, "manual", force=True)
    p = Paths(root)
    before = files_state(p.versions)
    res = train(root, 2)                              # v001-equal tree is discarded
    assert res["method"] == "exchange" and res["kept_version"] is None
    res = train(root, 3)                              # unversioned gen 2 is kept first
    assert res["kept_version"] == "v003"
    assert mv.read_version(root, "v003")["reason"] == "superseded"
    assert model_gen(p.versions / "v003") == 2
    res = train(root, 4, keep_old="never")            # the trainer replacing its own save
    assert res["kept_version"] is None and res["parent_version"] == "v003"
    after = files_state(p.versions)
    notes = (mv.PUBLISHED, mv.LAST_ID)  # the note of the last publish, the highest id given
    assert {k: v for k, v in after.items() if k in before and k not in notes} == \
        {k: v for k, v in before.items() if k not in notes}
    assert model_gen(p.current_model) == 4 and mv.check_model_dir(p.current_model) == []
    for f in p.current_model.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o444, f
    assert not any(n.startswith("mv-") for n in os.listdir(p.staging))


def test_publish_refuses_incomplete_model(root):
    staged = Paths(root).staging / "half"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    with pytest.raises(mv.GuardrailError) as exc:
        mv.publish_model(root, staged, reason="t")
    assert str(exc.value) == (f"refusing to publish an incomplete model (no weights file "
                              f"(*.safetensors or *.bin)), {staged}. Save the model again into "
                              "a fresh folder under .staging/ and publish that.")
    assert model_gen(Paths(root).current_model) == 1


def test_rollback_then_undo(root, capsys):
    p = Paths(root)
    mv.create_version(root, "pre-train:a.jsonl")  # equal to v001: nothing new
    train(root, 2)
    t0 = time.perf_counter()
    code, out, _ = cli(capsys, "rollback", "--json")
    assert time.perf_counter() - t0 < 1.0
    res = json.loads(out)
    assert code == 0 and res["restored"] == "v001" and res["kept_version"] == "v002"
    assert res["undo"] == "python3 model_versioner.py restore v002"
    assert model_gen(p.current_model) == 1 and mv.current_version(root) == "v001"
    assert mv.read_version(root, "v002")["reason"] == "pre-rollback"
    code, out, _ = cli(capsys, "restore", "v002")     # the undo
    assert code == 0 and out.splitlines()[0] == "Restored current_model to v002."
    assert model_gen(p.current_model) == 2 and mv.current_version(root) == "v002"
    assert len(mv.list_versions(root)) == 2          # v002 was already a version: none added
    code, out, _ = cli(capsys, "restore", "v002")
    assert out.strip() == "current_model already equals v002; nothing to do."


def test_rollback_with_nothing_before(root, capsys):
    code, _, err = cli(capsys, "rollback")
    assert code == 1
    assert err.strip() == (f"Error: nothing to roll back to (current_model has no earlier "
                           f"version), {Paths(root).versions}. See what exists with "
                           "`python3 model_versioner.py list`.")


@pytest.mark.parametrize("how", ["current_model", "current_model/"])
def test_rm_rf_current_model_restored_in_one_command(root, how):
    train(root, 2)
    mv.create_version(root, "manual")
    subprocess.run(["rm", "-rf", how], cwd=root, check=True)
    assert not (root / "current_model").exists() and mv.latest_version(root) == "v002"
    proc = run_script("model_versioner.py", "restore", "latest", root=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "Restored current_model to v002."
    cur = Paths(root).current_model
    assert mv.check_model_dir(cur) == [] and model_gen(cur) == 2
    assert mv.verify_files(cur, mv.read_manifest(cur)["files"]) == []


def test_verify_catches_a_flipped_byte(root, capsys):
    train(root, 2)
    mv.create_version(root, "manual")
    target = Paths(root).versions / "v001" / "model.safetensors"
    with open(target, "r+b") as f:            # root ignores 0444: exactly the mistake to catch
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert mv.check_model_dir(target.parent) == []   # the cheap check cannot see it
    code, out, err = cli(capsys, "verify", "--all", "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["versions"]["v002"] == {"ok": True, "problems": []}
    assert doc["versions"]["v001"]["problems"] == [
        "v001/model.safetensors: sha256 mismatch (changed after it was recorded)"]
    assert err.splitlines() == [
        f"Error: v001/model.safetensors: sha256 mismatch (changed after it was recorded), "
        f"{Paths(root).versions}. No backup holds v001; restore a sound version instead: "
        "`python3 model_versioner.py restore v002` (the newest that verified; `python3 "
        "model_versioner.py verify v002` recomputes its checksums)."]
    assert cli(capsys, "verify", "v002")[0] == 0
    assert cli(capsys, "verify")[0] == 0          # default: the latest
    code, _, err = cli(capsys, "verify", "v001")  # v002 not verified now: the cheap check
    assert code == 1 and "`python3 model_versioner.py restore v002` (the newest that passes " \
        "the cheap check;" in err


def test_verify_names_the_backup_that_holds_a_damaged_version(root, capsys):
    import backup_manager
    assert backup_manager.main(["backup", "v001", "--root", str(root), "--json"]) == 0
    backup_id = json.loads(capsys.readouterr().out)["id"]
    target = Paths(root).versions / "v001" / "model.safetensors"
    with open(target, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, _, err = cli(capsys, "verify", "v001")
    assert code == 1 and err.strip().endswith(
        f"Its verified backup {backup_id} holds it: `python3 backup_manager.py repair v001` "
        "puts its bytes back (in current_model too where it shares them).")
    assert backup_manager.main(["repair", "v001", "--root", str(root)]) == 0  # the fix works
    assert cli(capsys, "verify", "v001")[0] == 0
    cur = Paths(root).current_model
    assert mv.verify_files(cur, mv.read_manifest(cur)["files"]) == [] and model_gen(cur) == 1


def test_a_version_file_swapped_for_a_symbolic_link_fails_verify_and_restore(root, capsys, tmp_path):
    """Same bytes, kept outside the version: `verify` said ok and `restore` put the link into
    current_model, which broke when the outside copy went."""
    train(root, 2)
    mv.create_version(root, "manual")
    folder = Paths(root).versions / "v001"
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(folder / "model.safetensors", outside)
    os.unlink(folder / "model.safetensors")  # (root ignores the version's read-only modes)
    (folder / "model.safetensors").symlink_to(outside)
    code, out, _ = cli(capsys, "verify", "v001", "--json")
    assert code == 1
    assert json.loads(out)["versions"]["v001"]["problems"] == [
        f"v001/model.safetensors: a symbolic link to {outside}, not a file of its own (its bytes "
        "live elsewhere)"]
    code, _, err = cli(capsys, "restore", "v001")
    assert code == 1 and "symbolic link" in err, err
    assert model_gen(Paths(root).current_model) == 2 and not any(
        f.is_symlink() for f in Paths(root).current_model.rglob("*"))


def test_prune_keeps_tagged_latest_current_and_not_backed_up(root, capsys):
    """Backups pin no version (was: every backup kept its source version forever, 1,002 of
    1,047 kept versions at 10,000): a backup is an independent copy."""
    p = Paths(root)
    for gen in range(2, 8):
        train(root, gen)
        mv.create_version(root, f"pre-train:f{gen}.jsonl",
                          data_files=[{"name": f"f{gen}.jsonl", "sha256": f"{gen:064x}"}])
    ids = [r["id"] for r in mv.list_versions(root)]
    assert ids == [f"v{i:03d}" for i in range(1, 8)]
    assert cli(capsys, "tag", "v002", "golden")[0] == 0
    mv.restore_version(root, "v004")                 # current_model equals v004
    backup = p.default_backups / "b-1"
    backup.mkdir(parents=True)
    (backup / "backup.json").write_text(json.dumps({"version": "v003"}))
    (p.default_backups / "junk").mkdir()
    (p.default_backups / "junk" / "backup.json").write_text("[not a dict")
    code, out, _ = cli(capsys, "prune", "--keep", "1", "--json")
    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["deleted"] == []
    assert plan["delete"] == ["v001", "v003", "v005", "v006"]
    assert plan["keep"]["v002"] == ["tag golden"] and "v003" not in plan["keep"]
    assert plan["keep"]["v004"] == ["current_model"]
    assert plan["keep"]["v007"] == ["last 1", "latest"]
    assert plan["policy"]["keep_last"] == 1 and plan["policy"]["keep_daily"] == 0
    assert [r["id"] for r in mv.list_versions(root)] == ids   # dry run deleted nothing
    code, out, _ = cli(capsys, "prune", "--keep", "1", "--yes", "--json")
    assert json.loads(out)["deleted"] == ["v001", "v003", "v005", "v006"]
    assert [r["id"] for r in mv.list_versions(root)] == ["v002", "v004", "v007"]
    assert not any(n.startswith(".staging") for n in os.listdir(p.versions))
    # lineage survives pruning: the records of v005/v006 stay in versions/.pruned/
    code, out, _ = cli(capsys, "lineage", "v007", "--json")
    doc = json.loads(out)
    assert doc["chain"] == ["v001", "v002", "v003", "v004", "v005", "v006", "v007"]
    assert [f["name"] for f in doc["data_files"]] == [f"f{g}.jsonl" for g in range(2, 8)]
    train(root, 9)
    mv.create_version(root, "manual")                # v008, not a reuse of a pruned id
    assert mv.latest_version(root) == "v008"
    plan = mv.prune(root, keep=1, yes=True)
    assert plan["deleted"] == ["v004", "v007"]               # no longer current or latest
    assert mv.latest_version(root) == "v008"


def test_tags(root, capsys):
    train(root, 2)
    mv.create_version(root, "manual")
    assert cli(capsys, "tag", "v001", "base")[0] == 0
    code, _, err = cli(capsys, "tag", "v002", "base")
    assert code == 1 and err.strip() == (
        f"Error: tag base already names v001, {Paths(root).versions / 'tags.json'}. "
        "Run `python3 model_versioner.py untag base` first.")
    assert cli(capsys, "restore", "base")[0] == 0 and model_gen(Paths(root).current_model) == 1
    code, out, _ = cli(capsys, "list", "--json")
    rows = {r["id"]: r for r in json.loads(out)["versions"]}
    assert rows["v001"]["tags"] == ["base"] and rows["v001"]["current"] is True
    assert cli(capsys, "untag", "base")[0] == 0
    assert json.loads((Paths(root).versions / "tags.json").read_text()) == {}
    assert cli(capsys, "tag", "v001", "v7")[0] == 2


@pytest.mark.parametrize("damage", ['{"golden": "v002",}\n', '["v002"]', '{"golden": 2}'])
def test_a_damaged_tags_file_stops_prune_and_tag_instead_of_reading_as_no_tags(root, capsys, damage):
    """A hand edit that breaks tags.json once read as "no tags": prune (and the daemon's
    retention after every file) deleted the tagged versions, and `tag` wrote the file over."""
    import state_tracker
    p = Paths(root)
    for gen in (2, 3, 4):
        train(root, gen)
        mv.create_version(root, "manual")
    assert cli(capsys, "tag", "v002", "golden")[0] == 0
    (p.versions / "tags.json").write_text(damage)
    for args in (("prune", "--keep", "1", "--yes"), ("prune", "--keep", "1"), ("tag", "v003", "other"),
                 ("untag", "golden")):
        code, _, err = cli(capsys, *args)
        assert code == 1 and "versions/tags.json is damaged" in err and "nothing was pruned" in err, err
        assert "python3 -m json.tool" in err
    with pytest.raises(GuardrailError):
        mv.prune(root, keep=1, yes=True)  # what the daemon's retention calls
    assert [r["id"] for r in mv.list_versions(root)] == ["v001", "v002", "v003", "v004"]
    assert (p.versions / "tags.json").read_text() == damage  # not written over
    w = {x["code"]: x for x in state_tracker.build_state(root)["warnings"]}["TAGS_DAMAGED"]
    assert "delete nothing until it is fixed" in w["message"] and "json.tool" in w["fix"]
    (p.versions / "tags.json").write_text('{"golden": "v002"}')
    assert mv.prune(root, keep=1, yes=True)["deleted"] == ["v001", "v003"]
    assert "TAGS_DAMAGED" not in {x["code"] for x in state_tracker.build_state(root)["warnings"]}


def test_a_rollback_past_pruned_versions_names_every_file_it_undoes(root, capsys):
    """Retention pruned the versions between: the version before the last file is gone, so
    rollback goes back further, which undid b, c and d while saying nothing of it."""
    for gen, name in ((2, "a"), (3, "b"), (4, "c"), (5, "d")):
        train(root, gen)
        mv.create_version(root, f"post-train:{name}.jsonl",
                          data_files=[{"name": f"{name}.jsonl", "sha256": f"{gen:064x}"}])
    assert cli(capsys, "tag", "v002", "golden")[0] == 0
    assert mv.prune(root, keep=1, yes=True)["deleted"] == ["v001", "v003", "v004"]
    code, out, _ = cli(capsys, "rollback")
    assert code == 0
    assert out.splitlines()[:2] == [
        "Rolled back current_model to v002.",
        "This undoes 3 trained files, not only the last: b.jsonl (v003), c.jsonl (v004), d.jsonl "
        "(v005) (the versions between them were pruned). Their copies are in done/."]
    assert model_gen(Paths(root).current_model) == 2


def test_prune_keeps_the_version_current_model_was_when_it_went_missing(root, capsys):
    """After a rollback, `rm -rf current_model`: the report names the version it was (not
    the newer one rolled back); prune must not delete exactly that way back."""
    import state_tracker
    for gen in (2, 3):
        train(root, gen)
        mv.create_version(root, "manual")
    assert cli(capsys, "rollback")[0] == 0          # current_model = v002, latest v003
    shutil.rmtree(Paths(root).current_model)
    w = {x["code"]: x for x in state_tracker.build_state(root)["warnings"]}["MODEL_MISSING"]
    assert "restore v002" in w["fix"]
    plan = mv.prune(root, keep=1, yes=True)
    assert plan["deleted"] == ["v001"] and "current_model was it when it went missing" in plan["keep"]["v002"]
    assert cli(capsys, "restore", "v002")[0] == 0 and model_gen(Paths(root).current_model) == 2


@pytest.mark.parametrize("bad", ["../x", "v1/..", "/abs", "v001/../../etc", "", "v0", "v000"])
@pytest.mark.parametrize("command", ["show", "restore", "verify", "lineage"])
def test_path_traversal_ids_rejected(root, capsys, command, bad):
    code, out, err = cli(capsys, command, bad)
    assert code == 2 and out == ""
    assert err.strip() == (f"Error: invalid version id {bad!r} (expected vNNN such as v003, a "
                           f"tag, or latest), {Paths(root).versions}. Run `python3 "
                           "model_versioner.py list` to see the versions.")
    assert model_gen(Paths(root).current_model) == 1


def test_refuses_while_the_daemon_trains(root, capsys):
    p = Paths(root)
    train(root, 2)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p.daemon_state.write_text(json.dumps({
            "schema_version": 1, "pid": sleeper.pid, "state": "training", "heartbeat": utc_now(),
            "current_file": {"name": "a.jsonl", "sha256": "0" * 64, "priority": "normal"}}))
        for args in (["rollback"], ["restore", "v001"]):
            code, _, err = cli(capsys, *args)
            assert code == 3
            assert err.strip() == (f"Error: the daemon (pid {sleeper.pid}) is training a.jsonl, "
                                   f"{root}. Stop it first with `python3 training_controller.py "
                                   "stop`, then run this again.")
        assert model_gen(p.current_model) == 2
    finally:
        sleeper.kill()
        sleeper.wait()
    assert cli(capsys, "rollback")[0] == 0           # the pid is dead: not trusted any more
    assert model_gen(p.current_model) == 1


def test_lock_keeps_commands_apart(root):
    with FileLock(Paths(root).lock("versions"), "test holder"):
        with pytest.raises(mv.BusyError) as exc:
            with mv._versions_lock(Paths(root), "snapshot", timeout=0.1):
                pass
    assert "busy: held by pid" in str(exc.value) and "(test holder)" in str(exc.value)
    assert mv.recover(root)["skipped"] is None


def test_show_and_lineage(root, capsys):
    train(root, 2)
    mv.create_version(root, "post-train:a.jsonl", loss=1.5,
                      data_files=[{"name": "a.jsonl", "sha256": "a" * 64}])
    train(root, 3)
    mv.create_version(root, "post-train:b.jsonl", data_files=[{"name": "b.jsonl", "sha256": "b" * 64}])
    code, out, _ = cli(capsys, "show", "v002", "--json")
    rec = json.loads(out)["version"]
    assert rec["loss"] == 1.5 and rec["parent"] == "v001" and rec["global_step"] == 20
    code, out, _ = cli(capsys, "lineage", "latest")
    assert out.splitlines()[0] == "v001 -> v002 -> v003"
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["a.jsonl", "b.jsonl"]


def test_recover_cleans_only_its_own_staging(root):
    p = Paths(root)
    (p.versions / ".staging-123").mkdir()
    (p.versions / ".staging-123" / "model.safetensors").write_bytes(b"half")
    (p.staging / "mv-publish-9").mkdir()
    (p.staging / "someone-elses-save").mkdir()
    assert [r["id"] for r in mv.list_versions(root)] == ["v001"]
    res = mv.recover(root)
    assert res["actions"] == ["removed .staging/mv-publish-9", "removed versions/.staging-123"]
    assert (p.staging / "someone-elses-save").is_dir()


def test_rename_dance_and_its_recovery(root, monkeypatch):
    """Where renameat2 is missing: a rename dance, and a crash in its middle recovered at start."""
    p = Paths(root)
    monkeypatch.setenv("GUARDRAILS_NO_RENAME_EXCHANGE", "1")
    assert train(root, 2)["method"] == "dance" and model_gen(p.current_model) == 2
    # the crash: intent written, current_model moved aside, new tree not yet renamed in
    new = make_model(p.staging / "mv-publish-1", 3)
    mv.write_manifest(new)
    os.rename(p.current_model, p.staging / "mv-old-1")
    (p.staging / "mv-dance.json").write_text(json.dumps({"new": new.name, "old": "mv-old-1"}))
    assert mv.recover(root)["actions"][0] == "finished an interrupted swap of current_model"
    assert model_gen(p.current_model) == 3 and os.listdir(p.staging) == []


def test_real_tiny_model_loads_after_restore(tmp_root, tiny_model_dir):
    import transformers
    p = Paths(tmp_root).ensure()
    shutil.copytree(tiny_model_dir, p.staging / "base")
    mv.publish_model(tmp_root, p.staging / "base", reason="init")
    assert mv.create_version(tmp_root, "init") == ("v001", True)
    shutil.rmtree(p.current_model)
    assert mv.restore_version(tmp_root, "latest")["restored"] == "v001"
    model = transformers.AutoModelForCausalLM.from_pretrained(p.current_model)
    assert sum(t.numel() for t in model.parameters()) > 0
    assert mv.verify_version(tmp_root, "v001") == []


# --------------------------------------------------------------------------- kill -9

def _busy_child(root: Path, seed: int, out_fd: int, dance: bool) -> None:
    """Runs in a forked child until SIGKILL: train/snapshot/rollback/restore in a loop."""
    if dance:
        os.environ["GUARDRAILS_NO_RENAME_EXCHANGE"] = "1"
    rng = random.Random(seed)
    gen = seed * 1000
    while True:
        op = rng.choice(["train", "train", "snapshot", "rollback", "restore"])
        try:
            if op == "train":
                gen += 1
                train(root, gen, keep_old=rng.choice(["if-unversioned", "never"]))
            elif op == "snapshot":
                mv.create_version(root, "manual")
            elif op == "rollback":
                mv.rollback(root)
            else:
                mv.restore_version(root, rng.choice([r["id"] for r in mv.list_versions(root)]))
        except mv.GuardrailError:
            pass
        os.write(out_fd, b".")


def _check_consistent(root: Path, verified: set) -> None:
    """current_model complete (hashes) and one save; every version intact (new ones hashed)."""
    p = Paths(root)
    cur = p.current_model
    assert mv.check_model_dir(cur) == [], mv.check_model_dir(cur)
    assert mv.verify_files(cur, mv.read_manifest(cur)["files"]) == []
    model_gen(cur)
    for rec in mv.list_versions(root):
        assert mv.check_version(root, rec["id"]) == [], rec["id"]
        if rec["id"] not in verified:  # versions are immutable: hash each one once
            assert mv.verify_version(root, rec["id"]) == [], rec["id"]
            model_gen(p.versions / rec["id"])
            verified.add(rec["id"])


def test_kill_9_at_random_points_never_breaks_current_model_or_versions(root):
    """A real process killed with SIGKILL mid-operation, 60 times (fork: no interpreter start)."""
    p = Paths(root)
    rng = random.Random(4)
    kills = mid_operation = ops = 0
    verified: set = set()
    for i in range(60):
        dance = i % 3 == 2   # every third child runs without renameat2: the rename dance
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(r)
                _busy_child(root, i + 1, w, dance)
            finally:
                os._exit(0)
        os.close(w)
        try:
            assert os.read(r, 1) == b"."     # one operation done: the loop is warm
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            while chunk := os.read(r, 4096):
                ops += len(chunk)
            os.close(r)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += 1
        mid_operation += any(n.startswith("mv-") for n in os.listdir(p.staging)) or any(
            n.startswith(".staging") for n in os.listdir(p.versions))
        if not dance:   # RENAME_EXCHANGE: complete even before recovery
            _check_consistent(root, verified)
        mv.recover(root)
        _check_consistent(root, verified)
        assert not any(n.startswith("mv-") for n in os.listdir(p.staging))
        assert not any(n.startswith(".staging") for n in os.listdir(p.versions))
        listed = {r["id"] for r in mv.list_versions(root)}
        assert listed == set(mv._version_dirs(p))    # no half version exists, listed or not
    print(f"kills={kills} mid_operation={mid_operation} ops={ops}")
    # typically a third of the kills leave a half-done snapshot or swap behind for recover()
    assert kills >= 50 and mid_operation >= 10, (kills, mid_operation, ops)

def test_a_write_in_place_through_a_hard_link_is_caught(root, capsys):
    """Root ignores 0444, so the rule is also checked: mtimes cheaply, hashes by verify."""
    p = Paths(root)
    assert (p.current_model / "model.safetensors").stat().st_ino == \
        (p.versions / "v001" / "model.safetensors").stat().st_ino
    train(root, 2)
    with open(p.versions / "v001" / "model.safetensors", "r+b") as f:   # the forbidden write
        f.seek(200)
        f.write(b"\x07")
    assert mv.check_version(root, "v001") == [
        "v001/model.safetensors: written in place after it was versioned"]
    code, _, err = cli(capsys, "restore", "v001")
    assert code == 1 and err.startswith(   # the cheap check's doubt is settled by the hash
        "Error: version v001 is damaged (v001/model.safetensors: sha256 mismatch (changed "
        "after it was recorded))")
    assert model_gen(p.current_model) == 2
    assert mv.verify_version(root, "v001") == [
        "v001/model.safetensors: sha256 mismatch (changed after it was recorded)"]


def test_a_rewrite_in_place_with_the_same_bytes_does_not_block_restore(root, capsys):
    """Only the mtime moved: restore used to refuse and name `verify`, which said OK (a dead
    end). The full hash decides before refusing."""
    p = Paths(root)
    train(root, 2)
    weights = p.versions / "v001" / "model.safetensors"
    data = weights.read_bytes()
    time.sleep(0.01)
    with open(weights, "r+b") as f:     # same bytes, new mtime
        f.write(data)
    assert mv.check_version(root, "v001") == [
        "v001/model.safetensors: written in place after it was versioned"]
    assert mv.verify_version(root, "v001") == []
    code, out, err = cli(capsys, "restore", "v001")
    assert code == 0, err
    assert model_gen(p.current_model) == 1
    assert mv.current_version(root) == "v001"


def test_failed_publish_gives_the_staged_folder_back(root, monkeypatch):
    p = Paths(root)
    staged = make_model(p.staging / "save-x", 5)
    def boom(a, b):
        raise OSError(5, "I/O error")
    monkeypatch.setattr(mv, "exchange_paths", boom)     # the disk failing at the swap
    with pytest.raises(OSError):
        mv.publish_model(root, staged, reason="t")
    assert model_gen(staged) == 5 and model_gen(p.current_model) == 1
    assert not [n for n in os.listdir(p.staging) if n.startswith("mv-")]


def test_a_reader_of_the_old_model_keeps_valid_weights(root):
    """from_pretrained memory-maps weights: swapping by rename must leave a loaded model intact."""
    import mmap
    p = Paths(root)
    train(root, 2)                           # unversioned: nothing else links its files
    with open(p.current_model / "model.safetensors", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        before = bytes(mapped)
        train(root, 3, keep_old="never")     # gen 2's files are unlinked, never rewritten
        mv.restore_version(root, "v001")     # gen 3 kept as a version, v001 swapped in
        assert bytes(mapped) == before and set(before[-100:]) == {2}
    finally:
        mapped.close()
    assert model_gen(p.current_model) == 1
    assert [r["reason"] for r in mv.list_versions(root)] == ["init", "pre-restore"]


def test_initialized_root_rm_rf_then_one_command_brings_the_real_model_back(initialized_root):
    """The real root from `training_daemon.py init`: `rm -rf current_model/`, one command, loads."""
    import transformers
    p = Paths(initialized_root)
    assert mv.current_version(initialized_root) == mv.latest_version(initialized_root) == "v001"
    subprocess.run(["rm", "-rf", "current_model/"], cwd=initialized_root, check=True)
    proc = run_script("model_versioner.py", "restore", "latest", "--json", root=initialized_root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["restored"] == "v001"
    model = transformers.AutoModelForCausalLM.from_pretrained(p.current_model)
    assert model.config.vocab_size > 0
    assert mv.verify_files(p.current_model, mv.read_manifest(p.current_model)["files"]) == []


def test_a_tampered_manifest_cannot_link_outside_the_version(root, capsys):
    p = Paths(root)
    train(root, 2)
    rec_path = p.versions / "v001" / "version.json"
    rec = json.loads(rec_path.read_text())
    rec["manifest"]["../../outside"] = rec["manifest"]["config.json"]
    rec_path.unlink()
    rec_path.write_text(json.dumps(rec))
    code, _, err = cli(capsys, "restore", "v001")
    assert code == 1 and err.strip() == (
        f"Error: unsafe file name '../../outside' in a manifest, {p.versions / 'v001'}. "
        "Its record was edited by hand: restore another version with `python3 "
        "model_versioner.py restore VNNN` (see `python3 model_versioner.py list`).")
    assert model_gen(p.current_model) == 2 and not (p.staging.parent / "outside").exists()
    code, out, _ = cli(capsys, "verify", "--all", "--json")
    assert code == 1 and json.loads(out)["versions"]["v001"]["problems"] == [
        "v001: unsafe file name '../../outside' in a manifest"]


# --------------------------------------------------------------------------- audit regressions

def json_cli(capsys, *args) -> tuple[int, dict, str]:
    """Run with --json: stdout must hold exactly one JSON document, whatever happened."""
    code, out, err = cli(capsys, *args, "--json")
    return code, json.loads(out), err


def test_a_folder_that_is_not_a_root_is_refused_and_left_untouched(tmp_path, capsys):
    """Regression: `--root` at a random folder listed 'No versions yet' (exit 0), created
    .locks/ there, and `prune --yes` died with a traceback."""
    other = tmp_path / "not-a-root"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for args in (["list"], ["show", "v001"], ["snapshot"], ["rollback"], ["restore", "v001"],
                 ["verify"], ["tag", "v001", "x"], ["prune", "--yes"], ["lineage", "v001"]):
        code, doc, err = json_cli(capsys, "--root", str(other), *args)
        assert code == 1 and doc["ok"] is False, args
        assert err.strip() == (
            f"Error: not a training root (no config.json, current_model/ or versions/), {other}. "
            f"Create one with `python3 training_daemon.py init --root {other}`, or give the "
            "right one with --root DIR.")
    assert sorted(os.listdir(other)) == ["notes.txt"]


def test_prune_yes_with_no_versions_folder(tmp_root, capsys):
    (tmp_root / "config.json").write_text("{}")  # a root whose versions/ was deleted
    code, doc, _ = json_cli(capsys, "prune", "--yes")
    assert code == 0 and doc["deleted"] == [] and not (tmp_root / "versions").exists()


@pytest.mark.parametrize("args", [["show"], ["restore"], ["tag", "v001"], ["nonsense"],
                                  ["prune", "--keep", "abc"], ["list", "--bogus"], []])
def test_usage_errors_print_one_json_document(root, capsys, args):
    """Regression: argparse's usage errors left stdout empty under --json."""
    code, doc, err = json_cli(capsys, *args)
    assert code == 2 and doc["ok"] is False and doc["error"]["exit_code"] == 2
    assert err.splitlines()[-1].startswith("Error: ")
    assert "--help` to see the usage." in err or "--help` to see the commands." in err


def test_errors_name_where_and_the_fix(root, capsys):
    """Regression: a bad tag name and --keep 0 said neither where nor how to fix."""
    code, _, err = cli(capsys, "tag", "v001", "a b")
    assert code == 2 and err.strip() == (
        f"Error: invalid tag name 'a b' (a letter, then up to 63 letters, digits, . _ -; not "
        f"vNNN, latest or current), {Paths(root).versions / 'tags.json'}. Choose another name, "
        "e.g. `python3 model_versioner.py tag v001 baseline`.")
    for name in ("v" + "9" * 20, "v0001", "latest", "current", "1st", "-x", "a/b", "é",
                 "V001", "Latest", "CURRENT"):  # (V002 showed v031 while `show v002` was v002)
        assert cli(capsys, "tag", "v001", name)[0] == 2, name  # a long v-number read as a tag
    assert mv.read_tags(root) == {}
    code, _, err = cli(capsys, "prune", "--keep", "0")
    assert code == 2 and err.strip() == (
        f"Error: --keep must be at least 1, got 0, {Paths(root).versions}. Run `python3 "
        "model_versioner.py prune --keep 1` to keep only the newest.")
    code, _, err = cli(capsys, "verify", "v001", "--all")
    assert code == 2 and err.startswith("Error: give a version or --all, not both")


def test_list_says_when_current_model_is_missing(root, capsys):
    shutil.rmtree(Paths(root).current_model)
    code, out, _ = cli(capsys, "list")
    assert code == 0 and out.splitlines()[-1] == (
        "  current_model is missing: bring it back with "
        "`python3 model_versioner.py restore v001`.")
    code, doc, _ = json_cli(capsys, "list")
    assert doc["current_model_exists"] is False and doc["current"] is None
    Paths(root).config.write_text("{}")  # (a root as init makes it: found by its config.json)
    shutil.rmtree(Paths(root).versions)  # nothing left to restore from but a backup
    code, out, _ = cli(capsys, "list")
    assert code == 0 and out.strip() == (
        "No versions and no current_model: bring the model back from a backup (`python3 "
        "backup_manager.py list`, then `backup_manager.py restore ID`).")


def test_a_missing_current_model_after_a_rollback_is_brought_back_as_rolled_back(root, capsys):
    """Regression: `list` and `snapshot` named `restore latest`, which brought back the
    training the rollback had undone (the report named the right version)."""
    train(root, 2)
    mv.create_version(root, "post-train")
    assert cli(capsys, "rollback")[0] == 0  # current_model: v001 again; v002 stays
    shutil.rmtree(Paths(root).current_model)
    fix = "`python3 model_versioner.py restore v001`"
    code, out, _ = cli(capsys, "list")
    assert code == 0 and out.splitlines()[-1].endswith(fix + ".")
    code, _, err = cli(capsys, "snapshot")
    assert code == 1 and fix in err


def test_commands_shown_carry_the_root_given_with_root(root, capsys, monkeypatch):
    """Regression: after `--root R rollback` the undo command had no --root, so pasting it
    acted on another root (here: TRAINING_ROOT is unset, as in a fresh shell)."""
    monkeypatch.delenv("TRAINING_ROOT")
    train(root, 2)
    code, doc, _ = json_cli(capsys, "--root", str(root), "rollback")
    assert code == 0 and doc["undo"] == f"python3 model_versioner.py restore v002 --root {root}"
    code, _, err = cli(capsys, "--root", str(root), "show", "v009")
    assert err.strip().endswith(f"Run `python3 model_versioner.py list --root {root}` to see the "
                                "versions.")
    for gen in (3, 4):
        train(root, gen)
        mv.create_version(root, "manual")
    code, out, _ = cli(capsys, "--root", str(root), "prune", "--keep", "1")
    assert out.splitlines()[-1] == ("Dry run: nothing deleted. Run `python3 model_versioner.py "
                                    f"prune --keep 1 --yes --root {root}` to delete these.")


def test_prune_keeps_the_version_a_file_in_processing_started_from(root, capsys):
    """Regression: with current_model snapshotted mid-file, the version taken before the file
    (what `skip --discard` and the loss guard restore) was prunable."""
    p = Paths(root)
    train(root, 2)
    mv.create_version(root, "pre-train:a.jsonl")             # v002: the file starts here
    p.processing.mkdir(exist_ok=True)
    (p.processing / "a.jsonl").write_text('{"text": "x"}\n')
    (p.processing / "a.jsonl.record.json").write_text(json.dumps({"version_before": "v002"}))
    for gen in (3, 4, 5):                                    # snapshots taken mid-file
        train(root, gen)
        mv.create_version(root, "manual")
    plan = mv.prune_plan(root, keep=1)
    assert plan["keep"]["v002"] == ["a.jsonl in processing/ started from it"]
    assert plan["delete"] == ["v001", "v003", "v004"]


def test_rollback_passes_versions_equal_to_current_model(root, capsys):
    """Regression: after `snapshot --force`, rollback 'rolled back' to an identical version
    (a no-op reported as success) instead of to the version before the training."""
    train(root, 2)
    mv.create_version(root, "post-train:a.jsonl")             # v002 (trained from v001)
    assert mv.create_version(root, "manual", force=True) == ("v003", True)  # same as v002
    code, doc, _ = json_cli(capsys, "rollback")
    assert code == 0 and doc["restored"] == "v001"
    assert model_gen(Paths(root).current_model) == 1


def test_a_new_id_after_versions_was_lost_is_past_every_id_a_done_record_names(root):
    """`rm -rf versions/`, a backup restored, a snapshot: its id must not be one that done/
    records already name as `version_after` (their lineage would point at the new one)."""
    p = Paths(root)
    p.done.mkdir(exist_ok=True)
    (p.done / "x.jsonl").write_text('{"text": "a"}\n')
    (p.done / "x.jsonl.record.json").write_text(json.dumps(
        {"sha256": "0" * 64, "version_after": "v007", "finished_at": utc_now()}))
    shutil.rmtree(p.versions)
    assert mv.create_version(root, "manual") == ("v008", True)


def test_show_a_pruned_version_says_so(root, capsys):
    for gen in (2, 3):
        train(root, gen)
        mv.create_version(root, "manual")
    import backup_manager
    backup = backup_manager.create_backup(root, "v002")
    mv.prune(root, keep=1, yes=True)
    code, _, err = cli(capsys, "show", "v002")
    assert code == 1 and err.startswith("Error: version v002 was pruned (only its record is "
                                        "kept, for lineage), ")
    # the verified backup that holds it is the way back; lineage still reads its record
    code, _, err = cli(capsys, "restore", "v002")
    assert code == 1 and f"`python3 backup_manager.py restore {backup['id']}`" in err, err
    code, out, _ = cli(capsys, "lineage", "v002", "--json")
    assert code == 0 and json.loads(out)["chain"] == ["v001", "v002"]


def test_a_file_where_current_model_belongs_is_kept_by_restore(root, capsys):
    """Regression: `restore` swapped a plain file named current_model into .staging/ and
    `recover` then deleted it: someone's file, lost."""
    p = Paths(root)
    shutil.rmtree(p.current_model)
    p.current_model.write_text("my notes")
    assert cli(capsys, "restore", "v001")[0] == 0 and model_gen(p.current_model) == 1
    mv.recover(root)
    (kept,) = (root / ".attic").glob("current_model-*/current_model")
    assert kept.read_text() == "my notes"


def test_a_version_with_an_unreadable_record_is_reported_not_hidden(root, capsys):
    """Regression: a version whose version.json was corrupt vanished from `list`, `verify
    --all` said ok (exit 0), and `verify v002` said there was no such version."""
    train(root, 2)
    mv.create_version(root, "manual")
    record = Paths(root).versions / "v002" / "version.json"
    os.chmod(record.parent, 0o755)
    record.unlink()
    record.write_text("{not json")
    code, doc, err = json_cli(capsys, "verify", "--all")
    assert code == 1 and doc["versions"]["v001"]["ok"] is True
    assert doc["versions"]["v002"]["problems"] == [
        "version v002 has no readable version.json (damaged; its folder is left as it is)"]
    code, _, err = cli(capsys, "verify", "v002")
    assert code == 1 and err.startswith("Error: version v002 has no readable version.json")
    code, out, _ = cli(capsys, "list")
    assert out.splitlines()[0] == ("! v002  damaged: no readable version.json (see "
                                   "`python3 model_versioner.py verify v002`)")
    assert json_cli(capsys, "list")[1]["damaged"] == ["v002"]
    assert record.read_text() == "{not json"  # reported, never touched


def test_a_version_folder_holding_another_version_is_not_that_version(root, capsys):
    """Regression: a copy of v002's folder (or a link to it) in v001's place verified OK,
    `show` and `restore v001` gave v002's model."""
    train(root, 2)
    mv.create_version(root, "post-train")
    versions = Paths(root).versions
    os.chmod(versions / "v001", 0o755)
    shutil.rmtree(versions / "v001")
    shutil.copytree(versions / "v002", versions / "v001", symlinks=True)
    assert mv.verify_version(root, "v001") == [
        "v001: its version.json is v002's (the folder holds another version)"]
    code, _, err = cli(capsys, "restore", "v001")
    assert code == 1 and "version v001 is damaged" in err and model_gen(Paths(root).current_model) == 2
    shutil.rmtree(versions / "v001")
    (versions / "v001").symlink_to(versions / "v002")
    code, out, err = cli(capsys, "verify", "--all")
    assert code == 1 and out.splitlines() == ["v001: BAD", "v002: ok"]
    assert "v001: a link to" in err and "not a version folder of its own" in err


def test_an_unknown_tag_is_named_as_such_not_as_a_malformed_id(root, capsys):
    """Regression: `restore nosuchtag` said "invalid version id" (exit 2), as for a typo."""
    code, _, err = cli(capsys, "restore", "nosuchtag")
    assert code == 1 and "no version or tag named 'nosuchtag' (no version has a tag)" in err
    mv.tag_version(root, "v001", "baseline")
    code, _, err = cli(capsys, "show", "golden")
    assert code == 1 and "no version or tag named 'golden' (the tags: baseline)" in err
    assert cli(capsys, "show", "baseline")[0] == 0
    assert cli(capsys, "restore", "../v001")[0] == 2  # no name a tag can have: a malformed id


def test_notes_are_shown_as_one_line_with_escapes_and_cut(root, capsys):
    """Regression: a note holding a newline and a fake "* v099" line, or ESC[2J, redrew what
    `list` and `show` print; a 120 KB note printed whole."""
    train(root, 2)
    mv.create_version(root, "manual", note="ok\n* v099  2026  step 99  fake\x1b[2J\u202e")
    code, out, _ = cli(capsys, "list")
    assert code == 0 and len(out.splitlines()) == 2
    assert out.splitlines()[-1].endswith("note: ok\\n* v099  2026  step 99  fake\\x1b[2J\\u202e")
    code, out, _ = cli(capsys, "show", "v002")
    assert "note         ok\\n* v099" in out and "\x1b" not in out
    train(root, 3)
    mv.create_version(root, "manual", note="n" * 120_000)
    code, out, _ = cli(capsys, "list")
    assert out.splitlines()[-1].endswith("n... (119700 more characters)")
    code, doc, _ = json_cli(capsys, "show", "v003")
    assert doc["version"]["note"] == "n" * 120_000  # the record keeps it whole
