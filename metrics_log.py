"""metrics.jsonl for years: closed monthly segments, gzip-compressed, with a summary beside them.

metrics.jsonl holds the open segment (one JSON line per optimizer step, appended by the
engine). Between files, with no file in processing/, the daemon calls `maintain(root)`:

- it summarises the lines appended since the last call into `metrics/open.summary.jsonl`
  (per file and per BUCKET_LINES lines: first/last step, min/mean/max loss, mean lr and
  tokens/s; eval lines kept whole), so the monitor's first load reads summaries, not years
  of raw lines;
- once metrics.jsonl's first line is from an earlier UTC month than now, it closes it:
  `metrics/2026-11.jsonl.gz` (the month of its first line; `2026-11.2...` if that name is
  taken), verified by reading it back, and `metrics/2026-11.summary.jsonl` (a header with
  the raw bytes' size and sha256, then the buckets) — the commit point; then the open
  summary and metrics.jsonl start empty. `metrics/2026-11.tail.jsonl` keeps the segment's
  last 64 KB of raw lines for readers of the recent tail (state_tracker's loss warnings).

Never in the middle of a file's steps: the engine's resume reads metrics.jsonl's tail for
the steps it already logged. A crash at any point loses nothing: a segment without its
summary is not committed (redone next time); metrics.jsonl still holding a committed
segment's bytes has them dropped at the next call. Summaries are rebuilt from the raw
lines when missing or damaged, never trusted over them. Stdlib only.

    python3 metrics_log.py status              # segments, lines, open summary coverage
    python3 metrics_log.py rotate --force      # close metrics.jsonl now (no file in processing/)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import trainroot
from trainroot import GuardrailError, Paths

BUCKET_LINES = 256            # raw lines per summary bucket at most (a bucket never spans files)
SEGMENT_BUCKETS = 4096        # a closed month's buckets are merged down to about this many
TAIL_BYTES = 64 * 1024        # raw tail kept beside each closed segment
OPEN = "open.summary.jsonl"
_BLOCK = 8 << 20


def folder(root) -> Path:
    return Paths(root).root / "metrics"


# --------------------------------------------------------------------------- summaries

class _Summariser:
    """Folds raw metrics lines into buckets; `feed(line, end_offset)`, then `flush()`."""

    def __init__(self):
        self.out: list[dict] = []
        self.cur: dict | None = None

    def feed(self, raw: bytes, end: int) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return  # a corrupt line: the raw segment keeps it, the summary does without it
        if not isinstance(doc, dict) or not isinstance(doc.get("global_step"), int):
            return
        if "loss" not in doc:  # an eval line (or another event): kept whole
            self.flush()
            self.out.append(dict(doc, end_offset=end))
            return
        c = self.cur
        if c is not None and (c["file"] != doc.get("file") or c["n"] >= BUCKET_LINES
                              or doc["global_step"] < c["global_step"]):
            self.flush()
            c = None
        loss = _num(doc.get("loss"))
        if c is None:
            c = self.cur = {"global_step": doc["global_step"], "first_step": doc["global_step"],
                            "file": doc.get("file"), "n": 0, "first_time": doc.get("time"),
                            "_loss": [], "_lr": [], "_tps": []}
        c["global_step"], c["time"], c["end_offset"] = doc["global_step"], doc.get("time"), end
        c["n"] += 1
        for key, field in (("_loss", loss), ("_lr", _num(doc.get("lr"))),
                           ("_tps", _num(doc.get("tokens_per_sec")))):
            if field is not None:
                c[key].append(field)

    def flush(self) -> None:
        c, self.cur = self.cur, None
        if c is None:
            return
        loss, lr, tps = c.pop("_loss"), c.pop("_lr"), c.pop("_tps")
        c["loss"] = sum(loss) / len(loss) if loss else None
        c["loss_min"], c["loss_max"] = (min(loss), max(loss)) if loss else (None, None)
        c["lr"] = sum(lr) / len(lr) if lr else None
        c["tokens_per_sec"] = round(sum(tps) / len(tps), 1) if tps else None
        c["summary"] = True
        self.out.append(c)


def _num(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def summarise(path: Path, start: int = 0, end: int | None = None) -> tuple[list[dict], int]:
    """Buckets for the complete lines of `path` in [start, end); returns them and the offset
    after the last complete line (a torn last line waits for its end)."""
    s = _Summariser()
    pos = start
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size if end is None else end
        f.seek(start)
        while pos < size:
            block = f.read(min(_BLOCK, size - pos))
            cut = block.rfind(b"\n")
            if cut < 0:
                if len(block) < _BLOCK:
                    break
                raise GuardrailError("a line of more than 8 MB", path,
                                     "Move metrics.jsonl aside (`mv metrics.jsonl metrics.jsonl.bad`); "
                                     "training writes a new one.")
            for line in block[:cut].split(b"\n"):
                pos += len(line) + 1
                if line.strip():
                    s.feed(line, pos)
            f.seek(pos)
    s.flush()
    return s.out, pos


def coarsen(buckets: list[dict], lines: int, target: int | None = None) -> list[dict]:
    """Merge consecutive buckets of one file until each holds about lines/target raw lines,
    so a closed month costs the monitor a few thousand buckets (plus one per file) however
    many steps it had. Eval lines stay whole and between buckets."""
    size = max(BUCKET_LINES, -(-lines // (target or SEGMENT_BUCKETS)))
    out: list[dict] = []
    for b in buckets:
        last = out[-1] if out else None
        if (b.get("summary") is True and last is not None and last.get("summary") is True
                and last.get("file") == b.get("file") and last["n"] + b["n"] <= size
                and b["first_step"] > last["global_step"]):
            n = last["n"] + b["n"]
            for key in ("loss", "lr", "tokens_per_sec"):
                x, y = last.get(key), b.get(key)
                last[key] = (x * last["n"] + y * b["n"]) / n if x is not None and y is not None \
                    else (x if y is None else y)
            for key, pick in (("loss_min", min), ("loss_max", max)):
                vals = [v for v in (last.get(key), b.get(key)) if v is not None]
                last[key] = pick(vals) if vals else None
            last.update(n=n, global_step=b["global_step"], time=b.get("time"),
                        end_offset=b.get("end_offset"))
        else:
            out.append(dict(b))
    return out


def _lines(docs: list[dict]) -> str:
    return "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in docs)


# --------------------------------------------------------------------------- the open summary

def read_open(root, raw_stat=None) -> tuple[Path, int] | None:
    """(open summary path, raw bytes it covers) when it describes the metrics.jsonl there now
    (same inode, coverage within its size); None when missing, damaged or stale."""
    p = Paths(root)
    path = folder(root) / OPEN
    try:
        st = raw_stat or os.stat(p.metrics)
        with open(path, "rb") as f:
            head = json.loads(f.readline())
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            covered = head["covered"] if last.startswith(b'{"open_summary"') else \
                json.loads(last)["end_offset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if head.get("raw_ino") != st.st_ino or not isinstance(covered, int) or covered > st.st_size:
        return None
    return path, covered


def _write_open(root, raw_ino: int, docs: list[dict], covered: int) -> None:
    head = {"open_summary": 1, "raw_ino": raw_ino, "covered": covered}
    trainroot.atomic_write_text(folder(root) / OPEN, _lines([head] + docs))


def update_open(root, log=None) -> int:
    """Summarise metrics.jsonl's lines since the open summary's end; rebuilt from the start
    when it is missing, damaged or stale. Returns the raw offset now covered."""
    p = Paths(root)
    try:
        st = os.stat(p.metrics)
    except FileNotFoundError:
        return 0
    folder(root).mkdir(exist_ok=True)
    found = read_open(root, st)
    if found is None:
        if (folder(root) / OPEN).exists() and log:
            log.warning("metrics: %s was damaged or stale; rebuilt from metrics.jsonl",
                        folder(root) / OPEN)
        docs, covered = summarise(p.metrics)
        _write_open(root, st.st_ino, docs, covered)
        return covered
    path, covered = found
    docs, upto = summarise(p.metrics, covered)
    if docs:
        with open(path, "a", encoding="utf-8") as f:  # append-only; a torn line is skipped by readers
            f.write(_lines(docs))
            f.flush()
            os.fsync(f.fileno())
    return upto if docs else covered


# --------------------------------------------------------------------------- closed segments

def segments(root) -> list[dict]:
    """Committed segments, oldest first: each summary's header plus `summary` (its path)."""
    out = []
    for path in folder(root).glob("*.summary.jsonl"):
        if path.name == OPEN:
            continue
        try:
            with open(path, "rb") as f:
                head = json.loads(f.readline())
        except (OSError, ValueError):
            continue  # a torn summary is not committed: its segment is redone
        if isinstance(head, dict) and head.get("segment"):
            out.append(dict(head, summary=str(path)))
    return sorted(out, key=lambda h: (h.get("seq", 0), h["segment"]))


def _first_month(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    t = json.loads(line).get("time")
                except (ValueError, AttributeError):
                    continue
                if isinstance(t, str) and len(t) >= 7:
                    return t[:7]
                return None
    except OSError:
        return None
    return None


def _drop_committed(root, segs: list[dict], log=None) -> bool:
    """After a crash between commit and reset: metrics.jsonl still begins with the newest
    segment's bytes. Keep only what follows them (nothing is lost: they are in the segment)."""
    p = Paths(root)
    if not segs or not p.metrics.exists():
        return False
    last = segs[-1]
    n = last.get("source_bytes") or 0
    if p.metrics.stat().st_size < n or n <= 0:
        return False
    with open(p.metrics, "rb") as f:  # the first 64 KB first: this runs after every file
        if hashlib.sha256(f.read(min(n, TAIL_BYTES))).hexdigest() != last.get("head_sha256"):
            return False
        f.seek(0)
    h = hashlib.sha256()
    with open(p.metrics, "rb") as f:
        left = n
        while left:
            block = f.read(min(_BLOCK, left))
            if not block:
                return False
            h.update(block)
            left -= len(block)
        if h.hexdigest() != last.get("source_sha256"):
            return False
        rest = f.read()
    _reset_raw(root, rest)
    if log:
        log.info("metrics: metrics.jsonl still held %s's %d bytes (a rotation was cut short); "
                 "kept only the %d bytes after them", last["segment"], n, len(rest))
    return True


def _reset_raw(root, data: bytes) -> None:
    """metrics.jsonl := data, and the open summary for it (written first, for its inode)."""
    p = Paths(root)
    tmp = p.metrics.with_name(".metrics.jsonl.rotating")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    ino = os.stat(tmp).st_ino
    docs, covered = summarise(tmp) if data else ([], 0)
    _write_open(root, ino, docs, covered)
    os.replace(tmp, p.metrics)
    trainroot.fsync_dir(p.root)


def rotate(root, *, month: str | None = None, force: bool = False, log=None) -> dict | None:
    """Close metrics.jsonl into a segment if its first line is from before `month` (now's
    UTC month), or at once with `force`. Refused while a file is in processing/."""
    p = Paths(root)
    if any(not n.startswith(".") for n in _listdir(p.processing)):
        raise GuardrailError("metrics.jsonl is not rotated while a file is in processing/ (its "
                             "resume reads the steps it already logged)", p.processing,
                             "Let the file finish, or stop it with `python3 training_controller.py "
                             "stop --wait`; rotation happens between files.")
    first = _first_month(p.metrics)
    month = month or trainroot.utc_now()[:7]
    if first is None or (not force and first >= month):
        return None
    covered = update_open(root, log)
    size = p.metrics.stat().st_size
    if covered < size:  # a torn last line: it stays in the open segment
        size = covered
    segs = segments(root)
    name, k = first, 1
    taken = {s["segment"] for s in segs}
    while f"{name}.jsonl.gz" in taken:
        k += 1
        name = f"{first}.{k}"
    d = folder(root)
    gz, tmp = d / f"{name}.jsonl.gz", d / f".{name}.jsonl.gz.tmp"
    h, lines, tail = hashlib.sha256(), 0, b""
    with open(p.metrics, "rb") as src:
        head_sha = hashlib.sha256(src.read(min(size, TAIL_BYTES))).hexdigest()
    with open(p.metrics, "rb") as src, open(tmp, "wb") as raw_out:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw_out, compresslevel=6, mtime=0) as z:
            left = size
            while left:
                block = src.read(min(_BLOCK, left))
                left -= len(block)
                h.update(block)
                lines += block.count(b"\n")
                z.write(block)
                tail = (tail + block)[-TAIL_BYTES:]
        raw_out.flush()
        os.fsync(raw_out.fileno())
    check = hashlib.sha256()
    with gzip.open(tmp, "rb") as z:
        while block := z.read(_BLOCK):
            check.update(block)
    if check.hexdigest() != h.hexdigest():
        tmp.unlink()
        raise GuardrailError(f"the compressed segment {name} did not read back as written", gz,
                             "Check the disk (`dmesg`); metrics.jsonl is unchanged and rotation "
                             "is retried after the next file.")
    os.replace(tmp, gz)
    tail = tail.split(b"\n", 1)[1] if len(tail) == TAIL_BYTES and b"\n" in tail else tail
    trainroot.atomic_write_bytes(d / f"{name}.tail.jsonl", tail)
    found = read_open(root)
    buckets = []
    if found:
        with open(found[0], "rb") as f:
            f.readline()
            for ln in f.read().split(b"\n"):
                try:
                    buckets.append(json.loads(ln))
                except ValueError:
                    continue  # a torn line of the open summary: the raw segment has its steps
        buckets = coarsen(buckets, lines)
    head = {"segment": f"{name}.jsonl.gz", "seq": len(segs) + 1, "month": first,
            "source": "metrics.jsonl", "source_bytes": size, "source_sha256": h.hexdigest(),
            "head_sha256": head_sha,
            "lines": lines, "closed_at": trainroot.utc_now(),
            "bucket_lines": max(BUCKET_LINES, -(-lines // SEGMENT_BUCKETS)),
            "tail": f"{name}.tail.jsonl"}
    body = _lines([head] + buckets).encode()
    trainroot.atomic_write_bytes(d / f"{name}.summary.jsonl", body)   # the commit point
    with open(p.metrics, "rb") as f:
        f.seek(size)
        rest = f.read()
    _reset_raw(root, rest)
    if log:
        log.info("metrics: closed %s (%d lines, %d bytes) into metrics/%s", first, lines, size,
                 gz.name)
    return head


def maintain(root, log=None) -> dict | None:
    """Between files (no file in processing/): finish a rotation cut short, bring the open
    summary up to date, and close metrics.jsonl when its month is over."""
    p = Paths(root)
    if not p.metrics.exists():
        return None
    _drop_committed(root, segments(root), log)
    update_open(root, log)
    return rotate(root, log=log)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def tail_lines(root, nbytes: int = TAIL_BYTES) -> list[bytes]:
    """The complete lines in the last `nbytes` of the metrics history: metrics.jsonl's tail,
    preceded by the newest closed segment's kept tail when metrics.jsonl holds less."""
    p = Paths(root)
    out: list[bytes] = []
    try:
        with open(os.open(p.metrics, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            import stat as _stat
            if _stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - nbytes))
                data = f.read()
                out = data.split(b"\n")
                if size > nbytes:
                    out = out[1:]
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        size = 0
    out = [ln for ln in out if ln.strip()]
    if sum(len(ln) + 1 for ln in out) < nbytes:
        segs = segments(root)
        if segs:
            try:
                older = (folder(root) / segs[-1].get("tail", "")).read_bytes()
            except OSError:
                older = b""
            out = [ln for ln in older.split(b"\n") if ln.strip()] + out
    return out


def iter_raw(root):
    """Every raw line of the history, oldest first (closed segments, then metrics.jsonl)."""
    for seg in segments(root):
        with gzip.open(folder(root) / seg["segment"], "rb") as z:
            yield from z
    try:
        with open(Paths(root).metrics, "rb") as f:
            yield from f
    except FileNotFoundError:
        return


# --------------------------------------------------------------------------- CLI

def cmd_status(args) -> int:
    """Closed segments, and how much of metrics.jsonl the open summary covers."""
    root = trainroot.resolve_root(args.root)
    segs = segments(root)
    p = Paths(root)
    found = read_open(root) if p.metrics.exists() else None
    doc = {"segments": [{k: s.get(k) for k in ("segment", "month", "lines", "source_bytes",
                                                 "closed_at")} for s in segs],
           "open_bytes": p.metrics.stat().st_size if p.metrics.exists() else 0,
           "open_summary_covers": found[1] if found else None}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for s in doc["segments"]:
            print(f"{s['segment']:<24} {s['lines']:>12,} lines  closed {s['closed_at']}")
        print(f"metrics.jsonl: {doc['open_bytes']:,} bytes, summary covers "
              f"{doc['open_summary_covers'] if found else 'nothing (rebuilt after the next file)'}")
    return 0


def cmd_rotate(args) -> int:
    """Close metrics.jsonl into a segment now (`--force`) or when its month is over."""
    root = trainroot.resolve_root(args.root)
    with trainroot.model_lock(root, "metrics rotate", timeout=0):
        head = maintain(root) if not args.force else (maintain(root) or rotate(root, force=True))
    print(json.dumps(head) if args.json else
          (f"closed into metrics/{head['segment']}" if head else "nothing to rotate"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metrics_log.py", description=__doc__.split("\n\n")[0])
    sub = trainroot.subcommands(parser)
    sub("status", cmd_status)
    sub("rotate", cmd_rotate).add_argument("--force", action="store_true",
                                           help="close metrics.jsonl now, whatever its month")
    return parser


def main(argv: list[str] | None = None) -> int:
    return trainroot.run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
