"""metrics.jsonl for years: monthly gzip segments, summaries, and every reader across rotation."""

from __future__ import annotations

import gzip
import os
import json
from pathlib import Path

import pytest

import metrics_log
import monitor_server
import state_tracker
import training_engine
from trainroot import GuardrailError


def _lines(files: list[tuple[str, int]], month: str = "2026-01", step0: int = 0) -> bytes:
    """Engine-shaped lines: `n` steps for each (file, n), then the file's eval line."""
    out, step = [], step0
    for name, n in files:
        for i in range(n):
            step += 1
            out.append({"time": f"{month}-05T10:00:{i % 60:02d}.000000Z", "global_step": step,
                        "file": name, "file_id": f"{name}-abc", "loss": 2.0 + (i % 7) / 10,
                        "lr": 1e-4, "tokens_per_sec": 100.0 + i, "step_in_file": i + 1})
        out.append({"time": f"{month}-05T11:00:00.000000Z", "event": "eval", "global_step": step,
                    "version": None, "eval_loss": {"e.jsonl": 1.5}})
    return b"".join(json.dumps(d).encode() + b"\n" for d in out)


def _root(tmp_root: Path, data: bytes) -> Path:
    (tmp_root / "processing").mkdir()
    (tmp_root / "metrics.jsonl").write_bytes(data)
    return tmp_root


def test_a_closed_month_becomes_a_gzip_segment_with_a_summary(tmp_root):
    old = _lines([("a.jsonl", 600), ("b.jsonl", 10)])
    root = _root(tmp_root, old)
    head = metrics_log.maintain(root)
    seg = root / "metrics" / "2026-01.jsonl.gz"
    assert head["segment"] == seg.name and head["lines"] == 612
    assert gzip.decompress(seg.read_bytes()) == old          # every byte, provably
    assert (root / "metrics.jsonl").read_bytes() == b""      # the open segment starts empty
    summary = (root / "metrics" / "2026-01.summary.jsonl").read_text().splitlines()
    buckets = [json.loads(x) for x in summary[1:]]
    steps = [b for b in buckets if b.get("summary")]
    # per file and per 256 lines: a.jsonl 256+256+88, b.jsonl 10; eval lines kept whole
    assert [(b["file"], b["first_step"], b["global_step"], b["n"]) for b in steps] == [
        ("a.jsonl", 1, 256, 256), ("a.jsonl", 257, 512, 256), ("a.jsonl", 513, 600, 88),
        ("b.jsonl", 601, 610, 10)]
    assert steps[0]["loss_min"] == 2.0 and steps[0]["loss_max"] == pytest.approx(2.6)
    assert sum(1 for b in buckets if b.get("event") == "eval") == 2
    assert b"".join(metrics_log.iter_raw(root)) == old
    assert metrics_log.maintain(root) is None                # nothing more to close
    # new lines go on in the open segment; the next month is not closed before its end
    (root / "metrics.jsonl").write_bytes(_lines([("c.jsonl", 5)], month="2099-01", step0=610))
    assert metrics_log.maintain(root) is None
    assert len(list(metrics_log.iter_raw(root))) == 612 + 6


def test_never_rotated_while_a_file_is_in_processing(tmp_root):
    root = _root(tmp_root, _lines([("a.jsonl", 20)]))
    (root / "processing" / "a.jsonl").write_text("{}\n")
    before = (root / "metrics.jsonl").read_bytes()
    with pytest.raises(GuardrailError, match="not rotated while a file is in processing"):
        metrics_log.rotate(root)
    assert (root / "metrics.jsonl").read_bytes() == before
    # the engine's resume still finds the steps it logged
    assert training_engine._logged_upto(root / "metrics.jsonl", "a.jsonl-abc") == 20


def test_a_rotation_cut_short_after_its_commit_loses_and_repeats_nothing(tmp_root):
    old = _lines([("a.jsonl", 300)])
    root = _root(tmp_root, old)
    metrics_log.maintain(root)
    # as if killed between the summary (the commit) and the reset of metrics.jsonl, and the
    # next file then appended its lines
    newer = _lines([("b.jsonl", 7)], month="2099-02", step0=300)
    (root / "metrics.jsonl").write_bytes(old + newer)
    (root / "metrics" / metrics_log.OPEN).unlink()
    assert metrics_log.maintain(root) is None
    assert (root / "metrics.jsonl").read_bytes() == newer
    assert b"".join(metrics_log.iter_raw(root)) == old + newer
    assert len(metrics_log.segments(root)) == 1


def test_a_damaged_open_summary_is_rebuilt_from_the_raw_lines(tmp_root):
    root = _root(tmp_root, _lines([("a.jsonl", 40)], month="2099-03"))
    metrics_log.maintain(root)
    path, covered = metrics_log.read_open(root)
    assert covered == (root / "metrics.jsonl").stat().st_size
    path.write_bytes(b"\x00garbage")
    assert metrics_log.read_open(root) is None              # never trusted over the raw lines
    assert metrics_log.update_open(root) == covered
    assert metrics_log.read_open(root)[1] == covered


def test_monitor_reads_summaries_for_history_and_raw_lines_for_the_recent_window(tmp_root):
    root = _root(tmp_root, _lines([(f"f{i}.jsonl", 300) for i in range(4)]))
    metrics_log.maintain(root)                               # 1,200 steps closed
    recent = _lines([("g.jsonl", 30)], month="2099-04", step0=1200)
    (root / "metrics.jsonl").write_bytes(recent)
    index = monitor_server.MetricsIndex(root / "metrics.jsonl")
    full = index.query(None, 2000)
    assert full["summarised"] == 4 * 2 + 4                  # 2 buckets + 1 eval line per file
    assert full["lines"] == full["summarised"] + 31
    assert full["downsampled"] and full["last_step"] == 1230
    buckets = [p for p in full["points"] if p.get("n")]
    assert buckets[0]["global_step"] == 256 and buckets[0]["loss_min"] == 2.0
    assert [b["file"] for b in full["boundaries"]] == ["f0.jsonl", "f1.jsonl", "f2.jsonl",
                                                      "f3.jsonl", "g.jsonl"]
    assert full["points"][-1]["global_step"] == 1230
    poll = index.query(1225, 2000)                           # the page's poll: raw lines
    assert [p["global_step"] for p in poll["points"]] == [1226, 1227, 1228, 1229, 1230, 1230]
    # the boundaries of years of files are thinned like the points
    assert len(index.query(None, 2)["boundaries"]) <= 2


def test_state_tracker_loss_sees_the_closed_tail_just_after_a_rotation(tmp_root):
    root = _root(tmp_root, _lines([("a.jsonl", 100)]))
    metrics_log.maintain(root)
    lines = state_tracker._tail_lines(root / "metrics.jsonl")
    assert json.loads(lines[-1])["event"] == "eval"
    assert json.loads(lines[-2])["global_step"] == 100


@pytest.mark.slow
def test_the_daemon_closes_last_months_metrics_between_files(initialized_root):
    from conftest import run_script
    from realdaemon import drop, set_config
    root = initialized_root
    set_config(root, settle_seconds=0.2, rescan_seconds=0.5, max_length=16, batch_size=2,
               checkpoint_every_steps=1, monitor_port=0, backup_every_files=0,
               backup_every_hours=0, loss_spike_factor=0.0, num_threads=1)
    old = _lines([("last-month.jsonl", 30)], month="2026-01", step0=-100000)
    (root / "metrics.jsonl").write_bytes(old)   # a month that is over, steps of an older run
    drop(root, "a.jsonl", seed=1, lines=12)
    drop(root, "b.jsonl", seed=2, lines=12)
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root,
                      timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    segs = metrics_log.segments(root)
    assert [s["segment"] for s in segs] == ["2026-01.jsonl.gz"]   # after the first file
    raw = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert {d.get("file") for d in raw if "loss" in d} == {"b.jsonl"}   # the open month
    every = [json.loads(x) for x in metrics_log.iter_raw(root)]
    trained = [d["global_step"] for d in every if d.get("file") in ("a.jsonl", "b.jsonl")]
    assert trained == list(range(1, len(trained) + 1))             # each step once, in order
    assert every[:len(old.splitlines())] == [json.loads(x) for x in old.splitlines()]
    # the readers across the rotation: the monitor and the state document
    full = monitor_server.MetricsIndex(root / "metrics.jsonl").query(None, 2000)
    assert full["last_step"] == trained[-1] and full["summarised"] > 0
    doc = state_tracker.build_state(root)
    assert doc["loss"]["last_step"] == trained[-1]


# --------------------------------------------------------------------------- done/ archive

def _done_root(tmp_root: Path, n: int = 3) -> list[str]:
    import hashlib
    import training_config
    import training_queue
    from trainroot import Paths
    Paths(tmp_root).ensure()
    training_config.write_config(tmp_root, training_config.default_config(
        done_archive={"compress_after_days": 30}))
    names = []
    for i in range(n):
        data = "".join(json.dumps({"text": f"record {i}-{k} " * 5}) + "\n" for k in range(50))
        name = f"f{i}.jsonl"
        (tmp_root / "done" / name).write_text(data)
        training_queue.record_path(tmp_root / "done" / name).write_text(json.dumps({
            "name": name, "outcome": "done", "sha256": hashlib.sha256(data.encode()).hexdigest(),
            "finished_at": "2026-01-01T00:00:00.000000Z", "version_before": "v001",
            "version_after": f"v00{i + 2}"}))
        os.utime(tmp_root / "done" / name, (0, 0))   # trained long ago
        names.append(name)
    return names


def test_old_done_files_are_compressed_proven_and_requeued_from_the_archive(tmp_root):
    import done_archive
    import training_config
    import training_queue
    names = _done_root(tmp_root)
    before = {n: (tmp_root / "done" / n).read_bytes() for n in names}
    cfg = training_config.load_config(tmp_root)
    assert done_archive.maintain(tmp_root, cfg) == names
    for n in names:
        assert not (tmp_root / "done" / n).exists()
        assert gzip.decompress((tmp_root / "done" / (n + ".gz")).read_bytes()) == before[n]
        rec = training_queue.read_record(tmp_root / "done" / n)
        assert rec["archive"]["path"] == f"done/{n}.gz" and rec["version_after"]
        assert rec["archive"]["sha256"] == rec["sha256"] and rec["archive"]["size"] == len(before[n])
    assert done_archive.maintain(tmp_root, cfg) == []        # once an hour at most, and done
    # the records stay known: the daemon's start-up repair keeps them, the index finds them
    assert training_queue.recover(tmp_root) == []
    assert training_queue.done_index(tmp_root).get(rec["sha256"])["name"] == names[-1]
    assert training_queue.counts(tmp_root)["done"] == 3
    # re-queued by path or by bare name, from the gzip, as the original bytes
    with pytest.raises(GuardrailError, match="already trained"):
        training_queue.enqueue(tmp_root, tmp_root / "done" / names[0], by_hand=True)
    q = training_queue.enqueue(tmp_root, tmp_root / "done" / names[0], by_hand=True, force=True)
    assert q["outcome"] == "queued" and Path(q["path"]).read_bytes() == before[names[0]]
    os.chdir(tmp_root)
    q = training_queue.enqueue(tmp_root, names[1], by_hand=True, force=True)
    assert Path(q["path"]).read_bytes() == before[names[1]]
    assert q["requeued_from"] == f"done/{names[1]}.gz"


def test_done_archive_run_days_0_compresses_every_file_and_a_negative_is_refused(tmp_root, capsys):
    """`run --days 0` said "done_archive is off ... Pass --days N" (0 was read as not given)
    and `--days -1` compressed everything: 0 is every trained file now, below 0 a usage error."""
    import done_archive
    names = _done_root(tmp_root, 2)
    for n in names:
        os.utime(tmp_root / "done" / n)  # trained just now
    assert done_archive.main(["run", "--days", "-1", "--root", str(tmp_root)]) == 2
    assert "--days must be 0 or more, got -1" in capsys.readouterr().err
    assert not list((tmp_root / "done").glob("*.gz"))
    assert done_archive.main(["run", "--days", "0", "--root", str(tmp_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compressed"] == names


def test_a_done_file_whose_bytes_differ_from_its_record_is_not_compressed(tmp_root):
    import done_archive
    import training_config
    names = _done_root(tmp_root, 1)
    (tmp_root / "done" / names[0]).write_text('{"text": "changed"}\n')
    os.utime(tmp_root / "done" / names[0], (0, 0))
    assert done_archive.maintain(tmp_root, training_config.load_config(tmp_root)) == []
    assert (tmp_root / "done" / names[0]).read_text() == '{"text": "changed"}\n'
    assert not list((tmp_root / "done").glob("*.gz*"))


def test_a_compression_cut_short_is_finished_without_loss(tmp_root):
    import done_archive
    names = _done_root(tmp_root, 1)
    data = (tmp_root / "done" / names[0]).read_bytes()
    # killed after the gzip was renamed into place, before the record said so
    (tmp_root / "done" / (names[0] + ".gz")).write_bytes(gzip.compress(data))
    done_archive.compress(tmp_root, names[0])
    assert not (tmp_root / "done" / names[0]).exists()
    assert gzip.decompress((tmp_root / "done" / (names[0] + ".gz")).read_bytes()) == data


def test_done_archive_config_is_validated():
    import training_config
    assert training_config.validate_config({"done_archive": {"compress_after_dayz": 3}}) == [
        "done_archive.compress_after_dayz: unknown (expected compress_after_days or "
        "max_files_per_run)"]
    assert training_config.validate_config({"done_archive": None}) == []


def test_a_long_month_is_summarised_in_a_few_thousand_buckets(tmp_root, monkeypatch):
    monkeypatch.setattr(metrics_log, "SEGMENT_BUCKETS", 4)   # 3,000 lines -> 750 per bucket
    root = _root(tmp_root, _lines([("a.jsonl", 2000), ("b.jsonl", 1000)]))
    head = metrics_log.maintain(root)
    assert head["bucket_lines"] == 751        # 3,002 lines with the two eval lines
    buckets = [json.loads(x) for x in
               (root / "metrics" / "2026-01.summary.jsonl").read_text().splitlines()[1:]]
    steps = [(b["file"], b["first_step"], b["global_step"], b["n"]) for b in buckets
             if b.get("summary")]
    # 256-line buckets merged while a file's run fits 751 lines; never across files
    assert steps == [("a.jsonl", 1, 512, 512), ("a.jsonl", 513, 1024, 512),
                     ("a.jsonl", 1025, 1536, 512), ("a.jsonl", 1537, 2000, 464),
                     ("b.jsonl", 2001, 2512, 512), ("b.jsonl", 2513, 3000, 488)]
    losses = [json.loads(x)["loss"] for x in (root / "metrics" / "2026-01.summary.jsonl")
              .read_text().splitlines()[1:] if json.loads(x).get("summary")]
    raw = [json.loads(x) for x in metrics_log.iter_raw(root)]
    first = [d["loss"] for d in raw if d.get("file") == "a.jsonl"][:512]
    assert losses[0] == pytest.approx(sum(first) / 512)


class _Killed(BaseException):
    """A crash at a rename: nothing after it runs."""


def test_a_rotation_killed_at_any_rename_loses_and_repeats_nothing(tmp_path, monkeypatch):
    old = _lines([("a.jsonl", 300), ("b.jsonl", 20)])
    real_replace, calls = os.replace, []

    def counting(src, dst, *a, **kw):
        calls.append(dst)
        return real_replace(src, dst, *a, **kw)
    monkeypatch.setattr(os, "replace", counting)
    (tmp_path / "count").mkdir()
    metrics_log.maintain(_root(tmp_path / "count", old))   # a whole rotation: count its renames
    renames = len(calls)
    assert renames >= 4   # open summary, segment, tail, summary (the commit), reset
    for k in range(1, renames + 1):
        root = tmp_path / f"k{k}"
        root.mkdir()
        _root(root, old)
        n = [0]

        def crash_at_k(src, dst, *a, **kw):
            n[0] += 1
            if n[0] == k:
                raise _Killed(f"killed before rename {k} ({dst})")
            return real_replace(src, dst, *a, **kw)
        monkeypatch.setattr(os, "replace", crash_at_k)
        with pytest.raises(_Killed):
            metrics_log.maintain(root)
        monkeypatch.setattr(os, "replace", real_replace)
        # the next file appends, then the daemon's next call between files
        newer = _lines([("c.jsonl", 5)], month="2099-05", step0=320)
        with open(root / "metrics.jsonl", "ab") as f:
            f.write(newer)
        metrics_log.maintain(root)
        assert b"".join(metrics_log.iter_raw(root)) == old + newer, f"crash at rename {k}"
        assert len(metrics_log.segments(root)) == 1, f"crash at rename {k}"
        full = monitor_server.MetricsIndex(root / "metrics.jsonl").query(None, 2000)
        assert full["last_step"] == 325 and full["run_start_step"] <= 300, f"crash at rename {k}"


def test_a_running_monitor_follows_a_rotation(tmp_root):
    root = _root(tmp_root, _lines([("a.jsonl", 300)], month="2099-06"))
    index = monitor_server.MetricsIndex(root / "metrics.jsonl")
    assert index.query(None, 2000)["summarised"] == 0          # no summary yet: raw lines
    metrics_log.rotate(root, force=True)
    with open(root / "metrics.jsonl", "ab") as f:
        f.write(_lines([("b.jsonl", 4)], month="2099-07", step0=300))
    after = index.query(None, 2000)
    assert after["summarised"] == 3 and after["last_step"] == 304
    assert [p["global_step"] for p in index.query(300, 2000)["points"]] == [301, 302, 303, 304, 304]
