"""`python3 training_daemon.py run` as a real child process, for the tests that drive one
(tests/test_training_controller.py, tests/test_ddp.py): start it, wait for what it writes,
find a step in metrics.jsonl, and clean up whatever a failed test left running; plus the
small helpers those tests share (data files, config, weights, controller calls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script


def last_metric(root: Path) -> dict | None:
    """The last complete line of metrics.jsonl (read from its end), or None."""
    try:
        with open(root / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        try:
            return json.loads(raw)
        except ValueError:  # a line cut by the 4 KB window or still being written
            continue
    return None


def set_config(root: Path, **values) -> dict:
    """Change config.json and approve it, as a person with the right would."""
    import training_config
    cfg = training_config.load_config(root)
    cfg.update(values)
    training_config.write_config(root, cfg)
    training_config.approve(root, cfg)
    return cfg


def record(path: Path) -> dict:
    """The record kept beside a data file (NAME.jsonl.record.json)."""
    return json.loads(path.with_name(path.name + ".record.json").read_text())


def lifecycle_files(root: Path, folders, hidden: bool = True) -> dict[str, list[str]]:
    """Folder -> the data file names in it (records excluded; hidden names unless asked)."""
    out = {}
    for rel in folders:
        d = root / rel
        if d.is_dir():
            names = sorted(n for n in os.listdir(d) if (d / n).is_file()
                           and not n.endswith(".record.json") and (hidden or n[0] != "."))
            if names:
                out[rel] = names
    return out


def weights(model_dir: Path) -> dict:
    """Every tensor of a model folder's safetensors files."""
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    assert tensors, f"no safetensors in {model_dir}"
    return tensors


def assert_same_weights(a: dict, b: dict) -> None:
    import torch
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def step_of(root: Path) -> int:
    """current_model's global_step."""
    return json.loads((root / "current_model" / "trainer_state.json").read_text())["global_step"]


def controller(root: Path, *args: str, timeout: float = 120) -> dict:
    """`training_controller.py ARGS --json` on `root`, which must exit 0; its document."""
    proc = run_script("training_controller.py", *args, "--json", root=root, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout)


def drop(root: Path, name: str = "notes.jsonl", seed: int = 0, lines: int = 100) -> None:
    """Write a data file of `lines` text records beside the inbox and move it in (a complete
    file, as a person would)."""
    records = [json.dumps({"text": f"note {seed}-{i}: the quick brown fox {i * 7 % 13} jumps over "
                                   f"{'lazy ' * (i % 4)}dogs while the model learns line {i}."})
               for i in range(lines)]
    tmp = root / f".{name}.part"
    tmp.write_text("\n".join(records) + "\n")
    os.replace(tmp, root / "inbox" / name)


class RealDaemon:
    """The daemon on `root` with `args`, its output in a log file beside the root."""

    def __init__(self, root: Path, *args: str, timeout: float = 300):
        self.root, self.timeout = root, timeout
        self.log = open(root.parent / f"daemon-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run", *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, TRAINING_ROOT=str(root), PYTHONUNBUFFERED="1"))

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout or self.timeout} s:\n"
                                 f"{self.output()}") from None

    def until(self, what: str, check, timeout: float | None = None):
        """Poll `check()` until it returns something true; fail if the daemon exits first."""
        end = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < end:
            value = check()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for {what}:\n"
                                     f"{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")

    def training_step(self, name: str, at_least: int) -> dict:
        """The last metrics line once the file `name` has trained `at_least` steps."""
        def check():
            line = last_metric(self.root)
            return line if line and line.get("file") == name and \
                line.get("step_in_file", 0) >= at_least else None
        return self.until(f"{name} at step {at_least} in the file", check)

    def step_reached(self, global_step: int) -> dict:
        return self.until(f"step {global_step}", lambda: (
            (line := last_metric(self.root)) and line["global_step"] >= global_step and line))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


def daemon_fixture(cls=RealDaemon):
    """A `daemons` fixture for a test module: `daemons(root, *args)` starts a `cls`, and
    every one started is killed when the test ends."""
    @pytest.fixture
    def daemons():
        started = []

        def start(root: Path, *args: str):
            started.append(cls(root, *args))
            return started[-1]

        yield start
        for d in started:
            d.close()
    return daemons
