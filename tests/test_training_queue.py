"""training_queue.py: add validates then copies (or moves), order, priorities, remove never deletes."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script

import training_config
import training_queue
from trainroot import GuardrailError, Paths, sha256_file


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
    """Run `training_queue.py ARGS --json` in-process on ROOT (as $TRAINING_ROOT, so the
    commands it prints need no --root): (exit code, JSON, stderr)."""
    assert os.environ.get("TRAINING_ROOT") == str(root)
    code = training_queue.main([*args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def names_in(folder: Path) -> list[str]:
    """Data file names (no records, no hidden or temporary names such as a record being
    written)."""
    return sorted(n for n in os.listdir(folder) if not training_queue.is_ignored(n)) \
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
        f"{bad}. See `python3 validate_data.py {bad}`, fix the file, add it again (or "
        "add it with --skip-invalid: its valid records train, the others are listed).")
    assert out["ok"] is False
    assert bad.read_bytes() == before
    assert training_queue.list_queue(root) == []
    assert names_in(root / "queue" / ".incoming") == [] and names_in(root / "failed") == []
    # --skip-invalid says how many lines it passes over, in words and in --json
    code, out, _ = q(root, capsys, "add", str(bad), "--skip-invalid")
    assert code == 0 and out["skipped_records"]["count"] == 1 and out["records"] == 1
    plain = run_script("training_queue.py", "add", str(bad), "--skip-invalid", "--force", root=root)
    assert plain.stdout.strip() == ("Queued bad-2.jsonl (normal, 1 record); 1 invalid line(s) will be "
                                    "passed over, listed in its record (skipped_records)."), plain.stdout


def test_add_move_moves_the_file(root, tmp_path, capsys):
    f = data(tmp_path / "m.jsonl")
    content = f.read_bytes()
    code, out, _ = q(root, capsys, "add", str(f), "--move", "--priority", "low")
    assert code == 0
    assert not f.exists()
    assert (root / "queue" / "low" / "m.jsonl").read_bytes() == content


def test_add_missing_file(root, tmp_path, capsys):
    code, _, err = q(root, capsys, "add", str(tmp_path / "nope.jsonl"))
    assert code == 2
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

    code, _, err = q(root, capsys, "remove", "first.jsonl")   # not queued: says where it is
    assert code == 1
    skipped = root / "skipped" / "first.jsonl"
    assert err.strip() == (f"Error: first.jsonl was skipped (skipped/), not queued, {skipped}. "
                           f"`python3 training_queue.py add {skipped} --move --root {root}` queues it again.")
    code, _, err = q(root, capsys, "remove", "never.jsonl")
    assert code == 1
    assert err.strip() == (f"Error: never.jsonl is not in the queue, {root / 'queue'}. "
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


def test_a_done_record_whose_data_file_was_deleted_by_hand_stays(root):
    """`rm done/a.jsonl` (to free space): the next start removed its record as an orphan, so
    nothing said which version it trained into and the same content trained again. The record
    stays (marked `data_removed`, said once) and still refuses a copy; a mover's claim that
    never got its data (the same file still in processing/, same file_id) is removed."""
    trained = data(root / "done" / "a.jsonl")
    digest = sha256_file(trained)
    (root / "done" / "a.jsonl.record.json").write_text(json.dumps(
        {"name": "a.jsonl", "sha256": digest, "outcome": "done", "version_after": "v002",
         "file_id": "a.jsonl#1"}))
    trained.unlink()
    claim = root / "done" / "b.jsonl.record.json"  # a move processing/ -> done/ killed halfway
    source = data(root / "processing" / "b.jsonl")
    rec = {"name": "b.jsonl", "sha256": sha256_file(source), "file_id": "b.jsonl#1"}
    (root / "processing" / "b.jsonl.record.json").write_text(json.dumps(rec))
    claim.write_text(json.dumps(dict(rec, outcome="done", version_after="v003")))
    actions = training_queue.recover(root)
    assert not claim.exists() and f"removed orphan record {claim}" in actions
    kept = json.loads((root / "done" / "a.jsonl.record.json").read_text())
    assert kept["data_removed"] and [a for a in actions if "its data file was removed" in a]
    assert not [a for a in training_queue.recover(root) if "done" in a]  # said once
    copy = data(root.parent / "copy.jsonl")  # the same content
    assert sha256_file(copy) == digest
    with pytest.raises(GuardrailError, match=r"already trained: same content as done/a\.jsonl "
                       r"\(its data file since removed\) \(into version v002\)"):
        training_queue.enqueue(root, copy)
    assert training_queue.counts(root)["done"] == 1


def test_ignored_names():
    for name in (".x.jsonl", "a.tmp", "a.part", "a.partial", "a.jsonl~", ".a.jsonl.swp", "4913",
                 "a.jsonl.record.json"):
        assert training_queue.is_ignored(name), name
    for name in ("a.jsonl", "notes.txt", "a.swp.jsonl"):
        assert not training_queue.is_ignored(name), name


# --------------------------------------------------------------------------- hostile use

def test_content_already_queued_or_training_is_refused_unless_forced(root, tmp_path, capsys):
    first = data(tmp_path / "first.jsonl", tag="same")
    assert q(root, capsys, "add", str(first))[0] == 0
    twin = data(tmp_path / "twin.jsonl", tag="same")
    code, out, err = q(root, capsys, "add", str(twin))
    assert code == 1 and out["ok"] is False
    assert err.strip() == ("Error: already queued: same content as queue/normal/first.jsonl, "
                           f"{twin}. Add it with --force to queue a second copy anyway.")
    assert [i["name"] for i in training_queue.list_queue(root)] == ["first.jsonl"]
    code, out, _ = q(root, capsys, "add", str(twin), "--force")
    assert code == 0 and out["name"] == "twin.jsonl" and out["force"] is True

    # the daemon took the first for training: the same content is refused as being trained
    training_queue.move_with_record(root / "queue" / "normal" / "first.jsonl",
                                    root / "processing", {"sha256": out["sha256"]}, "training")
    code, _, err = q(root, capsys, "add", str(twin))
    assert code == 1 and "being trained: same content as processing/first.jsonl" in err
    # --move of a refused duplicate keeps it safe in skipped/, saying how to queue it anyway
    code, out, err = q(root, capsys, "add", str(twin), "--move")
    assert code == 1 and not twin.exists()
    assert out["outcome"] == "skipped" and out["path"] == str(root / "skipped" / "twin.jsonl")
    kept = root / "skipped" / "twin.jsonl"
    assert out["error"]["fix"] == (f"`python3 training_queue.py add {kept} --move --force "
                                   f"--root {root}` queues it anyway.")


def test_a_name_is_unique_across_the_priority_queues(root, tmp_path, capsys):
    assert q(root, capsys, "add", str(data(tmp_path / "a" / "n.jsonl", tag="1")),
             "--priority", "high")[0] == 0
    code, out, _ = q(root, capsys, "add", str(data(tmp_path / "b" / "n.jsonl", tag="2")),
                     "--priority", "low")
    assert code == 0 and out["name"] == "n-2.jsonl"       # not a second low/n.jsonl
    code, out, _ = q(root, capsys, "set-priority", "n.jsonl", "low")
    assert code == 0 and (out["name"], out["was"]) == ("n.jsonl", "high")

    # a root from before: the same name in two priorities is ambiguous, PRIORITY/NAME is not
    (root / "queue" / "normal").mkdir()
    (root / "queue" / "low" / "n-2.jsonl").rename(root / "queue" / "normal" / "n.jsonl")
    (root / "queue" / "low" / "n-2.jsonl.record.json").rename(
        root / "queue" / "normal" / "n.jsonl.record.json")
    code, _, err = q(root, capsys, "remove", "n.jsonl")
    assert code == 2
    assert err.strip() == (f"Error: n.jsonl is queued 2 times, {root / 'queue'}. Name one: "
                           "normal/n.jsonl or low/n.jsonl (see `python3 training_queue.py list`).")
    code, out, _ = q(root, capsys, "remove", "low/n.jsonl")
    assert code == 0 and out["priority"] == "low"
    assert [(i["name"], i["priority"]) for i in training_queue.list_queue(root)] == [
        ("n.jsonl", "normal")]
    for bad in ("", " ", ".", "..", "low/", "../.."):
        code, _, err = q(root, capsys, "remove", bad)
        assert code == 2 and err.startswith(f"Error: not a file name: {bad!r}."), err


def test_remove_says_where_the_file_went_and_how_to_undo(root, tmp_path, capsys, monkeypatch):
    src = data(tmp_path / "odd name ü.jsonl")
    assert q(root, capsys, "add", str(src), "--priority", "high", "--force")[0] == 0
    code = training_queue.main(["remove", "odd name ü.jsonl", "--root", str(root)])
    out = capsys.readouterr().out
    dst = root / "skipped" / "odd name ü.jsonl"
    undo = f"python3 training_queue.py add '{dst}' --move --priority high --force --root {root}"
    assert code == 0 and dst.read_bytes() == src.read_bytes()
    assert out == (f"Moved odd name ü.jsonl out of the queue to {dst} (nothing deleted).\n"
                   f"Undo: {undo}\n")
    # the undo, run as printed (the root is $TRAINING_ROOT here), puts it back where it was
    argv = shlex.split(undo)[2:]
    assert training_queue.main(argv) == 0
    capsys.readouterr()
    assert [(i["name"], i["priority"]) for i in training_queue.list_queue(root)] == [
        ("odd name ü.jsonl", "high")]
    assert names_in(root / "skipped") == []

    # the undo names its root, so it also works from a shell without $TRAINING_ROOT
    monkeypatch.delenv("TRAINING_ROOT")
    out = training_queue.remove(root, "odd name ü.jsonl")
    assert out["undo"] == undo


def test_the_failed_record_of_a_json_array_gzip_or_utf16_file_names_a_working_conversion(root):
    """Dropped as data.json (an array), logs.jsonl (gzip) or u16.jsonl (UTF-16): the failed/
    record's fix was `mv ... inbox/data.jsonl` (failing again: its shape was read after the
    move, from where the file was not yet) or `--skip-invalid` (refused for a whole-file
    problem). Each names the command that writes it as JSON lines into the inbox."""
    import gzip
    lines = '{"text": "a"}\n{"text": "b"}\n'
    drops = {"data.json": b'[{"text": "a"}, {"text": "b"}]\n', "logs.jsonl": gzip.compress(lines.encode()),
             "u16.jsonl": lines.encode("utf-16")}
    for name, blob in drops.items():
        src = root / "inbox" / name
        src.write_bytes(blob)
        out = training_queue.enqueue(root, src, move=True)
        assert out["outcome"] == "failed", out
        fix = training_queue.read_record(Path(out["path"]))["fix"]
        assert fix == out["fix"] and fix.endswith("writes it as JSON lines into the inbox (one object "
                                                  "per line), where the daemon takes it."), fix
        proc = subprocess.run(fix.split("`")[1], shell=True, cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, (fix, proc.stderr)
        made = root / "inbox" / (Path(name).stem + ".jsonl")
        assert [json.loads(x) for x in made.read_text().splitlines()] == [{"text": "a"}, {"text": "b"}]
        made.unlink()


def test_add_move_never_takes_a_file_of_the_root_s_own(root, capsys):
    """`add R/versions/v001/config.json --move` (and current_model/, checkpoints/, .index/,
    config.json) moved the file to failed/ ("not a .jsonl file"): the version was damaged.
    Only inbox/, failed/ and skipped/ give files up; the rest is refused, nothing moved."""
    own = {root / "versions" / "v001" / "config.json": "versions/",
           root / "current_model" / "tokenizer_config.json": "current_model/",
           root / "checkpoints" / "checkpoint-00000001" / "meta.json": "checkpoints/",
           root / ".index" / "done.sqlite": ".index/", root / "config.json": "the root"}
    for path, where in own.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("{}\n")
        before = path.read_bytes()
        code, _, err = q(root, capsys, "add", str(path), "--move")
        assert code == 2 and err.startswith(f"Error: refusing to move a file out of {where} "), err
        assert path.read_bytes() == before and not os.listdir(root / "failed")
    back = data(root / "failed" / "fixed.jsonl")  # the places a person takes files back from
    assert q(root, capsys, "add", str(back), "--move")[0] == 0 and not back.exists()


def test_the_undo_of_remove_works_with_a_forced_copy_queued(root, tmp_path, capsys):
    """`add u1`, `add u1copy --force` (the same content), `remove u1`: the printed undo was
    refused ("already queued: same content as u1copy ... --force"). It carries --force."""
    assert q(root, capsys, "add", str(data(tmp_path / "u1.jsonl")))[0] == 0
    assert q(root, capsys, "add", str(data(tmp_path / "u1copy.jsonl")), "--force")[0] == 0
    undo = training_queue.remove(root, "u1.jsonl")["undo"]
    assert "--force" in undo
    assert training_queue.main(shlex.split(undo)[2:]) == 0
    assert sorted(i["name"] for i in training_queue.list_queue(root)) == ["u1.jsonl", "u1copy.jsonl"]


def test_a_file_being_trained_or_trained_is_not_taken_by_queue_commands(root, tmp_path, capsys):
    busy = data(root / "processing" / "busy.jsonl")
    trained = data(root / "done" / "old.jsonl", tag="old")
    before = busy.read_bytes()
    code, _, err = q(root, capsys, "remove", "busy.jsonl")
    assert code == 1
    # no daemon runs: it was stopped part-way, and `skip` alone would find nothing to act on
    assert err.strip() == (f"Error: busy.jsonl was stopped part-way (processing/), not queued: it "
                           f"resumes from its checkpoint when the daemon starts, {busy}. To skip it "
                           "instead: `python3 training_controller.py pause` (kept until the daemon "
                           "starts), start the daemon (`python3 training_daemon.py run`), then "
                           "`python3 training_controller.py skip`, then `python3 "
                           "training_controller.py resume`.")
    status = run_script("training_queue.py", "status", root=root)
    assert "stopped part-way: busy.jsonl (resumes when the daemon starts)" in status.stdout
    skip = run_script("training_controller.py", "skip", root=root)
    assert skip.returncode == 0 and "nothing to skip now; busy.jsonl waits in processing/" in skip.stdout
    # `skip --discard`: the recipe keeps --discard (it said `skip`, keeping the bad steps)
    skip = run_script("training_controller.py", "skip", "--discard", root=root)
    assert "to skip it and drop its training instead: " in skip.stdout
    assert "then `python3 training_controller.py skip --discard`, then" in skip.stdout
    assert q(root, capsys, "set-priority", "busy.jsonl", "high")[0] == 1
    assert "was trained already (done/)" in q(root, capsys, "remove", "old.jsonl")[2]
    for path, folder in ((busy, "processing"), (trained, "done")):
        code, _, err = q(root, capsys, "add", str(path), "--move", "--force")
        assert code == 2 and err.startswith(f"Error: refusing to move a file out of {folder}/")
    assert busy.read_bytes() == before and trained.exists()
    assert training_queue.list_queue(root) == []


def test_add_refuses_what_is_not_a_readable_file(root, tmp_path, capsys):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)                   # opening it would block: refused before
    link = tmp_path / "link.jsonl"
    link.symlink_to(data(tmp_path / "target.jsonl"))
    for path, what in ((folder, "is a directory, not a data file"),
                       (fifo, "not a regular file (a pipe, socket or device)")):
        code, out, err = q(root, capsys, "add", str(path))
        assert code == 2 and err.startswith(f"Error: {what}, {path}.") and out["ok"] is False
    code, _, err = q(root, capsys, "add", str(link), "--move")
    assert code == 2 and "a symbolic link" in err and link.is_symlink()
    assert q(root, capsys, "add", str(link))[0] == 0           # a copy of its content
    assert not (root / "queue" / "normal" / "link.jsonl").is_symlink()


def test_a_very_long_name_is_shortened_not_a_crash(root, tmp_path, capsys):
    long_name = "é" + "x" * 240 + ".jsonl"                      # 248 bytes: no room for a record
    src = data(tmp_path / long_name)
    code, out, err = q(root, capsys, "add", str(src))
    assert code == 0, err
    assert out["name"].endswith(".jsonl") and len(out["name"].encode()) <= 200
    code, out2, _ = q(root, capsys, "add", str(src), "--force")
    assert code == 0 and out2["name"] != out["name"]
    rec = training_queue.read_record(root / "queue" / "normal" / out["name"])
    assert rec["original_name"] == long_name


def test_a_hidden_name_is_queued_visible_not_lost(root, tmp_path, capsys):
    """A hidden name in queue/ would be skipped by `list` and by the daemon forever."""
    code, out, _ = q(root, capsys, "add", str(data(tmp_path / ".notes.jsonl")))
    assert code == 0 and out["name"] == "notes.jsonl"
    assert [i["name"] for i in training_queue.list_queue(root)] == ["notes.jsonl"]
    assert training_queue.fit_name("4913") == "4913.file"
    assert training_queue.fit_name("a.jsonl~") == "a.jsonl~.file"


def test_add_validates_with_the_roots_max_record_bytes(root, tmp_path, capsys):
    training_config.write_config(root, training_config.default_config(max_record_bytes=1500))
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "y" * 2000}) + "\n")
    code, _, err = q(root, capsys, "add", str(big))
    assert code == 1 and "over max_record_bytes 1,500" in err


def test_re_adding_a_still_invalid_file_from_failed_leaves_it_there(root, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    code, out, err = q(root, capsys, "add", str(bad), "--move")
    failed = root / "failed" / "bad.jsonl"
    assert code == 1 and out["path"] == str(failed) and failed.exists()
    assert out["error"]["fix"] == (f"Fix it, then `python3 training_queue.py add {failed} --move "
                                   f"--root {root}`.")
    code, _, err = q(root, capsys, "add", str(failed), "--move")
    assert code == 1 and "not queued" in err
    assert names_in(root / "failed") == ["bad.jsonl"]             # not renamed to bad-2.jsonl


def test_move_with_record_takes_a_name_too_long_for_a_record(root, tmp_path):
    """The daemon's intake moves inbox files under their own names: a 255-byte one once
    left the daemon logging a failed intake for a file it had queued."""
    src = data(root / "queue" / ".incoming" / "normal" / ("z" * 249 + ".jsonl"))
    dst = training_queue.move_with_record(src, root / "queue" / "normal", {"sha256": "x"},
                                          "queued")
    assert dst.exists() and not src.exists() and len(dst.name.encode()) <= 200
    assert training_queue.read_record(dst)["name"] == dst.name


@pytest.mark.slow
def test_queue_commands_beside_a_running_daemon(initialized_root, tmp_path):
    """With the daemon training a file: it cannot be removed or re-added, others can."""
    root = initialized_root
    cfg = training_config.load_config(root)
    cfg["loss_spike_factor"] = 1000.0              # no pause for a person mid-test
    training_config.write_config(root, cfg)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"record {i} " + "lorem ipsum " * 20}) + "\n"
                           for i in range(3000)))
    assert run_script("training_queue.py", "add", str(big), root=root).returncode == 0
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run",
                               "--no-monitor"], env=dict(os.environ, TRAINING_ROOT=str(root)),
                              cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not names_in(root / "processing") and time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        assert names_in(root / "processing") == ["big.jsonl"]

        proc = run_script("training_queue.py", "remove", "big.jsonl", root=root)
        assert proc.returncode == 1 and "big.jsonl is being trained now" in proc.stderr
        proc = run_script("training_queue.py", "add", str(big), root=root)
        assert proc.returncode == 1
        assert "being trained: same content as processing/big.jsonl" in proc.stderr
        other = data(tmp_path / "other.jsonl", tag="other")
        assert run_script("training_queue.py", "add", str(other), "--priority", "low",
                          root=root).returncode == 0
        proc = run_script("training_queue.py", "remove", "other.jsonl", "--json", root=root)
        assert proc.returncode == 0 and json.loads(proc.stdout)["path"] == str(
            root / "skipped" / "other.jsonl")
        status = json.loads(run_script("training_queue.py", "status", "--json",
                                       root=root).stdout)
        assert status["processing"] == ["big.jsonl"] and status["counts"]["skipped"] == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()
    assert names_in(root / "processing") == ["big.jsonl"]     # stopped: resumes at next start
    assert (root / "processing" / "big.jsonl").read_bytes() == big.read_bytes()


RACING_MOVER = """
import hashlib, os, sys, time
from pathlib import Path
import training_queue
src_dir, dst_dir, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
for src in sorted(src_dir.iterdir()):
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    training_queue.move_with_record(src, dst_dir, {"sha256": sha}, "queued", name="same.jsonl")
"""


def test_two_movers_racing_for_one_name_each_keep_their_own_record(root, tmp_path):
    """Two processes moving files under one name into one folder: every file ends with
    its own record (a name claimed by one mover is never written over by the other)."""
    dst, go = root / "queue" / "normal", tmp_path / "go"
    movers = []
    for tag in ("a", "b"):
        for i in range(60):
            data(tmp_path / tag / f"{i:03d}.jsonl", tag=f"{tag}{i}")
        movers.append(subprocess.Popen(
            [sys.executable, "-c", RACING_MOVER, str(tmp_path / tag), str(dst), str(go)],
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))))
    go.touch()
    assert [m.wait(120) for m in movers] == [0, 0]
    moved = names_in(dst)
    assert len(moved) == 120
    for name in moved:
        record = training_queue.read_record(dst / name)
        assert record["name"] == name
        assert record["sha256"] == hashlib.sha256((dst / name).read_bytes()).hexdigest(), name


def test_a_file_the_daemon_cannot_read_goes_to_failed_with_the_chmod_fix(root, monkeypatch):
    """Mode 000 under a daemon that is not the owner (these tests run as root, which reads
    anything, so the OS's refusal is stood in for): failed/ with the reason and the fix,
    never left half-taken in queue/.incoming/."""
    src = data(root / "queue" / ".incoming" / "normal" / "locked.jsonl")

    def refuse(path, *args, **kw):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(training_queue, "sha256_file", refuse)
    rec = training_queue.enqueue(root, src, move=True, source="inbox")
    assert rec["outcome"] == "failed" and rec["reason"] == "cannot be read (Permission denied)"
    dst = root / "failed" / "locked.jsonl"
    assert dst.exists() and not src.exists()
    assert rec["fix"].startswith(f"Make it readable for the daemon's user (`chmod a+r {dst}`)")
    assert training_queue.read_record(dst)["fix"] == rec["fix"]


def _sync_log(monkeypatch) -> list[tuple[str, str]]:
    """Record, in order, each fsync (by the path of its fd) and each name given to a file
    (a record claimed by link, a temp file replaced, a data file renamed)."""
    import trainroot
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace
    real_renameat2 = trainroot._renameat2

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst, *a, **kw):
        events.append(("name", str(dst)))
        return real_link(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        events.append(("name", str(dst)))
        return real_replace(src, dst, *a, **kw)

    def renameat2(src, dst, flags):
        events.append(("name", str(dst)))
        return real_renameat2(src, dst, flags)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(trainroot, "_renameat2", renameat2)
    return events


def test_a_queued_files_content_is_fsynced_before_its_record_names_it(root, tmp_path, capsys,
                                                                       monkeypatch):
    """A record saying "queued, 3,000 records" must never reach the disk before the data
    does: after a power cut that was a 0-byte file the daemon then 'trained'."""
    cfg = training_config.load_config(root)
    events = _sync_log(monkeypatch)
    # the daemon's intake: a file claimed into queue/.incoming/ (renamed, never synced)
    claimed = data(root / "queue" / ".incoming" / "normal" / "dropped.jsonl", tag="drop")
    batch = training_queue.SyncBatch()
    rec = training_queue.enqueue(root, claimed, move=True, cfg=cfg, source="inbox", batch=batch)
    batch.flush()
    # `add --move` of a file written a moment ago
    moved = data(tmp_path / "moved.jsonl", tag="moved")
    assert q(root, capsys, "add", str(moved), "--move")[0] == 0
    assert rec["outcome"] == "queued"
    for name in ("dropped.jsonl", "moved.jsonl"):
        queued = root / "queue" / "normal" / name
        names = [i for i, (kind, path) in enumerate(events) if kind == "name" and path in (
            str(queued), str(training_queue.record_path(queued)))]
        synced = [i for i, (kind, path) in enumerate(events)
                  if kind == "fsync" and os.path.basename(path) == name]
        assert names and synced and synced[0] < names[0], (name, events)


def test_set_priority_or_remove_of_a_file_the_daemon_just_took_says_so(root, tmp_path, capsys,
                                                                       monkeypatch):
    """The daemon takes the file between the command's look at the queue and its move."""
    for n in ("taken", "other"):
        assert q(root, capsys, "add", str(data(tmp_path / f"{n}.jsonl", tag=n)))[0] == 0
    real_find = training_queue.find_queued

    def find_then_daemon_takes_it(r, name):
        item = real_find(r, name)
        training_queue.move_with_record(item["path"], root / "processing",
                                        training_queue.read_record(item["path"]), "training")
        return item
    monkeypatch.setattr(training_queue, "find_queued", find_then_daemon_takes_it)
    taken = root / "processing" / "taken.jsonl"
    for args in (("set-priority", "taken.jsonl", "high"), ("remove", "taken.jsonl")):
        if not (root / "queue" / "normal" / "taken.jsonl").exists():   # put it back for the next
            training_queue.move_with_record(taken, root / "queue" / "normal",
                                            training_queue.read_record(taken), "back")
        code, out, err = q(root, capsys, *args)
        assert code == 1, err
        assert err.strip() == (
            f"Error: taken.jsonl left the queue while this ran: the daemon took it for training "
            f"(it is in processing/ now), {taken}. See `python3 training_controller.py status`; "
            "`python3 training_controller.py skip` abandons it (to skipped/, nothing is lost).")
        assert names_in(root / "processing") == ["taken.jsonl"]
        assert names_in(root / "skipped") == [] and names_in(root / "queue" / "high") == []


def test_a_clock_stepped_back_never_puts_a_new_file_before_older_ones(root, tmp_path, capsys,
                                                                      monkeypatch):
    """Arrival order is a sequence, not the wall clock: NTP stepping the clock back a day
    (or a VM resumed) between two adds keeps the second after the first."""
    real_ns = time.time_ns
    q(root, capsys, "add", str(data(tmp_path / "first.jsonl", tag="first")))
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() - 86_400 * 10**9)
    q(root, capsys, "add", str(data(tmp_path / "second.jsonl", tag="second")))
    # the counter's last write lost in a crash: the daemon's start-up recovery raises it
    (root / "queue" / ".seq").unlink(missing_ok=True)
    training_queue.recover(root)
    q(root, capsys, "add", str(data(tmp_path / "third.jsonl", tag="third")))
    order = ["first.jsonl", "second.jsonl", "third.jsonl"]
    items = training_queue.list_queue(root)
    assert [i["name"] for i in items] == order
    assert items[0]["seq"] < items[1]["seq"] < items[2]["seq"]
    # the daemon's view of the queue (a record read once per file) agrees, across changes
    view = training_queue.QueueOrder(root)
    assert [p.name for p in view.paths()] == order
    assert q(root, capsys, "set-priority", "third.jsonl", "high")[0] == 0
    assert q(root, capsys, "remove", "first.jsonl")[0] == 0
    assert [p.name for p in view.paths()] == ["third.jsonl", "second.jsonl"]
    assert [p.name for p in view.paths()] == [i["name"] for i in training_queue.list_queue(root)]


@pytest.mark.parametrize("name, content, jq", [
    ("export.json", json.dumps([{"text": "a"}, {"text": "b"}], indent=2), "jq -c '.[]'"),
    ("export.jsonl", json.dumps([{"text": "a"}, {"text": "b"}]), "jq -c '.[]'"),
    ("pretty.jsonl", json.dumps({"text": "a"}, indent=2) + "\n" + json.dumps({"text": "b"}, indent=2),
     "jq -c ."),
])
def test_json_that_is_not_json_lines_fails_once_with_a_command_that_works(root, tmp_path, name,
                                                                          content, jq):
    """What the intake does with a dropped file: failed/ with one reason and a fix whose
    command, run as given, writes JSON lines that then queue."""
    src = tmp_path / name
    src.write_text(content + "\n")
    rec = training_queue.enqueue(root, src, move=True, source="inbox")
    assert rec["outcome"] == "failed"
    failed = Path(rec["path"])
    assert rec["fix"].startswith(f"`{jq} {failed} > {Paths(root).inbox / 'export.jsonl'}`"
                                 if name.startswith("export") else f"`{jq} {failed} > ")
    if name.endswith(".jsonl"):
        assert [e["code"] for e in rec["report"]["errors"]] == \
            ["json_array" if name.startswith("export") else "pretty_printed"]
    command = rec["fix"].split("`")[1]
    subprocess.run(command, shell=True, check=True)
    out = Paths(root).inbox / (Path(name).stem + ".jsonl")
    assert out.read_text() == '{"text":"a"}\n{"text":"b"}\n'
    again = training_queue.enqueue(root, out, move=True, source="inbox")
    assert again["outcome"] == "queued" and again["records"] == 2


def test_the_rename_a_wrong_suffix_is_given_never_doubles_jsonl(root, tmp_path):
    import training_queue
    cases = {"x.JSONL": "x.jsonl", "x.json": "x.jsonl", "x": "x.jsonl", "y.jsonl.part": "y.jsonl",
             "y.jsonl.tmp": "y.jsonl", "y.jsonl.part.file": "y.jsonl", ".jsonl": ".jsonl.jsonl"}
    assert {name: training_queue.jsonl_name(name) for name in cases} == cases
    src = tmp_path / "y.jsonl.part"
    src.write_text('{"text": "a"}\n')
    proc = run_script("training_queue.py", "add", str(src), root=root)
    assert proc.returncode == 1
    assert f"(`mv {src} {tmp_path / 'y.jsonl'}`)" in proc.stderr, proc.stderr
    (tmp_path / "y.jsonl").write_text('{"text": "the finished copy"}\n')  # never renamed over
    proc = run_script("training_queue.py", "add", str(src), root=root)
    assert f"(`mv {src} {tmp_path / 'y-2.jsonl'}`)" in proc.stderr, proc.stderr


def test_a_path_relative_to_the_root_is_found_from_any_folder(root, tmp_path):
    """`add done/NAME.jsonl --force` as the docs write it, run from the scripts' folder (the
    path is the root's, not the working folder's)."""
    data(root / "done" / "old.jsonl", tag="old")
    proc = run_script("training_queue.py", "add", "done/old.jsonl", "--force", root=root)
    assert proc.returncode == 0, proc.stderr
    assert names_in(root / "queue" / "normal") == ["old.jsonl"]
    assert (root / "done" / "old.jsonl").exists()  # copied: the trained file stays where it is


def test_add_move_of_an_inbox_file_the_daemon_took_meanwhile_says_so(root):
    """`add --move inbox/X` racing the daemon's intake: not "check the path", nor a
    permission or free-space fix, but that the daemon takes inbox files by itself."""
    gone = root / "inbox" / "taken.jsonl"  # (the daemon took it just before)
    proc = run_script("training_queue.py", "add", str(gone), "--move", root=root)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: taken.jsonl is not in the inbox (any more): the daemon "
                                  "takes what is dropped there by itself"), proc.stderr
    assert "python3 training_queue.py list" in proc.stderr


def test_a_rerun_after_a_mover_was_killed_between_its_steps_keeps_the_name(root, tmp_path):
    """kill -9 of `add --move` after it wrote the new record, before the rename: the rerun
    reuses the name its own record claimed (same content), and a stale orphan's; a fresh
    record of other content is someone's claim in progress and still blocks the name."""
    import hashlib
    src = data(tmp_path / "x.jsonl", tag="x")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    normal = root / "queue" / "normal"
    normal.mkdir(parents=True, exist_ok=True)
    (normal / "x.jsonl.record.json").write_text(json.dumps({"name": "x.jsonl", "sha256": sha}))
    assert run_script("training_queue.py", "add", str(src), "--move", root=root).returncode == 0
    assert names_in(normal) == ["x.jsonl"] and training_queue.read_record(normal / "x.jsonl")["sha256"] == sha
    for age, expected in ((0, "y-2.jsonl"), (3600, "y.jsonl")):
        other = data(tmp_path / "y.jsonl", tag=f"y{age}")
        orphan = normal / "y.jsonl.record.json"
        orphan.write_text(json.dumps({"name": "y.jsonl", "sha256": "0" * 64}))
        os.utime(orphan, (time.time() - age, time.time() - age))
        assert run_script("training_queue.py", "add", str(other), "--move", root=root).returncode == 0
        assert expected in names_in(normal), names_in(normal)
        for n in ("y.jsonl", "y-2.jsonl"):
            if (normal / n).exists():
                training_queue.remove(root, n)
        orphan.unlink(missing_ok=True)
