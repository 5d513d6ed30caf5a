"""Retention as policy (restic's rules) and the disk budget, for versions and backups.

A policy is `{"keep_last": N, "keep_hourly": N, "keep_daily": N, "keep_weekly": N,
"keep_monthly": N, "keep_yearly": N}` (rules left out are 0), as restic's `forget`:
`keep_last` keeps the newest N; `keep_daily` keeps the newest item of each of the last N
days that have one (UTC), and likewise per hour, ISO week, month and year. What the rules
do not keep is pruned, except what the caller protects (tags, current_model, ...).

The disk budget (`max_disk_gb` for the root, `backup_max_disk_gb` for backup_dir) is
checked before the product writes a model-sized thing: `check_write(root, cfg, need, where)`
says whether it fits the budget and the free space; `make_room` applies retention first.

    import retention
    plan = retention.apply_rules(items, {"keep_last": 3, "keep_daily": 7})
    report = retention.disk_report(root, cfg)     # usage vs budget, free space, days left

Standard library only (control scripts import it; no policy lives in trainroot).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import time
from datetime import datetime, timezone
from pathlib import Path

from trainroot import Paths, atomic_write_json, read_json, utc_now, GuardrailError

RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")

# Sized for years on one disk: the number kept is bounded whatever the history (at most the
# sum of the rules), and a model costs its full size per kept version (each trained file
# rewrites every weight, so versions share no bytes). For versions, 10 + 7 + 4 + 12 + 5
# is at most 38 models after five years (fewer while rules overlap: the newest of a day is
# also the newest of its week); a 1.5B-parameter fp32 model (6 GB) then needs ~230 GB. Backups live
# on another disk and are full copies: 3 + 7 + 4 + 6 + 2 = at most 22.
DEFAULT_POLICY = {
    "versions": {"keep_last": 10, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 4,
                 "keep_monthly": 12, "keep_yearly": 5},
    "backups": {"keep_last": 3, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 4,
                "keep_monthly": 6, "keep_yearly": 2},
}
OLD_KEYS = {"versions": "keep_versions", "backups": "keep_backups"}  # read as keep_last
USAGE_FILE = ".disk_usage.json"   # in ROOT: usage samples the daemon keeps, for the rate
USAGE_SAMPLES = 64
GB = 1_000_000_000


# --------------------------------------------------------------------------- the policy

def validate_policy(value, key: str = "retention") -> list[str]:
    """Problems in a config `retention` value, each naming its key."""
    if not isinstance(value, dict):
        return [f"{key}: expected an object like {{\"versions\": {{\"keep_last\": 10}}, "
                f"\"backups\": {{\"keep_last\": 3}}}}, got {value!r}"]
    errors = []
    for kind, policy in value.items():
        if kind not in DEFAULT_POLICY:
            errors.append(f"{key}.{kind}: unknown (expected versions or backups)")
            continue
        if not isinstance(policy, dict):
            errors.append(f"{key}.{kind}: expected an object of rules ({', '.join(RULES)})")
            continue
        for rule, n in policy.items():
            if rule not in RULES:
                import difflib
                close = difflib.get_close_matches(rule, RULES, n=1)
                errors.append(f"{key}.{kind}.{rule}: unknown rule"
                              + (f" (did you mean {close[0]}?)" if close else f" (rules: {', '.join(RULES)})"))
            elif isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1_000_000:
                errors.append(f"{key}.{kind}.{rule}: expected an integer 0..1000000, got {n!r}")
        if not errors and not any(policy.get(r) for r in RULES):
            errors.append(f"{key}.{kind}: every rule is 0, which would keep only what is "
                          "protected; set at least keep_last")
    return errors


def policy(cfg: dict | None, kind: str) -> dict:
    """The effective policy of `kind` ("versions" or "backups") from a loaded config.

    `retention.<kind>` replaces the default policy whole (rules left out are 0). A config
    from before `retention` existed keeps `keep_versions` / `keep_backups`: read as
    `keep_last`, the other rules at their defaults (so an upgrade never keeps fewer)."""
    cfg = cfg if isinstance(cfg, dict) else {}
    given = cfg.get("retention")
    if isinstance(given, dict) and isinstance(given.get(kind), dict):
        return {r: int(given[kind].get(r) or 0) for r in RULES}
    out = dict(DEFAULT_POLICY[kind])
    old = cfg.get(OLD_KEYS[kind])
    if isinstance(old, int) and not isinstance(old, bool) and old >= 1:
        out["keep_last"] = old
    return out


def old_keys_note(cfg: dict | None) -> str | None:
    """A sentence about `keep_versions`/`keep_backups` in config.json, or None."""
    cfg = cfg if isinstance(cfg, dict) else {}
    given = cfg.get("retention") if isinstance(cfg.get("retention"), dict) else {}
    notes = []
    for kind, name in OLD_KEYS.items():
        if cfg.get(name) is None:
            continue
        notes.append(f"{name} is ignored (retention.{kind} is set)" if isinstance(
            given.get(kind), dict) else f"{name} {cfg[name]} is read as retention.{kind}.keep_last")
    return "; ".join(notes) or None


def _parse(text) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


_BUCKETS = {
    "keep_hourly": ("hourly", lambda t: t.strftime("%Y-%m-%d %H:00")),
    "keep_daily": ("daily", lambda t: t.strftime("%Y-%m-%d")),
    "keep_weekly": ("weekly", lambda t: "%04d-W%02d" % t.isocalendar()[:2]),
    "keep_monthly": ("monthly", lambda t: t.strftime("%Y-%m")),
    "keep_yearly": ("yearly", lambda t: t.strftime("%Y")),
}


def apply_rules(items: list[tuple[str, str | None]], rules: dict) -> dict:
    """{id: [reasons]} of the items the rules keep; `items` is [(id, created_at)] oldest
    first (creation order, which a clock stepped back cannot reorder).

    As restic: walking newest first, `keep_last` keeps the first N; each time rule keeps
    an item whose period differs from the last one it kept, until it has kept N. An item
    whose time cannot be read is kept (nobody knows which period it belongs to)."""
    keep: dict = {}
    left = {r: int(rules.get(r) or 0) for r in RULES}
    last_bucket: dict = {}
    for n, (iid, created) in enumerate(reversed(items)):
        reasons = []
        if left["keep_last"] > 0:
            left["keep_last"] -= 1
            reasons.append(f"last {n + 1}")
        t = _parse(created)
        if t is None:
            reasons.append("no readable created_at")
        else:
            for rule, (word, bucket) in _BUCKETS.items():
                if left[rule] > 0:
                    b = bucket(t)
                    if b != last_bucket.get(rule):
                        last_bucket[rule] = b
                        left[rule] -= 1
                        reasons.append(f"{word} {b}")
        if reasons:
            keep[iid] = reasons
    return keep


def describe(rules: dict) -> str:
    return ", ".join(f"{r} {rules[r]}" for r in RULES if rules.get(r)) or "nothing"


# --------------------------------------------------------------------------- the disk budget

def _budget(cfg: dict, key: str) -> int | None:
    v = cfg.get(key)
    return int(v * GB) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def _dev(path: Path) -> int | None:
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


class TooManyFiles(Exception):
    """A bounded measurement (`usage(limit=N)`) met more than N files: not measured."""


def folder_bytes(folders, seen: set | None = None, dev: int | None = None,
                 left: list | None = None) -> int:
    """Bytes on disk (blocks) of every file under `folders`, each inode once (only those on
    device `dev` when given). `left`: [files this walk may still stat]; TooManyFiles past it."""
    seen = set() if seen is None else seen
    total = 0
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            if left is not None:
                left[0] -= len(files) + 1
                if left[0] < 0:
                    raise TooManyFiles(folder)
            for name in files:
                try:
                    st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                except OSError:
                    continue
                if (dev is None or st.st_dev == dev) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


# Sizes of the folders that are written once (versions/ and backup_dir: a version or a
# backup is made in staging and renamed in; what changes later is replaced by an atomic
# rename, which moves its folder's mtime): per folder, its (dev, inode, mtime) and its
# files' (dev, inode, bytes), so the daemon's usage sample lists only the folders that
# changed (at 10,000 versions and 1,001 backups a full walk took ~0.7 s).
# A folder changed within the last TREE_YOUNG_NS is listed again next time (a change in the
# same clock tick would not move its mtime). While the top folder's mtime has not moved (no
# version or backup came or went), its subfolders are taken as they were, unasked (each
# written once: what changes in one later is a small record); everything is walked
# afresh every TREE_REFRESH_S.
_TREES: dict[str, tuple] = {}
_TREES_SINCE = [0.0]
TREE_YOUNG_NS = 2_000_000_000
TREE_REFRESH_S = 3600.0


def tree_bytes(folder, seen: set) -> int:
    """folder_bytes() of one folder, from what the last call saw of each subfolder whose
    mtime has not moved since (see _TREES)."""
    if time.monotonic() - _TREES_SINCE[0] > TREE_REFRESH_S:
        _TREES.clear()
        _TREES_SINCE[0] = time.monotonic()
    return _tree_bytes(str(folder), seen, top=True)


def _tree_bytes(folder: str, seen: set, top: bool = False, trusted: bool = False) -> int:
    cached = _TREES.get(folder)
    if trusted and cached is not None and cached[0] is not None:
        key = cached[0]  # (a subfolder of an unchanged top folder: see _TREES)
    else:
        try:
            st = os.stat(folder, follow_symlinks=False)
        except OSError:
            return 0
        if not stat.S_ISDIR(st.st_mode):
            return 0
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    unchanged = cached is not None and cached[0] == key
    if not unchanged:
        old, old_dirs = (cached[1], cached[2]) if cached else ({}, [])
        files, subdirs = {}, []
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_dir():  # a link to a folder: named, not followed (as os.walk)
                        if not e.is_symlink():
                            subdirs.append(e.name)
                        continue
                    known = old.get(e.name)
                    if known is not None and known[1] == e.inode():
                        files[e.name] = known
                        continue
                    try:
                        s = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    files[e.name] = (s.st_dev, s.st_ino, s.st_blocks * 512)
        except OSError:
            return 0
        for gone in set(old_dirs) - set(subdirs):
            _TREES.pop(os.path.join(folder, gone), None)
        young = time.time_ns() - st.st_mtime_ns < TREE_YOUNG_NS
        cached = _TREES[folder] = (None if young else key, files, subdirs)
    total = 0
    for dev, ino, nbytes in cached[1].values():
        if (dev, ino) not in seen:
            seen.add((dev, ino))
            total += nbytes
    for name in cached[2]:
        total += _tree_bytes(os.path.join(folder, name), seen,
                             trusted=(trusted or top) and unchanged)
    return total


def _backup_dir(root: Path, cfg: dict) -> Path:
    import training_config
    try:
        return training_config.backup_dir(root, cfg)
    except (TypeError, ValueError):
        return Paths(root).default_backups


def usage(root, cfg: dict, limit: int | None = None) -> dict | None:
    """What the budgets count: the root's model data (current_model, versions, checkpoints,
    .staging, .attic, and backup_dir when it lies inside the root) and backup_dir; also
    `versions_used` (versions/ alone, each inode once). A walk of every file: the daemon's,
    once per file. With `limit`: None when the root holds more than `limit` files (a status
    measures a small root now, never a long history)."""
    p = Paths(root)
    bdir = _backup_dir(p.root, cfg)
    inside = bdir.resolve().is_relative_to(p.root.resolve()) if bdir.exists() else \
        str(bdir).startswith(str(p.root))
    seen: set = set()
    left = None if limit is None else [limit]
    try:
        # written-once folders from what the last walk saw (the daemon's samples), unless
        # bounded (a status measuring a small root walks it)
        versions_used = tree_bytes(p.versions, seen) if left is None else \
            folder_bytes([p.versions], seen, left=left)
        root_used = versions_used + folder_bytes([p.current_model, p.checkpoints, p.staging,
                                                  p.root / ".attic"], seen, left=left)
        bseen = set() if not inside else seen
        backup_used = tree_bytes(bdir, bseen) if left is None else \
            folder_bytes([bdir], bseen, left=left)
    except TooManyFiles:
        return None
    return {"root_used": root_used + (backup_used if inside else 0), "backup_used": backup_used,
            "versions_used": versions_used, "backup_dir": str(bdir), "backups_inside_root": inside}


def disk_report(root, cfg: dict, *, disk_usage=None, used: dict | None = None,
                walk: bool = True) -> dict:
    """Usage vs budget and free space, for the root and backup_dir, with days left at the
    rate the daemon's samples show (None while there are too few or usage shrinks).

    `used`: a measurement already made (the daemon's last sample); without one, `walk`
    measures now, else used_bytes is None and `measured_at` None: not measured yet."""
    p = Paths(root)
    if disk_usage is None:
        import shutil
        disk_usage = shutil.disk_usage
    u = used or (usage(p.root, cfg) if walk else None)
    if u is None:
        bdir = _backup_dir(p.root, cfg)
        u = {"root_used": None, "backup_used": None, "backup_dir": str(bdir),
             "backups_inside_root": str(bdir.resolve()).startswith(str(p.root.resolve()) + os.sep),
             "measured_at": None}
    out = {}
    for name, path, used_bytes, key in (
            ("root", p.root, u["root_used"], "max_disk_gb"),
            ("backups", Path(u["backup_dir"]), u["backup_used"], "backup_max_disk_gb")):
        target = path
        while not target.exists() and target != target.parent:
            target = target.parent
        try:
            free = disk_usage(target).free
        except OSError:
            free = None
        budget = _budget(cfg, key)
        out[name] = {"path": str(path), "used_bytes": used_bytes, "budget_bytes": budget,
                     "free_bytes": free, "budget_key": key,
                     "left_bytes": None if budget is None or used_bytes is None
                     else budget - used_bytes}
    rate = growth_per_day(p.root)
    for name, key in (("root", "root_used"), ("backups", "backup_used")):
        sec = out[name]
        room = [x for x in (sec["left_bytes"], sec["free_bytes"]) if x is not None]
        r = rate.get(key)
        sec["growth_bytes_per_day"] = None if r is None else int(r)
        sec["days_left"] = (round(max(0, min(room)) / r, 1) if r and r > 0 and room else None)
    out["backups_inside_root"] = u["backups_inside_root"]
    out["measured_at"] = None if u["root_used"] is None else (u.get("measured_at") or utc_now())
    return out


def _same_disk(root: Path, path: Path) -> bool:
    """Whether `path` (or the folder it will be made in) is on the root's filesystem."""
    dev = _dev(root)
    return dev is not None and dev == _dev(path)


def _size(n: int) -> str:
    return f"{n / GB:.3f} GB" if abs(n) >= GB else f"{n / 1e6:.1f} MB"


def _free_only(root, cfg: dict, where: str, disk_usage=None) -> dict:
    """disk_report()'s section for `where` without usage: free space only (no budget set)."""
    import shutil
    p = Paths(root)
    path = p.root if where == "root" else _backup_dir(p.root, cfg)
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        free = (disk_usage or shutil.disk_usage)(target).free
    except OSError:
        free = None
    return {"path": str(path), "free_bytes": free, "budget_bytes": None,
            "budget_key": "max_disk_gb" if where == "root" else "backup_max_disk_gb"}


def check_write(root, cfg: dict, need: int, where: str = "root", *, disk_usage=None,
                report: dict | None = None) -> str | None:
    """None if writing `need` more bytes under `where` ("root" or "backups") fits both its
    budget and the free space (plus min_free_disk_mb), else what does not fit, in figures.

    Without a budget for `where` only the free space counts: no walk over every version
    and checkpoint file (the daemon checks before each file; at 10,000 versions the walk
    took seconds of its start to first step)."""
    key = "max_disk_gb" if where == "root" else "backup_max_disk_gb"
    if report is None and _budget(cfg, key) is None:
        sec = _free_only(root, cfg, where, disk_usage)
    else:
        sec = (report or disk_report(root, cfg, disk_usage=disk_usage))[where]
    margin = int(cfg.get("min_free_disk_mb") or 0) << 20 if where == "root" else 0
    problems = []
    if sec["budget_bytes"] is not None and sec["used_bytes"] + need > sec["budget_bytes"]:
        problems.append(f"{sec['budget_key']} {sec['budget_bytes'] / GB:g} GB: "
                        f"{_size(sec['used_bytes'])} used + {_size(need)} to write is over it")
    if sec["free_bytes"] is not None and sec["free_bytes"] < need + margin:
        problems.append(f"{_size(sec['free_bytes'])} free on the disk of {sec['path']}, "
                        f"{_size(need + margin)} needed"
                        + (f" ({_size(need)} + min_free_disk_mb)" if margin else ""))
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- the spare

# The engine keeps one pruned checkpoint in ROOT/.staging/ (its folder named SPARE_PREFIX...)
# whose weights and optimizer files the next checkpoint writes over in place: freeing a
# checkpoint's gigabytes and allocating them again per file cost more than writing them
# (docs/design.md, "The engine"). It stays through idle spells and restarts, counted in
# max_disk_gb like the rest of .staging/; it is given back (deleted: it is a pruned
# checkpoint, nothing reads it) before anything is pruned to make room, and by the idle
# daemon when the disk runs short.
SPARE_PREFIX = "old-checkpoint-"
SPARE_FILES = ("model.safetensors", "optimizer.safetensors")  # the big files written over


def spare_folders(root) -> list[Path]:
    """The root's pruned checkpoints in .staging/ (the spare, and any whose deletion is
    still under way), newest name first; never a symlink."""
    staging = Paths(root).staging
    try:
        names = sorted(os.listdir(staging), reverse=True)
    except OSError:
        return []
    out = []
    for name in names:
        path = staging / name
        if name.startswith(SPARE_PREFIX) and path.is_dir() and not path.is_symlink():
            out.append(path)
    return out


def spare_files(folders) -> list[Path]:
    """The files of these pruned checkpoints that a checkpoint may write over: their own
    regular files, writable, with one link (nothing else names them: never a version's or
    current_model's weights, nothing through a symlink)."""
    out = []
    for folder in folders:
        try:
            subs = [d for d in Path(folder).iterdir() if d.is_dir() and not d.is_symlink()]
        except OSError:
            continue
        for f in (d / name for d in subs for name in SPARE_FILES):
            try:
                st = f.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_mode & 0o200:
                out.append(f)
    return out


def spare_bytes(root) -> int:
    """Bytes the root's next checkpoint writes over instead of taking from the free space:
    the newest-named pruned checkpoint's, the one an engine starting takes as its spare
    (the others are being deleted)."""
    return files_size(spare_files(spare_folders(root)[:1]))


def files_size(files) -> int:
    """The sizes of these files added up (one gone meanwhile counts 0)."""
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:
            continue
    return total


def release_spare(root) -> int:
    """Delete the root's pruned checkpoints in .staging/ unless a file is training (the
    engine lock: its checkpoint may be writing over them); the bytes given back."""
    import shutil
    from trainroot import BusyError, FileLock
    p = Paths(root)
    if not p.staging.is_dir():
        return 0
    try:
        lock = FileLock(p.lock("engine"), "release the spare checkpoint").acquire(timeout=0)
    except (BusyError, OSError):
        return 0
    try:
        folders = spare_folders(p.root)
        held = folder_bytes(folders)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)  # (what cannot be removed stays)
        return held - folder_bytes([f for f in folders if f.exists()])
    finally:
        lock.release()


def make_room(root, cfg: dict, need: int, where: str = "root", *, disk_usage=None,
              keep_spare: bool = False) -> dict:
    """Check a write; if it does not fit, give back the spare checkpoint (unless
    `keep_spare`: the write is the checkpoint that goes over it, and `need` already leaves
    its bytes out), then apply retention (versions for the root, backups for backup_dir,
    and backups too when they lie in the root) and check again.

    Returns {"ok", "problem", "pruned_versions", "pruned_backups", "released_spare_bytes",
    "fix"}: `fix` is the command that frees space when retention alone cannot."""
    problem = check_write(root, cfg, need, where, disk_usage=disk_usage)
    out = {"ok": problem is None, "problem": problem, "pruned_versions": [],
           "pruned_backups": [], "released_spare_bytes": 0, "fix": None}
    if problem is None:
        return out
    p = Paths(root)
    target = Path(_backup_dir(p.root, cfg)) if where == "backups" else p.root
    if not keep_spare and _same_disk(p.root, target):  # (the spare is on the root's disk)
        out["released_spare_bytes"] = release_spare(p.root)
        if out["released_spare_bytes"]:
            out["problem"] = check_write(root, cfg, need, where, disk_usage=disk_usage)
            if out["problem"] is None:
                out["ok"] = True
                return out
    if where == "root":
        import model_versioner
        try:
            out["pruned_versions"] = model_versioner.prune(p.root, yes=True)["deleted"]
        except GuardrailError as exc:
            out["prune_error"] = str(exc)
    rep = disk_report(root, cfg, disk_usage=disk_usage)
    if where == "backups" or rep["backups_inside_root"]:
        import backup_manager
        try:
            r = backup_manager.prune_backups(p.root, yes=True, verify_kept=False)
            out["pruned_backups"] = r.get("deleted", [])
        except GuardrailError as exc:
            out["prune_error"] = str(exc)
        rep = disk_report(root, cfg, disk_usage=disk_usage)
    out["problem"] = check_write(root, cfg, need, where, report=rep)
    out["ok"] = out["problem"] is None
    if not out["ok"]:
        key = rep[where]["budget_key"]
        out["fix"] = ("python3 model_versioner.py prune --keep 1" if where == "root"
                      else "python3 backup_manager.py prune --keep 1")
        import shutil
        try:
            used = shutil.disk_usage(target).used
        except OSError:
            used = 0
        users = space_users(p.root, cfg, target, used)
        out["fix_note"] = (f"a dry run listing what the deepest prune removes; add --yes once the "
                           f"user agrees (tags, current and protected versions stay); or raise "
                           f"{key} in config.json, or free space on that disk. The space is used "
                           f"by: {users}")
        if where == "root":  # versions share their files: a prune may free next to nothing
            import model_versioner
            try:
                doomed = model_versioner.prune_plan(p.root, 1)["delete"]
            except GuardrailError:
                doomed = []
            freed = unique_bytes([p.versions / vid for vid in doomed])
            budget = rep["root"].get("budget_bytes")
            short = need if budget is None or rep["root"].get("used_bytes") is None else \
                rep["root"]["used_bytes"] + need - budget
            if freed < short:
                out["fix"] = f"du -xsh {shlex.quote(str(p.root))}/* | sort -h"
                out["fix_note"] = (f"even pruning to the newest version frees only {freed / 2**20:.1f} "
                                   "MiB (versions share their files with current_model and the "
                                   f"checkpoints): raise {key} in config.json to what the model "
                                   f"needs, or free space on that disk. The space is used by: {users}")
    return out


def space_users(root, cfg: dict, where, used: int) -> str:
    """What takes the space on the disk of `where`, biggest first, as "current_model/ 1.2
    MiB, checkpoints/ ..., outside the root ...": the root's big folders (each inode
    counted once) and the rest of the disk's `used` bytes."""
    p = Paths(root)
    try:
        dev = os.stat(where).st_dev
    except OSError:
        return "(cannot be read)"
    try:
        bdir = _backup_dir(p.root, cfg)
    except (GuardrailError, TypeError, ValueError):
        bdir = p.default_backups
    seen: set = set()
    out = [(name, folder_bytes([folder], seen, dev)) for name, folder in (
        ("current_model/", p.current_model), ("versions/", p.versions),
        ("checkpoints/", p.checkpoints), (".staging/ (the spare checkpoint)", p.staging),
        ("backups (same disk)", bdir), ("done/", p.done), ("processing/", p.processing),
        ("queue/", p.queue))]
    out = [(n, b) for n, b in out if b]
    out.append(("outside the root", max(0, used - sum(b for _, b in out))))
    return ", ".join(f"{name} {n / 2**20:.1f} MiB" for name, n in sorted(out, key=lambda x: -x[1]))


# --------------------------------------------------------------------------- the rate

def unique_bytes(folders) -> int:
    """Bytes on disk (blocks, as usage() counts) deleting `folders` gives back: files whose
    every hard link lies in them (a version's files are shared with other versions,
    current_model, checkpoints)."""
    seen: dict = {}
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                try:
                    st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                links, size, count = seen.get(key, (st.st_nlink, st.st_blocks * 512, 0))
                seen[key] = (links, size, count + 1)
    return sum(size for links, size, count in seen.values() if count >= links)


def note_freed(root, freed: int) -> None:
    """After a prune gave back `freed` bytes of versions: a usage sample that many bytes
    lower, so the report does not keep the old figure (a pause on max_disk_gb said to be
    still over it) until the daemon's next walk."""
    p = Paths(root)
    try:
        doc = read_json(p.root / USAGE_FILE, default=None)
    except GuardrailError:
        return
    samples = doc.get("samples") if isinstance(doc, dict) else None
    last = samples[-1] if isinstance(samples, list) and samples else None
    if not freed or not isinstance(last, dict) or not isinstance(last.get("root_used"), int):
        return
    lower = dict(last, at=utc_now(), t=time.time(), root_used=max(0, last["root_used"] - freed),
                 pruned=freed)  # (no walk: the last one's figures less what the prune freed)
    if isinstance(last.get("versions_used"), int):
        lower["versions_used"] = max(0, last["versions_used"] - freed)
    with contextlib.suppress(OSError):
        atomic_write_json(p.root / USAGE_FILE, {"schema_version": 1,
                                                "samples": (samples + [lower])[-USAGE_SAMPLES:]},
                          sync=False)


def record_usage(root, cfg: dict, used: dict | None = None) -> dict:
    """Append a usage sample (what the daemon calls after each file); keeps the last 64."""
    p = Paths(root)
    u = used or usage(p.root, cfg)
    try:
        doc = read_json(p.root / USAGE_FILE, default=None)
    except GuardrailError:
        doc = None
    samples = doc.get("samples") if isinstance(doc, dict) else None
    samples = [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []
    samples.append({"at": utc_now(), "t": time.time(), "root_used": u["root_used"],
                    "backup_used": u["backup_used"], "versions_used": u.get("versions_used")})
    atomic_write_json(p.root / USAGE_FILE, {"schema_version": 1, "samples": samples[-USAGE_SAMPLES:]},
                      sync=False)  # a hint: a lost sample only blurs the rate
    return u


def recorded_usage(root, cfg: dict) -> dict | None:
    """The daemon's last usage sample in `usage()`'s shape (plus `measured_at`), or None:
    what the state tracker reports, so a status costs the same at 10,000 versions (a walk
    over every version file is the daemon's, once per file)."""
    p = Paths(root)
    try:
        doc = read_json(p.root / USAGE_FILE, default=None)
    except GuardrailError:
        return None
    samples = doc.get("samples") if isinstance(doc, dict) else None
    last = samples[-1] if isinstance(samples, list) and samples else None
    if not isinstance(last, dict) or not all(isinstance(last.get(k), int)
                                             for k in ("root_used", "backup_used")):
        return None
    bdir = _backup_dir(p.root, cfg)
    return {"root_used": last["root_used"], "backup_used": last["backup_used"],
            "versions_used": last.get("versions_used") if isinstance(last.get("versions_used"), int)
            else None, "backup_dir": str(bdir), "measured_at": last.get("at"),
            "backups_inside_root": str(bdir.resolve()).startswith(str(p.root.resolve()) + os.sep)}


def growth_per_day(root) -> dict:
    """{root_used, backup_used: bytes per day} from the samples (first to last), or {}."""
    try:
        doc = read_json(Paths(root).root / USAGE_FILE, default=None)
    except GuardrailError:
        return {}
    samples = [s for s in (doc.get("samples") or []) if isinstance(s, dict)
               and isinstance(s.get("t"), (int, float))] if isinstance(doc, dict) else []
    if len(samples) < 2 or samples[-1]["t"] - samples[0]["t"] < 60:
        return {}
    days = (samples[-1]["t"] - samples[0]["t"]) / 86400
    out = {}
    for key in ("root_used", "backup_used"):
        a, b = samples[0].get(key), samples[-1].get(key)
        if isinstance(a, int) and isinstance(b, int):
            out[key] = (b - a) / days
    return out
