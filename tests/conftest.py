"""Shared fixtures: a fresh training root per test, one tiny model per session, leak checks."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def tmp_root(tmp_path, monkeypatch) -> Path:
    """An empty training root, also exported as TRAINING_ROOT for scripts run as subprocesses."""
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("TRAINING_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One tiny model per test session (built once; copy it, never write into it)."""
    import training_engine
    out = tmp_path_factory.mktemp("tiny") / "model"
    training_engine.build_tiny_model(out)
    return out


@pytest.fixture
def initialized_root(tmp_root, tiny_model_dir) -> Path:
    """A root after `training_daemon.py init --base <the session's tiny model>`."""
    import training_daemon
    training_daemon.init_root(tmp_root, base=str(tiny_model_dir))
    return tmp_root


def engine_root(path: Path, model_dir: Path, fast: dict, **overrides) -> tuple[Path, dict]:
    """A training root as `init` makes it, with the config `fast` (+ overrides) written."""
    import training_config
    import training_daemon
    training_daemon.init_root(path, base=str(model_dir))
    cfg = training_config.default_config(**{**fast, **overrides})
    training_config.write_config(path, cfg)
    return path, cfg


def write_jsonl(path: Path, records, ensure_ascii: bool = True) -> Path:
    """One JSON object per line."""
    import json
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=ensure_ascii) + "\n")
    return path



def text_records(n: int, seed: int = 0, alphabet: str = "abcdefgh ") -> list[dict]:
    """`n` text records of 3-90 random characters, numbered (a seed gives the same file)."""
    import random
    rng = random.Random(seed)
    return [{"text": f"{i}:" + "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 90)))}
            for i in range(n)]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Two {name: tensor} dicts hold the same names and bit-for-bit equal tensors."""
    import torch
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"tensors differ: {unequal}"


def metrics(root: Path) -> list[dict]:
    """metrics.jsonl's complete lines (a torn last line is left out)."""
    import json
    from trainroot import Paths
    path = Paths(root).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(proc, root: Path, step: int, skip_lines: int, timeout: float = 120) -> None:
    """Until `proc` (a trainer) has written a metrics line for `step` or later, past the
    first `skip_lines` lines; AssertionError if it exits first or never gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["global_step"] >= step for m in metrics(root)[skip_lines:]):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"trainer never reached step {step}")


def kill_trainer_at(root: Path, data: Path, steps) -> None:
    """Run `training_engine.py train DATA` on `root` once per step in `steps`, each killed
    with SIGKILL as soon as it has logged that step (a crash mid-file, for resume tests)."""
    import signal
    import subprocess
    env = dict(os.environ, TRAINING_ROOT=str(root))
    for step in steps:
        lines_before = len(metrics(root))
        proc = subprocess.Popen([sys.executable, str(REPO / "training_engine.py"), "train",
                                 str(data), "--json"], cwd=str(REPO), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_step(proc, root, step, lines_before)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate()

def kill_9_when(args: list[str], root: Path, ready, timeout: float = 30) -> int:
    """Run `python3 ARGS` on `root`, SIGKILL it as soon as `ready()` is true (or when the
    timeout ends), and return its exit status (-9 when the kill landed)."""
    import signal
    import subprocess
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, TRAINING_ROOT=str(root)))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    return proc.returncode


def run_script(script: str, *args: str, root: Path | None = None, timeout: float = 120,
               check: bool = False, env: dict | None = None):
    """Run `python3 SCRIPT ARGS` from the repo in a fresh interpreter; returns CompletedProcess."""
    import subprocess
    full_env = dict(os.environ)
    if root is not None:
        full_env["TRAINING_ROOT"] = str(root)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves threads or child processes running behind it."""
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5
    while True:
        extra_threads = [t for t in threading.enumerate()
                         if t.ident not in threads_before and t.is_alive() and not t.daemon]
        children = [c for c in me.children(recursive=True) if c.is_running()
                    and c.status() != psutil.STATUS_ZOMBIE]
        if (not extra_threads and not children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for c in children:
        c.kill()
    assert not extra_threads, f"test leaked threads: {extra_threads}"
    assert not children, f"test leaked processes: {[c.cmdline() for c in children]}"


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(folder)` makes `folder` read-only for the rest of the test: a real
    read-only bind mount where this process may mount (root with CAP_SYS_ADMIN), else
    os.open/os.mkdir refusing writes under it with EROFS, as the kernel would (in-process
    only). Returns True for a real mount. (Root ignores chmod, so chmod -w proves nothing.)"""
    import contextlib
    import errno
    import subprocess
    mounted = []

    def make(folder: Path) -> bool:
        folder = Path(folder).resolve()

        def mount(*args) -> bool:
            try:
                return subprocess.run(["mount", *args], capture_output=True).returncode == 0
            except OSError:  # no mount(8) here
                return False
        if mount("--bind", str(folder), str(folder)):
            mounted.append(folder)
            for _ in range(50):  # EBUSY while a daemon's write is in flight: try again
                if mount("-o", "remount,ro,bind", str(folder)):
                    return True
                time.sleep(0.1)
        under = str(folder) + os.sep
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(path):
            full = os.path.abspath(os.fspath(path))
            if full == str(folder) or full.startswith(under):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

        def fake_open(path, flags, *args, **kw):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                refuse(path)
            return real_open(path, flags, *args, **kw)

        def fake_mkdir(path, *args, **kw):
            refuse(path)
            return real_mkdir(path, *args, **kw)
        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        return False

    yield make
    for folder in reversed(mounted):  # lazily: a daemon still running may hold files there
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
