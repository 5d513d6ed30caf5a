"""The training engine: packed streaming training with exact resume, one file at a time.

The only module that imports torch and transformers. It builds the tiny test model,
checks and copies base models, and trains one data file into `current_model`, carrying
AdamW and the LR schedule across files, checkpointing the exact data position so a
`kill -9` at any step resumes bitwise, and guarding against NaN losses and spikes.

    python3 training_engine.py tiny --out /tmp/tiny            # build the tiny test model
    python3 training_engine.py check /path/to/model            # can transformers load it?
    python3 training_engine.py train --root ROOT data.jsonl    # train one file (tests, benches)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from trainroot import (GuardrailError, atomic_write_json, fsync_dir, run_cli)

TRAINER_STATE = "trainer_state.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# A plain template for the tiny model: one line of role, the content, EOS after each turn.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}" + BOS + "{{ m['role'] }}\n{{ m['content'] }}" + EOS + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + BOS + "assistant\n{% endif %}")


# --------------------------------------------------------------------------- files

def _quiet_transformers() -> None:
    """No progress bars on stderr: the daemon's logs and `--json` callers read it."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def fsync_tree(folder: str | os.PathLike, mode: int = 0o644) -> None:
    """chmod every file to `mode` (safetensors writes 0600), fsync it, then fsync the folders."""
    folder = Path(folder)
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            os.chmod(path, mode)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _byte_unicode_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table as a vocab where token id == byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {chars[b]: b for b in range(256)}


def build_tiny_tokenizer():
    """A byte-level tokenizer needing no network: ids 0-255 are bytes, then bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(vocab=_byte_unicode_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=2048)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 176,
                     max_position_embeddings: int = 2048) -> Path:
    """Save a small random LlamaForCausalLM + byte tokenizer into `out_dir` (new or empty)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    _quiet_transformers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise GuardrailError("folder is not empty", out, "Choose a new folder for the tiny model.")
    tokenizer = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=259, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)  # ~0.1M parameters: constructor init costs milliseconds
    model.generation_config.bos_token_id = 256
    model.generation_config.eos_token_id = 257
    model.generation_config.pad_token_id = 258
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / TRAINER_STATE, {"global_step": 0, "tokens_seen": 0})
    fsync_tree(out)
    return out


# --------------------------------------------------------------------------- base models

def check_loadable(model_dir: str | os.PathLike) -> dict:
    """Load config, tokenizer and weights of a local causal LM; GuardrailError naming the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    _quiet_transformers()
    folder = Path(model_dir)
    fix = "Point --base at a local Hugging Face causal-LM folder (config.json, tokenizer, weights)."
    if not folder.is_dir():
        raise GuardrailError("model folder not found", folder, fix)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types here; all mean "not loadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GuardrailError(f"cannot load the model ({exc.__class__.__name__}: {first[:200]})",
                             folder, fix) from None
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"model_type": getattr(config, "model_type", None), "parameters": params,
            "vocab_size": len(tokenizer), "has_chat_template": bool(tokenizer.chat_template)}


def copy_base_model(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a loadable model folder into the new folder `dst` (files 0644, fsynced)."""
    src, dst = Path(src), Path(dst)
    check_loadable(src)
    if os.path.lexists(dst):
        raise GuardrailError("destination already exists", dst, "Choose a new folder.")
    dst.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] == ".manifest.json" or rel.parts[0].startswith(".cache"):
            continue  # our own manifest is rewritten by the versioner; hub caches are not model
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # copyfile: no source mode bits (read-only sources)
    if not (dst / TRAINER_STATE).exists():
        atomic_write_json(dst / TRAINER_STATE, {"global_step": 0, "tokens_seen": 0})
    fsync_tree(dst)
    return dst


# --------------------------------------------------------------------------- CLI

def cmd_tiny(args) -> int:
    """Build the tiny random test model (byte tokenizer) into a new folder."""
    out = build_tiny_model(args.out, seed=args.seed)
    print(out)
    return 0


def cmd_check(args) -> int:
    """Check that a local model folder loads with transformers (config, tokenizer, weights)."""
    info = check_loadable(args.model_dir)
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_engine.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tiny", help=cmd_tiny.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)
    p = sub.add_parser("check", help=cmd_check.__doc__)
    p.add_argument("model_dir")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv=None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
