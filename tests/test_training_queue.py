"""training_queue.py: add validates then copies (or moves), order, priorities, remove never deletes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import training_config
import training_queue
from trainroot import Paths


@pytest.fixture
def root(tmp_root) -> Path:
    """A root with a config (the queue needs no model)."""
    Paths(tmp_root).ensure()
    training_config.write_config(tmp_root, training_config.default_config())
    return tmp_root


def data(path: Path, n: int = 2, tag: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{tag} {i}"}) + "\n" for i in range(n)))
    return path


def q(root: Path, capsys, *args: str) -> tuple[int, dict | None, str]:
    """Run `training_queue.py ARGS --json --root ROOT` in-process: (exit code, JSON, stderr)."""
    code = training_queue.main([*args, "--json", "--root", str(root)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def names_in(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.endswith(".record.json")) \
        if folder.is_dir() else []


def test_add_copies_and_list_orders_by_priority_then_arrival(root, tmp_path, capsys):
    src = {n: data(tmp_path / "src" / f"{n}.jsonl", tag=n) for n in "abcd"}
    for name, prio in (("a", "normal"), ("b", "high"), ("c", "low"), ("d", "normal")):
        code, out, err = q(root, capsys, "add", str(src[name]), "--priority", prio)
        assert code == 0, err
        assert out["ok"] and out["outcome"] == "queued" and out["priority"] == prio
        assert out["records"] == 2
        assert out["sha256"] == hashlib.sha256(src[name].read_bytes()).hexdigest()
    assert all(p.exists() for p in src.values())  # copied, not moved
    code, out, _ = q(root, capsys, "list")
    assert [i["name"] for i in out["queue"]] == ["b.jsonl", "a.jsonl", "d.jsonl", "c.jsonl"]
    assert (root / "queue" / "high" / "b.jsonl").read_bytes() == src["b"].read_bytes()
    assert names_in(root / "queue" / ".incoming") == []  # no temp copy left behind
    code, out, _ = q(root, capsys, "status")
    assert out["counts"]["queued"] == 4 and out["counts"]["high"] == 1 and out["counts"]["low"] == 1


def test_add_same_name_twice_gets_a_unique_name(root, tmp_path, capsys):
    f = data(tmp_path / "n.jsonl", tag="one")
    assert q(root, capsys, "add", str(f))[0] == 0
    data(f, tag="two")
    code, out, _ = q(root, capsys, "add", str(f))
    assert code == 0 and out["name"] == "n-2.jsonl"
    assert names_in(root / "queue" / "normal") == ["n-2.jsonl", "n.jsonl"]


def test_add_invalid_file_is_refused_and_left_where_it_was(root, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    before = bad.read_bytes()
    code, out, err = q(root, capsys, "add", str(bad))
    assert code == 1
    assert err.strip() == (
        "Error: invalid: 1 error; first: line 2: Expecting value (column 1); not queued, "
        f"{bad}. See `python3 validate_data.py {bad}`, fix the file, add it again.")
    assert out["ok"] is False
    assert bad.read_bytes() == before
    assert training_queue.list_queue(root) == []
    assert names_in(root / "queue" / ".incoming") == [] and names_in(root / "failed") == []


def test_add_move_moves_the_file(root, tmp_path, capsys):
    f = data(tmp_path / "m.jsonl")
    content = f.read_bytes()
    code, out, _ = q(root, capsys, "add", str(f), "--move", "--priority", "low")
    assert code == 0
    assert not f.exists()
    assert (root / "queue" / "low" / "m.jsonl").read_bytes() == content


def test_add_missing_file(root, tmp_path, capsys):
    code, _, err = q(root, capsys, "add", str(tmp_path / "nope.jsonl"))
    assert code == 1
    assert err.strip() == f"Error: data file not found, {tmp_path / 'nope.jsonl'}. Check the path and try again."


def test_already_trained_content_needs_force(root, tmp_path, capsys):
    trained = data(root / "processing" / "old.jsonl", tag="same")
    digest = hashlib.sha256(trained.read_bytes()).hexdigest()
    training_queue.move_with_record(trained, root / "done", {
        "sha256": digest, "outcome": "done", "version_after": "v007"}, "trained")
    again = data(tmp_path / "again.jsonl", tag="same")
    code, _, err = q(root, capsys, "add", str(again))
    assert code == 1
    assert err.strip() == (
        "Error: already trained: same content as done/old.jsonl (into version v007), "
        f"{again}. Add it with --force to train it again.")
    assert training_queue.list_queue(root) == []
    code, out, _ = q(root, capsys, "add", str(again), "--force")
    assert code == 0 and out["force"] is True
    assert [i["name"] for i in training_queue.list_queue(root)] == ["again.jsonl"]


def test_set_priority_keeps_arrival_and_remove_moves_to_skipped(root, tmp_path, capsys):
    for n in ("first", "second"):
        assert q(root, capsys, "add", str(data(tmp_path / f"{n}.jsonl", tag=n)))[0] == 0
    seq = {i["name"]: i["seq"] for i in training_queue.list_queue(root)}
    code, out, _ = q(root, capsys, "set-priority", "second.jsonl", "high")
    assert code == 0 and out["changed"] is True
    items = training_queue.list_queue(root)
    assert [(i["name"], i["priority"]) for i in items] == [("second.jsonl", "high"),
                                                           ("first.jsonl", "normal")]
    assert {i["name"]: i["seq"] for i in items} == seq
    assert names_in(root / "queue" / "normal") == ["first.jsonl"]

    code, out, _ = q(root, capsys, "remove", "first.jsonl")
    assert code == 0
    assert names_in(root / "skipped") == ["first.jsonl"]
    rec = json.loads((root / "skipped" / "first.jsonl.record.json").read_text())
    assert rec["reason"] == "removed from the queue" and rec["outcome"] == "skipped"
    assert [h["to"] for h in rec["history"]] == ["normal", "skipped"]
    assert [i["name"] for i in training_queue.list_queue(root)] == ["second.jsonl"]

    code, _, err = q(root, capsys, "remove", "first.jsonl")
    assert code == 1
    assert err.strip() == (f"Error: first.jsonl is not in the queue, {root / 'queue'}. "
                           "See `python3 training_queue.py list`.")


def test_recover_removes_orphan_records_and_requeues_recordless_files(root):
    orphan = root / "done" / "gone.jsonl.record.json"
    orphan.write_text("{}")
    lost = data(root / "queue" / "high" / "lost.jsonl")  # its record never reached the disk
    failed = data(root / "failed" / "f.jsonl")
    actions = training_queue.recover(root)
    assert not orphan.exists()
    assert not lost.exists() and (root / "queue" / ".incoming" / "high" / "lost.jsonl").exists()
    assert json.loads((root / "failed" / "f.jsonl.record.json").read_text())["outcome"] == "failed"
    assert len(actions) == 3
    assert failed.exists()


def test_ignored_names():
    for name in (".x.jsonl", "a.tmp", "a.part", "a.partial", "a.jsonl~", ".a.jsonl.swp", "4913",
                 "a.jsonl.record.json"):
        assert training_queue.is_ignored(name), name
    for name in ("a.jsonl", "notes.txt", "a.swp.jsonl"):
        assert not training_queue.is_ignored(name), name
