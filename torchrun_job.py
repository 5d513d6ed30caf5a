"""A torchrun (DDP) job for one data file, launched and supervised by the daemon.

With `nproc_per_node` > 1 the daemon does not train in its own process: it starts
`torch.distributed.run` with the engine's `train` command, hands control decisions to
rank 0 through a file it polls, reads rank 0's progress back, and takes the result from
the engine's --json on stdout. Standard library only (torch is imported by the ranks).
See docs/multi_gpu.md.

    result = torchrun_job.train(paths, data, record, 2, control=cb, on_progress=cb2, log=log)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainroot import (GuardrailError, Paths, atomic_write_json, file_signature, read_json,
                       utc_now)

SCRIPTS = Path(__file__).resolve().parent

JOB_TICK_S = 0.1         # supervising a torchrun job: requests, decision and progress this often
JOB_STOP_WAIT_S = 120    # a job silent this long after a stop is ended (it resumes from its checkpoint)
ENGINE_LOG = "engine.log"  # torchrun's and the ranks' stderr, rotated at ENGINE_LOG_BYTES
ENGINE_LOG_BYTES = 5 << 20

# torchrun, started so that it dies with the daemon: PR_SET_PDEATHSIG sends it SIGTERM when
# the daemon dies (kill -9 included) and torchrun then takes its ranks down. A rank 0
# orphaned any other way stops by itself (training_engine.RankZeroChannel).
_TORCHRUN = """\
import ctypes, os, runpy, signal, sys
libc = ctypes.CDLL(None)
if hasattr(libc, "prctl"):
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # the daemon died before prctl
    sys.exit(1)
sys.argv = ["torchrun", *sys.argv[2:]]
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
"""


class TorchrunFailed(Exception):
    """The torchrun job ended without a result (a rank died, torchrun failed): a crash."""


def _json_document(text: str):
    """The last JSON object starting a line of `text` (the engine's --json), or None."""
    decoder = json.JSONDecoder()
    for match in reversed(list(re.finditer(r"(?m)^\{", text))):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except ValueError:
            continue
    return None


def _torchrun_failure(log_text: str) -> str:
    """One line from torchrun's failure report: the root-cause rank, its exit code and
    signal, then every other rank that failed (which one torchrun saw first is a race: a
    rank killed with -9 may be listed after the rank its death made abort)."""
    others, _, root = log_text.rpartition("Root Cause")
    others = others.rpartition("Failures:")[2] if "Failures:" in others else ""

    def ranks(report: str) -> list[str]:
        found = re.findall(r"^\s*rank\s*:\s*(.+?)\s*$\n^\s*exitcode\s*:\s*(.+?)\s*$",
                           report, re.M)
        return [" ".join(f"rank {rank} died: exitcode {code}".split()) for rank, code in found]
    failed = ranks(root)
    if failed:
        rest = [r for r in ranks(others) if r not in failed]
        return "; ".join(failed + [f"also {r}" for r in rest])
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"Error: |Exception: ", ln)]
    return (errors or lines or ["no output"])[-1][:500]


def train(p: Paths, data: Path, rec: dict, nproc: int, *, control, on_progress,
          log: logging.Logger) -> dict:
    """Train one file under torchrun with `nproc` processes (DDP), supervised from here.

    `control()` is the daemon's own callback (it claims requests as in-process training
    does: None or stop/pause/skip); the decision goes to rank 0 through a small file in
    control/engine/; rank 0 writes progress back the same way, for `on_progress(info)`;
    the result is the engine's --json on stdout. A job that ends without one (a rank killed, torchrun failing) raises TorchrunFailed: a crash,
    retried like one. The job has its own session, so a Ctrl+C meant for the daemon
    becomes a stop at a step boundary instead of killing the ranks.
    """
    chan = p.control / "engine"
    chan.mkdir(parents=True, exist_ok=True)
    # short and safe whatever the data file's name (a 200-byte name + suffixes is too long)
    key = hashlib.sha256(rec["file_id"].encode()).hexdigest()[:16]
    decision, progress, out_path = (chan / f"{key}.{part}"
                                    for part in ("control.json", "progress.json", "out.json"))
    for f in (decision, progress, out_path):
        f.unlink(missing_ok=True)  # a stop sent to the last job must not stop this one
    log_path = p.logs / ENGINE_LOG
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > ENGINE_LOG_BYTES:
            os.replace(log_path, log_path.with_name(ENGINE_LOG + ".1"))
    env = dict(os.environ, TRAINING_ENGINE_CHANNEL=json.dumps(
        {"control": str(decision), "progress": str(progress),
         "records_total": rec.get("records")}))
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default without its banner
    cmd = [sys.executable, "-c", _TORCHRUN, str(os.getpid()), "--standalone",
           "--nproc_per_node", str(nproc), str(SCRIPTS / "training_engine.py"), "train",
           "--root", str(p.root), f"--file-id={rec['file_id']}", "--json", str(data)]
    with open(out_path, "w+", encoding="utf-8") as out, \
            open(log_path, "a", encoding="utf-8") as err:
        log_start = err.tell()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(SCRIPTS), env=env,
                                start_new_session=True)
        log.info("%s: training under torchrun, %d processes (pid %d, log %s)",
                      data.name, nproc, proc.pid, log_path)
        try:
            _supervise(proc, decision, progress, control, on_progress, log)
        finally:
            if proc.poll() is None:  # the daemon itself failed: stop the job, never orphan it
                with contextlib.suppress(OSError):
                    atomic_write_json(decision, {"action": "stop"}, sync=False)
                try:
                    proc.wait(JOB_STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.terminate()  # torchrun takes its ranks down
                    proc.wait()
        out.seek(0)
        doc = _json_document(out.read())
    for f in (decision, progress, out_path):
        f.unlink(missing_ok=True)
    if isinstance(doc, dict) and doc.get("status"):
        return doc  # rank 0 finished and said so: what it wrote stands
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):  # the engine refused
        error = doc["error"]
        raise GuardrailError(error.get("what") or "the training engine refused the file",
                             error.get("where"), error.get("fix"))
    with open(log_path, encoding="utf-8", errors="replace") as f:
        f.seek(log_start)
        cause = _torchrun_failure(f.read()[-65536:])
    how = (f"was killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exited {proc.returncode}")
    raise TorchrunFailed(f"torchrun {how}: {cause}")

def _supervise(proc: subprocess.Popen, decision: Path, progress: Path, control, on_progress,
               log: logging.Logger) -> None:
    """Until the job exits: claim requests, pass the decision on, keep progress fresh."""
    sent, seen, stop_sent_at = None, None, None
    while True:
        try:
            proc.wait(JOB_TICK_S)
            break
        except subprocess.TimeoutExpired:
            pass
        action = control()  # SIGTERM/SIGINT come back here as "stop"
        if action and action != sent:
            try:
                atomic_write_json(decision, {"action": action,
                                                       "at": utc_now()}, sync=False)
                sent = action
            except OSError as exc:  # tried again next tick
                log.warning("cannot hand %s to the job: %s", action, exc)
        new_seen = _read_progress(progress, seen, on_progress, log)
        if sent == "stop":
            if stop_sent_at is None or new_seen != seen:
                stop_sent_at = time.monotonic()
            elif time.monotonic() - stop_sent_at > JOB_STOP_WAIT_S:
                # a hung job (a rank stuck in a collective) must not make the daemon
                # unstoppable: the file resumes from its last checkpoint
                log.warning("the job did not stop within %d s of the stop: ending it",
                                 JOB_STOP_WAIT_S)
                proc.terminate()  # torchrun takes its ranks down
                try:
                    proc.wait(JOB_STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
        seen = new_seen
    _read_progress(progress, seen, on_progress, log)  # the last step, for the record and the state

def _read_progress(path: Path, seen: tuple | None, on_progress, log) -> tuple | None:
    sig = file_signature(path)
    if sig is None or sig == seen:
        return seen
    try:
        info = read_json(path, default=None)
    except GuardrailError as exc:  # rank 0 writes it atomically: unreadable means damaged
        log.warning("ignoring the job's progress: %s", exc)
        return sig
    if isinstance(info, dict):
        on_progress(info)
    return sig
