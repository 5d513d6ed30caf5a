"""The training engine: packed streaming training with exact resume, one file at a time.

The only module that imports torch and transformers. It builds the tiny test model,
checks and copies base models, and trains one data file into `current_model`, carrying
AdamW and the LR schedule across files, checkpointing the exact data position so a
`kill -9` at any step resumes bitwise, and guarding against NaN losses and spikes.

    python3 training_engine.py tiny --out /tmp/tiny            # build the tiny test model
    python3 training_engine.py check /path/to/model            # can transformers load it?
    python3 training_engine.py train --root ROOT data.jsonl    # train one file (tests, benches)
    python3 training_engine.py show --root ROOT data.jsonl     # what trains: rendered records, trained spans marked
    torchrun --standalone --nproc_per_node 2 training_engine.py train --root ROOT data.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError

import lora_mode
import retention
from trainroot import (FileLock, GuardrailError, Paths, UsageError, append_line,
                       atomic_write_json, exchange_paths, exit_without_teardown, file_signature,
                       fsync_dir, fsync_paths, read_json, rename_noreplace, run_cli, sha256_file,
                       subcommands, utc_now)

log = logging.getLogger("training_engine")

# What a full or failing disk raises while saving: safetensors wraps the OS error in its own.
WRITE_ERRORS = (OSError, SafetensorError)

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
    """chmod every file to `mode` (safetensors writes 0600), fsync it, then fsync the folders.
    A file with other links (a checkpoint's weights linked into a staged model) keeps its
    mode: the inode may be a version's too, and nothing changes a version's file."""
    folder = Path(folder)
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.stat(path).st_nlink == 1:
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
        model, loading = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                              output_loading_info=True)
    except Exception as exc:  # transformers raises many types here; all mean "not loadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GuardrailError(f"cannot load the model ({exc.__class__.__name__}: {first[:200]})",
                             folder, fix) from None
    _check_trainable(folder, tokenizer, model, loading, fix)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"model_type": getattr(config, "model_type", None), "parameters": params,
            "vocab_size": len(tokenizer), "has_chat_template": bool(tokenizer.chat_template)}


def _check_trainable(folder: Path, tokenizer, model, loading: dict, fix: str) -> None:
    """What loading alone does not prove, and training would find file after file: weights
    for every layer (none made up at random), a tokenizer that turns text into tokens the
    embedding has rows for, and attention that is causal (a masked LM loads as a causal
    one and trains, seeing each next token)."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise GuardrailError(
            f"the folder has no weights for {len(missing)} of the model's tensors ("
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): they would start "
            "random; is it another kind of model (not a causal LM), or a part of one?", folder, fix)
    ids = tokenizer("Hello, world. 1234", add_special_tokens=False)["input_ids"]
    if not ids:
        raise GuardrailError(
            "the tokenizer turns text into no tokens (no tokenizer files in the folder?); every "
            "file would train nothing", folder,
            "Copy the model's tokenizer files (tokenizer.json or its vocabulary, "
            "tokenizer_config.json) into the folder, then run init again.")
    rows = model.get_input_embeddings().num_embeddings
    # the ids training emits for sure: text, and the special tokens (eos between documents,
    # the pad of a file's last row, a chat template's markers); an added token no data
    # uses may lie past the rows, as in some published models
    used = set(ids) | {i for i in tokenizer.all_special_ids if isinstance(i, int)}
    if max(used) >= rows:
        past = sorted(i for i in used if i >= rows)
        raise GuardrailError(
            f"the tokenizer gives ids up to {max(used)} (e.g. {past[:3]}) but the model's "
            f"embedding has {rows} rows: the first such token would stop training", folder,
            "Use the tokenizer this model was trained with, or resize the model's embeddings "
            "(`model.resize_token_embeddings(len(tokenizer))`, then save_pretrained) first.")
    probe = torch.tensor([[ids[0], ids[-1], ids[0], ids[-1]], [ids[0], ids[-1], ids[0], ids[0]]])
    if ids[0] == ids[-1]:
        probe[1, -1] = (ids[0] + 1) % rows
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe, use_cache=False).logits.float()
    if not torch.allclose(logits[0, :-1], logits[1, :-1], atol=1e-4, rtol=0):
        raise GuardrailError(
            f"the model is not causal: its outputs at a position change with the tokens after it "
            f"({type(model).__name__}; a masked or encoder model?), so it would learn to copy "
            "the next token instead of predicting it", folder, fix)


SAMPLE_CHAT = [{"role": "system", "content": "You are helpful."},
               {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]


def describe_chat_rendering(model_dir, setting=None, root=None) -> dict:
    """How chat records of this model will render: which template, where it comes from, and
    a test render of a short conversation (with and without a system turn)."""
    import chat_render
    from transformers import AutoTokenizer
    _quiet_transformers()
    folder = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    renderer = chat_render.ChatRenderer(tokenizer, setting, root)
    if setting is not None:
        source = "config.json chat_template"
    elif (folder / "chat_template.jinja").exists():
        source = "chat_template.jinja beside the tokenizer (it overrides tokenizer_config.json)"
    elif renderer.mode == chat_render.TEMPLATE:
        source = "tokenizer_config.json chat_template"
    else:
        source = None
    out = {"rendering": renderer.mode, "template": renderer.describe(), "source": source,
           "sample": None, "system_role": None, "error": None}
    if renderer.mode == chat_render.TEMPLATE:
        for messages in (SAMPLE_CHAT, SAMPLE_CHAT[1:]):
            try:
                pieces, _ = renderer.pieces(messages)
            except GuardrailError as exc:
                out["error"] = out["error"] or exc.what
                continue
            out["sample"] = "".join(text for text, _ in pieces)
            out["system_role"] = out["system_role"] if out["system_role"] is not None else messages is SAMPLE_CHAT
            break
    return out


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


# --------------------------------------------------------------------------- tokenizing

class Encoder:
    """Turns one validated record into (ids, labels); labels are -100 where no loss is taken.

    `text` trains on everything. `messages`, `prompt_completion` and `instruction` (as a
    user turn and an assistant turn; TRL's conversational prompt/completion as its
    messages) are rendered whole with the model's chat template (chat_render: the
    assistant turns as the template renders them plus its end-of-turn marker train, the
    rest does not), or refused with ChatRenderError; never silently rendered another way.
    validate_data's plain `segments` render them only for a model without a template or
    when config.json's `chat_template` is "plain" (`rendering` says which); tool calls
    have no plain rendering and are refused then. `loss_on_prompt` trains on every token.
    `stats` counts the records encoded by rendering ("template", "plain", "text") and
    those longer than `max_length` ("split": they continue in the next row).
    """

    def __init__(self, tokenizer, *, loss_on_prompt: bool = False, chat_template=None, root=None,
                 date=None, max_length: int | None = None):
        import chat_render
        self.tokenizer = tokenizer
        self.loss_on_prompt = loss_on_prompt
        self.max_length = max_length
        self.stats = collections.Counter()
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise GuardrailError("the tokenizer has no EOS token", getattr(tokenizer, "name_or_path", ""),
                                 "Use a model whose tokenizer defines eos_token.")
        self.renderer = chat_render.ChatRenderer(tokenizer, chat_template, root, date=date)
        self.where = None  # the data file, named in a ChatRenderError
        self.has_template = self.renderer.mode == chat_render.TEMPLATE
        self._byte_fast = self._is_byte_identity(tokenizer)
        self._backend = None if self._byte_fast else self._direct_backend(tokenizer)
        self._ready: dict[str, list[int]] = {}  # texts tokenized ahead (tokenize_ahead)
        self._rendered: dict[int, tuple] = {}  # chat records rendered and tokenized ahead
        if self._byte_fast:
            specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
            self._special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
            self._special_re = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def render_key(self, config: dict) -> dict:
        """What decides the tokens a record becomes: the chat template (its text's sha256;
        None: the plain rendering), loss_on_prompt and the field names. A checkpoint keeps
        it: the rest of a file resumed under another would train differently from its start."""
        template = self.renderer.template if self.has_template else None
        return {"chat_template_sha256": hashlib.sha256(template.encode("utf-8", "surrogatepass"))
                .hexdigest() if template else None, "loss_on_prompt": bool(self.loss_on_prompt),
                "fields": config.get("fields") or {}}

    @property
    def rendering(self) -> str:
        """Which rendering chat records get: "template" or "plain"."""
        return "template" if self.has_template else "plain"

    @staticmethod
    def _is_byte_identity(tokenizer) -> bool:
        """True for the tiny byte tokenizer: ids are UTF-8 bytes, so encode() is the tokenizer."""
        probe = "Az é\x00\n\t~ÿ🙂 <x>"
        try:
            return (len(tokenizer) == 259
                    and tokenizer(probe, add_special_tokens=False)["input_ids"] == list(probe.encode("utf-8")))
        except Exception:  # an odd tokenizer is simply not the fast path
            return False

    @staticmethod
    def _direct_backend(tokenizer):
        """A fast tokenizer's own (Rust) tokenizer, when calling it gives the ids the
        tokenizer class gives: ~5x less Python per record (on a GPU the batch read ahead
        shares the interpreter with the step's kernel launches). None where it may differ:
        truncation or padding set on it, special tokens split, or a probe that disagrees."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(tokenizer, "split_special_tokens", False):
            return None
        probe = ("Az é\x00\n\t~ÿ🙂 <x>  two  spaces\r\n" + " ".join(tokenizer.all_special_tokens)
                 + "end." + "".join(tokenizer.all_special_tokens[:2]) + "x" * 300)
        try:
            want = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)  # (clears both)
            if backend.truncation is not None or backend.padding is not None:
                return None
            got = backend.encode(probe, add_special_tokens=False)
            same = got.ids == list(want["input_ids"]) and got.offsets == [tuple(o) for o in want["offset_mapping"]]
            return backend if same else None
        except Exception:  # an odd tokenizer is simply not the fast path
            return None

    def tokenize_ahead(self, records) -> None:
        """Tokenize `records` in one call to the fast tokenizer, for ids() and _encode() to
        hand out as they come: the texts of plain records, and chat records rendered by the
        template first (what rendering raises is kept, raised when the record is encoded).
        The Rust side releases the GIL for the whole batch and runs on every core, where one
        call per text took and gave the GIL back per record, through ~0.1 ms of the
        tokenizer class's Python each (on a GPU, the step's kernel launches wait for it)."""
        self._ready, self._rendered = {}, {}
        if self._backend is None:
            return
        texts = {text: None for r in records if r.messages is None for text, _ in r.segments if text}
        chats = []
        for r in records:
            if r.messages is not None and self.has_template:
                try:
                    pieces, ends_with_marker = self._render(r)
                except Exception as exc:  # raised in its turn, by _encode
                    self._rendered[id(r)] = (r, exc)
                    continue
                rendered = "".join(text for text, _ in pieces)
                chats.append((r, pieces, ends_with_marker, rendered))
                texts[rendered] = None
        texts = [t for t in texts if t]
        encoded = dict(zip(texts, self._backend.encode_batch(texts, add_special_tokens=False))) if texts else {}
        self._ready = {t: e.ids for t, e in encoded.items()}
        for r, pieces, ends_with_marker, text in chats:
            e = encoded.get(text)
            ids, starts = (e.ids, [start for start, _ in e.offsets]) if e is not None else ([], [])
            self._rendered[id(r)] = (r, (pieces, ends_with_marker, ids, starts))

    def ids(self, text: str) -> list[int]:
        if not text:
            return []
        if self._backend is not None:
            ready = self._ready.get(text)
            return list(ready) if ready is not None else \
                self._backend.encode(text, add_special_tokens=False).ids
        if self._byte_fast:  # ~17x faster than the tokenizer class, identical ids (FIELD-NOTES)
            out: list[int] = []
            for i, piece in enumerate(self._special_re.split(text)):
                if i % 2:
                    out.append(self._special_ids[piece])
                elif piece:
                    out.extend(piece.encode("utf-8"))
            return out
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ids_and_starts(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of `text` tokenized once, and the character offset each token starts at."""
        if not text:
            return [], []
        if self._byte_fast:
            ids: list[int] = []
            starts: list[int] = []
            pos = 0
            for i, piece in enumerate(self._special_re.split(text)):
                if i % 2:
                    ids.append(self._special_ids[piece])
                    starts.append(pos)
                elif piece:
                    data = piece.encode("utf-8")
                    ids.extend(data)
                    if len(data) == len(piece):
                        starts.extend(range(pos, pos + len(piece)))
                    else:
                        starts.extend(pos + j for j, ch in enumerate(piece) for _ in ch.encode("utf-8"))
                pos += len(piece)
            return ids, starts
        if self._backend is not None:
            enc = self._backend.encode(text, add_special_tokens=False)
            return enc.ids, [start for start, _ in enc.offsets]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]

    def _render(self, record, where=None):
        """(pieces, ends_with_marker) of a record the chat template renders."""
        return self.renderer.pieces(record.messages, tools=record.tools, line=record.line,
                                    where=where or self.where)

    def _plain_refusal(self, record, where=None):
        """The error for a chat record when no template is chosen among the model's named
        ones, when a turn holds a special token's text (as with a template), or with tool
        calls when there is no template to render them."""
        import chat_render
        if record.messages is not None and self.renderer.named_only:
            names = self.renderer.named_only
            return chat_render.ChatRenderError(
                f"line {record.line}: chat records need a chat template, and the model has "
                f"named ones ({', '.join(names)}) with none marked default", where or self.where,
                f"Set `chat_template` in config.json to the one to train with (e.g. "
                f"\"{names[0]}\"), or to \"plain\" to train in the plain format on purpose, then "
                "queue the file again.", line=record.line)
        if record.messages is None:
            return None
        # the plain rendering reads a turn's text as text too: "<|im_end|>" in it would be
        # that token, trained as the model's own
        try:
            self.renderer.refuse_control_text(
                chat_render.template_messages(record.messages), record.line, where or self.where)
        except chat_render.ChatRenderError as exc:
            return exc
        if not (record.tools or any(m.get("role") == "tool" or chat_render.is_tool_call(m)
                                    for m in record.messages)):
            return None
        return chat_render.ChatRenderError(
            f"line {record.line}: tool calls and tool results need a chat template that renders "
            f"them, and chat records get {self.renderer.describe()}", where or self.where,
            "Set `chat_template` in config.json to a template with tool support (a named "
            "template of the model or a .jinja file, e.g. the model family's own), or train "
            "files without tool turns.", line=record.line)

    def pieces(self, record, where=None) -> tuple[list[tuple[str, bool]], str]:
        """The record as (text, trained) pieces, and the rendering used: what `show` prints."""
        if record.messages is not None and self.has_template:
            return self._render(record, where)[0], "template"
        refusal = self._plain_refusal(record, where)
        if refusal is not None:
            raise refusal
        return [(text, bool(trained)) for text, trained in record.segments], "plain"

    REFUSED_LISTED = 100  # refused records a file's refusal lists by line

    def check_file(self, data_path, limit: int | None = None, tick=None, **reading):
        """Render every chat record of a file once (no tokenizing; the first `limit` records
        only if given): the first ChatRenderError (naming the other refused records' lines,
        up to REFUSED_LISTED), or None. A file the template cannot
        render is refused before its first step (and by the daemon when it is queued).
        With `tick`, the records are rendered in a thread while this one calls `tick()`
        every CHECK_TICK_S (the daemon's heartbeat and requests: a big chat file, or one
        record of thousands of turns, takes minutes); a stop, pause or skip it returns ends
        the wait at once (None: the request is carried out before any step; the thread
        stops after the record it renders)."""
        if tick is None:
            return self._check_records(data_path, limit, threading.Event(), reading)
        stop, out = threading.Event(), {}

        def work():
            try:
                out["result"] = self._check_records(data_path, limit, stop, reading)
            except BaseException as exc:  # (raised in the caller's thread)
                out["error"] = exc
        worker = threading.Thread(target=work, name="check-records", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(CHECK_TICK_S)
            if worker.is_alive() and tick() in ("stop", "pause", "skip"):
                stop.set()
                return None
        if "error" in out:
            raise out["error"]
        return out.get("result")

    def _check_records(self, data_path, limit, stop: threading.Event, reading: dict):
        import itertools
        import validate_data
        records = validate_data.iter_records(Path(data_path), **reading)
        first, lines = None, []  # the first refusal, and every refused record's line
        for record in itertools.islice(records, limit):
            if stop.is_set():
                return None
            if record.messages is None:
                continue
            try:
                if self.has_template:
                    self._render(record, data_path)
                    continue
                refusal = self._plain_refusal(record, data_path)
                if refusal is None:
                    continue
            except GuardrailError as exc:
                refusal = exc
            if reading.get("skip_invalid") and _template_refusal(refusal):
                continue  # (as the training passes over it)
            first = first or refusal
            lines.append(getattr(refusal, "line", None) or record.line)
            if len(lines) > self.REFUSED_LISTED:
                break
        if first is not None and len(lines) > 1:  # all of them: not one per try of the file
            more = lines[1:self.REFUSED_LISTED]
            first.what += (f" (also refused: line{'s' if len(more) > 1 else ''} "
                           f"{', '.join(map(str, more))}"
                           + (", and more" if len(lines) > self.REFUSED_LISTED else "") + ")")
        return first

    def encode(self, record, where=None) -> tuple[list[int], list[int]]:
        ids, labels = self._encode(record, where)
        self.stats["text" if record.messages is None else self.rendering] += 1
        if self.max_length and len(ids) > self.max_length:
            self.stats["split"] += 1
        return ids, labels

    def _encode(self, record, where=None) -> tuple[list[int], list[int]]:
        if record.messages is not None and self.has_template:
            import chat_render
            ahead = self._rendered.pop(id(record), None) if where is None else None
            if ahead is not None and ahead[0] is record:  # rendered and tokenized ahead
                if isinstance(ahead[1], Exception):
                    raise ahead[1]
                pieces, ends_with_marker, ids, starts = ahead[1]
            else:
                pieces, ends_with_marker = self._render(record, where)
                ids, starts = self.ids_and_starts("".join(text for text, _ in pieces))
            labels = chat_render.label_pieces(pieces, ids, starts, all_trained=self.loss_on_prompt)
            if not ends_with_marker:  # the template ends the last turn with nothing: EOS stops it
                ids.append(self.eos_id)
                labels.append(self.eos_id)
            return ids, labels
        if (refusal := self._plain_refusal(record, where)) is not None:
            raise refusal
        pieces = [(text, bool(trained)) for text, trained in record.segments]
        ids: list[int] = []
        labels: list[int] = []
        any_trained = False
        for text, trained in pieces:
            part = self.ids(text)
            ids.extend(part)
            if trained or self.loss_on_prompt:
                labels.extend(part)
                any_trained = any_trained or bool(part)
            else:
                labels.extend([-100] * len(part))
        ids.append(self.eos_id)  # EOS between examples; learned when the example is learned
        labels.append(self.eos_id if any_trained else -100)
        return ids, labels


# --------------------------------------------------------------------------- packing

CHECK_TICK_S = 0.5  # Encoder.check_file: the daemon's heartbeat and requests, while it renders


def _template_refusal(exc: BaseException) -> bool:
    """A record the chat template refuses (a file queued with `add --skip-invalid` passes
    over it, as over an invalid line)."""
    import chat_render
    return isinstance(exc, chat_render.ChatRenderError)


class Row(NamedTuple):
    """One packed row: `ids`/`labels` of max_length, `tokens` new real tokens in it, the row
    indexes where a document (or the row's piece of one) `starts`, and `context`: 1 when
    ids[0] is the last token of the previous row, repeated so the record it continues has
    every token predicted once (a split example loses no target at the cut), else 0."""
    ids: list
    labels: list
    tokens: int
    starts: list
    context: int = 0


READ_AHEAD, READ_AHEAD_BYTES = 64, 1 << 20  # records PackedStream tokenizes in one batch


REFUSED_KEPT = 100  # lines of records passed over under skip_invalid that a file's result lists


class PackedStream:
    """Streams a data file into full `max_length` rows, EOS between examples, never dropping.

    Examples longer than a row continue in the next row, which repeats the last token of
    the previous one as context so every token is still a target exactly once; only the
    file's last row is padded (pad id, label -100). With `isolate` (pack_isolation) the
    first token of each document is not a target: nothing before it in the row is its
    context. Memory holds READ_AHEAD records (tokenized together: Encoder.tokenize_ahead)
    plus one row. `position()` is exact and compact: the
    leftover of the packing buffer is always a suffix of the last record read, so it is
    stored as (that record's offset and line, tokens already used) and rebuilt on resume
    by re-tokenizing that one record.
    """

    def __init__(self, data_path, encoder: Encoder, max_length: int, pad_id: int, *,
                 position: dict | None = None, isolate: bool = False, **reading):
        """`reading`: iter_records' keywords (validate_data.read_settings and skip_invalid)."""
        import validate_data
        self.encoder, self.max_length, self.pad_id, self.isolate = encoder, max_length, pad_id, isolate
        self.skip_refused = bool(reading.get("skip_invalid"))
        pos = dict(position or {})
        self.records = int(pos.get("records", 0))
        self.tokens = int(pos.get("tokens", 0))         # real tokens emitted in rows so far
        self.rec_offset = int(pos.get("record_offset", 0))
        self.rec_line = int(pos.get("record_line", 1))
        self.next_offset = int(pos.get("next_offset", 0))
        self.next_line = int(pos.get("next_line", 1))
        # the lines of records passed over under skip_invalid (the template refused them)
        self.refused_lines = [int(n) for n in pos.get("refused_lines") or []]
        self.rec_len, self.buf_ids, self.buf_labels = 0, [], []
        self._starts: list[int] = []  # buffer indexes where a record begins
        skip = int(pos.get("skip_tokens", 0))
        start_offset, start_line = self.next_offset, self.next_line
        if skip:
            start_offset, start_line = self.rec_offset, self.rec_line
        self._it = validate_data.iter_records(Path(data_path), start_offset=start_offset,
                                              start_line=start_line, **reading)
        self._ahead: collections.deque = collections.deque()  # records read, not yet packed
        self.exhausted = False
        self._pos = 0  # the next token to emit; buf[_pos - 1] stays as a continuing row's context
        if skip:  # rebuild the leftover buffer: the same record, minus the tokens already used
            record = next(self._it, None)
            if record is None or record.offset != self.rec_offset:
                raise GuardrailError("checkpoint position does not match the data file", data_path,
                                     "The file changed since the checkpoint; move the checkpoint "
                                     "aside to restart the file.")
            ids, labels = encoder.encode(record)
            if len(ids) < skip:
                raise GuardrailError("checkpoint position is past the end of its record", data_path,
                                     "The tokenizer changed since the checkpoint; move the "
                                     "checkpoint aside to restart the file.")
            self.rec_len = len(ids)
            self.buf_ids, self.buf_labels = ids[skip - 1:], labels[skip - 1:]
            self._pos = 1
            self.next_offset, self.next_line = record.next_offset, record.line + 1

    def _drop_emitted(self) -> None:
        """Forget the tokens already emitted, all but the last (a continuing row's context)."""
        cut = self._pos - 1
        if cut > 0:
            del self.buf_ids[:cut], self.buf_labels[:cut]
            self._starts = [s - cut for s in self._starts if s >= cut]
            self._pos = 1

    def _read_ahead(self) -> None:
        """The next READ_AHEAD records (at most READ_AHEAD_BYTES of lines), tokenized in one
        batch. What reading raises comes out in its place, after the records before it."""
        size = 0
        try:
            while len(self._ahead) < READ_AHEAD and size < READ_AHEAD_BYTES:
                record = next(self._it, None)
                self._ahead.append(record)
                if record is None:
                    break
                size += record.next_offset - record.offset
        except Exception as exc:  # (an invalid line: raised when the stream reaches it)
            self._ahead.append(exc)
        self.encoder.tokenize_ahead([r for r in self._ahead
                                     if r is not None and not isinstance(r, Exception)])

    def _pull(self) -> bool:
        if not self._ahead:
            self._read_ahead()
        record = self._ahead.popleft()
        if isinstance(record, Exception):
            raise record
        if record is None:
            self.exhausted = True
            return False
        try:
            ids, labels = self.encoder.encode(record)
        except GuardrailError as exc:
            if not (self.skip_refused and _template_refusal(exc)):
                raise
            self.encoder.stats["skipped_refused"] += 1  # passed over, as an invalid line is
            if len(self.refused_lines) < REFUSED_KEPT:
                self.refused_lines.append(record.line)
            self.next_offset, self.next_line = record.next_offset, record.line + 1
            return True
        self._drop_emitted()  # before growing the buffer
        self._starts.append(len(self.buf_ids))
        self.buf_ids.extend(ids)
        self.buf_labels.extend(labels)
        self.rec_offset, self.rec_line, self.rec_len = record.offset, record.line, len(ids)
        self.next_offset, self.next_line = record.next_offset, record.line + 1
        self.records += 1
        return True

    def next_row(self) -> Row | None:
        """The next row, or None at the end of the file."""
        L = self.max_length
        # a row that starts inside a record repeats the token before as context
        context = 1 if 0 < self._pos < len(self.buf_ids) and self._pos not in self._starts else 0
        while len(self.buf_ids) - self._pos < L - context and not self.exhausted:
            self._pull()
        n = min(L - context, len(self.buf_ids) - self._pos)
        if n <= 0:
            return None
        first, end = self._pos - context, self._pos + n
        ids = self.buf_ids[first:end]
        labels = self.buf_labels[first:end]
        starts = [0] + [s - first for s in self._starts if first < s < end]
        if self.isolate:  # the previous document is not this one's context: no target here
            for s in starts[1:]:
                labels[s] = -100
        self._pos = end
        if self._pos > 4 * L and self._pos * 2 > len(self.buf_ids):  # long record: compact now and then
            self._drop_emitted()
        self.tokens += n
        if len(ids) < L:  # the file's last row: pad it (causal attention never looks right, so no mask)
            ids += [self.pad_id] * (L - len(ids))
            labels += [-100] * (L - len(labels))
        return Row(ids, labels, n, starts, context)

    def position(self) -> dict:
        leftover = len(self.buf_ids) - self._pos
        pos = {"records": self.records, "tokens": self.tokens, "next_offset": self.next_offset,
               "next_line": self.next_line, "record_offset": self.rec_offset,
               "record_line": self.rec_line, "skip_tokens": 0, "leftover_tokens": leftover,
               "exhausted": self.exhausted and leftover == 0}
        if self.refused_lines:
            pos["refused_lines"] = list(self.refused_lines)
        if leftover:
            if leftover > self.rec_len:  # cannot happen: rows are cut only after a record is read
                raise RuntimeError("packing buffer spans more than one record")
            pos["skip_tokens"] = self.rec_len - leftover
        return pos


# --------------------------------------------------------------------------- document isolation

# How documents packed in one row are kept apart (pack_isolation; docs/design.md, Training):
#   position_ids  positions restart at each document; transformers turns that into a
#                 block-diagonal causal mask (sdpa, eager, flex) or varlen flash-attention
#   mask          the model ignored that: an explicit 4D block-diagonal mask instead
#   shared        the model honoured neither: documents in a row see each other, as before
#                 pack_isolation (the first token of each document is still not a target)
#   off           pack_isolation is false in config.json
ISOLATION_TOLERANCE = 1e-4  # float32 logits of a document, packed vs alone


def model_inputs(rows, mode: str, device=None) -> dict:
    """The forward's keyword arguments for `rows`: input_ids, and where a row packs several
    documents and `mode` isolates them, position_ids restarting at each (plus the 4D mask
    in "mask" mode). Rows of one document each need neither: plain causal attention."""
    inputs = {"input_ids": long_tensor([r.ids for r in rows]), "use_cache": False}  # with a cache,
    if mode in ("position_ids", "mask") and any(len(r.starts) > 1 for r in rows):  # transformers ignores packing
        import numpy as np
        start_of = np.zeros((len(rows), len(rows[0].ids)), dtype=np.int64)
        for b, r in enumerate(rows):  # each position's document start (a row's first is 0)
            start_of[b, r.starts] = r.starts
        np.maximum.accumulate(start_of, axis=1, out=start_of)
        inputs["position_ids"] = torch.from_numpy(np.arange(start_of.shape[1]) - start_of)
        if mode == "mask":
            B, L = inputs["input_ids"].shape
            doc = (inputs["position_ids"] == 0).long().cumsum(1)
            allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
            inputs["attention_mask"] = torch.zeros(B, 1, L, L).masked_fill(
                ~allowed[:, None], torch.finfo(torch.float32).min)
    if device is not None and device.type != "cpu":
        inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
    return inputs


def long_tensor(rows: list[list[int]]):
    """A (rows x length) int64 tensor from equal-length lists: through numpy, ~3x faster
    than torch.tensor on nested lists (8 x 256: 38 against 124 us)."""
    import numpy as np
    return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), -1))


def _isolation_gap(model, mode: str) -> float:
    """Largest difference between the logits of a document packed after another and alone."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    a = [(7 * i + 3) % vocab for i in range(7)]
    b = [(5 * i + 11) % vocab for i in range(9)]
    packed = Row(a + b, [-100] * 16, 16, [0, len(a)])
    alone = Row(b, [-100] * 9, 9, [0])
    with torch.no_grad():
        got = model(**model_inputs([packed], mode, device)).logits[0, len(a):]
        want = model(**model_inputs([alone], mode, device)).logits[0]
    return float((got.float() - want.float()).abs().max())


ISOLATION_CACHE = Path(".index") / "isolation.json"  # in the root: probe answers by model kind
ISOLATION_PROBE = 1  # in the key: a change to the probe (or its tolerance) asks again
_ISOLATION_SEEN: dict[str, tuple[str, str]] = {}       # the same, for this process


def packing_isolation(model, config: dict, root=None) -> tuple[str, str]:
    """The isolation mode this model honours (see above) and a line saying so, checked on
    two tiny documents: the second's logits packed after the first must equal its logits
    alone. Runs in eval mode without gradients: no dropout, no RNG drawn (exact resume).

    The answer depends on the modeling code and the model's config, not on its weights, so
    it is probed once per kind of model (_isolation_key) and kept, in this process and in
    ROOT/.index/isolation.json when `root` is given: a probe is two to four forward passes
    over all the weights (a 1 GB model: a few tenths of a second of each load)."""
    if not config.get("pack_isolation", True):
        return "off", "pack_isolation is off: documents in a row attend to each other"
    known = getattr(model, "guardrails_isolation", None)  # probed already (a model kept in memory)
    if known is not None:
        return known
    key = _isolation_key(model)
    found = _ISOLATION_SEEN.get(key) or _kept_isolation(root, key)
    if found is None:
        failed: list = []
        found = _probe_isolation(model, failed)
        if not failed:  # a mode that raised (out of memory, ...) may pass next time: not kept
            _keep_isolation(root, key, found)
            _ISOLATION_SEEN[key] = found
    model.guardrails_isolation = found
    return found


def _isolation_key(model) -> str:
    """What the probe's answer depends on: the model's classes, its config (the attention
    implementation included; not the folder it came from), transformers' and torch's
    versions, and the weights' device and dtype."""
    import transformers
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    first = next(model.parameters())
    described = [ISOLATION_PROBE, [f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()][:4],
                 config, getattr(model.config, "_attn_implementation", None),
                 transformers.__version__, torch.__version__, first.device.type, str(first.dtype)]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _isolation_cache(root) -> dict:
    try:  # damaged or unreadable: probed again, and written anew
        kept = read_json(Path(root) / ISOLATION_CACHE, default=None)
    except GuardrailError:
        return {}
    return kept if isinstance(kept, dict) else {}


def _kept_isolation(root, key: str) -> tuple[str, str] | None:
    if root is None:
        return None
    entry = _isolation_cache(root).get(key)
    if (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("position_ids", "mask", "shared")
            and isinstance(entry[1], str)):
        return entry[0], entry[1]
    return None


def _keep_isolation(root, key: str, found: tuple[str, str]) -> None:
    if root is None:
        return
    path = Path(root) / ISOLATION_CACHE
    kept = dict(list(_isolation_cache(root).items())[-31:] + [(key, list(found))])  # a few kinds at most
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write_json(path, kept)
    except OSError as exc:  # a cache: the next load probes again
        log.info("pack_isolation: could not keep the probe's answer in %s: %s", path, exc)


def _probe_isolation(model, failed: list | None = None) -> tuple[str, str]:
    """The probe itself; each mode that raised is appended to `failed`."""
    was_training = model.training
    model.eval()
    try:
        gaps = {}
        for mode in ("position_ids", "mask"):
            try:
                gaps[mode] = _isolation_gap(model, mode)
            except Exception as exc:  # an architecture that refuses the argument: try the next
                log.info("pack_isolation: %s mode failed on this model: %s", mode, exc)
                if failed is not None:
                    failed.append(mode)
                continue
            if gaps[mode] <= ISOLATION_TOLERANCE:
                return mode, f"documents isolated by {mode} (probe gap {gaps[mode]:.1e})"
    finally:
        model.train(was_training)
    return "shared", ("pack_isolation: this model honours neither restarted position_ids nor a "
                      f"4D mask (probe gaps {gaps}); documents in a row attend to each other, "
                      "and the first token of each is still not a target")


# logits elements per piece of the loss: 64 MB of float32 at a time on a CPU, 256 MB on a
# GPU (fewer, larger kernels: its time is launches, and its memory is larger)
LOSS_CHUNK = {"cpu": 1 << 24, "gpu": 1 << 26}


def next_token_loss(logits, labels):
    """Summed next-token cross-entropy over the trained positions (labels -100 are not).
    The labels shift, not the logits (no copy of the largest tensor), and no float32 copy
    of the logits is ever whole: see _ChunkedCrossEntropy."""
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), target)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy summed over rows of `flat` (positions x vocabulary), its gradient made
    in the forward pass, LOSS_CHUNK elements at a time, in float32 whatever the logits'
    dtype, and kept in that dtype.

    Why: with a 151k vocabulary the logits are the largest tensors of a step (1.2 GB of
    float32 at B=8, L=256). The plain cross_entropy keeps a float32 log-softmax of them for
    the backward and makes a float32 gradient; on bf16 logits it first widens them to a
    float32 copy. Here what outlives the forward is the gradient, in the logits' dtype, and
    the float32 work is one chunk at a time (bench/bench_loss.py: the peak beyond logits
    and gradient drops from ~1-2 GB to one chunk's). No device sync either (untrained
    positions are masked, not selected)."""

    @staticmethod
    def forward(ctx, flat, target):
        chunk = LOSS_CHUNK["cpu" if flat.device.type == "cpu" else "gpu"]
        rows = max(1, chunk // max(1, flat.shape[1]))
        grad = torch.empty_like(flat)
        total = flat.new_zeros((), dtype=torch.float32)
        for i in range(0, flat.shape[0], rows):
            t = target[i:i + rows]
            trained = (t != -100).unsqueeze(1)
            t = t.clamp(min=0).unsqueeze(1)
            logp = torch.log_softmax(flat[i:i + rows].float(), dim=-1)
            total = total - logp.gather(1, t).masked_fill(~trained, 0).sum()
            part = logp.exp_()  # softmax, minus one at the target: d(loss)/d(logits)
            part.scatter_add_(1, t, -trained.to(part.dtype))
            torch.mul(part, trained, out=grad[i:i + rows])  # positions not trained: no gradient
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad, ctx.grad = ctx.grad, None  # one backward per step (the graph is never kept)
        return grad.mul_(grad_total), None


def shard_rows(rows: list, rank: int, world_size: int) -> list:
    """The rows this rank trains: every world_size-th, so each packed row is trained once."""
    return rows[rank::world_size] if world_size > 1 else rows


# --------------------------------------------------------------------------- schedule

def lr_at(step: int, config: dict, *, warmup_from: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of the whole run: a function of the
    global step only, so it continues exactly across files and resumes. `warmup_from`
    (current_model's trainer_state.json `warmup_from_step`, written by a consolidate that
    reset the optimizer) ramps it again over warmup_steps from that step."""
    base = float(config["learning_rate"])
    warmup = int(config.get("warmup_steps", 0))
    if warmup_from is not None and warmup and warmup_from <= step < warmup_from + warmup:
        return lr_at(step, config) * (step - warmup_from + 1) / warmup
    name = config.get("lr_schedule", "constant_with_warmup")
    if name == "constant":
        return base
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if name == "cosine_with_restarts":
        cycle = max(1, int(config.get("cosine_cycle_steps", 1000)))
        t = ((step - warmup) % cycle) / cycle
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    return base


# --------------------------------------------------------------------------- weights files

# The dtypes a base model's config.json may name; the engine trains float32 master weights
# whatever it says, and publishes current_model (and so every version) in it.
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
                       torch.float16: "F16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def base_dtype(model_dir) -> torch.dtype:
    """The dtype a model folder's config.json names (`dtype`; `torch_dtype` before
    transformers 5); float32 when it names none or one the engine does not publish in."""
    try:
        cfg = read_json(Path(model_dir) / "config.json", default={}) or {}
    except GuardrailError as exc:  # from_pretrained has read it already: say, do not fail
        log.warning("reading the dtype of %s: %s; publishing float32", model_dir, exc)
        cfg = {}
    name = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return BASE_DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32


def saved_tensors(model) -> tuple[dict, bool]:
    """The tensors save_pretrained writes (tied weights once, under the name it keeps), and
    whether a publish writes exactly these (no keys ignored on save, no weight-name
    conversion): then an fp32 checkpoint's weights file is byte for byte the published one."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    model = _unwrap(model)
    tensors = remove_tied_weights_from_state_dict(model.state_dict(), model)
    ignored = [k for k in getattr(model, "_keys_to_ignore_on_save", None) or () if k in tensors]
    published = revert_weight_conversion(model, dict(tensors))
    same = (not ignored and published.keys() == tensors.keys()
            and all(published[k] is tensors[k] for k in tensors))
    return tensors, same


def published_tensors(model) -> dict:
    """What save_pretrained writes as the model's weights: saved_tensors less the keys the
    model ignores on save, under the names it was loaded from (revert_weight_conversion)."""
    from transformers.core_model_loading import revert_weight_conversion
    model = _unwrap(model)
    tensors, same = saved_tensors(model)
    if same:
        return tensors
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        tensors.pop(key, None)
    return revert_weight_conversion(model, tensors)


def _safetensors_layout(tensors: dict, dtype=None, keep=frozenset(), metadata: dict | None = None,
                        where=None) -> tuple[bytes, list, int]:
    """(the file's head: length and JSON header, [(name, tensor, dtype written)] in the
    file's order, its size) of the safetensors file write_safetensors writes at `where`."""
    items = []
    for name, t in tensors.items():
        out = dtype if dtype is not None and t.is_floating_point() and name not in keep else t.dtype
        if out not in _SAFETENSORS_DTYPES:
            raise GuardrailError(f"tensor {name} has dtype {out}, which the engine cannot save",
                                 where, "Report this model type; train a model whose weights are "
                                 "float32, bfloat16 or float16.")
        items.append((name, t, out))
    items.sort(key=lambda x: (-x[2].itemsize, x[0]))
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, t, out in items:
        size = t.numel() * out.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[out], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    head = struct.pack("<Q", len(raw)) + raw
    return head, items, len(head) + offset


def _tensor_bytes(t, out):
    """The bytes of `t` as written in dtype `out`: a view of it when it is already a CPU
    tensor of that dtype, else a cast copy."""
    return t.detach().to("cpu", out).contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(path, tensors: dict, dtype=None, *, hashing: bool = True,
                      keep=frozenset(), metadata: dict | None = None, over: bool = False,
                      kept: bool = False, uncached: bool = False) -> dict:
    """Write `tensors` as a new safetensors file, each floating one (but those named in
    `keep`) cast to `dtype` when it is written (one tensor at a time: never a second copy of
    the whole model in memory). `over`: a file already at `path` (a spare's, see _SPARE)
    is written over in place and cut to the new size. `kept`: a file no checkpoint will write
    over (published weights: the versions keep them), written around the page cache
    (_DirectWriter) when it is DIRECT_MIN bytes or more and the filesystem allows it; the
    others go through it, and a later checkpoint writes over their cached pages in place
    (a spare written around it made the next write take new pages: 100 MB model, 0.39-0.44 s
    against 0.09-0.13 s per checkpoint). `uncached`: a checkpoint file written over a spare's
    goes around the page cache too where it has no cached pages to write over: a new file
    (a new page per 4 KB, which this VM takes from its host), or a spare's written so and not
    read back since; `warm_later` reads such files into the cache (see _UNCACHED).
    Returns {size, sha256} (sha256 of the bytes as written, without reading them back; None
    unless `hashing`). Byte for byte what safetensors' save_file writes for the same tensors."""
    layout = _safetensors_layout(tensors, dtype, keep, metadata, path)
    f, direct = _open_new(path, over, direct=kept and layout[2] >= DIRECT_MIN,
                          uncached=uncached and layout[2] >= DIRECT_MIN)
    if direct:
        st = os.fstat(f.fileno())
        try:
            written = _write_layout(f, _DirectWriter, layout, hashing)
            if not kept:  # a checkpoint's own: read into the cache later (warm_later)
                _UNCACHED.add((st.st_dev, st.st_ino))
            return written
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("%s: O_DIRECT writes refused (%s); writing through the page cache", path, exc)
            os.unlink(path)  # a new file or a spare's, half written
            f = open(path, "xb")
    return _write_layout(f, _PageWriter, layout, hashing)


def _write_layout(f, writer, layout: tuple, hashing: bool) -> dict:
    head, items, size = layout
    digest = hashlib.sha256() if hashing else None
    hashed = None  # the previous tensor's hash, in a thread beside this one's write (both free the GIL)
    with f, writer(f) as out, concurrent.futures.ThreadPoolExecutor(1) as pool:
        out.write(head)
        if digest:
            digest.update(head)
        for _name, t, dt in items:
            data = _tensor_bytes(t, dt)
            out.write(data)
            if digest:
                if hashed is not None:
                    hashed.result()  # in order, and at most two tensors' bytes held at once
                hashed = pool.submit(digest.update, data)
        if hashed is not None:
            hashed.result()
        out.close()
        f.truncate(size)  # a spare's file longer than this one (another model's) ends here
    return {"size": size, "sha256": digest.hexdigest() if digest else None}


def safetensors_sha256(tensors: dict, dtype=None, *, keep=frozenset(),
                       metadata: dict | None = None) -> str:
    """The sha256 of the file write_safetensors writes for the same arguments, hashed from
    memory: in a thread while that file (and more) is written, it takes the hash off the
    writes' path (1 GB of fp32 weights: ~0.5 s of hashing, as long as the writes of the
    whole checkpoint on this machine's 2 cores)."""
    head, items, _size = _safetensors_layout(tensors, dtype, keep, metadata)
    digest = hashlib.sha256(head)
    for _name, t, out in items:
        digest.update(_tensor_bytes(t, out))
    return digest.hexdigest()


class _PageWriter:
    """Writes to `f` in whole pages: each write starts on a page and covers whole pages,
    the bytes of a tensor's last partial page carried into the next write. Written over a
    spare file whose pages are not cached (evicted, or after a restart), a write ending
    inside a page made the kernel read that page from the disk first (read-modify-write),
    once per tensor: a 100 MB model's checkpoint took 0.155 s against 0.100 s with those
    pages cached."""

    PAGE = 4096
    KICK = 8 << 20  # written bytes whose write-out to the disk is started (_start_writeback)

    def __init__(self, f):
        self.f, self.tail = f, bytearray()
        self.pos = self.kicked = 0  # bytes written, and those whose write-out was started

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self.tail:
            fill = min(len(view), self.PAGE - len(self.tail))
            self.tail += view[:fill]
            view = view[fill:]
            if len(self.tail) < self.PAGE:
                return
            self._put(self.tail)
            self.tail = bytearray()
        whole = len(view) - len(view) % self.PAGE
        if whole:
            self._put(view[:whole])
        self.tail += view[whole:]

    def _put(self, data) -> None:
        self.f.write(data)
        self.pos += len(data)
        # up to a 2 MB boundary only: the page cache keeps a file in folios of up to 2 MB,
        # and a folio written out before its last bytes came was written twice (+10%)
        end = self.pos - self.pos % (2 << 20)
        if end - self.kicked >= self.KICK:
            self.f.flush()
            _start_writeback(self.f.fileno(), self.kicked, end - self.kicked)
            self.kicked = end

    def close(self) -> None:
        if self.tail:
            self.f.write(self.tail)
            self.tail = bytearray()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these bytes of `fd` from the page cache to the disk now, without
    waiting (sync_file_range, Linux): the fsync after the file's last write then waits for
    the rest only, while the writes go on beside it. 208 MB written over cached pages, then
    fsynced: 49-53 ms with a start every 8-16 MB, against 69-76 ms (medians of 6,
    alternating). Elsewhere, or where the call fails, nothing (the fsync writes them all)."""
    if _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE[0](fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; its errors: the fsync's


def _sync_file_range() -> list:
    """[libc's sync_file_range] on Linux, else []."""
    if not sys.platform.startswith("linux"):
        return []
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return []
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return [fn]


_SYNC_FILE_RANGE = _sync_file_range()


DIRECT_MIN = 64 << 20


class _DirectWriter:
    """Writes a new file with O_DIRECT: the bytes are copied into one of two page-aligned
    buffers while a thread writes the other to the disk, never taking page-cache pages. A new
    file written through the page cache takes a new page per 4 KB; on this VM, which hands
    free memory back to its host, that ran at 2.9-3.4 s per GB, against 0.62-0.70 s per GB
    with O_DIRECT (1 GB files, alternating). The last buffer is written padded to whole
    pages, and the caller cuts the file to its size."""

    CHUNK = 8 << 20
    _free: list = []  # buffers kept for the next file (mapped pages: not taken again)
    _lock = threading.Lock()

    def __init__(self, f):
        self.fd = f.fileno()
        self.bufs = [self._buffer() for _ in range(2)]
        self.fill, self.pending = 0, None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="direct-write")

    def _buffer(self):
        import mmap
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == self.CHUNK:  # (one of another size is let go)
                    return buf
        return mmap.mmap(-1, self.CHUNK)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.pending is not None and not exc[0]:
                self.pending.result()
        finally:
            self.pool.shutdown(wait=True)  # no write of a buffer still going when it is reused
            with self._lock:
                self._free.extend(self.bufs)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.CHUNK - self.fill)
            self.bufs[0][self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)

    def _flush(self, n: int) -> None:
        if self.pending is not None:
            self.pending.result()  # the other buffer is free again
        self.pending = self.pool.submit(self._write_all, memoryview(self.bufs[0])[:n])
        self.bufs.reverse()
        self.fill = 0

    def _write_all(self, view) -> None:
        while len(view):
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        if self.fill:
            pad = -self.fill % _PageWriter.PAGE
            self.bufs[0][self.fill:self.fill + pad] = bytes(pad)
            self._flush(self.fill + pad)
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def _open_new(path: Path, over: bool, direct: bool = False, uncached: bool = False):
    """(`path` open for writing, whether with O_DIRECT): a new file, or (`over`) the file
    there written over in place, only while no other name links it (a version's or
    current_model's weights never). `direct`: opened with O_DIRECT where the filesystem
    takes it (a spare's weights of an fp32 base were written so: not cached either);
    `uncached`: so too, where it is a new file or one in _UNCACHED."""
    if over:
        try:
            f = open(path, "r+b")
        except (FileNotFoundError, PermissionError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # read-only: this name goes, a new file takes it
        else:
            st = os.fstat(f.fileno())
            if st.st_nlink == 1:
                g = _open_direct(path, os.O_WRONLY) if direct or (
                    uncached and (st.st_dev, st.st_ino) in _UNCACHED) else None
                if g is None:
                    return f, False
                f.close()
                return g, True
            f.close()
            os.unlink(path)  # linked elsewhere: this name goes, the other keeps its bytes
    g = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL) if direct or uncached else None
    return (g, True) if g is not None else (open(path, "xb"), False)


def _open_direct(path: Path, flags: int):
    """`path` opened with O_DIRECT and `flags`, or None where the filesystem refuses it
    (tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o666)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None
    return os.fdopen(fd, "wb", buffering=0)  # (no truncation: the caller cuts it to size)


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_SCHEMA = 1
ADAPTER_CKPT = "adapter.safetensors"  # adapter mode: the trainable tensors, instead of model.safetensors
OPTIMIZER_CKPT = "optimizer.safetensors"  # AdamW's state (optimizer.pt, torch.save, before it)
OPTIMIZER_META = "guardrails.optimizer"   # its header's metadata key: param groups, scaler


def _checkpoint_rank(dm: tuple[Path, dict]) -> tuple:
    """Newest is the highest `seq` (max + 1 per root at each save), never the wall clock
    (NTP or a VM resume steps it back) nor the step alone (a rollback lowers steps); one
    written before `seq` existed ranks below every one with it, by its step."""
    d, meta = dm
    seq, step = meta.get("seq"), meta.get("global_step")
    if isinstance(seq, int) and not isinstance(seq, bool):
        return (1, seq, 0, d.name)
    return (0, 0, step if isinstance(step, int) and not isinstance(step, bool) else -1, d.name)


def next_checkpoint_seq(root) -> int:
    """The `seq` of the next checkpoint: one above every checkpoint's in the root."""
    ckpts = list_checkpoints(root)
    return ckpts[0][1]["seq"] + 1 if ckpts and _checkpoint_rank(ckpts[0])[0] else 1


def list_checkpoints(root) -> list[tuple[Path, dict]]:
    """Complete checkpoints, newest first: by `seq`, not by time nor step (_checkpoint_rank)."""
    folder = Paths(root).checkpoints
    found = []
    if folder.is_dir():
        for d in folder.iterdir():
            if not d.name.startswith("checkpoint-") or not (d / "meta.json").is_file():
                continue
            try:
                meta = read_json(d / "meta.json")
            except GuardrailError as exc:
                log.warning("ignoring unreadable checkpoint %s: %s", d, exc)
                continue
            found.append((d, meta))
    found.sort(key=_checkpoint_rank, reverse=True)
    return found


def save_checkpoint(root, model, optimizer, meta: dict, *, scaler=None, keep: int = 2) -> Path:
    """Write a checkpoint into .staging, fsync it, rename it into checkpoints/, prune old ones.
    Its model.safetensors holds the fp32 master weights under save_pretrained's names."""
    p = Paths(root)
    p.staging.mkdir(parents=True, exist_ok=True)
    p.checkpoints.mkdir(parents=True, exist_ok=True)
    # created_at/created_ns are for people; the order is `seq` (one trainer per root: the engine lock)
    meta = dict(meta, schema_version=CHECKPOINT_SCHEMA, created_at=utc_now(), created_ns=time.time_ns(),
                seq=next_checkpoint_seq(root))
    _stop_warming()
    stage = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=p.staging))
    try:
        _reuse_spare(stage)  # a pruned checkpoint's big files, written over (see _SPARE)

        def save_optimizer():  # in staging: never over a file we need
            _save_optimizer(stage / OPTIMIZER_CKPT, optimizer, scaler)

        if lora_mode.is_peft(_unwrap(model)):  # the adapter alone: a few MB, the base is immutable
            lora_mode.save_weights(_unwrap(model), stage / ADAPTER_CKPT)
            save_optimizer()
        else:
            tensors, linkable = saved_tensors(model)
            # linkable: the very bytes save_pretrained would write; with an fp32 base the
            # publish links them (the versions keep them), so their sha256 (the manifest's) is
            # hashed from memory in a thread (another base's publish writes its own cast: no
            # hash), and they are written around the page cache (`kept`) in a thread while
            # AdamW's state goes over the spare's cached pages: 1 GB of fp32 weights, 3.25 GB
            # in all, 0.78-0.93 s against 1.04-1.16 s one after the other, and 1.9-2.4 s
            # through the page cache. Another base's weights go over the spare's, then AdamW's.
            linked = linkable and getattr(_unwrap(model), "guardrails_base_dtype",
                                          torch.float32) == torch.float32
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                digest = pool.submit(safetensors_sha256, tensors) if linked else None
                weights = pool.submit(write_safetensors, stage / "model.safetensors", tensors,
                                      hashing=False, over=True, kept=linked, uncached=True)
                if not linked:
                    weights.result()
                save_optimizer()
                weights = weights.result()
                if digest:
                    weights["sha256"] = digest.result()
            meta["weights"] = {"model.safetensors": dict(weights, dtype="float32", linkable=linkable)}
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        with open(stage / "rng.pt", "wb") as f:  # (torch.save on a path raises RuntimeError
            f.write(_torch_bytes(rng))              # for a refused write: here it is an OSError)
        atomic_write_json(stage / "meta.json", meta)
        fsync_tree(stage)
        final = p.checkpoints / f"checkpoint-{meta['global_step']:08d}"
        if os.path.lexists(final):  # same step again (end of file, or a rolled-back lineage)
            try:
                exchange_paths(stage, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                    raise
                log.info("renameat2 exchange unavailable (%s): replacing %s in two renames",
                         exc, final.name)
                old = Path(tempfile.mkdtemp(prefix=retention.SPARE_PREFIX, dir=p.staging))
                os.rename(final, old / final.name)
                os.rename(stage, final)
                fsync_dir(p.checkpoints)  # or after a power cut the old one may be back
                shutil.rmtree(old, ignore_errors=True)
        else:
            rename_noreplace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    _TO_WARM.extend(final / name for name in retention.SPARE_FILES)  # with start_deletions
    prune_checkpoints(root, keep)
    return final


def warm_later(files: list[Path]) -> None:
    """Read those of `files` in _UNCACHED into the page cache, in a thread of low priority:
    the next load from disk reads them from memory, and once one is the spare a checkpoint
    writes over its cached pages in place, the fastest write here (208 MB: over cached pages
    0.12-0.18 s, around the cache 0.19-0.24 s, through it over uncached pages 0.5-1.3 s; a
    new file around the cache 0.21-0.30 s against 0.9-1.3 s through it: this VM takes each
    new page from its host). The next checkpoint stops a read not done (its file stays in
    _UNCACHED, so it is written around the cache again)."""
    todo = []
    for f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            if (st.st_dev, st.st_ino) in _UNCACHED:
                todo.append((f, (st.st_dev, st.st_ino)))
    if not todo:
        return
    stop = threading.Event()

    def work():
        with contextlib.suppress(OSError):  # this thread only (Linux): the step's threads come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        buf = bytearray(8 << 20)
        for f, key in todo:
            with contextlib.suppress(OSError), open(f, "rb", buffering=0) as src:
                while not stop.is_set() and src.readinto(buf):
                    pass
                if not stop.is_set():
                    _UNCACHED.discard(key)
    _WARMING.append(stop)
    threading.Thread(target=work, name="warm-checkpoint", daemon=True).start()


# Checkpoint files (device, inode) written around the page cache and not read back since.
_UNCACHED: set[tuple[int, int]] = set()
_TO_WARM: list[Path] = []  # checkpoint files to warm_later once the file's writes are done
_WARMING: list[threading.Event] = []  # warm_later's reads going on: the next checkpoint stops them


def _stop_warming() -> None:
    """The next checkpoint's writes do not share the disk with a read for a later one."""
    while _WARMING:
        _WARMING.pop().set()


def _torch_bytes(obj) -> bytes:
    """`obj` as torch.save writes it (a small one: the RNG states)."""
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _save_optimizer(path: Path, optimizer, scaler=None) -> None:
    """The optimizer's state as safetensors (AdamW's moments are twice the fp32 weights: a
    plain sequential write, ~1.6x faster than torch.save's zip at 2 GB, and read back by
    mmap): tensors named `state.<param index>.<key>`, the rest (param groups, non-tensor
    state, the fp16 scaler) as JSON in the header's metadata."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                other[f"{idx}.{key}"] = value
    extra = {"param_groups": sd["param_groups"], "state": other,
             "scaler": scaler.state_dict() if scaler is not None else None}
    write_safetensors(path, tensors, hashing=False, metadata={OPTIMIZER_META: json.dumps(extra)},
                      over=True, uncached=True)


def _read_optimizer(ckpt: Path) -> tuple[dict, dict | None]:
    """(optimizer state_dict, scaler state_dict or None) of a checkpoint: optimizer.safetensors,
    or the optimizer.pt of a checkpoint written before it."""
    path = ckpt / OPTIMIZER_CKPT
    if not path.exists() and (ckpt / "optimizer.pt").exists():
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        return opt["optimizer"], opt.get("scaler")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        extra = json.loads((f.metadata() or {})[OPTIMIZER_META])
        state: dict[int, dict] = {}
        for name in f.keys():
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = f.get_tensor(name)
    for name, value in extra["state"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": extra["param_groups"]}, extra.get("scaler")


STAGING_PREFIXES = ("checkpoint-", retention.SPARE_PREFIX, "model-")  # ROOT/.staging/: the engine's


def clean_staging(root) -> list[str]:
    """Remove what a killed engine left in `.staging/` (a half-written checkpoint or model:
    gigabytes on a real model). Only the engine writes these names, and one engine trains a
    root at a time (the engine lock), so any found when a file starts are leftovers; but
    one pruned checkpoint (`old-checkpoint-*`) is kept as the spare the next checkpoint is
    written over (_SPARE), when this process holds none."""
    _wait_for_deletions()
    p = Paths(root)
    removed = []
    try:
        names = os.listdir(p.staging)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    spare = {f.name for f in _live_spare()}  # this process's, kept on purpose
    for name in sorted(names, reverse=True):  # mkdtemp names: no order; any spare will do
        path = p.staging / name
        if name.startswith(retention.SPARE_PREFIX) and not _SPARE and path.is_dir() \
                and not path.is_symlink():  # a pruned one the last process kept as its spare
            _SPARE.append(path)
            continue
        if name.startswith(STAGING_PREFIXES) and name not in spare and path.is_dir() \
                and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d leftover(s) of a killed run from %s: %s", len(removed), p.staging,
                 ", ".join(sorted(removed)))
    return removed


GATE_PIN = ".gate-pin"  # eval_gate.PIN: the pre-file checkpoint a held file may need again


def prune_checkpoints(root, keep: int) -> list[str]:
    """Keep the newest `keep` checkpoints plus the newest end-of-file one (optimizer carry)."""
    p = Paths(root)
    ckpts = list_checkpoints(root)
    keepers = {d for d, _ in ckpts[:max(1, keep)]}
    keepers |= {d for d, _ in ckpts if (d / GATE_PIN).exists()}  # eval_gate: until decided
    for d, meta in ckpts:
        if meta.get("complete"):
            keepers.add(d)
            break
    removed, trash = [], []
    for d, _ in ckpts:
        if d in keepers:
            continue
        trash.append(Path(tempfile.mkdtemp(prefix=retention.SPARE_PREFIX, dir=p.staging)))
        os.rename(d, trash[-1] / d.name)  # out of checkpoints/ in one step, then delete at leisure
        removed.append(d.name)
    if trash:  # durable first: a half-deleted checkpoint must never come back after a power cut
        fsync_dir(p.checkpoints)
        _delete_later(trash)
    return removed


_TRASH: list[Path] = []   # old checkpoints moved into .staging/, to remove
_DELETING: list = []      # the threads removing them
# One pruned checkpoint (its folder in .staging/) whose weights and optimizer files the
# next checkpoint is written over, in place, while files come one after another: freeing
# a checkpoint's gigabytes and allocating them again per file cost more than writing them
# (on a disk mounted with `discard`, each fsync for ~2 s after 3 GB were freed: at 1 GB of
# weights the daemon's checkpoint took 6-9 s against 4-6 s written over). Kept through idle
# spells and restarts (counted in max_disk_gb); deleted before anything is pruned to make
# room, and by the idle daemon when the disk runs short (retention.release_spare, from any
# process between files); a file linked elsewhere is never written over.
_SPARE: list[Path] = []
assert OPTIMIZER_CKPT in retention.SPARE_FILES


def _live_spare() -> list[Path]:
    """_SPARE, less a folder another process deleted (retention.release_spare)."""
    _SPARE[:] = [f for f in _SPARE if f.is_dir()]
    return _SPARE


def _delete_later(folders: list[Path]) -> None:
    """Folders already moved into .staging/: the newest becomes the spare (while none is
    kept), the rest are removed by `start_deletions` in a thread: freeing a checkpoint's
    gigabytes took ~1.5 s per 3 GB here, nothing waits for it, and it is started after the
    file's writes (its journal traffic slowed the publish's fsyncs ~1 s). clean_staging
    waits for them first, and removes what a killed process left."""
    for folder in folders:
        (_TRASH if _live_spare() else _SPARE).append(folder)


def _spare_files() -> list[Path]:
    """This process's spare's files that a checkpoint may be written over, or []."""
    return retention.spare_files(_SPARE)


def spare_bytes() -> int:
    """Bytes the next checkpoint will write over instead of taking from the free space."""
    return retention.files_size(_spare_files())


def _reuse_spare(stage: Path) -> None:
    """Move the spare's big files into `stage` to be written over (a spare of this root's
    .staging/ only); what is left of its folder is deleted later."""
    for f in _spare_files():
        if f.parent.parent.parent == stage.parent:
            with contextlib.suppress(OSError):
                os.rename(f, stage / f.name)
    _TRASH.extend(_SPARE)
    _SPARE.clear()


def release_spare() -> None:
    """Delete this process's spare (its disk space goes back)."""
    _TRASH.extend(_SPARE)
    _SPARE.clear()
    start_deletions()


def start_deletions() -> None:
    """Remove the checkpoints pruned (_TRASH) and read into the cache the checkpoint files
    written around it (_TO_WARM), each in a thread, once a file's writes are done (both
    slowed the publish's fsyncs when they shared the disk with them)."""
    if _TO_WARM:
        warm_later(list(_TO_WARM))
        _TO_WARM.clear()
    if not _TRASH:
        return
    folders = list(_TRASH)
    _TRASH.clear()

    def work():
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    thread = threading.Thread(target=work, name="delete-old-checkpoints", daemon=True)
    thread.start()
    _DELETING.append(thread)


def _wait_for_deletions() -> None:
    start_deletions()
    while _DELETING:
        _DELETING.pop().join()


def _load_checkpoint(ckpt: Path, model, optimizer, scaler=None) -> None:
    from safetensors.torch import load_model
    if lora_mode.is_peft(_unwrap(model)):
        lora_mode.load_weights(_unwrap(model), ckpt / ADAPTER_CKPT)
    else:
        load_model(_unwrap(model), str(ckpt / "model.safetensors"), strict=True)
    _load_optimizer(ckpt, optimizer, scaler)
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    random.setstate(_as_tuple(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def adamw(params, **kwargs):
    """torch's AdamW, fused where this build has the kernel for the parameters' device (CPU
    and CUDA): one kernel per step in place of a dozen ops per tensor and a temporary of
    each weight's size (270M parameters on this VM's 2 cores: 0.08-0.11 s a step against
    0.63-0.97 s); else its default implementation."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError) as exc:
        log.info("fused AdamW unavailable here (%s): its default implementation", exc)
        return torch.optim.AdamW(params, **kwargs)


def _as_built(state: dict, optimizer) -> dict:
    """A saved AdamW state_dict with this optimizer's implementation (fused or not):
    load_state_dict takes the saved groups whole, flags included, so a checkpoint written
    by another implementation (or before adamw()) would bring its own back."""
    groups = [dict(saved, **{k: group.get(k) for k in ("fused", "foreach") if k in group})
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    return dict(state, param_groups=groups)


def _load_optimizer(ckpt: Path, optimizer, scaler=None) -> None:
    state, scaler_state = _read_optimizer(ckpt)
    optimizer.load_state_dict(_as_built(state, optimizer))
    # AdamW's moments, still mapped from the file, in memory of their own
    mapped = {id(t) for t in _file_mapped([v for entry in optimizer.state.values()
                                           for v in entry.values() if isinstance(v, torch.Tensor)])}
    for entry in optimizer.state.values():
        for key, value in list(entry.items()):
            if id(value) in mapped:
                entry[key] = value.clone()
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)


def _file_mapped(tensors: list) -> list:
    """Those of `tensors` whose memory is a private mapping of a file: what safetensors'
    safe_open gives and from_pretrained keeps. Every page the optimizer then writes is
    copied on its first write, a fault per 4 KB page: on this VM 1.5-2.8 s per GB inside
    the first step after a load (1 GB model: that step took 8.9 s against 0.5 s), where a
    copy at the load costs 0.2 s per GB; and a page never written keeps reading the file.
    Where the mappings cannot be read (no /proc), all of them."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return list(tensors)
    ranges.sort()
    out = []
    for t in tensors:
        ptr = t.data_ptr()
        i = bisect.bisect_right(ranges, (ptr, math.inf)) - 1
        if i >= 0 and ranges[i][0] <= ptr < ranges[i][1]:
            out.append(t)
    return out


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _unwrap(model):
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- training

def _device(config: dict):
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
PER_VERSION_FILES = {TRAINER_STATE, ".manifest.json", "version.json", "README.md"}  # (not the tokenizer)
_TOKENIZERS: dict[str, object] = {}  # load_tokenizer's: by content, the last few


def load_tokenizer(folder):
    """The tokenizer of a model folder, loaded once per process for each content: building a
    151k-entry BPE costs 3-4 s on CPU, and current_model, its versions and the eval gate's
    every load carry the same files. Keyed by the sha256 of every file in the folder but the
    weights and the per-version records (~20 ms for Qwen's), so any other file that differs,
    whatever the tokenizer type names it, loads afresh; callers never modify the object."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(NOT_TOKENIZER) or name in PER_VERSION_FILES:
            continue
        path = folder / name
        if not path.is_file():  # (not a folder, nor a pipe that would block the read)
            continue
        with open(path, "rb") as f:
            digest.update(f"{name}\0{os.fstat(f.fileno()).st_size}\0".encode())
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    key = digest.hexdigest()
    tokenizer = _TOKENIZERS.pop(key, None)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _TOKENIZERS[key] = tokenizer  # newest last
    while len(_TOKENIZERS) > 4:
        _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
    return tokenizer


class _Warm(NamedTuple):
    """What a completed file ended with, kept for the next file of this process (_take_warm)."""
    root: Path
    ckpt: Path             # the end checkpoint: its weights and AdamW state are these
    meta_sig: tuple        # its meta.json's (inode, mtime_ns, size): the same checkpoint still
    model_sig: tuple       # every current_model file's: nothing there replaced or edited since
    config: str            # the whole config (sorted JSON): any change loads from disk
    model: object          # fp32 master weights, unwrapped
    optimizer: dict        # AdamW's state_dict (the checkpoint's optimizer.safetensors)
    scaler: dict | None
    nbytes: int            # the memory the weights and AdamW's moments hold (warm_held)
    device: str


_WARM: list[_Warm] = []  # at most one


def _meta_sig(ckpt: Path) -> tuple:
    st = os.stat(ckpt / "meta.json")
    return st.st_ino, st.st_mtime_ns, st.st_size


def _folder_sig(folder: Path) -> tuple:
    return tuple(sorted((e.name, e.inode(), e.stat().st_mtime_ns, e.stat().st_size)
                        for e in os.scandir(folder)))


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _take_warm(root, file_id: str, config: dict) -> _Warm | None:
    """The model and AdamW state the last completed file of this process ended with, when the
    next file would load exactly them from disk: same root and config, no file of
    current_model replaced or edited, no checkpoint of this file to resume, the carry
    checkpoint is the one they were saved as (unchanged), and current_model is what it
    published (no rollback, restore or base switch since). A queue of files then trains on
    without reading ~3x the weights back. Taken once; None otherwise."""
    if not _WARM:
        return None
    warm = _WARM.pop()
    folder = Paths(root).current_model
    try:
        if (warm.root != Path(root).resolve() or warm.config != _config_key(config)
                or _folder_sig(folder) != warm.model_sig):
            return None
        state = _model_state(folder)
        carry = _carry_checkpoint(root, state)
        if (_resume_checkpoint(root, file_id, state) or not carry or carry[0] != warm.ckpt
                or _meta_sig(carry[0]) != warm.meta_sig or lora_mode.wanted(folder, config)
                or not _published_here(carry[1], folder)):
            return None
    except (OSError, GuardrailError, ValueError) as exc:
        log.info("loading current_model from disk: %s", exc)
        return None
    return warm


def warm_held() -> dict | None:
    """{"bytes", "device"} of the model and AdamW state kept for the next file, or None."""
    return {"bytes": _WARM[0].nbytes, "device": _WARM[0].device} if _WARM else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_HOLDING: list = []  # [bool] once asked: this process keeps freed memory for the next step


def _glibc():
    """The process's C library, if it is glibc (mallopt and malloc_trim are glibc's)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


def hold_freed_memory() -> bool:
    """Keep the memory a step frees for the next step (this process, glibc; once).

    glibc gives a freed block over 128 KB back to the system (mmap, or trimming the heap's
    top), and the next step faults it in again, zeroed by the kernel: on the tiny model
    1,000-1,600 page faults a step, in a bare loop too. With blocks up to 32 MB from the
    heap and the heap trimmed only past 1 GB free, steps fault nothing (bench_endtoend).
    The memory is a step's own, needed again at once; `give_back_freed_memory()` returns
    it once training stops. A user's own MALLOC_* or GLIBC_TUNABLES settings are kept."""
    if not _HOLDING:
        libc = _glibc()
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        chosen = any(f"MALLOC_{k.upper()}_" in os.environ or f"malloc.{k}=" in tunables
                     for k in ("mmap_threshold", "trim_threshold"))
        _HOLDING.append(bool(libc is not None and not chosen and
                             libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and
                             libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)))
    return _HOLDING[0]


def give_back_freed_memory() -> None:
    """Return the free memory `hold_freed_memory` kept to the system (training stopped)."""
    if _HOLDING and _HOLDING[0]:
        _glibc().malloc_trim(0)


def release_warm() -> None:
    """Let go of the model and AdamW state kept between files (the daemon does once it has
    been idle keep_warm_seconds, or paused, and before an eval loads a model on a GPU): the
    next file loads from disk. The spare checkpoint stays for it to write over (_SPARE)."""
    if _WARM:
        _WARM.clear()
        import gc
        gc.collect()
        give_back_freed_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _model_state(folder: Path) -> dict:
    state = read_json(folder / TRAINER_STATE, default={}) or {}
    return {"global_step": int(state.get("global_step", 0)),
            "tokens_seen": int(state.get("tokens_seen", 0)),
            **({"warmup_from_step": int(state["warmup_from_step"])}
               if isinstance(state.get("warmup_from_step"), int) else {})}


def load_current_model(root, device=None, config=None):
    """current_model's weights (upcast to the fp32 master copy; the base's dtype is kept as
    `model.guardrails_base_dtype`), tokenizer and trainer_state.json. With config finetune
    "lora" the model is a trainable peft adapter over its base (lora_mode.load), and
    `model.base_id` names the base (None in full mode)."""
    from transformers import AutoModelForCausalLM
    _quiet_transformers()
    folder = Paths(root).current_model
    tokenizer = load_tokenizer(folder)
    state = _model_state(folder)
    if lora_mode.wanted(folder, config or {}):
        model, base_id = lora_mode.load(root, folder, config, global_step=state["global_step"])
    else:
        model, base_id = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32), None
        model.guardrails_base_dtype = base_dtype(folder)  # what publish_current_model writes
        if device is None or torch.device(device).type == "cpu":  # (a GPU copies them anyway)
            with torch.no_grad():  # weights the optimizer writes, in memory of their own
                for q in _file_mapped([q for q in model.parameters() if q.requires_grad]):
                    q.data = q.data.clone()
    model.base_id = base_id
    if device is not None:
        model.to(device)
    return model, tokenizer, state


def load_model_folder(root, folder):
    """A model folder (current_model or a version) for evaluation, in fp32: a full model,
    or an adapter over its base in ROOT/base/ (named by its manifest's base id)."""
    from transformers import AutoModelForCausalLM
    _quiet_transformers()
    if lora_mode.wanted(Path(folder), None):
        return lora_mode.load_frozen(root, Path(folder))
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)


class CastAhead:
    """current_model's weights in the base's dtype (not fp32: an fp32 base links the
    checkpoint's file instead), written into a .staging folder in a thread while the end
    checkpoint is written: they do not depend on it, and both writes release the GIL (1 GB
    of weights, bf16 base: checkpoint and publish 1.5-4.5 s, median 2.1, against 2.4-8.5 s,
    median 3.1, one after the other). publish_current_model takes them; `discard()` when it
    will not. A kill leaves a `.staging/model-*` folder, which clean_staging removes."""

    def __init__(self, root, model):
        m = _unwrap(model)
        staging = Paths(root).staging
        staging.mkdir(parents=True, exist_ok=True)
        self.holder = Path(tempfile.mkdtemp(prefix="model-", dir=staging))
        self.path = self.holder / "model.safetensors"
        dtype, tensors = m.guardrails_base_dtype, published_tensors(m)
        keep = _kept_in_fp32(m, dtype, tensors)

        def write():
            written = write_safetensors(self.path, tensors, dtype, keep=keep, kept=True)
            fsync_paths([self.path])
            return written
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cast-ahead")
        self._written = self._pool.submit(write)

    def result(self) -> dict:
        """{sha256, size} of the file at `path` once written; its write error, if any."""
        try:
            return self._written.result()
        finally:
            self._pool.shutdown()

    def discard(self) -> None:
        with contextlib.suppress(*WRITE_ERRORS):
            self.result()
        shutil.rmtree(self.holder, ignore_errors=True)


def publish_current_model(root, model, tokenizer, state: dict, *, reason: str,
                          checkpoint=None, ahead: CastAhead | None = None) -> Path:
    """Save into a fresh .staging folder in the base model's dtype, fsync, then swap it in
    with model_versioner. `checkpoint`: the checkpoint folder holding the weights the model
    has now. An fp32 base hard-links its weights file (the same bytes: written once per
    file, not twice); its meta.json records what was published (`published`), the proof
    that lets the next file take the fp32 master weights from it (_master_weights).
    `ahead`: the weights already being written in the base's dtype (CastAhead)."""
    import model_versioner
    from model_manifest import MANIFEST, walk
    p = Paths(root)
    p.staging.mkdir(parents=True, exist_ok=True)
    holder = ahead.holder if ahead else Path(tempfile.mkdtemp(prefix="model-", dir=p.staging))
    staged = holder / "model"
    base_id = getattr(_unwrap(model), "base_id", None)
    if base_id:  # a peft model saves its adapter alone (fp32: the adapter is its own master copy)
        _unwrap(model).save_pretrained(staged)
        extra, weights = lora_mode.finish_staged(p.root, staged, base_id), {}
    else:
        extra, weights = None, _save_model_folder(model, staged, checkpoint, ahead)
    tokenizer.save_pretrained(staged)
    _link_unchanged(p.current_model, staged, walk(staged, skip=(MANIFEST, TRAINER_STATE, *weights)))
    _carry_other_files(p.current_model, staged)
    atomic_write_json(staged / TRAINER_STATE, state)
    files = {rel: weights.get(rel) or {"sha256": sha256_file(staged / rel),
                                       "size": (staged / rel).stat().st_size}
             for rel in walk(staged, skip=(MANIFEST,))}
    model_versioner.write_manifest(staged, files=files, global_step=state["global_step"],
                                   tokens_seen=state["tokens_seen"], extra=extra)
    fsync_tree(staged)
    meta = read_json(Path(checkpoint) / "meta.json", default=None) if checkpoint is not None else None
    # full mode, before the swap: naming a cast never swapped in only fails to match
    if isinstance(meta, dict) and weights:
        atomic_write_json(Path(checkpoint) / "meta.json", dict(meta, published=weights))
    model_versioner.publish_model(p.root, staged, reason=reason, keep_old="never")
    shutil.rmtree(holder, ignore_errors=True)  # whatever the publish left behind in staging
    return p.current_model


_NEVER_CARRIED = ("config.json", "adapter_config.json", "generation_config.json", TRAINER_STATE,
                  "version.json")


def _carry_other_files(current: Path, staged: Path) -> list[str]:
    """current_model's files that saving the model and tokenizer does not write (a model
    card, a LICENSE, notes that came with the base), hard-linked into the new one: training
    must not drop them. Never a weights file (a stale one could be loaded, or shadow the new
    weights), a shard index, or a config the save writes for its own kind of model."""
    from model_manifest import walk
    carried = []
    try:
        rels = walk(current)
    except OSError:
        return carried
    for rel in rels:
        name = rel.rsplit("/", 1)[-1]
        if (staged / rel).exists() or name.startswith(".") or name in _NEVER_CARRIED \
                or name.endswith(NOT_TOKENIZER) or name.endswith(".index.json") \
                or name.startswith("adapter_model."):
            continue
        try:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(current / rel, staged / rel)
        except OSError:
            try:
                shutil.copy2(current / rel, staged / rel)
            except OSError:
                continue
        carried.append(rel)
    return carried


def _link_unchanged(current: Path, staged: Path, rels) -> list[str]:
    """Make each staged file whose bytes equal current_model's same-named file a hard link to
    it: the tokenizer and configs are the same at every publish, and a version shares their
    inodes with the one before instead of a copy each (Qwen's tokenizer.json is 19 MB, more
    than an adapter version). Safe: no file in current_model or versions is ever written in
    place. Weights files are not compared (they change, and are large)."""
    linked = []
    for rel in rels:
        new, old = staged / rel, current / rel
        if rel.endswith(NOT_TOKENIZER):
            continue
        try:
            if not old.is_file() or old.stat().st_size != new.stat().st_size or \
                    not _same_bytes(old, new):
                continue
            tmp = new.with_name(f".{new.name}.link")
            os.link(old, tmp)
            os.replace(tmp, new)
        except OSError:  # (another filesystem, a link limit: the copy stays)
            continue
        linked.append(rel)
    return linked


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _save_model_folder(model, staged: Path, checkpoint=None, ahead: CastAhead | None = None) -> dict:
    """save_pretrained's folder (config, generation config, model.safetensors) with the
    weights in the base's dtype, cast tensor by tensor (or as `ahead` wrote them). Returns
    {relpath: {sha256, size}} of the weights files."""
    model = _unwrap(model)
    dtype = getattr(model, "guardrails_base_dtype", torch.float32)
    dtype_name = str(dtype).split(".")[1]
    staged.mkdir(parents=True)
    kept = model.config.dtype
    model.config.dtype = dtype_name  # config.json says what the weights are, as save_pretrained does
    model.config.architectures = [model.__class__.__name__]
    try:
        model.config.save_pretrained(staged)
    finally:
        model.config.dtype = kept
    if model.can_generate():
        model.generation_config.save_pretrained(staged)
    name = "model.safetensors"
    if ahead is not None:
        written = ahead.result()
        os.rename(ahead.path, staged / name)
        return {name: written}
    if checkpoint is not None and dtype == torch.float32:
        source = Path(checkpoint) / name
        try:
            record = read_json(Path(checkpoint) / "meta.json")["weights"][name]
            if (record["linkable"] and record["dtype"] == "float32"
                    and record["size"] == source.stat().st_size and saved_tensors(model)[1]):
                # The checkpoint's file holds these very bytes: a second name for it, no second
                # write. Safe to share: no file here is ever written in place (a new file and a
                # rename), and publish makes it read-only.
                os.link(source, staged / name)
                return {name: {"sha256": record.get("sha256") or sha256_file(staged / name),
                               "size": record["size"]}}
        except (GuardrailError, OSError, KeyError, TypeError) as exc:
            log.info("writing current_model's weights instead of linking %s's: %s",
                     Path(checkpoint).name, exc)
    tensors = published_tensors(model)
    return {name: write_safetensors(staged / name, tensors, dtype, keep=_kept_in_fp32(model, dtype, tensors),
                                    kept=True)}


def _kept_in_fp32(model, dtype, tensors) -> set:
    """Names of the tensors a model keeps in float32 when loaded in `dtype` (its
    `_keep_in_fp32_modules[_strict]`, as from_pretrained applies them): published so too."""
    if dtype == torch.float32:
        return set()
    try:
        from transformers.core_model_loading import build_glob_alternation
        plan = model._get_dtype_plan(dtype)
        if not plan:
            return set()
        pattern = build_glob_alternation(list(plan))[0]
    except (AttributeError, ImportError, TypeError) as exc:  # another transformers: say so
        log.warning("cannot read which modules %s keeps in float32 (%s): publishing all in %s",
                    type(model).__name__, exc, dtype)
        return set()
    return {name for name in tensors if pattern.search(name)}


METRICS_TAIL_BYTES = 1 << 20  # how far back a resume looks for steps already logged


def _logged_upto(metrics_path: Path, file_id: str, above: int = 0) -> int:
    """The highest global_step above `above` (the file's first step - 1) that metrics.jsonl's
    tail holds for `file_id` (0 if none). A restart after a crash redoes the steps since the
    file's last checkpoint, or since its start when it died before the first one, exactly,
    and they are already logged once. The daemon's file ids are unique per arrival, so a
    file queued again (after a rollback, a skip) logs all its steps afresh."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - METRICS_TAIL_BYTES))
            lines = f.read().splitlines()
    except OSError:
        return 0
    upto, needle = 0, json.dumps(file_id)[1:-1].encode()  # as log_step's json.dumps wrote it
    for raw in lines:
        if needle not in raw:
            continue  # most lines: another file's
        try:
            doc = json.loads(raw)
        except ValueError:
            continue  # the window's cut first line, or a torn last one
        step = doc.get("global_step") if isinstance(doc, dict) else None
        if doc.get("file_id") == file_id and isinstance(step, int) and step > above:
            upto = max(upto, step)
    return upto


def _resume_checkpoint(root, file_id: str, state: dict):
    """The newest checkpoint of this file that continues current_model's lineage, or None."""
    for d, meta in list_checkpoints(root):
        if meta.get("file_id") != file_id:
            continue
        start = int(meta.get("file_start_global_step", -1))
        if start <= state["global_step"] <= int(meta.get("global_step", -1)):
            return d, meta
        log.warning("not resuming from %s: current_model is at step %d, outside its file's steps "
                    "%d..%d (a rollback happened); restarting the file", d.name,
                    state["global_step"], start, meta.get("global_step"))
        return None
    return None


def _check_world_size(ckpt: Path, meta: dict, file_id: str, world_size: int) -> None:
    """Refuse to resume a file's checkpoint with another number of processes.

    The data position is global, so no row would be lost or repeated, but each optimizer
    step takes batch_size x world_size rows: with another N the rest of the file would be
    grouped into other steps, and the weights would match neither an N-process run nor
    the new one. Exact resume is the promise, so say so instead. A checkpoint at the end
    of its file (only the publish is left) trains nothing more and is accepted.
    """
    written = int(meta.get("world_size", 1))
    at_end = meta.get("complete") and (meta.get("position") or {}).get("exhausted")
    if written == world_size or at_end:
        return
    raise GuardrailError(
        f"{file_id} was checkpointed at step {meta.get('global_step')} by {written} "
        f"training process{'es' if written > 1 else ''} and nproc_per_node is now {world_size}; "
        "resuming would group its remaining rows into other optimizer steps than either run",
        ckpt, f"Set nproc_per_node back to {written} in config.json (a paused daemon retries "
        "when config.json changes), or run `python3 training_controller.py skip` to keep "
        "current_model as it is and move the file to skipped/.")


def _carry_checkpoint(root, state: dict):
    """A checkpoint whose step and tokens equal current_model's: its optimizer carries over."""
    for d, meta in list_checkpoints(root):
        if (int(meta.get("global_step", -1)) == state["global_step"]
                and int(meta.get("tokens_seen", -1)) == state["tokens_seen"]):
            return d, meta
    return None


def _published_here(meta: dict, folder: Path) -> bool | None:
    """Whether `folder`'s weights files are the ones the checkpoint of `meta` published: the
    sha256 and size it recorded (`published`) against folder's manifest and the files' sizes
    (cheap: no hashing). None when it recorded none (written before the engine did)."""
    from model_manifest import WEIGHT_SUFFIXES, read_manifest
    published = meta.get("published")
    if not isinstance(published, dict) or not published:
        return None
    try:
        files = (read_manifest(folder) or {}).get("files") or {}
        here = {rel for rel in files if rel.endswith(WEIGHT_SUFFIXES)}
        return here == set(published) and all(
            files[rel].get("sha256") == rec.get("sha256")
            and (folder / rel).stat().st_size == rec.get("size") for rel, rec in published.items())
    except (GuardrailError, OSError, AttributeError) as exc:
        log.info("current_model's manifest cannot prove which checkpoint it came from: %s", exc)
        return False


def _master_weights(carry, model, folder: Path) -> str | None:
    """The carry checkpoint's fp32 master weights into `model` when current_model is what it
    published; None if so (its optimizer carries over), else why not (the optimizer starts
    fresh on current_model's weights, upcast from the base's dtype)."""
    from safetensors.torch import load_model
    ckpt, meta = carry
    dtype = getattr(_unwrap(model), "guardrails_base_dtype", torch.float32)
    proof = _published_here(meta, folder)
    if proof is None and dtype == torch.float32:
        return None  # written before the record: fp32 current_model holds the master bits
    if not proof:
        return f"current_model is not what {ckpt.name} published"
    if dtype != torch.float32:  # current_model is their cast: train on from the originals
        load_model(_unwrap(model), str(ckpt / "model.safetensors"), strict=True)
    return None


def train_file(root, data_path, *, file_id: str, config: dict, records_total: int | None = None,
               control=None, progress=None, rank: int = 0, world_size: int = 1) -> dict:
    """Train one data file into current_model; resume, checkpoints and guards included.

    Returns {status: completed|stopped|paused|skipped|nan|spike, steps, global_step,
    tokens_seen, records, tokens, loss, message, ...}. `control()` is called between
    micro-batches (None, "stop", "pause" or "skip"); the engine acts at the next
    optimizer-step boundary. Under torchrun pass rank/world_size with torch.distributed
    initialised: every rank reads the same packed stream and trains rows r::world_size;
    rank 0 alone polls control, writes checkpoints, metrics and current_model.
    """
    try:
        return _train_file(root, data_path, file_id=file_id, config=config,
                           records_total=records_total, control=control, progress=progress,
                           rank=rank, world_size=world_size)
    finally:  # the model and AdamW state die with the call: give a GPU's memory back on pause
        if torch.cuda.is_available():
            import gc
            gc.collect()
            torch.cuda.empty_cache()
        if not _WARM:  # and the steps' memory, unless the model stays for the next file
            give_back_freed_memory()


def file_reading(data_path, config: dict) -> dict:
    """How the engine reads a data file: config.json's settings (validate_data.read_settings)
    and `skip_invalid` from the file's queue record (`training_queue.py add --skip-invalid`)."""
    import training_queue
    import validate_data
    rec = training_queue.read_record(Path(data_path))
    return {**validate_data.read_settings(config), "skip_invalid": bool(rec.get("skip_invalid"))}


def model_max_positions(model_config: dict) -> int | None:
    """The longest sequence a model's position embeddings cover, from its config.json as a
    dict (None: not stated)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Batch(NamedTuple):
    """One optimizer step's data, as this rank trains it."""
    micro: list      # per micro-batch: (model inputs, labels), CPU tensors; empty at the file's end
    tokens: int      # real tokens in this rank's rows
    trained: int     # target tokens in this rank's rows
    untrained: int   # tokens of rows without a target, read (alike) by every rank
    position: dict   # the stream's position after this batch: what a checkpoint records


class BatchPrefetcher:
    """Reads the next batch (`read()`: read, tokenized, packed, made tensors) in a thread,
    one batch ahead, started by `ahead()` from the step's backward once it has left the
    loss (FileRun._read_ahead): the rest of the backward runs in C++ without the GIL for
    milliseconds, while the forward's Python holds it. A read started as soon as a batch
    was taken (as this did before) ran during the forward, and the training thread waited
    for the GIL: 0.5 ms a step of 28 on the tiny model, 2 cores. `next()` starts the read
    itself if no step did (the first, a step cut short).
    Errors surface in `next()`, where the batch would have come. Always `close()` it.

    On a CPU whose every core runs torch's threads, reading in line between steps instead
    measured no faster end to end (tiny model, 2 cores, 3 x 5 pairs: 0.952-0.963 against
    0.934-0.974 with the thread): part of the read hides in the step's own pauses. Its CPU
    time (~0.5 ms a batch there) still takes a core from torch's threads."""

    def __init__(self, read):
        import queue
        self._read, self._done = read, threading.Event()
        self._asked = threading.Semaphore(1)  # the first batch: at once
        self._reading = True                  # a read is asked and not yet taken
        self._queue = queue.Queue(maxsize=1)  # one batch at a time: the put never waits
        self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            self._asked.acquire()
            if self._done.is_set():
                return
            try:
                item = (self._read(), None)
            except BaseException as exc:  # re-raised in the training thread by next()
                item = (None, exc)
            self._queue.put(item)
            if item[1] is not None or not item[0].micro:
                return

    def ahead(self) -> None:
        """Start reading the batch after the one being trained (once per batch taken)."""
        if not self._reading:
            self._reading = True
            self._asked.release()

    def next(self, waiting=None) -> Batch | None:
        """The next batch. `waiting()` is called every CHECK_TICK_S while it is not read yet
        (a record of thousands of chat turns renders for minutes: the daemon's heartbeat and
        requests go on); None when it returns a stop, pause or skip (the batch is dropped)."""
        import queue
        self.ahead()
        while True:
            try:
                batch, exc = self._queue.get(timeout=None if waiting is None else CHECK_TICK_S)
                break
            except queue.Empty:
                if waiting() in ("stop", "pause", "skip"):
                    return None
        self._reading = False
        if exc is not None:
            raise exc
        return batch

    def close(self) -> None:
        """Stop reading ahead (a batch read and not trained is simply dropped: checkpoints
        record the position of the last trained one). A read that runs on (a long one after
        `next` gave up on it) is left to end by itself: nothing waits for it."""
        self._done.set()
        self._asked.release()  # wakes a thread waiting to be asked; a read in progress ends
        self._thread.join(timeout=READ_JOIN_S)


READ_JOIN_S = 5.0  # BatchPrefetcher.close: a read takes milliseconds, but a long render minutes


class FileRun:
    """One file's training: set up, one optimizer step, checkpoint, finish. `_train_file`
    runs them; this holds what they share (model, optimizer, stream, counters)."""

    def __init__(self, root, data_path, *, file_id, config, records_total, control, progress,
                 rank, world_size):
        import training_config
        self.root, self.data_path, self.file_id = root, data_path, file_id
        self.config = {**training_config.default_config(), **config}
        self.records_total, self.control, self.progress = records_total, control, progress
        self.rank, self.world_size, self.ddp = rank, world_size, world_size > 1
        self.p = Paths(root)
        self.writer = rank == 0
        self.data_name = Path(data_path).name  # metrics.jsonl's `file` (docs/design.md, Training); file_id tells arrivals apart
        self.notes: list[str] = []
        self.pending = None        # stop/pause/skip asked, acted on at the next step boundary
        self.dirty = False         # steps since the last checkpoint
        self.write_kind = "disk"   # why the last failed write failed: the pause_reason
        self.last_loss = None
        self.spike = False
        self.seconds = collections.Counter()  # per-file fixed costs: load, checkpoint, publish
        self.read_ahead = None     # starts reading the next batch (BatchPrefetcher.ahead)

    # ------------------------------------------------------------------ set up

    def set_up(self) -> dict | None:
        """Model, optimizer (resumed, carried over or fresh), DDP, encoder and data stream at
        the file's position; a result instead if the file is refused before its first step."""
        config, p = self.config, self.p
        # 0 = all cores, shared by the processes of this node (torchrun's ranks on a CPU box)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.ddp else 1
        threads = int(config.get("num_threads") or 0) or max(1, (os.cpu_count() or 1) // per_node)
        torch.set_num_threads(threads)
        hold_freed_memory()  # no page faults for what each step allocates again
        self.device = device = _device(config)
        dtype_name = config.get("dtype", "float32")
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name)
        # float16 autocast needs loss scaling on CUDA and CPU alike (torch >= 2.3 has a CPU scaler)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype is torch.float16 else None

        if self.writer:
            clean_staging(self.root)
        t0 = time.perf_counter()
        # the last file's model and AdamW, still in memory when they are what disk would give
        warm = _take_warm(self.root, self.file_id, config) if self.writer and not self.ddp else None
        if warm:
            model, self.tokenizer = warm.model, load_tokenizer(p.current_model)
            state = _model_state(p.current_model)
        else:
            model, self.tokenizer, state = load_current_model(self.root, device, config)
        self.base_id = model.base_id  # adapter mode: the base the adapter trains on; None: full
        self.warmup_from = state.pop("warmup_from_step", None)  # a warm-up again (consolidate)
        positions = model_max_positions(model.config.to_dict())
        if positions and int(config["max_length"]) > positions:
            raise GuardrailError(
                f"max_length {config['max_length']} is longer than the model's {positions} positions",
                p.config, f"Set max_length to {positions} or less in config.json, then run "
                "`python3 training_controller.py approve-config` (it is a locked parameter).")
        model.train()  # (no KV cache: model_inputs asks for none, and config.json keeps the base's use_cache)
        self.isolation, isolation_line = packing_isolation(model, config, self.root)  # before DDP wraps it
        self.params = [q for q in model.parameters() if q.requires_grad]
        # what a checkpoint writes: the saved weights in fp32 (all of a full model, the adapter
        # alone) and AdamW's two moments; what a publish writes: the weights in the base's
        # dtype (nothing new for an fp32 base: a link to the checkpoint's), or the adapter
        trainable = sum(q.numel() for q in self.params)
        everything = sum(q.numel() for q in model.parameters())
        dtype = getattr(model, "guardrails_base_dtype", torch.float32)
        self.need = {"checkpoint": 4 * (trainable if self.base_id else everything) + 8 * trainable,
                     "current_model": 4 * trainable if self.base_id else
                     (0 if dtype == torch.float32 else dtype.itemsize * everything)}
        # adam_eps 0 is in the documented range, but AdamW then divides 0 by 0 for every weight
        # whose gradient has always been zero (embedding rows of bytes the data never used) and
        # writes NaN into them: the smallest normal float keeps that 0/eps = 0 and changes nothing else
        eps = float(config["adam_eps"])
        if eps < torch.finfo(torch.float32).tiny:
            log.info("adam_eps %g: using %g instead, so weights without gradient stay finite",
                     eps, torch.finfo(torch.float32).tiny)
            eps = torch.finfo(torch.float32).tiny
        self.optimizer = adamw(self.params, lr=lr_at(state["global_step"], config),
                               betas=(config["adam_beta1"], config["adam_beta2"]),
                               eps=eps, weight_decay=config["weight_decay"])
        self.logged_upto = 0  # steps redone after a crash are not logged a second time
        position, self.loss_history, self.step_in_file = None, [], 0
        self.file_start = state["global_step"]
        self.resume = _resume_checkpoint(self.root, self.file_id, state)
        self.ckpt_dir = None       # the checkpoint holding the weights the model has now
        if self.resume:
            ckpt, meta = self.resume
            lora_mode.check_checkpoint(ckpt, meta, self.base_id, self.file_id)
            self.warmup_from = meta.get("warmup_from_step", self.warmup_from)
            _load_checkpoint(ckpt, model, self.optimizer, self.scaler)
            self.ckpt_dir = ckpt
            state = {"global_step": int(meta["global_step"]), "tokens_seen": int(meta["tokens_seen"])}
            position, self.step_in_file = meta["position"], int(meta.get("step_in_file", 0))
            self.loss_history = list(meta.get("loss_history", []))
            self.file_start = int(meta["file_start_global_step"])
            self.notes.append(f"resumed from {ckpt.name} at step {state['global_step']}")
            _check_world_size(ckpt, meta, self.file_id, self.world_size)
            optimizer_source = "resumed"
        else:
            carry = _carry_checkpoint(self.root, state)
            if carry and not lora_mode.same_lineage(carry[1], self.base_id):
                carry = None  # another mode's or base's optimizer state (a switch, a consolidate)
            # full mode: the fp32 master weights come from the checkpoint that published
            # current_model (an adapter is saved in fp32: it is its own master copy); a warm
            # model holds them already (_take_warm proved it)
            unproven = _master_weights(carry, model, p.current_model) \
                if carry and not self.base_id and not warm else None
            if unproven:
                self.notes.append(f"optimizer started fresh at step {state['global_step']}: "
                                  f"{unproven}")
                carry = None
            if carry:
                if warm:  # the very state carry[0] holds, not read back
                    self.optimizer.load_state_dict(_as_built(warm.optimizer, self.optimizer))
                    if self.scaler is not None and warm.scaler is not None:
                        self.scaler.load_state_dict(warm.scaler)
                else:
                    _load_optimizer(carry[0], self.optimizer, self.scaler)
                self.loss_history = list(carry[1].get("loss_history", []))
                optimizer_source = f"carried from {carry[0].name}"
            else:
                optimizer_source = "fresh"
                if state["global_step"] and not unproven:
                    self.notes.append(f"optimizer started fresh at step {state['global_step']}: no "
                                      "checkpoint matches current_model (first file after init, "
                                      "restore or rollback)")
                dtype = getattr(model, "guardrails_base_dtype", torch.float32)
                if state["global_step"] and dtype != torch.float32:
                    self.notes.append(f"weights upcast from current_model's "
                                      f"{str(dtype).split('.')[1]}: the "
                                      "float32 master weights of this version are not kept")
            seed = int(config.get("seed", 0)) + state["global_step"]
            random.seed(seed)
            torch.manual_seed(seed)
        self.state, self.state_at_start = state, dict(state)
        if self.writer:  # resumed, or restarted from the file's start by a crash before a checkpoint
            self.logged_upto = _logged_upto(p.metrics, self.file_id, above=self.file_start)
        self.seconds["load"] += time.perf_counter() - t0  # weights, optimizer state, RNG
        for note in self.notes if self.writer else ():  # once per job, not once per rank
            log.info("%s: %s", self.file_id, note)
        if self.writer:
            (log.warning if self.isolation == "shared" else log.info)("%s: %s", self.file_id,
                                                                      isolation_line)
        if self.ddp:  # under torchrun: gradients averaged by DDP, files written by rank 0 alone
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel
            if not dist.is_initialized():
                raise GuardrailError(f"world_size {self.world_size} needs torch.distributed "
                                     "initialised", p.root, "Run the engine under torchrun, or use "
                                     "world_size 1.")
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model

        # a template that prints today's date renders the file's first day, resumed or not
        meta = self.resume[1] if self.resume else {}
        self.chat_date = datetime.date.fromisoformat(meta["chat_date"]) if meta.get("chat_date") \
            else datetime.date.today()
        encoder = Encoder(self.tokenizer, loss_on_prompt=bool(config.get("loss_on_prompt")),
                          chat_template=config.get("chat_template"), root=p.root,
                          date=self.chat_date, max_length=int(config["max_length"]))
        encoder.where = self.data_path
        self.render_key = encoder.render_key(config)
        if position is not None and meta.get("render") not in (None, self.render_key):
            raise _render_changed(self.data_path, meta, self.render_key)
        reading = file_reading(self.data_path, config)
        self.result = {"file_id": self.file_id, "steps": 0, "optimizer": optimizer_source,
                       "model_source": "memory" if warm else "disk",
                       "rendering": encoder.rendering, "pack_isolation": self.isolation}
        if position is None:  # refused before the first step, not hours into the file
            refused = encoder.check_file(self.data_path, tick=self.control if self.writer
                                         and not self.ddp else None, **reading)
            if refused is not None:
                log.error("%s: refused: %s", self.file_id, refused)
                return {"file_id": self.file_id, "status": "refused", "steps": 0,
                        "rendering": encoder.rendering, "global_step": state["global_step"],
                        "tokens_seen": state["tokens_seen"], "records": 0, "tokens": 0, "loss": None,
                        "message": str(refused), "reason": refused.what, "fix": refused.fix,
                        "line": getattr(refused, "line", None)}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else encoder.eos_id
        self.max_length = int(config["max_length"])
        self.batch_size, self.accum = int(config["batch_size"]), int(config["grad_accum_steps"])
        self.stream = PackedStream(self.data_path, encoder, self.max_length, self.pad_id,
                                   position=position, isolate=self.isolation != "off", **reading)
        if position:  # counted before the checkpoint (the record re-encoded above included)
            encoder.stats = collections.Counter(position.get("encoder_stats") or {})
        self.position = self.stream_position()  # of the last batch trained: the checkpoints'
        self.records_at_start = self.position["records"]
        self.spike_factor = float(config.get("loss_spike_factor") or 0)
        self.spike_window = int(config.get("loss_spike_window", 50))
        self.ckpt_steps = int(config.get("checkpoint_every_steps") or 0)
        self.ckpt_minutes = float(config.get("checkpoint_every_minutes") or 0)
        self.keep = int(config.get("keep_checkpoints", 2))
        self.clip = float(config.get("max_grad_norm") or 0)
        self.last_ckpt_time = time.monotonic()
        if position and position.get("exhausted") and self.resume and self.resume[1].get("complete"):
            # Killed after the end-of-file checkpoint but before the publish: publish now.
            return self.finish("completed", "file already trained; published its end state",
                               publish="end-of-file")
        return None

    # ------------------------------------------------------------------ data

    def read_batch(self) -> Batch:
        """The next optimizer step's rows, made tensors (runs in the prefetch thread: it
        touches only the stream, never the model)."""
        micro, tokens, trained, untrained = [], 0, 0, 0
        W, pin = self.world_size, self.device.type == "cuda"
        for _ in range(self.accum):
            rows = []
            while len(rows) < self.batch_size * W:
                row = self.stream.next_row()
                if row is None:
                    break
                if row.labels.count(-100) - (row.labels[0] == -100) == len(row.labels) - 1:
                    # No target in the row (the middle of a long prompt, a file's 1-token
                    # tail): its gradient is zero, yet a step of only such rows would still
                    # move the weights (AdamW momentum, weight decay) and log a null loss.
                    # Count its tokens; train only rows that teach something.
                    untrained += row.tokens
                    continue
                rows.append(row)
            if not rows:
                break
            # a short last batch can leave a rank without a row: it trains a masked pad row,
            # because every rank must join every micro-batch's gradient all-reduce
            mine = shard_rows(rows, self.rank, W) or [
                Row([self.pad_id] * self.max_length, [-100] * self.max_length, 0, [0])]
            inputs = model_inputs(mine, self.isolation)
            labels = long_tensor([r.labels for r in mine])
            tokens += sum(r.tokens for r in mine)
            trained += int((labels[:, 1:] != -100).sum())
            if pin:  # so the copy to the GPU overlaps the step before
                inputs = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in inputs.items()}
                labels = labels.pin_memory()
            micro.append((inputs, labels))
        return Batch(micro, tokens, trained, untrained, self.stream_position())

    def stream_position(self) -> dict:
        """The stream's position and what the encoder counted up to it (read with the batch,
        in the prefetch thread: a checkpoint records the batch trained, not the one ahead)."""
        return dict(self.stream.position(), encoder_stats=dict(self.stream.encoder.stats))

    # ------------------------------------------------------------------ one step

    def poll_control(self):
        """stop/pause/skip if asked (rank 0 asks; every rank gets its answer), else None."""
        if self.control and self.writer and self.pending is None:  # asked at the boundary too
            self.pending = self.control()
        if self.ddp:  # rank 0's decision, so every rank stops at the same step boundary
            self.pending = _broadcast(self.pending)
        return self.pending if self.pending in ("stop", "pause", "skip") else None

    def optimizer_step(self, batch: Batch) -> dict | None:
        """Forward, backward, clip and AdamW over the batch; a result if it was not finite."""
        model, device, ws = self.model, self.device, self.world_size
        n_trained, real_tokens = _all_sum(batch.trained, ws), _all_sum(batch.tokens, ws)
        real_tokens += batch.untrained  # every rank read (and skipped) the same rows: add once
        self.lr = lr = lr_at(self.state["global_step"], self.config, warmup_from=self.warmup_from)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = None  # on the device: read once per step, with the gradient norm
        for i, (inputs, labels) in enumerate(batch.micro):
            if device.type != "cpu":
                inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                          for k, v in inputs.items()}
                labels = labels.to(device, non_blocking=True)
            sync = model.no_sync() if self.ddp and i < len(batch.micro) - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    logits = model(**inputs).logits
                if i == 0 and self.read_ahead is not None and logits.requires_grad:
                    logits.register_hook(self._read_ahead)
                loss = next_token_loss(logits, labels) / max(1, n_trained)
                del logits
                # DDP averages gradients over ranks; the loss is already over the global count
                scaled = loss * ws if self.ddp else loss
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            # summed in float64 in micro-batch order: the float each step logged before
            part = loss.detach().double()
            loss_sum = part if loss_sum is None else loss_sum + part
            if self.control and self.writer:
                self.pending = self.control() or self.pending
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        # one wait for the device per step (a GPU idles while the CPU waits and queues again)
        loss_sum, self.grad_norm = torch.stack([loss_sum, norm.double().to(loss_sum.device)]).tolist()
        loss_sum = _all_sum(loss_sum, ws)
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            return self.finish("nan", f"non-finite loss ({loss_sum}) at step "
                               f"{self.state['global_step'] + 1}; current_model left as it was "
                               "before this file")
        if not math.isfinite(self.grad_norm) and not self.scaler:
            self.optimizer.zero_grad(set_to_none=True)
            return self.finish("nan", f"non-finite gradient norm at step "
                               f"{self.state['global_step'] + 1}; current_model left as it was "
                               "before this file")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["global_step"] += 1
        self.state["tokens_seen"] += real_tokens
        self.step_in_file += 1
        self.result["steps"] += 1
        self.position = batch.position
        self.dirty = True
        self.last_loss = loss_sum if n_trained else None
        self.real_tokens = real_tokens
        self._watch_spikes()
        return None

    def _read_ahead(self, grad) -> None:
        """A hook on the logits' gradient: once the backward has left the loss (whose
        backward is Python), the rest of it runs in C++ without the GIL for milliseconds,
        and the next batch is read in that time (BatchPrefetcher.ahead)."""
        self.read_ahead()

    def _watch_spikes(self) -> None:
        self.spike = False
        if self.last_loss is None:
            return
        history = self.loss_history
        if self.spike_factor and len(history) >= min(self.spike_window, 10):
            avg = sum(history[-self.spike_window:]) / len(history[-self.spike_window:])
            self.spike = self.last_loss > self.spike_factor * avg
        if not self.spike:
            history.append(self.last_loss)
            del history[:-self.spike_window]

    def log_step(self, tps: float) -> dict | None:
        """The step's metrics.jsonl line (rank 0; not again for steps a resume redoes)."""
        state = self.state
        if not self.writer or state["global_step"] <= self.logged_upto:
            return None
        line = json.dumps({
            "time": utc_now(), "global_step": state["global_step"], "file": self.data_name,
            "file_id": self.file_id, "loss": self.last_loss, "lr": self.lr,
            "tokens_per_sec": round(tps, 1),
            # an overflowed float16 step (the scaler skips it) has an infinite norm, and
            # `Infinity` is not JSON: the monitor's JSON.parse would reject the line
            "grad_norm": self.grad_norm if math.isfinite(self.grad_norm) else None,
            "tokens_seen": state["tokens_seen"], "step_in_file": self.step_in_file})
        try:
            append_line(self.p.metrics, line)
        except OSError as exc:  # resume redoes the step from the last checkpoint
            log.error("writing metrics.jsonl at step %d failed: %s", state["global_step"], exc)
            self.write_kind = _write_failure(exc)
            return self.finish("paused", f"writing metrics.jsonl at step {state['global_step']} "
                               f"failed ({_io_reason(exc)}); paused: {_WRITE_FIXES[self.write_kind]} "
                               "(training restarts from the last good checkpoint)", disk=True)
        return None

    def report_progress(self, tps: float, elapsed: float) -> None:
        if not (self.progress and self.writer):
            return
        pos = self.position
        eta = None
        if self.records_total and pos["records"]:
            done_here = max(1, pos["records"] - self.records_at_start)
            eta = max(0.0, (self.records_total - pos["records"]) * max(elapsed, 1e-9) / done_here)
        self.progress({"global_step": self.state["global_step"], "step_in_file": self.step_in_file,
                       "records_done": pos["records"], "records_total": self.records_total,
                       "tokens_per_sec": round(tps, 1), "loss": self.last_loss,
                       "tokens_seen": self.state["tokens_seen"], "eta_seconds": eta})

    # ------------------------------------------------------------------ checkpoint

    def checkpoint_due(self) -> bool:
        return bool((self.ckpt_steps and self.state["global_step"] % self.ckpt_steps == 0) or
                    (self.ckpt_minutes and time.monotonic() - self.last_ckpt_time >= self.ckpt_minutes * 60))

    def meta_now(self, complete=False) -> dict:
        state, config = self.state, self.config
        return {"file_id": self.file_id, "data_path": str(self.data_path),
                "global_step": state["global_step"], "tokens_seen": state["tokens_seen"],
                "step_in_file": self.step_in_file, "file_start_global_step": self.file_start,
                "position": self.position, "complete": complete,
                "loss_history": self.loss_history[-self.spike_window:],
                "scheduler": {"name": config.get("lr_schedule"), "global_step": state["global_step"],
                              "next_lr": lr_at(state["global_step"], config)},
                "world_size": self.world_size, "config": config,
                "chat_date": self.chat_date.isoformat(), "warmup_from_step": self.warmup_from,
                "render": self.render_key, **lora_mode.checkpoint_meta(self.base_id)}

    def no_room(self, what: str) -> str | None:
        """Why `what` ("checkpoint" or "current_model") would not fit the free space of the
        root's disk beyond min_free_disk_mb, or None. Checked before writing: a full disk
        pauses the run with the figures instead of failing halfway through a write (the
        daemon's pre-flight reserved the file's bytes in the budget before it started)."""
        margin = int(self.config.get("min_free_disk_mb") or 0) << 20
        free = self._free(what == "checkpoint")
        if free is None or free >= self.need[what] + margin:
            return None  # (None: the write itself will say what is wrong)
        self.write_kind = "disk"
        mb = 1 << 20
        return (f"saving {what} at step {self.state['global_step']} needs "
                f"{self.need[what] / mb:.1f} MB plus min_free_disk_mb {margin // mb} MB, and "
                f"{free / mb:.1f} MB are free on the disk of {self.p.root}; paused before "
                f"writing: free disk space (`python3 model_versioner.py prune --keep 1` lists what "
                "retention can remove), then resume (training restarts from the last good "
                "checkpoint)")

    def _free(self, checkpoint: bool) -> int | None:
        """Free bytes on the root's disk (a checkpoint: plus the spare it writes over)."""
        try:
            free = shutil.disk_usage(self.p.root).free
        except OSError:
            return None
        return free + (spare_bytes() if checkpoint else 0)

    def cast_ahead(self) -> CastAhead | None:
        """current_model's weights written while the end checkpoint is (CastAhead): a full
        model whose base is not fp32, with room for both at once (else one after the other,
        each checked by no_room)."""
        dtype = getattr(_unwrap(self.model), "guardrails_base_dtype", torch.float32)
        if not self.writer or self.base_id or dtype == torch.float32:
            return None
        free = self._free(checkpoint=True)
        margin = int(self.config.get("min_free_disk_mb") or 0) << 20
        slack = (1 << 20) + self.need["current_model"] // 64  # its header, fp32-kept tensors
        if free is None or free < self.need["checkpoint"] + self.need["current_model"] + slack + margin:
            return None
        try:
            return CastAhead(self.root, self.model)
        except WRITE_ERRORS as exc:  # (the publish after the checkpoint says it again)
            log.info("current_model's weights not written ahead: %s", exc)
            return None

    def checkpoint(self, complete=False) -> str | None:
        """Write one; on a full or failing disk say why instead of crashing (the run pauses)."""
        if self.writer:
            full = self.no_room("checkpoint")
            if full:
                log.error("%s", full)
                return full
            t0 = time.perf_counter()
            try:
                self.ckpt_dir = save_checkpoint(self.root, self.model, self.optimizer,
                                                self.meta_now(complete), scaler=self.scaler,
                                                keep=self.keep)
                if not complete:  # (the end of a file removes the old ones after its publish)
                    start_deletions()
            except WRITE_ERRORS as exc:
                step = self.state["global_step"]
                log.error("checkpoint at step %d failed: %s", step, exc)
                self.write_kind = _write_failure(exc)
                return (f"checkpoint at step {step} failed ({_io_reason(exc)}); "
                        f"paused: {_WRITE_FIXES[self.write_kind]} (training restarts from the last "
                        "good checkpoint)")
            self.seconds["checkpoint"] += time.perf_counter() - t0
        self.dirty, self.last_ckpt_time = False, time.monotonic()
        return None

    # ------------------------------------------------------------------ finish

    def keep_warm(self, result: dict) -> None:
        """After a completed file whose end checkpoint published current_model: keep the fp32
        model and AdamW state for the next file of this process (_take_warm checks it may)."""
        _WARM.clear()
        if (not self.writer or self.ddp or result.get("status") != "completed" or self.dirty
                or self.ckpt_dir is None or lora_mode.is_peft(_unwrap(self.model))):
            return
        try:
            sig, model_sig = _meta_sig(self.ckpt_dir), _folder_sig(self.p.current_model)
        except OSError:
            return
        model, optimizer = _unwrap(self.model), self.optimizer.state_dict()
        tensors = [*model.parameters(), *model.buffers(), *(
            v for moments in optimizer["state"].values() for v in moments.values() if torch.is_tensor(v))]
        _WARM.append(_Warm(Path(self.root).resolve(), self.ckpt_dir, sig, model_sig,
                           _config_key(self.config), model, optimizer,
                           self.scaler.state_dict() if self.scaler is not None else None,
                           sum(t.numel() * t.element_size() for t in tensors), self.device.type))

    def end_of_file(self) -> dict:
        """The end checkpoint, then current_model (a base that is not fp32: its weights
        written beside the checkpoint, cast_ahead)."""
        ahead = self.cast_ahead()
        try:
            error = self.checkpoint(complete=True)
        except BaseException:
            if ahead is not None:
                ahead.discard()
            raise
        if error:
            return self.finish("paused", error, disk=True, ahead=ahead)
        return self.finish("completed", f"trained to step {self.state['global_step']}",
                           publish="end-of-file", ahead=ahead)

    def stop_for(self, action: str) -> dict:
        """Checkpoint what is not yet, then publish: stop, pause and skip end the call here."""
        step = self.state["global_step"]
        error = self.checkpoint(complete=action == "skip") if self.dirty else None  # skip: the next file carries on
        if error:
            return self.finish("paused", error, disk=True)
        if action == "skip":  # keeps what was trained (the daemon restores for --discard)
            return self.finish("skipped", f"skipped at step {step}; current_model keeps the steps "
                               "trained on this file", publish="skip")
        status = "stopped" if action == "stop" else "paused"
        return self.finish(status, f"{status} at step {step}", publish=action)

    def finish(self, status, message, *, publish=None, disk=False, ahead=None) -> dict:
        """The file's result; first, if `publish`, current_model (with `ahead`: its weights
        already written, their room checked with the checkpoint's)."""
        state, result = self.state, self.result
        # nothing trained, resumed or counted: leave current_model be
        publishing = publish and self.writer and (result["steps"] or self.resume
                                                  or state != self.state_at_start)
        if ahead is not None and not publishing:
            ahead.discard()
        if publishing:
            model_state = {"global_step": state["global_step"], "tokens_seen": state["tokens_seen"],
                           "file_id": self.file_id, "status": status, "updated_at": utc_now()}
            if self.warmup_from is not None:  # the warm-up after a consolidate continues
                model_state["warmup_from_step"] = self.warmup_from
            t0 = time.perf_counter()
            full = self.no_room("current_model") if ahead is None else None
            try:
                if full:  # the checkpoint beside it is complete: resume is exact
                    log.error("%s", full)
                    disk, status, message = True, "paused", full
                else:
                    publish_current_model(self.root, self.model, self.tokenizer, model_state,
                                          reason=publish, ahead=ahead,
                                          checkpoint=None if self.dirty else self.ckpt_dir)
                    self.seconds["publish"] += time.perf_counter() - t0
            except WRITE_ERRORS as exc:  # the checkpoint beside it is complete: resume is exact
                log.error("saving current_model failed: %s", exc)
                disk, self.write_kind = True, _write_failure(exc)
                status, message = "paused", (f"saving current_model failed ({_io_reason(exc)}); "
                                             f"paused: {_WRITE_FIXES[self.write_kind]}")
        start_deletions()  # the checkpoints this file's saves pruned, after its writes
        if self.ddp:
            import torch.distributed as dist
            dist.barrier()  # every rank returns after rank 0 has written
        pos = self.position
        result.update(status=status, global_step=state["global_step"], tokens_seen=state["tokens_seen"],
                      records=pos["records"], tokens=pos["tokens"], loss=self.last_loss,
                      step_in_file=self.step_in_file, message="; ".join(self.notes + [message]),
                      chat_date=self.chat_date.isoformat(),
                      rendered=dict(pos.get("encoder_stats") or {}),
                      refused_lines=list(pos.get("refused_lines") or []),
                      seconds={k: round(v, 4) for k, v in self.seconds.items()})
        if disk:  # not a person's pause: the daemon should say so (disk, readonly, permission)
            result["pause_reason"] = self.write_kind
        return result


def _render_changed(data_path: Path, meta: dict, now: dict) -> GuardrailError:
    """A file part-way trained, resumed with other settings for how its records render."""
    was, then = meta.get("render") or {}, meta.get("config") or {}
    names = [name for key, name in (("chat_template_sha256", "chat_template"),
                                    ("loss_on_prompt", "loss_on_prompt"), ("fields", "fields"))
             if was.get(key) != now.get(key)]
    old = ", ".join(f"{n} {json.dumps(then.get(n))}" for n in names if n in then)
    also = " (or the .jinja file it names)" if "chat_template" in names else ""
    return GuardrailError(
        f"config.json's {' and '.join(names)}{also} changed since {data_path.name} started "
        f"(checkpoint at step {meta.get('global_step')}): the rest of the file would train "
        "on other tokens or labels than its first part", data_path,
        f"Put {'them' if len(names) > 1 else 'it'} back as it was" + (f" ({old})" if old else "")
        + " (a daemon paused on this goes on by itself; a stopped one at its next start); "
        "or, to train the whole file the new way, undo its "
        "part with `python3 training_controller.py skip --discard` while the daemon runs, "
        "then queue it again from skipped/ (`python3 training_queue.py add skipped/"
        f"{data_path.name}`).")


def _train_file(root, data_path, *, file_id, config, records_total, control, progress, rank,
                world_size) -> dict:
    run = FileRun(root, data_path, file_id=file_id, config=config, records_total=records_total,
                  control=control, progress=progress, rank=rank, world_size=world_size)
    # 1. Set up: current_model, AdamW (resumed, carried over or fresh), the data stream at
    #    the checkpoint's position; a file the chat template refuses ends here.
    early = run.set_up()
    if early is not None:
        return early
    # 2. The batches: read, tokenized, packed and made tensors one step ahead, in a thread.
    batches = BatchPrefetcher(run.read_batch)
    run.read_ahead = batches.ahead
    try:
        t_last = started = time.perf_counter()
        while True:
            # 3. At the step boundary: stop, pause or skip as asked (checkpoint, publish, return).
            action = run.poll_control()
            if action is not None:
                return run.stop_for(action)
            # 4. The next batch (the daemon's requests read while a slow one is read; under
            #    DDP only at the boundary, where every rank asks); none left: the file is trained.
            batch = batches.next(None if run.ddp else run.poll_control)
            if batch is None:
                return run.stop_for(run.pending)
            if not batch.micro:
                if batch.untrained:  # the file ends in rows without a target: consumed, not trained
                    run.state["tokens_seen"] += batch.untrained
                    run.position, run.dirty = batch.position, True
                break
            # 5. One optimizer step; a non-finite loss or gradient ends the file.
            failed = run.optimizer_step(batch)
            if failed is not None:
                return failed
            now = time.perf_counter()
            tps = run.real_tokens / max(now - t_last, 1e-9)
            t_last = now
            # 6. The step's metrics line, before its checkpoint: a kill between the two must
            #    not lose it (a resume from an older checkpoint redoes the step, and does not
            #    log it again).
            failed = run.log_step(tps)
            if failed is not None:
                return failed
            # 7. A checkpoint every checkpoint_every_steps / _minutes.
            if run.checkpoint_due():
                error = run.checkpoint()
                if error:
                    return run.finish("paused", error, disk=True)
            # 8. Progress for the daemon and the monitor.
            run.report_progress(tps, now - started)
            # 9. A loss spike: checkpoint, publish and pause for a person to look.
            if run.spike:
                error = run.checkpoint()
                if error:
                    return run.finish("paused", error, disk=True)
                return run.finish("spike", f"loss {run.last_loss:.4g} at step "
                                  f"{run.state['global_step']} is over {run.spike_factor:g}x the "
                                  "running average; paused for a person to look", publish="spike")
    finally:
        batches.close()
    # 10. The end of the file: its end checkpoint (the next file carries the optimizer
    #     over), then current_model.
    result = run.end_of_file()
    # 11. The model and AdamW stay in memory for the next file (what it would load from disk).
    run.keep_warm(result)
    return result


# A write refused for a reason free space does not fix: its own pause_reason and fix.
_NOT_WRITABLE = {errno.EROFS: "readonly", errno.EACCES: "permission", errno.EPERM: "permission"}
_WRITE_FIXES = {
    "disk": "free disk space, then resume",
    "readonly": "the filesystem holding the training root is read-only (remounted after an "
                "I/O error, or mounted so): check `dmesg`, remount it read-write (`mount -o "
                "remount,rw MOUNTPOINT`), then resume",
    "permission": "the training root is not writable by the daemon's user: give it back "
                  "(`chown -R USER ROOT` or `chmod -R u+w ROOT`), then resume"}


def _write_failure(exc: BaseException) -> str:
    """The pause_reason of a failed write: disk (full or failing), readonly or permission."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # safetensors wraps the OS error: "... (os error 30)"
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    return _NOT_WRITABLE.get(code, "disk")


def _io_reason(exc: BaseException) -> str:
    """'No space left on device' from an OSError or from safetensors' wrapped I/O error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    return match.group(1) if match else text


def _all_sum(value, world_size: int):
    """Sum a number over ranks (identity on one process; all_reduce under DDP)."""
    if world_size <= 1:
        return value
    import torch.distributed as dist
    is_int = isinstance(value, int)
    t = torch.tensor([value], dtype=torch.long if is_int else torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t.item()) if is_int else float(t.item())


def _broadcast(choice):
    """Rank 0's control decision, on every rank."""
    import torch.distributed as dist
    box = [choice]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- under torchrun

CHANNEL_ENV = "TRAINING_ENGINE_CHANNEL"  # JSON {control, progress, records_total} from the daemon
CONTROL_POLL_S = 0.2       # one stat of the decision file at most this often: free per step
ENGINE_LOCK_WAIT_S = 300   # a previous job's rank 0 may still be saving: wait, then refuse
RANK_FAILURE_GRACE_S = 15  # a failing non-zero rank waits this long so rank 0 reports first


class RankZeroChannel:
    """Rank 0's control() and progress() when training runs under torchrun.

    The daemon claims control requests itself and writes its decision (stop, pause,
    skip) atomically into a small JSON file, which this polls with one stat at most every
    0.2 s; the decision is then broadcast to every rank by train_file. Progress goes the
    other way: one atomic write per step, no fsync (a heartbeat is worthless after a power
    cut). An orphaned rank 0 (its torchrun gone) stops at the next step boundary, so no job
    ever trains on unsupervised.
    """

    def __init__(self, control_path=None, progress_path=None):
        self.control_path = Path(control_path) if control_path else None
        self.progress_path = Path(progress_path) if progress_path else None
        self.parent = os.getppid()
        self.decision = None
        self._polled = 0.0
        self._seen = None

    def control(self):
        now = time.monotonic()
        if self.decision == "stop" or now - self._polled < CONTROL_POLL_S:
            return self.decision
        self._polled = now
        if os.getppid() != self.parent:
            log.warning("torchrun (pid %d) is gone: stopping at the next step", self.parent)
            self.decision = "stop"
            return self.decision
        if self.control_path is None:
            return self.decision
        sig = file_signature(self.control_path)
        if sig is not None and sig != self._seen:
            self._seen = sig
            try:
                doc = read_json(self.control_path, default=None)
            except GuardrailError as exc:  # written atomically, so this is someone else's file
                log.warning("ignoring the control decision: %s", exc)
                return self.decision
            action = doc.get("action") if isinstance(doc, dict) else None
            if action in ("stop", "pause", "skip"):
                self.decision = action
        return self.decision

    def progress(self, info: dict) -> None:
        if self.progress_path is None:
            return
        try:
            atomic_write_json(self.progress_path, info, sync=False)
        except OSError as exc:  # a full disk pauses at the next checkpoint; progress is optional
            log.warning("cannot write progress to %s: %s", self.progress_path, exc)


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


def cmd_train(args) -> int:
    """Train one data file into ROOT/current_model (what the daemon does, for tests and benches)."""
    import training_config
    from trainroot import print_json, resolve_root
    root = resolve_root(args.root)
    config = training_config.load_config(root)
    for item in args.set or []:
        key, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError(item)
            config[key] = json.loads(value)
        except ValueError:  # json.JSONDecodeError is one
            raise UsageError(f"--set {item}: expected KEY=JSON (a string in JSON quotes)", "--set",
                             "Write it as e.g. `--set max_length=64` or `--set dtype='\"bfloat16\"'`.") from None
    errors = training_config.validate_config(config)
    if errors:
        raise training_config.ConfigError(errors, "--set")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    channel = json.loads(os.environ.get(CHANNEL_ENV) or "{}")
    talk = RankZeroChannel(channel.get("control"), channel.get("progress")) \
        if rank == 0 and (world_size > 1 or channel) else None
    if world_size > 1:  # started by torchrun: one process per rank, gloo on CPU, NCCL on GPUs
        import torch.distributed as dist
        if torch.cuda.is_available():
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
            if per_node > gpus:  # refused, so the daemon pauses instead of failing the data
                raise GuardrailError(
                    f"nproc_per_node {per_node} is more than the {gpus} GPU(s) visible here",
                    Paths(root).config, f"Set nproc_per_node to {gpus} or less in config.json "
                    "(or make more GPUs visible with CUDA_VISIBLE_DEVICES), then run "
                    "`python3 training_controller.py resume`.")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # The writer holds the engine lock: a new job never loads current_model while an old
    # job's rank 0 (orphaned, stopping) may still be saving it.
    lock = FileLock(Paths(root).lock("engine"), "training_engine train") if rank == 0 else None
    try:
        if lock:
            _take_engine_lock(root, lock, for_daemon=bool(channel))
        if world_size > 1:
            # every rank reads current_model and its checkpoint only once rank 0 holds the
            # lock: an orphaned job still saving would otherwise split the ranks' positions
            dist.barrier()
        result = train_file(root, args.data, file_id=args.file_id or Path(args.data).name,
                            config=config, records_total=channel.get("records_total"),
                            control=talk.control if talk else None,
                            progress=talk.progress if talk else None,
                            rank=rank, world_size=world_size)
    finally:
        if lock:
            lock.release()
        if world_size > 1:
            dist.destroy_process_group()
    if rank == 0:
        if args.json:
            print_json(result)
        else:
            print(f"{result['status']}: {result['message']}")
    return 0 if result["status"] in ("completed", "stopped", "paused", "skipped") else 1


def _take_engine_lock(root, lock: FileLock, *, for_daemon: bool) -> None:
    """The engine lock for `train`. A job the daemon launched (its channel in the environment)
    waits for a previous job's rank 0 to finish saving; run by hand, it refuses at once while
    a daemon is live or anyone trains: two writers would publish current_model and prune each
    other's checkpoints (docs/design.md, "The root")."""
    if for_daemon:
        lock.acquire(timeout=ENGINE_LOCK_WAIT_S)
        return
    from trainroot import BusyError, STOP_WAIT_COMMAND, read_lock_holder
    p = Paths(root)
    for name in ("daemon", "engine"):
        holder = read_lock_holder(p.lock(name))
        if holder is None and name == "engine":
            try:
                lock.acquire(timeout=0)
                return
            except BusyError:  # taken in between: name the holder as below
                holder = read_lock_holder(p.lock(name)) or {}
        if holder is None:
            continue
        pid, purpose = holder.get("pid") or "?", holder.get("purpose") or "unknown"
        if name == "daemon" or purpose.startswith("training_daemon"):
            raise BusyError(f"the training daemon (pid {pid}) is running on this root", p.root,
                            f"Stop it first with `{STOP_WAIT_COMMAND}` (or drop the file into "
                            "inbox/ for the daemon to train), then run this again.")
        raise BusyError(f"pid {pid} ({purpose}) is training this root", p.lock(name),
                        "Wait for it to finish, then run this again.")
def _line_range(text: str | None) -> tuple[int, float]:
    if not text:
        return 1, math.inf
    first, dash, last = text.partition("-")
    try:
        lo = int(first) if first else 1
        hi = (int(last) if last else math.inf) if dash else lo
    except ValueError:
        raise UsageError(f"--lines {text}: expected A-B, A- or A (line numbers)", "--lines",
                         "Write it as e.g. `--lines 1-20`.") from None
    return lo, hi


def cmd_show(args) -> int:
    """Show how each record of FILE is rendered for the current model, trained spans marked."""
    import training_config
    import validate_data
    from trainroot import resolve_root
    from transformers import AutoTokenizer
    _quiet_transformers()
    root = resolve_root(args.root)  # reads only: nothing is written in the root
    config = training_config.load_config(root)
    model_dir = Paths(root).current_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError for a missing or bad folder
        raise GuardrailError(f"cannot load the tokenizer ({exc.__class__.__name__})", model_dir,
                             "Run `python3 state_tracker.py --check` to see what is wrong with "
                             "current_model.") from None
    encoder = Encoder(tokenizer, loss_on_prompt=bool(config.get("loss_on_prompt")),
                      chat_template=config.get("chat_template"), root=root)
    lo, hi = _line_range(args.lines)
    color = not args.json and sys.stdout.isatty()
    console = None
    if color:
        from rich.console import Console
        from rich.text import Text
        console = Console(highlight=False)
    failed = 0
    for record in validate_data.iter_records(Path(args.file), **validate_data.read_settings(config)):
        if record.line < lo:
            continue
        if record.line > hi:
            break
        try:
            pieces, rendering = encoder.pieces(record, where=args.file)
        except GuardrailError as exc:
            failed += 1
            if args.json:
                print(json.dumps({"line": record.line, "rendering": encoder.rendering,
                                  "error": {"what": exc.what, "fix": exc.fix}}, ensure_ascii=False))
            else:
                print(f"line {record.line}: Error: {exc}", file=sys.stderr)
            continue
        if loss_on_prompt := bool(config.get("loss_on_prompt")):
            pieces = [(text, True) for text, _ in pieces]
        if args.json:
            print(json.dumps({"line": record.line, "rendering": rendering,
                              "segments": [{"text": t, "trained": on} for t, on in pieces]},
                             ensure_ascii=False))
        elif console is not None:
            console.rule(f"line {record.line} ({rendering}{', loss_on_prompt' if loss_on_prompt else ''})")
            text = Text()
            for t, on in pieces:
                text.append(t, style="bold green" if on else "dim")
            console.print(text, soft_wrap=True)
        else:
            print(f"--- line {record.line} ({rendering}); trained text is inside ⟦ ⟧")
            print("".join(f"⟦{t}⟧" if on else t for t, on in pieces))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_engine.py", description=__doc__.splitlines()[0])
    add = subcommands(parser)
    p = add("tiny", cmd_tiny, root=False)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = add("check", cmd_check, root=False)
    p.add_argument("model_dir")
    p = add("train", cmd_train)
    p.add_argument("data", help="a .jsonl data file")
    p.add_argument("--file-id", help="identity for checkpoints (default: the file name)")
    p.add_argument("--set", action="append", metavar="KEY=JSON",
                   help="override a config parameter for this run, e.g. --set max_length=64")
    p = add("show", cmd_show, json_out=False)
    p.add_argument("--json", action="store_true",
                   help='one JSON object per record per line: {"line", "rendering", "segments"}')
    p.add_argument("file", help="a .jsonl data file (anywhere: nothing is moved or written)")
    p.add_argument("--lines", metavar="A-B", help="only these line numbers, e.g. 1-20")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RANK", "0") == "0":
        return run_cli(build_parser(), argv)
    # one JSON document on stdout: rank 0's (errors too)
    code = run_cli(build_parser(), [a for a in argv if a != "--json"])
    if code:
        # Every rank refuses a bad file alike; torchrun ends the whole job when the first
        # rank exits, so a rank other than 0 waits for rank 0 to say why (its exit ends
        # this wait) instead of leaving only "rank 1 died".
        time.sleep(RANK_FAILURE_GRACE_S)
    return code


if __name__ == "__main__":
    exit_without_teardown(main())  # a torchrun job (and the daemon waiting on it) ends at once
