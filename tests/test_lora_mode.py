"""Adapter mode (`"finetune": "lora"`): config keys and their lock, the trainable-count
check, training only the adapter, current_model as a peft adapter folder that plain
transformers loads in a fresh process, bitwise resume after kill -9, and the eval gate."""

from __future__ import annotations

import json

import pytest

import training_config as tc


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
            [(name, tc.PARAMS[name].default, value)], name
    # the dropout and the consolidation period do not shape what a version is: not locked
    assert tc.changed_locked(tmp_root, dict(cfg, lora_dropout=0.1, consolidate_every_files=5)) == []
    tc.approve(tmp_root, dict(cfg, finetune="lora"))
    assert tc.read_approval(tmp_root)["values"]["finetune"] == "lora"
    assert tc.changed_locked(tmp_root, dict(cfg, finetune="lora")) == []
