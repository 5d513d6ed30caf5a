"""The live monitor's read-only server: one page and two JSON documents, on 127.0.0.1 only.

The daemon starts it in a thread (`start_in_thread(root, port)`); it can also run on its own.
It serves nothing but `live_monitor_ui.html` (read from the folder beside this script, never
from a path in the request), the state document (`state_tracker.build_state`, the same
code as `state_tracker.py --json`) and metrics since a step. Routes are matched exactly,
so no request can name a file; every other path is 404, every method but GET/HEAD is 405.

    python3 monitor_server.py serve                      # http://127.0.0.1:8080/
    python3 monitor_server.py serve --port 8090 --root ~/train
    curl -s 'http://127.0.0.1:8080/api/metrics?since=1200&max_points=500'
"""

from __future__ import annotations

import argparse
import base64
import bisect
import errno
import hashlib
import itertools
import json
import operator
import os
import math
import re
import stat
import sys
import threading
import time
from array import array
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trainroot
from trainroot import GuardrailError, UsageError

HOST = "127.0.0.1"          # never configurable: the page shows file names and paths
PAGE_NAME = "live_monitor_ui.html"
PAGE_PATH = trainroot.SCRIPTS_DIR / PAGE_NAME
MAX_POINTS = 2000           # what the chart draws at most; more costs time and shows nothing
MAX_POINTS_LIMIT = 10000    # what a client may ask for
METRIC_FIELDS = ("time", "global_step", "file", "loss", "lr", "tokens_per_sec")
SUMMARY_FIELDS = ("first_step", "n", "loss_min", "loss_max")  # a bucket's point adds these
STATE_TTL = 1.0             # seconds a built state document is reused (several open tabs)
API_RATE = 20.0             # JSON answers a second beside training: one open page asks for 1

# Literal first, so `re` scans at C speed; an escaped key (\"file\") cannot match either.
_STEP_RE = re.compile(rb'"global_step"\s*:\s*(-?\d+)[,}\s]')
_FILE_RE = re.compile(rb'"file"\s*:\s*"([^"\\\n]*(?:\\.[^"\\\n]*)*)"')
_BLOCK = 8 << 20


# --------------------------------------------------------------------------- metrics index

class MetricsIndex:
    """Byte offset and global_step of every complete line of metrics.jsonl, kept up to date.

    A request reads only the new bytes since the last one (the file is append-only), then
    seeks to the few lines it returns, so a year of metrics costs what its new lines cost.
    A file that shrank or was replaced (another inode) is indexed again from the start.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.root = self.path.parent
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, ino) -> None:
        self.ino, self.scanned = ino, 0
        self.steps, self.offsets = array("q"), array("q")
        self.run_start = 0   # first line after the last rewind of global_step (a rollback)
        # entries where the file changes (its line names it: read back when asked for, so
        # years of files cost 8 bytes each here, not a tuple and a name)
        self.boundaries = array("q")
        self._last_file: bytes | None = None
        # Entries below n_summary are buckets of metrics_log's summaries (closed segments,
        # then the part of metrics.jsonl the open summary covers): (first entry, path) each.
        self.n_summary = 0
        self.sources: list[tuple[int, str]] = []

    def _load_summaries(self, st) -> None:
        """Index the summaries of the history before metrics.jsonl's uncovered tail, so the
        first load after a start reads buckets (per file and per 256 steps), not every line."""
        import metrics_log
        paths = [s["summary"] for s in metrics_log.segments(self.root)]
        found = metrics_log.read_open(self.root, st)
        if found:
            paths.append(str(found[0]))
        for path in paths:
            first = len(self.steps)
            try:
                with open(path, "rb") as f:
                    base = len(f.readline())  # the header: no global_step
                    data = f.read()
            except OSError:
                continue  # gone meanwhile (a rotation): the next reset reads it again
            data = data[:data.rfind(b"\n") + 1]
            if data:
                self._index_block(data, base)
            if len(self.steps) > first:
                self.sources.append((first, path))
        self.n_summary = len(self.steps)
        self.scanned = found[1] if found else 0

    def refresh(self) -> None:
        """Index the lines appended since the last call (a torn last line waits for its end)."""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            self._reset(None)
            return
        if not stat.S_ISREG(st.st_mode):  # a folder in its place: no metrics, as for none
            self._reset(None)
            return
        if st.st_ino != self.ino or st.st_size < self.scanned:
            self._reset(st.st_ino)
            self._load_summaries(st)
        if st.st_size == self.scanned:
            return
        with open(self.path, "rb") as f:
            pos = self.scanned
            while pos < st.st_size:  # what was there at stat(): a writer may be appending
                f.seek(pos)
                block = f.read(min(_BLOCK, st.st_size - pos))
                end = block.rfind(b"\n")
                if end >= 0:
                    self._index_block(block[:end + 1], pos)
                    pos += end + 1
                elif len(block) < _BLOCK:
                    break              # a torn last line: indexed once it is complete
                else:                  # one enormous line: skip it rather than hold it
                    f.seek(pos)
                    skipped = _skip_line(f)
                    if skipped is None:
                        break
                    pos += skipped
        self.scanned = pos

    def _index_block(self, block: bytes, base: int) -> None:
        """Record every line of `block` (complete lines only) that carries a global_step.

        The usual block, one step and one file per line, is indexed with two `findall`s;
        a block with foreign or odd lines is indexed line by line.
        """
        lines = block.split(b"\n")
        lines.pop()  # the block ends with a newline
        steps, files = _STEP_RE.findall(block), _FILE_RE.findall(block)
        # A step of 19+ digits does not fit the int64 index (and no run reaches it): such a
        # line is foreign, so the block takes the line-by-line path, which skips it.
        if (len(steps) == len(lines) and len(files) in (0, len(lines))
                and max(map(len, steps), default=0) < 19):
            # C-level iteration only: a million lines index in a few seconds, once
            starts = array("q", itertools.accumulate(map((1).__add__, map(len, lines)), initial=base))
            starts.pop()
            self._add(array("q", map(int, steps)), starts, files or [None] * len(lines))
            return
        found_steps, found_starts, found_files, pos = array("q"), [], [], base
        for ln in lines:
            m = _STEP_RE.search(ln + b"\n")
            if m is not None and len(m.group(1)) < 19:
                f = _FILE_RE.search(ln)
                found_steps.append(int(m.group(1)))
                found_starts.append(pos)
                found_files.append(f.group(1) if f else None)
            pos += len(ln) + 1
        self._add(found_steps, found_starts, found_files)

    def _add(self, steps: array, starts: list, files: list) -> None:
        if not steps:
            return
        first = len(self.steps)
        if first and steps[0] < self.steps[-1]:
            self.run_start = first
        rewinds = list(itertools.compress(range(1, len(steps)),
                                          map(operator.lt, steps[1:], steps)))
        if rewinds:
            self.run_start = first + rewinds[-1]
        if None in files:  # some lines without a file: they keep the current one
            changes, last = [], self._last_file
            for i, raw in enumerate(files):
                if raw is not None and raw != last:
                    changes.append(i)
                    last = raw
        else:
            changes = itertools.compress(range(len(files)),
                                         map(operator.ne, files, [self._last_file, *files[:-1]]))
        for i in changes:
            self.boundaries.append(first + i)
            self._last_file = files[i]
        self.steps.extend(steps)
        self.offsets.extend(starts)

    def query(self, since: int | None, max_points: int) -> dict:
        """Lines with global_step > since, at most max_points of them; since=None: every line.

        With `since`, only the current run counts (the lines after the last time
        global_step went back, as a rollback makes it), where steps only grow: a bisect
        finds them. More matching lines than max_points are thinned evenly, always keeping
        the last, so the chart keeps its shape and its newest point.
        """
        with self._lock:
            self.refresh()
            n = len(self.steps)
            if since is None:
                idx = range(n)
            else:
                idx = range(bisect.bisect_right(self.steps, since, self.run_start), n)
            matched = len(idx)
            stride = max(1, -(-matched // max_points))
            chosen = list(idx[::stride]) if stride > 1 else list(idx)
            if matched and chosen[-1] != idx[-1]:
                chosen[-1] = idx[-1]
            points = self._read(chosen)
            first = idx[0] if matched else n
            picked = self.boundaries[bisect.bisect_left(self.boundaries, first):]  # (steps > since)
            thinned = len(picked) > max_points  # years of files: as many as the points
            if thinned:
                keep = -(-len(picked) // max_points)
                picked = picked[::-1][::keep][::-1]
            boundaries = [{"global_step": self.steps[i], "file": obj.get("file")}
                          for i, obj in self._objects(picked)]
            return {"schema_version": 1, "since": since, "lines": n, "matched": matched,
                    "stride": stride, "downsampled": stride > 1 or (matched > 0 and first < self.n_summary),
                    "summarised": self.n_summary, "boundaries_thinned": thinned,
                    "last_step": self.steps[-1] if n else None,
                    "run_start_step": self.steps[self.run_start] if n else None,
                    "points": points, "boundaries": boundaries}

    def _read(self, indices) -> list[dict]:
        out = []
        for _, obj in self._objects(indices):
            point = {k: _finite(obj.get(k)) for k in METRIC_FIELDS}
            if obj.get("summary") is True:  # a bucket: mean loss, with its min, max and line count
                point.update({k: _finite(obj.get(k)) for k in SUMMARY_FIELDS})
            out.append(point)
        return out

    def _objects(self, indices):
        """(entry, its line as a dict) for each of `indices` whose line is a JSON object."""
        if not len(indices):
            return
        files: dict[str, object] = {}
        starts = [first for first, _ in self.sources]
        try:
            for i in indices:
                if i < self.n_summary:  # a bucket of a summary
                    path = self.sources[bisect.bisect_right(starts, i) - 1][1]
                else:
                    path = self.path
                f = files.get(path)
                if f is None:
                    f = files[path] = open(path, "rb")
                f.seek(self.offsets[i])
                try:
                    obj = json.loads(f.readline())
                except ValueError:
                    continue  # a corrupt line: the chart does without it
                if isinstance(obj, dict):
                    yield i, obj
        finally:
            for f in files.values():
                f.close()


def _finite(value):
    """A field's value as a JSON scalar the browser can parse, else None.

    NaN/inf (a diverged step writes them) become None: browsers' JSON.parse rejects them,
    and one such token makes the whole answer unreadable. A list or object in a metric
    field is foreign (and could hide a NaN), so it is dropped too.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if value is None or isinstance(value, (str, int)) else None


def _skip_line(f) -> int | None:
    """Bytes up to and including the next newline from the current position, or None."""
    total = 0
    while True:
        block = f.read(1 << 20)
        if not block:
            return None
        nl = block.find(b"\n")
        if nl >= 0:
            return total + nl + 1
        total += len(block)


# --------------------------------------------------------------------------- the page

def _csp_for(page: bytes) -> str:
    """A Content-Security-Policy that allows exactly the page's own inline script and style."""
    def hashes(tag: bytes) -> str:
        found = re.findall(rb"<" + tag + rb"(?:\s[^>]*)?>(.*?)</" + tag + rb">", page, re.S)
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(body).digest()).decode()
                        for body in found) or "'none'"
    return ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (hashes(b"script"), hashes(b"style")))


_page_cache: dict = {}


def load_page() -> tuple[bytes, str]:
    """The page's bytes and its CSP, re-read when the file changes (edits show on reload)."""
    st = os.stat(PAGE_PATH)
    key = (st.st_mtime_ns, st.st_size)
    if _page_cache.get("key") != key:
        body = PAGE_PATH.read_bytes()
        _page_cache.update(key=key, body=body, csp=_csp_for(body))
    return _page_cache["body"], _page_cache["csp"]


# --------------------------------------------------------------------------- the server

class _Pacer:
    """At most `rate` JSON answers a second over all connections, each request waiting its
    turn: a waiting thread sleeps and costs training nothing, so 200 open pages cost what
    `rate` answers do (SCHED_IDLE alone did not keep them off training's cores: 200
    polling pages cost it about a quarter of its tokens/s). Up to `rate` pages refresh
    at their usual pace; more pages refresh less often."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self.lock = threading.Lock()
        self.next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            turn = max(now, self.next)
            self.next = turn + self.interval
        if turn > now:
            time.sleep(turn - now)


class MonitorServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer for one training root; binds 127.0.0.1 and nothing else."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, port: int, state_ttl: float = STATE_TTL,
                 idle_priority: bool = False, max_rate: float | None = None):
        self.root = Path(root).resolve()
        self.pacer = _Pacer(max_rate)
        self.metrics = MetricsIndex(trainroot.Paths(self.root).metrics)
        self.state_ttl = state_ttl
        self.idle_priority = idle_priority
        self._state_lock = threading.Lock()
        self._state_cache: tuple[float, bytes] | None = None
        super().__init__((HOST, port), MonitorHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def state_json(self) -> bytes:
        """The state document as JSON bytes, built at most once per `state_ttl` seconds."""
        with self._state_lock:
            now = time.monotonic()
            if self._state_cache and now - self._state_cache[0] < self.state_ttl:
                return self._state_cache[1]
            import state_tracker  # lazily: the server starts even while it is being fixed
            body = json.dumps(state_tracker.build_state(self.root), default=str).encode()
            self._state_cache = (now, body)
            return body

    def handle_error(self, request, client_address) -> None:
        # A tab closed mid-answer is routine, not a traceback in the daemon's log.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address):
        if self.idle_priority:
            _make_thread_idle()
        super().process_request_thread(request, client_address)


_idle_warned = False


def _make_thread_idle() -> None:
    """SCHED_IDLE for this thread only: one busy thread otherwise costs training ~64%."""
    global _idle_warned
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        if not _idle_warned:  # once: the requests are short, so this is a note, not a failure
            _idle_warned = True
            print(f"monitor: SCHED_IDLE not available ({exc}); the monitor runs at normal "
                  "priority", file=sys.stderr)


class MonitorHandler(BaseHTTPRequestHandler):
    """Exact routes, GET/HEAD only, security headers on every answer (errors included)."""

    server: MonitorServer
    server_version = "guardrails-monitor"
    protocol_version = "HTTP/1.1"
    timeout = 15                  # an idle keep-alive connection frees its thread
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK wait
    ROUTES = ("/", "/" + PAGE_NAME, "/api/state", "/api/metrics")

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def __getattr__(self, name: str):
        # http.server looks up do_<METHOD>; every method but GET/HEAD gets a 405, not a 501.
        if name.startswith("do_"):
            return self._refuse_method
        raise AttributeError(name)

    def _refuse_method(self) -> None:
        self.close_connection = True  # the body (if any) is never read
        self._send(405, b'{"ok": false, "error": "method not allowed: use GET or HEAD"}\n',
                   "application/json", extra={"Allow": "GET, HEAD"})

    def parse_request(self) -> bool:
        if len(self.raw_requestline.split()) == 2:
            # HTTP/0.9 ("GET /"): http.server would wait for headers that never come and
            # hold the connection until the timeout; refuse it at once instead.
            self.command, self.request_version = None, "HTTP/1.0"
            self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        return super().parse_request()

    def _dispatch(self) -> None:
        if self.headers.get("Transfer-Encoding") or \
                self.headers.get("Content-Length", "").strip() not in ("", "0"):
            # A GET/HEAD body is never read: on a kept-alive connection it would be taken
            # for the next request (request smuggling), so answer this one and close.
            self.close_connection = True
        if len(self.headers.get_all("Host") or ()) > 1:
            return self._send(400, b'{"ok": false, "error": "more than one Host header"}\n',
                              "application/json")
        if not self._host_ok():
            # A web page that rebinds its own name to 127.0.0.1 must not read our state.
            return self._send(403, b'{"ok": false, "error": "forbidden host"}\n',
                              "application/json")
        path, _, query = self.path.partition("?")
        if path not in self.ROUTES:
            return self._send(404, b'{"ok": false, "error": "not found"}\n', "application/json")
        if path == "/":
            return self._send(302, b"", "text/plain", extra={"Location": "/" + PAGE_NAME})
        try:
            if path == "/" + PAGE_NAME:
                body, csp = load_page()
                return self._send(200, body, "text/html; charset=utf-8",
                                  extra={"Content-Security-Policy": csp})
            self.server.pacer.wait()
            if path == "/api/state":
                body = self.server.state_json()
            else:
                since, max_points = _parse_metrics_query(query)
                body = json.dumps(self.server.metrics.query(since, max_points)).encode()
        except UsageError as exc:
            return self._send_json_error(400, exc)
        except GuardrailError as exc:
            return self._send_json_error(500, exc)
        except FileNotFoundError as exc:
            return self._send_json_error(500, GuardrailError(
                "the monitor page is missing", exc.filename,
                f"Restore it: `git checkout -- {PAGE_NAME}` in {PAGE_PATH.parent}."))
        except Exception as exc:  # noqa: BLE001 - the page shows it; the daemon keeps training
            self.log_error("%s failed: %r", path, exc)
            return self._send_json_error(500, GuardrailError(
                f"{path} failed ({exc.__class__.__name__}: {exc})", self.server.root,
                "Run `python3 state_tracker.py --check` to see the state."))
        self._send(200, body, "application/json")

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        if not host:
            return True  # HTTP/1.0 clients send none; the socket is loopback-only anyway
        # The name only, not the port: an ssh tunnel may forward another local port here.
        name = host if host.endswith("]") or ":" not in host else host.rpartition(":")[0]
        return name in ("127.0.0.1", "localhost", "[::1]")

    def _send_json_error(self, code: int, exc: GuardrailError) -> None:
        body = json.dumps({"ok": False, "error": exc.to_dict()}).encode() + b"\n"
        self._send(code, body, "application/json")

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        extra = dict(extra or {})
        extra.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        # Malformed requests (bad request line, too-long headers) get our headers too.
        self.close_connection = True
        text = json.dumps({"ok": False, "error": message or self.responses.get(code, ("",))[0]})
        self._send(code, text.encode() + b"\n", "application/json")

    def version_string(self) -> str:
        return self.server_version  # no Python version in the answers

    def log_message(self, fmt, *args) -> None:
        pass  # a request log every 2 s per tab would drown the daemon's log; errors still go out

    def log_error(self, fmt, *args) -> None:
        sys.stderr.write("monitor: " + (fmt % args) + "\n")


def _parse_metrics_query(query: str) -> tuple[int | None, int]:
    from urllib.parse import parse_qs
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=20)
    except ValueError:
        raise UsageError("too many query parameters", "/api/metrics") from None
    since, max_points = None, MAX_POINTS
    try:
        if params.get("since", [""])[-1] not in ("", "-1"):
            since = int(params["since"][-1])
        if params.get("max_points", [""])[-1] != "":
            max_points = int(params["max_points"][-1])
    except ValueError:
        raise UsageError("since and max_points must be integers", "/api/metrics",
                         "Ask for /api/metrics?since=STEP&max_points=N.") from None
    if not 1 <= max_points <= MAX_POINTS_LIMIT:
        raise UsageError(f"max_points must be 1..{MAX_POINTS_LIMIT}", "/api/metrics")
    return since, max_points


# --------------------------------------------------------------------------- library API

class MonitorHandle:
    """A running monitor: `.url`, `.port`, `.stop()` (idempotent, joins its thread)."""

    def __init__(self, server: MonitorServer, thread: threading.Thread):
        self.server, self.thread = server, thread
        self.port = server.port
        self.url = f"http://{HOST}:{self.port}/{PAGE_NAME}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=10)
        self.server.server_close()


def make_server(root, port: int, *, state_ttl: float = STATE_TTL,
                idle_priority: bool = False, max_rate: float | None = None) -> MonitorServer:
    """Bind the server on 127.0.0.1:port (0 = any free port); a taken port is a GuardrailError."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise UsageError(f"monitor not started: port {port!r} is not 0..65535", f"{HOST}:{port}",
                         "Set `monitor_port` in config.json to a port in 1..65535 (0 turns the "
                         "monitor off), or pass --port N.")
    try:
        return MonitorServer(Path(root), port, state_ttl=state_ttl, idle_priority=idle_priority,
                             max_rate=max_rate)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            what = f"monitor not started: port {port} is already in use"
        elif exc.errno == errno.EACCES:
            what = f"monitor not started: no permission to listen on port {port}"
        else:
            what = f"monitor not started: cannot listen on port {port} ({exc.strerror})"
        raise GuardrailError(what, f"{HOST}:{port}",
                             "Set another `monitor_port` in config.json (0 turns the monitor "
                             "off) or start the daemon with --no-monitor; training goes on "
                             "without it.") from None


def start_in_thread(root, port: int, *, state_ttl: float = STATE_TTL,
                    idle_priority: bool = True, max_rate: float | None = API_RATE) -> MonitorHandle:
    """Serve the monitor for `root` from a daemon thread; returns a handle with `.stop()`.

    Raises GuardrailError (with a fix command) when the port cannot be bound; the caller
    logs it and keeps training. Request threads run at SCHED_IDLE, and at most `max_rate`
    JSON answers a second are served (more pages wait their turn), so however many pages
    are open, the monitor costs training little.
    """
    server = make_server(root, port, state_ttl=state_ttl, idle_priority=idle_priority,
                         max_rate=max_rate)

    def serve() -> None:
        if idle_priority:
            _make_thread_idle()
        server.serve_forever(poll_interval=0.05)  # how soon stop() returns; a wake-up costs µs

    thread = threading.Thread(target=serve, name=f"monitor-{server.port}", daemon=True)
    thread.start()
    return MonitorHandle(server, thread)


# --------------------------------------------------------------------------- CLI

def cmd_serve(args) -> int:
    """Serve the live monitor on 127.0.0.1 until Ctrl+C (port: --port, else config's monitor_port)."""
    root = trainroot.resolve_root(args.root)
    port = args.port
    if port is None:
        try:
            import training_config
            port = int(training_config.load_config(root).get("monitor_port") or 8080)
        except GuardrailError as exc:
            print(f"monitor: config not read ({exc}); using port 8080", file=sys.stderr)
            port = 8080
    server = make_server(root, port)
    print(f"monitor: http://{HOST}:{server.port}/{PAGE_NAME} (root {root}); Ctrl+C stops it",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _port(text: str) -> int:
    """`--port N`: 0..65535 (0: any free one); anything else is a usage error, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor_server.py", description=__doc__.split("\n\n")[0])
    p = trainroot.subcommands(parser, json_flag=False)("serve", cmd_serve)
    p.add_argument("--port", type=_port, default=None, help="port on 127.0.0.1 (0: any free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return trainroot.run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
