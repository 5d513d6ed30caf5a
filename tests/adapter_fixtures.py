"""Adapter (LoRA) model folders built with peft directly, laid out as the adapter-mode
contract says, so the versions side is tested without the engine.

    base_id = make_base(root)                    # ROOT/base/b001 from current_model (a full model)
    vid = publish_adapter(root, base_id, seed=1, step=10)   # current_model = an adapter, versioned
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import base_store
import model_versioner as mv
from model_manifest import write_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def make_base(root: Path) -> str:
    """A base from current_model (full): what the engine does at the first lora file."""
    return base_store.create_base(root, Path(root) / "current_model", source="full model at v001")


def adapter_folder(root: Path, base_id: str, out: Path, *, seed: int = 1, step: int = 10,
                   scale: float = 0.05, zero: bool = False) -> Path:
    """Save a peft LoRA adapter (r=8, all-linear) on base `base_id` into `out`, its lora_B
    weights perturbed with `seed` (so it changes the logits) unless `zero`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = base_store.base_dir(root, base_id).resolve()
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if not zero:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
    out.mkdir(parents=True)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    (out / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "tokens_seen": step * 100}))
    write_manifest(out, extra={"kind": "adapter", "base": base_id})
    return out


def publish_adapter(root: Path, base_id: str, *, seed: int = 1, step: int = 10,
                    zero: bool = False, reason: str = "manual") -> str:
    """current_model = a new adapter on `base_id`, then versioned; returns the version id."""
    root = Path(root)
    (root / ".staging").mkdir(exist_ok=True)
    staged = root / ".staging" / f"test-adapter-{seed}-{step}-{os.getpid()}"
    adapter_folder(root, base_id, staged, seed=seed, step=step, zero=zero)
    mv.publish_model(root, staged, reason="test adapter")
    vid, _ = mv.create_version(root, reason)
    return vid


def logits(folder: Path, ids=((1, 2, 3, 4, 5, 6, 7, 8),)):
    """Logits of `from_pretrained(folder)` (a full model or an adapter folder) on `ids`."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(Path(folder), local_files_only=True,
                                                 dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits
