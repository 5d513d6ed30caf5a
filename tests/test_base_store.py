"""base_store: immutable bases for adapter mode (create, dedupe, verify, read-only, kill -9)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import base_store
from conftest import kill_9_when
from trainroot import GuardrailError


def full_folder(path: Path, weights: bytes = b"w" * 1000, step: int = 0) -> Path:
    """A full model folder as the checks see it: config.json, weights, tokenizer, state."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "tokens_seen": 0}))
    return path


def test_create_makes_an_immutable_verified_base(tmp_root, tmp_path, tiny_model_dir):
    # a copy: the base hard-links its source's files and makes them read-only (the session's
    # shared tiny model must stay as other tests expect it)
    tiny_model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "src"))
    base_id = base_store.create_base(tmp_root, tiny_model_dir, source="full model at v001")
    assert base_id == "b001"
    folder = base_store.base_dir(tmp_root, base_id)
    assert folder == tmp_root / "base" / "b001"
    rec = base_store.read_base(tmp_root, base_id)
    assert rec["base_id"] == "b001" and rec["source"] == "full model at v001"
    assert rec["merged"] == [] and rec["dtype"] == json.loads(
        (tiny_model_dir / "config.json").read_text()).get("dtype", json.loads(
            (tiny_model_dir / "config.json").read_text()).get("torch_dtype"))
    assert base_store.verify_base(tmp_root, base_id) == []
    for p in folder.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o444, p
    # hard links, not copies: the source's weights share the inode
    src_w = next(tiny_model_dir.glob("*.safetensors"))
    assert (folder / src_w.name).stat().st_ino == src_w.stat().st_ino
    manifest = json.loads((folder / ".manifest.json").read_text())
    assert "base.json" in manifest["files"] and manifest["kind"] == "full"
    assert [b["base_id"] for b in base_store.list_bases(tmp_root)] == ["b001"]
    assert not base_store.is_adapter_folder(folder) and base_store.adapter_base(folder) is None


def test_same_weights_are_kept_once(tmp_root, tmp_path):
    a = full_folder(tmp_path / "a", step=1)
    b = full_folder(tmp_path / "b", step=99)     # only trainer_state differs: same weights
    c = full_folder(tmp_path / "c", weights=b"x" * 1000)
    assert base_store.create_base(tmp_root, a, source="a") == "b001"
    assert base_store.create_base(tmp_root, b, source="b") == "b001"
    assert base_store.create_base(tmp_root, c, source="c", merged=["v003", "v004"]) == "b002"
    assert base_store.read_base(tmp_root, "b002")["merged"] == ["v003", "v004"]
    assert sorted(os.listdir(tmp_root / "base")) == [".last_id", "b001", "b002"]


def test_a_deleted_base_id_is_never_given_again(tmp_root, tmp_path):
    import shutil
    base_store.create_base(tmp_root, full_folder(tmp_path / "a"), source="a")
    base_store.create_base(tmp_root, full_folder(tmp_path / "b", weights=b"b"), source="b")
    shutil.rmtree(tmp_root / "base" / "b002")
    assert base_store.create_base(tmp_root, full_folder(tmp_path / "c", weights=b"c"),
                                  source="c") == "b003"


def test_with_base_deleted_whole_an_id_a_version_or_backup_names_is_not_given_again(tmp_root, tmp_path):
    """Regression: `rm -rf base/` took .last_id with it; the next base got b002 again, and an
    adapter version made on the old b002 verified "ok" and loaded onto the new weights."""
    import backup_records
    import trainroot
    base_store.create_base(tmp_root, full_folder(tmp_path / "a"), source="a")
    for vid, base in (("v003", "b002"), ("v004", "b003")):
        (tmp_root / "versions" / vid).mkdir(parents=True)
        trainroot.atomic_write_json(tmp_root / "versions" / vid / "version.json",
                                    {"id": vid, "kind": "adapter", "base": base, "manifest": {}})
    (tmp_root / "versions" / ".pruned").mkdir()
    trainroot.atomic_write_json(tmp_root / "versions" / ".pruned" / "v005.json",
                                {"id": "v005", "kind": "adapter", "base": "b004"})
    shutil.rmtree(tmp_root / "base")
    assert base_store.create_base(tmp_root, full_folder(tmp_path / "c", weights=b"c"), source="c") == "b005"
    shutil.rmtree(tmp_root / "base")
    held = backup_records.backups_dir(tmp_root) / "b20261205T000000-abcd"  # a backup holding b009
    held.mkdir(parents=True)
    trainroot.atomic_write_json(held / "backup.json", {"id": held.name, "status": "verified",
                                                       "base": {"id": "b009"}})
    assert base_store.create_base(tmp_root, full_folder(tmp_path / "d", weights=b"d"), source="d") == "b010"


def test_verify_finds_a_changed_and_a_missing_file(tmp_root, tmp_path):
    base_id = base_store.create_base(tmp_root, full_folder(tmp_path / "a"), source="a")
    w = base_store.base_dir(tmp_root, base_id) / "model.safetensors"
    os.chmod(w, 0o644)
    w.write_bytes(b"v" * 1000)    # same size, other bytes: only the sha256 shows it
    assert base_store.verify_base(tmp_root, base_id) == [
        "base b001: model.safetensors: sha256 mismatch (changed after it was recorded)"]
    w.unlink()
    assert base_store.verify_base(tmp_root, base_id) == ["base b001: model.safetensors: missing"]
    assert base_store.verify_base(tmp_root, "b007") == [
        f"base b007: missing ({tmp_root / 'base' / 'b007'})"]
    with pytest.raises(GuardrailError, match="base b007 is missing.*backup_manager.py restore"):
        base_store.read_base(tmp_root, "b007")


def test_refuses_an_adapter_or_incomplete_folder(tmp_root, tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    (ad / "adapter_model.safetensors").write_bytes(b"a")
    with pytest.raises(GuardrailError, match="an adapter folder, not a full model"):
        base_store.create_base(tmp_root, ad, source="x")
    half = full_folder(tmp_path / "half")
    (half / "config.json").unlink()
    with pytest.raises(GuardrailError, match="config.json: missing"):
        base_store.create_base(tmp_root, half, source="x")
    assert not (tmp_root / "base").exists() or base_store.list_bases(tmp_root) == []


def test_adapter_base_and_is_adapter_folder(tmp_root, tmp_path):
    import model_manifest
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_model.safetensors").write_bytes(b"a")
    (ad / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/old/place/base/b004"}))
    assert base_store.is_adapter_folder(ad)
    assert base_store.adapter_base(ad) == "b004"   # no manifest: the path's base id
    model_manifest.write_manifest(ad, extra={"kind": "adapter", "base": "b002"})
    assert base_store.adapter_base(ad) == "b002"   # the manifest is the truth
    (ad / "config.json").write_text("{}")
    assert not base_store.is_adapter_folder(ad) and base_store.adapter_base(ad) is None


def test_kill_9_during_create_leaves_no_half_base(tmp_root, tmp_path):
    # big enough that hashing it takes a while: the kill lands before the final rename
    src = full_folder(tmp_path / "big", weights=os.urandom(1 << 20) * 96)
    code = (f"import sys; sys.path.insert(0, {str(Path(base_store.__file__).parent)!r}); "
            f"import base_store; base_store.create_base({str(tmp_root)!r}, {str(src)!r}, source='x')")
    store = tmp_root / "base"
    rc = kill_9_when(["-c", code], tmp_root,
                     lambda: store.is_dir() and any(n.startswith(".staging-") for n in os.listdir(store)))
    assert rc == -9
    assert base_store.list_bases(tmp_root) == []
    assert any(n.startswith(".staging-") for n in os.listdir(store))
    assert base_store.create_base(tmp_root, src, source="x") == "b001"
    assert sorted(os.listdir(store)) == [".last_id", "b001"]      # staging cleaned
    assert base_store.verify_base(tmp_root, "b001") == []
    assert (src / "model.safetensors").stat().st_size == 96 << 20  # the source untouched


def test_check_base_is_cheap_but_catches_a_write_in_place(tmp_root, tmp_path):
    base_id = base_store.create_base(tmp_root, full_folder(tmp_path / "a"), source="a")
    assert base_store.check_base(tmp_root, base_id) == []
    w = base_store.base_dir(tmp_root, base_id) / "model.safetensors"
    os.chmod(w, 0o644)
    with open(w, "r+b") as f:     # in place, same size: its mtime moves past the manifest's
        f.write(b"z")
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert base_store.check_base(tmp_root, base_id) == [
        "base b001: model.safetensors: sha256 mismatch (changed after it was recorded)"]
    w.unlink()
    assert base_store.check_base(tmp_root, base_id) == ["base b001: model.safetensors: missing"]
