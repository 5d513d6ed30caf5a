"""Initialise a training root, and run the daemon that trains every file dropped in inbox/.

`init` creates config.json, current_model/ (the embedded tiny model or a copy of a local
Hugging Face folder) and version v001, and approves the config. `run` (the default)
watches inbox/, validates, queues and trains each file exactly once (docs/design.md, The file lifecycle).

    python3 training_daemon.py init --root ~/train --base tiny
    python3 training_daemon.py --root ~/train            # run until stopped
    python3 training_daemon.py run --once --no-monitor   # train what is queued, then exit

Only the training engine imports torch, and only lazily, once per daemon process. The
intake (inbox to queue) is an inbox_files.InboxIntake the Daemon owns (`Daemon.intake`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import logging.handlers
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cli_guard
import eval_gate
import inbox_files
import root_init
import torchrun_job
import training_queue
import trainroot
from root_init import init_root  # noqa: F401  (training_daemon.init_root, as documented)
from trainroot import GuardrailError, Paths, add_common_args, print_json, resolve_root, subcommands

SCRIPTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- init

def cmd_init(args) -> int:
    """Create config.json, current_model/ and version v001, and approve the config."""
    result = root_init.init_root(resolve_root(args.root), base=args.base)
    if args.json:
        print_json(result)
    elif result.get("restored_config_from"):
        print(f"Restored {result['root']}/config.json from version "
              f"{result['restored_config_from']} (the config it trained with); current_model "
              "untouched. Check it with `python3 state_tracker.py --check`.")
    else:
        print(f"Initialised {result['root']}: current_model from {result['base_model']}, "
              f"version {result['version']}, config approved.")
        _print_chat_rendering(result.get("chat") or {}, result["root"])
        if result.get("checkpoints_kept_in"):
            print(f"The checkpoints of the model trained here before (its weights, the last "
                  f"copy of them) are kept in {result['checkpoints_kept_in']}/, out of the new "
                  "model's way.")
        print(f"Next: drop .jsonl files into {result['root']}/inbox/ and run "
              f"`python3 training_daemon.py run --root {shlex.quote(result['root'])}`.")
    return 0


def _print_chat_rendering(chat: dict, root) -> None:
    """What init found out about chat records: the template, its source, a test render."""
    if chat.get("rendering") == "template":
        print(f"Chat records render with {chat['template']} (from {chat['source']}).")
        if chat.get("system_role") is False:
            print(f"  It has no system role: {chat.get('error')}. Merge system turns into the "
                  "first user turn (the failed/ record of such a file gives the jq command).")
        if chat.get("sample"):
            print("  Test render: " + json.dumps(chat["sample"], ensure_ascii=False))
    elif chat.get("rendering") == "plain":
        print(f"Chat records render with {chat['template']}: set `chat_template` in "
              f"{root}/config.json to a .jinja file to use a chat format.")
    elif chat.get("error"):
        print(f"Chat rendering could not be checked: {chat['error']}")
    print("  See how any file renders: `python3 training_engine.py show FILE`.")


# --------------------------------------------------------------------------- run: helpers

OPTIMIZER_FACTOR = 3     # a checkpoint holds the weights plus AdamW's two moments
STATE_EVERY_S = 1.0      # .daemon_state.json at most once a second
CONTROL_EVERY_S = 0.2    # a directory scan of control/ at most this often while training
IDLE_TICK_S = 0.25       # idle loop: control requests are seen well within a second
DONE_SETTLE_BUSY_S = 60.0  # between files: the done index brought in step at most this often
USAGE_EVERY_S = 300.0      # after a file: a disk-usage sample (the report's usage, days left)
_VERSION_ID = re.compile(r"v\d{3,}")  # model_versioner's ids: they only grow
# Writes the filesystem refuses for a reason free space does not fix (read-only, permissions)
WRITE_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_WRITE_REFUSED_KINDS = ("disk", "readonly", "permission")  # the engine's pause_reason values
_WRITE_FIXES = {
    "disk": "the disk is full: free space (`python3 state_tracker.py --check` says what takes it)",
    "readonly": "the filesystem is read-only: check `dmesg`, remount it read-write "
                "(`mount -o remount,rw MOUNTPOINT`)",
    "permission": "the training root is not writable by the daemon's user: give it back "
                  "(`chown -R USER ROOT` or `chmod -R u+w ROOT`)"}


def _version_id(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, (tuple, list)):  # model_versioner.create_version: (id, created)
        return v[0]
    return v.get("id") if isinstance(v, dict) else str(v)


def _memory_short(device: str) -> str | None:
    """Why the model kept for a next file should go back for want of memory, or None: less
    than 10% of the GPU's memory free (other programs took it), or of the machine's (psutil's
    available, within this process's cgroup memory limit where it has one: in a container
    psutil sees the host's). Where it cannot be read: that reason (it goes back)."""
    try:
        if device == "cuda":
            import torch
            free, total = torch.cuda.mem_get_info()
            what = "GPU memory"
        else:
            import psutil
            memory = psutil.virtual_memory()
            free, total, what = memory.available, memory.total, "memory"
            limit = _cgroup_memory()
            if limit is not None:
                total, free = min(total, limit[0]), min(free, max(0, limit[0] - limit[1]))
    except Exception as exc:  # noqa: BLE001 (psutil, /proc, the driver: never the daemon's end)
        return f"the free memory could not be read ({exc.__class__.__name__}: {exc})"
    if free >= total / 10:
        return None
    return f"{what} runs short ({free / 2**20:.0f} of {total / 2**20:.0f} MiB free)"


def _cgroup_memory(proc: Path = Path("/proc/self/cgroup"),
                   sysfs: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, used) bytes of this process's memory cgroup (v2, or v1's memory controller;
    found through /proc/self/cgroup), used less the page cache the kernel can reclaim
    (inactive_file); None without a limit or a cgroup to read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:  # v2
            base, names = sysfs / path.lstrip("/"), (
                "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, names = sysfs / "memory" / path.lstrip("/"), (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        try:
            limit = (base / names[0]).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2**63
                return None
            stat = dict(x.split() for x in (base / "memory.stat").read_text().splitlines())
            used = int((base / names[1]).read_text()) - int(stat.get(names[2], 0))
            return int(limit), max(0, used)
        except (OSError, ValueError):
            continue
    return None


def _file_id(name: str, rec: dict) -> str:
    """The engine's checkpoint id for one queued file: readable (metrics.jsonl shows it as
    `file`), and unique per arrival so a re-trained name or content never resumes an old
    checkpoint."""
    return f"{name}#{str(rec.get('sha256'))[:12]}-{rec.get('seq') or time.time_ns()}"


def _trainer_state(model_dir: Path) -> dict:
    try:
        state = trainroot.read_json(model_dir / "trainer_state.json", default={})
    except GuardrailError:
        return {}
    return state if isinstance(state, dict) else {}


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def _widening(model_dir: Path) -> int:
    """How much bigger a parameter is in a checkpoint (fp32 weights and AdamW moments) than in
    current_model, which keeps the base model's dtype: 2 for bfloat16/float16, else 1."""
    try:
        cfg = trainroot.read_json(model_dir / "config.json", default={}) or {}
    except GuardrailError:
        return 1  # the pre-flight's load check reports a bad config.json
    name = (cfg.get("dtype") or cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
    return 2 if name in ("bfloat16", "float16") else 1


def _printable(text: str) -> str:
    """`text` on one log line: control characters and undecodable bytes, which a file name
    may hold (`new\\nline.jsonl`, a Latin-1 name), escaped as Python writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class _OneLine(logging.Filter):
    """One event, one log line, always encodable: a hostile file name can neither forge a
    log line nor make the log handler print a `--- Logging error ---` traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _printable(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_printable(str(a)) if isinstance(a, (str, Path)) else a
                                for a in record.args)
        return True


_ONE_LINE = _OneLine()


class _LogFile(logging.handlers.RotatingFileHandler):
    """logs/daemon.log. A write the disk refuses (full) is said once on stderr, not as
    logging's traceback for every line (40 lines a second while the disk stays full); the
    lines still reach stderr through the other handler."""

    _failing = False

    def emit(self, record) -> None:
        self._failed_now = False
        super().emit(record)
        if not self._failed_now:
            self._failing = False

    def handleError(self, record) -> None:
        self._failed_now = True
        if not self._failing:
            self._failing = True
            sys.stderr.write(f"cannot write {self.baseFilename} ({sys.exc_info()[1]}); its "
                             "lines go to stderr only until it can\n")


def _setup_logging(p: Paths) -> logging.Logger:
    log = logging.getLogger("training_daemon")
    log.setLevel(logging.INFO)
    log.propagate = False
    if _ONE_LINE not in log.filters:
        log.addFilter(_ONE_LINE)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    fh = _LogFile(p.logs / "daemon.log", maxBytes=5 << 20, backupCount=5, encoding="utf-8",
                  errors="backslashreplace")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)
    # the engine's own lines (refusals, failed checkpoints, "not resuming from") go to the
    # same log, marked as the engine's
    engine = logging.getLogger("training_engine")
    engine.setLevel(logging.INFO)
    engine.propagate = False
    for f in (_ONE_LINE, _ENGINE_MARK):
        if f not in engine.filters:
            engine.addFilter(f)
    for h in list(engine.handlers):
        engine.removeHandler(h)
    engine.addHandler(fh)
    engine.addHandler(sh)
    return log


class _EngineMark(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith("engine: "):
            record.msg = "engine: " + record.msg
        return True


_ENGINE_MARK = _EngineMark()
RECENT_WARNED = 10   # files with warnings the daemon state lists (newest last)
INTAKE_RENDER_RECORDS = 20   # records of a queued file test-rendered at intake


def file_warnings(rec: dict, result: dict) -> dict:
    """What concerns one trained file, counted for its done/ record: chat records rendered
    plain (`fallback`: the model has no template, or config.json chose "plain"), records
    longer than max_length (`split_examples`: they continue in the next row, nothing is
    dropped) and invalid records passed over (`skipped_records`, `add --skip-invalid`: lines
    validation refuses, and records the chat template refuses, `rendered` skipped_refused)."""
    rendered = result.get("rendered") or {}
    skipped = rec.get("skipped_records") or {}
    return {"fallback": int(rendered.get("plain", 0)),
            "split_examples": int(rendered.get("split", 0)),
            "skipped_records": (int(skipped.get("count", 0)) if isinstance(skipped, dict) else 0)
            + int(rendered.get("skipped_refused", 0))}


def _import_engine(model_dir: Path) -> None:
    """The engine, transformers' Auto classes and current_model's own model class (~5 s on
    2 cores, paid once per daemon, while the inbox settles)."""
    try:
        importlib.import_module("training_engine")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        AutoModelForCausalLM._model_mapping[type(config)]  # imports e.g. modeling_llama
    except Exception:  # only a head start: the main thread's import reports real problems
        logging.getLogger("training_daemon").debug("engine preload incomplete", exc_info=True)


class _GateHeld(GuardrailError):
    """`run --once` ends on a file the quality gate holds: a decision waits (accept or
    reject, no daemon needed), not an error to start the daemon again for."""


class _Unrestorable(GuardrailError):
    """`skip --discard` cannot restore the version taken before the file (deleted or
    damaged by hand meanwhile): refused, nothing moved."""


def _named_templates(folder: Path) -> set[str]:
    """The names of a model folder's named chat templates (transformers saves them in
    additional_chat_templates/NAME.jinja; older tokenizer_config.json files hold a list or
    a dict), "default" among them where the model has named ones and a default."""
    names = {f.stem for f in (folder / "additional_chat_templates").glob("*.jinja")}
    try:
        own = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        own = None
    if isinstance(own, dict):
        names |= {k for k in own if isinstance(k, str)}
    elif isinstance(own, list):
        names |= {t["name"] for t in own if isinstance(t, dict) and isinstance(t.get("name"), str)}
    if names and ((folder / "chat_template.jinja").is_file() or isinstance(own, str)):
        names.add("default")  # (a lone template is no named one: the tokenizer's is a str)
    return names


def _template_syntax_error(text: str) -> str | None:
    """'line N: what' for a chat template jinja cannot parse, else None. Parsed as
    transformers compiles them (loop controls; its own `generation` block is let be)."""
    import jinja2
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        if "generation" in str(exc.message):
            return None
        return f"line {exc.lineno}: {exc.message}"
    return None


class _Paused(Exception):
    """Pause (or, with --once, exit 1) with this message: pre-flight failed ("preflight",
    retried every rescan) or the engine refused the file ("engine", retried when config.json
    changes or on `resume`)."""

    def __init__(self, error: GuardrailError, kind: str = "preflight"):
        super().__init__(str(error))
        self.error, self.kind = error, kind


# --------------------------------------------------------------------------- run: the daemon

class Daemon:
    """One daemon per root: intake from inbox/, one file at a time through the engine."""

    def __init__(self, root, *, once: bool = False, monitor: bool = True):
        self.p = Paths(resolve_root(root))
        self.once, self.monitor_wanted = once, monitor
        self.log = logging.getLogger("training_daemon")
        self.started_at = trainroot.utc_now()
        self.identity = trainroot.process_identity()  # how readers tell this process from a reused pid
        import training_controller  # stop/skip written before this are stale: the boot clock says
        self.started_clock = training_controller.clock_mark()
        self.state, self.paused_reason, self.paused_since, self.pause_kind = "idle", None, None, None
        self.current, self.progress, self.last_error = None, None, None
        self.stop_signal: str | None = None      # SIGTERM/SIGINT: acts like `stop`
        self.stop_request: dict | None = None    # a claimed `stop` to acknowledge at exit
        self.pending: tuple[str, dict | None] | None = None  # action claimed while training
        self._queue_order = training_queue.QueueOrder(self.p.root)  # next_job's view
        self.intake: inbox_files.InboxIntake | None = None  # made once config.json is loaded
        self.wake = threading.Event()
        self.done = training_queue.done_index(self.p.root, owner=True)  # .index/done.sqlite
        self._done_settled = None  # done/'s (inode, mtime) when the index last matched it
        self._done_settle_tried = 0.0  # monotonic time of the last try
        self._usage_sampled: float | None = None  # monotonic time of the last usage sample
        self.backup_proc = None
        self._backup_src: str | None = None  # the version the running automatic backup copies
        self._gave_way = None  # why complete_eval last gave way: wake, request or stop
        self._wake_retries = 0  # --once: a wake-up does not end the run with the eval half done
        self._eval_completed: tuple | None = None  # complete_eval: current_model (and config) last done
        self._backup_next: dict | None = None  # a file done while a backup ran: its turn next
        self.backup_failed: str | None = None
        self.exit_code = 0
        self._state_written = 0.0
        self._control_checked = 0.0
        self._retry_at = 0.0
        self._timings: dict | None = None
        self._refused_config: tuple | None = None
        self._recheck_at = 0.0  # a paused pre-flight (or engine refusal) is re-checked then
        self._spare_checked = 0.0  # idle: when the disk was last checked for the spare
        self._idle_since: float | None = None  # when the queue last emptied (keep_warm_seconds)
        self._keep_warm: float | None = None    # keep_warm_seconds as of the last file
        self._warm_config: tuple | None = None  # config.json's signature as of the last file
        self._import_thread: threading.Thread | None = None
        self._waiting_for: str | None = None      # the lock holders a queued file waits for
        self._engine = None
        self._monitor = None
        self.warned_files: list[dict] = []  # recent files whose record counts warnings
        self._intake_tok = None               # (key, Encoder) for the intake render check
        self.notifier = eval_gate.Notifier(self.p.root, self.log)  # config notify_command

    # ---------------------------------------------------------------- state file

    def write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._state_written < STATE_EVERY_S:
            return
        self._state_written = now
        doc = {"schema_version": 1, "pid": os.getpid(), "started_at": self.started_at,
               "heartbeat": trainroot.utc_now(), "state": self.state,
               "paused_reason": self.paused_reason, "paused_since": self.paused_since,
               "current_file": self.current, "progress": self.progress,
               "last_error": self.last_error, "file_warnings": self.warned_files,
               "memory_kept": self._memory_kept(), **self.identity,
               "lock_inode": getattr(self, "_lock_inode", None),
               "ended_by": getattr(self, "_ended_kind", None) if self.state == "stopped" else None,
               "heartbeat_clock": round(trainroot.boot_clock(), 3)}
        try:
            # Atomic for readers; no fsync: a heartbeat is worthless after a power cut anyway.
            trainroot.atomic_write_json(self.p.daemon_state, doc, sync=False)
        except OSError as exc:  # a full disk must not kill the daemon; the tracker sees the age
            self.log.warning("cannot write %s: %s", self.p.daemon_state, exc)

    def set_state(self, state: str, reason: str | None = None, kind: str | None = None) -> None:
        if state == "paused":
            if kind != "request" and (self.state != "paused" or reason != self.paused_reason):
                self.notify(kind or "paused", reason)
            if self.state != "paused":
                self.paused_since = trainroot.utc_now()
            self.paused_reason, self.pause_kind = reason, kind
            self.log.warning("paused: %s", reason)
            if kind in ("request", "backup"):  # kept across restarts until `resume` (control/paused.json)
                import training_controller
                try:
                    training_controller.keep_pause_record(self.p.root, reason, self.paused_since, kind)
                except OSError as exc:  # a full disk: the pause holds while this daemon runs
                    self.log.warning("cannot keep the pause across restarts: %s", exc)
        else:
            self.paused_reason = self.paused_since = self.pause_kind = None
        self.state = state
        self.write_state(force=True)

    def notify(self, what: str, reason: str | None, *, file: str | None = None,
               commands: list | None = None, numbers: dict | None = None) -> None:
        """Tell a person the daemon waits for them (config notify_command); never raises."""
        try:
            cfg = getattr(self, "cfg", None) or {}
            if not cfg.get("notify_command"):
                return
            data = self._processing_file()
            hold = (training_queue.read_record(data).get("hold") or {}) if data else {}
            if commands is None:
                commands = {"gate": list(eval_gate.decision_cmds(self.p.root)),
                            "spike": ["python3 training_controller.py resume",
                                      "python3 training_controller.py skip --discard"]}.get(
                    what, ["python3 training_controller.py resume"])
            if numbers is None and hold.get("kind") == "gate":
                numbers = {"eval": hold.get("eval"), "threshold_pct": hold.get("threshold_pct"),
                           "held_version": hold.get("version")}
            self.notifier.send(cfg, {
                "what": what, "reason": reason,
                "file": file or (self.current or {}).get("name") or (data.name if data else None),
                "numbers": numbers or {}, "commands": commands})
        except Exception as exc:  # a notifier never stops training
            self.log.warning("notify_command not run (%s: %s)", exc.__class__.__name__, exc)

    # ---------------------------------------------------------------- engine (lazy, once)

    def preload_engine(self) -> None:
        """Import torch/transformers in a thread while the inbox settles (start-up latency).

        Not when pre-flight would refuse anyway: the thread cannot be abandoned, so a
        daemon that only pauses (or, with --once, exits 1) would wait for the import.
        """
        if self._import_thread is None and self._engine is None:
            import training_config
            try:
                cfg = training_config.load_config(self.p.root)
                self.preflight(cfg)
            except (_Paused, GuardrailError):
                return
            if int(cfg.get("nproc_per_node") or 1) > 1:
                return  # torchrun's ranks import torch; the daemon stays small
            self._import_thread = threading.Thread(target=_import_engine, name="engine-import",
                                                   args=(self.p.current_model,), daemon=True)
            self._import_thread.start()

    def engine(self):
        if self._engine is None:
            if self._import_thread is not None:
                # transformers' lazy imports are not thread-safe: let the preload finish
                self._import_thread.join()
            self._engine = importlib.import_module("training_engine")
        return self._engine

    # ---------------------------------------------------------------- control requests

    def _requests(self) -> list[dict]:
        import training_controller
        try:
            if not any(n.endswith(".request.json") for n in os.listdir(self.p.control)):
                return []
        except FileNotFoundError:
            return []
        return training_controller.pending_requests(self.p.root,
                                                    daemon_started_at=self.started_at,
                                                    daemon_started=self.started_clock)

    def ack(self, req: dict | None, outcome: str, message: str) -> None:
        if req is None:
            return
        import training_controller
        try:
            training_controller.acknowledge(self.p.root, req, outcome, message)
        except (OSError, GuardrailError) as exc:
            self.log.warning("cannot acknowledge request %s: %s", req.get("id"), exc)
        self.log.info("request %s %s: %s (%s)", req.get("id"), req.get("action"), outcome, message)

    def _claim(self, req: dict) -> bool:
        import training_controller
        return training_controller.claim_request(self.p.root, req)

    def control_idle(self) -> None:
        """Act on requests while no file is training (idle or paused)."""
        for req in self._requests():
            if not self._claim(req):
                continue
            action = req["action"]
            if action == "stop":
                self.stop_request = req
                return
            if action == "pause":
                if self.state == "paused" and self.pause_kind in ("preflight", "engine", "spike"):
                    # a pause that lifts itself once its cause is fixed (or, a spike's, once its
                    # file is skipped): a person's pause must hold until `resume`, so it takes
                    # its place (a held file keeps its hold)
                    was = self.paused_reason
                    why = "paused by request" + (f": {req['reason']}" if req.get("reason") else "")
                    self.set_state("paused", why, "request")
                    self.ack(req, "done", f"paused until `resume` (it was paused on: {was})")
                elif self.state == "paused":
                    self.ack(req, "noop", f"already paused: {self.paused_reason}")
                else:
                    why = "paused by request" + (f": {req['reason']}" if req.get("reason") else "")
                    self.set_state("paused", why, "request")
                    self.ack(req, "done", "paused" + (" (checkpoint is durable)"
                                                      if self._processing_file() else ""))
            elif action == "resume":
                import training_controller
                training_controller.clear_pause_record(self.p.root)
                if self.state == "paused" and self.pause_kind == "gate":
                    self.ack(req, "noop", f"{self.paused_reason}; resume does not decide it")
                elif self.state == "paused":
                    self.log.info("resumed (was: %s)", self.paused_reason)
                    if self.pause_kind == "backup":
                        self.backup_failed = None
                    data = self._processing_file()
                    if data is not None and training_queue.read_record(data).get("hold"):
                        training_queue.update_record(data, hold=None)
                    self.set_state("idle")
                    refused = self._preflight_now() if (
                        data is not None or training_queue.counts(self.p.root)["queued"]) else None
                    if refused is None:
                        self.ack(req, "done", "resumed")
                    else:  # said now, not "resumed" while the next file pauses at once
                        self.set_state("paused", str(refused.error), refused.kind)
                        self.ack(req, "failed", f"resumed, but pre-flight pauses again: {refused.error}")
                else:
                    self.ack(req, "noop", "not paused")
            elif action in ("accept", "reject"):
                self.decide(req)
            elif action == "skip":
                data = self._processing_file()
                if data is None:
                    self.ack(req, "noop", "nothing is training")
                elif eval_gate.held_file(self.p.root) == data:
                    accept, reject = eval_gate.decision_cmds(self.p.root)
                    self.ack(req, "failed", f"{data.name} is held by the quality gate: run "
                                            f"`{accept}` or `{reject}`")
                else:
                    discard = bool((req.get("options") or {}).get("discard"))
                    try:
                        restored = self._finish_skipped(
                            data, discard, "skipped by request"
                            + (f": {req['reason']}" if req.get("reason") else ""))
                    except trainroot.BusyError as exc:  # a restore held current_model throughout
                        self.ack(req, "failed", f"{exc}; {data.name} stays in processing/: send "
                                                "the skip again once it has finished")
                        continue
                    except _Unrestorable as exc:  # nothing moved: the file waits, still paused
                        self.log.error("skip --discard refused: %s", exc)
                        self.ack(req, "failed", f"{exc.what}; {data.name} stays in processing/: "
                                                f"{exc.fix}")
                        continue
                    if restored is None:
                        self.ack(req, "done", f"{data.name}: {self.paused_reason}")
                        continue
                    self.ack(req, "done", f"{data.name} moved to skipped/"
                             + (" and the version before it restored" if restored else
                                " (current_model, replaced while it waited, kept)" if discard
                                else ""))

    def decide(self, req: dict) -> None:
        """`accept` or `reject` the file the quality gate holds (eval_gate.decide)."""
        action = req["action"]
        try:
            out = eval_gate.decide(self.p.root, action, by=f"request {req['id']}")
        except GuardrailError as exc:
            self.ack(req, "failed", str(exc))
            return
        rec = out["record"]
        if rec.get("outcome") == "done":
            self.done.add(Path(out["dst"]).name, rec)
        self.current = self.progress = None
        self.log.info("%s: %s by %s -> %s (current_model: %s)", out["file"], action + "ed"
                      if action == "reject" else "accepted", req["id"], out["dst"], out["version"])
        if self.state == "paused" and self.pause_kind == "gate":
            self.set_state("idle")
        self.ack(req, "done", f"{out['file']} {'accepted' if action == 'accept' else 'rejected'}: "
                              f"moved to {Path(out['dst']).parent.name}/; current_model is "
                              f"{out['version']}")
        if rec.get("outcome") == "done":
            self.maybe_backup(rec)

    def control_training(self):
        """The engine's callback between micro-batches: None or stop/pause/skip."""
        if self.stop_signal:
            if self.state != "stopping":
                self.set_state("stopping")
            return "stop"
        if self.pending:
            return self.pending[0]
        now = time.monotonic()
        if now - self._control_checked < CONTROL_EVERY_S:
            return None
        self._control_checked = now
        self.write_state()
        if self.backup_failed is not None and self._poll_backup() is False:
            self.pending = ("pause", None)
            return "pause"
        if self.intake is not None:  # None only for a Daemon driven without run() (tests)
            self.intake.between_steps(now)  # files dropped now are validated and queued now
        for req in self._requests():
            action = req["action"]
            if not self._claim(req):
                continue
            if action == "resume":
                self.ack(req, "noop", "not paused: training")
                continue
            if action in ("accept", "reject"):
                self.ack(req, "failed", f"nothing is held by the quality gate: "
                                        f"{(self.current or {}).get('name')} is training")
                continue
            self.pending = (action, req)
            self.log.info("request %s: %s at the next optimizer step", req["id"], action)
            if action == "stop":
                self.set_state("stopping")
            return action
        return None

    def on_progress(self, *args, **kw) -> None:
        info = args[0] if args and isinstance(args[0], dict) else kw
        rec_total = (self.current or {}).get("records")
        prog = {"global_step": info.get("global_step"),
                "step_in_file": info.get("step_in_file", info.get("steps")),
                "records_done": info.get("records_done"), "records_total": rec_total,
                "tokens_per_sec": info.get("tokens_per_sec"), "loss": info.get("loss"),
                "eta_seconds": info.get("eta_seconds")}
        if prog["eta_seconds"] is None and rec_total and info.get("records_done"):
            elapsed = time.monotonic() - self._train_started
            done = info["records_done"] - self._records_at_start
            if done > 0 and elapsed > 0:
                prog["eta_seconds"] = round((rec_total - info["records_done"]) * elapsed / done, 1)
        self.progress = prog
        self.write_state()

    # ---------------------------------------------------------------- pre-flight

    def preflight(self, cfg: dict) -> None:
        import model_versioner
        import training_config
        problems = model_versioner.check_model_dir(self.p.current_model)
        if problems:
            raise _Paused(GuardrailError(
                "pre-flight: current_model is not usable (" + "; ".join(problems[:5]) + ")",
                self.p.current_model, f"Bring it back with `{model_versioner.bring_back(self.p.root)}`, "
                f"then {self._go_on()}."))
        self._unchanged_since_versioned(model_versioner)
        import lora_mode
        try:  # an adapter with config finetune "full": the engine would refuse it mid-take
            lora_mode.wanted(self.p.current_model, cfg)
        except GuardrailError as exc:
            raise _Paused(GuardrailError(
                f"pre-flight: {exc.what}", exc.where,
                "Run `python3 model_versioner.py consolidate --full` (current_model becomes the "
                "merged full model), or set \"finetune\": \"lora\" back in config.json and "
                f"approve it (`python3 training_controller.py approve-config`); then {self._go_on()}."))
        shape = lora_mode.shape_mismatch(self.p.current_model, cfg) \
            if cfg.get("finetune") == "lora" else None
        if shape is not None:  # the engine would refuse its parameters once the file is taken
            raise _Paused(GuardrailError(
                f"pre-flight: current_model's adapter has another LoRA shape ({shape}) than "
                f"config.json's (lora_r {cfg.get('lora_r')}, lora_alpha {cfg.get('lora_alpha')}, "
                f"lora_target_modules {json.dumps(cfg.get('lora_target_modules'))})",
                self.p.current_model / lora_mode.ADAPTER_CONFIG,
                "Run `python3 model_versioner.py consolidate` (it merges this adapter into a new "
                "base and starts a fresh adapter of the new shape), or put the old values back "
                f"in config.json and approve them; then {self._go_on()}."))
        problem = self._template_problem(cfg)
        if problem is not None:  # every file's encoder would refuse it
            raise _Paused(problem)
        import base_store
        base = base_store.adapter_base(self.p.current_model)
        if base is not None or base_store.is_adapter_folder(self.p.current_model):
            # an adapter is only as good as its base: a damaged one trains garbage
            problems = base_store.check_base(self.p.root, base) if base else ["names no base"]
            if problems:
                raise _Paused(GuardrailError(
                    f"pre-flight: current_model is an adapter whose base {base} is damaged or "
                    "missing (" + "; ".join(problems[:3]) + ")", self.p.root / "base" / str(base),
                    f"Bring the base back with `python3 backup_manager.py restore-base {base}` "
                    "(`python3 backup_manager.py list` shows the backups), or restore a version "
                    f"on another base (`python3 model_versioner.py list`), then {self._go_on()}."))
        changed = training_config.changed_locked(self.p.root, cfg)
        if changed:
            text = "; ".join(training_config.format_change(*c) for c in changed)
            raise _Paused(GuardrailError(f"pre-flight: locked config changed ({text})",
                                         self.p.config,
                                         f"Run `{training_config.APPROVE_COMMAND}` to approve it, "
                                         "or put the old values back" + (
                                             " (the eval/ files as they were approved)"
                                             if any(c.name == "eval_set" for c in changed) else "") + (
                                             " (a newly locked one: take it out of `locked`)"
                                             if any(c.newly for c in changed) else "") + "."))
        # The file's saves (a checkpoint, a new model) must fit max_disk_gb and the free
        # space before any is written; retention is applied first when they do not.
        import retention
        need = _folder_bytes(self.p.current_model) * (1 + OPTIMIZER_FACTOR * _widening(self.p.current_model))
        # the spare checkpoint is written over: no new room (nor given back to make room)
        spare = (self._engine.spare_bytes() if self._engine is not None else 0) or \
            retention.spare_bytes(self.p.root)  # (one a daemon before this one kept)
        room = retention.make_room(self.p.root, cfg, max(0, need - spare), "root", keep_spare=True)
        for vid in room["pruned_versions"]:
            self.log.info("pre-flight: retention pruned %s to make room", vid)
        if not room["ok"]:
            now = time.monotonic()  # what the state tracker reports (DISK_BUDGET) is the last sample
            if self._usage_sampled is None or now - self._usage_sampled >= 60:
                with contextlib.suppress(GuardrailError, OSError):
                    retention.record_usage(self.p.root, cfg)
                self._usage_sampled = now
            raise _Paused(GuardrailError(
                f"pre-flight: the next checkpoint and model do not fit ({room['problem']}); "
                "retention has pruned what its rules allow", self.p.root,
                f"Free space with `{room['fix']}` ({room['fix_note']}), then {self._go_on()}."))

    def _preflight_now(self) -> "_Paused | None":
        """What pre-flight would pause the next file on now, or None."""
        try:
            self.preflight(self._file_config())
        except _Paused as paused:
            return paused
        except GuardrailError as exc:
            return _Paused(exc)
        except OSError as exc:  # (making room on the disk failed): a pause, retried, never a crash
            return _Paused(GuardrailError(f"pre-flight: {exc.strerror or exc}", exc.filename or self.p.root,
                                          f"Fix the cause; training goes on by itself once "
                                          f"pre-flight passes (or {self._go_on()})."))
        return None

    def _file_config(self) -> dict:
        """config.json for the next file. Invalid or unreadable (a hand edit while the daemon
        runs): a pre-flight pause, retried every rescan until it is fixed, never an exit."""
        import training_config
        try:
            return training_config.load_config(self.p.root)
        except GuardrailError as exc:
            raise _Paused(GuardrailError(f"pre-flight: {exc.what}", exc.where,
                                         f"Fix config.json (`python3 state_tracker.py --warnings` "
                                         f"lists every problem); training goes on by itself once "
                                         f"it reads again (or {self._go_on()})."
                                         if not self.once else
                                         f"Fix config.json, then {self._go_on()}.")) from None

    def _unchanged_since_versioned(self, model_versioner) -> None:
        """current_model shares its files (hard links) with the version it is: a file written
        in place changed both. The cheap check sees a moved time stamp; the checksums tell a
        `touch` from changed bytes, which would train (NaN, or worse, a new version made from
        them) and then find the version to go back to damaged too."""
        vid = model_versioner.current_version(self.p.root)
        moved = vid and model_versioner.moved_in_place(self.p.root, vid)
        if not moved:
            return
        try:  # a `touch` verified once is not hashed again before every file
            seen = (vid, tuple(os.stat(self.p.current_model / rel).st_mtime_ns for rel in moved))
        except OSError:
            seen = None
        if seen is not None and seen == getattr(self, "_verified_as", None):
            return
        bad = model_versioner.verify_version(self.p.root, vid)
        if not bad:
            self._verified_as = seen
            return
        parent = model_versioner.read_version(self.p.root, vid).get("parent")
        raise _Paused(GuardrailError(
            f"pre-flight: current_model's files changed since they were versioned as {vid}, "
            f"whose files they are (hard links): {'; '.join(bad[:3])}", self.p.current_model,
            f"Bring back a sound copy: a verified backup of {vid} (`python3 backup_manager.py "
            "list`, then `python3 backup_manager.py restore ID`)"
            + (f", or the version it was trained from (`python3 model_versioner.py restore "
               f"{parent}`; the files trained since are listed by `python3 model_versioner.py "
               f"lineage {vid}`)" if parent else "") + f"; then {self._go_on()}."))

    def _go_on(self) -> str:
        """How to carry on once the cause is fixed: a running daemon waits for `resume`;
        a --once one has exited, so it is started again."""
        if not self.once:
            return "run `python3 training_controller.py resume`"
        root = "" if self.p.root.resolve() == resolve_root(None) else \
            f" --root {shlex.quote(str(self.p.root))}"
        return f"run `python3 training_daemon.py run --once{root}` again"

    # ---------------------------------------------------------------- one file

    def _processing_file(self) -> Path | None:
        try:
            names = sorted(n for n in os.listdir(self.p.processing)
                           if not training_queue.is_ignored(n))
        except FileNotFoundError:
            return None
        return self.p.processing / names[0] if names else None

    def next_job(self) -> Path | None:
        """The file to train now: the one in processing/ (resume), else the queue's head."""
        data = self._processing_file()
        if data is not None:
            return data if time.monotonic() >= self._retry_at else None
        for path in self._queue_order.paths():
            rec = training_queue.read_record(path)
            if not rec:
                continue  # moved meanwhile (set-priority, remove)
            prior = self.done.get(rec.get("sha256"))
            if prior and not rec.get("force"):
                reason = (f"already trained: same content as done/{prior.get('name')}"
                          + (" (its data file since removed)" if prior.get("data_removed") else "")
                          + f" (into version {prior.get('version_after')})")
                rec.update(reason=reason, duplicate_of=prior.get("name"),
                           trained_into=prior.get("version_after"), outcome="skipped")
                try:
                    dst = training_queue.move_with_record(
                        path, self.p.skipped, rec, reason,
                        finish=lambda d: {"fix": training_queue.fix_for(self.p, "duplicate", d)})
                except FileNotFoundError:
                    continue  # `remove` took it meanwhile
                self.log.warning("%s: skipped - %s. %s", path.name, reason,
                                 training_queue.fix_for(self.p, "duplicate", dst))
                continue
            return path
        return None

    def process(self, data: Path) -> None:
        """Train one file holding the model lock (and, in-process, the engine lock) from
        before it is taken from the queue to its end-of-file publish or its pause: no
        restore, rollback, backup restore or engine CLI lands in between (docs/design.md,
        "The root"). While someone else holds them the file waits in the queue."""
        nproc = int(self._file_config().get("nproc_per_node") or 1)
        held = contextlib.ExitStack()
        try:
            held.enter_context(trainroot.model_lock(self.p.root, f"training {data.name}",
                                                    timeout=IDLE_TICK_S))
            engine_lock = trainroot.FileLock(self.p.lock("engine"), f"training_daemon {data.name}")
            if nproc == 1:  # in-process; a torchrun job's rank 0 takes it itself
                held.callback(engine_lock.acquire(timeout=0).release)
            elif trainroot.read_lock_holder(engine_lock.path):
                raise trainroot.BusyError("engine busy", engine_lock.path)
        except trainroot.BusyError:
            held.close()
            holders = [(n, trainroot.read_lock_holder(self.p.lock(n))) for n in ("model", "engine")]
            busy = "; ".join(f"pid {h.get('pid')} ({h.get('purpose')}) holds {n}.lock"
                             for n, h in holders if h)
            if busy != self._waiting_for:  # once per holder, not every tick
                self._waiting_for = busy
                self.log.info("%s waits: %s", data.name, busy or "a lock was busy")
            self._warm_room()  # (a restore or an eval holds them: the window still runs)
            return
        self._waiting_for = None
        self._idle_since = None  # a file trains: the window of keep_warm_seconds starts after it
        with held:
            self._process(data)
            self.maintain_metrics()

    def maintain_metrics(self) -> None:
        """Between files, under the model and engine locks: summarise the file's metrics
        lines and close metrics.jsonl into a monthly segment once its month is over
        (metrics_log.py). Never while a file is in processing/ (its resume reads the tail)."""
        if self._processing_file() is not None:
            return
        import done_archive
        import metrics_log
        try:
            metrics_log.maintain(self.p.root, self.log)
        except (GuardrailError, OSError) as exc:  # metrics.jsonl is untouched; retried next file
            self.log.warning("metrics rotation after the file failed: %s", exc)
        try:  # done/ files older than config `done_archive` days: gzip, verified (off by default)
            import training_config
            done_archive.maintain(self.p.root, training_config.load_config(self.p.root), self.log)
        except (GuardrailError, OSError) as exc:
            self.log.warning("done archive after the file failed: %s", exc)

    def _process(self, data: Path) -> None:
        """Pre-flight, snapshot, train, and move the file to done/ (or skipped/, failed/)."""
        import model_versioner
        self._warm_config = trainroot.file_signature(self.p.config)  # (before: a change between goes too)
        cfg = self._file_config()
        self._keep_warm = float(cfg.get("keep_warm_seconds") or 0)
        if data.parent == self.p.processing and not training_queue.usable_record(data):
            # put there by hand while the daemon ran (start-up recovery does the same)
            self.log.warning("recovery: %s", training_queue.recover_processing(self.p, data))
            return
        held = training_queue.read_record(data) if data.parent == self.p.processing else {}
        hold = held.get("hold")
        if hold:  # a spike or a failed save paused this file before a restart: still paused
            if self.once:
                raise (_GateHeld if hold.get("kind") == "gate" else GuardrailError)(
                                     f"{data.name} is on hold: {hold.get('reason')}", data,
                                     "Run `{}` or `{}`.".format(*eval_gate.decision_cmds(self.p.root))
                                     if hold.get("kind") == "gate" else
                                     "Inspect it, then run `python3 training_controller.py "
                                     "resume` (it clears the hold; no daemon needed), then "
                                     f"{self._go_on()}.")
            self.current = {"name": data.name, "sha256": held.get("sha256"),
                            "priority": held.get("priority"), "records": held.get("records")}
            self.set_state("paused", hold.get("reason"), hold.get("kind"))
            return
        self.preflight(cfg)  # raises _Paused
        cut = self._not_as_recorded(data)
        if cut:
            self._fail_not_as_recorded(data, cut)
            return
        if data.parent != self.p.processing:
            rec = training_queue.read_record(data)
            rec["started_at"] = trainroot.utc_now()
            rec.setdefault("file_id", _file_id(data.name, rec))
            try:
                data = training_queue.move_with_record(data, self.p.processing, rec, "training")
            except FileNotFoundError:  # `set-priority`/`remove` moved it since it was listed
                self.log.info("%s left the queue as it was taken (set-priority or remove); "
                              "taking the queue's head again", data.name)
                return
        rec = training_queue.read_record(data)
        reached = self._checkpointed_step(rec.get("file_id"))
        if rec.get("in_training") and reached is not None and reached > rec.get("attempt_step", -1):
            # killed from outside (kill -9, a power cut) after a checkpoint of progress: not
            # a crash of its training, whatever the number of such kills
            self.log.warning("%s: resuming after the daemon was stopped at step %d (a checkpoint "
                             "since the last start: not counted as a failed attempt)", data.name,
                             reached)
            rec["attempts"] = 0
        elif rec.get("in_training"):  # the last process died while training this file
            rec["attempts"] = int(rec.get("attempts") or 0) + 1
            if rec["attempts"] >= cfg["max_attempts"]:
                training_queue.update_record(data, attempts=rec["attempts"], in_training=False)
                self._finish_failed(data, f"training crashed {rec['attempts']} times "
                                          f"(max_attempts {cfg['max_attempts']})")
                return
            self.log.warning("%s: resuming after a crash (attempt %d of %d)", data.name,
                             rec["attempts"] + 1, cfg["max_attempts"])
        self.current = {"name": data.name, "sha256": rec.get("sha256"),
                        "priority": rec.get("priority"), "records": rec.get("records")}
        timings = dict(rec.get("timings") or {})
        update = {"in_training": True, "attempts": rec.get("attempts", 0),
                  "file_id": rec.get("file_id") or _file_id(data.name, rec),
                  "attempt_step": -1 if reached is None else reached}  # (progress since: not a crash)
        if not rec.get("version_before"):
            t0 = time.monotonic()
            before = model_versioner.create_version(self.p.root, f"pre-train:{data.name}")
            timings["snapshot_s"] = round(time.monotonic() - t0, 4)
            state = _trainer_state(self.p.current_model)
            update.update(version_before=_version_id(before), timings=timings,
                          global_step_before=state.get("global_step"),
                          tokens_seen_before=state.get("tokens_seen"))
        elif (now := self._model_changed(rec)) is not None:
            # restored or rolled back while the file waited (paused, stopped): the engine
            # restarts the file on that model, so the record starts there too, and
            # `skip --discard` restores it rather than undoing the restore
            before = model_versioner.create_version(self.p.root, f"pre-train:{data.name}")
            state = _trainer_state(self.p.current_model)
            self.log.warning("%s: current_model changed while the file waited (%s, was %s); the "
                             "file restarts from %s", data.name, now, rec["version_before"],
                             _version_id(before))
            update.update(version_before=_version_id(before),
                          global_step_before=state.get("global_step"),
                          tokens_seen_before=state.get("tokens_seen"))
        nproc = int(cfg.get("nproc_per_node") or 1)
        engine = self.engine() if nproc == 1 else None  # under torchrun each rank imports it
        if engine is None and self._engine is not None:
            self._engine.release_warm()  # the ranks take the GPUs (and the memory) it held
        # One write: the snapshot taken and "training started" (a crash from here counts).
        rec = training_queue.update_record(data, **update)
        self.last_error = None  # what paused or failed before this file is over (its own
        self.set_state("training")  # earlier tries' errors are in its record)
        self.pending = None
        self._train_started = time.monotonic()
        self._records_at_start = 0
        self.progress = None
        try:
            if self._gate_on(cfg):
                self._gate_prepare(rec, cfg)
            if engine is not None:
                result = engine.train_file(self.p.root, data, file_id=rec["file_id"], config=cfg,
                                           records_total=rec.get("records"),
                                           control=self.control_training, progress=self.on_progress)
            else:
                result = torchrun_job.train(self.p, data, rec, nproc, control=self.control_training,
                                            on_progress=self.on_progress, log=self.log)
        except GuardrailError as exc:
            training_queue.update_record(data, in_training=False)
            self.last_error = str(exc)
            self.current = None
            self._settle_pending(f"the training engine refused {data.name}: {exc}")
            raise _Paused(exc, "engine") from None
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in WRITE_REFUSED + DISK_FULL:
                raise  # not the data's fault nor a crash: the loop pauses (_write_refused)
            if isinstance(exc, torchrun_job.TorchrunFailed):  # its cause is in the message, not our stack
                self.log.error("training %s crashed: %s (torchrun's log: %s)", data.name, exc,
                               self.p.logs / torchrun_job.ENGINE_LOG)
            else:
                self.log.exception("training %s crashed", data.name)
            attempts = int(rec.get("attempts") or 0) + 1
            training_queue.update_record(data, in_training=False, attempts=attempts,
                                         last_error=f"{exc.__class__.__name__}: {exc}")
            self.last_error = f"training {data.name} crashed: {exc.__class__.__name__}: {exc}"
            if attempts >= cfg["max_attempts"]:
                self._finish_failed(data, f"training crashed {attempts} times; last: "
                                          f"{exc.__class__.__name__}: {exc}")
            else:  # back off: a crash right after a crash is rarely the data's fault
                self._retry_at = time.monotonic() + min(2 ** attempts, 60)
            self._settle_pending(f"training crashed: {exc}")
            self.set_state("idle")
            self.current = None
            return
        train_s = time.monotonic() - self._train_started
        timings["train_s"] = round(float(timings.get("train_s") or 0) + train_s, 4)
        # the engine's fixed part of train_s (load, checkpoint, publish), over every attempt
        engine_s = dict(timings.get("engine_s") or {})
        for key, value in (result.get("seconds") or {}).items():
            engine_s[key] = round(float(engine_s.get(key) or 0) + float(value), 4)
        timings["engine_s"] = engine_s
        if result.get("model_source"):
            timings["model_from"] = result["model_source"]  # memory: the last file's, kept
        self._timings = timings   # written with the file's next record (one write, not two)
        if result.get("status") in ("stopped", "paused", "spike"):  # it stays in processing/
            try:
                training_queue.update_record(data, in_training=False, timings=timings)
            except OSError as exc:  # (the engine paused for it: the pause below says so)
                if exc.errno not in WRITE_REFUSED + DISK_FULL or result.get("pause_reason") is None:
                    raise
                self.log.warning("cannot update %s's record: %s", data.name, exc)
            self._timings = None
        self._after_training(data, result, cfg)

    def _checkpointed_step(self, file_id) -> int | None:
        """The highest step a checkpoint of file `file_id` holds (checkpoints/*/meta.json),
        or None."""
        steps = []
        try:
            folders = os.listdir(self.p.checkpoints) if file_id else []
        except OSError:
            folders = []
        for name in folders:
            meta = None
            with contextlib.suppress(GuardrailError, OSError):  # (a damaged one is skipped)
                meta = trainroot.read_json(self.p.checkpoints / name / "meta.json", default=None)
            if isinstance(meta, dict) and meta.get("file_id") == file_id and \
                    isinstance(meta.get("global_step"), int):
                steps.append(meta["global_step"])
        return max(steps, default=None)

    def _not_as_recorded(self, data: Path) -> str | None:
        """Why `data` is not the file its record describes (a crash before its content
        reached the disk leaves 0 bytes beside a record of 3,000 records), or None.
        The size always; the sha256 too for a file up to 32 MB (~0.1 s)."""
        rec = training_queue.read_record(data)
        try:
            size = os.stat(data).st_size
        except FileNotFoundError:
            return None  # moved meanwhile: the caller finds out where
        if rec.get("size") is not None and size != rec["size"]:
            return f"{size} bytes on disk, its record says {rec['size']}"
        if rec.get("sha256") and size <= inbox_files.INTAKE_WHILE_TRAINING_MAX_BYTES:
            try:
                digest = trainroot.sha256_file(data)
            except FileNotFoundError:
                return None
            if digest != rec["sha256"]:
                return f"sha256 {digest[:12]} on disk, its record says {rec['sha256'][:12]}"
        return None

    def _fail_not_as_recorded(self, data: Path, why: str) -> None:
        """To failed/, never trained: training it would put a truncated file in done/ under
        the real content's sha256, and the real file would then be refused as a duplicate."""
        rec = self._final_record(data)
        partly = self._version_trained_part(data, rec)
        original = rec.get("original_name") or data.name
        if partly:  # changed in processing/ (paused, stopped) after steps were trained on it
            reason = (f"not the file its record describes ({why}): it changed after part of "
                      "it was trained; those steps (on its content as recorded) stay in "
                      f"current_model, versioned as {partly}")
            rec["version_after"] = partly
            fix = lambda d: (  # noqa: E731
                f"To train it as it is now, `{training_queue.add_cmd(self.p.root, d, '--move')}`; "
                "to take out the part trained first, `" + training_queue.with_root(
                    self.p.root, f"python3 model_versioner.py restore {rec['version_before']}")
                + "`.")
        else:
            reason = (f"not the file its record describes ({why}): most likely cut short by a "
                      "crash before its content reached the disk; not trained")
            fix = lambda d: (  # noqa: E731
                f"Drop the original {original} into {shlex.quote(str(self.p.inbox))}/ again (or "
                f"`python3 training_queue.py add PATH`); this copy stays here, untouched.")
        rec.update(outcome="failed", reason=reason, finished_at=trainroot.utc_now())
        try:
            dst = training_queue.move_with_record(data, self.p.failed, rec, reason,
                                                  finish=lambda d: {"fix": fix(d)})
        except FileNotFoundError:
            return  # `set-priority`/`remove` moved it meanwhile: looked at again where it went
        self.last_error = f"{dst.name}: {reason}"
        self.current = self.progress = None
        self.log.error("%s: failed - %s. %s", dst.name, reason, fix(dst))

    def _version_trained_part(self, data: Path, rec: dict) -> str | None:
        """The version of the steps current_model holds from `data` (a file in processing/
        trained part-way, then changed), so lineage names it; None if it holds none."""
        if data.parent != self.p.processing or not rec.get("version_before") or \
                _trainer_state(self.p.current_model).get("file_id") != rec.get("file_id"):
            return None
        import model_versioner
        vid, _ = model_versioner.create_version(
            self.p.root, f"post-fail:{data.name}", note="failed: partly trained, then changed",
            data_files=[{"name": data.name, "sha256": rec.get("sha256"), "skipped": True}])
        return vid

    def _settle_pending(self, why: str) -> None:
        """A request claimed while the engine ran, when training ended without acting on it
        (a crash, a refusal, a stop that came first): a stop still stops (the file waits
        in processing/); anything else is answered, never left claimed and unanswered."""
        action, req = self.pending or (None, None)
        self.pending = None
        if action == "stop":
            if req is not None:
                self.stop_request = req
        elif req is not None:
            self.ack(req, "failed", f"{why}; the {action} was not carried out: send it again "
                                    "if it still applies")

    # ---------------------------------------------------------------- under torchrun

    def _after_training(self, data: Path, result: dict, cfg: dict) -> None:
        status = result.get("status")
        action, req = self.pending or (None, None)
        self.pending = None
        self.log.info("%s: engine returned %s (%s)", data.name, status, result.get("message") or "")
        if status == "completed":
            held, scored = self._gate(data, result, cfg, "done")
            if held:
                if action == "stop":
                    self.stop_request = req
                elif req is not None:
                    self.ack(req, "done" if action == "pause" else "noop",
                             f"{data.name} finished and is held by the quality gate")
                if self.once:
                    raise _GateHeld(self.paused_reason, data, "Run `{}` or `{}`, then run the "
                                         "daemon again.".format(*eval_gate.decision_cmds(self.p.root)))
                self.current = self.progress = None
                return
            self._finish_done(data, result, scored)
            if action == "skip":
                self.ack(req, "noop", f"{data.name} finished before the skip took effect")
            elif action == "pause":
                self.set_state("paused", self._request_reason("paused by request", req), "request")
                self.ack(req, "done", "paused after the file finished")
            elif action == "stop":
                self.stop_request = req
        elif status == "stopped":
            if action == "stop" and req is not None:
                self.stop_request = req
            elif req is not None:  # a signal's stop overtook it
                self.pending = (action, req)
                self._settle_pending(f"the daemon stopped (signal) before the {action}")
            self.log.info("%s: stopped at step %s; it stays in processing/ and resumes at the "
                          "next start", data.name, result.get("global_step"))
        elif status == "paused" and result.get("pause_reason") in _WRITE_REFUSED_KINDS:
            kind = result["pause_reason"]
            msg = (f"saving failed while training {data.name}: {result.get('message') or ''}. "
                   + ("Free disk space (`python3 state_tracker.py --check` says what takes it), "
                      "then run " if kind == "disk" else "Then run ")
                   + "`python3 training_controller.py resume`")
            self.last_error = msg
            try:
                self._hold(data, kind, msg)
            except OSError as exc:  # the same filesystem refuses the record: pause all the same
                self.log.warning("cannot keep the pause across restarts: %s", exc)
            self.set_state("paused", msg, kind)
            if kind != "disk":
                self._stop_if_state_unwritable(
                    f"saving failed while training {data.name}: "
                    f"{(result.get('message') or '').split('; paused:')[0]}", kind)
            if action == "stop":
                self.stop_request = req  # acknowledged on the way out
            elif req is not None:
                self.ack(req, "done" if action == "pause" else "noop",
                         f"paused: saving failed ({kind}); the checkpoint before it is durable")
            if self.once:
                raise GuardrailError(f"training paused: {msg}", self.p.root,
                                     "The file stays in processing/ and resumes at the next start.")
        elif status == "paused":
            if req is None and self.backup_failed:
                self.set_state("paused", self.backup_failed, "backup")
            else:
                self.set_state("paused", self._request_reason("paused by request", req), "request")
                self.ack(req, "done", f"paused at step {result.get('global_step')}; checkpoint is durable")
        elif status == "spike":
            msg = (f"loss spike in {data.name}: {result.get('message') or ''}. Inspect the "
                   "data, then `python3 training_controller.py resume` (or `skip --discard`)")
            self.last_error = msg
            self._hold(data, "spike", msg)
            self.set_state("paused", msg, "spike")
            if action == "stop":
                self.stop_request = req
            elif action and req is not None and action != "pause":
                self.ack(req, "noop", f"training paused on a loss spike before the {action}")
            elif req is not None:
                self.ack(req, "done", "paused (loss spike)")
            if self.once and action != "stop":
                raise GuardrailError(f"training paused: {msg}", self.p.root,
                                     "The file stays in processing/; inspect it, then run the "
                                     "daemon again (or `python3 training_controller.py skip`).")
        elif status == "skipped":
            discard = bool(((req or {}).get("options") or {}).get("discard"))
            try:
                restored = self._finish_skipped(data, discard,
                                                self._request_reason("skipped by request", req), result)
            except _Unrestorable as exc:  # the file waits in processing/, paused
                self.set_state("paused", f"skip --discard refused: {exc.what}", "request")
                self.ack(req, "failed", f"{exc.what}; {data.name} stays in processing/ (paused): "
                                        f"{exc.fix}")
                if self.once:
                    raise
                return
            self.ack(req, "done", f"{data.name}: {self.paused_reason}" if restored is None else
                     f"{data.name} moved to skipped/"
                     + (" and the version before it restored" if discard else ""))
            if restored is None and self.once:  # the gate holds what it kept: as after a file
                raise _GateHeld(self.paused_reason, data, "Run `{}` or `{}`, then run the "
                                     "daemon again.".format(*eval_gate.decision_cmds(self.p.root)))
        elif status == "refused":  # the data, not the machine: failed/ with the engine's reason and fix
            self._finish_failed(data, result.get("reason") or result.get("message") or "refused",
                                result, fix=result.get("fix"))
            if req is not None:
                self.ack(req, "noop", f"{data.name} was refused before its first step")
        elif status == "nan":
            reason = f"loss became NaN/inf: {result.get('message') or ''}".strip()
            try:
                self._restore_before(data)
            except _Unrestorable as exc:  # failed all the same; what current_model holds is said
                reason += f"; {exc.what}: current_model is as the file's last save left it"
            self._finish_failed(data, reason, result)
            if req is not None:
                self.ack(req, "noop", f"{data.name} failed (NaN loss) before the {action}")
        else:
            raise GuardrailError(f"unknown training status {status!r}", data,
                                 "Report this as a bug; the file stays in processing/.")
        if self.state == "training" or (self.state == "stopping" and not (
                status == "stopped" or self.stop_request or self.stop_signal)):
            self.set_state("idle")
        if status != "stopped":
            self.current = self.progress = None

    def _stop_if_state_unwritable(self, problem: str, kind: str) -> None:
        """A pause nobody can see is no pause: when the root itself refuses writes (read-only
        filesystem), stop cleanly instead. The last checkpoint stays; the file resumes from
        it at the next start."""
        try:
            with tempfile.TemporaryFile(dir=self.p.root):
                return
        except OSError as exc:
            if exc.errno not in WRITE_REFUSED:
                raise
            raise GuardrailError(f"stopped: {problem}; the daemon cannot even write its state "
                                 f"({exc.strerror})", self.p.root,
                                 f"{_WRITE_FIXES[kind][0].upper()}{_WRITE_FIXES[kind][1:]}, then "
                                 "start the daemon: the file stays in processing/ and resumes "
                                 "from its last checkpoint.") from None

    def _write_refused(self, data: Path, exc: OSError) -> None:
        """A write the filesystem refused outside the engine's saves (a record, metrics), or
        a full disk: pause naming the problem and its fix, never a crash with a traceback."""
        kind = ("disk" if exc.errno in DISK_FULL else
                "readonly" if exc.errno == errno.EROFS else "permission")
        problem = f"cannot write {exc.filename or self.p.root} while training {data.name} ({exc.strerror})"
        msg = f"{problem}: {_WRITE_FIXES[kind]}, then run `python3 training_controller.py resume`"
        self.log.error("%s", msg)
        self.last_error = msg
        self.current = self.progress = None
        self._settle_pending(f"training paused: {msg}")
        if self.once:
            raise GuardrailError(f"training paused: {msg}", self.p.root,
                                 "The file stays in processing/ and resumes from its last "
                                 "checkpoint at the next start.")
        self.set_state("paused", msg, kind)
        if kind != "disk":  # (a full disk: the pause shows once space is freed; no stop)
            self._stop_if_state_unwritable(problem, kind)

    @staticmethod
    def _hold(data: Path, kind: str, reason: str) -> None:
        """Keep a pause that needs a person across restarts (in the file's record)."""
        training_queue.update_record(data, hold={"kind": kind, "reason": reason,
                                                 "since": trainroot.utc_now()})

    @staticmethod
    def _request_reason(base: str, req: dict | None) -> str:
        return base + (f": {req['reason']}" if req and req.get("reason") else "")

    def _model_changed(self, rec: dict) -> str | None:
        """What current_model is now if it is neither the file's own progress nor the version
        taken before it (a restore, rollback or backup restore while the file waited), else None."""
        import model_versioner
        if _trainer_state(self.p.current_model).get("file_id") == rec.get("file_id"):
            return None
        now = model_versioner.present_version(self.p.root)  # (a backup restore's copy of it too)
        return None if now == rec.get("version_before") else (now or "an unversioned model")

    def _restore_before(self, data: Path) -> bool:
        """Restore the version taken before the file; False if current_model holds nothing of
        the file (replaced by a person while it waited), which then stays."""
        import model_versioner
        rec = training_queue.read_record(data)
        if not rec.get("version_before"):
            return False
        with trainroot.model_lock(self.p.root, f"training {data.name}", timeout=30):
            now = self._model_changed(rec)
            if now is not None:  # nothing of this file is in it: a person's restore stays
                self.log.warning("%s: not restoring %s: current_model was replaced (%s) while "
                                 "the file waited", data.name, rec["version_before"], now)
                return False
            try:
                model_versioner.restore_version(self.p.root, rec["version_before"])
            except trainroot.BusyError:
                raise
            except GuardrailError as exc:  # deleted or damaged by hand while the file waited
                raise _Unrestorable(
                    f"the version taken before {data.name}, {rec['version_before']}, cannot be "
                    f"restored ({exc.what})", exc.where, cli_guard.with_root(
                        "`python3 training_controller.py skip` (without --discard) keeps the "
                        f"steps trained on it and moves it to skipped/; or bring "
                        f"{rec['version_before']} back from a backup (`python3 backup_manager.py "
                        "list`), then skip with --discard again",
                        cli_guard.unless_found(self.p.root))) from None
        self.log.warning("%s: restored %s (the version before it)", data.name,
                         rec["version_before"])
        return True

    # ---------------------------------------------------------------- the quality gate

    def _gate_on(self, cfg: dict) -> bool:
        """An eval set and eval_max_tokens > 0."""
        return bool(int(cfg.get("eval_max_tokens") or 0) and eval_gate.eval_files(self.p.root))

    def _score(self, cfg: dict, version: str | None, max_tokens: int | None = None) -> dict:
        """Eval results of `version` (kept per version) or, with None, of current_model, over
        `max_tokens` of the eval set (None: all of it): in this process, or under torchrun
        (where the daemon never imports torch) by `model_versioner.py eval` in a child, after
        the job has ended (the whole eval)."""
        if int(cfg.get("nproc_per_node") or 1) == 1:
            self.engine()  # torch and transformers, imported once
            if version is not None:
                return eval_gate.eval_version(self.p.root, version, cfg, log=self.log,
                                              max_tokens=max_tokens)
            return eval_gate.evaluate(self.p.root, self.p.current_model, cfg, log=self.log,
                                      max_tokens=max_tokens)
        kept = eval_gate.read_cached(self.p.root, version, eval_gate.cache_key(self.p.root, cfg)) \
            if version is not None else None
        if kept is not None:  # no child (and no torch import) for what is already kept
            return kept
        proc = subprocess.run([sys.executable, str(SCRIPTS / "model_versioner.py"), "eval",
                               *([version] if version else []), "--json", "--root", str(self.p.root)],
                              capture_output=True, text=True, cwd=str(SCRIPTS), timeout=3600)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
            raise GuardrailError(f"scoring the eval set failed: {(lines or [proc.stderr[-300:]])[-1]}",
                                 self.p.root / eval_gate.EVAL_DIR,
                                 "Fix the eval set (the error names the file), then run "
                                 "`python3 training_controller.py resume`.")
        doc = json.loads(proc.stdout)
        return {"results": doc["results"], "global_step": doc.get("global_step"),
                "seconds": doc.get("seconds"), "key": eval_gate.cache_key(self.p.root, cfg)}

    def _gate_prepare(self, rec: dict, cfg: dict) -> None:
        """Before a file trains: pin the checkpoint the next file carries its optimizer from
        should this one be rejected, and, when the version before it has no eval result yet,
        score its first row of each eval file (an eval set that cannot be scored is refused
        here, before training; after the file the gate carries it on as far as it asks)."""
        name = rec.get("name") or (self.current or {}).get("name")
        pinned = eval_gate.pin_checkpoint(self.p.root, rec.get("global_step_before"),
                                          rec.get("tokens_seen_before"), name)
        if pinned:
            self.log.info("%s: %s kept until the quality gate has decided", name, pinned)
        before = rec.get("version_before")
        if before and eval_gate.read_cached(self.p.root, before,
                                            eval_gate.cache_key(self.p.root, cfg)) is None:
            self._score(cfg, before, 0)

    def _gate(self, data: Path, result: dict, cfg: dict, then: str) -> tuple[bool, dict | None]:
        """Score current_model (a file's end state) against the version before the file:
        (held, eval document). Held: the weights kept as a `rejected` version, the version
        before restored, the file on hold in processing/ and the daemon paused."""
        import model_versioner
        if not self._gate_on(cfg):
            return False, None
        rec = training_queue.read_record(data)
        before_vid = rec.get("version_before")
        if _trainer_state(self.p.current_model).get("file_id") != rec.get("file_id"):
            return False, None  # nothing of this file is in current_model: nothing to judge
        # ~5% of the file's training time: a prefix of the eval set as long as the file asks,
        # the same rows for the version before it (kept, carried on if it scored fewer)
        trained = int(_trainer_state(self.p.current_model).get("tokens_seen") or 0) \
            - int(rec.get("tokens_seen_before") or 0)
        need = eval_gate.gate_tokens(cfg, trained)
        t0 = time.monotonic()
        try:
            before = self._score(cfg, before_vid, need) if before_vid else None
            after = self._score(cfg, None, need)
        except (GuardrailError, OSError) as exc:  # a gate that cannot score lets the file through, loudly
            self.last_error = f"quality gate: could not score {data.name}: {exc}"
            self.log.error("%s; the file is not gated", self.last_error)
            return False, None
        if self._timings is not None:  # the done record's: gate_s beside train_s
            self._timings["gate_s"] = round(time.monotonic() - t0, 4)
        if eval_gate.is_complete(after):  # else the idle daemon completes it (complete_eval)
            try:
                eval_gate.metrics_line(self.p.root, after, None)
            except OSError as exc:
                self.log.warning("cannot write the eval line to metrics.jsonl: %s", exc)
        pct = float(cfg.get("eval_regression_pct", 5.0))
        cmp = eval_gate.compare(before, after, pct) if before else {}
        if not any(c["regressed"] for c in cmp.values()):
            if cmp:
                self.log.info("%s: quality gate passed (%s; %d eval tokens for %d trained)",
                              data.name, ", ".join(f"{n} {c['before']:.4f} -> {c['after']:.4f}"
                                                   for n, c in cmp.items()),
                              sum(c["tokens"] or 0 for c in cmp.values()), trained)
            return False, after
        now = trainroot.utc_now()
        held, _ = model_versioner.create_version(
            self.p.root, f"held:{data.name}", loss=result.get("loss"), force=True,
            note=f"rejected by the quality gate: {eval_gate.describe(cmp, pct)}",
            data_files=[{"name": data.name, "sha256": rec.get("sha256")}],
            extra={"rejected": True, **({"eval": eval_gate.losses(after)}
                                        if eval_gate.is_complete(after) else {}),
                   "gate": {"file": data.name, "version_before": before_vid, "threshold_pct": pct,
                            "compared": cmp, "held_at": now, "then": then}})
        eval_gate.write_cached(self.p.root, held, dict(after, rejected=True))
        self._restore_before(data)
        reason = eval_gate.hold_reason(data.name, cmp, pct, held, before_vid, self.p.root)
        update = {"in_training": False, "result": result,
                  "hold": {"kind": "gate", "reason": reason, "since": now, "version": held,
                           "then": then, "eval": cmp, "threshold_pct": pct}}
        if self._timings is not None:
            update["timings"], self._timings = self._timings, None
        training_queue.update_record(data, **update)
        self.log.warning("%s", reason)
        self.set_state("paused", reason, "gate")
        return True, after

    def complete_eval(self) -> bool:
        """Idle: carry the eval of current_model's version on from the prefix the gate scored
        to the whole eval set (its loss in `list`, the state and the monitor then compares
        with every other version's), kept as it goes. It gives way at once to a file, a
        request or a stop (interrupted between batches, what is scored kept). False when it
        gave way with the eval not complete; True when there is nothing (more) to do."""
        cfg, self._gave_way = self.cfg, None
        if not cfg or not self._gate_on(cfg) or int(cfg.get("nproc_per_node") or 1) != 1:
            return True
        try:  # called every idle tick: nothing more while current_model is the one last seen
            st = os.stat(self.p.current_model / ".manifest.json")
        except OSError:
            return True
        mark = (st.st_ino, st.st_mtime_ns, trainroot.file_signature(self.p.config))
        if mark == self._eval_completed:
            return True
        import model_versioner
        vid = model_versioner.present_version(self.p.root)
        doc = eval_gate.read_cached(self.p.root, vid, eval_gate.cache_key(self.p.root, cfg)) \
            if vid else None
        if doc is None or eval_gate.is_complete(doc):
            self._eval_completed = mark  # nothing to carry on (never scored: `model_versioner.py eval`)
            return True
        self.wake.clear()  # what woke the loop is taken; what arrives from now interrupts
        if self._has_work() or self._idle_interrupted():
            return False
        self.engine()
        try:
            doc = eval_gate.eval_version(self.p.root, vid, cfg, log=self.log,
                                         interrupt=self._idle_interrupted)
        except (GuardrailError, OSError) as exc:
            self.log.warning("completing the eval of %s failed: %s", vid, exc)
            self._eval_completed = mark  # not again for this model; `model_versioner.py eval` redoes it
            return True
        if not eval_gate.is_complete(doc):
            return False
        self._eval_completed = mark
        try:
            eval_gate.metrics_line(self.p.root, doc, vid)
        except OSError as exc:
            self.log.warning("cannot write the eval line to metrics.jsonl: %s", exc)
        return True

    def _settle_done_index(self, busy: bool = False) -> None:
        """Bring the done index in step with done/ once done/ stopped changing: status
        commands count done/ from the index only while it matches (else they list 100,000
        names), and the daemon's own `add` leaves it behind (no listing per file; a
        signature just after a change is too young to be believed anyway). Idle: one stat
        per tick, one listing after each change; `busy` (between files): at most once per
        DONE_SETTLE_BUSY_S, so a queue of short files does not list done/ for each."""
        if busy and time.monotonic() - self._done_settle_tried < DONE_SETTLE_BUSY_S:
            return
        self._done_settle_tried = time.monotonic()
        try:
            st = os.stat(self.p.done)
        except OSError:
            return
        if (st.st_ino, st.st_mtime_ns) == self._done_settled:
            return
        try:
            if self.done.fresh_count() is None:
                len(self.done)  # a resync: one listing of done/
        except (OSError, sqlite3.Error) as exc:  # busy, read-only: the next tick tries again
            self.log.debug("done index not brought in step: %s", exc)
            return
        if self.done.fresh_count() is not None:
            self._done_settled = (st.st_ino, st.st_mtime_ns)

    def _idle_interrupted(self) -> bool:
        """complete_eval's question between batches: has anything arrived that comes first?"""
        self.write_state()
        if self.stop_signal or self.stop_request:
            self._gave_way = "stop"
        elif self.wake.is_set():
            self._gave_way = "wake"
        elif self._warm_expired():  # the next tick gives the kept model back, then it goes on
            self._gave_way = "memory"
        else:
            try:
                if not any(n.endswith(".request.json") for n in os.listdir(self.p.control)):
                    return False
            except OSError:
                return False
            self._gave_way = "request"
        return True

    def _finish_done(self, data: Path, result: dict, scored: dict | None = None) -> None:
        import model_versioner
        rec = self._final_record(data)
        t0 = time.monotonic()
        after = model_versioner.create_version(
            self.p.root, f"post-train:{data.name}", loss=result.get("loss"),
            data_files=[{"name": data.name, "sha256": rec.get("sha256")}],
            extra={"eval": eval_gate.losses(scored)} if eval_gate.is_complete(scored) else None)
        if scored:  # a prefix: the version's record gets its loss when complete_eval ends it
            rec["eval"] = eval_gate.losses(scored, partial=True)
            rec["eval_tokens"] = sum(r.get("tokens") or 0 for r in scored["results"].values())
            eval_gate.write_cached(self.p.root, _version_id(after), scored)
            eval_gate.unpin_all(self.p.root)  # passed: this file's end checkpoint carries on
        state = _trainer_state(self.p.current_model)
        timings = dict(rec.get("timings") or {})
        timings["post_snapshot_s"] = round(time.monotonic() - t0, 4)
        gs_before = rec.get("global_step_before") or 0
        rec.update(outcome="done", finished_at=trainroot.utc_now(), version_after=_version_id(after),
                   global_step_after=state.get("global_step", result.get("global_step")),
                   tokens_seen_after=state.get("tokens_seen", result.get("tokens_seen")),
                   steps=(state.get("global_step", result.get("global_step")) or 0) - gs_before,
                   tokens=result.get("tokens"), loss=result.get("loss"), timings=timings,
                   rendering=result.get("rendering"), rendered=result.get("rendered"),
                   chat_date=result.get("chat_date"), warnings=file_warnings(rec, result),
                   pack_isolation=result.get("pack_isolation"))
        if result.get("refused_lines"):  # passed over (--skip-invalid): which records
            refused = int((result.get("rendered") or {}).get("skipped_refused", 0))
            rec["refused_records"] = {"count": refused, "lines": result["refused_lines"]}
        dst = training_queue.move_with_record(data, self.p.done, rec, "trained")
        self.done.add(dst.name, rec)
        self.log.info("%s: done (%s -> %s, %s steps, loss %s)", dst.name, rec.get("version_before"),
                      rec["version_after"], rec["steps"], rec.get("loss"))
        if any(rec["warnings"].values()):  # split examples alone are normal (long documents)
            serious = bool(rec["warnings"]["fallback"] or rec["warnings"]["skipped_records"])
            self.log.log(logging.WARNING if serious else logging.INFO, "%s: %s", dst.name, ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in rec["warnings"].items() if v))
            if serious:
                self.warned_files = (self.warned_files + [{"name": dst.name, "warnings": rec["warnings"],
                                                           "rendering": rec.get("rendering")}])[-RECENT_WARNED:]
        self.apply_retention()
        self.maybe_consolidate()
        self.maybe_backup(rec)

    def apply_retention(self) -> None:
        """After each file: prune versions by config `retention.versions` (their records
        stay in versions/.pruned/) and keep a disk-usage sample for the rate the tracker
        reports (at most every USAGE_EVERY_S: at 10,000 pruned records and 1,001 backups
        even a walk of what changed cost ~30 ms a file). Backups get theirs from the
        automatic backup (`backup --prune`)."""
        import model_versioner
        import retention
        try:
            # the versions an automatic backup copies (at idle priority: slower than files)
            # or waits to copy are not pruned under it
            copying = [self._backup_src if self.backup_proc is not None else None,
                       (self._backup_next or {}).get("version_after")]
            pruned = model_versioner.prune(self.p.root, yes=True, protect={
                v: "an automatic backup copies it" for v in copying if v})["deleted"]
            if pruned:  # a first pass over years of history names thousands: a few, then a count
                names = ", ".join(pruned) if len(pruned) <= 12 else \
                    f"{', '.join(pruned[:6])}, ... {', '.join(pruned[-3:])} ({len(pruned)} versions)"
                self.log.info("retention: pruned %s (%s); `python3 model_versioner.py lineage` "
                              "still lists their data files", names,
                              retention.describe(retention.policy(self.cfg, "versions")))
            now = time.monotonic()
            if self._usage_sampled is None or now - self._usage_sampled >= USAGE_EVERY_S:
                retention.record_usage(self.p.root, self.cfg)
                self._usage_sampled = now
        except (GuardrailError, OSError) as exc:  # the file is done; retention tries again next
            self.log.warning("retention after the file failed: %s", exc)

    def _memory_kept(self) -> dict | None:
        """{bytes, device, until} of the model and AdamW state kept for a next file while the
        daemon is idle (_warm_room), for the state tracker; None otherwise."""
        held = self._engine.warm_held() if self._engine is not None else None
        if held is None or self._idle_since is None:
            return None
        left = max(0.0, self._idle_since + self._keep_warm_s() - time.monotonic())
        return {**held, "until": trainroot.utc_at(time.time() + left)}

    def _keep_warm_s(self) -> float:
        """keep_warm_seconds as of the last file (config.json as it was then); 0 under --once,
        which exits as soon as the queue is empty."""
        if self.once:
            return 0.0
        if self._keep_warm is not None:
            return self._keep_warm
        return float((getattr(self, "cfg", None) or {}).get("keep_warm_seconds") or 0)

    def _warm_expired(self) -> bool:
        """The kept model's window is over (complete_eval then gives way for _warm_room)."""
        return (self._idle_since is not None and self._engine is not None
                and self._engine.warm_held() is not None
                and time.monotonic() - self._idle_since >= self._keep_warm_s())

    def _warm_room(self) -> None:
        """Idle, paused or waiting for a lock: the model and AdamW state the last file ended
        with, kept in memory for a next file (training_engine.warm_held), go back once the
        queue has been empty for keep_warm_seconds; at once when the daemon is paused or
        config.json changed (the next file could not take them: _take_warm compares the whole
        config; so setting keep_warm_seconds to 0 frees them at the next tick); and sooner when
        less than 10% of the memory they are in is free (_memory_short). A file dropped within
        the window trains without loading them from disk (its done record's timings say
        model_from "memory")."""
        held = self._engine.warm_held() if self._engine is not None else None
        if held is None:
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        keep = self._keep_warm_s()
        if self.state == "paused":
            why = "the daemon is paused"
        elif self._warm_config is not None and trainroot.file_signature(self.p.config) != self._warm_config:
            why = "config.json changed"
        elif now - self._idle_since >= keep:
            why = f"idle for {keep:g} s (keep_warm_seconds)"
        else:
            why = _memory_short(held["device"])
            if why is None:
                return
        self._engine.release_warm()
        self.log.info("gave back the model and AdamW state kept in %s memory for a next file "
                      "(%.1f MB): %s; the next file loads them from disk", held["device"].upper()
                      if held["device"] != "cpu" else "host", held["bytes"] / 1e6, why)

    def _spare_room(self) -> None:
        """Idle, every rescan_seconds: the spare checkpoint (a pruned one the next file's
        checkpoint writes over, retention.SPARE_PREFIX) goes back when the disk runs short:
        less free than it holds plus min_free_disk_mb."""
        import retention
        now = time.monotonic()
        if now - self._spare_checked < self.cfg["rescan_seconds"]:
            return
        self._spare_checked = now
        try:
            spare = retention.spare_bytes(self.p.root)
            if not spare:
                return
            free = shutil.disk_usage(self.p.root).free
            if free >= spare + (int(self.cfg.get("min_free_disk_mb") or 0) << 20):
                return
            freed = retention.release_spare(self.p.root)
        except OSError as exc:
            self.log.warning("could not check the spare checkpoint in %s: %s", self.p.staging, exc)
            return
        if freed:
            self.log.info("the disk runs short (%.1f MB free): gave back the spare checkpoint "
                          "(%.1f MB in %s; the next file's checkpoint takes new room)",
                          free / 1e6, freed / 1e6, self.p.staging)

    def maybe_consolidate(self) -> None:
        """Adapter mode with config `consolidate_every_files` N: once N files have trained on
        current_model's base (its post-train versions), merge the adapter into a new base
        (`model_versioner.consolidate`; undo: `restore`). A failure is logged, never fatal:
        training goes on with the adapter."""
        every = int(self.cfg.get("consolidate_every_files") or 0)
        if not every or self.cfg.get("finetune") != "lora":
            return
        import base_store
        import model_versioner
        try:
            base = base_store.adapter_base(self.p.current_model)
            import versions_index  # the index's rows: not every version.json after each file
            trained = sum(1 for r in versions_index.VersionsIndex(self.p.root).rows()
                          if r.get("base") == base and str(r.get("reason")).startswith("post-train:"))
            if not base or trained < every:
                return
            out = model_versioner.consolidate(self.p.root, note=f"automatic: every {every} files")
            self.log.info("consolidated %s into base %s (automatic, every %d files): version %s",
                          ", ".join(out["merged"]), out["base"], every, out["version"])
        except (GuardrailError, OSError) as exc:
            self.log.warning("automatic consolidate failed: %s (training goes on with the "
                             "adapter; `python3 model_versioner.py consolidate` retries by hand)", exc)

    def _final_record(self, data: Path) -> dict:
        """The record as it leaves processing/: no longer in training, timings folded in."""
        rec = training_queue.read_record(data)
        rec.pop("in_training", None)
        rec.pop("hold", None)
        if self._timings is not None:
            rec["timings"] = self._timings
            self._timings = None
        return rec

    def _finish_failed(self, data: Path, reason: str, result: dict | None = None,
                       fix: str | None = None, rec: dict | None = None) -> None:
        rec = rec or self._final_record(data)
        rec.update(outcome="failed", reason=reason, finished_at=trainroot.utc_now())
        if result:
            rec["result"] = result
        dst = training_queue.move_with_record(
            data, self.p.failed, rec, reason,
            finish=lambda d: {"fix": training_queue.fix_for(
                self.p, "training", d, fix.replace(str(data), str(d))
                + f" (`{training_queue.add_cmd(self.p.root, d, '--move')}` queues it again)"
                if fix else None)})
        self.last_error = f"{dst.name}: {reason}"
        self.log.error("%s: failed - %s", dst.name, reason)
        self.notify("failed", reason, file=dst.name,
                    commands=[training_queue.read_record(dst).get("fix")])

    def _finish_skipped(self, data: Path, discard: bool, reason: str,
                        result: dict | None = None) -> bool:
        """Move the file to skipped/; True if `discard` restored the version before it; None
        if the quality gate holds the steps it kept instead (the file stays in processing/)."""
        if not discard:
            try:
                cfg = self._file_config()
            except _Paused:  # config.json broken meanwhile: the gate as the daemon started
                cfg = self.cfg
            held, _ = self._gate(data, result or {}, cfg, "skipped")
            if held:
                self.current = self.progress = None
                return None
        restored = self._restore_before(data) if discard else False
        rec = self._final_record(data)
        rec.update(outcome="skipped", reason=reason, discarded=discard,
                   finished_at=trainroot.utc_now())
        if not discard:  # the steps trained on it stay: version them, or lineage misses it
            import model_versioner
            after, created = model_versioner.create_version(
                self.p.root, f"post-skip:{data.name}", note="skipped: partly trained",
                data_files=[{"name": data.name, "sha256": rec.get("sha256"), "skipped": True}])
            if created:
                rec["version_after"] = after
        if result:
            rec["result"] = result
        dst = training_queue.move_with_record(
            data, self.p.skipped, rec, reason,
            finish=lambda d: {"fix": training_queue.fix_for(self.p, "skipped", d)})
        self.log.warning("%s: skipped - %s", dst.name, reason)
        self.current = self.progress = None
        if self.state == "paused" and self.pause_kind in ("spike", "engine"):
            # that pause was this file's (held for a person to look; a restart would not
            # pause again either; the engine refused to go on with it): skipped, the queue
            # goes on (an engine refusal that was not the file's pauses again on the next
            # one, saying so). A pause by request stays.
            self.log.info("the file the %s paused on was skipped: going on",
                          "loss spike" if self.pause_kind == "spike" else "engine's refusal")
            self.last_error = None if self.pause_kind == "engine" else self.last_error
            self.set_state("idle")
        return restored

    # ---------------------------------------------------------------- backups

    def maybe_backup(self, rec: dict) -> None:
        """Start an automatic backup (child process, SCHED_IDLE) if the policy says so; one
        due while the last still runs starts when that ends (never skipped)."""
        if not (SCRIPTS / "backup_manager.py").exists():
            return
        if self.backup_proc is not None and self._poll_backup() is None:
            self._backup_next = rec
            return
        if self.backup_proc is not None:  # the one that ended started the one that waited:
            self._backup_next = rec       # this one waits in turn (never two at once)
            return
        if self.backup_failed is not None:
            return  # paused on it: `resume` clears it, the next file backs up again
        import backup_manager
        try:
            latest = backup_manager.latest_backup(self.p.root)
            n = self.done.trained_since(latest, sync=False)  # `add` counted this file: no listing
            if not backup_manager.backup_due(self.p.root, self.cfg, n, latest):
                return
        except GuardrailError as exc:
            self.backup_failed = f"automatic backup check failed: {exc}"
            return
        src = rec.get("version_after") or "current_model"
        cmd = [sys.executable, str(SCRIPTS / "backup_manager.py"), "backup", src, "--idle",
               "--prune", "--json", "--root", str(self.p.root), "--note",
               f"automatic after {rec['name']}"]
        self.log.info("automatic backup of %s started", src)
        self._backup_src = src
        self.backup_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, cwd=str(SCRIPTS))

    def _poll_backup(self, wait: bool = False) -> bool | None:
        """None while none has finished; True if one succeeded; False if one failed."""
        proc = self.backup_proc
        if proc is None:
            return None if self.backup_failed is None else False
        if not wait and proc.poll() is None:
            return None
        out, err = proc.communicate()
        self.backup_proc = None
        if proc.returncode == 0:
            self.log.info("automatic backup done")
            waiting, self._backup_next = self._backup_next, None
            if waiting is not None:
                self.maybe_backup(waiting)
            return True
        lines = [ln for ln in (err or "").splitlines() if ln.startswith("Error:")]
        msg = lines[-1][len("Error: "):] if lines else f"backup_manager exited {proc.returncode}"
        self.backup_failed = (f"automatic backup failed: {msg} Training is paused until "
                              "`python3 training_controller.py resume`")
        self.last_error = self.backup_failed
        self.log.error(self.backup_failed)
        return False

    # ---------------------------------------------------------------- the loop

    def _has_work(self) -> bool:
        """Work that will train: the queue, or a file in processing/ not about to fail."""
        data = self._processing_file()
        if data is not None:
            rec = training_queue.read_record(data)
            crashes = int(rec.get("attempts") or 0) + (1 if rec.get("in_training") else 0)
            return not rec.get("hold") and crashes < self.cfg["max_attempts"]
        return next(self._queue_order.paths(), None) is not None

    def _start_monitor(self) -> None:
        port = int(self.cfg.get("monitor_port") or 0)
        if not self.monitor_wanted or port == 0 or not (SCRIPTS / "monitor_server.py").exists():
            return
        try:
            import monitor_server
            self._monitor = monitor_server.start_in_thread(self.p.root, port)
            self.log.info("live monitor on %s", getattr(self._monitor, "url", f"port {port}"))
        except Exception as exc:  # the monitor is optional: training goes on without it
            self.log.warning("live monitor not started on port %s (%s); training continues. "
                             "Set monitor_port in config.json to a free port, or 0 to turn it off.",
                             port, exc)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        self.wake.set()

    # ---------------------------------------------------------------- what the intake is given

    def _tend(self) -> None:
        """Heartbeat and requests, during a long intake pass."""
        self.write_state()
        self.control_idle()

    def _stopping(self) -> bool:
        return bool(self.stop_request or self.stop_signal)

    def _queued_from_inbox(self, rec: dict | None = None) -> None:
        if self.current is None:
            self.preload_engine()  # torch loads while the rest of the inbox settles
        if rec is not None:
            self.check_render(Path(rec["path"]))

    def _template_problem(self, cfg: dict) -> GuardrailError | None:
        """Why config.json's chat_template cannot render anything (a .jinja that cannot be
        read or parsed, a name the model has no template of), or None: pre-flight stops on
        it before a file is taken, and the intake's test render leaves files queued."""
        template = cfg.get("chat_template")
        if isinstance(template, str) and template.endswith(".jinja"):
            path = self.p.root / os.path.expanduser(template)  # (an absolute path stays itself)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                return GuardrailError(
                    f"pre-flight: chat_template {template!r} cannot be read "
                    f"({getattr(exc, 'strerror', None) or exc.__class__.__name__})", path,
                    "Fix the path in config.json's `chat_template`, or set it to null for the "
                    f"model's own template, then {self._go_on()}.")
            broken = _template_syntax_error(text)
            if broken:  # else every chat file would fail in turn, blamed on its first record
                return GuardrailError(
                    f"pre-flight: chat_template {template!r} is not a valid template ({broken})",
                    path, f"Fix that line of {path.name}, or set config.json's `chat_template` to "
                    f"null for the model's own template, then {self._go_on()}.")
        elif isinstance(template, str) and template != "plain":  # a named template of the model's
            names = _named_templates(self.p.current_model)
            if template not in names:  # the engine would refuse it once the file is taken
                which = f"its named templates: {', '.join(sorted(names))}" if names else "it has none"
                return GuardrailError(
                    f"pre-flight: chat_template {template!r} is not a named template of the "
                    f"model ({which})",
                    self.p.config, "Set `chat_template` in config.json to null (the model's own "
                    "template), \"plain\" (lower case)" + (", one of those names" if names else "")
                    + f" or a path to a .jinja file, then {self._go_on()}.")
        return None

    def check_render(self, path: Path) -> None:
        """Pre-flight at intake: the first records of a queued file rendered with the current
        model's chat template (no tokenizing, well under a second), so a file the template
        cannot render goes to failed/ when it is dropped, not when its turn comes hours
        later. The engine still checks every record before the file's first step. Skipped
        under torchrun (the daemon itself never imports torch then)."""
        if int(self.cfg.get("nproc_per_node") or 1) > 1:
            return
        problem = self._template_problem(self.cfg)
        if problem is not None:  # the template's fault, not the file's: it stays queued
            self.log.warning("%s: not test-rendered at intake: %s", path.name, problem.what)
            return
        try:
            engine = self.engine()
            encoder = self._intake_encoder(engine)
            refused = encoder.check_file(  # (a stop asked meanwhile ends it: the engine checks later)
                path, limit=INTAKE_RENDER_RECORDS, tick=lambda: self._tend() or (
                    "stop" if self._stopping() else None), **engine.file_reading(path, self.cfg))
        except Exception as exc:  # only a head start: the engine's own check decides later
            self.log.warning("%s: not test-rendered at intake (%s); the engine checks it before "
                             "its first step", path.name, exc)
            return
        if refused is None:
            return
        rec = training_queue.read_record(path)
        rec.update(outcome="failed", refused_at="intake", finished_at=trainroot.utc_now())
        try:
            self._finish_failed(path, refused.what, fix=refused.fix, rec=rec)
        except FileNotFoundError:  # taken from the queue meanwhile (`remove`, a person)
            return

    def _intake_encoder(self, engine):
        """An Encoder for current_model's tokenizer, loaded once per published model."""
        folder = self.p.current_model
        st = os.stat(folder / "tokenizer_config.json")
        key = (st.st_ino, st.st_mtime_ns, repr(self.cfg.get("chat_template")))
        if self._intake_tok is None or self._intake_tok[0] != key:
            tokenizer = engine.load_tokenizer(folder)  # the engine's: loaded once for both
            self._intake_tok = (key, engine.Encoder(tokenizer, chat_template=self.cfg.get("chat_template"),
                                                    root=self.p.root))
        return self._intake_tok[1]

    def _intake_failed(self, message: str) -> None:
        self.last_error = message

    def _second_daemon(self, pid) -> trainroot.BusyError:
        return trainroot.BusyError(
            f"another daemon is running on this root (pid {pid})",
            self.p.root, "Check it with `python3 training_controller.py status`; stop it with "
            "`python3 training_controller.py stop --wait`.")

    def run(self) -> int:
        import training_config
        training_config.load_config(self.p.root)  # a mistyped --root fails, creating nothing
        root_init.ensure_folders(self.p)
        lock = trainroot.FileLock(self.p.lock("daemon"), "training_daemon run")
        try:
            lock.acquire()
        except trainroot.BusyError:
            holder = trainroot.read_lock_holder(self.p.lock("daemon")) or {}
            raise self._second_daemon(holder.get("pid", "?")) from None
        other = trainroot.daemon_without_its_lock(self.p.root)  # its .locks/ deleted under it
        if other is not None:
            lock.release()
            raise self._second_daemon(other)
        self._lock_inode = lock.inode()  # (in the state: what a second one checks)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGIO] = signal.signal(signal.SIGIO, signal.SIG_IGN)  # lease breaks (settle)
        try:
            self.cfg = training_config.load_config(self.p.root)
            _setup_logging(self.p)
            self.log.info("daemon %d started on %s%s", os.getpid(), self.p.root,
                          " (--once)" if self.once else "")
            self.write_state(force=True)
            import model_versioner
            for action in model_versioner.recover(self.p.root).get("actions", []):
                self.log.info("recovery: %s", action)
            for action in training_queue.recover(self.p.root):
                self.log.info("recovery: %s", action)
            for stale in (self.p.control / "engine").glob("*.json"):
                stale.unlink(missing_ok=True)  # left by a torchrun job killed with the last daemon
            self.intake = inbox_files.InboxIntake(
                self.p, self.cfg, self.log, self.wake, done=self.done, tend=self._tend,
                stopping=self._stopping, on_queued=self._queued_from_inbox,
                on_failed=self._intake_failed)
            self.intake.start_watching()
            self._start_monitor()
            self.intake.recover_incoming()
            self._restore_pause()
            self.intake.scan_inbox(full=True)
            if self._has_work() and not (self.stop_request or self.stop_signal):
                self.preload_engine()
            self._loop()
        except Exception as exc:  # the log's last line says why it ended (--once: exit 1)
            self._ended_by = exc if isinstance(exc, (GuardrailError, _Paused)) else \
                GuardrailError(exc.__class__.__name__)
            raise
        finally:
            self._shutdown(lock, old)
        return self.exit_code

    def _restore_pause(self) -> None:
        """A pause by request the last daemon carried out holds until `resume`, whether it
        ended by `stop`, a crash or a power cut."""
        import training_controller
        kept = training_controller.pause_record(self.p.root)
        if not kept:
            return
        kind = "backup" if kept.get("kind") == "backup" else "request"
        if self.once:  # nothing may train until `resume`: --once has nothing to do
            raise GuardrailError(f"paused {'by request' if kind == 'request' else 'on a failed backup'} "
                                 f"since {kept.get('since')} ({kept['reason']}); "
                                 "the pause holds until resume", self.p.control / "paused.json",
                                 "Run `python3 training_controller.py resume` (it clears the "
                                 f"pause), then {self._go_on()}.")
        if kind == "backup":  # resume clears it; the next file's backup is tried again
            self.backup_failed = kept["reason"]
        self.state, self.paused_since = "paused", kept.get("since") or trainroot.utc_now()
        self.set_state("paused", kept["reason"], kind)  # keeps paused_since
        self.log.info("still paused since %s (kept across the restart); "
                      "`python3 training_controller.py resume` continues", self.paused_since)

    def _loop(self) -> None:
        while True:
            self.control_idle()
            if self.stop_request or self.stop_signal:
                return
            if self._poll_backup() is False and self.state != "paused":
                self.set_state("paused", self.backup_failed, "backup")
                if self.once:
                    raise GuardrailError(self.backup_failed, self.p.root,
                                         "Fix the cause, then run `python3 backup_manager.py backup`.")
            self.intake.take()
            if self.stop_request or self.stop_signal:
                return
            if self.state == "paused":
                self._warm_room()  # a pause may last days: the memory goes back now
                if self.pause_kind in ("preflight", "engine") and \
                        time.monotonic() >= self._recheck_at:
                    self._recheck_at = time.monotonic() + self.cfg["rescan_seconds"]
                    self._retry_preflight()
                self.write_state()
                self.wake.wait(IDLE_TICK_S)
                self.wake.clear()
                continue
            job = self.next_job()
            if job is not None:
                self._settle_done_index(busy=True)
                try:
                    self.process(job)
                except OSError as exc:
                    if exc.errno not in WRITE_REFUSED + DISK_FULL:
                        raise
                    self._write_refused(job, exc)
                except _Paused as exc:
                    if self.once:
                        raise exc.error from None
                    self.last_error = str(exc.error)
                    self._refused_config = trainroot.file_signature(self.p.config)
                    self._recheck_at = time.monotonic() + self.cfg["rescan_seconds"]
                    self.set_state("paused", f"{exc.error}", exc.kind)
                continue
            evaluated = True
            self._warm_room()  # (also while a file settles in the inbox: it may never)
            if not self.intake.waiting():
                self._spare_room()
                self._settle_done_index()
                evaluated = self.complete_eval()
            if self.once and not self.intake.waiting() and self._processing_file() is None:
                if not evaluated and self._gave_way == "wake" and self._wake_retries < 100:
                    self._wake_retries += 1  # it gave way to a wake-up (a late inotify event of
                    continue                 # its own moves): what came is seen, then it carries on
                if self.backup_proc is not None:
                    self._poll_backup(wait=True)
                    continue
                return
            self.write_state()
            self.wake.wait(0.05 if self.intake.waiting() else IDLE_TICK_S)
            self.wake.clear()

    def _retry_preflight(self) -> None:
        if self.pause_kind == "engine" and trainroot.file_signature(self.p.config) == self._refused_config:
            return  # the same config would be refused the same way (and cost a torchrun launch)
        refused = self._preflight_now()
        if refused is not None:
            why = str(refused.error)
            if why != self.paused_reason:  # say what is wrong now, not what was
                self.set_state("paused", why, "preflight")
            return
        self.log.info("config.json changed: trying again" if self.pause_kind == "engine"
                      else "pre-flight passes again: continuing")
        self.last_error = None
        self.set_state("idle")

    def _shutdown(self, lock, old_handlers) -> None:
        self.state = "stopping"
        self.write_state(force=True)
        if self.intake is not None:
            self.intake.stop_watching()
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.stop()
        if self._backup_next is not None:  # not started on the way out: the next run's
            self.log.info("an automatic backup of %s is due; it runs after the next file",
                          self._backup_next.get("version_after") or "current_model")
            self._backup_next = None
        if self.backup_proc is not None:
            self._poll_backup(wait=True)
        self.notifier.flush()  # what the last file or pause sent still reaches a person
        if self._import_thread is not None:
            self._import_thread.join()
        ended = getattr(self, "_ended_by", None)
        why = self.stop_signal or (f"request {self.stop_request['id']}" if self.stop_request
                                   else f"on an error: {ended.error.what if isinstance(ended, _Paused) else ended.what}"
                                   if ended is not None
                                   else "queue empty" if self.once else "exit")
        # in the last state written: a stop asked for (a request, a signal) is not a crash
        self.ended, self._ended_kind = why, ("signal" if self.stop_signal else "request"
                                             if self.stop_request else "hold"
                                             if isinstance(ended, _GateHeld) else "error"
                                             if ended is not None else "once" if self.once
                                             else "exit")
        if ended is not None and not self.last_error:  # the report names it (DAEMON_DEAD)
            self.last_error = str(ended.error if isinstance(ended, _Paused) else ended)
        self.state = "stopped"
        self.write_state(force=True)
        self.log.info("daemon %d stopped (%s)", os.getpid(), why)
        stopped = "stopped; checkpoint durable" + ("; the file in processing/ resumes at the "
                                                   "next start" if self._processing_file() else "")
        if self.stop_request is not None:
            self.ack(self.stop_request, "done", stopped)
        for req in self._requests():  # a second `stop` sent while the first was acted on
            if req["action"] == "stop" and self._claim(req):
                self.ack(req, "done", stopped)
        lock.release()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        for h in list(self.log.handlers):
            self.log.removeHandler(h)
            h.close()


def run_daemon(root, *, once: bool = False, monitor: bool = True) -> int:
    """Run the daemon on `root` until stopped (or, with `once`, until the queue is empty)."""
    return Daemon(root, once=once, monitor=monitor).run()


def cmd_run(args) -> int:
    """Watch inbox/ and train every file once (the default command); --once exits when empty."""
    root = resolve_root(args.root)
    if not args.json:
        return run_daemon(root, once=args.once, monitor=not args.no_monitor)
    # --json: the log goes to stderr as always; at the end, one document of what this run did
    before = training_queue.counts(root) if trainroot.is_training_root(root) else {}
    daemon = Daemon(root, once=args.once, monitor=not args.no_monitor)
    code = daemon.run()
    after = training_queue.counts(root)
    print_json({"ok": code == 0, "root": str(root), "once": args.once,
                "ended": getattr(daemon, "ended", None),
                "files": {k: after.get(k, 0) - before.get(k, 0) for k in ("done", "failed", "skipped")},
                "left": {k: after.get(k, 0) for k in ("inbox", "queued", "processing")}})
    return code


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_daemon.py", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add = subcommands(parser)
    p_init = add("init", cmd_init)
    p_init.add_argument("--base", default="tiny", metavar="tiny|PATH",
                        help="'tiny' builds a small model locally; PATH copies a local HF folder")
    p_run = add("run", cmd_run)
    p_run.add_argument("--once", action="store_true",
                       help="train everything queued (inbox included), then exit 0")
    p_run.add_argument("--no-monitor", action="store_true", help="do not start the live monitor")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("init", "run", "-h", "--help") for a in argv):
        argv = ["run", *argv]  # `run` is the default command
    return trainroot.run_cli(build_parser(), argv)


if __name__ == "__main__":
    trainroot.exit_without_teardown(main())  # durable and acknowledged: `stop --wait` returns at once
