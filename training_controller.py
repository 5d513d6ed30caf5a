"""Control a running training daemon: stop, pause, resume, skip, accept, reject, status,
approve-config.

Each request is a small JSON file written atomically into `ROOT/control/`; the daemon
claims it (a rename into `control/claimed/`, so it is consumed exactly once), acts at the
next optimizer-step boundary and writes an acknowledgement into `control/acks/`. This
module is that protocol's library (the daemon imports it) and its command line.

    python3 training_controller.py status
    python3 training_controller.py pause --reason "disk check" --wait
    python3 training_controller.py stop --wait 120 --json
    python3 training_controller.py accept    # a file the quality gate holds (eval_gate.py)

Standard library only at import time: psutil and rich are imported inside the functions
that need them, so every command answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import shlex
import stat
import sys
import time
from pathlib import Path

import cli_guard
import trainroot
from trainroot import (BOOT_CLOCK, EXIT_FAILURE, BusyError, FileLock, GuardrailError, Paths,
                       add_common_args, age_seconds, atomic_write_json, atomic_write_text, boot_id,
                       daemon_liveness, fsync_dir, parse_time, print_json, read_json,
                       rename_noreplace, require_root, resolve_root, run_cli, subcommands,
                       unique_path, utc_now)

log = logging.getLogger("training_controller")

SCHEMA_VERSION = 1
ACTIONS = ("stop", "pause", "resume", "skip", "accept", "reject")
OUTCOMES = ("done", "noop", "failed", "rejected", "cancelled")
STATES = ("idle", "training", "paused", "stopping", "stopped", "dead")
REQUEST_SUFFIX = ".request.json"
DEFAULT_WAIT_S = 60.0        # `--wait` without a value
POLL_S = 0.05                # --wait polls files: cheap, and 50 ms is below what people notice
STOP_CMD = "python3 training_controller.py stop"
STATUS_CMD = "python3 training_controller.py status"

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --------------------------------------------------------------------------- places

def control_dirs(root) -> dict[str, Path]:
    """The control folder and its sub-folders (claimed, acks, rejected); created on demand."""
    c = Paths(root).control
    return {"control": c, "claimed": c / "claimed", "acks": c / "acks", "rejected": c / "rejected"}


def _ensure(d: Path) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # A file where the folder (or one above it) should be: say which, and how to keep it.
        raise GuardrailError("expected a folder, found a file", d,
                             f"Move it aside (`mv {shlex.quote(str(d))} "
                             f"{shlex.quote(str(d) + '.moved-aside')}`), then run the command "
                             f"again.") from None
    return d


def _read_small_json(path: Path):
    """json.loads of a regular file; OSError for anything else. A FIFO or a device in place
    of a request or an acknowledgement would block a plain read forever (opened without
    blocking, then checked: no window for a swap between a stat and the read)."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"not a regular file: {path}")
        return json.loads(f.read().decode("utf-8"))


def _stamp(created_at: str) -> str:
    """`2026-11-28T17:20:01.123456Z` -> `20261128T172001123456Z`: sorts like the time."""
    return re.sub(r"[-:.]", "", created_at)




def clock_mark() -> dict:
    """`{boot_id, boottime_ns}`: where this moment lies on this boot's clock, which only runs
    forward (NTP and a VM resume step the wall clock, not CLOCK_BOOTTIME). boot_id is None
    where the kernel does not say (then the wall-clock rule applies)."""
    return {"boot_id": boot_id(), "boottime_ns": time.clock_gettime_ns(BOOT_CLOCK)}


def _mark_of(doc) -> tuple[str, int] | None:
    """A request's (or a daemon's) clock mark, or None if it has none (older requests)."""
    if not isinstance(doc, dict):
        return None
    boot, ns = doc.get("boot_id"), doc.get("boottime_ns")
    if isinstance(boot, str) and boot and isinstance(ns, int) and not isinstance(ns, bool):
        return boot, ns
    return None


def _stale(doc: dict, started: dict | None, started_at: str | None) -> str | None:
    """Why a stop/skip predates the daemon (its daemon is gone), or None. By boot id and
    boot clock when both sides carry them; a request without them keeps the wall-clock rule."""
    mine, daemons = _mark_of(doc), _mark_of(started)
    if mine and daemons:
        if mine[0] == daemons[0] and mine[1] >= daemons[1]:
            return None
        when = " in an earlier boot" if mine[0] != daemons[0] else ""
    else:
        try:
            if not started_at or parse_time(doc["created_at"]) >= parse_time(started_at):
                return None
        except ValueError:
            return None
        when = ""
    return (f"stale: a {doc['action']} written at {doc['created_at']}{when}, before this "
            f"daemon started" + (f" at {started_at}" if started_at else ""))


# --------------------------------------------------------------------------- requests

def submit_request(root, action: str, *, reason: str | None = None,
                   options: dict | None = None) -> dict:
    """Write `control/<created>-<id>.request.json` atomically and return the request.

    `options` carries action flags, e.g. `{"discard": True}` for `skip --discard`.
    """
    if action not in ACTIONS:
        raise GuardrailError(f"unknown control action {action!r}", Paths(root).control,
                             f"Use one of: {', '.join(ACTIONS)}.")
    created_at = utc_now()
    req = {"schema_version": SCHEMA_VERSION, "id": os.urandom(6).hex(), "action": action,
           "reason": reason, "created_at": created_at, "options": dict(options or {}),
           "pid": os.getpid(), **clock_mark()}
    path = _ensure(control_dirs(root)["control"]) / f"{_stamp(created_at)}-{req['id']}{REQUEST_SUFFIX}"
    # The temp file is `.NAME.XXXX.tmp`: hidden, so a reader never sees it as a request.
    atomic_write_json(path, req)
    return dict(req, path=str(path))


def _request_problem(doc) -> str | None:
    """Why a parsed request document is unusable, or None if it is a good request."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    if not isinstance(doc.get("id"), str) or not _ID_RE.match(doc["id"]):
        return f"id: expected 1-64 letters, digits, '-' or '_', got {doc.get('id')!r}"
    if doc.get("action") not in ACTIONS:
        return f"action: expected one of {', '.join(ACTIONS)}, got {doc.get('action')!r}"
    try:
        parse_time(doc.get("created_at"))
    except (TypeError, ValueError):
        return f"created_at: expected a UTC timestamp, got {doc.get('created_at')!r}"
    if doc.get("reason") is not None and not isinstance(doc["reason"], str):
        return f"reason: expected text or null, got {doc['reason']!r}"
    if not isinstance(doc.get("options", {}), dict):
        return f"options: expected an object, got {doc['options']!r}"
    return None


def reject_request(root, path, error: str) -> Path | None:
    """Move a bad request file to `control/rejected/` beside a `.error.txt` naming the problem.

    Returns the new path, or None if another process moved it first.
    """
    path = Path(path)
    rejected = _ensure(control_dirs(root)["rejected"])
    dst = unique_path(rejected, path.name)
    try:
        rename_noreplace(path, dst)
    except (FileNotFoundError, FileExistsError):
        return None  # someone else (the daemon or another controller) moved it aside first
    atomic_write_text(dst.with_name(dst.name + ".error.txt"),
                      f"{utc_now()} rejected {path.name}: {error}\n"
                      f"Fix: write requests with `python3 training_controller.py ACTION`; "
                      f"this file is kept only for inspection.\n")
    log.warning("rejected control file %s: %s (moved to %s)", path.name, error, dst)
    return dst


def pending_requests(root, *, rejected: list | None = None, move_aside: bool = True,
                     daemon_started_at: str | None = None,
                     daemon_started: dict | None = None) -> list[dict]:
    """Unclaimed requests, oldest first, each with its `path`. Never raises on bad files.

    A malformed file (bad JSON, unknown action, ...) is moved to `control/rejected/` with an
    `.error.txt` (unless `move_aside=False`, for read-only callers such as `status`) and is
    appended to `rejected` as `{name, path, error}`. With `daemon_started` (the daemon's
    `clock_mark()` at its start), `stop` and `skip` requests written before it on this boot's
    clock, or in an earlier boot, are stale (their daemon is gone): they are rejected and
    acknowledged as `rejected`, so a restart never obeys an old stop. A request without a
    clock mark is compared with `daemon_started_at` (wall time) instead.
    Oldest first means by this boot's clock; requests from another boot (or without a mark)
    come before, among themselves by `created_at`.
    """
    control = control_dirs(root)["control"]
    try:
        names = sorted(n for n in os.listdir(control)
                       if n.endswith(REQUEST_SUFFIX) and not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []  # no requests can be there (a file in its place is refused on write)
    good = []
    for name in names:
        path = control / name
        try:
            doc = _read_small_json(path)
            problem = _request_problem(doc)
        except FileNotFoundError:
            continue  # claimed while we listed
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            doc, problem = None, f"unreadable ({exc.__class__.__name__}: {exc})"
        if problem is None and doc["action"] in ("stop", "skip", "accept", "reject"):
            problem = _stale(doc, daemon_started, daemon_started_at)
        if problem is not None:
            entry = {"name": name, "path": str(path), "error": problem}
            if move_aside:
                moved = reject_request(root, path, problem)
                if moved is None:
                    continue
                entry["path"] = str(moved)
                if isinstance(doc, dict) and _request_problem(doc) is None:
                    acknowledge(root, doc, "rejected", problem)
            if rejected is not None:
                rejected.append(entry)
            continue
        good.append(dict(doc, path=str(path)))
    boot = clock_mark()["boot_id"]

    def order(r):  # the boot clock, never the wall clock, orders this boot's requests
        mark = _mark_of(r)
        if mark and mark[0] == boot:
            return (1, mark[1], 0.0, r["id"])
        return (0, 0, parse_time(r["created_at"]), r["id"])
    good.sort(key=order)
    return good


def claim_request(root, req: dict) -> bool:
    """Take a request by renaming it into `control/claimed/`: True for exactly one caller."""
    src = Path(req["path"]) if req.get("path") else (
        control_dirs(root)["control"] / f"{_stamp(req['created_at'])}-{req['id']}{REQUEST_SUFFIX}")
    dst = _ensure(control_dirs(root)["claimed"]) / src.name
    try:
        rename_noreplace(src, dst)
    except (FileNotFoundError, FileExistsError):
        return False
    return True


def acknowledge(root, req: dict, outcome: str, message: str = "") -> dict:
    """Write `control/acks/<id>.json` atomically: what was done about request `req`."""
    if outcome not in OUTCOMES:
        raise GuardrailError(f"unknown acknowledgement outcome {outcome!r}", Paths(root).control,
                             f"Use one of: {', '.join(OUTCOMES)}.")
    ack = {"schema_version": SCHEMA_VERSION, "id": req["id"], "action": req.get("action"),
           "outcome": outcome, "done_at": utc_now(), "message": message, "pid": os.getpid()}
    atomic_write_json(_ensure(control_dirs(root)["acks"]) / f"{req['id']}.json", ack)
    return ack


def read_ack(root, request_id: str) -> dict | None:
    """The acknowledgement of a request, or None while there is none (or it is unreadable)."""
    path = control_dirs(root)["acks"] / f"{request_id}.json"
    try:
        ack = _read_small_json(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("unreadable acknowledgement %s: %s", path, exc)
        return None
    if not isinstance(ack, dict) or ack.get("outcome") not in OUTCOMES:
        log.warning("unusable acknowledgement %s: expected an object with an outcome in %s",
                    path, ", ".join(OUTCOMES))
        return None  # as if unwritten: --wait times out naming the request, never crashes
    return ack


def kept_pause(root) -> dict | None:
    """The oldest pending `pause` request (with no daemon it is kept for the next start)."""
    pauses = [r for r in pending_requests(root, move_aside=False) if r["action"] == "pause"]
    return pauses[0] if pauses else None


# A pause the daemon carried out lives in control/paused.json until `resume`: a daemon
# killed (or stopped) while paused starts paused again, the pause is never lost.
PAUSE_RECORD = "paused.json"


def pause_record(root) -> dict | None:
    """The pause the daemon carried out and keeps across restarts, or None."""
    try:
        doc = read_json(control_dirs(root)["control"] / PAUSE_RECORD, default=None)
    except GuardrailError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("reason"), str) else None


def keep_pause_record(root, reason: str, since: str | None, kind: str = "request") -> None:
    """Written (durably) by the daemon when it pauses by request, or on a failed automatic
    backup (`kind` "backup": a restart must not train on without a backup)."""
    atomic_write_json(_ensure(control_dirs(root)["control"]) / PAUSE_RECORD,
                      {"reason": reason, "since": since or utc_now(), "kind": kind})


def clear_pause_record(root) -> bool:
    """Removed by `resume` (the daemon's, or the controller's with no daemon)."""
    folder = control_dirs(root)["control"]
    try:
        os.unlink(folder / PAUSE_RECORD)
    except (FileNotFoundError, NotADirectoryError):
        return False
    fsync_dir(folder)  # or a power cut can bring the pause back after `resume` said done
    return True


# --------------------------------------------------------------------------- daemon status

def daemon_status(root) -> dict:
    """What the daemon is doing, checked rather than trusted: see docs/controller_status.md.

    `alive` is trainroot.daemon_liveness (the daemon lock, else its own pid with a fresh
    heartbeat); not alive, `stopped` if its last word was stopped, else `dead`.
    """
    p = Paths(root)
    state_error = None
    try:
        state = read_json(p.daemon_state, default=None)  # a FIFO or a folder: an error
        if state is not None and not isinstance(state, dict):
            state_error, state = f"expected a JSON object in {p.daemon_state}", None
    except GuardrailError as exc:
        state_error, state = str(exc), None
    state = _typed_state(state or {})
    live = daemon_liveness(p.root, state)  # the one definition, shared with the tracker
    alive, pid, holder, heartbeat_age = live["alive"], live["pid"], live["holder"], live["heartbeat_age"]
    same_daemon = alive and state.get("pid") == pid
    reported = state.get("state")
    if alive:
        current = reported if same_daemon and reported in STATES else "idle"
    else:
        current = live["verdict"]
    requests = pending_requests(root, move_aside=False)
    pending = [{"id": r["id"], "action": r["action"], "reason": r.get("reason"),
                "created_at": r["created_at"], "age_s": _round(age_seconds(r["created_at"])),
                "options": r.get("options") or {}} for r in requests]
    try:
        processing = sorted(n for n in os.listdir(p.processing)
                            if not n.startswith(".") and not n.endswith(".record.json"))
    except FileNotFoundError:
        processing = []
    hold = None
    if processing:  # a file a person must decide on (the gate, a loss spike) does not resume by itself
        try:
            got = read_json(p.processing / (processing[0] + ".record.json"), default={})
        except GuardrailError:
            got = {}
        got = (got or {}).get("hold") if isinstance(got, dict) else None
        if isinstance(got, dict) and isinstance(got.get("kind"), str):
            hold = {"kind": got["kind"], "reason": got.get("reason") if isinstance(got.get("reason"), str) else None}
    kept = None
    if not alive:
        pauses = [r for r in pending if r["action"] == "pause"]
        kept = pauses[0] if pauses else None
        carried = pause_record(root) if kept is None else None
        if carried:  # paused when the last daemon ended: it starts paused again
            kept = {"id": None, "action": "pause", "reason": carried["reason"],
                    "created_at": carried.get("since"), "age_s": _round(age_seconds(carried.get("since"))),
                    "options": {}}
    return {
        "schema_version": SCHEMA_VERSION,
        "root": str(p.root),
        "alive": alive,
        "pid": pid if alive else None,
        "last_pid": state.get("pid"),
        "lock_holder": holder,
        "state": current,
        "reported_state": reported,
        "started_at": state.get("started_at") if same_daemon or not alive else None,
        "heartbeat": state.get("heartbeat"),
        "heartbeat_age_s": _round(heartbeat_age),
        "responsive": alive and live["fresh"],
        "paused_since": state.get("paused_since") if current == "paused" else None,
        "paused_reason": state.get("paused_reason") if current == "paused" else None,
        "current_file": state.get("current_file") if same_daemon or current == "dead" else None,
        "progress": state.get("progress") if same_daemon or current == "dead" else None,
        "processing_file": processing[0] if processing else None,
        "processing_hold": hold,
        "last_error": state.get("last_error"),
        "state_file_error": state_error,
        "pending": pending,
        "kept_pause": kept,
    }


def _round(x):
    return None if x is None else round(x, 3)


def _pid(x):
    """A pid from a file: a positive int, else None (JSON `true` is not pid 1)."""
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2**31 else None


def _text(x):
    return x if isinstance(x, str) else None


def _typed_state(state: dict) -> dict:
    """`.daemon_state.json` with every field this module reads of the type it expects: a
    hand-edited or damaged file reads as missing fields, never as a crash."""
    out = dict(state)
    out["pid"] = _pid(state.get("pid"))
    for key in ("state", "heartbeat", "started_at", "paused_since", "paused_reason"):
        out[key] = _text(state.get(key))
    for key in ("current_file", "progress"):
        out[key] = state.get(key) if isinstance(state.get(key), dict) else None
    if state.get("last_error") is not None and not isinstance(state["last_error"], str):
        out["last_error"] = json.dumps(state["last_error"], default=str)
    return out


def skip_without_daemon(first: str = "to skip it instead", discard: bool = False) -> str:
    """How to skip the file in processing/ when no daemon runs (`skip` needs one);
    `discard`: the skip that restores the version before it (`skip --discard`)."""
    return (f"{first}: `python3 training_controller.py pause` (kept until the daemon starts), "
            "start the daemon (`python3 training_daemon.py run`), then `python3 "
            f"training_controller.py skip{' --discard' if discard else ''}`, then `python3 "
            "training_controller.py resume`")


def stopped_part_way(root, discard: bool = False) -> str | None:
    """With no daemon running: what waits in processing/ and how to skip it (`discard`:
    dropping its training), or None."""
    import training_queue
    items = training_queue._processing(root)
    if not items:
        return None
    hold = items[0].get("hold") if isinstance(items[0].get("hold"), dict) else {}
    if hold.get("kind") == "gate":  # neither skip nor resume decides it
        import eval_gate
        accept, reject = eval_gate.decision_cmds(root)
        return (f"{items[0]['name']} waits in processing/, held by the quality gate "
                f"({hold.get('reason') or 'its weights raised an eval loss'}): `{reject}` files it "
                f"in skipped/ with no trace in the model, `{accept}` publishes it (no daemon needed)")
    return (f"{items[0]['name']} waits in processing/ (stopped part-way) and resumes from its "
            f"checkpoint when the daemon starts; " + skip_without_daemon(
                "to skip it and drop its training instead" if discard else "to skip it instead",
                discard))


def is_training(root) -> bool:
    """True while a live daemon is training a file or stopping: others must not swap the model."""
    return is_busy(daemon_status(root))


def is_busy(status: dict) -> bool:
    return status["alive"] and status["state"] in ("training", "stopping")


def refuse_while_training(root) -> None:
    """Raise BusyError while another live process (the daemon) is training or stopping:
    what model_versioner and backup_manager call before they swap current_model.

    The daemon itself may swap the model (its loss guard restores), so its own pid passes.
    """
    st = daemon_status(root)
    if not is_busy(st) or st["pid"] == os.getpid():
        return
    name = (st.get("current_file") or {}).get("name")
    what = f"the daemon (pid {st['pid']}) is training" + (f" {name}" if isinstance(name, str) else "")
    raise BusyError(what, st["root"], f"Stop it first with `{STOP_CMD}`, then run this again.")


# --------------------------------------------------------------------------- requests, end to end

def _resume_without_daemon(root: Path, result: dict) -> dict:
    """`resume` with no daemon (holding its lock): the kept pauses and a held file's hold
    (a loss spike, a failed save) cleared; a file the quality gate holds is refused first,
    before anything changes (resume does not decide it)."""
    import training_queue
    held = [item for item in training_queue._processing(root) if isinstance(item.get("hold"), dict)]
    for item in held:
        if item["hold"].get("kind") == "gate":
            import eval_gate
            raise GuardrailError(f"{item['name']} is held by the quality gate; resume does not "
                                 "decide it (nothing was changed)", item["path"], "Run `{}` or "
                                 "`{}` (no daemon needed).".format(*eval_gate.decision_cmds(root)))
    # acks/ made first, so a request is never claimed and then left without its acknowledgement
    _ensure(control_dirs(root)["acks"])
    cleared = []
    for req in pending_requests(root):
        if req["action"] == "pause" and claim_request(root, req):
            acknowledge(root, req, "cancelled", "resumed before a daemon started")
            cleared.append(req["id"])
    if clear_pause_record(root):
        cleared.append(f"the pause the last daemon carried out ({PAUSE_RECORD})")
    for item in held:
        training_queue.update_record(Path(item["path"]), hold=None)
        cleared.append(f"the hold on {item['name']} ({item['hold'].get('reason')})")
    if not cleared:
        return dict(result, outcome="nothing",
                    message=f"no daemon is running and no pause is kept in {root}: nothing to resume")
    return dict(result, outcome="cleared", request={"cleared": cleared},
                message=f"cleared the kept pause ({', '.join(cleared)}); the daemon will "
                        f"train when it starts")


def request(root, action: str, *, reason: str | None = None, options: dict | None = None,
            wait: float | None = None) -> dict:
    """Ask the daemon to `action`, or apply the no-daemon rule; with `wait`, block until done.

    Returns `{ok, action, outcome, message, request, ack, waited_s}`. Outcomes:
    `requested` (sent, not waited for), `done`/`noop` (the daemon's acknowledgement),
    `kept` (pause with no daemon), `cleared` (resume dropped a kept pause), `nothing`
    (no daemon: nothing to stop, skip or resume). Raises GuardrailError on a timeout
    (naming what is pending) or a failed/rejected request.
    """
    root = resolve_root(root)
    st = daemon_status(root)
    result = {"ok": True, "action": action, "outcome": None, "message": "", "request": None,
              "ack": None, "waited_s": None}
    if not st["alive"]:
        if action in ("stop", "skip"):
            verb = "stop" if action == "stop" else "skip"
            waiting = stopped_part_way(root, bool((options or {}).get("discard"))) \
                if action == "skip" else None
            return dict(result, outcome="nothing",
                        message=f"no daemon is running in {root}: nothing to {verb}"
                        + (f" now; {waiting}" if waiting else ""))
        if action == "pause":
            kept = kept_pause(root)
            if kept is None:
                kept = submit_request(root, "pause", reason=reason, options=options)
                message = "no daemon is running: the pause is kept and applies when it starts"
            else:
                message = (f"no daemon is running: a pause is already kept (request {kept['id']}, "
                           f"since {kept['created_at']}) and applies when it starts")
            return dict(result, outcome="kept", request=kept,
                        message=message + "; undo it with `python3 training_controller.py resume`")
        # resume with no daemon: drop every kept pause and a held file's hold, holding the
        # daemon lock so none starts meanwhile and reads them half-cleared (one starting
        # now holds it: the request below reaches it instead)
        try:
            lock = FileLock(Paths(root).lock("daemon"), "training_controller resume").acquire(timeout=0)
        except BusyError:
            lock = None
        if lock is not None:
            try:
                return _resume_without_daemon(root, result)
            finally:
                lock.release()
    try:
        req = submit_request(root, action, reason=reason, options=options)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise _control_not_writable(root, action, st["pid"], exc) from None
    result["request"] = req
    if wait is None:
        return dict(result, outcome="requested",
                    message=f"{action} requested (id {req['id']}) from the daemon (pid {st['pid']})")
    return wait_for(root, req, wait, result)


def _control_not_writable(root, action: str, pid, exc: OSError) -> GuardrailError:
    """control/ cannot take a request file (read-only filesystem, permissions): SIGTERM
    acts like `stop` (checkpoint, save current_model, exit) and needs no file."""
    control = control_dirs(root)["control"]
    term = f"`kill -TERM {pid}`"
    if action == "stop":
        fix = (f"Stop the daemon with {term} instead (SIGTERM acts like stop: it finishes the "
               f"step, checkpoints and exits); make {control} writable to use the controller again.")
    else:
        fix = (f"Make {control} writable, then run `python3 training_controller.py {action}` "
               f"again; or stop the daemon with {term} (SIGTERM acts like stop).")
    return GuardrailError(f"cannot write the {action} request ({exc.strerror})", control, fix)


def _done_waiting(action: str, ack: dict, st: dict) -> bool:
    if action == "stop":
        return not st["alive"]
    if action == "pause" and ack["outcome"] == "done":
        return st["state"] == "paused" or not st["alive"]
    return True


def wait_for(root, req: dict, timeout: float, result: dict | None = None) -> dict:
    """Poll until `req` is acknowledged and done (stop: daemon exited; pause: paused)."""
    result = dict(result or {"ok": True, "action": req["action"], "request": req})
    action, rid = req["action"], req["id"]
    t0 = time.monotonic()
    deadline = t0 + max(0.0, timeout)
    while True:
        ack = read_ack(root, rid)
        st = daemon_status(root)
        if ack is not None:
            if ack["outcome"] in ("failed", "rejected", "cancelled"):
                raise GuardrailError(f"{action} request {rid} {ack['outcome']}: "
                                     f"{ack.get('message') or 'no reason given'}",
                                     control_dirs(root)["acks"] / f"{rid}.json",
                                     f"Check `{STATUS_CMD}` and the daemon log in logs/.")
            if _done_waiting(action, ack, st):
                return dict(result, outcome=ack["outcome"], ack=ack,
                            waited_s=round(time.monotonic() - t0, 3),
                            message=ack.get("message") or f"{action} done")
        elif not st["alive"]:
            return _daemon_gone(root, req, st, result, time.monotonic() - t0)
        if time.monotonic() >= deadline:
            raise GuardrailError(f"timed out after {timeout:g} s waiting for {action} request "
                                 f"{rid}: {_pending_what(action, ack, st)}", req["path"],
                                 f"The request stays pending; check `{STATUS_CMD}`." if ack is None
                                 else f"Check `{STATUS_CMD}` and the daemon log in logs/.")
        time.sleep(POLL_S)


def _pending_what(action: str, ack: dict | None, st: dict) -> str:
    if ack is None:
        if not st["alive"]:
            return "no daemon is running"
        return f"not yet acknowledged by the daemon (pid {st['pid']}, state {st['state']})"
    if action == "stop":
        return f"acknowledged, but the daemon (pid {st['pid']}) has not exited"
    return f"acknowledged, but the daemon is {st['state']}, not paused"


def _daemon_gone(root, req: dict, st: dict, result: dict, waited: float) -> dict:
    """The daemon exited before acknowledging `req`: settle the request ourselves."""
    action, rid = req["action"], req["id"]
    waited = round(waited, 3)
    ack = read_ack(root, rid)  # it may have acknowledged just before exiting
    if ack is not None and ack["outcome"] in ("done", "noop"):
        return dict(result, outcome=ack["outcome"], ack=ack, waited_s=waited,
                    message=ack.get("message") or f"{action} done")
    if action == "pause" and Path(req["path"]).exists():
        return dict(result, outcome="kept", waited_s=waited,
                    message="the daemon exited before pausing: the pause is kept and applies "
                            "when it starts; undo it with `python3 training_controller.py resume`")
    unread = claim_request(root, req)  # settle it, so nothing stale is left behind
    if action == "stop" and st["state"] == "stopped":
        # What `stop --wait` promises is a clean exit with its checkpoint durable; another
        # stop (or a signal) may have caused it, so this request was never answered itself.
        ack = acknowledge(root, req, "done", "the daemon stopped before it read this request"
                          if unread else "the daemon stopped without acknowledging this request")
        return dict(result, outcome="done", ack=ack, waited_s=waited, message=ack["message"])
    if unread:
        acknowledge(root, req, "cancelled", f"the daemon exited ({st['state']}) before acting")
    if action == "stop":
        raise GuardrailError(f"the daemon exited ({st['state']}) before acknowledging stop "
                             f"request {rid}", Paths(root).daemon_state,
                             f"Check `{STATUS_CMD}`; the next start resumes the file in processing/.")
    raise GuardrailError(f"the daemon exited ({st['state']}) before acting on {action} request "
                         f"{rid}", Paths(root).daemon_state,
                         f"Check `{STATUS_CMD}`, then start the daemon again.")


# --------------------------------------------------------------------------- approve-config

# Parameters that only steer the daemon, not the rows of a file or the steps trained on
# them: changing one while a file is mid-way keeps its resume exact. Any other parameter
# (including one added later) changes how the file's remaining rows are packed or trained.
OPERATIONAL_PARAMS = frozenset({
    "num_threads", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints",
    "loss_spike_factor", "loss_spike_window", "keep_versions", "backup_dir",
    "backup_every_files", "backup_every_hours", "keep_backups", "settle_seconds",
    "retention", "max_disk_gb", "backup_max_disk_gb",
    "rescan_seconds", "max_attempts", "min_free_disk_mb", "monitor_port", "locked",
    "eval_set", "eval_max_tokens", "eval_regression_pct", "notify_command"})


def file_midway(root) -> dict | None:
    """The file in processing/ with a checkpoint part-way through it ({name, global_step}),
    or None: resuming it continues its packed row stream from that checkpoint."""
    p = Paths(root)
    try:
        names = sorted(n for n in os.listdir(p.processing)
                       if not n.startswith(".") and not n.endswith(".record.json"))
        ckpts = [d for d in os.listdir(p.checkpoints) if d.startswith("checkpoint-")]
    except OSError:
        return None
    for name in names:
        try:
            file_id = (read_json(p.processing / (name + ".record.json"), default={}) or {}).get("file_id")
        except GuardrailError:
            continue
        if not file_id:
            continue
        for d in ckpts:
            try:
                meta = read_json(p.checkpoints / d / "meta.json", default=None)
            except GuardrailError:
                continue
            if not isinstance(meta, dict) or meta.get("file_id") != file_id:
                continue
            if meta.get("complete") and (meta.get("position") or {}).get("exhausted"):
                continue  # only its publish is left: nothing more is trained on old values
            return {"name": name, "global_step": meta.get("global_step")}
    return None


def approve_config(root, *, confirm=None) -> dict:
    """Approve the changed locked parameters; `confirm(changes) -> bool` asks a person.

    Refuses while a file is training: the running file was started under the old values.
    """
    import training_config  # lazy: its ~4 ms are paid only by the command that needs it
    p = require_root(resolve_root(root))
    cfg = training_config.load_config(p.root)
    changes = training_config.changed_locked(p.root, cfg)
    doc = {"ok": True, "approved": False,
           "changes": [{"name": c.name, "old": c.old, "new": c.new,
                        "text": training_config.format_change(*c)} for c in changes]}
    if not changes:
        return dict(doc, message="the config is already approved: no locked parameter changed")
    if is_training(p.root):
        listed = "; ".join(c["text"] for c in doc["changes"])
        raise BusyError(f"cannot approve the config while a file is training ({listed})",
                        p.processing,
                        f"Stop it first: `{STOP_CMD} --wait`, then run "
                        f"`{training_config.APPROVE_COMMAND} --yes`.")
    shaping = [c for c in doc["changes"] if c["name"] not in OPERATIONAL_PARAMS]
    midway = file_midway(p.root) if shaping else None
    if midway:
        # The paused file would resume from its checkpoint under the new values: rows
        # packed and steps taken one way, then the other, matching neither run.
        listed = ", ".join(c["text"] for c in shaping)
        old_values = ", ".join(f"{c['name']}: {json.dumps(c['old'])}" for c in shaping)
        raise GuardrailError(
            f"cannot approve {listed} while processing/{midway['name']} is part-way trained "
            f"(checkpoint at step {midway['global_step']}): the rest of the file would be "
            "packed and trained under other values than its start", p.config,
            f"Either finish the file with the old values: put {old_values} back in "
            f"config.json (a daemon paused on the change resumes the file at its next rescan; "
            f"a stopped one: start it); "
            f"or, with the daemon running, `python3 training_controller.py skip` (keeps its "
            f"steps; `skip --discard` undoes them), then `{training_config.APPROVE_COMMAND} --yes`.")
    if any(c["name"] == "eval_set" for c in doc["changes"]):
        # every start would fail on a bad eval file: it is refused here, where it is approved
        import eval_gate
        import training_queue
        for path in eval_gate.eval_files(p.root):
            checked = training_queue.validate(path, cfg)
            if not checked["ok"]:
                raise GuardrailError(
                    f"cannot approve the eval set: {path.name} is {checked['verdict'] or 'invalid'}",
                    path, f"See every problem with `python3 validate_data.py {shlex.quote(str(path))}`; "
                    f"fix or remove the file, then `{training_config.APPROVE_COMMAND} --yes`.")
    if confirm is None or not confirm(doc["changes"]):
        listed = ", ".join(c["text"] for c in doc["changes"])
        raise GuardrailError(f"approval not confirmed ({listed})", p.config,
                             f"Read the changes, then run `{training_config.APPROVE_COMMAND} --yes`.")
    if os.path.lexists(p.config_lock) and not p.config_lock.is_file():
        raise GuardrailError("the approval record is not a file", p.config_lock,
                             f"Move it aside (`mv {shlex.quote(str(p.config_lock))} "
                             f"{shlex.quote(str(p.config_lock) + '.moved-aside')}`), then run "
                             f"`{training_config.APPROVE_COMMAND} --yes`.")
    lock = FileLock(p.lock("config"), "approve-config").acquire(timeout=5)
    try:
        record = training_config.approve(p.root, cfg, by="training_controller approve-config")
    finally:
        lock.release()
    return dict(doc, approved=True, approved_at=record["approved_at"],
                message=f"approved {len(changes)} changed locked parameter(s)"
                + _adapter_shape_note(p, cfg, doc["changes"]))


def _adapter_shape_note(p: Paths, cfg: dict, changes: list) -> str:
    """What an approved LoRA shape means for current_model's adapter of another shape: the
    daemon refuses to train it (its parameters would not match) until a consolidate."""
    import lora_mode
    shape = ("lora_r", "lora_alpha", "lora_target_modules")
    if cfg.get("finetune") != "lora" or not any(c["name"] in shape for c in changes):
        return ""
    have = lora_mode.shape_mismatch(p.current_model, cfg)
    if have is None:
        return ""
    return (f". current_model's adapter has another shape ({have}): the new one takes effect "
            "with `python3 model_versioner.py consolidate` (it merges this adapter into a new "
            "base and starts a fresh adapter of the new shape); until then the daemon refuses "
            "to train on it")


# --------------------------------------------------------------------------- CLI

def _out(args, doc: dict, lines: list[str]) -> int:
    shown = trainroot.explicit_root(args)  # commands it names carry that --root, pasted
    if args.json:
        if isinstance(doc.get("message"), str):
            doc = dict(doc, message=cli_guard.with_root(doc["message"], shown))
        print_json(doc)
    else:
        for line in lines:
            print(cli_guard.with_root(line, shown))
    return 0 if doc.get("ok", True) else EXIT_FAILURE


def decide(root, action: str, *, reason: str | None = None, wait: float | None = DEFAULT_WAIT_S) -> dict:
    """`accept` or `reject` the file the quality gate holds: through the running daemon
    (a request, waited for), or with no daemon here, holding the daemon lock so none
    starts meanwhile (eval_gate.decide). Raises GuardrailError when nothing is held."""
    import eval_gate
    p = require_root(resolve_root(root))
    if not daemon_status(p.root)["alive"]:
        try:
            lock = FileLock(p.lock("daemon"), f"training_controller {action}").acquire(timeout=0)
        except BusyError:
            lock = None  # a daemon is starting: it takes the request
        if lock is not None:
            try:
                out = eval_gate.decide(p.root, action, by="training_controller (no daemon)"
                                       + (f": {reason}" if reason else ""))
            finally:
                lock.release()
            verb = "accepted" if action == "accept" else "rejected"
            return {"ok": True, "action": action, "outcome": "done", "request": None, "ack": None,
                    "waited_s": None, "file": out["file"], "version": out["version"],
                    "message": f"{out['file']} {verb}: moved to {Path(out['dst']).parent.name}/; "
                               f"current_model is {out['version'] or 'not a version (snapshot it to keep it)'} "
                               "(no daemon was running)"}
    return request(p.root, action, reason=reason, wait=DEFAULT_WAIT_S if wait is None else wait)


def _decide_cmd(args, action: str) -> int:
    res = decide(args.root, action, reason=args.reason, wait=args.wait)
    return _out(args, res, [res["message"]])


def cmd_accept(args) -> int:
    """Publish the version the quality gate held and finish its file as done (it goes on from it)."""
    return _decide_cmd(args, "accept")


def cmd_reject(args) -> int:
    """Move the file the quality gate held to skipped/; training goes on from the version before it."""
    return _decide_cmd(args, "reject")


def _request_cmd(args, action: str, options: dict | None = None) -> int:
    require_root(resolve_root(args.root))
    res = request(args.root, action, reason=args.reason, options=options, wait=args.wait)
    return _out(args, res, [res["message"]])


def cmd_stop(args) -> int:
    """Finish the current optimizer step, checkpoint, save current_model and exit the daemon."""
    return _request_cmd(args, "stop")


def cmd_pause(args) -> int:
    """Checkpoint and idle until `resume` (with no daemon: kept for the next start)."""
    return _request_cmd(args, "pause")


def cmd_resume(args) -> int:
    """Continue exactly where pause left off (with no daemon: clear a kept pause)."""
    _refuse_gate_hold(args.root, "resume")
    return _request_cmd(args, "resume")


def cmd_skip(args) -> int:
    """Abandon the current file after this step -> skipped/ (keeps the training; --discard undoes it)."""
    _refuse_gate_hold(args.root, "skip")
    return _request_cmd(args, "skip", {"discard": bool(args.discard)})


def _refuse_gate_hold(root, action: str) -> None:
    """skip and resume do not decide a file the quality gate holds: refused at once (the
    daemon would refuse it, or do nothing, after this said "requested")."""
    import eval_gate
    held = eval_gate.held_file(require_root(resolve_root(root)).root)
    if held is not None:
        raise GuardrailError(f"{held.name} is held by the quality gate: {action} does not decide "
                             "it (nothing was changed)", held, "Run `{}` (it goes to skipped/, its "
                             "training undone) or `{}`.".format(*reversed(eval_gate.decision_cmds(root))))


def cmd_status(args) -> int:
    """Daemon alive (pid, heartbeat), state, current file and progress, pending requests."""
    st = daemon_status(require_root(resolve_root(args.root)).root)
    if args.json:
        print_json(dict(st, ok=True))
        return 0
    shown = trainroot.explicit_root(args)
    rows = [(key, cli_guard.with_root(value, shown)) for key, value in _status_rows(st)]
    if sys.stdout.isatty():
        from rich.console import Console  # lazy: ~0.1 s, only for people at a terminal
        from rich.table import Table
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        Console().print(table)
    else:
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key.ljust(width)}  {value}")
    return 0


def _status_rows(st: dict) -> list[tuple[str, str]]:
    age = st["heartbeat_age_s"]
    if st["alive"]:
        daemon = f"alive, pid {st['pid']}, heartbeat " + (f"{age:.1f} s ago" if age is not None else "none yet")
        if not st["responsive"]:
            daemon += " (STALE: the daemon may be hung)"
    else:
        daemon = "not running" + (f" (last pid {st['last_pid']})" if st["last_pid"] else "")
    rows = [("daemon", daemon), ("state", st["state"])]
    if st["state"] == "dead":
        rows.append(("warning", f"the daemon died while {st['reported_state']}; start it again to "
                                f"resume: `python3 training_daemon.py run`"))
    if st["paused_since"]:
        rows.append(("paused", f"since {st['paused_since']}: {st['paused_reason'] or 'no reason given'}"))
    cf = st["current_file"]
    if cf:
        rows.append(("file", f"{cf.get('name')} ({cf.get('priority', 'normal')})"))
    elif st["processing_file"] and (st.get("processing_hold") or {}).get("kind") == "gate":
        rows.append(("file", f"{st['processing_file']} is held by the quality gate: it waits for "
                             f"`python3 training_controller.py accept` or `reject` (no daemon needed)"))
    elif st["processing_file"] and st.get("processing_hold"):
        rows.append(("file", f"{st['processing_file']} is on hold ({st['processing_hold']['kind']}): "
                             f"{st['processing_hold']['reason'] or 'see its record'}"))
    elif st["processing_file"]:
        rows.append(("file", f"{st['processing_file']} waits in processing/ (resumes from its "
                             f"checkpoint)"))
    pr = st["progress"] or {}
    if pr:
        parts = [f"step {pr.get('global_step')}"]
        if pr.get("records_total"):
            parts.append(f"records {pr.get('records_done')}/{pr['records_total']}")
        for key, label in (("loss", "loss"), ("tokens_per_sec", "tok/s"), ("eta_seconds", "ETA s")):
            if pr.get(key) is not None:
                parts.append(f"{label} {pr[key]:.4g}" if isinstance(pr[key], float) else f"{label} {pr[key]}")
        rows.append(("progress", ", ".join(parts)))
    if st["kept_pause"]:
        kp = st["kept_pause"]
        rows.append(("kept pause", f"applies when the daemon starts (since {kp['created_at']}, "
                                   f"{kp['reason'] or 'no reason given'}); clear it with "
                                   f"`python3 training_controller.py resume`"))
    for req in st["pending"]:
        rows.append(("pending", f"{req['action']} {req['id']} ({req['age_s']:.1f} s old)"
                                + (f": {req['reason']}" if req["reason"] else "")))
    if st["last_error"]:
        rows.append(("last error", str(st["last_error"])))
    if st["state_file_error"]:
        rows.append(("state file", st["state_file_error"]))
    return rows


def cmd_approve_config(args) -> int:
    """Show each changed locked parameter `name: old -> new` and approve it (--yes or a TTY yes)."""
    def confirm(changes):
        if args.yes:
            return True
        if sys.stdin is None or not sys.stdin.isatty():
            return False
        for c in changes:
            print(c["text"])
        return input("Approve these changes? [y/N] ").strip().lower() in ("y", "yes")

    res = approve_config(args.root, confirm=confirm)
    lines = [c["text"] for c in res["changes"]] if (args.yes or sys.stdin is None
                                                     or not sys.stdin.isatty()) else []
    return _out(args, res, lines + [res["message"]])


def _seconds(text: str) -> float:
    """`--wait SECONDS`: a number >= 0 (`inf` waits for good); -1 or nan is a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_controller.py",
                                     description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add = subcommands(parser)
    for name, func in (("stop", cmd_stop), ("pause", cmd_pause), ("resume", cmd_resume),
                       ("skip", cmd_skip), ("accept", cmd_accept), ("reject", cmd_reject),
                       ("status", cmd_status),
                       ("approve-config", cmd_approve_config)):
        sp = add(name, func)
        if name in ("stop", "pause", "resume", "skip", "accept", "reject"):
            sp.add_argument("--reason", metavar="TEXT", help="why (kept in the request and logs)")
            sp.add_argument("--wait", nargs="?", type=_seconds, const=DEFAULT_WAIT_S, default=None,
                            metavar="SECONDS", help=f"block until done (default {DEFAULT_WAIT_S:g} s); "
                                                    "exit 1 on timeout")
        if name == "skip":
            sp.add_argument("--discard", action="store_true",
                            help="also undo the training done on this file (restore the version before it)")
        if name == "approve-config":
            sp.add_argument("--yes", action="store_true", help="approve without asking")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
