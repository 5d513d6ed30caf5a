"""Adapter (LoRA) versions: verify, restore, rollback, backups, lineage and consolidate of
peft adapter folders on an immutable base (tests/adapter_fixtures.py builds them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import base_store
import model_versioner as mv
from adapter_fixtures import logits, make_base, publish_adapter
from conftest import REPO, run_script
from trainroot import GuardrailError


@pytest.fixture
def adapter_root(initialized_root):
    """v001 full (init); base b001 from it; v002, v003 adapters on b001 (steps 10, 20)."""
    root = initialized_root
    base_id = make_base(root)
    assert base_id == "b001"
    assert publish_adapter(root, base_id, seed=1, step=10) == "v002"
    assert publish_adapter(root, base_id, seed=2, step=20) == "v003"
    return root


def loads_in_fresh_process(folder: Path) -> list:
    """from_pretrained(folder) + generate in a new interpreter (plain transformers + peft)."""
    code = ("import sys, json, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True); "
            "out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False); "
            "print(json.dumps({'cls': type(m).__name__, 'ids': out[0].tolist(), "
            "'logit': m(torch.tensor([[1, 2, 3]])).logits[0, -1, :3].tolist()}))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_adapter_versions_record_kind_and_base(adapter_root):
    rec = mv.read_version(adapter_root, "v002")
    assert rec["kind"] == "adapter" and rec["base"] == "b001"
    assert "kind" not in mv.read_version(adapter_root, "v001")     # full: as before
    assert not (adapter_root / "versions" / "v002" / "config.json").exists()
    assert mv.check_version(adapter_root, "v003") == []
    assert mv.verify_version(adapter_root, "v003") == []
    out = run_script("model_versioner.py", "list", "--json", root=adapter_root, check=True)
    rows = {r["id"]: r for r in json.loads(out.stdout)["versions"]}
    assert (rows["v001"]["kind"], rows["v001"]["base"]) == ("full", None)
    assert (rows["v003"]["kind"], rows["v003"]["base"]) == ("adapter", "b001")
    text = run_script("model_versioner.py", "list", root=adapter_root, check=True).stdout
    assert "step 20  manual  adapter on b001" in text
    show = run_script("model_versioner.py", "show", "v002", root=adapter_root, check=True).stdout
    assert "kind         adapter" in show and "base         b001" in show
    lin = mv.lineage(adapter_root, "v003")
    assert lin["chain"] == ["v001", "v002", "v003"]
    assert lin["bases"] == {"v001": None, "v002": "b001", "v003": "b001"}
    assert mv.prune_plan(adapter_root)["bases"] == {"b001": ["v002", "v003"]}


def test_verify_of_an_adapter_version_checks_its_base(adapter_root):
    w = adapter_root / "base" / "b001" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.unlink()                    # a new inode: v001 (hard links of the same files) stays good
    w.write_bytes(bytes(data))    # same size: only the sha256 can tell
    assert mv.verify_version(adapter_root, "v003") == [
        "v003: base b001: model.safetensors: sha256 mismatch (changed after it was recorded)"]
    proc = run_script("model_versioner.py", "verify", "--all", root=adapter_root)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["v001: ok", "v002: BAD", "v003: BAD"]


def test_restore_and_rollback_after_rm_current_model(adapter_root):
    want = logits(adapter_root / "versions" / "v002")
    shutil.rmtree(adapter_root / "current_model")
    result = mv.restore_version(adapter_root, "v002")
    assert result["restored"] == "v002" and mv.current_version(adapter_root) == "v002"
    assert base_store.adapter_base(adapter_root / "current_model") == "b001"
    assert (logits(adapter_root / "current_model") == want).all()
    shutil.rmtree(adapter_root / "current_model")
    mv.restore_version(adapter_root, "v003")
    assert mv.rollback(adapter_root)["restored"] == "v002"
    got = loads_in_fresh_process(adapter_root / "current_model")
    assert got["cls"] == "LlamaForCausalLM" and len(got["ids"]) == 7
    assert got["logit"] == pytest.approx(want[0, 2, :3].tolist(), abs=1e-5)


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_restore_refused_without_its_base(adapter_root, damage):
    mv.restore_version(adapter_root, "v001")
    before = sorted(os.listdir(adapter_root / "current_model"))
    base = adapter_root / "base" / "b001"
    if damage == "missing":
        shutil.rmtree(base)
        what = "which is missing"
    else:
        data = bytearray((base / "model.safetensors").read_bytes())
        data[100:103] = b"\0\1\2"
        (base / "model.safetensors").unlink()   # new inode: current_model (v001) keeps its own
        (base / "model.safetensors").write_bytes(bytes(data))
        what = "which is damaged (base b001: model.safetensors: sha256 mismatch"
    with pytest.raises(GuardrailError) as err:
        mv.restore_version(adapter_root, "v003")
    assert f"version v003 is an adapter on base b001, {what}" in str(err.value)
    assert "nothing was changed" in str(err.value)
    assert "No backup holds base b001" in err.value.fix
    assert "again" not in err.value.fix  # (no retry of the same restore: it cannot work)
    assert sorted(os.listdir(adapter_root / "current_model")) == before
    assert mv.current_version(adapter_root) == "v001"
    proc = run_script("model_versioner.py", "restore", "v002", root=adapter_root)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: version v002 is an adapter on base b001")


def test_backup_of_an_adapter_holds_its_base_once(adapter_root):
    import backup_manager as bm
    one = bm.create_backup(adapter_root)                 # current_model = v003
    two = bm.create_backup(adapter_root, "v002")
    assert one["kind"] == two["kind"] == "adapter"
    assert one["base"] == two["base"] and one["base"]["id"] == "b001"
    bdir = Path(one["path"]).parent
    assert os.listdir(bdir / "bases") == [one["base"]["path"].split("/")[1]]   # one copy
    copy = bdir / one["base"]["path"]
    assert (copy / "model.safetensors").read_bytes() == \
        (adapter_root / "base" / "b001" / "model.safetensors").read_bytes()
    assert (copy / "model.safetensors").stat().st_ino != \
        (adapter_root / "base" / "b001" / "model.safetensors").stat().st_ino  # a copy, not a link
    assert one["total_bytes"] < 200_000                  # the adapter only
    assert bm.verify_backup(adapter_root, one["id"]) == []
    w = copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.unlink()
    w.write_bytes(bytes(data))
    assert bm.verify_backup(adapter_root, one["id"]) == [
        f"base b001 ({one['base']['path']}): model.safetensors: sha256 mismatch"]
    with pytest.raises(GuardrailError, match="nothing was restored"):
        bm.restore_backup(adapter_root, two["id"])
    # the next backup does not reuse the damaged copy (what `verify` names as the fix): it
    # keeps it aside and copies the base again, which every backup naming it shares
    three = bm.create_backup(adapter_root)
    assert bm.verify_backup(adapter_root, three["id"]) == []
    assert bm.verify_backup(adapter_root, one["id"]) == [] == bm.verify_backup(adapter_root, two["id"])
    aside = [n for n in os.listdir(bdir / "bases") if n.startswith(".damaged-")]
    assert len(aside) == 1 and (bdir / "bases" / aside[0] / "model.safetensors").read_bytes() == bytes(data)


def test_backup_restore_brings_back_adapter_and_base(adapter_root):
    import backup_manager as bm
    want = logits(adapter_root / "current_model")
    rec = bm.create_backup(adapter_root)
    mv.restore_version(adapter_root, "v001")
    shutil.rmtree(adapter_root / "current_model")
    shutil.rmtree(adapter_root / "base")
    with pytest.raises(GuardrailError, match="restore-base b001"):
        mv.restore_version(adapter_root, "v003")
    result = bm.restore_backup(adapter_root, rec["id"])
    assert result["base"] == "b001" and result["base_restored"] == "restored base b001"
    assert base_store.verify_base(adapter_root, "b001") == []
    assert base_store.check_base(adapter_root, "b001") == []
    assert (logits(adapter_root / "current_model") == want).all()
    # the versions work again too: rollback/restore need only the base
    assert mv.restore_version(adapter_root, "v002")["restored"] == "v002"


def test_restore_to_a_folder_exports_the_adapter_with_its_base(adapter_root, tmp_path):
    """`restore ID --to DIR` of an adapter backup: DIR holds the adapter and a verified copy
    of its base under DIR/base/<id>, adapter_config.json points there, and the folder loads
    on its own after the root's base is gone (an adapter never comes back without its base)."""
    import backup_manager as bm
    from model_manifest import check_model_dir, read_manifest, verify_files
    want = logits(adapter_root / "current_model")
    rec = bm.create_backup(adapter_root)
    shutil.rmtree(adapter_root / "base")
    out = tmp_path / "export"
    bm.restore_backup(adapter_root, rec["id"], to=out)
    assert (out / "base" / "b001" / "config.json").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out / "base" / "b001")
    manifest = read_manifest(out)
    assert (manifest["kind"], manifest["base"]) == ("adapter", "b001")
    assert check_model_dir(out) == [] and verify_files(out, manifest["files"]) == []
    assert (logits(out) == want).all()


def test_restore_base_command(adapter_root):
    import backup_manager as bm
    bm.create_backup(adapter_root, "v002")
    proc = run_script("backup_manager.py", "restore-base", "b001", root=adapter_root)
    assert proc.returncode == 0 and proc.stdout.startswith("base b001 is already good")
    shutil.rmtree(adapter_root / "base" / "b001")
    proc = run_script("backup_manager.py", "restore-base", "b001", "--json", root=adapter_root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["restored"] is True
    # its backups pruned, the verified copy of the base they shared is still there: used
    bdir = adapter_root / "backups"
    for b in bm.list_backups(adapter_root):
        shutil.rmtree(bdir / b["id"])
    shutil.rmtree(adapter_root / "base" / "b001")
    out = bm.restore_base(adapter_root, "b001")
    assert out["restored"] is True and out["from_backup"].startswith("bases/b001-")
    assert base_store.verify_base(adapter_root, "b001") == []
    assert mv.restore_version(adapter_root, "v003")["restored"] == "v003"
    proc = run_script("backup_manager.py", "restore-base", "b009", root=adapter_root)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: no backup holds base b009")


def test_a_base_rotten_in_place_is_named_by_verify_and_brought_back_by_restore_base(adapter_root):
    """Bit rot in a base that keeps its size and time stamp passes the cheap check: verify
    found it and named `repair`, which said "nothing to repair", and restore-base said the
    base was already good. verify names restore-base, repair points there, and restore-base
    hashes the base, moving the rotten one to .attic/."""
    import backup_manager as bm
    bm.create_backup(adapter_root, "v003")
    weights = adapter_root / "base" / "b001" / "model.safetensors"
    st = weights.stat()
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert base_store.check_base(adapter_root, "b001") == []  # the cheap check cannot see it
    proc = run_script("model_versioner.py", "verify", "v003", root=adapter_root)
    assert proc.returncode == 1 and "v003: base b001: model.safetensors" in proc.stderr
    assert "its base b001 is damaged" in proc.stderr and "restore-base b001" in proc.stderr
    proc = run_script("backup_manager.py", "repair", "v003", root=adapter_root)
    assert proc.returncode == 0 and "its base b001 is damaged" in proc.stdout, proc.stdout
    assert "restore-base b001" in proc.stdout
    proc = run_script("backup_manager.py", "restore-base", "b001", root=adapter_root)
    assert proc.returncode == 0 and proc.stdout.startswith("restored base b001"), proc.stdout
    assert base_store.verify_base(adapter_root, "b001") == []
    assert list((adapter_root / ".attic").glob("base-b001-*/model.safetensors"))
    assert run_script("model_versioner.py", "verify", "v003", root=adapter_root).returncode == 0


def test_backup_prune_deletes_base_copies_nothing_can_restore_with_any_more(adapter_root):
    """Every consolidate adds a base copy to backup_dir/bases/, and prune never deleted one:
    the backup budget's own fix (`prune --keep 1`) freed nothing. A copy no backup names
    goes once no version applies to its base; while one does (restore-base needs it), it
    stays."""
    import backup_manager as bm
    bdir = adapter_root / "backups"
    bm.create_backup(adapter_root, "v003")                     # copies base b001
    mv.consolidate(adapter_root)                               # v004: a fresh adapter on b002
    bm.create_backup(adapter_root, "v004")                     # copies base b002
    copies = sorted(os.listdir(bdir / "bases"))
    assert [c.split("-")[0] for c in copies] == ["b001", "b002"]
    out = bm.prune_backups(adapter_root, keep=1, yes=True)
    assert len(out["deleted"]) == 1 and out["base_copies_deleted"] == []  # v002, v003 need b001
    assert mv.prune(adapter_root, keep=1, yes=True)["deleted"] == ["v001", "v002", "v003"]
    proc = run_script("backup_manager.py", "prune", "--keep", "1", root=adapter_root)  # dry run
    assert proc.returncode == 0 and f"the base copies {copies[0]}" in proc.stdout, proc.stdout
    assert sorted(os.listdir(bdir / "bases")) == copies
    out = bm.prune_backups(adapter_root, keep=1, yes=True)
    assert out["deleted"] == [] and out["base_copies_deleted"] == [copies[0]]
    assert sorted(os.listdir(bdir / "bases")) == [copies[1]]
    [kept] = bm.list_backups(adapter_root)
    assert bm.verify_backup(adapter_root, kept["id"]) == []  # its own base copy is still there


def test_approving_another_lora_shape_says_it_takes_effect_with_consolidate(adapter_root):
    """approve-config of a new lora_r said nothing; the daemon then refused to train (its
    message names consolidate) while the approval looked done."""
    import training_config
    cfg = training_config.load_config(adapter_root)
    have = json.loads((adapter_root / "current_model" / "adapter_config.json").read_text())
    training_config.write_config(adapter_root, dict(cfg, finetune="lora", lora_r=have["r"],
                                                    lora_alpha=have["lora_alpha"]))
    proc = run_script("training_controller.py", "approve-config", "--yes", root=adapter_root)
    assert proc.returncode == 0 and "another shape" not in proc.stdout, proc.stdout + proc.stderr
    training_config.write_config(adapter_root, dict(training_config.load_config(adapter_root),
                                                    lora_r=have["r"] * 2))
    proc = run_script("training_controller.py", "approve-config", "--yes", root=adapter_root)
    assert proc.returncode == 0, proc.stderr
    assert f"current_model's adapter has another shape (r {have['r']}, alpha" in proc.stdout
    assert "python3 model_versioner.py consolidate" in proc.stdout
    # the daemon stops at pre-flight, before a file is taken (it took it, refused it, and the
    # report called the file part-way trained); after the consolidate it trains
    (adapter_root / "inbox" / "a.jsonl").write_text('{"text": "one short record"}\n')
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=adapter_root,
                      timeout=300)
    assert proc.returncode == 1 and "pre-flight: current_model's adapter has another LoRA shape" \
        in proc.stderr and "model_versioner.py consolidate" in proc.stderr, proc.stderr
    assert not os.listdir(adapter_root / "processing")
    assert (adapter_root / "queue" / "normal" / "a.jsonl").exists()
    mv.consolidate(adapter_root)
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=adapter_root,
                      timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (adapter_root / "done" / "a.jsonl").exists()


def test_state_tracker_shows_kind_and_base(adapter_root):
    import jsonschema
    schema = json.loads((REPO / "docs" / "system_state.schema.json").read_text())
    proc = run_script("state_tracker.py", "--json", root=adapter_root, check=True)
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, schema)
    m = doc["current_model"]
    assert (m["kind"], m["base"], m["complete"], m["matches_version"]) == ("adapter", "b001", True, "v003")
    assert "BASE_MISSING" not in {w["code"] for w in doc["warnings"]}
    text = run_script("state_tracker.py", "--check", root=adapter_root).stdout
    assert "adapter on base b001" in text
    shutil.rmtree(adapter_root / "base" / "b001")
    doc = json.loads(run_script("state_tracker.py", "--json", root=adapter_root).stdout)
    jsonschema.validate(doc, schema)
    warn = [w for w in doc["warnings"] if w["code"] == "BASE_MISSING"]
    assert len(warn) == 1 and warn[0]["severity"] == "critical"
    assert warn[0]["fix"].startswith("python3 backup_manager.py restore-base b001")
    assert doc["current_model"]["complete"] is False
    # not also MODEL_INCOMPLETE, whose `restore latest` fails on the same missing base
    assert "MODEL_INCOMPLETE" not in {w["code"] for w in doc["warnings"]}
    assert "VERSION_BASE_MISSING" not in {w["code"] for w in doc["warnings"]}  # (said once)
    mv.restore_version(adapter_root, "v001")          # a full model: no base needed
    doc = json.loads(run_script("state_tracker.py", "--json", root=adapter_root).stdout)
    jsonschema.validate(doc, schema)
    assert (doc["current_model"]["kind"], doc["current_model"]["base"]) == ("full", None)
    # the adapter versions on the missing base were in no warning (verify --all: BAD)
    [warn] = [w for w in doc["warnings"] if w["code"] == "VERSION_BASE_MISSING"]
    assert warn["message"] == ("versions v002, v003 are adapters on base b001, which is missing: "
                               "restoring or verifying them fails"), warn
    assert warn["fix"].startswith("python3 model_versioner.py prune")  # no backup holds b001


def test_consolidate_merges_within_tolerance_recorded_never_the_same_twice_undoable(adapter_root):
    want = logits(adapter_root / "current_model")            # v003: b001 + adapter
    proc = run_script("model_versioner.py", "consolidate", "--note", "weekly", "--json",
                      root=adapter_root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["from"], out["base_before"], out["base"], out["version"]) == ("v003", "b001", "b002", "v004")
    assert out["merged"] == ["v002", "v003"] and out["max_abs_diff"] <= out["tolerance"] == 1e-4 * max(
        1.0, float(want.abs().max()))
    assert out["undo"] == "python3 model_versioner.py restore v003"
    b2 = base_store.read_base(adapter_root, "b002")
    assert (b2["source"], b2["merged"]) == ("consolidate", ["v002", "v003"])
    assert base_store.verify_base(adapter_root, "b002") == []
    rec = mv.read_version(adapter_root, "v004")
    assert (rec["reason"], rec["note"], rec["kind"], rec["base"]) == ("consolidate", "weekly", "adapter", "b002")
    assert rec["consolidate"]["merged"] == ["v002", "v003"] and rec["parent"] == "v003"
    # the merged base alone computes what base+adapter did; the fresh adapter changes nothing
    assert (logits(adapter_root / "base" / "b002") - want).abs().max() <= out["tolerance"]
    assert (logits(adapter_root / "current_model") - want).abs().max() <= out["tolerance"]
    state = json.loads((adapter_root / "current_model" / "trainer_state.json").read_text())
    assert state["global_step"] == 20 and state["warmup_from_step"] == 20
    cfg = json.loads((adapter_root / "current_model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((adapter_root / "base" / "b002").resolve())
    assert cfg["r"] == 8
    # nothing trained since: refused; undo, then a second merge of v003 is refused too
    with pytest.raises(GuardrailError, match="nothing to consolidate: v004 is the fresh adapter"):
        mv.consolidate(adapter_root)
    assert mv.restore_version(adapter_root, "v003")["restored"] == "v003"
    assert (logits(adapter_root / "current_model") == want).all()
    with pytest.raises(GuardrailError, match="v002, v003 were merged into base b002 already"):
        mv.consolidate(adapter_root)
    assert sorted(os.listdir(adapter_root / "base")) == [".last_id", "b001", "b002"]
    # trained on after the undo: another adapter on b001, merged into a new base (before:
    # refused for good, and `consolidate --full`, the way back to full mode, too)
    assert publish_adapter(adapter_root, "b001", seed=3, step=30) == "v005"
    again = mv.consolidate(adapter_root, full=True)
    assert (again["base_before"], again["base"], again["merged"]) == ("b001", "b003", ["v002", "v003", "v005"])


def test_a_consolidate_that_fails_changes_nothing_and_never_blocks_the_next(adapter_root,
                                                                          monkeypatch):
    """lora_target_modules naming no layer is refused before anything is written (it was a
    peft traceback after the new base was made); a consolidate that fails after making its
    base (killed, or peft's own error) leaves a base no version names, which the next
    consolidate merges again: it was refused for good as "merged already", and the daemon
    then refused to train until a consolidate, which blocked both."""
    import adapter_merge
    import training_config
    cfg = training_config.load_config(adapter_root)
    training_config.write_config(adapter_root, dict(cfg, lora_target_modules=["qproj"]))
    proc = run_script("model_versioner.py", "consolidate", root=adapter_root, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert 'lora_target_modules ["qproj"] names no layer of the model' in proc.stderr
    assert sorted(os.listdir(adapter_root / "base")) == [".last_id", "b001"]
    training_config.write_config(adapter_root, dict(cfg, lora_target_modules=["q_proj", "bogus"]))
    with pytest.raises(GuardrailError, match='lora_target_modules names "bogus", which is no layer'):
        mv.consolidate(adapter_root)  # (peft took q_proj and dropped bogus without a word)
    assert sorted(os.listdir(adapter_root / "base")) == [".last_id", "b001"]
    training_config.write_config(adapter_root, cfg)

    def killed(*args, **kwargs):
        raise RuntimeError("the process died here")
    monkeypatch.setattr(adapter_merge, "fresh_adapter", killed)
    with pytest.raises(GuardrailError, match="consolidate failed .RuntimeError: the process died "
                                             "here.; current_model and the versions are unchanged"):
        mv.consolidate(adapter_root)
    assert mv.current_version(adapter_root) == "v003" and mv.latest_version(adapter_root) == "v003"
    assert base_store.read_base(adapter_root, "b002")["merged"] == ["v002", "v003"]  # left behind
    monkeypatch.undo()
    out = mv.consolidate(adapter_root)
    assert (out["base"], out["merged"], out["version"]) == ("b002", ["v002", "v003"], "v004")
    assert sorted(os.listdir(adapter_root / "base")) == [".last_id", "b001", "b002"]


def test_consolidate_full_gives_a_full_model_loadable_in_a_fresh_process(adapter_root):
    want = logits(adapter_root / "current_model")
    result = mv.consolidate(adapter_root, full=True)
    cur = adapter_root / "current_model"
    assert result["full"] and (cur / "config.json").is_file()
    assert not base_store.is_adapter_folder(cur)
    assert json.loads((cur / ".manifest.json").read_text())["kind"] == "full"
    assert "kind" not in mv.read_version(adapter_root, result["version"])
    got = loads_in_fresh_process(cur)
    assert got["cls"] == "LlamaForCausalLM" and len(got["ids"]) == 7
    assert got["logit"] == pytest.approx(want[0, 2, :3].tolist(), abs=1e-4)
    with pytest.raises(GuardrailError, match="current_model is a full model, not an adapter"):
        mv.consolidate(adapter_root)
    assert mv.restore_version(adapter_root, "v003")["restored"] == "v003"   # the undo
