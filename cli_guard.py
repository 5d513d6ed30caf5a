"""CLI guards shared by model_versioner.py and backup_manager.py (standard library only).

The commands that swap or copy the model are the ones a hurried person or an assistant
runs against the wrong folder, a read-only disk or with a typo, so their CLIs add what
`trainroot.run_cli` alone does not give:

- a usage error still prints one JSON document on stdout when `--json` was asked for;
- an OSError (read-only folder, permission, full disk) becomes an `Error:` line naming
  the path and a fix, never a traceback;
- a `--root` that is not a training root is refused before anything is written there;
- fix and undo commands carry `--root R` when the root came from `--root`, so pasting
  them acts on the same root.

    parser = cli_guard.ArgumentParser(prog="model_versioner.py", ...)
    sp.set_defaults(func=cli_guard.guarded(cmd_list))
    return cli_guard.run(parser, argv)
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import shlex
import sys
from pathlib import Path

from trainroot import (EXIT_USAGE, SCRIPTS_DIR, GuardrailError, UsageError, print_json,
                       resolve_root, run_cli)

_json_asked = False  # set by run() from argv: argparse errors happen before args exist
_COMMAND = re.compile(r"`(python3 [\w.-]+\.py(?: [^`]*)?)`")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the `Error: what, where. fix` form, and print
    `{"ok": false, "error": ...}` on stdout under --json (subparsers inherit the class)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        err = UsageError(message, f"python3 {self.prog}",
                         f"Run `python3 {self.prog} --help` to see the usage.")
        print(f"Error: {err}", file=sys.stderr)
        if _json_asked:
            print_json({"ok": False, "error": err.to_dict()})
        sys.exit(EXIT_USAGE)


def _asks_json(argv: list[str]) -> bool:
    # argparse accepts unambiguous prefixes (`--js`), so must this check
    return any(a.startswith("--j") and "--json".startswith(a) for a in argv)


def run(parser: argparse.ArgumentParser, argv) -> int:
    global _json_asked
    argv = list(sys.argv[1:] if argv is None else argv)
    _json_asked = _asks_json(argv)
    return run_cli(parser, argv)


def is_training_root(root: Path) -> bool:
    """A folder `init` made, even after `rm -rf current_model` or a lost config.json."""
    return any(os.path.lexists(root / name) for name in ("config.json", "current_model",
                                                           "versions"))


def command(cmd: str | None, root: Path | None) -> str | None:
    """`cmd` with `--root R` appended, unless it has one or `root` is None."""
    if not cmd or root is None or "--root" in cmd:
        return cmd
    return f"{cmd} --root {shlex.quote(str(root))}"


def with_root(text, root: Path | None):
    """`command()` applied to each backticked `python3 X.py ...` command in `text`."""
    if not text or root is None:
        return text
    return _COMMAND.sub(lambda m: f"`{command(m.group(1), root)}`", text)


def explicit_root(args) -> Path | None:
    """The root when it came from `--root` and is not the scripts' folder, else None: only
    then does a printed command need `--root` to act on the same root."""
    if not getattr(args, "root", None):
        return None
    root = resolve_root(args.root)
    return None if root == SCRIPTS_DIR else root


def os_error(exc: OSError) -> GuardrailError:
    """An OSError as an expected failure: what the system said, the path, how to fix it."""
    where = exc.filename or None
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "Make that folder writable (or point --root/backup_dir elsewhere), then run the command again."
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free space there (`python3 model_versioner.py prune`), then run the command again."
    else:
        fix = "Check that path, then run the command again."
    return GuardrailError(exc.strerror or str(exc), where, fix)


def guarded(func, *, needs_root: bool = True):
    """Wrap a `cmd_<verb>(args)` handler with the guards above."""
    @functools.wraps(func)
    def handler(args):
        shown = explicit_root(args)
        try:
            root = resolve_root(args.root)
            if needs_root and not is_training_root(root):
                raise GuardrailError(
                    "not a training root (no config.json, current_model/ or versions/)", root,
                    f"Create one with `python3 training_daemon.py init --root {shlex.quote(str(root))}`, "
                    "or give the right one with --root DIR.")
            try:
                return func(args)
            except OSError as exc:
                raise os_error(exc) from exc
        except GuardrailError as exc:
            exc.fix = with_root(exc.fix, shown)
            raise
    return handler
