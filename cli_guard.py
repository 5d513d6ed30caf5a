"""CLI guards shared by model_versioner.py and backup_manager.py (standard library only).

The commands that swap or copy the model are the ones a hurried person or an assistant
runs against the wrong folder, a read-only disk or with a typo, so their CLIs add what
`trainroot.run_cli` alone does not give:

- a `--root` that is not a training root is refused before anything is written there;
- fix and undo commands carry `--root R` when the root came from `--root`, so pasting
  them acts on the same root.

    sp.set_defaults(func=cli_guard.guarded(cmd_list))
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import trainroot
from trainroot import GuardrailError, os_error, require_root, resolve_root

_COMMAND = re.compile(r"`(python3 [\w.-]+\.py(?: [^`]*)?)`")


_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text, limit: int = 300) -> str:
    """A note or name as a terminal line: control characters, escape sequences and bidi
    overrides written as escapes (a note holding a newline and a fake "* v099" line, or
    ESC[2J, must not redraw what `list` shows), and cut at `limit` characters."""
    text = _UNSHOWN.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(text))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


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


explicit_root = trainroot.explicit_root  # (the one definition, also used by trainroot.run_cli)


def unless_found(root) -> Path | None:
    """`root`, unless it is the one a plain command finds by itself (TRAINING_ROOT, or the
    scripts' folder): what `command()` needs for a command printed without parsed args."""
    return None if root is None or Path(root).resolve() == resolve_root(None) else Path(root)


def guarded(func, *, needs_root: bool = True):
    """Wrap a `cmd_<verb>(args)` handler with the guards above."""
    @functools.wraps(func)
    def handler(args):
        shown = explicit_root(args)
        try:
            root = resolve_root(args.root)
            if needs_root:
                require_root(root)
            try:
                return func(args)
            except BrokenPipeError:
                raise
            except OSError as exc:  # here, so the fix below gets --root too
                raise os_error(exc) from exc
        except GuardrailError as exc:
            exc.fix = with_root(exc.fix, shown)
            raise
    return handler
