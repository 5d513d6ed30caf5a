"""backup_manager.py: verified independent copies, corruption caught, disk full, kill -9, restore."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import backup_manager
import training_config
import verified_copy
from conftest import REPO, kill_9_when
from trainroot import GuardrailError, utc_now

LIST = "python3 backup_manager.py list"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tree_hashes(folder: Path) -> dict:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture
def fake_root(tmp_root) -> Path:
    """A root whose current_model is a small fake model folder (with a nested file)."""
    cm = tmp_root / "current_model"
    _write(cm / "config.json", b'{"model_type": "fake"}\n')
    _write(cm / "model.safetensors", os.urandom(300_000))
    _write(cm / "tokenizer" / "vocab.json", b'{"a": 0}\n')
    _write(cm / "trainer_state.json", b'{"global_step": 7, "tokens_seen": 1234}\n')
    return tmp_root


def _cli(capsys, *argv) -> tuple[int, dict | str, str]:
    code = backup_manager.main(list(argv))
    out, err = capsys.readouterr()
    if "--json" in argv:
        return code, json.loads(out), err
    return code, out, err


def _backup(capsys, *argv) -> dict:
    code, doc, err = _cli(capsys, "backup", "--json", *argv)
    assert code == 0, err
    return doc


def _set_backup_dir(root: Path, folder: Path) -> None:
    training_config.write_config(root, training_config.default_config(backup_dir=str(folder)))


# --------------------------------------------------------------------------- create and list

def test_backup_is_an_independent_verified_copy(fake_root, capsys):
    before = _tree_hashes(fake_root / "current_model")
    doc = _backup(capsys, "--note", "first")
    folder = fake_root / "backups" / doc["id"]
    assert backup_manager.ID_RE.fullmatch(doc["id"])
    assert doc["status"] == "verified" and doc["source"] == "current_model"
    assert doc["global_step"] == 7 and doc["tokens_seen"] == 1234 and doc["note"] == "first"
    assert set(doc["files"]) == {"config.json", "model.safetensors", "tokenizer/vocab.json",
                                 "trainer_state.json"}
    assert doc["total_bytes"] == sum(f["size"] for f in doc["files"].values())
    for rel, info in doc["files"].items():
        src, copy = fake_root / "current_model" / rel, folder / rel
        assert os.stat(copy).st_nlink == 1 and os.stat(copy).st_ino != os.stat(src).st_ino
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == info["sha256"] == before[rel]
    record = json.loads((folder / "backup.json").read_text())
    assert record["id"] == doc["id"] and record["schema_version"] == 1
    assert _tree_hashes(fake_root / "current_model") == before
    # same filesystem as current_model: warned in the result and in list --json
    assert doc["same_filesystem"] is True and "same filesystem" in doc["warnings"][0]
    code, listed, _ = _cli(capsys, "list", "--json")
    assert code == 0 and listed["same_filesystem"] is True
    assert [b["id"] for b in listed["backups"]] == [doc["id"]]
    assert listed["backups"][0]["status"] == "verified"


def test_ids_unique_within_one_second(fake_root, capsys, monkeypatch):
    ids = [backup_manager.create_backup(fake_root)["id"] for _ in range(6)]
    assert len(set(ids)) == 6
    assert len({i.split("-")[0] for i in ids}) < 6  # some were made in the same second
    listed = [b["id"] for b in backup_manager.list_backups(fake_root)]
    assert sorted(listed) == sorted(ids)
    # a clash of the random suffix within one second takes the next id, replacing nothing
    drawn = iter(["b20261128T000000-aaaa", "b20261128T000000-aaaa", "b20261128T000000-bbbb"])
    monkeypatch.setattr(backup_manager, "new_backup_id", lambda: next(drawn))
    first = backup_manager.create_backup(fake_root, note="one")
    second = backup_manager.create_backup(fake_root, note="two")
    assert (first["id"], second["id"]) == ("b20261128T000000-aaaa", "b20261128T000000-bbbb")
    assert json.loads((fake_root / "backups" / first["id"] / "backup.json").read_text())["note"] == "one"


@pytest.mark.parametrize("bad", ["../../etc", "b20261128T172301-3f9a/../x", "b20261128T172301-XYZ1",
                                 ".staging-b20261128T172301-3f9a"])
def test_ids_are_validated_on_input(fake_root, capsys, bad):
    for argv in (["verify", bad], ["restore", bad]):
        code, _, err = _cli(capsys, *argv)
        assert code == 2
        assert err.strip() == (f"Error: invalid backup id {bad!r} (IDs look like "
                               f"b20261128T172301-3f9a), {fake_root / 'backups'}. List backups "
                               f"with `{LIST}`.")


def test_backup_of_a_version_and_invalid_source(fake_root, capsys):
    import model_versioner
    assert model_versioner.create_version(fake_root, "manual") == ("v001", True)
    model_versioner.tag_version(fake_root, "v001", "base")
    for src in ("v001", "v1", "latest", "base",  # what model_versioner accepts
                str(fake_root / "versions" / "v001"), f"{fake_root}/versions/v001/"):
        doc = _backup(capsys, src)
        assert doc["source"] == "v001" and doc["version"] == "v001"
        assert set(doc["files"]) == {"config.json", "model.safetensors", "tokenizer/vocab.json",
                                     "trainer_state.json"}
    assert _backup(capsys, str(fake_root / "current_model"))["source"] == "current_model"
    for bad in ("../current_model", "v0", "", "/etc", str(fake_root / "versions")):
        code, _, err = _cli(capsys, "backup", bad)
        assert code == 2 and err.startswith(f"Error: invalid source {bad!r}")
        assert f", {fake_root / 'versions'}. List versions with" in err
    code, _, err = _cli(capsys, "backup", "v1000000")
    assert code == 1 and err.startswith("Error: no version v1000000, ")


def _new_weights(root: Path) -> None:
    """current_model's weights replaced (never written in place: a version may link them)."""
    weights = root / "current_model" / "model.safetensors"
    weights.unlink()
    weights.write_bytes(os.urandom(1000))


def test_prune_keeps_a_version_a_backup_is_copying(fake_root, capsys, monkeypatch):
    """`prune --yes` (or the daemon's retention) while `backup v001` copied it deleted v001
    under the copy. The backup pins the version for its copy (versions/.backup-pins/, a file
    it holds an flock on, written under the versions lock): prune keeps it meanwhile, and
    deletes it once the backup is done. A pin left by a killed backup protects nothing."""
    import model_versioner as mv
    for _ in range(3):
        _new_weights(fake_root)
        mv.create_version(fake_root, "manual")
    assert mv.latest_version(fake_root) == "v003"
    real, plans = verified_copy.copy_tree_verified, []

    def copy_while_pruning(*args, **kwargs):
        plans.append(mv.prune(fake_root, keep=1, yes=True))  # another process would, now
        return real(*args, **kwargs)
    monkeypatch.setattr(backup_manager, "copy_tree_verified", copy_while_pruning)
    doc = _backup(capsys, "v001")
    assert doc["version"] == "v001" and plans[0]["deleted"] == ["v002"]
    assert plans[0]["keep"]["v001"] == ["a backup is copying it"]
    monkeypatch.setattr(backup_manager, "copy_tree_verified", real)
    assert _cli(capsys, "verify", doc["id"], "--json")[0] == 0
    assert not os.listdir(fake_root / "versions" / mv.PINS)  # the pin went with the copy
    assert mv.prune(fake_root, keep=1, yes=True)["deleted"] == ["v001"]
    # a backup killed mid-copy leaves its pin, unlocked (it protects nothing: the next test)
    pin = fake_root / "versions" / mv.PINS / "v003-1-2.json"
    pin.write_text('{"version": "v003"}')
    with mv.pinned(fake_root, "v003", "backup x"):  # the next pin removes it
        assert [f.name for f in (fake_root / "versions" / mv.PINS).iterdir()][0] != pin.name
        assert not pin.exists()
    # a version pruned before the backup could pin it: said, nothing kept
    with pytest.raises(GuardrailError, match="version v002 is gone"):
        with mv.pinned(fake_root, "v002", "backup y"):
            pass


def test_a_pin_held_by_another_process_keeps_its_version_until_it_is_killed(fake_root):
    import model_versioner as mv
    for _ in range(2):
        _new_weights(fake_root)
        mv.create_version(fake_root, "manual")
    code = ("import sys, time, model_versioner as mv\n"
            f"with mv.pinned({str(fake_root)!r}, 'v001', 'backup z'):\n"
            "    print('pinned', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "pinned"
        assert mv.prune_plan(fake_root, keep=1)["keep"]["v001"] == ["a backup is copying it"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert mv.prune_plan(fake_root, keep=1)["delete"] == ["v001"]


def test_a_backup_restored_again_is_no_new_version_but_a_changed_copy_is_kept(fake_root, capsys):
    """A backup restore writes a verified copy of its version's bytes (files of its own, not
    the version's links): restoring it twice stored the same bytes again as a
    `pre-backup-restore` version, a snapshot after it a `manual` one, and `list` said "not a
    version yet" while the report said `= v002`. The copy is known as its version by its
    manifest's sha256s and the size and mtime of each file (a write in place moves it), so
    nothing is stored twice and a changed copy is still kept before the next restore."""
    import model_versioner as mv
    assert mv.create_version(fake_root, "init") == ("v001", True)
    bid = _backup(capsys)["id"]
    for _ in range(2):
        doc = _cli(capsys, "restore", bid, "--json")[1]
        assert doc["previous_version"] == "v001" and doc["kept_version"] is None
    assert mv.current_version(fake_root) is None and mv.copy_of_version(fake_root) == "v001"
    assert mv.create_version(fake_root, "manual") == ("v001", False)
    assert mv.main(["list", "--root", str(fake_root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("* v001") and "v002" not in out
    assert "current_model holds v001's bytes in files of its own" in out
    weights = fake_root / "current_model" / "model.safetensors"
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:  # the same size, other bytes: no longer v001
        f.write(b"changed")
    assert mv.copy_of_version(fake_root) is None
    doc = _cli(capsys, "restore", bid, "--json")[1]
    assert doc["kept_version"] == "v002"  # kept first: nothing is lost
    kept = (fake_root / "versions" / "v002" / "model.safetensors").read_bytes()
    assert kept.startswith(b"changed") and mv.verify_version(fake_root, "v002") == []
    assert mv.copy_of_version(fake_root) == "v001"


def test_a_backup_restored_over_a_silently_rotten_version_is_versioned_anew(fake_root, capsys):
    """Bit rot keeps sizes and time stamps: v001 (and current_model, its files) rotted, the
    backup restored a sound copy, and the recipe's snapshot said "already equals v001" (the
    rotten one), so `verify latest` failed and a later rollback loaded the rot. The restore
    hashes the version before it calls the copy that version's bytes."""
    import model_versioner as mv
    assert mv.create_version(fake_root, "init") == ("v001", True)
    bid = _backup(capsys)["id"]
    weights = fake_root / "current_model" / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # silent: the cheap check sees nothing
    assert mv.check_version(fake_root, "v001") == [] and mv.verify_version(fake_root, "v001")
    assert _cli(capsys, "restore", bid)[0] == 0
    assert mv.copy_of_version(fake_root) is None
    assert mv.create_version(fake_root, "manual", note="restored from backup") == ("v002", True)
    assert mv.verify_version(fake_root, mv.latest_version(fake_root)) == []
    assert _cli(capsys, "repair", "v001")[0] == 0 and mv.verify_version(fake_root, "v001") == []


def test_repair_puts_a_damaged_version_back_from_its_backup(fake_root, capsys):
    """A version damaged in place (through current_model, which shares its files: bit rot,
    a hand edit) could never be made sound again: VERSION_DAMAGED stayed for good. `repair`
    copies the bad files from the newest verified backup holding them, checks them against
    the version's record, and swaps them in, in the version and in current_model."""
    import model_versioner as mv
    assert mv.create_version(fake_root, "init") == ("v001", True)
    bid = _backup(capsys, "v001")["id"]
    weights = fake_root / "current_model" / "model.safetensors"
    good = weights.read_bytes()
    with open(weights, "r+b") as f:  # in place: v001's file is the same inode
        f.seek(1000)
        f.write(b"\xff\xfe")
    (fake_root / "current_model" / "config.json").touch()  # a touch: the bytes as recorded
    assert mv.verify_version(fake_root, "v001") and mv.check_version(fake_root, "v001")
    code, doc, err = _cli(capsys, "repair", "v001", "--json")
    assert code == 0, err
    assert doc["repaired"] == ["model.safetensors"] and doc["from_backup"] == bid
    assert doc["time_stamps"] == ["config.json"] and doc["current_model_too"] == ["model.safetensors"]
    assert mv.verify_version(fake_root, "v001") == [] and mv.check_version(fake_root, "v001") == []
    assert weights.read_bytes() == good and mv.current_version(fake_root) == "v001"
    code, out, _ = _cli(capsys, "repair", "v001")
    assert code == 0 and "nothing to repair" in out
    # no backup holds the bytes: refused, nothing changed
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:
        f.write(b"rot")
    shutil.rmtree(fake_root / "backups" / bid)
    before = weights.read_bytes()
    code, _, err = _cli(capsys, "repair", "v001")
    assert code == 1 and "no verified backup holds those bytes; nothing was changed" in err
    assert weights.read_bytes() == before


def test_a_damaged_version_is_never_backed_up_under_its_name(fake_root, capsys):
    """Regression: a version with a missing, a changed and an extra file was backed up as
    `verified` with `version: v001` (its stale .manifest.json made the copy hash whatever
    was there), and restoring that backup brought the damage into current_model."""
    import model_versioner
    model_versioner.create_version(fake_root, "manual")
    v = fake_root / "versions" / "v001"
    for damage, named in ((lambda: _write(v / "extra.txt", b"x"), "extra ['extra.txt']"),
                          (lambda: (v / "tokenizer" / "vocab.json").unlink(),
                           "missing ['tokenizer/vocab.json']")):
        damage()
        code, doc, err = _cli(capsys, "backup", "v001", "--json")
        assert code == 1 and doc["ok"] is False
        assert err.startswith("Error: version v001 does not hold what its record lists (")
        assert named in err and err.rstrip().endswith(
            "`python3 model_versioner.py verify v001`, then back up current_model or another "
            "version (`python3 backup_manager.py backup vNNN`).")
    (v / "extra.txt").unlink()
    _write(v / "tokenizer" / "vocab.json", b'{"b": 0}\n')  # same size, other bytes
    code, _, err = _cli(capsys, "backup", "v001")
    assert code == 1 and err.startswith("Error: backup failed: source file tokenizer/vocab.json "
                                        "does not match its manifest while copying")
    # the check named is of that version (a bare `verify` checks the latest, here sound)
    assert "Check the source with `python3 model_versioner.py verify v001" in err
    assert backup_manager.list_backups(fake_root) == []


def test_source_checked_against_its_manifest(fake_root, capsys):
    cm = fake_root / "current_model"
    files = {rel: {"sha256": h, "size": (cm / rel).stat().st_size}
             for rel, h in _tree_hashes(cm).items()}
    (cm / ".manifest.json").write_text(json.dumps({"schema_version": 1, "files": files}))
    doc = _backup(capsys)  # a manifest that matches is the reference
    assert doc["files"] == files
    _flip(cm / "model.safetensors")  # bit rot in the source: same size, other bytes
    code, _, err = _cli(capsys, "backup")
    assert code == 1
    assert err.startswith("Error: backup failed: source file model.safetensors does not match "
                          "its manifest while copying (sha256 ")
    assert [b["id"] for b in backup_manager.list_backups(fake_root)] == [doc["id"]]
    # a manifest that does not list every file is stale: the source itself is hashed
    _write(cm / "added.txt", b"new")
    doc = _backup(capsys)
    assert doc["files"]["added.txt"]["size"] == 3
    assert doc["files"]["model.safetensors"]["sha256"] == _tree_hashes(cm)["model.safetensors"]


# --------------------------------------------------------------------------- verify

def _flip(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.chmod(path, 0o644)
    os.truncate(path, path.stat().st_size - 1)


def _link_out(path: Path) -> None:
    """The same bytes, kept outside the backup: a link is not an independent copy."""
    outside = path.parent.parent / (path.parent.name + "-" + path.name)
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


CORRUPTIONS = {
    "linked": (lambda f: _link_out(f / "model.safetensors"),
               "model.safetensors: a symbolic link to "),
    "flipped": (lambda f: _flip(f / "model.safetensors"),
                "model.safetensors: sha256 mismatch"),
    "truncated": (lambda f: _truncate(f / "model.safetensors"),
                  "model.safetensors: truncated (299999 bytes, expected 300000)"),
    "missing": (lambda f: (f / "tokenizer" / "vocab.json").unlink(),
                "tokenizer/vocab.json: missing"),
    "extra": (lambda f: _write(f / "tokenizer" / "extra.bin", b"x"),
              "tokenizer/extra.bin: extra file, not in the backup's manifest"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_verify_catches_corruption(fake_root, capsys, kind):
    doc = _backup(capsys)
    folder = fake_root / "backups" / doc["id"]
    code, result, _ = _cli(capsys, "verify", doc["id"], "--json")
    assert code == 0 and result["ok"] is True
    damage, problem = CORRUPTIONS[kind]
    damage(folder)
    code, result, err = _cli(capsys, "verify", "--all", "--json")
    assert code == 1 and result["ok"] is False
    assert len(result["backups"][0]["problems"]) == 1
    assert result["backups"][0]["problems"][0].startswith(problem)
    assert err.startswith(f"Error: backup {doc['id']} is corrupt ({problem}")
    listed = backup_manager.list_backups(fake_root)
    assert listed[0]["status"] == "corrupt" and backup_manager.latest_backup(fake_root) is None


# --------------------------------------------------------------------------- disk full

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def _assert_nothing_kept(root: Path, bdir: Path, before: dict) -> None:
    assert backup_manager.list_backups(root) == []
    assert [e for e in os.listdir(bdir) if e.startswith(".staging-")] == []
    assert _tree_hashes(root / "current_model") == before


def test_disk_full_on_a_small_tmpfs(fake_root, tmp_path, capsys):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "64k"):
        pytest.skip("mount -t tmpfs not permitted here (test_disk_full_injected covers ENOSPC)")
    try:
        _set_backup_dir(fake_root, mnt)
        # 40 files of 300 bytes pass the free-space check (12 kB < 64 kB) but each takes a
        # 4 kB page on tmpfs, so the disk fills up for real in the middle of the copy.
        for i in range(40):
            _write(fake_root / "current_model" / "shards" / f"s{i:02d}.bin", os.urandom(300))
        (fake_root / "current_model" / "model.safetensors").write_bytes(b"m" * 1000)
        before = _tree_hashes(fake_root / "current_model")
        code, doc, err = _cli(capsys, "backup", "--json")
        assert code == 1 and doc["ok"] is False
        assert err.startswith("Error: backup failed: no space left on device (")
        assert err.rstrip().endswith(f"nothing was kept, {mnt}. Fix the cause, then run "
                                     "`python3 backup_manager.py backup`.")
        _assert_nothing_kept(fake_root, mnt, before)
        # too small for the total: refused before writing anything
        (fake_root / "current_model" / "model.safetensors").write_bytes(b"m" * 100_000)
        code, _, err = _cli(capsys, "backup")
        assert code == 1 and err.startswith("Error: not enough free space for a backup (")
        # and it is not the same filesystem as current_model
        assert backup_manager.same_filesystem(fake_root) is False
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_backup_racing_a_restore_says_so_not_corruption(fake_root, capsys, monkeypatch):
    """A restore swapped current_model while the backup copied it: the copy failed as "does
    not match its manifest" or a missing file, which read like damage. It is named a race."""
    real = backup_manager.copy_tree_verified

    def swapped_midway(src, dst, **kw):  # the copy reads the old tree, which the restore removes
        os.rename(fake_root / "current_model", fake_root / "old_model")  # what a restore's swap
        shutil.copytree(fake_root / "old_model", fake_root / "current_model")  # does to the path
        shutil.rmtree(fake_root / "old_model")
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "tokenizer/vocab.json")
    monkeypatch.setattr(backup_manager, "copy_tree_verified", swapped_midway)
    code, _, err = _cli(capsys, "backup")
    assert code == 1 and "current_model was replaced while it was copied" in err, err
    assert "`python3 backup_manager.py backup` again" in err
    monkeypatch.setattr(backup_manager, "copy_tree_verified", real)
    assert _backup(capsys)["status"] == "verified"


def test_disk_full_injected(fake_root, capsys, monkeypatch):
    """ENOSPC from the kernel's write(2), injected at that boundary for the backup's files."""
    before = _tree_hashes(fake_root / "current_model")
    bdir = fake_root / "backups"
    real_write, written = os.write, [0]

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if target.startswith(str(bdir)):
            if written[0] + len(data) > 200_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(backup_manager.GuardrailError) as exc:
        backup_manager.create_backup(fake_root)
    monkeypatch.undo()
    assert str(exc.value).startswith("backup failed: no space left on device (")
    _assert_nothing_kept(fake_root, bdir, before)


@pytest.mark.parametrize("size, first_bad", [(300_000, 100_000),  # one piece
                                             (20_000_000, (8 << 20) // 3)])  # pieces in flight
def test_a_bad_write_is_caught_by_the_read_back(fake_root, monkeypatch, size, first_bad):
    """A byte changed on its way to the disk (bad cable, bad RAM, bad disk): the copy read
    back from the disk differs from the bytes hashed from the source, so nothing is kept."""
    (fake_root / "current_model" / "model.safetensors").write_bytes(os.urandom(size))
    before = _tree_hashes(fake_root / "current_model")
    bdir = fake_root / "backups"
    real_write = os.write

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if target.endswith("/model.safetensors") and target.startswith(str(bdir)):
            damaged = bytearray(data)
            damaged[len(damaged) // 3] ^= 0x10
            return real_write(fd, bytes(damaged))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(backup_manager.GuardrailError) as exc:
        backup_manager.create_backup(fake_root)
    monkeypatch.undo()
    text = str(exc.value)
    assert text.startswith(f"backup failed: copy of model.safetensors reads back wrong from disk "
                           f"at byte {first_bad}; nothing was kept, {bdir}/.staging-b")
    assert text.endswith(". The target disk may be failing: check it, then run the command again.")
    _assert_nothing_kept(fake_root, bdir, before)


# --------------------------------------------------------------------------- kill -9

def test_kill_9_during_backup_then_next_run_cleans_up(fake_root, capsys):
    (fake_root / "current_model" / "model.safetensors").write_bytes(b"\0" * (160 << 20))
    bdir = fake_root / "backups"
    status = kill_9_when([str(REPO / "backup_manager.py"), "backup"], fake_root, lambda: (
        bdir.is_dir() and any((bdir / e / "model.safetensors").exists()
                              for e in os.listdir(bdir) if e.startswith(".staging-"))))
    assert status == -signal.SIGKILL
    leftovers = [e for e in os.listdir(bdir) if e.startswith(".staging-")]
    assert len(leftovers) == 1
    code, listed, _ = _cli(capsys, "list", "--json")
    assert code == 0 and listed["backups"] == []
    doc = _backup(capsys)
    assert doc["cleaned_staging"] == leftovers
    assert sorted(os.listdir(bdir)) == [doc["id"]]


# --------------------------------------------------------------------------- restore

def test_restore_refuses_a_corrupt_backup(fake_root, capsys):
    doc = _backup(capsys)
    folder = fake_root / "backups" / doc["id"]
    _flip(folder / "model.safetensors")
    before = _tree_hashes(fake_root / "current_model")
    code, out, err = _cli(capsys, "restore", doc["id"])
    assert code == 1
    assert err.startswith(f"Error: backup {doc['id']} is corrupt (model.safetensors: sha256 "
                          "mismatch (")
    assert err.rstrip().endswith(
        f"); nothing was restored, {folder}. List the others with `{LIST}` and check one "
        "with `python3 backup_manager.py verify ID`.")
    assert _tree_hashes(fake_root / "current_model") == before


def test_restore_refuses_while_training(fake_root, capsys):
    doc = _backup(capsys)
    daemon = subprocess.Popen(["sleep", "30"])  # a live pid standing in for the daemon
    try:
        (fake_root / ".daemon_state.json").write_text(json.dumps(
            {"schema_version": 1, "pid": daemon.pid, "state": "training",
             "heartbeat": utc_now(), "current_file": {"name": "a.jsonl"}}))
        before = _tree_hashes(fake_root / "current_model")
        code, _, err = _cli(capsys, "restore", doc["id"])
        assert code == 3
        assert err.startswith(f"Error: the daemon (pid {daemon.pid}) is training a.jsonl, ")
        assert _tree_hashes(fake_root / "current_model") == before
    finally:
        daemon.kill()
        daemon.wait()


def test_restore_to_a_folder(fake_root, tmp_path, capsys):
    doc = _backup(capsys)
    busy = tmp_path / "busy"
    _write(busy / "keep.txt", b"mine")
    code, _, err = _cli(capsys, "restore", doc["id"], "--to", str(busy))
    assert code == 1 and err.strip() == (
        f"Error: target folder is not empty; restore never writes over files, {busy}. "
        f"Choose a new or empty folder: `python3 backup_manager.py restore {doc['id']} --to "
        f"{busy}-restored`.")
    assert (busy / "keep.txt").read_bytes() == b"mine"
    out = tmp_path / "empty"
    out.mkdir()
    code, result, _ = _cli(capsys, "restore", doc["id"], "--to", str(out), "--json")
    assert code == 0 and result["restored_to"] == str(out)
    restored = _tree_hashes(out)
    manifest = json.loads(restored and (out / ".manifest.json").read_text())
    restored.pop(".manifest.json")
    assert restored == _tree_hashes(fake_root / "current_model")
    assert set(manifest["files"]) == set(restored)


def test_restore_keeps_prior_state_and_loads(initialized_root, capsys):
    import model_versioner
    root = initialized_root
    doc = _backup(capsys)
    backed_up = _tree_hashes(root / "current_model")
    # "train": publish a changed current_model that is not a version yet
    staged = root / ".staging" / "trained"
    staged.mkdir(parents=True)
    for f in (root / "current_model").iterdir():
        if f.name != ".manifest.json":
            (staged / f.name).write_bytes(f.read_bytes())
    (staged / "trainer_state.json").write_text('{"global_step": 99, "tokens_seen": 9999}\n')
    model_versioner.write_manifest(staged)
    model_versioner.publish_model(root, staged)
    assert model_versioner.current_version(root) is None
    trained = _tree_hashes(root / "current_model")

    code, result, err = _cli(capsys, "restore", doc["id"], "--json")
    assert code == 0, err
    kept = result["kept_version"]
    assert kept and result["previous_version"] == kept
    assert result["undo"] == f"python3 model_versioner.py restore {kept}"
    assert json.loads((root / "versions" / kept / "version.json").read_text())["reason"] == \
        "pre-backup-restore"
    kept_files = _tree_hashes(root / "versions" / kept)
    assert all(kept_files[k] == v for k, v in trained.items() if k != ".manifest.json")
    now = _tree_hashes(root / "current_model")
    assert {k: v for k, v in now.items() if k != ".manifest.json"} == \
        {k: v for k, v in backed_up.items() if k != ".manifest.json"}
    # its parent is the version it was a backup of (v001), not the one it replaced: a
    # rollback goes back from there, never forward to the trained model
    assert doc["version"] == "v001"
    assert model_versioner.read_manifest(root / "current_model")["parent_version"] == "v001"
    with pytest.raises(GuardrailError, match="nothing to roll back to"):  # v001's content
        model_versioner.rollback(root)                                     # has no earlier version
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(root / "current_model", local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) > 0


# --------------------------------------------------------------------------- prune, policy, priority

def test_prune_keeps_newest_verified_and_dry_runs(fake_root, capsys):
    ids = [backup_manager.create_backup(fake_root)["id"] for _ in range(3)]
    _flip(fake_root / "backups" / ids[2] / "config.json")  # newest is silently corrupt
    code, dry, _ = _cli(capsys, "prune", "--keep", "1", "--json")
    assert code == 0 and dry["dry_run"] is True and dry["kept"] == [ids[2]]
    assert sorted(os.listdir(fake_root / "backups")) == sorted(ids)  # nothing deleted
    code, done, _ = _cli(capsys, "prune", "--keep", "1", "--yes", "--json")
    assert code == 0 and done["kept"] == [ids[1]]  # re-verified: the corrupt one is not kept
    assert sorted(done["deleted"]) == sorted([ids[0], ids[2]])
    assert os.listdir(fake_root / "backups") == [ids[1]]
    # never the last verified one
    _flip(fake_root / "backups" / ids[1] / "config.json")
    code, _, err = _cli(capsys, "prune", "--keep", "1", "--yes")
    assert code == 1 and err.startswith("Error: no verified backup exists; prune deletes nothing")
    assert os.listdir(fake_root / "backups") == [ids[1]]


def test_backups_made_while_the_clock_ran_a_day_ahead_do_not_outrank_the_last_one(
        fake_root, capsys, monkeypatch):
    """Two backups made while the clock ran a day ahead, then NTP set it right and a third
    was made: `seq` (not created_at, not the ID's time) says which is newest, so `latest`
    is the one made last and `prune --keep 1` keeps it. A newest backup dated in the future
    cannot say how old it is: the hourly policy makes a new one rather than wait a day."""
    from datetime import datetime, timedelta, timezone
    ahead = datetime.now(timezone.utc) + timedelta(days=1)
    with monkeypatch.context() as clock:
        clock.setattr(backup_manager, "utc_now", lambda: ahead.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        clock.setattr(backup_manager, "datetime", type("AheadClock", (), {
            "now": staticmethod(lambda tz=None: ahead)}))
        early = [backup_manager.create_backup(fake_root)["id"] for _ in range(2)]
    hourly = training_config.default_config(backup_every_files=0, backup_every_hours=1.0)
    assert backup_manager.backup_due(fake_root, hourly, 1) is True
    last = backup_manager.create_backup(fake_root)["id"]
    assert last < min(early)  # the IDs carry the clock's time: they say otherwise
    assert [b["id"] for b in backup_manager.list_backups(fake_root)] == early + [last]
    assert backup_manager.latest_backup(fake_root)["id"] == last
    assert backup_manager.backup_due(fake_root, hourly, 1) is False
    code, done, _ = _cli(capsys, "prune", "--keep", "1", "--yes", "--json")
    assert code == 0 and done["kept"] == [last] and sorted(done["deleted"]) == sorted(early), done
    assert os.listdir(fake_root / "backups") == [last]


def test_backups_without_seq_list_first_by_their_time(fake_root):
    """Records written before `seq` existed order among themselves by created_at, then ID,
    and before every backup that has a seq."""
    ids = [backup_manager.create_backup(fake_root)["id"] for _ in range(3)]
    for bid, when in zip(ids[1:], ("2099-01-01T00:00:00.000000Z", "2001-01-01T00:00:00.000000Z")):
        path = fake_root / "backups" / bid / "backup.json"
        rec = json.loads(path.read_text())
        del rec["seq"]
        path.chmod(0o644)
        path.write_text(json.dumps(dict(rec, created_at=when)))
    assert [b["id"] for b in backup_manager.list_backups(fake_root)] == [ids[2], ids[1], ids[0]]
    assert backup_manager.create_backup(fake_root)["seq"] == 2


def test_backup_due_policy(fake_root):
    cfg = training_config.default_config(backup_every_files=2, backup_every_hours=0)
    assert backup_manager.backup_due(fake_root, cfg, 1) is False
    assert backup_manager.backup_due(fake_root, cfg, 2) is True
    hourly = training_config.default_config(backup_every_files=0, backup_every_hours=1.0)
    assert backup_manager.backup_due(fake_root, hourly, 0) is True  # no backup yet
    backup_manager.create_backup(fake_root)
    assert backup_manager.backup_due(fake_root, hourly, 0) is False
    off = training_config.default_config(backup_every_files=0, backup_every_hours=0)
    assert backup_manager.backup_due(fake_root, off, 50) is False


def test_backup_in_background_for_the_daemon(fake_root):
    rec = backup_manager.backup_in_background(fake_root, note="auto", timeout=60)
    assert rec["ok"] is True and rec["note"] == "auto" and rec["status"] == "verified"
    assert backup_manager.latest_backup(fake_root)["id"] == rec["id"]
    (fake_root / "current_model" / "config.json").unlink()
    with pytest.raises(backup_manager.GuardrailError) as exc:
        backup_manager.backup_in_background(fake_root, timeout=60)
    assert str(exc.value) == (f"no current_model to back up, {fake_root / 'current_model'}. "
                              f"Run `python3 training_daemon.py init --root {fake_root}`.")


def test_set_idle_priority_applies_to_the_calling_thread():
    seen = {}

    def worker():
        seen["ok"] = backup_manager.set_idle_priority()
        seen["policy"] = os.sched_getscheduler(0)
        if os.uname().machine == "x86_64":  # ioprio_get(IOPRIO_WHO_PROCESS, this thread)
            seen["io_class"] = verified_copy._libc().syscall(252, 1, 0) >> 13

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen.pop("io_class", 3) == 3  # IOPRIO_CLASS_IDLE
    assert seen == {"ok": True, "policy": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the test's own thread is untouched


# --------------------------------------------------------------------------- audit regressions

def _json_cli(capsys, *argv) -> tuple[int, dict, str]:
    """Run with --json: stdout must hold exactly one JSON document, whatever happened."""
    code = backup_manager.main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_unwritable_backup_dir_is_an_error_not_a_traceback(fake_root, tmp_path, capsys):
    """Regression: a backup_dir that cannot be created or written raised a bare OSError
    (traceback, no JSON on stdout)."""
    (tmp_path / "a-file").write_text("x")
    blocked = tmp_path / "a-file" / "backups"             # its parent is a file: ENOTDIR
    _set_backup_dir(fake_root, blocked)
    code, doc, err = _json_cli(capsys, "backup")
    assert code == 1 and doc["ok"] is False
    assert err.strip() == (
        f"Error: cannot create backup_dir (Not a directory), {blocked}. Make it writable, or set "
        "`backup_dir` in config.json to a writable folder on another disk, then run "
        "`python3 backup_manager.py backup`.")
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "1m"):
        pytest.skip("mount -t tmpfs not permitted here")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        _set_backup_dir(fake_root, ro)
        code, doc, err = _json_cli(capsys, "backup")
        assert code == 1 and doc["error"]["what"] == "cannot write in backup_dir (Read-only file system)"
        assert doc["error"]["where"] == str(ro) and os.listdir(ro) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_configured_backup_dir_that_is_missing(fake_root, tmp_path, capsys):
    missing = tmp_path / "usb" / "backups"
    _set_backup_dir(fake_root, missing)
    code, out, _ = _cli(capsys, "list")
    assert code == 0 and out.startswith(f"backup_dir {missing} does not exist (no backup yet, "
                                        "or its disk is not mounted)")
    doc = _backup(capsys)
    assert doc["warnings"][0].startswith(f"backup_dir {missing} did not exist; created it")
    assert (missing / doc["id"]).is_dir()


def test_a_folder_that_is_not_a_root_is_refused_and_left_untouched(tmp_path, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    for argv in (["backup"], ["list"], ["verify", "--all"], ["prune", "--yes"],
                 ["restore", "b20261128T172301-3f9a"]):
        code, doc, err = _json_cli(capsys, "--root", str(other), *argv)
        assert code == 1 and doc["ok"] is False, argv
        assert err.startswith(f"Error: not a training root (no config.json, current_model/ or "
                              f"versions/), {other}. ")
    assert os.listdir(other) == []


@pytest.mark.parametrize("where", ["current_model/bk", "versions", "inbox", "processing/b", ".", "..", "/"])
def test_a_backup_dir_inside_the_roots_managed_folders_or_above_it_is_refused(fake_root, capsys, where):
    """A backup written into current_model/ made a restore take it for a damaged model; in
    inbox/ or processing/ it would be taken for data; at or above the root prune would look
    at the root's folders (or the whole disk) as backups."""
    cfg = training_config.default_config(backup_dir=where)
    training_config.write_config(fake_root, cfg)
    before = sorted(str(x) for x in fake_root.rglob("*"))
    for argv in (("backup",), ("list",), ("prune", "--yes")):
        code, _, err = _cli(capsys, *argv)
        assert code == 1 and "Error: backup_dir " in err and "which only the product writes" in err \
            or "the training root or above it" in err, (argv, err)
        assert "Set `backup_dir` in config.json" in err
    assert sorted(str(x) for x in fake_root.rglob("*")) == before


@pytest.mark.parametrize("argv", [["restore"], ["bogus"], ["prune", "--keep", "x"],
                                  ["verify", "b20261128T172301-3f9a", "--all"], [],
                                  ["restore", "b20261128T172301-3f9a", "--to", ""]])
def test_usage_errors_print_one_json_document(fake_root, capsys, argv):
    code, doc, err = _json_cli(capsys, *argv)
    assert code == 2 and doc["ok"] is False and doc["error"]["exit_code"] == 2
    assert err.splitlines()[-1].startswith("Error: ")


def test_restore_to_inside_the_roots_model_folders_is_refused(fake_root, capsys):
    """Regression: `restore ID --to ROOT/versions/v009` wrote a model folder that looked
    like a version (and moved the next version id)."""
    doc = _backup(capsys)
    for inside in ("versions/v009", "backups/x", "current_model/sub", ".staging/y", "processing",
                   "inbox/high", "queue/normal", "checkpoints/c", "base/b009", "failed/x", "."):
        target = fake_root / inside
        existed = target.exists()
        code, _, err = _cli(capsys, "restore", doc["id"], "--to", str(target))
        assert code == 1 and err.startswith("Error: --to is "), inside  # (a model in processing/
        assert "where only the product writes" in err, err               # was trained as data)
        assert f"`python3 backup_manager.py restore {doc['id']}`" in err
        assert target.exists() == existed and not (existed and (target / "config.json").exists())
    (fake_root / "a-file").write_text("mine")
    code, _, err = _cli(capsys, "restore", doc["id"], "--to", str(fake_root / "a-file"))
    assert code == 1 and err.startswith("Error: --to names a file; restore never writes over files")
    assert (fake_root / "a-file").read_text() == "mine"


def test_restore_repairs_an_incomplete_current_model(initialized_root, capsys):
    """Regression: with current_model's weights deleted, restoring a backup failed with
    'current_model is incomplete' (it tried to version the broken tree first)."""
    root = initialized_root
    doc = _backup(capsys)
    good = _tree_hashes(root / "current_model")
    (root / "current_model" / "model.safetensors").unlink()
    code, result, err = _json_cli(capsys, "restore", doc["id"])
    assert code == 0, err
    assert result["kept_version"] is None and result["incomplete_kept_in"] == str(root / ".attic")
    (kept,) = (root / ".attic").iterdir()                  # the broken tree, not thrown away
    assert (kept / "config.json").is_file() and not (kept / "model.safetensors").exists()
    now = _tree_hashes(root / "current_model")
    assert {k: v for k, v in now.items() if k != ".manifest.json"} == \
        {k: v for k, v in good.items() if k != ".manifest.json"}


def test_a_broken_config_does_not_lock_anyone_out_of_their_backups(fake_root, tmp_path, capsys):
    elsewhere = tmp_path / "disk2"
    _set_backup_dir(fake_root, elsewhere)
    doc = _backup(capsys)
    cfg = json.loads((fake_root / "config.json").read_text())
    cfg["learning_rate"] = "fast"                           # invalid, still readable
    (fake_root / "config.json").write_text(json.dumps(cfg))
    code, listed, err = _json_cli(capsys, "list")
    assert code == 0 and [b["id"] for b in listed["backups"]] == [doc["id"]]
    assert err.startswith("warning: config.json is not usable (")
    (fake_root / "config.json").write_text("{not json")     # corrupt: the default folder
    code, listed, err = _json_cli(capsys, "list")
    assert code == 0 and listed["backup_dir"] == str(fake_root / "backups")
    assert f"using backup_dir {fake_root / 'backups'}" in err


def test_undo_carries_the_root_given_with_root(initialized_root, capsys, monkeypatch):
    root = initialized_root
    monkeypatch.delenv("TRAINING_ROOT")
    doc = _backup(capsys, "--root", str(root))
    import model_versioner
    assert model_versioner.create_version(root, "manual", force=True)[1]
    code, result, _ = _json_cli(capsys, "--root", str(root), "restore", doc["id"])
    assert code == 0
    assert result["undo"] == f"python3 model_versioner.py restore {result['previous_version']} " \
                             f"--root {root}"


def test_backup_without_current_model_points_at_the_restore_not_init(fake_root, capsys):
    """Regression: the fix for a lost current_model said `training_daemon.py init`, which
    starts over from a random model; with versions there, `restore latest` is the fix."""
    import model_versioner
    model_versioner.create_version(fake_root, "manual")
    shutil.rmtree(fake_root / "current_model")
    code, _, err = _cli(capsys, "backup")
    assert code == 1 and err.strip() == (
        f"Error: no current_model to back up, {fake_root / 'current_model'}. Bring it back with "
        "`python3 model_versioner.py restore latest`, then run `python3 backup_manager.py backup`.")


def test_two_backups_started_together_both_succeed(fake_root):
    """Regression: the second of two backups started at once failed at once (busy, exit 3)
    instead of waiting for the first to finish."""
    procs = [subprocess.Popen([sys.executable, str(REPO / "backup_manager.py"), "backup", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, TRAINING_ROOT=str(fake_root)))
             for _ in range(2)]
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        docs.append(json.loads(out))
    assert len({d["id"] for d in docs}) == 2
    assert sorted(b["id"] for b in backup_manager.list_backups(fake_root)) == \
        sorted(d["id"] for d in docs)


def test_backup_and_restore_to_work_on_a_read_only_root(fake_root, tmp_path, capsys, read_only):
    """A root on a filesystem remounted read-only: backup (to a backup_dir elsewhere) and
    `restore --to` read it only, so they work (they used to need a lock file in the root)."""
    bdir = tmp_path / "elsewhere"
    _set_backup_dir(fake_root, bdir)
    first = _backup(capsys)        # made while writable: the root's lock file exists
    fresh = tmp_path / "fresh-root"
    shutil.copytree(fake_root, fresh)
    shutil.rmtree(fresh / ".locks", ignore_errors=True)   # one read-only before any lock
    for root in (fake_root, fresh):
        before = _tree_hashes(root)
        read_only(root)
        code, doc, err = _cli(capsys, "backup", "--json", "--root", str(root))
        assert code == 0, err
        assert doc["status"] == "verified" and doc["source"] == "current_model"
        assert "training root is read-only" in err
        out = tmp_path / f"out-{root.name}"
        code, result, err = _cli(capsys, "restore", first["id"], "--to", str(out), "--json",
                                 "--root", str(root))
        assert code == 0, err
        assert result["restored_to"] == str(out)
        restored = _tree_hashes(out)
        restored.pop(".manifest.json")
        assert restored == _tree_hashes(root / "current_model")
        assert _tree_hashes(root) == before
