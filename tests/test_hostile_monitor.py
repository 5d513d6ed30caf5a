"""The live monitor under hostile requests and hostile state: real server, real sockets.

Each test here failed before the fix it guards (see the docstrings); the browser test
checks that hostile strings stay text and one hostile metrics line cannot blank the page.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

import monitor_server
import trainroot
from conftest import REPO
from test_monitor import element, needs_chromium, render, request, write_metrics

HOSTILE = "<img src=x onerror=alert(1)>.jsonl"


@pytest.fixture
def server(tmp_root):
    handle = monitor_server.start_in_thread(tmp_root, 0, state_ttl=0.0, idle_priority=False,
                                             max_rate=None)
    yield handle
    handle.stop()


def raw(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send bytes as they are; everything the server answers until it closes (or times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            out += b"<timeout>"
    return out


def strict_json(body: bytes):
    """Parse as a browser's JSON.parse does: NaN and Infinity are errors."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(body, parse_constant=refuse)


# --------------------------------------------------------------------------- hostile metrics

def test_a_step_too_big_for_the_index_is_skipped_not_a_500_forever(server, tmp_root):
    """Before: one line with global_step >= 2**63 made every /api/metrics a 500 (OverflowError)."""
    write_metrics(tmp_root, range(1, 4))
    with open(tmp_root / "metrics.jsonl", "a") as f:
        f.write('{"global_step": 99999999999999999999999, "loss": 1.0, "file": "x.jsonl"}\n')
        f.write('{"global_step": -99999999999999999999999, "loss": 1.0}\n')
    write_metrics(tmp_root, range(4, 6))
    for _ in range(2):
        status, _, body = request(server.port, "GET", "/api/metrics")
        assert status == 200, body
        doc = strict_json(body)
        assert [p["global_step"] for p in doc["points"]] == [1, 2, 3, 4, 5]
        assert doc["last_step"] == 5


def test_nested_nan_in_a_metric_field_still_gives_strict_json(server, tmp_root):
    """Before: `"loss": [NaN]` or `"time": {"x": Infinity}` went out as NaN/Infinity tokens,
    which the page's JSON.parse rejects: the whole monitor showed "not responding"."""
    write_metrics(tmp_root, range(1, 3))
    with open(tmp_root / "metrics.jsonl", "a") as f:
        f.write('{"global_step": 3, "loss": [NaN], "time": {"x": Infinity}, "file": "a.jsonl",'
                ' "lr": -Infinity, "tokens_per_sec": NaN}\n')
    status, _, body = request(server.port, "GET", "/api/metrics")
    assert status == 200
    last = strict_json(body)["points"][-1]
    assert last == {"time": None, "global_step": 3, "file": "a.jsonl", "loss": None,
                    "lr": None, "tokens_per_sec": None}


# --------------------------------------------------------------------------- hostile requests

def test_two_host_headers_are_refused(server):
    """Before: the first Host was checked and a second (foreign) one rode along: a 200."""
    answer = raw(server.port, b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"more than one Host header" in answer and b'"root"' not in answer


def test_a_get_body_is_not_taken_for_a_second_request(server):
    """Before: the unread body of a kept-alive GET was parsed as the next request (smuggling)."""
    smuggled = b"GET /api/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = raw(server.port, b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                 + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 404 ") and not answer.endswith(b"<timeout>")
    assert answer.count(b"HTTP/1.1 ") == 1, answer


def test_http_0_9_is_answered_at_once_not_after_the_timeout(server):
    """Before: `GET /api/state` with no version waited for headers: the socket hung 15 s."""
    started = time.monotonic()
    answer = raw(server.port, b"GET /api/state\r\n", timeout=5)
    assert time.monotonic() - started < 2 and not answer.endswith(b"<timeout>")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"X-Content-Type-Options: nosniff" in answer
    assert b'"root"' not in answer


@pytest.mark.parametrize("target", [
    b"/..%2f..%2fetc%2fpasswd", b"/%2e%2e/%2e%2e/etc/passwd", b"//etc/passwd", b"/..\\..\\x",
    b"/live_monitor_ui.html%00", b"/%c0%ae%c0%ae/monitor_server.py", b"/api/state/",
    b"http://evil.example/api/state", b"/monitor_server.py"])
def test_traversal_in_any_encoding_is_404(server, target):
    answer = raw(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:100]
    assert b"import" not in answer and b"root:" not in answer


def test_a_dropped_connection_leaves_no_traceback_in_the_log(tmp_root):
    """Before: a client that hung up mid-answer printed a ConnectionResetError traceback."""
    write_metrics(tmp_root, range(1, 20001), file_of=lambda s: "f" * 200 + ".jsonl")
    port_probe = socket.socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    proc = subprocess.Popen([sys.executable, str(REPO / "monitor_server.py"), "serve",
                             "--root", str(tmp_root), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(b"GET /api/metrics?max_points=10000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.recv(100)
            s.close()  # RST with most of the answer unsent
        assert request(port, "GET", "/api/state")[0] == 200  # still serving
    finally:
        proc.terminate()
        err = proc.communicate(timeout=10)[1]
    assert "Traceback" not in err and "ConnectionResetError" not in err, err[-2000:]


# --------------------------------------------------------------------------- in a browser

@needs_chromium
@pytest.mark.slow
def test_browser_keeps_hostile_strings_as_text(tmp_root, tmp_path):
    """Hostile file names stay text, and one NaN-laden metrics line does not blank the page
    (before the fix the page showed "not responding": JSON.parse refused the answer)."""
    p = trainroot.Paths(tmp_root)
    p.ensure()
    (p.processing / HOSTILE).write_text('{"text": "hi"}\n')
    write_metrics(tmp_root, range(1, 400), file_of=lambda s: HOSTILE)
    with open(p.metrics, "a") as f:
        f.write('{"global_step": 400, "loss": [NaN], "file": "<script>alert(2)</script>"}\n')
    write_metrics(tmp_root, range(401, 450), file_of=lambda s: "</canvas><u>x</u>")
    now = trainroot.utc_now()
    trainroot.atomic_write_json(p.daemon_state, {
        "schema_version": 1, "pid": os.getpid(), "started_at": now, "heartbeat": now,
        "state": "training", "paused_reason": None, "paused_since": None,
        "current_file": {"name": HOSTILE, "priority": "<u>high</u>"},
        "progress": {"global_step": 449, "records_done": 3, "records_total": 9,
                     "tokens_per_sec": 100.0, "loss": 0.5, "eta_seconds": 60},
        "last_error": "<img src=y onerror=alert(3)>"})
    # tag names and ids that are also Object.prototype's keys (before: a TypeError, and the
    # page said "daemon not responding")
    (p.versions / "tags.json").write_text(json.dumps(
        {"__proto__": "__proto__", "t2": "constructor", "<u>t3</u>": "toString"}))
    handle = monitor_server.start_in_thread(tmp_root, 0)
    try:
        dom = render(handle.url, tmp_path, budget_ms=4000)
    finally:
        handle.stop()
    assert not re.search(r'<body[^>]*class="[^"]*offline', dom), element(dom, "offline")
    assert element(dom, "current-file")[1] == HOSTILE
    assert int(element(dom, "chart")[0]["data-points"]) > 400
    assert not re.search(r"<img|<script>alert|<u>", dom, re.I)  # every one of them escaped
    assert "constructor t2" in element(dom, "versions")[1]
    for section in ("queue", "versions", "backups", "warnings"):
        assert element(dom, section)[1]
