"""Adapter mode of the training engine: a LoRA adapter (peft) trained over an immutable base.

With `"finetune": "lora"` only a small adapter trains; the base is kept once, read-only, in
ROOT/base/<id> (base_store.py). current_model/ and every version are then a standard peft
adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer files,
trainer_state.json, .manifest.json with `"kind": "adapter", "base": id`) whose
adapter_config.json names the base by absolute path, so plain transformers + peft load it:
`AutoModelForCausalLM.from_pretrained("ROOT/current_model")`. The base id in .manifest.json
is the truth (the path goes stale when the root moves); the engine loads by the id.

training_engine calls these in its load, checkpoint and publish steps; nothing else
imports peft, and torch/peft are imported inside the functions.

    model, base_id = lora_mode.load(root, folder, config, global_step=120)
    lora_mode.save_weights(model, path); lora_mode.load_weights(model, path)
    lora_mode.finish_staged(root, staged, base_id)   # after model.save_pretrained(staged)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from trainroot import GuardrailError, atomic_write_json, read_json

log = logging.getLogger("lora_mode")

KIND = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
CONSOLIDATE_COMMAND = "python3 model_versioner.py consolidate"


def is_peft(model) -> bool:
    """Is `model` (unwrapped) a peft model? Never imports peft in full mode."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def wanted(folder: Path, config: dict | None) -> bool:
    """Does current_model load as an adapter? config `finetune` decides; without a config
    (a caller that only evaluates) the folder's kind does."""
    import base_store
    adapter = base_store.is_adapter_folder(folder)
    if config is None:
        return adapter
    if config.get("finetune", "full") == "lora":
        return True
    if adapter:
        raise GuardrailError(
            f"current_model is a LoRA adapter on base {base_store.adapter_base(folder)} and config "
            "finetune is \"full\": full training needs the adapter merged into its base first",
            folder, f"Run `{CONSOLIDATE_COMMAND} --full` (current_model becomes the merged full model), "
            "or set \"finetune\": \"lora\" back in config.json.")
    return False


def lora_config(config: dict):
    """peft's LoraConfig for config.json's LoRA shape."""
    from peft import LoraConfig
    targets = config.get("lora_target_modules", "all-linear")
    return LoraConfig(r=int(config.get("lora_r", 8)), lora_alpha=float(config.get("lora_alpha", 16)),
                      lora_dropout=float(config.get("lora_dropout", 0.0)),
                      target_modules=targets if targets == "all-linear" else list(targets),
                      bias="none", task_type="CAUSAL_LM")


def shape_mismatch(folder: Path, config: dict) -> str | None:
    """'r 8, alpha 16' when the adapter in `folder` has another LoRA shape than config.json's
    (lora_r, lora_alpha, a lora_target_modules list), else None (the same, or no adapter):
    training it would refuse (check_trainable); a consolidate starts one of the new shape."""
    try:
        have = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(have, dict):
        return None
    targets, theirs = config.get("lora_target_modules", "all-linear"), have.get("target_modules")
    try:
        same = (have.get("r") == int(config.get("lora_r", 8))
                and float(have.get("lora_alpha") or 0) == float(config.get("lora_alpha", 16))
                and (not isinstance(targets, list) or not isinstance(theirs, list)
                     or sorted(map(str, targets)) == sorted(map(str, theirs))))
    except (TypeError, ValueError):
        return None  # a value training_config refuses: its own error
    return None if same else f"r {have.get('r')}, alpha {have.get('lora_alpha')}"


def _no_layer(config: dict, where, unknown=None) -> GuardrailError:
    """lora_target_modules names no layer of the model (or, `unknown`, these names)."""
    what = (f"lora_target_modules {json.dumps(config.get('lora_target_modules'))} names no "
            "layer of the model") if not unknown else (
        f"lora_target_modules names {', '.join(json.dumps(t) for t in unknown)}, which "
        f"{'is no layer' if len(unknown) == 1 else 'are no layers'} of the model (peft would "
        "leave it out without a word)")
    return GuardrailError(what, where,
                          "Set lora_target_modules to \"all-linear\" or to layer names the "
                          "model has (e.g. [\"q_proj\", \"v_proj\"]) in config.json, then "
                          "`python3 training_controller.py approve-config --yes`.")


def refuse_missing_targets(config: dict, model_dir: Path, where) -> None:
    """Raise when config.json's lora_target_modules names no layer of the model in
    `model_dir`, or a name that is no layer (peft leaves such a name out without a word),
    read from its safetensors headers (no torch: before anything is written)."""
    targets = config.get("lora_target_modules", "all-linear") if isinstance(config, dict) else None
    if not isinstance(targets, list) or not targets:
        return  # "all-linear", or a value training_config refuses
    modules = set()
    for f in Path(model_dir).glob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError):
            return  # an unreadable model: its own check says so
        modules.update(name.rsplit(".", 1)[0] for name in head if name != "__metadata__")
    unknown = unmatched_targets(modules, targets) if modules else []
    if unknown:
        raise _no_layer(config, where, None if len(unknown) == len(targets) else unknown)


def unmatched_targets(modules, targets: list) -> list[str]:
    """The names of `targets` that no module name in `modules` is or ends with (peft's match)."""
    return [str(t) for t in targets if not any(m == t or m.endswith("." + str(t)) for m in modules)]


def expected_trainable(base, config: dict) -> int:
    """Adapter parameters the LoRA shape gives this base: r x (in + out) per targeted layer
    ("all-linear": every linear layer but the output head, as peft picks them)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    r, targets = int(config.get("lora_r", 8)), config.get("lora_target_modules", "all-linear")
    head = base.get_output_embeddings()
    total = 0
    for name, module in base.named_modules():
        if targets == "all-linear":
            hit = isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if not hit:
            continue
        if isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            total += r * (module.num_embeddings + module.embedding_dim)
        elif isinstance(module, Conv1D):
            total += r * (module.weight.shape[0] + module.weight.shape[1])
    return total


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_trainable(model, expected: int, where) -> int:
    """The classic silent failure is an adapter loaded frozen: it trains nothing, and every
    file "completes". Refuse unless exactly the adapter's parameters train."""
    found = trainable(model)
    if found == expected and found > 0:
        return found
    if found == 0:
        what = "the adapter loaded frozen: 0 parameters would train"
    else:
        what = (f"{found} parameters would train, and config.json's LoRA shape (lora_r, "
                f"lora_target_modules) gives {expected}")
    raise GuardrailError(
        what, where, "Set lora_r and lora_target_modules in config.json back to the adapter's own "
        f"(in {Path(where) / ADAPTER_CONFIG}), or run `{CONSOLIDATE_COMMAND}` to merge it and start "
        "a fresh adapter of the new shape; then `python3 training_controller.py approve-config --yes`.")


def base_for(root, folder: Path, state: dict) -> tuple[str, bool]:
    """The base id current_model trains on, and whether its adapter starts fresh. A full
    current_model (the full -> lora switch) becomes a base itself (base_store.create_base
    returns the existing id when one holds the same weights: a resume finds the same)."""
    import base_store
    if base_store.is_adapter_folder(folder):
        base_id = base_store.adapter_base(folder)
        if not base_id:
            raise GuardrailError("current_model is an adapter folder whose manifest names no base",
                                 folder, "Restore the last good version: "
                                 "`python3 model_versioner.py restore latest`.")
        return base_id, False
    import model_versioner
    source = model_versioner.current_version(root) or f"step {state.get('global_step', 0)}"
    base_id = base_store.create_base(root, folder, source=f"full model at {source}")
    log.info("finetune lora: current_model (full, %s) is base %s; a fresh adapter starts on it",
             source, base_id)
    return base_id, True


def load_base(root, base_id: str):
    """The base in float32 (the adapter trains against the exact weights, whatever their
    stored dtype)."""
    import base_store
    import torch
    from transformers import AutoModelForCausalLM
    folder = base_store.base_dir(root, base_id)
    if not (folder / "config.json").is_file():
        raise GuardrailError(f"base {base_id} of the adapter is missing", folder,
                             "Restore it from a backup: `python3 backup_manager.py list`, then "
                             "`python3 backup_manager.py restore BACKUP_ID`.")
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)


def load(root, folder: Path, config: dict, *, global_step: int) -> tuple[object, str]:
    """The trainable peft model for current_model and its base id: the folder's adapter,
    or a fresh one (seeded by config seed + global_step; peft's B = 0, so its first logits
    are the base's) when current_model is a full model."""
    import torch
    from peft import PeftModel, get_peft_model
    base_id, fresh = base_for(root, folder, {"global_step": global_step})
    base = load_base(root, base_id)
    expected = expected_trainable(base, config)
    if expected == 0:
        raise _no_layer(config, folder)
    targets = config.get("lora_target_modules", "all-linear")
    if fresh and isinstance(targets, list):  # a new adapter's shape: every name a layer
        unknown = unmatched_targets([name for name, _ in base.named_modules()], targets)
        if unknown:
            raise _no_layer(config, folder, unknown)
    if fresh:
        with torch.random.fork_rng(devices=[]):  # the run's own RNG stream is left as it was
            torch.manual_seed(int(config.get("seed", 0)) + int(global_step))
            model = get_peft_model(base, lora_config(config))
    else:
        model = PeftModel.from_pretrained(base, folder, is_trainable=True)
    check_trainable(model, expected, folder)
    return model, base_id


def load_frozen(root, folder: Path):
    """An adapter folder (current_model or a version) over its base, for evaluation."""
    import base_store
    from peft import PeftModel
    base_id = base_store.adapter_base(folder)
    if not base_id:
        raise GuardrailError("adapter folder names no base", folder,
                             "Restore the last good version: `python3 model_versioner.py restore latest`.")
    return PeftModel.from_pretrained(load_base(root, base_id), folder, is_trainable=False)


def save_weights(model, path) -> None:
    """The adapter's trainable tensors only (a checkpoint of a few MB, not the base)."""
    from safetensors.torch import save_file
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(path))


def load_weights(model, path) -> None:
    import torch
    from safetensors.torch import load_file
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        raise GuardrailError(
            f"the checkpoint's adapter has {len(saved)} tensors and the model's {len(params)}, "
            "under other names", path, "Run `python3 training_controller.py skip` (keeps "
            "current_model; the file restarts as the next one) or set the LoRA shape back.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def check_checkpoint(ckpt: Path, meta: dict, base_id: str | None, file_id: str) -> None:
    """A checkpoint resumes only in the mode and on the base it was written with."""
    kind, base = meta.get("kind", "full"), meta.get("base")
    now_kind = KIND if base_id else "full"
    if kind == now_kind and base == base_id:
        return
    raise GuardrailError(
        f"{file_id} was checkpointed at step {meta.get('global_step')} in {kind} mode"
        + (f" on base {base}" if base else "") + f", and training is now {now_kind}"
        + (f" on base {base_id}" if base_id else ""), ckpt,
        "Set finetune back in config.json to finish the file as it started, or run "
        "`python3 training_controller.py skip` (keeps the steps trained on it).")


def same_lineage(meta: dict, base_id: str | None) -> bool:
    """May this checkpoint's optimizer carry over (same kind, same base)?"""
    return meta.get("kind", "full") == (KIND if base_id else "full") and meta.get("base") == base_id


def checkpoint_meta(base_id: str | None) -> dict:
    return {"kind": KIND, "base": base_id} if base_id else {}


def finish_staged(root, staged: Path, base_id: str) -> dict:
    """After peft's save_pretrained into `staged`: point adapter_config.json at the base's
    absolute path and drop peft's generated README (not part of the folder's contract).
    Returns the manifest's extra."""
    import base_store
    cfg_path = staged / ADAPTER_CONFIG
    doc = read_json(cfg_path)
    doc["base_model_name_or_path"] = str(Path(base_store.base_dir(root, base_id)).resolve())
    atomic_write_json(cfg_path, doc)
    readme = staged / "README.md"
    if readme.is_file():
        os.unlink(readme)
    return {"kind": KIND, "base": base_id}
