"""`training_daemon.py init`: a model that loads in plain transformers and trains; never twice."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_script

pytestmark = pytest.mark.slow

LOAD_AND_TRAIN = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
ids = torch.tensor([tok("hello guardrails")["input_ids"]])
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
loss0 = model(input_ids=ids, labels=ids).loss
loss0.backward()
opt.step()
loss1 = model(input_ids=ids, labels=ids).loss
print(json.dumps({"loss0": loss0.item(), "loss1": loss1.item(),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def _tree(root: Path) -> dict:
    """Every path under root with its size and mtime: to prove nothing changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def test_init_tiny_builds_a_model_that_loads_and_trains_in_a_fresh_process(tmp_root):
    proc = run_script("training_daemon.py", "init", "--json", root=tmp_root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["version"] == "v001" and out["base_model"] == "tiny"

    cfg = json.loads((tmp_root / "config.json").read_text())
    assert cfg["base_model"] == "tiny"
    approval = json.loads((tmp_root / ".config.lock").read_text())
    assert approval["values"]["base_model"] == "tiny"
    assert approval["values"]["learning_rate"] == cfg["learning_rate"]
    version = json.loads((tmp_root / "versions" / "v001" / "version.json").read_text())
    assert version["reason"] == "init" and version["global_step"] == 0
    manifest = json.loads((tmp_root / "current_model" / ".manifest.json").read_text())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]

    # Normal read permissions: readable by everyone (safetensors alone writes 0600), and
    # read-only, because versions share these inodes through hard links.
    for path in (tmp_root / "current_model").iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o444 == 0o444, f"{path.name} is {oct(mode)}"
        assert mode & 0o022 == 0, f"{path.name} is {oct(mode)}"

    done = subprocess.run([sys.executable, "-c", LOAD_AND_TRAIN, str(tmp_root / "current_model")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr
    losses = json.loads(done.stdout.strip().splitlines()[-1])
    assert 100_000 <= losses["params"] <= 5_000_000
    assert losses["loss1"] < losses["loss0"]  # one optimizer step moved the weights


def test_init_twice_refuses_and_changes_nothing(initialized_root):
    before = _tree(initialized_root)
    proc = run_script("training_daemon.py", "init", root=initialized_root)
    assert proc.returncode == 1
    cm = initialized_root / "current_model"
    assert proc.stderr.strip() == (
        f"Error: current_model already exists; init never replaces a model, {cm}. "
        "Check it with `python3 state_tracker.py --check`; to go back to a version use "
        f"`python3 model_versioner.py restore V --root {initialized_root}`.")
    assert _tree(initialized_root) == before


def test_init_base_path_copies_a_local_model(tmp_root, tiny_model_dir):
    proc = run_script("training_daemon.py", "init", "--base", str(tiny_model_dir), "--json",
                      root=tmp_root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["base_model"] == str(tiny_model_dir.resolve())
    cm = tmp_root / "current_model"
    for src in tiny_model_dir.iterdir():
        if src.is_file():
            assert (cm / src.name).read_bytes() == src.read_bytes(), src.name
    assert json.loads((tmp_root / "config.json").read_text())["base_model"] == str(
        tiny_model_dir.resolve())
    # the source folder is untouched (copied, never moved or linked)
    assert not (tiny_model_dir / ".manifest.json").exists()
    assert all(p.stat().st_nlink == 1 for p in tiny_model_dir.iterdir() if p.is_file())


def test_init_base_path_that_does_not_load_changes_nothing(tmp_root):
    bad = tmp_root.parent / "not_a_model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    proc = run_script("training_daemon.py", "init", "--base", str(bad), root=tmp_root)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: cannot load the model (")
    assert not (tmp_root / "current_model").exists()
    assert not (tmp_root / "versions" / "v001").exists()
    assert not (tmp_root / "config.json").exists()


def _base_folders(out: Path) -> dict:
    """Folders that load as a causal LM in transformers but would not train: no tokenizer
    (text becomes no tokens), a tokenizer larger than the embedding, a masked LM (loads as
    BertLMHeadModel, not causal), an encoder without the LM head (made up at random)."""
    import training_engine as te
    from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel
    bert = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    models = {"no tokenizer": GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)),
              "small embedding": GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)),
              "masked LM": BertForMaskedLM(bert), "encoder": BertModel(bert)}
    for name, model in models.items():
        model.save_pretrained(out / name)
        if name != "no tokenizer":
            te.build_tiny_tokenizer().save_pretrained(out / name)
    return {name: out / name for name in models}


def test_init_refuses_a_base_that_loads_but_would_not_train(tmp_path):
    import root_init
    from trainroot import GuardrailError
    expected = {"no tokenizer": "the tokenizer turns text into no tokens",
                "small embedding": "the tokenizer gives ids up to 258 (e.g. [100, 101, ",
                "masked LM": "the model is not causal",
                "encoder": "the folder has no weights for 6 of the model's tensors (cls.predictions"}
    for name, folder in _base_folders(tmp_path / "bases").items():
        root = tmp_path / name.replace(" ", "-")
        root.mkdir()
        with pytest.raises(GuardrailError) as err:
            root_init.init_root(root, base=str(folder))
        assert err.value.what.startswith(expected[name]), (name, err.value.what)
        assert not (root / "current_model").exists() and not (root / "versions" / "v001").exists()
    proc = run_script("training_daemon.py", "init", "--base", str(tmp_path / "bases" / "no tokenizer"),
                      root=tmp_path / "no-tokenizer")
    assert proc.returncode == 1 and "Copy the model's tokenizer files" in proc.stderr, proc.stderr
    # an added token no data uses may lie past the embedding (as in some published models)
    import training_engine as te
    from transformers import GPT2Config, GPT2LMHeadModel
    fits = tmp_path / "bases" / "unused added token"
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2)).save_pretrained(fits)
    tokenizer = te.build_tiny_tokenizer()
    tokenizer.add_tokens(["<unused>"])
    tokenizer.save_pretrained(fits)
    assert te.check_loadable(fits)["vocab_size"] == 260


def test_init_missing_base_path(tmp_root):
    missing = tmp_root.parent / "nowhere"
    proc = run_script("training_daemon.py", "init", "--base", str(missing), root=tmp_root)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: base model folder not found, {missing}. Pass --base tiny or the path of a "
        "local Hugging Face model folder.")
    assert list(tmp_root.iterdir()) == []


def test_init_base_fits_max_length_to_the_model_positions(tmp_root, tiny_model_dir, tmp_path):
    """A base model with a short context gets max_length = its positions (approved), never a
    config that would crash on the first row."""
    base = tmp_path / "short-context"
    base.mkdir()
    for src in tiny_model_dir.iterdir():
        if src.is_file():
            (base / src.name).write_bytes(src.read_bytes())
    cfg = json.loads((base / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (base / "config.json").write_text(json.dumps(cfg))
    proc = run_script("training_daemon.py", "init", "--base", str(base), "--json", root=tmp_root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["approved"]["max_length"] == 64
    assert json.loads((tmp_root / "config.json").read_text())["max_length"] == 64


def test_a_deleted_config_json_comes_back_with_init_from_the_newest_version(initialized_root):
    """`rm config.json` in a root with a model: the daemon and the report both point at
    `init`, which writes back the config the newest version trained with and touches
    nothing else; the approval still holds for it."""
    root = initialized_root
    config = root / "config.json"
    before = json.loads(config.read_text())
    model_inode = (root / "current_model" / "config.json").stat().st_ino
    config.unlink()
    report = run_script("state_tracker.py", "--json", root=root)
    (missing,) = [w for w in json.loads(report.stdout)["warnings"] if w["code"] == "CONFIG_MISSING"]
    assert missing["fix"] == f"python3 training_daemon.py init --root {root}"
    daemon = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root)
    assert daemon.returncode == 1
    assert f"Run `python3 training_daemon.py init --root {root}`." in daemon.stderr
    proc = run_script("training_daemon.py", "init", root=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Restored {root}/config.json from version v001")
    assert json.loads(config.read_text()) == before
    assert (root / "current_model" / "config.json").stat().st_ino == model_inode
    report = json.loads(run_script("state_tracker.py", "--json", root=root).stdout)
    assert report["config"]["approved"] is True
    assert not {"CONFIG_MISSING", "CONFIG_UNAPPROVED"} & {w["code"] for w in report["warnings"]}
    again = run_script("training_daemon.py", "init", root=root)
    assert again.returncode == 1 and "current_model already exists" in again.stderr
    # config.json a link into a disk that is not mounted: said, and init never replaces it
    config.unlink()
    config.symlink_to(root.parent / "usbdisk" / "config.json")
    report = json.loads(run_script("state_tracker.py", "--json", root=root).stdout)
    (missing,) = [w for w in report["warnings"] if w["code"] == "CONFIG_MISSING"]
    assert f"is a link to {root.parent / 'usbdisk' / 'config.json'}, which is not there" in missing["message"]
    assert missing["fix"] == f"ls -l {root / 'config.json'}"
    linked = run_script("training_daemon.py", "init", root=root)
    assert linked.returncode == 1 and "config.json is a link to " in linked.stderr
    assert config.is_symlink()
    config.unlink()  # what the note says: then init writes it back
    assert run_script("training_daemon.py", "init", root=root).returncode == 0
    assert json.loads(config.read_text()) == before


def test_init_never_starts_a_new_model_beside_the_versions_of_the_lost_one(initialized_root):
    """`rm -rf current_model` with versions kept: init would build a new random model as the
    newest version (step 0), which `restore latest` would then bring back; it refuses, naming
    the restore of the version current_model was."""
    import shutil
    root = initialized_root
    shutil.rmtree(root / "current_model")
    versions_before = sorted(os.listdir(root / "versions"))
    proc = run_script("training_daemon.py", "init", root=root)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: current_model is gone but its versions are here (it was "
                                  "v001; the latest is v001)"), proc.stderr
    assert "`python3 model_versioner.py restore v001`" in proc.stderr
    assert not (root / "current_model").exists()
    assert sorted(os.listdir(root / "versions")) == versions_before
    elsewhere = run_script("training_daemon.py", "init", "--root", str(root), env={"TRAINING_ROOT": ""})
    assert f"`python3 model_versioner.py restore v001 --root {root}`" in elsewhere.stderr, elsewhere.stderr
    restored = run_script("model_versioner.py", "restore", "v001", root=root)
    assert restored.returncode == 0, restored.stderr
    assert (root / "current_model" / "config.json").exists()


def test_init_over_a_lost_model_keeps_the_old_checkpoints_aside(initialized_root):
    """`rm -rf current_model versions` (no backup): the report said only "init", and the new
    model's checkpoints took the same step names as the old run's, writing over the last
    copy of its weights. The report names them; init moves checkpoints/ into .attic/."""
    import shutil
    import state_tracker
    root = initialized_root
    old = root / "checkpoints" / "checkpoint-00000019"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"global_step": 19, "file_id": "a.jsonl#1"}))
    (old / "model.safetensors").write_bytes(b"trained weights")
    shutil.rmtree(root / "current_model")
    shutil.rmtree(root / "versions")
    w = {x["code"]: x for x in state_tracker.build_state(root)["warnings"]}["MODEL_MISSING"]
    assert "checkpoints/checkpoint-00000019 holds the weights trained to step 19" in w["note"]
    base = json.loads((root / "config.json").read_text())["base_model"]  # (the fixture's)
    proc = run_script("training_daemon.py", "init", "--base", base, root=root)
    assert proc.returncode == 0, proc.stderr
    (kept,) = (root / ".attic").glob("checkpoints-*")
    assert (kept / "checkpoint-00000019" / "model.safetensors").read_bytes() == b"trained weights"
    assert f"are kept in {kept}/" in proc.stdout and not os.listdir(root / "checkpoints")


def test_init_never_starts_a_new_model_beside_a_verified_backup_of_the_lost_one(initialized_root):
    """`rm -rf current_model versions`: init would build a new random model at step 0 and
    the report would say OK; it refuses, naming the backup restore (and how to start over)."""
    import shutil
    root = initialized_root
    backup = run_script("backup_manager.py", "backup", "--json", root=root)
    assert backup.returncode == 0, backup.stderr
    bid = json.loads(backup.stdout)["id"]
    shutil.rmtree(root / "current_model")
    shutil.rmtree(root / "versions")
    proc = run_script("training_daemon.py", "init", root=root)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: current_model is gone but a verified backup of it "
                                  f"exists ({bid}, step 0, in {root / 'backups'})")
    assert f"`python3 backup_manager.py restore {bid}`" in proc.stderr
    assert not (root / "current_model").exists() and not (root / "versions").exists()
    # given with --root from elsewhere, the commands it names act on that root when pasted
    elsewhere = run_script("training_daemon.py", "init", "--root", str(root), env={"TRAINING_ROOT": ""})
    assert elsewhere.returncode == 1
    assert f"`python3 backup_manager.py restore {bid} --root {root}`" in elsewhere.stderr, elsewhere.stderr
    assert f"`python3 model_versioner.py snapshot --note restored --root {root}`" in elsewhere.stderr
    restored = run_script("backup_manager.py", "restore", bid, root=root)
    assert restored.returncode == 0, restored.stderr
    assert (root / "current_model" / "config.json").exists()


def test_a_folder_inside_a_roots_managed_folders_is_no_root_and_gets_none(initialized_root):
    """`--root ROOT/inbox/high` (or queue/normal, versions/v001): every script names the root
    around it instead of offering `init` there, init refuses to make a root there (the outer
    daemon would move its pieces into failed/), and nothing is written into it."""
    root = initialized_root
    for inner in (root / "inbox" / "high", root / "queue" / "normal", root / "inbox" / "new"):
        before = sorted(os.listdir(inner)) if inner.exists() else None
        listed = run_script("training_queue.py", "list", "--root", str(inner), env={"TRAINING_ROOT": ""})
        assert listed.returncode == 1
        assert listed.stderr.strip().endswith(f"Give the root itself: --root {root}."), listed.stderr
        assert f"inside {inner.parent.name}/ of the training root {root}" in listed.stderr
        init = run_script("training_daemon.py", "init", "--root", str(inner), env={"TRAINING_ROOT": ""})
        assert init.returncode == 1 and "a root there would be taken for its data" in init.stderr
        report = run_script("state_tracker.py", "--warnings", "--root", str(inner),
                            env={"TRAINING_ROOT": ""})
        assert f"fix: python3 state_tracker.py --check --root {root}" in report.stdout, report.stdout
        assert (sorted(os.listdir(inner)) if inner.exists() else None) == before
    status = run_script("training_controller.py", "status", root=root)
    assert status.returncode == 0, status.stderr


def test_a_backup_made_before_backup_dir_changed_still_brings_a_lost_model_back(initialized_root,
                                                                               tmp_path):
    """Backups went to ROOT/backups, then config's backup_dir moved elsewhere (as
    BACKUP_SAME_FILESYSTEM advises) and current_model and versions/ were lost: init refuses
    (it would start a random model), the report names that backup, and its restore works."""
    import shutil
    import training_config
    root = initialized_root
    made = run_script("backup_manager.py", "backup", "--json", root=root)
    assert made.returncode == 0, made.stderr
    bid = json.loads(made.stdout)["id"]
    cfg = training_config.load_config(root)
    training_config.write_config(root, dict(cfg, backup_dir=str(tmp_path / "elsewhere")))
    shutil.rmtree(root / "current_model")
    shutil.rmtree(root / "versions")
    proc = run_script("training_daemon.py", "init", root=root)
    assert proc.returncode == 1 and f"({bid}, step 0, in {root / 'backups'})" in proc.stderr
    report = json.loads(run_script("state_tracker.py", "--json", root=root).stdout)
    [missing] = [x for x in report["warnings"] if x["code"] == "MODEL_MISSING"]
    assert f"in {root / 'backups'} (made before backup_dir changed)" in missing["message"]
    assert missing["fix"].startswith(f"python3 backup_manager.py restore {bid}")
    listed = run_script("backup_manager.py", "list", root=root)
    assert f"backups made before backup_dir changed are in {root / 'backups'}" in listed.stdout
    restored = run_script("backup_manager.py", "restore", bid, root=root)
    assert restored.returncode == 0, restored.stderr
    assert (root / "current_model" / "config.json").exists()


def test_a_settings_file_above_a_root_locks_no_one_out(initialized_root, tmp_path):
    """A folder holding only a config.json of its own (a project's settings) is no root:
    a root in its logs/ or versions/ subfolder is not "inside" anything."""
    outer = tmp_path / "project"
    (outer / "logs").mkdir(parents=True)
    (outer / "config.json").write_text('{"editor": 1}')
    root = outer / "logs" / "root"
    import shutil
    shutil.copytree(initialized_root, root, symlinks=True)
    status = run_script("training_controller.py", "status", "--root", str(root), env={"TRAINING_ROOT": ""})
    assert status.returncode == 0, status.stderr


def test_an_init_cut_short_after_publishing_the_model_is_finished_by_the_next(initialized_root):
    """`kill -9` of init between publishing current_model and its first version and
    approval: the next init finishes it (a version, the approval of the config.json that
    init wrote), instead of refusing over a model nothing can restore."""
    import shutil
    root = initialized_root
    for folder in (root / "versions" / "v001",):  # as if init never got that far
        for path in folder.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        folder.chmod(0o755)
        shutil.rmtree(folder)
    (root / ".config.lock").unlink()
    proc = run_script("training_daemon.py", "init", "--json", root=root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["version"] and (root / "versions" / doc["version"]).is_dir()
    report = json.loads(run_script("state_tracker.py", "--json", root=root).stdout)
    codes = {w["code"] for w in report["warnings"]}
    assert not codes & {"CONFIG_UNAPPROVED", "NO_VERSION", "MODEL_NOT_VERSIONED"}, codes
    again = run_script("training_daemon.py", "init", root=root)
    assert again.returncode == 1 and "current_model already exists" in again.stderr
