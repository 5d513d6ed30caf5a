"""The docs say what the code does: every subcommand of every script is in docs/cli.md with
every option it takes, and answers --help; docs/config.md is the generated parameter
table; the systemd unit example is valid and runs the daemon the safe way."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import training_config

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["state_tracker", "training_daemon", "training_controller", "training_queue",
           "model_versioner", "backup_manager", "validate_data", "monitor_server",
           "training_engine", "metrics_log", "done_archive"]

# One fresh interpreter imports every script (training_engine imports torch: keep it out
# of this process), lists each subcommand's options and runs its --help through main().
INTROSPECT = r"""
import argparse, contextlib, importlib, io, json, sys
sys.path.insert(0, sys.argv[1])
out = {}
for mod in sys.argv[2:]:
    try:
        m = importlib.import_module(mod)
    except Exception as exc:
        out[mod] = {"error": repr(exc)}
        continue
    parser = m.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = dict(subs[0].choices) if subs else {"": parser}
    info = {}
    for name, sp in commands.items():
        opts = sorted({o for a in sp._actions for o in a.option_strings
                       if o.startswith("--") and o != "--help"})
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = m.main(([name] if name else []) + ["--help"])
        info[name] = {"options": opts, "help_rc": rc, "help": buf.getvalue()}
    out[mod] = info
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def commands() -> dict:
    proc = subprocess.run([sys.executable, "-c", INTROSPECT, str(REPO), *SCRIPTS],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_sections() -> dict[str, str]:
    """{'python3 X.py SUB': section text} for every `### `python3 ...`` heading of cli.md."""
    text = (REPO / "docs" / "cli.md").read_text()
    parts = re.split(r"^### `(python3 [^`]+)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ", 1)[0] for i in range(1, len(parts), 2)}


def test_every_script_imports_and_has_subcommands(commands):
    for mod in SCRIPTS:
        assert "error" not in commands[mod], f"{mod}: {commands[mod]}"
        assert commands[mod], f"{mod} has no command"


def test_every_subcommand_has_help(commands):
    for mod, subs in commands.items():
        for sub, info in subs.items():
            assert info["help_rc"] == 0, f"{mod} {sub} --help exited {info['help_rc']}"
            assert info["help"].startswith("usage:"), f"{mod} {sub} --help printed no usage"
            assert len(info["help"].splitlines()) >= 3, f"{mod} {sub} --help is bare"


def test_every_subcommand_and_option_is_documented(commands):
    sections = cli_sections()
    missing = []
    for mod, subs in commands.items():
        for sub, info in subs.items():
            title = f"python3 {mod}.py" + (f" {sub}" if sub else "")
            if title not in sections:
                missing.append(f"{title}: no section in docs/cli.md")
                continue
            for opt in info["options"]:
                if not re.search(re.escape(opt) + r"\b", sections[title]):
                    missing.append(f"{title}: option {opt} not documented")
            if f"$ {title}" not in sections[title] and f"$ python3 {mod}.py" not in sections[title]:
                missing.append(f"{title}: no example")
    assert not missing, "\n".join(missing)


def test_no_section_for_a_command_that_does_not_exist(commands):
    real = {f"python3 {mod}.py" + (f" {sub}" if sub else "")
            for mod, subs in commands.items() for sub in subs}
    stale = sorted(set(cli_sections()) - real)
    assert not stale, f"docs/cli.md documents commands that do not exist: {stale}"


def test_config_md_holds_the_generated_parameter_table():
    text = (REPO / "docs" / "config.md").read_text()
    assert training_config.describe_params() in text, (
        "docs/config.md is out of date: regenerate its table from "
        "training_config.describe_params()")
    for name in training_config.PARAMS:
        assert f"| `{name}` |" in text


def test_systemd_unit_runs_the_daemon_safely(tmp_path):
    unit = (REPO / "docs" / "training-guardrails.service").read_text()
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(unit)
    svc = cp["Service"]
    assert svc["ExecStart"].endswith("training_daemon.py run")
    assert svc["KillSignal"] == "SIGTERM"          # the daemon's clean stop
    assert int(svc["TimeoutStopSec"]) >= 120       # time to checkpoint and save
    assert svc["Restart"] == "on-failure"          # not after a requested stop (exit 0)
    assert "3" in svc["RestartPreventExitStatus"].split()  # busy: another daemon holds the root
    assert re.search(r"^Environment=TRAINING_ROOT=/", unit, re.M)  # (a repeated key: read the text)
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    local = (unit.replace("/opt/training-guardrails/.venv/bin/python", sys.executable)
             .replace("/opt/training-guardrails", str(REPO))
             .replace("User=trainer", "User=root").replace("Group=trainer", "Group=root"))
    path = tmp_path / "training-guardrails.service"
    path.write_text(local)
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
