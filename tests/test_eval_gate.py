"""The quality guardrail (eval_gate.py) with real signals: an eval file of English text, good
files of similar text that never trip the gate, a file of one repeated junk token at a raised
learning rate that does; the hold, accept and reject end to end (a real daemon process and
none), the notifier's document, and "no trace": [good1, bad (rejected), good2] ends bitwise
equal to [good1, good2]."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import eval_gate
import training_config
import training_daemon
from conftest import run_script, write_jsonl
from realdaemon import (assert_same_weights, controller, daemon_fixture, record, set_config,
                        weights)

pytestmark = pytest.mark.slow

FAST = {"settle_seconds": 0.2, "rescan_seconds": 0.5, "max_length": 32, "batch_size": 2,
        "checkpoint_every_steps": 5, "keep_checkpoints": 1, "monitor_port": 0,
        "backup_every_files": 0, "backup_every_hours": 0, "loss_spike_factor": 0.0,
        "warmup_steps": 2, "num_threads": 1}  # one thread: bitwise-equal weights on CPU
WORDS = ("the a cat dog sat on mat ran to house garden tree river saw big small red blue old "
         "new quick slow green bird fish").split()
BAD_LR = 3e-3

daemons = daemon_fixture()


def english(n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    return [{"text": " ".join(r.choice(WORDS) for _ in range(r.randint(6, 14))).capitalize() + "."}
            for _ in range(n)]


def junk(n: int = 120) -> list[dict]:
    return [{"text": "zq " * 10} for _ in range(n)]


def gate_root(path: Path, tiny_model_dir: Path, **over) -> Path:
    path.mkdir(parents=True)
    training_daemon.init_root(path, base=str(tiny_model_dir))
    (path / "eval").mkdir()
    write_jsonl(path / "eval" / "english.jsonl", english(60, 1))
    set_config(path, **{**FAST, **over})  # approves the eval set with the config
    return path


def drop(root: Path, name: str, records) -> None:
    tmp = root / f".{name}.part"
    write_jsonl(tmp, records)
    tmp.replace(root / "inbox" / name)


def train_once(root: Path) -> int:
    return training_daemon.Daemon(root, once=True, monitor=False).run()


def versions(root: Path) -> dict:
    import model_versioner
    return {r["id"]: r for r in model_versioner.list_versions(root)}


def end_state(root: Path) -> tuple[dict, dict, dict]:
    """current_model's weights and trainer state, and the newest checkpoint's AdamW state."""
    import training_engine
    ckpt = training_engine.list_checkpoints(root)[0][0]
    opt = training_engine._read_optimizer(ckpt)[0]["state"]
    state = json.loads((root / "current_model" / "trainer_state.json").read_text())
    return weights(root / "current_model"), {k: state[k] for k in ("global_step", "tokens_seen")}, opt


def hold_bad_file(root: Path) -> dict:
    """good1 trains and passes; bad (junk at a raised LR) trains and is held: the record."""
    drop(root, "good1.jsonl", english(40, 10))
    assert train_once(root) == 0
    set_config(root, learning_rate=BAD_LR)
    drop(root, "bad.jsonl", junk())
    # a real daemon process (the controller must not take this test's pid for a live daemon)
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # --once: a hold ends the run, exit 1
    assert "quality gate" in proc.stderr and eval_gate.REJECT_CMD in proc.stderr
    set_config(root, learning_rate=training_config.PARAMS["learning_rate"].default)
    return record(root / "processing" / "bad.jsonl")


def test_good_files_never_trip_the_gate_at_the_default_threshold(tmp_path, tiny_model_dir):
    root = gate_root(tmp_path / "root", tiny_model_dir)
    for i in range(5):
        drop(root, f"good{i}.jsonl", english(40, 10 + i))
        assert train_once(root) == 0
    done = sorted(p.name for p in (root / "done").glob("*.jsonl"))
    assert done == [f"good{i}.jsonl" for i in range(5)]
    recs = versions(root)
    assert not any(r.get("rejected") for r in recs.values())
    trained = [r for r in recs.values() if r["reason"].startswith("post-train:")]
    # the gate scored a prefix as long as each file asks (10% of its tokens); the idle daemon
    # carried each version's eval on to the whole eval set, which `list` shows
    import model_versioner
    assert len(trained) == 5 and all(isinstance(model_versioner._eval_of(root, r)["english.jsonl"], float)
                                     for r in trained)
    for i, r in enumerate(trained):
        whole = eval_gate.read_cached(root, r["id"])
        done = record(root / "done" / f"good{i}.jsonl")
        assert eval_gate.is_complete(whole) and 0 < done["eval_tokens"] < whole["results"]["english.jsonl"]["tokens"]
        assert done["timings"]["gate_s"] > 0
    evals = [json.loads(ln) for ln in (root / "metrics.jsonl").read_text().splitlines()
             if '"event": "eval"' in ln]
    assert len(evals) == 5 and all("english.jsonl" in e["eval_loss"] and e["global_step"] for e in evals)
    assert [e["version"] for e in evals] == [r["id"] for r in trained]


def test_a_prefix_the_gate_scores_grows_into_the_whole_eval(tmp_path, tiny_model_dir):
    """The gate scores a prefix of the eval set (gate_tokens); carried on (extend), even after
    an interruption, it ends at the loss one whole eval gives, and two results compare on the
    rows both scored."""
    import model_versioner
    root = gate_root(tmp_path / "root", tiny_model_dir)
    cfg = training_config.load_config(root)
    assert [eval_gate.gate_tokens(cfg, n) for n in (0, 10_000, 10**9)] == [0, 1000, 16384]
    model = root / "current_model"
    whole = eval_gate.evaluate(root, model, cfg)
    w = whole["results"]["english.jsonl"]
    assert whole["complete"] and w["ended"] and w["rows"] == len(w["sums"]) > 20
    part = eval_gate.evaluate(root, model, cfg, max_tokens=200)
    r = part["results"]["english.jsonl"]
    assert not part["complete"] and 200 <= r["seen"] < w["seen"] and 0 < r["rows"] < w["rows"]
    assert eval_gate.losses(part) == {} and eval_gate.losses(part, partial=True) == {"english.jsonl": r["loss"]}
    [cmp] = eval_gate.compare(whole, part, 5.0).values()  # same weights, the rows both have
    assert cmp["tokens"] == r["tokens"] and cmp["before"] == pytest.approx(cmp["after"], rel=1e-5)
    asked = []
    cut = eval_gate.evaluate(root, model, cfg, extend=part,
                             interrupt=lambda: asked.append(1) or len(asked) > 2)  # two batches more
    c = cut["results"]["english.jsonl"]
    assert not cut["complete"] and c["rows"] == r["rows"] + 2 * 2 and c["sums"][:r["rows"]] == r["sums"]
    done = eval_gate.evaluate(root, model, cfg, extend=cut)
    d = done["results"]["english.jsonl"]
    assert done["complete"] and (d["rows"], d["seen"], d["tokens"]) == (w["rows"], w["seen"], w["tokens"])
    assert d["loss"] == pytest.approx(w["loss"], rel=1e-5)
    for (s1, n1), (s2, n2) in zip(d["sums"], w["sums"]):
        assert n1 == n2 and s1 == pytest.approx(s2, rel=1e-4)
    # kept per version: a prefix asked for is served from the kept one, the whole carries it on
    vid = model_versioner.current_version(root)
    eval_gate.write_cached(root, vid, part)
    assert eval_gate.eval_version(root, vid, cfg, max_tokens=100) == eval_gate.read_cached(root, vid)
    full = eval_gate.eval_version(root, vid, cfg)
    assert eval_gate.is_complete(eval_gate.read_cached(root, vid)) and \
        full["results"]["english.jsonl"]["sums"][:r["rows"]] == r["sums"]
    assert model_versioner.best_by_eval(root, [vid])[0] == vid


def test_the_idle_daemon_completes_an_eval_and_gives_way_to_a_request(tmp_path, tiny_model_dir):
    """complete_eval carries the gate's prefix on to the whole eval set while the daemon is
    idle, and does not start (nor load the model) while a request waits in control/."""
    import model_versioner
    root = gate_root(tmp_path / "root", tiny_model_dir)
    cfg = training_config.load_config(root)
    vid = model_versioner.current_version(root)
    part = eval_gate.evaluate(root, root / "current_model", cfg, max_tokens=100)
    eval_gate.write_cached(root, vid, part)
    d = training_daemon.Daemon(root, once=True, monitor=False)
    d.cfg = cfg
    request = root / "control" / "x.request.json"
    request.write_text("{}")
    d.complete_eval()
    assert eval_gate.read_cached(root, vid) == dict(part, version=vid)  # untouched
    request.unlink()
    d.stop_signal = True
    d.complete_eval()
    assert not eval_gate.is_complete(eval_gate.read_cached(root, vid))
    d.stop_signal = False
    d.complete_eval()
    whole = eval_gate.read_cached(root, vid)
    assert eval_gate.is_complete(whole) and model_versioner._eval_of(
        root, model_versioner.read_version(root, vid)) == eval_gate.losses(whole)
    line = json.loads((root / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["event"] == "eval" and line["version"] == vid


def test_once_carries_the_idle_eval_on_after_a_wake_up(tmp_path, tiny_model_dir):
    """`run --once` ends with the new version's whole eval even when a wake-up (a late inotify
    event of the daemon's own moves) interrupts the idle completion: it was left at the
    prefix, intermittently, before."""
    import model_versioner
    root = gate_root(tmp_path / "root", tiny_model_dir)
    drop(root, "good1.jsonl", english(40, 10))
    d = training_daemon.Daemon(root, once=True, monitor=False)
    asked, real = [], d._idle_interrupted

    def interrupted():
        asked.append(1)
        if len(asked) == 2:  # between the first batches of the idle completion
            d.wake.set()
        return real()
    d._idle_interrupted = interrupted
    assert d.run() == 0
    vid = model_versioner.current_version(root)
    assert vid and len(asked) > 2
    assert eval_gate.is_complete(eval_gate.read_cached(root, vid))


def test_an_eval_set_that_cannot_be_scored_stops_before_training(tmp_path, tiny_model_dir):
    """The version before a file is scored (its first rows) before the file trains: a broken
    eval file is refused there, naming it, and nothing trains ungated."""
    root = gate_root(tmp_path / "root", tiny_model_dir)
    (root / "eval" / "english.jsonl").write_text("this is not json\n")
    set_config(root)  # approved as it is now
    drop(root, "good1.jsonl", english(40, 10))
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "english.jsonl" in proc.stderr
    assert not list((root / "done").glob("*.jsonl"))
    assert json.loads((root / "current_model" / "trainer_state.json").read_text())["global_step"] == 0


def test_a_bad_file_is_held_and_rejecting_it_leaves_no_trace(tmp_path, tiny_model_dir):
    notified = tmp_path / "notified.json"
    a = gate_root(tmp_path / "a", tiny_model_dir, notify_command=f"cat > {notified}")
    rec = hold_bad_file(a)
    hold = rec["hold"]
    assert hold["kind"] == "gate" and rec.get("in_training") is False
    cmp = hold["eval"]["english.jsonl"]
    assert cmp["after"] > cmp["before"] * 1.05 and cmp["regressed"]
    for number in (f"{cmp['before']:.4f}", f"{cmp['after']:.4f}", eval_gate.ACCEPT_CMD,
                   eval_gate.REJECT_CMD):
        assert number in hold["reason"]
    held = versions(a)[hold["version"]]
    assert held["rejected"] is True and held["gate"]["compared"] == hold["eval"]
    # the gate's prefix (kept beside the version), paired with the same rows of the one before
    kept = eval_gate.read_cached(a, hold["version"])
    assert eval_gate.losses(kept, partial=True)["english.jsonl"] == cmp["after"]
    assert cmp["tokens"] == kept["results"]["english.jsonl"]["tokens"] < 1000  # of ~4,000
    before = rec["version_before"]
    assert_same_weights(weights(a / "current_model"), weights(a / "versions" / before))
    doc = json.loads(notified.read_text())  # the notifier got the hold, numbers and commands
    assert doc["what"] == "gate" and doc["file"] == "bad.jsonl"
    assert doc["commands"] == [eval_gate.ACCEPT_CMD, eval_gate.REJECT_CMD]
    assert doc["numbers"]["eval"] == hold["eval"] and doc["numbers"]["held_version"] == hold["version"]

    import jsonschema
    import state_tracker
    state = state_tracker.build_state(a)
    jsonschema.validate(state, json.loads((Path(state_tracker.__file__).parent / "docs" /
                                           "system_state.schema.json").read_text()))
    warned = {x["code"]: x for x in state["warnings"]}
    assert "DAEMON_DEAD" not in warned and "TRAINING_PAUSED" not in warned
    assert warned["QUALITY_HOLD"]["fix"].startswith("python3 training_controller.py reject")
    assert eval_gate.ACCEPT_CMD in warned["QUALITY_HOLD"]["note"]
    assert state["eval"]["held"]["eval"] == hold["eval"]
    assert state["eval"]["current"]["version"] == before

    out = controller(a, "reject")  # no daemon runs: the controller carries it out itself
    assert out["outcome"] == "done" and out["version"] == before
    skipped = record(a / "skipped" / "bad.jsonl")
    assert skipped["discarded"] is True and skipped["rejected_version"] == hold["version"]
    assert "training_queue.py add" in skipped["fix"]
    drop(a, "good2.jsonl", english(40, 11))
    assert train_once(a) == 0

    b = gate_root(tmp_path / "b", tiny_model_dir)
    drop(b, "good1.jsonl", english(40, 10))
    assert train_once(b) == 0
    drop(b, "good2.jsonl", english(40, 11))
    assert train_once(b) == 0
    wa, sa, oa = end_state(a)
    wb, sb, ob = end_state(b)
    assert sa == sb
    assert_same_weights(wa, wb)
    import torch
    assert sorted(oa) == sorted(ob)
    differ = [(k, n) for k in oa for n in oa[k] if not torch.equal(oa[k][n], ob[k][n])]
    assert differ == [], f"AdamW state differs: {differ[:3]}"


def test_reject_after_a_restore_during_the_hold_keeps_it_and_says_what_current_model_is(
        tmp_path, tiny_model_dir):
    """A person restored v001 while the file was held: reject leaves that as it is, and its
    message names v001 (it said the version before the file, which current_model was not)."""
    import model_versioner
    root = gate_root(tmp_path / "root", tiny_model_dir)
    rec = hold_bad_file(root)
    model_versioner.restore_version(root, "v001")
    out = controller(root, "reject")
    assert out["outcome"] == "done" and out["version"] == "v001" != rec["version_before"], out
    assert "current_model is v001" in out["message"]
    assert model_versioner.current_version(root) == "v001"


def test_while_a_file_is_held_rollback_and_restore_wait_for_the_decision(tmp_path, tiny_model_dir):
    """During a hold current_model is the version before the held file: a rollback would undo
    the file before it (and accept would undo the rollback), a restore of the held training
    would skip the decision, and skip cannot decide it: all refused, naming reject and accept;
    `restore latest` passes
    over the held version, and restoring the version before it (current_model deleted) works,
    as does one that changes nothing (a twin of current_model). After a reject, restoring the
    rejected version by its id says what it is."""
    import shutil
    import model_versioner
    root = gate_root(tmp_path / "root", tiny_model_dir)
    rec = hold_bad_file(root)
    held, before = rec["hold"]["version"], rec["version_before"]
    cur = weights(root / "current_model")
    for args in (["rollback"], ["restore", held], ["consolidate"]):
        proc = run_script("model_versioner.py", *args, root=root)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "held by the quality gate" in proc.stderr and eval_gate.REJECT_CMD in proc.stderr
        assert eval_gate.ACCEPT_CMD in proc.stderr and "Traceback" not in proc.stderr
    import backup_manager  # a backup restore of another version is refused the same way
    bid = backup_manager.create_backup(root, held)["id"]
    proc = run_script("backup_manager.py", "restore", bid, root=root)
    assert proc.returncode == 1 and "cannot restore backup" in proc.stderr, proc.stderr
    assert f"`python3 backup_manager.py restore {bid}` again" in proc.stderr
    for action in ("skip", "resume"):  # each said "requested", and did nothing
        proc = run_script("training_controller.py", action, root=root)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"held by the quality gate: {action} does not decide" in proc.stderr
        assert eval_gate.REJECT_CMD in proc.stderr
    assert_same_weights(weights(root / "current_model"), cur)
    proc = run_script("model_versioner.py", "restore", "latest", root=root)
    assert proc.returncode == 0 and f"{held} was rejected by the quality gate" in proc.stdout, proc.stdout
    assert model_versioner.current_version(root) == before
    snap = model_versioner.create_version(root, "manual", force=True)[0]  # current_model's twin
    proc = run_script("model_versioner.py", "restore", snap, root=root)  # changes nothing: let be
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(root / "current_model")
    proc = run_script("model_versioner.py", "restore", before, root=root)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(weights(root / "current_model"), cur)
    assert controller(root, "reject")["outcome"] == "done"
    out = json.loads(run_script("model_versioner.py", "restore", "latest", "--json", root=root).stdout)
    assert out["restored"] == snap and out["passed_over"] == [] and not out["changed"]
    proc = run_script("model_versioner.py", "restore", held, root=root)
    assert proc.returncode == 0 and "bad.jsonl, which the quality gate rejected" in proc.stdout
    assert model_versioner.current_version(root) == held


def test_accept_with_a_running_daemon_publishes_the_held_version(tmp_path, tiny_model_dir, daemons):
    root = gate_root(tmp_path / "root", tiny_model_dir)
    rec = hold_bad_file(root)
    held = rec["hold"]["version"]
    d = daemons(root)
    st = d.until("paused on the gate", lambda: (s := controller(root, "status"))["state"] == "paused" and s)
    assert eval_gate.ACCEPT_CMD in st["paused_reason"]
    resumed = run_script("training_controller.py", "resume", "--wait", "60", root=root)
    assert resumed.returncode == 1 and "resume does not decide it" in resumed.stderr  # (refused)
    out = controller(root, "accept", "--wait", "120")
    assert out["outcome"] == "done", out
    done = record(root / "done" / "bad.jsonl")
    assert done["accepted"]["held_version"] == held and done["outcome"] == "done"
    after = versions(root)[done["version_after"]]
    assert after["reason"] == "post-train:bad.jsonl" and after["gate"]["accepted_from"] == held
    assert_same_weights(weights(root / "current_model"), weights(root / "versions" / held))
    assert not (root / "processing" / "bad.jsonl").exists()
    drop(root, "good2.jsonl", english(40, 11))  # and it goes on from there
    d.until("good2 done", lambda: (root / "done" / "good2.jsonl").exists())
    assert controller(root, "stop", "--wait", "120")["outcome"] == "done"


def test_accept_or_reject_with_nothing_held_says_so(initialized_root):
    proc = run_script("training_controller.py", "accept", root=initialized_root)
    assert proc.returncode == 1
    assert "nothing is held by the quality gate" in proc.stderr


def test_the_eval_set_is_frozen_by_the_approval(initialized_root):
    root = initialized_root
    cfg = training_config.load_config(root)
    assert training_config.changed_locked(root, cfg) == []
    lock = json.loads((root / ".config.lock").read_text())
    lock.pop("eval_set")  # an approval written before the eval set existed
    (root / ".config.lock").write_text(json.dumps(lock))
    assert training_config.changed_locked(root, cfg) == []  # and no eval folder: equal
    (root / "eval").mkdir()
    write_jsonl(root / "eval" / "english.jsonl", english(5, 1))
    [(name, old, new, newly)] = training_config.changed_locked(root, cfg)
    assert name == "eval_set" and old == {} and list(new) == ["english.jsonl"] and not newly
    assert "eval_set (ROOT/eval/): {} -> {english.jsonl: " in training_config.format_change(name, old, new)
    training_config.approve(root, cfg)
    assert training_config.changed_locked(root, cfg) == []
    write_jsonl(root / "eval" / "english.jsonl", english(5, 2))  # edited: a locked change again
    assert [c[0] for c in training_config.changed_locked(root, cfg)] == ["eval_set"]
    import state_tracker  # the way back is the eval/ files, not config.json
    [warn] = [x for x in state_tracker.build_state(root)["warnings"] if x["code"] == "CONFIG_UNAPPROVED"]
    assert "To revert instead, put the eval/ files back as they were approved;" in warn["note"], warn


def test_a_skip_that_keeps_steps_is_gated_and_a_failing_notifier_never_stops_training(
        tmp_path, tiny_model_dir, daemons):
    root = gate_root(tmp_path / "root", tiny_model_dir, notify_command="echo the hook is down; exit 7")
    drop(root, "good1.jsonl", english(40, 10))
    assert train_once(root) == 0
    set_config(root, learning_rate=BAD_LR)
    d = daemons(root)
    drop(root, "bad.jsonl", junk(4000))
    d.training_step("bad.jsonl", 25)
    controller(root, "skip", "--wait", "120")  # keeps the steps: the gate judges them
    st = d.until("paused on the gate", lambda: (s := controller(root, "status"))["state"] == "paused" and s)
    assert "quality gate" in st["paused_reason"]
    hold = record(root / "processing" / "bad.jsonl")["hold"]
    assert hold["then"] == "skipped" and versions(root)[hold["version"]]["rejected"] is True
    d.until("the notifier's failure logged", lambda: "notify_command exited 7: the hook is down"
            in (root / "logs" / "daemon.log").read_text())  # sent from a worker thread
    set_config(root, learning_rate=training_config.PARAMS["learning_rate"].default)
    out = controller(root, "reject", "--wait", "120")  # with the daemon running
    assert out["outcome"] == "done", out
    rec = record(root / "skipped" / "bad.jsonl")
    assert rec["rejected_version"] == hold["version"] and rec["discarded"] is True
    drop(root, "good2.jsonl", english(40, 11))  # training goes on
    d.until("good2 done", lambda: (root / "done" / "good2.jsonl").exists())
    assert controller(root, "stop", "--wait", "120")["outcome"] == "done"


def test_run_once_exits_1_when_a_skip_leaves_the_gate_holding_the_steps_it_kept(
        tmp_path, tiny_model_dir, daemons):
    """A cron or CI `run --once` must not wait for an accept nobody will give: a hold after
    a skip ends it with exit 1, as a hold after a finished file does."""
    root = gate_root(tmp_path / "root", tiny_model_dir)
    drop(root, "good1.jsonl", english(40, 10))
    assert train_once(root) == 0
    set_config(root, learning_rate=BAD_LR)
    d = daemons(root, "--once", "--no-monitor")
    drop(root, "bad.jsonl", junk(4000))
    d.training_step("bad.jsonl", 25)
    controller(root, "skip", "--wait", "120")
    assert d.wait(120) == 1, d.output()
    assert "quality gate" in d.output() and eval_gate.ACCEPT_CMD in d.output()
    # (the daemon found this root through TRAINING_ROOT: its commands need no --root;
    # for another root they carry it, so that pasted they act on the held file's root)
    assert eval_gate.decision_cmds(tmp_path / "other")[0] == \
        f"{eval_gate.ACCEPT_CMD} --root {tmp_path / 'other'}"
    assert record(root / "processing" / "bad.jsonl")["hold"]["then"] == "skipped"
    # a decision waits, not an error: QUALITY_HOLD alone, then nothing once it is made
    import state_tracker
    assert json.loads((root / ".daemon_state.json").read_text())["ended_by"] == "hold"
    found = {w["code"] for w in state_tracker.build_state(root)["warnings"]}
    assert "QUALITY_HOLD" in found and not found & {"TRAINING_ERROR", "DAEMON_DEAD"}, found
    controller(root, "reject")
    found = {w["code"] for w in state_tracker.build_state(root)["warnings"]}
    assert not found & {"QUALITY_HOLD", "TRAINING_ERROR", "DAEMON_DEAD"}, found


def test_the_monitor_shows_eval_loss_per_version_beside_the_loss_curve(initialized_root, tmp_path):
    import monitor_server
    from test_monitor import CHROMIUM, element, render, simulate_training_daemon
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH")
    root = initialized_root
    simulate_training_daemon(root)  # metrics over steps 1..600, versions v001 and v002
    eval_gate.write_cached(root, "v001", {"results": {"english.jsonl": {"loss": 3.25}}, "global_step": 0})
    eval_gate.write_cached(root, "v002", {"results": {"english.jsonl": {"loss": 4.5}}, "global_step": 300,
                                          "rejected": True})
    handle = monitor_server.start_in_thread(root, 0)
    try:
        dom = render(handle.url, tmp_path)
    finally:
        handle.stop()
    text = element(dom, "eval-losses")[1]
    assert text == "eval loss by version: v001 english 3.2500 · v002 (rejected) english 4.5000", text


def test_a_file_stopped_then_finished_is_gated_and_accept_works_with_no_daemon(
        tmp_path, tiny_model_dir, daemons):
    root = gate_root(tmp_path / "root", tiny_model_dir)
    drop(root, "good1.jsonl", english(40, 10))
    assert train_once(root) == 0
    set_config(root, learning_rate=BAD_LR)
    d = daemons(root)
    drop(root, "bad.jsonl", junk(300))
    d.training_step("bad.jsonl", 20)
    assert controller(root, "stop", "--wait", "120")["outcome"] == "done"
    assert (root / "processing" / "bad.jsonl").exists()
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 1 and eval_gate.ACCEPT_CMD in proc.stderr, proc.stderr[-2000:]
    hold = record(root / "processing" / "bad.jsonl")["hold"]
    assert hold["kind"] == "gate" and hold["then"] == "done"
    import model_versioner
    assert "quality gate holds" in " ".join(model_versioner.prune_plan(root, keep=1)["keep"][hold["version"]])
    st = controller(root, "status")  # waits for a person, not for a daemon to resume it
    assert st["processing_hold"]["kind"] == "gate" and "quality gate" in st["processing_hold"]["reason"]
    text = run_script("training_controller.py", "status", root=root).stdout
    assert "bad.jsonl is held by the quality gate: it waits for" in text, text
    out = controller(root, "accept")  # no daemon runs
    assert out["outcome"] == "done" and "no daemon was running" in out["message"]
    done = record(root / "done" / "bad.jsonl")
    assert done["accepted"]["held_version"] == hold["version"]
    assert_same_weights(weights(root / "current_model"), weights(root / "versions" / hold["version"]))
    # the accepted version keeps the held one's eval (the gate's prefix, completed when idle)
    assert eval_gate.read_cached(root, done["version_after"])["results"] == \
        eval_gate.read_cached(root, hold["version"])["results"]
    # lineage lists the file once (the held version trained it; the accepted one names it)
    names = [f["name"] for f in model_versioner.lineage(root, done["version_after"])["data_files"]]
    assert names == ["good1.jsonl", "bad.jsonl"], names
    # and a rollback undoes it once (it said two files, "the versions between were pruned")
    rolled = model_versioner.rollback(root)
    assert [f["name"] for f in rolled["undone_files"]] == ["bad.jsonl"] and not rolled["undone_pruned"]


def test_the_gate_holds_a_bad_file_trained_under_torchrun(tmp_path, tiny_model_dir):
    """nproc_per_node 2: the daemon never imports torch; the eval runs in a child after the job."""
    root = gate_root(tmp_path / "root", tiny_model_dir, nproc_per_node=2)
    drop(root, "good1.jsonl", english(40, 10))
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert isinstance(versions(root)[record(root / "done" / "good1.jsonl")["version_after"]]["eval"]
                      ["english.jsonl"], float)
    set_config(root, learning_rate=BAD_LR)
    drop(root, "bad.jsonl", junk())
    proc = run_script("training_daemon.py", "run", "--once", "--no-monitor", root=root, timeout=300)
    assert proc.returncode == 1 and eval_gate.REJECT_CMD in proc.stderr, proc.stderr[-3000:]
    hold = record(root / "processing" / "bad.jsonl")["hold"]
    assert hold["kind"] == "gate" and versions(root)[hold["version"]]["rejected"] is True


def test_eval_of_a_version_with_the_eval_off_is_refused_not_kept_from_one_row(initialized_root):
    """Regression: with eval_max_tokens 0 (the eval and the gate off), `model_versioner.py
    eval` scored one row and kept it as the version's complete result, over a whole one."""
    root = initialized_root
    (root / "eval").mkdir()
    write_jsonl(root / "eval" / "english.jsonl", english(5, 1))
    set_config(root, eval_max_tokens=0)
    proc = run_script("model_versioner.py", "eval", "v001", root=root)
    assert proc.returncode == 1 and "the eval is off: config.json eval_max_tokens is 0" in proc.stderr
    assert not (root / "versions" / ".eval").exists() or not list((root / "versions" / ".eval").iterdir())
