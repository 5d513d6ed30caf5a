"""The quality guardrail: a fixed eval set, eval loss per version, and the gate that holds
a file which made the model worse until a person accepts or rejects it.

The eval set is every `.jsonl` file in `ROOT/eval/` (any format validate_data accepts),
frozen by its fingerprint `{name: sha256}` in `.config.lock` (a changed eval set needs
`approve-config`). A version's eval loss (one token-weighted mean per eval file, the rows
rendered, masked and packed as training does, at most `eval_max_tokens` tokens in all) is
computed once and kept in `versions/.eval/vNNN.json`, outside the immutable version folder
so `verify` never sees it. After each data file the daemon compares the new weights with
the version before the file; a rise above `eval_regression_pct` on any eval file keeps the
weights as a version marked `rejected`, restores the one before, and holds the file in
processing/ until `python3 training_controller.py accept` or `reject`.

    python3 model_versioner.py eval            # eval loss of current_model's version
    python3 training_controller.py accept      # publish the held version, file to done/
    python3 training_controller.py reject      # file to skipped/, the pre-file model stays

Standard library at import (control scripts use the gate's decisions); torch only inside
`evaluate`, through training_engine.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import shlex
import subprocess
import threading
import time
from pathlib import Path

import trainroot
from trainroot import GuardrailError, Paths, atomic_write_json, read_json, utc_now

EVAL_DIR = "eval"                 # ROOT/eval/*.jsonl: the eval set
CACHE_DIR = ".eval"               # versions/.eval/vNNN.json: a version's eval results
PIN = ".gate-pin"                 # in a checkpoint folder: prune_checkpoints keeps it
EVAL_DATE = datetime.date(2024, 1, 1)  # templates that print today's date: one fixed day
NOTIFY_TIMEOUT_S = 10.0           # a notifier that hangs is killed; training never waits longer
ACCEPT_CMD = "python3 training_controller.py accept"
REJECT_CMD = "python3 training_controller.py reject"
SCHEMA_VERSION = 1
GATE_SHARE = 0.10                 # eval tokens per trained token after a file (gate_tokens)


# --------------------------------------------------------------------------- the eval set

def eval_files(root) -> list[Path]:
    """The eval set's files, sorted by name: regular `*.jsonl` files in ROOT/eval/."""
    folder = Paths(root).root / EVAL_DIR
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".jsonl") and not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / n for n in names if (folder / n).is_file()]


def fingerprint(root) -> dict:
    """{name: sha256} of the eval set; {} when there is none (the gate is off)."""
    return {f.name: trainroot.sha256_file(f) for f in eval_files(root)}


def cache_key(root, cfg: dict) -> dict:
    """What an eval result depends on besides the weights: a cached result with another key
    is computed again."""
    return {"eval_set": fingerprint(root), "eval_max_tokens": int(cfg.get("eval_max_tokens") or 0),
            "max_length": cfg.get("max_length"), "chat_template": cfg.get("chat_template"),
            "loss_on_prompt": bool(cfg.get("loss_on_prompt")), "fields": cfg.get("fields") or {},
            "pack_isolation": bool(cfg.get("pack_isolation", True))}


def losses(doc: dict | None, *, partial: bool = False) -> dict:
    """{eval file: loss} of an eval document: its complete results only (a version's eval
    loss, comparable across versions), or with `partial` also the prefix a gate scored."""
    return {name: r.get("loss") for name, r in ((doc or {}).get("results") or {}).items()
            if partial or r.get("complete", True)}


def is_complete(doc: dict | None) -> bool:
    """Every eval file scored up to its share of eval_max_tokens (or to its end). Results
    written before prefixes existed were always complete."""
    results = (doc or {}).get("results")
    return isinstance(results, dict) and bool(results) and \
        all(isinstance(r, dict) and r.get("complete", True) for r in results.values())


def gate_tokens(cfg: dict, file_tokens: int) -> int:
    """Eval tokens the gate scores after a file of `file_tokens` trained tokens: GATE_SHARE of
    them (one eval token costs a third of a trained one or a little more, and the model is
    loaded for it: within 5% of the file's training time), at least one row per eval file
    (evaluate's floor), at most eval_max_tokens."""
    cap = int(cfg.get("eval_max_tokens") or 0)
    return min(cap, int(GATE_SHARE * max(0, int(file_tokens or 0))))


# --------------------------------------------------------------------------- computing it

def evaluate(root, model_dir, cfg: dict, *, log=None, max_tokens: int | None = None,
             extend: dict | None = None, interrupt=None) -> dict:
    """Eval loss of the model in `model_dir` on the eval set: deterministic (fixed file and
    row order, no dropout, no sampling), token-weighted mean per file, the rows packed as
    training packs them; at most `eval_max_tokens` tokens in all, shared evenly by the files.

    Scored as a prefix of each file's rows: `max_tokens` (the gate's share, gate_tokens)
    scores fewer; `extend`, an earlier result of the same weights under the same key, is
    carried on from where it stopped (its rows are not scored again); `interrupt()`, asked
    between batches, stops early with what is scored so far. Each file's result keeps the
    loss sum and token count of every scored row (`sums`), so two versions compare on the
    rows both have (compare) and a prefix grows into the whole eval without rescoring.

    Returns `{schema_version, key, results: {name: {loss, tokens, rows, sums, seen,
    next_row, complete}}, complete, seconds, global_step, tokens_seen, computed_at}`.
    """
    import torch
    import training_engine
    import validate_data
    t0 = time.monotonic()
    files = eval_files(root)
    key = cache_key(root, cfg)
    model_dir = Path(model_dir)
    if extend is not None and extend.get("key") != key:
        extend = None
    training_engine._quiet_transformers()
    tokenizer = training_engine.load_tokenizer(model_dir)  # once per process for the same files
    device = training_engine._device(cfg)
    if device.type != "cpu":  # a GPU holds one training model at a time: the kept one goes back
        training_engine.release_warm()
    model = training_engine.load_model_folder(root, model_dir)  # full, or an adapter over its base
    model.to(device)
    isolation, _ = training_engine.packing_isolation(model, cfg, root)  # packed documents as training sees them
    model.eval()
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.get("dtype"))
    max_length, batch = int(cfg["max_length"]), int(cfg.get("batch_size") or 8)
    share = max(max_length, int(cfg.get("eval_max_tokens") or 0) // max(1, len(files)))
    want = share if max_tokens is None else \
        min(share, max(max_length, int(max_tokens) // max(1, len(files))))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results, stopped = {}, False
    for path in files:
        prior = ((extend or {}).get("results") or {}).get(path.name)
        if not (isinstance(prior, dict) and isinstance(prior.get("sums"), list)):
            prior = {}
        sums, seen, next_row = list(prior.get("sums", [])), int(prior.get("seen", 0)), \
            int(prior.get("next_row", 0))
        ended = bool(prior.get("ended"))
        if prior.get("complete") or ended or seen >= want or stopped:
            results[path.name] = _file_result(sums, seen, next_row, ended, share) if prior else \
                _file_result([], 0, 0, False, share)
            continue
        encoder = training_engine.Encoder(tokenizer, loss_on_prompt=bool(cfg.get("loss_on_prompt")),
                                          chat_template=cfg.get("chat_template"), root=Paths(root).root,
                                          date=EVAL_DATE, max_length=max_length)
        encoder.where = path
        stream = training_engine.PackedStream(path, encoder, max_length, pad_id,
                                              **validate_data.read_settings(cfg))
        for _ in range(next_row):  # rows already scored: rendered again, not scored again
            stream.next_row()
        with torch.no_grad():
            while seen < want and not ended:
                if interrupt is not None and interrupt():
                    stopped = True
                    break
                chunk = []
                while len(chunk) < batch and seen < want:
                    row = stream.next_row()
                    if row is None:
                        ended = True
                        break
                    seen, next_row = seen + row[2], next_row + 1
                    if any(x != -100 for x in row[1][1:]):
                        chunk.append(row)
                if not chunk:
                    continue
                labels = training_engine.long_tensor([r.labels for r in chunk]).to(device)
                with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    logits = model(**training_engine.model_inputs(chunk, isolation, device)).logits
                sums += _row_sums(logits, labels)
                del logits
        results[path.name] = _file_result(sums, seen, next_row, ended, share)
    state = read_json(model_dir / "trainer_state.json", default={}) or {}
    seconds = time.monotonic() - t0 + float((extend or {}).get("seconds") or 0)
    doc = {"schema_version": SCHEMA_VERSION, "key": key, "results": results,
           "complete": all(r["complete"] for r in results.values()),
           "seconds": round(seconds, 3), "global_step": state.get("global_step"),
           "tokens_seen": state.get("tokens_seen"), "computed_at": utc_now()}
    if log is not None:
        log.info("eval of %s: %s (%s tokens, %.1f s)", model_dir.name,
                 ", ".join(f"{n} {r['loss']}" for n, r in results.items()),
                 sum(r["tokens"] for r in results.values()), time.monotonic() - t0)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    training_engine.give_back_freed_memory()  # the model's memory, held if a file trained here
    return doc


def _row_sums(logits, labels) -> list[list]:
    """[next-token loss sum, trained tokens] of each row: the labels shift, not the logits
    (no copy of the largest tensor), and one row at a time is widened to float32 (a whole
    batch's float32 log-softmax is gigabytes with a 151k vocabulary)."""
    import torch
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    sums = torch.stack([torch.nn.functional.cross_entropy(row.float(), t, ignore_index=-100, reduction="sum")
                        for row, t in zip(logits, target)])
    return [[s, c] for s, c in zip(sums.tolist(), (target != -100).sum(dim=1).tolist())]


def _file_result(sums: list, seen: int, next_row: int, ended: bool, share: int) -> dict:
    """One eval file's result from its scored rows' [loss sum, tokens]."""
    total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
    return {"loss": round(total / count, 6) if count else None, "tokens": count, "rows": len(sums),
            "sums": sums, "seen": seen, "next_row": next_row, "ended": ended,
            "complete": ended or seen >= share}


def _cache_path(root, vid: str) -> Path:
    return Paths(root).versions / CACHE_DIR / f"{vid}.json"


def read_cached(root, vid: str, key: dict | None = None) -> dict | None:
    """A version's kept eval results (None if none, unreadable, or computed under another key)."""
    try:
        doc = read_json(_cache_path(root, vid), default=None)
    except GuardrailError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        return None
    if key is not None and doc.get("key") != key:
        return None
    return doc


def write_cached(root, vid: str, doc: dict) -> None:
    path = _cache_path(root, vid)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dict(doc, version=vid))


def eval_version(root, vid: str, cfg: dict, *, log=None, refresh: bool = False,
                 max_tokens: int | None = None, interrupt=None) -> dict:
    """Version `vid`'s eval results, computed on `versions/vid/` (a complete model folder)
    and kept: the kept ones when their key holds and they cover what is asked (the whole
    eval, or `max_tokens` of it), else the kept prefix carried on to that."""
    key = cache_key(root, cfg)
    doc = None if refresh else read_cached(root, vid, key)
    if doc is not None and covers(doc, cfg, max_tokens):
        return doc
    doc = evaluate(root, Paths(root).versions / vid, cfg, log=log, max_tokens=max_tokens,
                   extend=doc, interrupt=interrupt)
    write_cached(root, vid, doc)
    return doc


def covers(doc: dict, cfg: dict, max_tokens: int | None) -> bool:
    """Whether a result scored what is asked: the whole eval (`max_tokens` None), or at least
    `max_tokens` of it, shared by the eval files, with row sums to pair with another prefix."""
    results = doc.get("results") or {}
    if max_tokens is None:
        return is_complete(doc)
    if not all(isinstance(r, dict) and isinstance(r.get("sums"), list) for r in results.values()):
        return False  # a whole result written before row sums cannot pair with a prefix
    want = max(int(cfg["max_length"]), int(max_tokens) // max(1, len(results)))
    return is_complete(doc) or all(r.get("ended") or int(r.get("seen") or 0) >= want
                                   for r in results.values())


def metrics_line(root, doc: dict, version: str | None) -> None:
    """One `{"event": "eval", ...}` line in metrics.jsonl (no `loss`: loss readers skip it)."""
    trainroot.append_line(Paths(root).metrics, json.dumps({
        "time": utc_now(), "event": "eval", "global_step": doc.get("global_step"),
        "version": version, "eval_loss": losses(doc)}))


# --------------------------------------------------------------------------- the gate

def compare(before: dict, after: dict, pct: float) -> dict:
    """{file: {before, after, rise_pct, regressed}} for every eval file in both documents."""
    out = {}
    old, new = (before or {}).get("results") or {}, (after or {}).get("results") or {}
    for name in sorted(set(old) & set(new)):
        a, b, tokens = _paired(old[name], new[name])
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a <= 0:
            continue
        rise = (b - a) / a * 100.0
        out[name] = {"before": a, "after": b, "rise_pct": round(rise, 3),
                     "regressed": rise > pct or b != b, "tokens": tokens}
    return out


def _paired(old: dict, new: dict) -> tuple:
    """(loss before, loss after, tokens) of one eval file over the rows both results scored
    (the same rows: the same file, key and order); results without row sums (written before
    prefixes existed) compare whole."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None, None, 0
    a, b = old.get("sums"), new.get("sums")
    if not (isinstance(a, list) and isinstance(b, list)):
        return old.get("loss"), new.get("loss"), new.get("tokens")
    k = min(len(a), len(b))
    count = sum(c for _, c in a[:k])
    if not count:
        return None, None, 0
    return (round(sum(s for s, _ in a[:k]) / count, 6), round(sum(s for s, _ in b[:k]) / count, 6),
            count)


def describe(cmp: dict, pct: float) -> str:
    worst = [f"{n}: {c['before']:.4f} -> {c['after']:.4f} ({c['rise_pct']:+.1f}%)"
             for n, c in cmp.items() if c["regressed"]]
    return f"eval loss rose more than {pct:g}% ({'; '.join(worst)})"


def pin_checkpoint(root, global_step, tokens_seen, file: str) -> str | None:
    """Keep the checkpoint whose step and tokens equal the model a file starts from until the
    gate has decided on that file (the next file carries its AdamW state after a reject);
    other pins are dropped. Returns the pinned checkpoint's name, or None."""
    p = Paths(root)
    try:
        names = os.listdir(p.checkpoints)
    except FileNotFoundError:
        names = []
    matches, pinned = [], []
    for name in names:
        d = p.checkpoints / name
        if (d / PIN).exists():
            pinned.append(d)
        try:
            meta = read_json(d / "meta.json", default=None)
        except GuardrailError:
            continue
        if isinstance(meta, dict) and meta.get("global_step") == global_step \
                and meta.get("tokens_seen") == tokens_seen:
            matches.append((meta.get("seq") if isinstance(meta.get("seq"), int) else -1, d))
    # the one training_engine._carry_checkpoint picks: the newest (highest seq) that matches
    found = max(matches, key=lambda m: (m[0], m[1].name))[1] if matches else None
    if found is not None:
        atomic_write_json(found / PIN, {"file": file, "since": utc_now()})
    for d in pinned:
        if d != found:
            (d / PIN).unlink(missing_ok=True)
    found = found.name if found is not None else None
    return found


def unpin_all(root) -> None:
    p = Paths(root)
    try:
        names = os.listdir(p.checkpoints)
    except FileNotFoundError:
        return
    for name in names:
        (p.checkpoints / name / PIN).unlink(missing_ok=True)


def held_file(root) -> Path | None:
    """The data file in processing/ the gate holds, or None."""
    import training_queue
    p = Paths(root)
    try:
        names = sorted(n for n in os.listdir(p.processing) if not training_queue.is_ignored(n))
    except FileNotFoundError:
        return None
    for n in names:
        hold = training_queue.read_record(p.processing / n).get("hold") or {}
        if hold.get("kind") == "gate":
            return p.processing / n
    return None


def decision_cmds(root=None) -> tuple[str, str]:
    """(accept, reject) as commands to paste: with `--root R` unless R is the root they
    find by themselves (TRAINING_ROOT, or the scripts' folder)."""
    import cli_guard
    shown = cli_guard.unless_found(root)
    return cli_guard.command(ACCEPT_CMD, shown), cli_guard.command(REJECT_CMD, shown)


def hold_reason(name: str, cmp: dict, pct: float, version: str, before: str, root=None) -> str:
    accept, reject = decision_cmds(root)
    return (f"quality gate: {name} made the model worse on the eval set: {describe(cmp, pct)}. "
            f"Its weights are kept as {version} (rejected); current_model is back at {before}. "
            f"Run `{accept}` to publish {version} and go on from it, or `{reject}` to "
            f"move {name} to skipped/ and go on from {before}")


def decide(root, action: str, *, by: str) -> dict:
    """Carry out a person's decision on the held file: `accept` publishes the held version
    (a new `post-train:NAME` version, the file to done/), `reject` moves the file to
    skipped/ (current_model stays, or goes back to, the version before it).

    Returns `{action, file, dst, record, version}`. Raises GuardrailError when nothing is held.
    """
    import model_versioner
    import training_queue
    p = Paths(root)
    data = held_file(p.root)
    if data is None:
        raise GuardrailError(f"nothing is held by the quality gate: no file in processing/ waits "
                             f"for {action}", p.processing,
                             "Check `python3 training_controller.py status`.")
    rec = training_queue.read_record(data)
    hold = rec["hold"]
    held, before = hold.get("version"), rec.get("version_before")
    then = hold.get("then") or "done"
    result = rec.get("result") or {}
    now = utc_now()
    with trainroot.model_lock(p.root, f"{action} {data.name}", timeout=30):
        if action == "accept":
            model_versioner.restore_version(p.root, held, reason="accept")
            reason = f"post-train:{data.name}" if then == "done" else f"post-skip:{data.name}"
            files = [{"name": data.name, "sha256": rec.get("sha256"),
                      **({"skipped": True} if then == "skipped" else {})}]
            kept = read_cached(p.root, held)
            vid, _ = model_versioner.create_version(
                p.root, reason, loss=result.get("loss"), data_files=files, force=True,
                extra={**({"eval": losses(kept)} if is_complete(kept) else {}),  # else the idle daemon's
                       "gate": {"accepted_from": held, "accepted_at": now, "accepted_by": by,
                                "compared": hold.get("eval")}})
            if kept is not None:
                write_cached(p.root, vid, kept)
            vrec = model_versioner.read_version(p.root, vid)
            rec.pop("hold", None)
            rec.pop("in_training", None)
            rec.update(version_after=vid, finished_at=now, eval=losses(kept, partial=True),
                       accepted={"at": now, "by": by, "held_version": held, "eval": hold.get("eval")})
            if then == "done":
                rec.update(outcome="done", global_step_after=vrec.get("global_step"),
                           tokens_seen_after=vrec.get("tokens_seen"),
                           steps=(vrec.get("global_step") or 0) - (rec.get("global_step_before") or 0),
                           tokens=result.get("tokens"), loss=result.get("loss"))
                rec.pop("result", None)
                dst = training_queue.move_with_record(data, p.done, rec, "accepted after the quality gate held it")
            else:
                rec.update(outcome="skipped", discarded=False)
                dst = training_queue.move_with_record(
                    data, p.skipped, rec, "skipped (steps kept), accepted after the quality gate held it",
                    finish=lambda d: {"fix": training_queue.fix_for(p, "skipped", d)})
            unpin_all(p.root)  # the next file carries the held file's own end checkpoint
            return {"action": action, "file": data.name, "dst": str(dst), "record": rec, "version": vid}
        if action != "reject":
            raise GuardrailError(f"unknown decision {action!r}", data, f"Use `{ACCEPT_CMD}` or `{REJECT_CMD}`.")
        state = read_json(p.current_model / "trainer_state.json", default={}) or {}
        restored = bool(before and state.get("file_id") == rec.get("file_id"))
        if restored:  # the held weights are back (an accept undone, a restore of them): undo
            model_versioner.restore_version(p.root, before, reason="reject")
        reason = f"rejected by the quality gate: {describe(hold.get('eval') or {}, hold.get('threshold_pct') or 0)}"
        rec.pop("hold", None)
        rec.pop("in_training", None)
        rec.update(outcome="skipped", reason=reason, discarded=True, rejected_version=held,
                   finished_at=now, rejected={"at": now, "by": by, "held_version": held,
                                              "eval": hold.get("eval")})
        dst = training_queue.move_with_record(
            data, p.skipped, rec, reason,
            finish=lambda d: {"fix": training_queue.fix_for(p, "skipped", d)})
        # the pin stays: the pre-file checkpoint is what the next file carries its optimizer from
        # what current_model is now: the version before the file, or what a person restored
        # during the hold (kept as it is)
        return {"action": action, "file": data.name, "dst": str(dst), "record": rec,
                "version": before if restored else model_versioner.current_version(p.root)}


# --------------------------------------------------------------------------- notifying a person

def notify(root, cfg: dict, doc: dict, log) -> bool:
    """Run config `notify_command` (a shell command) with `doc` as JSON on stdin, at most
    NOTIFY_TIMEOUT_S; its output goes to the log. Never raises: a failing notifier must not
    stop training. True if it ran and exited 0."""
    command = cfg.get("notify_command")
    if not command:
        return False
    doc = {"schema_version": SCHEMA_VERSION, "root": str(Paths(root).root), "at": utc_now(), **doc}
    try:
        proc = subprocess.run(command, shell=True, input=json.dumps(doc), capture_output=True,
                              text=True, timeout=NOTIFY_TIMEOUT_S, cwd=str(Paths(root).root),
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        log.warning("notify_command timed out after %g s (%s); training goes on", NOTIFY_TIMEOUT_S,
                    shlex.quote(command))
        return False
    except OSError as exc:
        log.warning("notify_command could not run (%s); training goes on", exc)
        return False
    out = " ".join((proc.stdout + " " + proc.stderr).split())[:500]
    if proc.returncode != 0:
        log.warning("notify_command exited %d: %s; training goes on", proc.returncode, out)
        return False
    log.info("notified (%s)%s", doc.get("what"), f": {out}" if out else "")
    return True


class Notifier:
    """`notify` in a worker thread, in order, so a slow notifier never holds training up
    (the daemon's; `flush` at its exit delivers what is still waiting, within the timeout)."""

    MAX_WAITING = 100

    def __init__(self, root, log):
        self.root, self.log = root, log
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def send(self, cfg: dict, doc: dict) -> None:
        if not cfg.get("notify_command"):
            return
        with self._lock:
            if self._q.unfinished_tasks >= self.MAX_WAITING:
                self.log.warning("notify_command: %d notifications wait already; %s not sent",
                                 self.MAX_WAITING, doc.get("what"))
                return
            self._q.put((dict(cfg), doc))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                try:
                    cfg, doc = self._q.get_nowait()
                except queue.Empty:
                    self._thread = None  # under the lock: a send now starts a new worker
                    return
            try:
                notify(self.root, cfg, doc, self.log)
            except Exception as exc:  # notify never raises; this is for what it cannot foresee
                self.log.warning("notify_command not run (%s)", exc)
            finally:
                self._q.task_done()

    def flush(self, timeout: float = NOTIFY_TIMEOUT_S + 1) -> None:
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
