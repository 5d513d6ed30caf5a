"""Control a running training daemon: stop, pause, resume, skip, status, approve-config.

Each request is a small JSON file written atomically into `ROOT/control/`; the daemon
claims it (a rename into `control/claimed/`, so it is consumed exactly once), acts at the
next optimizer-step boundary and writes an acknowledgement into `control/acks/`. This
module is that protocol's library (the daemon imports it) and its command line.

    python3 training_controller.py status
    python3 training_controller.py pause --reason "disk check" --wait
    python3 training_controller.py stop --wait 120 --json

Standard library only at import time: psutil and rich are imported inside the functions
that need them, so every command answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path

import training_config
from trainroot import (EXIT_FAILURE, BusyError, FileLock, GuardrailError, Paths,
                       add_common_args, age_seconds, atomic_write_json, atomic_write_text,
                       parse_time, print_json, read_json, read_lock_holder, rename_noreplace,
                       resolve_root, run_cli, unique_path, utc_now)

log = logging.getLogger("training_controller")

SCHEMA_VERSION = 1
ACTIONS = ("stop", "pause", "resume", "skip")
OUTCOMES = ("done", "noop", "failed", "rejected", "cancelled")
STATES = ("idle", "training", "paused", "stopping", "stopped", "dead")
REQUEST_SUFFIX = ".request.json"
HEARTBEAT_STALE_S = 30.0     # the daemon writes its heartbeat at most once a second
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
    d.mkdir(parents=True, exist_ok=True)
    return d


def _stamp(created_at: str) -> str:
    """`2026-11-28T17:20:01.123456Z` -> `20261128T172001123456Z`: sorts like the time."""
    return re.sub(r"[-:.]", "", created_at)


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
    req = {"schema_version": SCHEMA_VERSION, "id": secrets.token_hex(6), "action": action,
           "reason": reason, "created_at": created_at, "options": dict(options or {}),
           "pid": os.getpid()}
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
                     daemon_started_at: str | None = None) -> list[dict]:
    """Unclaimed requests, oldest first, each with its `path`. Never raises on bad files.

    A malformed file (bad JSON, unknown action, ...) is moved to `control/rejected/` with an
    `.error.txt` (unless `move_aside=False`, for read-only callers such as `status`) and is
    appended to `rejected` as `{name, path, error}`. With `daemon_started_at`, `stop` and
    `skip` requests written before that time are stale (their daemon is gone): they are
    rejected and acknowledged as `rejected`, so a restart never obeys an old stop.
    """
    control = control_dirs(root)["control"]
    try:
        names = sorted(n for n in os.listdir(control)
                       if n.endswith(REQUEST_SUFFIX) and not n.startswith("."))
    except FileNotFoundError:
        return []
    good = []
    for name in names:
        path = control / name
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            problem = _request_problem(doc)
        except FileNotFoundError:
            continue  # claimed while we listed
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            doc, problem = None, f"unreadable ({exc.__class__.__name__}: {exc})"
        if problem is None and daemon_started_at and doc["action"] in ("stop", "skip"):
            try:
                if parse_time(doc["created_at"]) < parse_time(daemon_started_at):
                    problem = (f"stale: a {doc['action']} written at {doc['created_at']}, "
                               f"before this daemon started at {daemon_started_at}")
            except ValueError:
                pass
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
    good.sort(key=lambda r: (parse_time(r["created_at"]), r["id"]))
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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("unreadable acknowledgement %s: %s", path, exc)
        return None


def kept_pause(root) -> dict | None:
    """The oldest pending `pause` request (with no daemon it is kept for the next start)."""
    pauses = [r for r in pending_requests(root, move_aside=False) if r["action"] == "pause"]
    return pauses[0] if pauses else None


# --------------------------------------------------------------------------- daemon status

def _process_running(pid) -> bool:
    """True if `pid` is a live process (a zombie child that exited does not count)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    import psutil  # lazy: +55 ms, only needed here
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def daemon_status(root) -> dict:
    """What the daemon is doing, checked rather than trusted: see docs/controller_status.md.

    `alive` needs the process to run (psutil) and either to hold the daemon lock or to have
    a fresh heartbeat. A state file that says training with a dead process reads `dead`.
    """
    p = Paths(root)
    state_error = None
    try:
        state = read_json(p.daemon_state, default=None)
        if state is not None and not isinstance(state, dict):
            state_error, state = f"expected a JSON object in {p.daemon_state}", None
    except GuardrailError as exc:
        state_error, state = str(exc), None
    state = state or {}
    holder = read_lock_holder(p.lock("daemon"))
    pid = (holder or {}).get("pid") or state.get("pid")
    heartbeat_age = age_seconds(state.get("heartbeat"))
    fresh = heartbeat_age is not None and heartbeat_age <= HEARTBEAT_STALE_S
    alive = _process_running(pid) and (holder is not None or fresh)
    same_daemon = alive and state.get("pid") == pid
    reported = state.get("state")
    if alive:
        current = reported if same_daemon and reported in STATES else "idle"
    else:
        current = "stopped" if reported in (None, "stopped") else "dead"
    requests = pending_requests(root, move_aside=False)
    pending = [{"id": r["id"], "action": r["action"], "reason": r.get("reason"),
                "created_at": r["created_at"], "age_s": _round(age_seconds(r["created_at"])),
                "options": r.get("options") or {}} for r in requests]
    kept = None
    if not alive:
        pauses = [r for r in pending if r["action"] == "pause"]
        kept = pauses[0] if pauses else None
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
        "responsive": alive and fresh,
        "paused_since": state.get("paused_since") if current == "paused" else None,
        "paused_reason": state.get("paused_reason") if current == "paused" else None,
        "current_file": state.get("current_file") if same_daemon or current == "dead" else None,
        "progress": state.get("progress") if same_daemon or current == "dead" else None,
        "last_error": state.get("last_error"),
        "state_file_error": state_error,
        "pending": pending,
        "kept_pause": kept,
    }


def _round(x):
    return None if x is None else round(x, 3)


def is_training(root) -> bool:
    """True while a live daemon is training a file or stopping: others must not swap the model."""
    st = daemon_status(root)
    return st["alive"] and st["state"] in ("training", "stopping")
