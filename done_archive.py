"""done/ data files by policy: gzip-compressed in place once old, never deleted.

Config `done_archive` = {"compress_after_days": N} (null or 0: off, the default). Between
files the daemon compresses done/NAME.jsonl trained more than N days ago into
done/NAME.jsonl.gz (at most `max_files_per_run` a call, the folder listed at most once an
hour): the gzip is written beside it, read back and its bytes' sha256 compared with the
record's `sha256` (the original bytes) before anything else; then the record gains
`archive` {path, format, sha256, size, compressed_size, archived_at}, and only then is the
plain file removed. The record keeps its lineage fields; `training_queue.py add done/NAME.jsonl`
(or the bare NAME) decompresses it back into the queue, checked against the same sha256.

    python3 done_archive.py status            # how many done/ files are compressed
    python3 done_archive.py run --days 30     # compress what is older than 30 days now
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import trainroot
from trainroot import GuardrailError, Paths

RECORD_SUFFIX = ".record.json"   # training_queue's sidecar
SUFFIX = ".gz"
MAX_FILES_PER_RUN = 50           # one call costs at most ~50 files' compression between files
RUN_EVERY_S = 3600               # done/ may hold 100,000 names: list it at most once an hour
STAMP = ".index/done_archive.json"
_BLOCK = 8 << 20


def validate(value, name: str = "done_archive") -> list[str]:
    """Config errors of a `done_archive` value (None is off)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{name}: expected an object like {{\"compress_after_days\": 30}} or null, "
                f"got {value!r}"]
    errors = []
    for key, v in value.items():
        if key not in ("compress_after_days", "max_files_per_run"):
            errors.append(f"{name}.{key}: unknown (expected compress_after_days or "
                          "max_files_per_run)")
        elif v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0
                                or (key == "max_files_per_run" and (v < 1 or v != int(v)))):
            errors.append(f"{name}.{key}: expected a number >= "
                          f"{1 if key == 'max_files_per_run' else 0}, got {v!r}")
    return errors


def _policy(cfg: dict) -> tuple[float | None, int]:
    pol = cfg.get("done_archive") or {}
    days = pol.get("compress_after_days")
    return (float(days) if days else None), int(pol.get("max_files_per_run") or MAX_FILES_PER_RUN)


def _gzip_verified(src: Path, dst_tmp: Path, sha256: str) -> tuple[int, int]:
    """Compress src into dst_tmp (fsynced), read it back; (original size, compressed size).
    Raises GuardrailError, leaving src untouched, when the bytes do not hash to `sha256`."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as f, open(dst_tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as z:
            while block := f.read(_BLOCK):
                h.update(block)
                size += len(block)
                z.write(block)
        raw.flush()
        os.fsync(raw.fileno())
    back = hashlib.sha256()
    with gzip.open(dst_tmp, "rb") as z:
        while block := z.read(_BLOCK):
            back.update(block)
    if h.hexdigest() != sha256 or back.hexdigest() != sha256:
        dst_tmp.unlink()
        raise GuardrailError(
            f"not compressed: its bytes (sha256 {h.hexdigest()[:12]}) or their gzip do not match "
            f"its record's sha256 {sha256[:12]}", src,
            f"Check the file against its record (`sha256sum {src}`); it stays as it is.")
    return size, os.stat(dst_tmp).st_size


def compress(root, name: str, log=None) -> dict:
    """Compress done/NAME into done/NAME.gz (verified), record it, then drop the plain copy.
    Safe to repeat after a crash at any step; returns the record's `archive`."""
    p = Paths(root)
    plain, gz = p.done / name, p.done / (name + SUFFIX)
    rpath = p.done / (name + RECORD_SUFFIX)
    rec = trainroot.read_json(rpath)
    sha = rec.get("sha256")
    if not isinstance(sha, str):
        raise GuardrailError("its record has no sha256, so a compressed copy could not be "
                             "proven", rpath, "Leave it as it is (it is not compressed).")
    arch = rec.get("archive")
    if not gz.exists():
        tmp = p.done / f".{name}.gz.tmp"
        size, csize = _gzip_verified(plain, tmp, sha)
        os.replace(tmp, gz)
        trainroot.fsync_dir(p.done)
        arch = None
    if not arch:
        with gzip.open(gz, "rb") as z:  # after a crash: prove the gzip left there first
            h, size = hashlib.sha256(), 0
            while block := z.read(_BLOCK):
                h.update(block)
                size += len(block)
        if h.hexdigest() != sha:
            raise GuardrailError("a compressed copy beside it does not match its record's sha256",
                                 gz, f"Move it aside (`mv {gz} {gz}.bad`); the plain file stays.")
        arch = {"path": f"done/{gz.name}", "format": "gzip", "sha256": sha, "size": size,
                "compressed_size": os.stat(gz).st_size, "archived_at": trainroot.utc_now()}
        rec["archive"] = arch
        trainroot.atomic_write_json(rpath, rec)
    if plain.exists():
        plain.unlink()   # its bytes are proven in the gzip and the record says where
        trainroot.fsync_dir(p.done)
        if log:
            log.info("done archive: %s compressed to %s (%d -> %d bytes)", name, gz.name,
                     arch["size"], arch["compressed_size"])
    return arch


def maintain(root, cfg: dict, log=None, now: float | None = None, force: bool = False) -> list[str]:
    """Compress done/ files older than the policy's days (at most max_files_per_run)."""
    days, limit = _policy(cfg)
    if not days:
        return []
    p = Paths(root)
    now = time.time() if now is None else now
    stamp = p.root / STAMP
    last = trainroot.read_json(stamp, default={}) if stamp.exists() else {}
    if not force and isinstance(last, dict) and now - float(last.get("at") or 0) < RUN_EVERY_S:
        return []
    try:
        names = os.listdir(p.done)
    except FileNotFoundError:
        return []
    present = set(names)
    done, more = [], False
    for n in sorted(names):
        if n.startswith(".") or n.endswith(RECORD_SUFFIX) or n.endswith(SUFFIX) \
                or n + RECORD_SUFFIX not in present:
            continue
        try:
            if now - os.stat(p.done / n).st_mtime < days * 86400:
                continue
            rec = trainroot.read_json(p.done / (n + RECORD_SUFFIX))
            finished = rec.get("finished_at")
            if isinstance(finished, str) and now - trainroot.parse_time(finished) < days * 86400:
                continue
        except (OSError, ValueError, GuardrailError):
            continue  # a record being written: next time
        if len(done) >= limit:
            more = True
            break
        try:
            compress(root, n, log)
            done.append(n)
        except (GuardrailError, OSError) as exc:
            if log:
                log.warning("done archive: %s", exc)
    if not more:
        (p.root / ".index").mkdir(exist_ok=True)
        trainroot.atomic_write_json(stamp, {"at": now, "compressed": len(done)})
    return done


def archived(p: Paths, src: Path) -> tuple[Path, dict] | None:
    """(gzip, record) when `src` names a compressed done/ file: done/NAME(.gz), or a bare NAME
    that is not a file here and is compressed in done/."""
    src = Path(src)
    in_done = src.parent.resolve() == p.done.resolve()
    if src.parent != Path(".") and not in_done:
        return None               # a path elsewhere: added as it is
    if src.exists() and not (in_done and src.name.endswith(SUFFIX)):
        return None               # a real file of that name: added as it is
    name = src.name[:-len(SUFFIX)] if src.name.endswith(SUFFIX) else src.name
    gz = p.done / (name + SUFFIX)
    rec = trainroot.read_json(p.done / (name + RECORD_SUFFIX), default=None)
    if not gz.is_file() or not isinstance(rec, dict) or not rec.get("archive"):
        return None
    return gz, rec


def cmd_status(args) -> int:
    """How many done/ data files are compressed, and their sizes."""
    p = Paths(trainroot.resolve_root(args.root))
    names = os.listdir(p.done) if p.done.is_dir() else []
    gz = [n for n in names if n.endswith(SUFFIX) and not n.startswith(".")]
    plain = [n for n in names if not n.endswith((SUFFIX, RECORD_SUFFIX)) and not n.startswith(".")]
    doc = {"compressed": len(gz), "plain": len(plain),
           "compressed_bytes": sum(os.stat(p.done / n).st_size for n in gz)}
    print(json.dumps(doc, indent=2) if args.json else
          f"done/: {doc['plain']} plain, {doc['compressed']} compressed "
          f"({doc['compressed_bytes']:,} bytes)")
    return 0


def cmd_run(args) -> int:
    """Compress done/ files older than --days now (default: config's done_archive)."""
    import training_config
    root = trainroot.resolve_root(args.root)
    cfg = training_config.load_config(root)
    if args.days is not None:
        if not args.days >= 0 or args.days == float("inf"):  # (a NaN too)
            raise trainroot.UsageError(f"--days must be 0 or more, got {args.days:g}", root / "done",
                                       "Pass --days N: files trained more than N days ago are "
                                       "compressed (0: every trained file).")
        cfg = dict(cfg, done_archive={**(cfg.get("done_archive") or {}),  # (0 in config is off)
                                      "compress_after_days": args.days or 1e-9})
    if not _policy(cfg)[0]:
        raise GuardrailError("done_archive is off", root / "config.json",
                             "Pass --days N, or set \"done_archive\": {\"compress_after_days\": N}.")
    names = maintain(root, cfg, force=True)
    print(json.dumps({"compressed": names}) if args.json else f"compressed {len(names)} file(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="done_archive.py", description=__doc__.split("\n\n")[0])
    sub = trainroot.subcommands(parser)
    sub("status", cmd_status)
    sub("run", cmd_run).add_argument("--days", type=float, default=None,
                                     help="compress files trained more than this many days ago "
                                     "(default: config's done_archive.compress_after_days)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return trainroot.run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
