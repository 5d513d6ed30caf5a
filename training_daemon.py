"""Initialise a training root, and run the daemon that trains every file dropped in inbox/.

`init` creates config.json, current_model/ (the embedded tiny model or a copy of a local
Hugging Face folder) and version v001, and approves the config. `run` (the default)
watches inbox/, validates, queues and trains each file exactly once (SPEC §5, §6).

    python3 training_daemon.py init --root ~/train --base tiny
    python3 training_daemon.py --root ~/train            # run until stopped
    python3 training_daemon.py run --once --no-monitor   # train what is queued, then exit

Only the training engine imports torch, and only lazily, once per daemon process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import trainroot
from trainroot import GuardrailError, Paths, add_common_args, print_json, resolve_root

STATUS_COMMAND = "python3 state_tracker.py --check"


# --------------------------------------------------------------------------- init

def _chmod_tree(folder: Path, file_mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """Normal read permissions (safetensors 0.8 writes 0600)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


def init_root(root, base: str = "tiny") -> dict:
    """Create config.json, current_model/ and version v001 in `root`, and approve the config.

    `base` is "tiny" (a small model built locally, no download) or the path of a local
    Hugging Face causal-LM folder, which is copied after checking that it loads.
    Refuses, changing nothing, when `root` already has a current_model/.
    """
    p = Paths(resolve_root(root))
    if os.path.lexists(p.current_model):
        raise GuardrailError(
            "current_model already exists; init never replaces a model", p.current_model,
            f"Check it with `{STATUS_COMMAND}`; to go back to a version use "
            f"`python3 model_versioner.py restore V --root {p.root}`.")
    if base != "tiny":
        src = Path(base).expanduser().resolve()
        if not src.is_dir():
            raise GuardrailError("base model folder not found", src,
                                 "Pass --base tiny or the path of a local Hugging Face model folder.")
        base_model = str(src)
    else:
        src, base_model = None, "tiny"

    import training_config
    if p.config.exists():  # left by an interrupted init: keep the user's settings if they match
        cfg = training_config.load_config(p.root)
        if cfg.get("base_model") != base_model:
            raise GuardrailError(
                f"config.json already names base_model {cfg.get('base_model')!r}, not {base_model!r}",
                p.config, f"Run init with --base {cfg.get('base_model')}, or move config.json aside.")
    else:
        cfg = training_config.default_config(base_model=base_model)

    p.ensure()
    with trainroot.FileLock(p.lock("daemon"), "init"):
        if os.path.lexists(p.current_model):  # raced with another init
            raise GuardrailError("current_model already exists; init never replaces a model",
                                 p.current_model, f"Check it with `{STATUS_COMMAND}`.")
        if not p.config.exists():
            training_config.write_config(p.root, cfg)
        import model_versioner
        import training_engine  # the only torch import, paid here and only here
        staged = Path(tempfile.mkdtemp(prefix="init-", dir=p.staging))
        model_dir = staged / "model"
        try:
            if src is None:
                training_engine.build_tiny_model(model_dir)
            else:
                training_engine.copy_base_model(src, model_dir)
            _chmod_tree(model_dir)
            model_versioner.write_manifest(model_dir)
            model_versioner.publish_model(p.root, model_dir)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        version = model_versioner.create_version(p.root, "init")
        approval = training_config.approve(p.root, cfg, by="init")
    vid = version["id"] if isinstance(version, dict) else str(version)
    return {"ok": True, "root": str(p.root), "base_model": base_model,
            "current_model": str(p.current_model), "version": vid,
            "approved": approval["values"]}


def cmd_init(args) -> int:
    """Create config.json, current_model/ and version v001, and approve the config."""
    result = init_root(resolve_root(args.root), base=args.base)
    if args.json:
        print_json(result)
    else:
        print(f"Initialised {result['root']}: current_model from {result['base_model']}, "
              f"version {result['version']}, config approved.")
        print(f"Next: drop .jsonl files into {result['root']}/inbox/ and run "
              f"`python3 training_daemon.py run --root {result['root']}`.")
    return 0


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training_daemon.py", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    sub = parser.add_subparsers(dest="command")
    p_init = sub.add_parser("init", help=cmd_init.__doc__, description=cmd_init.__doc__)
    add_common_args(p_init)
    p_init.add_argument("--base", default="tiny", metavar="tiny|PATH",
                        help="'tiny' builds a small model locally; PATH copies a local HF folder")
    p_init.set_defaults(func=cmd_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    return trainroot.run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
