"""The live monitor: exact routes, refusals, incremental metrics, and the page in a real browser."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

import monitor_server
import trainroot
from conftest import REPO

ARTIFACTS = REPO / "test-artifacts"


# --------------------------------------------------------------------------- helpers

def request(port: int, method: str, target: str, headers: dict | None = None,
            body: bytes | None = None):
    """One raw HTTP request (the target is sent byte for byte, never normalised)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        hdrs = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(port: int, target: str):
    status, headers, body = request(port, "GET", target)
    assert status == 200, (target, status, body)
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    return json.loads(body)


def metric_line(step: int, file: str, loss: float | None = None) -> str:
    return json.dumps({"time": trainroot.utc_now(), "global_step": step, "file": file,
                       "loss": loss if loss is not None else round(3.0 / (1 + step / 40), 4),
                       "lr": 1e-4, "tokens_per_sec": 3400.0 + step % 7})


def write_metrics(root: Path, steps, file_of=lambda s: f"part-{s // 100:02d}.jsonl") -> None:
    with open(root / "metrics.jsonl", "a", encoding="utf-8") as f:
        for s in steps:
            f.write(metric_line(s, file_of(s)) + "\n")


@pytest.fixture
def server(tmp_root):
    """A monitor on a free port over an empty root (state built fresh for every request)."""
    handle = monitor_server.start_in_thread(tmp_root, 0, state_ttl=0.0, idle_priority=False,
                                             max_rate=None)
    yield handle
    handle.stop()


# --------------------------------------------------------------------------- binding

def test_binds_127_0_0_1_only(server):
    assert server.server.socket.getsockname() == ("127.0.0.1", server.port)
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for addr in others:  # the port must not answer on any other interface
        with pytest.raises(OSError):
            socket.create_connection((addr, server.port), timeout=2).close()
    listening = [c for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"]


def test_taken_port_is_a_clear_error_and_the_caller_goes_on(tmp_root):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(trainroot.GuardrailError) as info:
            monitor_server.start_in_thread(tmp_root, port)
    assert str(info.value) == (
        f"monitor not started: port {port} is already in use, 127.0.0.1:{port}. Set another "
        "`monitor_port` in config.json (0 turns the monitor off) or start the daemon with "
        "--no-monitor; training goes on without it.")


def test_stop_is_idempotent_and_frees_the_port(tmp_root):
    handle = monitor_server.start_in_thread(tmp_root, 0)
    port = handle.port
    handle.stop()
    handle.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = monitor_server.start_in_thread(tmp_root, port)  # the port is free again
    again.stop()


def test_json_answers_are_paced_so_many_pages_cost_training_little(tmp_root):
    """SCHED_IDLE alone did not keep 200 polling pages off training's cores (they cost it
    about a quarter of its tokens/s, bench/bench_monitor_training.py): beside training at
    most max_rate JSON answers a second are served, each request waiting its turn; the
    page itself is not paced."""
    handle = monitor_server.start_in_thread(tmp_root, 0, max_rate=10.0)
    try:
        assert handle.server.pacer.interval == 0.1
        conns = [http.client.HTTPConnection("127.0.0.1", handle.port, timeout=30) for _ in range(4)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda c=c: [
            (c.request("GET", "/api/metrics"), c.getresponse().read()) for _ in range(5)])
            for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() - t0 >= 1.8  # 20 answers at 10 a second, however many ask
        t0 = time.monotonic()
        for _ in range(5):
            conns[0].request("GET", "/live_monitor_ui.html")
            assert conns[0].getresponse().read()
        assert time.monotonic() - t0 < 1.0
        for c in conns:
            c.close()
    finally:
        handle.stop()
    assert monitor_server.API_RATE >= 2  # one open page asks for 1 a second: never slowed


def test_every_request_thread_runs_at_sched_idle(tmp_root):
    """Linux schedules threads, not processes: each thread that answers a page must itself be
    SCHED_IDLE (read from /proc/self/task/TID/stat, field 41), the accept loop's too."""
    handle = monitor_server.start_in_thread(tmp_root, 0)  # as the daemon starts it
    conns = [http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10) for _ in range(3)]
    try:
        for c in conns:  # keep-alive: each connection's thread waits for its next request
            c.request("GET", "/api/metrics")
            assert c.getresponse().read()
        workers = [t for t in threading.enumerate()
                   if "process_request_thread" in t.name or t.name.startswith("monitor-")]
        assert len(workers) == 4, [t.name for t in threading.enumerate()]
        for t in workers:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rpartition(")")[2].split()
            assert int(fields[41 - 3]) == os.SCHED_IDLE, t.name
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller (training) is untouched
    finally:
        for c in conns:
            c.close()
        handle.stop()


# --------------------------------------------------------------------------- the page

def test_page_and_its_headers(server):
    status, headers, body = request(server.port, "GET", "/live_monitor_ui.html")
    assert status == 200
    assert body == (REPO / "live_monitor_ui.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["server"] == "guardrails-monitor"
    assert not [k for k in headers if k.startswith("access-control-")]
    csp = headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    script = re.search(rb"<script>(.*?)</script>", body, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in csp
    # self-contained: nothing loaded from anywhere else
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", body)
    assert b"@import" not in body and b"<link" not in body

    status, head_headers, head_body = request(server.port, "HEAD", "/live_monitor_ui.html")
    assert status == 200 and head_body == b""
    assert head_headers["content-length"] == str(len(body))


def test_slash_redirects_to_the_page(server):
    status, headers, body = request(server.port, "GET", "/")
    assert status == 302
    assert headers["location"] == "/live_monitor_ui.html"


# --------------------------------------------------------------------------- refusals

TRAVERSALS = [
    "/../config.json", "/%2e%2e/config.json", "/%2E%2E/%2E%2E/etc/passwd", "/..%2fconfig.json",
    "/%2e%2e%2fconfig.json", "//etc/passwd", "/etc/passwd", "/%2fetc%2fpasswd",
    "/live_monitor_ui.html/../config.json", "/api/state/../../config.json", "/./config.json",
    "/config.json", "/metrics.jsonl", "/.daemon_state.json", "/monitor_server.py",
    "/trainroot.py", "/tests/", "/api/", "/api/state/", "/api/metrics/", "/api",
    "/live_monitor_ui.html%00.json", "/LIVE_MONITOR_UI.HTML", "\\..\\config.json",
    "http://127.0.0.1/etc/passwd", "/....//config.json", "/%252e%252e/config.json",
    "/current_model/config.json", "/inbox/", "*",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_other_path_is_served(server, tmp_root, target):
    (tmp_root / "config.json").write_text('{"secret": "SENTINEL-config"}')
    status, headers, body = request(server.port, "GET", target)
    assert status == 404, (target, status, body)
    assert json.loads(body) == {"ok": False, "error": "not found"}
    assert b"SENTINEL" not in body and b"root:" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                                    "CONNECT", "PROPFIND", "MKCOL"])
def test_only_get_and_head(server, tmp_root, method):
    before = sorted(p.name for p in tmp_root.iterdir())
    for target in ("/", "/live_monitor_ui.html", "/api/state", "/api/metrics", "/nope"):
        status, headers, body = request(
            server.port, method, target, body=b'{"action": "stop"}',
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert status == 405, (method, target, status)
        assert headers["allow"] == "GET, HEAD"
        assert not [k for k in headers if k.startswith("access-control-")]
        assert json.loads(body)["error"] == "method not allowed: use GET or HEAD"
    assert sorted(p.name for p in tmp_root.iterdir()) == before


def test_no_cors_headers_even_when_asked(server, tmp_root):
    write_metrics(tmp_root, range(1, 4))
    for target in ("/live_monitor_ui.html", "/api/metrics", "/nope"):
        status, headers, _ = request(server.port, "GET", target,
                                     headers={"Origin": "http://evil.example"})
        assert status in (200, 404)
        assert not [k for k in headers if k.startswith("access-control-")], headers


def test_foreign_host_header_is_refused(server):
    """A page that rebinds its own domain to 127.0.0.1 cannot read the state."""
    for host in ("evil.example", "evil.example:%d" % server.port, "127.0.0.1.evil.example"):
        status, _, body = request(server.port, "GET", "/api/metrics", headers={"Host": host})
        assert status == 403 and b"forbidden host" in body
    for host in ("localhost:%d" % server.port, "127.0.0.1:9999", "[::1]:%d" % server.port):
        assert request(server.port, "GET", "/api/metrics", headers={"Host": host})[0] == 200


def test_malformed_request_gets_the_same_headers(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /api/state HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"X-Content-Type-Options: nosniff" in answer
    assert b"Access-Control" not in answer


# --------------------------------------------------------------------------- /api/metrics

def test_metrics_empty_then_incremental(server, tmp_root):
    doc = get_json(server.port, "/api/metrics")
    assert (doc["lines"], doc["points"], doc["last_step"]) == (0, [], None)

    write_metrics(tmp_root, range(1, 251))
    doc = get_json(server.port, "/api/metrics")
    assert [p["global_step"] for p in doc["points"]] == list(range(1, 251))
    assert set(doc["points"][0]) == {"time", "global_step", "file", "loss", "lr", "tokens_per_sec"}
    assert doc["boundaries"] == [{"global_step": 1, "file": "part-00.jsonl"},
                                 {"global_step": 100, "file": "part-01.jsonl"},
                                 {"global_step": 200, "file": "part-02.jsonl"}]
    doc = get_json(server.port, "/api/metrics?since=240")
    assert [p["global_step"] for p in doc["points"]] == list(range(241, 251))
    assert (doc["matched"], doc["last_step"], doc["downsampled"]) == (10, 250, False)
    assert doc["boundaries"] == []

    # a torn last line is not served until it is complete
    with open(tmp_root / "metrics.jsonl", "a") as f:
        f.write(metric_line(251, "part-02.jsonl")[:20])
    doc = get_json(server.port, "/api/metrics?since=250")
    assert doc["points"] == [] and doc["last_step"] == 250
    with open(tmp_root / "metrics.jsonl", "a") as f:
        f.write(metric_line(251, "part-02.jsonl")[20:] + "\n")
        f.write("not json at all\n")
        f.write(metric_line(252, "part-02.jsonl") + "\n")
    doc = get_json(server.port, "/api/metrics?since=250")
    assert [p["global_step"] for p in doc["points"]] == [251, 252]

    # a file that was replaced (shorter) is indexed again from its start
    (tmp_root / "metrics.jsonl").unlink()
    write_metrics(tmp_root, range(1, 6), file_of=lambda s: "again.jsonl")
    doc = get_json(server.port, "/api/metrics?since=0")
    assert [p["global_step"] for p in doc["points"]] == [1, 2, 3, 4, 5]
    assert doc["boundaries"] == [{"global_step": 1, "file": "again.jsonl"}]


def test_metrics_downsample_keeps_shape_and_last_point(server, tmp_root):
    write_metrics(tmp_root, range(1, 10_001))
    doc = get_json(server.port, "/api/metrics")
    steps = [p["global_step"] for p in doc["points"]]
    assert doc["matched"] == 10_000 and doc["downsampled"] and doc["stride"] == 5
    assert len(steps) == 2000 and steps[0] == 1 and steps[-1] == 10_000
    assert steps == sorted(steps)
    assert len(doc["boundaries"]) == 101  # every file start, even between sampled points
    doc = get_json(server.port, "/api/metrics?since=9000&max_points=100")
    steps = [p["global_step"] for p in doc["points"]]
    assert len(steps) == 100 and steps[0] == 9001 and steps[-1] == 10_000


def test_metrics_increments_while_a_writer_appends(server, tmp_root):
    """Readers polling `since` while lines arrive in torn pieces see each step exactly once."""
    total = 3000
    (tmp_root / "metrics.jsonl").touch()

    def writer():
        with open(tmp_root / "metrics.jsonl", "a") as f:
            for s in range(1, total + 1):
                line = metric_line(s, f"part-{s // 500}.jsonl") + "\n"
                cut = line.index('"global_step": ') + 16  # inside the number
                f.write(line[:cut])
                f.flush()      # a reader may see this torn half: step 1234 read as 1
                f.write(line[cut:])
                if s % 50 == 0:
                    f.flush()
                    time.sleep(0.002)

    seen: dict[int, list[int]] = {n: [] for n in range(3)}

    def reader(n):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        since = 0
        while since < total:
            conn.request("GET", f"/api/metrics?since={since}&max_points=10000")
            doc = json.loads(conn.getresponse().read())
            seen[n] += [p["global_step"] for p in doc["points"]]
            since = doc["last_step"] or 0
        conn.close()

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(n,))
                                                   for n in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(steps == list(range(1, total + 1)) for steps in seen.values())


def test_metrics_steps_going_back_after_a_rollback(server, tmp_root):
    write_metrics(tmp_root, [1, 2, 3, 4, 5, 6, 7, 3, 4, 5])
    doc = get_json(server.port, "/api/metrics?since=4")  # the current run only: 3, 4, 5
    assert [p["global_step"] for p in doc["points"]] == [5]
    assert (doc["last_step"], doc["run_start_step"]) == (5, 3)
    write_metrics(tmp_root, [6, 7, 8, 2, 3])  # and once more, in a later block
    doc = get_json(server.port, "/api/metrics?since=2")
    assert [p["global_step"] for p in doc["points"]] == [3]
    assert (doc["last_step"], doc["run_start_step"]) == (3, 2)
    doc = get_json(server.port, "/api/metrics")  # the whole history, for the chart
    assert [p["global_step"] for p in doc["points"]] == [1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 8, 2, 3]


def test_metrics_odd_lines_are_skipped_and_keep_their_file(server, tmp_root):
    with open(tmp_root / "metrics.jsonl", "w") as f:
        f.write(metric_line(1, "a.jsonl") + "\n")
        f.write('{"global_step": 2, "loss": 1.0}\n')              # no file: still a.jsonl
        f.write('{"event": "resumed", "note": "\\"global_step\\": 99"}\n')  # foreign line
        f.write('{"global_step": 2.5, "file": "z.jsonl"}\n')       # not an integer step
        f.write(metric_line(3, "a.jsonl") + "\n")
        f.write(metric_line(4, 'b "quoted".jsonl') + "\n")
    doc = get_json(server.port, "/api/metrics")
    assert [p["global_step"] for p in doc["points"]] == [1, 2, 3, 4]
    assert doc["boundaries"] == [{"global_step": 1, "file": "a.jsonl"},
                                 {"global_step": 4, "file": 'b "quoted".jsonl'}]


@pytest.mark.parametrize("query", ["since=abc", "since=1.5", "max_points=0",
                                   "max_points=100000", "max_points=x"])
def test_metrics_bad_parameters(server, query):
    status, headers, body = request(server.port, "GET", "/api/metrics?" + query)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["message"].startswith(("since and max_points must be integers",
                                        "max_points must be 1..10000"))


# --------------------------------------------------------------------------- /api/state

def test_state_is_the_state_tracker_document(server, tmp_root):
    import state_tracker
    write_metrics(tmp_root, range(1, 11))
    doc = get_json(server.port, "/api/state")
    expected = json.loads(json.dumps(state_tracker.build_state(tmp_root), default=str))
    assert doc.keys() == expected.keys()
    for key in ("schema_version", "root", "training", "queue", "loss"):
        assert doc[key] == expected[key], key
    assert [w["code"] for w in doc["warnings"]] == [w["code"] for w in expected["warnings"]]
    cli = subprocess.run([sys.executable, str(REPO / "state_tracker.py"), "--json",
                          "--root", str(tmp_root)], capture_output=True, text=True, timeout=60)
    assert json.loads(cli.stdout).keys() == doc.keys()
    status, headers, body = request(server.port, "HEAD", "/api/state")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 2


# --------------------------------------------------------------------------- CLI

def test_cli_serve_until_interrupted(tmp_root):
    proc = subprocess.Popen([sys.executable, str(REPO / "monitor_server.py"), "serve",
                             "--root", str(tmp_root), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        line = proc.stderr.readline()
        m = re.match(r"monitor: http://127\.0\.0\.1:(\d+)/live_monitor_ui\.html \(root (.+)\); "
                     r"Ctrl\+C stops it$", line.strip())
        assert m, line
        assert m.group(2) == str(tmp_root.resolve())
        port = int(m.group(1))
        assert request(port, "GET", "/live_monitor_ui.html")[0] == 200
        assert request(port, "POST", "/api/state")[0] == 405
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# --------------------------------------------------------------------------- the page in a browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's `chromium`)")


def render(url: str, tmp_path: Path, screenshot: Path | None = None,
           budget_ms: int = 5000) -> str:
    """Load `url` in headless Chromium, let its timers run, return the rendered DOM."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-crash-reporter", "--disable-breakpad",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           f"--virtual-time-budget={budget_ms}", "--dump-dom"]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        cmd += [f"--screenshot={screenshot}", "--window-size=1280,900"]
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def element(dom: str, ident: str) -> tuple[dict, str]:
    """(attributes, text) of the element with id=`ident` in a dumped DOM."""
    from html.parser import HTMLParser

    class Finder(HTMLParser):
        def __init__(self):
            super().__init__()
            self.attrs, self.depth, self.text = None, 0, []

        def handle_starttag(self, tag, attrs):
            if self.depth:
                self.depth += tag not in ("br", "img", "input", "meta")
            elif dict(attrs).get("id") == ident:
                self.attrs, self.depth = dict(attrs), 1

        def handle_endtag(self, tag):
            if self.depth:
                self.depth -= 1

        def handle_data(self, data):
            if self.depth:
                self.text.append(data)

    f = Finder()
    f.feed(dom)
    assert f.attrs is not None, f"#{ident} is not in the page"
    return f.attrs, " ".join(" ".join(f.text).split())


def simulate_training_daemon(root: Path) -> str:
    """What a training daemon leaves in `root` mid-file, written as docs/design.md says.

    Used when no real daemon drives the page: metrics.jsonl over three files, a file in
    processing/, a fresh heartbeat with progress, and files waiting in queue/.
    """
    p = trainroot.Paths(root)
    p.ensure()
    name = "chat_support.jsonl"
    shutil.copy(REPO / "examples" / name, p.processing / name)
    for pr, qname in (("high", "urgent_fixes.jsonl"), ("normal", "notes_2026_11.jsonl"),
                      ("normal", "notes_2026_12.jsonl"), ("low", "old_logs.jsonl")):
        (p.queue / pr).mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "text_notes.jsonl", p.queue / pr / qname)
    # three files, the second one rolled back (steps 221-330 undone) and trained again
    write_metrics(root, range(1, 331), file_of=lambda s: "text_notes.jsonl" if s <= 220
                  else "bad_batch.jsonl")
    write_metrics(root, range(221, 601), file_of=lambda s: "instruction_alpaca.jsonl"
                  if s <= 440 else name)
    import backup_manager
    import model_versioner
    model_versioner.create_version(root, "manual", note="before the monitor test", force=True)
    model_versioner.tag_version(root, "v001", "baseline")
    backup_manager.create_backup(root, note="monitor test")
    now = trainroot.utc_now()
    trainroot.atomic_write_json(p.daemon_state, {
        "schema_version": 1, "pid": os.getpid(), "started_at": now, "heartbeat": now,
        "state": "training", "paused_reason": None, "paused_since": None,
        "current_file": {"name": name, "sha256": trainroot.sha256_file(p.processing / name),
                         "priority": "normal"},
        "progress": {"global_step": 600, "step_in_file": 160, "records_done": 37,
                     "records_total": 60, "tokens_per_sec": 3412.5, "loss": 0.1471,
                     "eta_seconds": 754},
        "last_error": None})
    return name


def check_rendered(dom: str, file_name: str) -> int:
    """The assertions every rendering of a training root must pass; the points drawn."""
    attrs, text = element(dom, "state")
    assert attrs["data-state"] == "training" and text == "training", (attrs, text)
    assert element(dom, "current-file")[1] == file_name
    progress = element(dom, "progress-text")[1]
    assert re.fullmatch(r"\d+ / \d+ records \(\d+\.\d%\)", progress), progress
    assert element(dom, "eta")[1] != "—"
    assert element(dom, "tokens-per-sec")[1] != "—"
    chart, _ = element(dom, "chart")
    drawn = int(chart["data-points"])
    assert 0 < drawn <= 2000
    assert "v001" in element(dom, "versions")[1]
    assert element(dom, "warnings")[1]
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert "offline" not in body
    return drawn


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@needs_chromium
@pytest.mark.slow
def test_browser_renders_a_training_root(initialized_root, tmp_path):
    """The real page in headless Chromium over a root mid-training (state written per design.md)."""
    file_name = simulate_training_daemon(initialized_root)
    handle = monitor_server.start_in_thread(initialized_root, 0)
    try:
        shot = ARTIFACTS / "monitor-simulated.png"
        dom = render(handle.url, tmp_path, screenshot=shot)
    finally:
        handle.stop()
    assert check_rendered(dom, file_name) == 710
    versions = element(dom, "versions")[1]
    assert versions.startswith("v002 = current_model v001 baseline 2 versions in all"), versions
    assert re.search(r"latest \S+ \d+s ago ✓ verified", element(dom, "backups")[1])
    assert "urgent_fixes" not in dom  # queue shows counts by priority
    assert re.search(r"high\s*1", element(dom, "queue")[1])
    assert re.search(r"normal\s*2", element(dom, "queue")[1])
    assert png_size(shot) == (1280, 900)


class _DyingHandler(monitor_server.MonitorHandler):
    """The network boundary of a daemon that dies: /api answers twice, then never again."""

    answered = 0

    def _dispatch(self):
        if self.path.startswith("/api/"):
            type(self).answered += 1
            if type(self).answered > 2:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        super()._dispatch()


@needs_chromium
@pytest.mark.slow
def test_browser_shows_not_responding_instead_of_stale_numbers(tmp_root, tmp_path):
    write_metrics(tmp_root, range(1, 50))
    server = monitor_server.make_server(tmp_root, 0)
    server.RequestHandlerClass = _DyingHandler
    _DyingHandler.answered = 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        dom = render(f"http://127.0.0.1:{server.port}/live_monitor_ui.html", tmp_path,
                     screenshot=ARTIFACTS / "monitor-not-responding.png")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert _DyingHandler.answered > 2  # the page kept asking
    attrs, text = element(dom, "state")
    assert attrs["data-state"] == "offline" and text == "not responding"
    assert element(dom, "offline")[1].startswith("daemon not responding")
    assert re.search(r'<body[^>]*class="[^"]*offline', dom)  # main (the numbers) is hidden


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_chromium
@pytest.mark.slow
def test_browser_against_a_running_daemon(initialized_root, tmp_path):
    """The page served by `training_daemon.py run` on the tiny model, rendered mid-file."""
    import training_config
    root = initialized_root
    port = free_port()
    cfg = training_config.load_config(root)
    cfg["monitor_port"] = port  # not a locked parameter: no approval needed
    training_config.write_config(root, cfg)
    name = "monitor_notes.jsonl"
    lines = [json.dumps({"text": f"Note {i}: the monitor shows the loss of every step, "
                                 f"the file being trained and what waits in the queue. " * 3})
             for i in range(999)]  # still training when the browser renders, even when slow
    staged = root / "inbox" / ".monitor_notes.jsonl.tmp"
    staged.write_text("\n".join(lines) + "\n")
    staged.rename(root / "inbox" / name)
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, str(REPO / "training_daemon.py"), "run",
                               "--root", str(root)], stdout=log, stderr=subprocess.STDOUT,
                              cwd=str(REPO))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            assert not list((root / "failed").glob("*.jsonl")), \
                (tmp_path / "daemon.log").read_text()[-3000:]
            state = trainroot.read_json(root / ".daemon_state.json", default={}) or {}
            steps = (state.get("progress") or {}).get("global_step") or 0
            if state.get("state") == "training" and steps >= 2:
                break
            assert time.monotonic() < deadline, (state, (tmp_path / "daemon.log").read_text()[-3000:])
            time.sleep(0.3)
        dom = render(f"http://127.0.0.1:{port}/live_monitor_ui.html", tmp_path,
                     screenshot=ARTIFACTS / "monitor.png")
        drawn = check_rendered(dom, name)
        assert drawn >= 2
        # the daemon's monitor refuses what the standalone one refuses
        assert request(port, "GET", "/../config.json")[0] == 404
        assert request(port, "POST", "/api/state")[0] == 405
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            log.close()
    assert png_size(ARTIFACTS / "monitor.png") == (1280, 900)
    with pytest.raises(OSError):  # the monitor went with the daemon
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_daemon_runs_on_when_the_monitor_port_is_taken(initialized_root):
    """A taken port costs one clear log line; the daemon goes on and exits 0 (`run --once`).

    The queue is empty so that no torch is imported: training a file here costs ~25 s of
    the test budget, and the daemon's code path after the log line is the same.
    """
    import training_config
    root = initialized_root
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = training_config.load_config(root)
        cfg["monitor_port"] = port
        training_config.write_config(root, cfg)
        proc = subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "run", "--once",
                               "--root", str(root)], capture_output=True, text=True,
                              timeout=120, cwd=str(REPO))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"monitor not started: port {port} is already in use, 127.0.0.1:{port}." in output
