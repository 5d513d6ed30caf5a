"""The torch side of `model_versioner.py consolidate`: merge a LoRA adapter into its base,
prove the merge on a fixed probe batch, and start a fresh adapter on the merged model.

Imported only inside the consolidate command (torch, transformers and peft load here and
nowhere else outside the engine). Merging happens in float32 and the result is cast once to
the base's dtype; the probe compares the merged model as saved (loaded back from disk)
with base+adapter in float32. Tolerances (max |logit difference|, scaled by
max(1, max |logit|)): float32 1e-4; float16 1e-2; bfloat16 5e-2 (bf16 keeps 8 bits of
mantissa: one rounding of every weight moves logits by up to a few 1e-2).

    report = merge(base_dir, adapter_dir, out_dir, dtype="bfloat16")
    fresh_adapter(new_base_dir, adapter_dir, out_dir, seed=1234)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from trainroot import GuardrailError

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
PROBE_SEED, PROBE_SHAPE = 0, (2, 32)          # the fixed probe batch: 2 rows of 32 token ids
# what a base or adapter folder holds besides the tokenizer: never copied as "tokenizer"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin", "adapter_config.json",
               "adapter_model.safetensors", "adapter_model.bin", "trainer_state.json",
               ".manifest.json", "base.json", "version.json", "README.md"}
CMD = "python3 model_versioner.py"


def _dtype(name: str | None) -> torch.dtype:
    return getattr(torch, name) if name in TOLERANCE else torch.float32


def _load(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.eval()


def probe_ids(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=gen)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in sorted(os.listdir(src)):
        if name not in MODEL_FILES and (src / name).is_file() and not name.startswith("."):
            shutil.copyfile(src / name, dst / name)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def merge(base_dir, adapter_dir, out_dir, *, dtype: str | None) -> dict:
    """Merge adapter into base (float32), cast once to `dtype`, save a full model folder in
    `out_dir` (new), and check its logits on the probe batch against base+adapter.
    Raises GuardrailError (out_dir left for the caller to discard) when they differ."""
    from peft import PeftModel
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    model = PeftModel.from_pretrained(_load(base_dir), adapter_dir, is_trainable=False).eval()
    ids = probe_ids(model.get_base_model().config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits.float()
    merged = model.merge_and_unload()
    target = _dtype(dtype)
    merged = merged.to(target)                       # the one cast
    out_dir.mkdir(parents=True)
    merged.save_pretrained(out_dir)
    _copy_tokenizer(base_dir, out_dir)
    state = json.loads((adapter_dir / "trainer_state.json").read_text()) \
        if (adapter_dir / "trainer_state.json").is_file() else {}
    (out_dir / "trainer_state.json").write_text(json.dumps(state))
    _fsync_tree(out_dir)
    del model, merged
    check = _load(out_dir, dtype=target)             # what was written, not what is in memory
    with torch.no_grad():
        got = check(ids).logits.float()
    diff = float((got - want).abs().max())
    tol = TOLERANCE.get(str(dtype), TOLERANCE["float32"]) * max(1.0, float(want.abs().max()))
    report = {"max_abs_diff": diff, "tolerance": tol, "dtype": dtype or "float32",
              "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE)}}
    if not diff <= tol:  # NaN fails too
        raise GuardrailError(
            f"the merged model differs from base+adapter by {diff:.3g} on the probe batch "
            f"(tolerance {tol:.3g}); nothing was changed", out_dir,
            f"Check the adapter with `{CMD} verify`, and keep training in adapter mode.")
    return report


def fresh_adapter(base_dir, adapter_dir, out_dir, *, seed: int, state: dict,
                  config: dict | None = None) -> None:
    """A new adapter on `base_dir` of config.json's LoRA shape (`config`; without it the
    shape of `adapter_dir`: a consolidate is also how a new lora_r takes effect),
    initialised as peft does with `seed` (B = 0: its model equals the base), saved into
    `out_dir` (new) with the tokenizer of `adapter_dir` and `state` as trainer_state.json."""
    from peft import LoraConfig, get_peft_model
    import lora_mode
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    cfg = lora_mode.lora_config(config) if config else LoraConfig.from_pretrained(str(adapter_dir))
    cfg.base_model_name_or_path = str(base_dir.resolve())
    cfg.inference_mode = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(_load(base_dir), cfg)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    conf = json.loads((out_dir / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(base_dir.resolve())
    (out_dir / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    _copy_tokenizer(adapter_dir, out_dir)
    (out_dir / "trainer_state.json").write_text(json.dumps(state))
    _fsync_tree(out_dir)
