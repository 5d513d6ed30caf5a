"""config.json validation (every error at once, each naming its key) and the locked-parameter approval."""

from __future__ import annotations

import json

import pytest

import training_config as tc
from trainroot import GuardrailError


def test_defaults_are_valid_and_documented():
    assert tc.validate_config(tc.default_config()) == []
    for name, p in tc.PARAMS.items():
        assert p.why and len(p.why) > 10, name
    assert set(tc.REQUIRED_LOCKED) <= set(tc.default_config()["locked"])
    assert "| `learning_rate` | `0.0003` |" in tc.describe_params()


def test_every_error_reported_at_once_with_exact_messages():
    cfg = tc.default_config(learning_rate="fast", batch_size=0, dtype="fp8", max_length=True,
                            loss_on_prompt="yes", monitor_port=70000, weight_decay=float("nan"),
                            backup_dir="", locked=["learning_rate", "warmup_steps", "nope"])
    cfg["learnig_rate"] = 1e-3
    cfg["completely_unknown"] = 1
    assert tc.validate_config(cfg) == [
        "learnig_rate: unknown parameter (did you mean learning_rate?)",
        "completely_unknown: unknown parameter",
        "max_length: expected an integer, got True",
        "dtype: expected one of float32, bfloat16, float16, got 'fp8'",
        "learning_rate: expected a number, got 'fast'",
        "batch_size: 0 is out of range [1, 65536]",
        "weight_decay: expected a finite number, got nan",
        "loss_on_prompt: expected true or false, got 'yes'",
        "backup_dir: expected a non-empty string, got ''",
        "monitor_port: 70000 is out of range [0, 65535]",
        "locked: 'nope' is not a lockable parameter",
        "locked: must include base_model",
        "locked: must include max_length",
        "locked: must include dtype",
    ]


def test_load_config_raises_one_error_listing_all(tmp_root):
    (tmp_root / "config.json").write_text(json.dumps({"batch_size": -1, "lr": 1}))
    with pytest.raises(tc.ConfigError) as exc:
        tc.load_config(tmp_root)
    assert exc.value.errors == ["lr: unknown parameter", "batch_size: -1 is out of range [1, 65536]"]
    assert str(exc.value) == (
        f"invalid config (lr: unknown parameter; batch_size: -1 is out of range [1, 65536]), "
        f"{tmp_root / 'config.json'}. Fix config.json, then run "
        "`python3 training_controller.py approve-config` if a locked parameter changed.")


def test_a_key_given_twice_is_an_error_and_a_bom_is_read_past(tmp_root):
    """A hand edit that added a line instead of changing one: JSON keeps the last value, so
    the file reads as one value and trains with the other. A BOM (some editors) is fine."""
    (tmp_root / "config.json").write_text('{"batch_size": 8, "max_length": 64, "batch_size": 512}')
    with pytest.raises(tc.ConfigError) as exc:
        tc.load_config(tmp_root)
    assert exc.value.errors == ["batch_size: given twice (8, then 512); keep one"]
    (tmp_root / "config.json").write_bytes(b'\xef\xbb\xbf{"batch_size": 4}')
    assert tc.load_config(tmp_root)["batch_size"] == 4


def test_missing_config_names_init(tmp_root):
    with pytest.raises(GuardrailError) as exc:
        tc.load_config(tmp_root)
    assert str(exc.value) == (f"no config.json in the training root, {tmp_root}. "
                              f"Run `python3 training_daemon.py init --root {tmp_root}`.")


def test_load_merges_defaults(tmp_root):
    (tmp_root / "config.json").write_text(json.dumps({"batch_size": 4}))
    cfg = tc.load_config(tmp_root)
    assert cfg["batch_size"] == 4 and cfg["max_length"] == tc.PARAMS["max_length"].default


def test_changed_locked_names_old_and_new(tmp_root):
    cfg = tc.default_config()
    assert [c[0] for c in tc.changed_locked(tmp_root, cfg)] == cfg["locked"]  # never approved
    tc.approve(tmp_root, cfg)
    assert tc.changed_locked(tmp_root, cfg) == []
    cfg["learning_rate"] = 1e-3
    cfg["batch_size"] = 64  # not locked: needs no approval
    changes = tc.changed_locked(tmp_root, cfg)
    assert changes == [("learning_rate", 3e-4, 1e-3, False)]
    assert tc.format_change(*changes[0]) == "learning_rate: 0.0003 -> 0.001"
    tc.approve(tmp_root, cfg)
    assert tc.changed_locked(tmp_root, cfg) == []
    # a parameter added to `locked` after the approval has no approved value to show
    cfg["locked"] = [*cfg["locked"], "batch_size"]
    [change] = tc.changed_locked(tmp_root, cfg)
    assert change == ("batch_size", None, 64, True)
    assert tc.format_change(*change) == "batch_size: newly locked at 64, not approved yet"
    # taking a parameter out of `locked` in the edit that changes it: still a change to approve
    cfg["locked"] = [n for n in cfg["locked"] if n != "learning_rate"]
    assert tc.changed_locked(tmp_root, cfg)[1:] == []  # (batch_size, newly locked, is the first)
    cfg["learning_rate"] = 0.5
    assert ("learning_rate", 1e-3, 0.5, False) in tc.changed_locked(tmp_root, cfg)
    tc.approve(tmp_root, cfg)  # approved with learning_rate unlocked: free from then on
    cfg["learning_rate"] = 0.25
    assert tc.changed_locked(tmp_root, cfg) == []


@pytest.mark.parametrize("text", ['[1, 2]', '"yes"', '{"values": ["learning_rate"]}', '{"val', ''])
def test_a_damaged_config_lock_approves_nothing_and_approving_again_fixes_it(tmp_root, text):
    cfg = tc.default_config()
    (tmp_root / ".config.lock").write_text(text)
    with pytest.raises(GuardrailError) as err:
        tc.read_approval(tmp_root)
    assert ".config.lock" in str(err.value)
    assert [c[0] for c in tc.changed_locked(tmp_root, cfg)] == cfg["locked"]
    tc.approve(tmp_root, cfg)
    assert tc.changed_locked(tmp_root, cfg) == []


def test_backup_dir_relative_to_root(tmp_root):
    assert tc.backup_dir(tmp_root, tc.default_config()) == tmp_root / "backups"
    assert tc.backup_dir(tmp_root, tc.default_config(backup_dir="b2")) == tmp_root / "b2"
    assert tc.backup_dir(tmp_root, tc.default_config(backup_dir="/mnt/x")).as_posix() == "/mnt/x"


def test_a_loss_spike_factor_below_one_is_refused_zero_and_above_are_fine():
    """A factor under 1 pauses at the first step above the running average, i.e. always."""
    assert tc.validate_config(tc.default_config(loss_spike_factor=0.5)) == [
        "loss_spike_factor: 0.5 would pause at every step (it is a factor of the running average "
        "loss); use 0 (off) or at least 1, e.g. 3"]
    for ok in (0, 0.0, 1, 3.0):
        assert tc.validate_config(tc.default_config(loss_spike_factor=ok)) == []
