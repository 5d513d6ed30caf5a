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
    assert sorted(os.listdir(adapter_root / "current_model")) == before
    assert mv.current_version(adapter_root) == "v001"
    proc = run_script("model_versioner.py", "restore", "v002", root=adapter_root)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: version v002 is an adapter on base b001")
