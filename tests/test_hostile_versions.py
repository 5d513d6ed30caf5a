"""Hostile situations for versions and backups: hand-edited records, symlinks, deleted
versions, broken models and kill -9 — each a mistake a person or an assistant makes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

import backup_manager
import model_versioner as mv
from conftest import REPO, kill_9_when
from test_model_versioner import make_model, model_gen, train
from trainroot import Paths


@pytest.fixture
def root(tmp_root) -> Path:
    """v001 (gen 1), v002 (gen 2), and current_model = gen 3, trained and not yet versioned."""
    Paths(tmp_root).ensure()
    train(tmp_root, 1)
    mv.create_version(tmp_root, "init")
    train(tmp_root, 2)
    mv.create_version(tmp_root, "post-train")
    train(tmp_root, 3)
    return tmp_root


def _main(module, capsys, *args) -> tuple[int, str, str]:
    code = module.main(list(args))
    out = capsys.readouterr()
    if "--json" in args:
        json.loads(out.out)  # exactly one JSON document, whatever happened
    return code, out.out, out.err


def _edit(path: Path, **changes) -> None:
    """What a person does with an editor: rewrite the JSON file by hand (not in place)."""
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            doc.pop(key, None)
        else:
            doc[key] = value
    path.unlink()
    path.write_text(json.dumps(doc))


# --------------------------------------------------------------------------- versions

def test_an_edited_version_id_never_names_what_prune_deletes(root, capsys):
    p = Paths(root)
    mv.create_version(root, "third")                       # v003
    train(root, 4)
    mv.create_version(root, "fourth")                      # v004
    assert _main(mv, capsys, "prune", "--keep", "3", "--yes")[0] == 0
    assert (p.versions / ".pruned" / "v001.json").is_file()
    _edit(p.versions / "v002" / "version.json", id=".pruned")
    code, out, err = _main(mv, capsys, "prune", "--keep", "1", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["deleted"] == ["v002", "v003"]
    assert (p.versions / ".pruned" / "v001.json").is_file()  # lineage history kept
    assert not (p.versions / "v002").exists() and (p.versions / "v004").is_dir()
    assert sorted(os.listdir(p.versions / ".pruned")) == ["v001.json", "v002.json", "v003.json"]
    assert mv.lineage(root, "latest")["chain"] == ["v001", "v002", "v003", "v004"]
    assert model_gen(p.current_model) == 4


@pytest.mark.parametrize("field,value", [
    ("id", KeyError), ("id", [1]), ("parent", {"a": 1}), ("parent", 5), ("data_files", "x.jsonl"),
    ("data_files", [7]), ("manifest", {"config.json": "x"}),
    ("manifest", {"config.json": {"size": "12"}})])
def test_a_hand_edited_version_record_is_an_error_not_a_traceback(root, capsys, field, value):
    p = Paths(root)
    for vid in ("v001", "v002"):
        _edit(p.versions / vid / "version.json", **{field: value})
    for args in (["list", "--json"], ["list"], ["show", "v001", "--json"], ["show", "v002"],
                 ["verify", "--all", "--json"], ["lineage", "latest", "--json"],
                 ["prune", "--keep", "1", "--json"], ["tag", "v001", "old", "--json"],
                 ["rollback", "--json"]):
        code, out, err = _main(mv, capsys, *args)
        assert code in (0, 1), (args, err)
        assert "Traceback" not in err
        if code == 1:
            assert err.startswith("Error: ") and "`python3 model_versioner.py" in err, (args, err)
    assert model_gen(p.current_model) in (1, 2, 3)


def test_rm_rf_of_a_tagged_version_never_gives_its_id_to_another_model(root, capsys):
    p = Paths(root)
    assert mv.create_version(root, "good one") == ("v003", True)   # gen 3
    assert _main(mv, capsys, "tag", "v003", "good")[0] == 0
    code, out, _ = _main(mv, capsys, "restore", "v001")
    assert code == 0 and "restore v003" in out                      # the undo it printed
    shutil.rmtree(p.versions / "v003")                              # the mistake
    train(root, 7)
    vid, created = mv.create_version(root, "after")
    assert created and vid == "v004"
    code, _, err = _main(mv, capsys, "restore", "v003")             # the old undo command
    assert code == 1 and "no version v003" in err
    assert _main(mv, capsys, "show", "good")[0] == 1                # the tag names no other model
    assert model_gen(p.current_model) == 7


def test_restore_says_where_it_kept_a_broken_current_model(root, capsys):
    p = Paths(root)
    weights = (p.current_model / "model.safetensors").read_bytes()   # gen 3: never versioned
    (p.current_model / "config.json").unlink()                       # the mistake
    code, out, err = _main(mv, capsys, "restore", "v002")
    assert code == 0, err
    assert model_gen(p.current_model) == 2
    (attic,) = (p.root / ".attic").iterdir()
    assert f"kept in {attic}/" in out                                # not silently hidden
    assert (attic / "model.safetensors").read_bytes() == weights
    (p.current_model / "config.json").unlink()
    code, out, err = _main(mv, capsys, "restore", "v001", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["incomplete_kept_in"] in {str(a) for a in (p.root / ".attic").iterdir()}
    assert doc["incomplete_kept_in"] != str(attic)


def test_a_version_moved_to_another_disk_and_linked_back_is_pruned_as_a_link(root, tmp_path,
                                                                            capsys):
    p = Paths(root)
    mv.create_version(root, "third")                               # v003
    moved = tmp_path / "other disk" / "v001"
    shutil.copytree(p.versions / "v001", moved)                    # the person frees space
    shutil.rmtree(p.versions / "v001")
    os.symlink(moved, p.versions / "v001")
    os.symlink(p.versions / "v002", p.versions / "v000x")          # not an id: ignored
    code, out, err = _main(mv, capsys, "prune", "--keep", "1", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["deleted"] == ["v001", "v002"]
    assert model_gen(moved) == 1                                   # the link went, not its target
    assert not os.path.lexists(p.versions / "v001")
    assert _main(mv, capsys, "recover")[0] == 0 and model_gen(moved) == 1


# --------------------------------------------------------------------------- backups

@pytest.fixture
def broot(root, capsys) -> tuple[Path, str]:
    code, out, err = _main(backup_manager, capsys, "backup", "--json")
    assert code == 0, err
    return root, json.loads(out)["id"]


@pytest.mark.parametrize("changes", [
    {"created_at": 5}, {"status": None}, {"status": ["verified"]}, {"total_bytes": "many"},
    {"files": {"config.json": {"size": "32", "sha256": 5}}}])
def test_a_hand_edited_backup_record_is_reported_not_a_traceback(broot, capsys, changes):
    root, bid = broot
    code, out, err = _main(backup_manager, capsys, "backup", "--json")
    good = json.loads(out)["id"]
    _edit(backup_manager.backups_dir(root) / bid / "backup.json", **changes)
    for args in (["list"], ["list", "--json"], ["verify", "--all", "--json"],
                 ["prune", "--keep", "1", "--json"]):
        code, out, err = _main(backup_manager, capsys, *args)
        assert code in (0, 1), (args, err)
        assert "Traceback" not in err
    code, out, err = _main(backup_manager, capsys, "verify", "--all", "--json")
    results = {r["id"]: r["ok"] for r in json.loads(out)["backups"]}
    assert results[good] is True
    if "files" in changes:
        assert results[bid] is False and code == 1


def test_a_symlink_named_like_a_newer_backup_never_costs_the_real_one(broot, capsys):
    root, bid = broot
    bdir = backup_manager.backups_dir(root)
    link = "b29991231T235959-ffff"                      # sorts after the real one
    os.symlink(bdir / bid, bdir / link)
    code, out, err = _main(backup_manager, capsys, "prune", "--keep", "1", "--yes", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kept"] == [bid] and doc["deleted"] == [link]
    assert (bdir / bid / "model.safetensors").is_file() and not os.path.lexists(bdir / link)
    assert _main(backup_manager, capsys, "verify", bid)[0] == 0
    assert _main(backup_manager, capsys, "backup")[0] == 0   # nothing left that blocks backups


def test_a_leftover_symlink_in_backup_dir_does_not_block_every_backup(broot, capsys):
    root, bid = broot
    bdir = backup_manager.backups_dir(root)
    os.symlink(bdir / bid, bdir / ".deleting-b20200101T000000-abcd")  # e.g. a killed prune
    code, out, err = _main(backup_manager, capsys, "backup", "--json")
    assert code == 0, err
    assert json.loads(out)["cleaned_staging"] == [".deleting-b20200101T000000-abcd"]
    assert _main(backup_manager, capsys, "verify", bid)[0] == 0


def test_an_incomplete_current_model_is_never_backed_up_as_good(broot, capsys):
    root, bid = broot
    (Paths(root).current_model / "model.safetensors").unlink()       # the mistake
    code, out, err = _main(backup_manager, capsys, "backup", "--json")
    assert code == 1 and "current_model is incomplete" in err and "restore latest" in err
    listed = json.loads(_main(backup_manager, capsys, "list", "--json")[1])["backups"]
    assert [b["id"] for b in listed] == [bid]
    code, out, err = _main(backup_manager, capsys, "restore", bid)
    assert code == 0, err
    assert model_gen(Paths(root).current_model) == 3


def test_kill_9_during_a_backup_restore_leaves_nothing_behind_the_next_one(broot, capsys):
    root, bid = broot
    p = Paths(root)
    # a big model, so the kill lands while the restore copies it
    big = make_model(p.staging / "big", 5, size=96 << 20)
    mv.publish_model(root, big, reason="big")
    code, out, err = _main(backup_manager, capsys, "backup", "--json")
    big_bid = json.loads(out)["id"]
    train(root, 6)
    status = kill_9_when([str(REPO / "backup_manager.py"), "restore", big_bid], root, lambda: any(
        (d / "model.safetensors").exists() for d in p.staging.glob("backup-restore-*")))
    assert status == -signal.SIGKILL
    assert len(list(p.staging.glob("backup-restore-*"))) == 1       # a full copy, left over
    assert model_gen(p.current_model) == 6
    code, out, err = _main(backup_manager, capsys, "restore", bid, "--json")
    assert code == 0, err
    assert list(p.staging.glob("backup-restore-*")) == []
    assert model_gen(p.current_model) == 3
