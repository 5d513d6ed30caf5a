"""Control scripts answer fast: importing one never pulls in torch, transformers or safetensors.torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTROL_SCRIPTS = ["trainroot", "training_config", "training_controller", "training_queue",
                   "model_versioner", "backup_manager", "state_tracker", "validate_data",
                   "training_daemon", "torchrun_job", "monitor_server", "model_manifest", "base_store", "base_backup",
                   "verified_copy", "cli_guard", "eval_gate"]


@pytest.mark.parametrize("module", CONTROL_SCRIPTS)
def test_control_script_import_is_torch_free(module):
    if not (REPO / f"{module}.py").exists():
        pytest.fail(f"{module}.py is missing")
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import {module}; "
            "heavy = [m for m in ('torch', 'transformers', 'safetensors.torch', 'numpy') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()} at module level"
