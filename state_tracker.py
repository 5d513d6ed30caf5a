"""What exists, what is wrong, and the one command that fixes it: `.system_state.json`.

The first command an assistant (or a person) runs in every conversation. It reads only
small JSON files, directory listings and file sizes — never model weights, never torch —
and writes one document (`schema_version` 1, described by docs/system_state.schema.json)
with a list of warnings, each with a stable code, a severity and the exact fix command.

    python3 state_tracker.py --check          # readable report; exit 1 if anything is critical
    python3 state_tracker.py --warnings       # only the warnings
    python3 state_tracker.py --json           # the document on stdout
    python3 state_tracker.py                  # refresh .system_state.json and print its path

Exit codes: 0 when no warning is critical, 1 when one is (also for a bare refresh), 2 on
usage errors. Full checksum verification stays in `python3 model_versioner.py verify`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shlex
import stat
import sys
import time
from pathlib import Path

import backup_records
import base_store
import retention
import training_config
import versions_index
from trainroot import (SCRIPTS_DIR, GuardrailError, Paths, add_common_args,
                       atomic_write_json, daemon_liveness, enclosing_root, is_training_root,
                       model_folder, print_json, process_running, read_json, read_lock_holder,
                       require_root, resolve_root, run_cli, same_file, utc_now)

SCHEMA_VERSION = 1
STALL_AFTER_S = 120.0           # a training daemon writes its heartbeat about once a second
PAUSED_LONG_S = 3600.0          # paused for an hour is worth a line in the report
LOCK_HELD_LONG_S = 3600.0       # versions/config locks are held for seconds; backups minutes
TRAINING_LOCKS = ("daemon", "model", "engine")  # held while the daemon runs / one file trains
METRICS_TAIL_BYTES = 64 * 1024  # metrics.jsonl may be a year long: read only its tail
MODEL_SPACE_FACTOR = 4          # next save (1x) + checkpoint weights (1x) + AdamW state (2x)
MEASURE_NOW_FILES = 500         # no usage sample yet: a root this small is measured now
CHECK_VERSIONS = 20             # versions given the cheap check each run (plus tagged ones)
EVAL_RECENT = 10                # versions whose eval loss the document (and the monitor) shows
LIST_LIMIT = 20                 # failed/skipped files listed in full (the count is exact)
SEVERITIES = ("info", "warning", "critical")
MODEL_META = {".manifest.json", "version.json", "backup.json"}
QUEUE_PRIORITIES = ("high", "normal", "low")
WARNING_CODES = (
    "NOT_INITIALIZED", "MODEL_MISSING", "BASE_MISSING", "MODEL_INCOMPLETE", "NO_VERSION", "MODEL_NOT_VERSIONED",
    "VERSION_DAMAGED", "VERSION_GONE", "VERSION_BASE_MISSING", "TAGS_DAMAGED", "CONFIG_MISSING",
    "CONFIG_INVALID",
    "CONFIG_UNAPPROVED", "DAEMON_DEAD",
    "DAEMON_NOT_RUNNING", "DAEMON_STATE_UNREADABLE", "TRAINING_STALLED", "TRAINING_PAUSED",
    "FILE_WARNINGS", "PAUSED_LONG", "TRAINING_ERROR",
    "DISK_LOW", "DISK_BUDGET", "CONFIG_OLD_KEYS", "BACKUP_NONE", "BACKUP_OLD", "BACKUP_UNVERIFIED",
    "BACKUP_SAME_FILESYSTEM", "BACKUP_DIR_UNUSABLE",
    "FILES_FAILED", "LOSS_SPIKE", "LOCK_STALE", "QUALITY_HOLD")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", "~", ".swp", ".record.json", ".error.txt",
                    ".report.json")


# --------------------------------------------------------------------------- small helpers

def _cmd(root: Path, script_and_args: str) -> str:
    """`python3 SCRIPT ARGS`, with `--root R` when R is not the scripts' own folder."""
    text = f"python3 {script_and_args}"
    if Path(root) != SCRIPTS_DIR:
        text += f" --root {shlex.quote(str(root))}"
    return text


def _read(path: Path, problems: list | None = None):
    """A small JSON document or None; a corrupt one is noted in `problems`, never raised."""
    try:
        return read_json(path, default=None)  # a FIFO, a folder, a file as a folder: an error
    except GuardrailError as exc:
        if problems is not None:
            problems.append(str(exc))
        return None


def _dict(x) -> dict:
    """`x` if it is a JSON object, else {}: every file read here may hold anything."""
    return x if isinstance(x, dict) else {}


def _int(x):
    """An integer field, or None (JSON `true` is not a pid or a step)."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _str(x):
    return x if isinstance(x, str) else None


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _data_names(path: Path) -> list[str]:
    """Data files in a lifecycle folder: not hidden, not temporary, not a sidecar, not a
    folder (a link or a pipe counts: the daemon takes it, to failed/ with its reason)."""
    try:
        with os.scandir(path) as it:
            names = [e.name for e in it if not e.is_dir(follow_symlinks=False)
                     and not e.name.startswith(".")
                     and not e.name.endswith(IGNORED_SUFFIXES) and e.name != "4913"]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names)


def _round(x, nd=3):
    return None if x is None else round(x, nd)


DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def disk_usage(path) -> DiskUsage:
    """`shutil.disk_usage` without importing shutil (it pulls in bz2 and lzma at start-up)."""
    path = Path(path)
    while not path.exists() and path != path.parent:  # a root not made yet: its nearest parent
        path = path.parent
    st = os.statvfs(path)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    return DiskUsage(total, (st.f_blocks - st.f_bfree) * st.f_frsize, free)


age_seconds = backup_records.quick_age_seconds


def _finite(x):
    """A loss for the JSON document: rounded, and None for NaN/inf (JSON has no NaN)."""
    return round(x, 5) if x == x and abs(x) != float("inf") else None


def _json_safe(obj):
    """A copy with NaN/inf replaced by None: strict JSON readers (browsers) reject them."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _arg(root: Path, rel: str) -> str:
    """A path inside the root as a command argument: relative in the default root, else absolute."""
    return shlex.quote(rel if Path(root) == SCRIPTS_DIR else str(Path(root) / rel))


def _warn(warnings: list, code: str, severity: str, message: str, fix: str, note: str = "") -> None:
    """One warning: `fix` is a shell command line; `note` what to know before running it."""
    if code not in WARNING_CODES or severity not in SEVERITIES:
        raise ValueError(f"unknown warning code or severity: {code} {severity}")
    warnings.append({"code": code, "severity": severity, "message": message, "fix": fix,
                     "note": note})


# --------------------------------------------------------------------------- sections

def _config_section(root: Path, w: list) -> tuple[dict, dict]:
    """(section, effective config): validity, approval and changed locked parameters."""
    p = Paths(root)
    sec = {"path": str(p.config), "exists": p.config.exists(), "valid": False, "errors": [],
           "approved": False, "approved_at": None, "locked": [], "changes": []}
    cfg = training_config.default_config()
    if not sec["exists"]:
        return sec, cfg
    try:
        cfg = training_config.load_config(root)
        sec["valid"] = True
    except training_config.ConfigError as exc:
        sec["errors"] = exc.errors
    except GuardrailError as exc:
        sec["errors"] = [str(exc)]
    if not sec["valid"]:
        _warn(w, "CONFIG_INVALID", "critical",
              f"config.json is invalid: {'; '.join(sec['errors'])}",
              _cmd(root, "state_tracker.py --warnings"),
              f"Edit the keys named in the message in {p.config} first; this command re-checks.")
        return sec, training_config.default_config()
    template = cfg.get("chat_template")
    if isinstance(template, str) and template.endswith(".jinja"):  # read at every file's start
        path = Path(template) if Path(template).is_absolute() else Path(root) / template
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            sec["valid"] = False
            sec["errors"] = [f"chat_template {template!r} cannot be read ({exc.strerror}): {path}"]
            _warn(w, "CONFIG_INVALID", "critical",
                  f"config.json is invalid: {sec['errors'][0]}; the daemon stops before the next "
                  "file", _cmd(root, "state_tracker.py --warnings"),
                  f"Fix the path in {p.config}'s `chat_template` (relative to the root), or set "
                  "it to null to use the model's own template; this command re-checks.")
    note = retention.old_keys_note(cfg)
    if note:
        _warn(w, "CONFIG_OLD_KEYS", "info",
              f"config.json uses the old retention keys: {note}",
              _cmd(root, "model_versioner.py prune"),
              "Shows the policy in effect (a dry run). To say it the new way, replace them with "
              "\"retention\": {\"versions\": {\"keep_last\": N, ...}, \"backups\": {...}} "
              "(docs/config.md, Retention).")
    sec["locked"] = training_config.locked_names(cfg)  # config `locked` + the adapter keys
    try:
        approval = training_config.read_approval(root)
        changes = training_config.changed_locked(root, cfg)
    except GuardrailError as exc:  # a corrupt .config.lock approves nothing
        approval, changes = None, [training_config.Change(n, None, cfg.get(n)) for n in sec["locked"]]
        sec["errors"].append(str(exc))
    sec["approved_at"] = (approval or {}).get("approved_at")
    sec["changes"] = [{"name": c.name, "old": c.old, "new": c.new,
                       "text": training_config.format_change(*c)} for c in changes]
    sec["approved"] = not changes
    if changes and approval is None:  # no approved values to compare with: name the file,
        # and what the newest version trained with (what an approval would change from)
        lock = Paths(root).config_lock
        state = f"damaged ({sec['errors'][-1]})" if sec["errors"] else "missing"
        trained, vid = _newest_trained_config(root)
        differ = [f"{n}: {json.dumps(trained[n])} -> {json.dumps(cfg.get(n))}" for n in sec["locked"]
                  if n in trained and json.dumps(trained[n]) != json.dumps(cfg.get(n))]
        against = (f"; against what {vid} trained with: " + (", ".join(differ) if differ else
                                                             "no locked value differs")) if vid else ""
        _warn(w, "CONFIG_UNAPPROVED", "critical",
              f"{lock} is {state}: no config value is approved, so the daemon will not train"
              + against, _cmd(root, "training_controller.py approve-config --yes"),
              "Only with the user's approval: it approves the locked values config.json holds now.")
    elif changes:
        listed = ", ".join(c["text"] for c in sec["changes"])
        _warn(w, "CONFIG_UNAPPROVED", "critical",
              f"locked config parameters changed without approval ({listed}); the daemon "
              "will not train until they are approved or reverted",
              _cmd(root, "training_controller.py approve-config --yes"),
              "Only with the user's approval. To revert instead, " + " and ".join(
                  (["put the old values back in config.json" + (
                      " (a newly locked one: take it out of `locked`)"
                      if any(c.newly for c in changes) else "")]
                   if any(c.name != "eval_set" for c in changes) else [])
                  + (["put the eval/ files back as they were approved"]
                     if any(c.name == "eval_set" for c in changes) else []))
              + "; either way the warning clears.")
    return sec, cfg


def _newest_trained_config(root: Path) -> tuple[dict, str | None]:
    """(config, id) the newest version recorded in its version.json, or ({}, None)."""
    try:
        last = versions_index.VersionsIndex(root).summary(1)["last"]
    except (GuardrailError, OSError):
        return {}, None
    vid = last[-1] if last else None
    cfg = _dict(_dict(_read(Paths(root).versions / vid / "version.json")).get("config")) if vid else {}
    return cfg, vid if cfg else None


_IN_PLACE = "written in place after it was versioned"  # (model_versioner.WRITTEN_IN_PLACE)


def _model_check(folder: Path, manifest: dict | None) -> tuple[list[str], int, int]:
    """Cheap completeness check of a model folder: (problems, size_bytes, file_count).

    With a manifest: every listed file present with its recorded size. Always: a
    config.json and weights (every shard an index names). One stat per file, on plain
    strings (pathlib costs more than the stat here).
    """
    problems, size, present = [], 0, set()
    base = str(folder) + os.sep
    files = (manifest or {}).get("files")
    if isinstance(files, dict):
        listed = files.items()
    else:
        problems.append(".manifest.json: missing or unreadable")
        listed = ((n, None) for n in _listdir(folder) if not n.startswith("."))
    for rel, info in listed:
        try:
            st = os.stat(base + rel)
        except OSError:
            if info is not None:
                problems.append(f"{rel}: missing")
            continue
        want = info.get("size") if isinstance(info, dict) else None
        mtime = info.get("mtime_ns") if isinstance(info, dict) else None
        if want is not None and st.st_size != want:
            problems.append(f"{rel}: size {st.st_size}, manifest says {want}")
        elif _int(mtime) is not None and st.st_mtime_ns != mtime:  # versions record it
            problems.append(f"{rel}: {_IN_PLACE}")
        size += st.st_size
        present.add(rel)
    if "config.json" not in present and "adapter_config.json" in present:  # adapter mode
        if not present & {"adapter_model.safetensors", "adapter_model.bin"}:
            problems.append("adapter_model.safetensors: missing")
    elif "config.json" not in present:
        problems.append("config.json: missing")
    if "config.json" not in present and "adapter_config.json" in present:
        pass  # the base (ROOT/base/<id>) holds the model's weights: checked by the caller
    elif "model.safetensors.index.json" in present:
        weight_map = _dict(_dict(_read(folder / "model.safetensors.index.json")).get("weight_map"))
        if not weight_map:
            problems.append("model.safetensors.index.json: no weight_map")
        for shard in sorted({v for v in weight_map.values() if isinstance(v, str)}):
            if shard not in present and not os.path.exists(base + shard):
                problems.append(f"{shard}: missing (named by model.safetensors.index.json)")
    elif not present & {"model.safetensors", "pytorch_model.bin"}:
        problems.append("model.safetensors: missing")
    return sorted(set(problems)), size, len(present)


def _manifest_key(files) -> str | None:
    if not isinstance(files, dict) or not files:
        return None
    return json.dumps({k: _dict(v).get("sha256") for k, v in files.items()}, sort_keys=True)


def _versions_section(root: Path, w: list, measured: dict | None = None) -> dict:
    """versions/: count, latest, tags, unique bytes; the cheap check on the newest and tagged.

    Reading every version.json (or stat-ing every file) would make the tracker O(versions)
    after a year of snapshots; the newest CHECK_VERSIONS and the tagged ones are checked,
    the rest only counted (versions_index: the folders' rows, kept in step with versions/
    by its signature). Their size is the last disk
    measurement's (`measured`: the daemon's sample, or a small root measured now).
    """
    p = Paths(root)
    sec = {"count": 0, "latest": None, "latest_created_at": None, "oldest": None,
           "oldest_created_at": None, "ids": [], "tagged": {},
           "checked": [], "total_size_bytes": 0, "problems": [], "_records": {}}
    tag_problems: list = []
    tags = _read(p.versions / "tags.json", tag_problems)
    if isinstance(tags, dict):
        sec["tagged"] = {str(k): v for k, v in tags.items() if isinstance(v, str)}
    if tag_problems or tags is not None and (not isinstance(tags, dict) or len(sec["tagged"]) < len(tags)):
        sec["_tags_problem"] = tag_problems[0] if tag_problems else "not {name: version id}"
    # count, ends and the newest ids from the versions index (one stat of versions/ while
    # nothing changed; a listing of 10,000 names was ~25 ms of every report and poll)
    summary = {"count": 0, "oldest": None, "last": []}
    try:  # (no versions/: not a root yet, and nothing written into a folder that is not one)
        if p.versions.is_dir():
            summary = versions_index.VersionsIndex(root).summary(CHECK_VERSIONS)
    except OSError as exc:  # versions/ unreadable: the report says so instead of failing
        sec["problems"].append({"id": None, "problems": [f"cannot list {p.versions}: {exc}"]})
    ids = summary["last"]
    tagged = [v for v in sec["tagged"].values() if versions_index.version_number(v) is not None
              and v not in ids and (p.versions / v).is_dir()]
    for vid in sorted(set(tagged), key=versions_index.version_number) + ids:
        folder = p.versions / vid
        sec["checked"].append(vid)
        read_problems: list = []
        rec = _read(folder / "version.json", read_problems)
        if not isinstance(rec, dict):
            sec["problems"].append({"id": vid, "problems": read_problems or ["version.json: missing"]})
            continue
        manifest = rec.get("manifest")
        if not isinstance(manifest, dict):
            manifest = _dict(_read(folder / ".manifest.json")).get("files")
        problems, _, _ = _model_check(folder, {"files": manifest} if isinstance(manifest, dict)
                                      else None)
        if problems:
            sec["problems"].append({"id": vid, "problems": problems})
        sec["_records"][vid] = {"created_at": _str(rec.get("created_at")), "reason": rec.get("reason"),
                                "parent": _str(rec.get("parent")),
                                "global_step": _int(rec.get("global_step")),
                                "key": _manifest_key(manifest)}
    # a summary, not every id (153 KB at 10,000 versions, rebuilt at each monitor poll)
    sec["ids"], sec["count"] = ids, summary["count"]
    sec["total_size_bytes"] = (measured or {}).get("versions_used")
    sec["oldest"] = summary["oldest"]
    sec["oldest_created_at"] = _str(_dict(_read(p.versions / sec["oldest"] / "version.json")).get(
        "created_at")) if sec["oldest"] else None
    if ids:
        sec["latest"] = ids[-1]
        sec["latest_created_at"] = sec["_records"].get(ids[-1], {}).get("created_at")
    return sec


def _damaged_versions(root: Path, versions: dict, model: dict, w: list) -> None:
    """VERSION_DAMAGED for each checked version that fails the cheap check; one written in
    place shares the written file with current_model when current_model is that version."""
    for bad in versions["problems"]:
        vid = bad["id"]
        written = [x[:-len(_IN_PLACE) - 2] for x in bad["problems"] if x.endswith(f": {_IN_PLACE}")]
        in_place = bool(written)
        note = ("Lists every bad file. Versions are immutable: if you need this one, get it back "
                f"from a backup (`{_cmd(root, 'backup_manager.py list')}`).")
        message = f"version {vid} fails the cheap check: {'; '.join(bad['problems'][:3])}"
        if in_place:
            damaged = {b["id"] for b in versions["problems"]}
            sound = next((v for v in _lineage_of(root, vid)[1:] if v not in damaged
                          and (Paths(root).versions / v).is_dir()
                          and _sound_version(root, v, versions)), None)  # (never a pruned one)
            back = (f"`{_cmd(root, f'model_versioner.py restore {sound}')}` (the newest sound "
                    f"version it was trained from; then train the files since again: "
                    f"`{_cmd(root, f'model_versioner.py lineage {vid}')}`)" if sound else
                    f"a backup of another version (`{_cmd(root, 'backup_manager.py list')}`)")
            held = next((b["id"] for b in reversed(_safe_backups(root))
                         if b.get("status") == "verified" and b.get("version") == vid), None)
            # the same files only where they are the same inodes: a copy restored from a
            # backup matches the version's manifest and holds its own, sound bytes
            shared = model.get("matches_version") == vid and any(
                same_file(Paths(root).versions / vid / rel, Paths(root).current_model / rel)
                for rel in written)
            if shared:
                message += " (current_model/ is this version: the same files, hard-linked)"
            note = ("Recomputes every checksum. If it names bad files, the bytes changed"
                    + (" in current_model/ too" if shared else "")
                    + (f": put its bytes back from its backup {held} (`"
                       f"{_cmd(root, f'backup_manager.py repair {vid}')}`) or restore "
                       if held else f": no backup holds {vid}; restore ")
                    + f"{back}. If it says OK, only the time stamp moved (e.g. `touch`) and the "
                    "content is as versioned.")
        _warn(w, "VERSION_DAMAGED", "warning", message,
              _cmd(root, "model_versioner.py verify " + vid), note)
    if versions.get("_tags_problem"):
        path = Paths(root).versions / "tags.json"
        _warn(w, "TAGS_DAMAGED", "warning", f"versions/tags.json is damaged "
              f"({versions['_tags_problem']}): which versions are tagged cannot be known, so "
              "prune and the daemon's retention delete nothing until it is fixed",
              f"python3 -m json.tool {shlex.quote(str(path))}",
              'Shows where the JSON breaks. Fix it by hand (the form is {"name": "v012"}), or '
              "move it aside and tag again (`" + _cmd(root, "model_versioner.py tag V NAME")
              + "`); versions are otherwise intact (backups do not hold tags).")


def _gone_versions(root: Path, versions: dict, model: dict, w: list) -> bool:
    """VERSION_GONE for a version whose folder was deleted by hand (`rm -rf versions/v031`):
    the newest one given (versions/.last_id, written once each new one is in place: prune
    never deletes the latest) or a tagged one (prune never deletes those either), with no
    record in versions/.pruned/. (Ids between may never have been given: not judged.) True
    when current_model was the newest one (then it is what current_model holds, not
    training since: a snapshot versions it again)."""
    vp = Paths(root).versions
    last = _dict(_read(vp / ".last_id")).get("last")
    n = versions_index.version_number(last) if isinstance(last, str) else None
    gone: dict = {f"v{n:03d}": []} if n and n > (versions_index.version_number(
        versions.get("latest") or "") or 0) else {}
    for name, vid in sorted(versions.get("tagged", {}).items()):
        if versions_index.version_number(vid) and not (vp / vid).is_dir():
            gone.setdefault(vid, []).append(name)
    gone = {v: tags for v, tags in gone.items()
            if not (vp / v).is_dir() and not (vp / ".pruned" / f"{v}.json").exists()}
    if not gone:
        return False
    backups = [b for b in _safe_backups(root) if b.get("status") == "verified"]
    newest = max(gone, key=versions_index.version_number)
    current = newest if n and versions_index.version_number(newest) == n and model["complete"] \
        and model["matches_version"] is None else None
    for vid in sorted(gone, key=versions_index.version_number):
        held = next((b["id"] for b in reversed(backups) if b.get("version") == vid), None)
        restore = _cmd(root, f"backup_manager.py restore {held}")
        bytes_at = (f"a verified backup holds its bytes: `{restore}` makes them current_model"
                    if held else f"no backup holds {vid}")
        why = (" (tagged " + ", ".join(gone[vid]) + ")" if gone[vid] else "")
        message = (f"version {vid}{why} is gone: its folder was deleted by hand (prune keeps "
                   "the latest and tagged versions, and leaves a record of each one it deletes)")
        if vid == current:
            _warn(w, "VERSION_GONE", "warning",
                  message + "; current_model still holds it, unversioned",
                  _cmd(root, "model_versioner.py snapshot --note versioned-again"),
                  f"Versions current_model again (a new id; {vid} stays gone). Lineage from it "
                  f"stops where {vid} was.")
        elif gone[vid]:
            _warn(w, "VERSION_GONE", "warning", message,
                  _cmd(root, f"model_versioner.py untag {gone[vid][0]}"),
                  f"Clears the tag (each one naming it). {bytes_at[0].upper() + bytes_at[1:]}.")
        else:
            _warn(w, "VERSION_GONE", "warning", message, _cmd(root, "model_versioner.py list"),
                  f"Lists the versions there are; {bytes_at}.")
    return current is not None


def _restore_what(root: Path, vid: str, latest: str) -> tuple[str, str]:
    """(fix, what it brings back) for putting version `vid` back as current_model."""
    if vid == latest:
        return _cmd(root, "model_versioner.py restore latest"), f"the latest version ({latest})"
    return (_cmd(root, f"model_versioner.py restore {vid}"),
            f"{vid}, the version current_model was (the newer {latest} is what a rollback or "
            "restore replaced; `restore latest` would bring that back instead)")


def _restore_undamaged(root: Path, versions: dict, vid: str, latest: str) -> tuple[str, str, str]:
    """(fix, what it brings back, why not `vid`) for putting back version `vid`. When the
    cheap check found `vid` damaged (a hard-linked file written to is damaged in every
    version sharing it): of the newest sound version in its own lineage (its parent, the
    parent's parent, ...: never a line a rollback or restore left) and the newest verified
    backup of one of those, the one with more training. `why` is "" when `vid` is sound."""
    damaged = {bad["id"] for bad in versions["problems"]}
    if vid not in damaged:
        return (*_restore_what(root, vid, latest), "")
    why = f"{vid}, the version it was, is damaged too (VERSION_DAMAGED)"
    line = _lineage_of(root, vid)
    sound = next((v for v in line[1:] if v not in damaged and _sound_version(root, v, versions)), None)
    try:
        backup = next((b for b in reversed(backup_records.summaries(root))
                       if b.get("status") == "verified" and b.get("version") in line), None)
    except (GuardrailError, OSError):
        backup = None
    step = _int(_dict(_read(Paths(root).versions / sound / "version.json")).get("global_step")) \
        if sound else None
    if backup and (step is None or (_int(backup.get("global_step")) or 0) > step):
        return (_cmd(root, f"backup_manager.py restore {backup['id']}"),
                f"the newest verified backup of its lineage, {backup['id']} (of {backup.get('version')}, "
                f"step {backup.get('global_step')}; then "
                f"`{_cmd(root, 'model_versioner.py snapshot --note restored')}`)", why)
    if sound:
        return (_cmd(root, f"model_versioner.py restore {sound}"), f"{sound}, the newest version "
                f"it was trained from that the cheap check finds sound (the files trained after "
                f"it are undone: `{_cmd(root, f'model_versioner.py lineage {vid}')}` lists them)", why)
    return (_cmd(root, "backup_manager.py list"), "a copy from a backup, if there is one", why
            + ", and so is every version it was trained from")


def _lineage_of(root: Path, vid: str, limit: int = 200) -> list[str]:
    """`vid`, its parent, the parent's parent, ... (version.json `parent`, through the records
    pruned versions leave in versions/.pruned/), newest first."""
    line, seen = [vid], {vid}
    versions = Paths(root).versions
    while len(line) < limit:
        rec = _dict(_read(versions / line[-1] / "version.json")) or \
            _dict(_read(versions / ".pruned" / f"{line[-1]}.json"))
        parent = _str(rec.get("parent"))
        if not parent or parent in seen or not versions_index.version_number(parent):
            break
        line.append(parent)
        seen.add(parent)
    return line


def _sound_version(root: Path, vid: str, versions: dict) -> bool:
    """The cheap check of one version (done already for the checked ones)."""
    if vid in versions["checked"]:
        return True  # (damaged ones are in versions["problems"], excluded by the caller)
    folder = Paths(root).versions / vid
    rec = _dict(_read(folder / "version.json"))
    manifest = rec.get("manifest")
    if not isinstance(manifest, dict):
        manifest = _dict(_read(folder / ".manifest.json")).get("files")
    if not rec or not isinstance(manifest, dict):
        return False
    problems, _, _ = _model_check(folder, {"files": manifest})
    return not problems


def _versions_without_base(root: Path, current_base, w: list, cfg: dict) -> None:
    """VERSION_BASE_MISSING for adapter versions whose base folder is gone (current_model's
    own base: BASE_MISSING): verify --all calls them BAD, and a restore of one fails."""
    try:
        bases = versions_index.VersionsIndex(root).bases()
    except (OSError, GuardrailError):
        return
    for base, ids in sorted(bases.items()):
        if base == current_base or (base_store.base_dir(root, base) / "config.json").is_file():
            continue
        held = any(isinstance(b.get("base"), dict) and b["base"].get("id") == base
                   for b in _safe_backups(root, cfg))
        listed = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        _warn(w, "VERSION_BASE_MISSING", "warning",
              f"{'version' if len(ids) == 1 else 'versions'} {listed} "
              f"{'is an adapter' if len(ids) == 1 else 'are adapters'} on base {base}, which "
              "is missing: restoring or verifying them fails",
              _cmd(root, f"backup_manager.py restore-base {base}") if held
              else _cmd(root, "model_versioner.py prune"),
              "Brings the base back from the newest backup that holds a copy of it." if held else
              "No backup holds that base: those versions cannot come back. Nothing else needs "
              "them; retention prunes them in time (the dry run shows when).")


def _safe_backups(root: Path, cfg: dict | None = None) -> list:
    """backup_records.summaries, or [] where backup_dir cannot be read (the backups
    section says why)."""
    try:
        return backup_records.summaries(root, cfg)
    except (OSError, GuardrailError):
        return []


def _current_model_section(root: Path, versions: dict, w: list) -> dict:
    p = Paths(root)
    folder = p.current_model
    sec = {"path": str(folder), "exists": folder.is_dir(), "complete": False, "problems": [],
           "size_bytes": 0, "file_count": 0, "global_step": None, "tokens_seen": None,
           "matches_version": None, "kind": None, "base": None}
    latest = versions.get("latest")
    was = versions_index.last_published(root, versions.get("latest"))
    if not sec["exists"]:
        in_place = "is not a folder" if os.path.lexists(folder) else "does not exist"
        if latest:
            restore, what, why = _restore_undamaged(root, versions, was, latest)
            _warn(w, "MODEL_MISSING", "critical",
                  f"current_model/ {in_place}; it was {was} (the latest version is {latest})"
                  + (f"; {why}" if why else ""), restore, f"Brings back {what} in under a second.")
        elif p.config.exists():  # a root with a config but nothing to train: not OK either
            fix = _cmd(root, "training_daemon.py init")
            if os.path.lexists(folder):  # init never replaces it: keep it aside first
                fix = (f"mv {_arg(root, 'current_model')} {_arg(root, 'current_model.moved-aside')}"
                       f" && {fix}")
            steps = []
            with contextlib.suppress(OSError):
                for entry in os.scandir(p.checkpoints):
                    step = _dict(_read(Path(entry.path) / "meta.json")).get("global_step")
                    if isinstance(step, int) and not isinstance(step, bool):
                        steps.append((step, entry.name))
            kept = (f" checkpoints/{max(steps)[1]} holds the weights trained to step "
                    f"{max(steps)[0]} (model.safetensors: the last copy of the model trained "
                    "here): init moves checkpoints/ into .attic/ untouched, out of the new "
                    "model's way." if steps else "")
            _warn(w, "MODEL_MISSING", "critical",
                  f"current_model/ {in_place} and there is no version to restore it from",
                  fix, "init builds the model config.json names (base_model) and its first "
                  "version; for another base add `--base PATH`. Or restore a backup: "
                  f"`{_cmd(root, 'backup_manager.py list')}`." + kept)
        return sec
    manifest = _read(folder / ".manifest.json", sec["problems"])
    problems, sec["size_bytes"], sec["file_count"] = _model_check(
        folder, manifest if isinstance(manifest, dict) else None)
    sec["problems"] += problems
    sec["kind"] = "adapter" if base_store.is_adapter_folder(folder) else "full"
    base_only = False  # only the base is bad: BASE_MISSING says it (restoring a version fails too)
    if sec["kind"] == "adapter":  # adapter mode: the model is the base + this adapter
        sec["base"] = base_store.adapter_base(folder)
        base_problems = (base_store.check_base(root, sec["base"], hash_touched=False)
                         if sec["base"] else ["adapter names no base"])
        if base_problems:
            base_only = not sec["problems"]
            sec["problems"] += base_problems
            fix = (_cmd(root, f"backup_manager.py restore-base {sec['base']}") if sec["base"]
                   else _cmd(root, "model_versioner.py list"))
            _warn(w, "BASE_MISSING", "critical",
                  f"current_model/ is an adapter whose base {sec['base']} is missing or damaged: "
                  f"{'; '.join(base_problems[:3])}", fix,
                  "Brings the base back from the newest backup that holds a copy of it; "
                  "without one, restore a full version (`model_versioner.py list` shows kinds).")
    sec["complete"] = not sec["problems"]
    state = _read(folder / "trainer_state.json") or {}
    if isinstance(state, dict):
        sec["global_step"], sec["tokens_seen"] = _int(state.get("global_step")), _int(state.get("tokens_seen"))
    if isinstance(manifest, dict):
        if sec["global_step"] is None:
            sec["global_step"] = _int(manifest.get("global_step"))
        if sec["tokens_seen"] is None:
            sec["tokens_seen"] = _int(manifest.get("tokens_seen"))
        key = _manifest_key(manifest.get("files"))
        for vid in reversed(versions["checked"]):
            if key and versions["_records"].get(vid, {}).get("key") == key:
                sec["matches_version"] = vid
                break
        else:  # an older version: a snapshot hard-links the manifest, so its inode tells
            try:
                st_m = os.stat(folder / ".manifest.json")
                # a manifest with one link is shared with no version: no scan of 10,000
                ino = st_m.st_ino if st_m.st_nlink > 1 else None
            except OSError:
                ino = None  # replaced while we looked: the next run will tell
            # the version it was last published as first (a rollback or restore), then the
            # versions indexed with this manifest (each checked below: the index is a cache)
            try:
                candidates = versions_index.VersionsIndex(root).with_manifest(ino) if ino else []
            except OSError:
                candidates = []  # versions/ unreadable: said in the versions section
            for vid in ([was, *candidates] if ino else []):
                if not vid or vid in versions["_records"]:
                    continue
                try:
                    if os.stat(os.path.join(p.versions, vid, ".manifest.json")).st_ino == ino:
                        sec["matches_version"] = vid
                        break
                except OSError:
                    continue  # a version without a manifest cannot be current_model's
    if not sec["complete"] and not base_only:
        fix, what, why = _restore_undamaged(root, versions, sec["matches_version"] or was, latest) \
            if latest else (None, "", "")
        note = f"Puts back {what}; the damaged folder is kept aside first."
        if not latest:
            fix, note = (_cmd(root, "backup_manager.py list"),
                         f"There is no version: restore a backup with `{_cmd(root, 'backup_manager.py restore ID')}`.")
        _warn(w, "MODEL_INCOMPLETE", "critical",
              f"current_model/ is incomplete: {'; '.join(sec['problems'][:3])}"
              + (f"; {why}" if why else ""), fix, note)
    return sec


def _daemon_and_training(root: Path, w: list) -> tuple[dict, dict]:
    """The daemon, checked rather than trusted: its lock, its pid, its heartbeat."""
    p = Paths(root)
    problems: list = []
    state = _read(p.daemon_state, problems)
    if not isinstance(state, dict):
        if state is not None:
            problems.append(f"{p.daemon_state}: expected a JSON object")
        state = {}
    # Every field typed here, once: the file may have been hand-edited or half-written by
    # an older version, and nothing below (nor the schema) may see a wrong type.
    if state:
        state = {**state, "pid": _int(state.get("pid")), "current_file": state.get("current_file")
                 if isinstance(state.get("current_file"), dict) else None,
                 **{k: _str(state.get(k)) for k in ("state", "heartbeat", "started_at",
                                                     "paused_since", "paused_reason")}}
        if state.get("last_error") is not None and not isinstance(state["last_error"], str):
            state["last_error"] = json.dumps(state["last_error"], default=str)
    live = daemon_liveness(root, state)  # the one definition, shared with the controller
    alive, pid, holder, beat_age = live["alive"], live["pid"], live["holder"], live["heartbeat_age"]
    reported = state.get("state")
    daemon = {"alive": alive, "pid": pid, "last_pid": state.get("pid"),
              "started_at": state.get("started_at"), "lock_holder": holder,
              "state_file": str(p.daemon_state), "state_file_problems": problems}
    processing = _data_names(p.processing)
    if alive:  # a state file another pid wrote says nothing of this daemon yet
        current = reported if state.get("pid") == pid and reported in (
            "idle", "training", "paused", "stopping", "stopped") else "idle"
    else:
        current = live["verdict"]
    training = {"state": current, "reported_state": reported,
                "current_file": state.get("current_file"),
                "processing_file": processing[0] if processing else None,
                "progress": state.get("progress") if isinstance(state.get("progress"), dict) else None,
                "heartbeat": state.get("heartbeat"), "heartbeat_age_s": _round(beat_age, 1),
                "stalled": bool(alive and current in ("training", "stopping")
                                and (beat_age is None or beat_age > STALL_AFTER_S)),
                "paused_since": state.get("paused_since"),
                "paused_reason": state.get("paused_reason"),
                "paused_for_s": None, "last_error": state.get("last_error"),
                "file_attempts": None, "file_error": None,
                "memory_kept": _memory_kept(state) if alive and state.get("pid") == pid else None}
    gate_held = False  # the quality gate holds it: QUALITY_HOLD says what to do (_eval_section)
    hold_reason = None  # a loss spike or a failed save holds it: a start pauses on it again
    if processing:  # a crashed try (a rank that died, an engine error) is in the file's record
        rec = _read(p.processing / f"{processing[0]}.record.json")
        if isinstance(rec, dict):
            gate_held = _dict(rec.get("hold")).get("kind") == "gate"
            hold_reason = _str(_dict(rec.get("hold")).get("reason")) if not gate_held else None
            training["file_attempts"] = rec.get("attempts") if isinstance(rec.get("attempts"), int) else None
            training["file_error"] = rec.get("last_error") if isinstance(rec.get("last_error"), str) else None
    if current == "paused":
        training["paused_for_s"] = _round(age_seconds(state.get("paused_since")), 1)
    start = _cmd(root, "training_daemon.py run")
    if not alive and not gate_held and processing and reported == "stopped" \
            and state.get("ended_by") in ("request", "signal"):
        # stopped on purpose (`stop`, SIGTERM) part-way: not dead, and not for an assistant
        # to start again on its own
        _warn(w, "DAEMON_NOT_RUNNING", "info",
              f"the daemon was stopped (last pid {state.get('pid')}) with processing/"
              f"{processing[0]} part-way; " + (
                  f"it is held ({hold_reason}): `{_cmd(root, 'training_controller.py resume')}` "
                  "clears the hold, then it resumes from its checkpoint when the daemon starts"
                  if hold_reason else "it resumes from its checkpoint when the daemon starts"),
              start, "Start it when the user wants training to go on: it was stopped on purpose.")
    elif not alive and not gate_held and processing and reported == "stopped" \
            and state.get("ended_by") == "error" and training["last_error"]:
        # ended on an error with a file part-way (the engine refused to resume it: a setting
        # changed under it, a LoRA shape): starting it again fails the same way until the
        # error's own fix is done
        _warn(w, "DAEMON_DEAD", "critical",
              f"the daemon stopped on an error (last pid {state.get('pid')}) while processing/"
              f"{processing[0]} waits part-way: {training['last_error']}", start,
              "Do what the error names first; this then starts it again (the same error "
              f"otherwise). `tail -n 50 {shlex.quote(str(p.logs / 'daemon.log'))}` shows the whole story.")
    elif not alive and not gate_held and (processing or reported in ("training", "stopping", "paused")):
        waits = (f" while processing/{processing[0]} waits half-trained" if processing else
                 "; no file waits half-trained (processing/ is empty): it died between files")
        _warn(w, "DAEMON_DEAD", "critical",
              f"the daemon is not running (last pid {state.get('pid')}, state said "
              f"{reported or 'nothing'}){waits}",
              start, ("Resumes the file from its last checkpoint." if processing else
                      "Trains what waits in the queue.") + " Installed as a service: "
              "`systemctl restart training-guardrails` instead.")
    elif not alive and not gate_held and reported == "idle":
        # killed (kill -9, the OOM killer, a power cut) while it waited for files: it never
        # said it stopped, so nothing new is trained until it is started again
        _warn(w, "DAEMON_DEAD", "critical",
              f"the daemon is not running (last pid {state.get('pid')}, state said idle): it "
              "died while it waited for files, without stopping", start,
              "Trains what waits in the queue and what arrives in inbox/. Installed as a "
              "service: `systemctl restart training-guardrails` instead.")
    elif not alive and not processing and reported == "stopped" and state.get("ended_by") == "error":
        # ended on an error between files (pre-flight with --once, a broken config at start):
        # not a stop on purpose, and starting it again fails the same way until it is fixed
        _warn(w, "DAEMON_DEAD", "critical",
              f"the daemon stopped on an error (last pid {state.get('pid')}): "
              f"{training['last_error'] or 'see logs/daemon.log'}", start,
              "Do what the error names first; this then starts it again (the same error "
              f"otherwise). `tail -n 50 {shlex.quote(str(p.logs / 'daemon.log'))}` shows the whole story.")
    error = training["file_error"] or (training["last_error"] if processing else None)
    said = any(x["code"] == "DAEMON_DEAD" and error and error in x["message"] for x in w)
    if error and current != "paused" and not gate_held and not said:  # a pause says its own reason
        # (TRAINING_PAUSED), a hold its decision (QUALITY_HOLD): neither is retried
        tries = (f" ({training['file_attempts']} failed tr{'y' if training['file_attempts'] == 1 else 'ies'})"
                 if training["file_attempts"] else "")
        log = p.logs / ("engine.log" if (p.logs / "engine.log").exists() else "daemon.log")
        _warn(w, "TRAINING_ERROR", "warning",
              f"training processing/{processing[0]} failed{tries}: {error}",
              f"tail -n 50 {shlex.quote(str(log))}",
              "The file stays in processing/ and resumes from its last checkpoint: a running "
              "daemon retries it by itself (then failed/ after max_attempts); a stopped one "
              f"at its next start (`{start}`). When the error names a fix, do that first.")
    if training["stalled"]:
        _warn(w, "TRAINING_STALLED", "warning",
              f"the daemon (pid {pid}) says {current} but its heartbeat is "
              f"{'missing' if beat_age is None else f'{beat_age:.0f} s old'}",
              f"{_cmd(root, 'training_controller.py stop --wait 300')} && {start}",
              f"If the stop times out: `kill {pid}`, then `{start}` (it resumes from the last checkpoint).")
    if current == "paused" and not gate_held:
        reason = f" ({training['paused_reason']})" if training["paused_reason"] else ""
        resume = _cmd(root, "training_controller.py resume")
        note = ("Once the reason is dealt with (other warnings name its fix): the daemon does "
                "not resume by itself after a pause.")
        if (training["paused_for_s"] or 0) > PAUSED_LONG_S:
            _warn(w, "PAUSED_LONG", "warning",
                  f"training has been paused for {training['paused_for_s'] / 3600:.1f} h{reason}",
                  resume, note)
        else:
            _warn(w, "TRAINING_PAUSED", "info", f"training is paused{reason}", resume, note)
    elif not alive and not gate_held:
        _kept_pause(root, w)
    _file_warnings(root, state.get("file_warnings"), w)
    if problems:
        _warn(w, "DAEMON_STATE_UNREADABLE", "warning",
              f"the daemon state file cannot be read: {problems[0]}",
              f"mv {_arg(root, '.daemon_state.json')} {_arg(root, '.daemon_state.json.bad')}",
              "Safe while no daemon runs: the daemon rewrites the file within a second of starting.")
    return daemon, training


def _kept_pause(root: Path, w: list) -> None:
    """TRAINING_PAUSED for a pause kept with no daemon (`pause` with none running, or the
    pause a stopped or killed daemon carried out): the next start pauses at once, so the
    fix is `resume` (no daemon needed), not a start alone."""
    import training_controller  # (only with no daemon: what it keeps is its to read)
    record, kept = training_controller.pause_record(root), training_controller.kept_pause(root)
    if not (record or kept):
        return
    why = record["reason"] if record else (kept.get("reason") or "paused by request")
    since = (record or {}).get("since") or (kept or {}).get("created_at")
    _warn(w, "TRAINING_PAUSED", "info",
          f"no daemon runs and a pause is kept (since {since}: {why}): the daemon starts "
          "paused and trains nothing until `resume`", _cmd(root, "training_controller.py resume"),
          "Clears the kept pause (no daemon needed) once its reason is dealt with; "
          f"`{_cmd(root, 'training_daemon.py run')}` then trains what waits.")


def _memory_kept(state: dict) -> dict | None:
    """The daemon's `memory_kept` ({bytes, device, until}: the model and AdamW state it keeps
    for a next file while idle, keep_warm_seconds), typed; None when there is none."""
    kept = state.get("memory_kept")
    if not isinstance(kept, dict) or _int(kept.get("bytes")) is None:
        return None
    return {"bytes": kept["bytes"], "device": _str(kept.get("device")), "until": _str(kept.get("until"))}


def _file_warnings(root: Path, files, w: list) -> None:
    """Recent trained files whose done/ record counts warnings (the daemon lists them)."""
    if not isinstance(files, list):
        return
    files = [f for f in files if isinstance(f, dict) and isinstance(f.get("name"), str)
             and isinstance(f.get("warnings"), dict)]
    if not files:
        return
    said = [f"{f['name']} (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in f["warnings"].items()
                                         if isinstance(v, int) and v) + ")" for f in files]
    fallback = next((f for f in reversed(files) if f["warnings"].get("fallback")), None)
    newest = fallback or files[-1]
    done = Paths(root).done / newest["name"]
    fix = (f"{_cmd(root, 'training_engine.py show')} {shlex.quote(str(done))} --lines 1-3"
           if fallback else f"cat {shlex.quote(str(done))}.record.json")
    _warn(w, "FILE_WARNINGS", "warning" if fallback else "info",
          f"{len(files)} recent file(s) trained with warnings: " + "; ".join(said[-5:]), fix,
          "fallback: chat records rendered in the plain format, not the model's template (the "
          "model has none, or config.json chat_template is \"plain\"); split examples: longer "
          "than max_length, continued in the next row; skipped records: invalid lines and "
          "records the chat template refuses, passed over (`add --skip-invalid`), listed in "
          "the done/ record (`skipped_records`, `refused_records`).")


def _done_count(root: Path) -> int:
    """Trained files in done/: from the done index while it is up to date (done/ holds
    every file trained for years: one listing of it costs ~0.2 s at 100,000)."""
    import done_index  # sqlite3: only here
    return done_index.count(root)


def _queue_section(root: Path, daemon: dict, w: list) -> dict:
    p = Paths(root)
    counts = {pr: len(_data_names(p.queue / pr)) for pr in QUEUE_PRIORITIES}
    inbox = sum(len(_data_names(d)) for d in (p.inbox, p.inbox_high, p.inbox_low,
                                              *(p.queue / ".incoming" / pr for pr in QUEUE_PRIORITIES)))
    sec = {"counts": counts, "queued": sum(counts.values()), "inbox": inbox,
           "processing": (_data_names(p.processing) or [None])[0], "done": _done_count(root),
           "failed": [], "failed_count": 0, "skipped": [], "skipped_count": 0}
    for kind in ("failed", "skipped"):
        folder = getattr(p, kind)
        names = _data_names(folder)
        sec[f"{kind}_count"] = len(names)

        def mtime(name, folder=folder):
            try:
                return os.stat(os.path.join(folder, name)).st_mtime
            except OSError:
                return 0.0
        # Newest first; only the listed ones' records are read (skipped/ grows for years).
        entries = []
        for name in sorted(names, key=mtime, reverse=True)[:LIST_LIMIT]:
            rec = _read(folder / f"{name}.record.json") or {}
            rec = rec if isinstance(rec, dict) else {}
            history = rec.get("history")
            last = history[-1] if isinstance(history, list) and history else {}
            entries.append({"name": name, "reason": str(rec.get("reason") or "no record file"),
                            "at": last.get("at") if isinstance(last, dict) else None})
        sec[kind] = entries
    if sec["failed_count"]:
        first = sec["failed"][0]
        fix = _cmd(root, f"training_queue.py add {_arg(root, 'failed/' + first['name'])} --move")
        if not first["name"].endswith(".jsonl"):  # add refuses the name: into the inbox as data
            from training_queue import jsonl_name
            from trainroot import unique_path  # (a file of that name waiting there stays whole)
            new = unique_path(Paths(root).inbox, jsonl_name(first["name"])).name
            fix = f"mv {_arg(root, 'failed/' + first['name'])} {_arg(root, 'inbox/' + new)}"
        _warn(w, "FILES_FAILED", "warning",
              f"{sec['failed_count']} file(s) in failed/ wait for a decision; newest: "
              f"{first['name']} ({first['reason']})", fix,
              "Read the reason and fix the file first; this re-validates and queues it. To file "
              f"it away instead: `mkdir -p {_arg(root, 'failed/reviewed')} && mv "
              f"{_arg(root, 'failed/' + first['name'])} {_arg(root, 'failed/' + first['name'] + '.record.json')} "
              f"{_arg(root, 'failed/reviewed/')}`.")
    waiting = sec["queued"] + inbox
    if waiting and not daemon["alive"] and not sec["processing"] and \
            not any(x["code"] in ("DAEMON_DEAD", "TRAINING_PAUSED") for x in w):  # (which say
        # why it is not running, or that a start alone trains nothing: a kept pause)
        _warn(w, "DAEMON_NOT_RUNNING", "info",
              f"{waiting} file(s) wait in inbox/ and queue/ but no daemon is running",
              _cmd(root, "training_daemon.py run"), "Trains them in priority order.")
    return sec


def _measured_usage(root: Path, cfg: dict) -> dict | None:
    """The disk usage the budget is read against: the daemon's last sample (after each file,
    `.disk_usage.json`), or a small root measured now; None (not measured yet) for a root
    with more than MEASURE_NOW_FILES files and no sample: a status never walks the history."""
    try:
        return retention.recorded_usage(root, cfg) or retention.usage(root, cfg, limit=MEASURE_NOW_FILES)
    except (GuardrailError, OSError, TypeError, ValueError):
        return None  # an unreadable backup_dir setting: CONFIG_INVALID says so


def _disk_section(root: Path, cfg: dict, model: dict, disk_usage, w: list,
                  measured: dict | None = None) -> dict:
    p = Paths(root)
    where = p.current_model if model["exists"] else p.root
    usage = disk_usage(where)
    min_free = int(cfg.get("min_free_disk_mb") or 0) * 1024 * 1024
    # the spare checkpoint in .staging/ is written over by the next checkpoint: no new room
    spare = retention.spare_bytes(root)
    needed = max(0, model["size_bytes"] * MODEL_SPACE_FACTOR - spare) + min_free
    sec = {"path": str(where), "free_bytes": usage.free, "total_bytes": usage.total,
           "model_size_bytes": model["size_bytes"], "needed_bytes": needed,
           "min_free_bytes": min_free, "spare_checkpoint_bytes": spare,
           "enough": usage.free >= needed}
    try:
        sec["budget"] = retention.disk_report(root, cfg, disk_usage=disk_usage, used=measured,
                                              walk=False)
    except OSError as exc:
        sec["budget"] = {"error": str(exc)}
    if "error" not in sec["budget"] and sec["budget"]["measured_at"] is None:
        sec["budget"]["not_measured"] = (
            f"not measured yet: the root holds more than {MEASURE_NOW_FILES} files and the daemon "
            f"has not sampled it (it does after each trained file); `{_cmd(root, 'state_tracker.py --measure-disk')}` "
            "measures it now (a walk of every file) and keeps the sample")
    root_budget = sec["budget"].get("root") or {}
    if root_budget.get("budget_bytes") is not None and root_budget["used_bytes"] is not None and \
            root_budget["used_bytes"] + needed - min_free > root_budget["budget_bytes"]:
        over = root_budget["used_bytes"] + needed - min_free - root_budget["budget_bytes"]
        freed, _ = _prune_frees(root, keep=1)
        message = (f"the root's models use {root_budget['used_bytes'] / 1e9:.3f} GB of max_disk_gb "
                   f"{root_budget['budget_bytes'] / 1e9:g} GB; the next snapshot and checkpoint need "
                   f"{(needed - min_free) / 1e9:.3f} GB more, so the daemon pauses before the next file")
        users = retention.space_users(root, cfg, root, root_budget["used_bytes"])
        if freed >= over:
            _warn(w, "DISK_BUDGET", "critical", message + f"; pruning to the newest version frees "
                  f"{freed / 2**20:.1f} MiB", _cmd(root, "model_versioner.py prune --keep 1"),
                  "A dry run: it lists what the deepest prune removes (tagged, latest, current and "
                  "held versions stay); add --yes once the user agrees. Or raise max_disk_gb in "
                  "config.json, or free space on that disk. The space is used by: " + users)
        else:  # (versions share their files with current_model and checkpoints)
            _warn(w, "DISK_BUDGET", "critical", message + f"; even pruning to the newest version "
                  f"frees only {freed / 2**20:.1f} MiB of the {over / 2**20:.1f} MiB over (versions "
                  "share their files with current_model and the checkpoints)",
                  f"du -xsh {shlex.quote(str(root))}/* | sort -h",
                  "Lists what takes the space in the root, biggest last. Raise max_disk_gb in "
                  "config.json to what the model needs (then `"
                  + _cmd(root, "training_controller.py resume") + "`); the space is used by: " + users)
    back = sec["budget"].get("backups") or {}
    if back.get("budget_bytes") is not None and back["used_bytes"] is not None and \
            back["used_bytes"] + model["size_bytes"] > back["budget_bytes"]:
        _warn(w, "DISK_BUDGET", "warning",
              f"backups use {back['used_bytes'] / 1e9:.3f} GB of backup_max_disk_gb "
              f"{back['budget_bytes'] / 1e9:g} GB; the next backup "
              f"({model['size_bytes'] / 1e9:.3f} GB) does not fit",
              _cmd(root, "backup_manager.py prune --keep 1"),
              "A dry run listing what goes (the newest verified backup always stays); add "
              "--yes once the user agrees. Or raise backup_max_disk_gb in config.json.")
    if not sec["enough"]:
        message = (f"{usage.free / 2**20:.0f} MiB free on the disk of {where}; the next snapshot "
                   f"and checkpoint need {needed / 2**20:.0f} MiB (model "
                   f"{model['size_bytes'] / 2**20:.1f} MiB x {MODEL_SPACE_FACTOR}"
                   + (f" - {spare / 2**20:.1f} MiB of the pruned checkpoint it writes over in "
                      ".staging/" if spare else "") + " + min_free_disk_mb)")
        freed, doomed = _prune_frees(root)
        if freed and freed >= min(2**20, max(1, needed - usage.free)):  # (KBs of records: no fix)
            _warn(w, "DISK_LOW", "critical",
                  f"{message}; pruning {len(doomed)} version(s) beyond the keep policy frees "
                  f"{freed / 2**20:.1f} MiB", _cmd(root, "model_versioner.py prune --yes"),
                  f"Run it without --yes first to see what goes (tagged, latest and current "
                  f"versions stay); `{_cmd(root, 'backup_manager.py prune --yes')}` frees backups "
                  "likewise, or free space on that disk.")
        else:
            listed = retention.space_users(root, _dict(_read(p.config)), where, usage.used)
            _warn(w, "DISK_LOW", "critical",
                  f"{message}; pruning versions frees next to nothing ({freed / 2**20:.1f} MiB: "
                  f"the keep policy, tags and current_model keep the rest, and versions share "
                  f"their files); the space is used by: {listed}",
                  f"du -xsh {shlex.quote(str(root))}/* | sort -h",
                  "Lists what takes the space in the root, biggest last. Free space on that disk "
                  "(outside the root if that is most of it); a backup_dir on another disk moves "
                  "backups off it; `retention.versions` in config.json lets prune free versions.")
    return sec


def _prune_frees(root: Path, keep: int | None = None) -> tuple[int, list]:
    """(bytes `model_versioner.py prune --yes` (`--keep N`) would free, the versions it would
    delete): only inodes with no link outside those versions count (snapshots share files)."""
    import model_versioner  # lazy: only on a low disk
    try:
        doomed = model_versioner.prune_plan(root, keep)["delete"]
    except GuardrailError:
        return 0, []
    return retention.unique_bytes([Paths(root).versions / vid for vid in doomed]), doomed


def _backups_section(root: Path, cfg: dict, w: list) -> dict:
    p = Paths(root)
    bdir = training_config.backup_dir(root, cfg)
    sec = {"dir": str(bdir), "count": 0, "verified_count": 0, "latest": None,
           "latest_age_s": None, "same_filesystem": None, "problems": []}
    # the one listing and order of backups (by seq, never by time): backup_manager's
    records = [{"id": r["id"], "created_at": r["created_at"], "verified_at": r["verified_at"],
                "status": r["status"], "version": _str(r.get("version")),
                "global_step": _int(r.get("global_step"))}
               for r in backup_records.summaries(root, cfg)]
    good = [r for r in records if r["status"] == "verified"]
    sec["count"], sec["verified_count"] = len(records), len(good)
    sec["problems"] = [{"id": r["id"], "status": r["status"]} for r in records
                       if r["status"] != "verified"]
    backup = _cmd(root, "backup_manager.py backup")
    unusable = _unusable_dir(bdir)
    if unusable:
        problem, shown = unusable
        _warn(w, "BACKUP_DIR_UNUSABLE", "warning",
              f"backup_dir {bdir} cannot hold backups: {problem}; every backup, the daemon's "
              "automatic ones too, fails until it is changed", f"ls -ld {shlex.quote(str(shown))}",
              "Shows what is in the way. Set \"backup_dir\" in config.json to a folder that can "
              f"be written (on another disk), then run `{backup}`.")
    if good:
        sec["latest"] = good[-1]
        sec["latest_age_s"] = _round(age_seconds(good[-1]["created_at"]), 1)
    hours = float(cfg.get("backup_every_hours") or 0)
    too_old = max(2 * hours, 24.0) * 3600 if hours else 7 * 86400
    if not good:
        if not unusable:  # (its fix would fail: BACKUP_DIR_UNUSABLE says why)
            _warn(w, "BACKUP_NONE", "warning", "there is no verified backup: a lost disk or a "
                  "deleted folder would lose everything", backup)
    elif sec["latest_age_s"] is None or sec["latest_age_s"] > too_old:
        days = (sec["latest_age_s"] or 0) / 86400
        _warn(w, "BACKUP_OLD", "warning",
              f"the latest verified backup ({good[-1]['id']}) is {days:.1f} days old", backup)
    for bad in sec["problems"]:
        message = f"backup {bad['id']} is {bad['status'] or 'without a status'}: it is not a good copy"
        if bad["status"] == "corrupt" and good:  # verify found it bad; a good one exists
            _warn(w, "BACKUP_UNVERIFIED", "warning", message,
                  _cmd(root, "backup_manager.py prune --yes"),
                  "Deletes it (a corrupt copy restores nothing; verify re-read it and found it "
                  "bad) and applies the retention policy, the newest verified backup always "
                  f"kept; `{_cmd(root, 'backup_manager.py prune')}` lists what goes first. "
                  f"`{_cmd(root, 'backup_manager.py verify ' + bad['id'])}` re-reads it once more.")
        else:
            _warn(w, "BACKUP_UNVERIFIED", "warning", message,
                  _cmd(root, "backup_manager.py verify " + bad["id"]),
                  f"If it stays bad, make a new one with `{backup}`, then "
                  f"`{_cmd(root, 'backup_manager.py prune --yes')}` deletes the bad one.")
    if unusable:
        sec["problems"].append({"id": None, "status": f"backup_dir unusable: {unusable[0]}"})
    try:
        target = bdir
        while not target.exists() and target != target.parent:
            target = target.parent
        model = p.current_model if p.current_model.exists() else p.root
        sec["same_filesystem"] = os.stat(target).st_dev == os.stat(model).st_dev
    except OSError as exc:
        sec["problems"].append({"id": None, "status": f"cannot stat: {exc}"})
    if sec["same_filesystem"] and not unusable:
        _warn(w, "BACKUP_SAME_FILESYSTEM", "warning",
              f"backup_dir {bdir} is on the same filesystem as current_model: one failed disk "
              "loses both",
              backup, "First set \"backup_dir\" in config.json to a folder on another disk.")
    return sec


def _unusable_dir(folder: Path) -> tuple[str, Path] | None:
    """(why, the path in the way) when `folder` cannot be created or written, else None."""
    target = folder
    try:
        while not os.path.lexists(target) and target != target.parent:
            target = target.parent
        st = os.stat(target)
    except OSError as exc:
        return f"{target} cannot be read ({exc.strerror})", target
    if not stat.S_ISDIR(st.st_mode):
        return (f"{target} is not a folder" if target == folder else
                f"{target} is a file, so no folder can be made under it"), target
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{target} cannot be written (permission denied)", target
    return None


def _tail_lines(path: Path, nbytes: int = METRICS_TAIL_BYTES) -> list[str]:
    """The complete lines in the last `nbytes` of a file (seek from the end)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not block the report (and the monitor) forever
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return []  # a folder or a FIFO in its place reads as no metrics
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            data = f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []  # no metrics yet
    lines = data.split(b"\n")
    if size > nbytes:
        lines = lines[1:]  # the first one is cut
    lines = [ln for ln in lines if ln.strip()]
    if size < nbytes and path.parent.joinpath("metrics").is_dir():
        # just after a monthly rotation metrics.jsonl is short: the closed segment's kept
        # tail goes before it, so the loss warnings see the same history as before
        import metrics_log
        lines = metrics_log.tail_lines(path.parent, nbytes)
    return [ln.decode("utf-8", "replace") for ln in lines]


def _spike_fix(root: Path, file, training: dict) -> tuple[str, str]:
    """Rollback for a file already trained; skip --discard for one still in processing/."""
    if training.get("processing_file") and training.get("state") != "dead":
        return (_cmd(root, "training_controller.py skip --discard"),
                f"Only if {training['processing_file']} is bad data: the daemon abandons it and "
                "restores the version taken before it (the file goes to skipped/). If the data "
                f"is fine: `{_cmd(root, 'training_controller.py resume')}`.")
    return (_cmd(root, "model_versioner.py rollback"),
            f"Only if {file} is bad data: this undoes its training (and can itself be undone). "
            "If the data is fine, training goes on and the warning clears.")


def _loss_section(root: Path, cfg: dict, model: dict, training: dict, w: list) -> dict:
    """Loss of the current history: lines after the last rewind, up to the live step."""
    p = Paths(root)
    window = int(cfg.get("loss_spike_window") or 50)
    bound = model.get("global_step")
    live = (training.get("progress") or {}).get("global_step")
    if training.get("state") in ("training", "stopping", "paused") and isinstance(live, int):
        bound = max(bound or 0, live)
    # Walk back from the newest line; parse only what the window needs. Stop at a rewind
    # (a rollback or restore sends global_step back): training undone that way must not
    # count, nor warn, any more; and skip steps beyond the model's (also undone).
    points, newer = [], None
    for line in reversed(_tail_lines(p.metrics)):
        try:
            doc = json.loads(line)
            step, loss = int(doc["global_step"]), float(doc["loss"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line or a foreign one
        if newer is not None and step >= newer:
            break
        newer = step
        if isinstance(bound, int) and step > bound:
            continue
        points.append((step, loss, _str(doc.get("file")), _str(doc.get("time"))))
        if len(points) > max(window, 32):
            break
    points.reverse()
    factor = float(cfg.get("loss_spike_factor") or 0)
    sec = {"points": len(points), "last_step": None, "last_loss": None, "last_file": None,
           "last_time": None, "mean": None, "trend": "unknown", "spike": False,
           "spike_factor": factor, "last_loss_finite": True,
           "recent": [_finite(pt[1]) for pt in points[-32:]]}
    if not points:
        return sec
    finite = [pt for pt in points if pt[1] == pt[1] and abs(pt[1]) != float("inf")]
    last = points[-1]
    sec.update(last_step=last[0], last_loss=_finite(last[1]), last_file=last[2], last_time=last[3],
               last_loss_finite=_finite(last[1]) is not None)
    before = [pt[1] for pt in finite[:-1]][-window:]
    if before:
        sec["mean"] = _round(sum(before) / len(before), 5)
    recent = [pt[1] for pt in finite][-window:]
    if len(recent) >= 8:
        q = max(2, len(recent) // 4)
        head, tail = sum(recent[:q]) / q, sum(recent[-q:]) / q
        change = (tail - head) / head if head else 0.0
        sec["trend"] = "falling" if change < -0.05 else "rising" if change > 0.05 else "flat"
    bad = last[1] != last[1] or abs(last[1]) == float("inf")
    if bad or (factor and sec["mean"] and len(before) >= 3 and last[1] > factor * sec["mean"]):
        sec["spike"] = True
        _warn(w, "LOSS_SPIKE", "warning",
              f"loss {last[1]:.4g} at step {last[0]} ({last[2]}) is "
              + ("not finite" if bad else f"{last[1] / sec['mean']:.1f}x the recent mean {sec['mean']:.4g}"),
              *_spike_fix(root, last[2], training))
    return sec


def _eval_section(root: Path, model: dict, training: dict, w: list) -> dict:
    """The quality gate (eval_gate.py): the eval set, current_model's version's eval loss
    (kept in versions/.eval/vNNN.json), and the file it holds, if any, with the two commands."""
    import eval_gate
    p = Paths(root)
    sec = {"files": [f.name for f in eval_gate.eval_files(root)], "current": None, "recent": [], "held": None}
    kept = sorted((n[:-5] for n in _listdir(p.versions / eval_gate.CACHE_DIR)
                   if n[:1] == "v" and n.endswith(".json") and n[1:-5].isdigit()),
                  key=lambda v: int(v[1:]))
    vid = model.get("matches_version")
    for v in kept[-EVAL_RECENT:] + ([vid] if isinstance(vid, str) and vid in kept[:-EVAL_RECENT] else []):
        doc = eval_gate.read_cached(root, v)  # one small JSON per version
        if doc is None:
            continue
        entry = {"version": v, "global_step": _int(doc.get("global_step")),
                 "eval": _json_safe(eval_gate.losses(doc)), "rejected": doc.get("rejected") is True,
                 "complete": eval_gate.is_complete(doc)}
        if v == vid:
            sec["current"] = entry
        if v in kept[-EVAL_RECENT:]:
            sec["recent"].append(entry)
    name = training.get("processing_file")
    rec = _read(p.processing / f"{name}.record.json") if name else None
    hold = _dict(_dict(rec).get("hold"))
    if hold.get("kind") == "gate":
        sec["held"] = {"file": name, "version": _str(hold.get("version")), "since": _str(hold.get("since")),
                       "threshold_pct": hold.get("threshold_pct"), "eval": _json_safe(_dict(hold.get("eval")))}
        _warn(w, "QUALITY_HOLD", "warning", _str(hold.get("reason")) or f"{name} is held by the quality gate",
              _cmd(root, "training_controller.py reject"),
              "Ask the user first. reject: the file goes to skipped/ (its record names the command "
              "that queues it again) and training goes on from the version before it, as if it "
              f"had never been trained. To keep its training instead: "
              f"`{_cmd(root, 'training_controller.py accept')}` (publishes {sec['held']['version']}).")
    return sec


def _locks_section(root: Path, daemon: dict, w: list) -> list:
    p = Paths(root)
    out = []
    for name in _listdir(p.locks):
        if not name.endswith(".lock"):
            continue
        holder = read_lock_holder(p.locks / name)
        if holder is None:
            continue
        lock = name[:-5]
        pid = holder.get("pid")
        age = age_seconds(holder.get("since"))
        entry = {"name": lock, "pid": pid, "purpose": holder.get("purpose"),
                 "since": holder.get("since"), "held_s": _round(age, 1),
                 "holder_running": process_running(pid), "stale": False}
        # A flock outlives its recorded pid only through an inherited descriptor (a child
        # of a dead holder); the daemon's locks (daemon; model and engine for as long as one
        # file trains) may be held for hours, the others for seconds or minutes.
        if not entry["holder_running"] or (lock not in TRAINING_LOCKS and age
                                           and age > LOCK_HELD_LONG_S):
            entry["stale"] = True
            path = p.locks / name
            _warn(w, "LOCK_STALE", "warning",
                  f"lock {lock} is held by pid {pid} ({holder.get('purpose') or 'no purpose'})"
                  + (" which is no longer running (a child inherited the lock)"
                     if not entry["holder_running"] else f" for {age / 3600:.1f} h"),
                  f"fuser -v {shlex.quote(str(path))}",
                  "Names the process that holds it; stop that process and the lock is released.")
        out.append(entry)
    return out


# --------------------------------------------------------------------------- the document

def build_state(root, *, disk_usage=disk_usage) -> dict:
    """The whole state document (schema_version 1) for `root`; reads only small files.

    `disk_usage` is the one boundary a test may replace (a full disk is hard to make).
    """
    started = time.perf_counter()
    root = resolve_root(root)
    p = Paths(root)
    w: list = []
    config, cfg = _config_section(root, w)
    measured = _measured_usage(root, cfg)
    versions = _versions_section(root, w, measured)
    model = _current_model_section(root, versions, w)
    if versions["count"]:
        _versions_without_base(root, model.get("base"), w, cfg)
    gone_current = p.versions.is_dir() and _gone_versions(root, versions, model, w)
    if os.path.lexists(root) and not root.is_dir():
        _warn(w, "NOT_INITIALIZED", "critical",
              f"{root} is a file, not a training root folder",
              "python3 state_tracker.py --check --root DIR",
              "DIR: the folder that holds config.json, current_model/ and versions/ (or set "
              "TRAINING_ROOT to it); nothing was written.")
    elif (inside := model_folder(root)) is not None:
        _warn(w, "NOT_INITIALIZED", "critical", f"{root} is not a training root: {inside[0]}",
              f"python3 state_tracker.py --check --root {shlex.quote(str(inside[1]))}" if inside[1]
              else "python3 state_tracker.py --check --root DIR",
              "Nothing was written into the model folder.")
    elif (around := enclosing_root(root)) is not None:
        _warn(w, "NOT_INITIALIZED", "critical", f"{root} is not a training root: it is inside "
              f"{around[1].name}/ of the training root {around[0]}",
              f"python3 state_tracker.py --check --root {shlex.quote(str(around[0]))}",
              "Nothing was written there; a root inside another's folders would be taken for "
              "its data or versions.")
    elif not is_training_root(root):
        _warn(w, "NOT_INITIALIZED", "critical", f"{root} is not a training root yet",
              f"python3 training_daemon.py init --root {shlex.quote(str(root))}")
    elif not versions["count"] and model["exists"]:
        _warn(w, "NO_VERSION", "critical",
              "there is no version in versions/: nothing to go back to",
              _cmd(root, "model_versioner.py snapshot --note first"))
    elif p.config.is_symlink() and not p.config.exists():
        _warn(w, "CONFIG_MISSING", "critical",
              f"{p.config} is a link to {os.readlink(p.config)}, which is not there (a disk not "
              "mounted?); the daemon cannot train", f"ls -l {_arg(root, 'config.json')}",
              "Mount what it points into; or replace the link: `rm "
              f"{_arg(root, 'config.json')} && {_cmd(root, 'training_daemon.py init')}` (init "
              "writes back the config the newest version trained with).")
    elif not p.config.exists():
        _warn(w, "CONFIG_MISSING", "critical", f"{p.config} is missing; the daemon cannot train",
              _cmd(root, "training_daemon.py init"),
              "On a root with a model, init only writes back the config the newest version "
              "trained with (current_model untouched); then check again.")
    elif model["complete"] and versions["count"] and model["matches_version"] is None \
            and not gone_current:
        _warn(w, "MODEL_NOT_VERSIONED", "info",
              "current_model/ differs from every version (trained since the last snapshot)",
              _cmd(root, "model_versioner.py snapshot"), "Keeps it as a version.")
    _damaged_versions(root, versions, model, w)
    daemon, training = _daemon_and_training(root, w)
    queue = _queue_section(root, daemon, w)
    disk = _disk_section(root, cfg, model, disk_usage, w, measured)
    backups = _backups_section(root, cfg, w)
    b = backups["latest"]
    if not versions["count"] and not b and any(x["code"] == "MODEL_MISSING" for x in w):
        b = backup_records.latest_earlier_backup(root)  # in ROOT/backups, before backup_dir changed
    if not versions["count"] and b:  # only a backup holds the trained model
        for x in w:
            if x["code"] == "MODEL_MISSING":
                x["message"] += (f"; the newest verified backup is {b['id']} (step {b['global_step']})"
                                 + ("" if b is backups["latest"] else f", in {os.path.dirname(b['path'])}"
                                    " (made before backup_dir changed)"))
                x["fix"] = _cmd(root, f"backup_manager.py restore {b['id']}")
                x["note"] = ("Brings the trained model back (init would start a new random one); "
                             f"then `{_cmd(root, 'model_versioner.py snapshot --note restored')}`.")
    loss = _loss_section(root, cfg, model, training, w)
    locks = _locks_section(root, daemon, w)
    quality = _eval_section(root, model, training, w)
    del versions["_records"]
    versions.pop("_tags_problem", None)
    training["progress"] = _json_safe(training["progress"])  # a daemon may have written NaN
    training["current_file"] = _json_safe(training["current_file"])
    if any(x["code"] == "NOT_INITIALIZED" for x in w):  # everything else would be noise
        w[:] = [x for x in w if x["code"] == "NOT_INITIALIZED"]
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    w.sort(key=lambda x: order[x["severity"]])
    critical = sum(1 for x in w if x["severity"] == "critical")
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": utc_now(),
        "root": str(root),
        "ok": critical == 0,
        "critical_count": critical,
        "current_model": model, "versions": versions, "config": config,
        "training": training, "daemon": daemon, "disk": disk, "queue": queue,
        "backups": backups, "loss": loss, "locks": locks, "eval": quality, "warnings": w,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def refresh(root) -> Path:
    """Build the document and write `.system_state.json` atomically; its path."""
    root = resolve_root(root)
    state = build_state(root)
    path = Paths(root).system_state
    atomic_write_json(path, state)
    return path


def exit_code(state: dict) -> int:
    """0 when no warning is critical, 1 when one is."""
    return 0 if state.get("ok") else 1


# --------------------------------------------------------------------------- report

def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _age(s) -> str:
    if s is None:
        return "-"
    for limit, unit in ((120, "s"), (7200, "min"), (172800, "h")):
        if s < limit:
            return f"{s / {'s': 1, 'min': 60, 'h': 3600}[unit]:.0f} {unit}"
    return f"{s / 86400:.1f} days"


def report_rows(state: dict) -> list[tuple[str, str]]:
    """(section, one line) pairs: the readable report, independent of how it is printed."""
    m, v, c, t, d = (state[k] for k in ("current_model", "versions", "config", "training", "daemon"))
    disk, q, b, loss = (state[k] for k in ("disk", "queue", "backups", "loss"))
    model = ("missing" if not m["exists"] else
             f"{'complete' if m['complete'] else 'INCOMPLETE'}, {_size(m['size_bytes'])}, "
             f"step {m['global_step']}, {m['tokens_seen']} tokens, "
             + (f"adapter on base {m.get('base')}, " if m.get("kind") == "adapter" else "")
             + f"= {m['matches_version'] or 'no version'}")
    tags = ", ".join(f"{k}={x}" for k, x in v["tagged"].items()) or "no tags"
    changes = ", ".join(ch["text"] for ch in c["changes"])
    conf = ("invalid" if c["exists"] and not c["valid"] else "missing" if not c["exists"] else
            "approved" if c["approved"] else f"CHANGED: {changes}")
    prog = t["progress"] or {}
    train = t["state"]
    if t["current_file"] or t["processing_file"]:
        name = (t["current_file"] or {}).get("name") or t["processing_file"]
        train += f", {name}"
        if prog.get("records_total"):
            train += f" {prog.get('records_done', 0)}/{prog['records_total']} records"
    if t["heartbeat_age_s"] is not None:
        train += f", heartbeat {_age(t['heartbeat_age_s'])} ago"
    if t["stalled"]:
        train += " (STALLED)"
    kept = t.get("memory_kept")
    if kept:
        until = (kept["until"] or "")[11:19]
        train += (f", the model and AdamW state ({_size(kept['bytes'])}) kept in memory for a next "
                  f"file{f' until {until} UTC' if until else ''} (keep_warm_seconds)")
    if t["file_error"] or t["last_error"]:
        train += f"; last error: {t['file_error'] or t['last_error']}"
    latest = b["latest"]
    backups = (f"{latest['id']} ({_age(b['latest_age_s'])} old, verified {latest['verified_at']})"
               if latest else "none verified")
    backups += f", {b['verified_count']}/{b['count']} good"
    if b["same_filesystem"]:
        backups += ", SAME DISK as the model"
    trend = (f"{loss['last_loss']} at step {loss['last_step']} ({loss['last_file']}), trend "
             f"{loss['trend']}" + (", SPIKE" if loss["spike"] else "")
             if loss["last_step"] is not None else "no metrics yet")
    return [
        ("root", state["root"]),
        ("model", model),
        ("versions", f"{v['count']}, latest {v['latest'] or '-'}, {tags}, {_size(v['total_size_bytes'])}"),
        ("config", conf),
        ("daemon", f"alive, pid {d['pid']}" if d["alive"] else "not running"),
        ("training", train),
        ("disk", f"{_size(disk['free_bytes'])} free, next snapshot+checkpoint need "
                 f"{_size(disk['needed_bytes'])}" + _spare_text(disk)
                 + _budget_text(disk.get("budget") or {})),
        ("queue", f"high {q['counts']['high']}, normal {q['counts']['normal']}, low "
                  f"{q['counts']['low']}, inbox {q['inbox']}, done {q['done']}, failed "
                  f"{q['failed_count']}, skipped {q['skipped_count']}"),
        ("backups", backups),
        ("loss", trend),
    ]


def _spare_text(disk: dict) -> str:
    """The spare checkpoint in .staging/, when there is one: the disk it holds is no leak."""
    spare = disk.get("spare_checkpoint_bytes") or 0
    return (f" (the next checkpoint writes over the {_size(spare)} pruned checkpoint kept in "
            ".staging/, given back when the disk runs short)") if spare else ""


def _budget_text(budget: dict) -> str:
    """`; models 3.2 GB of 50 GB, ~120 days left` for the report (root and backups)."""
    parts = []
    for name in ("root", "backups"):
        b = budget.get(name) or {}
        if not isinstance(b.get("used_bytes"), int):
            continue
        of = f" of {_size(b['budget_bytes'])}" if b.get("budget_bytes") is not None else ""
        left = f", ~{b['days_left']:g} days left at the current rate" if b.get("days_left") is not None else ""
        parts.append(f"{'models' if name == 'root' else 'backups'} {_size(b['used_bytes'])}{of}{left}")
    return ("; " + "; ".join(parts)) if parts else ""


def print_report(state: dict, warnings_only: bool = False) -> None:
    """A rich table when stdout is a terminal (or FORCE_COLOR asks for colour); the same
    lines as plain text otherwise, without importing rich (~100 ms of every piped --check)."""
    if sys.stdout.isatty() or os.environ.get("FORCE_COLOR"):
        from rich.console import Console  # lazy: only for the human report
        console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())

        def out(text, end="\n", markup=True, soft_wrap=None):
            console.print(text, end=end, markup=markup, soft_wrap=soft_wrap)
    else:
        def out(text, end="\n", markup=True, soft_wrap=None):  # piped: greppable lines
            print(_MARKUP.sub("", text) if markup else text, end=end)
    colours = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
    if not warnings_only:
        verdict = ("[bold green]OK[/]" if state["ok"] else
                   f"[bold red]{state['critical_count']} CRITICAL[/]")
        out(f"[bold]Training Guardrails state[/] — {verdict}  ({state['generated_at']})")
        for key, line in report_rows(state):
            out(f"  [bold]{key:<9}[/] ", end="")
            out(line, markup=False)
    if not state["warnings"]:
        out("No warnings." if warnings_only else "[green]No warnings.[/]")
        return
    out(f"[bold]Warnings ({len(state['warnings'])})[/]")
    for x in state["warnings"]:
        out(f"  [{colours[x['severity']]}]{x['severity'].upper():<8} {x['code']}[/] ", end="")
        out(x["message"], markup=False)
        out("    [bold]fix:[/] ", end="")
        out(x["fix"], markup=False, soft_wrap=True)
        if x.get("note"):
            out("    note: ", end="")
            out(x["note"], markup=False)


# the markup print_report writes (never what it prints with markup=False: messages, paths)
_MARKUP = re.compile(r"\[(?:/|bold|bold green|bold red|green|yellow|cyan)\]")


# --------------------------------------------------------------------------- CLI

def cmd_state(args) -> int:
    """Refresh .system_state.json (default), or print the report, the warnings or the JSON."""
    root = resolve_root(args.root)
    if args.measure_disk:
        measure_disk(root)
    state = build_state(root)
    if args.json:
        print_json(state)
    elif args.check or args.warnings:
        print_report(state, warnings_only=args.warnings)
    if not args.json and (root.is_dir() or not (args.check or args.warnings)):
        # --json only reads, and so does a report on a root that does not exist yet;
        # every other form also refreshes the file
        path = Paths(root).system_state
        if model_folder(root) is not None or enclosing_root(root) is not None:
            require_root(root)  # raises, naming the root it belongs to (a snapshot or the
            # outer root's daemon would keep what we wrote there)
        if not root.is_dir():
            is_file = os.path.lexists(root)
            raise GuardrailError(
                "cannot write the state file: the training root "
                + ("is a file, not a folder" if is_file else "does not exist"), root,
                ("Give the right one: `python3 state_tracker.py --root DIR`." if is_file else
                 f"Create one with `python3 training_daemon.py init --root {shlex.quote(str(root))}`, "
                 "or give the right one with --root DIR."))
        try:
            atomic_write_json(path, state)
        except OSError as exc:
            raise GuardrailError(f"cannot write the state file ({exc.strerror})", path,
                                 "Free space or fix the permissions of the training root, then run "
                                 f"`{_cmd(root, 'state_tracker.py')}` again.") from exc
        if not (args.check or args.warnings):
            print(path)
    return exit_code(state)


def measure_disk(root) -> dict:
    """Walk every file the disk budget counts now and keep it as a usage sample (what the
    daemon does after each trained file): for a root the daemon has not sampled yet."""
    root = resolve_root(root)
    if not is_training_root(root):
        raise GuardrailError("cannot measure the disk usage: not a training root", root,
                             f"Create one with `python3 training_daemon.py init --root {shlex.quote(str(root))}`.")
    try:
        cfg = training_config.load_config(root)
    except training_config.ConfigError as exc:
        raise GuardrailError(f"cannot measure the disk usage: config.json is invalid ({'; '.join(exc.errors)})",
                             Paths(root).config, f"Fix the keys named, then `{_cmd(root, 'state_tracker.py --measure-disk')}`.")
    try:
        return retention.record_usage(root, cfg)
    except OSError as exc:
        raise GuardrailError(f"cannot keep the usage sample ({exc.strerror})", Path(root) / retention.USAGE_FILE,
                             "Free space or fix the permissions of the training root, then run "
                             f"`{_cmd(root, 'state_tracker.py --measure-disk')}` again.") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="state_tracker.py", description=__doc__.split("\n\n")[0],
        epilog="Exit 0 when nothing is critical, 1 when a warning is critical, 2 on usage errors.")
    add_common_args(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="print a readable report with every warning")
    mode.add_argument("--warnings", action="store_true", help="print only the warnings")
    parser.add_argument("--measure-disk", action="store_true",
                        help="walk the root now and keep a disk-usage sample (the daemon keeps "
                             "one after each trained file), then report")
    parser.set_defaults(func=cmd_state)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
