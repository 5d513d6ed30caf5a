"""retention.py: restic-style rules for versions and backups, the disk budget, years of history."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import backup_manager as bm
import model_versioner as mv
import retention
import training_config
from test_model_versioner import make_model, train
from trainroot import Paths

T0 = datetime(2026, 1, 1, 0, 0, tzinfo=timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.fixture
def root(tmp_root) -> Path:
    Paths(tmp_root).ensure()
    training_config.write_config(tmp_root, training_config.default_config())
    train(tmp_root, 1)
    assert mv.create_version(tmp_root, "init") == ("v001", True)
    return tmp_root


def _set_config(root: Path, **kw) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(kw)
    (root / "config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- the rules

def test_rules_keep_what_restic_keeps():
    # one item every 6 hours for 40 days: 160 items
    items = [(f"i{n:03d}", _iso(T0 + timedelta(hours=6 * n))) for n in range(160)]
    keep = retention.apply_rules(items, {"keep_last": 2, "keep_daily": 3, "keep_weekly": 2,
                                         "keep_monthly": 2})
    newest = [i for i, _ in items][-1]
    # last 2; the newest of each of the last 3 days; the newest of the last 2 ISO weeks and
    # of the last 2 months (February's newest is the newest item; January's is its 18:00 item)
    jan31 = next(i for i, t in items if t == "2026-01-31T18:00:00Z")
    feb08 = next(i for i, t in items if t == "2026-02-08T18:00:00Z")  # Sunday: ends ISO week 6
    assert keep[newest] == ["last 1", "daily 2026-02-09", "weekly 2026-W07", "monthly 2026-02"]
    assert keep["i158"] == ["last 2"]
    assert keep[feb08] == ["daily 2026-02-08", "weekly 2026-W06"]
    assert keep[jan31] == ["monthly 2026-01"]
    assert len(keep) == 5  # + daily 2026-02-07
    # a time nobody can read is kept (which period it belongs to is unknown)
    assert retention.apply_rules([("a", "garbage"), ("b", _iso(T0))], {"keep_last": 1}) == {
        "a": ["no readable created_at"], "b": ["last 1"]}


def test_a_years_history_of_3650_items_keeps_a_bounded_restic_set():
    """Ten files a day for a year: the default version policy keeps at most the sum of its
    rules, spread the way restic spreads them."""
    items = [(f"v{n:04d}", _iso(T0 + timedelta(minutes=144 * n))) for n in range(3650)]
    rules = retention.DEFAULT_POLICY["versions"]
    keep = retention.apply_rules(items, rules)
    assert len(keep) <= sum(rules.values()) and len(keep) >= rules["keep_monthly"]
    months = {t[:7] for i, t in items if i in keep}
    assert len(months) == 12  # one per month of the year, as keep_monthly 12 asks
    assert set(i for i, _ in items[-10:]) <= set(keep)  # keep_last 10


def test_policy_validation_and_the_old_keys():
    assert retention.policy({"keep_versions": 20}, "versions")["keep_last"] == 20
    assert retention.policy({"keep_versions": 20}, "versions")["keep_daily"] == 7  # defaults kept
    assert retention.policy({"keep_backups": 2}, "backups")["keep_last"] == 2
    given = {"retention": {"versions": {"keep_daily": 3}}, "keep_versions": 9}
    assert retention.policy(given, "versions") == {r: (3 if r == "keep_daily" else 0)
                                                   for r in retention.RULES}
    assert retention.old_keys_note(given) == "keep_versions is ignored (retention.versions is set)"
    # an old config still loads, and means keep_last
    assert training_config.validate_config({"keep_versions": 20, "keep_backups": 3}) == []
    errors = training_config.validate_config({"retention": {"versions": {"keep_dayly": 3},
                                                             "bakups": {}}})
    assert errors == ["retention.versions.keep_dayly: unknown rule (did you mean keep_daily?)",
                      "retention.bakups: unknown (expected versions or backups)"]
    assert training_config.validate_config({"retention": {"versions": {"keep_last": 0}}}) == [
        "retention.versions: every rule is 0, which would keep only what is protected; set at "
        "least keep_last"]


def test_old_keys_are_reported_by_the_tracker(root):
    import state_tracker as st
    _set_config(root, keep_versions=5)
    w = {x["code"]: x for x in st.build_state(root)["warnings"]}["CONFIG_OLD_KEYS"]
    assert w["severity"] == "info"
    assert "keep_versions 5 is read as retention.versions.keep_last" in w["message"]


# --------------------------------------------------------------------------- versions

def test_prune_dry_run_shows_what_each_rule_keeps_and_held_versions_stay(root, capsys,
                                                                        monkeypatch):
    for day in range(1, 6):
        monkeypatch.setattr(mv, "utc_now", lambda d=day: _iso(T0 + timedelta(days=d)))
        train(root, day + 1)
        mv.create_version(root, f"post-train:f{day}.jsonl")   # v002..v006, one a day
    # v003 is under review (a `rejected` marker in its record, its file held by the quality
    # gate): kept whatever the rules say, until the decision
    rec = Paths(root).versions / "v003" / "version.json"
    doc = json.loads(rec.read_text())
    os.chmod(rec, 0o644)
    rec.write_text(json.dumps(dict(doc, rejected={"reason": "eval regressed"})))
    import training_queue
    held = Paths(root).processing / "bad.jsonl"
    held.write_text('{"text": "x"}\n')
    training_queue.update_record(held, name="bad.jsonl", hold={"kind": "gate", "version": "v003"})
    _set_config(root, retention={"versions": {"keep_last": 1, "keep_daily": 2}})
    assert mv.main(["prune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "policy: keep_last 1, keep_daily 2 (config retention.versions)"
    assert "keep    v003  (the quality gate holds bad.jsonl's training as it)" in out
    assert "keep    v005  (daily 2026-01-05)" in out
    assert "keep    v006  (last 1, daily 2026-01-06, latest, current_model)" in out
    assert [ln for ln in out if ln.startswith("delete")] == ["delete  v001", "delete  v002",
                                                             "delete  v004"]
    assert mv.prune(root, yes=True)["deleted"] == ["v001", "v002", "v004"]
    assert mv.lineage(root, "v006")["chain"] == ["v001", "v002", "v003", "v004", "v005", "v006"]
    # decided (rejected: the file went to skipped/): kept only as the rules keep any other
    held.with_name("bad.jsonl.record.json").unlink()
    held.unlink()
    assert mv.main(["prune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "delete  v003" in out and not [ln for ln in out if "quality gate" in ln]
    assert mv.prune(root, yes=True)["deleted"] == ["v003"]


def test_the_best_version_by_eval_loss_is_always_kept(root):
    for gen in range(2, 7):
        train(root, gen)
        mv.create_version(root, f"post-train:f{gen}.jsonl")   # v002..v006
    key = {"eval_set": {"e.jsonl": "ab"}, "eval_max_tokens": 64}

    def scored(vid, losses, k=key):
        path = Paths(root).versions / ".eval" / f"{vid}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"key": k, "version": vid, "results": {
            name: {"loss": loss, "tokens": tokens, "rows": 1}
            for name, (loss, tokens) in losses.items()}}))
    scored("v001", {"e.jsonl": (0.1, 10)}, k={"eval_set": {"old.jsonl": "cd"}})  # another eval set
    scored("v002", {"e.jsonl": (1.0, 10), "f.jsonl": (3.0, 30)})   # token-weighted: 2.5
    scored("v003", {"e.jsonl": (2.0, 10), "f.jsonl": (2.2, 30)})   # 2.15: the best
    scored("v005", {"e.jsonl": (2.4, 40)})
    rules = {"keep_last": 2}
    plan = mv.prune_plan(root, rules=rules)
    assert plan["keep"]["v003"] == ["best eval loss 2.15"]
    assert plan["delete"] == ["v001", "v002", "v004"]          # v001's 0.1 is another eval set
    assert mv.prune(root, yes=True, rules=rules)["deleted"] == ["v001", "v002", "v004"]
    assert sorted(mv.list_versions(root), key=lambda r: r["id"])[0]["id"] == "v003"
    # a newer, better version takes over the protection; the old best is then pruned
    scored("v006", {"e.jsonl": (1.0, 40)})
    assert mv.prune_plan(root, rules=rules)["keep"]["v006"][-1] == "best eval loss 1"
    assert mv.prune_plan(root, rules=rules)["delete"] == ["v003"]


def test_a_year_of_daily_files_keeps_the_restic_set_under_the_budget(root, monkeypatch):
    """The years-long run, a file every other day for a year: after each file the daemon's retention
    (mv.prune) and after every 7th an automatic backup with its retention. The versions
    kept are exactly restic's set over the whole history (plus the latest), backups too,
    and the root never goes over max_disk_gb. Was: nothing was pruned automatically and
    every backup pinned its version, so a real root filled its disk."""
    budget_gb = 0.004
    _set_config(root, max_disk_gb=budget_gb, min_free_disk_mb=0)
    cfg = training_config.load_config(root)
    created, backups = [("v001", mv.read_version(root, "v001")["created_at"])], []
    most = 0
    for day in range(1, 366, 2):
        now = _iso(T0 + timedelta(days=day, hours=day % 24))
        monkeypatch.setattr(mv, "utc_now", lambda now=now: now)
        monkeypatch.setattr(bm, "utc_now", lambda now=now: now)
        train(root, day + 1)
        vid, made = mv.create_version(root, f"post-train:f{day}.jsonl")
        assert made
        created.append((vid, now))
        mv.prune(root, yes=True)                                   # Daemon.apply_retention
        if day % 7 == 1:
            rec = bm.create_backup(root, vid)
            backups.append((rec["id"], now))
            bm.prune_backups(root, yes=True, verify_kept=False)    # backup --prune
        if day % 7 == 1:
            used = retention.usage(root, cfg)["root_used"]
            most = max(most, used)
            assert retention.check_write(root, cfg, 0) is None, (day, used)
    assert most <= budget_gb * retention.GB
    kept = [r["id"] for r in mv.list_versions(root)]
    want = retention.apply_rules(created, retention.policy(cfg, "versions"))
    assert kept == [v for v, _ in created if v in want]
    assert len(kept) <= sum(retention.DEFAULT_POLICY["versions"].values())
    assert sorted(os.listdir(Paths(root).versions / ".pruned")) == sorted(
        f"{v}.json" for v, _ in created if v not in want)               # lineage kept
    want_b = retention.apply_rules(backups, retention.policy(cfg, "backups"))
    assert [b["id"] for b in bm.list_backups(root)] == [b for b, _ in backups if b in want_b]
    assert mv.lineage(root, "latest")["incomplete_from"] is None


def test_version_ids_index_is_rebuilt_after_rm(root, capsys):
    """`versions/.last_id` spares every snapshot reading every version.json and backup.json;
    deleted or damaged, it is rebuilt from them (with a warning), never trusted over them."""
    p = Paths(root)
    for gen in (2, 3):
        train(root, gen)
        mv.create_version(root, "manual")
    assert json.loads((p.versions / mv.LAST_ID).read_text())["last"] == "v003"
    bm.create_backup(root, "v003")
    # a person deletes the newest version and the index: the backup still names v003
    for f in (p.versions / "v003").iterdir():
        os.chmod(f, 0o644)
    shutil.rmtree(p.versions / "v003")
    os.unlink(p.versions / mv.LAST_ID)
    capsys.readouterr()
    assert train(root, 4)["kept_version"] == "v004"  # the unversioned gen 3: not a second v003
    assert "versions/.last_id is missing or damaged; rebuilding it" in capsys.readouterr().err
    assert json.loads((p.versions / mv.LAST_ID).read_text())["last"] == "v004"
    assert mv.create_version(root, "manual") == ("v005", True)
    (p.versions / mv.LAST_ID).write_text("{not json")               # damaged
    train(root, 5)
    assert mv.create_version(root, "manual") == ("v006", True)
    assert "rebuilding it" in capsys.readouterr().err
    # an index that lies low is never trusted over the folders
    (p.versions / mv.LAST_ID).write_text(json.dumps({"last": "v001"}))
    train(root, 6)
    assert mv.create_version(root, "manual") == ("v007", True)


def test_list_pages_the_newest(root, capsys):
    for gen in range(2, 6):
        train(root, gen)
        mv.create_version(root, "manual")
    assert mv.main(["list", "--limit", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["id"] for v in doc["versions"]] == ["v004", "v005"]
    assert doc["total"] == 5 and doc["not_listed"] == 3
    assert mv.main(["list", "--limit", "2"]) == 0
    assert "(3 older version(s) not listed: `python3 model_versioner.py list --all`)" in \
        capsys.readouterr().out
    assert mv.main(["list", "--all", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["versions"]) == 5


# --------------------------------------------------------------------------- the budget

def _version_of_other_weights(root: Path, k: int) -> None:
    """current_model with its last weight byte set to `k` (no file shared with the others),
    published and versioned."""
    p = Paths(root)
    staged = p.staging / f"copy-{k}"
    shutil.copytree(p.current_model, staged, ignore=shutil.ignore_patterns(".manifest.json"))
    w = next(staged.glob("*.safetensors"))
    blob = bytearray(w.read_bytes())
    blob[-1] = k
    w.chmod(0o644)
    w.write_bytes(bytes(blob))
    mv.publish_model(root, staged, reason="test")
    mv.create_version(root, "manual")


def test_a_write_over_the_budget_pauses_with_the_figures_and_the_freeing_command(
        initialized_root, monkeypatch):
    """Pre-flight: the next file's checkpoint and model do not fit max_disk_gb. Retention
    is applied first (it prunes what its rules allow); then the daemon pauses before any
    write, naming the figures and the command that frees space."""
    import training_daemon
    root = initialized_root
    p = Paths(root)
    for day in (1, 2, 3):  # versions of other models, a day apart: the rules keep the newest
        monkeypatch.setattr(mv, "utc_now", lambda d=day: _iso(T0 + timedelta(days=d)))
        _version_of_other_weights(root, day)
    model = training_daemon._folder_bytes(p.current_model)
    _set_config(root, max_disk_gb=round(2 * model / 1e9, 6),  # the next file needs 4 x model
                retention={"versions": {"keep_last": 1}})
    d = training_daemon.Daemon(root, once=True, monitor=False)
    d.cfg = cfg = training_config.load_config(root)
    with pytest.raises(training_daemon._Paused) as info:
        d.preflight(cfg)
    err = info.value.error
    assert err.what.startswith("pre-flight: the next checkpoint and model do not fit (max_disk_gb ")
    assert f"MB used + {4 * model / 1e6:.1f} MB to write is over it" in err.what
    # retention left the newest only: a deeper prune frees nothing, so it is not the fix
    assert err.fix.startswith(f"Free space with `du -xsh {root}/* | sort -h` (even pruning to "
                              "the newest version frees only 0.0 MiB")
    assert "raise max_disk_gb in config.json" in err.fix
    assert "The space is used by: " in err.fix and "current_model/ " in err.fix  # what to free
    assert [r["id"] for r in mv.list_versions(root)] == ["v004"]  # retention went first
    assert not any(p.checkpoints.iterdir()) if p.checkpoints.is_dir() else True  # nothing written
    _set_config(root, max_disk_gb=1000)
    d.preflight(training_config.load_config(root))  # room now: no pause


def test_the_report_says_what_the_pre_flight_found_over_the_budget(initialized_root):
    """The report read the usage sampled after a file minutes ago ("OK") while the daemon was
    paused on the budget: the pre-flight that pauses keeps a fresh sample."""
    import state_tracker
    import training_daemon
    root = initialized_root
    p = Paths(root)
    retention.record_usage(root, training_config.load_config(root))  # the daemon's, files ago
    used0 = retention.recorded_usage(root, training_config.load_config(root))["root_used"]
    model = training_daemon._folder_bytes(p.current_model)
    for k in (1, 2, 3):  # more versions since that sample (other weights: no shared files)
        _version_of_other_weights(root, k)
    need = training_daemon.OPTIMIZER_FACTOR * model + model
    _set_config(root, max_disk_gb=round((used0 + need + model) / 1e9, 9))  # fits the old sample
    d = training_daemon.Daemon(root, once=True, monitor=False)
    with pytest.raises(training_daemon._Paused, match="do not fit"):
        d.preflight(training_config.load_config(root))
    budget = {x["code"]: x for x in state_tracker.build_state(root)["warnings"]}.get("DISK_BUDGET")
    assert budget is not None and budget["severity"] == "critical", state_tracker.build_state(root)["warnings"]


def test_a_prune_lowers_the_usage_the_report_reads_and_names_itself_only_where_it_frees(
        initialized_root):
    """After `prune --keep 1 --yes` the report kept the daemon's older sample (the next walk
    comes minutes later): DISK_BUDGET still critical, naming the same prune. The prune now
    takes what it gave back off the sample; DISK_BUDGET names a prune only where pruning to
    the newest frees enough, else what takes the space and raising the budget."""
    import state_tracker
    root = initialized_root
    for k in (1, 2, 3):  # versions of other weights: each one's files its own
        _version_of_other_weights(root, k)
    cfg = training_config.load_config(root)
    before = retention.record_usage(root, cfg)["root_used"]
    model = sum(f.stat().st_size for f in Paths(root).current_model.iterdir())
    _set_config(root, max_disk_gb=round((before + model) / 1e9, 9))  # over by the next file

    def budget():
        return {x["code"]: x for x in state_tracker.build_state(root)["warnings"]}.get("DISK_BUDGET")
    assert budget()["fix"] == f"python3 model_versioner.py prune --keep 1 --root {root}"
    assert "pruning to the newest version frees " in budget()["message"]
    gone = mv.prune(root, keep=1, yes=True)["deleted"]
    assert gone == ["v001", "v002", "v003"]
    after = retention.recorded_usage(root, training_config.load_config(root))["root_used"]
    walked = retention.usage(root, cfg)["root_used"]  # (plus the prune's own small records)
    assert after < before and 0 <= walked - after <= 64 << 10, (before, after, walked)
    w = budget()
    assert w is None or w["fix"] == f"du -xsh {root}/* | sort -h", w  # never the same prune again


def test_a_backup_over_its_budget_is_refused_before_writing(root):
    bdir = Paths(root).default_backups
    bm.create_backup(root)
    _set_config(root, backup_max_disk_gb=0.001, max_disk_gb=None)
    big = Paths(root).staging / "big"
    make_model(big, 9, size=2_000_000)
    mv.publish_model(root, big, reason="test")
    before = sorted(os.listdir(bdir))
    with pytest.raises(bm.GuardrailError) as info:
        bm.create_backup(root)
    assert info.value.what.startswith("not enough free space for a backup (")
    assert "backup_max_disk_gb 0.001 GB: " in info.value.what and "MB to write is over it" in info.value.what
    assert "python3 backup_manager.py prune --keep 1" in info.value.fix
    assert sorted(os.listdir(bdir)) == before  # nothing half-written


def test_state_tracker_reports_usage_against_the_budget_and_days_left(root):
    import state_tracker as st
    _set_config(root, max_disk_gb=10)
    cfg = training_config.load_config(root)
    u = retention.record_usage(root, cfg)
    doc = json.loads((root / retention.USAGE_FILE).read_text())
    doc["samples"][0]["t"] -= 86400                              # a day ago, 1 GB less
    doc["samples"][0]["root_used"] = u["root_used"] - 10**9
    doc["samples"].append(dict(doc["samples"][0], t=doc["samples"][0]["t"] + 86400,
                               root_used=u["root_used"]))
    (root / retention.USAGE_FILE).write_text(json.dumps(doc))
    b = st.build_state(root)["disk"]["budget"]["root"]
    assert b["budget_bytes"] == 10**10 and b["used_bytes"] == u["root_used"]
    assert b["growth_bytes_per_day"] == 10**9
    free_left = min(10**10 - u["root_used"], b["free_bytes"])
    assert b["days_left"] == round(free_left / 10**9, 1)
    # the tracker reports the daemon's last sample: it never walks every version file
    # (a status costs the same at 10,000 versions); without a sample it measures
    mv.create_version(root, "manual", force=True)  # new files on disk since the sample
    assert retention.usage(root, cfg)["root_used"] != u["root_used"]
    again = st.build_state(root)["disk"]["budget"]
    assert again["root"]["used_bytes"] == u["root_used"] and again["measured_at"] == doc["samples"][-1]["at"]
    (root / retention.USAGE_FILE).unlink()
    fresh = st.build_state(root)["disk"]["budget"]
    assert fresh["root"]["used_bytes"] == retention.usage(root, cfg)["root_used"]


@pytest.mark.slow
def test_the_daemon_applies_retention_after_each_trained_file(initialized_root):
    """Three real files through `run --once` with retention.versions keep_last 2: after each
    the daemon prunes, so the root ends with the two newest versions and the records of the
    others in versions/.pruned/ (lineage intact)."""
    from conftest import run_script
    from realdaemon import drop, set_config
    root = initialized_root
    set_config(root, settle_seconds=0.2, rescan_seconds=0.5, max_length=16, batch_size=2,
               monitor_port=0, backup_every_files=0, backup_every_hours=0,
               loss_spike_factor=0.0, num_threads=1, eval_max_tokens=0,
               retention={"versions": {"keep_last": 2}})
    for i in range(3):
        drop(root, f"f{i}.jsonl", seed=i, lines=8)
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root,
                      timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = [r["id"] for r in mv.list_versions(root)]
    assert kept == ["v003", "v004"]
    assert sorted(p.name for p in (Paths(root).versions / ".pruned").glob("v*.json")) == [
        "v001.json", "v002.json"]
    assert "retention: pruned v001" in (root / "logs" / "daemon.log").read_text()
    files = [f["name"] for f in mv.lineage(root, "v004")["data_files"]]
    assert files == ["f0.jsonl", "f1.jsonl", "f2.jsonl"]
    samples = json.loads((root / retention.USAGE_FILE).read_text())["samples"]
    walked = [s for s in samples if "pruned" not in s]  # (a prune's: the last less what it freed)
    assert len(walked) == 1  # after the first file; then at most every USAGE_EVERY_S


def test_usage_from_the_last_walk_equals_a_full_walk_as_folders_change(tmp_path, monkeypatch):
    """The daemon's sample after each file lists only the written-once folders that changed
    (versions/, backup_dir): after every kind of change it equals a full walk, hard links
    counted once; a change in the same clock tick as the last listing is not missed."""
    monkeypatch.setattr(retention, "_TREES", {})
    top = tmp_path / "versions"

    def full():
        full.last = retention.folder_bytes([top])
        return full.last

    def cached():
        return retention.tree_bytes(top, set())

    def fill(folder, n, size):
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"f{i}").write_bytes(os.urandom(size))
    for v in range(5):
        fill(top / f"v{v:03d}" / "sub", 3, 5000 * (v + 1))
        (top / f"v{v:03d}" / "version.json").write_text("{}")
    os.link(top / "v000" / "sub" / "f0", top / "v004" / "linked")   # one inode, two names
    os.symlink(top / "v001", top / "v004" / "a-link")                # not followed
    assert cached() == full()
    opened = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: opened.append(p) or real_scandir(p))
    old = time.time() - 60
    for d in [top, *top.rglob("*")]:  # older than the same-tick window: trusted as listed
        if d.is_dir() and not d.is_symlink():
            os.utime(d, (old, old))
    assert cached() == full()
    opened.clear()
    assert cached() == full.last and opened == []                   # nothing changed: no listing
    full.before = full.last
    (top / "v001" / "sub" / "new").write_bytes(os.urandom(70000))   # a file added
    tmp = top / "v002" / "version.json.tmp"
    tmp.write_text("x" * 9000)
    os.replace(tmp, top / "v002" / "version.json")                   # replaced by a rename
    shutil.rmtree(top / "v003")                                       # a folder removed
    fill(top / "v005", 2, 3000)                                       # one added
    opened.clear()
    got = cached()
    listed = sorted(map(os.fspath, opened))
    assert got == full() != full.before
    assert listed == sorted(os.fspath(top / n) for n in (
        "", "v001/sub", "v002", "v005"))
    os.utime(top / "v001" / "sub", (old, old))
    cached()
    st = (top / "v001" / "sub").stat()
    (top / "v001" / "sub" / "same-tick").write_bytes(os.urandom(40000))
    os.utime(top / "v001" / "sub", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime did not move
    assert cached() != full()  # what an old listing with an unmoved mtime cannot see...
    monkeypatch.setattr(retention, "_TREES", {})
    cached()  # ...so a folder listed within TREE_YOUNG_NS of its change is listed again
    st = (top / "v005").stat()
    (top / "v005" / "same-tick").write_bytes(os.urandom(40000))
    os.utime(top / "v005", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached() == full()


def test_an_unchanged_versions_folder_is_summed_without_asking_its_versions(tmp_path, monkeypatch):
    """While versions/ (or backup_dir) has not changed, its written-once subfolders are not
    even stat'ed (1,001 backups: a stat each, per file); a change inside one is counted once
    a version or backup comes or goes, or at the hourly walk."""
    monkeypatch.setattr(retention, "_TREES", {})
    top = tmp_path / "backups"
    for b in range(4):
        (top / f"b{b}").mkdir(parents=True)
        (top / f"b{b}" / "model.safetensors").write_bytes(os.urandom(20000))
    old = time.time() - 60
    for d in [top, *top.iterdir()]:
        os.utime(d, (old, old))
    before = retention.tree_bytes(top, set())
    assert before == retention.folder_bytes([top])
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(os.fspath(p)) or real_stat(p, *a, **k))
    (top / "b1" / "late.json").write_bytes(os.urandom(9000))
    assert retention.tree_bytes(top, set()) == before and stats == [os.fspath(top)]
    (top / "b4").mkdir()  # a backup comes: every one is asked again
    assert retention.tree_bytes(top, set()) == retention.folder_bytes([top]) > before
    os.utime(top, (old, old))
    retention.tree_bytes(top, set())
    (top / "b2" / "late.json").write_bytes(os.urandom(9000))
    assert retention.tree_bytes(top, set()) < retention.folder_bytes([top])  # not asked...
    monkeypatch.setattr(retention, "_TREES_SINCE", [time.monotonic() - retention.TREE_REFRESH_S - 1])
    assert retention.tree_bytes(top, set()) == retention.folder_bytes([top])  # ...until the hourly walk


def _spare(root: Path, size: int) -> Path:
    """A pruned checkpoint in .staging/ as the engine keeps it to write the next one over."""
    folder = Paths(root).staging / f"{retention.SPARE_PREFIX}x1y2/checkpoint-00000007"
    folder.mkdir(parents=True)
    for name in retention.SPARE_FILES:
        (folder / name).write_bytes(os.urandom(size // 2))
    (folder / "meta.json").write_text("{}")
    return folder.parent


def test_the_spare_checkpoint_goes_back_before_any_version_is_pruned(root):
    """The spare checkpoint stays through idle spells, counted in max_disk_gb. A write that
    does not fit gives it back first: no version is pruned while it holds the room. The
    checkpoint that writes over it keeps it (`keep_spare`); a file training holds it (the
    engine lock); the tracker counts it as the next checkpoint's room, and says so."""
    import state_tracker as st
    from trainroot import FileLock
    p = Paths(root)
    mv.create_version(root, "manual", force=True)
    spare = _spare(root, 4_000_000)
    assert retention.spare_bytes(root) == 4_000_000
    cfg = training_config.load_config(root)
    used = retention.usage(root, cfg)["root_used"]
    need = 3_000_000  # fits once the spare is gone, not beside it
    _set_config(root, max_disk_gb=(used - 2_000_000) / 1e9 + need / 1e9)
    cfg = training_config.load_config(root)
    versions = [r["id"] for r in mv.list_versions(root)]

    held = retention.make_room(root, cfg, need, keep_spare=True)  # the checkpoint over it
    assert not held["ok"] and spare.is_dir() and held["released_spare_bytes"] == 0
    with FileLock(p.lock("engine"), "a file training"):
        assert retention.release_spare(root) == 0 and spare.is_dir()
    state = st.build_state(root)["disk"]
    assert state["spare_checkpoint_bytes"] == 4_000_000
    model = state["model_size_bytes"] * st.MODEL_SPACE_FACTOR
    assert state["needed_bytes"] == max(0, model - 4_000_000) + state["min_free_bytes"]
    assert "the next checkpoint writes over the 3.8 MiB pruned checkpoint kept in .staging/" in \
        dict(st.report_rows(st.build_state(root)))["disk"]
    low = lambda path: shutil._ntuple_diskusage(10**12, 10**12, state["needed_bytes"] - 1)  # noqa: E731
    warning, = [w for w in st.build_state(root, disk_usage=low)["warnings"] if w["code"] == "DISK_LOW"]
    assert "- 3.8 MiB of the pruned checkpoint it writes over in .staging/" in warning["message"]

    _set_config(root, retention={"versions": {"keep_last": 1}})
    room = retention.make_room(root, training_config.load_config(root), need)
    assert room["ok"] and room["released_spare_bytes"] >= 4_000_000, room
    assert room["pruned_versions"] == [] and [r["id"] for r in mv.list_versions(root)] == versions
    assert not spare.exists() and retention.spare_bytes(root) == 0
