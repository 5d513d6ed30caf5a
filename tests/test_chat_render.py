"""Chat records render with the model's own template, for real templates, or are refused.

Real templates (tests/fixtures/chat_templates, README there) rendered with a real BPE
vocabulary (Qwen's, built offline: tests/chat_fixtures.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import chat_fixtures
from conftest import run_script, write_jsonl

SYSTEM = "Answer in one line. ✓"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>\nTwelve plus thirty.\n</think>\n\n42, exactly."},
    {"role": "user", "content": "And   doubled?  "},
    {"role": "assistant", "content": "<think>\n42 * 2\n</think>\n\nIt is 84 🙂"},
]
NO_SYSTEM = CONVERSATION[1:]
TEMPLATES_WITHOUT_SYSTEM = {"gemma-2", "mistral-nemo"}  # refuse / drop a system turn


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return chat_fixtures.cached_qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)


def encoder(tokenizer, name):
    """An Encoder rendering with a stored template (config.json's chat_template as a .jinja path)."""
    import training_engine as te
    return te.Encoder(tokenizer, chat_template=str(chat_fixtures.TEMPLATES / f"{name}.jinja"))


def records_of(path):
    import validate_data
    return list(validate_data.iter_records(Path(path)))


def answer_text(content: str) -> str:
    """The part of an assistant content every template keeps (after any think block)."""
    return content.split("</think>")[-1].strip()


def test_the_bpe_fixture_is_qwen(qwen_tokenizer):
    assert qwen_tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert qwen_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == \
        [151643, 151644, 151645]
    assert len(chat_fixtures.template_names()) >= 6


@pytest.mark.parametrize("name", chat_fixtures.template_names())
def test_every_real_template_trains_exactly_the_assistant_turns(name, qwen_tokenizer, tmp_path):
    tok = qwen_tokenizer
    messages = NO_SYSTEM if name in TEMPLATES_WITHOUT_SYSTEM else CONVERSATION
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}], ensure_ascii=False)
    rec = records_of(data)[0]
    enc = encoder(tok, name)
    pieces, rendering = enc.pieces(rec)
    assert rendering == "template"
    full = tok.apply_chat_template(messages, tokenize=False, chat_template=chat_fixtures.template(name))
    assert "".join(t for t, _ in pieces) == full
    trained = "".join(t for t, on in pieces if on)
    untrained = "".join(t for t, on in pieces if not on)
    for m in messages:
        if m["role"] == "assistant":
            assert answer_text(m["content"]) in trained, (name, pieces)
        else:
            assert m["content"].strip() not in trained and m["content"].strip() in untrained
    # the template's own end-of-turn marker trains; the newline after it does not
    tail = full[full.rindex(answer_text(messages[-1]["content"])) + len(answer_text(messages[-1]["content"])):]
    marker = tail.split("\n")[0]
    assert marker and trained.endswith(marker), (name, tail)
    assert not any(on and t.startswith("\n") and t.strip() == "" for t, on in pieces)
    # token labels follow the character spans, one tokenization of the whole rendering
    ids, labels = enc.encode(rec)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]  # no extra EOS after the marker
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert answer_text(messages[-1]["content"]) in learned and SYSTEM not in learned
    assert "user" not in learned.replace("user greets", "")


def test_qwen3_keeps_the_last_think_block_and_drops_earlier_ones(qwen_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    pieces, _ = encoder(qwen_tokenizer, "qwen3").pieces(records_of(data)[0])
    trained = [t for t, on in pieces if on]
    assert trained == ["42, exactly.<|im_end|>",
                       "<think>\n42 * 2\n</think>\n\nIt is 84 🙂<|im_end|>"]


def test_deepseek_r1_trains_what_its_template_renders(qwen_tokenizer, tmp_path):
    """Its generation prompt adds <think>\\n, which the rendered turn does not hold: the turn
    still trains (the old prefix check fell back to the plain format for every record)."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": NO_SYSTEM}])
    pieces, rendering = encoder(qwen_tokenizer, "deepseek-r1-distill-qwen").pieces(records_of(data)[0])
    assert rendering == "template"
    assert [t for t, on in pieces if on] == ["\n\n42, exactly.<｜end▁of▁sentence｜>",
                                              "\n\nIt is 84 🙂<｜end▁of▁sentence｜>"]


def test_a_template_that_cannot_render_a_record_is_refused_with_a_working_fix(qwen_tokenizer, tmp_path):
    import chat_render
    data = write_jsonl(tmp_path / "sys.jsonl", [{"messages": NO_SYSTEM}, {"messages": CONVERSATION}],
                       ensure_ascii=False)
    enc = encoder(qwen_tokenizer, "gemma-2")
    err = enc.check_file(data)
    assert isinstance(err, chat_render.ChatRenderError) and err.line == 2
    assert "line 2: " in err.what and "System role not supported" in err.what
    # the fix's jq command makes a file the template renders
    cmd = err.fix.split("`")[1]
    assert cmd.startswith("jq -c ")
    subprocess.run(cmd, shell=True, check=True, cwd=tmp_path)
    merged = tmp_path / "sys-merged.jsonl"
    assert enc.check_file(merged) is None
    first_user = json.loads(merged.read_text().splitlines()[1])["messages"][0]
    assert first_user == {"role": "user", "content": SYSTEM + "\n\n" + NO_SYSTEM[0]["content"]}


def test_plain_rendering_only_when_there_is_no_template_or_config_says_so(qwen_tokenizer, tmp_path):
    import training_engine as te
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    rec = records_of(data)[0]
    assert encoder(qwen_tokenizer, "gemma-2").check_file(data) is not None
    plain = te.Encoder(qwen_tokenizer, chat_template="plain")
    assert plain.rendering == "plain" and plain.check_file(data) is None
    assert plain.pieces(rec) == ([(t, bool(on)) for t, on in rec.segments], "plain")
    assert not qwen_tokenizer.chat_template
    assert te.Encoder(qwen_tokenizer).rendering == "plain"  # a model without a template


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="session")
def qwen_base(tmp_path_factory, qwen_dir) -> Path:
    """A small random Qwen2 model with the Qwen BPE tokenizer and Qwen2.5's template."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    out = tmp_path_factory.mktemp("qwen") / "base"
    tok = AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)
    tok.chat_template = chat_fixtures.template("qwen2.5")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_show_json_and_a_daemon_trained_chat_file_say_template(qwen_base, tmp_path, capsys):
    import training_engine as te
    import training_daemon
    from realdaemon import set_config
    root = tmp_path / "root"
    training_daemon.init_root(root, base=str(qwen_base))
    set_config(root, max_length=64, batch_size=1, grad_accum_steps=1, checkpoint_every_steps=0)
    good = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3, ensure_ascii=False)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert te.main(["show", str(good), "--json", "--lines", "2-3", "--root", str(root)]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["line"] for d in docs] == [2, 3] and {d["rendering"] for d in docs} == {"template"}
    full = "".join(s["text"] for s in docs[0]["segments"])
    assert full.startswith("<|im_start|>system\n" + SYSTEM)
    assert [s["text"] for s in docs[0]["segments"] if s["trained"]] == [
        CONVERSATION[2]["content"] + "<|im_end|>", CONVERSATION[4]["content"] + "<|im_end|>"]
    assert te.main(["show", str(good), "--lines", "1", "--root", str(root)]) == 0
    plain = capsys.readouterr().out  # not a terminal: trained text between ⟦ ⟧
    assert "⟦" + CONVERSATION[2]["content"] + "<|im_end|>⟧\n<|im_start|>user" in plain
    assert plain.count("⟦") == 3 and "--- line 1 (template); trained text is inside ⟦ ⟧" in plain
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # wrote nothing

    shutil.copy(good, root / "inbox" / "chat.jsonl")
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((root / "done" / "chat.jsonl.record.json").read_text())
    assert rec["outcome"] == "done" and rec["rendering"] == "template" and rec["steps"] >= 1


def test_the_daemon_moves_a_file_its_template_cannot_render_to_failed(qwen_base, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    base = tmp_path / "gemma-ish"
    shutil.copytree(qwen_base, base)
    cfg_path = base / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = chat_fixtures.template("gemma-2")
    cfg_path.write_text(json.dumps(tok_cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    (base / "chat_template.jinja").write_text(chat_fixtures.template("gemma-2"))
    import training_daemon
    training_daemon.init_root(root, base=str(base))
    write_jsonl(root / "inbox" / "sys.jsonl", [{"messages": CONVERSATION}], ensure_ascii=False)
    step_before = json.loads((root / "current_model" / "trainer_state.json").read_text())["global_step"]
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((root / "failed" / "sys.jsonl.record.json").read_text())
    assert rec["outcome"] == "failed"
    assert rec["reason"].startswith("line 1: the chat template") and "System role not supported" in rec["reason"]
    assert "jq -c " in rec["fix"] and str(root / "failed" / "sys.jsonl") in rec["fix"]
    assert "training_queue.py add" in rec["fix"]
    assert rec["result"]["status"] == "refused" and rec["result"]["steps"] == 0
    state = json.loads((root / "current_model" / "trainer_state.json").read_text())
    assert state["global_step"] == step_before  # not trained
    assert not list((root / "processing").glob("*.jsonl"))
