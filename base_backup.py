"""Backups of bases (adapter mode): one verified copy per base, shared by every backup of an
adapter that applies to it, so an adapter backup stays megabytes and still restores whole.

`<backup_dir>/bases/<base_id>-<sha256 of its .manifest.json, 12 hex>/` is a full, verified
copy (verified_copy.py, never a link) of `ROOT/base/<base_id>/` plus `base_copy.json`
({base_id, manifest_sha256, files, created_at}). The name carries the manifest's hash, so a
backup_dir shared by two roots never mixes two bases that happen to have the same id, and a
backup's record names its base copy by that hash (`"base": {id, manifest_sha256, path}`):
`verify` of the backup re-reads the copy too, and a restore brings the base back into
`ROOT/base/<id>` when it is missing or damaged. `backup_manager.py prune` deletes a copy no
backup names once no version of the root applies to its base (`unused_copies`).
Standard library only; backup_manager.py calls it.

    ref = backup_base(root, bdir, "b001")        # copy once, reuse after
    problems = verify_base_copy(bdir, ref)
    install_base(root, bdir, ref)                # ROOT/base/b001 back from the copy
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import base_store
from model_manifest import MANIFEST, READ_ONLY, read_manifest
from trainroot import (FileLock, GuardrailError, Paths, atomic_write_json, read_json,
                       rename_noreplace, sha256_file, utc_now)
from verified_copy import copy_tree_verified, hash_file

BASES_DIR = "bases"
COPY_RECORD = "base_copy.json"
STAGING_PREFIX = ".staging-"
NAME_RE = re.compile(r"b\d{3,}-[0-9a-f]{12}")


def _copy_name(ref: dict) -> str:
    name = f"{ref.get('id')}-{str(ref.get('manifest_sha256'))[:12]}"
    if not NAME_RE.fullmatch(name):  # a hand-edited record never names a path elsewhere
        raise GuardrailError(f"not a base reference: {ref!r}", BASES_DIR,
                             "Make a new backup with `python3 backup_manager.py backup`.")
    return name


def copy_path(bdir, ref: dict) -> Path:
    return Path(bdir) / BASES_DIR / _copy_name(ref)


def kept_copies(bdir, base_id: str) -> list[dict]:
    """References to the good copies of base `base_id` in `bdir/bases/` that no backup
    record may name any more (their backups were pruned; the copy stays): verified now."""
    store = Path(bdir) / BASES_DIR
    try:
        names = sorted(n for n in os.listdir(store) if NAME_RE.fullmatch(n) and n.startswith(base_id + "-"))
    except OSError:
        return []
    refs = []
    for name in names:
        rec = read_json(store / name / COPY_RECORD, default=None) if (store / name).is_dir() else None
        sha = ((rec or {}).get("files") or {}).get(MANIFEST, {}).get("sha256") if isinstance(rec, dict) else None
        if not isinstance(sha, str) or rec.get("base_id") != base_id:
            continue
        ref = {"id": base_id, "manifest_sha256": sha, "path": f"{BASES_DIR}/{name}"}
        if _copy_name(ref) == name and not verify_base_copy(bdir, ref):
            refs.append(ref)
    return refs


def unused_copies(root, bdir, named: set) -> list[str]:
    """Names of the copies in `bdir/bases/` no backup names (`named`: those that backups
    still name) of a base of this root (ROOT/base/<id> holds the same manifest) that no
    version and not current_model apply to: nothing could restore with them. A copy of a
    base this root does not hold (another root's, in a shared backup_dir; or one deleted
    here) is kept: whether it is needed cannot be told."""
    import versions_index
    store = Path(bdir) / BASES_DIR
    try:
        names = sorted(os.listdir(store))
    except OSError:
        return []
    needed = {row.get("base") for row in versions_index.VersionsIndex(root).rows()
              if row.get("kind") == "adapter"}
    needed.add(base_store.adapter_base(Paths(root).current_model))
    out = []
    for name in names:
        if not NAME_RE.fullmatch(name) or name in named:
            continue
        base_id, short = name.split("-", 1)
        if base_id in needed:
            continue
        try:
            mine = sha256_file(base_store.base_dir(root, base_id) / MANIFEST)
        except OSError:
            continue
        if mine[:12] == short:
            out.append(name)
    return out


def backup_base(root, bdir, base_id: str) -> dict:
    """A verified copy of base `base_id` under `bdir/bases/` (made once, reused while its
    record is there); returns the reference a backup record keeps. Call holding the
    backups lock. Refuses a missing or damaged base: an adapter is never backed up without
    a good copy of its base."""
    folder = base_store.base_dir(root, base_id)
    problems = base_store.check_base(root, base_id)
    if problems:
        raise GuardrailError(
            f"the adapter's base {base_id} is missing or damaged ({problems[0]}); an adapter "
            "is never backed up without its base", folder,
            f"Bring the base back (`python3 backup_manager.py restore-base {base_id}`), or back "
            "up a full version (`python3 model_versioner.py list` shows each one's kind).")
    manifest_sha = sha256_file(folder / MANIFEST)
    ref = {"id": base_id, "manifest_sha256": manifest_sha}
    dest = copy_path(bdir, ref)
    ref["path"] = f"{BASES_DIR}/{dest.name}"
    store = Path(bdir) / BASES_DIR
    if read_json(dest / COPY_RECORD, default=None):
        # copied and verified by an earlier backup (`verify` re-reads it): reused unless it
        # looks written to since, and then re-read; a bad one is set aside for a fresh copy,
        # which every backup naming it shares (the copy's name is its content's)
        if not _looks_touched(dest) or not verify_base_copy(bdir, ref):
            return ref
        aside = store / f".damaged-{dest.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(dest, aside)  # kept, never deleted: `backup_manager.py prune` leaves it be
        print(f"backup_manager: the copy of base {base_id} in {store} was damaged; kept it as "
              f"{aside.name} and made a fresh one", file=sys.stderr)
    store.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(store):  # left by a killed backup (we hold the backups lock)
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(store / name)
    manifest = read_manifest(folder)
    expected = {rel: {"sha256": e.get("sha256"), "size": e.get("size")}
                for rel, e in manifest["files"].items()}
    expected[MANIFEST] = {"sha256": manifest_sha, "size": (folder / MANIFEST).stat().st_size}
    staging = store / f"{STAGING_PREFIX}{dest.name}-{secrets.token_hex(3)}"
    try:
        files = copy_tree_verified(folder, staging, expected=expected, file_mode=READ_ONLY,
                                   src_label=str(folder))
        atomic_write_json(staging / COPY_RECORD, {
            "schema_version": 1, "base_id": base_id, "manifest_sha256": manifest_sha,
            "files": files, "created_at": utc_now()}, mode=READ_ONLY)
        rename_noreplace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ref


def _looks_touched(dest: Path) -> bool:
    """A base copy's file newer than its record, or with another size than recorded (the
    cheap check; a flipped bit with its time stamp kept is found by `verify`)."""
    try:
        rec = read_json(dest / COPY_RECORD)
        sealed = (dest / COPY_RECORD).stat().st_mtime_ns
        for rel, info in rec["files"].items():
            st = (dest / rel).stat()
            if st.st_mtime_ns > sealed or st.st_size != info.get("size"):
                return True
    except (GuardrailError, OSError, KeyError, TypeError, AttributeError):
        return True
    return False


def verify_base_copy(bdir, ref: dict) -> list[str]:
    """Re-read every byte of a backup's base copy from disk: one line per problem."""
    try:
        dest = copy_path(bdir, ref)
    except GuardrailError as exc:
        return [exc.what]
    label = f"base {ref.get('id')} ({ref.get('path')})"
    rec = read_json(dest / COPY_RECORD, default=None) if dest.is_dir() else None
    if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
        return [f"{label}: missing from {Path(bdir) / BASES_DIR}"]
    problems = []
    want = rec["files"]
    if (want.get(MANIFEST) or {}).get("sha256") != ref.get("manifest_sha256"):
        problems.append(f"{label}: {MANIFEST} is not the one this backup recorded")
    present = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()} - {COPY_RECORD}
    problems += [f"{label}: {rel}: extra file" for rel in sorted(present - set(want))]
    for rel, info in sorted(want.items()):
        if rel not in present:
            problems.append(f"{label}: {rel}: missing")
            continue
        digest, size = hash_file(dest / rel, cold=True)
        if size != info.get("size") or digest != info.get("sha256"):
            problems.append(f"{label}: {rel}: sha256 mismatch")
    return problems


def install_base(root, bdir, ref: dict) -> str | None:
    """Bring base `ref["id"]` back into ROOT/base/ from its verified copy when it is missing
    or damaged (a damaged one is moved to ROOT/.attic/, never deleted). Returns what was
    done, or None when the root's base is already good: every file's sha256 recomputed, as
    `verify` does (rot that kept sizes and time stamps passes the cheap check)."""
    base_id = ref.get("id")
    target = base_store.base_dir(root, base_store.validate_base_id(base_id))
    with _base_lock(root):
        if target.is_dir() and not base_store.verify_base(root, base_id):
            if sha256_file(target / MANIFEST) != ref.get("manifest_sha256"):
                raise GuardrailError(
                    f"ROOT/base/{base_id} is another base than the one this backup's adapter "
                    "needs (a backup from another root?)", target,
                    "Restore it into another folder with `python3 backup_manager.py restore ID "
                    "--to DIR`.")
            return None
        problems = verify_base_copy(bdir, ref)
        if problems:
            raise GuardrailError(f"the backup's copy of base {base_id} is damaged ({problems[0]}); "
                                 "nothing was restored", copy_path(bdir, ref),
                                 "List the other backups with `python3 backup_manager.py list`.")
        done = f"restored base {base_id}"
        if os.path.lexists(target):
            attic = Paths(root).root / ".attic" / f"base-{base_id}-{time.time_ns()}"
            attic.parent.mkdir(parents=True, exist_ok=True)
            os.rename(target, attic)
            done += f" (the damaged one is kept in {attic})"
        staging = target.parent / f"{base_store.STAGING_PREFIX}restore-{secrets.token_hex(3)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        src = copy_path(bdir, ref)
        rec = read_json(src / COPY_RECORD)
        try:
            copy_tree_verified(src, staging, skip={COPY_RECORD}, expected=rec["files"],
                               file_mode=READ_ONLY, src_label=str(src))
            os.utime(staging / MANIFEST)  # sealed last: base_store.check_base trusts older files
            rename_noreplace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return done


def export_base(bdir, ref: dict, staged: Path, final: Path) -> dict:
    """For `restore ID --to DIR` of an adapter: the verified copy of its base into
    `staged/base/<id>/` and the adapter's adapter_config.json pointed at `final/base/<id>`
    (where the folder will be), so the exported adapter loads with its own base. Returns
    the manifest entries to add or replace ({relpath: {sha256, size}})."""
    problems = verify_base_copy(bdir, ref)
    if problems:
        raise GuardrailError(f"the backup's copy of base {ref.get('id')} is damaged ({problems[0]}); "
                             "nothing was restored", copy_path(bdir, ref),
                             "List the other backups with `python3 backup_manager.py list`.")
    src = copy_path(bdir, ref)
    rel = f"{base_store.BASE_DIR}/{base_store.validate_base_id(ref['id'])}"
    (staged / rel).parent.mkdir(exist_ok=True)
    files = copy_tree_verified(src, staged / rel, skip={COPY_RECORD},
                               expected=read_json(src / COPY_RECORD)["files"], src_label=str(src))
    out = {f"{rel}/{name}": entry for name, entry in files.items()}
    cfg_path = staged / "adapter_config.json"
    cfg = read_json(cfg_path)
    cfg["base_model_name_or_path"] = str(Path(final) / rel)
    atomic_write_json(cfg_path, cfg)
    out["adapter_config.json"] = {"sha256": sha256_file(cfg_path), "size": cfg_path.stat().st_size}
    return out


class _base_lock:
    """base_store's lock: a restore's staging is never cleaned by a create running beside it."""

    def __init__(self, root):
        self.lock = FileLock(Paths(root).lock("base"), "restore base")

    def __enter__(self):
        self.lock.acquire(timeout=60)

    def __exit__(self, *exc):
        self.lock.release()
