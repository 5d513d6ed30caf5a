"""Model-folder manifests: what a complete model folder holds, and proof that it still does.

Every model folder the product writes (current_model, versions, backups, a `restore --to`
folder) carries `.manifest.json`: `{"schema_version": 1, "files": {relpath: {sha256, size}},
"global_step", "tokens_seen", "created_at"}` covering every other file. `check_model_dir`
is the cheap check (names and sizes, no hashing); `verify_files` recomputes every sha256.
Standard library only; model_versioner.py and backup_manager.py share it.

    write_manifest(folder)                          # hash the folder, write .manifest.json
    problems = verify_files(folder, read_manifest(folder)["files"])
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from trainroot import GuardrailError, atomic_write_json, read_json, sha256_file, utc_now

SCHEMA_VERSION = 1
MANIFEST = ".manifest.json"
VERSION_FILE = "version.json"    # a version's record, beside its files: never in a manifest
READ_ONLY = 0o444
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CMD = "python3 model_versioner.py"


def walk(folder: Path, skip: tuple = (MANIFEST,)) -> list[str]:
    """Every file under `folder` as a sorted posix relpath, except the names in `skip`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def read_manifest(model_dir) -> dict | None:
    """The folder's `.manifest.json`, or None if it has none (a corrupt one raises)."""
    doc = read_json(Path(model_dir) / MANIFEST, default=None)
    if doc is not None and not (isinstance(doc, dict) and isinstance(doc.get("files"), dict)):
        raise GuardrailError("not a manifest (no `files` object)", Path(model_dir) / MANIFEST,
                             f"Rewrite it with `{CMD} snapshot` or restore a version.")
    return doc


def write_manifest(model_dir, *, files: dict | None = None, global_step=None, tokens_seen=None,
                   extra: dict | None = None) -> dict:
    """Write `.manifest.json` atomically (read-only): `files` ({relpath: {sha256, size}}) when
    the caller hashed them already (a backup copy), else every file of the folder is hashed.

    `global_step`/`tokens_seen` default to the folder's `trainer_state.json`.
    """
    model_dir = Path(model_dir)
    if files is None:
        files = {}
        for rel in walk(model_dir):
            path = model_dir / rel
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    state = {}
    if (global_step is None or tokens_seen is None) and (model_dir / "trainer_state.json").is_file():
        with contextlib.suppress(GuardrailError):
            state = read_json(model_dir / "trainer_state.json", default={}) or {}
        state = state if isinstance(state, dict) else {}
    doc = {"schema_version": SCHEMA_VERSION, "files": files,
           "global_step": global_step if global_step is not None else state.get("global_step"),
           "tokens_seen": tokens_seen if tokens_seen is not None else state.get("tokens_seen"),
           "created_at": utc_now()}
    doc.update(extra or {})
    atomic_write_json(model_dir / MANIFEST, doc, mode=READ_ONLY)
    return doc


def has_weights(names) -> bool:
    return any(n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json") for n in names)


def check_model_dir(model_dir) -> list[str]:
    """Cheap completeness check (no hashing): config.json and weights present (or, for an
    adapter folder, adapter_config.json and adapter weights), names and sizes match the manifest. Returns the problems; empty if the folder looks complete."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [f"{model_dir}: missing"]
    names = walk(model_dir, skip=(MANIFEST, VERSION_FILE))
    problems = []
    if "config.json" not in names and "adapter_config.json" in names:
        # a peft adapter folder (adapter mode): its base lives in ROOT/base/ (base_store.py)
        if not any(n.startswith("adapter_model.") and n.endswith(WEIGHT_SUFFIXES) for n in names):
            problems.append("no adapter weights (adapter_model.safetensors)")
    else:
        if "config.json" not in names:
            problems.append("config.json: missing")
        if not has_weights(names):
            problems.append("no weights file (*.safetensors or *.bin)")
    try:
        manifest = read_manifest(model_dir)
    except GuardrailError as exc:
        return problems + [str(exc)]
    if manifest is None:
        return problems + [f"{MANIFEST}: missing"]
    listed = manifest["files"]
    for rel, entry in listed.items():
        try:
            size = (model_dir / rel).stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if isinstance(entry, dict) and size != entry.get("size"):
            problems.append(f"{rel}: size {size}, manifest says {entry.get('size')}")
    problems += [f"{rel}: not in the manifest" for rel in names if rel not in listed]
    return problems


def not_its_own(folder, rel: str) -> str | None:
    """Why `folder/rel` is not a regular file held by the folder itself (a symbolic link, or
    under one: its bytes live elsewhere and can change or vanish there), else None."""
    path, parts = Path(folder), rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except OSError:
            return None  # missing: said by the caller
        if stat.S_ISLNK(st.st_mode):
            where = "" if i == len(parts) - 1 else f" ({'/'.join(parts[:i + 1])}/ is one)"
            return (f"{rel}: a symbolic link{where} to {os.readlink(path)}, not a file of its "
                    "own (its bytes live elsewhere)")
    return None if stat.S_ISREG(st.st_mode) else f"{rel}: not a regular file"


def verify_files(folder, manifest_files: dict) -> list[str]:
    """Recompute every sha256 against `manifest_files`; returns one line per bad file."""
    folder = Path(folder)
    problems = []
    for rel, entry in sorted(manifest_files.items()):
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if (linked := not_its_own(folder, rel)) is not None:
            problems.append(linked)
        elif size != entry.get("size"):
            problems.append(f"{rel}: size {size}, expected {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (changed after it was recorded)")
    known = set(manifest_files) | {MANIFEST, VERSION_FILE}
    problems += [f"{rel}: not in the manifest" for rel in walk(folder, skip=()) if rel not in known]
    return problems
