#!/usr/bin/env bash
# Set up .venv, build the tiny model in ./demo_root, train the sample files, print the report.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
fi
PY=.venv/bin/python
export TRAINING_ROOT="$PWD/demo_root"
if [ ! -d "$TRAINING_ROOT/current_model" ]; then
  $PY training_daemon.py init --base tiny
fi
for f in examples/*.jsonl; do
  cp -n "$f" "$TRAINING_ROOT/inbox/" || true
done
if $PY training_daemon.py --help 2>/dev/null | grep -q "run"; then
  $PY training_daemon.py run --once
fi
if [ -f state_tracker.py ]; then
  $PY state_tracker.py --check || true
else
  $PY model_versioner.py list 2>/dev/null || ls -l "$TRAINING_ROOT"
fi
