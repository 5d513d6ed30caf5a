"""training_engine across the config space: documented values that must train, rows that
teach nothing, strict-JSON metrics, float16 on CPU, and exact resume under accumulation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import training_config
import training_engine as te
from conftest import REPO, engine_root
from conftest import write_jsonl as conftest_write_jsonl
from trainroot import Paths, read_json

FAST = dict(max_length=16, batch_size=2, grad_accum_steps=1, num_threads=1, warmup_steps=2,
            checkpoint_every_steps=0, checkpoint_every_minutes=0.0, loss_spike_factor=0.0,
            learning_rate=3e-3)


def make_root(path: Path, model_dir: Path, **overrides) -> tuple[Path, dict]:
    """A training root as `init` makes it, with this module's small, fast config."""
    return engine_root(path, model_dir, FAST, **overrides)


def write_jsonl(path: Path, records) -> Path:
    return conftest_write_jsonl(path, records, ensure_ascii=False)  # unicode as UTF-8 bytes


def strict_metrics(root: Path) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it (NaN/Infinity are not JSON)."""
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl is not JSON")
    return [json.loads(line, parse_constant=refuse)
            for line in Paths(root).metrics.read_text().splitlines()]


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


CHAT = [{"messages": [{"role": "system", "content": "Be brief ✓"},
                      {"role": "user", "content": f"question {i} " * (1 + i % 4)},
                      {"role": "assistant", "content": f"ans {i} 🙂"}]} for i in range(12)]


@pytest.mark.slow
def test_rows_without_a_target_take_no_optimizer_step(tmp_path, tiny_model_dir):
    """A prompt many rows long, loss on the response only: the prompt's rows carry no target.
    An optimizer step made of them logged a null loss and still moved the weights (AdamW
    momentum); they are counted in tokens_seen and trained nowhere."""
    long_prompt = {"prompt": "P" * 100, "completion": " done"}
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "hi", "completion": " yo"}, long_prompt,
                                               {"prompt": "a", "completion": " b"}])
    root, cfg = make_root(tmp_path / "root", tiny_model_dir, max_length=8, batch_size=1,
                          grad_accum_steps=1)
    r = te.train_file(root, data, file_id="pc", config=cfg)
    assert r["status"] == "completed", r
    rows = strict_metrics(root)
    assert [m["global_step"] for m in rows] == list(range(1, r["global_step"] + 1))
    assert all(isinstance(m["loss"], float) and math.isfinite(m["loss"]) for m in rows), \
        [m["loss"] for m in rows]
    # every token was read and counted, trained or not: the chat template's rendering of
    # each record (a user and an assistant turn: 21 tokens around the two texts)
    assert r["tokens"] == r["tokens_seen"] == (21 + 2 + 3) + (21 + 100 + 5) + (21 + 1 + 2)
    state = read_json(Paths(root).current_model / "trainer_state.json")
    assert (state["global_step"], state["tokens_seen"]) == (r["global_step"], r["tokens_seen"])
    # 116 tokens in rows of 8: 15 rows, of which the 11 inside the prompt teach nothing
    assert r["steps"] < 8


@pytest.mark.slow
def test_adam_eps_zero_is_a_valid_config_that_trains(tmp_path, tiny_model_dir):
    """adam_eps 0 is in range [0, 1]; AdamW divided 0 by 0 for embedding rows of unused bytes,
    turning them NaN, and the file failed at its second step as a "NaN loss"."""
    import torch
    assert training_config.validate_config(training_config.default_config(adam_eps=0.0)) == []
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"{i}: abc abd abe"} for i in range(12)])
    root, cfg = make_root(tmp_path / "root", tiny_model_dir, adam_eps=0.0)
    r = te.train_file(root, data, file_id="t", config=cfg)
    assert r["status"] == "completed" and r["steps"] > 3, r
    w = weights(Paths(root).current_model)
    assert all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.slow
def test_float16_trains_on_cpu_resumes_exactly_and_logs_strict_json(tmp_path, tiny_model_dir):
    """dtype float16 is a documented choice: on CPU it trains with autocast and a CPU loss
    scaler. Its first steps overflow (the scaler skips them): the infinite gradient norm was
    written as `Infinity`, which JSON readers (the monitor's JSON.parse) reject."""
    data = write_jsonl(tmp_path / "c.jsonl", CHAT)
    # one-row steps: with this file they overflow at steps 3 and 21 (which steps do depends on
    # how rows are packed; two-row steps stopped overflowing once documents were isolated)
    f16 = dict(dtype="float16", max_length=8, batch_size=1)
    ref_root, cfg = make_root(tmp_path / "ref", tiny_model_dir, **f16)
    ref = te.train_file(ref_root, data, file_id="c", config=cfg)
    assert ref["status"] == "completed" and ref["steps"] >= 10, ref
    rows = strict_metrics(ref_root)
    assert any(m["grad_norm"] is None for m in rows[3:])  # an overflow after the pause below
    assert all(isinstance(m["loss"], float) for m in rows)

    root, _ = make_root(tmp_path / "root", tiny_model_dir, **f16)
    seen = {}
    first = te.train_file(root, data, file_id="c", config=cfg,
                          control=lambda: "pause" if seen.get("step", 0) >= 3 else None,
                          progress=lambda d: seen.update(step=d["global_step"]))
    assert first["status"] == "paused" and first["global_step"] == 3, first
    second = te.train_file(root, data, file_id="c", config=cfg)  # scaler state comes back too
    assert second["status"] == "completed" and second["global_step"] == ref["global_step"]
    assert_bitwise_equal(weights(Paths(root).current_model), weights(Paths(ref_root).current_model))


def test_train_command_rejects_a_set_that_is_not_json(initialized_root):
    proc = subprocess.run([sys.executable, str(REPO / "training_engine.py"), "train", "--root",
                           str(initialized_root), "x.jsonl", "--set", "max_length=eight"],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "Error: --set max_length=eight: expected KEY=JSON (a string in JSON quotes), --set. "
        "Write it as e.g. `--set max_length=64` or `--set dtype='\"bfloat16\"'`.")


@pytest.mark.slow
def test_kill_9_mid_file_with_accumulation_and_cosine_resumes_bitwise(tmp_path, tiny_model_dir):
    """Gradient accumulation 2, cosine restarts, a chat file whose rows are partly untrained,
    one-row micro-batches: kill -9 after a checkpoint, run again, same weights as one run."""
    over = dict(max_length=8, batch_size=1, grad_accum_steps=2, lr_schedule="cosine_with_restarts",
                cosine_cycle_steps=5, warmup_steps=3, checkpoint_every_steps=4)
    data = write_jsonl(tmp_path / "c.jsonl", CHAT * 3)  # ~40 steps: the kill lands mid-file
    ref_root, cfg = make_root(tmp_path / "ref", tiny_model_dir, **over)
    ref = te.train_file(ref_root, data, file_id="c.jsonl", config=cfg)
    assert ref["status"] == "completed" and ref["global_step"] > 30, ref

    root, _ = make_root(tmp_path / "root", tiny_model_dir, **over)
    proc = subprocess.Popen([sys.executable, str(REPO / "training_engine.py"), "train", "--root",
                             str(root), str(data), "--json"], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not any(m["global_step"] >= 10 for m in _metrics(root)):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the trainer never reached step 10"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    killed_at = _metrics(root)[-1]["global_step"]
    assert killed_at < ref["global_step"]
    r = te.train_file(root, data, file_id="c.jsonl", config=cfg)
    assert r["status"] == "completed" and r["message"].startswith("resumed from checkpoint-"), r
    assert (r["global_step"], r["tokens_seen"]) == (ref["global_step"], ref["tokens_seen"])
    assert_bitwise_equal(weights(Paths(root).current_model), weights(Paths(ref_root).current_model))
    lrs = {m["global_step"]: m["lr"] for m in strict_metrics(root)}
    assert lrs == {s + 1: te.lr_at(s, cfg) for s in range(r["global_step"])}


def _metrics(root: Path) -> list[dict]:
    path = Paths(root).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
