"""Adapter mode (`"finetune": "lora"`): config keys and their lock, the trainable-count
check, training only the adapter, current_model as a peft adapter folder that plain
transformers loads in a fresh process, bitwise resume after kill -9, and the eval gate."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import lora_mode
import training_config as tc
import training_engine as te
from conftest import (REPO, assert_bitwise_equal, engine_root, metrics, run_script, text_records,
                      kill_trainer_at, write_jsonl)
from trainroot import GuardrailError, Paths, read_json, sha256_file

FAST = dict(max_length=32, batch_size=2, grad_accum_steps=2, num_threads=1, warmup_steps=3,
            checkpoint_every_steps=1, checkpoint_every_minutes=0.0, keep_checkpoints=2,
            loss_spike_factor=0.0, learning_rate=3e-3, finetune="lora")


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- config

def test_adapter_keys_default_validate_and_refuse_quantized_loading():
    cfg = tc.default_config()
    assert (cfg["finetune"], cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"],
            cfg["lora_target_modules"], cfg["consolidate_every_files"]) == \
        ("full", 8, 16, 0.0, "all-linear", 0)
    assert tc.validate_config(tc.default_config(finetune="lora", lora_target_modules=["q_proj"])) == []
    bad = tc.default_config(finetune="qlora", lora_r=0, lora_alpha=0, lora_dropout=1.0,
                            lora_target_modules=[], consolidate_every_files=-1)
    bad["load_in_4bit"] = True
    bad["load_in_8bit"] = True
    refusal = ("4-bit/8-bit loading (QLoRA) is not supported: it needs CUDA and bitsandbytes and "
               "is not tested here; remove the key (\"finetune\": \"lora\" trains an adapter over "
               "the full-precision base)")
    assert tc.validate_config(bad) == [
        f"load_in_4bit: {refusal}",
        f"load_in_8bit: {refusal}",
        "finetune: expected one of full, lora, got 'qlora'",
        "lora_r: 0 is out of range [1, 65536]",
        "lora_target_modules: expected \"all-linear\" or a non-empty list of module names "
        "(e.g. [\"q_proj\", \"v_proj\"]), got []",
        "consolidate_every_files: -1 is out of range [0, 1e+06]",
        "lora_alpha: must be greater than 0 (it scales the adapter; 0 trains nothing)",
        "lora_dropout: must be below 1 (1 drops every input of the adapter)",
    ]
    assert tc.validate_config(tc.default_config(lora_target_modules="q_proj"))[0].startswith(
        "lora_target_modules: expected \"all-linear\"")


def test_mode_and_shape_are_locked_even_for_an_older_configs_lock_list(tmp_root):
    import training_daemon
    training_daemon.init_root(tmp_root, base="tiny")
    cfg = tc.load_config(tmp_root)
    assert tc.changed_locked(tmp_root, cfg) == []
    # a config and an approval written before adapter mode existed: neither names the keys
    old = {k: v for k, v in cfg.items() if k not in tc.ADAPTER_LOCKED + ("lora_dropout",
                                                                       "consolidate_every_files")}
    old["locked"] = list(tc.REQUIRED_LOCKED)
    (tmp_root / "config.json").write_text(json.dumps(old))
    lock = tmp_root / ".config.lock"
    approval = json.loads(lock.read_text())
    approval["values"] = {k: v for k, v in approval["values"].items() if k not in tc.ADAPTER_LOCKED}
    lock.write_text(json.dumps(approval))
    cfg = tc.load_config(tmp_root)
    assert tc.changed_locked(tmp_root, cfg) == []  # it approved the defaults: still trains
    for name, value in (("finetune", "lora"), ("lora_r", 16), ("lora_alpha", 8),
                        ("lora_target_modules", ["q_proj"])):
        assert tc.changed_locked(tmp_root, dict(cfg, **{name: value})) == \
            [(name, tc.PARAMS[name].default, value, False)], name
    # the dropout and the consolidation period do not shape what a version is: not locked
    assert tc.changed_locked(tmp_root, dict(cfg, lora_dropout=0.1, consolidate_every_files=5)) == []
    tc.approve(tmp_root, dict(cfg, finetune="lora"))
    assert tc.read_approval(tmp_root)["values"]["finetune"] == "lora"
    assert tc.changed_locked(tmp_root, dict(cfg, finetune="lora")) == []


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted lora file on a fresh root (the full -> lora switch at its start):
    the equality target of the resume tests."""
    base = tmp_path_factory.mktemp("lora")
    data = write_jsonl(base / "data.jsonl", text_records(80, seed=11))
    root, cfg = engine_root(base / "root", tiny_model_dir, FAST)
    full_before = {f.name: sha256_file(f) for f in Paths(root).current_model.iterdir() if f.is_file()}
    result = te.train_file(root, data, file_id="data.jsonl", config=cfg)
    assert result["status"] == "completed" and result["steps"] > 15, result
    return {"root": root, "data": data, "cfg": cfg, "result": result, "full_before": full_before,
            "weights": adapter_weights(Paths(root).current_model)}


def test_a_lora_file_trains_only_the_adapter_over_an_immutable_base(lora_run, tiny_model_dir):
    import base_store
    root, cur = lora_run["root"], Paths(lora_run["root"]).current_model
    # the full model current_model was became base b001, byte for byte, read-only
    bases = base_store.list_bases(root)
    assert [b["base_id"] for b in bases] == ["b001"] and bases[0]["source"] == "full model at v001"
    bdir = base_store.base_dir(root, "b001")
    assert sha256_file(bdir / "model.safetensors") == sha256_file(tiny_model_dir / "model.safetensors")
    assert sha256_file(bdir / "model.safetensors") == lora_run["full_before"]["model.safetensors"]
    assert base_store.verify_base(root, "b001") == []
    # current_model is a peft adapter folder of a few KB naming its base
    names = sorted(f.name for f in cur.iterdir())
    assert "config.json" not in names and "model.safetensors" not in names and "README.md" not in names
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json",
            ".manifest.json", "tokenizer.json"} <= set(names)
    assert base_store.is_adapter_folder(cur) and base_store.adapter_base(cur) == "b001"
    manifest = read_json(cur / ".manifest.json")
    assert manifest["kind"] == "adapter" and manifest["base"] == "b001"
    acfg = read_json(cur / "adapter_config.json")
    assert acfg["base_model_name_or_path"] == str(bdir.resolve()) and acfg["r"] == 8
    size = (cur / "adapter_model.safetensors").stat().st_size
    assert size < 0.25 * (bdir / "model.safetensors").stat().st_size, size
    # it trained: every B matrix moved off peft's zero init, and only adapter tensors exist
    w = lora_run["weights"]
    assert w and all("lora_" in k for k in w)
    assert all(float(t.abs().sum()) > 0 for k, t in w.items() if "lora_B" in k)
    # checkpoints hold the adapter, AdamW over its parameters only, and say so
    ckpt, meta = te.list_checkpoints(root)[0]
    assert meta["kind"] == "adapter" and meta["base"] == "b001"
    assert not (ckpt / "model.safetensors").exists()
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / te.ADAPTER_CKPT))
    opt = te._read_optimizer(ckpt)[0]
    assert len(opt["param_groups"][0]["params"]) == len(saved) == len(w)
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in w.values())


def test_the_adapter_must_train_exactly_its_expected_parameters(lora_run):
    from peft import PeftModel
    root, cfg = lora_run["root"], lora_run["cfg"]
    cur = Paths(root).current_model
    base = lora_mode.load_base(root, "b001")
    expected = lora_mode.expected_trainable(base, cfg)
    # 2 layers x (q, k, v, o: 64+64 each; gate, up: 64+176; down: 176+64) x r 8
    assert expected == 2 * (4 * 128 + 3 * 240) * 8
    frozen = PeftModel.from_pretrained(base, cur)  # peft's default: loaded for inference
    with pytest.raises(GuardrailError) as exc:
        lora_mode.check_trainable(frozen, expected, cur)
    assert exc.value.what == "the adapter loaded frozen: 0 parameters would train"
    assert "approve-config --yes" in exc.value.fix and "consolidate" in exc.value.fix
    # a changed shape (lora_r) against the adapter current_model holds: refused, not trained
    with pytest.raises(GuardrailError) as exc:
        te.load_current_model(root, config=dict(cfg, lora_r=4))
    assert exc.value.what == (f"{expected} parameters would train, and config.json's LoRA shape "
                              f"(lora_r, lora_target_modules) gives {expected // 2}")
    # an adapter current_model is never trained as a full model: consolidate first
    with pytest.raises(GuardrailError) as exc:
        te.load_current_model(root, config=dict(cfg, finetune="full"))
    assert "python3 model_versioner.py consolidate" in exc.value.fix
    model, _tok, _state = te.load_current_model(root, config=cfg)
    assert lora_mode.trainable(model) == expected and model.base_id == "b001"


PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype=torch.float32)
ids = torch.tensor([[256, 104, 101, 108, 108, 111, 32, 97, 98]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=258)
torch.save(logits, sys.argv[2])
print(json.dumps({"type": type(model).__name__, "generated": out[0, ids.shape[1]:].tolist()}))
"""


def test_current_model_loads_in_plain_transformers_in_a_fresh_process(lora_run, tmp_path):
    import torch
    root = lora_run["root"]
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(Paths(root).current_model), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(doc["generated"]) == 5
    model, _tok, _state = te.load_current_model(root, config=lora_run["cfg"])  # the engine's view
    model.eval()
    ids = torch.tensor([[256, 104, 101, 108, 108, 111, 32, 97, 98]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    theirs = torch.load(out, weights_only=True)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), float((theirs - ours).abs().max())
    assert torch.allclose(theirs, merged, atol=1e-5, rtol=0), float((theirs - merged).abs().max())
    base = lora_mode.load_base(root, "b001")
    with torch.no_grad():  # and the adapter is not a no-op
        assert float((base(input_ids=ids).logits - theirs).abs().max()) > 1e-4



def test_bitwise_equal_after_kill_9_and_after_pause_in_lora_mode(tmp_path, tiny_model_dir, lora_run):
    total = lora_run["result"]["global_step"]
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    # one kill before the first checkpoint (the file starts again: its logged steps are not
    # logged twice), one after it (a resume)
    kill_at = [rng.randrange(1, 3), rng.randrange(4, total - 3)]
    # a kill in the first lora file: the resume makes the same base again (dedupe) and loads
    # the checkpoint's adapter onto a fresh one; checkpoints every 3 steps, so steps are redone
    root, cfg = engine_root(tmp_path / "root", tiny_model_dir, FAST, checkpoint_every_steps=3)
    kill_trainer_at(root, lora_run["data"], kill_at)
    # paused (stop/start is the same path: checkpoint, publish, return) past the kills
    pause_at = kill_at[-1] + 2
    seen = {}
    first = te.train_file(root, lora_run["data"], file_id="data.jsonl", config=cfg,
                          control=lambda: "pause" if seen.get("step", 0) >= pause_at else None,
                          progress=lambda d: seen.update(step=d["global_step"]))
    assert first["status"] == "paused", (seed, first)
    assert first["message"].startswith("resumed from checkpoint-"), (seed, first)
    assert lora_mode.KIND == read_json(Paths(root).current_model / ".manifest.json")["kind"]
    result = te.train_file(root, lora_run["data"], file_id="data.jsonl", config=cfg)
    assert result["status"] == "completed", (seed, result)
    assert result["global_step"] == total and result["tokens_seen"] == lora_run["result"]["tokens_seen"]
    assert_bitwise_equal(adapter_weights(Paths(root).current_model), lora_run["weights"])
    assert [m["global_step"] for m in metrics(root)] == list(range(1, total + 1)), (seed, kill_at)
    import base_store
    assert [b["base_id"] for b in base_store.list_bases(root)] == ["b001"]  # made once


def test_the_eval_gate_holds_a_bad_file_in_lora_mode(tmp_path, tiny_model_dir):
    """The gate scores adapter versions over their base: a junk file at a raised LR is held,
    and current_model goes back to the adapter version before it."""
    import eval_gate
    from realdaemon import assert_same_weights, record, set_config, weights
    from test_eval_gate import drop, english, gate_root, junk, train_once, versions
    root = gate_root(tmp_path / "root", tiny_model_dir, finetune="lora")
    drop(root, "good1.jsonl", english(40, 10))
    assert train_once(root) == 0
    # tiny LoRA moves less: junk raised the eval loss 0.94% on one machine, >1% on another
    set_config(root, learning_rate=3e-2, eval_regression_pct=0.3)
    drop(root, "bad.jsonl", junk())
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # --once: a hold ends the run, exit 1
    assert "quality gate" in proc.stderr and eval_gate.REJECT_CMD in proc.stderr
    rec = record(root / "processing" / "bad.jsonl")
    hold = rec["hold"]
    cmp = hold["eval"]["english.jsonl"]
    assert cmp["after"] > cmp["before"] * 1.003 and cmp["regressed"]
    recs = versions(root)
    held, before = recs[hold["version"]], recs[rec["version_before"]]
    assert held["rejected"] is True and held["kind"] == before["kind"] == "adapter"
    assert held["base"] == before["base"] == "b001"
    trained = recs[before["id"]]  # good1's version was scored as an adapter over b001 too
    import model_versioner  # (completed by the idle daemon: the gate scores a prefix)
    assert isinstance(model_versioner._eval_of(root, trained)["english.jsonl"], float)
    cur = root / "current_model"
    assert read_json(cur / ".manifest.json")["kind"] == "adapter"
    assert_same_weights(weights(cur), weights(root / "versions" / before["id"]))
    # the base id in the manifest is the truth: after the root moves (adapter_config.json's
    # absolute base path now stale) a version still scores the same
    moved = root.rename(tmp_path / "moved")
    assert not Path(read_json(moved / "versions" / before["id"] / "adapter_config.json")
                    ["base_model_name_or_path"]).exists()
    doc = eval_gate.evaluate(moved, moved / "versions" / held["id"], tc.load_config(moved))
    kept = eval_gate.read_cached(moved, held["id"])  # the gate's prefix: the same rows again
    again = eval_gate.compare(kept, doc, 1.0)["english.jsonl"]
    assert again["before"] == cmp["after"] and again["after"] == pytest.approx(cmp["after"], rel=1e-5)


def test_switching_full_to_lora_between_files_and_a_warm_up_after_consolidate(tmp_path, tiny_model_dir):
    """full -> lora at a file boundary: the full model becomes the base and AdamW starts
    fresh (the full run's end checkpoint matches current_model's step but not its kind; it
    used to be loaded into the adapter's optimizer). A full file's checkpoint is never
    resumed in lora mode. `warmup_from_step` (consolidate) ramps the LR again."""
    import base_store
    data = write_jsonl(tmp_path / "a.jsonl", text_records(30, seed=3))
    root, cfg = engine_root(tmp_path / "root", tiny_model_dir, FAST, finetune="full")
    full = te.train_file(root, data, file_id="a", config=cfg)
    assert full["status"] == "completed" and te.list_checkpoints(root)[0][1].get("kind") is None
    # a full file paused mid-way is not finished as an adapter
    seen = {}
    paused = te.train_file(root, data, file_id="b", config=cfg,
                           control=lambda: "pause" if seen.get("step", 0) >= 2 else None,
                           progress=lambda d: seen.update(step=d["step_in_file"]))
    assert paused["status"] == "paused" and paused["step_in_file"] == 2, paused
    lora = dict(cfg, finetune="lora")
    with pytest.raises(GuardrailError) as exc:
        te.train_file(root, data, file_id="b", config=lora)
    assert exc.value.what.startswith("b was checkpointed at step ") and \
        exc.value.what.endswith(" in full mode, and training is now adapter on base b001")
    assert "training_controller.py skip" in exc.value.fix
    step = read_json(Paths(root).current_model / "trainer_state.json")["global_step"]
    first = te.train_file(root, data, file_id="c", config=lora)
    assert first["status"] == "completed" and first["optimizer"] == "fresh", first
    assert first["global_step"] > step
    assert base_store.is_adapter_folder(Paths(root).current_model)
    assert [b["base_id"] for b in base_store.list_bases(root)] == ["b001"]
    # consolidate's fresh adapter says where the warm-up restarts (as trainer_state.json)
    model, tok, state = te.load_current_model(root, config=lora)
    w = state["global_step"]
    te.publish_current_model(root, model, tok, dict(state, warmup_from_step=w), reason="test")
    again = te.train_file(root, data, file_id="d", config=lora)
    assert again["optimizer"].startswith("carried from"), again  # same base, same step
    lrs = {m["global_step"]: m["lr"] for m in metrics(root) if m["file_id"] == "d"}
    assert [lrs[w + k] for k in (1, 2, 3, 4)] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3])
    assert read_json(Paths(root).current_model / "trainer_state.json")["warmup_from_step"] == w
    assert read_json(te.list_checkpoints(root)[0][0] / "meta.json")["warmup_from_step"] == w


def test_after_consolidate_the_next_file_trains_a_fresh_adapter_on_the_new_base(tmp_path,
                                                                               tiny_model_dir):
    """model_versioner consolidate (the versions side) hands the engine a fresh adapter on a
    new base with `warmup_from_step`: AdamW starts fresh (the old adapter's end checkpoint
    has the same step but another base), and the LR ramps again from that step."""
    import model_versioner
    data = write_jsonl(tmp_path / "a.jsonl", text_records(30, seed=5))
    root, cfg = engine_root(tmp_path / "root", tiny_model_dir, FAST)
    assert te.train_file(root, data, file_id="a", config=cfg)["status"] == "completed"
    model_versioner.create_version(root, "post-train:a")
    out = model_versioner.consolidate(root)
    assert out["base"] == "b002" and out["base_before"] == "b001"
    w = read_json(Paths(root).current_model / "trainer_state.json")["warmup_from_step"]
    after = te.train_file(root, data, file_id="b", config=cfg)
    assert after["status"] == "completed" and after["optimizer"] == "fresh", after
    assert read_json(Paths(root).current_model / ".manifest.json")["base"] == "b002"
    lrs = {m["global_step"]: m["lr"] for m in metrics(root) if m["file_id"] == "b"}
    assert [lrs[w + k] for k in (1, 2, 3, 4)] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3])
    assert te.list_checkpoints(root)[0][1]["base"] == "b002"
    # a new LoRA shape (what the refusal of a changed lora_r names): the fresh adapter
    # consolidate starts has config.json's shape, and it trains
    model_versioner.create_version(root, "post-train:b")
    cfg4 = dict(cfg, lora_r=4)
    tc.write_config(root, cfg4)
    assert model_versioner.consolidate(root)["base"] == "b003"
    assert read_json(Paths(root).current_model / "adapter_config.json")["r"] == 4
    assert te.train_file(root, data, file_id="c", config=cfg4)["status"] == "completed"


def test_switching_lora_to_full_is_refused_until_consolidate_full_then_trains_the_merged_model(
        tmp_path, tiny_model_dir):
    """lora -> full: with an adapter current_model, a full-mode file is refused before any
    step with the command that merges it; after `consolidate --full` the same file trains
    every weight of the merged model, starting from the merged logits."""
    import model_versioner
    import torch
    data = write_jsonl(tmp_path / "a.jsonl", text_records(30, seed=6))
    root, cfg = engine_root(tmp_path / "root", tiny_model_dir, FAST)
    assert te.train_file(root, data, file_id="a", config=cfg)["status"] == "completed"
    model_versioner.create_version(root, "post-train:a")
    full = dict(cfg, finetune="full")
    with pytest.raises(GuardrailError) as refused:
        te.train_file(root, data, file_id="b", config=full)
    assert "consolidate --full" in refused.value.fix
    # the daemon finds it at pre-flight, before the file leaves the queue (it was taken into
    # processing/ and then refused: reported as a file waiting half-trained)
    import training_daemon
    daemon = training_daemon.Daemon(root, once=False, monitor=False)
    with pytest.raises(training_daemon._Paused) as paused:
        daemon.preflight(full)
    assert paused.value.error.what.startswith("pre-flight: current_model is a LoRA adapter on base b001")
    assert "consolidate --full" in paused.value.error.fix and "approve-config" in paused.value.error.fix
    adapter_view = te.load_model_folder(root, Paths(root).current_model).eval()
    out = model_versioner.consolidate(root, full=True)
    cur = Paths(root).current_model
    assert (cur / "config.json").is_file() and not (cur / "adapter_config.json").exists()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    merged = te.load_model_folder(root, cur).eval()
    with torch.no_grad():
        gap = float((merged(ids).logits - adapter_view(ids).logits).abs().max())
    assert gap < 1e-4, gap
    after = te.train_file(root, data, file_id="b", config=full)
    assert after["status"] == "completed" and after["steps"] >= 1, after
    assert not te.list_checkpoints(root)[0][1].get("base")  # a full checkpoint now
    assert out["base"] != out["base_before"]


def test_two_processes_under_torchrun_train_the_adapter_one_with_twice_the_batch(tmp_path,
                                                                                tiny_model_dir):
    """DDP over a peft model: 2 ranks x batch 2 equal 1 process x batch 4 (1e-5, as in full
    mode), and the full -> lora switch makes one base however many ranks load it."""
    import base_store
    data = write_jsonl(tmp_path / "d.jsonl", text_records(40, seed=8))
    over = dict(checkpoint_every_steps=0)
    one, cfg = engine_root(tmp_path / "one", tiny_model_dir, FAST, batch_size=4, **over)
    r1 = te.train_file(one, data, file_id="d.jsonl", config=cfg)
    two, _ = engine_root(tmp_path / "two", tiny_model_dir, FAST, **over)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(REPO / "training_engine.py"), "train",
                           str(data), "--json"], capture_output=True, text=True, timeout=240,
                          cwd=str(REPO), env=dict(os.environ, TRAINING_ROOT=str(two)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r2 = json.loads(proc.stdout)
    assert (r2["status"], r2["steps"], r2["tokens_seen"]) == ("completed", r1["steps"], r1["tokens_seen"])
    a, b = adapter_weights(Paths(one).current_model), adapter_weights(Paths(two).current_model)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert [x["base_id"] for x in base_store.list_bases(two)] == ["b001"]


def test_the_daemon_consolidates_every_n_files_when_asked(tmp_path, tiny_model_dir):
    """config consolidate_every_files 2: after the second file trained on a base, the daemon
    merges the adapter into a new base (a `consolidate` version); the third trains on it."""
    import base_store
    import model_versioner
    import training_daemon
    from realdaemon import drop, set_config
    root = tmp_path / "root"
    root.mkdir()
    training_daemon.init_root(root, base=str(tiny_model_dir))
    set_config(root, **FAST, settle_seconds=0.2, rescan_seconds=0.5, monitor_port=0,
               backup_every_files=0, backup_every_hours=0.0, consolidate_every_files=2)
    for i in range(3):
        drop(root, f"f{i}.jsonl", seed=i, lines=20)
        assert training_daemon.Daemon(root, once=True, monitor=False).run() == 0
        bases = [b["base_id"] for b in base_store.list_bases(root)]
        assert bases == (["b001"] if i == 0 else ["b001", "b002"]), (i, bases)
    recs = model_versioner.list_versions(root)
    consolidated = [r for r in recs if r["reason"] == "consolidate"]
    assert len(consolidated) == 1 and consolidated[0]["base"] == "b002"
    assert [r["reason"] for r in recs if r.get("base") == "b002"][-1] == "post-train:f2.jsonl"
    assert base_store.adapter_base(root / "current_model") == "b002"


def test_the_daemon_never_trains_an_adapter_over_a_damaged_base(tmp_path, tiny_model_dir):
    """A base written in place (an editor, a `dd`): in full mode a damaged current_model is
    refused before training; an adapter over a damaged base trained garbage (loss 1e14)."""
    import base_store
    root, cfg = engine_root(tmp_path / "root", tiny_model_dir, FAST, monitor_port=0,
                            backup_every_files=0, backup_every_hours=0)
    tc.approve(root, cfg, by="test")
    from adapter_fixtures import make_base, publish_adapter
    base = make_base(root)
    publish_adapter(root, base)
    cur_before = {f.name: sha256_file(f) for f in Paths(root).current_model.iterdir() if f.is_file()}
    weights = base_store.base_dir(root, base) / "model.safetensors"
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:  # same size, new bytes: only the mtime and sha256 tell
        f.seek(20_000)
        f.write(b"XXXX")
    write_jsonl(Paths(root).inbox / "good.jsonl", text_records(20, seed=3))
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"current_model is an adapter whose base {base} is damaged" in proc.stderr, proc.stderr
    assert f"backup_manager.py restore-base {base}" in proc.stderr
    assert not list(Paths(root).done.glob("*.jsonl")) and not (root / "metrics.jsonl").exists()
    assert {f.name: sha256_file(f) for f in Paths(root).current_model.iterdir() if f.is_file()} == cur_before


def test_consolidate_is_refused_while_a_file_is_part_way_trained(tmp_path, tiny_model_dir, lora_run):
    """Its checkpoint holds an adapter of the old base: consolidating under it left a file
    that could not resume, and errors naming fixes that did not apply (no daemon to skip)."""
    import model_versioner as mv
    root, cfg = engine_root(tmp_path / "root", tiny_model_dir, FAST)
    p = Paths(root)
    data = p.processing / "data.jsonl"  # where the daemon trains it, with its record
    data.write_bytes(lora_run["data"].read_bytes())
    (p.processing / "data.jsonl.record.json").write_text(json.dumps({"file_id": "data.jsonl#1"}))
    seen = {}
    paused = te.train_file(root, data, file_id="data.jsonl#1", config=cfg,
                           control=lambda: "pause" if seen.get("step", 0) >= 4 else None,
                           progress=lambda d: seen.update(step=d["global_step"]))
    assert paused["status"] == "paused"
    mv.create_version(root, "manual")
    before = sorted(os.listdir(p.root / "base"))
    with pytest.raises(GuardrailError) as err:
        mv.consolidate(root)
    assert "cannot consolidate while processing/data.jsonl is part-way trained" in err.value.what
    assert "training_daemon.py run --once" in err.value.fix
    assert sorted(os.listdir(p.root / "base")) == before  # nothing merged
    result = te.train_file(root, data, file_id="data.jsonl#1", config=cfg)
    assert result["status"] == "completed"
    for name in ("data.jsonl", "data.jsonl.record.json"):  # done, as the daemon moves it
        os.rename(p.processing / name, p.done / name)
    assert mv.consolidate(root)["base"] != "b001"          # once it is done: as before
