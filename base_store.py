"""The base store: full models kept once, immutable, for adapter (LoRA) mode.

In adapter mode current_model/ and every version hold only a peft adapter; the full model
it applies to lives once in `ROOT/base/<base_id>/` ("b001", "b002", ...): hard links (a
copy where linking fails), `.manifest.json`, `base.json` {base_id, created_at, source,
merged, dtype}, files read-only. A base is never written again and never deleted by this
module; a model folder names its base in its manifest (`extra={"kind": "adapter", "base":
id}`), which is the truth (the absolute path in adapter_config.json may be stale after the
root moves). Standard library only.

    base_id = create_base(root, "ROOT/current_model", source="full model at v004")
    problems = verify_base(root, base_id)          # [] = every sha256 matches
    adapter_base("ROOT/current_model")             # "b001", or None for a full model
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import model_manifest
from trainroot import (FileLock, GuardrailError, Paths, atomic_write_json, atomic_write_text,
                       fsync_dir, fsync_paths, read_json, rename_noreplace, sha256_file, utc_now)

BASE_DIR = "base"                  # ROOT/base/<base_id>/
BASE_FILE = "base.json"            # the base's record, inside it (and in its manifest)
LAST_ID = ".last_id"               # the highest id ever given: a deleted base's id is never reused
STAGING_PREFIX = ".staging-"       # ROOT/base/.staging-*: a create in progress (or killed)
ID_RE = re.compile(r"^b(\d{3,})$")
# Files that say where a model came from, not what it computes: two folders whose other
# files are equal hold the same weights.
NOT_WEIGHTS = ("trainer_state.json", model_manifest.MANIFEST, BASE_FILE,
               model_manifest.VERSION_FILE)
CMD = "python3 model_versioner.py"


def base_dir(root, base_id: str) -> Path:
    """Where base `base_id` lives: ROOT/base/<base_id>."""
    return Path(root) / BASE_DIR / base_id


def validate_base_id(base_id) -> str:
    if not isinstance(base_id, str) or not ID_RE.match(base_id):
        raise GuardrailError(f"not a base id: {base_id!r} (expected b001, b002, ...)",
                             "base id", "List the bases with `ls ROOT/base` and give one of them.")
    return base_id


def _ids(store: Path) -> list[str]:
    try:
        names = os.listdir(store)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if ID_RE.match(n)), key=lambda n: int(n[1:]))


def _next_id(store: Path) -> str:
    highest = max((int(n[1:]) for n in _ids(store)), default=0)
    try:
        recorded = int((store / LAST_ID).read_text().strip())
    except (FileNotFoundError, ValueError):
        recorded = 0  # missing or damaged: the folder names alone are the floor
    return f"b{max(highest, recorded, _highest_named(store.parent)) + 1:03d}"


def _highest_named(root: Path) -> int:
    """The highest base number a version (kept or pruned) or a backup names: with base/
    deleted (its .last_id too), an id they name must not be given to other weights, or an
    old adapter version would load onto them, verified "ok"."""
    numbers = []
    versions = root / "versions"
    records = [*versions.glob("v*/" + model_manifest.VERSION_FILE), *versions.glob(".pruned/v*.json")]
    for path in records:
        try:
            doc = read_json(path, default=None)
        except GuardrailError:
            continue
        base = doc.get("base") if isinstance(doc, dict) else None
        if isinstance(base, str) and ID_RE.match(base):
            numbers.append(int(base[1:]))
    import backup_records
    try:
        held = backup_records.list_backups(root)
    except (GuardrailError, OSError):
        held = []
    for b in held:
        base = b.get("base") if isinstance(b.get("base"), dict) else {}
        if isinstance(base.get("id"), str) and ID_RE.match(base["id"]):
            numbers.append(int(base["id"][1:]))
    return max(numbers, default=0)


def _weights_of(manifest: dict) -> dict:
    """{relpath: sha256} of the files that make up the model's weights and shape."""
    return {rel: (e or {}).get("sha256") for rel, e in manifest.get("files", {}).items()
            if rel not in NOT_WEIGHTS}


def _dtype_of(folder: Path) -> str | None:
    try:
        cfg = read_json(folder / "config.json", default={}) or {}
    except GuardrailError:
        return None
    if not isinstance(cfg, dict):
        return None
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links refused: a copy is as good, only bigger
        shutil.copy2(src, dst)


def _clean_staging(store: Path) -> None:
    """Remove what a killed create left (called with the base lock held: nobody else is
    creating, so every staging folder is stale). Staging never holds the only copy."""
    for name in os.listdir(store):
        if name.startswith(STAGING_PREFIX):
            path = store / name
            for dirpath, _dirs, _files in os.walk(path):
                os.chmod(dirpath, 0o755)
            shutil.rmtree(path)


def create_base(root, src_folder, *, source: str, merged=()) -> str:
    """Make the full model folder `src_folder` an immutable base and return its id; a base
    with the same weights already in the store is returned instead of a second copy."""
    root, src = Path(root), Path(src_folder)
    problems = [p for p in model_manifest.check_model_dir(src)
                if not p.startswith(model_manifest.MANIFEST)]  # the base gets its own
    if is_adapter_folder(src):
        problems.insert(0, "an adapter folder, not a full model")
    if problems:
        raise GuardrailError(f"cannot make a base of an incomplete model folder: "
                             f"{'; '.join(problems[:5])}", src,
                             f"Check it with `{CMD} verify`, or restore a good version with "
                             f"`{CMD} restore VERSION` first.")
    store = root / BASE_DIR
    store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(Paths(root).lock("base"), "create base").acquire(timeout=60)
    try:
        return _create_locked(root, src, store, source, merged)
    finally:
        lock.release()


def _create_locked(root: Path, src: Path, store: Path, source: str, merged) -> str:
    _clean_staging(store)
    staging = store / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    for rel in model_manifest.walk(src, skip=(model_manifest.MANIFEST,
                                              model_manifest.VERSION_FILE, BASE_FILE)):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src / rel, staging / rel)
    files = {}
    for rel in model_manifest.walk(staging):
        path = staging / rel
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    wanted = _weights_of({"files": files})
    for other in _ids(store):
        try:
            theirs = model_manifest.read_manifest(store / other)
        except GuardrailError:
            continue  # a damaged base is no twin; verify_base reports it
        if theirs and _weights_of(theirs) == wanted:
            shutil.rmtree(staging)
            return other
    base_id = _next_id(store)
    record = {"schema_version": 1, "base_id": base_id, "created_at": utc_now(),
              "source": source, "merged": list(merged), "dtype": _dtype_of(staging)}
    atomic_write_json(staging / BASE_FILE, record, mode=model_manifest.READ_ONLY, sync=False)
    path = staging / BASE_FILE
    files[BASE_FILE] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    model_manifest.write_manifest(staging, files=files, extra={"kind": "full"})
    synced_files, synced_dirs = [], [staging]
    for dirpath, dirnames, filenames in os.walk(staging):
        synced_dirs += [Path(dirpath) / d for d in dirnames]
        for name in filenames:
            os.chmod(Path(dirpath) / name, model_manifest.READ_ONLY)
            synced_files.append(Path(dirpath) / name)
    # fsync every file too: a copied one is new data, and a linked one costs nothing
    fsync_paths(synced_files, synced_dirs)
    rename_noreplace(staging, store / base_id)
    atomic_write_text(store / LAST_ID, str(int(base_id[1:])))
    fsync_dir(store)
    return base_id


def read_base(root, base_id: str) -> dict:
    """The base's base.json; GuardrailError if the base or its record is missing."""
    folder = base_dir(root, validate_base_id(base_id))
    doc = read_json(folder / BASE_FILE, default=None)
    if not isinstance(doc, dict):
        raise GuardrailError(f"base {base_id} is missing (no {BASE_FILE})", folder,
                             "Bring it back from a backup that holds it with "
                             "`python3 backup_manager.py restore ID`, or list them with "
                             "`python3 backup_manager.py list`.")
    return doc


def list_bases(root) -> list[dict]:
    """Every base's record, oldest first (one whose base.json is unreadable says so)."""
    out = []
    for base_id in _ids(Path(root) / BASE_DIR):
        try:
            out.append(read_base(root, base_id))
        except GuardrailError as exc:
            out.append({"base_id": base_id, "error": str(exc)})
    return out


def verify_base(root, base_id: str) -> list[str]:
    """Recompute every sha256 of the base against its manifest: one line per problem."""
    folder = base_dir(root, validate_base_id(base_id))
    if not folder.is_dir():
        return [f"base {base_id}: missing ({folder})"]
    try:
        manifest = model_manifest.read_manifest(folder)
    except GuardrailError as exc:
        return [f"base {base_id}: {exc}"]
    if manifest is None:
        return [f"base {base_id}: {model_manifest.MANIFEST} missing"]
    problems = model_manifest.verify_files(folder, manifest["files"])
    if BASE_FILE not in manifest["files"]:
        problems.append(f"{BASE_FILE}: not in the manifest")
    return [f"base {base_id}: {p}" for p in problems]


def check_base(root, base_id: str, *, hash_touched: bool = True) -> list[str]:
    """Cheap check (no hashing unless a file looks written to): every file of the manifest
    present with its size, none newer than the manifest. A file written in place after the
    base was made (its mtime moves) is settled by the full sha256, as `verify_base` does
    (`hash_touched=False`: reported as such instead, for the state tracker's speed)."""
    folder = base_dir(root, validate_base_id(base_id))
    if not folder.is_dir():
        return [f"base {base_id}: missing ({folder})"]
    try:
        manifest = model_manifest.read_manifest(folder)
        sealed = (folder / model_manifest.MANIFEST).stat().st_mtime_ns
    except (GuardrailError, OSError) as exc:
        return [f"base {base_id}: {exc}"]
    if manifest is None:
        return [f"base {base_id}: {model_manifest.MANIFEST} missing"]
    problems, touched = [], False
    for rel, entry in sorted(manifest["files"].items()):
        try:
            st = (folder / rel).stat()
        except OSError:
            problems.append(f"base {base_id}: {rel}: missing")
            continue
        if st.st_size != (entry or {}).get("size"):
            problems.append(f"base {base_id}: {rel}: size {st.st_size}, expected "
                            f"{(entry or {}).get('size')}")
        touched = touched or st.st_mtime_ns > sealed
    if problems or not touched:
        return problems
    if not hash_touched:
        return [f"base {base_id}: a file was written after the base was made (run "
                f"`python3 model_versioner.py verify --all`)"]
    return verify_base(root, base_id)


def adapter_base(folder) -> str | None:
    """The base id an adapter folder names (its manifest's "base"; without one, the
    ROOT/base/<id> its adapter_config.json points at), None for a full model folder."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        return None
    try:
        manifest = model_manifest.read_manifest(folder) or {}
    except GuardrailError:
        manifest = {}
    if isinstance(manifest.get("base"), str) and ID_RE.match(manifest["base"]):
        return manifest["base"]
    try:
        cfg = read_json(folder / "adapter_config.json", default={}) or {}
    except GuardrailError:
        return None
    path = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if isinstance(path, str):
        p = Path(path)
        if p.parent.name == BASE_DIR and ID_RE.match(p.name):
            return p.name
    return None


def is_adapter_folder(folder) -> bool:
    """A peft adapter folder: adapter_config.json present and no config.json."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
